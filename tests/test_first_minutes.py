"""A user's first minutes: usage errors in one line, no output a user cannot act on, and the end of a run saying
where its files are."""

import pytest
from PIL import Image

from mirage_hf import cli, hub, training


def one_line_exit(main, argv) -> str:
    """The message a console script exits with; it must be a single line (Python prints it, no traceback)."""
    with pytest.raises(SystemExit) as exit_:
        main(argv)
    message = exit_.value.code
    assert isinstance(message, str) and "\n" not in message, message
    return message


def test_usage_errors_are_one_line_naming_what_to_change(detector_dir, tmp_path, capsys):
    push = [
        "--model_dir",
        str(detector_dir),
        "--repo_id",
        "you/demo",
        "--staging_dir",
        str(tmp_path / "s"),
        "--dry_run",
    ]
    assert "pass a licence (--license)" in one_line_exit(hub.main, push)  # the demo's data fix no licence
    assert "config file 'nonexistent' not found" in one_line_exit(training.main, ["--config", "nonexistent"])
    missing = str(tmp_path / "no-such-model")
    expected = f"no model folder {missing!r} (and the name is not a Hub id)"
    assert expected in one_line_exit(training.main, ["--eval_only", "--model", missing])
    assert f"no model folder {missing!r}" in one_line_exit(hub.main, ["--model_dir", missing, "--repo_id", "a/b"])
    Image.new("RGB", (8, 8)).save(tmp_path / "photo.png")
    capsys.readouterr()
    assert cli.main([str(tmp_path / "photo.png"), "--model", missing]) == 1
    assert capsys.readouterr().err.splitlines() == [f"mirage-detect: {expected}"]

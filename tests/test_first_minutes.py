"""A user's first minutes: usage errors in one line, no output a user cannot act on, and the end of a run saying
where its files are."""

import io
import os
import socket
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
from conftest import TINY_TRAIN_ARGS as TINY
from PIL import Image

from mirage_hf import cli, evaluate_model, hub, training
from mirage_hf.progress import progress_bar


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
    assert expected in one_line_exit(evaluate_model.main, ["--model", missing])
    assert f"no model folder {missing!r}" in one_line_exit(hub.main, ["--model_dir", missing, "--repo_id", "a/b"])
    Image.new("RGB", (8, 8)).save(tmp_path / "photo.png")
    capsys.readouterr()
    assert cli.main([str(tmp_path / "photo.png"), "--model", missing]) == 1
    assert capsys.readouterr().err.splitlines() == [f"mirage-detect: {expected}"]


def test_progress_bars_write_plain_lines_where_stderr_is_not_a_terminal():
    log = io.StringIO()  # a file or a pipe: not a terminal
    outer = progress_bar(total=3, desc="train", file=log)
    for _ in progress_bar(range(5), desc="eval", file=log, leave=False):  # nested, cleared on a terminal when done
        pass
    outer.update(3)
    outer.close()
    lines = log.getvalue().splitlines()
    assert "\r" not in log.getvalue() and "\x1b" not in log.getvalue()
    # each bar's first and last line: a log cannot clear a bar, and its 0% line alone would read as stuck
    assert [line.split("|")[0] for line in lines] == ["train:   0%", "eval:   0%", "eval: 100%", "train: 100%"]


@pytest.mark.slow
def test_a_run_shows_nothing_a_user_cannot_act_on_and_ends_saying_where_its_files_are(tmp_path, capfd):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        training.main(["--config", "demo", "--output_dir", str(tmp_path / "run"), *TINY, "--max_steps", "2"])
        evaluate_model.main(["--model", str(tmp_path / "run" / "model"), "--output_dir", str(tmp_path / "eval")])
    out, err = capfd.readouterr()
    for noise in ("Loading weights", "Writing model shards", "[RANK", "\r"):
        assert noise not in out + err, noise
    assert not [w for w in caught if "is_gradient_checkpointing" in str(w.message)]
    lines = out.splitlines()
    assert f"model written to {tmp_path / 'run' / 'model'}" in lines
    assert lines.index(f"results written to {tmp_path / 'run' / 'eval_results.json'}") < len(lines) - 1
    assert lines[-1] == f"results written to {tmp_path / 'eval' / 'eval_results.json'}"


def unreachable_hub_env(tmp_path) -> dict:
    """Not offline by setting, but the Hub does not answer: HF_ENDPOINT is a port with nothing listening."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        endpoint = f"http://127.0.0.1:{sock.getsockname()[1]}"
    env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")}
    return env | {"HF_ENDPOINT": endpoint, "HF_HOME": str(tmp_path / "hf")}


def test_an_unreachable_hub_fails_at_once_without_a_line_per_retry(tmp_path):
    """One request, then the offline message."""
    env = unreachable_hub_env(tmp_path)
    train_py = Path(__file__).resolve().parent.parent / "train.py"
    command = [sys.executable, str(train_py), "--clip_model", "someone/clip", "--output_dir", str(tmp_path)]
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 1 and "Retrying" not in result.stderr
    assert result.stderr.strip().splitlines() == [
        "train.py: clip_model 'someone/clip' is not a local folder and could not be fetched from the Hub "
        "(offline or unreachable, and not in the cache). Download it once where the Hub is reachable "
        "(`hf download someone/clip`), or point at a local copy: --clip_model /path/to/clip"
    ]


@pytest.mark.parametrize("command", ["mirage-detect", "mirage-adapt"])
def test_a_hub_detector_on_an_unreachable_hub_fails_at_once_without_a_line_per_retry(tmp_path, command):
    """huggingface_hub alone would retry each request five times with backoff, over a minute of lines."""
    from PIL import Image

    image = tmp_path / "photo.png"
    Image.new("RGB", (32, 32), "gray").save(image)
    args = {
        "mirage-detect": [str(image), "--model", "someone/detector"],
        "mirage-adapt": ["someone/detector", "--fakes", str(image), "--force"],  # --force: one fake is too few
    }
    script = Path(sys.executable).parent / command  # the console script installed beside this interpreter
    result = subprocess.run(
        [str(script), *args[command]], env=unreachable_hub_env(tmp_path), capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 1 and "Retrying" not in result.stderr
    assert result.stderr.startswith(f"{command}: ") and "couldn't connect" in result.stderr

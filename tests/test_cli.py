import csv
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import mirage_hf.scan
from mirage_hf.cli import main
from mirage_hf.inference import Detector
from mirage_hf.scan import FIELDS

GOOD = [
    "nested/deeper/ok_rgb.png",
    "ok_1x1.png",
    "ok_gray.png",
    "ok_photo.jpg",
    "ok_rgb.png",
    "ok_rgba.png",
    "ok_upper.JPEG",
]
BAD = {"bad_corrupt.png": "corrupt", "bad_empty.gif": "empty file", "bad_text.jpg": "not an image"}


@pytest.fixture(scope="module")
def model_dir(detector_dir):
    return str(detector_dir)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """Every kind of file a scraped folder holds: good images of several modes and sizes, broken ones, a note."""
    root = tmp_path_factory.mktemp("images")
    (root / "nested" / "deeper").mkdir(parents=True)
    rng = np.random.default_rng(0)

    def noise(h, w):
        return Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8))

    noise(40, 36).save(root / "ok_rgb.png")
    noise(33, 45).save(root / "nested" / "deeper" / "ok_rgb.png")
    noise(50, 30).save(root / "ok_photo.jpg", "JPEG")
    noise(30, 30).save(root / "ok_upper.JPEG", "JPEG")
    noise(31, 31).convert("L").save(root / "ok_gray.png")
    noise(32, 40).convert("RGBA").save(root / "ok_rgba.png")
    noise(1, 1).save(root / "ok_1x1.png")
    png = io.BytesIO()
    noise(40, 40).save(png, "PNG")
    (root / "bad_corrupt.png").write_bytes(png.getvalue()[:60] + b"\x00garbage" * 50)
    (root / "bad_text.jpg").write_text("this is not a JPEG")
    (root / "bad_empty.gif").write_bytes(b"")
    (root / "notes.txt").write_text("not an image, and not named like one")
    return root


def run(capsys, *args):
    """main() in-process: (exit code, stdout, stderr)."""
    code = main([str(arg) for arg in args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def by_name(records, root):
    return {os.path.relpath(record["path"], root): record for record in records}


def jsonl(text):
    return [json.loads(line) for line in text.splitlines()]


def test_mixed_folder_scores_every_good_file_and_reports_every_bad_one(capsys, folder, model_dir):
    code, out, err = run(capsys, folder, "--model", model_dir, "--format", "jsonl")
    assert code == 2
    rows = by_name(jsonl(out), folder)
    assert sorted(rows) == sorted(GOOD + list(BAD))  # notes.txt is not an image name: skipped by the walk
    for name in GOOD:
        assert rows[name]["label"] in ("real", "fake", "unsure") and 0.0 <= rows[name]["p_fake"] <= 1.0
        assert rows[name]["error"] is None
    for name, reason in BAD.items():
        assert rows[name]["label"] == "error" and rows[name]["p_fake"] is None
        assert reason in rows[name]["error"]
        assert f"cannot read {folder / name}: {rows[name]['error']}" in err


def test_glob_of_good_files_exits_0_and_named_files_are_always_tried(capsys, folder, model_dir):
    """The CLI expands quoted globs itself (`**` recursive); a file named outright is read whatever its suffix."""
    code, out, _ = run(capsys, folder / "**" / "ok_*", "--model", model_dir, "--format", "jsonl")
    assert code == 0 and sorted(by_name(jsonl(out), folder)) == sorted(GOOD)
    code, out, _ = run(capsys, folder / "notes.txt", "--model", model_dir, "--format", "jsonl")
    assert code == 2 and jsonl(out)[0]["error"] == "not an image (unrecognised format)"


def test_formats_parse(capsys, folder, model_dir):
    expected = jsonl(run(capsys, folder, "--model", model_dir, "--format", "jsonl")[1])
    _, out, _ = run(capsys, folder, "--model", model_dir, "--format", "csv")
    reader = csv.reader(io.StringIO(out))
    assert next(reader) == list(FIELDS)
    assert [row[:2] for row in reader] == [[r["path"], r["label"]] for r in expected]
    _, out, _ = run(capsys, folder, "--model", model_dir, "--format", "json")
    assert json.loads(out) == expected
    _, out, _ = run(capsys, folder, "--model", model_dir)  # table
    lines = out.splitlines()
    assert lines[0].split() == list(FIELDS) and len(lines) == 2 + len(expected)
    label_column = lines[0].index("label")
    for line, record in zip(lines[2:], expected):
        assert line.startswith(record["path"]) and line[label_column:].startswith(record["label"])
        if record["p_fake"] is not None:
            assert f"{record['p_fake']:.4f}" in line


def test_output_file_is_written_whole(capsys, folder, model_dir, tmp_path):
    target = tmp_path / "scores.csv"
    code, out, _ = run(capsys, folder / "ok_rgb.png", "--model", model_dir, "--format", "csv", "--output", target)
    assert code == 0 and out == ""
    assert os.listdir(tmp_path) == ["scores.csv"]  # no temporary file left behind
    with target.open() as handle:
        assert [row["path"] for row in csv.DictReader(handle)] == [str(folder / "ok_rgb.png")]


def test_missing_model_usage_errors_and_empty_inputs(capsys, folder, model_dir, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code, _, err = run(capsys, folder)
    assert code == 1 and "python train.py" in err and "--model" in err
    (tmp_path / "outputs" / "demo").mkdir(parents=True)
    (tmp_path / "outputs" / "demo" / "model").symlink_to(model_dir)  # the demo export is the default model
    assert run(capsys, folder / "ok_rgb.png")[0] == 0
    assert run(capsys, folder, "--batch_size", "0")[0] == 1
    assert run(capsys, folder, "--unsure_margin", "0.5")[0] == 1
    assert run(capsys, folder, "--format", "xml")[0] == 1
    (tmp_path / "empty").mkdir()
    code, _, err = run(capsys, tmp_path / "empty")
    assert code == 2 and "no image files found" in err


def test_small_batches_give_the_same_rows_and_decode_lazily(capsys, folder, model_dir, monkeypatch):
    """Batch size changes nothing in the results; images are decoded batch by batch (at most 3 decoded images
    before each scoring call), never all up front, which is what lets a folder of 100k images run."""
    one_batch = jsonl(run(capsys, folder, "--model", model_dir, "--format", "jsonl", "--batch_size", "64")[1])
    events = []
    open_image, p_fake = mirage_hf.scan.open_image, Detector.p_fake_from_pixels
    monkeypatch.setattr(mirage_hf.scan, "open_image", lambda path: events.append("o") or open_image(path))
    monkeypatch.setattr(Detector, "p_fake_from_pixels", lambda self, pixels: events.append("|") or p_fake(self, pixels))
    code, out, _ = run(capsys, folder, "--model", model_dir, "--format", "jsonl", "--batch_size", "3", "--num_workers", "0")
    assert code == 2
    for small, big in zip(jsonl(out), one_batch, strict=True):
        assert small == pytest.approx(big, abs=2e-4)  # batched kernels may round the 4th decimal differently
    # 10 files in batches of 3; the first batch holds only the 3 broken files, so it is never scored
    assert "".join(events) == "ooo" + "ooo|" + "ooo|" + "o|"


def test_explain_writes_one_overlay_per_scored_image(capsys, folder, model_dir, tmp_path):
    code, _, _ = run(capsys, folder, "--model", model_dir, "--format", "jsonl", "--explain", tmp_path / "maps")
    assert code == 2
    written = sorted(os.listdir(tmp_path / "maps"))
    # named after the inputs; the nested ok_rgb.png does not overwrite the top-level one
    expected = [
        "ok_1x1.png",
        "ok_gray.png",
        "ok_photo.png",
        "ok_rgb-1.png",
        "ok_rgb.png",
        "ok_rgba.png",
        "ok_upper.png",
    ]
    assert written == expected
    with Image.open(tmp_path / "maps" / "ok_photo.png") as overlay:
        assert overlay.mode == "RGB" and overlay.size == (30, 50)


def test_installed_console_script(folder, model_dir):
    """One real run of the `mirage-detect` entry point: exit code and stdout as a shell user sees them."""
    script = Path(sys.executable).parent / "mirage-detect"
    result = subprocess.run(
        [script, str(folder / "**" / "ok_*"), "--model", model_dir, "--format", "csv", "--quiet"],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert len(list(csv.DictReader(io.StringIO(result.stdout)))) == len(GOOD)

"""`mirage-detect --engine ray` on a local Ray cluster started by the tests: the local scan's rows for a mixed
image/video folder with bad files and a repeated input, URIs, the Parquet schema, a scoring actor killed during
the run, resume after an interrupted job, and the usage errors."""

import json
import os
import signal
import sys
import threading
import time

import pyarrow.parquet as pq
import pytest
import ray
from conftest import random_images
from PIL import Image
from test_video import demo_frames, write_gif, write_video

from mirage_hf import ray_scan
from mirage_hf.cli import main
from mirage_hf.scan import columns


@pytest.fixture(scope="module", autouse=True)
def cluster():
    """A local cluster of 2 CPUs, shared by the module (starting one costs a few seconds)."""
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """Images of several sizes, a video, an animated GIF, and three files that cannot be read."""
    root = tmp_path_factory.mktemp("mixed")
    frames = demo_frames(12, size=48)
    for index, array in enumerate(frames[:6]):
        Image.fromarray(array).resize((40 + 7 * index, 36 + 3 * index)).save(root / f"image_{index}.png")
    write_video(root / "clip.mp4", frames[6:12], fps=4)
    write_gif(root / "anim.gif", frames[:4])
    Image.fromarray(frames[0]).save(root / "nested.jpg")
    (root / "text.png").write_text("not an image")
    (root / "empty.jpg").write_bytes(b"")
    (root / "cut.mp4").write_bytes((root / "clip.mp4").read_bytes()[:400])
    return root


def scan(capsys, *args):
    code = main([str(arg) for arg in args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def keyed(records):
    """Rows by (path, frame instant as json writes it, to the ms): Ray's arrive in no fixed order. Each key once."""
    records = list(records)
    rows = {(row["path"], None if row["frame"] is None else round(row["frame"], 3)): row for row in records}
    assert len(rows) == len(records), "a file or frame has more than one row"
    return rows


def read_parquet(folder):
    return pq.read_table(str(folder)).to_pylist()


def assert_same_rows(expected, got, tolerance):
    assert set(got) == set(expected)
    for key, want in expected.items():
        row = got[key]
        assert (row["label"], row["error"], row["frames"]) == (want["label"], want["error"], want["frames"]), key
        for name in ("p_fake", "p_fake_max", "fake_fraction", "spread"):
            if want.get(name) is None:
                assert row.get(name) is None, (key, name)
            else:
                assert row[name] == pytest.approx(want[name], abs=tolerance), (key, name)


def test_the_ray_scan_writes_the_local_scan_s_rows(capsys, folder, detector_dir, tmp_path):
    """Same inputs (the folder, and one of its files again), frames and stability: the same rows, each file once,
    unreadable files as error rows; as Parquet with the local scan's columns and as csv."""
    inputs = [folder, folder / "image_2.png", "--model", detector_dir, "--frames", "--stability", "--max_frames", 4]
    code, out, err = scan(capsys, *inputs, "--format", "json", "-q")
    assert code == 2
    local = keyed(json.loads(out))
    labels = {row["label"] for row in local.values()}
    assert "error" in labels and labels - {"error"} and any(frame is not None for _, frame in local)

    output = tmp_path / "rows.parquet"
    code, _, err = scan(capsys, *inputs, "--engine", "ray", "--output", output, "--batch_size", 3)
    assert code == 2 and "3 unreadable" in err
    assert_same_rows(local, keyed(read_parquet(output)), 1e-4)  # json holds 4 decimals, Parquet all of them
    schema = pq.read_schema(next(output.glob("*.parquet")))
    assert schema.names == list(columns(stability=True))
    assert str(schema.field("p_fake").type) == "double" and str(schema.field("frames").type) == "int64"

    code, out, _ = scan(capsys, *inputs, "--engine", "ray", "--format", "jsonl", "--batch_size", 3)
    assert code == 2
    assert_same_rows(local, keyed(json.loads(line) for line in out.splitlines()), 1e-4)  # 4 decimals written


def test_uris_of_a_folder_and_of_files_score_as_the_local_paths(capsys, folder, detector_dir, tmp_path):
    uri = folder.as_uri()
    paths = ray_scan.find_inputs([uri, uri + "/image_0.png", uri + "/missing.png"])
    local_files = sorted(str(path) for path in folder.iterdir())
    assert list(paths) == [f"file://{path}" for path in local_files] + [uri + "/missing.png"]
    code, out, _ = scan(capsys, folder, "--model", detector_dir, "--format", "json", "-q")
    local = {os.path.basename(row["path"]): row for row in json.loads(out)}
    code, out, _ = scan(capsys, uri, "--model", detector_dir, "--engine", "ray", "--format", "json", "-q")
    remote = {os.path.basename(row["path"]): row for row in json.loads(out)}
    assert all(row["path"].startswith("file://") for row in remote.values())
    assert_same_rows(local, remote, 1e-4)
    code, out, _ = scan(capsys, uri + "/missing.png", "--model", detector_dir, "--engine", "ray", "--format", "json")
    assert code == 2 and json.loads(out)[0]["error"] == "file not found"
    output = (tmp_path / "out.parquet").as_uri()  # written through the URI's file system by the workers
    code, _, err = scan(capsys, folder, "--model", detector_dir, "--engine", "ray", "--output", output, "-q")
    assert code == 2 and len(read_parquet(tmp_path / "out.parquet")) == len(local)
    code, _, err = scan(capsys, folder, "--model", detector_dir, "--engine", "ray", "--output", output, "-q")
    assert code == 1 and "exists; pass --resume" in err
    code, _, err = scan(
        capsys, folder, "--model", detector_dir, "--engine", "ray", "--format", "csv", "--output", output
    )
    assert code == 1 and "a URI takes --engine ray --format parquet" in err


@pytest.fixture(scope="module")
def many_images(tmp_path_factory):
    return random_images(tmp_path_factory.mktemp("many"), 160, (24, 24), seed=0)


def scoring_actor_pids() -> list[int]:
    """The processes of the scoring actors: Ray titles each worker process after the task it runs."""
    pids = []
    for entry in os.listdir("/proc"):
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as handle:
                title = handle.read()
        except OSError:  # not a process, or one that ended
            continue
        if title.startswith(b"ray::") and b"ScoreFiles" in title:
            pids.append(int(entry))
    return pids


def test_a_scoring_actor_killed_during_the_run_leaves_every_input_exactly_once(
    capsys, many_images, detector_dir, tmp_path
):
    """SIGKILL of the actor's process once rows have arrived: Ray restarts it and retries its batches."""
    output = tmp_path / "rows.csv"
    killed = []

    def kill_once_rows_arrive():
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and not killed:
            if output.exists() and len(output.read_text().splitlines()) > 5 and (pids := scoring_actor_pids()):
                os.kill(pids[0], signal.SIGKILL)
                killed.append((pids[0], len(output.read_text().splitlines())))
            time.sleep(0.02)

    killer = threading.Thread(target=kill_once_rows_arrive)
    killer.start()
    code, _, err = scan(capsys, many_images, "--model", detector_dir, "--engine", "ray", "--batch_size", 1,
                        "--format", "csv", "--output", output, "-q")  # fmt: skip
    killer.join()
    assert code == 0, err
    assert killed and killed[0][1] < 161, "the actor must be killed before the last row for the test to mean anything"
    paths = [line.split(",")[0] for line in output.read_text().splitlines()[1:]]
    assert sorted(paths) == sorted(str(path) for path in many_images.iterdir())


def test_resume_after_an_interrupted_job_scores_only_what_is_missing(capsys, folder, detector_dir, tmp_path):
    """The first run scored part of the files; the interruption cut a Parquet part mid-write. --resume removes the
    cut part, scores the files without a row, and leaves every file once."""
    output = tmp_path / "rows.parquet"
    some = sorted(str(path) for path in folder.glob("image_*.png"))
    assert scan(capsys, *some, "--model", detector_dir, "--engine", "ray", "--output", output, "-q")[0] == 0
    first = {path.name for path in output.iterdir()}
    part = next(output.iterdir())
    (output / "cut.parquet").write_bytes(part.read_bytes()[:50])
    code, _, err = scan(capsys, folder, "--model", detector_dir, "--engine", "ray", "--output", output, "--resume")
    assert code == 2 and "removing" in err and "cut.parquet" in err
    rows = [row for row in read_parquet(output) if row["frame"] is None]
    assert sorted(row["path"] for row in rows) == sorted(str(path) for path in folder.iterdir())
    new = pq.read_table([str(output / name) for name in os.listdir(output) if name not in first]).to_pylist()
    assert not {row["path"] for row in new} & set(some)  # the files of the first run were not scored again
    code, _, err = scan(capsys, folder, "--model", detector_dir, "--engine", "ray", "--output", output, "--resume")
    assert code == 2 and "removing" not in err
    assert len([row for row in read_parquet(output) if row["frame"] is None]) == len(rows)  # nothing added


def test_usage_errors_and_a_missing_extra(capsys, folder, detector_dir, tmp_path, monkeypatch):
    code, _, err = scan(
        capsys, folder, "--model", detector_dir, "--output", tmp_path / "x.parquet", "--format", "parquet"
    )
    assert code == 1 and "--format parquet: only with --engine ray" in err
    code, _, err = scan(capsys, folder, "--model", detector_dir, "--engine", "ray", "--explain", tmp_path / "maps")
    assert code == 1 and "--explain runs with --engine local" in err
    code, _, err = scan(capsys, folder, "--model", detector_dir, "--engine", "ray", "--concurrency", "3,2")
    assert code == 1 and "MIN <= MAX" in err
    code, _, err = scan(capsys, folder, "--model", tmp_path / "nothing", "--engine", "ray", "--format", "json")
    assert code == 1 and "no model folder" in err
    monkeypatch.setitem(sys.modules, "ray", None)  # as if the extra were not installed
    code, _, err = scan(capsys, folder, "--model", detector_dir, "--engine", "ray")
    assert code == 1 and 'pip install "mirage-hf[ray]"' in err

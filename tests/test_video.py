"""Videos in `mirage-detect`: sampling with keyframe seeks, one row per video (and per frame), bad videos as error
rows, a mixed folder killed and resumed, flat memory on a long video. Videos are encoded in the tests with PyAV
from the demo's synthetic frames."""

import io
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import av
import numpy as np
import pytest
from PIL import Image

from mirage_hf import video
from mirage_hf.cli import main
from mirage_hf.demo.synthetic import synthetic_dataset
from mirage_hf.inference import Detector

ROOT = Path(__file__).resolve().parent.parent


def demo_frames(n, seed=0, size=64):
    """`n` frames of the demo's synthetic data (real scenes and upsampler fakes alternating) as uint8 arrays."""
    rows = synthetic_dataset(n=n, image_size=size, seed=seed)
    return [np.asarray(Image.open(io.BytesIO(row["image"]["bytes"])).convert("RGB")) for row in rows]


def write_video(path, frames, fps=8, codec="libx264", gop=4, options=None):
    with av.open(str(path), "w", options=options or {}) as container:
        stream = container.add_stream(codec, rate=fps)
        stream.height, stream.width = frames[0].shape[:2]
        stream.pix_fmt = "yuv420p"
        stream.codec_context.gop_size = gop
        for array in frames:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(array, format="rgb24")))
        container.mux(stream.encode())
    return str(path)


def write_gif(path, frames, duration_ms=125):
    images = [Image.fromarray(array) for array in frames]
    images[0].save(path, save_all=True, append_images=images[1:], duration=duration_ms, loop=0)
    return str(path)


def all_frames(path):
    """Every frame of a video with its time, decoded front to back without any seek: the reference."""
    with av.open(str(path)) as container:
        return [(frame.time, frame.to_image()) for frame in container.decode(container.streams.video[0])]


def reference_frames(path, times):
    """The frame on screen at each instant (the last one starting at or before it), from the sequential decode."""
    frames = all_frames(path)
    start = frames[0][0]
    return [[image for t, image in frames if t <= start + instant + 1e-6][-1] for instant in times]


@pytest.fixture(scope="module")
def detector(detector_dir):
    return Detector.from_pretrained(detector_dir, device="cpu", unsure_margin=0.05)


@pytest.fixture(scope="module")
def long_video(tmp_path_factory):
    """30 s at 10 fps with a keyframe every second: 300 frames."""
    frames = demo_frames(20)
    return write_video(tmp_path_factory.mktemp("long") / "long.mp4", [frames[i % 20] for i in range(300)], 10, gop=10)


def test_samples_are_uniform_and_seeking_decodes_only_near_them(long_video, monkeypatch):
    times = video.sample_times(long_video, max_frames=4)
    assert times == pytest.approx([3.75, 11.25, 18.75, 26.25])  # the middles of 4 equal segments of 30 s
    assert len(video.sample_times(long_video, fps=2)) == 60
    decoded, open_ = [], av.open

    class Counting:  # counts the frames PyAV decodes for us
        def __init__(self, path):
            self.container = open_(path)

        def __getattr__(self, name):
            return getattr(self.container, name)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.container.close()

        def decode(self, stream):
            for frame in self.container.decode(stream):
                decoded.append(frame.time)
                yield frame

    monkeypatch.setattr(av, "open", Counting)
    frames = video.video_frames(long_video, times)
    assert len(decoded) <= 4 * 11, f"{len(decoded)} of 300 frames decoded for 4 samples (keyframe every 10)"
    for ours, theirs in zip(frames, reference_frames(long_video, times), strict=True):
        assert np.array_equal(np.asarray(ours), np.asarray(theirs.convert("RGB")))


def grey_levels(n):
    """`n` recognisable levels: frame `i` of a test clip is flat grey at `grey_levels(n)[i]`."""
    return [8 + 12 * i for i in range(n)]


@pytest.mark.parametrize("name", ["clip.mp4", "anim.gif"])
def test_each_instant_scores_the_frame_on_screen_then(name, tmp_path):
    """20 frames at 4 fps (each a flat grey, frame i on screen over [i / 4, (i + 1) / 4)): the frame decoded for
    an instant is the last one starting at or before it, so the first sample scores frame 0 and no frame twice."""
    frames = [np.full((32, 32, 3), level, np.uint8) for level in grey_levels(20)]
    if name.endswith(".gif"):
        path = write_gif(tmp_path / name, frames, duration_ms=250)
    else:
        path = write_video(tmp_path / name, frames, fps=4, gop=8)

    def shown(times):
        levels = [float(np.asarray(frame).mean()) for frame in video.video_frames(path, times)]
        return [int(np.argmin(np.abs(np.array(grey_levels(20)) - level))) for level in levels]

    times = video.sample_times(path)  # the scan's 16 instants: the middles of 16 segments of 5 s
    assert shown(times) == [int(4 * time) for time in times]
    assert shown([0.0, 0.1, 0.25, 0.3, 2.49, 2.5, 4.99]) == [0, 0, 1, 1, 9, 10, 19]


@pytest.fixture(scope="module")
def mixed(tmp_path_factory):
    """A folder as a trust-and-safety queue holds it: images, videos of five containers, and broken videos."""
    root = tmp_path_factory.mktemp("mixed")
    frames = demo_frames(24, seed=1)
    for index, array in enumerate(demo_frames(30, seed=2)):
        Image.fromarray(array).save(root / f"img-{index:03d}.png")
    write_video(root / "clip.mp4", frames[:16])
    write_video(root / "z-clip.webm", frames[4:20], codec="libvpx")  # after the images
    write_video(root / "clip.mkv", frames[8:24], gop=8)
    write_video(root / "clip.mov", frames[2:14], codec="mpeg4")
    write_gif(root / "anim.gif", frames[:6])
    Image.fromarray(frames[0]).save(root / "still.gif")
    faststart = write_video(root / "whole.mp4", frames * 2, options={"movflags": "faststart"})
    data = Path(faststart).read_bytes()
    os.remove(faststart)
    (root / "cut.mp4").write_bytes(data[: len(data) * 6 // 10])  # header intact, the data ends early
    (root / "garbage.mp4").write_bytes(b"not a video at all " * 50)
    (root / "empty.mp4").write_bytes(b"")
    with av.open(str(root / "audio.mp4"), "w") as container:  # a video file with no video stream
        stream = container.add_stream("aac", rate=8000)
        sound = av.AudioFrame.from_ndarray(np.zeros((1, 1024), np.float32), format="fltp", layout="mono")
        sound.sample_rate = 8000
        container.mux(stream.encode(sound))
        container.mux(stream.encode())
    return root


BAD_VIDEOS = {
    "cut.mp4": "corrupt video",
    "garbage.mp4": "not a readable video",
    "empty.mp4": "empty file",
    "audio.mp4": "no video stream",
}
VIDEOS = ["anim.gif", "clip.mkv", "clip.mov", "clip.mp4", "z-clip.webm"]


def jsonl(text):
    return [json.loads(line) for line in text.splitlines()]


def scan(capsys, *args):
    code = main([str(arg) for arg in args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_a_video_row_is_the_mean_of_its_frames_and_bad_videos_are_error_rows(capsys, mixed, detector_dir, detector):
    code, out, err = scan(capsys, mixed, "--model", detector_dir, "--format", "jsonl", "--frames", "--max_frames", 5,
                          "--batch_size", 4, "--unsure_margin", 0.05)  # fmt: skip
    assert code == 2
    rows = jsonl(out)
    files = {Path(row["path"]).name: row for row in rows if row["frame"] is None}
    assert len(files) == 30 + len(VIDEOS) + 1 + len(BAD_VIDEOS)  # one row per file; still.gif is an image
    for name, reason in BAD_VIDEOS.items():
        assert files[name]["label"] == "error" and reason in files[name]["error"], files[name]
        assert f"cannot read {mixed / name}: " in err
    assert files["still.gif"]["frames"] is None and files["still.gif"]["label"] != "error"
    for name in VIDEOS:
        row, path = files[name], mixed / name
        frame_rows = [r for r in rows if r["path"] == str(path) and r["frame"] is not None]
        times = video.sample_times(str(path), max_frames=5)
        assert row["frames"] == len(frame_rows) == 5 and [r["frame"] for r in frame_rows] == pytest.approx(
            times, abs=1e-3
        )
        if name != "anim.gif":  # the reference decoder is PyAV's sequential decode; the gif goes through PIL
            expected = detector.p_fake([image.convert("RGB") for image in reference_frames(path, times)])
            assert [r["p_fake"] for r in frame_rows] == pytest.approx(expected, abs=2e-4)
        p = [r["p_fake"] for r in frame_rows]
        assert row["p_fake"] == pytest.approx(np.mean(p), abs=2e-4) and row["p_fake_max"] == pytest.approx(max(p))
        assert row["fake_fraction"] == pytest.approx(np.mean([r["label"] == "fake" for r in frame_rows]))
        assert row["label"] == detector.verdict(row["p_fake"]).label  # judged like an image's p(fake)
    rows_at_fps = {Path(r["path"]).name: r for r in jsonl(scan(capsys, mixed / "clip.mp4", "--model", detector_dir,
                                                                 "--format", "jsonl", "--fps", 4)[1])}  # fmt: skip
    assert rows_at_fps["clip.mp4"]["frames"] == 8  # 16 frames at 8 fps: 2 s at 4 per second


@pytest.mark.slow
def test_a_mixed_scan_killed_with_sigkill_resumes_to_one_row_per_file(capsys, mixed, detector_dir, tmp_path):
    args = [str(mixed), "--model", str(detector_dir), "--format", "jsonl", "--frames", "--max_frames", "5",
            "--batch_size", "2", "--quiet"]  # fmt: skip
    assert main([*args, "--output", str(tmp_path / "reference.jsonl")]) == 2
    reference = [json.loads(line) for line in (tmp_path / "reference.jsonl").read_text().splitlines()]
    files = [row["path"] for row in reference if row["frame"] is None]
    assert len(files) == len(set(files)) == 40

    output = tmp_path / "scores.jsonl"
    command = [sys.executable, "-m", "mirage_hf.cli", *args, "--output", str(output), "--num_workers", "1"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    run = subprocess.Popen(command, cwd=ROOT, env=env, stderr=subprocess.PIPE)
    try:
        while run.poll() is None and (not output.exists() or output.read_bytes().count(b"\n") < 15):
            time.sleep(0.01)
    finally:
        run.send_signal(signal.SIGKILL)
        run.communicate(timeout=60)
    text = output.read_text()
    last = str(mixed / "z-clip.webm")
    assert text.count("\n") >= 15 and last not in text, "the scan must be killed mid-run"
    orphan = {"path": last, "label": "fake", "p_fake": 0.99, "error": None, "frame": 0.1}
    # A kill can also leave a video's frame rows without the video's own row, and a row cut in half.
    output.write_text(text[: text.rfind("\n") + 1] + json.dumps(orphan) + "\n" + '{"path": "' + last[:-3])

    code, _, err = scan(capsys, *args, "--output", output, "--resume", "--num_workers", "1")
    assert code == 2 and "incomplete last line" in err and "frame row(s) of a video whose own row" in err, err
    rows = [json.loads(line) for line in output.read_text().splitlines()]
    assert sorted(row["path"] for row in rows if row["frame"] is None) == sorted(files)  # exactly one row per file
    key = lambda row: (row["path"], row["frame"] is None, row["frame"] or 0)  # noqa: E731
    assert len(rows) == len(reference)  # no frame row twice
    for ours, theirs in zip(sorted(rows, key=key), sorted(reference, key=key), strict=True):
        assert ours == pytest.approx(theirs, abs=2e-4) if ours["p_fake"] is not None else ours == theirs


AFTER_OWN_DECODE = """
import sys, av
from mirage_hf.cli import main
with av.open(sys.argv[1]) as container:  # the caller's own decode first: PyAV >= 18.1.1 keeps its converter per thread
    next(container.decode(video=0)).to_image()
sys.exit(main([*sys.argv[1:3], "--model", sys.argv[3], "--max_frames", "3", "--batch_size", "1", "--num_workers", "1",
               "--format", "jsonl", "--quiet", "--output", sys.argv[4]]))
"""


def test_forked_decode_workers_do_not_hang_after_the_parent_decoded_a_video(detector_dir, tmp_path):
    """A process that converted a frame itself (a user's code, or an earlier scan in it) then scans with forked
    DataLoader workers: a worker that reused the parent's cached frame converter waited forever on the parent's
    scaling threads (PyAV 18.1.1)."""
    frames = demo_frames(4)
    videos = [write_video(tmp_path / f"{name}.mp4", frames, 4) for name in ("a", "b")]
    command = [sys.executable, "-c", AFTER_OWN_DECODE, *videos, str(detector_dir), str(tmp_path / "rows.jsonl")]
    try:
        result = subprocess.run(command, cwd=ROOT, env={**os.environ, "HF_HUB_OFFLINE": "1"}, capture_output=True,
                                text=True, timeout=120)  # fmt: skip
    except subprocess.TimeoutExpired:
        pytest.fail("the scan hung in its decode worker")
    assert result.returncode == 0, result.stderr[-3000:]
    rows = jsonl((tmp_path / "rows.jsonl").read_text())
    assert [row["frames"] for row in rows if row["frame"] is None] == [3, 3]


MEMORY_PROBE = """
import resource, sys
from mirage_hf.cli import main
code = main([sys.argv[1], "--model", sys.argv[2], "--fps", "2", "--format", "jsonl", "--frames", "--quiet",
             "--num_workers", "0", "--output", sys.argv[3]])
print(code, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
"""


@pytest.mark.slow
def test_memory_stays_flat_from_a_short_to_a_long_video(detector_dir, tmp_path):
    """Peak RSS scanning a 10 s video and a 10 min one at 2 frames per second (20 and 1200 frames of 160 x 120):
    holding the long one's frames would take over 80 MB more (1200 decoded RGB frames and their pixel values)."""
    frames = demo_frames(8, size=160)
    peaks = {}
    for name, seconds in (("short", 10), ("long", 600)):
        path = write_video(tmp_path / f"{name}.mp4", [frames[i % 8][:120] for i in range(seconds * 4)], 4, gop=8)
        result = subprocess.run(
            [sys.executable, "-c", MEMORY_PROBE, path, str(detector_dir), str(tmp_path / f"{name}.jsonl")],
            cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=600,
        )  # fmt: skip
        assert result.returncode == 0, result.stderr[-3000:]
        code, peaks[name] = map(int, result.stdout.split())
        assert code == 0
    assert sum(1 for _ in open(tmp_path / "long.jsonl")) == 1201  # every frame row and the video's row
    assert peaks["long"] - peaks["short"] < 40_000, peaks  # kB


def test_shard_parts_merge_each_video_with_its_frame_rows_in_input_order(tmp_path):
    """Round-robin shards hold files 0, 2, ... and 1, 3, ...; the merge interleaves files, not rows, so a video's
    frame rows stay before its own row and the input order comes back."""
    from mirage_hf.scan import Row, RowWriter
    from mirage_hf.shards import merged_rows

    def video(path, frames):
        return [Row(path, "real", 0.1, None, frame=0.5 + t) for t in range(frames)] + [
            Row(path, "real", 0.1, None, frames=frames)
        ]

    files = [[Row("a.png", "fake", 0.9, None)], video("v.mp4", 3), [Row("c.png", "real", 0.2, None)], video("w.mp4", 1)]
    parts = [str(tmp_path / "part-0.jsonl"), str(tmp_path / "part-1.jsonl")]
    for rank, part in enumerate(parts):
        writer = RowWriter("jsonl", part)
        writer.write([row for group in files[rank::2] for row in group])
        writer.close()
    assert list(merged_rows(parts)) == [row for group in files for row in group]

"""Reliability: hostile bytes, a SIGKILL mid-training, bad configurations, unsafe files, the Space under load.

What each test guarantees, and what stays uncovered, is listed in docs/RELIABILITY.md. Everything here is
offline and CPU-only; the whole file runs in about a minute on 2 cores.
"""

import os

os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"  # before gradio is imported

import contextlib
import io
import json
import pickle
import signal
import socket
import struct
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
import zlib
from concurrent.futures import ThreadPoolExecutor
from datetime import timedelta
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import TINY_TRAIN_ARGS as TINY
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from mirage_hf import MiraGeForImageClassification
from mirage_hf.demo.tiny import tiny_image_processor
from mirage_hf.inference import Detector
from mirage_hf.transforms import (
    MAX_ASPECT_RATIO,
    ImageLoadError,
    Preprocessor,
    open_image,
)

ROOT = Path(__file__).resolve().parent.parent
# ============================================================================ 1. fuzzing decode and scoring


def _encoded(img: Image.Image, fmt: str, **options) -> bytes:
    buffer = io.BytesIO()
    img.save(buffer, fmt, **options)
    return buffer.getvalue()


_NOISE = Image.fromarray(np.random.default_rng(0).integers(0, 255, (12, 10, 3), dtype=np.uint8))
SEEDS = {
    "png": _encoded(_NOISE, "PNG"),
    "png-palette-transparent": _encoded(_NOISE.convert("P"), "PNG", transparency=0),
    "png-elongated": _encoded(Image.new("RGB", (4000, 1), "blue"), "PNG"),  # 1:4000, a few dozen bytes
    "png-16bit-grey": _encoded(Image.fromarray(np.arange(120, dtype=np.uint16).reshape(12, 10) * 500), "PNG"),
    "jpeg": _encoded(_NOISE, "JPEG", quality=80),
    "jpeg-progressive": _encoded(_NOISE, "JPEG", quality=60, progressive=True),
    "gif": _encoded(_NOISE.convert("P"), "GIF"),
    "webp": _encoded(_NOISE, "WEBP"),
    "bmp": _encoded(_NOISE, "BMP"),
    "tiff": _encoded(_NOISE, "TIFF"),
}
# Header sizes that reach the limits: zero, elongated (1 x 200000), over the pixel limit, int32 overflow.
HEADER_SIZES = [0, 1, 2, 30, 255, 65_535, 200_000, 2**31 - 1, 2**32 - 1]
FUZZ_MAX_PIXELS = 2**22  # lower than the default so a header claiming ~89 M pixels cannot make an example slow
EXAMPLE_LIMIT_S = 20  # a hard limit per example: an example that hangs fails the test instead of the CI job


def png_with_size(data: bytes, width: int, height: int) -> bytes:
    """A PNG whose IHDR claims width x height, with a valid CRC so that the decoder believes it."""
    if data[:8] != b"\x89PNG\r\n\x1a\n" or data[12:16] != b"IHDR":
        return data
    chunk = b"IHDR" + struct.pack(">II", width, height) + data[24:29]
    return data[:12] + chunk + struct.pack(">I", zlib.crc32(chunk)) + data[33:]


def jpeg_with_size(data: bytes, width: int, height: int) -> bytes:
    """A JPEG whose start-of-frame marker claims width x height (both clipped to 16 bits)."""
    for marker in (b"\xff\xc0", b"\xff\xc2"):
        at = data.find(marker)
        if at >= 0:
            return data[: at + 5] + struct.pack(">HH", height & 0xFFFF, width & 0xFFFF) + data[at + 9 :]
    return data


@st.composite
def hostile_bytes(draw) -> bytes:
    """Random bytes, or a valid small image under 1 to 3 mutations: bit flips, truncation, a header spliced
    from another format, inserted junk, or a forged width/height."""
    if draw(st.booleans()) and draw(st.booleans()):  # about a quarter: bytes with no structure at all
        return draw(st.binary(min_size=0, max_size=600))
    data = bytearray(SEEDS[draw(st.sampled_from(sorted(SEEDS)))])
    for _ in range(draw(st.integers(1, 3))):
        operation = draw(st.sampled_from(["flip", "truncate", "splice", "insert", "size"]))
        if not data:
            break
        if operation == "flip":
            for _ in range(draw(st.integers(1, 16))):
                data[draw(st.integers(0, len(data) - 1))] ^= 1 << draw(st.integers(0, 7))
        elif operation == "truncate":
            data = data[: draw(st.integers(0, len(data) - 1))]
        elif operation == "splice":
            other = SEEDS[draw(st.sampled_from(sorted(SEEDS)))]
            cut = draw(st.integers(1, min(64, len(other))))
            data = bytearray(other[:cut]) + data[cut:]
        elif operation == "insert":
            at = draw(st.integers(0, len(data)))
            data[at:at] = draw(st.binary(min_size=1, max_size=64))
        else:
            width, height = draw(st.sampled_from(HEADER_SIZES)), draw(st.sampled_from(HEADER_SIZES))
            data = bytearray(jpeg_with_size(png_with_size(bytes(data), width, height), width, height))
    return bytes(data)


class Hang(BaseException):
    """A BaseException, so that no `except Exception` in the code under test can turn a hang into a result."""


@contextlib.contextmanager
def time_limit(seconds: float):
    def stop(signum, frame):
        raise Hang(f"one example ran longer than {seconds} s")

    previous = signal.signal(signal.SIGALRM, stop)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


FUZZ_SETTINGS = settings(
    max_examples=150,
    deadline=timedelta(seconds=5),  # generous: a normal example takes milliseconds
    derandomize=True,  # the same examples on every run: CI stays reproducible
    database=None,  # nothing written into the repository
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
PREPROCESSORS = [Preprocessor(tiny_image_processor(30), mode) for mode in ("resize", "center_crop")]


@FUZZ_SETTINGS
@given(data=hostile_bytes())
def test_fuzz_decode_and_preprocess_give_an_image_or_image_load_error(data):
    with time_limit(EXAMPLE_LIMIT_S):
        try:
            image = open_image(data, max_pixels=FUZZ_MAX_PIXELS)
        except ImageLoadError as err:
            assert err.reason and err.source is None
            return
        assert image.mode == "RGB" and image.width * image.height <= FUZZ_MAX_PIXELS
        for preprocess in PREPROCESSORS:
            pixel_values = preprocess([image])
            assert pixel_values.shape == (1, 3, 30, 30) and torch.isfinite(pixel_values).all()


@pytest.fixture(scope="module")
def detector(detector_dir):
    return Detector.from_pretrained(detector_dir, device="cpu", unsure_margin=0.05)


@FUZZ_SETTINGS
@given(data=hostile_bytes())
def test_fuzz_detector_gives_a_probability_or_image_load_error(detector, data):
    with time_limit(EXAMPLE_LIMIT_S):
        try:
            image = open_image({"path": "upload.png", "bytes": data}, max_pixels=FUZZ_MAX_PIXELS)
        except ImageLoadError as err:
            assert err.source == "upload.png" and err.reason
            return
        (verdict,) = detector([image])
        assert 0.0 <= verdict.p_fake <= 1.0 and verdict.label in ("real", "fake", "unsure")


def test_elongated_images_are_bounded_before_resizing(detector, monkeypatch):
    """Found while writing the fuzzer's forged sizes: a 663-byte 1 x 200000 PNG made CLIP's processor resize
    to 30 x 6,000,000 (2 GB and 7 s; at ViT-L's 224 px a few KB could take the Space down). Resize mode now
    centre-crops the long side to MAX_ASPECT_RATIO times the short one first; centre-crop mode no longer
    builds a padded canvas the size of the image."""
    seen = []
    processor = tiny_image_processor(30)
    real_call = type(processor).__call__

    def recording(self, images, **kwargs):
        seen.extend(image.size for image in images)
        return real_call(self, images, **kwargs)

    monkeypatch.setattr(type(processor), "__call__", recording)
    for size in [(200_000, 1), (1, 200_000), (4_000_000, 1)]:
        image = open_image(_encoded(Image.new("RGB", size, "red"), "PNG"))
        for preprocess in [Preprocessor(processor, mode) for mode in ("resize", "center_crop")]:
            seen.clear()
            assert preprocess([image]).shape == (1, 3, 30, 30)
            assert max(seen[0]) <= MAX_ASPECT_RATIO * min(seen[0]), seen
        assert 0.0 <= detector([image])[0].p_fake <= 1.0
    ordinary = Image.fromarray(np.random.default_rng(1).integers(0, 255, (20, 1200, 3), dtype=np.uint8))
    seen.clear()
    pixel_values = Preprocessor(processor)([ordinary])
    assert seen == [(1200, 20)]  # a 60:1 image still reaches the processor whole: the same numbers as before
    torch.testing.assert_close(pixel_values, processor(images=[ordinary], return_tensors="pt")["pixel_values"])


# ============================================================================ 2. SIGKILL in the middle of training

KILL_RUN = ["--config", "demo", *TINY, "--max_steps", "8", "--save_every", "2", "--calibrate", "null"]


def start_train(output_dir: Path, log: Path, *extra) -> subprocess.Popen:
    """train.py in its own process; output to a file (a full pipe would block the child)."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    command = [sys.executable, "train.py", "--output_dir", str(output_dir), *KILL_RUN, *extra]
    with open(log, "w") as handle:  # the child keeps its own copy of the descriptor
        return subprocess.Popen(command, cwd=ROOT, env=env, stdout=handle, stderr=subprocess.STDOUT)


def prompt_state(output_dir: Path) -> dict:
    model = MiraGeForImageClassification.from_pretrained(output_dir / "model")
    return {k: v for k, v in model.state_dict().items() if k.startswith("prompt_learner.")}


def kill_mid_run(output_dir: Path, log: Path, kill_when: str) -> bool:
    """Starts train.py and SIGKILLs it as soon as the checkpoint folder `kill_when` appears (for `step_*`, once its
    progress file is written); False when the run got past that moment before the poll saw it."""
    killed = start_train(output_dir, log)
    checkpoints = output_dir / "checkpoints"
    ready = (
        (checkpoints / kill_when / "progress.json").exists
        if kill_when.startswith("step_")
        else (checkpoints / kill_when).exists
    )
    deadline = time.monotonic() + 240
    try:
        while not ready():
            if killed.poll() is not None:
                assert killed.returncode == 0, f"train.py failed:\n{log.read_text()[-3000:]}"
                return False
            assert time.monotonic() < deadline, f"no {kill_when} within 240 s"
            time.sleep(0.001)
        os.kill(killed.pid, signal.SIGKILL)
    finally:
        if killed.poll() is None:
            killed.kill()
        killed.wait(timeout=60)
    return killed.returncode == -signal.SIGKILL


@pytest.mark.slow
@pytest.mark.parametrize("kill_when", ["step_00000004", ".tmp-step_00000006"])
def test_sigkill_mid_training_then_resume_matches_an_uninterrupted_run(tmp_path, kill_when):
    """SIGKILL train.py right after the step-4 checkpoint (mid-epoch: 6 batches per epoch), or while the
    step-6 checkpoint is being written, then resume with `latest`: the same prompts and metrics, bit for bit,
    as a run that was never interrupted, and no half-written folder left behind."""
    straight_dir = tmp_path / "straight"
    straight = start_train(straight_dir, tmp_path / "straight.log")  # runs beside the killed one
    for attempt in range(3):  # a staging folder lives for milliseconds: a poll can miss it on a fast machine
        killed_dir = tmp_path / f"killed-{attempt}"
        if kill_mid_run(killed_dir, tmp_path / "killed.log", kill_when):
            break
    else:
        pytest.fail(f"train.py wrote {kill_when} and went on before it could be killed, 3 times")
    checkpoints = killed_dir / "checkpoints"
    if kill_when.startswith(".tmp-") and not (checkpoints / "step_00000006").exists():
        expected_step = 4  # killed inside save_state: the staging folder is not a checkpoint
        assert (checkpoints / kill_when).is_dir()
    else:
        expected_step = max(int(p.name[5:]) for p in checkpoints.glob("step_*"))

    resumed = start_train(killed_dir, tmp_path / "resumed.log", "--resume_from_checkpoint", "latest")
    assert resumed.wait(timeout=300) == 0, (tmp_path / "resumed.log").read_text()[-3000:]
    assert straight.wait(timeout=300) == 0, (tmp_path / "straight.log").read_text()[-3000:]
    assert f"resumed from step {expected_step} " in (tmp_path / "resumed.log").read_text()

    want, got = prompt_state(straight_dir), prompt_state(killed_dir)
    assert want.keys() == got.keys() and want
    for key in want:
        torch.testing.assert_close(got[key], want[key], rtol=0, atol=0, msg=key)
    results = [json.loads((d / "eval_results.json").read_text()) for d in (straight_dir, killed_dir)]
    assert results[0]["clean"] == results[1]["clean"]

    assert not [p.name for p in checkpoints.iterdir() if p.name.startswith(".tmp-")]
    assert not [p.name for p in killed_dir.iterdir() if p.name.startswith((".tmp-", ".old-"))]
    steps = [p for p in checkpoints.iterdir() if p.name.startswith("step_")]
    assert steps and all((p / "progress.json").is_file() for p in steps)


# ============================================================================ 3. bad configuration and data


def train_in_process(output_dir: Path, *extra):
    from mirage_hf.training import main

    return main(["--config", "demo", "--output_dir", str(output_dir), *TINY, "--max_steps", "2", *extra])


def assert_never_trained(output_dir: Path):
    assert not (output_dir / "checkpoints").exists() and not (output_dir / "model").exists()


def write_images(folder: Path, n: int, seed: int = 0) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    paths = [folder / f"{i}.png" for i in range(n)]
    for path in paths:
        Image.fromarray(rng.integers(0, 255, (16, 16, 3), dtype=np.uint8)).save(path)
    return paths


def test_a_data_set_without_fake_images_stops_before_training(tmp_path):
    write_images(tmp_path / "data" / "real", 8)
    with pytest.raises(ValueError, match="has no fake images"):
        train_in_process(tmp_path / "out", "--dataset", str(tmp_path / "data"))
    assert_never_trained(tmp_path / "out")


def test_unknown_label_values_in_a_csv_stop_before_training(tmp_path):
    paths = write_images(tmp_path / "images", 6)
    labels = ["real", "fake", "maybe", "real", "fake", "maybe"]
    table = "image,label\n" + "".join(f"images/{p.name},{label}\n" for p, label in zip(paths, labels))
    (tmp_path / "rows.csv").write_text(table)
    with pytest.raises(ValueError, match=r"label column 'label' holds value\(s\) 'maybe'.*label_map="):
        train_in_process(tmp_path / "out", "--dataset", str(tmp_path / "rows.csv"))
    assert_never_trained(tmp_path / "out")


def test_an_empty_folder_stops_before_training(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no labelled images found under .*empty"):
        train_in_process(tmp_path / "out", "--dataset", str(tmp_path / "empty"))
    assert_never_trained(tmp_path / "out")


def test_a_clip_model_that_is_not_clip_stops_before_any_work(tmp_path):
    """Used to fail with "Can't load image processor" (OSError) after generating the data: the image
    processor was loaded before `from_clip` could say what is wrong. Now checked first."""
    from transformers import BertConfig

    BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=4, intermediate_size=37).save_pretrained(
        tmp_path / "bert"
    )
    with pytest.raises(ValueError, match="is not a CLIP checkpoint.*model_type='bert'"):
        train_in_process(tmp_path / "out", "--clip_model", str(tmp_path / "bert"))
    assert_never_trained(tmp_path / "out")
    assert not (tmp_path / "out" / "synthetic-data").exists()


@pytest.fixture(scope="module")
def mismatched_dir(detector_dir, tmp_path_factory):
    """The test detector (30 px) saved with an image processor that crops to 24 px."""
    folder = tmp_path_factory.mktemp("mismatch") / "model"
    MiraGeForImageClassification.from_pretrained(detector_dir).save_pretrained(folder)
    tiny_image_processor(24).save_pretrained(folder)
    return folder


def test_an_image_size_mismatch_is_a_clear_error(mismatched_dir, capsys, tmp_path):
    """Detector now refuses at load time (before: a ValueError on the first image, which `mirage-detect`
    showed as a traceback from inside its output writer)."""
    from transformers import pipeline

    from mirage_hf.cli import main as detect_main

    with pytest.raises(
        ValueError, match=r"\(batch, 3, 30, 30\).*got images of shape \(3, 24, 24\).*crop size must be 30"
    ):
        Detector.from_pretrained(mismatched_dir, device="cpu")
    with pytest.raises(ValueError, match=r"crop size must be 30"):
        pipeline("image-classification", model=str(mismatched_dir))(Image.new("RGB", (40, 40)))
    write_images(tmp_path, 1)
    assert detect_main([str(tmp_path / "0.png"), "--model", str(mismatched_dir), "-q"]) == 1
    err = capsys.readouterr().err
    assert "cannot load the model" in err and "crop size must be 30" in err and "Traceback" not in err


# ============================================================================ 4. safe loading


class WritesMarker:
    """Unpickling this creates the marker file: proof that the pickle ran."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_a_pickle_only_model_folder_is_refused_and_never_unpickled(detector_dir, tmp_path):
    folder, marker = tmp_path / "model", tmp_path / "UNPICKLED"
    folder.mkdir()
    for name in ("config.json", "preprocessor_config.json", "configuration_mirage.py", "modeling_mirage.py"):
        (folder / name).write_bytes((Path(detector_dir) / name).read_bytes())
    (folder / "pytorch_model.bin").write_bytes(pickle.dumps(WritesMarker(marker)))
    with pytest.raises(OSError, match="model.safetensors"):
        Detector.from_pretrained(folder, device="cpu")
    assert not marker.exists()
    # Without use_safetensors, transformers falls back to the .bin, with torch.load(weights_only=True).
    with pytest.raises(pickle.UnpicklingError, match="Weights only load failed"):
        MiraGeForImageClassification.from_pretrained(folder)
    assert not marker.exists()


def test_checkpoint_state_files_are_loaded_weights_only(tmp_path, caplog):
    """accelerate's load_state reads optimizer, scheduler and RNG state with torch.load(weights_only=True): a
    pickle payload in a checkpoint is refused, never run. A refused optimizer file makes the checkpoint
    unreadable (reported; with no older one, the run stops). A refused RNG file is skipped by accelerate itself
    with an INFO log; resume stays exact here because nothing in training draws from the global RNGs (see
    docs/RELIABILITY.md)."""
    from accelerate import Accelerator

    from mirage_hf.checkpoints import load_checkpoint, resolve_resume, save_checkpoint

    accelerator = Accelerator(cpu=True)
    model = torch.nn.Linear(2, 2)
    optimizer = torch.optim.AdamW(model.parameters())
    model, optimizer = accelerator.prepare(model, optimizer)
    save_checkpoint(accelerator, tmp_path, {"global_step": 1, "epoch": 0, "batches_in_epoch": 1}, 2)
    (checkpoint,) = resolve_resume(tmp_path, "latest")
    assert load_checkpoint(accelerator, [checkpoint])["global_step"] == 1  # the untouched one loads

    marker = tmp_path / "UNPICKLED-optimizer"
    original = (checkpoint / "optimizer.bin").read_bytes()
    (checkpoint / "optimizer.bin").write_bytes(pickle.dumps(WritesMarker(marker)))
    with pytest.raises(RuntimeError, match="no readable checkpoint"):
        load_checkpoint(accelerator, [checkpoint])
    assert not marker.exists() and "is unreadable (UnpicklingError: Weights only load failed" in caplog.text
    (checkpoint / "optimizer.bin").write_bytes(original)

    marker = tmp_path / "UNPICKLED-rng"
    (checkpoint / "random_states_0.pkl").write_bytes(pickle.dumps(WritesMarker(marker)))
    assert load_checkpoint(accelerator, [checkpoint])["global_step"] == 1
    assert not marker.exists()


def test_code_shipped_in_a_model_folder_runs_only_with_trust_remote_code(detector_dir, tmp_path):
    """A model folder carries modeling_mirage.py for environments without mirage_hf. That file runs only
    through an Auto class or pipeline() with trust_remote_code=True: Detector (always the installed classes),
    pipeline() after `import mirage_hf`, and pipeline() without the flag in a clean process never execute it."""
    import shutil

    from transformers import pipeline

    folder, marker = tmp_path / "model", tmp_path / "FOLDER_CODE_RAN"
    shutil.copytree(detector_dir, folder)
    with open(folder / "modeling_mirage.py", "a") as handle:
        handle.write(f"\nopen({str(marker)!r}, 'w').close()\n")
    Detector.from_pretrained(folder, device="cpu")
    pipeline("image-classification", model=str(folder))  # mirage_hf is imported: its registered classes load
    assert not marker.exists()
    script = (
        "import os, sys\nfrom transformers import pipeline\n"
        f"try:\n    pipeline('image-classification', model={str(folder)!r})\n"
        "except ValueError as error:\n    print('REFUSED', error)\n"
        f"print('ran after refusal:', os.path.exists({str(marker)!r}))\n"
        f"pipeline('image-classification', model={str(folder)!r}, trust_remote_code=True)\n"
        f"print('ran when trusted:', os.path.exists({str(marker)!r}))\n"
        "assert 'mirage_hf' not in sys.modules\n"
    )
    env = {"HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf_home"), "PATH": os.environ.get("PATH", "")}
    result = subprocess.run(
        [sys.executable, "-c", script], check=False, cwd=tmp_path, env=env, capture_output=True, text=True,
        timeout=120, stdin=subprocess.DEVNULL,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert "REFUSED" in result.stdout and "trust_remote_code=True" in result.stdout
    assert "ran after refusal: False" in result.stdout and "ran when trusted: True" in result.stdout


# ============================================================================ 5. the Space under load and abuse


@pytest.fixture(scope="module")
def space():
    from mirage_hf.space import app

    return app


@pytest.fixture(scope="module")
def server(space, detector):
    """The Space as `python app.py` launches it (same upload limit), on a free local port."""
    demo = space.build_demo(detector_factory=lambda: detector)
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    demo.launch(
        prevent_thread_lock=True, server_name="127.0.0.1", server_port=port, quiet=True,
        max_file_size=space.MAX_UPLOAD_BYTES,
    )  # fmt: skip
    yield demo.local_url.rstrip("/")
    demo.close()


@pytest.fixture(scope="module")
def uploads(tmp_path_factory):
    folder = tmp_path_factory.mktemp("space-uploads")
    good = Image.fromarray(np.random.default_rng(0).integers(0, 255, (48, 40, 3), dtype=np.uint8))
    good.save(folder / "good.png")
    (folder / "cut.png").write_bytes((folder / "good.png").read_bytes()[:300])
    # 7000 x 7000 = 49 M pixels in the header (the Space's limit is 40 M), 70 bytes on disk.
    (folder / "huge.png").write_bytes(png_with_size(SEEDS["png"], 7000, 7000))
    # A valid 20 x 20 PNG followed by 21 MB of padding: over the 20 MB upload limit.
    (folder / "heavy.png").write_bytes(_encoded(Image.new("RGB", (20, 20), "red"), "PNG") + bytes(21 * 2**20))
    return {path.stem: str(path) for path in folder.iterdir()}


@pytest.mark.slow
def test_a_burst_of_concurrent_requests_all_get_answers(server, uploads):
    from gradio_client import Client, handle_file

    client = Client(server, verbose=False)
    names = ["good", "cut", "good", "huge"] * 3  # 12 requests, good and bad mixed

    def ask(name):
        return name, client.predict(handle_file(uploads[name]), 0.5, False, api_name="/predict")[1]

    started = time.monotonic()
    with ThreadPoolExecutor(max_workers=len(names)) as pool:
        answers = list(pool.map(ask, names, timeout=60))
    assert time.monotonic() - started < 60
    expected = {"good": ("Likely", "Unsure"), "cut": "Could not read the image: truncated",
                "huge": "Could not read the image: too large"}  # fmt: skip
    assert len(answers) == 12 and all(verdict.startswith(expected[name]) for name, verdict in answers), answers
    assert len({verdict for name, verdict in answers if name == "good"}) == 1  # same image, same answer


def upload_request(server: str, path: str) -> urllib.request.Request:
    """A POST of the file at `path` to the Space's upload route, as any HTTP client can send it."""
    boundary = uuid.uuid4().hex
    body = (
        (
            f'--{boundary}\r\nContent-Disposition: form-data; name="files"; filename="{Path(path).name}"\r\n'
            "Content-Type: image/png\r\n\r\n"
        ).encode()
        + Path(path).read_bytes()
        + f"\r\n--{boundary}--\r\n".encode()
    )
    return urllib.request.Request(
        f"{server}/gradio_api/upload", data=body, headers={"Content-Type": f"multipart/form-data; boundary={boundary}"}
    )


@pytest.mark.slow
def test_oversized_uploads_are_refused_with_a_readable_message(space, server, uploads, detector):
    from gradio_client import Client, handle_file

    # gradio_client checks the Space's declared limit before sending a byte ...
    with pytest.raises(ValueError, match="exceeds the maximum file size of 20971520 bytes"):
        Client(server, verbose=False).predict(handle_file(uploads["heavy"]), 0.5, False, api_name="/predict")
    # ... and the server refuses any other uploader with 413 and a message.
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(upload_request(server, uploads["heavy"]), timeout=60)
    assert refused.value.code == 413 and b"size" in refused.value.read().lower()
    # A file that reaches the handler some other way (examples, a launch without max_file_size) gets the
    # app's own message, at the real 20 MB limit.
    app = space.DetectorApp(lambda: detector)
    assert app.detect(uploads["heavy"]) == (None, "Could not read the image: the file is larger than 20 MB", None)
    assert app.detect(uploads["huge"])[1].startswith("Could not read the image: too large: 7000x7000 pixels")


FILE_ROUTE = "/gradio_api/file="  # where Gradio serves files by path


@pytest.mark.slow
def test_files_outside_the_allowed_paths_are_not_served(space, server, uploads):
    """Only what was uploaded is served: an uploaded copy of good.png comes back whole on the route that refuses
    the original and every other file (so the refusals are not those of a route that serves nothing)."""
    with urllib.request.urlopen(upload_request(server, uploads["good"]), timeout=60) as response:
        (uploaded,) = json.loads(response.read())
    with urllib.request.urlopen(f"{server}{FILE_ROUTE}{uploaded}", timeout=10) as response:
        assert response.status == 200 and response.read() == Path(uploads["good"]).read_bytes()
    refused = [
        "/etc/passwd", "../../../../etc/passwd", "%2Fetc%2Fpasswd", uploads["good"],  # exists, never uploaded
        space.__file__, str(ROOT / "tests" / "conftest.py"),
    ]  # fmt: skip
    for path in refused:
        with pytest.raises(urllib.error.HTTPError) as error:
            urllib.request.urlopen(f"{server}{FILE_ROUTE}{path}", timeout=10)
        assert error.value.code in (403, 404), (path, error.value.code)

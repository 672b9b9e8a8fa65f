"""The Gradio Space: its handlers, its API through gradio_client, and the page in a real headless Chromium.

A tiny random detector is injected through `build_demo(detector_factory=...)`, so no model is downloaded.
"""

import os

os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"  # before gradio is imported

import importlib.util
import re
import shutil
import socket
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from gradio_client import Client, handle_file
from huggingface_hub import SpaceCard
from PIL import Image

from mirage_hf.inference import Detector
from mirage_hf.space import app as space

ROOT = Path(__file__).resolve().parent.parent
CHROMIUM = shutil.which("chromium")  # found as .ci/run finds it (`command -v chromium`) before installing it
REQUIRE_CHROMIUM = os.environ.get("MIRAGE_REQUIRE_CHROMIUM") == "1"  # set by .ci/run: a missing browser fails
HAS_EXPLAIN = importlib.util.find_spec("mirage_hf.explain") is not None


@pytest.fixture(scope="module")
def detector(detector_dir):
    return Detector.from_pretrained(detector_dir, device="cpu", unsure_margin=0.05)


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    """A good PNG, a text file, a truncated PNG."""
    folder = tmp_path_factory.mktemp("uploads")
    rgb = np.random.default_rng(0).integers(0, 255, (48, 40, 3), dtype=np.uint8)
    Image.fromarray(rgb).save(folder / "good.png")
    (folder / "notes.png").write_text("not an image")
    (folder / "cut.png").write_bytes((folder / "good.png").read_bytes()[:300])
    return {name: str(folder / f"{name}.png") for name in ("good", "notes", "cut")}


def test_detect_gives_probabilities_and_a_verdict(detector, images):
    app = space.DetectorApp(lambda: detector)
    probabilities, verdict, overlay = app.detect(Image.open(images["good"]))
    p = float(detector.p_fake([Image.open(images["good"]).convert("RGB")])[0])
    assert probabilities == pytest.approx({"real": 1 - p, "fake": p})
    assert (
        verdict.startswith(
            {"fake": "Likely AI-generated", "real": "Likely real", "unsure": "Unsure"}[space.label_at(p, 0.5, 0.05)]
        )
        and f"{p:.3f}" in verdict
    )
    assert overlay is None  # the explanation map costs 32 passes: only on request
    assert app.detect(images["good"], threshold=0.0)[1].startswith("Likely AI-generated")
    assert app.detect(images["good"], threshold=1.0)[1].startswith("Likely real")
    assert app.detect({"path": images["good"]}, threshold=p)[1].startswith("Unsure")  # Gradio's file payload


def test_explanation_overlay_on_request_and_without_mirage_hf_explain(detector, images, monkeypatch):
    app = space.DetectorApp(lambda: detector)
    overlay = app.detect(images["good"], explain=True)[2]
    assert (overlay.size == (40, 48)) if HAS_EXPLAIN else overlay is None
    monkeypatch.setitem(sys.modules, "mirage_hf.explain", None)  # makes the import fail
    probabilities, verdict, overlay = app.detect(images["good"], explain=True)
    assert overlay is None and probabilities is not None and verdict.startswith(("Likely", "Unsure"))


def test_bad_uploads_get_a_readable_message(detector, images, monkeypatch):
    app = space.DetectorApp(lambda: detector)
    for name, reason in [("notes", "not an image"), ("cut", "truncated"), (None, "no image")]:
        probabilities, verdict, overlay = app.detect(images.get(name))
        assert probabilities is None and overlay is None
        assert verdict.startswith("Could not read the image:") and reason in verdict and "Traceback" not in verdict
    monkeypatch.setattr(space, "MAX_PIXELS", 48 * 40 - 1)
    assert "too large" in app.detect(images["good"])[1]
    monkeypatch.setattr(space, "MAX_UPLOAD_BYTES", 100)
    assert "larger than" in app.detect(images["good"])[1]


def test_batch_gives_a_table_and_a_csv(detector, images):
    app = space.DetectorApp(lambda: detector)
    rows, csv_path = app.detect_batch([images["good"], images["notes"], images["good"]])
    assert [row[0] for row in rows] == ["good.png", "notes.png", "good.png"]
    assert rows[0][1] in ("real", "fake", "unsure") and 0 <= rows[0][2] <= 1 and rows[0] == rows[2]
    assert rows[1][1].startswith("unreadable: not an image") and rows[1][2] is None
    lines = Path(csv_path).read_text().splitlines()
    assert lines[0] == "file,verdict,p_fake" and lines[1] == f"good.png,{rows[0][1]},{rows[0][2]}"


def test_video_tab_gives_the_mean_of_its_frames_and_bad_videos_a_message(detector, tmp_path):
    from test_video import demo_frames, write_video

    from mirage_hf.video import score_video

    app = space.DetectorApp(lambda: detector)
    path = write_video(tmp_path / "clip.mp4", demo_frames(24))
    probabilities, verdict, table = app.detect_video({"path": path})
    expected, scores, frames = score_video(detector, path, max_frames=space.VIDEO_FRAMES)
    assert probabilities == pytest.approx({"real": 1 - expected.p_fake, "fake": expected.p_fake})
    assert verdict.startswith(("Likely", "Unsure")) and f"Mean of {scores.count} frames" in verdict
    assert [row[0] for row in table] == [round(time, 2) for time, _ in frames] and len(table) == 16
    (tmp_path / "empty.mp4").write_bytes(b"")
    assert app.detect_video(str(tmp_path / "empty.mp4")) == (None, "Could not read the video: empty file", None)
    rows, _ = app.detect_batch([path, str(tmp_path / "empty.mp4")])  # the Batch tab takes videos too
    assert rows[0][1:] == [expected.label, round(expected.p_fake, 4)] and rows[1][1] == "unreadable: empty file"


def test_stability_check_explains_an_unsure_verdict(detector_dir, images):
    from mirage_hf.stability import STABILITY_COPIES
    from mirage_hf.transforms import degrade

    detector = Detector.from_pretrained(detector_dir, device="cpu", unsure_margin=0.0)
    app = space.DetectorApp(lambda: detector)
    image = Image.open(images["good"]).convert("RGB")
    p = np.sort(detector.p_fake([image, *(degrade(image, kind, value) for kind, value in STABILITY_COPIES)]))
    between = float(p[0] + p[1]) / 2
    text = app.detect(images["good"], threshold=between, stability=True)[1]
    assert text.startswith("Unsure") and "copies fall on both sides" in text, text
    assert "Copies agree" in app.detect(images["good"], threshold=float(p[0]) - 0.01, stability=True)[1]


def test_space_pins_the_gradio_it_declares():
    sdk_version = SpaceCard.load(space.HERE / "README.md").data.sdk_version
    assert f"gradio=={sdk_version}" in (space.HERE / "requirements.txt").read_text().split()


def test_the_detector_is_built_once_under_concurrent_requests(detector):
    built = []

    def factory():
        time.sleep(0.05)
        built.append(1)
        return detector

    app = space.DetectorApp(factory)
    threads = [threading.Thread(target=app.detector) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert built == [1]


@pytest.fixture(scope="module")
def server(detector):
    demo = space.build_demo(detector_factory=lambda: detector)
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    demo.launch(prevent_thread_lock=True, server_name="127.0.0.1", server_port=port, quiet=True)
    yield demo.local_url
    demo.close()


def test_predict_through_gradio_client(server, images):
    client = Client(server, verbose=False)
    assert "/predict" in client.view_api(print_info=False, return_format="dict")["named_endpoints"]
    label, verdict, _ = client.predict(handle_file(images["good"]), 0.5, False, api_name="/predict")
    assert label["label"] in ("real", "fake") and {c["label"] for c in label["confidences"]} == {"real", "fake"}
    assert verdict.startswith(("Likely", "Unsure"))
    _, verdict, _ = client.predict(handle_file(images["cut"]), 0.5, False, api_name="/predict")
    assert verdict.startswith("Could not read the image: truncated")
    _, verdict, _ = client.predict(handle_file(images["good"]), 0.5, False, True, api_name="/predict")  # stability
    assert "Copies agree" in verdict or "copies fall on both sides" in verdict
    uploads = [handle_file(images["good"]), handle_file(images["notes"])]
    table, csv_path = client.predict(uploads, 0.5, api_name="/predict_batch")
    assert [row[0] for row in table["data"]] == ["good.png", "notes.png"]
    assert Path(csv_path).read_text().count("\n") == 3  # header and two rows


@pytest.mark.slow
@pytest.mark.skipif(
    CHROMIUM is None and not REQUIRE_CHROMIUM, reason="no chromium on PATH (apt-get install -y chromium)"
)
def test_page_in_headless_chromium(server, images, tmp_path):
    assert CHROMIUM, "MIRAGE_REQUIRE_CHROMIUM=1 (.ci/run installed chromium), but there is no chromium on PATH"
    from playwright.sync_api import expect, sync_playwright

    shot, upload = tmp_path / "space.png", tmp_path / "scene.png"
    y, x = np.mgrid[0:240, 0:320] / 80.0  # a smooth colourful picture, large enough to see in the screenshot
    scene = np.stack([np.sin(x + y), np.cos(1.3 * x - y), np.sin(0.7 * x * y)], axis=-1)
    Image.fromarray(((scene + 1) * 127.5).astype(np.uint8)).save(upload)
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(
            executable_path=CHROMIUM,
            args=[
                "--no-sandbox",
                "--disable-gpu",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
            ],
        )
        try:
            page = browser.new_page(viewport={"width": 1200, "height": 800})
            page.goto(server, wait_until="networkidle")
            expect(
                page.get_by_text("fitted threshold 0.300 folded in", exact=False)
            ).to_be_visible()  # the load event ran
            page.set_input_files("#image input[type=file]", str(upload))
            if HAS_EXPLAIN:
                page.get_by_label("Also show where the detector looked", exact=False).check()
            page.get_by_role("button", name="Detect", exact=True).click()
            verdict = page.locator("#verdict textarea")
            expect(verdict).not_to_have_value("", timeout=20_000)
            assert verdict.input_value().startswith(("Likely", "Unsure")), verdict.input_value()
            page.screenshot(path=str(shot), full_page=True)
            page.set_input_files("#image input[type=file]", images["cut"])  # a truncated PNG
            page.get_by_role("button", name="Detect", exact=True).click()
            expect(verdict).to_have_value(re.compile(r"^Could not read the image: truncated"), timeout=20_000)
        finally:
            browser.close()
    assert shot.stat().st_size > 10_000
    if os.environ.get("MIRAGE_UPDATE_SCREENSHOT") == "1":
        shutil.copy(shot, ROOT / "docs" / "space.png")


def test_space_prefers_the_int8_graph_says_which_backend_answered_and_explains_with_torch(
    detector_dir, images, tmp_path, monkeypatch
):
    from mirage_hf.onnx_export import export_onnx

    model_dir = tmp_path / "model"
    shutil.copytree(detector_dir, model_dir)
    monkeypatch.setenv("MIRAGE_MODEL", str(detector_dir))
    assert space.space_backend(str(detector_dir)) == "torch"  # no onnx/ folder
    export_onnx(model_dir)
    monkeypatch.setenv("MIRAGE_MODEL", str(model_dir))
    assert space.space_backend(str(model_dir)) == "onnx-int8"
    monkeypatch.setattr(space, "BACKEND", "onnx")  # MIRAGE_BACKEND, read at start-up
    assert space.load_detector().backend == "onnx"
    monkeypatch.setattr(space, "BACKEND", "auto")

    app = space.DetectorApp()
    probabilities, verdict, overlay = app.detect(images["good"], explain=True)
    assert app.detector().backend == "onnx-int8" and verdict.endswith("(backend: onnx-int8)")
    assert f"Model `{model_dir}` on backend `onnx-int8`" in app.model_info()[1]  # named on either backend
    torch_p = float(app.explainer().p_fake([Image.open(images["good"]).convert("RGB")])[0])
    assert app.explainer().backend == "torch" and probabilities["fake"] == pytest.approx(torch_p, abs=0.02)
    assert (overlay.size == (40, 48)) if HAS_EXPLAIN else overlay is None


def test_the_space_and_mirage_detect_share_one_default_unsure_band():
    from mirage_hf.cli import build_parser

    assert "MIRAGE_UNSURE_MARGIN" not in os.environ  # the Space read its default at import
    assert space.UNSURE_MARGIN == build_parser().get_default("unsure_margin")


def test_the_batch_tab_removes_its_temporary_folders(detector, images, tmp_path, monkeypatch):
    """Each batch's CSV lives in the app's own temporary folder: old batches go, and the folder goes with the app."""
    import gc
    import tempfile

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    monkeypatch.setattr(space, "BATCH_CSV_SECONDS", 0)  # every earlier batch is old enough to go
    app = space.DetectorApp(lambda: detector)
    for _ in range(3):
        rows, csv_path = app.detect_batch([images["good"]])
        assert Path(csv_path).read_text().splitlines()[1].startswith("good.png,")
    assert [path.name for path in tmp_path.rglob("*.csv")] == ["verdicts.csv"]
    del app
    gc.collect()
    assert not list(tmp_path.iterdir())

"""Gradio Space for a MiraGe detector: one image with its verdict (and an explanation map where
`mirage_hf.explain` exists), one video (its frames' mean p(fake) and a table of frames), or a batch of files to a
table and a CSV. A stability check also scores re-saved, resized and cropped copies (`mirage_hf.stability`).

The model is `MIRAGE_MODEL` (a Hub id or a local folder), else the first `models:` entry of this Space's
README.md, which push_to_hub.py writes. It is loaded once, on the first request, on CPU, with ONNX Runtime's int8
graph where the repo has one (`MIRAGE_BACKEND`: auto, torch, onnx or onnx-int8); explanation maps need gradients,
so with an ONNX backend the PyTorch model is loaded for them on first use. Uploads reach the
handlers unopened and go through mirage_hf's own decoder, with its size and pixel-count limits, so that a bad
file gets a readable message in the page instead of an error from deep inside PIL.
"""

import csv
import importlib.util
import logging
import os
import shutil
import tempfile
import threading
import time
from pathlib import Path

import gradio as gr
from huggingface_hub import SpaceCard
from transformers.utils import cached_file

from mirage_hf.inference import DEFAULT_UNSURE_MARGIN, Detector
from mirage_hf.inference import verdict_label as label_at
from mirage_hf.onnx_runtime import ONNX_DIR, ONNX_FILES
from mirage_hf.transforms import ImageLoadError, open_image
from mirage_hf.video import DEFAULT_MAX_FRAMES, STILL_IMAGE, maybe_video, score_video

HERE = Path(__file__).resolve().parent
EXAMPLES = [HERE / "examples" / "synthetic-real.png", HERE / "examples" / "synthetic-fake.png"]
MAX_UPLOAD_BYTES = 20 * 2**20
MAX_PIXELS = 40_000_000  # about 6300 x 6300: larger images are refused before decoding
MAX_BATCH_FILES = 50
BATCH_SIZE = 16  # images (or video frames) decoded and scored at a time, to bound memory
VIDEO_FRAMES = DEFAULT_MAX_FRAMES  # frames scored per video, uniform over its duration
UNSURE_MARGIN = float(os.environ.get("MIRAGE_UNSURE_MARGIN", DEFAULT_UNSURE_MARGIN))
BATCH_CSV_SECONDS = 600  # a batch's CSV outlives its request long enough for Gradio to copy it, then goes
STABILITY_LABEL = "Also check that re-saved, resized and cropped copies agree (4 passes)"
BACKEND = os.environ.get("MIRAGE_BACKEND", "auto")
logger = logging.getLogger(__name__)


def model_name() -> str:
    return os.environ.get("MIRAGE_MODEL") or SpaceCard.load(HERE / "README.md").data.models[0]


def space_backend(name: str) -> str:
    """`MIRAGE_BACKEND`, where "auto" means the int8 ONNX graph if the repo has one (fastest on CPU), else torch."""
    if BACKEND != "auto":
        return BACKEND
    quantized = cached_file(name, f"{ONNX_DIR}/{ONNX_FILES['onnx-int8']}", _raise_exceptions_for_missing_entries=False)
    return "onnx-int8" if quantized else "torch"


def load_detector(backend: str | None = None) -> Detector:
    name = model_name()
    return Detector.from_pretrained(
        name, device="cpu", unsure_margin=UNSURE_MARGIN, backend=backend or space_backend(name)
    )


def load_torch_detector() -> Detector:
    return load_detector("torch")


def read_image(source):
    """RGB image from a PIL image, a path or Gradio's file payload; ImageLoadError with the reason otherwise."""
    if isinstance(source, dict):
        source = source.get("path")
    if source is None:
        raise ImageLoadError(None, "no image was given")
    is_file = isinstance(source, (str, os.PathLike)) and os.path.isfile(source)
    if is_file and os.path.getsize(source) > MAX_UPLOAD_BYTES:
        raise ImageLoadError(str(source), f"the file is larger than {MAX_UPLOAD_BYTES // 2**20} MB")
    return open_image(source, max_pixels=MAX_PIXELS)


def describe(p_fake: float, threshold: float, margin: float) -> str:
    label = label_at(p_fake, threshold, margin)
    if label == "unsure":
        return f"Unsure: p(fake) = {p_fake:.3f} is within {margin:.2f} of the threshold {threshold:.2f}."
    if label == "fake":
        return f"Likely AI-generated: p(fake) = {p_fake:.3f} >= threshold {threshold:.2f}."
    return f"Likely real: p(fake) = {p_fake:.3f} < threshold {threshold:.2f}."


def describe_verdict(verdict, threshold: float, margin: float) -> str:
    """`describe`, and with stability the copies' spread, or why they make a confident score "unsure"."""
    text = describe(verdict.p_fake, threshold, margin)
    if verdict.stable is None:
        return text
    if not verdict.stable:
        return (
            f"Unsure: p(fake) = {verdict.p_fake:.3f}, but its re-saved, resized or cropped copies fall on both "
            f"sides of the threshold {threshold:.2f} (spread {verdict.spread:.3f})."
        )
    return f"{text} Copies agree (spread {verdict.spread:.3f})."


def file_path(source) -> str | None:
    """The path of an upload: a path, or Gradio's file payload."""
    return source.get("path") if isinstance(source, dict) else source


def explanation(detector: Detector, image):
    """The overlay of `mirage_hf.explain`, or None where that module is missing or fails (the verdict stands)."""
    try:
        from mirage_hf.explain import explain_image
    except ImportError:
        return None
    try:
        return explain_image(detector, image)[1]
    except Exception:  # an optional view must not cost the user the verdict
        logger.exception("explanation failed")
        return None


class DetectorApp:
    """The Space's handlers around one detector, built by `detector_factory` on first use (thread-safe), and a
    PyTorch one from `torch_detector_factory` for explanation maps when the first runs on ONNX Runtime."""

    def __init__(self, detector_factory=load_detector, torch_detector_factory=load_torch_detector):
        self.factories = {"scoring": detector_factory, "torch": torch_detector_factory}
        self._detectors = {}
        self._lock = threading.Lock()
        self._batch_files = tempfile.TemporaryDirectory(prefix="mirage-batch-")  # removed with the app

    def _new_csv_path(self) -> Path:
        """A new folder for one batch's CSV, in the app's temporary folder; batches older than
        `BATCH_CSV_SECONDS` are removed first."""
        root = Path(self._batch_files.name)
        for old in root.iterdir():
            if time.time() - old.stat().st_mtime >= BATCH_CSV_SECONDS:
                shutil.rmtree(old, ignore_errors=True)
        return Path(tempfile.mkdtemp(dir=root)) / "verdicts.csv"

    def _load(self, kind: str) -> Detector:
        with self._lock:
            if kind not in self._detectors:
                try:
                    self._detectors[kind] = self.factories[kind]()
                except Exception as err:  # shown in the page; the next request tries again
                    logger.exception("loading the model failed")
                    raise gr.Error(f"Could not load the model: {err}") from err
            return self._detectors[kind]

    def detector(self) -> Detector:
        return self._load("scoring")

    def explainer(self) -> Detector:
        """The detector that draws explanation maps: the scoring one when it runs on PyTorch."""
        detector = self.detector()
        return detector if detector.backend == "torch" else self._load("torch")

    def model_info(self):
        """On page load: the slider where the verdict flips (0.5: the fitted threshold is folded into p(fake)), and a
        line about the model."""
        detector = self.detector()
        name = detector.model.config.name_or_path or "model"
        adapter = getattr(detector.model, "mirage_adapter", None)  # mirage-adapt's adapter on a base detector
        on_base = f" (adapter on the base detector `{adapter['base_model']}`)" if adapter else ""
        text = (
            f"Model `{name}`{on_base} on backend `{detector.backend}`: p(fake) is calibrated with its fitted threshold "
            f"{detector.scorer.config.decision_threshold:.3f} folded in, so it calls an image fake from "
            f"{detector.threshold:.2f}, as pipeline() does; unsure band {detector.unsure_margin:.2f}."
        )
        return gr.Slider(value=round(detector.threshold, 2)), text

    def detect(self, image, threshold=None, explain=False, stability=False):
        """(label confidences, verdict text, explanation overlay if asked for and available) for one image."""
        try:
            image = read_image(image)
        except ImageLoadError as err:
            return None, f"Could not read the image: {err.reason}", None
        detector = self.detector()
        threshold = detector.threshold if threshold is None else float(threshold)
        verdict = detector([image], stability, threshold)[0]
        overlay = explanation(self.explainer(), image) if explain else None
        text = f"{describe_verdict(verdict, threshold, detector.unsure_margin)} (backend: {detector.backend})"
        return {"real": 1.0 - verdict.p_fake, "fake": verdict.p_fake}, text, overlay

    def detect_video(self, video, threshold=None, stability=False):
        """(label confidences, verdict text, table of frames) for one video: the mean p(fake) of its frames at
        instants uniform over its duration, judged like an image's."""
        path = file_path(video)
        if path is None:
            return None, "Could not read the video: no video was given", None
        if os.path.isfile(path) and os.path.getsize(path) > MAX_UPLOAD_BYTES:
            return None, f"Could not read the video: the file is larger than {MAX_UPLOAD_BYTES // 2**20} MB", None
        detector = self.detector()
        threshold = detector.threshold if threshold is None else float(threshold)
        try:
            verdict, scores, frames = score_video(
                detector, path, max_frames=VIDEO_FRAMES, stability=stability, batch_size=BATCH_SIZE, threshold=threshold
            )
        except ImageLoadError as err:
            return None, f"Could not read the video: {err.reason}", None
        text = (
            f"{describe_verdict(verdict, threshold, detector.unsure_margin)} Mean of {scores.count} frames; highest "
            f"frame p(fake) {scores.p_fake_max:.3f}; {scores.fake_fraction:.0%} of the frames called fake "
            f"(backend: {detector.backend})."
        )
        table = [[round(time, 2), frame.label, round(frame.p_fake, 4)] for time, frame in frames]
        return {"real": 1.0 - verdict.p_fake, "fake": verdict.p_fake}, text, table

    def detect_batch(self, files, threshold=None):
        """(rows of file, verdict, p_fake; CSV path) for several files; unreadable ones say why."""
        files = list(files or [])
        if len(files) > MAX_BATCH_FILES:
            raise gr.Error(f"At most {MAX_BATCH_FILES} files at a time, got {len(files)}.")
        detector = self.detector()
        threshold = detector.threshold if threshold is None else float(threshold)
        rows = []
        for start in range(0, len(files), BATCH_SIZE):
            readable = []
            for path in files[start : start + BATCH_SIZE]:
                rows.append([Path(path).name, None, None])
                try:
                    if maybe_video(path) and (verdict := self._video_or_none(detector, path, threshold)):
                        rows[-1][1:] = [verdict.label, round(verdict.p_fake, 4)]
                    else:
                        readable.append((rows[-1], read_image(path)))
                except ImageLoadError as err:
                    rows[-1][1] = f"unreadable: {err.reason}"
            if readable:
                for (row, _), p in zip(readable, detector.p_fake([image for _, image in readable])):
                    row[1:] = [label_at(float(p), threshold, detector.unsure_margin), round(float(p), 4)]
        csv_path = self._new_csv_path()
        with open(csv_path, "w", newline="") as handle:
            csv.writer(handle).writerows([["file", "verdict", "p_fake"], *rows])
        return rows, str(csv_path)

    @staticmethod
    def _video_or_none(detector: Detector, path: str, threshold: float):
        """A video's verdict in the Batch tab; None for a GIF of one frame, which is an image."""
        try:
            return score_video(detector, path, max_frames=VIDEO_FRAMES, batch_size=BATCH_SIZE, threshold=threshold)[0]
        except ImageLoadError as err:
            if err.reason == STILL_IMAGE:
                return None
            raise


def build_demo(detector_factory=load_detector) -> gr.Blocks:
    """The page; tests pass their own `detector_factory`."""
    app = DetectorApp(detector_factory)
    with gr.Blocks(title="MiraGe AI-image detector") as demo:
        gr.Markdown(
            "# Is this image AI-generated?\n"
            "MiraGe detector (frozen CLIP + learned prompts). A score is evidence, not proof: detectors miss "
            "generators unlike their training data, and compression or resizing move the scores."
        )
        info = gr.Markdown()
        threshold = gr.Slider(0.0, 1.0, value=0.5, step=0.01, label="Threshold on p(fake)")
        with gr.Tab("Detect"):
            with gr.Row():
                with gr.Column():
                    image = gr.Image(
                        type="filepath", sources=["upload", "clipboard"], label="Image", elem_id="image", height=320
                    )
                    explain = gr.Checkbox(
                        False,
                        label="Also show where the detector looked (32 extra passes: slow on CPU)",
                        visible=importlib.util.find_spec("mirage_hf.explain") is not None,
                    )
                    stability = gr.Checkbox(False, label=STABILITY_LABEL)
                    button = gr.Button("Detect", variant="primary")
                    gr.Examples(
                        [[str(path)] for path in EXAMPLES],
                        inputs=image,
                        example_labels=["synthetic scene (real)", "synthetic upsampler (fake)"],
                    )
                with gr.Column():
                    # No heading: it would show the more probable class, which is not the verdict at the threshold.
                    probabilities = gr.Label(num_top_classes=2, label="Probabilities", show_heading=False)
                    verdict = gr.Textbox(label="Verdict", elem_id="verdict", interactive=False)
                    overlay = gr.Image(type="pil", label="Where the detector looked", interactive=False, height=320)
            # preprocess=False: the handler gets the uploaded file's path unopened (see the module docstring).
            button.click(
                app.detect,
                [image, threshold, explain, stability],
                [probabilities, verdict, overlay],
                api_name="predict",
                preprocess=False,
            )
        with gr.Tab("Video"):
            with gr.Row():
                with gr.Column():
                    video = gr.Video(sources=["upload"], label="Video", elem_id="video", height=320)
                    video_stability = gr.Checkbox(False, label=STABILITY_LABEL)
                    video_button = gr.Button("Detect video", variant="primary")
                with gr.Column():
                    video_probabilities = gr.Label(num_top_classes=2, label="Probabilities", show_heading=False)
                    video_verdict = gr.Textbox(label="Verdict", elem_id="video-verdict", interactive=False)
                    frame_table = gr.Dataframe(
                        headers=["second", "verdict", "p_fake"], label="Frames", interactive=False
                    )
            video_button.click(
                app.detect_video,
                [video, threshold, video_stability],
                [video_probabilities, video_verdict, frame_table],
                api_name="predict_video",
            )
        with gr.Tab("Batch"):
            files = gr.File(file_count="multiple", file_types=["image", "video"], type="filepath", label="Files")
            batch_button = gr.Button("Detect all", variant="primary")
            table = gr.Dataframe(headers=["file", "verdict", "p_fake"], label="Verdicts", interactive=False)
            download = gr.File(label="CSV", interactive=False)
            batch_button.click(app.detect_batch, [files, threshold], [table, download], api_name="predict_batch")
        demo.load(app.model_info, outputs=[threshold, info], api_visibility="private")
    return demo


demo = build_demo()

if __name__ == "__main__":
    demo.launch(max_file_size=MAX_UPLOAD_BYTES)

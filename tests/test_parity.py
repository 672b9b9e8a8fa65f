"""Preprocessing and score parity: every path that scores an image sees the pixels of the image processor saved
with the model, in both preprocessing modes, for images larger and smaller than the input size and in several
colour modes, and reports the same p(fake) and verdict as plain `pipeline()` at a calibrated threshold far from 0.5.

The paths: plain `pipeline(..., trust_remote_code=True)` in a process that never imports mirage_hf, `AutoModel`,
`Detector` and the scoring loop of `mirage-detect`, the Space's handler, evaluation, ONNX Runtime and the model
card's ONNX Runtime snippet.
"""

import json
import os
import shutil
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from accelerate import Accelerator
from conftest import IMAGE_SIZE
from PIL import Image
from transformers.models.auto.image_processing_auto import AutoImageProcessor

import mirage_hf
from mirage_hf.cards import ONNX_SNIPPET
from mirage_hf.evaluation import predict
from mirage_hf.explain import _seen_box
from mirage_hf.hub import stage_model_repo
from mirage_hf.inference import Detector
from mirage_hf.model_folder import export_model
from mirage_hf.onnx_export import export_onnx
from mirage_hf.scan import PathList, score_batches
from mirage_hf.scoring import load_scorer
from mirage_hf.transforms import Preprocessor, image_processor_for, scoring_preprocessor

MODES = ("resize", "center_crop")
# (width, height) around the input size S = 30: larger, smaller by odd and even amounts, and larger one way only.
SIZES = [(61, 45), (17, 23), (12, 12), (45, 20)]
# Colour modes that `pipeline()` and `open_image` both bring to RGB: (size, PIL mode).
MODES_OF_COLOUR = [((40, 33), "L"), ((33, 50), "RGBA"), ((36, 36), "P")]
TEMPERATURE = 0.5
PARITY = 1e-5


def pasted(size, seed):
    """Noise of one texture with a smoother patch pasted in its centre (the demo's fake-in-a-real-photo case)."""
    rng = np.random.default_rng(seed)
    width, height = size
    pixels = rng.integers(0, 255, (height, width, 3), dtype=np.uint8)
    patch = np.repeat(np.repeat(rng.integers(0, 255, (8, 8, 3), dtype=np.uint8), 2, 0), 2, 1)
    top, left = max(height - 16, 0) // 2, max(width - 16, 0) // 2
    pixels[top : top + 16, left : left + 16] = patch[: min(16, height), : min(16, width)]
    return Image.fromarray(pixels)


@pytest.fixture(scope="module")
def image_paths(tmp_path_factory):
    folder = tmp_path_factory.mktemp("parity-images")
    paths = []
    for index, size in enumerate(SIZES):
        paths.append(str(folder / f"image_{size[0]}x{size[1]}.png"))
        pasted(size, index).save(paths[-1])
    for index, (size, colour) in enumerate(MODES_OF_COLOUR, start=len(SIZES)):
        paths.append(str(folder / f"image_{colour}.png"))
        pasted(size, index).convert(colour).save(paths[-1])
    return paths


def scaled(logit_diff) -> np.ndarray:
    """The temperature-scaled probability sigmoid(z / T), on which a calibrated threshold is chosen."""
    return 1.0 / (1.0 + np.exp(-np.asarray(logit_diff, dtype=np.float64) / TEMPERATURE))


@pytest.fixture(scope="module")
def model_dirs(clip_dir, image_paths, tmp_path_factory):
    """One exported detector per mode (same weights, temperature 0.5), each with the fp32 ONNX graph. The threshold
    is the median of the images' temperature-scaled scores over both modes, so that the verdicts split where that
    median lies (here far from 0.5: the scores an unfolded threshold would leave a user to compare)."""
    torch.manual_seed(0)
    model = mirage_hf.from_clip(mirage_hf.MiraGeForImageClassification, clip_dir, mode="mirage", prompt_depth=2).eval()
    with torch.no_grad():
        model.prompt_learner.text_prompts[1].normal_(std=0.5)
    model.config.calibration_temperature = TEMPERATURE
    images = [Image.open(path).convert("RGB") for path in image_paths]
    processor = AutoImageProcessor.from_pretrained(clip_dir)
    with torch.no_grad():
        z = [model(Preprocessor(processor, mode)(images)).logit_diff.numpy() for mode in MODES]
    model.config.decision_threshold = float(np.median(scaled(np.concatenate(z))))
    root, dirs = tmp_path_factory.mktemp("parity-models"), {}
    for mode in MODES:
        model.config.preprocess = mode
        dirs[mode] = export_model(model, processor, root / mode)
    export_onnx(dirs["resize"], quantize=False)  # the graph does not depend on the preprocessing
    shutil.copytree(dirs["resize"] / "onnx", dirs["center_crop"] / "onnx")
    return dirs


@pytest.fixture(scope="module")
def pipeline_rows(model_dirs, image_paths, tmp_path_factory):
    """Per mode, (fake score, label) of each image from plain `pipeline()` with remote code, in a process where
    mirage_hf was never imported."""
    folder = tmp_path_factory.mktemp("pipeline-run")
    script = textwrap.dedent(
        f"""
        import json, sys
        from transformers import pipeline
        scores = {{}}
        for mode, path in {json.dumps({mode: str(path) for mode, path in model_dirs.items()})}.items():
            detector = pipeline("image-classification", model=path, trust_remote_code=True)
            rows = detector({image_paths!r})
            scores[mode] = [[next(r["score"] for r in row if r["label"] == "fake"), row[0]["label"]] for row in rows]
        assert "mirage_hf" not in sys.modules, "mirage_hf was imported"
        print(json.dumps(scores))
        """
    )
    env = {"HF_HUB_OFFLINE": "1", "HF_HOME": str(folder / "hf_home"), "PATH": "/usr/bin:/bin"}
    result = subprocess.run([sys.executable, "-c", script], cwd=folder, env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    rows = json.loads(result.stdout.splitlines()[-1])
    return {mode: (np.array([score for score, _ in rows]), [label for _, label in rows]) for mode, rows in rows.items()}


@pytest.fixture(scope="module")
def pipeline_scores(pipeline_rows):
    return {mode: scores for mode, (scores, _) in pipeline_rows.items()}


def test_the_saved_processor_implements_the_model_s_preprocessing(model_dirs, pipeline_scores):
    for mode, folder in model_dirs.items():
        saved = json.loads((folder / "preprocessor_config.json").read_text())
        assert saved["do_resize"] == (mode == "resize") and saved["do_center_crop"]
    assert np.abs(pipeline_scores["resize"] - pipeline_scores["center_crop"]).max() > 0.01, "the modes must differ"
    assert np.ptp(pipeline_scores["center_crop"]) > 0.01, "the scores must differ for the comparison to mean anything"


@pytest.mark.parametrize("mode", MODES)
def test_mirage_detect_scores_as_the_pipeline(model_dirs, image_paths, pipeline_scores, mode):
    detector = Detector.from_pretrained(model_dirs[mode], device="cpu")
    rows = [row for batch in score_batches(detector, PathList(image_paths), batch_size=3) for row in batch]
    np.testing.assert_allclose([row.p_fake for row in rows], pipeline_scores[mode], rtol=0, atol=PARITY)


@pytest.mark.parametrize("mode", MODES)
def test_the_space_scores_as_the_pipeline(model_dirs, image_paths, pipeline_scores, mode, monkeypatch):
    from mirage_hf.space import app as space

    monkeypatch.setenv("MIRAGE_MODEL", str(model_dirs[mode]))
    monkeypatch.setattr(space, "BACKEND", "torch")
    handler = space.DetectorApp()  # the Space's own loader: `load_detector`
    scores = [handler.detect(path)[0]["fake"] for path in image_paths]
    np.testing.assert_allclose(scores, pipeline_scores[mode], rtol=0, atol=PARITY)


@pytest.mark.parametrize("mode", MODES)
def test_evaluation_scores_as_the_pipeline(model_dirs, image_paths, pipeline_scores, mode):
    """As `mirage-eval --model DIR` scores: the folder's scorer and its calibrated preprocessing."""
    scorer = load_scorer(model_dirs[mode], device="cpu")
    preprocess = scoring_preprocessor(AutoImageProcessor.from_pretrained(model_dirs[mode]), scorer.config)
    rows = [{"image": path, "label": index % 2, "subset": "parity"} for index, path in enumerate(image_paths)]
    p_fake = predict(scorer, rows, preprocess, Accelerator(cpu=True), batch_size=3).p_fake
    np.testing.assert_allclose(p_fake, pipeline_scores[mode], rtol=0, atol=PARITY)


@pytest.mark.parametrize("mode", MODES)
def test_the_card_s_onnx_snippet_preprocesses_as_the_saved_processor(model_dirs, image_paths, mode, monkeypatch):
    """The snippet's `preprocess`, run as the card prints it, gives the saved processor's pixels, and its p(fake)
    is the ONNX backend's."""
    import huggingface_hub

    folder = model_dirs[mode]
    monkeypatch.setattr(huggingface_hub, "snapshot_download", lambda *args, **kwargs: str(folder))
    monkeypatch.chdir(os.path.dirname(image_paths[0]))
    shutil.copy(image_paths[0], "photo.jpg")  # the snippet scores "photo.jpg"; PIL reads the PNG inside
    namespace = {}
    exec(ONNX_SNIPPET.format(repo_id="owner/detector", file="model.onnx").split("```python\n")[1][:-3], namespace)
    processor = AutoImageProcessor.from_pretrained(folder)
    detector = Detector.from_pretrained(folder, backend="onnx")
    for path in image_paths:
        image = Image.open(path)
        pixels = namespace["preprocess"](image)
        np.testing.assert_allclose(pixels, processor(images=image, return_tensors="np")["pixel_values"], atol=PARITY)
        p_fake = namespace["session"].run(["p_fake"], {"pixel_values": pixels})[0][0]
        assert p_fake == pytest.approx(detector.p_fake([image.convert("RGB")])[0], abs=PARITY)


@pytest.mark.parametrize("mode", MODES)
def test_explanation_maps_are_drawn_where_the_saved_processor_crops(model_dirs, mode):
    """A single bright pixel lands, in the pixels the saved processor gives, where `_seen_box` says the model's
    view of the image starts (exactly in center_crop mode; within a pixel where resizing blurs it)."""
    processor = AutoImageProcessor.from_pretrained(model_dirs[mode])
    preprocess = Preprocessor(processor, mode)
    for width, height in SIZES:
        x, y = width // 2 - 1, height // 2 + 1
        pixels = np.zeros((height, width, 3), dtype=np.uint8)
        pixels[y, x] = 255
        out = processor(images=Image.fromarray(pixels), return_tensors="np")["pixel_values"][0, 0]
        v, u = np.unravel_index(out.argmax(), out.shape)
        left, top, box_w, box_h = _seen_box((width, height), preprocess)
        expected = ((x + 0.5 - left) * IMAGE_SIZE / box_w - 0.5, (y + 0.5 - top) * IMAGE_SIZE / box_h - 0.5)
        assert (u, v) == pytest.approx(expected, abs=0 if mode == "center_crop" else 1.0), (width, height)


def test_a_folder_saved_before_the_processor_followed_the_model_warns_and_scores_as_calibrated(
    model_dirs, image_paths, pipeline_scores, tmp_path, caplog
):
    """Older exports saved the CLIP's resizing processor whatever `config.preprocess` said: mirage_hf scores such a
    folder with `config.preprocess` (what it was calibrated with) and says that plain pipeline() would not, and
    `mirage-push` refuses to publish it as it is."""
    folder = shutil.copytree(model_dirs["center_crop"], tmp_path / "old")
    image_processor_for(AutoImageProcessor.from_pretrained(folder), "resize").save_pretrained(folder)
    with caplog.at_level("WARNING", logger="mirage_hf.transforms"):
        detector = Detector.from_pretrained(folder, device="cpu")
    assert "implements 'resize'" in caplog.text and "preprocess='center_crop'" in caplog.text
    images = [Image.open(path).convert("RGB") for path in image_paths]
    np.testing.assert_allclose(detector.p_fake(images), pipeline_scores["center_crop"], rtol=0, atol=PARITY)
    caplog.clear()
    Detector.from_pretrained(model_dirs["center_crop"], device="cpu")
    assert not caplog.text
    with pytest.raises(
        ValueError, match=r"old: its .* implements 'resize' .*image_processor_for\(processor, 'center_crop'\)"
    ):
        stage_model_repo(folder, tmp_path / "staged", "owner/detector", license="mit")


@pytest.mark.parametrize("mode", MODES)
def test_every_surface_reports_one_score_and_one_verdict(model_dirs, image_paths, pipeline_rows, mode, capsys):
    """At a threshold far from 0.5, between the images' scores: plain `pipeline()`'s fake score and top label are
    what `AutoModel` (`p_fake`), `Detector` (torch and ONNX), `mirage-detect` and the Space report."""
    from transformers import AutoModelForImageClassification

    from mirage_hf import cli
    from mirage_hf.space import app as space

    folder = model_dirs[mode]
    threshold = json.loads((folder / "config.json").read_text())["decision_threshold"]
    scores, labels = pipeline_rows[mode]
    assert abs(threshold - 0.5) > 0.25, "the threshold must sit far from 0.5 for the comparison to mean anything"
    assert set(labels) == {"real", "fake"}, "the verdicts must split for the comparison to mean anything"
    assert labels == ["fake" if score >= 0.5 else "real" for score in scores]

    model = AutoModelForImageClassification.from_pretrained(folder).eval()
    images = [Image.open(path).convert("RGB") for path in image_paths]
    with torch.no_grad():
        p_fake = model(**AutoImageProcessor.from_pretrained(folder)(images=images, return_tensors="pt")).p_fake
    surfaces = {"AutoModel": (p_fake.numpy(), ["fake" if p >= 0.5 else "real" for p in p_fake])}
    for backend in ("torch", "onnx"):
        verdicts = Detector.from_pretrained(folder, device="cpu", backend=backend)(image_paths)
        surfaces[f"Detector {backend}"] = ([v.p_fake for v in verdicts], [v.label for v in verdicts])
    capsys.readouterr()
    assert cli.main([*image_paths, "--model", str(folder), "--unsure_margin", "0", "--format", "json", "-q"]) == 0
    rows = json.loads(capsys.readouterr().out)
    surfaces["mirage-detect"] = ([row["p_fake"] for row in rows], [row["label"] for row in rows])
    handler = space.DetectorApp(lambda: Detector.from_pretrained(folder, device="cpu"))  # unsure band 0, as above
    answers = [handler.detect(path) for path in image_paths]
    space_labels = ["fake" if text.startswith("Likely AI") else "real" for _, text, _ in answers]
    surfaces["Space"] = ([confidences["fake"] for confidences, _, _ in answers], space_labels)
    for surface, (reported, called) in surfaces.items():
        tolerance = 1e-4 if surface == "mirage-detect" else PARITY  # the CLI rounds to 4 decimals
        np.testing.assert_allclose(reported, scores, rtol=0, atol=tolerance, err_msg=surface)
        assert called == labels, surface

import numpy as np
import pytest
import torch
from conftest import scaled_p_fake, with_threshold
from PIL import Image
from transformers import pipeline

from mirage_hf.inference import Detector


def images(n=6):
    rng = np.random.default_rng(0)
    return [Image.fromarray(rng.integers(0, 255, (40 + i, 36, 3), dtype=np.uint8)) for i in range(n)]


def test_detector_agrees_with_the_pipeline_decision(detector_dir, tmp_path):
    """The threshold is moved between the images' temperature-scaled scores, so both sides are compared: `pipeline()` reads the calibrated logits, the Detector p(fake), and they
    must call the same images fake."""
    scores = np.sort(scaled_p_fake(detector_dir, images()))
    folder = with_threshold(detector_dir, tmp_path / "model", float(scores[2] + scores[3]) / 2)
    verdicts = Detector.from_pretrained(folder, device="cpu")(images())
    piped = pipeline("image-classification", model=str(folder))(images(), top_k=1)
    assert [v.label for v in verdicts] == [rows[0]["label"] for rows in piped]
    assert sorted(v.label for v in verdicts) == ["fake"] * 3 + ["real"] * 3
    assert all(0.0 <= v.p_fake <= 1.0 for v in verdicts)


def test_detector_takes_file_paths_as_the_pipeline_does(detector_dir, tmp_path):
    """Paths (str or os.PathLike) score as the images in them, with or without stability, and agree with
    `pipeline()` on the same paths; a missing or unreadable file raises ImageLoadError naming it."""
    from mirage_hf.transforms import ImageLoadError

    paths = [tmp_path / f"{index}.png" for index in range(4)]
    for image, path in zip(images(4), paths):
        image.save(path)
    detector = Detector.from_pretrained(detector_dir, device="cpu")
    mixed = [str(paths[0]), paths[1], str(paths[2]), paths[3]]
    assert detector(mixed) == detector(images(4))
    assert detector(mixed, stability=True) == detector(images(4), stability=True)
    piped = pipeline("image-classification", model=str(detector_dir))([str(path) for path in paths], top_k=1)
    assert [v.label for v in detector(mixed)] == [rows[0]["label"] for rows in piped]
    (tmp_path / "notes.jpg").write_text("not an image")
    for bad, reason in ((tmp_path / "missing.jpg", "file not found"), (tmp_path / "notes.jpg", "not an image")):
        with pytest.raises(ImageLoadError, match=f"cannot load image {bad}: {reason}"):
            detector([paths[0], bad])


def test_detector_scores_with_the_preprocessing_stored_in_the_model(detector_dir, tmp_path):
    import json
    import shutil

    from mirage_hf.transforms import Preprocessor

    folder = shutil.copytree(detector_dir, tmp_path / "model")
    config = json.loads((folder / "config.json").read_text())
    assert config["preprocess"] == "resize"
    (folder / "config.json").write_text(json.dumps({**config, "preprocess": "center_crop"}))
    detector = Detector.from_pretrained(folder, device="cpu")
    assert detector.preprocess.mode == "center_crop"
    expected = Preprocessor(detector.image_processor, "center_crop")(images(2))
    torch.testing.assert_close(detector.preprocess(images(2)), expected)
    assert Detector.from_pretrained(folder, device="cpu", preprocess="resize").preprocess.mode == "resize"


def test_unsure_band_around_where_the_verdict_flips(detector_dir):
    """The detector's calibrated threshold (0.3) is folded into p(fake), so the band lies around 0.5."""
    detector = Detector.from_pretrained(detector_dir, device="cpu", unsure_margin=0.1)
    assert detector.scorer.config.decision_threshold == 0.3 and detector.threshold == 0.5
    assert detector.verdict(0.55).label == "unsure" and detector.verdict(0.45).label == "unsure"
    assert detector.verdict(0.61).label == "fake" and detector.verdict(0.39).label == "real"
    with pytest.raises(ValueError, match="unsure_margin"):
        Detector(detector.model, detector.image_processor, unsure_margin=0.7)


def test_bf16_paths_match_fp32_within_bf16_precision(detector_dir):
    """bf16 weights (`mirage-detect --dtype bfloat16`) and bf16 autocast (evaluation under mixed precision) move
    p(fake) only by bf16 rounding: at most 0.05 here (0.03 measured), on scores spread over 0.2."""
    gradient = np.tile(np.linspace(0, 255, 36, dtype=np.uint8)[None, :, None], (40, 1, 3))
    batch = [Image.new("RGB", (40, 36), c) for c in ("black", "white", "red", "blue", "yellow")]
    batch += [*images(1), Image.fromarray(gradient)]
    reference = Detector.from_pretrained(detector_dir, device="cpu").p_fake(batch)
    bf16_weights = Detector.from_pretrained(detector_dir, device="cpu", dtype=torch.bfloat16)
    assert bf16_weights.model.dtype == torch.bfloat16
    with torch.autocast("cpu", dtype=torch.bfloat16):
        autocast = Detector.from_pretrained(detector_dir, device="cpu").p_fake(batch)
    assert np.ptp(reference) > 0.2, "the scores must differ for the comparison to mean anything"
    np.testing.assert_allclose(bf16_weights.p_fake(batch), reference, atol=0.05)
    np.testing.assert_allclose(autocast, reference, atol=0.05)


@pytest.mark.slow
def test_compiled_path_matches_the_plain_path(detector_dir):
    """Equal scores, and the compiled detector really ran compiled graphs (dynamo's counters)."""
    from torch._dynamo.utils import counters

    plain = Detector.from_pretrained(detector_dir, device="cpu")
    compiled = Detector.from_pretrained(detector_dir, device="cpu", compile=True)
    batch = images(3)
    expected = plain.p_fake(batch), plain.p_fake(batch[:2])
    torch._dynamo.reset()
    counters.clear()
    np.testing.assert_allclose(compiled.p_fake(batch), expected[0], atol=1e-5)
    np.testing.assert_allclose(compiled.p_fake(batch[:2]), expected[1], atol=1e-5)
    assert counters["stats"]["unique_graphs"] >= 1, dict(counters)

import numpy as np
import pytest
import torch
from conftest import IMAGE_SIZE
from PIL import Image
from transformers.models.auto.image_processing_auto import AutoImageProcessor

from mirage_hf.explain import explain, explain_image, overlay
from mirage_hf.inference import Detector

GRID = IMAGE_SIZE // 6  # the tiny CLIP's patch size is 6


def log_odds(model, pixel_values):
    """The model's own calibrated fake-minus-real logit, from `forward`."""
    with torch.no_grad():
        logits = model(pixel_values).logits
    return logits[:, 1] - logits[:, 0]


@pytest.mark.parametrize("mode", ["mirage", "linear_probe"])
def test_map_sums_to_the_models_own_log_odds_change(make_model, pixel_values, mode):
    """Completeness: the patches share out exactly how far the image moves the calibrated verdict from the flat
    baseline, so the map is in the verdict's units and cannot drift from the model's decision."""
    model = make_model(mode).eval()
    model.config.decision_threshold, model.config.calibration_temperature = 0.3, 0.05
    change = log_odds(model, pixel_values) - log_odds(model, torch.zeros_like(pixel_values))
    assert change.abs().min() > 0.3
    torch.testing.assert_close(explain(model, pixel_values).sum((1, 2)), change, rtol=0.02, atol=0.01)


def test_map_is_the_patch_grid_and_deterministic(make_model, pixel_values):
    model = make_model("mirage").eval()
    with torch.inference_mode():
        heatmap = explain(model, pixel_values)
    assert heatmap.shape == (4, GRID, GRID)
    torch.testing.assert_close(explain(model, pixel_values), heatmap, rtol=0, atol=0)


def test_map_localises_what_differs_from_the_baseline(make_model, pixel_values):
    """An image equal to the flat baseline except in its left three patch columns: the right two columns get
    exactly zero and the left ones carry the whole change. A transposed or shifted patch grid fails this."""
    model = make_model("mirage").eval()
    image = pixel_values[:1].clone()
    image[..., 3 * 6 :] = 0.0
    heatmap = explain(model, image)[0]
    assert torch.all(heatmap[:, 3:] == 0) and torch.all(heatmap[:, :3] != 0)
    change = log_odds(model, image) - log_odds(model, torch.zeros_like(image))
    torch.testing.assert_close(heatmap[:, :3].sum(), change[0], rtol=0.02, atol=0.01)


def test_sign_follows_the_fake_anchor(make_model, pixel_values):
    """Swapping which class prompt is "fake" swaps the anchors, which must negate the map."""
    model = make_model("mirage").eval()
    heatmap = explain(model, pixel_values)
    learner = model.prompt_learner
    with torch.no_grad():
        learner.token_ids.copy_(learner.token_ids.flip(0).clone())
        learner.eos_positions.copy_(learner.eos_positions.flip(0).clone())
    assert heatmap.abs().max() > 0
    torch.testing.assert_close(explain(model, pixel_values), -heatmap, rtol=1e-4, atol=1e-6)


def test_overlay_tints_fake_red_and_real_blue():
    image = Image.new("L", (40, 20), 128)
    result = overlay(image, np.array([[2.0, -2.0]]))
    assert result.size == image.size and result.mode == "RGB"
    pixels = np.asarray(result, dtype=int)
    redness = pixels[..., 0] - pixels[..., 2]
    assert redness[:, 0].min() > 50 and redness[:, -1].max() < -50
    assert np.array_equal(np.asarray(overlay(image, np.zeros((2, 2)))), np.asarray(image.convert("RGB")))


def test_explain_image_draws_on_the_region_the_model_saw(make_model, clip_dir):
    """In "resize" mode a 60x30 image is seen as its centre 30x30 square: the margins stay untouched."""
    detector = Detector(make_model("mirage"), AutoImageProcessor.from_pretrained(clip_dir))
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (30, 60, 3), dtype=np.uint8))
    heatmap, drawn = explain_image(detector, image)
    assert heatmap.shape == (GRID, GRID) and drawn.size == image.size
    before, after = np.asarray(image), np.asarray(drawn)
    assert np.array_equal(before[:, :15], after[:, :15]) and np.array_equal(before[:, 45:], after[:, 45:])
    assert not np.array_equal(before[:, 15:45], after[:, 15:45])

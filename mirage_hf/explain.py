"""Explanation maps: which image patches pull a MiraGe detector's decision towards "fake".

Integrated gradients of the calibrated fake-minus-real log-odds, summed per ViT patch: a patch's value is its
share of how far the image moves the verdict. Why this method: docs/explanation-maps.md.
"""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image
from transformers.image_processing_backends import TorchvisionBackend

from .scoring import check_backend_options

# Overlay colours: towards fake, towards real.
FAKE_RGB = np.array([230.0, 30.0, 30.0])
REAL_RGB = np.array([30.0, 80.0, 230.0])


def _log_odds(model, pixel_values: torch.Tensor) -> torch.Tensor:
    """(B,) calibrated log-odds of "fake" relative to the threshold: positive exactly when the verdict is fake.

    Read from the model's own calibrated output logits (float32), so the map explains the verdict users get.
    """
    logits = model(pixel_values=pixel_values).logits
    return logits[:, 1] - logits[:, 0]


def explain(model, pixel_values: torch.Tensor, steps: int = 32) -> torch.Tensor:
    """(B, H_patches, W_patches) float32 map: each patch's integrated-gradients share of the log-odds change.

    `model` is a `MiraGeModel` / `MiraGeForImageClassification` (any mode, in eval mode); `pixel_values` as for
    `model.forward`. Works inside `torch.inference_mode()` too.
    """
    vision_config = model.config.clip_config.vision_config
    patch = vision_config.patch_size
    grid = vision_config.image_size // patch
    with torch.inference_mode(False), torch.enable_grad():
        image = pixel_values.detach().clone().float()  # the baseline is zero, so `image` is also the path's length
        gradient_sum = torch.zeros_like(image)
        for step in range(steps):
            point = ((step + 0.5) / steps * image).requires_grad_()
            gradient_sum += torch.autograd.grad(_log_odds(model, point).sum(), point)[0]
        attribution = (image * gradient_sum / steps)[..., : grid * patch, : grid * patch]
    return attribution.reshape(-1, vision_config.num_channels, grid, patch, grid, patch).sum((1, 3, 5)).detach()


def _upsample(heatmap: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Bilinear resize of a 2-D map to `size` = (width, height)."""
    return np.asarray(Image.fromarray(np.asarray(heatmap, dtype=np.float32)).resize(size, Image.Resampling.BILINEAR))


def _blend(image: Image.Image, heat: np.ndarray, alpha: float) -> Image.Image:
    """Tints `image` red where `heat` > 0 and blue where < 0, opacity `alpha` * |heat| / max |heat|.

    The scale is symmetric around 0, so a patch with no share in the decision leaves its pixels unchanged.
    """
    scale = float(np.abs(heat).max())
    weight = alpha * np.abs(heat)[..., None] / scale if scale > 0 else np.zeros((*heat.shape, 1))
    colour = np.where(heat[..., None] >= 0, FAKE_RGB, REAL_RGB)
    pixels = np.asarray(image.convert("RGB"), dtype=np.float64)
    return Image.fromarray(np.rint(pixels * (1 - weight) + colour * weight).astype(np.uint8))


def overlay(image: Image.Image, heatmap: np.ndarray, alpha: float = 0.45) -> Image.Image:
    """`heatmap` stretched over the whole `image` (bilinear) as a red (fake) / blue (real) tint; RGB, same size."""
    return _blend(image, _upsample(heatmap, image.size), alpha)


def _crop_start(length: int, crop: int, pads_up: bool) -> int:
    """Where the image processor's centre crop of `crop` pixels starts along a side of `length` pixels: inside a
    longer side, or before a shorter one, which it pads (with the larger half first when `pads_up`)."""
    if length >= crop:
        return (length - crop) // 2
    return -((crop - length + pads_up) // 2)


def _seen_box(size: tuple[int, int], preprocess) -> tuple[int, int, int, int]:
    """(left, top, width, height) in `size`'s pixels of the region the model saw after `preprocess`.

    It may reach outside the image where the preprocessing pads (a crop larger than the image).
    """
    width, height = size
    crop = preprocess.image_size
    if preprocess.mode == "center_crop":  # the processor's centre crop alone; PIL's pads the larger half first
        pads_up = not isinstance(preprocess.image_processor, TorchvisionBackend)
        return _crop_start(width, crop, pads_up), _crop_start(height, crop, pads_up), crop, crop
    processor = preprocess.image_processor
    if "shortest_edge" in processor.size:
        scale = processor.size["shortest_edge"] / min(width, height)
        resized_w, resized_h = width * scale, height * scale
    else:
        resized_w, resized_h = processor.size["width"], processor.size["height"]
    crop_w, crop_h = (
        (processor.crop_size["width"], processor.crop_size["height"])
        if processor.do_center_crop
        else (resized_w, resized_h)
    )
    to_x, to_y = width / resized_w, height / resized_h
    return (
        round((resized_w - crop_w) / 2 * to_x),
        round((resized_h - crop_h) / 2 * to_y),
        max(1, round(crop_w * to_x)),
        max(1, round(crop_h * to_y)),
    )


def explain_images(detector, images: list[Image.Image], alpha: float = 0.45) -> list[tuple[np.ndarray, Image.Image]]:
    """(heatmap, overlay) per RGB image for a `mirage_hf.inference.Detector`, in one batch.

    The overlay keeps the full image; the map is drawn over the region the model saw (the centre square in
    "resize" mode, the centre crop in "center_crop" mode) and the rest is left as it is.
    """
    check_backend_options(detector.backend, explain=True)
    pixel_values = detector.preprocess(list(images)).to(detector.device)
    heatmaps = explain(detector.model, pixel_values).cpu().numpy()
    results = []
    for image, heatmap in zip(images, heatmaps):
        left, top, box_w, box_h = _seen_box(image.size, detector.preprocess)
        region = _upsample(heatmap, (box_w, box_h))
        heat = np.zeros((image.height, image.width), dtype=np.float32)
        x0, y0 = max(left, 0), max(top, 0)
        x1, y1 = min(left + box_w, image.width), min(top + box_h, image.height)
        heat[y0:y1, x0:x1] = region[y0 - top : y1 - top, x0 - left : x1 - left]
        results.append((heatmap, _blend(image, heat, alpha)))
    return results


def explain_image(detector, image: Image.Image, alpha: float = 0.45) -> tuple[np.ndarray, Image.Image]:
    """(heatmap (H_patches, W_patches), overlay) for one RGB image; see `explain_images`."""
    return explain_images(detector, [image], alpha)[0]

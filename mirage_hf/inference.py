"""Scoring images with a trained detector: the one code path behind the CLI, the Space and evaluation users.

`Detector` loads a MiraGe model folder or Hub id with its image processor and returns, per image, the model's
calibrated probability of "fake" (`MiraGeOutput.p_fake`) and the verdict at the model's calibrated threshold,
with an optional "unsure" band around it.
"""

from dataclasses import dataclass

import numpy as np
import torch
from transformers.models.auto.image_processing_auto import AutoImageProcessor  # top-level: torchvision-only in 5.17

from .modeling_mirage import MiraGeForImageClassification
from .transforms import Preprocessor


@dataclass
class Verdict:
    label: str
    """"real", "fake", or "unsure" when p(fake) lies within the unsure band around the threshold."""
    p_fake: float


def verdict_label(p_fake: float, threshold: float, unsure_margin: float = 0.0) -> str:
    """ "unsure" within `unsure_margin` of the threshold (scores there flip under resizing or compression)."""
    if abs(p_fake - threshold) < unsure_margin:
        return "unsure"
    return "fake" if p_fake >= threshold else "real"


def compile_image_path(model):
    """Opt-in `torch.compile` of the image encoder (the per-image work; the cached anchors stay eager)."""
    model.encode_image = torch.compile(model.encode_image, dynamic=True)
    return model


class Detector:
    def __init__(
        self, model, image_processor, preprocess: str | None = None, unsure_margin: float = 0.0, compile: bool = False
    ):
        """`preprocess` None uses the mode the model was calibrated with (`model.config.preprocess`)."""
        self.preprocess = Preprocessor(image_processor, preprocess or model.config.preprocess)
        model.check_pixel_values(self.preprocess([]))  # an empty batch of this preprocessing: fail at load
        self.model = compile_image_path(model.eval()) if compile else model.eval()
        self.image_processor = image_processor
        if not 0.0 <= unsure_margin < 0.5:
            raise ValueError(f"unsure_margin must lie in [0, 0.5), got {unsure_margin}")
        self.unsure_margin = unsure_margin

    @classmethod
    def from_pretrained(cls, name_or_path, device=None, dtype=None, **options):
        """Loads the model (safetensors only) and its image processor from a folder or Hub id."""
        model = MiraGeForImageClassification.from_pretrained(
            name_or_path, dtype=dtype or torch.float32, use_safetensors=True
        )
        model.to(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        return cls(model, AutoImageProcessor.from_pretrained(name_or_path), **options)

    @property
    def threshold(self) -> float:
        return self.model.config.decision_threshold

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def p_fake(self, images) -> np.ndarray:
        """The model's calibrated p(fake) (`MiraGeOutput.p_fake`, float32) for a list of RGB PIL images (one batch)."""
        return self.p_fake_from_pixels(self.preprocess(list(images)))

    def p_fake_from_pixels(self, pixel_values: torch.Tensor) -> np.ndarray:
        """Calibrated p(fake) for a batch already preprocessed by `self.preprocess` (as DataLoader workers do)."""
        pixel_values = pixel_values.to(self.device, self.model.dtype)
        with torch.inference_mode():
            return self.model(pixel_values=pixel_values).p_fake.cpu().numpy()

    def verdict(self, p_fake: float, threshold: float | None = None) -> Verdict:
        """The label at `threshold` (default: the model's calibrated one), "unsure" within the margin."""
        threshold = self.threshold if threshold is None else threshold
        return Verdict(verdict_label(p_fake, threshold, self.unsure_margin), float(p_fake))

    def __call__(self, images) -> list[Verdict]:
        return [self.verdict(p) for p in self.p_fake(images)]

"""Scoring images with a trained detector: the one code path behind the CLI, the Space and evaluation users.

`Detector` loads a MiraGe model folder or Hub id with its image processor and returns, per image, the
calibrated probability of "fake" (`MiraGeOutput.p_fake`) and the verdict at the model's
calibrated threshold, with an optional "unsure" band around it. It scores through a `mirage_hf.scoring` scorer:
PyTorch (`"torch"`, the default) or ONNX Runtime on the graphs `mirage-export-onnx` writes (`"onnx"` fp32,
`"onnx-int8"` quantized), with the same preprocessing, verdicts and unsure band; explanation maps need
gradients, hence the torch backend.
"""

import os
from dataclasses import dataclass

import numpy as np
import torch
from transformers.models.auto.image_processing_auto import AutoImageProcessor  # top-level: torchvision-only in 5.17

from .modeling_mirage import FAKE_FROM, MiraGeForImageClassification
from .scoring import as_scorer, load_scorer
from .stability import SCORES_PER_INPUT, agreement, with_copies
from .transforms import open_image, scoring_preprocessor


@dataclass
class Verdict:
    label: str
    """"real", "fake", or "unsure" when p(fake) lies within the unsure band around the threshold (or, with
    stability, when degraded copies fall on the other side of it)."""
    p_fake: float
    spread: float | None = None
    """With stability: max - min of p(fake) over the input and its degraded copies (`mirage_hf.stability`)."""
    stable: bool | None = None
    """With stability: whether the input and its copies fall on one side of the threshold (else "unsure")."""


def verdict_label(p_fake: float, threshold: float, unsure_margin: float = 0.0) -> str:
    """ "unsure" within `unsure_margin` of the threshold (scores there flip under resizing or compression)."""
    if abs(p_fake - threshold) < unsure_margin:
        return "unsure"
    return "fake" if p_fake >= threshold else "real"


DEFAULT_UNSURE_MARGIN = 0.05  # mirage-detect's and the Space's band around the threshold


def check_unsure_margin(unsure_margin: float) -> float:
    """`unsure_margin` if it is a usable band half-width, [0, 0.5); ValueError otherwise (the CLI's too)."""
    if not 0.0 <= unsure_margin < 0.5:
        raise ValueError(f"unsure_margin must lie in [0, 0.5), got {unsure_margin}")
    return unsure_margin


def _opened(images) -> list:
    """`images` with each file path (str or os.PathLike) opened as `pipeline()` opens it: upright RGB, or
    ImageLoadError naming the file (missing, not an image, corrupt)."""
    return [open_image(image) if isinstance(image, (str, os.PathLike)) else image for image in images]


class Detector:
    def __init__(self, model, image_processor, preprocess: str | None = None, unsure_margin: float = 0.0):
        """`model`: a scorer (`mirage_hf.scoring.load_scorer`: a `TorchScorer` or an `OnnxModel`) or a MiraGe
        model, scored with PyTorch. `preprocess` None uses the mode the model was calibrated with
        (`model.config.preprocess`)."""
        self.scorer = as_scorer(model)
        if self.backend == "torch":
            self.model.eval()  # explanation maps run the model itself, and expect eval mode
        self.preprocess = scoring_preprocessor(image_processor, self.scorer.config, preprocess)
        MiraGeForImageClassification.check_pixel_values(self.scorer, self.preprocess([]))  # empty batch: fail at load
        self.image_processor = image_processor
        self.unsure_margin = check_unsure_margin(unsure_margin)

    @classmethod
    def from_pretrained(
        cls, name_or_path, device=None, dtype=None, backend: str = "torch", compile: bool = False, **options
    ):
        """Loads the model (safetensors only, or an exported ONNX graph) and its image processor from a folder or
        Hub id. `backend`: "torch", "onnx" (fp32 graph) or "onnx-int8" (quantized graph); `compile`:
        `torch.compile` the image encoder (torch only)."""
        scorer = load_scorer(name_or_path, backend, device=device, dtype=dtype, compile=compile)
        return cls(scorer, AutoImageProcessor.from_pretrained(name_or_path), **options)

    @property
    def backend(self) -> str:
        return self.scorer.backend

    @property
    def model(self):
        """What scores: the MiraGe model (torch backend) or the `OnnxModel`."""
        return self.scorer.model if self.backend == "torch" else self.scorer

    @property
    def threshold(self) -> float:
        """Where the verdict flips on the reported p(fake): 0.5 for every model, whose fitted threshold is folded
        into p(fake) (`modeling_mirage.calibrate_logits`)."""
        return FAKE_FROM

    @property
    def device(self) -> torch.device:
        """Where the pixel values go (the CPU for ONNX Runtime, which copies them to its provider itself)."""
        return self.scorer.device

    def p_fake(self, images) -> np.ndarray:
        """The model's calibrated p(fake) (`MiraGeOutput.p_fake`) for a list of RGB PIL images or file paths (one
        batch)."""
        return self.p_fake_from_pixels(self.preprocess(_opened(images)))

    def p_fake_from_pixels(self, pixel_values: torch.Tensor) -> np.ndarray:
        """Calibrated p(fake) for a batch already preprocessed by `self.preprocess` (as DataLoader workers do)."""
        return self.scorer(pixel_values)["p_fake"]

    def verdict(self, p_fake: float, threshold: float | None = None, copies=None) -> Verdict:
        """The label at `threshold` (default: the model's calibrated one), "unsure" within the margin, and with
        the p(fake) of the input's degraded `copies` also "unsure" when they fall on the other side."""
        threshold = self.threshold if threshold is None else threshold
        label = verdict_label(p_fake, threshold, self.unsure_margin)
        if copies is None:
            return Verdict(label, float(p_fake))
        stable, spread = agreement([p_fake, *copies], threshold)
        return Verdict(label if stable else "unsure", float(p_fake), spread, stable)

    def scores(self, images, stability: bool = False) -> np.ndarray:
        """p(fake) per RGB PIL image or file path as a column, (n, 1); with `stability` each row also holds its
        degraded copies' p(fake), (n, 1 + len(STABILITY_COPIES))."""
        if not stability:
            return self.p_fake(images).reshape(-1, 1)
        return self.p_fake(with_copies(_opened(images))).reshape(-1, SCORES_PER_INPUT)

    def verdicts(self, scores: np.ndarray, threshold: float | None = None) -> list[Verdict]:
        """The verdict of each row of `scores` (as `scores` returns them: the input, then any copies)."""
        return [self.verdict(row[0], threshold, row[1:] if len(row) > 1 else None) for row in scores]

    def __call__(self, images, stability: bool = False, threshold: float | None = None) -> list[Verdict]:
        """Verdicts for a list of RGB PIL images or file paths; `stability` also scores each one's degraded
        copies."""
        return self.verdicts(self.scores(images, stability), threshold)

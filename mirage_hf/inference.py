"""Scoring images with a trained detector: the one code path behind the CLI, the Space and evaluation users.

`Detector` loads a MiraGe model folder or Hub id with its image processor and returns, per image, the
calibrated probability of "fake" (`MiraGeOutput.p_fake`) and the verdict at the model's
calibrated threshold, with an optional "unsure" band around it. The backend is PyTorch (`"torch"`, the default)
or ONNX Runtime on the graphs `mirage-export-onnx` writes (`"onnx"` fp32, `"onnx-int8"` quantized), with the same
preprocessing, verdicts and unsure band; explanation maps need gradients, hence the torch backend.
"""

import json
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn
from transformers.models.auto.image_processing_auto import AutoImageProcessor  # top-level: torchvision-only in 5.17
from transformers.utils import cached_file

from .configuration_mirage import MiraGeConfig
from .modeling_mirage import MiraGeForImageClassification
from .onnx_export import BACKENDS, INFO_FILE, ONNX_DIR, ONNX_FILES, check_calibration, session
from .stability import SCORES_PER_INPUT, agreement, with_copies
from .transforms import Preprocessor


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


def compile_image_path(model):
    """Opt-in `torch.compile` of the image encoder (the per-image work; the cached anchors stay eager)."""
    model.encode_image = torch.compile(model.encode_image, dynamic=True)
    return model


def torch_p_fake(model, pixel_values: torch.Tensor) -> np.ndarray:
    """The torch backend's calibrated p(fake) for preprocessed pixel values."""
    with torch.inference_mode():
        return model(pixel_values=pixel_values.to(model.device, model.dtype)).p_fake.cpu().numpy()


class OnnxModel(nn.Module):
    """A graph exported by `mirage-export-onnx`, run by ONNX Runtime, with the config of the model it came from.

    A module without parameters, so evaluation code can switch it to eval mode like the model it replaces.
    """

    def __init__(self, path, config: MiraGeConfig, backend: str = "onnx", providers=None):
        super().__init__()
        self.session, self.config, self.backend = session(path, providers), config, backend

    @classmethod
    def from_pretrained(cls, name_or_path, backend: str = "onnx", providers=None):
        """Loads `onnx/model.onnx` ("onnx") or `onnx/model_quantized.onnx` ("onnx-int8") from a folder or Hub id."""
        config = MiraGeConfig.from_pretrained(name_or_path)
        paths = {}
        for name in (ONNX_FILES[backend], INFO_FILE):
            paths[name] = cached_file(name_or_path, f"{ONNX_DIR}/{name}", _raise_exceptions_for_missing_entries=False)
            if paths[name] is None:
                raise FileNotFoundError(
                    f"{name_or_path} has no {ONNX_DIR}/{name} (backend {backend!r}); write it with "
                    f"`mirage-export-onnx {name_or_path}`, or use backend 'torch'"
                )
        with open(paths[INFO_FILE]) as handle:
            check_calibration(json.load(handle), config)
        return cls(paths[ONNX_FILES[backend]], config, backend, providers)

    def forward(self, pixel_values: torch.Tensor) -> dict[str, np.ndarray]:
        """The graph's outputs (logits, logit_diff, p_fake) by name, for preprocessed pixel values."""
        names = [output.name for output in self.session.get_outputs()]
        values = self.session.run(names, {"pixel_values": pixel_values.float().cpu().numpy()})
        return dict(zip(names, values))


def onnx_providers(device) -> list[str] | None:
    """ONNX Runtime providers for a torch-style device name (None: CUDA where available, else CPU)."""
    if device is None:
        return None
    if torch.device(device).type == "cuda":
        return ["CUDAExecutionProvider"]
    if torch.device(device).type == "cpu":
        return ["CPUExecutionProvider"]
    raise ValueError(f"the ONNX backends run on cpu or cuda, not {device!r}")


class Detector:
    def __init__(
        self, model, image_processor, preprocess: str | None = None, unsure_margin: float = 0.0, compile: bool = False
    ):
        """`model`: a MiraGe model (the torch backend) or an `OnnxModel`. `preprocess` None uses the mode the model
        was calibrated with (`model.config.preprocess`)."""
        self.backend = model.backend if isinstance(model, OnnxModel) else "torch"
        if compile and self.backend != "torch":
            raise ValueError(f"compile applies to the torch backend, not {self.backend!r}")
        self.preprocess = Preprocessor(image_processor, preprocess or model.config.preprocess)
        MiraGeForImageClassification.check_pixel_values(model, self.preprocess([]))  # empty batch: fail at load
        if self.backend == "torch":
            model = compile_image_path(model.eval()) if compile else model.eval()
        self.model = model
        self.image_processor = image_processor
        if not 0.0 <= unsure_margin < 0.5:
            raise ValueError(f"unsure_margin must lie in [0, 0.5), got {unsure_margin}")
        self.unsure_margin = unsure_margin

    @classmethod
    def from_pretrained(cls, name_or_path, device=None, dtype=None, backend: str = "torch", **options):
        """Loads the model (safetensors only, or an exported ONNX graph) and its image processor from a folder or
        Hub id. `backend`: "torch", "onnx" (fp32 graph) or "onnx-int8" (quantized graph)."""
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
        if backend != "torch":
            if dtype not in (None, torch.float32):
                raise ValueError(f"the {backend} backend computes in the graph's own precision; leave dtype unset")
            model = OnnxModel.from_pretrained(name_or_path, backend, onnx_providers(device))
            return cls(model, AutoImageProcessor.from_pretrained(name_or_path), **options)
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
        """Where the pixel values go (the CPU for ONNX Runtime, which copies them to its provider itself)."""
        return torch.device("cpu") if self.backend != "torch" else next(self.model.parameters()).device

    def p_fake(self, images) -> np.ndarray:
        """The model's calibrated p(fake) (`MiraGeOutput.p_fake`) for a list of RGB PIL images (one batch)."""
        return self.p_fake_from_pixels(self.preprocess(list(images)))

    def p_fake_from_pixels(self, pixel_values: torch.Tensor) -> np.ndarray:
        """Calibrated p(fake) for a batch already preprocessed by `self.preprocess` (as DataLoader workers do)."""
        if self.backend != "torch":
            return self.model(pixel_values)["p_fake"]
        return torch_p_fake(self.model, pixel_values)

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
        """p(fake) per RGB PIL image as a column, (n, 1); with `stability` each row also holds its degraded
        copies' p(fake), (n, 1 + len(STABILITY_COPIES))."""
        if not stability:
            return self.p_fake(images).reshape(-1, 1)
        return self.p_fake(with_copies(images)).reshape(-1, SCORES_PER_INPUT)

    def verdicts(self, scores: np.ndarray, threshold: float | None = None) -> list[Verdict]:
        """The verdict of each row of `scores` (as `scores` returns them: the input, then any copies)."""
        return [self.verdict(row[0], threshold, row[1:] if len(row) > 1 else None) for row in scores]

    def __call__(self, images, stability: bool = False, threshold: float | None = None) -> list[Verdict]:
        """Verdicts for a list of RGB PIL images; `stability` also scores each one's degraded copies."""
        return self.verdicts(self.scores(images, stability), threshold)

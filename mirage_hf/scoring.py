"""One scorer interface over the backends: preprocessed pixel values in, the model's calibrated outputs out.

A scorer has a `backend` ("torch", "onnx" or "onnx-int8"), the `config` of the model it scores with, a `device`
for the pixel values, and is called on a `(B, 3, S, S)` batch to give the output fields `SCORE_FIELDS` as numpy
arrays. `TorchScorer` runs a MiraGe model, `mirage_hf.onnx_runtime.OnnxModel` an exported graph; `Detector` and
`evaluation.predict` score through this interface alone, and `check_backend_options` is the one place that says
which options a backend cannot honour.
"""

import os

import numpy as np
import torch
from huggingface_hub.utils import HFValidationError, validate_repo_id
from transformers import AutoModelForImageClassification

from .onnx_runtime import ONNX_FILES, OnnxModel, onnx_providers
from .parameters import mirage_core

BACKENDS = ("torch", *ONNX_FILES)  # what scores images: PyTorch, or ONNX Runtime on one of the exported graphs
SCORE_FIELDS = ("logits", "logit_diff", "p_fake")  # the calibrated outputs (`MiraGeOutput`) every scorer returns


def check_backend_options(backend: str, dtype=None, compile: bool = False, explain: bool = False) -> None:
    """ValueError naming the option `backend` cannot honour: ONNX Runtime runs the exported graph in its own
    precision, without torch.compile or the gradients that explanation maps need."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {', '.join(BACKENDS)}, got {backend!r}")
    if backend == "torch":
        return
    for option, given in (("explain", explain), ("compile", compile)):
        if given:
            raise ValueError(
                f"{option} needs the PyTorch model (gradients, torch.compile): use the torch backend, not {backend!r}"
            )
    if dtype not in (None, torch.float32, "float32"):
        raise ValueError(f"dtype: the {backend} backend computes in the exported graph's own precision")


def compile_image_path(model):
    """Opt-in `torch.compile` of the image encoder (the per-image work; the cached anchors stay eager)."""
    model.encode_image = torch.compile(model.encode_image, dynamic=True)
    return model


class TorchScorer:
    """A MiraGe model (inside any training wrapper: DDP, PEFT, torch.compile) as a scorer.

    Scores in eval mode without gradients and leaves the model in the mode it found it, so evaluation in the middle
    of training scores what the exported model will.
    """

    backend = "torch"

    def __init__(self, model, compile: bool = False):
        self.model = mirage_core(model)
        if compile:
            compile_image_path(self.model)

    @property
    def config(self):
        return self.model.config

    @property
    def device(self) -> torch.device:
        return self.model.device

    def __call__(self, pixel_values: torch.Tensor) -> dict[str, np.ndarray]:
        training = self.model.training
        self.model.eval()
        try:
            with torch.inference_mode():
                output = self.model(pixel_values=pixel_values.to(self.device, self.model.dtype))
        finally:
            self.model.train(training)
        return {name: output[name].float().cpu().numpy() for name in SCORE_FIELDS}


def as_scorer(model):
    """`model` as a scorer: a scorer as it is, a MiraGe model (inside any training wrapper) as a `TorchScorer`."""
    return model if isinstance(model, (TorchScorer, OnnxModel)) else TorchScorer(model)


class ModelNotFound(FileNotFoundError):
    """A detector named by a path that is not a folder here and cannot be a Hub id either."""


def check_model_name(name_or_path) -> None:
    """Raises `ModelNotFound` for a name that is neither a folder nor shaped like a Hub id, before the Hub is asked
    (which would answer "Repo id must be in the form ...")."""
    if os.path.isdir(name_or_path):
        return
    try:
        validate_repo_id(str(name_or_path))
    except HFValidationError:
        raise ModelNotFound(f"no model folder {str(name_or_path)!r} (and the name is not a Hub id)") from None


def load_scorer(name_or_path, backend: str = "torch", device=None, dtype=None, compile: bool = False):
    """The scorer for a detector folder or Hub id: its weights (safetensors only) in PyTorch, or one of its exported
    graphs in ONNX Runtime ("onnx" fp32, "onnx-int8" quantized). Default device: CUDA where available, else CPU."""
    check_backend_options(backend, dtype=dtype, compile=compile)
    check_model_name(name_or_path)
    if backend != "torch":
        return OnnxModel.from_pretrained(name_or_path, backend, onnx_providers(device))
    model = AutoModelForImageClassification.from_pretrained(  # a detector, or an adapter on one
        name_or_path, dtype=dtype or torch.float32, use_safetensors=True
    )
    model.to(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    return TorchScorer(model.eval(), compile=compile)

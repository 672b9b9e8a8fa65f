"""The ONNX runtime contract: where `mirage-export-onnx` puts its graphs, and how ONNX Runtime scores with them.

`OnnxModel` runs `onnx/model.onnx` (fp32) or `onnx/model_quantized.onnx` (int8) of a detector folder or Hub id and
returns the graph's outputs (`logits`, `logit_diff`, `p_fake`) for preprocessed pixel values; it is one of the two
scorers of `mirage_hf.scoring`. Only onnxruntime is needed here; writing the graphs is `mirage_hf.onnx_export`.
"""

import importlib
import json
import math

import numpy as np
import torch
from transformers.utils import cached_file

from .adapter_config import load_detector_config
from .configuration_mirage import MiraGeConfig

ONNX_DIR = "onnx"
ONNX_FILES = {"onnx": "model.onnx", "onnx-int8": "model_quantized.onnx"}  # backend -> file in ONNX_DIR
INFO_FILE = "export_info.json"


def require_onnx(purpose: str, modules=("onnx", "onnxruntime", "onnxscript")):
    """Imports the optional ONNX packages `purpose` needs and returns onnxruntime, or says how to install them."""
    try:
        for name in modules:
            importlib.import_module(name)
    except ImportError as error:
        raise ImportError(
            f"{purpose} needs the optional ONNX dependencies ({error.name or name} is missing): "
            "pip install 'mirage-hf[onnx]'"
        ) from error
    return importlib.import_module("onnxruntime")


def session(path, providers=None):
    """An ONNX Runtime session on `path`; default providers: CUDA where this onnxruntime has it, else CPU."""
    ort = require_onnx("The ONNX backends", modules=("onnxruntime",))
    available = ort.get_available_providers()
    providers = providers or [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in available]
    return ort.InferenceSession(str(path), providers=providers)


def onnx_providers(device) -> list[str] | None:
    """ONNX Runtime providers for a torch-style device name (None: CUDA where available, else CPU)."""
    if device is None:
        return None
    if torch.device(device).type == "cuda":
        return ["CUDAExecutionProvider"]
    if torch.device(device).type == "cpu":
        return ["CPUExecutionProvider"]
    raise ValueError(f"the ONNX backends run on cpu or cuda, not {device!r}")


def check_calibration(info: dict, config) -> None:
    """ValueError when the config's temperature or threshold is not the one folded into the exported graph."""
    stored = (info["calibration_temperature"], info["decision_threshold"])
    current = (config.calibration_temperature, config.decision_threshold)
    if not all(math.isclose(a, b, rel_tol=1e-9) for a, b in zip(stored, current)):
        raise ValueError(
            f"the ONNX graphs were exported with temperature {stored[0]:.4g} and threshold {stored[1]:.4g}, but the "
            f"config now has {current[0]:.4g} and {current[1]:.4g}: export again with mirage-export-onnx"
        )


class OnnxModel:
    """A graph exported by `mirage-export-onnx`, run by ONNX Runtime, with the config of the model it came from."""

    def __init__(self, path, config: MiraGeConfig, backend: str = "onnx", providers=None):
        self.session, self.config, self.backend = session(path, providers), config, backend

    @classmethod
    def from_pretrained(cls, name_or_path, backend: str = "onnx", providers=None):
        """Loads `onnx/model.onnx` ("onnx") or `onnx/model_quantized.onnx` ("onnx-int8") from a folder or Hub id."""
        config = load_detector_config(name_or_path)  # a detector's, or the adapted one of an adapter
        config.name_or_path = str(name_or_path)  # as a PyTorch model's: what it was loaded as (the Space names it)
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

    @property
    def device(self) -> torch.device:
        """Where the pixel values go: the CPU (ONNX Runtime copies them to its provider itself)."""
        return torch.device("cpu")

    def __call__(self, pixel_values: torch.Tensor) -> dict[str, np.ndarray]:
        """The graph's outputs (logits, logit_diff, p_fake) by name, for preprocessed pixel values."""
        names = [output.name for output in self.session.get_outputs()]
        values = self.session.run(names, {"pixel_values": pixel_values.float().cpu().numpy()})
        return dict(zip(names, values))

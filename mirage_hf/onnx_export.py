"""ONNX export of a detector folder, for CPU deployment with ONNX Runtime (`mirage-export-onnx MODEL_DIR`).

Writes `MODEL_DIR/onnx/model.onnx` (fp32) and `MODEL_DIR/onnx/model_quantized.onnx` (int8 weights, dynamic
quantization), the layout the Hub's ONNX users expect, plus `export_info.json` (opset, exporter, versions, the
calibration folded in, and the measured difference of each graph from PyTorch). The graph is the eval path: input
`pixel_values` (batch, 3, S, S) with a dynamic batch axis; outputs `logits` (the model's calibrated logits),
`logit_diff` (uncalibrated fake - real, the ranking score) and `p_fake` (the calibrated probability of fake). The
text anchors and vision prompts are folded in as constants, so the text tower is not in the graph. The folder is
written beside its target and renamed over it, so a reader never sees half an export.

    mirage-export-onnx outputs/demo/model
"""

import argparse
import importlib
import json
import logging
import sys
import warnings
from contextlib import contextmanager
from pathlib import Path

import torch
from torch import nn

from . import __version__
from .atomic import atomic_write
from .onnx_runtime import INFO_FILE, ONNX_DIR, ONNX_FILES, OnnxModel, require_onnx
from .scoring import SCORE_FIELDS, TorchScorer

OPSET = 18
FP32_TOLERANCE = 1e-4  # max |p(fake) difference| from PyTorch that an fp32 export may have


class CalibratedEvalPath(nn.Module):
    """The model's own `forward` in eval mode, as the graph's three outputs; traced inside `frozen_anchors`, so
    that its text anchors and vision prompts enter the graph as constants."""

    def __init__(self, model):
        super().__init__()
        self.model = model.eval()

    def forward(self, pixel_values):
        output = self.model(pixel_values=pixel_values, return_dict=True)
        return tuple(output[name] for name in SCORE_FIELDS)


@contextmanager
def frozen_anchors(model):
    """Within the block `model.prompts_and_anchors()` returns constants, so tracing never enters the text tower."""
    with torch.no_grad():
        constants = model.eval().prompts_and_anchors()
    model.prompts_and_anchors = lambda: constants
    try:
        yield model
    finally:
        del model.prompts_and_anchors


def export_graph(model, path, opset: int = OPSET) -> None:
    """Writes the fp32 eval graph of a (float32) MiraGe model to `path`, as one self-contained file."""
    require_onnx("ONNX export")
    vision = model.config.clip_config.vision_config
    example = torch.zeros(2, vision.num_channels, vision.image_size, vision.image_size)
    with torch.no_grad(), frozen_anchors(model):
        torch.onnx.export(
            CalibratedEvalPath(model).eval(),
            (example,),
            str(path),
            input_names=["pixel_values"],
            output_names=list(SCORE_FIELDS),
            opset_version=opset,
            dynamo=True,
            dynamic_shapes={"pixel_values": {0: torch.export.Dim("batch")}},
            external_data=False,
            verbose=False,
        )


def quantize_graph(source, target) -> dict:
    """Dynamic int8 quantization of the weights (activations quantized on the fly); returns its settings."""
    require_onnx("ONNX quantization")
    from onnxruntime.quantization import QuantType, quantize_dynamic

    settings = {"method": "onnxruntime.quantization.quantize_dynamic", "weight_type": "QInt8", "per_channel": True}
    quantize_dynamic(str(source), str(target), weight_type=QuantType.QInt8, per_channel=True)
    return settings


def _max_p_fake_difference(model, path, pixel_values) -> float:
    """The largest |p(fake)| difference between the graph at `path` (on CPU) and the PyTorch model."""
    reference = TorchScorer(model)(pixel_values)["p_fake"]
    graph = OnnxModel(path, model.config, providers=["CPUExecutionProvider"])
    return float(abs(graph(pixel_values)["p_fake"] - reference).max())


def _write_graphs(model, folder: Path, probe, opset: int, quantize: bool) -> dict:
    """Writes the graphs into `folder` and returns what export_info.json records about them."""
    ort, onnx, onnxscript = (importlib.import_module(name) for name in ("onnxruntime", "onnx", "onnxscript"))
    vision = model.config.clip_config.vision_config
    export_graph(model, folder / ONNX_FILES["onnx"], opset)
    differences = {"onnx": _max_p_fake_difference(model, folder / ONNX_FILES["onnx"], probe)}
    if differences["onnx"] > FP32_TOLERANCE:
        raise RuntimeError(
            f"the exported fp32 graph differs from PyTorch by {differences['onnx']:.2e} in p(fake) "
            f"(> {FP32_TOLERANCE}); not written"
        )
    quantization = None
    if quantize:
        quantization = quantize_graph(folder / ONNX_FILES["onnx"], folder / ONNX_FILES["onnx-int8"])
        differences["onnx-int8"] = _max_p_fake_difference(model, folder / ONNX_FILES["onnx-int8"], probe)
    return {
        "files": {backend: name for backend, name in ONNX_FILES.items() if (folder / name).exists()},
        "opset": opset,
        "exporter": "torch.onnx.export(dynamo=True)",
        "versions": {
            "mirage_hf": __version__,
            "torch": torch.__version__,
            "onnx": onnx.__version__,
            "onnxscript": onnxscript.__version__,
            "onnxruntime": ort.__version__,
        },
        "inputs": {"pixel_values": ["batch", vision.num_channels, vision.image_size, vision.image_size]},
        "outputs": {
            "logits": ["batch", 2],
            "logit_diff": ["batch"],
            "p_fake": ["batch"],
        },
        "calibration_temperature": model.config.calibration_temperature,
        "decision_threshold": model.config.decision_threshold,
        "quantization": quantization,
        "max_abs_p_fake_difference_from_pytorch_on_random_pixels": differences,
    }


def export_onnx(model_dir, opset: int = OPSET, quantize: bool = True) -> Path:
    """Exports the detector folder `model_dir` to `model_dir/onnx/` and returns that folder.

    Each graph is run once in ONNX Runtime against PyTorch on random pixels; the differences go into
    export_info.json, and an fp32 graph that differs by more than FP32_TOLERANCE is refused.
    """
    require_onnx("ONNX export")
    from transformers import AutoModelForImageClassification

    model_dir = Path(model_dir)
    if not (model_dir / "config.json").is_file():
        raise FileNotFoundError(f"{model_dir} is not a detector folder (no config.json); export it with train.py")
    model = AutoModelForImageClassification.from_pretrained(model_dir, dtype=torch.float32, use_safetensors=True)
    model.eval()  # a detector, or an adapter on one
    vision = model.config.clip_config.vision_config
    probe = torch.randn(3, vision.num_channels, vision.image_size, vision.image_size, generator=torch.Generator())

    with atomic_write(model_dir / ONNX_DIR) as staging:
        staging.mkdir()
        info = _write_graphs(model, staging, probe, opset, quantize)
        (staging / INFO_FILE).write_text(json.dumps(info, indent=2) + "\n")
    return model_dir / ONNX_DIR


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mirage-export-onnx",
        description="Export a MiraGe detector folder to ONNX: MODEL_DIR/onnx/model.onnx (fp32) and "
        "model_quantized.onnx (int8), for ONNX Runtime.",
    )
    parser.add_argument("model_dir", metavar="MODEL_DIR", help="a detector folder (e.g. outputs/demo/model)")
    parser.add_argument("--opset", type=int, default=OPSET, help=f"ONNX opset (default {OPSET})")
    parser.add_argument("--no_quantize", action="store_true", help="write only the fp32 graph")
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # the libraries' progress bars and advice are noise in a command-line tool
    logging.disable(logging.WARNING)
    warnings.simplefilter("ignore", FutureWarning)
    try:
        folder = export_onnx(args.model_dir, opset=args.opset, quantize=not args.no_quantize)
    except (ImportError, OSError, ValueError, RuntimeError) as error:
        print(f"mirage-export-onnx: {error}", file=sys.stderr)
        return 1
    finally:
        logging.disable(logging.NOTSET)
    info = json.loads((folder / INFO_FILE).read_text())
    for backend, name in info["files"].items():
        difference = info["max_abs_p_fake_difference_from_pytorch_on_random_pixels"][backend]
        print(f"{folder / name}  (max |p(fake) - PyTorch| on random pixels: {difference:.2e})")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Export a detector as a self-sufficient model folder, atomically.

The folder holds what `pipeline("image-classification", model=folder)` needs (weights as safetensors,
config with `auto_map`, the remote-code files, the image processor set to the model's `config.preprocess`) and
optionally its evaluation results (`EVAL_RESULTS_FILE`).
It is written beside the target and renamed over it, so a reader never sees half a model.
"""

import copy
import json
from pathlib import Path

from accelerate.utils import extract_model_from_parallel

from .atomic import atomic_write
from .modeling_mirage import MiraGeModel
from .parameters import mirage_core
from .transforms import image_processor_for

EVAL_RESULTS_FILE = "eval_results.json"  # the results a model folder (and a training run's folder) holds
BACKEND_EVAL_RESULTS_FILE = "eval_results_{backend}.json"  # what `mirage-eval --backend ...` measured, in ONNX_DIR


def mergeable_copy(model) -> MiraGeModel:
    """A plain MiraGe model to save: LoRA merged into CLIP on a copy, so training can go on."""
    model = extract_model_from_parallel(model, keep_torch_compile=False)
    if hasattr(model, "merge_and_unload"):
        return copy.deepcopy(model).merge_and_unload()
    return mirage_core(model)


def export_model(model, image_processor, output_dir, eval_results: dict | None = None) -> Path:
    """Writes the model folder atomically (temporary sibling, then rename) and returns its path.

    `image_processor` is the CLIP's; the folder gets it configured for the model's `config.preprocess`, so that
    plain `pipeline()` sees the pixels the model was evaluated and calibrated on."""
    output_dir = Path(output_dir)
    model = mergeable_copy(model)
    with atomic_write(output_dir) as staging:
        model.save_pretrained(staging)
        image_processor_for(image_processor, model.config.preprocess).save_pretrained(staging)
        if eval_results is not None:
            (staging / EVAL_RESULTS_FILE).write_text(json.dumps(eval_results, indent=2, allow_nan=False) + "\n")
    return output_dir

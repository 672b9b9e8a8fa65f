"""Prompt-only adapters, PEFT-style: the trainable weights (prompts and couplings, or the linear head) as
safetensors, plus a JSON file with the settings and the base CLIP needed to rebuild the full model.

The file I/O lives here, not in `modeling_mirage.py`, because that file ships to the Hub as remote code and holds
the model only. `mirage_hf.extensions` attaches these functions to the model classes, so users call
`model.save_adapter(dir)` and `MiraGeForImageClassification.from_adapter(dir)`.
"""

import json
import os

from safetensors.torch import load_file, save_file

from .atomic import atomic_write
from .configuration_mirage import MiraGeConfig

ADAPTER_CONFIG_NAME = "mirage_adapter_config.json"
ADAPTER_WEIGHTS_NAME = "mirage_adapter.safetensors"


def save_adapter(model, save_directory) -> None:
    """Writes only the trainable weights (safetensors) and the settings needed to rebuild the model."""
    trainable = {name for name, param in model.named_parameters() if param.requires_grad}
    state = {name: tensor.detach().contiguous() for name, tensor in model.state_dict().items() if name in trainable}
    own_fields = set(MiraGeConfig.__annotations__) - {"clip_config", "clip_name_or_path"}
    adapter_config = {
        "base_model_name_or_path": model.config.clip_name_or_path,
        "model_class": type(model).__name__,
        "mirage_config": {key: getattr(model.config, key) for key in sorted(own_fields)},
    }
    os.makedirs(save_directory, exist_ok=True)
    with atomic_write(os.path.join(save_directory, ADAPTER_WEIGHTS_NAME)) as staging:
        save_file(state, staging)
    with atomic_write(os.path.join(save_directory, ADAPTER_CONFIG_NAME)) as staging:
        staging.write_text(json.dumps(adapter_config, indent=2, sort_keys=True) + "\n")


def from_adapter(cls, adapter_directory, base_model=None, **kwargs):
    """Rebuilds a `cls` model from `save_adapter` output on top of its base CLIP (or `base_model`)."""
    with open(os.path.join(adapter_directory, ADAPTER_CONFIG_NAME)) as handle:
        adapter_config = json.load(handle)
    base_model = base_model or adapter_config["base_model_name_or_path"]
    if base_model is None:
        raise ValueError("The adapter does not name its base CLIP; pass base_model=<Hub id or folder>.")
    model = cls.from_clip(base_model, **adapter_config["mirage_config"], **kwargs)
    state = load_file(os.path.join(adapter_directory, ADAPTER_WEIGHTS_NAME))
    _, unexpected = model.load_state_dict(state, strict=False)
    trainable = {name for name, param in model.named_parameters() if param.requires_grad}
    if unexpected or trainable - state.keys():
        raise ValueError(
            f"The adapter in {adapter_directory!r} does not match the model it describes: "
            f"unexpected {sorted(unexpected)}, missing {sorted(trainable - state.keys())}"
        )
    return model

"""Optional LoRA on the CLIP layers' projections (attention, as C2P-CLIP does, and MLP), through `peft`.

Deep prompts cannot be expressed as a peft method (its prompt-tuning types are for language models), so the
prompt learner stays a module of the model and rides along in `modules_to_save`: a saved LoRA adapter holds
the LoRA matrices and the trained prompts, and `merge_and_unload()` gives back a plain MiraGe model.
"""

import re

from peft import LoraConfig, PeftModel, get_peft_model
from torch import nn

from .modeling_mirage import MiraGeModel

TOWERS = {"vision": "vision_model", "text": "text_model"}


def mirage_lora_config(
    model: MiraGeModel,
    r: int = 8,
    alpha: int = 16,
    dropout: float = 0.0,
    towers: tuple[str, ...] = ("vision",),
    projections: tuple[str, ...] = ("q_proj", "v_proj"),
) -> LoraConfig:
    """LoRA on exactly the `projections` (attention: q_proj, k_proj, v_proj, out_proj; MLP: fc1, fc2) of every
    layer of the chosen CLIP `towers`; prompts/head stay trainable. A name that matches no module is an error."""
    unknown = set(towers) - set(TOWERS)
    if unknown or not towers:
        raise ValueError(f"lora_towers must be a non-empty subset of {sorted(TOWERS)}, got {list(towers)}")
    tower_pattern = "|".join(TOWERS[tower] for tower in towers)
    layers = rf"(.*\.)?clip\.({tower_pattern})\.encoder\.layers\.\d+\.(self_attn|mlp)\."
    available = {
        name.rsplit(".", 1)[1]
        for name, module in model.named_modules()
        if isinstance(module, nn.Linear) and re.fullmatch(layers + r"\w+", name)
    }
    missing = [name for name in projections if name not in available]
    if missing or not projections:
        raise ValueError(
            f"lora_projections {missing or list(projections)} match no module of the CLIP {'/'.join(towers)} "
            f"layers; choose from {sorted(available)}"
        )
    target = layers + f"({'|'.join(map(re.escape, projections))})"
    trainable_modules = ["prompt_learner"] + (["classifier"] if model.classifier is not None else [])
    return LoraConfig(
        r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=target, modules_to_save=trainable_modules
    )


def add_lora(model: MiraGeModel, **lora_options) -> PeftModel:
    """Wraps `model` in a `PeftModel` with LoRA on CLIP projections (see `mirage_lora_config` for options)."""
    return get_peft_model(model, mirage_lora_config(model, **lora_options))

"""Optional LoRA on the CLIP layers' projections (attention, as C2P-CLIP does, and MLP), through `peft`.

Deep prompts cannot be expressed as a peft method (its prompt-tuning types are for language models), so the
prompt learner stays a module of the model and rides along in `modules_to_save`: a saved LoRA adapter holds
the LoRA matrices and the trained prompts, and `merge_and_unload()` gives back a plain MiraGe model.
"""

import re
import warnings

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
    target_modules: str | None = None,
    save_trainable_modules: bool = True,
) -> LoraConfig:
    """The one LoRA config of the package: LoRA on exactly the `projections` (attention: q_proj, k_proj, v_proj,
    out_proj; MLP: fc1, fc2) of every layer of the chosen CLIP `towers` (a name that matches no module is an error),
    or on `target_modules`, a pattern an adapter recorded. `save_trainable_modules` puts the prompts (and head) in
    peft's `modules_to_save` (training with `add_lora`); adaptation keeps them trainable under their own names."""
    target = target_modules or lora_target_modules(model, towers, projections)
    trainable_modules = ["prompt_learner"] + (["classifier"] if model.classifier is not None else [])
    return LoraConfig(
        r=r,
        lora_alpha=alpha,
        lora_dropout=dropout,
        target_modules=target,
        modules_to_save=trainable_modules if save_trainable_modules else None,
    )


def lora_target_modules(model: MiraGeModel, towers: tuple[str, ...], projections: tuple[str, ...]) -> str:
    """The pattern of the `projections` of every layer of the CLIP `towers`; ValueError for a name matching none."""
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
    return layers + f"({'|'.join(map(re.escape, projections))})"


def add_lora(model: MiraGeModel, **lora_options) -> PeftModel:
    """Wraps `model` in a `PeftModel` with LoRA on CLIP projections (see `mirage_lora_config` for options)."""
    with warnings.catch_warnings():  # peft reads transformers' deprecated is_gradient_checkpointing: not the user's
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing", category=FutureWarning)
        return get_peft_model(model, mirage_lora_config(model, **lora_options))

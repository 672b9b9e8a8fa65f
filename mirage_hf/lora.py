"""Optional LoRA on the CLIP attention projections (as C2P-CLIP does), through `peft`.

Deep prompts cannot be expressed as a peft method (its prompt-tuning types are for language models), so the
prompt learner stays a module of the model and rides along in `modules_to_save`: a saved LoRA adapter holds
the LoRA matrices and the trained prompts, and `merge_and_unload()` gives back a plain MiraGe model.
"""

from peft import LoraConfig, PeftModel, get_peft_model

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
    """LoRA on `projections` of the attention layers of the chosen CLIP `towers`; prompts/head stay trainable."""
    unknown = set(towers) - set(TOWERS)
    if unknown or not towers:
        raise ValueError(f"towers must be a non-empty subset of {sorted(TOWERS)}, got {list(towers)}")
    tower_pattern = "|".join(TOWERS[tower] for tower in towers)
    target = rf".*clip\.({tower_pattern})\.encoder\.layers\.\d+\.self_attn\.({'|'.join(projections)})"
    trainable_modules = ["prompt_learner"] + (["classifier"] if model.classifier is not None else [])
    return LoraConfig(
        r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=target, modules_to_save=trainable_modules
    )


def add_lora(model: MiraGeModel, **lora_options) -> PeftModel:
    """Wraps `model` in a `PeftModel` with LoRA on CLIP attention (see `mirage_lora_config` for options)."""
    return get_peft_model(model, mirage_lora_config(model, **lora_options))

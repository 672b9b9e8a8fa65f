"""Which weights of a model train, and the MiraGe model inside the wrappers training puts around it."""

import torch
from accelerate.utils import extract_model_from_parallel

from .modeling_mirage import MiraGeModel


def trainable_parameters(model: torch.nn.Module) -> dict[str, torch.nn.Parameter]:
    """The parameters that train (`requires_grad`), by name, in the model's order."""
    return {name: param for name, param in model.named_parameters() if param.requires_grad}


def mirage_core(model) -> MiraGeModel:
    """The MiraGe model inside DDP / FSDP / torch.compile (accelerate unwraps those) and PEFT (LoRA stays injected)."""
    model = extract_model_from_parallel(model, keep_torch_compile=False)
    if hasattr(model, "get_base_model"):
        model = model.get_base_model()
    if not isinstance(model, MiraGeModel):
        raise TypeError(f"no MiraGe model inside {type(model).__name__}")
    return model

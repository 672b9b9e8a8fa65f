"""mirage-hf: MiraGe AI-generated image detection on the Hugging Face stack.

Importing the package registers the MiraGe classes with the transformers Auto classes (so `AutoModel`,
`AutoModelForImageClassification` and `pipeline()` find them) and marks them for remote code, so that
`save_pretrained` writes folders that also load with `trust_remote_code=True` where `mirage_hf` is absent. It
also gives the classes the methods that need the package (`from_clip`, `save_adapter`, `from_adapter`; see
`mirage_hf.extensions`), which the remote-code model file does not carry.
"""

from transformers import AutoConfig, AutoModel, AutoModelForImageClassification

from .configuration_mirage import MIRAGE_MODES, MiraGeConfig
from .extensions import attach_package_methods
from .modeling_mirage import (
    MiraGeForImageClassification,
    MiraGeLoss,
    MiraGeMemoryBank,
    MiraGeModel,
    MiraGeOutput,
    MiraGePromptLearner,
)

AutoConfig.register(MiraGeConfig.model_type, MiraGeConfig, exist_ok=True)
AutoModel.register(MiraGeConfig, MiraGeModel, exist_ok=True)
AutoModelForImageClassification.register(MiraGeConfig, MiraGeForImageClassification, exist_ok=True)
MiraGeConfig.register_for_auto_class()
MiraGeModel.register_for_auto_class("AutoModel")
MiraGeForImageClassification.register_for_auto_class("AutoModelForImageClassification")
attach_package_methods(MiraGeModel)

__version__ = "0.1.0"

__all__ = [
    "MIRAGE_MODES",
    "MiraGeConfig",
    "MiraGeForImageClassification",
    "MiraGeLoss",
    "MiraGeMemoryBank",
    "MiraGeModel",
    "MiraGeOutput",
    "MiraGePromptLearner",
]

"""mirage-hf: MiraGe AI-generated image detection on the Hugging Face stack.

Importing the package registers the MiraGe classes with the transformers Auto classes (so `AutoModel`,
`AutoModelForImageClassification` and `pipeline()` find them) and marks them for remote code, so that
`save_pretrained` writes folders that also load with `trust_remote_code=True` where `mirage_hf` is absent. It also
registers the config of adapter folders (`MiraGeAdapterConfig`, written by `mirage-adapt`) with the loaders that
build the base detector with the adapter applied. The model classes are left as `modeling_mirage.py` defines them:
what needs the package is a function of it (`from_clip`, `save_adapter`, `from_adapter`).
"""

from transformers import AutoConfig, AutoModel, AutoModelForImageClassification

from .adapter_config import MiraGeAdapterConfig
from .adapter_files import MiraGeAdapterForImageClassification, MiraGeAdapterModel, from_adapter, save_adapter
from .building import from_clip
from .configuration_mirage import MIRAGE_MODES, MiraGeConfig
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
AutoConfig.register(MiraGeAdapterConfig.model_type, MiraGeAdapterConfig, exist_ok=True)
AutoModel.register(MiraGeAdapterConfig, MiraGeAdapterModel, exist_ok=True)
AutoModelForImageClassification.register(MiraGeAdapterConfig, MiraGeAdapterForImageClassification, exist_ok=True)

__version__ = "0.1.0"

__all__ = [
    "MIRAGE_MODES",
    "MiraGeAdapterConfig",
    "MiraGeConfig",
    "MiraGeForImageClassification",
    "MiraGeLoss",
    "MiraGeMemoryBank",
    "MiraGeModel",
    "MiraGeOutput",
    "MiraGePromptLearner",
    "from_adapter",
    "from_clip",
    "save_adapter",
]

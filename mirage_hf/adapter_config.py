"""The config.json of an adapter on a trained detector (`mirage-adapt`'s output): `MiraGeAdapterConfig`.

Its own `model_type` ("mirage_adapter") lets `AutoConfig` tell an adapter folder from a detector folder, so the
Auto classes and `pipeline()` reach the loader registered for it (`adapter_files.MiraGeAdapterForImageClassification`),
which builds the base detector with the adapter applied, while plain detectors load through transformers' own
`from_pretrained`.
"""

from huggingface_hub.dataclasses import strict
from transformers import AutoConfig, PreTrainedConfig

from .configuration_mirage import MiraGeConfig


@strict
class MiraGeAdapterConfig(PreTrainedConfig):
    r"""
    What an adapter on a trained detector applies to: the base and the adapted detector's config.

    Args:
        base_model_name_or_path (`str`): Hub id or folder of the base detector.
        base_model_revision (`str`, *optional*): the Hub commit its files come from (None for a local folder).
        base_model_sha256 (`str`): one sha256 over its safetensors weights; loading refuses a base with others.
        lora (`dict`, *optional*): `{"r", "alpha", "target_modules"}` of the LoRA adaptation trained, if any.
        detector_config (`dict` or `MiraGeConfig`): the adapted detector's config (its calibration, anchors).
    """

    model_type = "mirage_adapter"
    sub_configs = {"detector_config": MiraGeConfig}

    base_model_name_or_path: str | None = None
    base_model_revision: str | None = None
    base_model_sha256: str | None = None
    lora: dict | None = None
    detector_config: dict | MiraGeConfig | None = None

    def __post_init__(self, **kwargs):
        if not isinstance(self.detector_config, MiraGeConfig):
            self.detector_config = MiraGeConfig.from_dict(self.detector_config or {})
        super().__post_init__(**kwargs)


def load_detector_config(name_or_path, **hub_kwargs) -> MiraGeConfig:
    """The MiraGe config of a detector folder or Hub id, or of an adapter (the adapted detector's)."""
    config = AutoConfig.from_pretrained(name_or_path, **hub_kwargs)
    return config.detector_config if isinstance(config, MiraGeAdapterConfig) else config

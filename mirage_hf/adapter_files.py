"""PEFT-style adapters: the trained weights as safetensors, plus a config naming the base they apply to.

Two kinds:
* on a CLIP (`save_adapter(model, dir)`, `from_adapter(MiraGeForImageClassification, dir)`): the trainable weights
  (prompts and couplings, or the linear head) and, in `mirage_adapter_config.json`, the settings needed to rebuild
  the detector on its base CLIP;
* on a trained detector (`save_detector_adapter`, written by `mirage-adapt`): what adaptation changed (prompts and
  couplings, LoRA matrices where it trained some) and a `config.json` of its own type (`MiraGeAdapterConfig`: the
  base detector's id, revision and weights' sha256, the LoRA settings and the adapted detector's config), next to
  the image processor. `MiraGeAdapterModel` / `MiraGeAdapterForImageClassification`, registered for that config
  with the Auto classes, load such a folder as the base detector with the adapter applied, so `AutoModel*`,
  `pipeline()`, `mirage-detect` and the Space load it like a detector.

The file I/O lives here, not in `modeling_mirage.py`, because that file ships to the Hub as remote code and holds
the model only.
"""

import json
import os
from pathlib import Path

from peft import get_peft_model, set_peft_model_state_dict
from safetensors.torch import load_file, save_file
from transformers.utils import CONFIG_NAME, SAFE_WEIGHTS_INDEX_NAME, SAFE_WEIGHTS_NAME, cached_file
from transformers.utils.hub import extract_commit_hash

from .adapter_config import MiraGeAdapterConfig
from .atomic import atomic_write
from .building import from_clip
from .configuration_mirage import MiraGeConfig
from .file_hashes import sha256_of_files
from .lora import mirage_lora_config
from .modeling_mirage import MiraGeForImageClassification, MiraGeModel
from .parameters import trainable_parameters

ADAPTER_CONFIG_NAME = "mirage_adapter_config.json"
ADAPTER_WEIGHTS_NAME = "mirage_adapter.safetensors"
ADAPT_RESULTS_NAME = "adapt_results.json"  # what `mirage-adapt` measured: before/after tables, guard, options
LORA_PREFIX = "lora."  # LoRA matrices in the weights file, peft's names after this prefix
# What a hub kwarg of the adapter's repo must not carry over to its base's: the base has its own revision.
ADAPTER_REPO_ONLY = ("revision", "subfolder", "_commit_hash", "adapter_kwargs", "trust_remote_code")


def save_adapter(model, save_directory) -> None:
    """Writes only the trainable weights of a model built on a CLIP (safetensors) and the settings needed to
    rebuild it (`from_adapter`)."""
    own_fields = set(MiraGeConfig.__annotations__) - {"clip_config", "clip_name_or_path"}
    adapter_config = {
        "base_model_name_or_path": model.config.clip_name_or_path,
        "model_class": type(model).__name__,
        "mirage_config": {key: getattr(model.config, key) for key in sorted(own_fields)},
    }
    os.makedirs(save_directory, exist_ok=True)
    _write_weights(save_directory, _trained_state(model))
    with atomic_write(os.path.join(save_directory, ADAPTER_CONFIG_NAME)) as staging:
        staging.write_text(json.dumps(adapter_config, indent=2, sort_keys=True) + "\n")


def _trained_state(model) -> dict:
    trainable = trainable_parameters(model).keys()
    return {name: tensor.detach().contiguous() for name, tensor in model.state_dict().items() if name in trainable}


def _write_weights(directory, state: dict) -> None:
    with atomic_write(os.path.join(directory, ADAPTER_WEIGHTS_NAME)) as staging:
        save_file(state, staging)


def from_adapter(model_class, adapter_directory, base_model=None, **kwargs):
    """A `model_class` model (`MiraGeModel` or `MiraGeForImageClassification`) rebuilt from an adapter folder on
    its base (a CLIP, or a trained detector), or on `base_model` instead; an adapter on a detector refuses a base
    whose weights are not the ones it was trained on."""
    if is_detector_adapter(adapter_directory):
        return load_detector_adapter(model_class, adapter_directory, base_model=base_model, **kwargs)
    with open(os.path.join(adapter_directory, ADAPTER_CONFIG_NAME)) as handle:
        adapter_config = json.load(handle)
    base_model = base_model or adapter_config["base_model_name_or_path"]
    if base_model is None:
        raise ValueError("The adapter does not name its base CLIP; pass base_model=<Hub id or folder>.")
    model = from_clip(model_class, base_model, **adapter_config["mirage_config"], **kwargs)
    _load_trained(model, load_file(os.path.join(adapter_directory, ADAPTER_WEIGHTS_NAME)), adapter_directory)
    return model


def _load_trained(model, state: dict, adapter_directory) -> None:
    """Loads an adapter's weights into `model`, which must expect exactly these trainable weights."""
    _, unexpected = model.load_state_dict(state, strict=False)
    missing = trainable_parameters(model).keys() - state.keys()
    if unexpected or missing:
        raise ValueError(
            f"The adapter in {str(adapter_directory)!r} does not match the model it describes: "
            f"unexpected {sorted(unexpected)}, missing {sorted(missing)}"
        )


# ------------------------------------------------------------------------------ adapters on a trained detector


def detector_fingerprint(name_or_path, revision: str | None = None) -> dict:
    """What identifies a trained detector: its id, the Hub commit its files come from (None for a local folder)
    and one sha256 over its safetensors weight files (the shards of an index, in order)."""
    name_or_path = str(name_or_path)
    options = {"revision": revision, "_raise_exceptions_for_missing_entries": False}
    index = cached_file(name_or_path, SAFE_WEIGHTS_INDEX_NAME, **options)
    if index:
        with open(index) as handle:
            shards = sorted(set(json.load(handle)["weight_map"].values()))
        files = [cached_file(name_or_path, shard, revision=revision) for shard in shards]
    else:
        files = [cached_file(name_or_path, SAFE_WEIGHTS_NAME, revision=revision)]
    return {
        "name_or_path": name_or_path,
        "revision": extract_commit_hash(files[0], None),
        "sha256": sha256_of_files(files),
    }


def save_detector_adapter(model, base: dict, save_directory, lora: dict | None = None, write_extra=None) -> None:
    """Writes the adapter of `model`, adapted from the detector `base` (`detector_fingerprint`), atomically.

    Only what adaptation changed goes in: the weights that train in `model` (prompts and couplings, under their
    model names) and, when adaptation trained LoRA (`lora`: `{"r", "alpha", "target_modules", "state"}`, peft's
    state dict), the LoRA matrices. config.json is a `MiraGeAdapterConfig` holding the base and `model.config`
    (the adapted calibration); `write_extra(folder)` adds the rest (image processor, results, card) before the
    folder appears.
    """
    state = _trained_state(model)
    if lora is not None:
        state.update({LORA_PREFIX + name: tensor.contiguous() for name, tensor in lora["state"].items()})
    detector_config = model.config.to_dict()
    detector_config.pop("auto_map", None)  # the folder holds no model code: it loads through mirage_hf
    config = MiraGeAdapterConfig(
        base_model_name_or_path=base["name_or_path"],
        base_model_revision=base["revision"],
        base_model_sha256=base["sha256"],
        lora=None if lora is None else {key: lora[key] for key in ("r", "alpha", "target_modules")},
        detector_config=detector_config,
    )
    with atomic_write(save_directory) as staging:
        staging.mkdir()
        _write_weights(staging, state)
        config.to_json_file(staging / CONFIG_NAME)
        if write_extra is not None:
            write_extra(staging)


def load_detector_adapter(model_class, name_or_path, base_model=None, config=None, **kwargs):
    """The base detector as a `model_class` (its recorded revision, unless `base_model` replaces it), checked
    against the weights' sha256 the adapter recorded, with the adapter's LoRA merged in, its weights loaded and the
    adapted config (or `config`, a `MiraGeConfig`); `name_or_path` is an adapter folder or Hub repo."""
    local = Path(str(name_or_path)).is_dir()
    directory = str(name_or_path) if local else _snapshot(name_or_path, kwargs)
    adapter = config if isinstance(config, MiraGeAdapterConfig) else MiraGeAdapterConfig.from_pretrained(directory)
    recorded = adapter.base_model_name_or_path
    base = base_model or recorded
    revision = adapter.base_model_revision if base_model is None else None
    for key in ADAPTER_REPO_ONLY:
        kwargs.pop(key, None)
    detector_config = config if isinstance(config, MiraGeConfig) else adapter.detector_config
    model = model_class.from_pretrained(base, revision=revision, config=detector_config, **kwargs)
    found = detector_fingerprint(base, revision)
    if found["sha256"] != adapter.base_model_sha256:
        raise ValueError(
            f"The adapter {directory!r} was trained on the detector {recorded!r} (weights sha256 "
            f"{adapter.base_model_sha256[:12]}...), but {str(base)!r} has other weights (sha256 "
            f"{found['sha256'][:12]}...). Load it on its own base detector."
        )
    state = load_file(os.path.join(directory, ADAPTER_WEIGHTS_NAME))
    if adapter.lora:
        lora_state = {name[len(LORA_PREFIX) :]: state.pop(name) for name in list(state) if name.startswith(LORA_PREFIX)}
        model = merge_lora(model, adapter.lora, lora_state)
    _load_trained(model, state, directory)
    model.config._name_or_path = directory
    model.mirage_adapter = {"adapter": directory, "base_model": str(base), "base_revision": revision}
    return model


def merge_lora(model, lora: dict, lora_state: dict):
    """`model` with the LoRA matrices `lora_state` (peft's names) merged into its CLIP."""
    trainable = trainable_parameters(model).keys()
    settings = mirage_lora_config(
        model, r=lora["r"], alpha=lora["alpha"], target_modules=lora["target_modules"], save_trainable_modules=False
    )
    peft_model = get_peft_model(model, settings)
    result = set_peft_model_state_dict(peft_model, lora_state)
    if result.unexpected_keys:
        raise ValueError(f"the adapter's LoRA does not fit the base: unexpected {sorted(result.unexpected_keys)[:5]}")
    merged = peft_model.merge_and_unload()
    for name, param in merged.named_parameters():  # peft froze the prompts; the merged model trains as it did
        param.requires_grad_(name in trainable)
    return merged


def is_detector_adapter(name_or_path, **hub_kwargs) -> bool:
    """Whether `name_or_path` (a folder or Hub repo) holds an adapter on a trained detector."""
    path = cached_file(
        str(name_or_path),
        CONFIG_NAME,
        revision=hub_kwargs.get("revision"),
        _raise_exceptions_for_missing_entries=False,
        _raise_exceptions_for_connection_errors=False,
    )
    if not path:
        return False
    with open(path) as handle:
        return json.load(handle).get("model_type") == MiraGeAdapterConfig.model_type


class MiraGeAdapterModel:
    """What `AutoModel` builds from an adapter folder or repo (a `MiraGeAdapterConfig`): the base detector as a
    `MiraGeModel`, with the adapter applied (`load_detector_adapter`)."""

    config_class = MiraGeAdapterConfig
    detector_class = MiraGeModel

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, **kwargs):
        return load_detector_adapter(cls.detector_class, pretrained_model_name_or_path, **kwargs)


class MiraGeAdapterForImageClassification(MiraGeAdapterModel):
    """What `AutoModelForImageClassification` and `pipeline()` build from an adapter: the base detector as a
    `MiraGeForImageClassification`, with the adapter applied."""

    detector_class = MiraGeForImageClassification


def _snapshot(repo_id, kwargs) -> str:
    """The local folder of a Hub adapter's files (config, weights, adapter config)."""
    from huggingface_hub import snapshot_download

    return snapshot_download(str(repo_id), revision=kwargs.get("revision"), allow_patterns=["*.json", "*.safetensors"])

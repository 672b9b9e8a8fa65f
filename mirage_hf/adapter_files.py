"""PEFT-style adapters: the trained weights as safetensors, plus a JSON file naming the base they apply to.

Two kinds, one file format:
* on a CLIP (`model.save_adapter(dir)`): the trainable weights (prompts and couplings, or the linear head) and the
  settings needed to rebuild the detector on its base CLIP;
* on a trained detector (`save_detector_adapter`, written by `mirage-adapt`): what adaptation changed (prompts and
  couplings, LoRA matrices where it trained some), the base detector's id, revision and weights' sha256, and the
  adapted `config.json` (its calibration) and image processor, so that `from_pretrained`, `pipeline()`,
  `mirage-detect` and the Space load the folder like a detector.

The file I/O lives here, not in `modeling_mirage.py`, because that file ships to the Hub as remote code and holds
the model only. `mirage_hf.extensions` attaches these functions to the model classes, so users call
`model.save_adapter(dir)` and `MiraGeForImageClassification.from_adapter(dir)`, and `from_pretrained` recognises a
detector adapter.
"""

import copy
import hashlib
import json
import os
from pathlib import Path

from peft import LoraConfig, get_peft_model, set_peft_model_state_dict
from safetensors.torch import load_file, save_file
from transformers.utils import SAFE_WEIGHTS_INDEX_NAME, SAFE_WEIGHTS_NAME, cached_file
from transformers.utils.hub import extract_commit_hash

from .atomic import atomic_write
from .configuration_mirage import MiraGeConfig
from .modeling_mirage import MiraGePreTrainedModel

ADAPTER_CONFIG_NAME = "mirage_adapter_config.json"
ADAPTER_WEIGHTS_NAME = "mirage_adapter.safetensors"
ADAPT_RESULTS_NAME = "adapt_results.json"  # what `mirage-adapt` measured: before/after tables, guard, options
DETECTOR = "detector"  # `base_kind` of an adapter on a trained detector (absent: on a CLIP)
LORA_PREFIX = "lora."  # LoRA matrices in the weights file, peft's names after this prefix
# What a hub kwarg of the adapter's repo must not carry over to its base's: the base has its own revision.
ADAPTER_REPO_ONLY = ("revision", "subfolder", "_commit_hash", "adapter_kwargs", "trust_remote_code")


def _trainable(model) -> set[str]:
    return {name for name, param in model.named_parameters() if param.requires_grad}


def save_adapter(model, save_directory) -> None:
    """Writes only the trainable weights (safetensors) and the settings needed to rebuild the model."""
    trainable = _trainable(model)
    state = {name: tensor.detach().contiguous() for name, tensor in model.state_dict().items() if name in trainable}
    own_fields = set(MiraGeConfig.__annotations__) - {"clip_config", "clip_name_or_path"}
    adapter_config = {
        "base_model_name_or_path": model.config.clip_name_or_path,
        "model_class": type(model).__name__,
        "mirage_config": {key: getattr(model.config, key) for key in sorted(own_fields)},
    }
    _write_adapter(save_directory, state, adapter_config)


def _write_adapter(directory, state: dict, adapter_config: dict) -> None:
    os.makedirs(directory, exist_ok=True)
    with atomic_write(os.path.join(directory, ADAPTER_WEIGHTS_NAME)) as staging:
        save_file(state, staging)
    with atomic_write(os.path.join(directory, ADAPTER_CONFIG_NAME)) as staging:
        staging.write_text(json.dumps(adapter_config, indent=2, sort_keys=True) + "\n")


def read_adapter_config(adapter_directory) -> dict:
    with open(os.path.join(adapter_directory, ADAPTER_CONFIG_NAME)) as handle:
        return json.load(handle)


def from_adapter(cls, adapter_directory, base_model=None, **kwargs):
    """Rebuilds a `cls` model from an adapter folder on top of its base (a CLIP, or a trained detector), or on
    `base_model` instead; an adapter on a detector refuses a base whose weights are not the ones it was trained on."""
    adapter_config = read_adapter_config(adapter_directory)
    if adapter_config.get("base_kind") == DETECTOR:
        return _from_detector_adapter(cls, adapter_directory, adapter_config, base_model, **kwargs)
    base_model = base_model or adapter_config["base_model_name_or_path"]
    if base_model is None:
        raise ValueError("The adapter does not name its base CLIP; pass base_model=<Hub id or folder>.")
    model = cls.from_clip(base_model, **adapter_config["mirage_config"], **kwargs)
    _load_trained(model, load_file(os.path.join(adapter_directory, ADAPTER_WEIGHTS_NAME)), adapter_directory)
    return model


def _load_trained(model, state: dict, adapter_directory) -> None:
    """Loads an adapter's weights into `model`, which must expect exactly these trainable weights."""
    _, unexpected = model.load_state_dict(state, strict=False)
    missing = _trainable(model) - state.keys()
    if unexpected or missing:
        raise ValueError(
            f"The adapter in {str(adapter_directory)!r} does not match the model it describes: "
            f"unexpected {sorted(unexpected)}, missing {sorted(missing)}"
        )


# ------------------------------------------------------------------------------ adapters on a trained detector


def _sha256_of_files(paths) -> str:
    """One sha256 over the names and contents of `paths`, in order."""
    digest = hashlib.sha256()
    for path in paths:
        digest.update(Path(path).name.encode())
        with open(path, "rb") as handle:
            for block in iter(lambda: handle.read(1 << 24), b""):
                digest.update(block)
    return digest.hexdigest()


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
        "sha256": _sha256_of_files(files),
    }


def save_detector_adapter(model, base: dict, save_directory, lora: dict | None = None, write_extra=None) -> None:
    """Writes the adapter of `model`, adapted from the detector `base` (`detector_fingerprint`), atomically.

    Only what adaptation changed goes in: the weights that train in `model` (prompts and couplings, under their
    model names) and, when adaptation trained LoRA (`lora`: `{"r", "alpha", "target_modules", "state"}`, peft's
    state dict), the LoRA matrices. `model.config` (the adapted calibration) goes in as config.json;
    `write_extra(folder)` adds the rest (image processor, results, card) before the folder appears.
    """
    state = {
        name: tensor.detach().contiguous() for name, tensor in model.state_dict().items() if name in _trainable(model)
    }
    adapter_config = {
        "base_kind": DETECTOR,
        "base_model_name_or_path": base["name_or_path"],
        "base_model_revision": base["revision"],
        "base_model_sha256": base["sha256"],
        "model_class": type(model).__name__,
        "lora": None,
    }
    if lora is not None:
        state.update({LORA_PREFIX + name: tensor.contiguous() for name, tensor in lora["state"].items()})
        adapter_config["lora"] = {key: lora[key] for key in ("r", "alpha", "target_modules")}
    with atomic_write(save_directory) as staging:
        staging.mkdir()
        _write_adapter(staging, state, adapter_config)
        config = copy.deepcopy(model.config)
        config.__dict__.pop("auto_map", None)  # the folder holds no model code: it loads through mirage_hf
        config.to_json_file(staging / "config.json")
        if write_extra is not None:
            write_extra(staging)


def _from_detector_adapter(cls, adapter_directory, adapter_config, base_model=None, config=None, **kwargs):
    """The base detector (its recorded revision, unless `base_model` replaces it), checked against the weights'
    sha256 the adapter recorded, with the adapter's LoRA merged in, its weights loaded and its config."""
    recorded = adapter_config["base_model_name_or_path"]
    base = base_model or recorded
    revision = adapter_config["base_model_revision"] if base_model is None else None
    for key in ADAPTER_REPO_ONLY:
        kwargs.pop(key, None)
    config = config or MiraGeConfig.from_pretrained(adapter_directory)
    model = _ORIGINAL_FROM_PRETRAINED(cls, base, revision=revision, config=config, **kwargs)
    found = detector_fingerprint(base, revision)
    if found["sha256"] != adapter_config["base_model_sha256"]:
        raise ValueError(
            f"The adapter {str(adapter_directory)!r} was trained on the detector {recorded!r} (weights sha256 "
            f"{adapter_config['base_model_sha256'][:12]}...), but {str(base)!r} has other weights (sha256 "
            f"{found['sha256'][:12]}...). Load it on its own base detector."
        )
    state = load_file(cached_file(str(adapter_directory), ADAPTER_WEIGHTS_NAME))
    lora = adapter_config.get("lora")
    if lora:
        lora_state = {name[len(LORA_PREFIX) :]: state.pop(name) for name in list(state) if name.startswith(LORA_PREFIX)}
        model = merge_lora(model, lora, lora_state)
    _load_trained(model, state, adapter_directory)
    model.config._name_or_path = str(adapter_directory)
    model.mirage_adapter = {"adapter": str(adapter_directory), "base_model": str(base), "base_revision": revision}
    return model


def lora_config(lora: dict) -> LoraConfig:
    """The peft config of an adapter's LoRA (`{"r", "alpha", "target_modules"}`); the prompts stay trainable."""
    return LoraConfig(
        r=lora["r"], lora_alpha=lora["alpha"], target_modules=lora["target_modules"], modules_to_save=None
    )


def merge_lora(model, lora: dict, lora_state: dict):
    """`model` with the LoRA matrices `lora_state` (peft's names) merged into its CLIP."""
    trainable = _trainable(model)
    peft_model = get_peft_model(model, lora_config(lora))
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
        ADAPTER_CONFIG_NAME,
        revision=hub_kwargs.get("revision"),
        _raise_exceptions_for_missing_entries=False,
        _raise_exceptions_for_connection_errors=False,
    )
    if not path:
        return False
    with open(path) as handle:
        return json.load(handle).get("base_kind") == DETECTOR


_ORIGINAL_FROM_PRETRAINED = MiraGePreTrainedModel.__dict__["from_pretrained"].__func__


def from_pretrained(cls, pretrained_model_name_or_path, *args, **kwargs):
    """`from_pretrained` as transformers defines it, except that an adapter folder or repo (`mirage-adapt`'s
    output) loads as its base detector with the adapter applied (`from_adapter`)."""
    if not args and is_detector_adapter(pretrained_model_name_or_path, **kwargs):
        local = Path(str(pretrained_model_name_or_path)).is_dir()
        directory = pretrained_model_name_or_path if local else _snapshot(pretrained_model_name_or_path, kwargs)
        return from_adapter(cls, directory, **kwargs)
    return _ORIGINAL_FROM_PRETRAINED(cls, pretrained_model_name_or_path, *args, **kwargs)


def _snapshot(repo_id, kwargs) -> str:
    """The local folder of a Hub adapter's files (config, weights, adapter config)."""
    from huggingface_hub import snapshot_download

    return snapshot_download(str(repo_id), revision=kwargs.get("revision"), allow_patterns=["*.json", "*.safetensors"])

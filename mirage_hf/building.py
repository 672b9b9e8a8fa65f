"""Building a MiraGe detector on a pretrained CLIP checkpoint: `mirage_hf.from_clip(MiraGeForImageClassification, id)`.

A function of the package, not a method of the model classes, because only building needs a tokenizer and the
CLIP checkpoint; the remote-code model file scores without either. The class prompts are tokenised once
with the checkpoint's own tokenizer and stored in the config, so the saved model needs no tokenizer.
"""

import torch
from huggingface_hub import constants
from huggingface_hub.utils import get_session
from transformers import AutoTokenizer, CLIPConfig, PreTrainedConfig

from .configuration_mirage import MiraGeConfig

# What from_clip adds to a CLIP checkpoint and initialises on purpose: no load report may call it missing.
ADDED_TO_CLIP = (r"^prompt_learner\.", r"^classifier\.", r"^loss_fn\.")


def from_clip(model_class, name_or_path, *, tokenizer=None, dtype=torch.float32, **config_overrides):
    """Builds a `model_class` (`MiraGeModel` or `MiraGeForImageClassification`) on a pretrained CLIP (Hub id or
    local folder with weights and tokenizer), e.g. `from_clip(MiraGeForImageClassification, "openai/clip-...")`.

    The CLIP weights go into `model.clip` (frozen); the class prompts are tokenised with the checkpoint's
    tokenizer (or `tokenizer`) and stored in the config, so the saved model needs no tokenizer. The weights
    MiraGe adds are new by design and stay out of the load report; missing CLIP weights are an error.
    """
    clip_config = CLIPConfig.from_dict(clip_config_dict(name_or_path))

    def build_config(**fields):
        return MiraGeConfig(clip_config=clip_config, clip_name_or_path=str(name_or_path), **fields)

    config = build_config(**config_overrides)
    if "prompt_token_ids" not in config_overrides:
        tokenizer = tokenizer or _load_tokenizer(name_or_path)
        _check_tokenizer_fits(tokenizer, config.clip_config.text_config, name_or_path)
        config = build_config(prompt_token_ids=_tokenize_class_prompts(tokenizer, config), **config_overrides)
    model, info = _loading_class(model_class).from_pretrained(
        name_or_path, config=config, dtype=dtype, output_loading_info=True
    )
    model.__class__ = model_class  # the loading class differs from `model_class` in the ignore list alone
    model._keys_to_ignore_on_load_missing -= set(ADDED_TO_CLIP)
    if info["missing_keys"]:  # only CLIP's own weights can be left
        raise ValueError(f"{name_or_path!r} lacks CLIP weights: {', '.join(sorted(info['missing_keys'])[:5])} ...")
    init_context_from_words(model)
    return model


def _loading_class(cls):
    """`cls` for loading a CLIP checkpoint into: a subclass that expects the weights MiraGe adds to be missing,
    so transformers' load report shows only real gaps (thread-safe, unlike changing `cls` for the duration)."""
    ignore = [*(cls._keys_to_ignore_on_load_missing or ()), *ADDED_TO_CLIP]
    namespace = {
        "_keys_to_ignore_on_load_missing": ignore,
        "__module__": cls.__module__,
        "__qualname__": cls.__qualname__,
    }
    return type(cls.__name__, (cls,), namespace)


def offline_if_hub_unreachable(timeout: float = 5.0) -> bool:
    """One request to the Hub; if it fails, this process goes offline, where a cached checkpoint still loads and a
    missing one fails at once (huggingface_hub would retry an unreachable Hub for over a minute, a line per try).
    True when it went offline."""
    if constants.HF_HUB_OFFLINE:
        return False
    try:
        get_session().head(constants.ENDPOINT, timeout=timeout)
    except Exception:  # any failure to answer (httpx's or httpx2's errors, by huggingface_hub version)
        constants.HF_HUB_OFFLINE = True  # what HF_HUB_OFFLINE=1 sets; read by huggingface_hub and transformers
        return True
    return False


def clip_config_dict(name_or_path) -> dict:
    """The checkpoint's config as a dict; ValueError unless it is a transformers CLIP checkpoint."""
    config_dict, _ = PreTrainedConfig.get_config_dict(name_or_path)
    if config_dict.get("model_type") != "clip":
        raise ValueError(
            f"{name_or_path!r} is not a CLIP checkpoint (its config says model_type="
            f"{config_dict.get('model_type')!r}); MiraGe needs a transformers CLIPModel checkpoint such as "
            "'openai/clip-vit-large-patch14'."
        )
    return config_dict


def _load_tokenizer(name_or_path):
    try:
        return AutoTokenizer.from_pretrained(name_or_path)
    except (OSError, ValueError, TypeError) as error:
        raise ValueError(
            f"from_clip needs the CLIP tokenizer of {name_or_path!r} to write the class prompts, and it could "
            f"not be loaded ({error}). Save the tokenizer next to the weights, or pass tokenizer=..."
        ) from error


@torch.no_grad()
def init_context_from_words(model) -> None:
    """Starts the learnable context from the CLIP embeddings of the words it replaces (MaPLe/CoOp init)."""
    if not (model.config.ctx_init and model.prompt_learner.text_prompts):
        return
    n_ctx = model.config.num_learned_ctx
    words = model.prompt_learner.token_ids[0, 1 : 1 + n_ctx]
    model.prompt_learner.text_prompts[0].copy_(model.clip.text_model.embeddings.token_embedding(words))
    model._anchor_cache = None


def _check_tokenizer_fits(tokenizer, text_config, name_or_path):
    """ValueError unless `tokenizer` speaks the checkpoint's vocabulary (size and special token ids).

    Configs written by older transformers (openai/clip-*) hold the placeholder ids bos=0, eos=2; CLIP then finds
    the end token as the largest id, so there the end token must be the vocabulary's last entry.
    """
    vocab_size, problems = text_config.vocab_size, []
    if len(tokenizer) > vocab_size:
        problems.append(f"it has {len(tokenizer)} tokens, the text tower embeds {vocab_size}")
    if text_config.eos_token_id == 2:
        if len(tokenizer) != vocab_size or tokenizer.eos_token_id != vocab_size - 1:
            problems.append(
                f"its {len(tokenizer)} tokens and end token {tokenizer.eos_token_id} do not match the checkpoint's "
                f"{vocab_size} tokens ending with the end token {vocab_size - 1}"
            )
    else:
        for name in ("bos_token_id", "eos_token_id"):
            if getattr(tokenizer, name) != getattr(text_config, name):
                problems.append(
                    f"its {name} is {getattr(tokenizer, name)}, the checkpoint's {getattr(text_config, name)}"
                )
    if problems:
        raise ValueError(
            f"The tokenizer does not fit the CLIP checkpoint {str(name_or_path)!r}: {'; '.join(problems)}. "
            "from_clip needs the CLIP tokenizer of that checkpoint: save it next to the weights, or pass tokenizer=..."
        )


def _tokenize_class_prompts(tokenizer, config: MiraGeConfig) -> list[list[int]]:
    """`<bos> ctx_init class_name . <eos>` per class; the first n_ctx context words become learnable."""
    n_ctx = config.num_learned_ctx
    if config.ctx_init:
        prefix = config.ctx_init
        n_words = len(tokenizer(prefix)["input_ids"]) - 2
        if n_words < n_ctx:
            raise ValueError(
                f"MiraGeConfig.ctx_init {prefix!r} has {n_words} tokens, fewer than n_ctx={n_ctx}; "
                "lengthen ctx_init or lower n_ctx"
            )
    else:
        prefix = " ".join(["X"] * n_ctx)
    prompts = [tokenizer(f"{prefix} {name}.".strip())["input_ids"] for name in config.class_names]
    if any(token == tokenizer.unk_token_id for prompt in prompts for token in prompt[1:-1]):
        raise ValueError(
            f"The tokenizer cannot encode the class prompts {[f'{prefix} {n}.' for n in config.class_names]} "
            "(unknown tokens): from_clip needs the CLIP tokenizer saved next to the weights, or pass tokenizer=..."
        )
    return prompts

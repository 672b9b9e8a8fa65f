"""MiraGe model configuration.

Self-contained (transformers' single-file policy): this file ships to the Hub as remote code next to
`modeling_mirage.py` and imports nothing from `mirage_hf`.
"""

from huggingface_hub.dataclasses import strict
from transformers import CLIPConfig, PreTrainedConfig

MIRAGE_MODES = ("zero_shot", "linear_probe", "coop", "maple", "mirage")
"""The ablation ladder: what trains on top of the frozen CLIP (see the README)."""

PROMPT_MODES = ("coop", "maple", "mirage")
"""Modes with a learnable text context."""

DEEP_PROMPT_MODES = ("maple", "mirage")
"""Modes with deep multimodal prompts (text prompts coupled into the vision tower)."""

ID2LABEL = {0: "real", 1: "fake"}
LABEL2ID = {name: index for index, name in ID2LABEL.items()}

PREPROCESS_MODES = ("resize", "center_crop")
"""How an image reaches the model's input size: CLIP's resize + centre crop, or a centre crop without resizing."""


@strict
class MiraGeConfig(PreTrainedConfig):
    r"""
    Configuration of a MiraGe detector: a frozen CLIP plus learnable multimodal prompts.

    Args:
        clip_config (`dict` or `CLIPConfig`, *optional*):
            The frozen CLIP backbone. Defaults to `CLIPConfig()` (ViT-B/32 sized).
        mode (`str`, *optional*, defaults to `"mirage"`):
            Rung of the ablation ladder: `zero_shot` (nothing trains), `linear_probe` (a linear head on image
            features, UnivFD), `coop` (shallow text context, cross-entropy), `maple` (deep multimodal prompts,
            cross-entropy), `mirage` (deep multimodal prompts, full MiraGe loss).
        n_ctx (`int`, *optional*, defaults to 2):
            Number of learnable context tokens (and of vision prompt tokens per layer).
        prompt_depth (`int`, *optional*, defaults to 9):
            Number of layers, counted from the first, that get prompts in both encoders (`maple`/`mirage`).
        ctx_init (`str`, *optional*, defaults to `"a photo of a"`):
            Words in front of each class name. The first `n_ctx` of its tokens are learnable and initialised
            from their CLIP embeddings; `zero_shot` uses the sentence as written. `None` uses `n_ctx`
            placeholder tokens with a random initialisation (CoOp style).
        class_names (`list[str]`, *optional*, defaults to `["real", "fake"]`):
            Words that end the two class prompts, in label order.
        prompt_token_ids (`list[list[int]]`, *optional*):
            The tokenised class prompts `<bos> ctx_init class_name . <eos>`, stored so that inference needs no
            tokenizer. `from_clip` fills them with the CLIP tokenizer; without one, placeholder ids are used
            (fine for randomly initialised models, meaningless for pretrained ones).
        clip_name_or_path (`str`, *optional*):
            Hub id or folder of the base CLIP (recorded by `from_clip`, used by adapters).
        ce_weight, align_weight, sep_weight, supcon_weight (`float`):
            Weights of the MiraGe loss terms (`mirage` mode; other modes train with cross-entropy only). A zero
            weight switches the term off.
        sep_margin (`float`, *optional*, defaults to 0.0):
            Cosine to the other class anchor above which an image feature is penalised.
        anchor_margin (`float`, *optional*, defaults to 0.5):
            Cosine between the two anchors above which the anchors are pushed apart.
        supcon_temperature (`float`, *optional*, defaults to 0.07):
            Temperature of the supervised contrastive term.
        memory_bank_size (`int`, *optional*, defaults to 1024):
            Number of past image features kept (FIFO) as extra contrastive candidates; 0 disables the bank.
        calibration_temperature (`float`, *optional*, defaults to 1.0):
            Temperature dividing the logits, `sigmoid((logit_fake - logit_real) / T)`. Fitted on held-out
            training data by `mirage_hf.calibration.calibrate` (its docstring gives the rule).
        decision_threshold (`float`, *optional*, defaults to 0.5):
            Temperature-scaled probability from which an image is called fake. It is folded into the output: the
            logits are shifted by `-logit(decision_threshold)`, so the reported `p_fake = softmax(logits)[..., 1]`
            reaches 0.5 exactly at this threshold, and `pipeline()` and every other surface give one score and
            one verdict.
        preprocess (`str`, *optional*, defaults to `"resize"`):
            How images were brought to the input size when the model was evaluated and calibrated: `resize`
            (the image processor's resize and centre crop) or `center_crop` (a crop without resizing, which keeps
            pixel-level traces). Training records it; evaluation, `mirage-detect` and the Space use it by default.
        added_fake_anchors (`int`, *optional*, defaults to 0):
            Fake anchors added after training, one per new generator (`mirage-adapt --method anchor`): learned
            directions in the joint space scored beside the class anchors, their logits joined to the fake class
            (`logit_fake = logsumexp` over the fake anchors, so `p(fake) = 1 - p(real)` over all anchors). The
            class anchors and prompts do not change, so the old decisions move only where an added anchor wins.

    The label set is fixed (`id2label = {0: "real", 1: "fake"}`): constructing, loading or assigning another one
    (`num_labels=5`, `config.num_labels = 3`, a new `id2label`) raises `ValueError`.
    """

    model_type = "mirage"
    sub_configs = {"clip_config": CLIPConfig}

    clip_config: dict | CLIPConfig | None = None
    mode: str = "mirage"
    n_ctx: int = 2
    prompt_depth: int = 9
    ctx_init: str | None = "a photo of a"
    class_names: list[str] | None = None
    prompt_token_ids: list[list[int]] | None = None
    clip_name_or_path: str | None = None
    ce_weight: float | int = 1.0
    align_weight: float | int = 1.0
    sep_weight: float | int = 1.0
    supcon_weight: float | int = 0.1
    sep_margin: float | int = 0.0
    anchor_margin: float | int = 0.5
    supcon_temperature: float | int = 0.07
    memory_bank_size: int = 1024
    calibration_temperature: float | int = 1.0
    decision_threshold: float | int = 0.5
    preprocess: str = "resize"
    added_fake_anchors: int = 0

    def __post_init__(self, **kwargs):
        num_labels = kwargs.pop("num_labels", None)  # no field: it arrives as a keyword (also from `from_pretrained`)
        if num_labels is not None:
            _check_label_set("num_labels", num_labels)
        self.id2label = dict(ID2LABEL)
        self.label2id = dict(LABEL2ID)
        if self.class_names is None:
            self.class_names = list(ID2LABEL.values())
        # Built here rather than through `sub_configs_defaults`, which transformers 5.17 lacks.
        if not isinstance(self.clip_config, CLIPConfig):
            self.clip_config = CLIPConfig(**(self.clip_config or {}))
        super().__post_init__(**kwargs)
        self._check_values()
        if self.prompt_token_ids is None:
            self.prompt_token_ids = self._placeholder_prompt_token_ids()
        self._check_prompt_token_ids()

    def __setattr__(self, key, value):
        # The label set is part of the method: any assignment that would change it fails (a first `None`, the
        # dataclass default before `__post_init__` fills the labels, passes).
        if key in ("id2label", "label2id", "num_labels") and not (value is None and key not in self.__dict__):
            value = _check_label_set(key, value)
        super().__setattr__(key, value)

    @property
    def text_prompt_depth(self) -> int:
        """Text layers that receive learnable tokens (layer 0 = the context in the embeddings)."""
        if self.mode in DEEP_PROMPT_MODES:
            return self.prompt_depth
        return 1 if self.mode == "coop" else 0

    @property
    def vision_prompt_depth(self) -> int:
        """Vision layers that receive prompt tokens coupled from the text prompts."""
        return self.prompt_depth if self.mode in DEEP_PROMPT_MODES else 0

    @property
    def num_learned_ctx(self) -> int:
        """Learnable context tokens actually used by the mode."""
        return self.n_ctx if self.mode in PROMPT_MODES else 0

    def _check_values(self):
        def fail(field, why):
            raise ValueError(f"MiraGeConfig.{field}: {why}")

        if self.mode not in MIRAGE_MODES:
            fail("mode", f"unknown mode {self.mode!r}; choose one of {', '.join(MIRAGE_MODES)}")
        if self.n_ctx < 0:
            fail("n_ctx", f"must be >= 0, got {self.n_ctx}")
        if self.mode in PROMPT_MODES and self.n_ctx == 0:
            fail("n_ctx", f"mode {self.mode!r} learns context tokens, so n_ctx must be >= 1")
        num_layers = min(
            self.clip_config.text_config.num_hidden_layers, self.clip_config.vision_config.num_hidden_layers
        )
        if self.mode in DEEP_PROMPT_MODES and not 1 <= self.prompt_depth <= num_layers:
            fail(
                "prompt_depth",
                f"must be between 1 and the number of layers of the shallower CLIP tower ({num_layers}), "
                f"got {self.prompt_depth}",
            )
        if len(self.class_names) != 2:
            fail("class_names", f"needs exactly two names (real, fake), got {self.class_names!r}")
        for field in ("ce_weight", "align_weight", "sep_weight", "supcon_weight"):
            if getattr(self, field) < 0:
                fail(field, f"loss weights must be >= 0, got {getattr(self, field)}")
        for field in ("sep_margin", "anchor_margin"):
            if not -1.0 <= getattr(self, field) <= 1.0:
                fail(field, f"is a cosine and must lie in [-1, 1], got {getattr(self, field)}")
        if self.supcon_temperature <= 0:
            fail("supcon_temperature", f"must be > 0, got {self.supcon_temperature}")
        if self.memory_bank_size < 0:
            fail("memory_bank_size", f"must be >= 0, got {self.memory_bank_size}")
        if self.calibration_temperature <= 0:
            fail("calibration_temperature", f"must be > 0, got {self.calibration_temperature}")
        if not 0.0 < self.decision_threshold < 1.0:
            fail("decision_threshold", f"must lie strictly between 0 and 1, got {self.decision_threshold}")
        if self.preprocess not in PREPROCESS_MODES:
            fail("preprocess", f"must be one of {', '.join(PREPROCESS_MODES)}, got {self.preprocess!r}")
        if self.added_fake_anchors < 0:
            fail("added_fake_anchors", f"must be >= 0, got {self.added_fake_anchors}")
        if self.added_fake_anchors and self.mode == "linear_probe":
            fail("added_fake_anchors", "anchors join class anchors, which mode 'linear_probe' does not have")

    def _placeholder_prompt_token_ids(self) -> list[list[int]]:
        """Distinct in-vocabulary ids shaped like real prompts, for models built without a tokenizer."""
        text_config = self.clip_config.text_config
        vocab = text_config.vocab_size
        bos, eos = text_config.bos_token_id % vocab, text_config.eos_token_id % vocab
        n_words = max(self.n_ctx, len(self.ctx_init.split()) if self.ctx_init else 0)
        free_ids = (i % vocab for i in range(3, 3 + vocab) if i % vocab not in (bos, eos))
        context = [next(free_ids) for _ in range(n_words)]
        return [[bos, *context, next(free_ids), eos] for _ in ID2LABEL]

    def _check_prompt_token_ids(self):
        ids = self.prompt_token_ids
        max_len = self.clip_config.text_config.max_position_embeddings
        if len(ids) != 2:
            raise ValueError(f"MiraGeConfig.prompt_token_ids: needs two prompts (real, fake), got {len(ids)}")
        for prompt in ids:
            if not self.num_learned_ctx + 2 <= len(prompt) <= max_len:
                raise ValueError(
                    f"MiraGeConfig.prompt_token_ids: a prompt of {len(prompt)} tokens cannot hold <bos>, "
                    f"{self.num_learned_ctx} context tokens and <eos> within {max_len} positions"
                )


def _check_label_set(key: str, value):
    """`value` for `key` in the fixed form (int ids) if it describes (real, fake); ValueError otherwise."""
    fixed = {"id2label": ID2LABEL, "label2id": LABEL2ID, "num_labels": len(ID2LABEL)}[key]
    try:
        if key == "id2label":
            normalised = {int(index): name for index, name in value.items()}
        elif key == "label2id":
            normalised = {name: int(index) for name, index in value.items()}
        else:
            normalised = int(value)
    except (AttributeError, TypeError, ValueError):
        normalised = None
    if normalised != fixed:
        raise ValueError(
            f"MiraGeConfig.{key}: the label set of a MiraGe detector is fixed ({key} = {fixed}); got {value!r}. "
            "It always outputs two logits, real (0) and fake (1)."
        )
    return normalised


__all__ = ["MiraGeConfig"]

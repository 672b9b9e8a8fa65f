"""MiraGe: a frozen CLIP with deep multimodal prompts for detecting AI-generated images.

Self-contained (transformers' single-file policy): this file ships to the Hub as remote code next to
`configuration_mirage.py` and imports nothing from `mirage_hf`.

The prompts are inserted by an explicit loop over the stock CLIP layers (MaPLe's scheme, without forking
CLIP), so SDPA / flash attention and activation checkpointing of `CLIPEncoderLayer` keep working and every
CLIP checkpoint loads unchanged into `model.clip`.
"""

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers import CLIPModel, PreTrainedModel
from transformers import initialization as init
from transformers.modeling_outputs import BaseModelOutputWithPooling
from transformers.utils import ModelOutput

from .configuration_mirage import MiraGeConfig

try:  # how CLIP selects hidden states by index (transformers >= 5.2x); absent in 5.17, which uses another rule
    from transformers.utils.output_capturing import resolve_hidden_states_indices as _resolve_indices
    from transformers.utils.output_capturing import selected_hidden_states as _selected_indices
except ImportError:
    _resolve_indices = _selected_indices = None


@dataclass
class MiraGeOutput(ModelOutput):
    r"""
    loss (`torch.FloatTensor` of shape `()`, *optional*, returned when `labels` is given):
        Weighted sum of the active loss terms.
    logits (`torch.FloatTensor` of shape `(batch_size, 2)`):
        Calibrated logits for (real, fake): `softmax(logits)[:, 1] >= 0.5` is the model's fake decision.
    image_embeds (`torch.FloatTensor` of shape `(batch_size, projection_dim)`):
        L2-normalised image features.
    logit_diff (`torch.FloatTensor` of shape `(batch_size,)`):
        Uncalibrated `logit_fake - logit_real` in float32: the ranking score (AP, ROC AUC), which no temperature
        changes and which does not saturate.
    p_fake (`torch.FloatTensor` of shape `(batch_size,)`):
        The score every surface reports: `softmax(logits)[:, 1]`, the calibrated probability of fake with the
        decision threshold folded in, `sigmoid(logit_diff / calibration_temperature - logit(decision_threshold))`;
        the model calls an image fake when it reaches `FAKE_FROM` (0.5), as `pipeline()` does.
    loss_ce, loss_align, loss_sep, loss_supcon (`torch.FloatTensor` of shape `()`, *optional*):
        The unweighted loss terms that are switched on, for logging.
    hidden_states (`tuple(torch.FloatTensor)`, *optional*, returned with `output_hidden_states=True`):
        The vision tower's: the input of its first layer, then the output of each layer, each of shape
        `(batch_size, 1 + num_patches + n_ctx, hidden_size)`. The last `n_ctx` positions are the vision prompt
        tokens (in `maple`/`mirage` mode), which the next layer replaces within the first `prompt_depth` layers.
        `output_hidden_states=[0, 2]` (or one index) keeps only those and gives `None` elsewhere, by the rule of
        the installed transformers' CLIP (see `_selected_hidden_states`).
    attentions (`tuple(torch.FloatTensor)`, *optional*, returned with `output_attentions=True`):
        The vision tower's attention weights per layer, `(batch_size, num_heads, seq_len, seq_len)` over the same
        tokens, prompt tokens included. Only eager attention computes them (load with
        `attn_implementation="eager"`); with SDPA the tuple is empty, as in transformers' CLIP.

    Every field is per image, so `pipeline(..., batch_size=N)` can split the output; the class anchors are
    `model.text_anchors()`.
    """

    loss: torch.FloatTensor | None = None
    logits: torch.FloatTensor | None = None
    image_embeds: torch.FloatTensor | None = None
    logit_diff: torch.FloatTensor | None = None
    p_fake: torch.FloatTensor | None = None
    loss_ce: torch.FloatTensor | None = None
    loss_align: torch.FloatTensor | None = None
    loss_sep: torch.FloatTensor | None = None
    loss_supcon: torch.FloatTensor | None = None
    hidden_states: tuple[torch.FloatTensor, ...] | None = None
    attentions: tuple[torch.FloatTensor, ...] | None = None


def _replace_tokens(hidden: torch.Tensor, prompts: torch.Tensor, start: int) -> torch.Tensor:
    """Writes `prompts` (n, d) over n positions of every sequence in `hidden` (b, l, d) from `start`.

    A negative `start` counts from the end, so `start=-n` replaces the last n tokens.
    """
    start = start % hidden.shape[1]
    prompts = prompts.to(hidden.dtype).expand(hidden.shape[0], -1, -1)
    return torch.cat([hidden[:, :start], prompts, hidden[:, start + prompts.shape[1] :]], dim=1)


def _selected_hidden_states(hidden_states: list[torch.Tensor], selection) -> tuple | None:
    """The hidden states `output_hidden_states` asks for, as the installed transformers' CLIP returns them.

    `True` gives all of them. Indices (a list, or one int) give those and `None` elsewhere: since transformers
    5.2x they index all the hidden states (0 = the embeddings, negative from the end), in 5.17 a list indexes the
    layers' outputs alone and an int counts as `True`.
    """
    if not selection:
        return None
    if _selected_indices is None:  # transformers 5.17
        if not isinstance(selection, (list, tuple, set)):
            return tuple(hidden_states)
        return tuple(h if index in set(selection) else None for index, h in enumerate(hidden_states[1:]))
    indices = _selected_indices(selection)
    if indices is None:
        return tuple(hidden_states)
    keep = _resolve_indices(None, indices, num_hidden_states=len(hidden_states))
    return tuple(h if index in keep else None for index, h in enumerate(hidden_states))


FAKE_FROM = 0.5
"""The reported p(fake) from which every surface calls an image fake: the fitted threshold is folded into p(fake)."""


def calibrate_logits(logits: torch.Tensor, temperature: float, threshold: float) -> dict[str, torch.Tensor]:
    """The calibration rule, in its one home: what the model outputs for (real, fake) logits `(..., 2)`.

    * `logit_diff = logit_fake - logit_real` (float32), the uncalibrated ranking score;
    * `logits`: `logits / temperature` (float32) with the fake logit shifted by `-logit(threshold)`;
    * `p_fake = softmax(logits)[..., 1] = sigmoid(logit_diff / temperature - logit(threshold))`: the one score
      `pipeline()`, the CLI, the Space and ONNX report, fake iff `p_fake >= FAKE_FROM` (exactly when the
      temperature-scaled probability `sigmoid(logit_diff / temperature)` reaches `threshold`).
    """
    logits = logits.float()  # bf16 would move the decision at the threshold
    logit_diff = logits[..., 1] - logits[..., 0]
    shift = torch.tensor([0.0, math.log(threshold / (1.0 - threshold))], device=logits.device)
    calibrated = logits if temperature == 1.0 and threshold == 0.5 else logits / temperature - shift
    p_fake = torch.sigmoid(calibrated[..., 1] - calibrated[..., 0])
    return {"logits": calibrated, "logit_diff": logit_diff, "p_fake": p_fake}


class MiraGeAddedAnchors(nn.Module):
    """Fake anchors added for new generators: a direction and an offset (in cosine units) each, whose logits join
    the fake class's, so a new generator gets its own anchor and the class anchors stay where they are."""

    OFF = -2.0
    """An offset below every cosine: the anchor's logit then never wins, as if it were absent (untrained anchors)."""

    def __init__(self, count: int, dim: int):
        super().__init__()
        self.directions = nn.Parameter(torch.empty(count, dim))
        self.offsets = nn.Parameter(torch.empty(count))

    def forward(self, logits: torch.Tensor, image_embeds: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        """(real, fake) logits with each anchor's `scale * (cos + offset)` joined to the fake one by logsumexp."""
        added = scale * (image_embeds @ F.normalize(self.directions, dim=-1).to(image_embeds.dtype).T + self.offsets)
        fake = torch.logsumexp(torch.cat([logits[:, 1:], added.to(logits.dtype)], 1), 1)
        return torch.stack([logits[:, 0], fake], 1)


class MiraGePromptLearner(nn.Module):
    """Learnable prompts and the tokenised class prompts they are written into.

    `text_prompts[0]` is the shallow context (the CoOp part) that replaces the first `n_ctx` words of each
    class prompt; `text_prompts[i]` for i >= 1 replaces the same positions at the input of text layer i.
    `vision_couplings[i]` maps `text_prompts[i]` to the `n_ctx` vision prompt tokens of vision layer i
    (MaPLe's coupling: vision prompts are a function of the text prompts).
    """

    def __init__(self, config: MiraGeConfig):
        super().__init__()
        text_dim = config.clip_config.text_config.hidden_size
        vision_dim = config.clip_config.vision_config.hidden_size
        n_ctx = config.num_learned_ctx
        self.text_prompts = nn.ParameterList(
            [nn.Parameter(torch.empty(n_ctx, text_dim)) for _ in range(config.text_prompt_depth)]
        )
        self.vision_couplings = nn.ModuleList(
            [nn.Linear(text_dim, vision_dim) for _ in range(config.vision_prompt_depth)]
        )
        token_ids, eos_positions = self.padded_prompt_ids(config)
        self.token_ids = nn.Buffer(token_ids, persistent=False)
        self.eos_positions = nn.Buffer(eos_positions, persistent=False)

    @staticmethod
    def padded_prompt_ids(config: MiraGeConfig) -> tuple[torch.Tensor, torch.Tensor]:
        """The class prompts padded to one length, and the position of each one's end-of-text token.

        Padding after the end token never reaches it through the causal mask, so any pad id works.
        """
        prompts = config.prompt_token_ids
        length = max(len(p) for p in prompts)
        eos_id = prompts[0][-1]
        token_ids = torch.tensor([p + [eos_id] * (length - len(p)) for p in prompts], dtype=torch.long)
        return token_ids, torch.tensor([len(p) - 1 for p in prompts], dtype=torch.long)

    def forward(self) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Returns (text prompts per text layer, vision prompts per vision layer)."""
        text_prompts = list(self.text_prompts)
        vision_prompts = [coupling(prompt) for coupling, prompt in zip(self.vision_couplings, text_prompts)]
        return text_prompts, vision_prompts


class MiraGeMemoryBank(nn.Module):
    """FIFO queue of past image features (detached, L2-normalised) and their labels.

    What it stores and when: after each *training* forward with labels, the features of that micro-batch,
    gathered from every process (so all ranks hold the same queue), are enqueued once the micro-batch's loss
    has been computed. A batch therefore never meets itself in the bank; under gradient accumulation each
    micro-batch sees the earlier ones of the same step, exactly as it would see earlier steps. Empty slots have
    label -1 and are ignored. The queue is a persistent buffer, so `Accelerator.save_state` checkpoints it and
    a resumed run continues with the same bank; `save_pretrained` leaves it out of exported models.
    """

    def __init__(self, size: int, dim: int):
        super().__init__()
        self.features = nn.Buffer(torch.zeros(size, dim))
        self.labels = nn.Buffer(torch.full((size,), -1, dtype=torch.long))
        self.position = nn.Buffer(torch.zeros((), dtype=torch.long))

    @torch.no_grad()
    def enqueue(self, features: torch.Tensor, labels: torch.Tensor):
        features, labels = _gather_from_all_processes(features.detach()), _gather_from_all_processes(labels)
        size = self.labels.shape[0]
        features, labels = features[-size:], labels[-size:]
        slots = (self.position + torch.arange(labels.shape[0], device=labels.device)) % size
        self.features.index_copy_(0, slots, features.to(self.features.dtype))
        self.labels.index_copy_(0, slots, labels)
        self.position.add_(labels.shape[0]).remainder_(size)


def _gather_from_all_processes(tensor: torch.Tensor) -> torch.Tensor:
    """Concatenates `tensor` from every process (batches may differ in size); identity without DDP."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return tensor
    world_size = torch.distributed.get_world_size()
    if world_size == 1:
        return tensor
    size = torch.tensor([tensor.shape[0]], device=tensor.device)
    sizes = [torch.zeros_like(size) for _ in range(world_size)]
    torch.distributed.all_gather(sizes, size)
    sizes = [int(s) for s in sizes]
    padded = tensor.new_zeros((max(sizes), *tensor.shape[1:]))
    padded[: tensor.shape[0]] = tensor
    gathered = [torch.zeros_like(padded) for _ in range(world_size)]
    torch.distributed.all_gather(gathered, padded)
    return torch.cat([chunk[:n] for chunk, n in zip(gathered, sizes)])


class MiraGeLoss(nn.Module):
    """The MiraGe objective: cross-entropy plus anchor alignment, anchor separation and supervised contrast.

    Only `mirage` mode uses the extra terms; the other rungs of the ladder train with cross-entropy alone.
    """

    def __init__(self, config: MiraGeConfig):
        super().__init__()
        full = config.mode == "mirage"
        self.weights = {
            "ce": config.ce_weight if full else 1.0,
            "align": config.align_weight if full else 0.0,
            "sep": config.sep_weight if full else 0.0,
            "supcon": config.supcon_weight if full else 0.0,
        }
        self.sep_margin = config.sep_margin
        self.anchor_margin = config.anchor_margin
        self.temperature = config.supcon_temperature
        use_bank = self.weights["supcon"] > 0 and config.memory_bank_size > 0
        self.memory_bank = (
            MiraGeMemoryBank(config.memory_bank_size, config.clip_config.projection_dim) if use_bank else None
        )

    def forward(self, logits, image_embeds, text_embeds, labels) -> dict[str, torch.Tensor]:
        """Returns the active terms and their weighted sum under "loss"."""
        terms = {}
        if self.weights["ce"] > 0:
            terms["ce"] = F.cross_entropy(logits.float(), labels)
        if text_embeds is not None:
            image_embeds, text_embeds = image_embeds.float(), text_embeds.float()
            if self.weights["align"] > 0:
                terms["align"] = (1.0 - (image_embeds * text_embeds[labels]).sum(-1)).mean()
            if self.weights["sep"] > 0:
                to_other = (image_embeds * text_embeds[1 - labels]).sum(-1)
                between_anchors = text_embeds[0] @ text_embeds[1]
                terms["sep"] = F.relu(to_other - self.sep_margin).mean() + F.relu(between_anchors - self.anchor_margin)
            if self.weights["supcon"] > 0:
                terms["supcon"] = self.supervised_contrastive(image_embeds, labels, text_embeds)
        terms["loss"] = sum(self.weights[name] * value for name, value in terms.items())
        if self.training and self.memory_bank is not None:
            self.memory_bank.enqueue(image_embeds, labels)
        return terms

    def supervised_contrastive(self, features, labels, text_embeds):
        """SupCon over the batch, the memory bank and the two anchors; positives share the label.

        Empty bank slots (label -1) are masked rather than removed, so the shapes stay static (no device sync).
        """
        candidates, candidate_labels = [features], [labels]
        if self.memory_bank is not None:
            candidates.append(self.memory_bank.features.to(features.dtype))
            candidate_labels.append(self.memory_bank.labels)
        candidates.append(text_embeds)
        candidate_labels.append(torch.arange(2, device=labels.device))
        candidates, candidate_labels = torch.cat(candidates), torch.cat(candidate_labels)

        logits = features @ candidates.T / self.temperature
        valid = (candidate_labels >= 0)[None, :].expand_as(logits).clone()
        valid[:, : features.shape[0]].fill_diagonal_(False)
        log_prob = logits - torch.logsumexp(logits.masked_fill(~valid, float("-inf")), dim=1, keepdim=True)
        positives = valid & (candidate_labels[None, :] == labels[:, None])
        per_sample = -torch.where(positives, log_prob, 0.0).sum(1) / positives.sum(1)
        return per_sample.mean()


class MiraGePreTrainedModel(PreTrainedModel):
    config: MiraGeConfig
    base_model_prefix = "clip"
    main_input_name = "pixel_values"
    input_modalities = ("image",)
    _no_split_modules = ["CLIPTextEmbeddings", "CLIPEncoderLayer", "CLIPVisionEmbeddings"]
    supports_gradient_checkpointing = True
    _supports_sdpa = True
    _supports_flash_attn = True
    _supports_attention_backend = True
    _keys_to_ignore_on_load_missing = [r"loss_fn\.memory_bank\.", r"added_anchors\."]  # an adapter brings its anchors
    if not hasattr(PreTrainedModel, "activation_checkpointing_enable"):  # older name, in transformers 5.17
        activation_checkpointing_enable = PreTrainedModel.gradient_checkpointing_enable

    def _init_weights(self, module):
        """Initialises what a CLIP checkpoint does not hold (the nested CLIPModel initialises itself)."""
        if isinstance(module, MiraGePromptLearner):
            for prompt in module.text_prompts:
                init.normal_(prompt, std=0.02)
            token_ids, eos_positions = module.padded_prompt_ids(self.config)
            init.copy_(module.token_ids, token_ids)
            init.copy_(module.eos_positions, eos_positions)
            for coupling in module.vision_couplings:
                init.normal_(coupling.weight, std=coupling.in_features**-0.5)
                init.zeros_(coupling.bias)
        elif isinstance(module, MiraGeMemoryBank):
            init.zeros_(module.features)
            init.constant_(module.labels, -1)
            init.zeros_(module.position)
        elif module is getattr(self, "classifier", None):
            init.normal_(module.weight, std=0.02)
            init.zeros_(module.bias)
        elif isinstance(module, MiraGeAddedAnchors):
            init.normal_(module.directions, std=0.02)
            init.constant_(module.offsets, module.OFF)

    @torch.no_grad()
    def initialize_weights(self):
        """Also initialises CLIP's logit scale, which CLIP's own `_init_weights` leaves to its `__init__` (so a
        checkpoint without it, or a model built on the meta device, would keep uninitialised memory)."""
        super().initialize_weights()
        init.constant_(self.clip.logit_scale, self.config.clip_config.logit_scale_init_value)

    @classmethod
    def from_pretrained(cls, *args, **kwargs):
        """Loads as usual, then freezes CLIP again (loading materialises every weight as trainable)."""
        loaded = super().from_pretrained(*args, **kwargs)
        model = loaded[0] if isinstance(loaded, tuple) else loaded
        model.clip.requires_grad_(False)
        return loaded

    def save_pretrained(self, save_directory, *args, **kwargs):
        """Saves as usual; models registered for remote code list both Auto classes in `auto_map`."""
        if self._auto_class is not None:
            self.config.auto_map = {
                **(getattr(self.config, "auto_map", None) or {}),
                "AutoModel": "modeling_mirage.MiraGeModel",
                "AutoModelForImageClassification": "modeling_mirage.MiraGeForImageClassification",
            }
        return super().save_pretrained(save_directory, *args, **kwargs)


class MiraGeModel(MiraGePreTrainedModel):
    """Frozen CLIP + prompt learner (+ a linear head in `linear_probe` mode). Returns logits and embeddings."""

    def __init__(self, config: MiraGeConfig):
        super().__init__(config)
        self.clip = CLIPModel(config.clip_config)
        self.clip.requires_grad_(False)
        self.prompt_learner = MiraGePromptLearner(config)
        projection_dim = config.clip_config.projection_dim
        self.classifier = nn.Linear(projection_dim, 2) if config.mode == "linear_probe" else None
        added = config.added_fake_anchors
        self.added_anchors = MiraGeAddedAnchors(added, projection_dim) if added else None
        self._anchor_cache = None
        self.post_init()

    # ----------------------------------------------------------------------------------------- encoders

    def encode_text_anchors(self, text_prompts: list[torch.Tensor]) -> torch.Tensor:
        """Projected (not normalised) features of the two class prompts with the text prompts inserted."""
        text_model = self.clip.text_model
        token_ids = self.prompt_learner.token_ids
        embeds = text_model.embeddings.token_embedding(token_ids)
        if text_prompts:
            embeds = _replace_tokens(embeds, text_prompts[0], start=1)
        hidden = text_model.embeddings(inputs_embeds=embeds)
        causal_mask = self._causal_mask(hidden)
        for index, layer in enumerate(text_model.encoder.layers):
            if 1 <= index < len(text_prompts):
                hidden = _replace_tokens(hidden, text_prompts[index], start=1)
            hidden = layer(hidden, causal_mask, is_causal=True)
        hidden = text_model.final_layer_norm(hidden)
        pooled = hidden[torch.arange(hidden.shape[0], device=hidden.device), self.prompt_learner.eos_positions]
        return self.clip.text_projection(pooled)

    def encode_image(
        self,
        pixel_values: torch.Tensor,
        vision_prompts: list[torch.Tensor],
        output_hidden_states: bool | int | list[int] = False,
        output_attentions: bool = False,
    ) -> BaseModelOutputWithPooling:
        """The vision tower with the vision prompts appended after the patches.

        As in CLIP's `get_image_features`, `pooler_output` holds the projected (not normalised) image features;
        the hidden states and attentions (see `MiraGeOutput`) include the prompt tokens.
        """
        vision_model = self.clip.vision_model
        hidden = vision_model.embeddings(pixel_values.to(self.clip.visual_projection.weight.dtype))
        if vision_prompts:
            hidden = torch.cat([hidden, vision_prompts[0].to(hidden.dtype).expand(hidden.shape[0], -1, -1)], 1)
        hidden = vision_model.pre_layrnorm(hidden)
        hidden_states, attentions = [hidden], []

        def record_attention(module, args, output):  # CLIPAttention returns (output, weights or None)
            if output[1] is not None:
                attentions.append(output[1])

        layer_kwargs = {"output_attentions": True} if output_attentions else {}  # SDPA then warns, as in CLIP
        layers = vision_model.encoder.layers
        hooks = [layer.self_attn.register_forward_hook(record_attention) for layer in layers if output_attentions]
        try:
            for index, layer in enumerate(layers):
                if 1 <= index < len(vision_prompts):
                    hidden = _replace_tokens(hidden, vision_prompts[index], start=-vision_prompts[index].shape[0])
                hidden = layer(hidden, None, **layer_kwargs)
                hidden_states.append(hidden)
        finally:
            for hook in hooks:
                hook.remove()
        return BaseModelOutputWithPooling(
            last_hidden_state=hidden,
            pooler_output=self.clip.visual_projection(vision_model.post_layernorm(hidden[:, 0])),
            hidden_states=_selected_hidden_states(hidden_states, output_hidden_states),
            attentions=tuple(attentions) if output_attentions else None,
        )

    def _causal_mask(self, hidden: torch.Tensor) -> torch.Tensor | None:
        """Eager attention needs an explicit mask; SDPA and flash attention use `is_causal` instead."""
        if self.config.clip_config.text_config._attn_implementation != "eager":
            return None
        length = hidden.shape[1]
        blocked = torch.full((length, length), torch.finfo(hidden.dtype).min, device=hidden.device)
        return torch.triu(blocked, diagonal=1).to(hidden.dtype)[None, None]

    # ------------------------------------------------------------------------------------------ anchors

    def prompts_and_anchors(self) -> tuple[torch.Tensor | None, list[torch.Tensor]]:
        """(normalised text anchors or None, vision prompts). Cached in eval mode until a prompt changes.

        The cached ones are computed outside any autocast, at the model's own precision, so they do not depend on
        the context of the call that happened to fill the cache. `torch.jit.trace` neither reads nor fills the
        cache, so a fresh model traces the same graph on every call (and passes the trace's check).
        """
        if self.training:
            self._anchor_cache = None
        if self.training or torch.jit.is_tracing():  # a trace records the computation, not a cache it cannot see
            return self._compute_prompts_and_anchors()
        key = self._anchor_cache_key()
        if self._anchor_cache is None or self._anchor_cache[0] != key:
            with torch.inference_mode(False), torch.no_grad(), torch.autocast(self.device.type, enabled=False):
                self._anchor_cache = (key, self._compute_prompts_and_anchors())
        return self._anchor_cache[1]

    def text_anchors(self) -> torch.Tensor | None:
        """The L2-normalised class anchors (real, fake), `(2, projection_dim)`; None in `linear_probe` mode."""
        return self.prompts_and_anchors()[0]

    def _compute_prompts_and_anchors(self):
        text_prompts, vision_prompts = self.prompt_learner()
        if self.classifier is not None:
            return None, vision_prompts
        return F.normalize(self.encode_text_anchors(text_prompts), dim=-1), vision_prompts

    def _anchor_cache_key(self) -> tuple:
        """Changes whenever a tensor the anchors depend on is replaced, moved, cast or updated in place."""
        modules = (self.prompt_learner, self.clip.text_model, self.clip.text_projection)
        tensors = [t for module in modules for t in (*module.parameters(), *module.buffers())]
        return (
            self.clip.logit_scale.device,
            self.clip.logit_scale.dtype,
            tuple((id(t), t._version) for t in tensors),
        )

    # ---------------------------------------------------------------------------------------- inference

    def check_pixel_values(self, pixel_values: torch.Tensor | None):
        """Fails, naming the fix, on images of the wrong size; an empty batch checks a preprocessing before use."""
        vision_config = self.config.clip_config.vision_config
        expected = (vision_config.num_channels, vision_config.image_size, vision_config.image_size)
        if pixel_values is None or pixel_values.dim() != 4 or tuple(pixel_values.shape[1:]) != expected:
            got = "None" if pixel_values is None else f"a tensor of shape {tuple(pixel_values.shape)}"
            if pixel_values is not None and pixel_values.dim() == 4:
                got = f"images of shape {tuple(pixel_values.shape[1:])}"
            raise ValueError(
                f"pixel_values must have shape (batch, {', '.join(map(str, expected))}) for this model, got {got}. "
                f"Preprocess images with the model's image processor (its crop size must be {expected[1]})."
            )

    @staticmethod
    def check_labels(labels: torch.Tensor, pixel_values: torch.Tensor | None) -> torch.LongTensor:
        """The labels as class indices (0 real, 1 fake), one per image; ValueError for anything else.

        One rule in every mode: the MiraGe terms (anchor alignment, separation, SupCon and its memory bank) need a
        class per image, so float labels (one-hot or soft targets) are refused rather than silently read as soft
        cross-entropy targets in some modes and failing as indices in others.
        """
        batch = None if pixel_values is None else pixel_values.shape[0]
        if labels.dtype.is_floating_point or labels.dtype.is_complex or labels.dtype == torch.bool:
            raise ValueError(
                f"labels must be class indices (0 real, 1 fake) of an integer dtype, got {labels.dtype} of shape "
                f"{tuple(labels.shape)}; for one-hot labels pass labels.argmax(-1)"
            )
        if labels.dim() != 1 or (batch is not None and labels.shape[0] != batch):
            raise ValueError(f"labels must have shape ({batch},), one class index per image, got {tuple(labels.shape)}")
        return labels.long()

    # ------------------------------------------------------------------------------------------- stages

    def get_image_features(
        self,
        pixel_values: torch.Tensor,
        output_hidden_states: bool | int | list[int] | None = None,
        output_attentions: bool | None = None,
        vision_prompts: list[torch.Tensor] | None = None,
    ) -> BaseModelOutputWithPooling:
        """The image stage: the vision tower with the vision prompts (`encode_image`); by default this model's,
        `forward` passes the ones it computed with the anchors (`prompts_and_anchors`).

        As in CLIP, `pooler_output` holds the projected, not normalised, image features; hidden states and
        attentions (unset flags come from the config) include the prompt tokens (see `MiraGeOutput`).
        """
        self.check_pixel_values(pixel_values)
        config = self.config
        output_hidden_states = config.output_hidden_states if output_hidden_states is None else output_hidden_states
        output_attentions = config.output_attentions if output_attentions is None else output_attentions
        if vision_prompts is None:
            vision_prompts = self.prompts_and_anchors()[1]
        return self.encode_image(pixel_values, vision_prompts, output_hidden_states, output_attentions)

    def get_logits(
        self, image_features: torch.Tensor, text_anchors: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Uncalibrated (real, fake) logits of projected image features, and the L2-normalised image embeddings: the
        linear head in `linear_probe` mode, else the scaled cosines to the anchors (`text_anchors()`), added fake
        anchors joined to the fake class."""
        image_embeds = F.normalize(image_features, dim=-1)
        if self.classifier is not None:
            return self.classifier(image_features), image_embeds
        scale = self.clip.logit_scale.exp()
        logits = scale * image_embeds @ text_anchors.to(image_embeds.dtype).T
        if self.added_anchors is not None:
            logits = self.added_anchors(logits, image_embeds, scale)
        return logits, image_embeds

    def forward(
        self,
        pixel_values: torch.Tensor | None = None,
        output_hidden_states: bool | None = None,
        output_attentions: bool | None = None,
        return_dict: bool | None = None,
        **kwargs,
    ) -> MiraGeOutput | tuple:
        """`get_image_features` and `get_logits` on the anchors and prompts of `prompts_and_anchors` (computed once),
        calibrated by `calibrate_logits`."""
        text_anchors, vision_prompts = self.prompts_and_anchors()
        vision = self.get_image_features(pixel_values, output_hidden_states, output_attentions, vision_prompts)
        logits, image_embeds = self.get_logits(vision.pooler_output, text_anchors)
        return self._returned(self.detection_output(logits, image_embeds, vision), return_dict)

    def detection_output(
        self, logits: torch.Tensor, image_embeds: torch.Tensor, vision: BaseModelOutputWithPooling, **losses
    ) -> MiraGeOutput:
        """The output fields of uncalibrated `logits`, the image embeddings and the image stage's output (plus any
        loss terms)."""
        config = self.config
        return MiraGeOutput(
            **calibrate_logits(logits, config.calibration_temperature, config.decision_threshold),
            image_embeds=image_embeds,
            hidden_states=vision.hidden_states,
            attentions=vision.attentions,
            **losses,
        )

    def _returned(self, output: MiraGeOutput, return_dict: bool | None) -> MiraGeOutput | tuple:
        """transformers' rule: `return_dict=False` (or `config.return_dict=False`, or `config.torchscript=True`)
        gives `to_tuple()`, the fields that are set, in order."""
        if return_dict is None:
            return_dict = self.config.return_dict and not getattr(self.config, "torchscript", False)
        return output if return_dict else output.to_tuple()


class MiraGeForImageClassification(MiraGeModel):
    """MiraGe detector: `MiraGeModel` plus the MiraGe loss when `labels` (0 real, 1 fake) are given."""

    def __init__(self, config: MiraGeConfig):
        super().__init__(config)
        self.loss_fn = MiraGeLoss(config)
        if self.loss_fn.memory_bank is not None:  # training state, left out of exported models
            self._keys_to_ignore_on_save = [f"loss_fn.{name}" for name, _ in self.loss_fn.named_buffers()]
        self.post_init()

    def forward(
        self,
        pixel_values: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        output_hidden_states: bool | None = None,
        output_attentions: bool | None = None,
        return_dict: bool | None = None,
        **kwargs,
    ) -> MiraGeOutput | tuple:
        """`MiraGeModel.forward`, plus `loss` and its unweighted terms (`loss_ce`, ...) when `labels` are given."""
        if labels is None:
            return super().forward(pixel_values, output_hidden_states, output_attentions, return_dict)
        labels = self.check_labels(labels, pixel_values)
        text_anchors, vision_prompts = self.prompts_and_anchors()
        vision = self.get_image_features(pixel_values, output_hidden_states, output_attentions, vision_prompts)
        logits, image_embeds = self.get_logits(vision.pooler_output, text_anchors)
        terms = self.loss_fn(logits, image_embeds, text_anchors, labels.to(logits.device))
        losses = {f"loss_{name}" if name != "loss" else name: value for name, value in terms.items()}
        return self._returned(self.detection_output(logits, image_embeds, vision, **losses), return_dict)


__all__ = [
    "MiraGeForImageClassification",
    "MiraGeModel",
    "MiraGeOutput",
    "MiraGePreTrainedModel",
    "MiraGePromptLearner",
    "MiraGeLoss",
    "MiraGeMemoryBank",
]

import math

import pytest
import torch
import torch.nn.functional as F
from conftest import IMAGE_SIZE, tiny_clip_config

from mirage_hf import MiraGeConfig, MiraGeForImageClassification, MiraGeMemoryBank, MiraGeModel
from mirage_hf.modeling_mirage import MiraGeLoss

MODES = ["zero_shot", "linear_probe", "coop", "maple", "mirage"]
TRAINABLE_PREFIX = {
    "zero_shot": None,
    "linear_probe": "classifier.",
    "coop": "prompt_learner.text_prompts.0",
    "maple": "prompt_learner.",
    "mirage": "prompt_learner.",
}


def separable_batch(n=16, seed=0):
    """Reals are dark noise, fakes bright noise: separable by anything that sees the image."""
    generator = torch.Generator().manual_seed(seed)
    labels = torch.arange(n) % 2
    noise = torch.randn(n, 3, IMAGE_SIZE, IMAGE_SIZE, generator=generator) * 0.5
    return noise + (labels.float() * 2 - 1).view(-1, 1, 1, 1), labels


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_without_prompts_the_layer_loop_equals_stock_clip(make_model, pixel_values, attn):
    model = make_model("zero_shot", cls=MiraGeModel)
    model.set_attn_implementation(attn)
    with torch.no_grad():
        ours_image = model.encode_image(pixel_values, []).pooler_output
        clip_image = model.clip.get_image_features(pixel_values=pixel_values).pooler_output
        ours_text = model.encode_text_anchors([])
        clip_text = model.clip.get_text_features(input_ids=model.prompt_learner.token_ids).pooler_output
    torch.testing.assert_close(ours_image, clip_image, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ours_text, clip_text, atol=1e-5, rtol=1e-5)


def test_prompts_change_the_features(make_model, pixel_values):
    model = make_model("maple")
    with torch.no_grad():
        text_prompts, vision_prompts = model.prompt_learner()
        assert not torch.allclose(
            model.encode_image(pixel_values, vision_prompts).pooler_output,
            model.encode_image(pixel_values, []).pooler_output,
        )


@pytest.mark.parametrize("mode", MODES)
def test_each_rung_has_the_contracted_outputs(make_model, pixel_values, mode):
    model = make_model(mode)
    out = model(pixel_values)
    assert out.logits.shape == (4, 2) and out.loss is None
    assert out.image_embeds.shape == (4, 16)
    torch.testing.assert_close(out.image_embeds.norm(dim=-1), torch.ones(4))
    anchors = model.text_anchors()
    if mode == "linear_probe":
        assert anchors is None
    else:
        assert anchors.shape == (2, 16)
        torch.testing.assert_close(anchors.norm(dim=-1), torch.ones(2))
    labelled = model(pixel_values, labels=torch.tensor([0, 1, 0, 1]))
    assert labelled.loss.ndim == 0 and torch.isfinite(labelled.loss)
    assert labelled.loss_ce is not None
    assert (labelled.loss_align is not None) == (mode == "mirage")
    assert (labelled.loss_supcon is not None) == (mode == "mirage")


@pytest.mark.parametrize("mode", MODES)
def test_only_prompts_or_head_train_and_clip_stays_bit_identical(make_model, mode):
    model = make_model(mode).train()
    trainable = [name for name, p in model.named_parameters() if p.requires_grad]
    prefix = TRAINABLE_PREFIX[mode]
    if prefix is None:
        assert trainable == []
        return
    assert trainable and all(name.startswith(prefix) for name in trainable)
    clip_before = {k: v.clone() for k, v in model.clip.state_dict().items()}
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=0.1)
    pixels, labels = separable_batch()
    model(pixels, labels=labels).loss.backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)
    assert all(p.grad is None for p in model.clip.parameters())
    optimizer.step()
    for key, value in model.clip.state_dict().items():
        assert torch.equal(value, clip_before[key]), key


@pytest.mark.parametrize("mode", ["linear_probe", "coop", "maple", "mirage"])
def test_a_few_steps_on_separable_data_lower_the_classification_loss(make_model, mode):
    """The cross-entropy falls (in `mirage` mode its own term: the supervised contrastive term rises while the
    memory bank fills, so the sum says little about learning in 15 steps)."""
    model = make_model(mode, memory_bank_size=32).train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=0.05)
    pixels, labels = separable_batch()
    losses = []
    for _ in range(15):
        outputs = model(pixels, labels=labels)
        optimizer.zero_grad()
        outputs.loss.backward()
        optimizer.step()
        losses.append((outputs.loss_ce if mode == "mirage" else outputs.loss).item())
    assert losses[-1] < 0.85 * losses[0], losses


def test_activation_checkpointing_gives_the_same_loss_and_gradients(make_model):
    """Same loss and gradients, and the encoder layers really are recomputed in the backward pass (without
    checkpointing no layer runs there), so the equality is not that of two identical runs."""
    pixels, labels = separable_batch(4)
    results, recomputed, calls = [], [], []
    for checkpointing in (False, True):
        model = make_model("maple")
        model.train()
        if checkpointing:
            model.activation_checkpointing_enable()
        layers = [*model.clip.text_model.encoder.layers, *model.clip.vision_model.encoder.layers]
        # Hooks inside each layer (its MLP): recent transformers keep the layer's own hooks out of the recompute.
        hooks = [layer.mlp.register_forward_pre_hook(lambda *_: calls.append(1)) for layer in layers]
        loss = model(pixels, labels=labels).loss
        calls.clear()
        loss.backward()
        recomputed.append(len(calls))
        for hook in hooks:
            hook.remove()
        results.append((loss.detach(), model.prompt_learner.text_prompts[1].grad.clone()))
    assert recomputed == [0, len(layers)]
    torch.testing.assert_close(results[0][0], results[1][0])
    torch.testing.assert_close(results[0][1], results[1][1])


def test_eval_anchors_are_cached_and_follow_prompt_changes(make_model, pixel_values, monkeypatch):
    model = make_model("mirage").eval()
    calls = []
    encode = model.encode_text_anchors
    monkeypatch.setattr(model, "encode_text_anchors", lambda prompts: calls.append(1) or encode(prompts))
    with torch.no_grad():
        cached = model(pixel_values).logits
        model(pixel_values)
    assert len(calls) == 1

    def uncached_logits():
        model._anchor_cache = None
        with torch.no_grad():
            return model(pixel_values).logits

    torch.testing.assert_close(cached, uncached_logits())

    model.train()
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1.0)
    pixels, labels = separable_batch(4)
    model(pixels, labels=labels).loss.backward()
    optimizer.step()
    model.eval()
    with torch.no_grad():
        after_step = model(pixel_values).logits
    assert not torch.allclose(after_step, cached)
    torch.testing.assert_close(after_step, uncached_logits())

    with torch.no_grad():
        model.prompt_learner.text_prompts[1].mul_(3.0)
        after_edit = model(pixel_values).logits
    assert not torch.allclose(after_edit, after_step)
    torch.testing.assert_close(after_edit, uncached_logits())


def test_cached_anchors_work_under_inference_mode_and_then_with_grad(make_model, pixel_values):
    model = make_model("maple").eval()
    with torch.inference_mode():
        expected = model(pixel_values).logits
    pixels = pixel_values.clone().requires_grad_(True)
    logits = model(pixels).logits
    logits[:, 1].sum().backward()
    assert pixels.grad is not None
    torch.testing.assert_close(logits.detach(), expected.clone())


def test_cached_anchors_do_not_depend_on_the_autocast_of_the_call_that_filled_the_cache(make_model, pixel_values):
    model = make_model("mirage").eval()
    with torch.inference_mode():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            model(pixel_values)
            filled_under_autocast = model.text_anchors()
        model._anchor_cache = None
        model(pixel_values)
        filled_in_fp32 = model.text_anchors()
    assert filled_under_autocast.dtype == torch.float32
    torch.testing.assert_close(filled_under_autocast, filled_in_fp32, rtol=0, atol=0)


def test_batch_invariance_in_fp32(make_model, pixel_values):
    model = make_model("mirage").eval()
    with torch.no_grad():
        batch = model(pixel_values).logits
        alone = torch.cat([model(pixel_values[i : i + 1]).logits for i in range(len(pixel_values))])
    torch.testing.assert_close(alone, batch, atol=1e-5, rtol=1e-5)


def test_wrong_image_size_is_a_clear_error(make_model):
    model = make_model("mirage")
    with pytest.raises(ValueError, match=r"must have shape \(batch, 3, 30, 30\).*got images of shape \(3, 32, 32\)"):
        model(torch.randn(2, 3, 32, 32))


def threshold_between(p_fake: torch.Tensor) -> float:
    """A threshold halfway between the two middle scores, so that half the inputs fall on each side of it."""
    middle = p_fake.sort().values[len(p_fake) // 2 - 1 : len(p_fake) // 2 + 1]
    assert middle[0] < middle[1], "the scores must differ for a threshold between them to exist"
    return middle.mean().item()


def test_added_fake_anchors_make_p_fake_one_minus_p_real_over_every_anchor(make_model, pixel_values, tmp_path, caplog):
    """An added anchor's logit `scale * (cos + offset)` joins the fake class: softmax over (real, fake, added)
    gives p(real) as the model's; a detector saved without anchors loads with them (switched off) without a
    warning, so an adapter can bring its own."""
    model = make_model("mirage").eval()
    model.save_pretrained(tmp_path / "base")
    with caplog.at_level("WARNING"):
        added = MiraGeForImageClassification.from_pretrained(tmp_path / "base", added_fake_anchors=2).eval()
    assert "added_anchors" not in caplog.text
    with torch.no_grad():
        base_logits = model(pixel_values).logits
        torch.testing.assert_close(added(pixel_values).logits, base_logits, atol=1e-4, rtol=0)  # off: nearly none
        added.added_anchors.directions.normal_()
        added.added_anchors.offsets.copy_(torch.tensor([0.3, -0.1]))
        out = added(pixel_values)
        embeds, scale = out.image_embeds, added.clip.logit_scale.exp()
        extra = scale * (embeds @ F.normalize(added.added_anchors.directions, dim=-1).T + added.added_anchors.offsets)
        every = torch.cat([base_logits, extra], 1)  # temperature 1, threshold 0.5: logits are the raw ones
    torch.testing.assert_close(1 - out.p_fake, every.softmax(-1)[:, 0])
    assert (out.p_fake > torch.sigmoid(base_logits[:, 1] - base_logits[:, 0])).all()


def test_calibration_moves_the_decision(make_model, pixel_values):
    """The threshold lies between the inputs' calibrated scores, so calibration must call some of them fake that
    the uncalibrated logits call real (or the reverse): logits that ignored the calibration would not."""
    model = make_model("mirage").eval()
    with torch.no_grad():
        raw = model(pixel_values).logits  # temperature 1, threshold 0.5: the uncalibrated logits
        p_raw = torch.sigmoid((raw[:, 1] - raw[:, 0]) / 2.0)
        model.config.calibration_temperature = 2.0
        model.config.decision_threshold = threshold_between(p_raw)
        shifted = model(pixel_values).logits
    decided_fake = shifted.softmax(-1)[:, 1] >= 0.5
    assert torch.equal(decided_fake, p_raw >= model.config.decision_threshold)
    assert decided_fake.sum() == 2 and not torch.equal(decided_fake, raw[:, 1] >= raw[:, 0])


@pytest.mark.parametrize("mode", ["mirage", "linear_probe"])
def test_output_carries_the_raw_logit_difference_and_the_calibrated_p_fake(make_model, pixel_values, mode):
    """The one calibrated score every consumer reads (the pipeline's fake score, the threshold folded in), next to
    the ranking score that no temperature moves; it decides at 0.5 as the temperature-scaled probability does at
    the threshold, which lies between the inputs' scores."""
    model = make_model(mode).eval()
    with torch.no_grad():
        logits, _ = model.get_logits(model.get_image_features(pixel_values).pooler_output, model.text_anchors())
        z = logits[:, 1] - logits[:, 0]
        model.config.calibration_temperature = 0.4
        model.config.decision_threshold = threshold_between(torch.sigmoid(z / 0.4))
        out = model(pixel_values)
    assert out.logit_diff.shape == out.p_fake.shape == (4,) and out.p_fake.dtype == torch.float32
    torch.testing.assert_close(out.logit_diff, z)
    threshold = model.config.decision_threshold
    torch.testing.assert_close(out.p_fake, torch.sigmoid(z / 0.4 - math.log(threshold / (1 - threshold))))
    torch.testing.assert_close(out.p_fake, out.logits.softmax(-1)[:, 1])
    decided_fake = out.p_fake >= 0.5
    assert torch.equal(decided_fake, torch.sigmoid(z / 0.4) >= threshold) and decided_fake.sum() == 2


# ------------------------------------------------------------------------------------------------- loss


def loss_module(**overrides):
    config = MiraGeConfig(clip_config=tiny_clip_config(), prompt_depth=2, **overrides)
    return MiraGeLoss(config)


IMAGE = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
ANCHORS = torch.tensor([[1.0, 0.0], [0.6, 0.8]])
LABELS = torch.tensor([0, 1])
LOGITS = torch.tensor([[2.0, 0.0], [0.0, 1.0]])


def test_each_loss_term_matches_a_hand_computed_value():
    loss = loss_module(
        sep_margin=0.0,
        anchor_margin=0.5,
        supcon_temperature=1.0,
        memory_bank_size=0,
        ce_weight=1.0,
        align_weight=2.0,
        sep_weight=3.0,
        supcon_weight=4.0,
    )
    terms = loss(LOGITS, IMAGE, ANCHORS, LABELS)
    ce = (-math.log(math.e**2 / (math.e**2 + 1)) - math.log(math.e / (1 + math.e))) / 2
    align = (0.0 + 0.2) / 2
    sep = (0.6 + 0.0) / 2 + (0.6 - 0.5)
    supcon = (-(1.0 - math.log(1 + math.e + math.exp(0.6))) - (0.8 - math.log(2 + math.exp(0.8)))) / 2
    assert terms["ce"].item() == pytest.approx(ce, abs=1e-6)
    assert terms["align"].item() == pytest.approx(align, abs=1e-6)
    assert terms["sep"].item() == pytest.approx(sep, abs=1e-6)
    assert terms["supcon"].item() == pytest.approx(supcon, abs=1e-6)
    assert terms["loss"].item() == pytest.approx(ce + 2 * align + 3 * sep + 4 * supcon, abs=1e-5)


def test_zero_weight_switches_a_term_off_and_other_modes_use_ce_only():
    assert set(loss_module(sep_weight=0.0, memory_bank_size=0)(LOGITS, IMAGE, ANCHORS, LABELS)) == {
        "ce",
        "align",
        "supcon",
        "loss",
    }
    terms = loss_module(mode="maple")(LOGITS, IMAGE, ANCHORS, LABELS)
    assert set(terms) == {"ce", "loss"}
    assert terms["loss"].item() == pytest.approx(F.cross_entropy(LOGITS, LABELS).item())


def stored(bank):
    """The bank's filled slots (empty ones have label -1; the loss masks them instead)."""
    keep = bank.labels >= 0
    return bank.features[keep], bank.labels[keep]


def test_memory_bank_is_a_fifo():
    bank = MiraGeMemoryBank(size=4, dim=1)
    bank.enqueue(torch.tensor([[1.0], [2.0], [3.0]]), torch.tensor([0, 1, 0]))
    features, labels = stored(bank)
    assert features.flatten().tolist() == [1.0, 2.0, 3.0] and labels.tolist() == [0, 1, 0]
    bank.enqueue(torch.tensor([[4.0], [5.0]]), torch.tensor([1, 1]))
    features, labels = stored(bank)
    assert sorted(features.flatten().tolist()) == [2.0, 3.0, 4.0, 5.0]
    bank.enqueue(torch.arange(10.0, 16.0).view(-1, 1), torch.zeros(6, dtype=torch.long))
    assert sorted(stored(bank)[0].flatten().tolist()) == [12.0, 13.0, 14.0, 15.0]


def test_a_batch_never_meets_itself_in_the_bank_and_is_enqueued_after():
    with_bank = loss_module(supcon_temperature=1.0, memory_bank_size=8).train()
    with_bank.memory_bank = MiraGeMemoryBank(size=8, dim=2)
    without_bank = loss_module(supcon_temperature=1.0, memory_bank_size=0)
    first = with_bank(LOGITS, IMAGE, ANCHORS, LABELS)["supcon"]
    assert first.item() == pytest.approx(without_bank(LOGITS, IMAGE, ANCHORS, LABELS)["supcon"].item())
    features, labels = stored(with_bank.memory_bank)
    assert torch.equal(features, IMAGE) and torch.equal(labels, LABELS)
    second = with_bank(LOGITS, IMAGE, ANCHORS, LABELS)["supcon"]
    assert second.item() != pytest.approx(first.item())


def test_evaluation_does_not_touch_the_bank():
    loss = loss_module(memory_bank_size=8).eval()
    loss.memory_bank = MiraGeMemoryBank(size=8, dim=2)
    loss(LOGITS, IMAGE, ANCHORS, LABELS)
    assert stored(loss.memory_bank)[0].shape[0] == 0


def test_memory_bank_is_checkpointed_but_not_exported(make_model, tmp_path):
    model = make_model("mirage", memory_bank_size=8)
    assert "loss_fn.memory_bank.features" in model.state_dict()
    model.save_pretrained(tmp_path)
    from safetensors import safe_open

    with safe_open(tmp_path / "model.safetensors", "pt") as handle:
        assert not any(key.startswith("loss_fn.") for key in handle.keys())


def test_a_training_forward_runs_the_text_encoder_once_for_the_two_prompts(make_model, monkeypatch):
    model = make_model("mirage").train()
    calls = []
    encode = model.encode_text_anchors
    monkeypatch.setattr(model, "encode_text_anchors", lambda prompts: calls.append(1) or encode(prompts))
    pixels, labels = separable_batch(8)
    model(pixels, labels=labels).loss.backward()
    assert len(calls) == 1

"""MiraGe behaves like a transformers model: output conventions, batched pipelines, fixed labels, weight
initialisation, tokenizer checks and exports, on tiny CLIPs (one of them with OpenAI's real BPE vocabulary)."""

import numpy as np
import pytest
import torch
from conftest import IMAGE_SIZE, openai_clip_tokenizer
from PIL import Image
from safetensors.torch import load_file, save_file
from transformers import pipeline

from mirage_hf import MiraGeConfig, MiraGeForImageClassification, MiraGeModel, from_clip
from mirage_hf.demo.tiny import tiny_tokenizer

N_LAYERS, N_HEADS, N_PATCHES, N_CTX = 3, 4, (IMAGE_SIZE // 6) ** 2, 2


def random_images(n, seed=0):
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 255, (24 + 4 * i, 40, 3), dtype=np.uint8)) for i in range(n)]


# ------------------------------------------------------------------------------------ batched pipelines


@pytest.mark.parametrize("batch_size", [3, 8])
def test_pipeline_batches_give_the_per_image_scores(detector_dir, batch_size):
    detector = pipeline("image-classification", model=str(detector_dir))
    images = random_images(11)
    one_by_one = [detector(image) for image in images]
    batched = detector(images, batch_size=batch_size)
    assert len(batched) == len(images)
    for single, row in zip(one_by_one, batched, strict=True):
        assert [r["label"] for r in row] == [r["label"] for r in single]
        assert [r["score"] for r in row] == pytest.approx([r["score"] for r in single], abs=1e-5)


@pytest.mark.parametrize("mode", ["linear_probe", "mirage"])
def test_every_output_field_has_one_row_per_image(make_model, pixel_values, mode):
    model = make_model(mode).eval()
    out = model(pixel_values, labels=torch.tensor([0, 1, 0, 1]), output_hidden_states=True)
    for name, value in out.items():
        tensors = value if isinstance(value, tuple) else (value,)
        assert all(t.ndim == 0 or t.shape[0] == 4 for t in tensors), name  # scalars are the losses


def test_text_anchors_are_the_ones_the_logits_use(make_model, pixel_values):
    model = make_model("mirage").eval()
    with torch.no_grad():
        out = model(pixel_values)
        anchors = model.text_anchors()
    expected = model.clip.logit_scale.exp() * out.image_embeds @ anchors.T
    torch.testing.assert_close(out.logits, expected)


# ------------------------------------------------------------------- hidden states, attentions, tuples


def test_hidden_states_and_attentions_equal_stock_clip_without_prompts(make_model, pixel_values):
    model = make_model("zero_shot", attn_implementation="eager").eval()
    with torch.no_grad():
        ours = model(pixel_values, output_hidden_states=True, output_attentions=True)
        clip = model.clip.vision_model(pixel_values, output_hidden_states=True, output_attentions=True)
    assert len(ours.hidden_states) == N_LAYERS + 1 and len(ours.attentions) == N_LAYERS
    for mine, reference in zip(ours.hidden_states + ours.attentions, clip.hidden_states + clip.attentions):
        torch.testing.assert_close(mine, reference)


@pytest.mark.parametrize("selection", [[0, 2], (1, 3), [0, -1], 1, -1, [5]])
def test_hidden_states_selected_by_index_are_the_ones_stock_clip_returns(make_model, pixel_values, selection):
    """`output_hidden_states=[0, 2]` keeps those and gives None elsewhere, by the rule of the installed transformers'
    CLIP (which changed between 5.17 and 5.2x): compared with CLIP itself, with prompts off."""
    model = make_model("zero_shot").eval()
    with torch.no_grad():
        ours = model(pixel_values, output_hidden_states=selection).hidden_states
        clip = model.clip.vision_model(pixel_values, output_hidden_states=selection).hidden_states
    assert [h is None for h in ours] == [h is None for h in clip]
    assert any(h is None for h in ours) or isinstance(selection, int)
    for mine, reference in zip(ours, clip):
        if reference is not None:
            torch.testing.assert_close(mine, reference)


def test_hidden_states_and_attentions_include_the_prompt_tokens(make_model, pixel_values):
    model = make_model("mirage", attn_implementation="eager").eval()
    with torch.no_grad():
        out = model(pixel_values, output_hidden_states=True, output_attentions=True)
        _, vision_prompts = model.prompts_and_anchors()
    tokens = 1 + N_PATCHES + N_CTX
    assert [h.shape for h in out.hidden_states] == [(4, tokens, 32)] * (N_LAYERS + 1)
    assert [a.shape for a in out.attentions] == [(4, N_HEADS, tokens, tokens)] * N_LAYERS
    torch.testing.assert_close(out.attentions[0].sum(-1), torch.ones(4, N_HEADS, tokens))
    first_prompts = model.clip.vision_model.pre_layrnorm(
        torch.cat([torch.zeros(1, tokens - N_CTX, 32), vision_prompts[0][None]], 1)
    )[0, -N_CTX:]
    torch.testing.assert_close(out.hidden_states[0][:, -N_CTX:], first_prompts.expand(4, -1, -1))
    vision_model = model.clip.vision_model
    pooled = model.clip.visual_projection(vision_model.post_layernorm(out.hidden_states[-1][:, 0]))
    torch.testing.assert_close(torch.nn.functional.normalize(pooled, dim=-1), out.image_embeds)


def test_output_flags_default_to_the_config(make_model, pixel_values):
    model = make_model("mirage", attn_implementation="eager").eval()
    assert model(pixel_values).hidden_states is None and model(pixel_values).attentions is None
    model.config.output_hidden_states = True
    model.config.output_attentions = True
    out = model(pixel_values)
    assert len(out.hidden_states) == N_LAYERS + 1 and len(out.attentions) == N_LAYERS
    assert model(pixel_values, output_hidden_states=False).hidden_states is None


def test_sdpa_returns_no_attention_weights_as_clip_does(make_model, pixel_values):
    model = make_model("mirage").eval()
    assert model.config.clip_config.vision_config._attn_implementation == "sdpa"
    with torch.no_grad():
        assert model(pixel_values, output_attentions=True).attentions == ()
        assert model.clip.vision_model(pixel_values, output_attentions=True).attentions == ()


@pytest.mark.parametrize("cls", [MiraGeModel, MiraGeForImageClassification])
def test_return_dict_false_gives_the_output_as_a_tuple(make_model, pixel_values, cls):
    model = make_model("mirage", cls=cls).eval()
    with torch.no_grad():
        expected = model(pixel_values, output_hidden_states=True)
        as_tuple = model(pixel_values, output_hidden_states=True, return_dict=False)
        model.config.return_dict = False
        from_config = model(pixel_values)
    assert isinstance(as_tuple, tuple) and isinstance(from_config, tuple)
    assert len(as_tuple) == len(expected.to_tuple()) == 5  # logits, image_embeds, logit_diff, p_fake, hidden_states
    torch.testing.assert_close(as_tuple[0], expected.logits)
    torch.testing.assert_close(as_tuple[2], expected.logit_diff)
    torch.testing.assert_close(as_tuple[3], expected.p_fake)
    torch.testing.assert_close(as_tuple[4], expected.hidden_states)
    torch.testing.assert_close(from_config[0], expected.logits)
    assert isinstance(model(pixel_values, return_dict=True).logits, torch.Tensor)


@pytest.mark.parametrize("mode", ["linear_probe", "coop", "mirage"])
def test_labels_are_class_indices_in_every_mode(make_model, pixel_values, mode):
    """One rule for every mode: integer class indices train (any integer dtype), float labels (one-hot or soft) and
    misshapen ones are a ValueError that says what to pass, never soft targets in one mode and an IndexError in
    another."""
    model = make_model(mode)
    indices = torch.tensor([0, 1, 0, 1])
    expected = model(pixel_values, labels=indices).loss
    torch.testing.assert_close(model(pixel_values, labels=indices.int()).loss, expected)
    one_hot = torch.nn.functional.one_hot(indices, 2)
    with pytest.raises(ValueError, match=r"class indices .* got torch.float32 .*labels.argmax\(-1\)"):
        model(pixel_values, labels=one_hot.float())
    with pytest.raises(ValueError, match=r"shape \(4,\)"):
        model(pixel_values, labels=one_hot)
    with pytest.raises(ValueError, match=r"shape \(4,\)"):
        model(pixel_values, labels=indices[:3])


def test_labelled_tuple_starts_with_the_loss(make_model, pixel_values):
    model = make_model("mirage").eval()
    labels = torch.tensor([0, 1, 0, 1])
    loss, logits, *_ = model(pixel_values, labels=labels, return_dict=False)
    expected = model(pixel_values, labels=labels)
    torch.testing.assert_close(loss, expected.loss)
    torch.testing.assert_close(logits, expected.logits)


def test_torchscript_config_traces_with_jit(make_model, pixel_values):
    """A fresh model traces without a warm-up call: the trace's own check (two traces compared) passes, since
    tracing neither fills nor reads the anchor cache."""
    model = make_model("mirage").eval()
    model.config.torchscript = True
    traced = torch.jit.trace(model, pixel_values)  # check_trace=True: raises TracingCheckError if the graphs differ
    model.config.torchscript = False
    expected = model(pixel_values).logits
    torch.testing.assert_close(traced(pixel_values)[0], expected)
    other = torch.randn(4, 3, IMAGE_SIZE, IMAGE_SIZE, generator=torch.Generator().manual_seed(5))
    torch.testing.assert_close(traced(other)[0], model(other).logits)


# -------------------------------------------------------------------------------------- fixed labels


def test_the_label_set_cannot_be_changed_at_construction():
    with pytest.raises(ValueError, match="label set of a MiraGe detector is fixed"):
        MiraGeConfig(num_labels=5)
    with pytest.raises(ValueError, match="label set of a MiraGe detector is fixed"):
        MiraGeConfig(id2label={0: "LABEL_0", 1: "LABEL_1"})
    same = MiraGeConfig(num_labels=2, id2label={"0": "real", "1": "fake"}, label2id={"real": 0, "fake": 1})
    assert same.id2label == {0: "real", 1: "fake"} and same.num_labels == 2


def test_the_label_set_cannot_be_changed_at_load(detector_dir):
    with pytest.raises(ValueError, match=r"num_labels = 2\); got 5"):
        MiraGeForImageClassification.from_pretrained(detector_dir, num_labels=5)
    with pytest.raises(ValueError, match="label set of a MiraGe detector is fixed"):
        MiraGeConfig.from_pretrained(detector_dir, id2label={0: "a", 1: "b"})
    assert MiraGeForImageClassification.from_pretrained(detector_dir, num_labels=2).config.id2label[1] == "fake"


def test_the_label_set_cannot_be_changed_by_assignment():
    config = MiraGeConfig()
    for key, value in [("num_labels", 3), ("id2label", {0: "cat", 1: "dog"}), ("label2id", {"real": 1, "fake": 0})]:
        with pytest.raises(ValueError, match=f"MiraGeConfig.{key}: the label set"):
            setattr(config, key, value)
    assert config.id2label == {0: "real", 1: "fake"} and config.label2id == {"real": 0, "fake": 1}
    config.num_labels = 2  # no change: fine
    assert MiraGeConfig.from_dict(config.to_dict()).id2label == {0: "real", 1: "fake"}


# -------------------------------------------------------------------------- initialisation, saving


@pytest.mark.missing_weights_expected  # the point of the test: the checkpoint lacks clip.logit_scale
def test_a_checkpoint_without_logit_scale_gets_clip_s_initial_value(detector_dir, tmp_path, pixel_values):
    import shutil

    folder = shutil.copytree(detector_dir, tmp_path / "model")
    weights = load_file(folder / "model.safetensors")
    del weights["clip.logit_scale"]
    save_file(weights, folder / "model.safetensors", metadata={"format": "pt"})
    model = MiraGeForImageClassification.from_pretrained(folder)
    expected = model.config.clip_config.logit_scale_init_value
    assert model.clip.logit_scale.item() == pytest.approx(expected)
    assert torch.isfinite(model(pixel_values).logits).all()
    weights["clip.logit_scale"] = torch.tensor(3.0)  # a stored value is kept
    save_file(weights, folder / "model.safetensors", metadata={"format": "pt"})
    assert MiraGeForImageClassification.from_pretrained(folder).clip.logit_scale.item() == 3.0


def test_init_weights_after_meta_construction_gives_finite_logits(detector_dir, pixel_values):
    config = MiraGeConfig.from_pretrained(detector_dir)
    with torch.device("meta"):
        model = MiraGeForImageClassification(config)
    model.to_empty(device="cpu")
    with torch.no_grad():
        model.clip.logit_scale.fill_(1e15)  # what uninitialised memory may hold
    model.init_weights()
    assert model.clip.logit_scale.item() == pytest.approx(config.clip_config.logit_scale_init_value)
    assert torch.isfinite(model.eval()(pixel_values).logits).all()


@pytest.mark.parametrize("cls", [MiraGeModel, MiraGeForImageClassification])
@pytest.mark.parametrize("mode", ["linear_probe", "maple", "mirage"])
def test_keys_to_ignore_on_save_exist_and_stay_out_of_the_saved_file(make_model, tmp_path, cls, mode):
    model = make_model(mode, cls=cls)
    ignored = model._keys_to_ignore_on_save or []
    assert set(ignored) <= set(model.state_dict())
    assert bool(ignored) == (cls is MiraGeForImageClassification and mode == "mirage")
    model.save_pretrained(tmp_path)
    saved = load_file(tmp_path / "model.safetensors")
    assert not set(ignored) & set(saved) and not any("memory_bank" in key for key in saved)


# ------------------------------------------------------------------------ tokenizer, real vocabulary


def test_openai_vocabulary_tokenises_the_class_prompts_as_openai_does(openai_vocab_clip_dir):
    model = from_clip(MiraGeForImageClassification, openai_vocab_clip_dir, prompt_depth=2)
    real, fake = model.config.prompt_token_ids
    assert real == [49406, 320, 1125, 539, 320, 1532, 269, 49407]  # <sot> a photo of a real . <eot>
    assert fake[:5] == real[:5] and fake[6:] == real[6:] and fake[5] != real[5]
    context = model.clip.text_model.embeddings.token_embedding(torch.tensor([320, 1125]))  # "a photo"
    torch.testing.assert_close(model.prompt_learner.text_prompts[0], context)
    assert model.prompt_learner.eos_positions.tolist() == [7, 7]


@pytest.mark.parametrize("checkpoint, tokenizer", [("openai", "tiny"), ("tiny", "openai")])
def test_a_tokenizer_of_another_vocabulary_is_refused(clip_dir, openai_vocab_clip_dir, checkpoint, tokenizer):
    path = {"openai": openai_vocab_clip_dir, "tiny": clip_dir}[checkpoint]
    other = {"openai": openai_clip_tokenizer, "tiny": tiny_tokenizer}[tokenizer]()
    with pytest.raises(ValueError, match="tokenizer does not fit the CLIP checkpoint"):
        from_clip(MiraGeForImageClassification, path, tokenizer=other, prompt_depth=2)


def test_the_checkpoint_s_own_tokenizer_passed_explicitly_is_accepted(openai_vocab_clip_dir):
    model = from_clip(
        MiraGeForImageClassification, openai_vocab_clip_dir, tokenizer=openai_clip_tokenizer(), prompt_depth=2
    )
    assert model.config.prompt_token_ids[0][1:3] == [320, 1125]


# ------------------------------------------------------------------------------------------ exports


@pytest.mark.parametrize("dynamic", [False, True])
def test_torch_export_of_the_image_path_gives_the_eager_logits(make_model, pixel_values, dynamic):
    model = make_model("mirage").eval()
    shapes = ({0: torch.export.Dim("batch", min=1, max=64)},) if dynamic else None
    exported = torch.export.export(model, (pixel_values,), dynamic_shapes=shapes).module()
    inputs = torch.cat([pixel_values, pixel_values[:2]]) if dynamic else pixel_values
    torch.testing.assert_close(exported(inputs).logits, model(inputs).logits)


@pytest.mark.slow
def test_onnx_export_of_the_image_path_gives_the_eager_logits(make_model, pixel_values, tmp_path):
    import onnxruntime

    class Logits(torch.nn.Module):
        def __init__(self, model):
            super().__init__()
            self.model = model

        def forward(self, pixel_values):
            return self.model(pixel_values=pixel_values).logits

    model = make_model("mirage").eval()
    torch.onnx.export(
        Logits(model),
        (pixel_values,),
        tmp_path / "model.onnx",
        input_names=["pixel_values"],
        output_names=["logits"],
        dynamic_shapes=({0: torch.export.Dim("batch")},),
        dynamo=True,
    )
    session = onnxruntime.InferenceSession(tmp_path / "model.onnx")
    inputs = torch.cat([pixel_values, pixel_values[:1]])
    (logits,) = session.run(None, {"pixel_values": inputs.numpy()})
    np.testing.assert_allclose(logits, model(inputs).logits.detach().numpy(), atol=1e-5)

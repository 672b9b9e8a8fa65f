"""Every way a user loads a MiraGe model gives the same logits."""

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import tiny_clip_config
from PIL import Image
from transformers import AutoModel, AutoModelForImageClassification, CLIPModel, pipeline

from mirage_hf import MiraGeForImageClassification, MiraGeModel, from_adapter, from_clip, save_adapter
from mirage_hf.lora import add_lora
from mirage_hf.parameters import mirage_core


def trained(model, steps=3):
    """Moves the prompts away from their initialisation, so round trips test real values."""
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=0.05)
    pixels = torch.randn(4, 3, 30, 30, generator=torch.Generator().manual_seed(1))
    for _ in range(steps):
        model(pixels, labels=torch.tensor([0, 1, 0, 1])).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    return model.eval()


def logits(model, pixel_values):
    with torch.no_grad():
        return model(pixel_values=pixel_values).logits


def test_from_clip_loads_every_clip_weight_and_initialises_the_context(clip_dir, make_model):
    model = make_model("mirage")
    reference = CLIPModel.from_pretrained(clip_dir)
    for key, value in reference.state_dict().items():
        assert torch.equal(model.clip.state_dict()[key], value), key
    words = model.prompt_learner.token_ids[0, 1:3]
    torch.testing.assert_close(
        model.prompt_learner.text_prompts[0], model.clip.text_model.embeddings.token_embedding(words)
    )
    assert model.config.clip_name_or_path == str(clip_dir)
    assert model.config.prompt_token_ids[0][:-3] == model.config.prompt_token_ids[1][:-3]


def test_from_pretrained_leaves_prompts_finite_and_small(clip_dir, make_model, tmp_path):
    """`from_clip` loads the CLIP checkpoint with `from_pretrained`, which must initialise the prompts the checkpoint
    lacks (small values, not leftover memory); `from_pretrained` of the saved detector gives back those prompts,
    not a fresh initialisation."""
    built = make_model("mirage")
    assert 0.005 < built.prompt_learner.text_prompts[1].std() < 0.05  # the deep prompts' init, std 0.02
    built.save_pretrained(tmp_path)
    loaded = MiraGeForImageClassification.from_pretrained(tmp_path)
    expected = dict(built.prompt_learner.named_parameters())
    for name, param in loaded.prompt_learner.named_parameters():
        assert torch.isfinite(param).all(), name
        assert param.abs().max() < 5.0, name
        assert torch.equal(param, expected[name]), name


def test_from_clip_without_tokenizer_is_a_clear_error(tmp_path):
    CLIPModel(tiny_clip_config()).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="needs the CLIP tokenizer"):
        from_clip(MiraGeForImageClassification, tmp_path, prompt_depth=2)


def test_from_clip_rejects_a_checkpoint_that_is_not_clip(tmp_path):
    from transformers import BertConfig

    BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=4, intermediate_size=37).save_pretrained(
        tmp_path
    )
    with pytest.raises(ValueError, match="is not a CLIP checkpoint.*model_type='bert'"):
        from_clip(MiraGeForImageClassification, tmp_path)


def test_from_clip_and_loading_a_saved_model_print_no_load_report(clip_dir, tmp_path, load_reports, capfd):
    """The weights MiraGe adds to a CLIP are new by design: no table may call them MISSING, in any mode."""
    for mode in ("linear_probe", "coop", "mirage"):
        model = from_clip(MiraGeForImageClassification, clip_dir, mode=mode, prompt_depth=2)
        model.save_pretrained(tmp_path / mode)
        MiraGeForImageClassification.from_pretrained(tmp_path / mode)
        MiraGeModel.from_pretrained(tmp_path / mode)
        AutoModelForImageClassification.from_pretrained(tmp_path / mode)
    assert load_reports == []
    printed = "".join(capfd.readouterr())
    assert "LOAD REPORT" not in printed and "MISSING" not in printed and "UNEXPECTED" not in printed


@pytest.mark.missing_weights_expected
def test_from_clip_on_a_checkpoint_lacking_clip_weights_is_a_clear_error(tmp_path, load_reports):
    from safetensors.torch import load_file, save_file

    from mirage_hf.demo.tiny import save_tiny_clip

    folder = Path(save_tiny_clip(tmp_path, image_size=30))
    weights = load_file(folder / "model.safetensors")
    del weights["visual_projection.weight"]
    save_file(weights, folder / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match="lacks CLIP weights: clip.visual_projection.weight"):
        from_clip(MiraGeForImageClassification, folder, prompt_depth=2)
    (report,) = load_reports  # transformers' own table names the CLIP weight, and only it
    assert "visual_projection.weight" in report and "prompt_learner" not in report


def test_ctx_init_shorter_than_n_ctx_is_a_clear_error(clip_dir):
    with pytest.raises(ValueError, match="ctx_init 'a photo' has 2 tokens, fewer than n_ctx=3"):
        from_clip(MiraGeForImageClassification, clip_dir, ctx_init="a photo", n_ctx=3, prompt_depth=2)


@pytest.mark.parametrize("mode", ["linear_probe", "mirage"])
def test_save_and_load_through_auto_classes(make_model, pixel_values, tmp_path, mode):
    model = trained(make_model(mode))
    model.save_pretrained(tmp_path)
    for auto in (AutoModelForImageClassification, AutoModel):
        loaded = auto.from_pretrained(tmp_path)
        assert type(loaded) is (
            MiraGeForImageClassification if auto is AutoModelForImageClassification else MiraGeModel
        )
        assert not any(p.requires_grad for p in loaded.clip.parameters())
        torch.testing.assert_close(logits(loaded, pixel_values), logits(model, pixel_values))


def save_detector_folder(model, clip_dir, path):
    from transformers.models.auto.image_processing_auto import AutoImageProcessor

    model.save_pretrained(path)
    AutoImageProcessor.from_pretrained(clip_dir).save_pretrained(path)


def test_pipeline_scores_real_and_fake(make_model, clip_dir, tmp_path):
    model = trained(make_model("mirage"))
    save_detector_folder(model, clip_dir, tmp_path)
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 50, 3), dtype=np.uint8))
    detector = pipeline("image-classification", model=str(tmp_path))
    scores = {row["label"]: row["score"] for row in detector(image)}
    assert set(scores) == {"real", "fake"} and sum(scores.values()) == pytest.approx(1.0, abs=1e-5)
    pixel_values = detector.image_processor(images=image, return_tensors="pt")["pixel_values"]
    expected = logits(model, pixel_values).softmax(-1)[0]
    assert scores["fake"] == pytest.approx(expected[1].item(), abs=1e-5)


def test_remote_code_loads_in_a_process_that_never_imported_mirage_hf(make_model, clip_dir, tmp_path):
    model = trained(make_model("mirage"))
    save_detector_folder(model, clip_dir, tmp_path / "model")
    config = json.loads((tmp_path / "model" / "config.json").read_text())
    assert config["auto_map"]["AutoModelForImageClassification"] == "modeling_mirage.MiraGeForImageClassification"
    assert (tmp_path / "model" / "modeling_mirage.py").exists()
    pixel_values = torch.randn(2, 3, 30, 30, generator=torch.Generator().manual_seed(3))
    torch.save(pixel_values, tmp_path / "pixels.pt")
    script = textwrap.dedent(
        f"""
        import sys, torch
        from transformers import AutoModelForImageClassification, pipeline
        model = AutoModelForImageClassification.from_pretrained({str(tmp_path / "model")!r}, trust_remote_code=True)
        assert "mirage_hf" not in sys.modules, "mirage_hf was imported"
        assert type(model).__module__.startswith("transformers_modules"), type(model).__module__
        with torch.no_grad():
            torch.save(model(pixel_values=torch.load({str(tmp_path / "pixels.pt")!r})).logits, {str(tmp_path / "out.pt")!r})
        detector = pipeline("image-classification", model={str(tmp_path / "model")!r}, trust_remote_code=True)
        from PIL import Image
        assert {{r["label"] for r in detector(Image.new("RGB", (40, 40)))}} == {{"real", "fake"}}
        """
    )
    env = {"HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf_home"), "PATH": "/usr/bin:/bin"}
    result = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    torch.testing.assert_close(torch.load(tmp_path / "out.pt"), logits(model, pixel_values))


def test_adapter_holds_only_trainable_weights_and_rebuilds_the_model(make_model, clip_dir, pixel_values, tmp_path):
    from safetensors import safe_open

    model = trained(make_model("mirage", n_ctx=3))
    save_adapter(model, tmp_path)
    with safe_open(tmp_path / "mirage_adapter.safetensors", "pt") as handle:
        assert set(handle.keys()) == {n for n, p in model.named_parameters() if p.requires_grad}
    adapter_config = json.loads((tmp_path / "mirage_adapter_config.json").read_text())
    assert adapter_config["base_model_name_or_path"] == str(clip_dir)
    assert adapter_config["mirage_config"]["n_ctx"] == 3
    rebuilt = from_adapter(MiraGeForImageClassification, tmp_path).eval()
    torch.testing.assert_close(logits(rebuilt, pixel_values), logits(model, pixel_values))
    rebuilt_on = from_adapter(MiraGeForImageClassification, tmp_path, base_model=clip_dir).eval()
    torch.testing.assert_close(logits(rebuilt_on, pixel_values), logits(model, pixel_values))


@pytest.mark.parametrize(
    "towers, projections",
    [(("vision", "text"), ("q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2")), (("vision",), ("fc2",))],
)
def test_lora_reaches_exactly_the_named_projections_of_attention_and_mlp(make_model, towers, projections):
    """One LoRA module per named projection per layer of each chosen tower (the MLP's fc1/fc2 included), none
    elsewhere; the tiny CLIP has 3 layers per tower."""
    import collections

    model = add_lora(make_model("mirage"), r=2, towers=towers, projections=projections)
    adapted = [name.split(".") for name, module in model.named_modules() if hasattr(module, "lora_A")]
    per_projection = collections.Counter(parts[-1] for parts in adapted)
    assert per_projection == {projection: 3 * len(towers) for projection in projections}
    assert {parts[parts.index("clip") + 1] for parts in adapted} == {f"{tower}_model" for tower in towers}


def test_a_lora_projection_that_matches_no_module_is_an_error_naming_the_option(make_model):
    with pytest.raises(ValueError, match=r"lora_projections.*'fc3'.*fc1"):
        add_lora(make_model("mirage"), r=2, projections=("q_proj", "fc3"))


def test_lora_save_load_and_merge_give_identical_logits(make_model, clip_dir, pixel_values, tmp_path):
    from peft import PeftModel

    model = add_lora(make_model("mirage"), r=4, alpha=8, towers=("vision", "text"))
    trainable = [name for name, p in model.named_parameters() if p.requires_grad]
    assert any("lora_A" in name for name in trainable) and any("prompt_learner" in name for name in trainable)
    assert all("lora_" in name or "prompt_learner" in name for name in trainable)
    trained(model)
    # Move LoRA B away from zero so the adapter really changes CLIP.
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(std=0.05)
    expected = logits(model, pixel_values)
    core = model.get_base_model()
    assert mirage_core(model) is core and mirage_core(torch.compile(model)) is core  # what evaluation scores
    model.save_pretrained(tmp_path / "lora")
    reloaded = PeftModel.from_pretrained(make_model("mirage"), tmp_path / "lora").eval()
    torch.testing.assert_close(logits(reloaded, pixel_values), expected)
    merged = reloaded.merge_and_unload()
    assert isinstance(merged, MiraGeForImageClassification)
    assert not any("lora" in name for name, _ in merged.named_parameters())
    torch.testing.assert_close(logits(merged, pixel_values), expected, atol=1e-5, rtol=1e-5)
    merged.save_pretrained(tmp_path / "merged")
    torch.testing.assert_close(
        logits(AutoModelForImageClassification.from_pretrained(tmp_path / "merged"), pixel_values),
        expected,
        atol=1e-5,
        rtol=1e-5,
    )

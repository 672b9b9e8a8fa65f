import pytest
from conftest import tiny_clip_config
from transformers import AutoConfig

import mirage_hf
from mirage_hf import MiraGeConfig


def test_config_round_trips_with_nested_clip_and_fixed_labels(tmp_path):
    config = MiraGeConfig(clip_config=tiny_clip_config(), mode="maple", n_ctx=3, prompt_depth=2, supcon_weight=0.5)
    config.save_pretrained(tmp_path)
    loaded = AutoConfig.from_pretrained(tmp_path)
    assert isinstance(loaded, MiraGeConfig)
    assert loaded.to_diff_dict() == config.to_diff_dict()
    assert loaded.clip_config.vision_config.image_size == 30
    assert loaded.id2label == {0: "real", 1: "fake"} and loaded.label2id == {"real": 0, "fake": 1}


def test_placeholder_prompts_fit_the_vocabulary_and_avoid_special_tokens():
    clip = tiny_clip_config()
    config = MiraGeConfig(clip_config=clip, prompt_depth=2)
    text = clip.text_config
    for prompt in config.prompt_token_ids:
        assert prompt[0] == text.bos_token_id and prompt[-1] == text.eos_token_id
        assert all(0 <= t < text.vocab_size for t in prompt)
        assert text.eos_token_id not in prompt[1:-1]
    assert config.prompt_token_ids[0] != config.prompt_token_ids[1]


@pytest.mark.parametrize(
    "overrides, field",
    [
        ({"mode": "bogus"}, "mode"),
        ({"n_ctx": -1}, "n_ctx"),
        ({"mode": "coop", "n_ctx": 0}, "n_ctx"),
        ({"prompt_depth": 4}, "prompt_depth"),
        ({"prompt_depth": 0}, "prompt_depth"),
        ({"class_names": ["real"]}, "class_names"),
        ({"sep_weight": -1.0}, "sep_weight"),
        ({"anchor_margin": 2.0}, "anchor_margin"),
        ({"supcon_temperature": 0.0}, "supcon_temperature"),
        ({"memory_bank_size": -5}, "memory_bank_size"),
        ({"decision_threshold": 1.0}, "decision_threshold"),
        ({"calibration_temperature": -1.0}, "calibration_temperature"),
        ({"prompt_token_ids": [[1, 2, 3]]}, "prompt_token_ids"),
        ({"n_ctx": 20}, "prompt_token_ids"),
        ({"added_fake_anchors": -1}, "added_fake_anchors"),
        ({"mode": "linear_probe", "added_fake_anchors": 1}, "added_fake_anchors"),
    ],
)
def test_invalid_values_name_the_field(overrides, field):
    overrides.setdefault("prompt_depth", 2)
    with pytest.raises(ValueError, match=rf"MiraGeConfig\.{field}"):
        MiraGeConfig(clip_config=tiny_clip_config(), **overrides)


def test_prompt_depth_is_ignored_by_modes_without_deep_prompts():
    config = MiraGeConfig(clip_config=tiny_clip_config(), mode="coop", prompt_depth=99)
    assert (config.text_prompt_depth, config.vision_prompt_depth) == (1, 0)


def test_every_mode_is_known():
    assert mirage_hf.MIRAGE_MODES == ("zero_shot", "linear_probe", "coop", "maple", "mirage")

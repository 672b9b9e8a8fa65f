"""The tiny CLIP shipped in the package: its files are the ones its card describes, its pretraining reruns
from its seed, and it knows what prompt-only MiraGe needs ("real" and "fake" mean different things)."""

import json

import numpy as np
import pytest
import torch
from sklearn.metrics import roc_auc_score
from transformers import AutoTokenizer, CLIPModel
from transformers.models.auto.image_processing_auto import AutoImageProcessor  # top-level: torchvision-only in 5.17

from mirage_hf import MiraGeForImageClassification, from_clip
from mirage_hf.demo.caption_world import PRETRAINING_GENERATORS, content_scene, render
from mirage_hf.demo.pretrain_tiny_clip import CLASS_PROMPTS, GATE, gate, pixel_values, pretrain
from mirage_hf.demo.tiny import PRETRAINED_TINY_CLIP
from mirage_hf.file_hashes import sha256_of_files

CARD = json.loads((PRETRAINED_TINY_CLIP / "pretraining.json").read_text())


def test_the_shipped_weights_are_the_ones_the_card_describes():
    assert sha256_of_files([PRETRAINED_TINY_CLIP / "model.safetensors"], with_names=False) == CARD["sha256"]
    assert f"`{CARD['sha256']}`" in (PRETRAINED_TINY_CLIP / "README.md").read_text()


def test_the_shipped_weights_pass_the_pretraining_gate_the_card_states():
    """The gate recomputed on held-out images of the pretraining world: the same numbers as the card, and each meets
    its bar (a backbone that fails it cannot carry prompts anywhere, so no demo may be run on it)."""
    torch.set_num_threads(1)
    model = CLIPModel.from_pretrained(PRETRAINED_TINY_CLIP).eval()
    tokenizer, processor = (
        AutoTokenizer.from_pretrained(PRETRAINED_TINY_CLIP),
        AutoImageProcessor.from_pretrained(PRETRAINED_TINY_CLIP),
    )
    report = gate(model, tokenizer, processor, n_pairs=CARD["n_pairs"])
    assert report == {key: CARD[key] for key in report}
    assert report["pair_accuracy"] >= GATE["pair_accuracy"]
    assert min(report["probe_auc"].values()) >= GATE["probe_auc"]
    assert min(report["zero_shot_auc"].values()) >= GATE["zero_shot_auc"]
    assert (
        report["gate_passed"]
        and "**Pretraining gate** (on images of its own world that no step saw; passed)"
        in (PRETRAINED_TINY_CLIP / "README.md").read_text()
    )


def test_pretraining_reruns_bit_for_bit_from_its_seed():
    """A few steps stand in for the full run: same seed, same weights; another seed, other weights."""
    torch.set_num_threads(1)  # as the script does
    first, again, other = (
        pretrain(steps=3, seed=seed, batch_scenes=4, learning_rate=1e-3, log=lambda _: None)[0].state_dict()
        for seed in (0, 0, 1)
    )
    assert all(torch.equal(first[k], again[k]) for k in first)
    assert not all(torch.equal(first[k], other[k]) for k in first)


def test_the_class_prompts_are_whole_words_of_the_shipped_tokenizer():
    tokenizer = AutoTokenizer.from_pretrained(PRETRAINED_TINY_CLIP)
    for prompt in CLASS_PROMPTS:
        assert tokenizer.tokenize(prompt) == [f"{word}</w>" for word in prompt.replace(".", " .").split()]


@pytest.fixture(scope="module")
def zero_shot():
    return from_clip(MiraGeForImageClassification, PRETRAINED_TINY_CLIP, mode="zero_shot").eval()


def test_the_real_and_fake_anchors_start_apart(zero_shot):
    """A random tiny CLIP's two anchors are nearly the same direction (cosine above 0.99); pretraining parted them
    (0.09 for the shipped weights)."""
    real, fake = zero_shot.text_anchors()
    assert float(real @ fake) < 0.5


def test_zero_shot_ranks_the_pretraining_generators_fakes_above_camera_photos(zero_shot):
    """MiraGe's zero_shot mode on the shipped CLIP (its class prompts, no training) ranks every pretraining
    generator's renderings above camera photos of new scenes (measured AUC 1.00; the 3,000-step model gave 0.65)."""
    rng = np.random.default_rng(7)  # scenes no pretraining step saw (those came from default_rng([seed, 1]))
    makers = ["camera"] * len(PRETRAINING_GENERATORS) * 6 + [*PRETRAINING_GENERATORS] * 6
    images = [render(rng, content_scene(rng, 32)[0], maker) for maker in makers]
    processor = AutoImageProcessor.from_pretrained(PRETRAINED_TINY_CLIP)
    with torch.no_grad():
        scores = zero_shot(pixel_values(images, processor)).logit_diff.numpy()
    assert roc_auc_score([maker != "camera" for maker in makers], scores) > 0.95

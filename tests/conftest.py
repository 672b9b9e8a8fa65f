"""Tiny CLIP checkpoints built in the tests: no Hub access, a few milliseconds per forward."""

import os

import pytest
import torch
from transformers import CLIPConfig, CLIPImageProcessorPil, CLIPModel, CLIPTokenizer

import mirage_hf


os.environ.setdefault("HF_HUB_OFFLINE", "1")

PROMPT_WORDS = ["a", "photo", "of", "real", "fake", "x", "image", "ai", "generated"]
IMAGE_SIZE = 30


def tiny_tokenizer() -> CLIPTokenizer:
    """A real CLIP BPE tokenizer over a handful of words, built in memory."""
    chars = sorted(set("".join(PROMPT_WORDS)) | {"."})
    vocab = {}
    for suffix in ("", "</w>"):
        for char in chars:
            vocab.setdefault(char + suffix, len(vocab))
    merges = []
    for word in PROMPT_WORDS:
        pieces = [*word[:-1], word[-1] + "</w>"]
        while len(pieces) > 1:
            pair = (pieces[0], pieces[1])
            if pair not in merges:
                merges.append(pair)
            pieces = [pieces[0] + pieces[1], *pieces[2:]]
            vocab.setdefault(pieces[0], len(vocab))
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    return CLIPTokenizer(vocab=vocab, merges=merges)


def tiny_clip_config(**overrides) -> CLIPConfig:
    tokenizer = tiny_tokenizer()
    text_config = dict(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=37,
        num_hidden_layers=3,
        num_attention_heads=4,
        max_position_embeddings=16,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.eos_token_id,
    )
    vision_config = dict(
        image_size=IMAGE_SIZE,
        patch_size=6,
        hidden_size=32,
        intermediate_size=37,
        num_hidden_layers=3,
        num_attention_heads=4,
    )
    return CLIPConfig(text_config=text_config, vision_config=vision_config, projection_dim=16, **overrides)


def tiny_image_processor() -> CLIPImageProcessorPil:
    return CLIPImageProcessorPil(size={"shortest_edge": IMAGE_SIZE}, crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE})


@pytest.fixture(scope="session")
def clip_dir(tmp_path_factory):
    """A saved random CLIP with its tokenizer and image processor: what `from_clip` reads from the Hub."""
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("tiny-clip")
    CLIPModel(tiny_clip_config()).save_pretrained(path)
    tiny_tokenizer().save_pretrained(path)
    tiny_image_processor().save_pretrained(path)
    return path


@pytest.fixture
def make_model(clip_dir):
    """Builds a detector on the tiny CLIP; prompt depth 2 of 3 layers unless overridden."""

    def build(mode="mirage", cls=mirage_hf.MiraGeForImageClassification, **overrides):
        torch.manual_seed(0)
        overrides.setdefault("prompt_depth", 2)
        return cls.from_clip(clip_dir, mode=mode, **overrides)

    return build


@pytest.fixture
def pixel_values():
    return torch.randn(4, 3, IMAGE_SIZE, IMAGE_SIZE, generator=torch.Generator().manual_seed(0))

"""Tiny CLIP checkpoints built in the tests: no Hub access, a few milliseconds per forward."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch

import mirage_hf
from mirage_hf.tiny import save_tiny_clip, tiny_clip_config  # noqa: F401  (re-exported for the tests)

IMAGE_SIZE = 30


@pytest.fixture(scope="session")
def clip_dir(tmp_path_factory):
    """A saved random CLIP with its tokenizer and image processor: what `from_clip` reads from the Hub."""
    return save_tiny_clip(tmp_path_factory.mktemp("tiny-clip"), image_size=IMAGE_SIZE)


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

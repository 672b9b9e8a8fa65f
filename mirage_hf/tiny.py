"""A tiny randomly initialised CLIP checkpoint, built locally: the backbone of the offline demo and the tests.

It is a real transformers `CLIPModel` folder (weights, BPE tokenizer, image processor), so everything that
runs on it runs unchanged on `openai/clip-vit-large-patch14`. Its weights are random: it knows nothing of
images or words, which is why the demo trains LoRA on top of the prompts (see the README).
"""

import os

import torch
from transformers import CLIPConfig, CLIPImageProcessorPil, CLIPModel, CLIPTokenizer

PROMPT_WORDS = ("a", "photo", "of", "real", "fake", "x", "image", "ai", "generated")


def tiny_tokenizer(words=PROMPT_WORDS) -> CLIPTokenizer:
    """A real CLIP BPE tokenizer whose vocabulary holds just `words` (and their letters)."""
    chars = sorted(set("".join(words)) | {"."})
    vocab = {}
    for suffix in ("", "</w>"):
        for char in chars:
            vocab.setdefault(char + suffix, len(vocab))
    merges = []
    for word in words:
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


def tiny_clip_config(
    image_size: int = 30, patch_size: int = 6, hidden_size: int = 32, num_layers: int = 3, projection_dim: int = 16
) -> CLIPConfig:
    tokenizer = tiny_tokenizer()
    text_config = dict(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=hidden_size * 2,
        num_hidden_layers=num_layers,
        num_attention_heads=4,
        max_position_embeddings=16,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.eos_token_id,
    )
    vision_config = dict(
        image_size=image_size,
        patch_size=patch_size,
        hidden_size=hidden_size,
        intermediate_size=hidden_size * 2,
        num_hidden_layers=num_layers,
        num_attention_heads=4,
    )
    return CLIPConfig(text_config=text_config, vision_config=vision_config, projection_dim=projection_dim)


def tiny_image_processor(image_size: int = 30) -> CLIPImageProcessorPil:
    return CLIPImageProcessorPil(
        size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size}
    )


def save_tiny_clip(path: str | os.PathLike, seed: int = 0, **config_options) -> str:
    """Writes a random tiny CLIP (weights, tokenizer, image processor) to `path` and returns it. Its weights come
    from `seed` alone, and the caller's random state is left as it was (a run is the same whether it built one)."""
    config = tiny_clip_config(**config_options)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        CLIPModel(config).save_pretrained(path)
    tiny_tokenizer().save_pretrained(path)
    tiny_image_processor(config.vision_config.image_size).save_pretrained(path)
    return str(path)

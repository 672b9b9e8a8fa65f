"""Tiny CLIP checkpoints built locally: the random one tests use for shapes, and the shipped pretrained one.

A real transformers `CLIPModel` folder (weights, BPE tokenizer, image processor), so everything that runs on it
runs unchanged on `openai/clip-vit-large-patch14`. `save_tiny_clip` writes random weights that know nothing of
images or words; `PRETRAINED_TINY_CLIP` is the folder shipped in the package, pretrained on a captioned world by
`mirage_hf.demo.pretrain_tiny_clip` (its README says on what and how long): the demo's backbone.
"""

import os
from collections import Counter
from importlib.resources import files

import torch
from transformers import CLIPConfig, CLIPImageProcessorPil, CLIPModel, CLIPTokenizer

PROMPT_WORDS = ("a", "photo", "of", "real", "fake", "x", "image", "ai", "generated")
PRETRAINED_TINY_CLIP = files("mirage_hf.demo") / "tiny_pretrained_clip"  # package data: found from any directory


def tiny_tokenizer(words=PROMPT_WORDS) -> CLIPTokenizer:
    """A real CLIP BPE tokenizer whose vocabulary holds `words` (one token each) and their letters.

    The merges are learned as BPE learns them (most frequent adjacent pair first, here over the word list), so
    encoding replays them and every word comes out whole, whatever letters the words share.
    """
    chars = sorted(set("".join(words)) | {"."})
    vocab = {}
    for suffix in ("", "</w>"):
        for char in chars:
            vocab.setdefault(char + suffix, len(vocab))
    split = [[*word[:-1], word[-1] + "</w>"] for word in dict.fromkeys(words)]
    merges = []
    while any(len(pieces) > 1 for pieces in split):
        counts = Counter(pair for pieces in split for pair in zip(pieces, pieces[1:]))
        pair = max(counts, key=lambda p: (counts[p], [-ord(c) for c in "".join(p)]))  # ties: a fixed order
        merges.append(pair)
        vocab.setdefault("".join(pair), len(vocab))
        split = [_merge(pieces, pair) for pieces in split]
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    return CLIPTokenizer(vocab=vocab, merges=merges)


def _merge(pieces: list[str], pair: tuple[str, str]) -> list[str]:
    out, i = [], 0
    while i < len(pieces):
        if i + 1 < len(pieces) and (pieces[i], pieces[i + 1]) == pair:
            out.append(pieces[i] + pieces[i + 1])
            i += 2
        else:
            out.append(pieces[i])
            i += 1
    return out


def tiny_clip_config(
    image_size: int = 30,
    patch_size: int = 6,
    hidden_size: int = 32,
    num_layers: int = 3,
    projection_dim: int = 16,
    words=PROMPT_WORDS,
    max_text_length: int = 16,
) -> CLIPConfig:
    tokenizer = tiny_tokenizer(words)
    text_config = dict(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=hidden_size * 2,
        num_hidden_layers=num_layers,
        num_attention_heads=4,
        max_position_embeddings=max_text_length,
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

"""A generated real-vs-fake data set for the offline demo and the tests (no download possible).

Procedural "real" scenes and five fake "generators" in four families of causes (upsampling: upsampler, resampler;
smoothing: diffusion; grid seams: gridder; quantisation: banding); what they are, and the world the shipped tiny
CLIP was pretrained on: docs/synthetic-data.md.
"""

from __future__ import annotations

import io
import os
import zlib
from collections.abc import Callable
from pathlib import Path

import numpy as np
from datasets import Dataset
from PIL import Image

from ..data import FAKE, FEATURES, REAL
from .rendering import SENSOR_NOISE, blur, posterise, resample, scene, sensor_noise, tile_seams, to_uint8

_FOLDERS = {REAL: "nature", FAKE: "ai"}  # GenImage's class folder names
_SPLITS = ("train", "val")
# Generators reproduce camera noise only partly: a weak trace that all fakes share, beside their own.
_FAKE_NOISE = 0.6
_TILE = 8  # the gridder's tile size in pixels


def _real(rng: np.random.Generator, size: int) -> np.ndarray:
    return to_uint8(sensor_noise(rng, scene(rng, size), rng.uniform(*SENSOR_NOISE)))


def _half_resolution(rng: np.random.Generator, size: int) -> np.ndarray:
    """A scene rendered at half resolution with partial sensor noise (the upsampling family's start)."""
    return sensor_noise(rng, scene(rng, size // 2), _FAKE_NOISE * rng.uniform(*SENSOR_NOISE))


def _upsampler(rng: np.random.Generator, size: int) -> np.ndarray:
    img = _half_resolution(rng, size).repeat(2, axis=0).repeat(2, axis=1)
    checker = (np.indices((size, size)).sum(axis=0) % 2 * 2 - 1)[..., None]
    return to_uint8(img + rng.uniform(0.003, 0.008) * checker)


def _resampler(rng: np.random.Generator, size: int) -> np.ndarray:
    return to_uint8(resample(_half_resolution(rng, size), size))


def _diffusion(rng: np.random.Generator, size: int) -> np.ndarray:
    img = blur(scene(rng, size), rng.uniform(0.8, 1.2))
    return to_uint8(sensor_noise(rng, img, rng.uniform(0.0, 0.003)))


def _gridder(rng: np.random.Generator, size: int) -> np.ndarray:
    img = sensor_noise(rng, scene(rng, size), _FAKE_NOISE * rng.uniform(*SENSOR_NOISE))
    lines = tile_seams(size, _TILE, (0, -1))  # both edges of each tile: symmetric under flips
    return to_uint8(img + rng.uniform(0.03, 0.06) * lines)


def _banding(rng: np.random.Generator, size: int) -> np.ndarray:
    return to_uint8(posterise(scene(rng, size), rng.integers(4, 8)))


_FAKE_RENDERERS: dict[str, Callable[[np.random.Generator, int], np.ndarray]] = {
    "upsampler": _upsampler,
    "resampler": _resampler,
    "diffusion": _diffusion,
    "gridder": _gridder,
    "banding": _banding,
}
GENERATORS = tuple(_FAKE_RENDERERS)


def _check_args(generator: str, image_size: int) -> None:
    if generator not in _FAKE_RENDERERS:
        raise ValueError(f"unknown synthetic generator {generator!r}; expected one of {GENERATORS}")
    if image_size < 16 or image_size % 16:
        raise ValueError(f"image_size must be a multiple of 16 (the grid and 2x upsampler need it), got {image_size}")


def _images(generator: str, split: str, label: int, n: int, image_size: int, seed: int):
    """`n` images (uint8 arrays) of one generator / split / class; the stream depends only on these values,
    so adding a generator or changing another class's count leaves these images unchanged."""
    key = [seed, zlib.crc32(generator.encode()), zlib.crc32(split.encode()), label]
    rng = np.random.default_rng(key)
    render = _real if label == REAL else _FAKE_RENDERERS[generator]
    return (render(rng, image_size) for _ in range(n))


def _png_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, "PNG")
    return buffer.getvalue()


def make_synthetic_genimage(
    root: str | os.PathLike,
    generators: tuple[str, ...] | list[str] = GENERATORS,
    n_train_per_class: int = 100,
    n_val_per_class: int = 50,
    image_size: int = 64,
    seed: int = 0,
) -> Path:
    """Write PNGs in the GenImage layout ``<root>/<generator>/{train,val}/{ai,nature}/`` and return `root`.

    Each generator folder has its own real (``nature``) images, as in GenImage. Deterministic for a seed.
    PNGs already in those class folders are removed first, so a rerun with smaller counts leaves no stale
    files behind.
    """
    for generator in generators:
        _check_args(generator, image_size)
    root = Path(root)
    for generator in generators:
        for split, n in zip(_SPLITS, (n_train_per_class, n_val_per_class), strict=True):
            for label, folder in _FOLDERS.items():
                directory = root / generator / split / folder
                directory.mkdir(parents=True, exist_ok=True)
                for stale in directory.glob("*.png"):
                    stale.unlink()
                for i, array in enumerate(_images(generator, split, label, n, image_size, seed)):
                    (directory / f"{generator}_{split}_{folder}_{i:05d}.png").write_bytes(_png_bytes(array))
    return root


def synthetic_dataset(n: int = 32, image_size: int = 64, seed: int = 0, generator: str = "upsampler") -> Dataset:
    """An in-memory data set in the standard schema: `n` images (PNG bytes), real and fake alternating."""
    _check_args(generator, image_size)
    streams = {label: _images(generator, "memory", label, n, image_size, seed) for label in (REAL, FAKE)}
    labels = [REAL if i % 2 == 0 else FAKE for i in range(n)]
    images = [{"bytes": _png_bytes(next(streams[label])), "path": None} for label in labels]
    return Dataset.from_dict(
        {"image": images, "label": labels, "subset": [generator] * n},
        features=FEATURES,
    )

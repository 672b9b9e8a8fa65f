"""A generated real-vs-fake data set for the offline demo and the tests (no download possible).

Procedural "real" scenes and four fake "generators" (upsampler, diffusion, gridder, banding), each leaving its
own pixel-level trace; what they are and what a small model learns from them: docs/synthetic-data.md.
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

from .data import FAKE, FEATURES, REAL

_FOLDERS = {REAL: "nature", FAKE: "ai"}  # GenImage's class folder names
_SPLITS = ("train", "val")
_NOISE = (0.015, 0.035)  # sensor noise standard deviation of real photos, in [0, 1] units
# Generators reproduce camera noise only partly: a weak trace that all fakes share, beside their own.
_FAKE_NOISE = 0.6
_TILE = 8  # the gridder's tile size in pixels


# --------------------------------------------------------------------------- scenes


def _upsample(grid: np.ndarray, size: int) -> np.ndarray:
    """Bilinear enlargement of a (g, g, C) grid to (size, size, C)."""
    g = grid.shape[0]
    pos = (np.arange(size) + 0.5) * g / size - 0.5
    lo = np.floor(pos).astype(int)
    weight = (pos - lo)[:, None, None]
    lo, hi = np.clip(lo, 0, g - 1), np.clip(lo + 1, 0, g - 1)
    rows = grid[lo] * (1 - weight) + grid[hi] * weight
    weight = weight.transpose(1, 0, 2)
    return rows[:, lo] * (1 - weight) + rows[:, hi] * weight


def _scene(rng: np.random.Generator, size: int) -> np.ndarray:
    """A smooth natural-looking scene, float (size, size, 3) in [0, 1], without noise."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float64) / size
    start, end = rng.uniform(0.15, 0.85, (2, 3))
    angle = rng.uniform(0, 2 * np.pi)
    ramp = (xx - 0.5) * np.cos(angle) + (yy - 0.5) * np.sin(angle) + 0.5
    img = start + (end - start) * ramp[..., None]
    for cells, amplitude in ((3, 0.16), (6, 0.09), (12, 0.05), (24, 0.03)):
        lum = rng.normal(size=(cells, cells, 1))
        chroma = 0.4 * rng.normal(size=(cells, cells, 3))
        img += amplitude * _upsample(lum + chroma, size)
    for _ in range(rng.integers(1, 4)):
        (cx, cy), (rx, ry) = rng.uniform(0, 1, 2), rng.uniform(0.08, 0.3, 2)
        edge = rng.uniform(0.05, 0.3)
        dist = np.sqrt(((xx - cx) / rx) ** 2 + ((yy - cy) / ry) ** 2)
        alpha = rng.uniform(0.5, 0.9) / (1 + np.exp((dist - 1) / edge))
        img = img * (1 - alpha[..., None]) + rng.uniform(0, 1, 3) * alpha[..., None]
    return np.clip(img, 0, 1)


def _sensor_noise(rng: np.random.Generator, img: np.ndarray, sigma: float) -> np.ndarray:
    """Per-pixel noise, mostly shared by the channels (luminance) with some colour noise."""
    shape = img.shape[:2]
    noise = rng.normal(size=(*shape, 1)) + 0.5 * rng.normal(size=(*shape, 3))
    return img + sigma * noise


def _to_uint8(img: np.ndarray) -> np.ndarray:
    return np.clip(np.rint(img * 255), 0, 255).astype(np.uint8)


def _blur(img: np.ndarray, sigma: float) -> np.ndarray:
    """Separable Gaussian blur of an (H, W, C) array with edge padding."""
    radius = max(1, int(np.ceil(3 * sigma)))
    taps = np.exp(-0.5 * (np.arange(-radius, radius + 1) / sigma) ** 2)
    taps /= taps.sum()
    for axis in (0, 1):
        pad = [(0, 0)] * img.ndim
        pad[axis] = (radius, radius)
        padded = np.pad(img, pad, mode="edge")
        length = img.shape[axis]
        img = sum(t * np.take(padded, range(i, i + length), axis=axis) for i, t in enumerate(taps))
    return img


# --------------------------------------------------------------------------- generators


def _real(rng: np.random.Generator, size: int) -> np.ndarray:
    return _to_uint8(_sensor_noise(rng, _scene(rng, size), rng.uniform(*_NOISE)))


def _upsampler(rng: np.random.Generator, size: int) -> np.ndarray:
    half = _sensor_noise(rng, _scene(rng, size // 2), _FAKE_NOISE * rng.uniform(*_NOISE))
    img = half.repeat(2, axis=0).repeat(2, axis=1)
    checker = (np.indices((size, size)).sum(axis=0) % 2 * 2 - 1)[..., None]
    return _to_uint8(img + rng.uniform(0.003, 0.008) * checker)


def _diffusion(rng: np.random.Generator, size: int) -> np.ndarray:
    img = _blur(_scene(rng, size), rng.uniform(0.8, 1.2))
    return _to_uint8(_sensor_noise(rng, img, rng.uniform(0.0, 0.003)))


def _gridder(rng: np.random.Generator, size: int) -> np.ndarray:
    img = _sensor_noise(rng, _scene(rng, size), _FAKE_NOISE * rng.uniform(*_NOISE))
    offset = np.arange(size) % _TILE
    seams = (offset == 0) | (offset == _TILE - 1)  # both edges of each tile: symmetric under flips
    lines = (seams[:, None] | seams[None, :]).astype(np.float64)
    return _to_uint8(img + rng.uniform(0.03, 0.06) * lines[..., None])


def _banding(rng: np.random.Generator, size: int) -> np.ndarray:
    levels = rng.integers(4, 8)
    return _to_uint8(np.round(_scene(rng, size) * (levels - 1)) / (levels - 1))


_FAKE_RENDERERS: dict[str, Callable[[np.random.Generator, int], np.ndarray]] = {
    "upsampler": _upsampler,
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

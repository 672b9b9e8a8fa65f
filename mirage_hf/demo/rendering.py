"""Image primitives shared by the demo's generated data set and the tiny CLIP's pretraining world.

Float images are (H, W, 3) arrays in [0, 1]; `to_uint8` turns them into pixels. What the worlds are built from
them: docs/synthetic-data.md.
"""

import numpy as np

SENSOR_NOISE = (0.015, 0.035)  # sensor noise standard deviation of real photos, in [0, 1] units


def resample(grid: np.ndarray, size: int) -> np.ndarray:
    """Bilinear resampling of a (g, g, C) grid to (size, size, C) (enlarging or shrinking)."""
    g = grid.shape[0]
    pos = (np.arange(size) + 0.5) * g / size - 0.5
    lo = np.floor(pos).astype(int)
    weight = (pos - lo)[:, None, None]
    lo, hi = np.clip(lo, 0, g - 1), np.clip(lo + 1, 0, g - 1)
    rows = grid[lo] * (1 - weight) + grid[hi] * weight
    weight = weight.transpose(1, 0, 2)
    return rows[:, lo] * (1 - weight) + rows[:, hi] * weight


def scene(rng: np.random.Generator, size: int) -> np.ndarray:
    """A smooth natural-looking scene (colour gradient, multi-scale smooth noise, soft blobs), without noise."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float64) / size
    start, end = rng.uniform(0.15, 0.85, (2, 3))
    angle = rng.uniform(0, 2 * np.pi)
    ramp = (xx - 0.5) * np.cos(angle) + (yy - 0.5) * np.sin(angle) + 0.5
    img = start + (end - start) * ramp[..., None]
    for cells, amplitude in ((3, 0.16), (6, 0.09), (12, 0.05), (24, 0.03)):
        lum = rng.normal(size=(cells, cells, 1))
        chroma = 0.4 * rng.normal(size=(cells, cells, 3))
        img += amplitude * resample(lum + chroma, size)
    for _ in range(rng.integers(1, 4)):
        (cx, cy), (rx, ry) = rng.uniform(0, 1, 2), rng.uniform(0.08, 0.3, 2)
        edge = rng.uniform(0.05, 0.3)
        dist = np.sqrt(((xx - cx) / rx) ** 2 + ((yy - cy) / ry) ** 2)
        alpha = rng.uniform(0.5, 0.9) / (1 + np.exp((dist - 1) / edge))
        img = img * (1 - alpha[..., None]) + rng.uniform(0, 1, 3) * alpha[..., None]
    return np.clip(img, 0, 1)


def sensor_noise(rng: np.random.Generator, img: np.ndarray, sigma: float) -> np.ndarray:
    """Per-pixel noise, mostly shared by the channels (luminance) with some colour noise."""
    shape = img.shape[:2]
    noise = rng.normal(size=(*shape, 1)) + 0.5 * rng.normal(size=(*shape, 3))
    return img + sigma * noise


def to_uint8(img: np.ndarray) -> np.ndarray:
    return np.clip(np.rint(img * 255), 0, 255).astype(np.uint8)


def blur(img: np.ndarray, sigma: float) -> np.ndarray:
    """Separable Gaussian blur of an (H, W, C) array with edge padding."""
    radius = max(1, int(np.ceil(3 * sigma)))
    return smooth(img, np.exp(-0.5 * (np.arange(-radius, radius + 1) / sigma) ** 2))


def smooth(img: np.ndarray, taps: np.ndarray) -> np.ndarray:
    """Separable filtering of an (H, W, C) array with the (odd-length, normalised here) `taps`, edge padding."""
    taps = taps / taps.sum()
    radius = len(taps) // 2
    for axis in (0, 1):
        pad = [(0, 0)] * img.ndim
        pad[axis] = (radius, radius)
        padded = np.pad(img, pad, mode="edge")
        length = img.shape[axis]
        img = sum(t * np.take(padded, range(i, i + length), axis=axis) for i, t in enumerate(taps))
    return img


def posterise(img: np.ndarray, levels: int) -> np.ndarray:
    """Each channel rounded to `levels` evenly spaced values (quantisation bands)."""
    return np.round(np.clip(img, 0, 1) * (levels - 1)) / (levels - 1)


def tile_seams(size: int, tile: int, edges: tuple[int, ...]) -> np.ndarray:
    """(size, size, 1) mask, 1 on the rows and columns at `edges` offsets inside each `tile`-pixel tile."""
    offset = np.arange(size) % tile
    seams = np.isin(offset, [e % tile for e in edges])
    return (seams[:, None] | seams[None, :]).astype(np.float64)[..., None]

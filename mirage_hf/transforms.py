"""Image decoding, degradations, training augmentation, eval preprocessing and batching.

Decoding is defensive because detector data sets are scraped: a corrupt, truncated or hostile file must
become one skipped row with a reason, never a crashed run or a silently padded image. Degradations are
deterministic functions so that the robustness sweep is reproducible; the training augmentation draws their
parameters from its own seeded generator.
"""

from __future__ import annotations

import copy
import io
import logging
import os
import random
import warnings
from collections.abc import Callable, Sequence
from functools import partial
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageFile, ImageFilter, ImageOps, UnidentifiedImageError

from .configuration_mirage import PREPROCESS_MODES

logger = logging.getLogger(__name__)

# PIL's own bomb limit (~9459 x 9459). Checked against the header before any pixel is decoded.
MAX_IMAGE_PIXELS = 89_478_485
IMAGE_EXTENSIONS = frozenset(
    {".avif", ".bmp", ".gif", ".jfif", ".jp2", ".jpe", ".jpeg", ".jpg", ".png", ".ppm", ".tif", ".tiff", ".webp"}
)
"""What a folder scan (training data, `mirage-detect`) takes as images: formats photos and generators are saved
in that PIL decodes; not every format PIL can identify (videos, PSDs, stubs such as .grib)."""
_INT_MODES = ("I", "I;16", "I;16B", "I;16L", "I;16N")  # 16-bit data (PNG, TIFF) in integer modes
_ALPHA_MODES = ("RGBA", "RGBa", "LA", "La", "PA")


class ImageLoadError(ValueError):
    """An image that cannot be used; `source` is its path (None for in-memory bytes), `reason` says why."""

    def __init__(self, source: str | None, reason: str):
        self.source, self.reason = source, reason
        super().__init__(f"cannot load image {source or '<in-memory bytes>'}: {reason}")


def to_rgb(img: Image.Image) -> Image.Image:
    """Any PIL mode as 8-bit RGB: 16-bit greys rescaled (PIL would clip them to white), alpha and
    transparency keys composited on white (PIL would keep the hidden colours, often black)."""
    if img.mode in _INT_MODES:
        img = Image.fromarray(np.clip(np.rint(np.asarray(img, dtype=np.float32) / 257.0), 0, 255).astype(np.uint8))
    if img.mode in _ALPHA_MODES or "transparency" in img.info:
        rgba = img.convert("RGBA")
        return Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba).convert("RGB")
    return img.convert("RGB")


def _upright(img: Image.Image) -> Image.Image:
    """Apply the EXIF orientation; a broken EXIF block leaves the pixels as stored rather than losing them."""
    try:
        return ImageOps.exif_transpose(img)
    except Exception:  # noqa: BLE001 - any EXIF parsing error: keep the image, orientation unknown
        return img.copy()


def _open_target(source: Any) -> tuple[Any, str | None]:
    """(something `Image.open` reads, path for messages) from a path, bytes or a ``{"path", "bytes"}`` dict."""
    name = None
    if isinstance(source, dict):  # bytes win: Hub rows keep the original file name, not a local path
        name = source.get("path") or None
        source = source["bytes"] if source.get("bytes") is not None else name
        if source is None:
            raise ImageLoadError(None, "row has neither bytes nor a path")
    elif isinstance(source, (str, os.PathLike)):
        name = os.fspath(source)
    if isinstance(source, (bytes, bytearray, memoryview)):
        if len(source) == 0:
            raise ImageLoadError(name, "empty file")
        return io.BytesIO(source), name
    if not isinstance(source, (str, os.PathLike)):
        raise ImageLoadError(None, f"unsupported source type {type(source).__name__}")
    path = os.fspath(source)
    if problem := file_problem(path, "an image"):
        raise ImageLoadError(name, problem)
    return path, name


def file_problem(path: str, kind: str) -> str | None:
    """Why the file at `path` cannot hold `kind` ("an image", "a video") before any decoder is tried, or None."""
    if not os.path.exists(path):
        return "file not found"
    if os.path.isdir(path):
        return f"is a directory, not {kind} file"
    if os.path.getsize(path) == 0:
        return "empty file"
    return None


class _TruncatedError(Exception):
    """A decoder asked for bytes past the end of the file (not an OSError: PIL's handlers must not catch it)."""


class _EndCheckingReader:
    """Wraps a binary file so that, once `checking` is set, a read past its end raises `_TruncatedError` where
    PIL's process-wide ``ImageFile.LOAD_TRUNCATED_IMAGES`` is set (by any thread or library): PIL would then pad a
    truncated image instead of failing. The flag is only read, so the check is local to one call."""

    def __init__(self, raw):
        self._raw, self.checking = raw, False

    def read(self, size: int | None = -1) -> bytes:
        data = self._raw.read(size)
        if self.checking and not data and size is not None and size > 0 and ImageFile.LOAD_TRUNCATED_IMAGES:
            raise _TruncatedError
        return data

    def __getattr__(self, name):  # seek, tell, ... of the wrapped file
        return getattr(self._raw, name)


def open_image(source: Any, max_pixels: int = MAX_IMAGE_PIXELS) -> Image.Image:
    """Decode a path, bytes, a ``{"path", "bytes"}`` dict (a `datasets` undecoded image) or a PIL image into
    an upright RGB image (first frame of animations).

    Raises ImageLoadError naming the file and the reason: not found, directory, empty, not an image,
    truncated, corrupt, or more than `max_pixels` pixels (checked from the header, so a decompression bomb is
    rejected before it is decoded). Truncated files raise even where ``ImageFile.LOAD_TRUNCATED_IMAGES`` is set:
    the check is local to this call (the flag is never written), so concurrent calls cannot disturb each other.
    """
    if isinstance(source, Image.Image):
        return to_rgb(_upright(source))
    target, name = _open_target(source)
    try:
        with (
            open(target, "rb") if isinstance(target, str) else target as raw,
            warnings.catch_warnings(),
        ):
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # the explicit check below decides
            reader = _EndCheckingReader(raw)
            with Image.open(reader) as img:
                width, height = img.size
                if width * height > max_pixels:
                    raise ImageLoadError(
                        name,
                        f"too large: {width}x{height} pixels exceeds the limit of {max_pixels} "
                        "(possible decompression bomb)",
                    )
                reader.checking = True
                img.load()
                return to_rgb(_upright(img))
    except ImageLoadError:
        raise
    except _TruncatedError as err:
        raise ImageLoadError(name, "truncated file (the data ends before the image does)") from err
    except Image.DecompressionBombError as err:
        raise ImageLoadError(name, f"too large (possible decompression bomb): {err}") from err
    except UnidentifiedImageError as err:
        raise ImageLoadError(name, "not an image (unrecognised format)") from err
    except Exception as err:  # PIL plugins raise many exception types on corrupt data
        kind = "truncated file" if "truncated" in str(err).lower() or isinstance(err, EOFError) else "corrupt image"
        raise ImageLoadError(name, f"{kind} ({type(err).__name__}: {err})") from err


# --------------------------------------------------------------------------- degradations


# libjpeg refuses sides over 65,500 px; larger images are encoded in tiles of at most this size, a multiple of
# 16 so that tiles start on the 16 x 16 block grid that one encoding of the whole image would use.
JPEG_TILE = 65_488


def jpeg(img: Image.Image, quality: int) -> Image.Image:
    """Re-encode as JPEG at `quality` (1-100) and decode again, as a social-media upload would.

    An image with a side beyond JPEG's limit is encoded tile by tile: the same blocks as one encoding, except
    that chroma is not interpolated across a tile border.
    """
    img = img.convert("RGB")
    width, height = img.size
    if max(width, height) <= JPEG_TILE:
        return _jpeg_once(img, quality)
    out = Image.new("RGB", img.size)
    for top in range(0, height, JPEG_TILE):
        for left in range(0, width, JPEG_TILE):
            box = (left, top, min(left + JPEG_TILE, width), min(top + JPEG_TILE, height))
            out.paste(_jpeg_once(img.crop(box), quality), box[:2])
    return out


def _jpeg_once(img: Image.Image, quality: int) -> Image.Image:
    buffer = io.BytesIO()
    img.save(buffer, "JPEG", quality=int(quality))
    buffer.seek(0)
    with Image.open(buffer) as out:
        return out.convert("RGB")


def gaussian_blur(img: Image.Image, sigma: float) -> Image.Image:
    """Gaussian blur with standard deviation `sigma` pixels (PIL's `radius` is the standard deviation)."""
    return img.filter(ImageFilter.GaussianBlur(radius=float(sigma)))


def downscale(img: Image.Image, factor: float) -> Image.Image:
    """Resize down by `factor` (0 < factor <= 1) and back up to the original size, both bilinear: the
    thumbnail round trip that erases high-frequency generator traces while keeping the size."""
    if not 0 < factor <= 1:
        raise ValueError(f"downscale factor must be in (0, 1], got {factor}")
    width, height = img.size
    small = img.resize((max(1, round(width * factor)), max(1, round(height * factor))), Image.Resampling.BILINEAR)
    return small.resize((width, height), Image.Resampling.BILINEAR)


def corner_crop(img: Image.Image, fraction: float) -> Image.Image:
    """Keep the bottom-right `fraction` (0 < fraction <= 1) of each side, as a re-post that trims the top and left
    edges does: unlike a centred crop it also moves the centre and the 8 x 8 JPEG grid."""
    if not 0 < fraction <= 1:
        raise ValueError(f"crop fraction must be in (0, 1], got {fraction}")
    width, height = img.size
    return img.crop((width - max(1, round(width * fraction)), height - max(1, round(height * fraction)), width, height))


DEGRADATIONS: dict[str, Callable[[Image.Image, Any], Image.Image]] = {
    "jpeg": jpeg,
    "blur": gaussian_blur,
    "downscale": downscale,
    "crop": corner_crop,
}
# The robustness sweep's settings (the field's usual JPEG / blur / resize flags).
ROBUSTNESS_SWEEP = {"jpeg": (95, 75, 50, 30), "blur": (1, 2, 3), "downscale": (0.5, 0.25)}


def degrade(img: Image.Image, kind: str, value: float) -> Image.Image:
    """Apply the degradation `kind` ("jpeg", "blur", "downscale" or "crop") with its parameter `value`."""
    if kind not in DEGRADATIONS:
        raise ValueError(f"unknown degradation {kind!r}; expected one of {sorted(DEGRADATIONS)}")
    return DEGRADATIONS[kind](img, value)


# --------------------------------------------------------------------------- crops


def _padded_crop(img: Image.Image, size: int, left: int, top: int) -> Image.Image:
    """The `size` x `size` window at (`left`, `top`) of the image centred on a black canvas at least `size` on
    each side. Only the window is allocated (PIL fills the part outside the image with black): padding a
    1 x 40,000,000 image onto a full canvas would allocate 40,000,000 x `size` pixels."""
    width, height = img.size
    x0, y0 = left - (max(width, size) - width) // 2, top - (max(height, size) - height) // 2
    return img.crop((x0, y0, x0 + size, y0 + size))


def random_crop(img: Image.Image, size: int, rng: random.Random) -> Image.Image:
    """Random `size` x `size` crop without resizing (pads smaller images)."""
    width, height = img.size
    left, top = rng.randint(0, max(width, size) - size), rng.randint(0, max(height, size) - size)
    return _padded_crop(img, size, left, top)


def random_state(saved) -> tuple:
    """A `random.Random` state from its JSON round trip (`getstate()` written as lists): what `setstate` takes."""
    version, internal, gauss = saved
    return version, tuple(internal), gauss


class TrainAugmentation:
    """Training augmentation in the CNNSpot tradition: with the given probabilities a down-then-up resize,
    a Gaussian blur and a JPEG re-compression (quality uniform in `jpeg_quality`), then a random crop to
    `image_size` (no resizing, so generator traces survive) and a horizontal flip.

    Reproducible for a `seed`. Inside DataLoader workers it reseeds from the worker's seed, so workers do not
    repeat each other's draws (each receives a copy of this object).
    """

    def __init__(
        self,
        image_size: int,
        flip_prob: float = 0.5,
        resize_prob: float = 0.1,
        resize_scale: tuple[float, float] = (0.5, 1.0),
        blur_prob: float = 0.1,
        blur_sigma: tuple[float, float] = (0.1, 3.0),
        jpeg_prob: float = 0.1,
        jpeg_quality: tuple[int, int] = (30, 100),
        seed: int | None = 0,
    ):
        self.image_size = image_size
        self.flip_prob, self.resize_prob, self.blur_prob, self.jpeg_prob = flip_prob, resize_prob, blur_prob, jpeg_prob
        self.resize_scale, self.blur_sigma, self.jpeg_quality = resize_scale, blur_sigma, jpeg_quality
        self.seed = seed
        self.rng = random.Random(seed)
        self._worker_id: int | None = None

    def _generator(self) -> random.Random:
        info = torch.utils.data.get_worker_info()
        if info is not None and info.id != self._worker_id:
            self._worker_id = info.id
            self.rng = random.Random(None if self.seed is None else self.seed + info.seed)
        return self.rng

    def reseed(self, seed: int) -> None:
        """Restarts the random draws from `seed` (the trainer seeds each batch for exact resume)."""
        self.rng = random.Random(seed)
        info = torch.utils.data.get_worker_info()
        self._worker_id = None if info is None else info.id

    def state_dict(self) -> dict:
        """Where the random draws stand (JSON-able), for a checkpoint."""
        return {"rng": self.rng.getstate()}

    def load_state_dict(self, state: dict) -> None:
        self.rng.setstate(random_state(state["rng"]))

    def __call__(self, img: Image.Image) -> Image.Image:
        rng = self._generator()
        if rng.random() < self.resize_prob:
            img = downscale(img, rng.uniform(*self.resize_scale))
        if rng.random() < self.blur_prob:
            img = gaussian_blur(img, rng.uniform(*self.blur_sigma))
        if rng.random() < self.jpeg_prob:
            img = jpeg(img, rng.randint(*self.jpeg_quality))
        img = random_crop(img, self.image_size, rng)
        if rng.random() < self.flip_prob:
            img = ImageOps.mirror(img)
        return img


# --------------------------------------------------------------------------- model inputs

# "resize" mode: a longer side beyond this many times the shorter one is centre-cropped first (see
# bounded_aspect); no photo is that elongated, so ordinary images reach the processor untouched.
MAX_ASPECT_RATIO = 64


def bounded_aspect(img: Image.Image, max_ratio: int = MAX_ASPECT_RATIO) -> Image.Image:
    """Centre-crops the longer side to `max_ratio` times the shorter one; other images are returned as is.

    CLIP's processor scales the shorter side to S and keeps only the central S x S, so this drops pixels it
    would discard anyway, while bounding the resized image: a 700-byte 1 x 200000 PNG would otherwise be
    resized to 30 x 6,000,000 (2 GB, 7 s) by the tiny processor, and far worse at S = 224.
    """
    width, height = img.size
    keep = max_ratio * min(width, height)
    if max(width, height) <= keep:
        return img
    if width > height:
        left = (width - keep) // 2
        return img.crop((left, 0, left + keep, height))
    top = (height - keep) // 2
    return img.crop((0, top, width, top + keep))


def centre_window(img: Image.Image, size: int) -> Image.Image:
    """The part of `img` that a centre crop to `size` keeps, before any padding: each side longer than `size` cut
    to its central `size` pixels, as the image processor's centre crop cuts it. The processor then gives the same
    pixels from this window as from the whole image, without first padding a 1 x 40,000,000 image to `size` rows."""
    width, height = img.size
    left, top = max(width - size, 0) // 2, max(height - size, 0) // 2
    return img.crop((left, top, left + min(width, size), top + min(height, size)))


def image_processor_for(image_processor, mode: str):
    """A copy of a CLIP image processor that brings images to its crop size S as the preprocessing `mode` says.

    "resize": the shortest side scaled to the processor's size, then the centre S x S (CLIP's view of the whole
    image); "center_crop": the centre S x S without resizing, smaller images padded with black (pixel-level traces
    survive). Saved with the model (`export_model`), it is what plain `AutoImageProcessor` and `pipeline()` apply,
    and `Preprocessor` applies it too: one implementation of each mode.
    """
    if mode not in PREPROCESS_MODES:
        raise ValueError(f"unknown preprocessing mode {mode!r}; expected one of {PREPROCESS_MODES}")
    processor = copy.deepcopy(image_processor)
    processor.do_resize, processor.do_center_crop = mode == "resize", True
    return processor


def processor_mode(image_processor) -> str:
    """The preprocessing mode a saved image processor implements (see `image_processor_for`)."""
    return "resize" if image_processor.do_resize else "center_crop"


class Preprocessor:
    """PIL images -> normalised ``(B, 3, S, S)`` float tensor for the model.

    `image_processor` is the model's transformers CLIP image processor; its crop size is S and its mean/std
    normalise. The images go through it as configured for `mode` (`image_processor_for`; default: the mode the
    processor implements), so they get the pixels plain `pipeline()` gives them with the same processor. The
    package only trims first what the processor would discard anyway (`bounded_aspect`, `centre_window`), to
    bound memory on hostile shapes. With a `TrainAugmentation` the augmentation replaces the geometric step
    (training = augmentation then normalisation).
    """

    def __init__(self, image_processor, mode: str | None = None, augmentation: TrainAugmentation | None = None):
        mode = processor_mode(image_processor) if mode is None else mode
        self.image_processor, self.mode = image_processor_for(image_processor, mode), mode
        self.augmentation = augmentation
        self.image_size = int(image_processor.crop_size["height"])
        if augmentation is not None and augmentation.image_size != self.image_size:
            raise ValueError(
                f"augmentation crops to {augmentation.image_size} px but the image processor's crop size is "
                f"{self.image_size} px; build TrainAugmentation(image_size={self.image_size})"
            )

    def __call__(self, images: Sequence[Image.Image]) -> torch.Tensor:
        if not images:
            return torch.empty(0, 3, self.image_size, self.image_size)
        if self.augmentation is not None:
            cropped = [self.augmentation(img) for img in images]
            return self.image_processor(images=cropped, do_resize=False, do_center_crop=False, return_tensors="pt")[
                "pixel_values"
            ]
        trim = bounded_aspect if self.mode == "resize" else partial(centre_window, size=self.image_size)
        return self.image_processor(images=[trim(img) for img in images], return_tensors="pt")["pixel_values"]


def preprocessing_mismatch(image_processor, config, name) -> str | None:
    """What is wrong when the saved image processor of model `name` does not implement `config.preprocess`, the
    preprocessing the model was calibrated with (folders exported before the processor followed it), with the fix;
    None when it does."""
    saved = processor_mode(image_processor)
    if saved == config.preprocess:
        return None
    return (
        f"{name}: its preprocessor_config.json implements {saved!r} but the model was "
        f"calibrated with preprocess={config.preprocess!r}, so plain pipeline() sees other pixels. Save the matching "
        f"processor into the folder: mirage_hf.transforms.image_processor_for(processor, {config.preprocess!r})"
        ".save_pretrained(folder)"
    )


def scoring_preprocessor(image_processor, config, mode: str | None = None) -> Preprocessor:
    """The preprocessing a model scores with: `mode` if given, else the one it was calibrated with
    (`config.preprocess`), also where the folder's saved processor disagrees (a warning says so)."""
    if mode is None and (problem := preprocessing_mismatch(image_processor, config, config._name_or_path)):
        logger.warning("%s. mirage_hf scores with %r.", problem, config.preprocess)
    return Preprocessor(image_processor, mode or config.preprocess)


class DetectionCollator:
    """Collate rows ``{"image", "label", "subset"}`` for a torch DataLoader.

    Decodes with `open_image`, drops rows that fail, and returns ``{"pixel_values": (B, 3, S, S),
    "labels": LongTensor (B,), "subsets": list[str], "failed": list[(path or row index, reason)]}``. A batch in
    which every image fails gives B = 0 instead of an exception, so one bad shard cannot stop a run.
    """

    def __init__(self, preprocess: Callable[[list[Image.Image]], torch.Tensor], max_pixels: int = MAX_IMAGE_PIXELS):
        self.preprocess, self.max_pixels = preprocess, max_pixels

    def __call__(self, rows: Sequence[dict]) -> dict[str, Any]:
        images, labels, subsets, failed = [], [], [], []
        for index, row in enumerate(rows):
            try:
                images.append(open_image(row["image"], self.max_pixels))
            except ImageLoadError as err:
                failed.append((err.source if err.source is not None else index, err.reason))
                continue
            labels.append(int(row["label"]))
            subsets.append(str(row.get("subset", "all")))
        return {
            "pixel_values": self.preprocess(images),
            "labels": torch.tensor(labels, dtype=torch.long),
            "subsets": subsets,
            "failed": failed,
        }


class BadImageReport:
    """Failures accumulated over batches: a count, the first `max_examples` (source, reason) pairs and a
    one-line summary. Feed it ``batch["failed"]`` in the main process (DataLoader workers hold copies of the
    collator, so state kept there would be lost)."""

    def __init__(self, max_examples: int = 20):
        self.max_examples = max_examples
        self.count = 0
        self.examples: list[tuple[Any, str]] = []

    def add(self, failed: Sequence[tuple[Any, str]]) -> None:
        self.count += len(failed)
        self.examples.extend(failed[: max(0, self.max_examples - len(self.examples))])

    def summary(self) -> str:
        if not self.count:
            return "all images loaded"
        shown = "; ".join(f"{source}: {reason}" for source, reason in self.examples[:3])
        return f"{self.count} image(s) could not be loaded and were skipped (e.g. {shown})"

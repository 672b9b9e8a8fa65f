"""Verdict stability: a verdict that flips between a file and its re-saved, resized or cropped copy is "unsure".

Besides each input, `STABILITY_COPIES` are scored: the fixed set of degraded copies a re-post makes (a JPEG
re-save at quality 75, a half-size round trip, a crop of the top and left 10%; the degradations of
`mirage_hf.transforms`). When the input and its copies lie on both sides of the threshold, the verdict is
"unsure", whatever the input's own p(fake); `spread` is max - min of p(fake) over the input and its copies.
The reported p(fake) stays the input's own.
"""

from __future__ import annotations

from collections.abc import Sequence

from PIL import Image

from .transforms import degrade

STABILITY_COPIES = (("jpeg", 75), ("downscale", 0.5), ("crop", 0.9))
SCORES_PER_INPUT = 1 + len(STABILITY_COPIES)  # the input, then its copies


def with_copies(images: Sequence[Image.Image]) -> list[Image.Image]:
    """Each image followed by its `STABILITY_COPIES`, in that order."""
    return [out for img in images for out in (img, *(degrade(img, kind, value) for kind, value in STABILITY_COPIES))]


def agreement(p_fakes: Sequence[float], threshold: float) -> tuple[bool, float]:
    """(whether the input and its copies, p(fake) `p_fakes`, all fall on one side of `threshold`; their spread)."""
    return len({bool(p >= threshold) for p in p_fakes}) == 1, float(max(p_fakes) - min(p_fakes))

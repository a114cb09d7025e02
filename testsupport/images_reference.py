"""Reading a digit file as it was defined before the fast paths: the definition they are held to.

``load_image_reference`` opens the file one component at a time (the O_NOFOLLOW walk), decodes
it to float32 luminance with ``to_gray`` (the code of mnistq/images.py before its 8-bit path) and
normalises it with ``normalise_reference``. ``mnistq.images.load_image`` and ``load_images``
must give the same arrays (tests/test_images_fast.py); bench/images.py times both.
"""

from __future__ import annotations

import os

import numpy as np
from PIL import Image, ImageOps

from mnistq.images import DEFAULT_MAX_PIXELS, read_luminance, shrink
from mnistq.normalise import normalise_reference

__all__ = ["load_image_reference", "to_gray"]


def to_gray(im: Image.Image) -> np.ndarray:
    """Any mode to float32 luminance in [0, 1]; transparent areas become contrasting paper."""
    im = shrink(im)  # a file just opened is at its first frame: n_frames would walk them all
    ImageOps.exif_transpose(im, in_place=True)  # in place: no copy of a big image
    mode = im.mode
    if mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        # High bit depths often hold 8-, 10- or 12-bit data: stretch by the image's own range.
        a = np.asarray(im, dtype=np.float32)
        lo, hi = float(a.min()), float(a.max())
        return (a - lo) / (hi - lo) if hi > lo else np.zeros_like(a)
    has_alpha = mode in ("RGBA", "LA", "PA", "La", "RGBa") or "transparency" in im.info
    if not has_alpha:
        return np.asarray(im.convert("L"), dtype=np.float32) / 255.0
    rgba = np.asarray(im.convert("LA"), dtype=np.float32) / 255.0
    gray, alpha = rgba[..., 0], rgba[..., 1]
    if alpha.min() >= 1.0:
        return gray
    # Ink drawn on a transparent canvas: lay it on paper of the opposite shade, whatever its colour.
    weight = alpha.sum()
    ink = float((gray * alpha).sum() / weight) if weight > 0 else 0.0
    paper = 1.0 if ink < 0.5 else 0.0
    return gray * alpha + paper * (1.0 - alpha)


def load_image_reference(path: str | os.PathLike[str], max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """``mnistq.images.load_image``, as defined before its fast paths (slower; same arrays)."""
    return normalise_reference(read_luminance(path, max_pixels, to_gray, walk=True))

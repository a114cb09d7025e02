"""Turn any digit image into an MNIST-style 28x28 array (torch-free: the producer may import it).

MNIST itself was made this way: ink bright on black, the digit's bounding box scaled to fit
20x20 keeping its aspect, then placed in 28x28 by its centre of mass. Real images also need
their mode flattened (alpha, palette, CMYK, 16-bit), polarity decided by the border, and the
background and sensor noise removed before the bounding box means anything.
"""

from __future__ import annotations

import os
import stat
import warnings

import numpy as np
from PIL import Image, ImageFilter, ImageOps, UnidentifiedImageError

from mnistq.errors import ImageError
from mnistq.protocol import EXTENSIONS, ErrorKind
from mnistq.settings import Settings

__all__ = ["EXTENSIONS", "load_image", "normalise"]
DEFAULT_MAX_PIXELS = Settings.max_pixels


# We enforce our own limit before decoding; Pillow's warning would only add noise.
Image.MAX_IMAGE_PIXELS = None


def open_checked(path: str | os.PathLike[str], max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Open an image after refusing what is not a regular, non-empty, reasonably sized file."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise ImageError("file not found", ErrorKind.NOT_FOUND) from None
    except OSError as e:
        raise ImageError(f"cannot stat file: {e.strerror}", ErrorKind.REFUSED) from None
    if stat.S_ISDIR(st.st_mode):
        raise ImageError("is a directory, not an image", ErrorKind.REFUSED)
    if not stat.S_ISREG(st.st_mode):
        raise ImageError("not a regular file", ErrorKind.REFUSED)
    if st.st_size == 0:
        raise ImageError("empty file")
    try:
        im = Image.open(path)  # reads the header only
    except UnidentifiedImageError:
        raise ImageError("not an image (unrecognised format)") from None
    except OSError as e:
        raise ImageError(f"cannot read image: {e}") from None
    w, h = im.size
    if w * h > max_pixels:
        im.close()
        raise ImageError(
            f"image too large: {w}x{h} pixels is over the limit of {max_pixels}", ErrorKind.TOO_LARGE
        )
    return im


def to_gray(im: Image.Image) -> np.ndarray:
    """Any mode to float32 luminance in [0, 1]; transparent areas become contrasting paper."""
    if getattr(im, "n_frames", 1) > 1:
        im.seek(0)
    im = ImageOps.exif_transpose(im) or im
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


def _background(a: np.ndarray) -> np.ndarray:
    """Slowly varying paper tone (lighting, shadows): the local minimum at a scale above strokes."""
    h, w = a.shape
    k = max(2, min(h, w) // 16)
    small = Image.fromarray(a, "F").reduce(k)
    bg = small.filter(ImageFilter.MinFilter(5))
    return np.asarray(bg.resize((w, h), Image.Resampling.BILINEAR), dtype=np.float32)


def normalise(gray: np.ndarray) -> np.ndarray:
    """MNIST-style 28x28 float32 in [0, 1] (ink bright) from a luminance array."""
    h, w = gray.shape
    bw = max(1, min(h, w) // 20)
    border = np.concatenate(
        [gray[:bw].ravel(), gray[-bw:].ravel(), gray[:, :bw].ravel(), gray[:, -bw:].ravel()]
    )
    paper = float(np.median(border))
    a = gray - paper if paper < 0.5 else paper - gray  # ink bright, paper at zero
    if max(h, w) > 56:  # camera-sized: speckle and uneven paper; MNIST-sized images have neither
        a = np.asarray(Image.fromarray(a.astype(np.float32), "F").filter(ImageFilter.MedianFilter(3)))
        a = a - _background(a)
        border = np.concatenate([a[:bw].ravel(), a[-bw:].ravel(), a[:, :bw].ravel(), a[:, -bw:].ravel()])
        paper = float(np.median(border))
        a = a - paper
        border = border - paper
    else:
        border = border - paper
    a = np.clip(a, 0.0, None)
    peak = float(a.max())
    if peak <= 0.05:
        raise ImageError("no digit found (blank image)", ErrorKind.NO_DIGIT)
    a /= peak
    # Noise floor from the border spread: only ink well above it counts towards the bounding box.
    spread = float(np.median(np.abs(border))) * 1.4826
    a[a < min(0.5, max(0.05, 5.0 * spread / peak))] = 0.0
    if not a.any():
        raise ImageError("no digit found (only noise)", ErrorKind.NO_DIGIT)
    rows, cols = np.flatnonzero(a.any(axis=1)), np.flatnonzero(a.any(axis=0))
    crop = a[rows[0] : rows[-1] + 1, cols[0] : cols[-1] + 1]
    ch, cw = crop.shape
    scale = 20.0 / max(ch, cw)
    nh, nw = max(1, round(ch * scale)), max(1, round(cw * scale))
    if (nh, nw) != (ch, cw):
        crop = np.asarray(Image.fromarray(crop, "F").resize((nw, nh), Image.Resampling.LANCZOS))
        crop = np.clip(crop, 0.0, 1.0)
    mass = crop.sum()
    cy = float((crop.sum(axis=1) * np.arange(nh)).sum() / mass)
    cx = float((crop.sum(axis=0) * np.arange(nw)).sum() / mass)
    top = min(max(round(13.5 - cy), 0), 28 - nh)
    left = min(max(round(13.5 - cx), 0), 28 - nw)
    out = np.zeros((28, 28), dtype=np.float32)
    out[top : top + nh, left : left + nw] = crop
    return out


def load_image(path: str | os.PathLike[str], max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """Read one image file into an MNIST-style 28x28 array, or raise ImageError with the reason."""
    im = open_checked(path, max_pixels)
    try:
        with im, warnings.catch_warnings():
            warnings.simplefilter("ignore")
            gray = to_gray(im)
    except ImageError:
        raise
    except (OSError, ValueError, SyntaxError, EOFError) as e:  # Pillow's ways of saying "damaged"
        raise ImageError(f"damaged or truncated image: {e}") from None
    return normalise(gray)

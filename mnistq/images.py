"""Turn any digit image into an MNIST-style 28x28 array (torch-free: the producer may import it).

MNIST itself was made this way: ink bright on black, the digit's bounding box scaled to fit
20x20 keeping its aspect, then placed in 28x28 by its centre of mass. Real images also need
their mode flattened (alpha, palette, CMYK, 16-bit), polarity decided by the border, and the
background and sensor noise removed before the bounding box means anything.

A file is opened once, without following symbolic links, and what was opened is checked
(``fstat``: a regular, non-empty file) and decoded: nothing swapped in after a caller's check is
read. Only the formats of EXTENSIONS are decoded, and big images are decoded small (MIN_SIDE).
"""

from __future__ import annotations

import errno
import os
import stat
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from typing import BinaryIO

import numpy as np
from PIL import Image, ImageFilter, ImageOps, JpegImagePlugin, UnidentifiedImageError

from mnistq.errors import ImageError
from mnistq.protocol import EXTENSIONS, ErrorKind
from mnistq.settings import Settings

__all__ = ["EXTENSIONS", "FORMATS", "load_image", "normalise"]
DEFAULT_MAX_PIXELS = Settings.max_pixels

#: Pillow's names for the formats of EXTENSIONS (.pgm and .pbm are PPM): nothing else is
#: decoded, so a file cannot reach a decoder the product never meant to offer (EPS runs
#: Ghostscript) by its content alone, whatever its name.
FORMATS = ("BMP", "GIF", "JPEG", "PNG", "PPM", "TIFF", "WEBP")

#: Big images are decoded (JPEG, in the DCT) or reduced (others) to about this many pixels on
#: their short side, never fewer: a digit a tenth of the frame tall keeps ~50 pixels, more than
#: the 20 it is scaled to, while a 36-megapixel photo costs about what a 1-megapixel one does.
MIN_SIDE = 512

# We enforce our own limit before decoding; Pillow's warning would only add noise.
Image.MAX_IMAGE_PIXELS = None
# Pillow's warnings about odd files (a malformed MPO, palette transparency) say nothing the
# result does not. Set once: catch_warnings() per image is not thread-safe (task threads).
warnings.filterwarnings("ignore", module=r"PIL\.")

_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
# O_NONBLOCK: a FIFO opens at once instead of waiting for a writer (and is then refused).
_FILE_FLAGS = os.O_RDONLY | os.O_NONBLOCK | os.O_NOFOLLOW | os.O_CLOEXEC


def _refusal(e: OSError, last: bool, link: bool = False) -> ImageError:
    if e.errno == errno.ENOENT:
        return ImageError("file not found", ErrorKind.NOT_FOUND)
    if link or e.errno == errno.ELOOP:
        what = "the file" if last else "a folder on its path"
        return ImageError(f"{what} is a symbolic link (links are not followed)", ErrorKind.REFUSED)
    return ImageError(f"cannot open file: {e.strerror}", ErrorKind.REFUSED)


def _open_no_follow(path: str) -> int:
    """A descriptor for ``path``, opened one component at a time with O_NOFOLLOW.

    So no component can be a symbolic link when it is opened, whatever it was when the caller
    checked the path: a link swapped in afterwards is refused, never followed.
    """
    parts = os.path.abspath(path).split(os.sep)[1:]
    fd = os.open(os.sep, _DIR_FLAGS)
    try:
        for i, name in enumerate(parts):
            last = i == len(parts) - 1
            try:
                child = os.open(name, _FILE_FLAGS if last else _DIR_FLAGS, dir_fd=fd)
            except OSError as e:
                # O_DIRECTORY | O_NOFOLLOW says ENOTDIR for a link too: look at what is there.
                link = not last and e.errno == errno.ENOTDIR and _is_link(name, fd)
                raise _refusal(e, last, link) from None
            os.close(fd)
            fd = child
        return fd
    except BaseException:
        os.close(fd)
        raise


def _is_link(name: str, dir_fd: int) -> bool:
    try:
        return stat.S_ISLNK(os.lstat(name, dir_fd=dir_fd).st_mode)
    except OSError:
        return False


@contextmanager
def open_regular(path: str | os.PathLike[str]) -> Iterator[BinaryIO]:
    """The file at ``path`` if it is a regular, non-empty file, checked on what was opened.

    Opened once (see _open_no_follow), then ``fstat`` decides: what is checked is what is read.
    """
    fd = _open_no_follow(os.fspath(path))
    try:
        st = os.fstat(fd)
        if stat.S_ISDIR(st.st_mode):
            raise ImageError("is a directory, not an image", ErrorKind.REFUSED)
        if not stat.S_ISREG(st.st_mode):
            raise ImageError("not a regular file", ErrorKind.REFUSED)
        if st.st_size == 0:
            raise ImageError("empty file")
        fp = os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise
    with fp:
        yield fp


def open_image(fp: BinaryIO, max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Read the header (one of FORMATS only) and refuse an image over ``max_pixels``."""
    try:
        im = Image.open(fp, formats=FORMATS)  # reads the header only
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


def reduction(size: tuple[int, int]) -> int:
    """The integer factor that shrinks an image to no less than MIN_SIDE on its short side."""
    return max(1, min(size) // MIN_SIDE)


def shrink(im: Image.Image) -> Image.Image:
    """A big image at about MIN_SIDE on its short side; a small one unchanged.

    A JPEG is decoded small (its DCT scales by 1/2, 1/4 or 1/8, and straight to grey), so the
    full image never exists; other formats are decoded whole, then reduced at once (a box
    filter, in their own mode), before any float copy of them is made.
    """
    factor = reduction(im.size)
    if factor == 1:
        return im
    w, h = im.size
    if isinstance(im, JpegImagePlugin.JpegImageFile):  # MPO (phone photos) is a JPEG too
        im.draft("L" if im.mode in ("L", "RGB") else im.mode, (-(-w // factor), -(-h // factor)))
        return im
    if im.mode in ("1", "P", "PA") or im.mode.startswith("I;16"):
        # reduce() would average palette indices, and knows neither 1-bit nor 16-bit modes.
        if im.mode == "1":
            im = im.convert("L")
        elif im.mode.startswith("I;16"):
            im = im.convert("I")
        else:
            im = im.convert("RGBA" if im.mode == "PA" or "transparency" in im.info else "RGB")
    return im.reduce(factor)


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
    """Read one image file into an MNIST-style 28x28 array, or raise ImageError with the reason.

    The path is opened without following symbolic links (resolve it first where links are
    welcome, as ``mnistq predict`` does).
    """
    with open_regular(path) as fp:
        im = open_image(fp, max_pixels)
        try:
            with im:
                gray = to_gray(im)
        except ImageError:
            raise
        except (OSError, ValueError, SyntaxError, EOFError) as e:  # Pillow's ways of saying "damaged"
            raise ImageError(f"damaged or truncated image: {e}") from None
    return normalise(gray)

"""Turn any digit image file into an MNIST-style 28x28 array (torch-free: the producer may import it).

Here a file is opened and decoded to luminance, its mode flattened (alpha, palette, CMYK,
16-bit); mnistq/normalise.py then makes the MNIST-style array. A file is opened once, without
following symbolic links, and what was opened is checked (``fstat``: a regular, non-empty file)
and decoded: nothing swapped in after a caller's check is read. Only the formats of EXTENSIONS
are decoded, and big images are decoded small (MIN_SIDE).

``load_image`` reads one file; ``load_images`` reads a batch and normalises its small 8-bit
images of one size together (``normalise_many``). testsupport/images_reference.py keeps the
definition both are held to (tests/test_images_fast.py).
"""

from __future__ import annotations

import os
import threading
import warnings
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from typing import BinaryIO

import numpy as np
from PIL import Image, ImageOps, JpegImagePlugin, UnidentifiedImageError

from mnistq.errors import ImageError
from mnistq.normalise import SMALL, normalise, normalise_many
from mnistq.protocol import EXTENSIONS, ErrorKind
from mnistq.safeopen import open_checked
from mnistq.settings import Settings

__all__ = ["EXTENSIONS", "FORMATS", "load_image", "load_images", "normalise"]
DEFAULT_MAX_PIXELS = Settings.max_pixels

#: Pillow's names for the formats of EXTENSIONS (.pgm and .pbm are PPM): nothing else is
#: decoded, so a file cannot reach a decoder the product never meant to offer (EPS runs
#: Ghostscript) by its content alone, whatever its name.
FORMATS = ("BMP", "GIF", "JPEG", "PNG", "PPM", "TIFF", "WEBP")

#: Big images are decoded (JPEG, in the DCT) or reduced (others) to about this many pixels on
#: their short side, never fewer: a digit a tenth of the frame tall keeps ~50 pixels, more than
#: the 20 it is scaled to, while a 36-megapixel photo costs about what a 1-megapixel one does.
MIN_SIDE = 512
#: ... and to at most this many on their long side, however narrow: a 1000x39000 strip is
#: reduced by 20 (to 50x1950), not worked on at 39 megapixels in float (2.2 GB, 10 s). Every
#: array made after the decode is then at most LONG_SIDE x 2 MIN_SIDE (4 MB as 8-bit).
LONG_SIDE = 4 * MIN_SIDE

#: A progressive JPEG is decoded once per scan: libjpeg writes ~10 (6 for grey), mozjpeg a few
#: more. A hostile file that repeats its last scan 3,000 times took 83 s; this many take a few.
MAX_SCANS = 100
#: A decode that needs more memory than this waits for the process's other big decode to end:
#: a worker's task threads then hold at most one big image at a time (finding: three 39-Mpx
#: strips at once took a worker from 0.7 to 7.2 GB). At the default MNISTQ_MAX_PIXELS the most
#: one image can take is 40 Mpx x 4 bytes (RGBA), plus the mode's conversion.
BIG_DECODE = 64 * 2**20
_ONE_BIG = threading.Lock()

# We enforce our own limit before decoding; Pillow's warning would only add noise.
Image.MAX_IMAGE_PIXELS = None
# Pillow's warnings about odd files (a malformed MPO, palette transparency) say nothing the
# result does not. Set once: catch_warnings() per image is not thread-safe (task threads).
warnings.filterwarnings("ignore", module=r"PIL\.")


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
    if isinstance(im, JpegImagePlugin.JpegImageFile) and _scans(fp) > MAX_SCANS:
        im.close()
        raise ImageError(
            f"a JPEG of more than {MAX_SCANS} scans (a normal one has about 10): too slow to decode",
            ErrorKind.TOO_LARGE,
        )
    return im


def _scans(fp: BinaryIO) -> int:
    """The start-of-scan markers in a JPEG file. 0xFF 0xDA cannot occur inside entropy-coded
    data (a 0xFF there is followed by 0x00 or a restart marker), so counting the pair counts
    the scans (and those of an embedded thumbnail, a few more)."""
    at, scans, last = fp.tell(), 0, b""
    fp.seek(0)
    while chunk := fp.read(1 << 20):
        scans += (last + chunk).count(b"\xff\xda")
        last = chunk[-1:] if chunk[-1:] == b"\xff" else b""
        if scans > MAX_SCANS:
            break
    fp.seek(at)
    return scans


def decode_bytes(im: Image.Image) -> int:
    """About the memory decoding ``im`` takes: a JPEG's reduced decode, or a progressive one's
    full-size coefficients (2 bytes each); other formats decode whole."""
    w, h = im.size
    bands = len(im.getbands()) * (2 if im.mode.startswith("I;16") else 1)
    if isinstance(im, JpegImagePlugin.JpegImageFile):
        if im.info.get("progressive") or im.info.get("progression"):
            return w * h * bands * 2
        scale = min(8, 1 << (reduction(im.size).bit_length() - 1))  # the DCT scales by 2, 4 or 8
        return w * h * bands // (scale * scale)
    return w * h * (bands + (4 if im.mode in ("P", "PA", "1") else 0))  # + a palette's conversion


def reduction(size: tuple[int, int]) -> int:
    """The integer factor that shrinks an image to no less than MIN_SIDE on its short side, and
    to no more than LONG_SIDE on its long side (this one wins: the short side may go below)."""
    return max(1, min(size) // MIN_SIDE, -(-max(size) // LONG_SIDE))


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


def to_luminance(im: Image.Image) -> np.ndarray:
    """Luminance of any mode: uint8 (a level's luminance is level / 255) for an image without
    alpha or high bit depth, else float32 in [0, 1]; transparent areas become contrasting paper."""
    im = shrink(im)  # a file just opened is at its first frame: n_frames would walk them all
    im.load()
    # Only metadata can hold an orientation (getexif reads info, and a TIFF's tags): an image
    # with neither, every MNIST PNG, has nothing to turn.
    if im.info or hasattr(im, "tag_v2"):
        ImageOps.exif_transpose(im, in_place=True)  # in place: no copy of a big image
    mode = im.mode
    if mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        # High bit depths often hold 8-, 10- or 12-bit data: stretch by the image's own range.
        a = np.asarray(im, dtype=np.float32)
        lo, hi = float(a.min()), float(a.max())
        return (a - lo) / (hi - lo) if hi > lo else np.zeros_like(a)
    has_alpha = mode in ("RGBA", "LA", "PA", "La", "RGBa") or "transparency" in im.info
    if not has_alpha:
        flat = im if mode == "L" else im.convert("L")  # np.frombuffer: less than np.asarray's interface
        return np.frombuffer(flat.tobytes(), dtype=np.uint8).reshape(flat.size[1], flat.size[0])
    rgba = np.asarray(im.convert("LA"), dtype=np.float32) / 255.0
    gray, alpha = rgba[..., 0], rgba[..., 1]
    if alpha.min() >= 1.0:
        return gray
    # Ink drawn on a transparent canvas: lay it on paper of the opposite shade, whatever its colour.
    weight = alpha.sum()
    ink = float((gray * alpha).sum() / weight) if weight > 0 else 0.0
    paper = 1.0 if ink < 0.5 else 0.0
    return gray * alpha + paper * (1.0 - alpha)


def read_luminance(
    path: str | os.PathLike[str],
    max_pixels: int = DEFAULT_MAX_PIXELS,
    to: Callable[[Image.Image], np.ndarray] = to_luminance,
    walk: bool = False,
) -> np.ndarray:
    """The file's luminance (see ``to_luminance``), or ImageError with the reason; ``walk``: see
    ``open_checked``. ``to`` decodes (testsupport/images_reference.py passes its ``to_gray``)."""
    with open_checked(path, walk) as fp:
        im = open_image(fp, max_pixels)
        try:
            with im, _ONE_BIG if decode_bytes(im) > BIG_DECODE else nullcontext():
                return to(im)
        except ImageError:
            raise
        except (OSError, ValueError, SyntaxError, EOFError) as e:  # Pillow's ways of saying "damaged"
            raise ImageError(f"damaged or truncated image: {e}") from None


def load_image(path: str | os.PathLike[str], max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """Read one image file into an MNIST-style 28x28 array, or raise ImageError with the reason.

    The path is opened without following symbolic links (resolve it first where links are
    welcome, as ``mnistq predict`` does).
    """
    return normalise(read_luminance(path, max_pixels))


#: a group of same-size small images at least this big is normalised as one stack
MANY = 8


def load_images(
    paths: Sequence[str | os.PathLike[str]], max_pixels: int = DEFAULT_MAX_PIXELS
) -> list[np.ndarray | Exception]:
    """``load_image`` of each path, in order: its array, or the exception it would have raised
    (ImageError for a file that is not a readable digit; anything else is a bug or a decoder's
    own failure, for the caller to log). Small 8-bit images of one size are normalised together.
    """
    out: list[np.ndarray | Exception | None] = [None] * len(paths)
    small: dict[tuple[int, ...], list[tuple[int, np.ndarray]]] = {}
    for i, path in enumerate(paths):
        try:
            gray = read_luminance(path, max_pixels)
            if gray.dtype == np.uint8 and gray.ndim == 2 and max(gray.shape) <= SMALL:
                small.setdefault(gray.shape, []).append((i, gray))
            else:  # normalised at once: a camera-sized float array is not kept for the batch
                out[i] = normalise(gray)
        except Exception as e:  # this file's result; the others go on
            out[i] = e
    for group in small.values():
        if len(group) < MANY:
            for i, gray in group:
                out[i] = _normalised(gray)
            continue
        arrays: Sequence[np.ndarray | Exception]
        try:
            arrays = normalise_many(np.stack([gray for _, gray in group]))
        except Exception:  # a bug there must not cost the batch: each image on its own
            arrays = [_normalised(gray) for _, gray in group]
        for (i, _), a in zip(group, arrays, strict=True):
            out[i] = a
    assert all(x is not None for x in out)
    return out  # type: ignore[return-value]


def _normalised(gray: np.ndarray) -> np.ndarray | Exception:
    try:
        return normalise(gray)
    except Exception as e:
        return e

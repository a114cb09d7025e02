"""Turn any digit image file into an MNIST-style 28x28 array (torch-free: the producer may import it).

Here a file is opened and decoded to luminance, its mode flattened (alpha, palette, CMYK,
16-bit); mnistq/normalise.py then makes the MNIST-style array. A file is opened once, without
following symbolic links, and what was opened is checked (``fstat``: a regular, non-empty file)
and decoded: nothing swapped in after a caller's check is read. Only the formats of EXTENSIONS
are decoded, and big images are decoded small (MIN_SIDE).

``load_image`` reads one file; ``load_images`` reads a batch and normalises its small 8-bit
images of one size together (``normalise_many``). mnistq/images_reference.py keeps the
definition both are held to (tests/test_images_fast.py).
"""

from __future__ import annotations

import ctypes
import errno
import io
import os
import platform
import stat
import sys
import warnings
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import BinaryIO

import numpy as np
from PIL import Image, ImageOps, JpegImagePlugin, UnidentifiedImageError

from mnistq.errors import ImageError
from mnistq.normalise import SMALL, normalise, normalise_many
from mnistq.protocol import EXTENSIONS, ErrorKind
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

#: Files up to this size are read whole into memory before decoding (one read call).
IN_MEMORY = 1 << 20

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
    """A descriptor for ``path``, opened with no symbolic link followed on the way or at the end.

    So no component can be a symbolic link when it is opened, whatever it was when the caller
    checked the path: a link swapped in afterwards is refused, never followed. Where the kernel
    has openat2 the folder is found in one call that refuses any link on its path
    (RESOLVE_NO_SYMLINKS), and the file is opened in it with O_NOFOLLOW; elsewhere, and for
    anything openat2 does not answer plainly, one component at a time (_walk).
    """
    full = os.path.abspath(path)
    if _open_folder is None or "\0" in full:  # a NUL: the walk's os.open says so, as it always has
        return _walk(full)
    folder, _, name = full.rpartition(os.sep)
    try:
        dir_fd = _open_folder(os.fsencode(folder or os.sep))
    except OSError as e:
        if e.errno not in _PLAIN_ERRORS:
            return _walk(full)
        raise _refusal(e, last=False) from None
    try:
        return os.open(name, _FILE_FLAGS, dir_fd=dir_fd)
    except OSError as e:
        raise _refusal(e, last=True) from None
    finally:
        os.close(dir_fd)


def _walk(full: str) -> int:
    """``full`` opened one component at a time, each with O_NOFOLLOW (see _open_no_follow)."""
    parts = full.split(os.sep)[1:]
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


# openat2(2) (Linux 5.6): the same system call number on the architectures named here.
_SYS_OPENAT2 = {"x86_64": 437, "aarch64": 437}
_AT_FDCWD = -100
_RESOLVE_NO_SYMLINKS = 0x04
# O_PATH: the folder is only a place to open the file in, so it needs no read permission.
_FOLDER_FLAGS = os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC if hasattr(os, "O_PATH") else 0
#: openat2's answers that mean the same as the walk's; for any other, the walk decides.
_PLAIN_ERRORS = (errno.ENOENT, errno.ELOOP, errno.ENOTDIR, errno.EACCES)


def _openat2_folder() -> Callable[[bytes], int] | None:
    """A function opening a folder with no link on its path, or None where openat2 is missing
    (an older kernel, another system, a sandbox that filters the call)."""
    number = _SYS_OPENAT2.get(platform.machine())
    if not sys.platform.startswith("linux") or number is None or not _FOLDER_FLAGS:
        return None
    try:
        syscall = ctypes.CDLL(None, use_errno=True).syscall
    except (OSError, AttributeError):
        return None
    syscall.restype = ctypes.c_long
    # All as longs: syscall(2) reads its variadic arguments so.
    syscall.argtypes = [ctypes.c_long, ctypes.c_long, ctypes.c_char_p, ctypes.c_void_p, ctypes.c_size_t]
    how = (ctypes.c_uint64 * 3)(_FOLDER_FLAGS, 0, _RESOLVE_NO_SYMLINKS)  # struct open_how
    address, size = ctypes.addressof(how), ctypes.sizeof(how)

    def open_folder(path: bytes) -> int:
        fd = syscall(number, _AT_FDCWD, path, address, size)
        if fd < 0:
            code = ctypes.get_errno()
            raise OSError(code, os.strerror(code))
        return fd

    open_folder.how = how  # type: ignore[attr-defined]  # keeps the struct alive with the function
    try:
        fd = open_folder(b"/")
    except OSError:
        return None
    os.close(fd)
    return open_folder


_open_folder = _openat2_folder()


def _is_link(name: str, dir_fd: int) -> bool:
    try:
        return stat.S_ISLNK(os.lstat(name, dir_fd=dir_fd).st_mode)
    except OSError:
        return False


def open_checked(path: str | os.PathLike[str], walk: bool = False) -> BinaryIO:
    """The file at ``path`` if it is a regular, non-empty file, checked on what was opened; the
    caller closes it.

    Opened once (see _open_no_follow; ``walk``: one component at a time even where openat2 is
    there), then ``fstat`` decides: what is checked is what is read. A small file is read at
    once (IN_MEMORY): Pillow's many small reads then cost nothing.
    """
    path = os.fspath(path)
    fd = _walk(os.path.abspath(path)) if walk else _open_no_follow(path)
    try:
        st = os.fstat(fd)
        if stat.S_ISDIR(st.st_mode):
            raise ImageError("is a directory, not an image", ErrorKind.REFUSED)
        if not stat.S_ISREG(st.st_mode):
            raise ImageError("not a regular file", ErrorKind.REFUSED)
        if st.st_size == 0:
            raise ImageError("empty file")
        if st.st_size > IN_MEMORY:
            return os.fdopen(fd, "rb")  # it owns the descriptor from here
        data = _read(fd, st.st_size)
    except BaseException:
        os.close(fd)
        raise
    os.close(fd)
    return io.BytesIO(data)


@contextmanager
def open_regular(path: str | os.PathLike[str], walk: bool = False) -> Iterator[BinaryIO]:
    """``open_checked``, closed on leaving."""
    with open_checked(path, walk) as fp:
        yield fp


def _read(fd: int, size: int) -> bytes:
    """``size`` bytes from ``fd`` (fewer if the file was cut short meanwhile)."""
    data = os.read(fd, size)
    while len(data) < size and (more := os.read(fd, size - len(data))):
        data += more
    return data


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
    ``open_checked``. ``to`` decodes (mnistq/images_reference.py passes its ``to_gray``)."""
    with open_checked(path, walk) as fp:
        im = open_image(fp, max_pixels)
        try:
            with im:
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

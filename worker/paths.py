"""Which paths a worker may open: only regular files under the allowed roots."""

from __future__ import annotations

import ctypes
import os
from collections.abc import Callable
from pathlib import Path

from mnistq.errors import ImageError
from mnistq.protocol import ErrorKind


def checked_path(raw: str, roots: tuple[Path, ...]) -> Path:
    """The real path of ``raw`` if it lies under one of ``roots``; ImageError otherwise.

    Symlinks are resolved first, so a link inside the inbox that points out of it is refused.
    Nothing is opened here: ``mnistq.images.load_image`` then opens the real path without
    following links (one swapped in after this check is refused) and checks what it opened
    (a FIFO, device or folder is refused by ``fstat``, never read).
    """
    # What Path(raw).is_absolute() and `".." in Path(raw).parts` say, without building a Path.
    if not raw.startswith("/"):
        raise ImageError("path must be absolute", ErrorKind.REFUSED)
    if ".." in raw.split("/"):
        raise ImageError("path must not contain '..'", ErrorKind.REFUSED)
    real = _fast_realpath(raw)
    if real is None:  # a missing file, a loop, a NUL byte...: Python's resolve, as it always was
        try:
            real = str(Path(raw).resolve(strict=False))
        except (OSError, RuntimeError, ValueError) as e:  # symlink loops; ValueError: a NUL byte
            raise ImageError(f"cannot resolve path: {e}", ErrorKind.REFUSED) from None
    # Path.is_relative_to on two normalised absolute paths, as strings.
    if not any(real == str(root) or real.startswith(str(root).rstrip("/") + "/") for root in roots):
        named = ", ".join(str(root) for root in roots) or "none"
        raise ImageError(
            f"path is outside the allowed roots ({named}); set MNISTQ_ALLOWED_ROOTS on the worker",
            ErrorKind.REFUSED,
        )
    return Path(real)


def _libc_realpath() -> Callable[[str], str | None] | None:
    """realpath(3) of the C library: for a path that exists, what os.path.realpath gives, in one
    C call (Python's own walks the path in Python, ~30 us a file); None where there is none."""
    try:
        libc = ctypes.CDLL(None)
        realpath, free = libc.realpath, libc.free
    except (OSError, AttributeError):
        return None
    realpath.restype, realpath.argtypes = ctypes.c_void_p, [ctypes.c_char_p, ctypes.c_void_p]
    free.restype, free.argtypes = None, [ctypes.c_void_p]

    def resolve(raw: str) -> str | None:
        """The real path, or None where realpath(3) fails (a missing component, a loop, ...)."""
        encoded = os.fsencode(raw)
        if b"\0" in encoded:  # C would stop at it, and check another path than was asked
            return None
        got = realpath(encoded, None)  # NULL: it allocates the answer (thread-safe)
        if not got:
            return None
        try:
            return os.fsdecode(ctypes.string_at(got))
        finally:
            free(got)

    return resolve if resolve("/") == "/" else None


_fast_realpath = _libc_realpath() or (lambda raw: None)

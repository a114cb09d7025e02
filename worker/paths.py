"""Which paths a worker may open: only regular files under the allowed roots."""

from __future__ import annotations

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
    p = Path(raw)
    if not p.is_absolute():
        raise ImageError("path must be absolute", ErrorKind.REFUSED)
    if ".." in p.parts:
        raise ImageError("path must not contain '..'", ErrorKind.REFUSED)
    try:
        real = p.resolve(strict=False)
    except (OSError, RuntimeError, ValueError) as e:  # symlink loops; ValueError: a NUL byte
        raise ImageError(f"cannot resolve path: {e}", ErrorKind.REFUSED) from None
    if not any(real.is_relative_to(root) for root in roots):
        named = ", ".join(str(root) for root in roots) or "none"
        raise ImageError(
            f"path is outside the allowed roots ({named}); set MNISTQ_ALLOWED_ROOTS on the worker",
            ErrorKind.REFUSED,
        )
    return real

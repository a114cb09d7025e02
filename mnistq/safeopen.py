"""Open a file without following symbolic links, and check what was opened (torch- and PIL-free).

A path is opened once: its folder with one ``openat2(RESOLVE_NO_SYMLINKS)`` call where the
kernel has it, else one component at a time with O_NOFOLLOW (the walk); the file itself with
O_NOFOLLOW; then ``fstat`` on the descriptor decides (a regular, non-empty file). Nothing
swapped in after a caller's check is read: no component can be a link when it is opened.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import io
import os
import platform
import stat
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import BinaryIO

from mnistq.errors import ImageError
from mnistq.protocol import ErrorKind

__all__ = ["IN_MEMORY", "open_checked", "open_folder", "open_regular"]

#: Files up to this size are read whole into memory before decoding (one read call).
IN_MEMORY = 1 << 20

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


#: a folder as a place to make, link, look up and remove names in (see open_folder)
_PLACE_FLAGS = (
    (os.O_PATH if hasattr(os, "O_PATH") else os.O_RDONLY) | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
)


def open_folder(path: str | os.PathLike[str], make: bool = False) -> int:
    """A descriptor of the folder ``path`` (an O_PATH one where the system has it), opened with
    no symbolic link followed on the way: the writing side's care (producer/place.py ``place``
    puts files in done/ through it), as ``open_checked`` is the reading side's. ``make``:
    missing folders are created on the way. The caller closes it.

    Raises OSError: ELOOP naming the first link on the path (links are not followed), or what
    the system said. A path longer than the system's limit (PATH_MAX) is opened too: the walk
    takes one component at a time.
    """
    full = os.path.abspath(path)
    if _open_folder is not None and "\0" not in full:
        try:
            return _open_folder(os.fsencode(full))
        except OSError:
            pass  # a missing folder to make, a link to name, a long path: the walk says which
    parts = [p for p in full.split(os.sep) if p]
    fd = os.open(os.sep, _PLACE_FLAGS)
    try:
        for i, name in enumerate(parts):
            try:
                child = os.open(name, _PLACE_FLAGS, dir_fd=fd)
            except FileNotFoundError:
                if not make:
                    raise
                with contextlib.suppress(FileExistsError):  # made meanwhile: as good
                    os.mkdir(name, dir_fd=fd)
                child = os.open(name, _PLACE_FLAGS, dir_fd=fd)
            except OSError as e:
                # O_DIRECTORY | O_NOFOLLOW says ENOTDIR for a link: look at what is there.
                if e.errno in (errno.ENOTDIR, errno.ELOOP) and _is_link(name, fd):
                    link = os.sep + os.sep.join(parts[: i + 1])
                    raise OSError(
                        errno.ELOOP, f"{link} is a symbolic link (links are not followed)"
                    ) from None
                raise
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

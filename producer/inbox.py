"""The inbox's rules: what counts as work, how a file is identified, how a folder is walked,
where a file goes (``target``; producer/place.py puts it there before its row) and how its
entry goes after its row (``remove``: see producer/finish.py)."""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import stat
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TypeVar

from mnistq.protocol import EXTENSIONS
from mnistq.safeopen import open_folder
from producer.access import Denied

_T = TypeVar("_T")

_TEMP_SUFFIXES = (".part", ".tmp", ".crdownload", ".partial", ".swp", ".swx", ".download", "~")


def wanted(path: str | Path) -> bool:
    """An image by extension, not hidden, not an editor's or downloader's temporary file."""
    name = os.path.basename(path)
    if not name or name.startswith((".", "#", "~$")) or name.lower().endswith(_TEMP_SUFFIXES):
        return False
    return os.path.splitext(name)[1].lower() in EXTENSIONS


def file_id(path: str, st: os.stat_result) -> str:
    """Stable while the file is untouched; new when a file is dropped again under the same name.

    ctime is in it because a rename into the inbox sets it, even when mtime is preserved (mv).
    """
    if stat.S_ISDIR(st.st_mode):  # a folder's times change with its contents; its name is enough
        key = f"{path}\0{st.st_ino}"
    else:
        key = f"{path}\0{st.st_ino}\0{st.st_size}\0{st.st_mtime_ns}\0{st.st_ctime_ns}"
    return hashlib.sha1(key.encode("utf-8", "surrogateescape")).hexdigest()[:16]


def scan(
    inbox: Path,
    skip: tuple[Path, ...],
    known: Callable[[str], bool] | None = None,
    denied: Denied | None = None,
) -> Iterator[tuple[str, os.stat_result]]:
    """Every wanted regular file below the inbox, lazily: a folder is read as its entries are
    taken, never listed whole first (a pass over a flood that stops when the caller is full
    holds one buffer, and goes on from there later; see Intake.scan).

    ``known(path)``: the caller has it already (a candidate, in flight): not even stat'ed.
    ``denied``: told of each folder that cannot be read for a permission (and of one that can
    again); a folder gone meanwhile is passed over quietly.
    """
    skipped = {str(s) for s in skip}
    stack = [str(inbox)]
    while stack:
        top = stack.pop()
        hidden = False  # an entry whose lstat this folder's permission refuses
        under = top.rstrip("/") + "/"
        try:
            with _listing(top) as entries:
                for entry in entries:
                    name = entry.name
                    try:
                        folder = entry.is_dir(follow_symlinks=False)
                    except OSError:
                        folder = False
                    if folder and not name.startswith(".") and under + name not in skipped:
                        stack.append(under + name)  # read after this one
                    # A folder named like an image is reported (as an error row), and still
                    # descended into.
                    if not wanted(name):
                        continue
                    path = under + name
                    if known is not None and known(path):
                        continue
                    try:
                        st = entry.stat(follow_symlinks=False)
                    except PermissionError:
                        hidden = True
                        continue
                    except OSError:
                        continue
                    yield path, st
        except PermissionError:  # said, and read again while it lasts (Denied)
            hidden = True
        except OSError:  # a folder gone meanwhile: the others are still read
            continue
        if denied is not None:
            if hidden:
                denied.note(top)
            else:
                denied.cleared(top)


@contextlib.contextmanager
def _listing(top: str) -> Iterator[Iterator[os.DirEntry[str]]]:
    """``os.scandir(top)``; for a folder deeper than a path can name (ENAMETOOLONG: over
    PATH_MAX, 4,096 bytes), the listing of its descriptor, opened one component at a time: its
    files get their rows too (``at`` reaches them for the rest)."""
    try:
        entries = os.scandir(top)
    except OSError as e:
        if e.errno != errno.ENAMETOOLONG:
            raise
    else:
        with entries:
            yield entries
        return
    where = open_folder(top)
    try:
        fd = os.open(".", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC, dir_fd=where)
    finally:
        os.close(where)
    try:  # the descriptor stays open while the entries are read: they stat through it
        with os.scandir(fd) as entries:
            yield entries
    finally:
        os.close(fd)


#: Errors that say the disk, not the file, is the trouble: the work waits until they pass.
DISK_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EIO})


def identity(st: os.stat_result) -> tuple[int, int, int, int]:
    """What tells a file from another of the same name, ctime left out: linking a file into done/
    changes its ctime, and that must not make it another file."""
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)


def target(path: str, inbox: Path, target_dir: Path) -> str:
    """The first-choice final place of an inbox file: its subfolder kept, under target_dir."""
    top = str(inbox)
    name = path[len(top) + 1 :]
    # A file right in the inbox, its path as events and scans give it: no Path to take apart.
    flat = path[len(top) : len(top) + 1] == "/" and "/" not in name and name not in ("", ".", "..")
    if flat and path.startswith(top):
        return os.path.join(target_dir, name)
    try:
        rel = Path(path).relative_to(inbox)
    except ValueError:
        rel = Path(os.path.basename(path))
    return str(target_dir / rel)


def lstat(path: str) -> os.stat_result:
    """``os.lstat`` of an inbox path, however long (see ``_at``)."""
    return at(path, lambda p, d: os.lstat(p, dir_fd=d))


def at(path: str, call: Callable[[str, int | None], _T]) -> _T:
    """``call(path, None)``; for a path longer than system calls take (ENAMETOOLONG, over
    PATH_MAX: a deep tree), ``call(name, folder)`` on its folder's descriptor, opened one
    component at a time."""
    try:
        return call(path, None)
    except OSError as e:
        if e.errno != errno.ENAMETOOLONG:
            raise
    return in_folder(path, call)


def in_folder(path: str, call: Callable[[str, int], _T]) -> _T:
    """``call(name, folder)`` on the descriptor of ``path``'s folder, opened with no link followed."""
    folder, name = os.path.split(path)
    fd = open_folder(folder)
    try:
        return call(name, fd)
    finally:
        os.close(fd)


def remove(path: str, st: os.stat_result) -> bool:
    """Remove the inbox entry whose row is written; False when another file took its name (it
    stays, as new work). Raises OSError when the entry cannot be removed."""
    try:
        now = lstat(path)
    except FileNotFoundError:
        return True
    if not os.path.samestat(now, st):
        return False
    with contextlib.suppress(FileNotFoundError):  # gone meanwhile: as good as removed
        at(path, lambda p, d: os.unlink(p, dir_fd=d))
    return True

"""The inbox's rules: what counts as work, how a file is identified, how a folder is walked,
and where a file goes when its row is written (``place`` before the row, ``remove`` after it:
see producer/finish.py)."""

from __future__ import annotations

import contextlib
import errno
import filecmp
import hashlib
import os
import shutil
import stat
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

from mnistq.protocol import EXTENSIONS
from producer.access import Denied

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
        try:
            with os.scandir(top) as entries:
                for entry in entries:
                    name = entry.name
                    try:
                        folder = entry.is_dir(follow_symlinks=False)
                    except OSError:
                        folder = False
                    if folder and not name.startswith(".") and entry.path not in skipped:
                        stack.append(entry.path)  # read after this one
                    # A folder named like an image is reported (as an error row), and still
                    # descended into.
                    if not wanted(name):
                        continue
                    path = entry.path
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


#: Folders ``place`` made or found (done/, failed/ and their subfolders): not made again per file.
_folders: set[str] = set()


def place(path: str, st: os.stat_result, dest: str | os.PathLike[str], fid: str) -> tuple[str, bool]:
    """Put the file at its final place (a hard link, or a copy across filesystems), the inbox
    entry left as it is. Returns the final path, and whether this call created it.

    The name is ``dest``, or ``dest`` with the file id in it when another file has that name:
    never overwritten. A file that is already there from a run that stopped before writing the
    row (the same inode, or a copy with the same content) is reused, not linked twice. A
    symlink is placed as the link, not its target.
    """
    dest = os.fspath(dest)
    folder = os.path.dirname(dest)
    if folder not in _folders:
        _make(folder)
    for candidate in _names(dest, fid):
        # Link first and look only if the name is taken: one system call for the usual file.
        try:
            _put(path, st, candidate)
        except FileExistsError:
            try:
                there = os.lstat(candidate)
            except FileNotFoundError:
                continue  # there a moment ago: leave that name alone
            if _same(path, st, candidate, there):
                return candidate, False
            continue
        except FileNotFoundError:
            if os.path.isdir(folder):
                raise  # the file itself is gone
            _make(folder)  # someone removed the folder meanwhile
            _put(path, st, candidate)
        return candidate, True
    raise FileExistsError(errno.EEXIST, "no free name for it", dest)


def _make(folder: str) -> None:
    os.makedirs(folder, exist_ok=True)
    if len(_folders) > 4096:  # a tree of many folders: remembering them all is not worth it
        _folders.clear()
    _folders.add(folder)


def unplace(dest: str) -> None:
    """Undo a ``place`` that created ``dest`` (its row could not be written): the inbox keeps
    the file, and nothing is in done/ without its row."""
    with contextlib.suppress(OSError):  # left: a later run reuses it
        os.unlink(dest)


def remove(path: str, st: os.stat_result) -> bool:
    """Remove the inbox entry whose row is written; False when another file took its name (it
    stays, as new work). Raises OSError when the entry cannot be removed."""
    try:
        now = os.lstat(path)
    except FileNotFoundError:
        return True
    if not os.path.samestat(now, st):
        return False
    with contextlib.suppress(FileNotFoundError):  # gone meanwhile: as good as removed
        os.unlink(path)
    return True


def unlink_strays(st: os.stat_result, dest: str, firsts: Iterable[str]) -> None:
    """Remove the other links to this very file (``st``) at the names ``place`` could have given
    it, ``dest`` kept: a run that stopped between ``place`` and the row left them where it then
    meant to put the file (another folder, when the review threshold or the model changed), or
    under a name with the file id of before (linking changed the file's ctime, so its id).
    ``firsts``: its first-choice name in each output folder. Call with the row naming ``dest``
    written. A file with no other link (the usual one) costs nothing; a folder is read only
    where its first-choice name is another file's (a stray may then carry an id)."""
    if st.st_nlink < 2:
        return
    for first in firsts:
        folder, name = os.path.split(first)
        stem, suffix = os.path.splitext(name)
        try:
            there: os.stat_result | None = os.lstat(first)
        except OSError:
            there = None
        names = [first]
        if there is not None and not os.path.samestat(there, st):
            with contextlib.suppress(OSError), os.scandir(folder) as entries:
                names = [
                    e.path
                    for e in entries
                    if e.name.startswith(f"{stem}.") and e.name.endswith(suffix) and e.inode() == st.st_ino
                ]
        for candidate in names:
            if candidate == dest:
                continue
            with contextlib.suppress(OSError):
                if os.path.samestat(os.lstat(candidate), st):
                    os.unlink(candidate)


def _names(dest: str, fid: str) -> Iterator[str]:
    # Decided by the file id, so a rerun after a crash finds the name it chose before.
    yield dest
    folder, name = os.path.split(dest)
    stem, suffix = os.path.splitext(name)
    yield os.path.join(folder, f"{stem}.{fid[:8]}{suffix}")
    for n in range(1, 1000):
        yield os.path.join(folder, f"{stem}.{fid[:8]}.{n}{suffix}")


def _same(path: str, st: os.stat_result, candidate: str, there: os.stat_result) -> bool:
    if os.path.samestat(st, there):
        return True
    if stat.S_ISLNK(st.st_mode) and stat.S_ISLNK(there.st_mode):
        try:
            return os.readlink(path) == os.readlink(candidate)
        except OSError:
            return False
    # a copy (copy2 keeps mtime): the same content is the same file, whoever copied it
    return (
        stat.S_ISREG(st.st_mode)
        and stat.S_ISREG(there.st_mode)
        and (st.st_size, st.st_mtime_ns) == (there.st_size, there.st_mtime_ns)
        and filecmp.cmp(path, candidate, shallow=False)
    )


def _put(path: str, st: os.stat_result, dest: str) -> None:
    try:
        # A hard link: no data written, and the file is whole at its final place at once.
        os.link(path, dest, follow_symlinks=False)
        return
    except OSError as e:
        if e.errno in (errno.EEXIST, errno.ENOENT) or e.errno in DISK_ERRNOS:
            raise
    # Another filesystem (EXDEV), or one without hard links: copy under a temporary name, then
    # give it its final name only when whole (link, so an existing file is never overwritten).
    if os.path.lexists(dest):  # taken: no copy made for nothing (place looks at what is there)
        raise FileExistsError(errno.EEXIST, "exists", dest)
    folder, name = os.path.split(dest)
    tmp = os.path.join(folder, f".{name}.part")
    try:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)  # a crashed run's partial copy
        if stat.S_ISLNK(st.st_mode):
            os.symlink(os.readlink(path), tmp)
        else:
            shutil.copy2(path, tmp, follow_symlinks=False)
            with open(tmp, "rb") as f:
                os.fsync(f.fileno())
        try:
            os.link(tmp, dest, follow_symlinks=False)
        except OSError as e:
            if e.errno == errno.EEXIST or e.errno in DISK_ERRNOS:
                raise
            os.rename(tmp, dest)  # no hard links here at all
    finally:
        with contextlib.suppress(OSError):
            os.unlink(tmp)

"""Where a file goes when its row is written: ``place`` before the row (a hard link, or a copy,
into done/, review/ or failed/), ``unplace`` when the row could not be written, ``unlink_strays``
after it (see producer/finish.py).

**No link is followed on this side** (the input side's care is mnistq/safeopen.py): every
folder is opened, and made, with no symbolic link on its path (``open_folder``), and names are
made, looked up and removed in that descriptor. A link planted in an output folder, at the
start or mid-run, is an OSError (ELOOP) naming it, never a way out of the folder.
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import stat
from collections.abc import Iterable, Iterator

from mnistq.safeopen import open_folder
from producer.inbox import DISK_ERRNOS, at, in_folder

#: the longest file name, in bytes, of the filesystems in use (ext4, xfs, btrfs, tmpfs)
NAME_MAX = 255


def place(path: str, st: os.stat_result, dest: str | os.PathLike[str], fid: str) -> tuple[str, bool]:
    """Put the file at its final place (a hard link, or a copy across filesystems), the inbox
    entry left as it is. Returns the final path, and whether this call created it.

    The name is ``dest``, or ``dest`` with the file id in it when another file has that name:
    never overwritten (a name too long for that is cut, its extension kept: ``_names``). A file
    that is already there from a run that stopped before writing the row (the same inode, or a
    copy with the same content) is reused, not linked twice. A symlink is placed as the link,
    not its target. A link on the folder's path: OSError (ELOOP) naming it.
    """
    folder, name = os.path.split(os.fspath(dest))
    fd = open_folder(folder, make=True)
    try:
        for candidate in _names(name, fid):
            # Link first and look only if the name is taken: one system call for the usual file.
            try:
                _put(path, st, fd, candidate)
            except FileExistsError:
                try:
                    there = os.lstat(candidate, dir_fd=fd)
                except FileNotFoundError:
                    continue  # there a moment ago: leave that name alone
                if _same(path, st, fd, candidate, there):
                    return os.path.join(folder, candidate), False
                continue
            except FileNotFoundError:
                if os.fstat(fd).st_nlink:
                    raise  # the file itself is gone
                os.close(fd)  # someone removed the folder meanwhile: made again
                fd = open_folder(folder, make=True)
                _put(path, st, fd, candidate)
            return os.path.join(folder, candidate), True
        raise FileExistsError(errno.EEXIST, "no free name for it", os.fspath(dest))
    finally:
        os.close(fd)


def lstat_placed(path: str) -> os.stat_result:
    """``os.lstat`` of a file in an output folder, with no link followed on the way."""
    return in_folder(path, lambda name, fd: os.lstat(name, dir_fd=fd))


def unplace(dest: str) -> None:
    """Undo a ``place`` that created ``dest`` (its row could not be written): the inbox keeps
    the file, and nothing is in done/ without its row."""
    with contextlib.suppress(OSError):  # left: a later run reuses it
        in_folder(dest, lambda name, fd: os.unlink(name, dir_fd=fd))


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
        try:
            fd = open_folder(folder)
        except OSError:
            continue  # not there (nothing to remove), or a link: not followed
        try:
            _unlink_strays_in(
                fd, st, name, os.path.basename(dest) if os.path.dirname(dest) == folder else None
            )
        finally:
            os.close(fd)


def _unlink_strays_in(fd: int, st: os.stat_result, name: str, keep: str | None) -> None:
    stem, suffix = os.path.splitext(name)
    try:
        there: os.stat_result | None = os.lstat(name, dir_fd=fd)
    except OSError:
        there = None
    names = [name]
    if there is not None and not os.path.samestat(there, st):
        # the names _names gives it all start so (a long name's stem is cut)
        prefix = _cut(stem, NAME_MAX - len(os.fsencode(f".{'0' * 8}.999{suffix}")))
        with contextlib.suppress(OSError):
            listing = os.open(".", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC, dir_fd=fd)
            try:
                with os.scandir(listing) as entries:
                    names = [
                        e.name
                        for e in entries
                        if e.name.startswith(prefix) and e.name.endswith(suffix) and e.inode() == st.st_ino
                    ]
            finally:
                os.close(listing)
    for candidate in names:
        if candidate == keep:
            continue
        with contextlib.suppress(OSError):
            if os.path.samestat(os.lstat(candidate, dir_fd=fd), st):
                os.unlink(candidate, dir_fd=fd)


def _names(name: str, fid: str) -> Iterator[str]:
    # Decided by the file id, so a rerun after a crash finds the name it chose before.
    yield name
    stem, suffix = os.path.splitext(name)
    yield _fit(stem, f".{fid[:8]}{suffix}")
    for n in range(1, 1000):
        yield _fit(stem, f".{fid[:8]}.{n}{suffix}")


def _fit(stem: str, tail: str) -> str:
    """``stem + tail``, the stem cut so that the name fits NAME_MAX bytes: a 255-byte name
    still gets its file id (and keeps its extension)."""
    return _cut(stem, NAME_MAX - len(os.fsencode(tail))) + tail


def _cut(stem: str, room: int) -> str:
    """``stem`` cut to at most ``room`` bytes, at the start of a character: never inside a
    UTF-8 sequence (a continuation byte is 0b10xxxxxx; a character has at most 3 of them)."""
    raw = os.fsencode(stem)
    if len(raw) <= room:
        return stem
    cut = max(room, 0)
    for _ in range(3):
        if cut > 0 and raw[cut] & 0xC0 == 0x80:
            cut -= 1
    return os.fsdecode(raw[:cut])


def _same(path: str, st: os.stat_result, fd: int, candidate: str, there: os.stat_result) -> bool:
    """Is ``candidate`` in the folder ``fd`` this file (``path``, ``st``) already?"""
    if os.path.samestat(st, there):
        return True
    if stat.S_ISLNK(st.st_mode) and stat.S_ISLNK(there.st_mode):
        try:
            return at(path, lambda p, d: os.readlink(p, dir_fd=d)) == os.readlink(candidate, dir_fd=fd)
        except OSError:
            return False
    # a copy (the copy keeps mtime): the same content is the same file, whoever copied it
    if not (
        stat.S_ISREG(st.st_mode)
        and stat.S_ISREG(there.st_mode)
        and (st.st_size, st.st_mtime_ns) == (there.st_size, there.st_mtime_ns)
    ):
        return False
    try:
        a = at(path, lambda p, d: os.open(p, _READ, dir_fd=d))
    except OSError:
        return False
    try:
        b = os.open(candidate, _READ, dir_fd=fd)
    except OSError:
        os.close(a)
        return False
    with open(a, "rb") as x, open(b, "rb") as y:
        while (chunk := x.read(1 << 16)) == y.read(1 << 16):
            if not chunk:
                return True
        return False


_READ = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC


def _put(path: str, st: os.stat_result, fd: int, name: str) -> None:
    """Link the file as ``name`` in the folder ``fd``, or copy it there."""
    try:
        # A hard link: no data written, and the file is whole at its final place at once.
        at(path, lambda p, d: os.link(p, name, src_dir_fd=d, dst_dir_fd=fd, follow_symlinks=False))
        return
    except OSError as e:
        if e.errno in (errno.EEXIST, errno.ENOENT, errno.ENAMETOOLONG) or e.errno in DISK_ERRNOS:
            raise
    # Another filesystem (EXDEV), or one without hard links: copy under a temporary name, then
    # give it its final name only when whole (link, so an existing file is never overwritten).
    try:
        os.lstat(name, dir_fd=fd)
    except FileNotFoundError:
        pass
    else:  # taken: no copy made for nothing (place looks at what is there)
        raise FileExistsError(errno.EEXIST, "exists", name)
    tmp = _fit("." + os.path.splitext(name)[0], os.path.splitext(name)[1] + ".part")
    try:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp, dir_fd=fd)  # a crashed run's partial copy
        if stat.S_ISLNK(st.st_mode):
            os.symlink(at(path, lambda p, d: os.readlink(p, dir_fd=d)), tmp, dir_fd=fd)
        else:
            _copy(path, fd, tmp)
        try:
            os.link(tmp, name, src_dir_fd=fd, dst_dir_fd=fd, follow_symlinks=False)
        except OSError as e:
            if e.errno == errno.EEXIST or e.errno in DISK_ERRNOS:
                raise
            os.rename(tmp, name, src_dir_fd=fd, dst_dir_fd=fd)  # no hard links here at all
    finally:
        with contextlib.suppress(OSError):
            os.unlink(tmp, dir_fd=fd)


def _copy(path: str, fd: int, tmp: str) -> None:
    """A copy of the regular file ``path`` as ``tmp`` in the folder ``fd``: its content, mode and
    times (what shutil.copy2 keeps), on disk when this returns."""
    src = at(path, lambda p, d: os.open(p, _READ, dir_fd=d))
    try:
        was = os.fstat(src)
        if not stat.S_ISREG(was.st_mode):  # a FIFO would never end; a device is no file to keep
            raise OSError(errno.EINVAL, "not a regular file: it cannot be copied to another filesystem")
        out = os.open(
            tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600, dir_fd=fd
        )
        try:
            with open(src, "rb", closefd=False) as fi, open(out, "wb", closefd=False) as fo:
                shutil.copyfileobj(fi, fo)
            os.fchmod(out, stat.S_IMODE(was.st_mode))
            os.utime(out, ns=(was.st_atime_ns, was.st_mtime_ns))
            os.fsync(out)
        finally:
            os.close(out)
    finally:
        os.close(src)

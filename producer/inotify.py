"""inotify(7) read directly, on one thread: the Linux source of the watcher's hints.

One thread reads the kernel's buffer, turns each event into a hint with a few dict lookups, and
hands the loop each buffer's hints as one list (producer/events.py says why not watchdog here).
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import logging
import os
import select
import struct
import threading
from collections.abc import Callable, Sequence
from pathlib import Path

from producer.hints import Hints
from producer.inbox import wanted
from producer.intake import EventKind

log = logging.getLogger("mnistq.producer")

# inotify(7)'s constants (linux/inotify.h)
_IN_MODIFY, _IN_CLOSE_WRITE, _IN_CLOSE_NOWRITE, _IN_OPEN = 0x2, 0x8, 0x10, 0x20
_IN_MOVED_FROM, _IN_MOVED_TO, _IN_CREATE = 0x40, 0x80, 0x100
_IN_Q_OVERFLOW, _IN_IGNORED, _IN_ISDIR = 0x4000, 0x8000, 0x40000000
_IN_ONLYDIR, _IN_DONT_FOLLOW, _IN_EXCL_UNLINK = 0x01000000, 0x02000000, 0x04000000
#: What a watch asks for: arrivals (moves in, creates), writers (open, modify, close) and moves
#: out (of folders, whose watches go with them). Not IN_ATTRIB nor IN_DELETE: our own link into
#: done/ and removal from the inbox would be two more events per file, and mean nothing.
_MASK = (
    _IN_MOVED_TO | _IN_MOVED_FROM | _IN_CREATE | _IN_OPEN | _IN_MODIFY | _IN_CLOSE_WRITE
    | _IN_CLOSE_NOWRITE | _IN_ONLYDIR | _IN_DONT_FOLLOW | _IN_EXCL_UNLINK
)  # fmt: skip
#: A file's event -> its hint (a moved-in file is complete; the others feed the intake's rules).
_FILE_KINDS = {
    _IN_MOVED_TO: EventKind.MOVED_IN,
    _IN_CREATE: EventKind.CREATED,
    _IN_OPEN: EventKind.OPENED,
    _IN_MODIFY: EventKind.MODIFIED,
    _IN_CLOSE_WRITE: EventKind.CLOSED_WRITE,
    _IN_CLOSE_NOWRITE: EventKind.CLOSED_NO_WRITE,
}
_EVENT = struct.Struct("iIII")  # struct inotify_event: wd, mask, cookie, len; then the name


def _libc_inotify() -> ctypes.CDLL | None:
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.inotify_init1.argtypes = [ctypes.c_int]
        libc.inotify_add_watch.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_uint32]
        libc.inotify_rm_watch.argtypes = [ctypes.c_int, ctypes.c_int]
    except (OSError, AttributeError):
        return None
    return libc


_libc = _libc_inotify() if hasattr(select, "poll") else None
#: whether this system has inotify (else the watcher uses watchdog)
AVAILABLE = _libc is not None


class InotifyHints:
    """inotify(7) read directly, on one thread: every event under the inbox becomes a hint.

    Watches follow the tree: a folder created or moved in is watched (before it is listed, so
    nothing written into it is missed) and what it holds is reported as created; a folder moved
    away takes its watches with it. The folders in ``skip`` (done/ and failed/ when inside the
    inbox) are not watched. Events for paths ``busy`` (in flight: a worker reading the file)
    are dropped here. A kernel queue overflow asks for a rescan.
    """

    def __init__(self, root: Path, hints: Hints, skip: Sequence[Path], busy: Callable[[str], bool]) -> None:
        if _libc is None:
            raise OSError(errno.ENOSYS, "inotify is not available")
        self.root, self.hints, self.busy = str(root), hints, busy
        self.skip = tuple(str(s) for s in skip)
        self._skip_under = tuple(s.rstrip("/") + "/" for s in self.skip)
        self._folders: dict[int, str] = {}  # watch descriptor -> folder
        self._wds: dict[str, int] = {}  # folder -> watch descriptor
        self._warned = False
        fd = _libc.inotify_init1(os.O_CLOEXEC | os.O_NONBLOCK)
        if fd < 0:
            e = ctypes.get_errno()
            raise OSError(e, os.strerror(e))
        self._fd = fd
        self._stop_r, self._stop_w = os.pipe()
        self._thread = threading.Thread(target=self._run, name="mnistq-events", daemon=True)

    def start(self) -> None:
        """Watch the tree (OSError when the inbox itself cannot be), then read its events."""
        try:
            self._watch_tree(self.root, None)
        except OSError:
            self._close()
            raise
        self._thread.start()

    def stop(self) -> None:
        os.write(self._stop_w, b"x")

    def join(self, timeout: float | None = None) -> None:
        self._thread.join(timeout)
        if not self._thread.is_alive():
            self._close()

    def _close(self) -> None:
        for fd in (self._fd, self._stop_r, self._stop_w):
            with contextlib.suppress(OSError):
                os.close(fd)
        self._fd = self._stop_r = self._stop_w = -1

    # -- watches ------------------------------------------------------------------------
    def _skipped(self, folder: str) -> bool:
        return folder in self.skip or folder.startswith(self._skip_under)

    def _add(self, folder: str) -> bool:
        assert _libc is not None
        wd = _libc.inotify_add_watch(self._fd, os.fsencode(folder), _MASK)
        if wd < 0:
            e = ctypes.get_errno()
            if folder == self.root:
                raise OSError(e, os.strerror(e), folder)
            # ENAMETOOLONG: a folder deeper than a path can name (PATH_MAX)
            if e in (errno.ENOSPC, errno.ENOMEM, errno.ENAMETOOLONG) and not self._warned:
                self._warned = True  # its files are still found by the periodic rescans
                log.warning(
                    "cannot watch %s for events (%s); it is rescanned instead", folder, os.strerror(e)
                )
            return False
        old = self._folders.get(wd)  # the same folder under another name: it was moved
        if old is not None and old != folder:
            self._wds.pop(old, None)
        self._folders[wd], self._wds[folder] = folder, wd
        return True

    def _watch_tree(self, top: str, found: list[tuple[EventKind, str]] | None) -> None:
        """Watch ``top`` and every folder below it, each before it is listed; with ``found``,
        add a CREATED hint for each wanted name in them."""
        stack, dropped = [top], False
        while stack:
            folder = stack.pop()
            if self._skipped(folder) or not self._add(folder):
                continue
            try:
                with os.scandir(folder) as entries:
                    for entry in entries:
                        try:
                            if entry.is_dir(follow_symlinks=False):
                                stack.append(entry.path)
                        except OSError:
                            continue
                        if found is None or not wanted(entry.name):
                            continue
                        if len(found) < self.hints.cap:
                            found.append((EventKind.CREATED, entry.path))
                        else:
                            dropped = True  # a folder of a flood moved in: a rescan finds them
            except OSError:
                continue
        if dropped:
            self.hints.overflowed()

    def _unwatch_tree(self, top: str) -> None:
        assert _libc is not None
        under = top + "/"
        for folder in [f for f in self._wds if f == top or f.startswith(under)]:
            wd = self._wds.pop(folder)
            self._folders.pop(wd, None)
            _libc.inotify_rm_watch(self._fd, wd)

    # -- events -------------------------------------------------------------------------
    def _run(self) -> None:
        poller = select.poll()
        poller.register(self._fd, select.POLLIN)
        poller.register(self._stop_r, select.POLLIN)
        while True:
            try:
                ready = poller.poll()
                if any(fd == self._stop_r for fd, _ in ready):
                    return
                buf = os.read(self._fd, 1 << 16)
            except (BlockingIOError, InterruptedError):
                continue
            except OSError as e:  # the descriptor is unusable: the periodic rescans go on
                log.warning("reading inotify events failed (%s); rescanning instead", e)
                return
            try:
                self._handle(buf)
            except Exception:  # the thread's edge: a bug must not stop the events for good
                log.exception("handling inotify events failed; rescanning")
                self.hints.overflowed()

    def _handle(self, buf: bytes) -> None:
        out: list[tuple[EventKind, str]] = []
        folders, busy, kinds, unpack = self._folders, self.busy, _FILE_KINDS, _EVENT.unpack_from
        # The loop has as many hints as it can hold (a flood): a file's event would be dropped
        # anyway, and the rescan that the drop asks for finds the file. Folders still count.
        full, dropped = self.hints.full, False
        at, end = 0, len(buf)
        while at < end:
            wd, mask, _cookie, size = unpack(buf, at)
            start, at = at + 16, at + 16 + size
            if full and not mask & (_IN_ISDIR | _IN_Q_OVERFLOW | _IN_IGNORED):
                dropped = True
                continue
            raw = buf[start:at].rstrip(b"\0")
            folder = folders.get(wd)
            if folder is None or not raw:
                if mask & _IN_Q_OVERFLOW:
                    log.warning("the kernel dropped inotify events (queue overflow); rescanning")
                    self._watch_tree(self.root, None)  # folders made meanwhile
                    self.hints.overflowed()
                elif mask & _IN_IGNORED and folder is not None:
                    del folders[wd]
                    if self._wds.get(folder) == wd:
                        del self._wds[folder]
                continue
            name = os.fsdecode(raw)
            path = folder + "/" + name
            if mask & _IN_ISDIR:
                if mask & _IN_MOVED_FROM:
                    self._unwatch_tree(path)  # moved away, or renamed (then moved in below)
                elif mask & (_IN_CREATE | _IN_MOVED_TO) and not self._skipped(path):
                    if wanted(name):  # a folder named like an image gets its error row
                        out.append((EventKind.MOVED_IN if mask & _IN_MOVED_TO else EventKind.CREATED, path))
                    self._watch_tree(path, out)
                continue
            kind = kinds.get(mask & 0xFFF)
            if kind is None or busy(path) or not wanted(name):
                continue
            out.append((kind, path))
        if out:
            self.hints.put_many(out)
        if dropped:
            self.hints.overflowed()

"""The inbox's folders as things that can change or hide: which folder is at a path (device and
inode), and which files a permission hides. A permission is never taken for absence: a file it
hides gets no row (not ``not_found``, not ``refused``) until it can be read (docs/faults.md)."""

from __future__ import annotations

import logging
import os
import stat
import threading
from pathlib import Path

log = logging.getLogger("mnistq.producer")


def folder_id(path: str | Path) -> tuple[int, int] | None:
    """The folder at ``path`` (device, inode); None if none is there. OSError: cannot tell."""
    try:
        st = os.stat(path)
    except (FileNotFoundError, NotADirectoryError):
        return None
    return (st.st_dev, st.st_ino) if stat.S_ISDIR(st.st_mode) else None


def blocking_folder(path: str) -> str:
    """The folder whose permission hides ``path`` (lstat said EACCES): the deepest one on its
    path that can still be looked at."""
    folder = os.path.dirname(path)
    while True:
        try:
            os.lstat(folder)
            return folder
        except OSError:
            up = os.path.dirname(folder)
            if up == folder:
                return folder
            folder = up


class Denied:
    """Folders and files of the inbox this producer may not read: a permission, not an absence.
    One warning for each, until it can be read again (one INFO line); meanwhile their files stay
    in the inbox with no row, and the inbox is read every ``retry_s`` (``rescan_due``) so they
    are taken as soon as they can be. Thread-safe (the loop's scans, the collector's rows)."""

    def __init__(self, retry_s: float = 5.0) -> None:
        self.retry_s = retry_s
        self._keys: set[str] = set()
        self._lock = threading.Lock()
        self._next = 0.0

    def note(self, key: str, file: bool = False) -> None:
        with self._lock:
            if key in self._keys:
                return
            self._keys.add(key)
        what = (
            "it stays in the inbox, with no row, and is"
            if file
            else "its files stay in the inbox, with no row, and are"
        )
        log.warning(
            "cannot read %s (permission denied): %s tried again every %.0f s", key, what, self.retry_s
        )

    def cleared(self, key: str) -> None:
        """``key`` could be read: said once, if it could not before."""
        if not self._keys:  # the usual case: nothing denied, no lock taken
            return
        with self._lock:
            if key not in self._keys:
                return
            self._keys.discard(key)
        log.info("%s can be read again", key)

    def rescan_due(self, now: float) -> bool:
        """Something cannot be read, and it is time to look again (a folder or file removed
        meanwhile is forgotten: nothing is left to wait for)."""
        if not self._keys or now < self._next:
            return False
        self._next = now + self.retry_s
        with self._lock:
            self._keys = {key for key in self._keys if not _gone(key)}
        return bool(self._keys)


def _gone(path: str) -> bool:
    try:
        os.lstat(path)
    except (FileNotFoundError, NotADirectoryError):
        return True
    except OSError:  # still hidden
        return False
    return False


def unreadable(path: str) -> bool:
    """This process may not open ``path`` for reading (a permission, not an absence)."""
    try:
        os.close(os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOFOLLOW | os.O_CLOEXEC))
    except PermissionError:
        return True
    except OSError:
        return False
    return False

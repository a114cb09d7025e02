"""One producer per inbox and per CSV: an exclusive ``flock`` on a small lock file for each.

The kernel holds the lock, so a producer that dies (even by SIGKILL) releases it with its last
descriptor; the file's content, the holder's PID, only serves the refusal message. A clean
release removes the file; a crash leaves it behind, harmless, and the next holder reuses it.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import time
from pathlib import Path

from mnistq.errors import ConfigError


class PathLock:
    """An exclusive lock on ``path`` (the lock file), described as ``what`` in messages."""

    def __init__(self, path: Path, what: str) -> None:
        self.path, self.what = path, what
        self._fd: int | None = None

    def acquire(self) -> None:
        """Take the lock, or raise ConfigError naming the PID that holds it."""
        if self._fd is not None:
            return
        # The holder removes the file when it releases: a file opened just before that is no
        # longer the one at ``path``, so locking it would prove nothing. Then try again.
        for _ in range(20):
            try:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o644)
            except OSError as e:
                raise ConfigError(
                    f"cannot write in {self.path.parent}: {e.strerror} (for the lock file {self.path.name})"
                ) from None
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = _holder(fd)
                os.close(fd)
                raise ConfigError(
                    f"another producer (pid {holder}) is already {self.what}; "
                    "stop it first, or choose another folder or file"
                ) from None
            except OSError as e:  # a filesystem without locks
                os.close(fd)
                raise ConfigError(f"cannot lock {self.path}: {e.strerror}") from None
            if _same_file(fd, self.path):
                break
            os.close(fd)
        else:
            raise ConfigError(f"cannot lock {self.path}: it keeps being replaced")
        self._fd = fd
        # The PID only tells a second producer who holds the lock; the flock is the lock, so a
        # full disk here is no reason to refuse the start.
        with contextlib.suppress(OSError):
            os.ftruncate(fd, 0)
            os.write(fd, f"{os.getpid()}\n".encode())

    def release(self) -> None:
        if self._fd is None:
            return
        # Removed while still locked: whoever opens it now finds another file (see acquire).
        with contextlib.suppress(OSError):
            os.unlink(self.path)
        os.close(self._fd)
        self._fd = None


def _same_file(fd: int, path: Path) -> bool:
    try:
        st, here = os.fstat(fd), os.stat(path, follow_symlinks=False)
    except OSError:
        return False
    return (st.st_dev, st.st_ino) == (here.st_dev, here.st_ino)


def _holder(fd: int) -> str:
    """The PID in a locked file; its holder writes it just after locking, so wait a moment."""
    for _ in range(20):
        raw = os.pread(fd, 32, 0).strip()
        if raw.isdigit():
            return raw.decode()
        time.sleep(0.025)
    return "unknown"

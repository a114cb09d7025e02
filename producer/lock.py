"""One producer per inbox and per CSV: an exclusive ``flock`` on a small lock file for each,
taken by ``check_paths`` once the paths a producer is given have been checked.

The inbox has two: ``.mnistq.lock`` inside it (what producers on a folder above or inside it
look for), and ``.NAME.mnistq.lock`` beside it, in its parent, which survives the inbox being
removed or renamed: a second producer on that path is refused whatever happens to the folder
(a parent the producer may not write in has none; the watcher then locks a new folder at once,
see producer/watcher.py).

The kernel holds the lock, so a producer that dies (even by SIGKILL) releases it with its last
descriptor; the file's content, the holder's PID, only serves the refusal message. A clean
release removes the file; a crash leaves it behind, harmless, and the next holder reuses it.
"""

from __future__ import annotations

import atexit
import contextlib
import fcntl
import os
import time
from pathlib import Path

from mnistq.errors import ConfigError
from mnistq.folders import Folders

#: The inbox's lock file: hidden, so the watcher never takes it for work.
INBOX_LOCK = ".mnistq.lock"


class PathLock:
    """An exclusive lock on ``path`` (the lock file), described as ``what`` in messages."""

    def __init__(self, path: Path, what: str) -> None:
        self.path, self.what = path, what
        self._fd: int | None = None

    def acquire(self, optional: bool = False) -> bool:
        """Take the lock, or raise ConfigError naming the PID that holds it. ``optional``: a lock
        file that cannot be created (no permission, a read-only folder) is no error: False."""
        if self._fd is not None:
            return True
        # The holder removes the file when it releases: a file opened just before that is no
        # longer the one at ``path``, so locking it would prove nothing. Then try again.
        for _ in range(20):
            try:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o644)
            except OSError as e:
                if optional:  # what is wrong with the folder is said by what needs it
                    return False
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
        return True

    def forget(self) -> None:
        """Give the lock up without removing the file at ``path``: it is another folder's now."""
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

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


#: The locks this process holds, by lock file: `mnistq run` takes them before it starts its
#: children, and the ``watch`` it then calls finds them held.
_held: dict[Path, PathLock] = {}


def check_csv(csv: Path) -> Path:
    """The CSV's absolute path; ConfigError if it is a folder, a symbolic link (its rows would
    go to the link's target, and done/ and failed/ beside it), or its folder is missing."""
    if csv.expanduser().is_symlink():
        raise ConfigError(
            f"the results file {csv} is a symbolic link (links are not followed): name the file itself"
        )
    path = csv.expanduser().resolve()
    if path.is_dir():
        raise ConfigError(f"the results file {csv} is a folder (--csv or MNISTQ_CSV names a file)")
    if not path.parent.is_dir():
        raise ConfigError(
            f"the folder of the results file {csv} does not exist: create {path.parent} first, "
            "or choose another --csv"
        )
    return path


def _check_writable(csv: Path) -> None:
    try:  # an existing file: can it be appended to? (a new one: the lock file beside it proved it)
        os.close(os.open(csv, os.O_WRONLY | os.O_APPEND | os.O_NOFOLLOW))
    except FileNotFoundError:
        pass
    except OSError as e:
        raise ConfigError(f"cannot write the results file {csv}: {e.strerror}") from None


def check_paths(folders: Folders) -> None:
    """Check the inbox, the CSV and the done/review/failed folders, and take the locks that
    make this process the only producer on that inbox and that CSV.

    Each mistake is a ConfigError (one line, exit 2): an inbox that is a file, whose folder is
    missing, or that cannot be created (the inbox is the one thing created here), a CSV whose
    folder is missing or that cannot be written, a CSV or output folder that is a symbolic link
    (what is written is never put through a link: see producer/place.py ``place`` for links
    planted later), an output folder that is or holds the inbox, another producer on either, or on a folder above or inside the inbox (its PID named). The
    locks are held until ``watch`` returns or the process ends; calling this again in the same
    process is harmless (and does not walk the inbox again).
    """
    inbox = folders.inbox.expanduser().resolve()
    if inbox.exists() and not inbox.is_dir():
        raise ConfigError(f"the inbox {folders.inbox} is a file, not a folder (--inbox or MNISTQ_INBOX)")
    csv = check_csv(folders.csv)
    for option, folder in (
        ("--done-dir", folders.done),
        ("--failed-dir", folders.failed),
        ("the review folder", folders.review),
    ):
        if folder.expanduser().is_symlink():
            raise ConfigError(
                f"{option} {folder} is a symbolic link (links are not followed): name the folder itself"
            )
        if folder.exists() and not folder.is_dir():
            raise ConfigError(f"{option} {folder} is a file, not a folder")
        where = folder.expanduser().resolve()
        if where == inbox or where in inbox.parents:  # its files would be the inbox's own again
            raise ConfigError(
                f"{option} {folder} is the inbox or holds it: choose a folder beside or inside it"
            )
    taken: list[PathLock] = []
    try:
        # The CSV's first: a second producer is refused before the inbox is created.
        taken += lock_csv(csv)
        _check_writable(csv)
        if inbox / INBOX_LOCK not in _held:  # `mnistq run` checked, then its watch checks again
            _refuse_nested(inbox)
        if not inbox.parent.is_dir():  # a typo would otherwise become a new tree of folders
            raise ConfigError(
                f"the folder of the inbox {folders.inbox} does not exist: create {inbox.parent} first, "
                "or choose another --inbox"
            )
        # Beside the inbox: it holds while the inbox itself is removed or renamed.
        taken += _lock(beside(inbox), f"watching {inbox}", optional=True)
        try:
            inbox.mkdir(exist_ok=True)
        except OSError as e:
            raise ConfigError(f"cannot create the inbox {folders.inbox}: {e.strerror}") from None
        taken += _lock(inbox / INBOX_LOCK, f"watching {inbox}")
    except BaseException:
        for lock in taken:
            _held.pop(lock.path, None)
            lock.release()
        raise


def _refuse_nested(inbox: Path) -> None:
    """A producer watches its inbox's whole tree: another one on a folder above it, or on one
    inside it, would take the same files (a row in each CSV). ConfigError naming its PID."""
    for above in inbox.parents:
        if pid := _holder_elsewhere(above / INBOX_LOCK):
            raise ConfigError(
                f"another producer (pid {pid}) is already watching {above}, which holds {inbox}; "
                "stop it first, or choose an inbox outside it"
            )
    stack, inside = [str(inbox)], []
    while stack:
        try:
            with os.scandir(stack.pop()) as entries:
                for e in entries:
                    if e.is_dir(follow_symlinks=False):
                        stack.append(e.path)
                    elif e.name == INBOX_LOCK:
                        inside.append(Path(e.path))
        except OSError:  # a folder gone or unreadable meanwhile: the watcher says so later
            continue
    for lock in inside:
        if lock != inbox / INBOX_LOCK and (pid := _holder_elsewhere(lock)):
            raise ConfigError(
                f"another producer (pid {pid}) is already watching {lock.parent}, inside this "
                "inbox; stop it first, or choose an inbox that does not hold it"
            )


def _holder_elsewhere(path: Path) -> str | None:
    """The PID of another process holding the lock file ``path``; None when no one does."""
    if path in _held:
        return None
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
    except OSError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return _holder(fd)
    except OSError:
        return None
    else:
        fcntl.flock(fd, fcntl.LOCK_UN)
        return None
    finally:
        os.close(fd)


def lock_csv(csv: Path) -> list[PathLock]:
    """One producer per CSV (``check_paths``, and `mnistq classify --csv`): its lock, taken now
    unless this process holds it (then an empty list)."""
    return _lock(csv.parent / f".{csv.name}.lock", f"writing {csv}")


def beside(inbox: Path) -> Path:
    """The inbox's lock file in its parent (hidden, so never work for a producer watching it)."""
    return inbox.parent / f".{inbox.name}{INBOX_LOCK}"


def relock_inbox(inbox: Path, present: bool) -> None:
    """The folder at ``inbox`` is not the one locked (removed or renamed): give up the lock file
    of the old one, wherever it went (a producer may watch it there), without removing the file
    now at that path; with ``present``, lock the new folder's. ConfigError if another producer
    holds that (possible only where the lock beside the inbox could not be taken)."""
    path = inbox / INBOX_LOCK
    old = _held.pop(path, None)
    if old is not None:
        old.forget()
    if present:
        _lock(path, f"watching {inbox}")


def _lock(path: Path, what: str, optional: bool = False) -> list[PathLock]:
    """Take one lock unless this process holds it; returns it if it was taken now (``optional``:
    none when its file cannot be created)."""
    if path in _held:
        return []
    lock = PathLock(path, what)
    if not lock.acquire(optional):
        return []
    if not _held:
        atexit.register(release_paths)  # a clean exit leaves no lock file behind
    _held[path] = lock
    return [lock]


def release_paths() -> None:
    """Give up the locks taken by ``check_paths`` (``watch`` does, when it returns)."""
    while _held:
        _held.popitem()[1].release()

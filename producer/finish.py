"""The row-and-move rule: how an answered message's files get their rows and leave the inbox.

For each message (``submit``), in this order:

1. **place**: each file is put at its final place under its final name, the name decided now
   (collisions included): a hard link into done/, review/ (a result the worker sent to review,
   see ``Result.review``) or failed/ (an error result), or a copy across filesystems
   (producer/place.py ``place``). The inbox entry stays.
2. **row**: the message's rows, each naming that final place (``moved_to``), are appended in
   one checked write and one fsync (producer/csvsink.py). If that fails, the new links are
   removed and the message waits (see below): nothing is moved without its row.
3. **remove**: the inbox entries go. A removal that fails is one warning and no retry loop:
   the row is written, and the ledger keeps the file from a second one.

A restart between the steps finds either no row (the file is redone; the link a crashed run
left in done/ is the same inode, and ``place`` reuses it; one left where the redo does not go,
in review/ when the threshold changed or under a name with the old file id, is removed once the
new row is written) or the row (``finish_known``, called by every scan, removes the inbox
entry). Never a file without its row, never two rows. Linking
changes a file's ctime, so its file id: an inbox entry whose id has no row but whose path's
row names this very inode as its final place counts as done (so does a file hard-linked back
from done/ under its old name: copy it, not link it, to have it read again).

**A disk that refuses** (ENOSPC, EROFS, EDQUOT, EIO, on the CSV or on done/): one WARNING, and
``paused`` is true (the dispatcher takes no new work); the waiting messages are retried every
``retry_s`` (``retry``), in order, and one INFO line says when writing works again.
"""

from __future__ import annotations

import collections
import enum
import errno
import logging
import os
import stat
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

from mnistq.csvcell import escapings, unescaped
from mnistq.protocol import ErrorKind, Result
from producer.access import Denied, blocking_folder, folder_id, unreadable
from producer.csvsink import CsvSink
from producer.inbox import DISK_ERRNOS, file_id, identity, lstat, remove, target
from producer.options import WatchOptions
from producer.place import lstat_placed, place, unlink_strays, unplace

log = logging.getLogger("mnistq.producer")


@dataclass(frozen=True)
class Answer:
    """A file's result, with what the dispatcher knew of the file when it sent it."""

    path: str
    fid: str
    ident: tuple[int, int, int, int] | None  # inbox.identity at send time; None: unknown
    result: Result
    home: tuple[int, int] | None = None  # the inbox folder it was sent from; None: unknown


class _Now(enum.Enum):
    """Where an answered file is now (``Finisher._current``)."""

    HERE = "here"  # the file sent, at its path: its row, and it is moved
    GONE = "gone"  # removed by someone (or a folder named like an image): its row, not moved
    REPLACED = "replaced"  # another file has its name: its row, and that one is new work
    WRITTEN = "written"  # the same file, written to since it was sent: no row, read again
    LEFT = "left"  # its folder (the inbox, or one in it) was removed or renamed: no row
    DENIED = "denied"  # a permission hides it or refused its reading: no row, tried again


@dataclass(frozen=True)
class Landed:
    answer: Answer
    written: bool  # False: the ledger had its row already (a second answer)
    replaced: bool = False  # another file has its name now: new work


class _Blocked(Exception):
    """The disk refused: the message waits."""


class Finisher:
    def __init__(
        self,
        sink: CsvSink,
        opts: WatchOptions,
        *,
        clock: Callable[[], float] = time.monotonic,
        denied: Denied | None = None,
    ) -> None:
        self.denied = denied or Denied()
        self.sink, self.inbox = sink, opts.folders.inbox
        self.done_dir, self.review_dir, self.failed_dir = opts.folders.outputs
        self.keep, self.retry_s, self.clock = opts.keep, opts.retry_s, clock
        # Replies (the collector) and retries and scans (the loop) come from two threads.
        self._lock = threading.RLock()
        self._waiting: collections.deque[list[Answer]] = collections.deque()
        self._paused_at: float | None = None
        self._retry_at = 0.0
        self._warned: set[tuple[str, int]] = set()  # (path, inode): one warning each, ever

    @property
    def paused(self) -> bool:
        return self._paused_at is not None

    def waiting(self) -> int:
        with self._lock:
            return sum(len(m) for m in self._waiting)

    def submit(self, answers: list[Answer]) -> list[Landed]:
        """One message's answers: rows written and files moved now, or queued while paused."""
        with self._lock:
            self._waiting.append(answers)
            return [] if self.paused else self._flush()

    def retry(self) -> list[Landed]:
        """While paused, every ``retry_s``: try the waiting messages again."""
        if self._paused_at is None:  # the loop asks every turn: no lock while nothing waits
            return []
        with self._lock:
            if not self.paused or self.clock() < self._retry_at:
                return []
            return self._flush()

    def drop(self) -> int:
        """Forget the waiting messages (stopping): their files stay in the inbox, redone later."""
        with self._lock:
            n = sum(len(m) for m in self._waiting)
            self._waiting.clear()
            return n

    def _flush(self) -> list[Landed]:
        landed: list[Landed] = []
        while self._waiting:
            try:
                landed += self._commit(self._waiting[0])
            except _Blocked as e:
                now = self.clock()
                if self._paused_at is None:
                    self._paused_at = now
                    log.warning(
                        "%s; intake paused, nothing is lost: the rows are tried again every %.0f s",
                        e, self.retry_s,
                    )  # fmt: skip
                self._retry_at = now + self.retry_s
                return landed
            except Exception:  # a bug: these files go back to the inbox's backlog, redone
                failed = self._waiting.popleft()
                log.exception("the rows of %d files could not be written; they are redone", len(failed))
                landed += [Landed(a, written=False) for a in failed]
                continue
            self._waiting.popleft()
        if self._paused_at is not None:
            log.info(
                "results can be written again after %.0f s; intake resumed", self.clock() - self._paused_at
            )
            self._paused_at = None
        return landed

    def _commit(self, answers: list[Answer]) -> list[Landed]:
        landed: list[Landed] = []
        rows: list[Result] = []
        placed: list[tuple[Answer, os.stat_result, str, bool]] = []  # (answer, st, dest, created)
        fids: set[str] = set()
        for a in answers:
            if a.fid in self.sink.done or a.fid in fids:  # a second answer for it
                landed.append(Landed(a, written=False))
                continue
            fids.add(a.fid)
            dest = ""
            st, now = self._current(a)
            if now is _Now.WRITTEN:
                # Its answer is of a file half written: no row; the file is new work again,
                # taken when its writer is done (the written file's events, or it settles).
                log.info("%s was written to while it was read; it is read again", a.path)
                landed.append(Landed(a, written=False, replaced=True))
                continue
            if now is _Now.LEFT or now is _Now.DENIED:
                # Not lost: it left the inbox with its folder (a row would say it was not found,
                # or name no place), or a permission hides it (its row comes when it is back).
                log.debug("%s: no row (%s)", a.path, now.value)
                landed.append(Landed(a, written=False, replaced=st is not None))
                continue
            replaced = now is _Now.REPLACED
            if self.keep:
                st, replaced = None, False
            if st is not None:
                where = self._folder(a.result)
                try:
                    dest, created = place(a.path, st, target(a.path, self.inbox, where), a.fid)
                except OSError as e:
                    if e.errno in DISK_ERRNOS:
                        self._undo(placed)
                        raise _Blocked(f"cannot put files in {where}: {e.strerror or e}") from None
                    if e.errno in (errno.EACCES, errno.EPERM) and self._hidden(a.path):
                        landed.append(Landed(a, written=False))  # its permission went meanwhile
                        continue
                    self._warn_once(a.path, st, f"could not move {a.path} to {where}: {_said(e)}; it stays")
                else:
                    placed.append((a, st, dest, created))
            rows.append(a.result.but(path=a.path, id=a.fid, moved_to=dest or None))
            landed.append(Landed(a, written=True, replaced=replaced))
        try:
            self.sink.append(rows)
        except OSError as e:
            self._undo(placed)
            raise _Blocked(f"cannot write {self.sink.path}: {e.strerror or e}") from None
        except Exception:  # a bug: no link stays in done/ without its row (a crash's links are reused)
            self._undo(placed)
            raise
        for r in rows:  # a file refused before for a permission: said when it has its row
            self.denied.cleared(r.path)
        # Only now, with their rows written, do the inbox entries go; before them, the links a
        # run that stopped before its rows left where these files no longer go (while the inbox
        # entry stays, a crash here still finds the row: Finisher._linked_row).
        gone: dict[str, bool] = {}
        for a, st, dest, _ in placed:
            unlink_strays(st, dest, self._firsts(a.path))
            gone[a.fid] = self._remove(a.path, st, dest)
        return [replace(x, replaced=True) if gone.get(x.answer.fid) is False else x for x in landed]

    def _folder(self, r: Result) -> Path:
        """An error row's file goes to failed/, one the worker sent to review to review/."""
        if r.error is not None:
            return self.failed_dir
        return self.review_dir if r.review else self.done_dir

    def _firsts(self, path: str) -> list[str]:
        """The file's first-choice name in each output folder."""
        return [target(path, self.inbox, d) for d in (self.done_dir, self.review_dir, self.failed_dir)]

    def _current(self, a: Answer) -> tuple[os.stat_result | None, _Now]:
        """Where the answered file is now (see _Now), with its lstat when it is HERE (or
        anything at all is at its path, for LEFT). A permission is never taken for absence."""
        try:
            st = lstat(a.path)
        except PermissionError:
            self.denied.note(blocking_folder(a.path))
            return None, _Now.DENIED
        except OSError:
            return None, _Now.LEFT if self._left(a, gone=True) else _Now.GONE
        if stat.S_ISDIR(st.st_mode):
            return None, _Now.GONE  # a folder named x.png keeps its place
        if a.ident is None:
            same = file_id(a.path, st) == a.fid
        elif identity(st) == a.ident:
            same = True
        elif a.ident[:2] == (st.st_dev, st.st_ino):
            return None, _Now.WRITTEN
        else:
            same = False
        if not same:
            return (st, _Now.LEFT) if self._left(a, gone=False) else (None, _Now.REPLACED)
        if a.result.error_kind is ErrorKind.REFUSED and unreadable(a.path):
            self.denied.note(a.path, file=True)  # the worker could not open it either
            return None, _Now.DENIED
        return st, _Now.HERE

    def _left(self, a: Answer, gone: bool) -> bool:
        """The file's inbox is not the folder it was sent from (removed or renamed: it went
        with its folder, it was not lost), or (``gone``) its own folder is no longer there."""
        if a.home is not None:
            try:
                if folder_id(self.inbox) != a.home:
                    return True
            except OSError:
                pass  # cannot tell: as it was
        return gone and not os.path.isdir(os.path.dirname(a.path))

    def _hidden(self, path: str) -> bool:
        """A permission hides ``path`` now (said once, Denied)."""
        try:
            os.lstat(path)
        except PermissionError:
            self.denied.note(blocking_folder(path))
            return True
        except OSError:
            return False
        return False

    def _undo(self, placed: list[tuple[Answer, os.stat_result, str, bool]]) -> None:
        for _, _, dest, created in placed:
            if created:
                unplace(dest)

    def _remove(self, path: str, st: os.stat_result, dest: str) -> bool:
        """Remove an inbox entry whose row is written; False when another file took its name."""
        try:
            return remove(path, st)
        except OSError as e:
            self._warn_once(
                path,
                st,
                f"could not remove {path} from the inbox ({e}); its row is written and it is in {dest}",
            )
            return True

    def _warn_once(self, path: str, st: os.stat_result, message: str) -> None:
        with self._lock:
            if (path, st.st_ino) not in self._warned:
                self._warned.add((path, st.st_ino))
                log.warning("%s", message)

    # -- scans ----------------------------------------------------------------------------
    def finish_known(self, path: str, st: os.stat_result) -> bool:
        """A scan found ``path`` (its lstat ``st``): True when it has its row already. Its inbox
        entry is then removed (the last step of a run that stopped before it), unless --keep."""
        moved = self.sink.done.get(file_id(path, st))
        if moved is None:
            moved = self._linked_row(path, st)
            if moved is None:
                return False
        if self.keep or stat.S_ISDIR(st.st_mode):
            return True
        if not moved and "moved_to" in self.sink.columns:
            return True  # its row says it stays where it is (--keep, or it could not be moved)
        with self._lock:
            if (path, st.st_ino) in self._warned:
                return True  # warned once already: it stays, quietly
            dest = self._ensure_placed(path, st, moved)
            if dest is not None:
                unlink_strays(st, dest, self._firsts(path))  # a crash after the row, before them
                self._remove(path, st, dest)
        return True

    def _linked_row(self, path: str, st: os.stat_result) -> str | None:
        """The path's latest row, if its final place is this very inode (a link made, then the
        row, and the run stopped before removing the inbox entry)."""
        if st.st_nlink < 2 or stat.S_ISDIR(st.st_mode):
            return None
        # an older version wrote a literal backslash before xNN as it was: its row is found too
        moved = next((m for c in escapings(path) if (m := self.sink.places.get(c)) is not None), None)
        if moved is None:
            return None
        # A row from before moved_to existed names no place: look where it would have gone.
        places = (
            unescaped(moved)
            if moved
            else [str(target(path, self.inbox, d)) for d in (self.done_dir, self.failed_dir)]
        )
        for p in places:
            try:
                if os.path.samestat(lstat_placed(p), st):
                    return moved
            except OSError:
                continue
        return None

    def _ensure_placed(self, path: str, st: os.stat_result, moved: str) -> str | None:
        """The final place the row names (made again if it went missing); None if it cannot be."""
        fid = file_id(path, st)
        try:
            if not moved:  # a row of a CSV from before moved_to, written before its file was moved
                return place(path, st, target(path, self.inbox, self.done_dir), fid)[0]
            names = unescaped(moved)
            dest = next((p for p in names if _there(p)), names[0])
            # place() reuses it when it is this file; if someone put another file there, this
            # one gets a name of its own rather than being removed with no copy left
            return place(path, st, Path(dest), fid)[0]
        except OSError as e:
            self._warn_once(path, st, f"could not move {path} out of the inbox: {_said(e)}; it stays")
            return None


def _there(path: str) -> bool:
    """Is there a file at ``path`` in an output folder (no link followed on the way)?"""
    try:
        lstat_placed(path)
    except OSError:
        return False
    return True


def _said(e: OSError) -> str:
    """What went wrong, in the system's words: a link found on the way names itself."""
    if e.strerror and e.filename is None:
        return e.strerror
    return str(e)

"""Intake: which inbox files are complete and ready to send, decided from events and the clock.

A state machine with no thread, no clock and no filesystem of its own: the watcher feeds it
events (``on_event``), rescans (``scan``) and the time (``tick``), and takes ready paths out of
``tick``. A file is ready only when complete:

- **inotify**, told apart by events, with no timing guess: a file moved in whole (a rename
  into the inbox, ``MOVED_IN``) is ready at once; a file opened for writing is ready when it is
  closed after writing (or closed unwritten, when nothing wrote to it since it was opened). A
  file that was created but whose writer the events do not show (a hard link, or an open still
  on its way) settles as in polling mode, unless its close comes first.
- **polling** (no opens or closes are seen): ready once size and mtime have stood still for
  ``settle_s``.
- **scan**: a file found by a rescan is ready at once if its mtime is older than ``settle_s``,
  else it settles as in polling mode. A rescan is a pass over the folder, read lazily: it stops
  when the caps are full and goes on from there when there is room again.

Memory is bounded: at most ``cap`` candidates, ``cap`` files being written and ``cap`` ready
files. Past that a hint is dropped and ``rescan_needed`` is set: the inbox keeps the file and
a later scan finds it.
"""

from __future__ import annotations

import enum
import itertools
import logging
import os
from collections.abc import Callable, Iterable, Iterator, Sequence, Sized
from pathlib import Path

from producer.inbox import lstat

log = logging.getLogger("mnistq.producer")

Stat = Callable[[str], os.stat_result]


class EventKind(enum.Enum):
    """What the filesystem said about a path (watchdog's event types, named for what they mean)."""

    MOVED_IN = "moved_in"  # renamed into the inbox: complete
    CREATED = "created"  # a new name: a writer, a copy or a hard link, complete or not
    OPENED = "opened"
    MODIFIED = "modified"
    CLOSED_WRITE = "closed_write"
    CLOSED_NO_WRITE = "closed_no_write"


def _never(_path: str) -> bool:
    return False


def _lstat(path: str) -> os.stat_result:
    return lstat(path)  # os.lstat, for a path of any length


class Intake:
    """Candidates -> ready paths. Call every method from one thread (the watcher's loop)."""

    def __init__(
        self,
        *,
        polling: bool = False,
        settle_s: float = 1.0,
        rescan_s: float = 30.0,
        cap: int = 1024,
        skip: Sequence[Path] = (),
        busy: Callable[[str], bool] = _never,
    ) -> None:
        """``skip``: folders whose files are never work (done/, failed/ inside the inbox);
        ``busy``: paths in flight, whose events (a worker reading them) mean nothing new."""
        self.polling, self.settle_s, self.rescan_s, self.cap = polling, settle_s, rescan_s, cap
        self.skip = tuple(skip)
        # the same as Path(path).is_relative_to(s) for the absolute, normalised paths events
        # and scans give, without building a Path per event
        self._skip_exact = frozenset(str(s) for s in self.skip)
        self._skip_under = tuple(str(s).rstrip("/") + "/" for s in self.skip)
        self.busy = busy
        # path -> (since, (size, mtime_ns)), None before its first stat
        self._fresh: dict[str, tuple[float, tuple[int, int] | None]] = {}
        self._writing: dict[str, bool] = {}  # path -> written to since it was opened
        self._ready: dict[str, None] = {}  # an ordered set: oldest first
        self.rescan_needed = False
        self._last_scan: float | None = None
        self._pass: Iterator[tuple[str, os.stat_result]] | None = None  # a pass to go on with

    # -- what the watcher feeds in ------------------------------------------------------
    def on_events(self, events: Iterable[tuple[EventKind, str]], now: float) -> None:
        """``on_event`` for each (kind, path), in order."""
        on_event = self.on_event
        for kind, path in events:
            on_event(kind, path, now)

    def on_event(self, kind: EventKind, path: str, now: float) -> None:
        if self.busy(path) or path in self._skip_exact or path.startswith(self._skip_under):
            return
        if kind is EventKind.MOVED_IN and not self.polling:
            self._fresh.pop(path, None)
            self._writing.pop(path, None)
            self._make_ready(path)
        elif kind is EventKind.CREATED or self.polling:
            self._candidate(path, now, None)
        elif kind is EventKind.OPENED:
            # Someone has it open (a writer, or a reader such as a thumbnailer): wait for the close.
            self._fresh.pop(path, None)
            self._ready.pop(path, None)
            if path not in self._writing and not self._room(self._writing):
                return  # its close-after-write still makes it ready; a rescan covers the rest
            self._writing.setdefault(path, False)
        elif kind is EventKind.MODIFIED:
            self._fresh.pop(path, None)
            if path in self._writing or self._room(self._writing):
                self._writing[path] = True
        elif kind is EventKind.CLOSED_WRITE or (
            kind is EventKind.CLOSED_NO_WRITE and self._writing.get(path) is False
        ):
            self._writing.pop(path, None)
            self._make_ready(path)

    def scan(
        self,
        entries: Iterable[tuple[str, os.stat_result]] | None,
        now: float,
        wall_now: float,
        finished: Callable[[str, os.stat_result], bool],
    ) -> None:
        """Start a pass over a folder walk's (path, lstat) entries, or (``None``) go on with the
        pass that stopped when full: read lazily, up to the caps. A flood is read once per pass,
        however often the caps fill and empty, not from the top each time (``scanning`` says a
        pass is unfinished; ``scan_due``, when to go on with it).

        ``finished(path, st)``: the CSV has its row already (the caller moves it out).
        """
        if entries is not None:
            # Asks made from now on (dropped hints) need a pass that starts after them.
            self.rescan_needed = False
            self._last_scan = now
            self._pass = iter(entries)
        walk = self._pass
        if walk is None:
            return
        cap, ready, fresh = self.cap, self._ready, self._fresh
        while len(ready) < cap and len(fresh) < cap:  # before taking an entry: none is lost
            entry = next(walk, None)
            if entry is None:
                self._pass = None
                return
            path, st = entry
            if self.tracks(path) or self.busy(path) or finished(path, st):
                continue
            if wall_now - st.st_mtime < self.settle_s:  # may still be written: let it settle
                self._candidate(path, now, (st.st_size, st.st_mtime_ns))
            else:
                self._make_ready(path)

    def put_back(self, paths: Sequence[str]) -> None:
        """Paths taken from ``tick`` that were not sent (or must be sent again): first in line."""
        if not paths:
            return
        back = [p for p in paths if p not in self._ready and not self.busy(p)]
        room = max(0, self.cap - len(self._ready))
        if len(back) > room:
            self.rescan_needed = True  # they are still in the inbox
            back = back[:room]
        self._ready = {**dict.fromkeys(back), **self._ready}

    def request_rescan(self) -> None:
        self.rescan_needed = True

    def restart(self) -> None:
        """The inbox is another folder now: the pass under way reads the old one; read the new."""
        self._pass = None
        self.rescan_needed = True

    # -- what it gives back -------------------------------------------------------------
    def tick(self, now: float, *, limit: int | None = None, stat: Stat = _lstat) -> list[str]:
        """Settle the candidates, then take up to ``limit`` ready paths, oldest first."""
        for path, (since, key) in list(self._fresh.items()):
            if key is not None and now - since < self.settle_s:
                continue  # a look before settle_s has passed could not make it ready anyway
            try:
                st = stat(path)
            except PermissionError:  # a folder's permission hides it: a pass says so, and finds it later
                del self._fresh[path]
                self.rescan_needed = True
                continue
            except OSError:
                del self._fresh[path]  # gone: nothing to do
                continue
            new_key = (st.st_size, st.st_mtime_ns)
            if new_key != key:
                self._fresh[path] = (now, new_key)
            elif now - since >= self.settle_s:
                del self._fresh[path]
                self._make_ready(path)
        n = len(self._ready) if limit is None else max(0, min(limit, len(self._ready)))
        taken = list(itertools.islice(self._ready, n))
        for path in taken:
            del self._ready[path]
        return taken

    def scan_due(self, now: float) -> bool:
        """A pass is unfinished, or a rescan was asked for, and there is room again (half the
        caps: a pass goes on in long strides, not one file at a time); or the periodic one is
        due."""
        half = self.cap // 2
        room = len(self._ready) < half and len(self._fresh) < half
        if self._pass is not None:
            return room
        if self._last_scan is None or now - self._last_scan >= self.rescan_s:
            return True
        return self.rescan_needed and room

    @property
    def scanning(self) -> bool:
        """A pass stopped when full and has more to read."""
        return self._pass is not None

    @property
    def room(self) -> int:
        """How many more ready files fit: the hints worth taking now."""
        return max(0, self.cap - len(self._ready))

    def tracks(self, path: str) -> bool:
        return path in self._fresh or path in self._writing or path in self._ready

    @property
    def settling(self) -> bool:
        """Candidates wait for their size and mtime to stand still: ``tick`` is due soon."""
        return bool(self._fresh)

    @property
    def idle(self) -> bool:
        """Nothing pending: no candidate, no open writer, nothing ready, no rescan owed."""
        return not (self._fresh or self._writing or self._ready or self.rescan_needed or self._pass)

    def counts(self) -> dict[str, int]:
        return {"fresh": len(self._fresh), "writing": len(self._writing), "ready": len(self._ready)}

    # -- inside -------------------------------------------------------------------------
    def _room(self, d: Sized) -> bool:
        if len(d) < self.cap:
            return True
        self.rescan_needed = True  # a flood: the inbox keeps the files until there is room
        return False

    def _candidate(self, path: str, now: float, key: tuple[int, int] | None) -> bool:
        if path not in self._fresh and not self._room(self._fresh):
            return False
        self._fresh[path] = (now, key)
        return True

    def _make_ready(self, path: str) -> bool:
        if path in self._ready or self.busy(path):
            return True
        if not self._room(self._ready):
            return False
        self._ready[path] = None
        return True

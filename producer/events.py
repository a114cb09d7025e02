"""Where the watcher's hints come from: inotify(7) read directly on Linux, watchdog elsewhere.

A hint is (EventKind, path): something happened to a path under the inbox. Hints are handed to
the watcher's loop in batches through :class:`Hints`, bounded: past its cap the rest are
dropped and a pass over the inbox is asked for (the folder still has the files).

On Linux the events come from inotify read directly (producer/inotify.py): one thread reads
the kernel's buffer, turns each event into a hint with a few dict lookups, and hands the loop
each buffer's hints as one list. watchdog's observer (kept for ``--polling`` and other systems)
costs ~35 us of Python per event in three threads, and every file brings five events (the
move, the worker's open and close, our link and removal): 177 of the producer's 369 us of CPU
per image in a burst, on the cores the workers need; read here, with no event asked for that
means nothing (link, removal), it is ~20 us per image (docs/profile.md).
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Protocol

from watchdog.events import FileSystemEvent, FileSystemEventHandler
from watchdog.observers import Observer
from watchdog.observers.api import BaseObserver
from watchdog.observers.polling import PollingObserver

from producer import inotify
from producer.hints import Hints
from producer.inbox import wanted
from producer.intake import EventKind

log = logging.getLogger("mnistq.producer")

_KINDS = {
    "created": EventKind.CREATED,
    "moved": EventKind.MOVED_IN,
    "opened": EventKind.OPENED,
    "modified": EventKind.MODIFIED,
    "closed": EventKind.CLOSED_WRITE,
    "closed_no_write": EventKind.CLOSED_NO_WRITE,
}


class Source(Protocol):
    """Where the hints come from: InotifyHints, or a watchdog observer."""

    def start(self) -> None: ...

    def stop(self) -> None: ...

    def join(self, timeout: float | None = None) -> None: ...


def source_for(
    inbox: Path, hints: Hints, polling: bool, skip: Sequence[Path], busy: Callable[[str], bool]
) -> Source:
    if not polling and inotify.AVAILABLE and sys.platform.startswith("linux"):
        # Renames into the inbox are moves with no source, not creates: that, not a timing
        # guess, tells a file moved in whole from one still being written.
        return inotify.InotifyHints(inbox, hints, skip, busy)
    # --polling; or not Linux: no opens or closes either, so every new file settles
    observer: BaseObserver = PollingObserver(timeout=0.5) if polling else Observer()
    observer.schedule(WatchdogHints(hints), str(inbox), recursive=True)
    return observer


class WatchdogHints(FileSystemEventHandler):
    """watchdog's events as hints (``--polling``, and systems without inotify); runs on
    watchdog's thread, never blocks."""

    def __init__(self, hints: Hints) -> None:
        self.hints = hints

    def on_any_event(self, event: FileSystemEvent) -> None:
        kind = _KINDS.get(event.event_type)
        # With full events a rename out of the inbox is a move with no destination: nothing new.
        path = os.fsdecode(event.dest_path if event.event_type == "moved" else event.src_path)
        new = kind in (EventKind.MOVED_IN, EventKind.CREATED)
        if kind is None or not path or not wanted(path) or (event.is_directory and not new):
            return
        self.hints.put(kind, path)

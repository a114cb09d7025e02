"""Hints from an event source (producer/events.py's watchdog, producer/inotify.py's reader) to
the watcher's loop, in batches: a module of its own so that both sources import it and neither
imports the other."""

from __future__ import annotations

import threading

from producer.intake import EventKind


class Hints:
    """Hints from the event source to the loop, handed over in batches. Thread-safe; bounded: past
    ``cap`` waiting hints the rest are dropped and ``overflow`` asks the loop for a rescan (the
    folder still has the files)."""

    def __init__(self, cap: int) -> None:
        self.cap = cap
        self._items: list[tuple[EventKind, str]] = []
        self._cond = threading.Condition(threading.Lock())
        self._woken = False
        self.overflow = False

    def put(self, kind: EventKind, path: str) -> None:
        self.put_many([(kind, path)])

    def put_many(self, hints: list[tuple[EventKind, str]]) -> None:
        with self._cond:
            room = self.cap - len(self._items)
            if len(hints) > room:
                self.overflow = True
                hints = hints[: max(0, room)]
            self._items += hints
            self._cond.notify()

    def overflowed(self) -> None:
        with self._cond:
            self.overflow = True
            self._cond.notify()

    def wake(self) -> None:
        """Have the loop look now (answers freed room for more files)."""
        with self._cond:
            self._woken = True
            self._cond.notify()

    @property
    def full(self) -> bool:
        """Any more would be dropped: the event source need not even read them closely."""
        return len(self._items) >= self.cap

    def take(self, timeout: float, limit: int | None = None) -> tuple[list[tuple[EventKind, str]], bool]:
        """Up to ``limit`` waiting hints (all: None), oldest first, after waiting up to
        ``timeout`` for any; and whether some were dropped since the last take. Hints left here
        wait for the next take: a full intake would drop them, and a flood stays a few
        thousand hints deep here instead of a rescan per few thousand files."""
        with self._cond:
            n = len(self._items) if limit is None else max(0, limit)
            if not ((self._items and n) or self._woken or self.overflow):
                self._cond.wait(timeout)
            n = len(self._items) if limit is None else max(0, limit)
            items, self._items = self._items[:n], self._items[n:]
            overflow, self.overflow, self._woken = self.overflow, False, False
            return items, overflow

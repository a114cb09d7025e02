"""Dispatch: ready files -> messages -> in flight -> reply -> CSV row -> moved out.

One file's way through it:

1. ``send(paths)`` (the watcher's loop): the file is identified (``file_id``), skipped if the
   CSV, the ledger, has its row already, marked in flight, and sent, ``message_size`` paths per
   message. It is marked before it is sent because a reply can come back before ``send``
   returns.
2. ``on_reply(reply)`` (the collector thread): its row is written, the file is moved to done/ or
   failed/ (unless ``keep``), and only then is it no longer in flight. A file replaced under
   the same name meanwhile stays, and ``on_replaced`` reports it as new work.
3. ``resend_stale()``: a file in flight longer than ``resend_s`` (its message lost with a broker
   that keeps nothing) goes back to be sent again; the first answer writes its row, the ledger
   drops any later one.

At most ``max_inflight`` files are in flight; ``room()`` says how many more may go.
"""

from __future__ import annotations

import logging
import os
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Protocol

from mnistq.protocol import ErrorKind, Reply, Result
from producer.client import miscounted
from producer.csvsink import CsvSink
from producer.inbox import file_id, move_out

log = logging.getLogger("mnistq.producer")

#: files in flight at most: bounds the producer's memory and the queue, whatever the inbox holds
MAX_IN_FLIGHT = 4096


class Sender(Protocol):
    def send(
        self, paths: Sequence[str], ids: Sequence[str] | None = None, *, task_id: str | None = None
    ) -> str:
        """Send one message; raise if the broker did not take it."""
        ...


@dataclass(frozen=True)
class Progress:
    """Counts for a progress display and the final line."""

    sent: int  # files sent, resends included
    done: int  # rows written
    failed: int  # of which error rows
    in_flight: int
    busy_s: float  # time with files in flight: the rate's denominator, idle time left out
    abandoned: int = 0  # in flight when the watcher stopped; redone on the next start

    @property
    def images_per_s(self) -> float:
        return self.done / self.busy_s if self.busy_s > 0 else 0.0


@dataclass(frozen=True)
class _Flight:
    path: str
    task_id: str
    sent_at: float


def _lstat(path: str) -> os.stat_result:
    return os.stat(path, follow_symlinks=False)


class Dispatcher:
    def __init__(
        self,
        sender: Sender,
        sink: CsvSink,
        *,
        inbox: Path,
        done_dir: Path,
        failed_dir: Path,
        keep: bool = False,
        message_size: int = 256,
        max_inflight: int = MAX_IN_FLIGHT,
        resend_s: float = 300.0,
        clock: Callable[[], float] = time.monotonic,
        on_progress: Callable[[Progress], None] | None = None,
        on_replaced: Callable[[str], None] | None = None,
    ) -> None:
        self.sender, self.sink = sender, sink
        self.inbox, self.done_dir, self.failed_dir = inbox, done_dir, failed_dir
        self.keep, self.message_size, self.max_inflight = keep, message_size, max_inflight
        self.resend_s, self.clock = resend_s, clock
        self.on_progress, self.on_replaced = on_progress, on_replaced
        # The loop sends and resends, the collector thread answers: this guards what both touch.
        # The sink's ledger (``sink.done``) is only added to, by the collector; reading it from
        # the loop is a set lookup, atomic in CPython.
        self._lock = threading.Lock()
        self._flights: dict[str, _Flight] = {}  # file id -> where it is
        self._paths: set[str] = set()  # the paths of _flights, for the intake's "busy"
        self._tasks: dict[str, list[tuple[str, str]]] = {}  # task id -> [(path, file id)]
        self._sent = self._done = self._failed = self._abandoned = 0
        self._busy_s = 0.0
        self._busy_since: float | None = None

    # -- the loop's side ----------------------------------------------------------------
    def room(self) -> int:
        with self._lock:
            return max(0, self.max_inflight - len(self._flights))

    def is_busy(self, path: str) -> bool:
        return path in self._paths

    @property
    def idle(self) -> bool:
        return not self._flights

    def send(self, paths: Sequence[str]) -> list[str]:
        """Send these paths; returns those not sent because the broker failed (try them later)."""
        for start in range(0, len(paths), self.message_size):
            batch = self._identify(paths[start : start + self.message_size])
            if not batch:
                continue
            task_id = str(uuid.uuid4())
            with self._lock:
                now = self.clock()
                for path, fid in batch:
                    self._flights[fid] = _Flight(path, task_id, now)
                    self._paths.add(path)
                self._tasks[task_id] = batch
                if self._busy_since is None:
                    self._busy_since = now
            try:
                self.sender.send([p for p, _ in batch], [f for _, f in batch], task_id=task_id)
            except Exception:  # the loop's edge: a broker hiccup; the files wait and go again
                log.exception("sending %d files failed; they are sent again", len(batch))
                with self._lock:
                    self._tasks.pop(task_id, None)
                    for _, fid in batch:
                        self._land(fid)
                return [p for p, _ in batch] + list(paths[start + self.message_size :])
            with self._lock:
                self._sent += len(batch)
            log.debug("sent %d files as task %s", len(batch), task_id)
            self._report()
        return []

    def _identify(self, paths: Sequence[str]) -> list[tuple[str, str]]:
        batch = []
        for path in paths:
            try:
                fid = file_id(path, _lstat(path))
            except OSError:
                continue  # gone before we got to it
            if fid in self.sink.done or fid in self._flights:
                continue
            batch.append((path, fid))
        return batch

    def resend_stale(self) -> list[str]:
        """Take back the files in flight for longer than ``resend_s``: the caller sends them again."""
        with self._lock:
            now = self.clock()
            stale = [(fid, f) for fid, f in self._flights.items() if now - f.sent_at > self.resend_s]
            for fid, flight in stale:
                self._tasks.pop(flight.task_id, None)  # a late answer is still taken, by file id
                self._land(fid)
        for _, flight in stale:
            log.warning("no result for %s after %.0fs; sending it again", flight.path, self.resend_s)
        return [f.path for _, f in stale]

    def already_done(self, path: str, st: os.stat_result) -> bool:
        """The CSV has this file's row (a previous run stopped before moving it): move it now."""
        fid = file_id(path, st)
        if fid not in self.sink.done:
            return False
        if not self.keep:
            self._move(path, fid, failed=False)
        return True

    def abandon(self) -> int:
        """Give up on what is still in flight (stopping); it is redone on the next start."""
        with self._lock:
            n = len(self._flights)
            for fid in list(self._flights):
                self._land(fid)
            self._tasks.clear()
            self._abandoned += n
        return n

    def progress(self) -> Progress:
        with self._lock:
            busy = self._busy_s
            if self._busy_since is not None:
                busy += self.clock() - self._busy_since
            return Progress(self._sent, self._done, self._failed, len(self._flights), busy, self._abandoned)

    # -- the collector's side -----------------------------------------------------------
    def on_reply(self, reply: Reply) -> None:
        with self._lock:
            batch = self._tasks.pop(reply.task_id, None)
        if batch is None:
            # A task sent again meanwhile, or a redelivered task's second answer: take what is
            # still in flight, by file id; the rest has its row already.
            for r in reply.results:
                with self._lock:
                    flight = self._flights.get(r.id) if r.id else None
                if flight is not None and r.id:
                    self._finish(flight.path, r.id, r)
        else:
            results = miscounted(reply, [p for p, _ in batch], [f for _, f in batch])
            if results is None:
                results = [
                    r if r.id == fid else self._misfiled(reply.task_id, path, fid, r)
                    for r, (path, fid) in zip(reply.results, batch, strict=True)
                ]
            for r, (path, fid) in zip(results, batch, strict=True):
                self._finish(path, fid, r)
        self._report()

    @staticmethod
    def _misfiled(task_id: str, path: str, fid: str, got: Result) -> Result:
        message = f"internal error: the worker answered for file id {got.id!r} in this file's place"
        log.warning("task %s: %s: %s", task_id, path, message)
        return Result.failed(path, ErrorKind.INTERNAL, message, fid)

    def _finish(self, path: str, fid: str, result: Result) -> None:
        replaced = False
        # The row names the file as we sent it, whatever the worker echoed.
        if self.sink.write(replace(result, path=path, id=fid)):
            failed = result.error is not None
            with self._lock:
                self._done += 1
                self._failed += failed
            if failed:
                log.info("failed: %s: %s", path, result.error)
            replaced = self._move_out(path, fid, failed)
        # Only now, with its row written and the file moved, is it no longer in flight.
        with self._lock:
            self._land(fid)
        if replaced and self.on_replaced is not None:
            self.on_replaced(path)

    def _move_out(self, path: str, fid: str, failed: bool) -> bool:
        """Move the file whose row was written; True if another file has taken its name."""
        try:
            same = file_id(path, _lstat(path)) == fid
        except OSError:
            return False  # gone already
        if same and not self.keep:
            self._move(path, fid, failed)
        return not same

    def _move(self, path: str, fid: str, failed: bool) -> None:
        try:
            move_out(path, self.inbox, self.failed_dir if failed else self.done_dir, fid)
        except OSError as e:
            log.warning("could not move %s out of the inbox: %s", path, e)

    def _land(self, fid: str) -> None:
        """No longer in flight (call with the lock held); the busy time stops with the last one."""
        flight = self._flights.pop(fid, None)
        if flight is not None:
            self._paths.discard(flight.path)
        if not self._flights and self._busy_since is not None:
            self._busy_s += self.clock() - self._busy_since
            self._busy_since = None

    def _report(self) -> None:
        if self.on_progress is not None:
            self.on_progress(self.progress())

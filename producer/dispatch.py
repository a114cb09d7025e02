"""Dispatch: ready files -> messages -> in flight -> reply -> row and move -> out of the inbox.

One file's way through it:

1. ``send(paths)`` (the watcher's loop): the file is identified (``file_id``), skipped if the
   CSV, the ledger, has its row already, marked in flight, and sent, ``message_size`` paths per
   message. It is marked before it is sent because a reply can come back before ``send``
   returns.
2. ``on_reply(reply)`` (the collector thread): the message's files get their rows and leave the
   inbox by the row-and-move rule (producer/finish.py); only then are they no longer in
   flight. A file replaced under the same name meanwhile stays, and ``on_replaced`` reports it
   as new work. While the disk refuses the rows, ``room()`` is 0: no new work is taken.
3. ``tick()`` (the loop, every turn): retries rows the disk refused, and takes back the files
   of messages that are lost (mnistq/evidence.py: missing from the broker and the workers in
   two looks some seconds apart, or unanswered for ``resend_s`` where the broker cannot be
   listed); the caller sends them again, and the first answer writes the row.

At most ``max_inflight`` files are in flight; ``room()`` says how many more may go.
"""

from __future__ import annotations

import logging
import os
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

from mnistq.broker import BrokerRefused
from mnistq.evidence import LOST_WHY, Lookout, LostWork, NoProbe
from mnistq.protocol import ErrorKind, Reply, Result, miscounted
from mnistq.tuning import MIN_TIMED_S, SEND_WARN_EVERY_S
from producer.access import Denied, blocking_folder, folder_id
from producer.csvsink import CsvSink
from producer.finish import Answer, Finisher, Landed
from producer.inbox import file_id, identity, lstat
from producer.options import WatchOptions

log = logging.getLogger("mnistq.producer")


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
    #: time with files in flight since the workers first answered: the rate's denominator, idle
    #: time and the workers' start (loading the model) left out
    busy_s: float
    abandoned: int = 0  # in flight when the watcher stopped; redone on the next start
    review: int = 0  # of the rows written, files sent to review/
    rated: int = 0  # the rows that busy_s timed: those after the workers' first answer

    @property
    def images_per_s(self) -> float:
        return self.rated / self.busy_s if self.busy_s > 0 else 0.0

    @property
    def rate(self) -> float | None:
        """Images per second of work, once MIN_TIMED_S of it was timed; None before: the rate
        of a few files is their latency (3 files in 0.1 s read as 26 images/s)."""
        return self.images_per_s if self.busy_s >= MIN_TIMED_S else None


@dataclass(frozen=True)
class _Flight:
    path: str
    task_id: str
    ident: tuple[int, int, int, int]  # inbox.identity when sent
    home: tuple[int, int] | None  # the inbox folder it was sent from (Dispatcher.home)


@dataclass(frozen=True)
class _Task:
    files: list[tuple[str, str]]  # [(path, file id)]
    sent_at: float


class Dispatcher:
    def __init__(
        self,
        sender: Sender,
        sink: CsvSink,
        opts: WatchOptions,
        *,
        lost: LostWork | None = None,
        clock: Callable[[], float] = time.monotonic,
        on_progress: Callable[[Progress], None] | None = None,
        on_replaced: Callable[[str], None] | None = None,
        denied: Denied | None = None,
    ) -> None:
        """``lost`` finds lost messages; without it, only the time-based fallback (``resend_s``
        unanswered) applies. ``denied``: where files that cannot be read for a permission are
        told (they get no row until they can be)."""
        self.sender = sender
        self.inbox = opts.folders.inbox
        self.keep, self.message_size, self.max_inflight = opts.keep, opts.message_size, opts.max_inflight
        self.lost = lost or LostWork(NoProbe(), fallback_s=opts.resend_s, clock=clock)
        self.clock = clock
        self.on_progress, self.on_replaced = on_progress, on_replaced
        self.finisher = Finisher(sink, opts, clock=clock, denied=denied)
        #: the inbox folder (device, inode) files are sent from now; the watcher sets it when a
        #: new folder takes the inbox's place. A file whose inbox changed gets no row.
        self.home = folder_id(opts.folders.inbox)
        # The loop sends and resends, the collector thread answers: this guards what both touch.
        self._lock = threading.Lock()
        self._flights: dict[str, _Flight] = {}  # file id -> where it is
        self._paths: set[str] = set()  # the paths of _flights, for the intake's "busy"
        self._tasks: dict[str, _Task] = {}  # task id -> its files, until its answer or its loss
        self._sent = self._done = self._failed = self._abandoned = self._review = 0
        self._busy_s = 0.0
        self._busy_since: float | None = None
        self._timing = False  # the workers answered once: busy time is timed from then on
        self._rated = 0
        self._lookout = Lookout(self.lost)
        self._send_warned_at: float | None = None

    # -- the loop's side ----------------------------------------------------------------
    def room(self) -> int:
        if self.finisher.paused:
            return 0  # the disk refuses rows: take no new work until it takes them again
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
                home = self.home
                for path, fid, ident in batch:
                    self._flights[fid] = _Flight(path, task_id, ident, home)
                    self._paths.add(path)
                self._tasks[task_id] = _Task([(p, f) for p, f, _ in batch], now)
                if self._busy_since is None:
                    self._busy_since = now
            try:
                self.sender.send([p for p, _, _ in batch], [f for _, f, _ in batch], task_id=task_id)
            except Exception as e:  # the loop's edge: a broker hiccup; the files wait and go again
                self._send_failed(len(batch), e)
                with self._lock:
                    self._tasks.pop(task_id, None)
                    for _, fid, _ in batch:
                        self._land(fid)
                if isinstance(e, BrokerRefused):  # a wrong password: waiting does not help
                    raise
                return [p for p, _, _ in batch] + list(paths[start + self.message_size :])
            with self._lock:
                self._sent += len(batch)
            log.debug("sent %d files as task %s", len(batch), task_id)
            self._report()
        return []

    def _send_failed(self, n: int, e: Exception) -> None:
        # One line, no traceback, and not one per try: the broker being down is the news.
        now = self.clock()
        if self._send_warned_at is None or now - self._send_warned_at >= SEND_WARN_EVERY_S:
            self._send_warned_at = now
            log.warning("sending %d files failed (%s: %s); they are sent again", n, type(e).__name__, e)
        else:
            log.debug("sending %d files failed again: %s", n, e)

    def _identify(self, paths: Sequence[str]) -> list[tuple[str, str, tuple[int, int, int, int]]]:
        batch = []
        busy, flights, done = self._paths, self._flights, self.finisher.sink.done
        finish_known = self.finisher.finish_known
        for path in paths:
            if path in busy:
                continue  # in flight: a late event for it means nothing new
            try:
                st = lstat(path)
            except PermissionError:  # not gone: hidden by a folder's permission, taken later
                self.finisher.denied.note(blocking_folder(path))
                continue
            except OSError:
                continue  # gone before we got to it
            fid = file_id(path, st)
            if fid in flights:
                continue
            # finish_known also catches a file whose row is written but whose inbox entry could
            # not be removed: linking it changed its ctime, so its id. It can be that only if
            # the ledger has its id or it has another link (Finisher._linked_row): the usual new
            # file is told apart here without hashing its id a second time.
            if (fid in done or st.st_nlink > 1) and finish_known(path, st):
                continue
            batch.append((path, fid, identity(st)))
        return batch

    def tick(self) -> list[str]:
        """Every turn of the loop: retry rows the disk refused; take back the files of lost
        messages (the caller sends them again)."""
        self._landed(self.finisher.retry())
        lost = self._lookout.lost_now(self.clock(), self._in_flight)
        if not lost:
            return []
        paths = []
        with self._lock:
            for tid in lost:
                task = self._tasks.pop(tid, None)  # a late answer is still taken, by file id
                for path, fid in task.files if task else ():
                    flight = self._flights.get(fid)
                    if flight is not None and flight.task_id == tid:
                        self._land(fid)
                        paths.append(path)
        if paths:
            if self.lost.by_fallback:
                log.warning(
                    "sending %d files again: no answer after %.0f s (the broker cannot be listed)",
                    len(paths), self.lost.fallback_s,
                )  # fmt: skip
            else:
                log.warning("sending %d files again: their messages are %s", len(paths), LOST_WHY)
        return paths

    def _in_flight(self) -> dict[str, float]:
        with self._lock:
            return {tid: t.sent_at for tid, t in self._tasks.items()}

    def already_done(self, path: str, st: os.stat_result) -> bool:
        """A scan's question: has this file its row already? If so, its inbox entry goes now
        (a previous run stopped before that step)."""
        return self.finisher.finish_known(path, st)

    def abandon(self) -> int:
        """Give up on what is still in flight (stopping); it is redone on the next start."""
        self.finisher.drop()
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
            return Progress(
                self._sent,
                self._done,
                self._failed,
                len(self._flights),
                busy,
                self._abandoned,
                self._review,
                self._rated,
            )

    # -- the collector's side -----------------------------------------------------------
    def on_reply(self, reply: Reply) -> None:
        with self._lock:
            task = self._tasks.pop(reply.task_id, None)
        try:
            self._answer(reply, task)
        except Exception:
            if task is not None:  # no longer in flight: the inbox keeps them, a rescan finds them
                with self._lock:
                    for _, fid in task.files:
                        self._land(fid)
            raise
        self._report()

    def _answer(self, reply: Reply, task: _Task | None) -> None:
        answers: list[Answer] = []
        flights = self._flights
        if task is None:
            # A task sent again meanwhile, or a redelivered task's second answer: take what is
            # still in flight, by file id; the rest has its row already.
            with self._lock:
                for r in reply.results:
                    flight = flights.get(r.id) if r.id else None
                    if flight is not None and r.id:
                        answers.append(Answer(flight.path, r.id, flight.ident, r, flight.home))
        else:
            paths, fids = [p for p, _ in task.files], [f for _, f in task.files]
            results = miscounted(reply, paths, fids)
            if results is None:
                results = [
                    r if r.id == fid else self._misfiled(reply.task_id, path, fid, r)
                    for r, (path, fid) in zip(reply.results, task.files, strict=True)
                ]
            with self._lock:  # one look for the whole message
                for r, (path, fid) in zip(results, task.files, strict=True):
                    flight = flights.get(fid)
                    if flight is None:
                        answers.append(Answer(path, fid, None, r))
                    else:
                        answers.append(Answer(path, fid, flight.ident, r, flight.home))
        if answers:
            self._landed(self.finisher.submit(answers))

    @staticmethod
    def _misfiled(task_id: str, path: str, fid: str, got: Result) -> Result:
        message = f"internal error: the worker answered for file id {got.id!r} in this file's place"
        log.warning("task %s: %s: %s", task_id, path, message)
        return Result.failed(path, ErrorKind.INTERNAL, message, fid)

    def _landed(self, landed: list[Landed]) -> None:
        """Files whose rows are written (or were already): no longer in flight. One lock and one
        count per message, not per file."""
        if not landed:
            return
        done = failed = review = 0
        replaced: list[str] = []
        with self._lock:
            for x in landed:
                a = x.answer
                if x.written:
                    done += 1
                    if a.result.error is not None:
                        failed += 1
                        log.debug("failed: %s: %s", a.path, a.result.error)
                    elif a.result.review:
                        review += 1
                self._land(a.fid)
                if x.replaced:
                    replaced.append(a.path)
            self._done += done
            self._failed += failed
            self._review += review
            if self._timing:
                self._rated += done
            elif done:
                # The workers' first answer: the time before it was them starting (loading the
                # model) or none running yet, not work. The rate is timed from here on, without
                # this first message, whose work began before the clock could tell.
                self._timing = True
                self._busy_s = 0.0
                self._busy_since = self.clock() if self._flights else None
        if self.on_replaced is not None:
            for path in replaced:
                self.on_replaced(path)

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

"""`mnistq watch`'s loop: watchdog events -> intake -> dispatch, and a result-collector thread.

The inbox itself is the backlog. Events are hints: the intake (producer/intake.py) decides when
a file is complete, the dispatcher (producer/dispatch.py) sends it, writes its row and moves it.
Only files in flight (at most ``max_inflight``) and a bounded set of candidates are held; the
folder is rescanned when hints had to be dropped (a flood, an inotify overflow) and every
``rescan_s`` as a safety net.
"""

from __future__ import annotations

import logging
import os
import queue
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from watchdog.events import FileSystemEvent, FileSystemEventHandler
from watchdog.observers import Observer
from watchdog.observers.api import BaseObserver
from watchdog.observers.polling import PollingObserver

from mnistq.errors import ConfigError
from mnistq.protocol import Reply
from producer.broker import BrokerUnavailable, Outage
from producer.csvsink import CsvSink
from producer.dispatch import MAX_IN_FLIGHT, Dispatcher, Progress
from producer.evidence import lost_work_for
from producer.inbox import scan, wanted
from producer.intake import EventKind, Intake

log = logging.getLogger("mnistq.producer")

#: How long the loop waits for an event before it settles and sends what is ready: bounds the
#: delay between a file's last event and its message.
EVENT_WAIT_S = 0.005
#: How long the collector blocks on the reply list per call: bounds how late it sees a stop.
COLLECT_WAIT_S = 0.2
#: Between progress log lines.
LOG_EVERY_S = 10.0
#: While the broker is away, how often the loop asks whether it is back.
PING_EVERY_S = 1.0

_KINDS = {
    "created": EventKind.CREATED,
    "moved": EventKind.MOVED_IN,
    "opened": EventKind.OPENED,
    "modified": EventKind.MODIFIED,
    "closed": EventKind.CLOSED_WRITE,
    "closed_no_write": EventKind.CLOSED_NO_WRITE,
}


class Connection(Protocol):
    """What the watcher needs of a Client (producer/client.py)."""

    outage: Outage  # says when the broker goes away and comes back, in a few lines

    def ping(self) -> None:
        """Raise BrokerUnavailable unless the broker answers."""
        ...

    def send(
        self, paths: Sequence[str], ids: Sequence[str] | None = None, *, task_id: str | None = None
    ) -> str: ...

    def receive(self, timeout: float) -> list[Reply]:
        """Raise BrokerUnavailable when the broker cannot be reached."""
        ...


@dataclass
class WatchOptions:
    inbox: Path
    done_dir: Path
    failed_dir: Path
    polling: bool = False
    keep: bool = False
    drain: bool = False  # process what is in the inbox, then return
    message_size: int = 256
    max_inflight: int = MAX_IN_FLIGHT
    settle_s: float = 1.0
    rescan_s: float = 30.0
    #: where the broker cannot be listed, unanswered work is sent again after this long
    #: (settings.resend_after_s); on Redis, lost work is found by looking (producer/evidence.py)
    resend_s: float = 45.0
    grace_s: float = 60.0  # on stop, how long to wait for the rows of files in flight


def _observer(polling: bool) -> BaseObserver:
    if polling:
        return PollingObserver(timeout=0.5)
    try:
        from watchdog.observers.inotify import InotifyObserver
    except ImportError:  # not Linux: no opens or closes either, so every new file settles
        return Observer()
    # Full events report a rename into the inbox as a move with no source, not as a create:
    # that, not a timing guess, tells a file moved in whole from one still being written.
    return InotifyObserver(generate_full_events=True)


class Hints(FileSystemEventHandler):
    """Runs on watchdog's thread: turns events into (kind, path) hints, never blocks."""

    def __init__(self, hints: queue.Queue[tuple[EventKind, str]], overflow: threading.Event) -> None:
        self.hints, self.overflow = hints, overflow

    def on_any_event(self, event: FileSystemEvent) -> None:
        kind = _KINDS.get(event.event_type)
        # With full events a rename out of the inbox is a move with no destination: nothing new.
        path = os.fsdecode(event.dest_path if event.event_type == "moved" else event.src_path)
        new = kind in (EventKind.MOVED_IN, EventKind.CREATED)
        if kind is None or not path or not wanted(path) or (event.is_directory and not new):
            return
        self.put(kind, path)

    def put(self, kind: EventKind, path: str) -> None:
        try:
            self.hints.put_nowait((kind, path))
        except queue.Full:
            self.overflow.set()  # the folder still has them; a rescan will find them


class Watcher:
    def __init__(
        self,
        client: Connection,
        sink: CsvSink,
        opts: WatchOptions,
        stop: threading.Event | None = None,
        on_progress: Callable[[Progress], None] | None = None,
    ) -> None:
        self.client, self.opts = client, opts
        self.stop = stop or threading.Event()
        self.inbox = opts.inbox.resolve()
        self.skip = (opts.done_dir.resolve(), opts.failed_dir.resolve())
        cap = 4 * opts.message_size
        self.overflow = threading.Event()
        self.hints = Hints(queue.Queue(maxsize=max(1024, cap)), self.overflow)
        self.dispatch = Dispatcher(
            client,
            sink,
            inbox=self.inbox,
            done_dir=self.skip[0],
            failed_dir=self.skip[1],
            keep=opts.keep,
            message_size=opts.message_size,
            max_inflight=opts.max_inflight,
            lost=lost_work_for(client, opts.resend_s),
            on_progress=on_progress,
            # a new file took a finished one's name: it is new work
            on_replaced=lambda path: self.hints.put(EventKind.CREATED, path),
        )
        self.intake = Intake(
            polling=opts.polling,
            settle_s=opts.settle_s,
            rescan_s=opts.rescan_s,
            cap=cap,
            skip=self.skip,
            busy=self.dispatch.is_busy,
        )
        self._next_ping = 0.0

    def run(self) -> Progress:
        """Watch until ``stop`` is set (or, with drain, until the inbox is done); finish the rows
        in hand for up to ``grace_s``. Returns the counts; ``abandoned`` > 0 if it gave up on some."""
        self.inbox.mkdir(parents=True, exist_ok=True)
        observer: BaseObserver | None = None
        if not self.opts.drain:  # before the collector starts: nothing to undo if this fails
            observer = _observer(self.opts.polling)
            observer.schedule(self.hints, str(self.inbox), recursive=True)
            try:
                observer.start()
            except OSError as e:  # inotify's limits (ENOSPC: max_user_watches, EMFILE: instances)
                raise ConfigError(
                    f"cannot watch {self.inbox} for events: {e.strerror}; raise "
                    "fs.inotify.max_user_watches / max_user_instances, or use --polling"
                ) from None
        finished = threading.Event()  # tells the collector that no more results are expected
        collector = threading.Thread(
            target=self._collect, args=(finished,), name="mnistq-results", daemon=True
        )
        collector.start()
        self._broker_ok(time.monotonic())  # a broker that is down at start: one warning, now
        mode = "polling" if self.opts.polling else "events"
        log.info("watching %s (%s)%s", self.inbox, mode, ", drain" if self.opts.drain else "")
        try:
            self._loop()
        finally:
            if observer is not None:
                observer.stop()
            deadline = time.monotonic() + self.opts.grace_s
            while not self.dispatch.idle and time.monotonic() < deadline:
                time.sleep(0.05)
            if abandoned := self.dispatch.abandon():
                log.warning(
                    "stopping with %d results outstanding; they are redone on the next start", abandoned
                )
            finished.set()
            collector.join()  # it returns within one receive; the sink must outlive its writes
            if observer is not None:
                observer.join(timeout=5)
        return self.dispatch.progress()

    def _loop(self) -> None:
        intake, dispatch = self.intake, self.dispatch
        last_log = time.monotonic()
        last_counts = (0, 0, 0, 0)
        while not self.stop.is_set():
            try:
                intake.on_event(*self.hints.hints.get(timeout=EVENT_WAIT_S), time.monotonic())
                while True:
                    intake.on_event(*self.hints.hints.get_nowait(), time.monotonic())
            except queue.Empty:
                pass
            if self.overflow.is_set():
                self.overflow.clear()
                intake.request_rescan()
            now = time.monotonic()
            if intake.scan_due(now):
                intake.scan(scan(self.inbox, self.skip), now, time.time(), dispatch.already_done)
            # While the broker is away the files wait in the inbox, not in a failing send.
            ready = intake.tick(now, limit=dispatch.room()) if self._broker_ok(now) else []
            if ready and (unsent := dispatch.send(ready)):
                intake.put_back(unsent)
                self.stop.wait(1)  # the broker failed: give it a moment
            intake.put_back(dispatch.tick())  # rows the disk refused; lost messages' files
            if now - last_log >= LOG_EVERY_S:
                last_log = now
                p = dispatch.progress()
                # idle: no line every 10 s saying that nothing happened
                if (counts := (p.sent, p.done, p.failed, p.in_flight)) != last_counts:
                    last_counts = counts
                    log.info(
                        "sent %d, done %d, failed %d, in flight %d, %.0f images/s",
                        p.sent, p.done, p.failed, p.in_flight, p.images_per_s,
                    )  # fmt: skip
            if self.opts.drain and intake.idle and dispatch.idle:
                return

    def _broker_ok(self, now: float) -> bool:
        """False while the broker is known to be away (asked again every PING_EVERY_S)."""
        outage = self.client.outage
        if not outage.down and self._next_ping:  # up, and asked at least once (at start)
            return True
        if now < self._next_ping:
            return False
        self._next_ping = now + PING_EVERY_S
        try:
            self.client.ping()
        except BrokerUnavailable as e:
            outage.failed(e)
            return False
        outage.ok()
        return True

    def _collect(self, finished: threading.Event) -> None:
        outage = self.client.outage
        while not finished.is_set():
            try:
                replies = self.client.receive(COLLECT_WAIT_S)
            except BrokerUnavailable as e:  # a few lines per outage (Outage), no traceback
                outage.failed(e)
                finished.wait(1)
                continue
            except Exception:  # a bug: the collector must live on; lost answers are resent
                log.exception("receiving results failed; retrying")
                finished.wait(1)
                continue
            outage.ok()
            for reply in replies:  # one reply's failure never drops the others
                try:
                    self.dispatch.on_reply(reply)
                except Exception:  # the loop's edge: its files are sent again later
                    log.exception("handling the results of task %s failed", reply.task_id)

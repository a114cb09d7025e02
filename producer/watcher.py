"""`mnistq watch`'s loop: hints -> intake -> dispatch, and a result-collector thread.

The inbox itself is the backlog. Hints (producer/events.py) say what happened to which path;
the intake (producer/intake.py) decides when a file is complete, the dispatcher
(producer/dispatch.py) sends it, writes its row and moves it. Only files in flight (at most
``max_inflight``) and a bounded set of candidates are held; the folder is read in passes when
hints had to be dropped (a flood, an inotify overflow) and every ``rescan_s`` as a safety net.

The inbox is one folder, told from another at its path by its device and inode: looked at every
``HOME_LOOK_S``. Removed or renamed, it is said in one warning; what it held is no longer
inbox work (no row: see docs/faults.md); a new folder at the path is locked and watched at once.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import replace
from typing import Protocol

from mnistq.broker import BrokerRefused, BrokerUnavailable
from mnistq.errors import ConfigError
from mnistq.evidence import lost_work_for
from mnistq.outage import Outage
from mnistq.protocol import Reply
from mnistq.tuning import (
    COLLECT_WAIT_S,
    DENIED_RESCAN_S,
    EVENT_WAIT_S,
    HOME_LOOK_S,
    IDLE_WAIT_S,
    LOG_EVERY_S,
    PING_EVERY_S,
)
from producer.access import Denied, folder_id
from producer.csvsink import CsvSink
from producer.dispatch import Dispatcher, Progress
from producer.events import Hints, Source, source_for
from producer.inbox import scan
from producer.intake import EventKind, Intake
from producer.lock import relock_inbox
from producer.options import WatchOptions

log = logging.getLogger("mnistq.producer")


class Connection(Protocol):
    """What the watcher needs of a Client (api/client.py)."""

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
        folders = opts.folders.resolved()
        self.inbox = folders.inbox
        # review/ (beside done/) too: a file put there must never come back as new work
        self.skip = (folders.done, folders.failed, folders.review)
        cap = max(opts.hold, 4 * opts.message_size)
        self.hints = Hints(cap)
        self.denied = Denied(DENIED_RESCAN_S)
        self.dispatch = Dispatcher(
            client,
            sink,
            replace(opts, folders=folders),
            lost=lost_work_for(client, opts.resend_s),
            on_progress=on_progress,
            # a new file took a finished one's name: it is new work
            on_replaced=lambda path: self.hints.put(EventKind.CREATED, path),
            denied=self.denied,
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
        self._observer: Source | None = None
        self._home: tuple[int, int] | None = None  # the inbox folder watched; None: none now
        self._next_home = 0.0
        self._refused: BrokerRefused | None = None

    def run(self) -> Progress:
        """Watch until ``stop`` is set (or, with drain, until the inbox is done); finish the rows
        in hand for up to ``grace_s``. Returns the counts; ``abandoned`` > 0 if it gave up on some."""
        self.inbox.mkdir(parents=True, exist_ok=True)
        # A broker that is down at start: one warning, now; one that refuses the password: exit 2
        # (before the events and the collector start, which would meet the same refusal).
        self._broker_ok(time.monotonic())
        self._home = self.dispatch.home = folder_id(self.inbox)
        self._watch()  # before the collector starts: nothing to undo if this fails
        finished = threading.Event()  # tells the collector that no more results are expected
        collector = threading.Thread(
            target=self._collect, args=(finished,), name="mnistq-results", daemon=True
        )
        collector.start()
        mode = "polling" if self.opts.polling else "events"
        log.info("watching %s (%s)%s", self.inbox, mode, ", drain" if self.opts.drain else "")
        try:
            self._loop()
        finally:
            observer = self._observer
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
            self._observer = None
        return self.dispatch.progress()

    def _loop(self) -> None:
        intake, dispatch, hints = self.intake, self.dispatch, self.hints
        last_log = time.monotonic()
        last_counts = (0, 0, 0, 0)
        while not self.stop.is_set():
            if self._refused is not None:  # the collector met a refused password
                raise self._refused
            wait = EVENT_WAIT_S if intake.settling else IDLE_WAIT_S
            got, overflow = hints.take(wait, limit=intake.room)
            if got:
                intake.on_events(got, time.monotonic())
            if overflow:
                intake.request_rescan()
            now = time.monotonic()
            if intake.scan_due(now):
                walk = (
                    None
                    if intake.scanning
                    else scan(self.inbox, self.skip, known=self._known, denied=self.denied)
                )
                intake.scan(walk, now, time.time(), dispatch.already_done)
            # While the broker is away the files wait in the inbox, not in a failing send.
            ready = intake.tick(now, limit=dispatch.room()) if self._broker_ok(now) else []
            if ready and (unsent := dispatch.send(ready)):
                intake.put_back(unsent)
                self.stop.wait(1)  # the broker failed: give it a moment
            intake.put_back(dispatch.tick())  # rows the disk refused; lost messages' files
            if now >= self._next_home:
                self._next_home = now + HOME_LOOK_S
                self._look_home()
            if self.denied.rescan_due(now):  # a permission may be back: its files get their rows
                intake.request_rescan()
            if now - last_log >= LOG_EVERY_S:
                last_log = now
                p = dispatch.progress()
                # idle: no line every 10 s saying that nothing happened
                if (counts := (p.sent, p.done, p.failed, p.in_flight)) != last_counts:
                    last_counts = counts
                    # a rate only once a second of work was timed: a few files' is their latency
                    rate = "" if p.rate is None else f", {p.rate:.0f} images/s"
                    log.info(
                        "sent %d, done %d, failed %d, in flight %d%s",
                        p.sent, p.done, p.failed, p.in_flight, rate,
                    )  # fmt: skip
            if self.opts.drain and intake.idle and dispatch.idle:
                return

    def _watch(self) -> None:
        """Start the event source on the inbox folder there now (not with --drain)."""
        if self.opts.drain:
            return
        try:
            self._observer = source_for(
                self.inbox, self.hints, self.opts.polling, self.skip, self.dispatch.is_busy
            )
            self._observer.start()
        except OSError as e:  # inotify's limits (ENOSPC: max_user_watches, EMFILE: instances)
            self._observer = None
            raise ConfigError(
                f"cannot watch {self.inbox} for events: {e.strerror}; raise "
                "fs.inotify.max_user_watches / max_user_instances, or use --polling"
            ) from None

    def _look_home(self) -> None:
        """The inbox removed, renamed or replaced: one warning; the old folder's events and lock
        given up (its files are not inbox work now); a new folder there locked and watched at
        once, and read. The lock beside the inbox holds throughout (producer/lock.py)."""
        try:
            now = folder_id(self.inbox)
        except OSError:
            return  # cannot tell (its parent unreadable): as it was
        if now == self._home:
            return
        if self._home is not None:
            if self._observer is not None:  # its events name the old folder's files by our path
                self._observer.stop()
                self._observer.join(timeout=5)
                self._observer = None
            log.warning(
                "the inbox %s was removed or renamed: the files it held are no longer taken, and "
                "get no row; %s",
                self.inbox,
                "watching the new folder there" if now else "waiting for a folder there",
            )
        elif now is not None:
            log.info("the inbox %s is there again: watching it", self.inbox)
        self._home = self.dispatch.home = now
        relock_inbox(self.inbox, present=now is not None)  # ConfigError: another producer has it
        if now is not None:
            self._watch()
            self.intake.restart()

    def _known(self, path: str) -> bool:
        return self.intake.tracks(path) or self.dispatch.is_busy(path)

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
        outage.back()
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
            except BrokerRefused as e:  # the loop stops on it, with exit 2
                self._refused = e
                return
            except Exception:  # a bug: the collector must live on; lost answers are resent
                log.exception("receiving results failed; retrying")
                finished.wait(1)
                continue
            outage.back()
            for reply in replies:  # one reply's failure never drops the others
                try:
                    self.dispatch.on_reply(reply)
                except Exception:  # the loop's edge: its files are sent again later
                    log.exception("handling the results of task %s failed", reply.task_id)
            if replies:
                self.hints.wake()  # room for more files: the loop sends them now, not at its next look

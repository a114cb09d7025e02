"""`mnistq watch`'s loop: watchdog events -> intake -> dispatch, and a result-collector thread.

The inbox itself is the backlog. Events are hints: the intake (producer/intake.py) decides when
a file is complete, the dispatcher (producer/dispatch.py) sends it, writes its row and moves it.
Only files in flight (at most ``max_inflight``) and a bounded set of candidates are held; the
folder is rescanned when hints had to be dropped (a flood, an inotify overflow) and every
``rescan_s`` as a safety net.

On Linux the events come from inotify read directly (:class:`InotifyHints`): one thread reads
the kernel's buffer, turns each event into a hint with a few dict lookups, and hands the loop
each buffer's hints as one list. watchdog's observer (kept for ``--polling`` and other systems)
costs ~35 us of Python per event in three threads, and every file brings five events (the
move, the worker's open and close, our link and removal): 177 of the producer's 369 us of CPU
per image in a burst, on the cores the workers need; read here, with no event asked for that
means nothing (link, removal), it is ~20 us per image (docs/profile.md).
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import logging
import os
import select
import struct
import sys
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
from producer.finish import review_dir_for
from producer.inbox import scan, wanted
from producer.intake import EventKind, Intake

log = logging.getLogger("mnistq.producer")

#: How long the loop waits for hints while candidates settle (their checks are due in time);
#: hints, answers and stops wake it at once, so this bounds no file's delay.
EVENT_WAIT_S = 0.02
#: ... and while nothing settles: only the periodic looks (lost work, retries, rescans, the
#: broker) wait on it, and they run every 0.5 s or less often.
IDLE_WAIT_S = 0.1
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


class Source(Protocol):
    """Where the hints come from: InotifyHints, or a watchdog observer."""

    def start(self) -> None: ...

    def stop(self) -> None: ...

    def join(self, timeout: float | None = None) -> None: ...


def _source(
    inbox: Path, hints: Hints, polling: bool, skip: Sequence[Path], busy: Callable[[str], bool]
) -> Source:
    if not polling and _libc is not None and sys.platform.startswith("linux"):
        # Renames into the inbox are moves with no source, not creates: that, not a timing
        # guess, tells a file moved in whole from one still being written.
        return InotifyHints(inbox, hints, skip, busy)
    # --polling; or not Linux: no opens or closes either, so every new file settles
    observer: BaseObserver = PollingObserver(timeout=0.5) if polling else Observer()
    observer.schedule(WatchdogHints(hints), str(inbox), recursive=True)
    return observer


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

    def take(self, timeout: float) -> tuple[list[tuple[EventKind, str]], bool]:
        """The waiting hints, oldest first, after waiting up to ``timeout`` for any; and whether
        some were dropped since the last take."""
        with self._cond:
            if not (self._items or self._woken or self.overflow):
                self._cond.wait(timeout)
            items, self._items = self._items, []
            overflow, self.overflow, self._woken = self.overflow, False, False
            return items, overflow


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


# inotify(7)'s constants (linux/inotify.h)
_IN_MODIFY, _IN_CLOSE_WRITE, _IN_CLOSE_NOWRITE, _IN_OPEN = 0x2, 0x8, 0x10, 0x20
_IN_MOVED_FROM, _IN_MOVED_TO, _IN_CREATE = 0x40, 0x80, 0x100
_IN_Q_OVERFLOW, _IN_IGNORED, _IN_ISDIR = 0x4000, 0x8000, 0x40000000
_IN_ONLYDIR, _IN_DONT_FOLLOW, _IN_EXCL_UNLINK = 0x01000000, 0x02000000, 0x04000000
#: What a watch asks for: arrivals (moves in, creates), writers (open, modify, close) and moves
#: out (of folders, whose watches go with them). Not IN_ATTRIB nor IN_DELETE: our own link into
#: done/ and removal from the inbox would be two more events per file, and mean nothing.
_MASK = (
    _IN_MOVED_TO | _IN_MOVED_FROM | _IN_CREATE | _IN_OPEN | _IN_MODIFY | _IN_CLOSE_WRITE
    | _IN_CLOSE_NOWRITE | _IN_ONLYDIR | _IN_DONT_FOLLOW | _IN_EXCL_UNLINK
)  # fmt: skip
#: A file's event -> its hint (a moved-in file is complete; the others feed the intake's rules).
_FILE_KINDS = {
    _IN_MOVED_TO: EventKind.MOVED_IN,
    _IN_CREATE: EventKind.CREATED,
    _IN_OPEN: EventKind.OPENED,
    _IN_MODIFY: EventKind.MODIFIED,
    _IN_CLOSE_WRITE: EventKind.CLOSED_WRITE,
    _IN_CLOSE_NOWRITE: EventKind.CLOSED_NO_WRITE,
}
_EVENT = struct.Struct("iIII")  # struct inotify_event: wd, mask, cookie, len; then the name


def _libc_inotify() -> ctypes.CDLL | None:
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.inotify_init1.argtypes = [ctypes.c_int]
        libc.inotify_add_watch.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_uint32]
        libc.inotify_rm_watch.argtypes = [ctypes.c_int, ctypes.c_int]
    except (OSError, AttributeError):
        return None
    return libc


_libc = _libc_inotify() if hasattr(select, "poll") else None


class InotifyHints:
    """inotify(7) read directly, on one thread: every event under the inbox becomes a hint.

    Watches follow the tree: a folder created or moved in is watched (before it is listed, so
    nothing written into it is missed) and what it holds is reported as created; a folder moved
    away takes its watches with it. The folders in ``skip`` (done/ and failed/ when inside the
    inbox) are not watched. Events for paths ``busy`` (in flight: a worker reading the file)
    are dropped here. A kernel queue overflow asks for a rescan.
    """

    def __init__(self, root: Path, hints: Hints, skip: Sequence[Path], busy: Callable[[str], bool]) -> None:
        if _libc is None:
            raise OSError(errno.ENOSYS, "inotify is not available")
        self.root, self.hints, self.busy = str(root), hints, busy
        self.skip = tuple(str(s) for s in skip)
        self._skip_under = tuple(s.rstrip("/") + "/" for s in self.skip)
        self._folders: dict[int, str] = {}  # watch descriptor -> folder
        self._wds: dict[str, int] = {}  # folder -> watch descriptor
        self._warned = False
        fd = _libc.inotify_init1(os.O_CLOEXEC | os.O_NONBLOCK)
        if fd < 0:
            e = ctypes.get_errno()
            raise OSError(e, os.strerror(e))
        self._fd = fd
        self._stop_r, self._stop_w = os.pipe()
        self._thread = threading.Thread(target=self._run, name="mnistq-events", daemon=True)

    def start(self) -> None:
        """Watch the tree (OSError when the inbox itself cannot be), then read its events."""
        try:
            self._watch_tree(self.root, None)
        except OSError:
            self._close()
            raise
        self._thread.start()

    def stop(self) -> None:
        os.write(self._stop_w, b"x")

    def join(self, timeout: float | None = None) -> None:
        self._thread.join(timeout)
        if not self._thread.is_alive():
            self._close()

    def _close(self) -> None:
        for fd in (self._fd, self._stop_r, self._stop_w):
            with contextlib.suppress(OSError):
                os.close(fd)
        self._fd = self._stop_r = self._stop_w = -1

    # -- watches ------------------------------------------------------------------------
    def _skipped(self, folder: str) -> bool:
        return folder in self.skip or folder.startswith(self._skip_under)

    def _add(self, folder: str) -> bool:
        assert _libc is not None
        wd = _libc.inotify_add_watch(self._fd, os.fsencode(folder), _MASK)
        if wd < 0:
            e = ctypes.get_errno()
            if folder == self.root:
                raise OSError(e, os.strerror(e), folder)
            if e in (errno.ENOSPC, errno.ENOMEM) and not self._warned:
                self._warned = True  # its files are still found by the periodic rescans
                log.warning(
                    "cannot watch %s for events (%s); it is rescanned instead", folder, os.strerror(e)
                )
            return False
        old = self._folders.get(wd)  # the same folder under another name: it was moved
        if old is not None and old != folder:
            self._wds.pop(old, None)
        self._folders[wd], self._wds[folder] = folder, wd
        return True

    def _watch_tree(self, top: str, found: list[tuple[EventKind, str]] | None) -> None:
        """Watch ``top`` and every folder below it, each before it is listed; with ``found``,
        add a CREATED hint for each wanted name in them."""
        stack, dropped = [top], False
        while stack:
            folder = stack.pop()
            if self._skipped(folder) or not self._add(folder):
                continue
            try:
                with os.scandir(folder) as entries:
                    for entry in entries:
                        try:
                            if entry.is_dir(follow_symlinks=False):
                                stack.append(entry.path)
                        except OSError:
                            continue
                        if found is None or not wanted(entry.name):
                            continue
                        if len(found) < self.hints.cap:
                            found.append((EventKind.CREATED, entry.path))
                        else:
                            dropped = True  # a folder of a flood moved in: a rescan finds them
            except OSError:
                continue
        if dropped:
            self.hints.overflowed()

    def _unwatch_tree(self, top: str) -> None:
        assert _libc is not None
        under = top + "/"
        for folder in [f for f in self._wds if f == top or f.startswith(under)]:
            wd = self._wds.pop(folder)
            self._folders.pop(wd, None)
            _libc.inotify_rm_watch(self._fd, wd)

    # -- events -------------------------------------------------------------------------
    def _run(self) -> None:
        poller = select.poll()
        poller.register(self._fd, select.POLLIN)
        poller.register(self._stop_r, select.POLLIN)
        while True:
            try:
                ready = poller.poll()
                if any(fd == self._stop_r for fd, _ in ready):
                    return
                buf = os.read(self._fd, 1 << 16)
            except (BlockingIOError, InterruptedError):
                continue
            except OSError as e:  # the descriptor is unusable: the periodic rescans go on
                log.warning("reading inotify events failed (%s); rescanning instead", e)
                return
            try:
                self._handle(buf)
            except Exception:  # the thread's edge: a bug must not stop the events for good
                log.exception("handling inotify events failed; rescanning")
                self.hints.overflowed()

    def _handle(self, buf: bytes) -> None:
        out: list[tuple[EventKind, str]] = []
        folders, busy, kinds, unpack = self._folders, self.busy, _FILE_KINDS, _EVENT.unpack_from
        at, end = 0, len(buf)
        while at < end:
            wd, mask, _cookie, size = unpack(buf, at)
            raw = buf[at + 16 : at + 16 + size].rstrip(b"\0")
            at += 16 + size
            folder = folders.get(wd)
            if folder is None or not raw:
                if mask & _IN_Q_OVERFLOW:
                    log.warning("the kernel dropped inotify events (queue overflow); rescanning")
                    self._watch_tree(self.root, None)  # folders made meanwhile
                    self.hints.overflowed()
                elif mask & _IN_IGNORED and folder is not None:
                    del folders[wd]
                    if self._wds.get(folder) == wd:
                        del self._wds[folder]
                continue
            name = os.fsdecode(raw)
            path = folder + "/" + name
            if mask & _IN_ISDIR:
                if mask & _IN_MOVED_FROM:
                    self._unwatch_tree(path)  # moved away, or renamed (then moved in below)
                elif mask & (_IN_CREATE | _IN_MOVED_TO) and not self._skipped(path):
                    if wanted(name):  # a folder named like an image gets its error row
                        out.append((EventKind.MOVED_IN if mask & _IN_MOVED_TO else EventKind.CREATED, path))
                    self._watch_tree(path, out)
                continue
            kind = kinds.get(mask & 0xFFF)
            if kind is None or busy(path) or not wanted(name):
                continue
            out.append((kind, path))
        if out:
            self.hints.put_many(out)


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
        done = opts.done_dir.resolve()
        # review/ (beside done/) too: a file put there must never come back as new work
        self.skip = (done, opts.failed_dir.resolve(), review_dir_for(done))
        # Candidates, ready files and waiting hints, each: past that the inbox keeps the files
        # and a rescan finds them. A burst of 10,000 fits without one (a rescan walks the whole
        # inbox); a path held costs ~200 bytes, so ~1 MB each.
        cap = max(4096, 4 * opts.message_size)
        self.hints = Hints(cap)
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
        observer: Source | None = None
        if not self.opts.drain:  # before the collector starts: nothing to undo if this fails
            try:
                observer = _source(
                    self.inbox, self.hints, self.opts.polling, self.skip, self.dispatch.is_busy
                )
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
        intake, dispatch, hints = self.intake, self.dispatch, self.hints
        last_log = time.monotonic()
        last_counts = (0, 0, 0, 0)
        while not self.stop.is_set():
            got, overflow = hints.take(EVENT_WAIT_S if intake.settling else IDLE_WAIT_S)
            if got:
                intake.on_events(got, time.monotonic())
            if overflow:
                intake.request_rescan()
            now = time.monotonic()
            if intake.scan_due(now):
                found = scan(self.inbox, self.skip, known=self._known)
                intake.scan(found, now, time.time(), dispatch.already_done)
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
            if replies:
                self.hints.wake()  # room for more files: the loop sends them now, not at its next look

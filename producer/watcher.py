"""`mnistq watch`: inbox events -> batched messages -> result rows, with bounded memory.

The inbox itself is the backlog. Events are hints; the producer only keeps the files it has in
flight (at most ``max_inflight``) and a bounded set of candidates, and rescans the folder when
it had to drop hints (a flood, an inotify overflow) or every ``rescan_s`` as a safety net.

A file is read only when complete: moved in (inotify reports a create with no open), or closed
after writing; the polling observer, which sees neither, waits until size and mtime settle.
"""

from __future__ import annotations

import contextlib
import logging
import os
import queue
import threading
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tqdm import tqdm
from watchdog.observers import Observer
from watchdog.observers.polling import PollingObserver

from producer.client import Client
from producer.csvsink import CsvSink
from producer.inbox import Hints, file_id, move_out, scan

log = logging.getLogger("mnistq.producer")
MOVED_IN_GRACE = 0.01  # inotify puts a writer's open right after its create; a mv has none


@dataclass
class Options:
    inbox: Path
    done_dir: Path
    failed_dir: Path
    polling: bool = False
    keep: bool = False
    batch_size: int = 256
    batch_wait_ms: int = 5
    max_inflight: int = 4096
    settle_s: float = 1.0
    rescan_s: float = 30.0
    resend_s: float = 300.0


class Watcher:
    def __init__(
        self, client: Client, sink: CsvSink, opts: Options, stop: threading.Event | None = None
    ) -> None:
        self.client, self.sink, self.opts = client, sink, opts
        self.inbox = opts.inbox.resolve()
        self.skip = (opts.done_dir.resolve(), opts.failed_dir.resolve())
        cap = 4 * opts.batch_size
        self.hints: queue.Queue[tuple[str, str]] = queue.Queue(maxsize=max(1024, cap))
        self.rescan = threading.Event()
        self.stop = stop or threading.Event()
        self.finished = threading.Event()  # tells the collector that no more results are expected
        self.fresh: dict[str, tuple[float, tuple[int, int] | None]] = {}  # path -> (seen, stat key)
        self.writing: dict[str, bool] = {}  # path -> modified since open
        self.ready: deque[str] = deque()
        self.cap = cap
        self.lock = threading.Lock()
        self.inflight: dict[str, tuple[str, float]] = {}  # id -> (path, sent at)
        self.inflight_paths: set[str] = set()
        self.queued = self.done = self.failed = 0
        self.started = time.monotonic()
        self.bar = tqdm(total=0, unit="img", desc="results", disable=None, dynamic_ncols=True)

    # -- intake -------------------------------------------------------------------------
    def _hint(self, kind: str, path: str) -> None:
        log.debug("event %s %s", kind, path)
        if path in self.inflight_paths or any(Path(path).is_relative_to(s) for s in self.skip):
            return
        now = time.monotonic()
        if kind == "new" or self.opts.polling:  # polling sees no opens or closes: wait for it to settle
            if len(self.fresh) >= self.cap and path not in self.fresh:
                self.rescan.set()  # a flood: the folder keeps the files until there is room
                return
            self.fresh[path] = (now, None)
        elif kind == "open":
            self.fresh.pop(path, None)
            self.writing.setdefault(path, False)
        elif kind == "write":
            self.fresh.pop(path, None)
            self.writing[path] = True
        elif kind == "closed" or (kind == "closed_nw" and self.writing.get(path) is False):
            self.writing.pop(path, None)
            self._make_ready(path)

    def _make_ready(self, path: str) -> None:
        if path in self.inflight_paths or path in self.ready:
            return
        if len(self.ready) >= self.cap:
            self.rescan.set()  # no room: leave it in the folder and come back for it
            return
        self.ready.append(path)

    def _settle(self) -> None:
        """Fresh files become ready after the grace (inotify) or once size and mtime stop changing."""
        now = time.monotonic()
        for path, (seen, key) in list(self.fresh.items()):
            if not self.opts.polling and key is None:  # an event told us how it arrived
                if now - seen >= MOVED_IN_GRACE:
                    del self.fresh[path]
                    self._make_ready(path)
                continue
            try:
                st = os.stat(path)
            except OSError:
                del self.fresh[path]
                continue
            new_key = (st.st_size, st.st_mtime_ns)
            if new_key != key:
                self.fresh[path] = (now, new_key)
            elif now - seen >= self.opts.settle_s:
                del self.fresh[path]
                self._make_ready(path)

    def _scan(self) -> None:
        self.rescan.clear()
        now = time.time()
        for path, st in scan(self.inbox, self.skip):
            if (
                path in self.inflight_paths
                or path in self.fresh
                or path in self.writing
                or path in self.ready
            ):
                continue
            fid = file_id(path, st)
            if fid in self.sink.done:  # its row exists: a previous run stopped before moving it
                if not self.opts.keep:
                    self._move(path, fid, failed=False)
                continue
            if now - st.st_mtime < self.opts.settle_s:
                self.fresh[path] = (time.monotonic(), (st.st_size, st.st_mtime_ns))
            elif len(self.ready) < self.cap:
                self.ready.append(path)
            else:
                self.rescan.set()
                return

    # -- sending ------------------------------------------------------------------------
    def _send_ready(self) -> None:
        while self.ready and len(self.inflight) < self.opts.max_inflight:
            room = self.opts.max_inflight - len(self.inflight)
            paths: list[str] = []
            ids: list[str] = []
            while self.ready and len(paths) < min(self.opts.batch_size, room):
                path = self.ready.popleft()
                try:
                    fid = file_id(path, os.stat(path))
                except OSError:
                    continue  # gone before we got to it
                if fid in self.sink.done:
                    continue
                paths.append(path)
                ids.append(fid)
            if not paths:
                continue
            # In flight before it is sent: a reply can come back before send() returns.
            with self.lock:
                now = time.monotonic()
                for path, fid in zip(paths, ids, strict=True):
                    self.inflight[fid] = (path, now)
                    self.inflight_paths.add(path)
            try:
                task_id = self.client.send(paths, ids)
            except Exception:  # the loop's edge: a broker hiccup; the files wait and are sent again
                log.exception("sending %d files failed; retrying in a second", len(paths))
                with self.lock:
                    for path, fid in zip(paths, ids, strict=True):
                        self.inflight.pop(fid, None)
                        self.inflight_paths.discard(path)
                self.ready.extendleft(reversed(paths))
                time.sleep(1)
                return
            self.queued += len(paths)
            log.debug("sent %d files as task %s", len(paths), task_id)
            self.bar.total = self.queued
            self.bar.refresh()

    def _resend_stale(self) -> None:
        """A message lost with its broker (no persistence) would leave files waiting forever."""
        now = time.monotonic()
        with self.lock:
            stale = [(fid, p) for fid, (p, t) in self.inflight.items() if now - t > self.opts.resend_s]
            for fid, path in stale:
                del self.inflight[fid]
                self.inflight_paths.discard(path)
        for _, path in stale:
            log.warning("no result for %s after %.0fs; sending it again", path, self.opts.resend_s)
            self._make_ready(path)

    # -- results ------------------------------------------------------------------------
    def _move(self, path: str, fid: str, failed: bool) -> None:
        try:
            move_out(path, self.inbox, self.opts.failed_dir if failed else self.opts.done_dir, fid)
        except OSError as e:
            log.warning("could not move %s out of the inbox: %s", path, e)

    def _on_results(self, results: list[dict[str, Any]]) -> None:
        for r in results:
            fid, path = r.get("id"), r["path"]
            failed = r.get("error") is not None
            replaced = False
            if self.sink.write(r):  # False: a redelivered task's second answer, already written
                log.debug("row written for %s", path)
                self.done += 1
                self.failed += failed
                if failed:
                    log.info("failed: %s: %s", path, r.get("error"))
                if fid:
                    replaced = self._finish(path, fid, failed)
            # Only now, with its row written and the file moved, is it no longer in flight.
            with self.lock:
                entry = self.inflight.pop(fid, None) if fid else None
                if entry:
                    self.inflight_paths.discard(entry[0])
            if replaced:  # a new file was dropped under this name meanwhile: it is new work
                with contextlib.suppress(queue.Full):
                    self.hints.put_nowait(("new", path))
        self.bar.n = self.done
        self.bar.set_postfix(failed=self.failed, refresh=False)
        self.bar.refresh()

    def _finish(self, path: str, fid: str, failed: bool) -> bool:
        """Move the file whose row was written out of the inbox; True if another took its name."""
        try:
            same = file_id(path, os.stat(path, follow_symlinks=False)) == fid
        except OSError:
            return False  # gone already
        if same and not self.opts.keep:
            self._move(path, fid, failed)
        return not same

    def _collect(self) -> None:
        while not self.finished.is_set():
            try:
                for _task_id, results in self.client.receive(0.2):
                    self._on_results(results)
            except Exception:  # the loop's edge: a broker hiccup must not kill the collector
                log.exception("receiving results failed; retrying")
                time.sleep(1)

    def stats(self) -> dict[str, float]:
        elapsed = time.monotonic() - self.started
        return {
            "queued": self.queued,
            "done": self.done,
            "failed": self.failed,
            "images_per_s": self.done / max(elapsed, 1e-9),
        }

    # -- main loop ----------------------------------------------------------------------
    def run(self, drain: bool = False, grace_s: float = 60.0) -> dict[str, float]:
        """Watch until ``stop`` is set (or, with drain, until the inbox is empty); finish rows in hand."""
        self.opts.inbox.mkdir(parents=True, exist_ok=True)
        collector = threading.Thread(target=self._collect, name="mnistq-results", daemon=True)
        collector.start()
        observer = None
        if not drain:
            observer = PollingObserver(timeout=0.5) if self.opts.polling else Observer()
            observer.schedule(Hints(self.hints, self.rescan), str(self.inbox), recursive=True)
            observer.start()
        log.info(
            "watching %s (%s)%s",
            self.inbox,
            "polling" if self.opts.polling else "events",
            ", drain" if drain else "",
        )
        self._scan()
        last_scan = last_log = time.monotonic()
        try:
            while not self.stop.is_set():
                try:
                    kind, path = self.hints.get(timeout=self.opts.batch_wait_ms / 1000)
                    self._hint(kind, path)
                    while True:
                        self._hint(*self.hints.get_nowait())
                except queue.Empty:
                    pass
                self._settle()
                now = time.monotonic()
                if (
                    self.rescan.is_set() and len(self.ready) < self.cap // 2
                ) or now - last_scan > self.opts.rescan_s:
                    self._scan()
                    last_scan = now
                self._send_ready()
                if now - last_log > 10:
                    self._resend_stale()
                    s = self.stats()
                    log.info(
                        "queued %d, done %d, failed %d, %.0f images/s",
                        s["queued"],
                        s["done"],
                        s["failed"],
                        s["images_per_s"],
                    )
                    last_log = now
                if drain and not (
                    self.ready or self.fresh or self.writing or self.inflight or self.rescan.is_set()
                ):
                    break
        finally:
            if observer is not None:
                observer.stop()
            deadline = time.monotonic() + grace_s
            while self.inflight and time.monotonic() < deadline:
                time.sleep(0.05)
            if self.inflight:
                log.warning(
                    "stopping with %d results outstanding; they are redone on the next start",
                    len(self.inflight),
                )
                self.inflight.clear()
            self.finished.set()
            collector.join()  # it returns within one receive; the sink must outlive its writes
            if observer is not None:
                observer.join(timeout=5)
            self.bar.close()
        return self.stats()

"""`mnistq run`, the main job: an embedded Redis, N workers and the inbox watcher in one command.

SIGINT (a terminal's Ctrl-C) and SIGTERM mean the same: the first stops intake, the watcher
finishes the rows in hand, then the workers stop and the embedded Redis last; exit 0, since
files not yet taken are simply the next start's backlog. A second one stops everything at once
and exits 130. The children never see the terminal's SIGINT (see app/supervisor.py).

A failure stops the run too: a worker that cannot start (exit 2 or 3, that code), or rows in
hand that never come. If work in flight is left undone then, it says so and exits 4
(ExitCode.ABANDONED); those files stay in the inbox for the next start. A broker that is down
is waited for, not a failure. While it runs, the embedded Redis's URL is recorded beside the
CSV (see Settings), so `mnistq status` and the Python API started there find it.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import threading
import time
from pathlib import Path
from types import FrameType
from typing import Any

from app.runstate import remove_run_state, write_run_state
from app.supervisor import Supervisor
from mnistq.errors import MnistqError
from mnistq.folders import Folders
from mnistq.protocol import EXTENSIONS, ExitCode
from mnistq.settings import RUN_STATE_NAME, Settings, cores
from mnistq.tuning import FAILURE_GRACE_S

log = logging.getLogger("mnistq.run")
LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")


#: Worker processes per core at most: each holds its model and ~0.8 GB; more only share the
#: same cores (a typo such as 100000 would start processes until the machine gave out).
MAX_WORKERS_PER_CORE = 4


def _workers(raw: str) -> int:
    try:
        n = int(raw)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, not {raw!r}") from None
    if n < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, not {n}")
    most = MAX_WORKERS_PER_CORE * cores()
    if n > most:
        raise argparse.ArgumentTypeError(
            f"at most {most} here ({MAX_WORKERS_PER_CORE} per core, {cores()} cores), not {n}"
        )
    return n


def run_parser(settings: Settings) -> argparse.ArgumentParser:
    # Imported here, under run_main's signal counting: the producer's imports take a while.
    from app.watch import watch_parser

    p = watch_parser("mnistq run", settings)
    p.description = (
        "The main job: an embedded Redis (unless REDIS_URL is set), N workers and the inbox watcher. "
        "Ctrl-C or SIGTERM finishes the rows in hand and stops; a second one stops at once. While it "
        "runs, `mnistq status`, `mnistq classify` and api.Client() started beside its CSV find its "
        f"Redis without REDIS_URL (it is recorded in {RUN_STATE_NAME} there). Its workers read the inbox "
        "and the folders in MNISTQ_ALLOWED_ROOTS (the Python API's files, kept out of the inbox)."
    )
    # Separate processes overlap decoding (Python, one core each) with inference better than
    # threads in one process do: on 2 cores, 2 processes x 2 threads gave 1.17-1.19x 1 x 2 threads.
    p.add_argument(
        "--workers",
        type=_workers,
        default=min(cores(), 4),
        help="worker processes, each with 2 x cores/N torch threads, at most cores (default here: %(default)s)",
    )
    p.add_argument(
        "--worker-loglevel", default="WARNING", type=str.upper, choices=LEVELS, help="default: %(default)s"
    )
    p.add_argument(
        "--report",
        action="store_true",
        help="when the run ends, write report.html beside the CSV (see `mnistq report`)",
    )
    return p  # a mistake is one line and exit 2, as for every option of watch_parser's


class _StopNow(Exception):
    """A second SIGINT or SIGTERM."""


class _Signals:
    """Counts SIGINT and SIGTERM while in use; the previous handlers come back after."""

    def __init__(self) -> None:
        self.count = 0
        self._previous: dict[int, Any] = {}

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        # Only a counter: the main thread may be inside a lock or a write when this runs.
        self.count += 1

    def __enter__(self) -> _Signals:
        self._previous = {s: signal.signal(s, self._on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
        return self

    def __exit__(self, *_: object) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


class _Run:
    def __init__(self, args: argparse.Namespace, settings: Settings, signals: _Signals) -> None:
        self.args, self.settings, self.signals = args, settings, signals
        self.folders = Folders.of(args.inbox, args.csv, args.done_dir, args.failed_dir)
        self.stop = threading.Event()
        self.supervisor = Supervisor(settings, args.workers, args.worker_loglevel)
        self.thread: threading.Thread | None = None
        self.state: Path | None = None  # the state file naming our embedded Redis, while it runs
        self.code: int | None = None
        self.error: BaseException | None = None  # the watcher's

    def _poll(self) -> None:
        """Act on signals; called from the main thread's waits."""
        if self.signals.count >= 2:
            raise _StopNow
        if self.signals.count and not self.stop.is_set():
            self.stop.set()
            print(
                "mnistq run: stopping: finishing the rows in hand (again to stop at once)",
                file=sys.stderr,
                flush=True,
            )

    def _watch(self, redis_url: str) -> None:
        from app.watch import watch

        try:
            self.code = watch(self.args, redis_url, self.settings, self.stop)
        except BaseException as e:  # handed to the main thread, which reports it
            self.error = e

    def _say_when_ready(self, url: str) -> None:
        """One line when the first worker answers with its model loaded. "watching" comes first,
        while the workers still load their model: files dropped before this line wait for them."""
        from mnistq.celeryconf import make_app

        app = make_app(self.settings.with_(redis_url=url))
        try:
            while not self.stop.is_set():
                try:  # what `mnistq status` asks; a worker answers once its model is loaded
                    replies = app.control.broadcast("mnistq_model", reply=True, timeout=1.0, limit=1)
                except Exception as e:  # the loop's edge: Redis restarting; ask again
                    log.debug("asking the workers for their model: %s", e)
                    replies = []
                for name, info in (item for reply in replies or () for item in reply.items()):
                    if isinstance(info, dict) and info.get("version"):
                        log.info(
                            "ready: worker %s serves model %s; files in %s are classified now",
                            name.split("@", 1)[0], info["version"], self.folders.resolved().inbox,
                        )  # fmt: skip
                        return
                self.stop.wait(0.5)
        finally:
            app.close()

    def _wait_watcher(self, supervise: bool, timeout: float | None = None) -> None:
        deadline = None if timeout is None else time.monotonic() + timeout
        while self.thread is not None and self.thread.is_alive():
            self.thread.join(0.2)
            self._poll()
            if supervise:
                self.supervisor.check()
            if deadline is not None and time.monotonic() > deadline:
                return

    def main(self) -> int:
        try:
            return self._main()
        except _StopNow:
            return self._stop_now()
        except BaseException:
            self.supervisor.kill()
            raise
        finally:
            self._forget_state()

    def _forget_state(self) -> None:
        if self.state is not None:
            remove_run_state(self.state)
            self.state = None

    def _main(self) -> int:
        self._poll()
        if self.stop.is_set():  # stopped while starting up: nothing was started
            return ExitCode.OK
        # A mistake in --inbox or --csv, or another producer on either: one line, and no child
        # started (the locks taken stay held for the watcher).
        from app.watch import check_inbox_and_paths

        check_inbox_and_paths(self.folders)
        failure: MnistqError | None = None
        try:
            url = self.supervisor.start()
            if self.supervisor.redis is not None:  # a URL nobody else knows: say where it is
                self.state = write_run_state(self.args.csv, url)
            self._poll()
            self.thread = threading.Thread(target=self._watch, args=(url,), name="mnistq-watch", daemon=True)
            self.thread.start()
            threading.Thread(
                target=self._say_when_ready, args=(url,), name="mnistq-ready", daemon=True
            ).start()
            # Until the watcher returns (drained, or stopped and the rows in hand finished),
            # dead workers and a dead Redis are restarted: those rows need them.
            self._wait_watcher(supervise=True)
        except MnistqError as e:
            failure = e
        self.stop.set()
        if failure is not None:
            self._wait_watcher(supervise=False, timeout=FAILURE_GRACE_S)
        # Still waiting for the rows of files in flight, which will not come now.
        stuck = self.thread is not None and self.thread.is_alive()
        if stuck:
            logging.disable(logging.CRITICAL)  # its retries against a stopped Redis are noise now
        self._forget_state()
        self.supervisor.stop(abort=lambda: self.signals.count >= 2)
        self._poll()
        if failure is not None and not stuck:
            raise failure  # nothing was in flight: the failure's own code
        if self.error is not None:
            raise self.error
        if failure is not None:
            print(f"mnistq run: error: {failure}", file=sys.stderr)
            return self._abandoned("stopped by that failure")
        if self.code == ExitCode.ABANDONED:
            return self._abandoned("files in flight got no result within the grace")
        return self.code if self.code is not None else ExitCode.UNEXPECTED

    def _abandoned(self, why: str) -> int:
        """Work in flight left undone because of a failure: not a clean stop, so not exit 0."""
        print(
            f"mnistq run: {why}: work in flight was left undone; {files_left(self.folders)} file(s) "
            f"stay in {self.folders.resolved().inbox} and are done on the next start",
            file=sys.stderr,
            flush=True,
        )
        return ExitCode.ABANDONED

    def _stop_now(self) -> int:
        logging.disable(logging.CRITICAL)  # the watcher's complaints about a killed Redis are noise
        self.supervisor.kill()
        left = files_left(self.folders)
        print(
            f"mnistq run: stopped at once; {left} file(s) stay in {self.folders.resolved().inbox} "
            "(the next start does those without a row)",
            file=sys.stderr,
            flush=True,
        )
        return ExitCode.INTERRUPTED


def files_left(folders: Folders) -> int:
    """Image files in the inbox, not counting the done, review and failed folders if they are
    inside it."""
    folders = folders.resolved()
    skip = set(folders.outputs)
    n = 0
    for root, dirs, names in os.walk(folders.inbox):
        dirs[:] = [d for d in dirs if Path(root, d) not in skip]
        n += sum(Path(name).suffix.lower() in EXTENSIONS for name in names)
    return n


def run_main(argv: list[str]) -> int:
    # Counted from here on: a Ctrl-C while the producer's imports load is a first one, not a traceback.
    with _Signals() as signals:
        # Not another run's Redis from its state file: this run starts its own (or uses REDIS_URL).
        settings = Settings.from_env(run_state=False)
        args = run_parser(settings).parse_args(argv)
        # The workers may open files under the inbox given here, not only the configured one,
        # and under MNISTQ_ALLOWED_ROOTS besides: the Python API's files, which the watcher
        # must not take first (README, "Python API").
        settings = settings.with_(inbox=args.inbox, csv=args.csv)
        if settings.allowed_roots:
            roots = dict.fromkeys((settings.inbox.expanduser().resolve(), *settings.allowed_roots))
            settings = settings.with_(allowed_roots=tuple(roots))
        code = _Run(args, settings, signals).main()
    if args.report and code != ExitCode.INTERRUPTED:
        from report.report import write_report

        try:
            print(f"report: {write_report(Path(args.csv))}", file=sys.stderr)
        except MnistqError as e:  # the run's own outcome stays the exit code
            print(f"mnistq run: no report: {e}", file=sys.stderr)
    return code

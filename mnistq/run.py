"""`mnistq run`, the main job: an embedded Redis, N workers and the inbox watcher in one command.

SIGINT (a terminal's Ctrl-C) and SIGTERM mean the same: the first stops intake, the watcher
finishes the rows in hand, then the workers stop and the embedded Redis last; exit 0, since
files not yet taken are simply the next start's backlog. A second one stops everything at once
and exits 130. The children never see the terminal's SIGINT (see mnistq/supervisor.py).
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
from typing import Any, NoReturn

from mnistq.errors import MnistqError
from mnistq.protocol import EXTENSIONS, ExitCode
from mnistq.settings import Settings, cores
from mnistq.supervisor import Supervisor

log = logging.getLogger("mnistq.run")
LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
#: After a fatal worker failure the watcher cannot finish its rows; it gets this long to notice.
FAILURE_GRACE_S = 10.0


def _at_least_one(raw: str) -> int:
    try:
        n = int(raw)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, not {raw!r}") from None
    if n < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, not {n}")
    return n


def run_parser(settings: Settings) -> argparse.ArgumentParser:
    from producer.cli import watch_parser

    p = watch_parser("mnistq run", settings)
    p.description = (
        "The main job: an embedded Redis (unless REDIS_URL is set), N workers and the inbox watcher. "
        "Ctrl-C or SIGTERM finishes the rows in hand and stops; a second one stops at once."
    )
    # Separate processes overlap decoding (Python, one core each) with inference better than
    # threads in one process do: on 2 cores, 2 processes x 1 thread gave 1.09-1.28x 1 x 2 threads.
    p.add_argument(
        "--workers",
        type=_at_least_one,
        default=min(cores(), 4),
        help="worker processes, each with cores/N torch threads (default here: %(default)s)",
    )
    p.add_argument(
        "--worker-loglevel", default="WARNING", type=str.upper, choices=LEVELS, help="default: %(default)s"
    )

    def one_line(message: str) -> NoReturn:  # a mistake is one line, not the usage block
        sys.stderr.write(f"{p.prog}: error: {message} (see {p.prog} --help)\n")
        sys.exit(ExitCode.CONFIG)

    p.error = one_line  # type: ignore[method-assign]
    return p


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
        self.stop = threading.Event()
        self.supervisor = Supervisor(settings, args.workers, args.worker_loglevel)
        self.thread: threading.Thread | None = None
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
        from producer.cli import watch

        try:
            self.code = watch(self.args, redis_url, self.settings, self.stop)
        except BaseException as e:  # handed to the main thread, which reports it
            self.error = e

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

    def _main(self) -> int:
        self._poll()
        if self.stop.is_set():  # stopped while starting up: nothing was started
            return ExitCode.OK
        failure: MnistqError | None = None
        try:
            url = self.supervisor.start()
            self._poll()
            self.thread = threading.Thread(target=self._watch, args=(url,), name="mnistq-watch", daemon=True)
            self.thread.start()
            # Until the watcher returns (drained, or stopped and the rows in hand finished),
            # dead workers and a dead Redis are restarted: those rows need them.
            self._wait_watcher(supervise=True)
        except MnistqError as e:
            failure = e
        self.stop.set()
        if failure is not None:
            self._wait_watcher(supervise=False, timeout=FAILURE_GRACE_S)
            if self.thread is not None and self.thread.is_alive():
                logging.disable(logging.CRITICAL)  # its retries against a stopped Redis are noise now
        self.supervisor.stop(abort=lambda: self.signals.count >= 2)
        self._poll()
        if failure is not None:
            raise failure
        if self.error is not None:
            raise self.error
        return self.code if self.code is not None else ExitCode.UNEXPECTED

    def _stop_now(self) -> int:
        logging.disable(logging.CRITICAL)  # the watcher's complaints about a killed Redis are noise
        self.supervisor.kill()
        left = files_left(self.args)
        print(
            f"mnistq run: stopped at once; {left} file(s) stay in {self.args.inbox.resolve()} "
            "(the next start does those without a row)",
            file=sys.stderr,
            flush=True,
        )
        return ExitCode.INTERRUPTED


def files_left(args: argparse.Namespace) -> int:
    """Image files in the inbox, not counting the done and failed folders if they are inside it."""
    inbox = args.inbox.resolve()
    base = args.csv.resolve().parent
    skip = {Path(d).resolve() for d in (args.done_dir or base / "done", args.failed_dir or base / "failed")}
    n = 0
    for root, dirs, names in os.walk(inbox):
        dirs[:] = [d for d in dirs if Path(root, d) not in skip]
        n += sum(Path(name).suffix.lower() in EXTENSIONS for name in names)
    return n


def run_main(argv: list[str]) -> int:
    # Counted from here on: a Ctrl-C while the producer's imports load is a first one, not a traceback.
    with _Signals() as signals:
        settings = Settings.from_env()
        args = run_parser(settings).parse_args(argv)
        # The workers may open files under the inbox given here, not only the configured one.
        settings = settings.with_(inbox=args.inbox, csv=args.csv)
        return _Run(args, settings, signals).main()

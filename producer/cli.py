"""`mnistq watch` and `mnistq classify`; ``watch_parser`` and ``watch`` also serve `mnistq run`.

The human output lives here: the paths at start, the progress bar (a terminal only), the final
line, `classify`'s answers. The modules below it only log.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from types import FrameType

from tqdm import tqdm

from mnistq.protocol import ExitCode
from mnistq.settings import Settings
from producer.client import Client
from producer.csvsink import CsvSink
from producer.dispatch import Progress
from producer.watcher import Watcher, WatchOptions


def watch_parser(prog: str, settings: Settings) -> argparse.ArgumentParser:
    """The watcher's options, with defaults from ``settings``; `mnistq run` adds its own."""
    p = argparse.ArgumentParser(prog=prog)
    p.add_argument(
        "--inbox",
        type=Path,
        default=settings.inbox,
        help="folder to watch, created if missing (default: %(default)s)",
    )
    p.add_argument(
        "--csv", type=Path, default=settings.csv, help="results file, appended (default: %(default)s)"
    )
    p.add_argument(
        "--polling",
        action="store_true",
        help="poll instead of inotify (Docker bind mounts, network filesystems)",
    )
    p.add_argument(
        "--keep", action="store_true", help="leave files in the inbox; the CSV records what is done"
    )
    p.add_argument(
        "--done-dir", type=Path, default=None, help="where finished files go (default: done/ beside the CSV)"
    )
    p.add_argument(
        "--failed-dir",
        type=Path,
        default=None,
        help="where failed files go (default: failed/ beside the CSV)",
    )
    p.add_argument("--drain", action="store_true", help="process what is in the inbox, then exit")
    return p


def _progress_bar() -> tuple[tqdm, Callable[[Progress], None]]:
    # disable=None: drawn on a terminal only. tqdm's own rate counts wall time since the bar was
    # made, idle hours included; ours counts the time there was work.
    bar = tqdm(
        total=0,
        unit="img",
        desc="results",
        disable=None,
        dynamic_ncols=True,
        bar_format="{desc}: {percentage:3.0f}%|{bar}| {n_fmt}/{total_fmt} [{elapsed}{postfix}]",
    )

    def show(p: Progress) -> None:
        bar.total = p.done + p.in_flight
        bar.n = p.done
        bar.set_postfix(failed=p.failed, rate=f"{p.images_per_s:.0f} img/s", refresh=False)
        bar.refresh()

    return bar, show


def watch(args: argparse.Namespace, redis_url: str, settings: Settings, stop: threading.Event) -> int:
    """Watch ``args.inbox`` until ``stop`` is set (or drained, with ``--drain``).

    Returns ``ExitCode.OK``, or ``ExitCode.ABANDONED`` when it stopped with files in flight whose
    rows did not come within the grace (they are redone on the next start).
    """
    inbox = args.inbox.resolve()
    inbox.mkdir(parents=True, exist_ok=True)
    base = args.csv.resolve().parent
    opts = WatchOptions(
        inbox=inbox,
        done_dir=(args.done_dir or base / "done").resolve(),
        failed_dir=(args.failed_dir or base / "failed").resolve(),
        polling=args.polling,
        keep=args.keep,
        drain=args.drain,
        message_size=settings.message_size,
    )
    print(f"inbox:   {inbox}\nresults: {args.csv.resolve()}", file=sys.stderr)
    sink = CsvSink(args.csv)  # a file it refuses stops the command here, before any work
    bar, show = _progress_bar()
    try:
        with Client(redis_url, settings=settings) as client:
            progress = Watcher(client, sink, opts, stop, on_progress=show).run()
    finally:
        bar.close()
        sink.close()
    print(
        f"done {progress.done} ({progress.failed} failed), {progress.images_per_s:.0f} images/s",
        file=sys.stderr,
    )
    return ExitCode.ABANDONED if progress.abandoned else ExitCode.OK


def watch_main(argv: list[str]) -> int:
    settings = Settings.from_env()
    args = watch_parser("mnistq watch", settings).parse_args(argv)
    stop = threading.Event()

    def on_signal(signum: int, frame: FrameType | None) -> None:
        if stop.is_set():  # the second one: stop at once; rows are whole, the rest is redone
            os._exit(ExitCode.INTERRUPTED)
        stop.set()  # the first one: stop intake, finish the rows in hand

    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, on_signal)
    return watch(args, settings.require_redis(), settings, stop)


def classify_main(argv: list[str]) -> int:
    settings = Settings.from_env()
    p = argparse.ArgumentParser(prog="mnistq classify", description="Classify images through the queue.")
    p.add_argument("paths", nargs="+", type=Path, help="image files (the workers must be able to read them)")
    p.add_argument("--csv", type=Path, default=None, help="also append the rows to this CSV")
    p.add_argument(
        "--timeout", type=float, default=120.0, help="seconds to wait for all results (default: %(default)s)"
    )
    args = p.parse_args(argv)
    sink = CsvSink(args.csv) if args.csv else None  # a file it refuses fails before any work
    try:
        with Client(settings.require_redis(), settings=settings) as client:
            results = client.classify(args.paths, timeout=args.timeout)
        for r in results:
            if sink:
                sink.write(r)
            if r.error:
                print(f"{r.path}: error: {r.error}", file=sys.stderr)
            elif len(results) == 1:
                print(f"Predicted Digit: {r.digit}  (confidence {r.confidence:.3f}, model {r.model_version})")
            else:
                print(f"{r.path}: Predicted Digit: {r.digit}  (confidence {r.confidence:.3f})")
    finally:
        if sink:
            sink.close()
    # 1 when any file failed, as before: the exit-code table has no row for failed inputs.
    return ExitCode.UNEXPECTED if any(r.error for r in results) else ExitCode.OK

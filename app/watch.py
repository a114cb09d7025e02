"""`mnistq watch` and `mnistq classify`; ``watch_parser`` and ``watch`` also serve `mnistq run`
(with ``check_inbox_and_paths``).

The human output lives here: the paths at start, the progress bar (a terminal only), the final
line, `classify`'s answers. The modules below it only log. A mistake is one line and exit code
2 (a ConfigError, printed by app/cli.py), never a traceback.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from types import FrameType

from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from api.client import Client
from mnistq.cliargs import one_line_errors
from mnistq.errors import ConfigError
from mnistq.folders import Folders
from mnistq.protocol import EXIT_CODES_HELP, ExitCode
from mnistq.settings import AUTO, ReviewBelow, Settings, parse_review_below
from producer.csvsink import CsvSink
from producer.dispatch import Progress
from producer.lock import check_csv, check_paths, lock_csv, release_paths
from producer.watcher import Watcher, WatchOptions


def review_below_option(raw: str) -> ReviewBelow:
    """``--review-below``'s value: a P, ``auto``, or ``off`` (argparse's one-line error if bad)."""
    try:
        return parse_review_below(raw)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _review_default(value: ReviewBelow) -> str:
    if value is None:
        return "off"
    return "the model's recommended threshold" if value == AUTO else f"{value:g}"


def _seconds(raw: str) -> float:
    try:
        value = float(raw)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid float value: {raw!r}") from None
    if not 0 < value < float("inf"):
        raise argparse.ArgumentTypeError(f"expected a number of seconds above 0, not {raw!r}")
    return value


def watch_parser(prog: str, settings: Settings) -> argparse.ArgumentParser:
    """The watcher's options, with defaults from ``settings``; `mnistq run` adds its own."""
    p = argparse.ArgumentParser(prog=prog)
    p.add_argument(
        "--inbox",
        type=Path,
        default=settings.inbox,
        help="folder to watch; created if missing (its folder must exist), which the first line says "
        "(default: %(default)s)",
    )
    p.add_argument(
        "--csv",
        type=Path,
        default=settings.csv,
        help="results file, appended; its folder must exist (default: %(default)s)",
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
    p.add_argument(
        "--review-below",
        nargs="?",
        const=AUTO,
        default=settings.review_below,
        type=review_below_option,
        metavar="P",
        help="send files judged not a digit, or whose calibrated confidence is below P (0 < P < 1), "
        "to review/ beside done/, their rows saying why; with no P (or auto), the model's "
        "recommended threshold; off: none; the workers decide (default: "
        f"{_review_default(settings.review_below)}; MNISTQ_REVIEW_BELOW)",
    )
    return one_line_errors(p)


# -- watch ----------------------------------------------------------------------------------
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
        rate = {} if p.rate is None else {"rate": f"{p.rate:.0f} img/s"}
        bar.set_postfix(failed=p.failed, **rate, refresh=False)
        bar.refresh()

    return bar, show


@contextlib.contextmanager
def _logs_above(bar: tqdm) -> Iterator[None]:
    """With a bar on screen, log lines are printed above it (tqdm.write), never across it."""
    if bar.disable:
        yield
        return
    with logging_redirect_tqdm():
        yield


def watch(args: argparse.Namespace, redis_url: str, settings: Settings, stop: threading.Event) -> int:
    """Watch ``args.inbox`` until ``stop`` is set (or drained, with ``--drain``).

    Checks the paths and takes the locks first (``check_paths``), and gives the locks up when it
    returns. Returns ``ExitCode.OK``, or ``ExitCode.ABANDONED`` when it stopped with files in
    flight whose rows did not come within the grace (they are redone on the next start).
    """
    check_inbox_and_paths(folders_of(args))
    try:
        return _watch(args, redis_url, settings, stop)
    finally:
        release_paths()


def folders_of(args: argparse.Namespace) -> Folders:
    """The folders that ``--inbox``, ``--csv``, ``--done-dir`` and ``--failed-dir`` name."""
    return Folders.of(args.inbox, args.csv, args.done_dir, args.failed_dir)


def check_inbox_and_paths(folders: Folders) -> None:
    """``check_paths``, then one line when it created the inbox, so that a misspelt ``--inbox``
    (whose folder exists) is seen at once rather than watched in silence."""
    inbox = folders.inbox.expanduser()
    new = not inbox.exists() and not inbox.is_symlink()
    check_paths(folders)
    if new and inbox.is_dir():
        print(f"created inbox {folders.inbox} (it did not exist)", file=sys.stderr, flush=True)


def _watch(args: argparse.Namespace, redis_url: str, settings: Settings, stop: threading.Event) -> int:
    folders = folders_of(args).resolved()
    # The workers judge review on what each message asks: the client puts this in every one.
    settings = settings.with_(review_below=getattr(args, "review_below", settings.review_below))
    opts = WatchOptions.from_settings(
        settings, folders, polling=args.polling, keep=args.keep, drain=args.drain
    )
    print(f"inbox:   {folders.inbox}\nresults: {folders.csv}", file=sys.stderr)
    if settings.review_below is not None:
        below = _review_default(settings.review_below)
        print(f"review:  {folders.review} (not a digit, or confidence below {below})", file=sys.stderr)
    sink = _open_sink(folders.csv)  # a file it refuses stops the command here, before any work
    bar, show = _progress_bar()
    try:
        with _logs_above(bar), Client(redis_url, settings=settings) as client:
            progress = Watcher(client, sink, opts, stop, on_progress=show).run()
    finally:
        bar.close()
        sink.close()
    print(final_line(progress), file=sys.stderr)
    return ExitCode.ABANDONED if progress.abandoned else ExitCode.OK


def final_line(p: Progress) -> str:
    """`done N (F failed, R to review), X images/s`: the rate only where enough work was timed."""
    review = f", {p.review} to review" if p.review else ""
    rate = "" if p.rate is None else f", {p.rate:.0f} images/s"
    return f"done {p.done} ({p.failed} failed{review}){rate}"


def _open_sink(csv: Path) -> CsvSink:
    try:
        return CsvSink(csv)
    except OSError as e:
        raise ConfigError(f"cannot use the results file {csv}: {e.strerror or e}") from None


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


# -- classify -------------------------------------------------------------------------------
def classify_main(argv: list[str]) -> int:
    settings = Settings.from_env()
    p = argparse.ArgumentParser(
        prog="mnistq classify", description="Classify images through the queue.", epilog=EXIT_CODES_HELP
    )
    p.add_argument("paths", nargs="+", type=Path, help="image files (the workers must be able to read them)")
    p.add_argument("--csv", type=Path, default=None, help="also append the rows to this CSV")
    p.add_argument(
        "--timeout",
        type=_seconds,
        default=120.0,
        help="seconds to wait for all results (default: %(default)s)",
    )
    args = one_line_errors(p).parse_args(argv)
    csv = check_csv(args.csv) if args.csv else None
    try:
        if csv:  # one producer per CSV: not beside a watcher writing the same file
            lock_csv(csv)
        return _classify(args.paths, args.timeout, csv, settings)
    finally:
        release_paths()


def _classify(paths: list[Path], timeout: float, csv: Path | None, settings: Settings) -> int:
    with Client(settings.require_redis(), settings=settings) as client:
        client.ping()  # a broker that is down: one line now, not retries
        sink = _open_sink(csv) if csv else None  # a file it refuses fails before any work
        try:
            results = client.classify(paths, timeout=timeout)
            if sink:
                try:
                    sink.append(results)
                except OSError as e:
                    raise ConfigError(f"cannot write the results file {csv}: {e.strerror or e}") from None
        finally:
            if sink:
                sink.close()
    for r in results:
        review = f"  [review: {r.review}]" if r.review else ""  # with MNISTQ_REVIEW_BELOW set
        if r.error:
            print(f"{r.path}: error: {r.error}", file=sys.stderr)
        elif len(results) == 1:
            print(
                f"Predicted Digit: {r.digit}  (confidence {r.confidence:.3f}, model {r.model_version}){review}"
            )
        else:
            print(
                f"{r.path}: Predicted Digit: {r.digit}  "
                f"(confidence {r.confidence:.3f}, model {r.model_version}){review}"
            )
    # A refused or unreadable file is an ordinary outcome, not a bug (1): a code of its own.
    return ExitCode.FAILED_INPUT if any(r.error for r in results) else ExitCode.OK

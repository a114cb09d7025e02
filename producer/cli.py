"""`mnistq watch`, `mnistq run` (the main job) and `mnistq classify`."""

from __future__ import annotations

import argparse
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

from mnistq.errors import MnistqError
from mnistq.protocol import QUEUE
from mnistq.settings import Settings, cores
from producer.client import Client
from producer.csvsink import CsvSink
from producer.watcher import Options, Watcher

log = logging.getLogger("mnistq.run")


def _watch_args(prog: str, settings: Settings) -> argparse.ArgumentParser:
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


def _watch(args: argparse.Namespace, redis_url: str, settings: Settings, stop: threading.Event) -> int:
    inbox = args.inbox.resolve()
    inbox.mkdir(parents=True, exist_ok=True)
    base = args.csv.resolve().parent
    opts = Options(
        inbox=inbox,
        done_dir=(args.done_dir or base / "done").resolve(),
        failed_dir=(args.failed_dir or base / "failed").resolve(),
        polling=args.polling,
        keep=args.keep,
        batch_size=settings.batch_size,
        batch_wait_ms=settings.batch_wait_ms,
    )
    print(f"inbox:   {inbox}\nresults: {args.csv.resolve()}", file=sys.stderr)
    with Client(redis_url) as client:
        sink = CsvSink(args.csv)
        watcher = Watcher(client, sink, opts, stop)
        try:
            stats = watcher.run(drain=args.drain)
        finally:
            sink.close()
    print(
        f"done {stats['done']:.0f} ({stats['failed']:.0f} failed), {stats['images_per_s']:.0f} images/s",
        file=sys.stderr,
    )
    return 0


def watch_main(argv: list[str]) -> int:
    settings = Settings.from_env()
    args = _watch_args("mnistq watch", settings).parse_args(argv)
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    return _watch(args, settings.require_redis(), settings, stop)


class Workers:
    """N worker processes under supervision: restarted if they die, stopped with us."""

    def __init__(self, n: int, env: dict[str, str], loglevel: str) -> None:
        self.n, self.env, self.loglevel = n, env, loglevel
        self.procs: list[subprocess.Popen[bytes]] = [self._start(i) for i in range(n)]
        self.stopping = False

    def _start(self, i: int) -> subprocess.Popen[bytes]:
        from producer.embedded import die_with_parent

        cmd = [
            sys.executable, "-m", "celery", "-A", "worker", "--quiet", "worker", "-Q", QUEUE, "-n", f"mnistq{i}@%h",
            "--loglevel", self.loglevel, "--without-mingle", "--without-gossip",
        ]  # fmt: skip
        return subprocess.Popen(cmd, env=self.env, preexec_fn=die_with_parent, stdin=subprocess.DEVNULL)

    def check(self) -> None:
        for i, proc in enumerate(self.procs):
            code = proc.poll()
            if code is None or self.stopping:
                continue
            if code in (2, 3):  # no broker / no usable model: restarting cannot help
                raise MnistqError(f"worker {i} could not start (exit {code}); see its message above")
            log.warning("worker %d exited with %s; restarting it", i, code)
            self.procs[i] = self._start(i)

    def stop(self, grace: float = 30.0) -> None:
        self.stopping = True
        for proc in self.procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)  # warm shutdown: finish the batch in hand
        deadline = time.monotonic() + grace
        for proc in self.procs:
            try:
                proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def run_main(argv: list[str]) -> int:
    settings = Settings.from_env()
    p = _watch_args("mnistq run", settings)
    p.description = (
        "The main job: an embedded Redis (unless REDIS_URL is set), N workers and the inbox watcher."
    )
    # Separate processes overlap decoding (Python, one core each) with inference better than
    # threads in one process do: on 2 cores, 2 processes x 1 thread gave 1.09-1.28x 1 x 2 threads.
    p.add_argument(
        "--workers",
        type=int,
        default=min(cores(), 4),
        help="worker processes, each with cores/N torch threads (default here: %(default)s)",
    )
    p.add_argument("--worker-loglevel", default="WARNING", help="default: %(default)s")
    args = p.parse_args(argv)

    from producer.embedded import EmbeddedRedis

    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    result: list[int] = []
    embedded: EmbeddedRedis | None = None
    workers: Workers | None = None
    thread: threading.Thread | None = None
    try:
        embedded = None if settings.redis_url else EmbeddedRedis()
        redis_url = settings.redis_url or embedded.url  # type: ignore[union-attr]
        inbox = args.inbox.resolve()
        inbox.mkdir(parents=True, exist_ok=True)
        env = {
            **os.environ,
            "REDIS_URL": redis_url,
            "MNISTQ_ALLOWED_ROOTS": os.environ.get("MNISTQ_ALLOWED_ROOTS") or str(inbox),
            "MNISTQ_THREADS": os.environ.get("MNISTQ_THREADS") or str(max(1, cores() // args.workers)),
        }
        workers = Workers(args.workers, env, args.worker_loglevel)
        thread = threading.Thread(
            target=lambda: result.append(_watch(args, redis_url, settings, stop)),
            name="mnistq-watch",
            daemon=True,
        )
        thread.start()
        while thread.is_alive() and not stop.wait(0.5):
            workers.check()
    finally:
        stop.set()  # on a signal or an error the watcher finishes the rows in hand, then returns
        if thread is not None:
            thread.join(120)
        if workers is not None:
            workers.stop()
        if embedded is not None:
            embedded.stop()
    return result[0] if result else 1


def classify_main(argv: list[str]) -> int:
    settings = Settings.from_env()
    p = argparse.ArgumentParser(prog="mnistq classify", description="Classify images through the queue.")
    p.add_argument("paths", nargs="+", type=Path, help="image files (the workers must be able to read them)")
    p.add_argument("--csv", type=Path, default=None, help="also append the rows to this CSV")
    p.add_argument(
        "--timeout", type=float, default=120.0, help="seconds to wait for all results (default: %(default)s)"
    )
    args = p.parse_args(argv)
    with Client(settings.require_redis()) as client:
        results = client.classify(args.paths, timeout=args.timeout)
    sink = CsvSink(args.csv) if args.csv else None
    for r in results:
        if sink:
            sink.write({**r.__dict__, "id": None})
        if r.error:
            print(f"{r.path}: error: {r.error}", file=sys.stderr)
        elif len(results) == 1:
            print(f"Predicted Digit: {r.digit}  (confidence {r.confidence:.3f}, model {r.model_version})")
        else:
            print(f"{r.path}: Predicted Digit: {r.digit}  (confidence {r.confidence:.3f})")
    if sink:
        sink.close()
    return 1 if any(r.error for r in results) else 0

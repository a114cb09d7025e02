"""Worker throughput: 10,000 MNIST PNGs through Redis and our workers, against
(a) the in-process limit (one process decoding and running the model, no queue) and
(b) naive Celery (one task per image, model per process, no batching), in one run.

    python bench/throughput.py --workers 1 2
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import DATA, REPO, cores, export_pngs, in_process, label_of, table

from api import Client
from app.embedded import EmbeddedRedis
from app.supervisor import worker_command


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def start(cmd: list[str], env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    with open(log, "ab") as out:
        return subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT, cwd=REPO)


def wait_log(log: Path, text: str, count: int, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while log.read_text(errors="replace").count(text) < count:
        if time.monotonic() > deadline:
            sys.exit(f"timed out waiting for {text!r} in {log}")
        time.sleep(0.05)


def ours(
    url: str, paths: list[Path], n_workers: int, tmp: Path, env: dict[str, str]
) -> tuple[float, float, float, float]:
    """(seconds, accuracy, start-up seconds, RSS MB per worker) for n_workers processes."""
    log = tmp / f"ours{n_workers}.log"
    env = {**env, "REDIS_URL": url, "MNISTQ_THREADS": str(max(1, cores() // n_workers))}
    t0 = time.perf_counter()
    procs = [start(worker_command(f"b{i}@%h", "WARNING"), env, log) for i in range(n_workers)]
    with Client(url) as client:
        client.classify(paths[:8], timeout=120)  # every worker has started once this returns
        startup = time.perf_counter() - t0
        t0 = time.perf_counter()
        results = client.classify(paths, timeout=600)
        seconds = time.perf_counter() - t0
    rss = max(rss_mb(p.pid) for p in procs)
    for p in procs:
        p.terminate()
    for p in procs:
        p.wait()
    acc = sum(r.digit == label_of(r.path) for r in results) / len(results)
    return seconds, acc, startup, rss


def naive(url: str, paths: list[Path], tmp: Path, env: dict[str, str]) -> float:
    log = tmp / "naive.log"
    env = {**env, "REDIS_URL": url, "MNISTQ_THREADS": "1"}
    cmd = worker_command("naive@%h", "INFO", ["-c", str(cores())], app="bench.naive_worker", queue="naive")
    proc = start(cmd, env, log)
    wait_log(log, "ready.", 1)
    os.environ["REDIS_URL"] = url
    from naive_worker import app

    app.send_task("naive.classify", args=[str(paths[0])]).get(timeout=60)
    t0 = time.perf_counter()
    pending = [app.send_task("naive.classify", args=[str(p)]) for p in paths]
    for r in pending:
        r.get(timeout=600)
    seconds = time.perf_counter() - t0
    proc.terminate()
    proc.wait()
    return seconds


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", type=int, default=10_000, help="MNIST test PNGs (default: %(default)s)")
    p.add_argument(
        "--naive-images", type=int, default=2_000, help="images for the naive baseline (default: %(default)s)"
    )
    p.add_argument(
        "--workers",
        type=int,
        nargs="+",
        default=[1, 2],
        help="worker process counts to run (default: %(default)s)",
    )
    p.add_argument("--data-dir", type=Path, default=DATA, help="MNIST folder (default: %(default)s)")
    args = p.parse_args()

    tmp = Path(tempfile.mkdtemp(prefix="mnistq-bench-"))
    files = export_pngs(tmp / "png", args.images, data_dir=args.data_dir)
    paths = list(files)
    env = {**os.environ, "MNISTQ_ALLOWED_ROOTS": str(tmp), "PYTHONPATH": str(REPO)}
    redis = EmbeddedRedis()
    try:
        limit_s, limit_acc = in_process(paths)
        rows = [
            [
                "in-process limit (no queue)",
                len(paths),
                limit_s,
                len(paths) / limit_s,
                1.0,
                f"{limit_acc:.2%}",
                "",
                "",
            ]
        ]
        naive_s = naive(redis.url, paths[: args.naive_images], tmp, env)
        naive_rate = args.naive_images / naive_s
        rows.append(
            [
                f"naive Celery, {cores()} processes",
                args.naive_images,
                naive_s,
                naive_rate,
                naive_rate * limit_s / len(paths),
                "",
                "",
                "",
            ]
        )
        for n in args.workers:
            s, acc, startup, rss = ours(redis.url, paths, n, tmp, env)
            rate = len(paths) / s
            rows.append(
                [
                    f"mnist-queue, {n} worker(s)",
                    len(paths),
                    s,
                    rate,
                    rate * limit_s / len(paths),
                    f"{acc:.2%}",
                    f"{startup:.1f}s",
                    f"{rss:.0f}",
                ]
            )
            rows[-1].append(f"{rate / naive_rate:.1f}x")
    finally:
        redis.stop()
    header = [
        "method",
        "images",
        "seconds",
        "images/s",
        "of limit",
        "accuracy",
        "start-up",
        "RSS MB",
        "vs naive",
    ]
    for r in rows:
        r.extend([""] * (len(header) - len(r)))
    print(table(rows, header))


if __name__ == "__main__":
    main()

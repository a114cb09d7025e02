"""The producer alone on a burst and on a flood: the watcher with answers that come at once.

The workers and the broker are the same for a burst and for a flood; what differs is the
producer's side (events dropped past what it holds, passes over a folder of 60,000 entries,
links and removals in big folders). Here the connection answers every message at once in
process (no model, no Redis), so the watcher's own rate and CPU per image are measured, for
each code tree (``--tree``) in a fresh process, taking turns (``--rounds``):

- **burst**: ``--burst`` files moved into the inbox at once (it fits in what the watcher holds);
- **flood**: ``--flood`` files moved in at once (far more than it holds).

Rate: first move to last row. CPU: the watcher's threads only (the moves are the main thread's).

    python bench/watcher.py --tree /tmp/before --tree . --rounds 3
"""

from __future__ import annotations

import argparse
import json
import os
import queue
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Sequence
from pathlib import Path

from common import REPO, RowCounter, cpu_flags, load_average, table


class Echo:
    """Broker and workers in one: every message answered at once, digit 7."""

    def __init__(self) -> None:
        from mnistq.outage import Outage

        self.outage = Outage("the broker")
        self._replies: queue.SimpleQueue[object] = queue.SimpleQueue()

    def ping(self) -> None:
        pass

    def send(
        self, paths: Sequence[str], ids: Sequence[str] | None = None, *, task_id: str | None = None
    ) -> str:
        from mnistq.protocol import Reply, Result

        task_id = task_id or str(uuid.uuid4())
        file_ids = list(ids) if ids else [None] * len(paths)
        answer = [
            Result(path=p, id=i, digit=7, confidence=0.99, model_version="v")
            for p, i in zip(paths, file_ids, strict=True)
        ]
        self._replies.put(Reply(task_id, answer))
        return task_id

    def receive(self, timeout: float) -> list[object]:
        out = []
        try:
            out.append(self._replies.get(timeout=timeout))
            while True:
                out.append(self._replies.get_nowait())
        except queue.Empty:
            return out


def thread_cpu_s(skip: int) -> float:
    """CPU seconds of this process's threads but ``skip`` (the one that moves the files)."""
    tick, total = os.sysconf("SC_CLK_TCK"), 0.0
    for task in Path("/proc/self/task").iterdir():
        if int(task.name) == skip:
            continue
        try:
            fields = (task / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += (int(fields[11]) + int(fields[12])) / tick
    return total


def child(n: int, folder: Path) -> dict[str, float]:
    from mnistq.folders import Folders
    from producer.csvsink import CsvSink
    from producer.watcher import Watcher, WatchOptions

    staging, inbox = folder / "staging", folder / "inbox"
    staging.mkdir(parents=True)
    names = [f"f{i:06d}.png" for i in range(n)]
    for name in names:
        (staging / name).write_bytes(b"\x89PNG not decoded here")
    sink = CsvSink(folder / "results.csv")
    stop = threading.Event()
    opts = WatchOptions(Folders.of(inbox, folder / "results.csv", folder / "done", folder / "failed"))
    watcher = Watcher(Echo(), sink, opts, stop)  # type: ignore[arg-type]
    runner = threading.Thread(target=watcher.run)
    runner.start()
    while not (inbox.exists() and watcher.intake.idle):
        time.sleep(0.01)
    time.sleep(0.5)
    rows, me = RowCounter(folder / "results.csv"), threading.get_native_id()
    cpu0, t0 = thread_cpu_s(me), time.perf_counter()
    for name in names:
        os.rename(staging / name, inbox / name)
    while rows() < n:
        time.sleep(0.002)
    seconds, cpu = time.perf_counter() - t0, thread_cpu_s(me) - cpu0
    stop.set()
    runner.join()
    sink.close()
    return {"rate": n / seconds, "cpu_us": 1e6 * cpu / n}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--burst", type=int, default=10_000, help="files in a burst (default: %(default)s)")
    p.add_argument("--flood", type=int, default=60_000, help="files in a flood (default: %(default)s)")
    p.add_argument("--rounds", type=int, default=3, help="turns per tree and size (default: %(default)s)")
    p.add_argument("--tree", type=Path, action="append", help="code tree to run (repeat; default: this one)")
    p.add_argument("--child", type=int, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        with tempfile.TemporaryDirectory(prefix="mnistq-watcher-") as tmp:
            print(json.dumps(child(args.child, Path(tmp))))
        return
    trees = [t.resolve() for t in args.tree or [REPO]]
    print(f"CPU: {cpu_flags()}; load average {load_average()}")
    got: dict[tuple[Path, int], list[dict[str, float]]] = {}
    for r in range(args.rounds):
        line = []
        for tree in trees:
            for n in (args.burst, args.flood):
                env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tree), str(Path(__file__).parent)])}
                env["MNISTQ_LOG_LEVEL"] = "WARNING"
                cmd = [sys.executable, __file__, "--child", str(n)]
                out = subprocess.run(cmd, env=env, check=True, capture_output=True, text=True).stdout
                got.setdefault((tree, n), []).append(json.loads(out))
                line.append(f"{tree.name} {n}: {got[tree, n][-1]['rate']:,.0f}/s")
        print(f"round {r + 1}: " + "; ".join(line), flush=True)
    rows = []
    for tree in trees:
        med = {n: statistics.median(x["rate"] for x in got[tree, n]) for n in (args.burst, args.flood)}
        for n in (args.burst, args.flood):
            g = got[tree, n]
            rows.append([
                str(tree), "burst" if n == args.burst else "flood", n, f"{med[n]:,.0f}",
                f"{min(x['rate'] for x in g):,.0f}-{max(x['rate'] for x in g):,.0f}",
                f"{statistics.median(x['cpu_us'] for x in g):.0f}",
                f"{med[n] / med[args.burst]:.2f}",
            ])  # fmt: skip
    print()
    print(table(rows, ["tree", "kind", "files", "images/s", "range", "CPU us/image", "of the burst"]))
    print(f"load average at the end: {load_average()}")


if __name__ == "__main__":
    main()

"""The main job end to end: `mnistq run` with files moved into its inbox, against both limits.

Measured side by side in one run, for each configuration (``--workers``, ``--threads``,
``--tree``), in this order:

- **the raw limit**: one process decoding the PNGs with PIL (``convert("L")``) and running the
  model in batches of 256 (bf16 + channels_last where the CPU runs bf16 natively), no queue;
- **our limit**: the same with our decode and MNIST-style normalisation (``load_image``);
- **burst**: N MNIST test PNGs moved into the inbox at once, first move to last CSV row, as a
  share of each limit; the accuracy of the rows against the labels;
- **trickle**: one image at a time, arrival (the rename) to its CSV row: p50 and max;
- **flood** (``--flood N``): N training PNGs moved in at once, then the burst again (new names):
  the flood's rate against the mean of the bursts around it; CPU per image of each process
  kind, the workers' page faults, and the producer's peak RSS.

``--profile DIR`` records the producer (the `mnistq run` process) and one worker with py-spy
during the burst (and the flood) and prints their top functions (own %, cumulative %).

    python bench/pipeline.py --workers 2                 # burst 10,000 + trickle 50
    python bench/pipeline.py --workers 2 --flood 60000   # and the flood
    python bench/pipeline.py --workers 1 2 --threads 1 2 # each split of the cores
    python bench/pipeline.py --tree /tmp/before --tree .  # two code trees, one run
    python bench/pipeline.py --workers 1 2 3 --threads 1 2 --alternate --repeat 5
"""

from __future__ import annotations

import argparse
import itertools
import json
import linecache
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from common import (
    DATA,
    REPO,
    Limit,
    RowCounter,
    cpu_flags,
    export_pngs,
    label_of,
    load_average,
    our_limit,
    raw_limit,
    table,
)


@dataclass(frozen=True)
class Config:
    workers: int
    threads: int  # MNISTQ_THREADS; 0: `mnistq run`'s own choice (cores / workers)
    tree: Path  # the code that runs (PYTHONPATH)

    def label(self, trees: int) -> str:
        text = f"--workers {self.workers}" + (f", MNISTQ_THREADS={self.threads}" if self.threads else "")
        return text + (f", tree {self.tree}" if trees > 1 else "")


class Run:
    """`mnistq run` in a folder of its own, with its peak RSS sampled."""

    def __init__(self, folder: Path, config: Config) -> None:
        self.folder, self.inbox, self.csv = folder, folder / "inbox", folder / "results.csv"
        folder.mkdir(parents=True)
        env = {k: v for k, v in os.environ.items() if k != "REDIS_URL"}
        env["PYTHONPATH"] = os.pathsep.join([str(config.tree), *filter(None, [env.get("PYTHONPATH")])])
        env["MNISTQ_LOG_LEVEL"] = "WARNING"
        if config.threads:
            env["MNISTQ_THREADS"] = str(config.threads)
        cmd = [sys.executable, "-c", "import sys; from app.cli import main; sys.exit(main())"]
        self.proc = subprocess.Popen(
            [*cmd, "run", "--workers", str(config.workers)],
            cwd=folder,
            env=env,
            stderr=subprocess.DEVNULL,
        )
        self.workers = config.workers
        self.rows = RowCounter(self.csv)
        self.peak_rss = 0.0
        self._sampler = threading.Thread(target=self._sample, daemon=True)
        self._sampler.start()

    def _sample(self) -> None:
        while self.proc.poll() is None:
            try:
                for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
                    if line.startswith("VmHWM:"):
                        self.peak_rss = int(line.split()[1]) / 1024
            except OSError:
                return
            time.sleep(0.2)

    def children(self) -> list[tuple[int, bool]]:
        """`mnistq run`'s child processes: (pid, whether it is a Celery worker; else Redis)."""
        out = []
        for task in Path(f"/proc/{self.proc.pid}/task").iterdir():
            for pid in (task / "children").read_text().split():
                try:
                    cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
                except OSError:
                    continue
                out.append((int(pid), b"celery" in cmdline))
        return out

    def worker_pids(self) -> list[int]:
        """The Celery worker processes (children of `mnistq run` running celery)."""
        return sorted(pid for pid, worker in self.children() if worker)

    def wait_ready(self, warm: list[Path], timeout: float = 300) -> None:
        """Until every worker has run a task: warm-up images through the pipeline, one at a time."""
        deadline = time.monotonic() + timeout
        while not self.inbox.exists():
            time.sleep(0.05)
        seen: set[str] = set()
        i = 0
        while len(seen) < self.workers:
            if time.monotonic() > deadline:
                sys.exit(f"workers not ready after {timeout:.0f}s")
            if i >= len(warm):
                sys.exit("warm-up images used up")
            move_all([warm[i]], self.inbox)
            i += 1
            self.wait_rows(i, timeout=timeout)
            seen |= self._workers_seen()
        time.sleep(0.5)

    def _workers_seen(self) -> set[str]:
        # the workers' names are not in the CSV: ask the workers which have run a task
        from celery import Celery

        url = json.loads((self.folder / ".mnistq-run.json").read_text())["url"]
        app = Celery(broker=url)
        try:
            stats = app.control.inspect(timeout=1.0).stats() or {}
        finally:
            app.close()
        return {name for name, s in stats.items() if (s.get("total") or {})}

    def wait_rows(self, n: int, timeout: float = 900, poll: float = 0.005) -> float:
        deadline = time.monotonic() + timeout
        while self.rows() < n:
            if time.monotonic() > deadline or self.proc.poll() is not None:
                sys.exit(f"only {self.rows()} of {n} rows")
            time.sleep(poll)
        return time.perf_counter()

    def cpu_s(self) -> dict[str, float]:
        """CPU seconds (user + system) so far: the producer (`mnistq run`), the workers, Redis;
        and the workers' minor page faults ("faults")."""
        tick = os.sysconf("SC_CLK_TCK")

        def of(pid: int) -> tuple[float, int]:
            try:
                fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                return 0.0, 0
            return (int(fields[11]) + int(fields[12])) / tick, int(fields[7])

        out = {"producer": of(self.proc.pid)[0], "workers": 0.0, "redis": 0.0, "faults": 0.0}
        for pid, worker in self.children():
            cpu, faults = of(pid)
            if worker:
                out["workers"] += cpu
                out["faults"] += faults / 1e6  # printed per image, as the CPU in us is
            else:
                out["redis"] += cpu
        return out

    def thread_cpu_s(self) -> dict[int, float]:
        """CPU seconds so far of each thread of the producer, by thread id."""
        tick = os.sysconf("SC_CLK_TCK")
        out = {}
        for task in Path(f"/proc/{self.proc.pid}/task").iterdir():
            try:
                fields = (task / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            out[int(task.name)] = (int(fields[11]) + int(fields[12])) / tick
        return out

    def stop(self) -> None:
        self.rows.close()
        self.proc.terminate()
        try:
            self.proc.wait(120)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def move_all(files: list[Path], inbox: Path) -> float:
    t0 = time.perf_counter()
    for f in files:
        os.rename(f, inbox / f.name)
    return t0


def copies(master: Path, folder: Path, prefix: str = "") -> list[Path]:
    """Fresh copies of a folder's PNGs (each run moves its own files away), named with ``prefix``
    first (a second burst: new names, not files that take finished files' names)."""
    folder.mkdir(parents=True)
    out = []
    for f in sorted(master.iterdir()):
        shutil.copyfile(f, folder / (prefix + f.name))
        out.append(folder / (prefix + f.name))
    return out


def accuracy(csv_path: Path, prefix: str) -> tuple[float, int]:
    import csv

    with open(csv_path, newline="") as f:
        data = [r for r in csv.DictReader(f) if Path(r["path"]).name.startswith(prefix)]
    ok = [r for r in data if r["digit"] != "" and r["digit"] == str(label_of(r["path"]))]
    return len(ok) / max(1, len(data)), len(data)


# -- profiles -------------------------------------------------------------------------------
class Recorder:
    """py-spy record on one process until stopped (SIGINT makes it write its file)."""

    def __init__(self, pid: int, out: Path, rate: int = 250) -> None:
        self.out = out
        spy = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
        self.proc = subprocess.Popen(
            [spy, "record", "--pid", str(pid), "--rate", str(rate), "--format", "speedscope",
             "--output", str(out), "--nonblocking"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )  # fmt: skip

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGINT)
        self.proc.wait(60)


#: Where a sampled thread is waiting, not working (py-spy counts a thread blocked in these as
#: active): such samples are left out of the tables.
WAITS = (
    "poll", "select", "wait", "_wait_for_tstate_lock", "_read_from_socket", "acquire", "sleep",
    "get", "_epoll.poll", "recv", "readinto",
)  # fmt: skip


_BLOCKING = re.compile(r"\.(poll|select|wait|sleep|blpop|brpop|join|acquire|recv|take)\(")


def profile_tables(speedscope: Path, n: int = 20) -> tuple[str, str, float]:
    """The top ``n`` functions by own share and by cumulative share (a sample counts once per
    function in its stack) of the busy samples of all threads; and those samples' seconds."""
    doc = json.loads(speedscope.read_text())
    frames = doc["shared"]["frames"]
    keys = [f"{f['name']} ({'/'.join(Path(f.get('file') or '?').parts[-2:])})" for f in frames]
    # A leaf whose line is a blocking call (a poll in a loop of ours) is a wait too.
    waits = [
        f["name"].rsplit(".", 1)[-1] in WAITS
        or bool(_BLOCKING.search(linecache.getline(f.get("file") or "", int(f.get("line") or 0))))
        for f in frames
    ]
    own: Counter[str] = Counter()
    cum: Counter[str] = Counter()
    total = 0.0
    for prof in doc["profiles"]:
        for stack, weight in zip(prof["samples"], prof["weights"], strict=True):
            if not stack or waits[stack[-1]]:
                continue
            total += weight
            own[keys[stack[-1]]] += weight
            for key in {keys[i] for i in stack}:
                cum[key] += weight

    def rows(order: Counter[str]) -> list[list[object]]:
        return [
            [fn, f"{100 * own[fn] / max(total, 1e-9):.1f}", f"{100 * cum[fn] / max(total, 1e-9):.1f}"]
            for fn, _ in order.most_common(n)
        ]

    header = ["function (file)", "own %", "cum %"]
    return table(rows(own), header), table(rows(cum), header), total


# -- the run --------------------------------------------------------------------------------
def measure(config: Config, args: argparse.Namespace, tmp: Path, n: int, trees: int) -> list[list[object]]:
    folder = tmp / f"run{n}"
    burst = copies(tmp / "burst", folder / "staging")
    run = Run(folder / "job", config)
    report: list[list[object]] = []
    label = config.label(trees)
    try:
        run.wait_ready(copies(tmp / "warm", folder / "warm"))
        # The limits, in this process, with `mnistq run` started and idle (as it is before a burst).
        master = sorted((tmp / "burst").iterdir())  # the same PNGs, not moved
        before = raw_limit(master), our_limit(master)
        done = run.rows()
        load = load_average()
        seconds, cpu = moved_in(run, burst, done, args.profile, f"{n}-w{config.workers}t{config.threads}")
        rate = len(burst) / seconds
        acc, _ = accuracy(run.csv, "b")
        # The limits again, after the burst: the burst is compared with their mean, so a load
        # that comes or goes meanwhile weighs on both sides alike.
        after = raw_limit(master), our_limit(master)
        raw, ours = (Limit.mean(x, y) for x, y in zip(before, after, strict=True))
        for lim, x, y in zip((raw, ours), before, after, strict=True):
            report.append(
                [label, lim.name, lim.images, lim.seconds, lim.rate, "", "", f"{lim.accuracy:.2%}",
                 f"{x.rate:,.0f} before, {y.rate:,.0f} after; decode "
                 f"{1e6 * lim.decode_s / lim.images:.0f} us/img, "
                 f"model {1e6 * (lim.seconds - lim.decode_s) / lim.images:.0f} us/img"]
            )  # fmt: skip
        report.append(
            [label, "burst: move to last row", len(burst), seconds, rate, f"{rate / raw.rate:.2f}",
             f"{rate / ours.rate:.2f}", f"{acc:.2%}", f"load {load}"]
        )  # fmt: skip
        report.append([label, "burst: CPU us per image", len(burst), "", "", "", "", "", cpu])

        if args.trickle:
            lat = []
            trickle = copies(tmp / "trickle", folder / "trickle")
            done = run.rows()
            for f in trickle:
                time.sleep(0.05)
                t0 = move_all([f], run.inbox)
                done += 1
                lat.append((run.wait_rows(done, poll=0.0002) - t0) * 1000)
            lat.sort()
            report.append(
                [label, "trickle: arrival to row, ms", len(lat), "", "", "", "", "",
                 f"p50 {statistics.median(lat):.1f}, p90 {lat[int(0.9 * len(lat)) - 1]:.1f}, "
                 f"max {max(lat):.1f}"]
            )  # fmt: skip

        if args.flood:
            flood = copies(tmp / "flood", folder / "flood")
            done = run.rows()
            stem = f"{n}-w{config.workers}t{config.threads}-flood"
            f_seconds, f_cpu = moved_in(run, flood, done, args.profile, stem, timeout=3600)
            f_rate = len(flood) / f_seconds
            # A second burst after the flood: the flood is compared with the mean of the bursts
            # around it, so a load that came or went meanwhile weighs on both sides alike.
            again = copies(tmp / "burst", folder / "staging-again", prefix="a")
            a_seconds, a_cpu = moved_in(run, again, run.rows(), args.profile, f"{stem}-again")
            a_rate = len(again) / a_seconds
            report.append(
                [label, "burst again, after the flood", len(again), a_seconds, a_rate,
                 f"{a_rate / raw.rate:.2f}", f"{a_rate / ours.rate:.2f}", "", a_cpu]
            )  # fmt: skip
            around = (rate + a_rate) / 2
            report.append(
                [label, f"flood of {len(flood)}", len(flood), f_seconds, f_rate, f"{f_rate / raw.rate:.2f}",
                 f"{f_rate / ours.rate:.2f}", "",
                 f"{f_rate / around:.2f} of the bursts around it ({f_rate / rate:.2f} of the first); "
                 f"load {load_average()}"]
            )  # fmt: skip
            report.append([label, "flood: CPU us per image", len(flood), "", "", "", "", "", f_cpu])
        report.append([label, "producer peak RSS (MB)", "", run.peak_rss, "", "", "", "", ""])
    finally:
        run.stop()
    shutil.rmtree(folder, ignore_errors=True)
    return report


def moved_in(
    run: Run, files: list[Path], done: int, profile: Path | None, stem: str, timeout: float = 900
) -> tuple[float, str]:
    """Move ``files`` into the inbox at once; the seconds from the first move to the last row,
    and the CPU per image of each process kind. With ``profile``, py-spy records the producer
    and one worker meanwhile and their tables are printed."""
    recorders = []
    if profile:
        profile.mkdir(parents=True, exist_ok=True)
        recorders = [Recorder(run.proc.pid, profile / f"{stem}-producer.json")]
        recorders += [Recorder(run.worker_pids()[0], profile / f"{stem}-worker.json")]
        time.sleep(1.0)  # py-spy attaches
    cpu0, threads0 = run.cpu_s(), run.thread_cpu_s()
    t0 = move_all(files, run.inbox)
    t1 = run.wait_rows(done + len(files), timeout=timeout)
    cpu = {k: v - cpu0[k] for k, v in run.cpu_s().items()}
    threads = {t: v - threads0.get(t, 0.0) for t, v in run.thread_cpu_s().items()}
    for r in recorders:
        r.stop()
    n = len(files)
    if recorders and recorders[0].out.exists():
        names = {
            int(p["name"].split()[1]): p["name"].split('"')[1]
            for p in json.loads(recorders[0].out.read_text())["profiles"]
            if p["name"].startswith("Thread ") and '"' in p["name"]
        }
        print(f"\n== {stem}: producer CPU by thread (us per image): " + ", ".join(
            f"{names.get(t, t)} {1e6 * v / n:.0f}"
            for t, v in sorted(threads.items(), key=lambda kv: -kv[1]) if v > 0
        ))  # fmt: skip
    for r in recorders:
        if r.out.exists():
            by_own, by_cum, busy = profile_tables(r.out)
            print(f"\n== {r.out.name}: {busy:.1f} s of busy samples; by own share\n{by_own}")
            print(f"\n== {r.out.name}: by cumulative share\n{by_cum}", flush=True)
    return t1 - t0, ", ".join(
        f"{k} {1e6 * v / n:.0f}" if k != "faults" else f"worker page faults/image {1e6 * v / n:.0f}"
        for k, v in cpu.items()
    )


def alternate(configs: list[Config], args: argparse.Namespace, tmp: Path, trees: int) -> list[list[object]]:
    """Every configuration's `mnistq run` started at once and kept idle; then, ``--repeat``
    rounds, one burst through each in turn, with the raw limit measured before each round. A
    load that comes and goes (other jobs on the machine) then weighs on every configuration
    alike, which separate runs one after the other cannot promise."""
    runs = [Run(tmp / f"alt{i}" / "job", c) for i, c in enumerate(configs)]
    master = sorted((tmp / "burst").iterdir())
    rates: dict[int, list[float]] = {i: [] for i in range(len(runs))}
    shares: dict[int, list[float]] = {i: [] for i in range(len(runs))}
    try:
        for i, run in enumerate(runs):
            run.wait_ready(copies(tmp / "warm", tmp / f"alt{i}" / "warm"))
        for r in range(args.repeat):
            limit_rate = raw_limit(master).rate
            line = [f"round {r + 1}: raw limit {limit_rate:,.0f}/s"]
            for i, run in enumerate(runs):
                burst = copies(tmp / "burst", tmp / f"alt{i}" / f"staging{r}")
                done = run.rows()
                t0 = move_all(burst, run.inbox)
                rate = len(burst) / (run.wait_rows(done + len(burst)) - t0)
                rates[i].append(rate)
                shares[i].append(rate / limit_rate)
                line.append(f"{configs[i].label(trees)} {rate:,.0f}/s")
            print("; ".join(line) + f"; load {load_average()}", flush=True)
    finally:
        for run in runs:
            run.stop()
    return [
        [configs[i].label(trees), f"alternating bursts x{len(rates[i])}", args.images, "",
         statistics.median(rates[i]), f"{statistics.median(shares[i]):.2f}", "", "",
         f"rates {min(rates[i]):,.0f}-{max(rates[i]):,.0f}; of raw {min(shares[i]):.2f}-{max(shares[i]):.2f}"]
        for i in range(len(runs))
    ]  # fmt: skip


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", type=int, default=10_000, help="burst size (default: %(default)s)")
    p.add_argument("--trickle", type=int, default=50, help="images sent one at a time (default: %(default)s)")
    p.add_argument(
        "--flood", type=int, default=0, help="also flood with this many training PNGs (default: %(default)s)"
    )
    p.add_argument(
        "--workers", type=int, nargs="+", default=[2], help="`mnistq run --workers` (default: %(default)s)"
    )
    p.add_argument(
        "--threads",
        type=int,
        nargs="+",
        default=[0],
        help="MNISTQ_THREADS per worker; 0: cores / workers (default: %(default)s)",
    )
    p.add_argument(
        "--tree",
        type=Path,
        action="append",
        help="run `mnistq run` from this source tree (repeat to compare; default: this repository)",
    )
    p.add_argument("--repeat", type=int, default=1, help="run every configuration this often")
    p.add_argument(
        "--alternate",
        action="store_true",
        help="all configurations running at once, bursts in turn (--repeat rounds); no trickle",
    )
    p.add_argument("--profile", type=Path, default=None, help="py-spy the burst; speedscope files here")
    p.add_argument("--data-dir", type=Path, default=DATA, help="MNIST folder (default: %(default)s)")
    args = p.parse_args()

    trees = [t.resolve() for t in args.tree or [REPO]]
    tmp = Path(tempfile.mkdtemp(prefix="mnistq-pipeline-"))
    export_pngs(tmp / "burst", args.images, data_dir=args.data_dir)
    warm = export_pngs(tmp / "warm-src", 10_000, data_dir=args.data_dir)
    # warm-up and trickle images: other names than the burst's ("w", "t" prefixes)
    (tmp / "warm").mkdir()
    (tmp / "trickle").mkdir()
    for i, f in enumerate(sorted(warm)[-(32 + args.trickle) :]):
        dest = tmp / ("warm" if i < 32 else "trickle") / (("w" if i < 32 else "t") + f.name)
        os.rename(f, dest)
    shutil.rmtree(tmp / "warm-src")
    for f in (tmp / "burst").iterdir():
        f.rename(f.with_name("b" + f.name))
    if args.flood:
        export_pngs(tmp / "flood", args.flood, split="train", data_dir=args.data_dir)
    print(f"CPU: {cpu_flags()}, {len(os.sched_getaffinity(0))} cores; load average {load_average()}")
    configs = [Config(w, t, tree) for tree, w, t in itertools.product(trees, args.workers, args.threads)]
    report: list[list[object]] = []
    n = 0
    try:
        if args.alternate:
            report = alternate(configs, args, tmp, len(trees))
        for _ in range(0 if args.alternate else args.repeat):
            for c in configs:
                n += 1
                rows = measure(c, args, tmp, n, len(trees))
                report += rows
                print(table(rows, HEADER), flush=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print()
    print(table(report, HEADER))
    print(f"load average at the end: {load_average()}")


HEADER = [
    "configuration",
    "measure",
    "images",
    "seconds",
    "images/s",
    "of raw",
    "of ours",
    "accuracy",
    "note",
]

if __name__ == "__main__":
    main()

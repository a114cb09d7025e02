"""The main job end to end: `mnistq run` with files moved into its inbox.

- burst: N MNIST test PNGs moved in at once, first move to last CSV row, against the
  in-process limit (one process decoding the same PNGs and running the model) in the same run;
- accuracy of the CSV rows against the labels (through the whole pipeline);
- trickle: one image at a time, arrival to its CSV row (p50, max);
- flood: --flood N files (training images) moved in at once, the producer's peak memory.

    python bench/pipeline.py                 # burst 10,000 + trickle 50
    python bench/pipeline.py --flood 60000   # and the flood
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from common import DATA, export_pngs, in_process, label_of, rows, table


class Run:
    """`mnistq run` in a folder of its own, with its peak RSS sampled."""

    def __init__(self, folder: Path, workers: int) -> None:
        self.folder, self.inbox, self.csv = folder, folder / "inbox", folder / "results.csv"
        env = {k: v for k, v in os.environ.items() if k != "REDIS_URL"}
        cmd = [sys.executable, "-c", "import sys; from mnistq.cli import main; sys.exit(main())"]
        self.proc = subprocess.Popen(
            [*cmd, "run", "--workers", str(workers)],
            cwd=folder,
            env={**env, "MNISTQ_LOG_LEVEL": "WARNING"},
            stderr=subprocess.DEVNULL,
        )
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

    def wait_rows(self, n: int, timeout: float = 900, poll: float = 0.01) -> float:
        deadline = time.monotonic() + timeout
        while rows(self.csv) < n:
            if time.monotonic() > deadline or self.proc.poll() is not None:
                sys.exit(f"only {rows(self.csv)} of {n} rows")
            time.sleep(poll)
        return time.perf_counter()

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(120)


def move_all(files: list[Path], inbox: Path) -> float:
    t0 = time.perf_counter()
    for f in files:
        os.rename(f, inbox / f.name)
    return t0


def accuracy(csv_path: Path) -> tuple[float, int]:
    import csv

    with open(csv_path, newline="") as f:
        data = list(csv.DictReader(f))
    ok = [r for r in data if r["digit"] != "" and r["digit"] == str(label_of(r["path"]))]
    return len(ok) / max(1, len(data)), len(data)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", type=int, default=10_000, help="burst size (default: %(default)s)")
    p.add_argument("--trickle", type=int, default=50, help="images sent one at a time (default: %(default)s)")
    p.add_argument(
        "--flood", type=int, default=0, help="also flood with this many training PNGs (default: %(default)s)"
    )
    p.add_argument("--skip-burst", action="store_true", help="only the trickle (and flood)")
    p.add_argument("--workers", type=int, default=1, help="`mnistq run --workers` (default: %(default)s)")
    p.add_argument("--data-dir", type=Path, default=DATA, help="MNIST folder (default: %(default)s)")
    args = p.parse_args()

    tmp = Path(tempfile.mkdtemp(prefix="mnistq-pipeline-"))
    staging = export_pngs(tmp / "staging", args.images, data_dir=args.data_dir)
    files = list(staging)
    limit_s, limit_acc = in_process(files)
    run = Run(tmp, args.workers)
    report = []
    try:
        warm = export_pngs(tmp / "warm", 1, data_dir=args.data_dir)
        while not run.inbox.exists():
            time.sleep(0.05)
        move_all(list(warm), run.inbox)
        run.wait_rows(1, timeout=120)  # workers are up

        t0 = move_all(files, run.inbox)
        t1 = run.wait_rows(1 + len(files))
        burst = t1 - t0
        acc, _ = accuracy(run.csv)
        report.append(
            ["burst: move to last row", len(files), burst, len(files) / burst, limit_s / burst, f"{acc:.2%}"]
        )
        report.append(
            [
                "in-process limit (no queue)",
                len(files),
                limit_s,
                len(files) / limit_s,
                1.0,
                f"{limit_acc:.2%}",
            ]
        )

        lat = []
        trickle = export_pngs(tmp / "trickle", args.trickle, data_dir=args.data_dir)
        done = rows(run.csv)
        for f in trickle:
            t0 = move_all([f], run.inbox)
            done += 1
            lat.append((run.wait_rows(done, poll=0.0005) - t0) * 1000)
            time.sleep(0.05)
        report.append(["trickle p50 (ms)", len(lat), statistics.median(lat), "", "", ""])
        report.append(["trickle max (ms)", len(lat), max(lat), "", "", ""])

        if args.flood:
            flood = list(export_pngs(tmp / "flood", args.flood, split="train", data_dir=args.data_dir))
            done = rows(run.csv)
            t0 = move_all(flood, run.inbox)
            t1 = run.wait_rows(done + len(flood), timeout=3600)
            report.append([f"flood of {len(flood)}", len(flood), t1 - t0, len(flood) / (t1 - t0), "", ""])
        report.append(["producer peak RSS (MB)", "", run.peak_rss, "", "", ""])
    finally:
        run.stop()
    print(table(report, ["measure", "images", "seconds/value", "images/s", "of limit", "accuracy"]))


if __name__ == "__main__":
    main()

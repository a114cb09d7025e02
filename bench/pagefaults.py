"""The worker's heap: forward passes with glibc's defaults against the worker's tuning.

Each configuration runs in a fresh process of its own (mallopt's settings are for the whole
process, for good), on a thread as in the worker (worker/engine.py), taking turns round by
round so a load that comes and goes weighs on both alike:

- **before**: two arenas and a ``malloc_trim(0)`` after every pass (the worker until now);
- **tuned**: ``HeapTrimmer.tune`` and its ``trim()`` after every pass (worker/heap.py).

Per configuration: ms per forward pass of ``--batch`` images, minor page faults per pass, free
memory the heap keeps, RSS; then 8 big decodes (``--big`` pixels each, in a task thread) and a
trim: the RSS they leave behind.

    python bench/pagefaults.py --rounds 3
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

from common import cpu_flags, load_average, table

MODES = ("before", "tuned")


def rss_mb() -> float:
    return int(Path("/proc/self/statm").read_text().split()[1]) * 4096 / 2**20


def child(mode: str, batch: int, passes: int, big: int) -> dict[str, float]:
    import ctypes

    import numpy as np
    import torch
    from PIL import Image

    from model import Net
    from worker.heap import HeapTrimmer

    heap = HeapTrimmer()
    if mode == "tuned":
        heap.tune(batch)
    else:
        heap._libc.mallopt(-8, 2)  # type: ignore[union-attr]  # M_ARENA_MAX, as the worker did

        def trim_always() -> None:
            ctypes.CDLL("libc.so.6").malloc_trim(0)

        heap.trim = trim_always  # type: ignore[method-assign]
    torch.set_num_threads(2)
    net = Net().eval()
    x = torch.rand(batch, 1, 28, 28)
    out: dict[str, float] = {}

    def forward() -> None:
        for i in range(passes + 2):
            if i == 2:  # two passes to warm up
                f0, t0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt, time.perf_counter()
            with torch.inference_mode():
                net(x)
            heap.trim()  # after each task, as the worker does
        out["ms"] = (time.perf_counter() - t0) * 1000 / passes
        out["faults"] = (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0) / passes

    t = threading.Thread(target=forward)
    t.start()
    t.join()
    out["free_mb"] = (heap.free_bytes() or 0) / 2**20
    out["rss_mb"] = rss_mb()
    side = int(big**0.5)
    noise = np.random.default_rng(0).integers(0, 255, (side, side, 3), dtype=np.uint8)
    path = Path(f"/tmp/mnistq-pagefaults-{mode}.png")
    Image.fromarray(noise).save(path, compress_level=0)

    def decode() -> None:
        for _ in range(8):
            with Image.open(path) as im:
                im.convert("L").load()
        heap.trim()

    t = threading.Thread(target=decode)
    t.start()
    t.join()
    path.unlink()
    out["rss_after_big_mb"] = rss_mb()
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=3, help="turns per configuration (default: %(default)s)")
    p.add_argument("--batch", type=int, default=256, help="images per forward pass (default: %(default)s)")
    p.add_argument("--passes", type=int, default=8, help="passes measured per turn (default: %(default)s)")
    p.add_argument(
        "--big", type=int, default=12_000_000, help="pixels of each big decode (default: %(default)s)"
    )
    p.add_argument("--child", choices=MODES, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args.batch, args.passes, args.big)))
        return
    print(f"CPU: {cpu_flags()}; load average {load_average()}")
    got: dict[str, list[dict[str, float]]] = {m: [] for m in MODES}
    for r in range(args.rounds):
        for mode in MODES:
            cmd = [sys.executable, __file__, "--child", mode, "--batch", str(args.batch),
                   "--passes", str(args.passes), "--big", str(args.big)]  # fmt: skip
            got[mode].append(
                json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout)
            )
        print(f"round {r + 1}: " + "; ".join(f"{m} {got[m][-1]['ms']:.1f} ms" for m in MODES), flush=True)
    base = statistics.median(g["ms"] for g in got["before"])
    rows = []
    for mode in MODES:
        g = got[mode]
        ms = statistics.median(x["ms"] for x in g)
        rows.append([
            mode, f"{ms:.1f}", f"{min(x['ms'] for x in g):.1f}-{max(x['ms'] for x in g):.1f}",
            f"{base / ms:.2f}x", f"{statistics.median(x['faults'] for x in g):,.0f}",
            f"{statistics.median(x['free_mb'] for x in g):.0f}", f"{statistics.median(x['rss_mb'] for x in g):.0f}",
            f"{statistics.median(x['rss_after_big_mb'] for x in g):.0f}",
        ])  # fmt: skip
    print()
    header = ["heap", f"ms/pass of {args.batch}", "range", "speed-up", "faults/pass", "free kept MB",
              "RSS MB", "RSS after 8 big decodes + trim"]  # fmt: skip
    print(table(rows, header))
    print(f"load average at the end: {load_average()}")


if __name__ == "__main__":
    main()

"""What one hostile-but-legal image costs: time and peak memory, ours against another tree.

Three inputs made here: a 1000 x 39,000 PNG strip (~200 KB, under the 40 Mpx limit), the same
three at once in three threads (a worker's task threads), and a progressive JPEG whose last scan
is repeated 3,000 times. Each is read by ``load_images`` in a fresh process per tree, so every
figure is measured side by side in one run. ``--worker`` adds the peak memory (VmHWM) of
`mnistq run --drain --workers 1`'s worker over three MNIST-sized files and over three strips.

    python bench/image_cost.py --tree /tmp/before --tree .   # e.g. git worktree add /tmp/before HEAD~3
"""

from __future__ import annotations

import argparse
import io
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from common import REPO, cpu_flags, load_average, table
from PIL import Image, ImageDraw

# Prints "seconds peak_MB outcome..." for load_images of argv[2:] in argv[1] threads at once.
PROBE = """
import sys, threading, time
from mnistq.images import load_images
threads, paths, out = int(sys.argv[1]), sys.argv[2:], []
t = time.perf_counter()
ts = [threading.Thread(target=lambda: out.extend(load_images(paths))) for _ in range(threads)]
for x in ts: x.start()
for x in ts: x.join()
# VmHWM, not ru_maxrss: that one starts from the forking parent's peak
peak = next(int(x.split()[1]) for x in open('/proc/self/status') if x.startswith('VmHWM')) // 1024
kinds = sorted({type(x).__name__ if isinstance(x, Exception) else 'array' for x in out})
print(f"{time.perf_counter() - t:.2f} {peak} {','.join(kinds)}")
"""


def seven(size: tuple[int, int], mode: str = "RGB") -> Image.Image:
    im = Image.new(mode, size, "white")
    w, h = size
    s = min(w, h) // 3
    line = [
        (w // 2 - s // 2, h // 2 - s // 2),
        (w // 2 + s // 2, h // 2 - s // 2),
        (w // 2 - s // 4, h // 2 + s),
    ]
    ImageDraw.Draw(im).line(line, fill="black", width=max(2, s // 6))
    return im


def make(folder: Path) -> dict[str, Path]:
    strip, small, jpeg = folder / "strip.png", folder / "small.png", folder / "hostile.jpg"
    seven((1000, 39_000)).save(strip)
    seven((28, 28), "L").save(small)
    buf = io.BytesIO()
    seven((2000, 2000)).save(buf, "JPEG", progressive=True, quality=90)
    data = buf.getvalue()
    last, end = data.rfind(b"\xff\xda"), data.rfind(b"\xff\xd9")
    jpeg.write_bytes(data[:end] + data[last:end] * 3000 + data[end:])
    return {"strip": strip, "small": small, "jpeg": jpeg}


def env_for(tree: Path) -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(tree)}


def probe(tree: Path, threads: int, paths: list[Path]) -> list[str]:
    out = subprocess.run(
        [sys.executable, "-c", PROBE, str(threads), *map(str, paths)],
        env=env_for(tree),
        capture_output=True,
        text=True,
        timeout=600,
        check=True,
    )
    return out.stdout.split()


def worker_peak(tree: Path, files: list[Path], folder: Path) -> int:
    """The highest VmHWM (MB) of `mnistq run`'s worker processes while it drains ``files``."""
    shutil.rmtree(folder, ignore_errors=True)
    (folder / "inbox").mkdir(parents=True)
    for i, f in enumerate(files):
        shutil.copy(f, folder / "inbox" / f"{i}-{f.name}")
    cmd = [sys.executable, "-c", "import sys; from app.cli import main; sys.exit(main())"]
    run = subprocess.Popen(
        [*cmd, "run", "--drain", "--workers", "1"],
        cwd=folder,
        env=env_for(tree),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    peak = 0

    def watch() -> None:
        nonlocal peak
        while run.poll() is None:
            for status in Path("/proc").glob("[0-9]*/status"):
                try:
                    text = status.read_text()
                    cmdline = (status.parent / "cmdline").read_bytes()
                except OSError:
                    continue
                if b"worker" in cmdline and f"PPid:\t{run.pid}" in text:
                    kb = next(
                        (int(line.split()[1]) for line in text.splitlines() if line.startswith("VmHWM")), 0
                    )
                    peak = max(peak, kb // 1024)
            time.sleep(0.1)

    t = threading.Thread(target=watch)
    t.start()
    run.wait(timeout=600)
    t.join()
    return peak


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--tree", action="append", type=Path, help="source tree to run (repeat; default: this one)"
    )
    p.add_argument("--worker", action="store_true", help="also measure mnistq run's worker (default: off)")
    args = p.parse_args()
    trees = [t.resolve() for t in args.tree or [REPO]]
    print(f"CPU flags: {cpu_flags()}; load {load_average()}")
    tmp = Path(tempfile.mkdtemp(prefix="image-cost-"))
    try:
        files = make(tmp)
        rows: list[list[object]] = []
        for tree in trees:
            for name, threads, paths in [
                ("1000x39000 PNG strip", 1, [files["strip"]]),
                ("three strips at once (3 threads)", 3, [files["strip"]]),
                ("progressive JPEG, last scan x3000", 1, [files["jpeg"]]),
            ]:
                seconds, peak, outcome = probe(tree, threads, paths)
                rows.append([tree.name or str(tree), name, seconds, peak, outcome])
            if args.worker:
                for name, f in [("worker: 3 MNIST-sized files", "small"), ("worker: 3 strips", "strip")]:
                    rows.append([tree.name, name, "", worker_peak(tree, [files[f]] * 3, tmp / "run"), ""])
        print(table(rows, ["tree", "input", "seconds", "peak MB", "outcome"]))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()

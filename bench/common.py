"""Shared pieces of the benchmarks: real MNIST as PNG files, and the in-process limit."""

from __future__ import annotations

import os
import time
from pathlib import Path

import numpy as np
from PIL import Image

from mnistq.images import load_image
from mnistq.settings import Settings
from trainer.data import load_split

REPO = Path(__file__).resolve().parent.parent
DATA = REPO.parent / "shared" / "data"


def export_pngs(folder: Path, n: int, split: str = "test", data_dir: Path = DATA) -> dict[Path, int]:
    """The first n images of a split as PNG files named INDEX_LABEL.png: {path: label}."""
    x, y, _ = load_split(data_dir, split)
    folder.mkdir(parents=True, exist_ok=True)
    out = {}
    for i in range(min(n, len(x))):
        path = folder / f"{i:05d}_{int(y[i])}.png"
        Image.fromarray(x[i, 0].numpy()).save(path)
        out[path] = int(y[i])
    return out


def label_of(path: str | Path) -> int:
    return int(Path(path).stem.rsplit("_", 1)[1])


def in_process(paths: list[Path], batch: int = 256, threads: int = 0) -> tuple[float, float]:
    """One process decodes the PNGs and runs the model (best precision), no queue.

    Returns (seconds, accuracy).
    """
    from worker.engine import Engine

    engine = Engine(Settings(threads=threads, model=Settings.from_env().model))
    correct = 0
    t0 = time.perf_counter()
    for i in range(0, len(paths), batch):
        chunk = paths[i : i + batch]
        probs = engine.infer(np.stack([load_image(p) for p in chunk])).probs
        correct += sum(int(p.argmax()) == label_of(q) for p, q in zip(probs, chunk, strict=True))
    return time.perf_counter() - t0, correct / len(paths)


def cores() -> int:
    return len(os.sched_getaffinity(0))


def table(rows: list[list[object]], header: list[str]) -> str:
    cells = [header, *[[f"{c:,.2f}" if isinstance(c, float) else str(c) for c in r] for r in rows]]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    lines = ["  ".join(c.rjust(w) for c, w in zip(r, widths, strict=True)) for r in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def rows(csv_path: Path) -> int:
    """Rows in a results CSV (header excluded), counted cheaply."""
    try:
        with open(csv_path, "rb") as f:
            return max(0, f.read().count(b"\r\n") - 1)
    except FileNotFoundError:
        return 0

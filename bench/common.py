"""Shared pieces of the benchmarks: real MNIST as PNG files, the in-process limits (raw and ours),
a results CSV's rows counted cheaply."""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import dataclass
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


class RowCounter:
    """Rows in a results CSV that only grows, read incrementally: a look costs one ``fstat``
    while nothing changed, and reads only the new bytes otherwise (a benchmark that re-read
    the whole file every half millisecond would steal the CPU it measures)."""

    def __init__(self, csv_path: Path) -> None:
        self.path, self._fd, self._lines = Path(csv_path), -1, 0
        self._at = 0

    def __call__(self) -> int:
        if self._fd < 0:
            try:
                self._fd = os.open(self.path, os.O_RDONLY)
            except FileNotFoundError:
                return 0
        size = os.fstat(self._fd).st_size
        if size > self._at:
            data = os.pread(self._fd, size - self._at, self._at)
            # Only whole lines: a read can end inside a write, between a row's \r and its \n,
            # and that row would never be counted.
            whole = data.rfind(b"\n") + 1
            self._lines += data.count(b"\r\n", 0, whole)
            self._at += whole
        return max(0, self._lines - 1)

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


@dataclass
class Limit:
    """One process, no queue: decode the files, run the model in batches (best precision)."""

    name: str
    seconds: float
    decode_s: float  # of which decoding (and, for ours, normalising)
    accuracy: float
    images: int

    @property
    def rate(self) -> float:
        return self.images / self.seconds

    @classmethod
    def mean(cls, a: Limit, b: Limit) -> Limit:
        """Two measures of the same limit as one (their mean time)."""
        return cls(a.name, (a.seconds + b.seconds) / 2, (a.decode_s + b.decode_s) / 2, a.accuracy, a.images)


def pil_decode(path: Path) -> np.ndarray:
    """The simplest decode there is: PIL, to 8-bit gray."""
    with Image.open(path) as im:
        return np.asarray(im.convert("L"))


def limit(name: str, paths: list[Path], decode: Callable[[Path], np.ndarray], batch: int = 256) -> Limit:
    """``decode`` every file, in batches of ``batch``, each batch then through the model (bf16 +
    channels_last where the hardware runs bf16 natively, as the workers do)."""
    import torch

    from model import load_checkpoint, pick_device, pick_precision, predict_logits, prepare

    ckpt = load_checkpoint(Settings.from_env().model)
    device = pick_device("auto")
    precision = pick_precision(device, "auto")
    model = prepare(ckpt.model, device)
    mean, std = float(ckpt.meta["mean"]), float(ckpt.meta["std"])
    predict_logits(model, torch.zeros(8, 1, 28, 28), mean, std, device, precision)  # warm-up
    correct, decode_s = 0, 0.0
    t0 = time.perf_counter()
    for i in range(0, len(paths), batch):
        chunk = paths[i : i + batch]
        d0 = time.perf_counter()
        x = torch.from_numpy(np.stack([decode(p) for p in chunk])).unsqueeze(1)
        decode_s += time.perf_counter() - d0
        digits = predict_logits(model, x, mean, std, device, precision).argmax(1).tolist()
        correct += sum(d == label_of(q) for d, q in zip(digits, chunk, strict=True))
    return Limit(name, time.perf_counter() - t0, decode_s, correct / len(paths), len(paths))


def raw_limit(paths: list[Path]) -> Limit:
    """What the simplest code gets: PIL's decode + the model."""
    return limit("raw limit: PIL convert('L') + model", paths, pil_decode)


def our_limit(paths: list[Path]) -> Limit:
    """Our decode and MNIST-style normalisation (mnistq.images.load_image) + the model."""
    return limit("our limit: load_image + model", paths, load_image)


def load_average() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def cpu_flags() -> str:
    """The CPU features that decide the model's precision (bf16 natively, AMX tiles)."""
    try:
        flags = Path("/proc/cpuinfo").read_text().split()
    except OSError:
        return "?"
    found = sorted({f for f in flags if f == "avx512_bf16" or f.startswith("amx")})
    return " ".join(found) or "no avx512_bf16/amx"

"""MNIST as whole tensors: read torchvision's raw IDX files once, keep them resident."""

from __future__ import annotations

import gzip
import hashlib
import logging
from pathlib import Path

import numpy as np
import torch

from mnistq.errors import MnistqError

log = logging.getLogger(__name__)
DEFAULT_DATA_DIR = Path.home() / ".cache" / "mnistq" / "data"
FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}


def read_idx(path: Path) -> np.ndarray:
    """IDX (LeCun's format): magic 0 0 dtype ndim, big-endian dims, then raw uint8 data."""
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        data = f.read()
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] != 0x08:
        raise MnistqError(f"{path}: not an unsigned-byte IDX file")
    ndim = data[3]
    dims = [int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)]
    body = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim)
    if body.size != int(np.prod(dims)):
        raise MnistqError(f"{path}: expected {dims} values, found {body.size}")
    return body.reshape(dims)


def _find(raw: Path, name: str) -> Path | None:
    for candidate in (raw / name, raw / f"{name}.gz"):
        if candidate.is_file():
            return candidate
    return None


def ensure_downloaded(data_dir: Path) -> None:
    """Where the files are missing, let torchvision fetch them (needs internet)."""
    raw = data_dir / "MNIST" / "raw"
    if all(_find(raw, n) for pair in FILES.values() for n in pair):
        return
    log.info("MNIST not found under %s; downloading with torchvision", raw)
    from torchvision.datasets import MNIST

    try:
        MNIST(root=str(data_dir), train=True, download=True)
        MNIST(root=str(data_dir), train=False, download=True)
    except Exception as e:  # network errors come in many types; all mean the same here
        raise MnistqError(
            f"MNIST is not under {raw} and could not be downloaded ({e}); pass --data-dir"
        ) from None


def load_split(data_dir: Path, split: str) -> tuple[torch.Tensor, torch.Tensor, str]:
    """Images as uint8 [N, 1, 28, 28], labels int64 [N], and a sha256 of both files."""
    raw = Path(data_dir) / "MNIST" / "raw"
    paths = [_find(raw, n) for n in FILES[split]]
    if None in paths:
        raise MnistqError(f"MNIST {split} files not found under {raw}")
    h = hashlib.sha256()
    arrays = []
    for p in paths:
        assert p is not None
        a = read_idx(p)
        h.update(a.tobytes())
        arrays.append(a)
    images, labels = arrays
    if images.ndim != 3 or labels.shape[0] != images.shape[0]:
        raise MnistqError(f"MNIST {split}: {images.shape[0]} images but {labels.shape[0]} labels")
    x = torch.from_numpy(images.copy()).unsqueeze(1)
    y = torch.from_numpy(labels.astype(np.int64))
    return x, y, h.hexdigest()[:16]

"""MNIST as whole tensors: read torchvision's raw IDX files once, keep them resident."""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import io
import logging
import os
import shutil
import tempfile
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import torch

from mnistq.errors import ConfigError, MnistqError

log = logging.getLogger(__name__)
DEFAULT_DATA_DIR = Path.home() / ".cache" / "mnistq" / "data"
#: --data-dir's help, for `mnistq train` and `mnistq evaluate` alike
DATA_DIR_HELP = (
    "folder with MNIST's IDX files (train-images-idx3-ubyte, train-labels-idx1-ubyte, "
    "t10k-images-idx3-ubyte, t10k-labels-idx1-ubyte, each may be .gz) in DIR/MNIST/raw "
    "(torchvision's layout), DIR/raw or DIR itself. They are downloaded (torchvision, needs "
    "internet) only into the default folder or a folder that does not exist or is empty; "
    f"nothing is ever written into a folder with anything in it (default: {DEFAULT_DATA_DIR})"
)
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


def _needed(splits: Iterable[str]) -> list[str]:
    return [name for split in splits for name in FILES[split]]


def candidates(data_dir: Path) -> list[Path]:
    """Where the files may be: torchvision's DIR/MNIST/raw, or DIR pointed at .../MNIST or
    .../MNIST/raw itself (so pointing at the files works, and nothing is created inside them)."""
    return [data_dir / "MNIST" / "raw", data_dir / "raw", data_dir]


def locate(data_dir: Path, splits: Iterable[str] = ("train", "test")) -> Path | None:
    """The folder that holds every file of ``splits``, or None."""
    names = _needed(splits)
    return next((raw for raw in candidates(data_dir) if all(_find(raw, n) for n in names)), None)


def not_found(data_dir: Path, splits: Iterable[str] = ("train", "test"), why: str = "") -> ConfigError:
    """One line: which files, which layout, where we looked (and why nothing was fetched)."""
    looked = ", ".join(str(c) for c in candidates(data_dir))
    return ConfigError(
        f"MNIST not found: wanted {', '.join(_needed(splits))} (each may end in .gz) in "
        f"DIR/MNIST/raw (torchvision's layout; DIR/raw or DIR itself will do too), "
        f"looked in {looked}{why}"
    )


def _is_empty(folder: Path) -> bool:
    return not folder.exists() or (folder.is_dir() and not any(folder.iterdir()))


def find(
    data_dir: Path | None, splits: Iterable[str] = ("train", "test"), default: Path = DEFAULT_DATA_DIR
) -> Path:
    """The folder holding MNIST's files for ``splits``, downloaded first where that is ours to do.

    Downloads (torchvision, needs internet) only into the default folder (``data_dir`` None) or
    into a folder that does not exist or is empty: a folder with anything in it is the user's,
    and nothing is written there. A failed download leaves nothing behind.
    """
    splits = tuple(splits)
    folder = default if data_dir is None else Path(data_dir)
    found = locate(folder, splits)
    if found is not None:
        return found
    if data_dir is not None and not _is_empty(folder):
        raise not_found(folder, splits, "; nothing downloaded into a folder that is not empty")
    _download(folder)
    found = locate(folder, splits)
    if found is None:
        raise not_found(folder, splits, "; the download did not bring them")
    return found


def _download(folder: Path) -> None:
    """torchvision's MNIST into ``folder``/MNIST/raw, via a temporary folder: all or nothing."""
    created = [p for p in (folder, *folder.parents) if not p.exists()]
    log.info("MNIST not found in %s: downloading it with torchvision", folder)
    folder.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".mnist-download-", dir=folder))
    try:
        from torchvision.datasets import MNIST

        # torchvision prints its own progress and errors: ours is the one line below.
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            for train in (True, False):
                MNIST(root=str(tmp), train=train, download=True)
        raw = folder / "MNIST" / "raw"
        raw.mkdir(parents=True, exist_ok=True)
        for name in _needed(FILES):
            got = _find(tmp / "MNIST" / "raw", name)
            if got is not None:
                os.replace(got, raw / got.name)
    except Exception as e:  # network errors come in many types; all mean the same here
        lines = [x.strip() for x in str(e).splitlines() if x.strip()]
        reason = lines[-1] if lines else type(e).__name__
        raise not_found(folder, ("train", "test"), f"; downloading failed: {reason}") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        for path in created:  # deepest first; leave no empty folders behind
            with contextlib.suppress(OSError):
                path.rmdir()  # only succeeds where nothing arrived


def load_split(data_dir: Path, split: str) -> tuple[torch.Tensor, torch.Tensor, str]:
    """Images as uint8 [N, 1, 28, 28], labels int64 [N], and a sha256 of both files.

    ``data_dir`` in any layout ``locate`` knows; nothing is downloaded here (see ``find``).
    """
    raw = locate(Path(data_dir), (split,))
    if raw is None:
        raise not_found(Path(data_dir), (split,))
    paths = [_find(raw, n) for n in FILES[split]]
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


def hold_out(
    x: torch.Tensor, y: torch.Tensor, n: int
) -> tuple[tuple[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]:
    """((train images, labels), (held-out images, labels)): the last ``n`` images, at most a fifth
    of the set (so a small set still trains), are held out; training never sees them."""
    n = min(n, len(x) // 5)
    cut = len(x) - n
    return (x[:cut], y[:cut]), (x[cut:], y[cut:])

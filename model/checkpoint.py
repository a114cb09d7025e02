"""Checkpoints: atomic, weights_only-safe, versioned by a hash of weights and calibration."""

from __future__ import annotations

import hashlib
import json
import os
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from mnistq.errors import ModelError
from model.calibration import Calibration
from model.net import ARCH, Net


def weights_version(state: dict[str, torch.Tensor], calibration: Calibration | None = None) -> str:
    """Short content hash of the weights and their calibration: the model's version on every
    result. An uncalibrated checkpoint hashes its weights alone, as before calibration existed."""
    h = hashlib.sha256()
    for name in sorted(state):
        t = state[name].detach().to("cpu", torch.float32).contiguous()
        h.update(name.encode())
        h.update(t.numpy().tobytes())
    if calibration is not None and calibration.fitted:
        h.update(json.dumps(calibration.to_meta(), sort_keys=True).encode())
    return h.hexdigest()[:12]


def save_checkpoint(path: Path, state: dict[str, torch.Tensor], meta: dict[str, Any]) -> str:
    """Write atomically (temp file in the same folder + rename): readers never see half a file."""
    state = {k: v.detach().to("cpu").clone() for k, v in state.items()}
    version = weights_version(state, Calibration.from_meta(meta))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        umask = os.umask(0)
        os.umask(umask)
        os.fchmod(fd, 0o644 & ~umask)  # mkstemp makes 0600; workers may run as another user
        with os.fdopen(fd, "wb") as f:
            torch.save({"model": state, "meta": {**meta, "version": version}}, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return version


@dataclass
class Checkpoint:
    model: Net
    meta: dict[str, Any]
    version: str
    path: Path
    calibration: Calibration


def _load_failure(e: Exception) -> str:
    """torch.load's failure in a few words: its own text can be a page long, with ANSI escapes."""
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(e)).strip()
    if text.startswith("Weights only load failed"):
        return "it holds Python objects, not only weights (mnist-queue loads weights only)"
    first = (text.splitlines() or [""])[0]
    first = first if len(first) <= 120 else first[:117] + "..."
    # a bare key or number (KeyError('101')) says nothing without its kind
    detail = f"{type(e).__name__}: {first}" if first else type(e).__name__
    return f"damaged or truncated? ({detail})"


def load_checkpoint(path: Path | str) -> Checkpoint:
    """Load with ``weights_only=True``; any problem becomes one clear ModelError."""
    path = Path(path)
    if path.is_dir():
        raise ModelError(f"model path is a directory, not a file: {path}")
    if not path.is_file():
        raise ModelError(f"model file not found: {path} (train one with `mnistq train`)")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises many types for a damaged file; all mean "not usable"
        raise ModelError(f"{path}: not a readable PyTorch checkpoint: {_load_failure(e)}") from None
    if not isinstance(ckpt, dict) or "model" not in ckpt or "meta" not in ckpt:
        raise ModelError(f"{path}: not an mnist-queue checkpoint (expected 'model' and 'meta' entries)")
    state, meta = ckpt["model"], dict(ckpt["meta"])
    if meta.get("arch") != ARCH:
        raise ModelError(f"{path}: architecture {meta.get('arch')!r}, expected {ARCH!r}")
    try:  # every user of the model normalises with these: a file without them is unusable
        float(meta["mean"]), float(meta["std"])
    except (KeyError, TypeError, ValueError):
        raise ModelError(f"{path}: no usable normalisation constants (meta 'mean' and 'std')") from None
    model = Net()
    try:
        model.load_state_dict(state)
    except (RuntimeError, TypeError, AttributeError) as e:
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise ModelError(f"{path}: weights do not fit the model: {reason[:120]}") from None
    model.eval()
    calibration = Calibration.from_meta(meta)
    version = weights_version(model.state_dict(), calibration)
    if meta.get("version") not in (None, version):
        raise ModelError(f"{path}: weights do not match their recorded version (corrupt file?)")
    return Checkpoint(model=model, meta=meta, version=version, path=path, calibration=calibration)

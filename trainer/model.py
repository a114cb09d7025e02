"""The seed's CNN, checkpoints (atomic, weights_only-safe, versioned) and precision choice."""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import tempfile
from contextlib import AbstractContextManager, nullcontext
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from mnistq.errors import ModelError

ARCH = "seed-cnn-3conv-v1"
MNIST_MEAN = 0.1307
MNIST_STD = 0.3081


class Net(nn.Sequential):
    """The layers of the original write-up, unchanged."""

    def __init__(self) -> None:
        super().__init__(
            nn.Conv2d(1, 32, 3),
            nn.ReLU(),
            nn.Conv2d(32, 64, 3),
            nn.ReLU(),
            nn.Conv2d(64, 64, 3),
            nn.ReLU(),
            nn.Flatten(),
            nn.Linear(64 * 22 * 22, 10),
        )


@dataclass(frozen=True)
class Calibration:
    """How a model's logits become the served confidence and the review decision.

    Fitted by ``mnistq train`` on held-out training digits and stored in the checkpoint's
    ``meta["calibration"]``; part of the model's version (a new temperature or threshold is a new
    version). A checkpoint without it is served at temperature 1 with no recommendation.

    - ``temperature``: confidence and probabilities are ``softmax(logits / temperature)``;
    - ``review_below``: the recommended P: a calibrated confidence under it sends a file to review;
    - ``digit_score_below``: an image whose digit score (``digit_score``) is under it is judged
      not a digit (None: no such judgement).
    """

    temperature: float = 1.0
    review_below: float | None = None
    digit_score_below: float | None = None
    fitted: bool = False

    @classmethod
    def from_meta(cls, meta: dict[str, Any]) -> Calibration:
        raw = meta.get("calibration")
        if not isinstance(raw, dict):
            return cls()

        def num(key: str) -> float | None:
            v = raw.get(key)
            return None if v is None else float(v)

        t = num("temperature") or 1.0
        if not (math.isfinite(t) and t > 0):
            raise ModelError(f"calibration temperature must be a positive number, not {t!r}")
        return cls(t, num("review_below"), num("digit_score_below"), fitted=True)

    def to_meta(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if k != "fitted"}

    def probs(self, logits: torch.Tensor) -> torch.Tensor:
        """Calibrated class probabilities, [N, 10] (float32)."""
        return torch.softmax(logits.float() / self.temperature, dim=1)

    def digit_score(self, logits: torch.Tensor) -> torch.Tensor:
        """How much the image looks like any digit: ``T * logsumexp(logits / T) - mean(logits)``,
        the negative free energy measured from the logits' mean (T times the cross-entropy of
        the calibrated probabilities to the uniform distribution). Training pushes non-digits
        towards uniform (outlier exposure), so this is what it learns to keep low; it caught more
        generated non-digits at the same share of digits than the free energy, the top logit or
        the top probability did. Higher is more digit-like; [N] float32."""
        t = self.temperature
        z = logits.float()
        return t * torch.logsumexp(z / t, dim=1) - z.mean(dim=1)

    def not_digit(self, logits: torch.Tensor) -> torch.Tensor:
        """[N] bool: judged not a digit (all False without a stored threshold)."""
        if self.digit_score_below is None:
            return torch.zeros(len(logits), dtype=torch.bool)
        return self.digit_score(logits) < self.digit_score_below


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


def pick_device(name: str = "auto") -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise ModelError("device cuda requested but CUDA is not available")
    return torch.device(name)


def bf16_supported(device: torch.device) -> bool:
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    # avx512_bf16 / AMX: oneDNN runs bf16 convolutions natively; elsewhere bf16 is emulated and slow.
    return bool(torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported())


def pick_precision(device: torch.device, name: str = "auto") -> str:
    if name == "auto":
        return "bf16" if bf16_supported(device) else "fp32"
    if name not in ("bf16", "fp32"):
        raise ModelError(f"precision must be auto, bf16 or fp32, not {name!r}")
    return name


def autocast(device: torch.device, precision: str) -> AbstractContextManager[Any]:
    if precision == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return nullcontext()


def prepare(
    model: nn.Module, device: torch.device, fmt: torch.memory_format = torch.channels_last
) -> nn.Module:
    """channels_last lets oneDNN / cuDNN pick their fast convolution kernels."""
    return model.to(device).to(memory_format=fmt)  # one call would not type-check


def train_memory_format(device: torch.device, precision: str) -> torch.memory_format:
    """channels_last for training with bf16 or on CUDA; plain NCHW for fp32 on a CPU.

    Measured on a 2-core AVX2 EPYC (fp32 only): oneDNN's channels_last backward passes ran
    ~15% slower than NCHW, while its channels_last inference ran ~10% faster.
    """
    if precision == "bf16" or device.type == "cuda":
        return torch.channels_last
    return torch.contiguous_format


def micro_batch(device: torch.device, precision: str, batch: int) -> int:
    """Images per forward/backward pass in training. fp32 on a CPU: 64, whose activations fit
    the cache (2 x 64 with accumulated gradients ran ~15% faster than 1 x 128 on a 2-core EPYC).
    bf16 halves the activations and ran faster with larger batches, and a GPU wants them whole."""
    if device.type == "cpu" and precision == "fp32":
        return min(64, batch)
    return batch


def inference_chunk(device: torch.device, precision: str) -> int:
    """Images per forward pass. fp32 on a CPU: 64, which keeps the activations in cache (one pass
    of 256 ran 1.5-1.9x slower per image than passes of 64 on a 2-core AVX2 EPYC). bf16 on a CPU
    keeps the 256 it was measured with; a GPU wants passes large."""
    if device.type == "cpu":
        return 64 if precision == "fp32" else 256
    return 1024


@torch.inference_mode()
def predict_logits(
    model: nn.Module,
    x: torch.Tensor,
    mean: float,
    std: float,
    device: torch.device,
    precision: str,
    batch: int | None = None,
) -> torch.Tensor:
    """Logits [N, 10] (float32, on the CPU) for images in [0, 1] (float) or 0..255 (uint8),
    [N, 1, 28, 28]. Runs in chunks of ``batch`` images, by default the device's ``inference_chunk``.
    """
    batch = batch or inference_chunk(device, precision)
    out = []
    for i in range(0, len(x), batch):
        xb = x[i : i + batch].to(device, non_blocking=True)
        xb = xb.float().div_(255.0) if xb.dtype == torch.uint8 else xb.float()
        xb = ((xb - mean) / std).contiguous(memory_format=torch.channels_last)
        with autocast(device, precision):
            logits = model(xb)
        out.append(logits.float().cpu())
    return torch.cat(out) if out else torch.empty(0, 10)


def predict_probs(
    model: nn.Module,
    x: torch.Tensor,
    mean: float,
    std: float,
    device: torch.device,
    precision: str,
    batch: int | None = None,
    calibration: Calibration | None = None,
) -> torch.Tensor:
    """Class probabilities [N, 10]: ``predict_logits`` through the calibration (temperature 1
    when none is given)."""
    logits = predict_logits(model, x, mean, std, device, precision, batch)
    return (calibration or Calibration()).probs(logits)

"""Where `mnistq train` writes its model: never silently over a better one.

The default output is the shipped model's own path, which running workers hot-reload. So the
checkpoint already there is measured on the same test set as the new one, and a new model that
reads fewer test digits right goes beside it (``model_state.new.pt``), not over it, unless the
user says ``--force``. Every outcome says what was replaced or kept: versions and accuracies.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

import model as model_lib
from mnistq.errors import ConfigError, ModelError
from mnistq.protocol import ExitCode

#: `mnistq train`'s exit status when it kept the better model already at --out
KEPT_EXIT = ExitCode.MODEL


def beside(out: Path) -> Path:
    """Where a model that lost goes: ``model_state.pt`` -> ``model_state.new.pt``."""
    return out.with_name(f"{out.stem}.new{out.suffix}")


def previous(out: Path, force: bool) -> model_lib.Checkpoint | None:
    """The checkpoint at ``out`` now (None if there is none); checked before training starts.

    A file there that is not one of our checkpoints is not replaced without ``--force``: it may
    be anything, and hours of training should not end in finding that out.
    """
    if not out.exists():
        return None
    try:
        return model_lib.load_checkpoint(out)
    except ModelError as e:
        if force:
            return None
        raise ConfigError(
            f"--out {out} exists and is not a usable mnist-queue checkpoint ({e}); "
            "choose another path, or --force to replace it"
        ) from None


def accuracy(
    ckpt: model_lib.Checkpoint, x: torch.Tensor, y: torch.Tensor, device: torch.device, precision: str
) -> float:
    model = model_lib.prepare(ckpt.model, device)
    probs = model_lib.predict_probs(model, x, ckpt.meta["mean"], ckpt.meta["std"], device, precision)
    return float((probs.argmax(1) == y).float().mean())


@dataclass
class Outcome:
    path: Path  # where the new model went
    version: str
    kept: bool  # True: the better model at --out stayed, the new one went beside it
    message: str


def publish(
    out: Path,
    state: dict[str, torch.Tensor],
    meta: dict[str, Any],
    old: model_lib.Checkpoint | None,
    old_accuracy: float | None,
    force: bool,
) -> Outcome:
    """Write the new model to ``out``, or beside it when the one there reads more digits right."""
    new_accuracy = float(meta["test_accuracy"])
    lower = old is not None and old_accuracy is not None and new_accuracy < old_accuracy
    target = beside(out) if lower and not force else out
    version = model_lib.save_checkpoint(target, state, meta)
    new = f"version {version} ({new_accuracy:.2%})"
    if old is None:
        return Outcome(target, version, False, f"wrote {target}: {new}")
    was = f"version {old.version} ({old_accuracy:.2%} on the same test set)"
    if target != out:
        return Outcome(
            target,
            version,
            True,
            f"kept {out}: {was} reads more test digits right than the new {new}, "
            f"which went to {target} instead (--force replaces it)",
        )
    how = " (--force, although lower)" if lower else ""
    return Outcome(target, version, False, f"replaced {out}{how}: {was} -> {new}")

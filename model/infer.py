"""Inference: logits and calibrated probabilities for a batch of images."""

from __future__ import annotations

import torch
from torch import nn

from model.calibration import Calibration
from model.device import autocast, inference_chunk


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

"""Calibration: how a model's logits become the served confidence and the review decision
(applying a fitted temperature; fitting it is the trainer's, trainer/calibrate.py)."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

import torch

from mnistq.errors import ModelError


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

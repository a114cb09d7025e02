"""Outlier exposure for `mnistq train`: generated non-digits in every batch, with uniform targets.

The training family of trainer/nondigits.py (never the evaluation family) is generated once at
the start (``calibrate.outlier_bank``), with digits printed in the same font and labelled
(``calibrate.printed_bank``), so that the font does not mark a non-digit; a few of them join
every batch of digits (``mix``) before the augmentation. The loss (``backward_in_passes``): the
digits' cross-entropy plus a weight times the non-digits' cross-entropy to the uniform
distribution (Hendrycks et al., 2019).
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from model import autocast
from trainer import calibrate


def add_arguments(p: argparse.ArgumentParser) -> None:
    """`mnistq train`'s options for outlier exposure: --outliers, --printed, --outlier-batch and
    --outlier-weight."""
    a = p.add_argument
    a(
        "--outliers",
        type=int,
        default=24000,
        help="generated non-digits (trainer/nondigits.py's training family; at most one per "
        "training digit) made once at the start and mixed into every batch with uniform targets "
        "(outlier exposure), 0 to disable (default: %(default)s)",
    )
    a(
        "--printed",
        type=int,
        default=5000,
        help="digits rendered in the non-digits' font, labelled, among the non-digits (at most "
        "as many), so that the font does not mark a non-digit; 0 for none (default: %(default)s)",
    )
    a(
        "--outlier-batch",
        type=int,
        default=32,
        help="non-digits and printed digits added to each batch of --batch-size digits "
        "(default: %(default)s)",
    )
    a(
        "--outlier-weight",
        type=float,
        default=0.5,
        help="weight of the non-digits' cross-entropy to the uniform distribution (default: %(default)s)",
    )


@dataclass(frozen=True)
class Extras:
    """The images added to the batches: non-digits (label -1), then printed digits (their own label)."""

    images: torch.Tensor  # uint8 [n, 1, 28, 28], on the training device
    labels: torch.Tensor  # int64 [n], on the training device
    outliers: int  # how many non-digits
    printed: int  # how many printed digits


def extras(
    outliers: int, printed: int, seed: int, x_train: torch.Tensor, y_train: torch.Tensor, device: torch.device
) -> Extras:
    """Up to ``outliers`` non-digits, their halves cut from ``x_train`` (training images only:
    never the held-out ones), and up to ``printed`` printed digits, for ``seed``."""
    # no more non-digits than digits: a small set (a test's) is not buried under them
    bank = calibrate.outlier_bank(min(outliers, len(x_train)), seed, x_train, y_train)
    printed_images, printed_y = calibrate.printed_bank(min(printed, len(bank)), seed)
    images = torch.cat([bank, printed_images]).to(device)
    labels = torch.cat([torch.full((len(bank),), -1), printed_y]).to(device)
    return Extras(images, labels, len(bank), len(printed_images))


def mix(
    xb: torch.Tensor, yb: torch.Tensor, extra: Extras, n: int, gen: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """The batch with ``n`` of the extras drawn at random (``gen``) after its digits; unchanged
    for ``n`` 0. The augmentation comes after, so it cannot tell the two apart."""
    if not n:
        return xb, yb
    pick = torch.randint(len(extra.images), (n,), device=extra.images.device, generator=gen)
    return torch.cat([xb, extra.images[pick]]), torch.cat([yb, extra.labels[pick]])


def backward_in_passes(
    model: torch.nn.Module,
    xb: torch.Tensor,
    yb: torch.Tensor,
    micro: int,
    label_smoothing: float,
    device: torch.device,
    precision: str,
    outlier_weight: float = 0.5,
) -> torch.Tensor:
    """Gradients of the batch's loss, accumulated over passes of ``micro`` images.

    The loss: the mean cross-entropy of the digits, plus ``outlier_weight`` times the mean
    cross-entropy to the uniform distribution of the non-digits (label -1; outlier exposure,
    Hendrycks et al., 2019). The same gradients as one pass over the whole batch (up to
    rounding): a cache-sized pass is a speed choice, not a change of recipe. Returns the batch's
    loss, detached.
    """
    outlier = yb < 0
    n_out = int(outlier.sum())
    n_digits = len(yb) - n_out
    total = torch.zeros((), device=xb.device)
    for xc, yc in zip(xb.split(micro), yb.split(micro), strict=True):
        out_c = yc < 0
        with autocast(device, precision):
            logits = model(xc)
        loss = torch.zeros((), device=xb.device)
        if n_digits and not out_c.all():
            ce = F.cross_entropy(logits[~out_c], yc[~out_c], label_smoothing=label_smoothing, reduction="sum")
            loss = loss + ce / n_digits
        if n_out and out_c.any():
            z = logits[out_c].float()
            uniform = (torch.logsumexp(z, 1) - z.mean(1)).sum()  # cross-entropy to 1/10 each
            loss = loss + outlier_weight * uniform / n_out
        loss.backward()
        total += loss.detach()
    return total

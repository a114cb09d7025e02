"""Calibration: a temperature fitted on held-out digits, and the thresholds that send a file to review.

Temperature scaling (Guo et al., 2017) divides the logits by one number T, fitted to minimise
the negative log-likelihood of held-out digits the model never trained on. It changes no
argmax, only how sure the confidence says the model is. Label smoothing trains a model to say
~0.95 on a clean digit; T < 1 turns that back into a probability.

Review: a file goes to review when its digit score is under ``digit_score_below`` (not a digit)
or its calibrated confidence is under P. ``choose_thresholds`` spends a budget of held-out digits
(1.5% by default, `mnistq train --review-budget`) between the two so that as many held-out non-digits of the *training* family
(fresh ones, never trained on) as possible are caught; the evaluation family stays unseen.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from model import MNIST_MEAN, MNIST_STD, Calibration, predict_logits
from trainer import nondigits

ECE_BINS = 15


def nll(probs: torch.Tensor, labels: torch.Tensor) -> float:
    """Mean negative log-likelihood of the true class."""
    p = probs.gather(1, labels[:, None]).clamp_min(1e-12)
    return float(-p.log().mean())


def ece(probs: torch.Tensor, labels: torch.Tensor, bins: int = ECE_BINS) -> float:
    """Expected calibration error: confidence (the top probability) in ``bins`` equal-width bins
    over [0, 1]; the weighted mean of |accuracy - mean confidence| over the bins."""
    conf, pred = probs.max(1)
    right = (pred == labels).float()
    # bin b holds (b/bins, (b+1)/bins]; a confidence of exactly 0 joins the first bin
    which = (conf * bins).ceil().long().clamp(1, bins) - 1
    total = 0.0
    for b in range(bins):
        inside = which == b
        if inside.any():
            total += float(inside.float().mean()) * abs(float(right[inside].mean() - conf[inside].mean()))
    return total


def fit_temperature(logits: torch.Tensor, labels: torch.Tensor) -> float:
    """The T minimising the NLL of softmax(logits / T): golden-section search on log T, where
    the NLL is unimodal; deterministic, and needs no learning rate."""
    logits = logits.float()

    def loss(log_t: float) -> float:
        return float(torch.nn.functional.cross_entropy(logits / math.exp(log_t), labels))

    lo, hi = math.log(0.05), math.log(20.0)
    g = (math.sqrt(5) - 1) / 2
    a, b = hi - g * (hi - lo), lo + g * (hi - lo)
    fa, fb = loss(a), loss(b)
    for _ in range(60):  # the interval shrinks by 0.618 each step: ~1e-12 of log T at the end
        if fa < fb:
            hi, b, fb = b, a, fa
            a = hi - g * (hi - lo)
            fa = loss(a)
        else:
            lo, a, fa = a, b, fb
            b = lo + g * (hi - lo)
            fb = loss(b)
    return math.exp((lo + hi) / 2)


def to_review(cal: Calibration, logits: torch.Tensor, review_below: float | None) -> torch.Tensor:
    """[N] bool, the serving rule: judged not a digit, or calibrated confidence under P
    (``review_below``; None: the confidence sends nothing)."""
    flagged = cal.not_digit(logits)
    if review_below is not None:
        flagged = flagged | (cal.probs(logits).max(1).values < review_below)
    return flagged


@dataclass(frozen=True)
class Choice:
    review_below: float
    digit_score_below: float | None
    digits_to_review: float  # share of the held-out digits sent to review
    outliers_to_review: float  # share of the held-out training-family non-digits


def _cut_below(values: torch.Tensor, k: int) -> float:
    """A threshold with exactly the ``k`` smallest of ``values`` under it (midway to the next)."""
    v = values.sort().values
    if k <= 0:
        return float(v[0]) - 1e-6 if len(v) else 0.0
    if k >= len(v):
        return float(v[-1]) + 1e-6
    return float(v[k - 1] + v[k]) / 2


#: the lowest recommended P: under it, a digit read is more likely wrong than right
MIN_REVIEW_BELOW = 0.5


def choose_thresholds(
    temperature: float, digits: torch.Tensor, outliers: torch.Tensor, budget: float = 0.015
) -> Choice:
    """Split ``budget`` (the share of held-out digits sent to review) between the digit-score
    threshold and P (at least ``MIN_REVIEW_BELOW`` where the budget has room for that), to catch
    the most held-out non-digits. ``digits``/``outliers``: logits."""
    n = len(digits)
    allowed = int(budget * n)
    base = Calibration(temperature)
    d_score = base.digit_score(digits)
    d_conf = base.probs(digits).max(1).values
    best: Choice | None = None
    for k in range(allowed + 1):  # k digits judged not a digit by the score, the rest by P
        score_cut = None if k == 0 else _cut_below(d_score, k)
        left = ~Calibration(temperature, None, score_cut).not_digit(digits)
        p = min(max(_cut_below(d_conf[left], allowed - int((~left).sum())), 0.0), 1.0)
        if int((d_conf[left] < MIN_REVIEW_BELOW).sum()) + int((~left).sum()) <= allowed:
            p = max(p, MIN_REVIEW_BELOW)  # the floor, where the budget has room for it
        cal = Calibration(temperature, p, score_cut)
        caught = float(to_review(cal, outliers, p).float().mean()) if len(outliers) else 0.0
        if best is None or caught > best.outliers_to_review + 1e-9:
            best = Choice(p, score_cut, float(to_review(cal, digits, p).float().mean()), caught)
    assert best is not None
    return best


def fit(
    digits: torch.Tensor, labels: torch.Tensor, outliers: torch.Tensor, budget: float = 0.015
) -> tuple[Calibration, Choice]:
    """The checkpoint's calibration from held-out digits (logits, labels) and non-digits (logits)."""
    t = fit_temperature(digits, labels)
    choice = choose_thresholds(t, digits, outliers, budget)
    return Calibration(t, round(choice.review_below, 6), choice.digit_score_below, fitted=True), choice


def outlier_bank(n: int, seed: int, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """``n`` training-family non-digits, uint8 [n, 1, 28, 28] like the digits; halves are cut
    from ``x`` (training images only: never the held-out ones)."""
    if n == 0:
        return torch.empty((0, 1, 28, 28), dtype=torch.uint8)
    bank = nondigits.training_bank(n, seed, x[:, 0].numpy(), y.numpy())
    return torch.from_numpy(bank).unsqueeze(1)


def printed_bank(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` digits in the training family's font, uint8 [n, 1, 28, 28], and their labels."""
    images, labels = nondigits.printed_digits(n, seed)
    return torch.from_numpy(images).unsqueeze(1), torch.from_numpy(labels.astype(np.int64))


#: fresh training-family non-digits for choosing the thresholds (a seed the bank never uses)
CHOICE_OUTLIERS, CHOICE_SEED = 3000, 7_777_777


def after_training(
    model: nn.Module,
    held: tuple[torch.Tensor, torch.Tensor],
    train: tuple[torch.Tensor, torch.Tensor],
    seed: int,
    budget: float,
    device: torch.device,
    precision: str,
) -> Calibration | None:
    """Fit the calibration on the held-out digits and print it; None without held-out digits."""
    x_hold, y_hold = held
    if len(x_hold) == 0:
        print("no held-out digits (--holdout 0): the model is stored uncalibrated (temperature 1)")
        return None
    logits = predict_logits(model, x_hold, MNIST_MEAN, MNIST_STD, device, precision)
    fresh = outlier_bank(CHOICE_OUTLIERS, CHOICE_SEED + seed, *train)
    outlier_logits = predict_logits(model, fresh, MNIST_MEAN, MNIST_STD, device, precision)
    cal, choice = fit(logits, y_hold.cpu(), outlier_logits, budget)
    before, after = Calibration().probs(logits), cal.probs(logits)
    y = y_hold.cpu()
    score = "none" if cal.digit_score_below is None else f"{cal.digit_score_below:.3f}"
    print(
        f"calibration on {len(y)} held-out digits: temperature {cal.temperature:.4f}, "
        f"NLL {nll(before, y):.4f} -> {nll(after, y):.4f}, ECE {ece(before, y):.2%} -> {ece(after, y):.2%}"
    )
    print(
        f"review: recommended P {cal.review_below:.4f}, not a digit below digit score {score}: "
        f"{choice.digits_to_review:.2%} of held-out digits and {choice.outliers_to_review:.2%} of "
        f"{len(fresh)} fresh training-family non-digits go to review"
    )
    return cal

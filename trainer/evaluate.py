"""`mnistq evaluate`: a checkpoint on the MNIST test set: accuracy, calibration, review figures.

Calibration: ECE (15 equal-width bins) and NLL of the confidence before (temperature 1) and after
the checkpoint's calibration. Review: for several P, the share of test digits a run would send
to review (judged not a digit, or calibrated confidence under P) and the error rate of the rest,
beside the share of generated non-digits (trainer/nondigits.py's evaluation family, which
training never sees) sent there: the figures to choose ``--review-below P`` from.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mnistq.settings import Settings
from model import Calibration, load_checkpoint, pick_device, pick_precision, predict_logits, prepare
from trainer import data, nondigits
from trainer.calibrate import ece, nll, to_review

#: the thresholds of the review table, beside the checkpoint's recommended one
REVIEW_PS = (0.5, 0.7, 0.8, 0.9, 0.95, 0.99)


def confusion(pred: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return torch.bincount(y * 10 + pred, minlength=100).reshape(10, 10)


def _share(mask: torch.Tensor) -> float | None:
    return float(mask.float().mean()) if len(mask) else None


def review_table(
    cal: Calibration, logits: torch.Tensor, y: torch.Tensor, other: torch.Tensor
) -> list[dict[str, Any]]:
    """One row per P: digits sent to review, the error rate of the digits left, non-digits sent."""
    ps = sorted({*REVIEW_PS, *([cal.review_below] if cal.review_below is not None else [])})
    wrong = logits.argmax(1) != y
    rows = []
    for p in ps:
        sent = to_review(cal, logits, p)
        rows.append(
            {
                "p": p,
                "recommended": p == cal.review_below,
                "digits_to_review": _share(sent),
                "error_rate_rest": _share(wrong[~sent]),
                "nondigits_to_review": _share(to_review(cal, other, p)),
            }
        )
    return rows


def _pct(v: float | None, digits: int = 2) -> str:
    return "-" if v is None else f"{v:.{digits}%}"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="mnistq evaluate", description=__doc__.splitlines()[0])
    p.add_argument(
        "--model",
        type=Path,
        default=None,
        help="checkpoint (default: MNISTQ_MODEL or the shipped model_state.pt)",
    )
    p.add_argument("--data-dir", type=Path, default=None, help=data.DATA_DIR_HELP)
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"], help="default: %(default)s")
    p.add_argument(
        "--precision", default="auto", choices=["auto", "bf16", "fp32"], help="default: %(default)s"
    )
    p.add_argument(
        "--nondigits",
        type=int,
        default=3000,
        help="evaluation-family non-digits to generate, 0 for none (default: %(default)s)",
    )
    p.add_argument("--seed", type=int, default=0, help="seed of the non-digits (default: %(default)s)")
    p.add_argument("--json", action="store_true", help="end with one JSON object on the last line")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    ckpt = load_checkpoint(args.model or Settings.from_env().model)
    device = pick_device(args.device)
    precision = pick_precision(device, args.precision)
    x, y, digest = data.load_split(data.find(args.data_dir, ("test",)), "test")
    model = prepare(ckpt.model, device)
    mean, std = ckpt.meta["mean"], ckpt.meta["std"]
    logits = predict_logits(model, x, mean, std, device, precision)
    cal = ckpt.calibration
    pred = logits.argmax(1)
    cm = confusion(pred, y)
    acc = float((pred == y).float().mean())
    per_class = (cm.diag().float() / cm.sum(1).clamp(min=1).float()).tolist()
    raw, calibrated = Calibration().probs(logits), cal.probs(logits)

    print(f"model {ckpt.path} version {ckpt.version} ({ckpt.meta.get('arch')}), {device} {precision}")
    print(f"test accuracy: {acc:.2%} ({int((pred == y).sum())}/{len(y)}), data set {digest}")
    print("per class:   " + "  ".join(f"{d}:{a:.1%}" for d, a in enumerate(per_class)))
    print("confusion matrix (rows: true digit, columns: predicted)")
    print("      " + "".join(f"{d:>6}" for d in range(10)))
    for d in range(10):
        print(f"{d:>6}" + "".join(f"{int(v):>6}" for v in cm[d]))
    if cal.fitted:
        print(
            f"calibration: temperature {cal.temperature:.4f}, recommended P {cal.review_below}, "
            f"not a digit below digit score {cal.digit_score_below}"
        )
    else:
        print("calibration: none (an uncalibrated checkpoint: temperature 1, no recommended P)")
    print(f"ECE (15 bins): {ece(raw, y):.2%} uncalibrated, {ece(calibrated, y):.2%} calibrated")
    print(f"NLL:           {nll(raw, y):.4f} uncalibrated, {nll(calibrated, y):.4f} calibrated")

    other, kinds = torch.empty(0, 10), np.array([], dtype=str)
    if args.nondigits > 0:
        images, names = nondigits.evaluation_set(args.nondigits, args.seed, x[:, 0].numpy(), y.numpy())
        other = predict_logits(model, torch.from_numpy(images).unsqueeze(1), mean, std, device, precision)
        kinds = np.array(names)
    table = review_table(cal, logits, y, other)
    print(
        f"review (judged not a digit, or calibrated confidence < P): {len(y)} test digits, "
        f"{len(other)} generated non-digits (evaluation family)"
    )
    print(f"{'P':>8}  {'digits to review':>16}  {'error rate of the rest':>22}  {'non-digits to review':>20}")
    for row in table:
        mark = " (recommended)" if row["recommended"] else ""
        print(
            f"{row['p']:>8.4g}  {_pct(row['digits_to_review']):>16}  {_pct(row['error_rate_rest'], 3):>22}  "
            f"{_pct(row['nondigits_to_review'], 1):>20}{mark}"
        )
    at = cal.review_below
    sent = to_review(cal, other, at)
    by_kind = {k: _share(sent[torch.from_numpy(kinds == k)]) for k in sorted(set(kinds.tolist()))}
    digits_sent, others_sent = _share(to_review(cal, logits, at)), _share(sent)
    if at is not None:
        print(
            f"at the recommended P {at:.4g}: {_pct(digits_sent)} of test digits and "
            f"{_pct(others_sent, 1)} of non-digits go to review; by kind: "
            + ", ".join(f"{k} {_pct(v, 0)}" for k, v in by_kind.items())
        )
    if args.json:
        result = {
            "accuracy": acc,
            "model_version": ckpt.version,
            "per_class": per_class,
            "errors": int((pred != y).sum()),
            "n": len(y),
            "precision": precision,
            "device": str(device),
            "calibrated": cal.fitted,
            "temperature": cal.temperature,
            "review_below": at,
            "digit_score_below": cal.digit_score_below,
            "ece": ece(calibrated, y),
            "ece_uncalibrated": ece(raw, y),
            "nll": nll(calibrated, y),
            "nll_uncalibrated": nll(raw, y),
            "review_table": table,
            "digits_to_review": digits_sent if at is not None else None,
            "nondigits_to_review": others_sent if at is not None else None,
            "nondigits_by_kind": by_kind if at is not None else {},
            "nondigits_n": len(other),
        }
        print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""`mnistq predict IMAGE...`: classify files in this process (no queue), as the seed did.

The confidence is calibrated (the checkpoint's temperature); a line ends with why a run would
send the file to review: judged not a digit, or a confidence under the recommended P."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch

from mnistq.errors import ImageError
from mnistq.images import load_image
from mnistq.protocol import EXIT_CODES_HELP, ExitCode
from mnistq.settings import Settings
from model import Checkpoint, load_checkpoint, pick_device, pick_precision, predict_logits, prepare


def _resolved(path: Path) -> Path:
    """Links the user names are welcome here, so resolve them (load_image follows none)."""
    try:
        return path.resolve()
    except (OSError, RuntimeError):  # a link loop: load_image refuses the link itself
        return path


def verdict(ckpt: Checkpoint, not_digit: bool, confidence: float) -> str:
    """What a run would do with the file: why it goes to review, or nothing."""
    cal = ckpt.calibration
    if not_digit:
        return "; review: judged not a digit"
    if cal.review_below is not None and confidence < cal.review_below:
        return f"; review: confidence under the recommended {cal.review_below:.3g}"
    return ""


def main(argv: list[str] | None = None) -> int:
    settings = Settings.from_env()
    p = argparse.ArgumentParser(
        prog="mnistq predict", description="Classify digit images.", epilog=EXIT_CODES_HELP
    )
    p.add_argument("images", nargs="+", type=Path, help="image files (any size, mode or polarity)")
    p.add_argument("--model", type=Path, default=settings.model, help="checkpoint (default: %(default)s)")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"], help="default: %(default)s")
    p.add_argument(
        "--precision", default="auto", choices=["auto", "bf16", "fp32"], help="default: %(default)s"
    )
    p.add_argument(
        "--max-pixels",
        type=int,
        default=settings.max_pixels,
        help="refuse larger images (default: %(default)s)",
    )
    args = p.parse_args(argv)

    ckpt = load_checkpoint(args.model)
    device = pick_device(args.device)
    precision = pick_precision(device, args.precision)
    model = prepare(ckpt.model, device)
    arrays, ok, failed = [], [], 0
    for path in args.images:
        try:
            arrays.append(load_image(_resolved(path), args.max_pixels))
            ok.append(path)
        except ImageError as e:
            print(f"{path}: error: {e}", file=sys.stderr)
            failed += 1
    # an old checkpoint serves temperature 1: say so on the line itself, where it is read
    raw = "" if ckpt.calibration.fitted else ", uncalibrated"
    if arrays:
        x = torch.from_numpy(np.stack(arrays)).unsqueeze(1)
        logits = predict_logits(model, x, ckpt.meta["mean"], ckpt.meta["std"], device, precision)
        conf, digit = ckpt.calibration.probs(logits).max(1)
        odd = ckpt.calibration.not_digit(logits).tolist()
        for path, d, c, nd in zip(ok, digit.tolist(), conf.tolist(), odd, strict=True):
            note = verdict(ckpt, nd, c)
            if len(args.images) == 1:
                print(f"Predicted Digit: {d}  (confidence {c:.3f}, model {ckpt.version}{raw}){note}")
            else:
                print(f"{path}: Predicted Digit: {d}  (confidence {c:.3f}, model {ckpt.version}{raw}){note}")
    # a file that cannot be read is an ordinary outcome, as in `classify` (1 is kept for bugs)
    return int(ExitCode.FAILED_INPUT) if failed else 0


if __name__ == "__main__":
    sys.exit(main())

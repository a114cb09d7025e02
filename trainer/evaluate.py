"""`mnistq evaluate`: test-set accuracy of a checkpoint."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from mnistq.settings import Settings
from trainer import data
from trainer.model import load_checkpoint, pick_device, pick_precision, predict_probs, prepare


def confusion(pred: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return torch.bincount(y * 10 + pred, minlength=100).reshape(10, 10)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="mnistq evaluate", description="Test accuracy of a model file.")
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
    p.add_argument("--json", action="store_true", help="end with one JSON object on the last line")
    args = p.parse_args(argv)

    ckpt = load_checkpoint(args.model or Settings.from_env().model)
    device = pick_device(args.device)
    precision = pick_precision(device, args.precision)
    x, y, digest = data.load_split(data.find(args.data_dir, ("test",)), "test")
    model = prepare(ckpt.model, device)
    probs = predict_probs(model, x, ckpt.meta["mean"], ckpt.meta["std"], device, precision)
    pred = probs.argmax(1)
    cm = confusion(pred, y)
    acc = float((pred == y).float().mean())
    per_class = (cm.diag().float() / cm.sum(1).clamp(min=1).float()).tolist()

    print(f"model {ckpt.path} version {ckpt.version} ({ckpt.meta.get('arch')}), {device} {precision}")
    print(f"test accuracy: {acc:.2%} ({int((pred == y).sum())}/{len(y)}), data set {digest}")
    print("per class:   " + "  ".join(f"{d}:{a:.1%}" for d, a in enumerate(per_class)))
    print("confusion matrix (rows: true digit, columns: predicted)")
    print("      " + "".join(f"{d:>6}" for d in range(10)))
    for d in range(10):
        print(f"{d:>6}" + "".join(f"{int(v):>6}" for v in cm[d]))
    if args.json:
        print(
            json.dumps(
                {
                    "accuracy": acc,
                    "model_version": ckpt.version,
                    "per_class": per_class,
                    "errors": int((pred != y).sum()),
                    "n": len(y),
                    "precision": precision,
                    "device": str(device),
                }
            )
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())

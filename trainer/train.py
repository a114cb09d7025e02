"""`mnistq train`: the seed's layers, trained with a better recipe around them.

Kept from the seed: the layers, cross-entropy, Adam-family optimiser, 10 epochs.
Ours: the whole data set resident as one uint8 tensor (no per-sample DataLoader), AdamW with a
OneCycle schedule, label smoothing, augmentation on whole batches (shift, rotation, scale, so
off-centre real-world digits still read), an EMA of the weights, bf16 where the hardware has it.

For calibrated confidence and the "not a digit" judgement: the last --holdout training images
are never trained on; generated non-digits (trainer/nondigits.py) join every batch with uniform
targets (outlier exposure: trainer/outliers.py); after training, trainer/calibrate.py fits the
temperature and the review thresholds on the held-out images, stored in the checkpoint (and its
version).
"""

from __future__ import annotations

import argparse
import math
import platform
import sys
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch.optim.swa_utils import AveragedModel
from tqdm import tqdm

from mnistq.settings import DEFAULT_MODEL
from model import (
    ARCH,
    MNIST_MEAN,
    MNIST_STD,
    Net,
    micro_batch,
    pick_device,
    pick_precision,
    predict_probs,
    prepare,
    train_memory_format,
)
from trainer import calibrate, data, outliers, publish
from trainer.outliers import backward_in_passes


def augment(
    x: torch.Tensor, shift: float, rotate_deg: float, scale: float, gen: torch.Generator
) -> torch.Tensor:
    """Random affine per image, done for the whole batch in one grid_sample."""
    n = x.shape[0]

    def uniform(lo: float, hi: float) -> torch.Tensor:
        return torch.rand(n, generator=gen, device=gen.device).to(x.device) * (hi - lo) + lo

    angle = uniform(-rotate_deg, rotate_deg) * (math.pi / 180)
    s = uniform(1 - scale, 1 + scale)
    tx, ty = uniform(-shift, shift) / 14, uniform(-shift, shift) / 14  # pixels -> [-1, 1] units
    cos, sin = torch.cos(angle) / s, torch.sin(angle) / s
    theta = torch.stack([torch.stack([cos, -sin, tx], 1), torch.stack([sin, cos, ty], 1)], 1)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


def ema_avg(decay: float) -> Callable[[torch.Tensor, torch.Tensor, torch.Tensor | int], torch.Tensor]:
    """EMA with a warm-up: early steps average fast, so short runs are not dragged to init."""

    def avg(averaged: torch.Tensor, current: torch.Tensor, n: torch.Tensor | int) -> torch.Tensor:
        d = min(decay, (1 + float(n)) / (10 + float(n)))
        return averaged * d + current * (1 - d)

    return avg


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="mnistq train",
        description="Train the seed CNN on MNIST.",
        epilog=f"The model already at --out is measured on the same test set first. A new model "
        f"that reads fewer test digits right does not replace it: it is written beside it "
        f"(model_state.new.pt for model_state.pt) and the command exits with "
        f"{int(publish.KEPT_EXIT)}, unless --force. Exit 0: written to --out.",
    )
    a = p.add_argument
    a("--data-dir", type=Path, default=None, help=data.DATA_DIR_HELP)
    a("--epochs", type=int, default=10, help="default: %(default)s")
    a(
        "--out",
        type=Path,
        default=DEFAULT_MODEL,
        help="checkpoint to write, atomically (default: the shipped model, %(default)s)",
    )
    a("--force", action="store_true", help="replace the model at --out even if it reads more digits right")
    a("--seed", type=int, default=1, help="default: %(default)s")
    a("--device", default="auto", choices=["auto", "cpu", "cuda"], help="default: %(default)s")
    a(
        "--precision",
        default="auto",
        choices=["auto", "bf16", "fp32"],
        help="auto: bf16 where the hardware supports it (default: %(default)s)",
    )
    a("--batch-size", type=int, default=128, help="default: %(default)s")
    a(
        "--micro-batch",
        type=int,
        default=0,
        help="images per forward/backward pass within a batch (gradients accumulate, so the "
        "recipe is unchanged); 0: 64 for fp32 on a CPU, else the whole batch (default: %(default)s)",
    )
    a(
        "--lr",
        type=float,
        default=3e-3,
        help="peak learning rate of the OneCycle schedule (default: %(default)s)",
    )
    a("--weight-decay", type=float, default=5e-4, help="AdamW weight decay (default: %(default)s)")
    a("--label-smoothing", type=float, default=0.1, help="default: %(default)s")
    a(
        "--ema",
        type=float,
        default=0.999,
        help="EMA decay of the weights, 0 to disable (default: %(default)s)",
    )
    a("--shift", type=float, default=2.5, help="augmentation: max shift in pixels (default: %(default)s)")
    a(
        "--rotate",
        type=float,
        default=10.0,
        help="augmentation: max rotation in degrees (default: %(default)s)",
    )
    a(
        "--scale",
        type=float,
        default=0.1,
        help="augmentation: max relative scale change (default: %(default)s)",
    )
    a(
        "--limit",
        type=int,
        default=0,
        help="use only the first N training images (after the hold-out), 0 for all (default: %(default)s)",
    )
    a(
        "--holdout",
        type=int,
        default=5000,
        help="the last N training images are never trained on: the temperature and the review "
        "thresholds are fitted on them (at most a fifth of the set) (default: %(default)s)",
    )
    outliers.add_arguments(p)
    a(
        "--review-budget",
        type=float,
        default=0.015,
        help="share of held-out digits the recommended thresholds send to review (MNIST's test "
        "digits come out a little under it) (default: %(default)s)",
    )
    args = p.parse_args(argv)
    if args.batch_size < 1 or args.micro_batch < 0:
        p.error("--batch-size must be >= 1 and --micro-batch >= 0")
    if min(args.holdout, args.outliers, args.printed, args.outlier_batch) < 0:
        p.error("--holdout, --outliers, --printed and --outlier-batch must be >= 0")
    if not 0 <= args.review_budget < 1:
        p.error("--review-budget must be in [0, 1)")
    return args


def recipe(args: argparse.Namespace) -> dict[str, Any]:
    """The training arguments for the checkpoint (paths as text; the rest are plain values)."""
    return {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}


def train(args: argparse.Namespace) -> dict[str, Any]:
    torch.manual_seed(args.seed)
    device = pick_device(args.device)
    precision = pick_precision(device, args.precision)
    old = publish.previous(args.out, args.force)  # before hours of training, not after
    raw = data.find(args.data_dir)
    x_all, y_all, h_train = data.load_split(raw, "train")
    x_test, y_test, h_test = data.load_split(raw, "test")
    (x_train, y_train), (x_hold, y_hold) = data.hold_out(x_all, y_all, args.holdout)
    if args.limit:
        x_train, y_train = x_train[: args.limit], y_train[: args.limit]
    t_start = time.perf_counter()
    extra = outliers.extras(args.outliers, args.printed, args.seed, x_train, y_train, device)
    print(
        f"{extra.outliers} generated non-digits for outlier exposure and {extra.printed} printed digits, "
        f"{time.perf_counter() - t_start:.1f}s"
    )
    x_train, y_train = x_train.to(device), y_train.to(device)
    n = len(x_train)
    steps_per_epoch = math.ceil(n / args.batch_size)
    n_out = min(args.outlier_batch, len(extra.images))
    fmt = train_memory_format(device, precision)
    micro = args.micro_batch or micro_batch(device, precision, args.batch_size + n_out)
    print(
        f"training on {n} images ({len(x_hold)} held out), {device} {precision}, {args.epochs} epochs, "
        f"seed {args.seed}, batch {args.batch_size} + {n_out} non-digits or printed digits in passes of {micro}"
    )

    model = prepare(Net(), device, fmt)
    ema = AveragedModel(model, avg_fn=ema_avg(args.ema)) if args.ema > 0 else None
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    sched = torch.optim.lr_scheduler.OneCycleLR(
        opt, max_lr=args.lr, total_steps=args.epochs * steps_per_epoch, pct_start=0.2
    )
    gen = torch.Generator(device=device).manual_seed(args.seed)
    acc = 0.0
    for epoch in range(1, args.epochs + 1):
        model.train()
        t0 = time.perf_counter()
        order = torch.randperm(n, device=device, generator=gen)
        total_loss = torch.zeros((), device=device)
        bar = tqdm(
            range(steps_per_epoch),
            desc=f"epoch {epoch}/{args.epochs}",
            unit="batch",
            leave=False,
            disable=None,
        )
        for step in bar:
            idx = order[step * args.batch_size : (step + 1) * args.batch_size]
            # the non-digits get the same augmentation, so it cannot tell them apart
            xb, yb = outliers.mix(x_train[idx], y_train[idx], extra, n_out, gen)
            xb = augment(xb.float().div_(255.0), args.shift, args.rotate, args.scale, gen)
            xb = ((xb - MNIST_MEAN) / MNIST_STD).contiguous(memory_format=fmt)
            opt.zero_grad(set_to_none=True)
            total_loss += backward_in_passes(
                model,
                xb,
                yb,
                min(micro, len(yb)),
                args.label_smoothing,
                device,
                precision,
                args.outlier_weight,
            )
            opt.step()
            sched.step()
            if ema is not None:
                ema.update_parameters(model)
        seconds = time.perf_counter() - t0
        final = (ema.module if ema is not None else model).eval()
        probs = predict_probs(final, x_test, MNIST_MEAN, MNIST_STD, device, precision)
        acc = float((probs.argmax(1) == y_test).float().mean())
        print(
            f"epoch {epoch:2d}  loss {float(total_loss) / steps_per_epoch:.4f}  test acc {acc:.2%}  "
            f"{n / seconds:,.0f} images/s  {seconds:.0f}s"
        )

    final = (ema.module if ema is not None else model).eval()
    held = (x_hold, y_hold)
    calibration = calibrate.after_training(
        final, held, (x_train.cpu(), y_train.cpu()), args.seed, args.review_budget, device, precision
    )
    meta = {
        "arch": ARCH,
        "mean": MNIST_MEAN,
        "std": MNIST_STD,
        "test_accuracy": acc,
        "epochs": args.epochs,
        "seed": args.seed,
        "train_images": n,
        "holdout_images": len(x_hold),
        "outliers": extra.outliers,
        "printed_digits": extra.printed,
        **({"calibration": calibration.to_meta()} if calibration else {}),
        "data_sha256": {"train": h_train, "test": h_test},
        # The training arguments as plain values (nanoGPT keeps its config so): a program can read
        # them back, and torch.load(weights_only=True) still accepts the file.
        "recipe": recipe(args),
        "precision": precision,
        "device": device.type,
        "versions": {"torch": str(torch.__version__), "python": platform.python_version()},
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
    }
    old_acc = None if old is None else publish.accuracy(old, x_test, y_test, device, precision)
    outcome = publish.publish(args.out, final.state_dict(), meta, old, old_acc, args.force)
    elapsed = time.perf_counter() - t_start
    print(f"{outcome.message}, {elapsed:.0f}s")
    return {
        "accuracy": acc,
        "version": outcome.version,
        "seconds": elapsed,
        "path": outcome.path,
        "kept": outcome.kept,
        "calibration": calibration,
    }


def main(argv: list[str] | None = None) -> int:
    return int(publish.KEPT_EXIT) if train(parse_args(argv))["kept"] else 0


if __name__ == "__main__":
    sys.exit(main())

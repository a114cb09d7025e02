"""`mnistq train`: the seed's layers, trained with a better recipe around them.

Kept from the seed: the layers, cross-entropy, Adam-family optimiser, 10 epochs.
Ours: the whole data set resident as one uint8 tensor (no per-sample DataLoader), AdamW with a
OneCycle schedule, label smoothing, augmentation on whole batches (shift, rotation, scale, so
off-centre real-world digits still read), an EMA of the weights, bf16 where the hardware has it.
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
from trainer import data, publish
from trainer.model import (
    ARCH,
    MNIST_MEAN,
    MNIST_STD,
    Net,
    autocast,
    micro_batch,
    pick_device,
    pick_precision,
    predict_probs,
    prepare,
    train_memory_format,
)


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


def backward_in_passes(
    model: torch.nn.Module,
    xb: torch.Tensor,
    yb: torch.Tensor,
    micro: int,
    label_smoothing: float,
    device: torch.device,
    precision: str,
) -> torch.Tensor:
    """Gradients of the batch's mean loss, accumulated over passes of ``micro`` images.

    The same gradients as one pass over the whole batch (up to rounding): a cache-sized pass is
    a speed choice, not a change of recipe. Returns the batch's mean loss, detached.
    """
    total = torch.zeros((), device=xb.device)
    for xc, yc in zip(xb.split(micro), yb.split(micro), strict=True):
        with autocast(device, precision):
            loss = F.cross_entropy(model(xc), yc, label_smoothing=label_smoothing)
        loss = loss * (len(yc) / len(yb))
        loss.backward()
        total += loss.detach()
    return total


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
        help="use only the first N training images, 0 for all (default: %(default)s)",
    )
    args = p.parse_args(argv)
    if args.batch_size < 1 or args.micro_batch < 0:
        p.error("--batch-size must be >= 1 and --micro-batch >= 0")
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
    x_train, y_train, h_train = data.load_split(raw, "train")
    x_test, y_test, h_test = data.load_split(raw, "test")
    if args.limit:
        x_train, y_train = x_train[: args.limit], y_train[: args.limit]
    x_train, y_train = x_train.to(device), y_train.to(device)
    n = len(x_train)
    steps_per_epoch = math.ceil(n / args.batch_size)
    fmt = train_memory_format(device, precision)
    micro = min(args.micro_batch or micro_batch(device, precision, args.batch_size), args.batch_size)
    print(
        f"training on {n} images, {device} {precision}, {args.epochs} epochs, seed {args.seed}, "
        f"batch {args.batch_size} in passes of {micro}"
    )

    model = prepare(Net(), device, fmt)
    ema = AveragedModel(model, avg_fn=ema_avg(args.ema)) if args.ema > 0 else None
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    sched = torch.optim.lr_scheduler.OneCycleLR(
        opt, max_lr=args.lr, total_steps=args.epochs * steps_per_epoch, pct_start=0.2
    )
    gen = torch.Generator(device=device).manual_seed(args.seed)
    acc = 0.0
    t_start = time.perf_counter()
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
            xb = x_train[idx].float().div_(255.0)
            xb = augment(xb, args.shift, args.rotate, args.scale, gen)
            xb = ((xb - MNIST_MEAN) / MNIST_STD).contiguous(memory_format=fmt)
            opt.zero_grad(set_to_none=True)
            total_loss += backward_in_passes(
                model, xb, y_train[idx], micro, args.label_smoothing, device, precision
            )
            opt.step()
            sched.step()
            if ema is not None:
                ema.update_parameters(model)
        rate = n / (time.perf_counter() - t0)
        final = (ema.module if ema is not None else model).eval()
        probs = predict_probs(final, x_test, MNIST_MEAN, MNIST_STD, device, precision)
        acc = float((probs.argmax(1) == y_test).float().mean())
        print(
            f"epoch {epoch:2d}  loss {float(total_loss) / steps_per_epoch:.4f}  test acc {acc:.2%}  {rate:,.0f} images/s"
        )

    final = ema.module if ema is not None else model
    meta = {
        "arch": ARCH,
        "mean": MNIST_MEAN,
        "std": MNIST_STD,
        "test_accuracy": acc,
        "epochs": args.epochs,
        "seed": args.seed,
        "train_images": n,
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
    }


def main(argv: list[str] | None = None) -> int:
    return int(publish.KEPT_EXIT) if train(parse_args(argv))["kept"] else 0


if __name__ == "__main__":
    sys.exit(main())

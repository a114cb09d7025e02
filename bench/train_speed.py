"""Time one epoch of `mnistq train` against one epoch of the seed's own training loop.

The seed loop is written out here as the original had it: torchvision's MNIST dataset with
ToTensor, a DataLoader of batch 64 with shuffling, the same layers (model.Net), Adam at
lr 1e-3, cross-entropy, fp32. Both sides are timed from the start (data loading included) to a
test-set accuracy after the epoch, on the same device, in the same process. A third row times
the seed's fp32 training steps alone (random batches, no data loading): the share of the seed's
epoch that a better loop cannot remove without cheaper arithmetic.

    python bench/train_speed.py                      # one epoch each, a table
    python bench/train_speed.py --time-to-target     # also: time for ours to reach 98.74%
    python bench/train_speed.py --limit 2000         # a quick check that everything runs
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import DataLoader, Subset

import trainer.train as our_train
from model import Net, pick_device, pick_precision
from trainer import data

REPO = Path(__file__).resolve().parent.parent


class Reached(Exception):
    """Raised from inside our trainer's per-epoch evaluation once the target accuracy is met."""


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter
    )
    p.add_argument(
        "--data-dir",
        type=Path,
        default=REPO.parent / "shared" / "data",
        help="MNIST folder (default: %(default)s)",
    )
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"], help="default: %(default)s")
    p.add_argument(
        "--precision",
        default="auto",
        choices=["auto", "bf16", "fp32"],
        help="ours only; the seed is fp32 (default: %(default)s)",
    )
    p.add_argument(
        "--limit",
        type=int,
        default=0,
        help="train on the first N images only, 0 for all (default: %(default)s)",
    )
    p.add_argument("--seed", type=int, default=1, help="default: %(default)s")
    p.add_argument(
        "--time-to-target",
        action="store_true",
        help="also time ours to --target test accuracy on its 10-epoch schedule",
    )
    p.add_argument(
        "--target",
        type=float,
        default=0.9874,
        help="test accuracy for --time-to-target (default: %(default)s)",
    )
    p.add_argument(
        "--full-seed",
        action="store_true",
        help="with --time-to-target, run the seed's 10 epochs instead of estimating 10x one epoch",
    )
    return p.parse_args()


def our_args(a: argparse.Namespace, out: Path, epochs: int) -> argparse.Namespace:
    argv = ["--data-dir", str(a.data_dir), "--epochs", str(epochs), "--out", str(out), "--device", a.device]
    return our_train.parse_args(
        [*argv, "--precision", a.precision, "--seed", str(a.seed), "--limit", str(a.limit)]
    )


def run_ours(a: argparse.Namespace, out: Path) -> tuple[float, float]:
    t0 = time.perf_counter()
    result = our_train.train(our_args(a, out, 1))
    return time.perf_counter() - t0, float(result["accuracy"])


def ours_to_target(a: argparse.Namespace, out: Path, y_test: torch.Tensor) -> tuple[float, int, float]:
    """Seconds and epochs for our trainer (10-epoch schedule) to first reach a.target."""
    real = our_train.predict_probs
    accs: list[float] = []

    def watched(*args, **kwargs):
        probs = real(*args, **kwargs)
        accs.append(float((probs.argmax(1) == y_test).float().mean()))
        if accs[-1] >= a.target:
            raise Reached
        return probs

    our_train.predict_probs = watched
    t0 = time.perf_counter()
    try:
        our_train.train(our_args(a, out, 10))
    except Reached:
        pass
    finally:
        our_train.predict_probs = real
    return time.perf_counter() - t0, len(accs), accs[-1]


@torch.no_grad()
def seed_accuracy(model: nn.Module, test: DataLoader, device: torch.device) -> float:
    model.eval()
    right = total = 0
    for x, y in test:
        pred = model(x.to(device)).argmax(1).cpu()
        right += int((pred == y).sum())
        total += len(y)
    return right / total


def seed_model(device: torch.device) -> tuple[nn.Module, torch.optim.Optimizer]:
    model = Net().to(device)
    return model, torch.optim.Adam(model.parameters(), lr=1e-3)


def seed_step(model: nn.Module, opt: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor) -> None:
    """One step of the seed's loop: cross-entropy, backward, Adam."""
    opt.zero_grad()
    loss = nn.functional.cross_entropy(model(x), y)
    loss.backward()
    opt.step()


def run_seed(a: argparse.Namespace, device: torch.device, epochs: int) -> tuple[float, float]:
    """The seed's loop: (seconds for `epochs` epochs + one test evaluation, test accuracy)."""
    from torchvision import datasets, transforms

    torch.manual_seed(a.seed)
    t0 = time.perf_counter()
    tf = transforms.ToTensor()
    train_set = datasets.MNIST(str(a.data_dir), train=True, download=False, transform=tf)
    if a.limit:
        train_set = Subset(train_set, range(a.limit))
    test_set = datasets.MNIST(str(a.data_dir), train=False, download=False, transform=tf)
    loader = DataLoader(train_set, batch_size=64, shuffle=True)
    model, opt = seed_model(device)
    for _ in range(epochs):
        model.train()
        for x, y in loader:
            seed_step(model, opt, x.to(device), y.to(device))
    acc = seed_accuracy(model, DataLoader(test_set, batch_size=1000), device)
    return time.perf_counter() - t0, acc


def seed_compute_floor(device: torch.device, n: int, steps: int = 40) -> float:
    """Seconds for the seed's fp32 training steps alone (random batches of 64, no data loading),
    extrapolated to an epoch of n images: what no loop running those same fp32 steps can beat."""
    torch.manual_seed(0)
    model, opt = seed_model(device)
    x, y = torch.randn(64, 1, 28, 28, device=device), torch.randint(0, 10, (64,), device=device)
    for i in range(5 + steps):
        if i == 5:  # after oneDNN / cuDNN have picked their kernels
            if device.type == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
        seed_step(model, opt, x, y)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - t0) / (64 * steps) * n


def main() -> int:
    a = parse_args()
    device = pick_device(a.device)
    x_train, _, _ = data.load_split(a.data_dir, "train")
    _, y_test, _ = data.load_split(a.data_dir, "test")
    n = min(a.limit, len(x_train)) if a.limit else len(x_train)
    precision = pick_precision(device, a.precision)
    print(
        f"{n} training images, device {device}, {torch.get_num_threads()} threads, "
        f"torch {torch.__version__}, ours in {precision}"
    )

    with tempfile.TemporaryDirectory() as tmp:
        ours_s, ours_acc = run_ours(a, Path(tmp) / "ours.pt")
        seed_s, seed_acc = run_seed(a, device, 1)
        floor_s = seed_compute_floor(device, n)
        rows = [
            ("ours, 1 epoch", ours_s, n / ours_s, ours_acc),
            ("seed, 1 epoch", seed_s, n / seed_s, seed_acc),
            ("seed's fp32 steps alone (est.)", floor_s, n / floor_s, float("nan")),
        ]
        if a.time_to_target:
            t_s, t_epochs, t_acc = ours_to_target(a, Path(tmp) / "target.pt", y_test)
            label = (
                f"ours to {a.target:.2%} ({t_epochs} ep)"
                if t_acc >= a.target
                else "ours 10 ep (target missed)"
            )
            rows.append((label, t_s, t_epochs * n / t_s, t_acc))
            if a.full_seed:
                s10, acc10 = run_seed(a, device, 10)
                rows.append(("seed, 10 epochs", s10, 10 * n / s10, acc10))
            else:
                rows.append(("seed, 10 epochs (est. 10x)", 10 * seed_s, n / seed_s, float("nan")))

    print(f"\n{'method':<32} {'seconds':>9} {'images/s':>10} {'test acc':>9} {'x ours 1 ep':>12}")
    for name, secs, rate, acc in rows:
        acc_text = "-" if acc != acc else f"{acc:.2%}"
        print(f"{name:<32} {secs:>9.1f} {rate:>10,.0f} {acc_text:>9} {secs / ours_s:>12.2f}")
    print(
        f"\none epoch: ours is {seed_s / ours_s:.2f}x the seed's loop. The seed's loop is"
        f" {seed_s / floor_s:.2f}x its own fp32 steps alone: the most that data handling can win at the"
        " same arithmetic; beyond that only cheaper arithmetic (bf16 where native) helps."
    )
    if a.time_to_target:
        print(
            f"time to {a.target:.2%}: ours {rows[3][1]:.1f}s vs seed's 10 epochs {rows[4][1]:.1f}s"
            f" ({rows[4][1] / rows[3][1]:.1f}x faster)"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())

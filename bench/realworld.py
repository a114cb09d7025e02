"""Digits as a camera or scanner gives them, read by the seed's plain resize and by ours.

Each MNIST test digit is printed dark on light paper: scaled 3-6x, placed off-centre on a
larger canvas of uneven paper tone, blurred a little, with sensor noise, saved as JPEG. The
seed's preprocessing (grayscale, resize the whole image to 28x28, ToTensor) and ours
(mnistq/images.py) then feed the same shipped model.

    python bench/realworld.py --images 2000
    python bench/realworld.py --images 300 --upscale 8   # photos of 1-3 megapixels and more

``--upscale`` enlarges each photo before it is saved, as a camera of higher resolution would
see the same page; mnistq/images.py then decodes it small (JPEG draft mode, see MIN_SIDE).

Beside the accuracy: the expected calibration error (15 bins) of the confidence at temperature 1
and with the checkpoint's calibration, on these photos rather than on MNIST itself, and the share
a run would send to review at the checkpoint's recommended P (judged not a digit, or less sure).
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
from pathlib import Path

import numpy as np
import torch
from common import DATA, table
from PIL import Image

from mnistq.images import load_image
from mnistq.settings import Settings
from model import (
    Calibration,
    Checkpoint,
    load_checkpoint,
    pick_device,
    pick_precision,
    predict_logits,
    prepare,
)
from testsupport.photos import photograph
from trainer.calibrate import ece, to_review
from trainer.data import load_split


def seed_preprocess(path: Path) -> np.ndarray:
    """The original write-up: open, grayscale, resize to 28x28, scale to [0, 1]."""
    return np.asarray(Image.open(path).convert("L").resize((28, 28)), dtype=np.float32) / 255


def measure(args: argparse.Namespace, ckpt: Checkpoint, folder: Path) -> list[list[object]]:
    """Photograph the first ``--images`` test digits into ``folder``; a row per preprocessing."""
    x, y, _ = load_split(args.data_dir, "test")
    rng = np.random.default_rng(0)
    paths = []
    for i in range(args.images):
        path = folder / f"{i:05d}.jpg"
        photograph(x[i, 0].numpy(), rng, args.upscale).save(path, quality=90)
        paths.append(path)
    device = pick_device("auto")
    model, precision = prepare(ckpt.model, device), pick_precision(device)
    labels = y[: args.images]
    rows = []
    for name, prep in (
        ("seed: plain resize", seed_preprocess),
        ("ours: MNIST-style normalisation", load_image),
    ):
        batch = torch.from_numpy(np.stack([prep(q) for q in paths])).unsqueeze(1)
        logits = predict_logits(model, batch, ckpt.meta["mean"], ckpt.meta["std"], device, precision)
        accuracy = float((logits.argmax(1) == labels).float().mean())
        raw, calibrated = (
            ece(Calibration().probs(logits), labels),
            ece(ckpt.calibration.probs(logits), labels),
        )
        sent = float(to_review(ckpt.calibration, logits, ckpt.calibration.review_below).float().mean())
        rows.append([name, args.images, f"{accuracy:.2%}", f"{raw:.2%}", f"{calibrated:.2%}", f"{sent:.2%}"])
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--images", type=int, default=2000, help="test digits to photograph (default: %(default)s)"
    )
    p.add_argument("--data-dir", type=Path, default=DATA, help="MNIST folder (default: %(default)s)")
    p.add_argument(
        "--upscale", type=float, default=1.0, help="enlarge each photo this much (default: %(default)s)"
    )
    p.add_argument(
        "--model", type=Path, default=None, help="checkpoint (default: MNISTQ_MODEL or the shipped model)"
    )
    args = p.parse_args()
    ckpt = load_checkpoint(args.model or Settings.from_env().model)
    folder = Path(tempfile.mkdtemp(prefix="mnistq-photos-"))
    try:
        rows = measure(args, ckpt, folder)
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    cal = ckpt.calibration
    print(
        f"model {ckpt.version}, temperature {cal.temperature:.4f}" + ("" if cal.fitted else " (uncalibrated)")
    )
    headers = ["preprocessing", "images", "accuracy", "ECE (T=1)", "ECE (calibrated)", "to review"]
    print(table(rows, headers))


if __name__ == "__main__":
    main()

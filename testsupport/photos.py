"""Digits as a camera or scanner gives them: the real-world images the figures are measured on.

One generator, shared by ``bench/realworld.py`` (accuracy and calibration on such photos) and
the tests that hold the fast normalisation to the reference on the same photos, so both read
exactly the images the figures name (same generator, same seed).
"""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageFilter


def photograph(digit: np.ndarray, rng: np.random.Generator, upscale: float = 1.0) -> Image.Image:
    """An MNIST digit (28x28 uint8, light on dark) printed dark on light paper and photographed.

    Scaled 3-6x, placed off-centre on a larger canvas of uneven paper tone, blurred a little,
    with sensor noise; ``upscale`` enlarges the photo as a camera of higher resolution would.
    """
    scale = rng.uniform(3, 6)
    size = round(28 * scale)
    ink = Image.fromarray(digit).resize((size, size), Image.Resampling.BICUBIC)
    w, h = size + int(rng.integers(40, 200)), size + int(rng.integers(40, 160))
    ramp = np.linspace(rng.uniform(0.7, 0.85), rng.uniform(0.85, 0.95), w, dtype=np.float32)
    paper = np.tile(ramp, (h, 1))
    x, y = int(rng.integers(0, w - size)), int(rng.integers(0, h - size))
    strokes = np.asarray(ink, dtype=np.float32) / 255
    paper[y : y + size, x : x + size] *= 1 - 0.85 * strokes  # dark ink on light paper
    im = Image.fromarray((np.clip(paper, 0, 1) * 255).astype(np.uint8)).filter(ImageFilter.GaussianBlur(1.0))
    noisy = np.asarray(im, dtype=np.float32) + rng.normal(0, 6, (h, w))
    photo = Image.fromarray(np.clip(noisy, 0, 255).astype(np.uint8)).convert("RGB")
    if upscale != 1.0:
        photo = photo.resize((round(w * upscale), round(h * upscale)), Image.Resampling.BICUBIC)
    return photo

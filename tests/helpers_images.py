"""Test helpers: tiny IDX data sets, clean digit images, and running the `mnistq` command.

A plain module next to the tests (tests/ is not a package): pytest's default "prepend" import
mode puts this folder on sys.path, so tests import it as ``from helpers_images import ...``.

The digit images are rendered from Pillow's bundled font (``ImageFont.load_default(size=...)``,
FreeType) and passed through ``mnistq.images.normalise``, so they exist on every machine without
the MNIST files. The shipped model reads each digit in ``DIGITS`` as itself with a calibrated confidence
> 0.9 (as served; the stroke widths below were picked, on an earlier model, by sweeping widths
0-11 for every digit and keeping the middle of a range that classifies confidently). Digits left out (1 has a flag and reads as 7, the font's 4, 6, 9
and 3 are below 0.9) are still fine for the synthetic training set.
"""

from __future__ import annotations

import functools
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from mnistq.images import normalise

REPO_ROOT = Path(__file__).resolve().parent.parent
SHIPPED_MODEL = REPO_ROOT / "model_state.pt"
#: The real MNIST files (MNIST/raw/ below it), for the tests that need them: MNISTQ_TEST_DATA, else
#: ../shared/data beside the checkout. (Not MNISTQ_DATA_DIR: Compose uses that name for the host's.)
REAL_DATA = Path(os.environ.get("MNISTQ_TEST_DATA") or REPO_ROOT.parent / "shared" / "data").expanduser()

GLYPH_SIZE = 112
#: digit -> stroke width (pixels at GLYPH_SIZE) that the shipped model reads confidently
STROKES = {0: 8, 2: 5, 5: 1, 7: 3, 8: 0}
DIGITS = tuple(sorted(STROKES))


def write_idx(path: str | os.PathLike[str], array: np.ndarray) -> Path:
    """Write an unsigned-byte IDX file: 0, 0, 0x08, ndim, big-endian uint32 dims, raw bytes."""
    a = np.ascontiguousarray(array, dtype=np.uint8)
    header = bytes([0, 0, 0x08, a.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in a.shape)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(header + a.tobytes())
    return path


def render_glyph(digit: int, stroke: int, size: int = GLYPH_SIZE) -> Image.Image:
    """The digit in Pillow's bundled font, white on black, on a canvas twice the font size."""
    font = ImageFont.load_default(size=size)
    im = Image.new("L", (2 * size, 2 * size), 0)
    ImageDraw.Draw(im).text(
        (size // 2, size // 4), str(digit), fill=255, font=font, stroke_width=stroke, stroke_fill=255
    )
    return im


def _to_mnist(im: Image.Image) -> np.ndarray:
    a = normalise(np.asarray(im, dtype=np.float32) / 255.0)
    return np.round(a * 255.0).astype(np.uint8)


@functools.cache
def _digit_image(d: int) -> np.ndarray:
    return _to_mnist(render_glyph(d, STROKES[d]))


def digit_image(d: int) -> np.ndarray:
    """A clean 28x28 uint8 MNIST-style image (ink bright on black) of digit ``d`` in ``DIGITS``."""
    if d not in STROKES:
        raise ValueError(f"no confidently classified rendering of {d}; use one of {DIGITS}")
    return _digit_image(d).copy()


def make_tiny_mnist(
    tmpdir: str | os.PathLike[str], n_train: int = 300, n_test: int = 100, seed: int = 0
) -> Path:
    """A small synthetic MNIST (all ten digits, jittered font renderings) in torchvision's layout.

    Returns ``tmpdir``, to pass as ``--data-dir``: files are ``tmpdir/MNIST/raw/*-ubyte``.
    """
    rng = np.random.default_rng(seed)
    strokes = (0, 3, 6)
    glyphs = np.stack([[_to_mnist(render_glyph(d, s, 56)) for s in strokes] for d in range(10)])
    raw = Path(tmpdir) / "MNIST" / "raw"

    def split(n: int) -> tuple[np.ndarray, np.ndarray]:
        labels = (np.arange(n) % 10).astype(np.uint8)
        rng.shuffle(labels)
        images = np.empty((n, 28, 28), dtype=np.uint8)
        for i, d in enumerate(labels):
            g = glyphs[d, rng.integers(len(strokes))].astype(np.float32)
            g = np.roll(g, tuple(rng.integers(-2, 3, size=2)), axis=(0, 1))
            g = g * rng.uniform(0.7, 1.0) + rng.normal(0.0, 6.0, size=g.shape)
            images[i] = np.clip(g, 0, 255).astype(np.uint8)
        return images, labels

    for prefix, n in (("train", n_train), ("t10k", n_test)):
        images, labels = split(n)
        write_idx(raw / f"{prefix}-images-idx3-ubyte", images)
        write_idx(raw / f"{prefix}-labels-idx1-ubyte", labels)
    return Path(tmpdir)


def mnistq_command() -> list[str]:
    """The installed `mnistq` console script of this interpreter's environment."""
    exe = shutil.which("mnistq", path=str(Path(sys.executable).parent)) or shutil.which("mnistq")
    if exe:
        return [exe]
    from helpers import MNISTQ  # imported here: helpers imports this module

    return MNISTQ


def run_mnistq(
    *args: str | os.PathLike[str], cwd: str | os.PathLike[str] | None = None, timeout: float = 110
) -> subprocess.CompletedProcess[str]:
    """Run `mnistq ARGS...` with no MNISTQ_* settings inherited from the caller's environment."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("MNISTQ_")}
    return subprocess.run(
        [*mnistq_command(), *map(str, args)],
        capture_output=True,
        text=True,
        cwd=cwd,
        env=env,
        timeout=timeout,
    )

"""Generated images that are not digits, in the form the worker serves (``mnistq.images.normalise``).

Two families made by different generators, so that what the model was trained on (outlier
exposure, ``mnistq train --outliers``) is not what it is measured on (``mnistq evaluate``):

- TRAINING (``training_bank``; its generators are here): letters and symbols in Pillow's
  embedded font (Aileron, ``ImageFont.load_default``), light ink on a dark 56 px canvas, slanted
  and rotated, stroke widths like a pen's; pen scribbles (one random walk with momentum); blob
  textures (smoothed noise, thresholded); MNIST *training* digits cut in half across (top or
  bottom half kept, the cut up to 15% of the ink's height off its centre), two in seven of the
  bank (the hardest kind). ``printed_digits``: digits rendered as its letters are.
- EVALUATION (``evaluation_set``; its generators, and the shapes they leave out, are in
  trainer/nondigits_eval.py): letters and symbols (with Greek and other Unicode signs) in
  Debian's DejaVu fonts, dark ink on lighter, uneven paper of 64-128 px; tangles and hatching;
  textures (stripes, checkers, dot grids); shapes; MNIST *test* digits cut in half lengthwise
  (left or right half kept).

Left out of both, because a person could read them as a digit (``LOOKALIKES``): 0 O o D Q,
Greek theta and omicron; 1 I l i | ! / \\ ( ) [ ] ' ` , . : ; (thin marks); 2 Z z ?; 5 S s $ §;
6 b G, Greek delta and sigma, ∂; 8 B ß & and Greek beta; 9 g q. Halves that keep a digit's shape
(``HALVES_SKIP``): any half of a 1; the top and bottom of an 8, the top of a 9 and the bottom of
a 6 (a loop: a 0); the right half of a 3, 4, 7, 8 or 9 and the left half of a 5 or 6 (the side
that carries the digit). Whatever made it, an image whose ink is tall and thin (narrower than
``THIN`` of its height: a 1) is dropped, and blanks that ``normalise`` refuses are skipped: the
worker gives those a "no digit" error row, not a review.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from mnistq.errors import ImageError
from mnistq.images import normalise
from trainer.nondigits_eval import dejavu_text, pattern, scribble, shape

# Greek letters that look like Latin ones are here on purpose (hence the noqa)
LOOKALIKES = set("0123456789OoDQΘθΟοIliIΙι|!/\\()[]'`,.;:ZzΖ?SsΣ$§bGδσ∂BßβΒ&gq")  # noqa: RUF001
LETTERS = [c for c in "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz" if c not in LOOKALIKES]
SYMBOLS = [c for c in '"#%*+-<=>@^_{}~' if c not in LOOKALIKES]
#: Signs DejaVu has and Pillow's font lacks: the evaluation set's symbols go beyond the training's
UNICODE = [c for c in "αγλμπφψωΩΔΛΠΦΨ★♥♣♠♪→←↑↓⇒∞≠±×÷€£¥©®√∫∑≈✓✗☺" if c not in LOOKALIKES]  # noqa: RUF001
DEJAVU = Path("/usr/share/fonts/truetype/dejavu")
THIN = 0.4  # ink narrower than this share of its height reads as a 1

Gen = Callable[[np.random.Generator], np.ndarray]


def dejavu_fonts() -> list[str]:
    """The DejaVu font files here (Debian's fonts-dejavu-core/-extra), or [] when absent."""
    return sorted(str(p) for p in DEJAVU.glob("DejaVu*.ttf") if "MathTeX" not in p.name)


# --- the training family (the evaluation family's generators: trainer/nondigits_eval.py) ------


def _as_gray(im: Image.Image) -> np.ndarray:
    return np.asarray(im, dtype=np.float32) / 255.0


@functools.cache
def _pil_font(size: int) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    return ImageFont.load_default(size=size)


def _slant(im: Image.Image, rng: np.random.Generator, shear: float, degrees: float) -> Image.Image:
    """Handwriting leans: a shear and a small rotation, about the centre."""
    s = rng.uniform(-shear, shear)
    h = im.size[1]
    im = im.transform(im.size, Image.Transform.AFFINE, (1, s, -s * h / 2, 0, 1, 0), Image.Resampling.BILINEAR)
    return im.rotate(rng.uniform(-degrees, degrees), Image.Resampling.BILINEAR)


def _pil_render(rng: np.random.Generator, text: str) -> np.ndarray:
    """``text`` in Pillow's font at a handwriting-like size, stroke, slant and rotation."""
    size = int(rng.integers(9, 22)) * 2
    im = Image.new("L", (56, 56), 0)
    pos = (28 - size * 0.3 * len(text), 28 - size * 0.6)
    stroke = int(rng.integers(0, 1 + size // 12))
    ImageDraw.Draw(im).text(pos, text, fill=255, font=_pil_font(size), stroke_width=stroke, stroke_fill=255)
    return _as_gray(_slant(im, rng, 0.35, 12))


def _pil_text(chars: list[str]) -> Gen:
    def gen(rng: np.random.Generator) -> np.ndarray:
        return _pil_render(rng, "".join(rng.choice(chars, size=int(rng.choice([1, 1, 1, 2])))))

    return gen


def printed_digits(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """``n`` digits rendered as the training family's letters are (uint8 [n, 28, 28]) and their
    labels. Trained on as digits beside the non-digits, they keep the font and the rendering
    from becoming the mark of a non-digit: without them, clean digits typed in Pillow's font
    were judged not digits."""
    rng = np.random.default_rng(seed)
    labels = np.arange(n) % 10
    out = np.empty((n, 28, 28), dtype=np.uint8)
    for i, d in enumerate(labels):
        for _ in range(100):
            a = served(_pil_render(rng, str(d)))
            if a is not None or d == 1:  # a printed 1 is tall and thin, and that is right here
                break
        if a is None:
            a = normalise(_pil_render(rng, str(d)))
        out[i] = np.round(a * 255).astype(np.uint8)
    return out, labels


def _walk_scribble(rng: np.random.Generator) -> np.ndarray:
    """A pen moving with momentum: its heading turns a little at every step."""
    im = Image.new("L", (56, 56), 0)
    heading, x, y = rng.uniform(0, 2 * math.pi), 28.0, 28.0
    points = [(x, y)]
    for _ in range(int(rng.integers(10, 30))):
        heading += rng.normal(0, 0.7)
        step = rng.uniform(2.5, 6)
        x, y = (
            float(np.clip(x + step * math.cos(heading), 6, 50)),
            float(np.clip(y + step * math.sin(heading), 6, 50)),
        )
        points.append((x, y))
    ImageDraw.Draw(im).line(points, fill=255, width=int(rng.integers(2, 5)), joint="curve")
    return _as_gray(im)


def _blobs(rng: np.random.Generator) -> np.ndarray:
    """Smoothed noise, thresholded: irregular blobs."""
    k = int(rng.integers(3, 8))
    noise = Image.fromarray((rng.random((k, k)) * 255).astype(np.uint8))
    a = _as_gray(noise.resize((40, 40), Image.Resampling.BICUBIC))
    a = (a > np.quantile(a, rng.uniform(0.45, 0.75))).astype(np.float32)
    out = np.zeros((56, 56), dtype=np.float32)
    out[8:48, 8:48] = a
    return out


# --- both families: halves of MNIST digits ----------------------------------------------------


def _cut(keep: str, digit: np.ndarray, shift: float = 0.0) -> np.ndarray:
    """Keep one part of a digit ("top", "bottom", "left", "right"), cut through its centre of ink
    moved by ``shift`` times the ink's extent."""
    a = digit.astype(np.float32) / 255.0
    axis = 1 if keep in ("top", "bottom") else 0
    profile = a.sum(axis=axis)
    centre = float((profile * np.arange(28)).sum() / max(float(profile.sum()), 1e-6))
    inked = np.flatnonzero(profile > 0)
    extent = float(inked[-1] - inked[0] + 1) if len(inked) else 0.0
    c = round(centre + shift * extent)
    out = a.copy()
    if keep == "top":
        out[c:] = 0
    elif keep == "bottom":
        out[:c] = 0
    elif keep == "left":
        out[:, c:] = 0
    else:
        out[:, :c] = 0
    return out


HALVES_SKIP = {(8, "top"), (8, "bottom"), (9, "top"), (6, "bottom")}  # a loop: a 0
HALVES_SKIP |= {
    (3, "right"),
    (8, "right"),
    (7, "right"),
    (9, "right"),
    (4, "right"),
    (6, "left"),
    (5, "left"),
}


def _halves(images: np.ndarray, labels: np.ndarray, sides: tuple[str, str], jitter: float) -> Gen:
    """Halves of ``images`` on ``sides``; the cut moves up to ``jitter`` of the ink's extent."""

    def gen(rng: np.random.Generator) -> np.ndarray:
        i = int(rng.integers(len(images)))
        side = sides[int(rng.integers(2))]
        if labels[i] == 1 or (int(labels[i]), side) in HALVES_SKIP:
            return np.zeros((28, 28), dtype=np.float32)  # refused as blank: drawn again
        return _cut(side, images[i].reshape(28, 28), rng.uniform(-jitter, jitter) if jitter else 0.0)

    return gen


# --- making the sets --------------------------------------------------------------------------


def served(gray: np.ndarray) -> np.ndarray | None:
    """``normalise`` as the worker runs it; None for a blank or a tall thin stroke (a 1)."""
    try:
        a = normalise(gray)
    except ImageError:
        return None
    rows, cols = np.flatnonzero(a.any(axis=1)), np.flatnonzero(a.any(axis=0))
    if cols[-1] - cols[0] + 1 < THIN * (rows[-1] - rows[0] + 1):
        return None
    return a


def _make(kinds: list[tuple[str, Gen]], n: int, seed: int) -> tuple[np.ndarray, list[str]]:
    """``n`` images, the kinds taking turns; deterministic for a seed."""
    rng = np.random.default_rng(seed)
    out = np.empty((n, 28, 28), dtype=np.float32)
    names = []
    for i in range(n):
        name, gen = kinds[i % len(kinds)]
        for _ in range(100):
            a = served(gen(rng))
            if a is not None:
                break
        else:
            raise RuntimeError(f"the {name} generator made nothing usable in 100 tries")
        out[i] = a
        names.append(name)
    return out, names


def training_bank(n: int, seed: int, digits: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """``n`` training-family non-digits as uint8 [n, 28, 28], MNIST's form (ink bright).

    ``digits``/``labels``: the training images (never the held-out ones) to cut in half.
    """
    letters, symbols = _pil_text(LETTERS), _pil_text(SYMBOLS)
    halves = _halves(digits, labels, ("top", "bottom"), 0.15)
    kinds = [("letters", letters), ("letters", letters), ("symbols", symbols), ("scribbles", _walk_scribble)]
    kinds += [("textures", _blobs), ("halves", halves), ("halves", halves)]
    images, _ = _make(kinds, n, seed)
    return np.round(images * 255).astype(np.uint8)


def evaluation_set(n: int, seed: int, digits: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, list[str]]:
    """``n`` evaluation-family non-digits, float32 [n, 28, 28] exactly as served, and each one's
    kind. ``digits``/``labels``: MNIST test images to cut in half. Without the DejaVu fonts the
    letters and symbols are left out, with a message on stderr."""
    kinds: list[tuple[str, Gen]] = []
    fonts = dejavu_fonts()
    if fonts:
        kinds += [
            ("letters", dejavu_text(LETTERS, fonts)),
            ("symbols", dejavu_text(SYMBOLS + UNICODE, fonts)),
        ]
    else:
        import sys

        print(
            f"no DejaVu fonts in {DEJAVU} (Debian: fonts-dejavu-core): non-digit letters and symbols left out",
            file=sys.stderr,
        )
    kinds += [("scribbles", scribble), ("textures", pattern), ("shapes", shape)]
    kinds += [("halves", _halves(digits, labels, ("left", "right"), 0.0))]
    return _make(kinds, n, seed)

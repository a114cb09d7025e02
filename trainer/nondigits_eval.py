"""The evaluation family of generated non-digits: what ``mnistq evaluate`` measures, never trained on.

Dark ink on lighter, uneven paper of 64-128 px, as a scan or a photo gives it: letters and
symbols (with Greek and other Unicode signs) in Debian's DejaVu fonts (``dejavu_text``);
tangles (closed curves of summed sinusoids) and hatching (the zig-zag of crossing something
out) (``scribble``); textures: stripes, checkers, dot grids (``pattern``); shapes: polygons,
stars, crosses, arrows, hearts, crescents, domes (``shape``). No rings, outlined polygons of 5
sides or more (a 0) or filled discs (served, a disc's flat middle is taken for uneven paper and
removed, which leaves a ring).

Each generator draws one image, unserved, from a random generator. ``trainer.nondigits`` holds
what both families share (the characters left out, the halves of MNIST digits, the served form)
and makes the set: ``evaluation_set``.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable

import numpy as np
from PIL import Image, ImageDraw, ImageFilter, ImageFont


@functools.cache
def _dejavu_font(path: str, size: int) -> ImageFont.FreeTypeFont:
    return ImageFont.truetype(path, size)


def _paper(rng: np.random.Generator, size: int) -> np.ndarray:
    """Light, uneven paper as a scan or photo gives it."""
    ramp = np.linspace(rng.uniform(0.75, 0.9), rng.uniform(0.85, 1.0), size, dtype=np.float32)
    return np.tile(ramp, (size, 1)) if rng.random() < 0.5 else np.tile(ramp[:, None], (1, size))


def _ink_on_paper(ink: Image.Image, rng: np.random.Generator) -> np.ndarray:
    """Dark ink (``ink``: 255 where drawn) on paper, a little blurred, with sensor noise."""
    paper = _paper(rng, ink.size[0])
    blurred = np.asarray(ink.filter(ImageFilter.GaussianBlur(0.7)), dtype=np.float32) / 255.0
    a = paper * (1 - rng.uniform(0.7, 0.95) * blurred)
    return np.clip(a + rng.normal(0, 0.015, a.shape).astype(np.float32), 0, 1)


@functools.cache
def _has_glyph(path: str, ch: str) -> bool:
    """False for a character the font draws as its 'missing glyph' box (or not at all)."""
    font = _dejavu_font(path, 40)

    def drawn(c: str) -> bytes:
        im = Image.new("L", (80, 80), 0)
        ImageDraw.Draw(im).text((10, 10), c, fill=255, font=font)
        return im.tobytes()

    ink = drawn(ch)
    return any(ink) and ink != drawn("\uffff")


def dejavu_text(chars: list[str], fonts: list[str]) -> Callable[[np.random.Generator], np.ndarray]:
    """A generator of one of ``chars`` in one of ``fonts`` (DejaVu files), centred and rotated;
    a character the font lacks gives blank paper, which is refused and drawn again."""

    def gen(rng: np.random.Generator) -> np.ndarray:
        side = int(rng.integers(64, 129))
        size = int(side * rng.uniform(0.35, 0.6))
        path = fonts[int(rng.integers(len(fonts)))]
        font = _dejavu_font(path, size)
        ch = chars[int(rng.integers(len(chars)))]
        if not _has_glyph(path, ch):
            return np.ones((side, side), dtype=np.float32)  # blank paper: drawn again
        im = Image.new("L", (side, side), 0)
        draw = ImageDraw.Draw(im)
        box = draw.textbbox((0, 0), ch, font=font)
        pos = ((side - box[2] - box[0]) / 2, (side - box[3] - box[1]) / 2)
        draw.text(
            pos, ch, fill=255, font=font, stroke_width=int(rng.integers(0, 1 + size // 15)), stroke_fill=255
        )
        return _ink_on_paper(im.rotate(rng.uniform(-20, 20), Image.Resampling.BICUBIC), rng)

    return gen


def _curve(rng: np.random.Generator) -> list[tuple[float, float]]:
    side = 96.0
    if rng.random() < 0.5:  # a tangle: a closed curve of summed sinusoids
        t = np.linspace(0, 2 * math.pi, 200)
        xy = [
            sum(rng.normal(0, 1 / k) * np.sin(k * t + rng.uniform(0, 6.3)) for k in range(1, 5)) for _ in "xy"
        ]
        x, y = (v / (np.abs(v).max() + 1e-6) for v in xy)
    else:  # hatching: a zig-zag back and forth, as when crossing something out
        n = int(rng.integers(4, 9))
        x = np.tile([-1.0, 1.0], n) + rng.normal(0, 0.1, 2 * n)
        y = np.linspace(-1, 1, 2 * n) + rng.normal(0, 0.05, 2 * n)
        a = rng.uniform(0, math.pi)
        x, y = x * math.cos(a) - y * math.sin(a), x * math.sin(a) + y * math.cos(a)
    return list(zip((x * 0.35 + 0.5) * side, (y * 0.35 + 0.5) * side, strict=True))


def scribble(rng: np.random.Generator) -> np.ndarray:
    """A tangle or hatching, drawn with a pen of 3-7 px."""
    im = Image.new("L", (96, 96), 0)
    ImageDraw.Draw(im).line(_curve(rng), fill=255, width=int(rng.integers(3, 8)), joint="curve")
    return _ink_on_paper(im, rng)


def pattern(rng: np.random.Generator) -> np.ndarray:
    """Stripes at any angle, checkers or a grid of dots, in a square or a disc."""
    side = int(rng.integers(64, 129))
    yy, xx = np.mgrid[0:side, 0:side].astype(np.float32) / side
    period = rng.uniform(0.08, 0.2)
    kind = int(rng.integers(3))
    if kind == 0:
        a = rng.uniform(0, math.pi)
        ink = np.sin(2 * math.pi * (xx * math.cos(a) + yy * math.sin(a)) / period) > 0
    elif kind == 1:
        ink = (np.floor(xx / period) + np.floor(yy / period)) % 2 == 0
    else:
        ink = (np.hypot((xx / period) % 1 - 0.5, (yy / period) % 1 - 0.5)) < 0.3
    region = (
        np.hypot(xx - 0.5, yy - 0.5) < 0.35
        if rng.random() < 0.5
        else np.maximum(abs(xx - 0.5), abs(yy - 0.5)) < 0.3
    )
    return _ink_on_paper(Image.fromarray(((ink & region) * 255).astype(np.uint8)), rng)


def shape(rng: np.random.Generator) -> np.ndarray:
    """Polygons, stars, crosses, arrows, hearts, crescents, domes. Never a ring or an outlined
    polygon of 5 sides or more (a 0), nor a filled disc: served, its flat middle is taken for
    uneven paper and removed, which leaves a ring."""
    im = Image.new("L", (96, 96), 0)
    d = ImageDraw.Draw(im)
    width = int(rng.integers(3, 8))
    fill = 255 if rng.random() < 0.5 else None
    kind = int(rng.integers(7))
    if kind in (0, 1):  # a polygon (3-6 sides) or a star (5-8 points)
        n = int(rng.integers(3, 7)) if kind == 0 else int(rng.integers(5, 9))
        fill = 255 if kind == 0 and n >= 5 else fill
        radii = [30.0] * n if kind == 0 else [30.0, 13.0] * n
        k = len(radii)
        a0 = rng.uniform(0, 2 * math.pi)
        pts = [
            (48 + r * math.cos(a0 + 2 * math.pi * i / k), 48 + r * math.sin(a0 + 2 * math.pi * i / k))
            for i, r in enumerate(radii)
        ]
        d.polygon(pts, fill=fill, outline=255, width=width)
    elif kind == 2:  # a cross
        d.line([(18, 48), (78, 48)], fill=255, width=width + 3)
        d.line([(48, 18), (48, 78)], fill=255, width=width + 3)
    elif kind == 3:  # an arrow
        d.line([(16, 48), (74, 48)], fill=255, width=width + 2)
        d.polygon([(80, 48), (62, 34), (62, 62)], fill=255)
    elif kind == 4:  # a heart
        d.ellipse((20, 22, 50, 52), fill=255)
        d.ellipse((46, 22, 76, 52), fill=255)
        d.polygon([(22, 42), (74, 42), (48, 78)], fill=255)
    elif kind == 5:  # a crescent
        d.ellipse((18, 18, 78, 78), fill=255)
        d.ellipse((34, 12, 90, 68), fill=0)
    else:  # a dome: half a disc
        d.pieslice((22, 30, 74, 82), 180, 360, fill=255)
    return _ink_on_paper(im.rotate(rng.uniform(0, 360), Image.Resampling.BICUBIC), rng)

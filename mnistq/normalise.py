"""MNIST-style 28x28 arrays from luminance: the reference, and the fast path that serves.

MNIST itself was made this way: ink bright on black, the digit's bounding box scaled to fit
20x20 keeping its aspect, then placed in 28x28 by its centre of mass. Real images also need
polarity decided by the border, and the background and sensor noise removed before the
bounding box means anything.

``normalise_reference`` is the definition, written for reading. ``normalise`` serves: an 8-bit
image of at most SMALL pixels a side (every MNIST-sized file) takes a fast path that computes
the same array with a fraction of the numpy calls; anything else goes through the reference,
with its 3x3 median computed in numpy (``median3``, Pillow's values). ``normalise_many`` does
the fast path's work for a stack of same-size images at once. tests/test_images_fast.py holds
the fast paths to the reference.
"""

from __future__ import annotations

import functools
import math
import operator
from collections.abc import Callable

import numpy as np
from PIL import Image, ImageFilter

from mnistq.errors import ImageError
from mnistq.protocol import ErrorKind

__all__ = ["SMALL", "median3", "median3_pillow", "normalise", "normalise_many", "normalise_reference"]

#: Images up to this size a side have no speckle or uneven paper to remove (see the reference).
SMALL = 56


def _background(a: np.ndarray) -> np.ndarray:
    """Slowly varying paper tone (lighting, shadows): the local minimum at a scale above strokes."""
    h, w = a.shape
    k = max(2, min(h, w) // 16)
    small = Image.fromarray(a, "F").reduce(k)
    bg = small.filter(ImageFilter.MinFilter(5))
    return np.asarray(bg.resize((w, h), Image.Resampling.BILINEAR), dtype=np.float32)


def median3_pillow(a: np.ndarray) -> np.ndarray:
    """The 3x3 median, edges replicated: Pillow's MedianFilter."""
    return np.asarray(Image.fromarray(a.astype(np.float32), "F").filter(ImageFilter.MedianFilter(3)))


def normalise_reference(
    gray: np.ndarray, median3: Callable[[np.ndarray], np.ndarray] = median3_pillow
) -> np.ndarray:
    """MNIST-style 28x28 float32 in [0, 1] (ink bright) from a float luminance array in [0, 1].

    ``median3``: the 3x3 median of a camera-sized image (``normalise`` passes ``median3``, the
    same values ~3x faster)."""
    h, w = gray.shape
    bw = max(1, min(h, w) // 20)
    border = np.concatenate(
        [gray[:bw].ravel(), gray[-bw:].ravel(), gray[:, :bw].ravel(), gray[:, -bw:].ravel()]
    )
    paper = float(np.median(border))
    a = gray - paper if paper < 0.5 else paper - gray  # ink bright, paper at zero
    if max(h, w) > SMALL:  # camera-sized: speckle and uneven paper; MNIST-sized images have neither
        a = median3(a)
        a = a - _background(a)
        border = np.concatenate([a[:bw].ravel(), a[-bw:].ravel(), a[:, :bw].ravel(), a[:, -bw:].ravel()])
        paper = float(np.median(border))
        a = a - paper
        border = border - paper
    else:
        border = border - paper
    a = np.clip(a, 0.0, None)
    peak = float(a.max())
    if peak <= 0.05:
        raise ImageError("no digit found (blank image)", ErrorKind.NO_DIGIT)
    a /= peak
    # Noise floor from the border spread: only ink well above it counts towards the bounding box.
    spread = float(np.median(np.abs(border))) * 1.4826
    a[a < min(0.5, max(0.05, 5.0 * spread / peak))] = 0.0
    if not a.any():
        raise ImageError("no digit found (only noise)", ErrorKind.NO_DIGIT)
    rows, cols = np.flatnonzero(a.any(axis=1)), np.flatnonzero(a.any(axis=0))
    crop = a[rows[0] : rows[-1] + 1, cols[0] : cols[-1] + 1]
    ch, cw = crop.shape
    scale = 20.0 / max(ch, cw)
    nh, nw = max(1, round(ch * scale)), max(1, round(cw * scale))
    if (nh, nw) != (ch, cw):
        crop = np.asarray(Image.fromarray(crop, "F").resize((nw, nh), Image.Resampling.LANCZOS))
        crop = np.clip(crop, 0.0, 1.0)
    mass = crop.sum()
    cy = float((crop.sum(axis=1) * np.arange(nh)).sum() / mass)
    cx = float((crop.sum(axis=0) * np.arange(nw)).sum() / mass)
    top = min(max(round(13.5 - cy), 0), 28 - nh)
    left = min(max(round(13.5 - cx), 0), 28 - nw)
    out = np.zeros((28, 28), dtype=np.float32)
    out[top : top + nh, left : left + nw] = crop
    return out


def normalise(gray: np.ndarray) -> np.ndarray:
    """MNIST-style 28x28 float32 in [0, 1] (ink bright) from luminance: float in [0, 1], or uint8
    (a pixel's luminance is then value / 255, exactly as ``to_gray`` would have made it)."""
    if gray.dtype == np.uint8:
        if gray.ndim == 2 and max(gray.shape) <= SMALL and min(gray.shape) > 0:
            return _small(gray)
        gray = gray.astype(np.float32) / 255.0
    return normalise_reference(gray, median3)


# The 3x3 median of a camera-sized image as a sorting network on its nine shifted copies: min
# and max pick existing values, so the median is Pillow's own, bit for bit (edges replicated as
# its filter does), at a third of the cost. Pairs (i, j) leave the smaller in i, the larger in j
# (Devillard's 19-exchange network for 9 values); where only one side is read again, only that
# side is computed: "min" keeps min in i, "max" keeps max in j.
_MEDIAN9 = (
    *((1, 2, ""), (4, 5, ""), (7, 8, ""), (0, 1, ""), (3, 4, ""), (6, 7, "")),
    *((1, 2, ""), (4, 5, ""), (7, 8, ""), (0, 3, "max"), (5, 8, "min"), (4, 7, "")),
    *((3, 6, "max"), (1, 4, "max"), (2, 5, "min"), (4, 7, "min"), (4, 2, ""), (6, 4, "max"), (4, 2, "min")),
)


def median3(a: np.ndarray) -> np.ndarray:
    """``median3_pillow``'s values, from numpy's minimum and maximum."""
    h, w = a.shape
    padded = np.pad(a.astype(np.float32, copy=False), 1, mode="edge")
    v = [padded[i : i + h, j : j + w] for i in range(3) for j in range(3)]
    for i, j, keep in _MEDIAN9:
        low = np.minimum(v[i], v[j]) if keep != "max" else None
        if keep != "min":
            v[j] = np.maximum(v[i], v[j])
        if low is not None:
            v[i] = low
    return v[4]


# --- the fast path ------------------------------------------------------------------------------
# Every pixel of an 8-bit image is one of 256 levels, and each step of the reference up to the
# bounding box maps a level to a value on its own (paper subtracted, clipped, divided by the
# peak, thresholded): those steps are done once on the 256 levels (a table, cached: MNIST needs
# two) in the same float32 operations, and the image is one lookup, the same values bit for bit.
# The border median comes from a sort (np.median's value without its overhead). Each row's and
# column's sum give the bounding box and the crop's centre of mass. In float64 those sums are
# exact (float32 values in [0.05, 1] times indices under 64 span fewer than 53 bits), while the
# reference's float32 sums move a centre of mass by less than 1e-4: so the placement is the
# reference's unless 13.5 - centre lies within _TIE of a rounding boundary, and there (about 1
# MNIST image in 300) the reference's own steps decide, as they do where the crop needs a resize.

#: float32 luminance of each 8-bit level, exactly as ``u.astype(float32) / 255.0`` computes it
_LEVELS = np.arange(256, dtype=np.float32) / 255.0
_LEVELS.flags.writeable = False
_RANGES = [np.arange(n) for n in range(21)]  # np.arange(nh) for the centre of mass
_INDEX = np.arange(SMALL, dtype=np.float64)  # row and column numbers, for centres of mass
_TIE = 1e-3  # 10x the most the reference's float32 sums can move a centre of mass here
_sum = np.add.reduce  # what .sum() calls, without its Python wrapper: the same sums, bit for bit


@functools.lru_cache(maxsize=64)
def _border_index(h: int, w: int) -> np.ndarray:
    """Flat indices of the reference's border strips, in its order (corners twice, as it has)."""
    idx = np.arange(h * w).reshape(h, w)
    bw = max(1, min(h, w) // 20)
    out = np.concatenate([idx[:bw].ravel(), idx[-bw:].ravel(), idx[:, :bw].ravel(), idx[:, -bw:].ravel()])
    out.flags.writeable = False  # shared by every thread
    return out


def _median_sorted(s: np.ndarray) -> float:
    """np.median of an already sorted 1-d float32 array (the mean of the middle two, in float32)."""
    k = s.size // 2
    return float(s[k]) if s.size % 2 else float((s[k - 1] + s[k]) / 2)


@functools.lru_cache(maxsize=1024)
def _paper(lo: int, hi: int) -> float:
    """np.median of a border whose middle two levels are ``lo`` and ``hi`` (their float32 mean)."""
    return float((_LEVELS[lo] + _LEVELS[hi]) / 2)


@functools.lru_cache(maxsize=2048)
def _table(paper: float, extreme: int, spread: float) -> np.ndarray | None:
    """Each level's value after the reference's per-pixel steps; None for a blank image.

    ``extreme`` is the image's brightest level (dark paper) or darkest (light paper): the one
    that becomes the peak, since the mapping is monotonic.
    """
    t = _LEVELS - paper if paper < 0.5 else paper - _LEVELS
    t = np.clip(t, 0.0, None)
    peak = float(t[extreme])
    if peak <= 0.05:
        return None
    t /= peak
    t[t < min(0.5, max(0.05, 5.0 * spread / peak))] = 0.0
    t.flags.writeable = False
    return t


def _spread(border: np.ndarray, paper: float) -> float:
    """The reference's noise spread: median absolute deviation of the border from the paper."""
    return _median_sorted(np.sort(np.abs(_LEVELS.take(border) - paper))) * 1.4826


def _small(u: np.ndarray) -> np.ndarray:
    """``normalise_reference(u / 255)`` for a small 8-bit image, with a tenth of its numpy calls."""
    h, w = u.shape
    border = u.take(_border_index(h, w))
    s = np.sort(border)
    k = s.size // 2  # np.median's value: levels sort as their float values do
    paper = _paper(int(s[k - 1]), int(s[k])) if s.size % 2 == 0 else float(_LEVELS[s[k]])
    spread = 0.0 if s[0] == s[-1] else _spread(border, paper)  # one level all round: exactly zero
    table = _table(paper, int(u.max() if paper < 0.5 else u.min()), spread)
    if table is None:
        raise ImageError("no digit found (blank image)", ErrorKind.NO_DIGIT)
    a = table.take(u)
    # Row and column sums, then plain Python on those few numbers: each numpy call costs far
    # more right after a decode (its code is no longer in the cache) than on its own.
    by_row, by_col = _sum(a, 1, np.float64).tolist(), _sum(a, 0, np.float64).tolist()
    rows = [i for i, v in enumerate(by_row) if v]
    if not rows:
        raise ImageError("no digit found (only noise)", ErrorKind.NO_DIGIT)
    cols = [i for i, v in enumerate(by_col) if v]
    top, left, bottom, right = rows[0], cols[0], rows[-1] + 1, cols[-1] + 1
    mass = sum(by_row)  # these sums are exact, in any order (see above)
    cy = sum(map(operator.mul, range(h), by_row)) / mass - top
    cx = sum(map(operator.mul, range(w), by_col)) / mass - left
    return _place(a[top:bottom, left:right], cy, cx)


def _place(crop: np.ndarray, cy: float, cx: float) -> np.ndarray:
    """The crop in 28x28 by its centre of mass (cy, cx: exact, in the crop's coordinates), as the
    reference places it; the reference's own steps where it resizes or a rounding is close."""
    ch, cw = crop.shape
    if max(ch, cw) != 20 or _near_tie(13.5 - cy) or _near_tie(13.5 - cx):
        return _centre(crop)
    top, left = min(max(round(13.5 - cy), 0), 28 - ch), min(max(round(13.5 - cx), 0), 28 - cw)
    out = np.zeros((28, 28), dtype=np.float32)
    out[top : top + ch, left : left + cw] = crop
    return out


def _near_tie(x: float) -> bool:
    return abs(x - math.floor(x) - 0.5) < _TIE


def normalise_many(stack: np.ndarray) -> list[np.ndarray | ImageError]:
    """``normalise`` of each image of an (N, h, w) uint8 stack: the fast path's work done for all
    N at once (a few dozen numpy calls in all), then each image's crop placed in its own.

    A blank image's entry is its ImageError, as ``normalise`` would raise it.
    """
    n, h, w = stack.shape
    if stack.dtype != np.uint8 or max(h, w) > SMALL or n == 0 or min(h, w) == 0:
        return [_catch(normalise, x) for x in stack]
    flat = stack.reshape(n, h * w)
    border = flat[:, _border_index(h, w)]
    k = border.shape[1] // 2
    s = _LEVELS[np.sort(border, axis=1)]
    # np.median's value: the middle one, or the mean of the middle two in float32 (as _median_sorted)
    paper = s[:, k] if s.shape[1] % 2 else (s[:, k - 1] + s[:, k]) / 2
    dark = paper < 0.5
    t = np.where(dark[:, None], _LEVELS - paper[:, None], paper[:, None] - _LEVELS)
    np.clip(t, 0.0, None, out=t)
    peak = t[np.arange(n), np.where(dark, flat.max(axis=1), flat.min(axis=1))]
    blank = peak.astype(np.float64) <= 0.05  # compared as the Python float it is in the reference
    peak[blank] = 1.0
    t /= peak[:, None]
    dev = np.sort(np.abs(_LEVELS[border] - paper[:, None]), axis=1)
    spread = (dev[:, k] if dev.shape[1] % 2 else (dev[:, k - 1] + dev[:, k]) / 2).astype(np.float64) * 1.4826
    floor = np.minimum(0.5, np.maximum(0.05, 5.0 * spread / peak.astype(np.float64)))
    t[t < floor.astype(np.float32)[:, None]] = 0.0  # float32 pixels against a Python float: in float32
    a = t.take(flat + np.arange(0, 256 * n, 256)[:, None]).reshape(n, h, w)  # each image its own table
    by_row, by_col = _sum(a, 2, np.float64), _sum(a, 1, np.float64)  # exact: see above
    inked_rows, inked_cols = by_row > 0, by_col > 0
    top, left = inked_rows.argmax(axis=1), inked_cols.argmax(axis=1)
    bottom, right = h - inked_rows[:, ::-1].argmax(axis=1), w - inked_cols[:, ::-1].argmax(axis=1)
    mass = _sum(by_row, 1)
    mass[mass == 0] = 1.0
    cy, cx = by_row @ _INDEX[:h] / mass - top, by_col @ _INDEX[:w] / mass - left
    out: list[np.ndarray | ImageError] = []
    for i, (y0, y1, x0, x1, y, x, is_blank, inked) in enumerate(
        zip(
            *(v.tolist() for v in (top, bottom, left, right, cy, cx, blank, inked_rows.any(axis=1))),
            strict=True,
        )
    ):
        if is_blank:
            out.append(ImageError("no digit found (blank image)", ErrorKind.NO_DIGIT))
        elif not inked:
            out.append(ImageError("no digit found (only noise)", ErrorKind.NO_DIGIT))
        else:
            out.append(_place(a[i, y0:y1, x0:x1], y, x))
    return out


def _catch(f: Callable[[np.ndarray], np.ndarray], x: np.ndarray) -> np.ndarray | ImageError:
    try:
        return f(x)
    except ImageError as e:
        return e


def _centre(crop: np.ndarray) -> np.ndarray:
    """The reference's last steps, from the crop of the thresholded array: fit 20x20, centre of mass."""
    ch, cw = crop.shape
    nh, nw = ch, cw
    if max(ch, cw) != 20:  # at 20 the reference's scale is 1.0: no resize
        scale = 20.0 / max(ch, cw)
        nh, nw = max(1, round(ch * scale)), max(1, round(cw * scale))
        if (nh, nw) != (ch, cw):
            crop = np.asarray(Image.fromarray(crop, "F").resize((nw, nh), Image.Resampling.LANCZOS))
            crop = np.clip(crop, 0.0, 1.0)
    mass = _sum(crop, None)
    cy = float(_sum(_sum(crop, 1) * _RANGES[nh], None) / mass)
    cx = float(_sum(_sum(crop, 0) * _RANGES[nw], None) / mass)
    top = min(max(round(13.5 - cy), 0), 28 - nh)
    left = min(max(round(13.5 - cx), 0), 28 - nw)
    out = np.zeros((28, 28), dtype=np.float32)
    out[top : top + nh, left : left + nw] = crop
    return out

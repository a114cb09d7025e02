"""Per-image cost of reading a digit file: PIL's plain decode against each of our steps.

On MNIST test PNGs (28x28, exported from the IDX files) and on camera-sized JPEGs (digits
"photographed" as bench/realworld.py makes them), measured side by side: each round times
every row once, in turn, and a row's ratio is to the PIL decode of the same round. The table
gives the median over the rounds and the range.

Rows, per image: PIL's ``Image.open(path).convert("L")`` + ``np.asarray`` (the unit); the
worker's path check (``checked_path``: Python's resolve before, realpath(3) now); our open
(the O_NOFOLLOW walk before, openat2 now); the decode to luminance; ``normalise`` and each of
its steps, the reference and the fast path; ``load_image`` whole: another tree's own
(``--before``), the reference (testsupport/images_reference.py) and now; ``load_images`` (a batch of
256 paths; small 8-bit images of one size normalised as a stack); and a worker's per-file work,
path check included.

    python bench/images.py                      # 3,000 PNGs + 300 photos, 5 rounds
    python bench/images.py --mnist 10000 --photos 0 --rounds 9
    git archive HEAD | tar -x -C /tmp/before && python bench/images.py --before /tmp/before
"""

from __future__ import annotations

import argparse
import gc
import importlib.util
import operator
import os
import shutil
import statistics
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import PIL
from common import DATA, export_pngs, table
from PIL import Image, ImageFilter

import mnistq.images as mi
import mnistq.normalise as nz
import mnistq.safeopen
import testsupport.images_reference as ir
from testsupport.photos import photograph
from trainer.data import load_split
from worker.paths import checked_path

Row = tuple[str, Callable[[Any], object], Sequence[Any], int]  # name, fn, items, images in them


def pil_decode(path: Path) -> np.ndarray:
    with Image.open(path) as im:
        return np.asarray(im.convert("L"))


def resolve_before(raw: str, roots: tuple[Path, ...]) -> Path:
    """worker/paths.py's checked_path as it was: pathlib's resolve (os.path.realpath, in Python)."""
    real = Path(raw).resolve(strict=False)
    assert any(real.is_relative_to(root) for root in roots) and ".." not in Path(raw).parts
    return real


def walk_open(path: Path) -> None:
    mi.open_checked(path, walk=True).close()


def served_open(path: Path) -> None:
    mi.open_checked(path).close()


# --- normalise_reference, one step at a time (each takes the previous step's output) -----------


def r_paper(g: np.ndarray) -> tuple:
    h, w = g.shape
    bw = max(1, min(h, w) // 20)
    border = np.concatenate([g[:bw].ravel(), g[-bw:].ravel(), g[:, :bw].ravel(), g[:, -bw:].ravel()])
    return g, border, float(np.median(border)), bw


def r_polarity(s: tuple) -> tuple:
    g, border, paper, bw = s
    return (g - paper if paper < 0.5 else paper - g), border, paper, bw


def r_camera(s: tuple) -> tuple:
    """The camera-sized branch: speckle (median 3x3), uneven paper (background), paper again."""
    a, border, paper, bw = s
    if max(a.shape) <= nz.SMALL:
        return a, border - paper
    a = np.asarray(Image.fromarray(a.astype(np.float32), "F").filter(ImageFilter.MedianFilter(3)))
    a = a - nz._background(a)
    border = np.concatenate([a[:bw].ravel(), a[-bw:].ravel(), a[:, :bw].ravel(), a[:, -bw:].ravel()])
    paper = float(np.median(border))
    return a - paper, border - paper


def r_peak(s: tuple) -> tuple:
    a, border = s
    a = np.clip(a, 0.0, None)
    peak = float(a.max())
    a /= peak
    return a, border, peak


def r_floor(s: tuple) -> np.ndarray:
    a, border, peak = s
    spread = float(np.median(np.abs(border))) * 1.4826
    a[a < min(0.5, max(0.05, 5.0 * spread / peak))] = 0.0
    return a


def r_crop(a: np.ndarray) -> np.ndarray:
    rows, cols = np.flatnonzero(a.any(axis=1)), np.flatnonzero(a.any(axis=0))
    return a[rows[0] : rows[-1] + 1, cols[0] : cols[-1] + 1]


def r_fit(crop: np.ndarray) -> np.ndarray:
    ch, cw = crop.shape
    scale = 20.0 / max(ch, cw)
    nh, nw = max(1, round(ch * scale)), max(1, round(cw * scale))
    if (nh, nw) != (ch, cw):
        crop = np.asarray(Image.fromarray(crop, "F").resize((nw, nh), Image.Resampling.LANCZOS))
        crop = np.clip(crop, 0.0, 1.0)
    return crop


def r_centre(crop: np.ndarray) -> np.ndarray:
    nh, nw = crop.shape
    mass = crop.sum()
    cy = float((crop.sum(axis=1) * np.arange(nh)).sum() / mass)
    cx = float((crop.sum(axis=0) * np.arange(nw)).sum() / mass)
    top, left = min(max(round(13.5 - cy), 0), 28 - nh), min(max(round(13.5 - cx), 0), 28 - nw)
    out = np.zeros((28, 28), dtype=np.float32)
    out[top : top + nh, left : left + nw] = crop
    return out


REFERENCE_STEPS = [
    ("border median (paper)", r_paper),
    ("polarity: ink bright, paper 0", r_polarity),
    ("camera only: median 3x3, background", r_camera),
    ("clip, peak, divide", r_peak),
    ("noise floor, threshold", r_floor),
    ("bounding box, crop", r_crop),
    ("fit 20x20 (LANCZOS unless 20 already)", r_fit),
    ("centre of mass, place in 28x28", r_centre),
]


# --- the fast path (mnistq/normalise.py's _small), one step at a time ---------------------------


def f_table(u: np.ndarray) -> tuple:
    border = u.take(nz._border_index(*u.shape))
    s = np.sort(border)
    k = s.size // 2
    paper = nz._paper(int(s[k - 1]), int(s[k])) if s.size % 2 == 0 else float(nz._LEVELS[s[k]])
    spread = 0.0 if s[0] == s[-1] else nz._spread(border, paper)
    return u, nz._table(paper, int(u.max() if paper < 0.5 else u.min()), spread)


def f_lookup(s: tuple) -> np.ndarray:
    u, t = s
    return t.take(u)


def f_sums(a: np.ndarray) -> tuple:
    h, w = a.shape
    by_row, by_col = np.add.reduce(a, 1, np.float64).tolist(), np.add.reduce(a, 0, np.float64).tolist()
    rows, cols = [i for i, v in enumerate(by_row) if v], [i for i, v in enumerate(by_col) if v]
    top, left, bottom, right = rows[0], cols[0], rows[-1] + 1, cols[-1] + 1
    mass = sum(by_row)
    cy = sum(map(operator.mul, range(h), by_row)) / mass - top
    cx = sum(map(operator.mul, range(w), by_col)) / mass - left
    return a[top:bottom, left:right], cy, cx


def f_place(s: tuple) -> np.ndarray:
    return nz._place(*s)


FAST_STEPS = [
    ("border sort, paper, spread, level table (cached)", f_table),
    ("one lookup: every pixel's value", f_lookup),
    ("row and column sums: box, centre of mass", f_sums),
    ("place in 28x28 (the reference's steps near a tie)", f_place),
]


def staged(steps: list[tuple[str, Callable]], inputs: Sequence[Any], prefix: str) -> tuple[list[Row], list]:
    """One row per step, each run on the previous step's outputs (computed here, once)."""
    rows: list[Row] = []
    current = list(inputs)
    for name, fn in steps:
        rows.append((f"{prefix}{name}", fn, current, len(current)))
        current = [fn(x) for x in current]
    return rows, current


def measure(rows: list[Row], rounds: int) -> list[list[float]]:
    """Seconds per image of each row, per round; rows interleaved within each round."""
    times: list[list[float]] = [[] for _ in rows]
    for _ in range(rounds):
        for i, (_, fn, items, images) in enumerate(rows):
            gc.collect()
            t0 = time.perf_counter()
            for x in items:
                fn(x)
            times[i].append((time.perf_counter() - t0) / max(1, images))
    return times


def read_before(path: Path) -> np.ndarray:
    return mi.read_luminance(path, to=ir.to_gray, walk=True)


def worker_before(path: Path, roots: tuple[Path, ...]) -> np.ndarray:
    return ir.load_image_reference(resolve_before(str(path), roots))


def worker_now(paths: list[Path], roots: tuple[Path, ...]) -> list:
    return mi.load_images([checked_path(str(p), roots) for p in paths])


def batched(paths: list[Path], size: int = 256) -> list[list[Path]]:
    return [paths[i : i + size] for i in range(0, len(paths), size)]


def old_load_image(tree: Path | None) -> Callable[[Path], np.ndarray] | None:
    """``load_image`` of another code tree's mnistq/images.py (e.g. ``git archive HEAD``), loaded
    beside ours under another name: the code as it really was, not only its reference."""
    if tree is None:
        return None
    spec = importlib.util.spec_from_file_location("mnistq_images_before", tree / "mnistq" / "images.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.load_image


def section(title: str, paths: list[Path], rounds: int, before: Callable[[Path], np.ndarray] | None) -> None:
    gray_f = [read_before(p) for p in paths]
    gray_u = [mi.read_luminance(p) for p in paths]
    for g, u, p in zip(gray_f, gray_u, paths, strict=True):  # the fast paths compute the same
        assert np.array_equal(ir.load_image_reference(p), mi.load_image(p)), p
        assert u.dtype != np.uint8 or np.array_equal(g, u.astype(np.float32) / 255.0)
    roots = (paths[0].parent,)
    ref_steps, ref_out = staged(REFERENCE_STEPS, gray_f, "  reference: ")
    assert all(np.array_equal(a, nz.normalise_reference(g)) for a, g in zip(ref_out, gray_f, strict=True))
    small = [u for u in gray_u if u.dtype == np.uint8 and max(u.shape) <= nz.SMALL]
    fast_steps, fast_out = staged(FAST_STEPS, small, "  fast: ")
    assert all(np.array_equal(a, nz.normalise(u)) for a, u in zip(fast_out, small, strict=True))
    stacks = [np.stack(b) for b in batched(small)] if small and len({u.shape for u in small}) == 1 else []
    n, batches = len(paths), batched(paths)
    big = [g for g in gray_f if max(g.shape) > nz.SMALL]
    rows: list[Row] = [
        ("PIL decode: open, convert('L'), asarray", pil_decode, paths, n),
        ("path check, before: pathlib resolve", lambda p: resolve_before(str(p), roots), paths, n),
        ("path check, now: realpath(3)", lambda p: checked_path(str(p), roots), paths, n),
        ("open, before: O_NOFOLLOW walk + fstat", walk_open, paths, n),
        ("open, now: openat2 folder + O_NOFOLLOW + fstat", served_open, paths, n),
        ("open + decode to float (to_gray), before", read_before, paths, n),
        ("open + decode to luminance, now", mi.read_luminance, paths, n),
        ("normalise_reference (float)", nz.normalise_reference, gray_f, n),
        *ref_steps,
        ("  camera: 3x3 median, Pillow's (reference)", nz.median3_pillow, big, len(big)),
        ("  camera: 3x3 median, numpy network (served)", nz.median3, big, len(big)),
        ("normalise, served (8-bit luminance)", nz.normalise, gray_u, n),
        *fast_steps,
        ("normalise_many (stacks of 256)", nz.normalise_many, stacks, len(small) if stacks else 0),
        ("load_image of --before (the tree's own code)", before, paths if before else [], n),
        ("load_image, reference (load_image_reference)", ir.load_image_reference, paths, n),
        ("load_image, now", mi.load_image, paths, n),
        ("load_images (batches of 256)", mi.load_images, batches, n),
        ("worker, before: resolve + load_image_reference", lambda p: worker_before(p, roots), paths, n),
        ("worker, now: checked_path + load_images", lambda b: worker_now(b, roots), batches, n),
    ]
    times = measure(rows, rounds)
    unit = times[0]
    out = []
    for (name, _, items, _), ts in zip(rows, times, strict=True):
        if not items:
            continue
        ratios = [t / u for t, u in zip(ts, unit, strict=True)]
        us = [t * 1e6 for t in ts]
        out.append(
            [
                name,
                f"{statistics.median(us):,.1f}",
                f"{min(us):,.1f}-{max(us):,.1f}",
                f"{statistics.median(ratios):.2f}",
                f"{min(ratios):.2f}-{max(ratios):.2f}",
            ]
        )
    print(f"\n{title}")
    print(table(out, ["per image", "us (median)", "us range", "x PIL decode", "range"]))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--mnist", type=int, default=3000, help="MNIST test PNGs (default: %(default)s)")
    p.add_argument("--photos", type=int, default=300, help="camera-sized JPEGs (default: %(default)s)")
    p.add_argument("--rounds", type=int, default=5, help="rounds (default: %(default)s)")
    p.add_argument("--data-dir", type=Path, default=DATA, help="MNIST folder (default: %(default)s)")
    p.add_argument("--before", type=Path, help="another code tree: time its load_image too (a row)")
    args = p.parse_args()
    before = old_load_image(args.before)
    flags = sorted(
        {f for f in Path("/proc/cpuinfo").read_text().split() if f == "avx512_bf16" or f.startswith("amx")}
    )
    print(
        f"CPU flags: {' '.join(flags) or 'none of avx512_bf16/amx'}; {len(os.sched_getaffinity(0))} cores; "
        f"load average {' '.join(f'{x:.2f}' for x in os.getloadavg())}; Pillow {PIL.__version__}, "
        f"numpy {np.__version__}; openat2: {'yes' if mnistq.safeopen._open_folder else 'no (the walk)'}"
    )
    tmp = Path(tempfile.mkdtemp(prefix="mnistq-bench-images-"))
    if args.mnist:
        paths = sorted(export_pngs(tmp / "mnist", args.mnist, data_dir=args.data_dir))
        section(
            f"MNIST test PNGs: {len(paths)} files of 28x28, {args.rounds} rounds", paths, args.rounds, before
        )
    if args.photos:
        x = load_split(args.data_dir, "test")[0]
        rng = np.random.default_rng(0)
        (tmp / "photos").mkdir()
        photos = []
        for i in range(args.photos):
            photo = tmp / "photos" / f"{i:05d}.jpg"
            photograph(x[i, 0].numpy(), rng).save(photo, quality=90)
            photos.append(photo)
        sizes = [Image.open(q).size for q in photos]
        side = f"{min(min(s) for s in sizes)}-{max(max(s) for s in sizes)} px a side"
        section(
            f"camera-sized JPEGs (bench/realworld.py): {len(photos)} files, {side}, {args.rounds} rounds",
            photos,
            args.rounds,
            before,
        )
    shutil.rmtree(tmp)


if __name__ == "__main__":
    main()

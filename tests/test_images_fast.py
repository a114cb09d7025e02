"""The fast paths (mnistq/normalise.py's ``normalise`` and ``normalise_many``, mnistq/images.py's
``load_image`` and ``load_images``) held to the reference (``normalise_reference``,
``load_image_reference``): the same array, within TOL, and so the same digit.

Always run: a few hundred synthetic digits from a tiny IDX set, and the edge cases. With the real
MNIST files (``slow``): all 10,000 test images as PNG files, and digits "photographed" as
bench/realworld.py makes them (testsupport/photos.py).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from helpers_images import REAL_DATA, SHIPPED_MODEL, digit_image, make_tiny_mnist
from PIL import Image, ImageFilter

import mnistq.images as mi
import mnistq.normalise as nz
import testsupport.images_reference as ir
from mnistq.errors import ImageError
from mnistq.protocol import ErrorKind
from model import load_checkpoint, predict_probs
from testsupport.photos import photograph
from trainer import data

#: What the fast paths may differ from the reference by. They compute its values bit for bit
#: here (observed: 0.0 on all 10,000 MNIST test PNGs), so this only allows for another numpy.
TOL = 1e-5

Outcome = np.ndarray | str  # the array, or "kind: message" of the ImageError


def outcome(read: Callable[[Any], np.ndarray], x: Any) -> Outcome:
    try:
        return read(x)
    except ImageError as e:
        return f"{e.kind.value}: {e}"


def as_outcome(x: np.ndarray | Exception) -> Outcome:
    if isinstance(x, ImageError):
        return f"{x.kind.value}: {x}"
    assert not isinstance(x, Exception), repr(x)
    return x


def worst(fast: list[Outcome], ref: list[Outcome], names: list[str]) -> float:
    """The largest difference between fast and reference arrays; AssertionError where they
    disagree on an error or by more than TOL."""
    largest = 0.0
    for f, r, name in zip(fast, ref, names, strict=True):
        if isinstance(f, str) or isinstance(r, str):
            said = [x if isinstance(x, str) else "an array" for x in (f, r)]
            assert said[0] == said[1], f"{name}: fast path {said[0]!r}, reference {said[1]!r}"
            continue
        assert f.shape == (28, 28) and f.dtype == np.float32, name
        diff = float(np.abs(f - r).max())
        assert diff <= TOL, f"{name}: the fast path differs from the reference by {diff}"
        largest = max(largest, diff)
    return largest


def compare(paths: list[Path]) -> tuple[list[Outcome], float]:
    """Every path read by load_image, load_images and the reference: they must agree."""
    names = [p.name for p in paths]
    ref = [outcome(ir.load_image_reference, p) for p in paths]
    one = [outcome(mi.load_image, p) for p in paths]
    many = [as_outcome(x) for x in mi.load_images(paths)]
    return ref, max(worst(one, ref, names), worst(many, ref, names))


@pytest.fixture(scope="module")
def ckpt():
    return load_checkpoint(SHIPPED_MODEL)


def digits(ckpt, arrays: list[np.ndarray]) -> list[int]:
    x = torch.from_numpy(np.stack(arrays)).unsqueeze(1)
    probs = predict_probs(ckpt.model, x, ckpt.meta["mean"], ckpt.meta["std"], torch.device("cpu"), "fp32")
    return probs.argmax(1).tolist()


def save(folder: Path, name: str, a: np.ndarray, mode: str | None = None) -> Path:
    path = folder / f"{name}.png"
    (Image.fromarray(a, mode) if mode else Image.fromarray(a)).save(path)
    return path


# --- always run: synthetic digits and edge cases ---------------------------------------------------


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory) -> list[Path]:
    """300 jittered, noisy font digits of a tiny IDX set (make_tiny_mnist), as PNG files."""
    root = make_tiny_mnist(tmp_path_factory.mktemp("tiny"), n_train=200, n_test=100)
    out = tmp_path_factory.mktemp("synthetic")
    raw = root / "MNIST" / "raw"
    images = np.concatenate(
        [data.read_idx(raw / "train-images-idx3-ubyte"), data.read_idx(raw / "t10k-images-idx3-ubyte")]
    )
    return [save(out, f"{i:03d}", a) for i, a in enumerate(images)]


def test_synthetic_digits_read_as_the_reference(synthetic, ckpt):
    ref, largest = compare(synthetic)
    assert all(not isinstance(r, str) for r in ref)  # every one a digit: the comparison means something
    fast = [mi.load_image(p) for p in synthetic]
    assert digits(ckpt, fast) == digits(ckpt, ref)  # type: ignore[arg-type]
    assert largest <= TOL


def _bar(h: int, w: int, level: int = 200, size: int = 28) -> np.ndarray:
    a = np.zeros((size, size), np.uint8)
    a[4 : 4 + h, 4 : 4 + w] = level
    return a


def edge_cases(folder: Path) -> dict[str, Path]:
    rng = np.random.default_rng(3)
    seven = digit_image(7)
    big = np.asarray(Image.fromarray(seven).resize((56, 56), Image.Resampling.BICUBIC))
    corner = np.zeros((40, 40), np.uint8)
    corner[:28, 12:] = seven  # off-centre, against an edge, in a small canvas of another size
    speckled = np.clip(200 - seven.astype(int) * 0.7 + rng.normal(0, 6, (28, 28)), 0, 255).astype(np.uint8)
    rgba = np.zeros((28, 28, 4), np.uint8)
    rgba[..., 3] = seven
    cases = {
        "blank": np.zeros((28, 28), np.uint8),
        "blank-light": np.full((28, 28), 255, np.uint8),
        "faint": np.where(seven > 0, 10, 0).astype(np.uint8),  # peak <= 0.05 of full scale
        "noise": rng.integers(0, 256, (28, 28), dtype=np.uint8),
        "one-pixel": _bar(1, 1, 255),
        "one-pixel-grey": _bar(1, 1, 90),
        "already-20": _bar(20, 8),
        "square-20": _bar(20, 20),
        "tie": _bar(19, 20),  # 19 uniform rows: the centre of mass is exactly 9, 13.5 - 9 a tie
        "needs-resize": _bar(12, 5),
        "off-centre": corner,
        "inverted": 255 - seven,
        "speckled-paper": speckled,  # light, noisy border: the spread sets the noise floor
        "tall": np.asarray(Image.fromarray(seven).resize((20, 50))),
        "largest-small": big,  # 56: the fast path's last size
        "camera-branch": np.pad(big, ((0, 1), (0, 1))),  # 57: the reference's camera branch
    }
    paths = {name: save(folder, name, a) for name, a in cases.items()}
    paths["gray16"] = save(folder, "gray16", seven.astype(np.uint16) * 257)
    paths["rgba"] = save(folder, "rgba", rgba, "RGBA")
    paths["rgb"] = save(folder, "rgb", np.stack([255 - seven] * 3, axis=-1))
    im = Image.fromarray(np.stack([255 - seven, 255 - seven // 2, 255 - seven], axis=-1))
    im.quantize(32).save(folder / "palette.png")
    paths["palette"] = folder / "palette.png"
    return paths


def test_edge_cases_read_as_the_reference(tmp_path, monkeypatch):
    paths = edge_cases(tmp_path)
    with Image.open(paths["gray16"]) as im16, Image.open(paths["palette"]) as imp:
        assert (im16.mode, imp.mode) == ("I;16", "P")
    placed: list[tuple[int, int]] = []
    real_centre = nz._centre
    monkeypatch.setattr(nz, "_centre", lambda crop: placed.append(crop.shape) or real_centre(crop))
    ref, _ = compare(list(paths.values()))
    got = dict(zip(paths, ref, strict=True))
    blank = f"{ErrorKind.NO_DIGIT.value}: no digit found (blank image)"
    assert got["blank"] == got["blank-light"] == got["faint"] == blank
    for name in ("one-pixel", "one-pixel-grey", "already-20", "tie", "off-centre", "inverted", "tall"):
        a = got[name]
        assert isinstance(a, np.ndarray) and a.max() == 1.0, name
    assert isinstance(got["tie"], np.ndarray) and got["tie"][4:23, 4:24].min() == 1.0  # top rounded to 4
    # The tie and the resizes went through the reference's own steps, the rest did not.
    assert (19, 20) in placed and (1, 1) in placed and (12, 5) in placed
    assert (20, 8) not in placed and (20, 20) not in placed


def test_normalise_many_is_normalise_for_every_image_of_a_stack():
    rng = np.random.default_rng(0)
    seven = digit_image(7)
    stack = np.stack(
        [
            *(np.roll(seven, (int(dy), int(dx)), (0, 1)) for dy, dx in rng.integers(-6, 7, (40, 2))),
            *(255 - np.roll(digit_image(d), 2, 1) for d in (0, 2, 5, 8)),
            np.zeros((28, 28), np.uint8),
            np.full((28, 28), 128, np.uint8),
            rng.integers(0, 256, (28, 28), dtype=np.uint8),
            np.clip(seven * 0.6 + rng.normal(40, 10, (28, 28)), 0, 255).astype(np.uint8),
            _bar(19, 20),
            _bar(1, 1, 255),
        ]
    )
    names = [str(i) for i in range(len(stack))]
    many = [as_outcome(x) for x in nz.normalise_many(stack)]
    one = [outcome(nz.normalise, a) for a in stack]
    ref = [outcome(lambda a: nz.normalise_reference(a.astype(np.float32) / 255.0), a) for a in stack]
    assert worst(many, ref, names) <= TOL and worst(one, ref, names) <= TOL
    assert sum(isinstance(r, str) for r in ref) == 2  # the two blanks; the others are digits


def test_a_fast_path_one_pixel_off_is_caught(synthetic, monkeypatch):
    """The comparison fails when the fast path is wrong: here each array moved one pixel."""
    real_place = nz._place
    monkeypatch.setattr(nz, "_place", lambda crop, cy, cx: np.roll(real_place(crop, cy, cx), 1, axis=1))
    with pytest.raises(AssertionError, match=r"000\.png: the fast path differs from the reference by 0\.\d"):
        compare(synthetic[:5])


def test_median3_is_pillows_median_filter():
    """The camera-sized branch's 3x3 median, a sorting network in numpy, against Pillow's own."""
    rng = np.random.default_rng(5)
    for k in range(120):
        a = rng.random((int(rng.integers(1, 70)), int(rng.integers(1, 70))), dtype=np.float32)
        if k % 3 == 0:
            a = np.round(a * 3) / 3  # ties everywhere
        elif k % 3 == 1:
            a[a < 0.6] = 0.0
        assert np.array_equal(nz.median3(a), nz.median3_pillow(a)), a.shape


def test_camera_sized_images_use_the_numpy_median(tmp_path, monkeypatch):
    photo = np.pad(255 - digit_image(5), 40, constant_values=230)  # 108x108: the camera branch
    path = save(tmp_path, "photo", photo)
    expected = ir.load_image_reference(path)
    monkeypatch.setattr(ImageFilter, "MedianFilter", lambda size: pytest.fail("Pillow's median ran"))
    assert np.array_equal(mi.load_image(path), expected)
    with pytest.raises(pytest.fail.Exception, match="Pillow's median ran"):  # the trap works
        ir.load_image_reference(path)


def test_load_images_keeps_order_and_each_files_own_error(tmp_path, monkeypatch):
    paths = edge_cases(tmp_path)
    good = [save(tmp_path, f"seven-{i}", np.roll(digit_image(7), i, 1)) for i in range(mi.MANY + 2)]
    batch = [
        good[0],
        tmp_path / "missing.png",
        paths["blank"],
        *good[1:5],
        paths["camera-branch"],
        tmp_path,
        *good[5:],
        paths["off-centre"],
        paths["gray16"],
    ]
    broken = good[3]
    real = mi.read_luminance

    def flaky(path, *args):
        if path == broken:
            raise ZeroDivisionError("decoder bug")
        return real(path, *args)

    monkeypatch.setattr(mi, "read_luminance", flaky)
    got = mi.load_images(batch)
    monkeypatch.undo()
    assert len(got) == len(batch)
    assert isinstance(got[1], ImageError) and got[1].kind is ErrorKind.NOT_FOUND
    assert isinstance(got[2], ImageError) and got[2].kind is ErrorKind.NO_DIGIT
    assert isinstance(got[batch.index(tmp_path)], ImageError)
    assert isinstance(got[batch.index(broken)], ZeroDivisionError)  # a bug is handed back, not hidden
    for path, x in zip(batch, got, strict=True):
        if isinstance(x, np.ndarray):
            assert np.array_equal(x, ir.load_image_reference(path)), path


def test_small_8bit_images_take_the_fast_path(tmp_path, monkeypatch):
    """A 28x28 PNG is read as 8-bit levels and never goes through the reference."""
    path = save(tmp_path, "seven", digit_image(7))
    assert mi.read_luminance(path).dtype == np.uint8

    def no(*args):
        raise AssertionError("the reference ran")

    monkeypatch.setattr(nz, "normalise_reference", no)
    monkeypatch.setattr(nz, "_centre", no)
    mi.load_image(path)
    mi.load_images([path] * (mi.MANY + 1))


# --- with the real MNIST files --------------------------------------------------------------------

needs_real_data = pytest.mark.skipif(
    data.locate(REAL_DATA, ("test",)) is None,
    reason=f"the real MNIST test set is not under {REAL_DATA}/MNIST/raw",
)


def _batches(paths: list[Path], size: int = 256) -> Iterator[list[Path]]:
    for i in range(0, len(paths), size):
        yield paths[i : i + size]


@pytest.mark.slow
@needs_real_data
@pytest.mark.timeout(900)
def test_all_10000_mnist_test_pngs_read_as_the_reference(tmp_path, ckpt):
    x, _, _ = data.load_split(REAL_DATA, "test")
    images = x[:, 0].numpy()
    assert len(images) == 10_000
    paths = [save(tmp_path, f"{i:05d}", a) for i, a in enumerate(images)]
    names = [p.name for p in paths]
    ref = [ir.load_image_reference(p) for p in paths]
    one = [mi.load_image(p) for p in paths]
    many = [as_outcome(a) for batch in _batches(paths) for a in mi.load_images(batch)]
    assert max(worst(one, ref, names), worst(many, ref, names)) <= TOL  # type: ignore[arg-type]
    # The same digit: where the arrays are equal the model cannot differ, so it reads those
    # that are not, and a sample of the rest.
    differ = [i for i in range(len(paths)) if not np.array_equal(one[i], ref[i])]
    check = sorted({*differ, *range(0, len(paths), 20)})
    assert digits(ckpt, [one[i] for i in check]) == digits(ckpt, [ref[i] for i in check])


@pytest.mark.slow
@needs_real_data
@pytest.mark.timeout(900)
def test_realworld_bench_photos_read_as_the_reference(tmp_path, ckpt):
    """The first 200 of bench/realworld.py's 2,000 photographs: its generator, its seed, so the same
    pictures. Each is an independent draw of the same few uniform parameters (scale, canvas, offset,
    paper tone, noise): 200 of them cover every range densely, and a difference that is not a
    one-in-hundreds accident shows in them; all 2,000 cost 50 s on two cores (the reference
    reader is the slow part), these 200 about 5."""
    x, _, _ = data.load_split(REAL_DATA, "test")
    rng = np.random.default_rng(0)
    paths = []
    for i in range(200):
        path = tmp_path / f"{i:05d}.jpg"
        photograph(x[i, 0].numpy(), rng).save(path, quality=90)
        paths.append(path)
    ref, _ = compare(paths)
    arrays = [mi.load_image(p) for p in paths]
    assert digits(ckpt, arrays) == digits(ckpt, ref)  # type: ignore[arg-type]

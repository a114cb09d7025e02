"""How mnistq.images opens and decodes a file: opened once without following links, checked on
what was opened, only the product's formats, big images decoded small."""

from __future__ import annotations

import os
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers_images import SHIPPED_MODEL, digit_image
from PIL import Image

import mnistq.images
from mnistq.errors import ImageError
from mnistq.images import FORMATS, MIN_SIDE, load_image
from mnistq.protocol import EXTENSIONS, ErrorKind
from trainer.model import load_checkpoint, predict_probs

pytestmark = pytest.mark.timeout(120)


def _read(a: np.ndarray) -> int:
    ckpt = load_checkpoint(SHIPPED_MODEL)
    x = torch.from_numpy(a)[None, None]
    probs = predict_probs(ckpt.model, x, ckpt.meta["mean"], ckpt.meta["std"], torch.device("cpu"), "fp32")
    return int(probs.argmax())


def test_formats_are_exactly_those_of_the_extensions() -> None:
    Image.init()
    assert {Image.registered_extensions()[ext] for ext in EXTENSIONS} == set(FORMATS)


def test_postscript_named_png_is_not_an_image(tmp_path: Path) -> None:
    path = tmp_path / "eps.png"
    Image.new("L", (28, 28), 255).save(path, "EPS")  # PostScript text, whatever the name says
    with Image.open(path) as im:
        assert im.format == "EPS"  # an unrestricted Pillow takes it (and would run Ghostscript)
    with pytest.raises(ImageError, match=r"not an image \(unrecognised format\)") as info:
        load_image(path)
    assert info.value.kind is ErrorKind.UNREADABLE


def test_what_is_opened_is_what_is_checked(tmp_path: Path) -> None:
    real = tmp_path / "real"
    real.mkdir()
    Image.fromarray(digit_image(2)).save(real / "two.png")
    (real / "link.png").symlink_to(real / "two.png")
    (tmp_path / "folder-link").symlink_to(real)
    os.mkfifo(real / "pipe.png")  # never written to: opening it for reading would block
    refusals = {
        real / "link.png": "the file is a symbolic link",
        tmp_path / "folder-link" / "two.png": "a folder on its path is a symbolic link",
        real / "pipe.png": "not a regular file",
        real: "is a directory",
    }
    for path, message in refusals.items():
        with pytest.raises(ImageError, match=message) as info:
            load_image(path)
        assert info.value.kind is ErrorKind.REFUSED
    assert _read(load_image(real / "two.png")) == 2


def _big_photo(digit: int, side: int) -> Image.Image:
    """A page photographed at ``side`` x ``side``: dark digit half the frame tall, uneven paper."""
    rng = np.random.default_rng(digit)
    ink = Image.fromarray(digit_image(digit)).resize((side // 2, side // 2), Image.Resampling.BICUBIC)
    paper = np.tile(np.linspace(0.75, 0.92, side, dtype=np.float32), (side, 1))
    o = side // 4
    paper[o : o + side // 2, o : o + side // 2] *= 1 - 0.85 * np.asarray(ink, dtype=np.float32) / 255
    paper += rng.normal(0, 0.02, paper.shape).astype(np.float32)
    return Image.fromarray((np.clip(paper, 0, 1) * 255).astype(np.uint8)).convert("RGB")


@pytest.fixture(scope="module")
def big_jpeg(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("big") / "big-5.jpg"
    _big_photo(5, 4000).save(path, quality=90)
    return path


def test_big_jpeg_decodes_small_and_still_reads_right(big_jpeg: Path, monkeypatch) -> None:
    sizes: list[tuple[int, int]] = []
    real_shrink = mnistq.images.shrink

    def spy(im: Image.Image) -> Image.Image:
        out = real_shrink(im)
        out.load()
        sizes.append(out.size)
        return out

    monkeypatch.setattr(mnistq.images, "shrink", spy)
    load_image(big_jpeg)  # warm-up
    t0 = time.perf_counter()
    small = load_image(big_jpeg)
    fast = time.perf_counter() - t0
    assert sizes[-1] == (1000, 1000)  # 4000 / 4 in the DCT (/ 8 would go below MIN_SIDE)
    assert min(sizes[-1]) >= MIN_SIDE
    monkeypatch.setattr(mnistq.images, "MIN_SIDE", 10**6)  # no reduction: the full decode
    t0 = time.perf_counter()
    full = load_image(big_jpeg)
    slow = time.perf_counter() - t0
    assert sizes[-1] == (4000, 4000)
    assert _read(small) == _read(full) == 5
    assert fast < slow / 4, (fast, slow)  # measured ~40x on a 2-core EPYC


@pytest.mark.parametrize("mode", ["RGB", "P", "I;16", "1"])
def test_big_non_jpeg_is_reduced_in_its_own_terms(tmp_path: Path, mode: str) -> None:
    photo = _big_photo(7, 1600)
    if mode == "I;16":
        photo = Image.fromarray(np.asarray(photo.convert("L"), dtype=np.uint16) * 257)
    elif mode != "RGB":
        photo = photo.convert(mode)
    path = tmp_path / f"big-{mode.replace(';', '')}.png"
    photo.save(path)
    with Image.open(path) as im:
        assert im.mode == mode
        assert mnistq.images.shrink(im).size == (534, 534)  # 1600 / 3, by an integer factor
    assert _read(load_image(path)) == 7


def test_exif_orientation_survives_the_reduction(tmp_path: Path) -> None:
    upright = _big_photo(7, 1600)
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to view": store it turned the other way
    path = tmp_path / "turned.jpg"
    upright.transpose(Image.Transpose.ROTATE_90).save(path, exif=exif, quality=90)
    assert _read(load_image(path)) == 7

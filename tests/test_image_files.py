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
import mnistq.safeopen
import testsupport.images_reference
from mnistq.errors import ImageError
from mnistq.images import FORMATS, MIN_SIDE, load_image
from mnistq.protocol import EXTENSIONS, ErrorKind
from model import load_checkpoint, predict_probs

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
    monkeypatch.setattr(mnistq.images, "LONG_SIDE", 10**6)
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


# --- the served open (openat2 where the kernel has it) and the walk refuse alike -----------------


def _outcome(read, path) -> str:
    try:
        read(path)
        return "read"
    except ImageError as e:
        return f"{e.kind.value}: {e}"


def test_openat2_and_the_walk_say_the_same(tmp_path: Path, monkeypatch) -> None:
    real = tmp_path / "real"
    real.mkdir()
    Image.fromarray(digit_image(2)).save(real / "two.png")
    (real / "link.png").symlink_to(real / "two.png")
    (tmp_path / "folder-link").symlink_to(real)
    (tmp_path / "dangling").symlink_to(tmp_path / "nowhere")
    os.mkfifo(real / "pipe.png")
    paths = [
        real / "two.png",
        real / "link.png",
        tmp_path / "folder-link" / "two.png",
        tmp_path / "dangling" / "two.png",
        real / "pipe.png",
        real,
        real / "missing.png",
        tmp_path / "missing" / "two.png",
        real / "two.png" / "x.png",  # a file where a folder should be
        Path(str(real) + "//" + "two.png"),
        real / "." / "two.png",
        Path("/"),
    ]
    walk = [_outcome(lambda p: mnistq.images.read_luminance(p, walk=True), p) for p in paths]
    served = [_outcome(mnistq.images.read_luminance, p) for p in paths]
    monkeypatch.setattr(mnistq.safeopen, "_open_folder", None)  # no openat2: the walk serves
    fallback = [_outcome(mnistq.images.read_luminance, p) for p in paths]
    assert served == walk == fallback
    assert walk[:5] == [
        "read",
        "refused: the file is a symbolic link (links are not followed)",
        "refused: a folder on its path is a symbolic link (links are not followed)",
        "refused: a folder on its path is a symbolic link (links are not followed)",
        "refused: not a regular file",
    ]
    for read in (mnistq.images.load_image, testsupport.images_reference.load_image_reference):
        with pytest.raises(ValueError, match="null byte"):  # as os.open has always said
            read(str(real / "two.png") + "\0")


@pytest.mark.skipif(mnistq.safeopen._open_folder is None, reason="no openat2 here: the walk serves")
def test_openat2_opens_the_folder_in_one_call(tmp_path: Path, monkeypatch) -> None:
    deep = tmp_path / "a" / "b" / "c"
    deep.mkdir(parents=True)
    Image.fromarray(digit_image(2)).save(deep / "two.png")
    opened: list[tuple[str, int | None]] = []
    real_open = os.open

    def spy(name, flags, mode=0o777, *, dir_fd=None):
        opened.append((name, dir_fd))
        return real_open(name, flags, mode, dir_fd=dir_fd)

    monkeypatch.setattr(os, "open", spy)
    assert _read(load_image(deep / "two.png")) == 2
    assert [name for name, _ in opened] == ["two.png"]  # the walk would open every component
    assert opened[0][1] is not None  # in the folder openat2 gave, with O_NOFOLLOW


# --- worker/paths.py: realpath(3), with Python's resolve where it says no -----------------------


def _checked_before(raw: str, roots: tuple[Path, ...]) -> Path:
    """worker/paths.py's checked_path as it was before realpath(3)."""
    p = Path(raw)
    if not p.is_absolute():
        raise ImageError("path must be absolute", ErrorKind.REFUSED)
    if ".." in p.parts:
        raise ImageError("path must not contain '..'", ErrorKind.REFUSED)
    try:
        real = p.resolve(strict=False)
    except (OSError, RuntimeError, ValueError) as e:
        raise ImageError(f"cannot resolve path: {e}", ErrorKind.REFUSED) from None
    if not any(real.is_relative_to(root) for root in roots):
        named = ", ".join(str(root) for root in roots) or "none"
        raise ImageError(
            f"path is outside the allowed roots ({named}); set MNISTQ_ALLOWED_ROOTS on the worker",
            ErrorKind.REFUSED,
        )
    return real


def test_checked_path_says_what_it_always_said(tmp_path: Path, monkeypatch) -> None:
    import worker.paths

    root, outside, beside = tmp_path / "root", tmp_path / "outside", tmp_path / "root2"
    (root / "sub").mkdir(parents=True)
    outside.mkdir()
    beside.mkdir()  # its name begins with the root's: still outside it
    for folder in (root / "sub", outside, beside):
        Image.fromarray(digit_image(2)).save(folder / "two.png")
    (root / "in-link.png").symlink_to(root / "sub" / "two.png")
    (root / "out-link.png").symlink_to(outside / "two.png")
    (root / "folder-out").symlink_to(outside)
    (root / "loop").symlink_to(root / "loop")
    (root / "dangling.png").symlink_to(outside / "nowhere.png")
    odd = os.fsdecode(b"caf\xe9.png")  # not UTF-8: surrogate escapes, both ways
    Image.fromarray(digit_image(2)).save(root / odd)
    s = str(root)
    raws = [
        f"{s}/sub/two.png",
        f"{s}/in-link.png",
        f"{s}/out-link.png",
        f"{s}/folder-out/two.png",
        f"{s}/loop",
        f"{s}/loop/x.png",
        f"{s}/dangling.png",
        f"{s}/missing.png",
        f"{s}/sub/../sub/two.png",
        f"{s}//sub/./two.png",
        f"{s}/sub/two.png/",
        f"{s}/{odd}",
        f"{s}/sub/two\0.png",
        "relative.png",
        "",
        str(outside / "two.png"),
        str(beside / "two.png"),
        s,
    ]
    fast_answers: list[str | None] = []
    real_fast = worker.paths._fast_realpath
    monkeypatch.setattr(
        worker.paths, "_fast_realpath", lambda raw: fast_answers.append(real_fast(raw)) or fast_answers[-1]
    )

    def answer(check, raw: str, roots: tuple[Path, ...]) -> object:
        try:
            return check(raw, roots)
        except ImageError as e:
            return (e.kind, str(e))

    for roots in ((root,), (tmp_path / "elsewhere", root), (Path("/"),), (Path(s + "/"),)):
        for raw in raws:
            assert answer(worker.paths.checked_path, raw, roots) == answer(_checked_before, raw, roots), raw
    assert any(fast_answers) and None in fast_answers  # realpath(3) answered, and sent some back
    monkeypatch.setattr(worker.paths, "_fast_realpath", lambda raw: None)  # no C library: Python's resolve
    for raw in raws:
        assert answer(worker.paths.checked_path, raw, (root,)) == answer(_checked_before, raw, (root,)), raw

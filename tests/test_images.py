"""Image normalisation and `mnistq predict` on real-world files: modes, formats, polarity, bad input."""

from __future__ import annotations

import re
import struct
import time
import zlib
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers_images import DIGITS, SHIPPED_MODEL, digit_image, run_mnistq
from PIL import Image, ImageFile

from mnistq.errors import ImageError
from mnistq.images import load_image
from mnistq.protocol import ErrorKind, ExitCode
from model import load_checkpoint, predict_probs

CLI_TIMEOUT = pytest.mark.timeout(120)


# --- ways of writing the same digit -------------------------------------------------------------


def _up(a: np.ndarray, k: int) -> np.ndarray:
    """Upscale a uint8 image k times (smoothly, as a scan of a larger digit would be)."""
    im = Image.fromarray(a).resize((a.shape[1] * k, a.shape[0] * k), Image.Resampling.BICUBIC)
    return np.asarray(im)


def plain(a: np.ndarray, path: Path) -> None:
    Image.fromarray(a).save(path)


def inverted(a: np.ndarray, path: Path) -> None:
    """Dark ink on light paper."""
    Image.fromarray(255 - a).save(path)


def rgba_alpha_ink(a: np.ndarray, path: Path) -> None:
    """Black RGB everywhere; the digit exists only in the alpha channel."""
    rgba = np.zeros((*a.shape, 4), dtype=np.uint8)
    rgba[..., 3] = a
    Image.fromarray(rgba, "RGBA").save(path)


def gray16(a: np.ndarray, path: Path) -> None:
    im = Image.fromarray(_up(a, 2).astype(np.uint16) * 257)
    assert im.mode == "I;16"
    im.save(path)


def cmyk_jpeg(a: np.ndarray, path: Path) -> None:
    Image.fromarray(255 - _up(a, 4)).convert("RGB").convert("CMYK").save(path, quality=95)


def cmyk_tiff(a: np.ndarray, path: Path) -> None:
    Image.fromarray(255 - a).convert("RGB").convert("CMYK").save(path)


def animated_gif(a: np.ndarray, path: Path) -> None:
    """First frame the digit, second frame a different digit."""
    other = next(d for d in DIGITS if not np.array_equal(digit_image(d), a))
    frames = [Image.fromarray(a), Image.fromarray(digit_image(other))]
    frames[0].save(path, save_all=True, append_images=frames[1:], duration=200, loop=0)


def palette_png(a: np.ndarray, path: Path) -> None:
    """Blue ink on yellow paper, stored as a palette image."""
    t = _up(a, 2).astype(np.float32)[..., None] / 255.0
    rgb = (1 - t) * np.array([250, 230, 40]) + t * np.array([20, 30, 160])
    Image.fromarray(rgb.round().astype(np.uint8), "RGB").quantize(64).save(path)


def noisy_canvas(a: np.ndarray, path: Path) -> None:
    """A 3x digit, dark on grey paper, off-centre on a 400x300 canvas with sensor noise."""
    rng = np.random.default_rng(7)
    ink = np.zeros((300, 400), dtype=np.float32)
    ink[180:264, 40:124] = _up(a, 3) / 255.0
    page = 0.85 - 0.75 * ink + rng.normal(0.0, 8 / 255, size=ink.shape)
    Image.fromarray((np.clip(page, 0, 1) * 255).round().astype(np.uint8)).save(path)


#: name -> (extension, writer, the mode Pillow must read the file back in)
VARIANTS: dict[str, tuple[str, Callable[[np.ndarray, Path], None], str]] = {
    "plain": (".png", plain, "L"),
    "inverted": (".png", inverted, "L"),
    "rgba-alpha-ink": (".png", rgba_alpha_ink, "RGBA"),
    "gray16": (".png", gray16, "I;16"),
    "cmyk-jpeg": (".jpg", cmyk_jpeg, "CMYK"),
    "cmyk-tiff": (".tif", cmyk_tiff, "CMYK"),
    "animated-gif": (".gif", animated_gif, "P"),
    "palette": (".png", palette_png, "P"),
    "noisy-canvas": (".png", noisy_canvas, "L"),
}


def write_variant(folder: Path, digit: int, variant: str) -> Path:
    ext, writer, _ = VARIANTS[variant]
    path = folder / f"{variant}-{digit}{ext}"
    writer(digit_image(digit), path)
    return path


@pytest.fixture(scope="module")
def ckpt():
    return load_checkpoint(SHIPPED_MODEL)


def classify(ckpt, arrays: list[np.ndarray]) -> list[int]:
    x = torch.from_numpy(np.stack(arrays)).unsqueeze(1)
    probs = predict_probs(ckpt.model, x, ckpt.meta["mean"], ckpt.meta["std"], torch.device("cpu"), "fp32")
    return probs.argmax(1).tolist()


# --- in process: mnistq.images.load_image ------------------------------------------------------


def test_rendered_digits_are_read_confidently(ckpt):
    """Confident as served: through the model's calibration, as the worker and predict give it."""
    x = torch.from_numpy(np.stack([digit_image(d) for d in DIGITS])).unsqueeze(1)
    cpu = torch.device("cpu")
    probs = predict_probs(
        ckpt.model, x, ckpt.meta["mean"], ckpt.meta["std"], cpu, "fp32", calibration=ckpt.calibration
    )
    conf, pred = probs.max(1)
    assert pred.tolist() == list(DIGITS)
    assert conf.min().item() > 0.9, conf.tolist()


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_load_image_variants_read_as_the_plain_digit(tmp_path, ckpt, variant):
    paths = [write_variant(tmp_path, d, variant) for d in DIGITS]
    for p in paths:  # the file really is the awkward kind it claims to be
        with Image.open(p) as im:
            assert im.mode == VARIANTS[variant][2]
            assert getattr(im, "n_frames", 1) == (2 if variant == "animated-gif" else 1)
    if variant == "rgba-alpha-ink":
        rgba = np.asarray(Image.open(paths[0]))
        assert rgba[..., :3].max() == 0 and rgba[..., 3].max() == 255
    arrays = [load_image(p) for p in paths]
    for a in arrays:
        assert a.shape == (28, 28) and a.dtype == np.float32
        assert a.min() >= 0.0 and a.max() <= 1.0
    plain_arrays = [load_image(write_variant(tmp_path, d, "plain")) for d in DIGITS]
    assert classify(ckpt, arrays) == classify(ckpt, plain_arrays) == list(DIGITS)


def test_huge_declared_size_is_refused_before_decoding(tmp_path, monkeypatch):
    path = tmp_path / "bomb.png"
    path.write_bytes(png_header_only(100_000, 100_000))

    def no_decoding(self):
        raise AssertionError("the image was decoded before its size was checked")

    monkeypatch.setattr(ImageFile.ImageFile, "load", no_decoding)
    with pytest.raises(ImageError, match=r"too large: 100000x100000"):
        load_image(path)
    plain(digit_image(DIGITS[0]), tmp_path / "small.png")
    with pytest.raises(ImageError, match=r"too large: 28x28 pixels is over the limit of 100"):
        load_image(tmp_path / "small.png", max_pixels=100)


# --- bad input ----------------------------------------------------------------------------------


def png_header_only(width: int, height: int) -> bytes:
    """A PNG that declares width x height 8-bit grey pixels (10 GB for 100000x100000) but holds
    one tiny IDAT: any attempt to decode it allocates the full size first."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", ihdr)
        + chunk(b"IDAT", zlib.compress(b"\0" * 1000))
        + chunk(b"IEND", b"")
    )


def make_bad(kind: str, folder: Path) -> Path:
    if kind == "empty":
        path = folder / "empty.png"
        path.write_bytes(b"")
    elif kind == "truncated":
        rng = np.random.default_rng(0)
        path = folder / "truncated.png"
        Image.fromarray(rng.integers(0, 256, (200, 200), dtype=np.uint8)).save(path)
        data = path.read_bytes()
        path.write_bytes(data[: len(data) // 2])
    elif kind == "text":
        path = folder / "x.png"
        path.write_text("this is not a picture of a digit\n")
    elif kind == "directory":
        path = folder / "folder.png"
        path.mkdir()
    elif kind == "huge":
        path = folder / "huge.png"
        path.write_bytes(png_header_only(100_000, 100_000))
    elif kind == "blank":
        path = folder / "blank.png"
        Image.new("L", (28, 28), 0).save(path)
    else:
        raise ValueError(kind)
    return path


BAD = {
    "empty": "empty file",
    "truncated": "damaged or truncated image",
    "text": "not an image",
    "directory": "is a directory",
    "huge": "image too large: 100000x100000 pixels",
    "blank": "no digit found",
}
#: the error kind each bad input is reported under (the results CSV's error_kind column)
BAD_KIND = {
    "empty": ErrorKind.UNREADABLE,
    "truncated": ErrorKind.UNREADABLE,
    "text": ErrorKind.UNREADABLE,
    "directory": ErrorKind.REFUSED,
    "huge": ErrorKind.TOO_LARGE,
    "blank": ErrorKind.NO_DIGIT,
}


@pytest.mark.parametrize("kind", list(BAD))
def test_load_image_refuses_bad_input(tmp_path, kind):
    with pytest.raises(ImageError, match=re.escape(BAD[kind])) as info:
        load_image(make_bad(kind, tmp_path))
    assert "\n" not in str(info.value)
    assert info.value.kind is BAD_KIND[kind]


def test_load_image_missing_file(tmp_path):
    with pytest.raises(ImageError, match="file not found") as info:
        load_image(tmp_path / "nope.png")
    assert info.value.kind is ErrorKind.NOT_FOUND


# --- the CLI ------------------------------------------------------------------------------------


@CLI_TIMEOUT
@pytest.mark.system
def test_cli_predicts_one_clean_digit(tmp_path):
    d = DIGITS[-1]
    path = write_variant(tmp_path, d, "plain")
    r = run_mnistq("predict", path, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert re.search(rf"^Predicted Digit: {d}(\s|$)", r.stdout, re.M), r.stdout
    assert "Traceback" not in r.stdout + r.stderr


@CLI_TIMEOUT
@pytest.mark.system
def test_cli_predicts_every_variant_in_one_run(tmp_path):
    expected = {write_variant(tmp_path, d, v): d for d in DIGITS for v in VARIANTS}
    r = run_mnistq("predict", *expected, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    got = {
        Path(m.group(1)): int(m.group(2))
        for m in re.finditer(r"^(.+): Predicted Digit: (\d)\b", r.stdout, re.M)
    }
    assert got == expected
    # each line names the model, as the one-image line (and the README's sample) does
    version = load_checkpoint(SHIPPED_MODEL).version
    assert all(f", model {version})" in line for line in r.stdout.splitlines()), r.stdout


@CLI_TIMEOUT
@pytest.mark.parametrize("kind", ["empty", "truncated", "text", "directory", "huge"])
@pytest.mark.system
def test_cli_bad_input_is_one_clear_error_line(tmp_path, kind):
    path = make_bad(kind, tmp_path)
    t0 = time.perf_counter()
    r = run_mnistq("predict", path, cwd=tmp_path)
    elapsed = time.perf_counter() - t0
    assert r.returncode == ExitCode.FAILED_INPUT, (r.stdout, r.stderr)
    assert "Traceback" not in r.stdout + r.stderr
    assert "Predicted Digit" not in r.stdout
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, r.stderr
    assert lines[0].startswith(f"{path}: error: ") and BAD[kind] in lines[0], lines[0]
    assert elapsed < 60  # a decoded 100000x100000 image would take far longer (and 10 GB)


@CLI_TIMEOUT
@pytest.mark.system
def test_cli_max_pixels_and_mixed_good_and_bad(tmp_path):
    good = write_variant(tmp_path, DIGITS[0], "plain")
    r = run_mnistq("predict", "--max-pixels", "100", good, cwd=tmp_path)
    assert r.returncode == ExitCode.FAILED_INPUT
    assert f"{good}: error: image too large: 28x28 pixels is over the limit of 100" in r.stderr
    assert "Traceback" not in r.stdout + r.stderr

    bad = make_bad("text", tmp_path)
    r = run_mnistq("predict", good, bad, cwd=tmp_path)
    assert r.returncode == ExitCode.FAILED_INPUT  # a failed file is said; the good one is still read
    assert f"{good}: Predicted Digit: {DIGITS[0]}" in r.stdout
    assert f"{bad}: error: not an image" in r.stderr
    assert "Traceback" not in r.stdout + r.stderr

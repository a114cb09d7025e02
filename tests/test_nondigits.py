"""The generated non-digits: deterministic, in the served form, honest about what they leave out;
and the shipped model sends them to review but not clean digits."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from helpers_images import DIGITS, SHIPPED_MODEL, digit_image

from mnistq.errors import ImageError
from mnistq.images import normalise
from model import load_checkpoint, predict_logits
from trainer import nondigits
from trainer.calibrate import to_review


def _digits(n: int = 40, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Stand-ins for MNIST digits to cut in half: a thick ring or bar per label, jittered."""
    rng = np.random.default_rng(seed)
    labels = np.arange(n) % 10
    images = np.zeros((n, 28, 28), dtype=np.uint8)
    yy, xx = np.mgrid[0:28, 0:28]
    for i in range(n):
        r = np.hypot(yy - 14 - rng.integers(-2, 3), xx - 14 - rng.integers(-2, 3))
        images[i][(r > 5) & (r < 9)] = 255
    return images, labels


def _check_served(images: np.ndarray) -> None:
    """Each image is what mnistq.images.normalise makes: 28x28 float in [0, 1], bright ink, the ink
    scaled to 20 px on its long side, and never a tall thin stroke (those read as a 1)."""
    assert images.dtype in (np.float32, np.uint8) and images.shape[1:] == (28, 28)
    for a in images.astype(np.float32) / (255.0 if images.dtype == np.uint8 else 1.0):
        assert a.min() >= 0 and 0.5 < a.max() <= 1.0
        rows, cols = np.flatnonzero(a.any(axis=1)), np.flatnonzero(a.any(axis=0))
        h, w = rows[-1] - rows[0] + 1, cols[-1] - cols[0] + 1
        assert 19 <= max(h, w) <= 21, (h, w)
        assert w >= nondigits.THIN * h - 1
        normalise(a)  # and served again, it is still an image with ink, not a blank


def test_training_bank_is_deterministic_and_served():
    x, y = _digits()
    a = nondigits.training_bank(90, 5, x, y)
    assert a.dtype == np.uint8 and a.shape == (90, 28, 28)
    assert np.array_equal(a, nondigits.training_bank(90, 5, x, y))
    assert not np.array_equal(a, nondigits.training_bank(90, 6, x, y))
    _check_served(a)


def test_evaluation_set_is_deterministic_served_and_of_every_kind():
    x, y = _digits()
    images, kinds = nondigits.evaluation_set(60, 1, x, y)
    again, kinds_again = nondigits.evaluation_set(60, 1, x, y)
    assert np.array_equal(images, again) and kinds == kinds_again
    assert not np.array_equal(images, nondigits.evaluation_set(60, 2, x, y)[0])
    assert images.dtype == np.float32
    expected = {"scribbles", "textures", "shapes", "halves"}
    if nondigits.dejavu_fonts():
        expected |= {"letters", "symbols"}
    assert set(kinds) == expected
    _check_served(images)


def test_printed_digits_are_deterministic_labelled_and_served():
    images, labels = nondigits.printed_digits(40, 3)
    again, labels_again = nondigits.printed_digits(40, 3)
    assert np.array_equal(images, again) and np.array_equal(labels, labels_again)
    assert images.dtype == np.uint8 and images.shape == (40, 28, 28)
    assert sorted(set(labels.tolist())) == list(range(10))
    assert all(img.max() > 128 for img in images)


def test_without_dejavu_the_letters_are_left_out_with_a_message(monkeypatch, tmp_path, capsys):
    monkeypatch.setattr(nondigits, "DEJAVU", tmp_path / "none")
    x, y = _digits()
    _, kinds = nondigits.evaluation_set(12, 0, x, y)
    assert set(kinds) == {"scribbles", "textures", "shapes", "halves"}
    assert "no DejaVu fonts" in capsys.readouterr().err


def test_no_lookalike_of_a_digit_is_generated():
    chars = nondigits.LETTERS + nondigits.SYMBOLS + nondigits.UNICODE
    assert not set(chars) & nondigits.LOOKALIKES
    for c in "0123456789OoIlSsZzBbgq|":
        assert c in nondigits.LOOKALIKES and c not in chars


def test_a_blank_or_a_thin_stroke_is_not_served():
    assert nondigits.served(np.zeros((40, 40), dtype=np.float32)) is None
    with pytest.raises(ImageError):
        normalise(np.zeros((40, 40), dtype=np.float32))
    bar = np.zeros((40, 40), dtype=np.float32)
    bar[5:35, 18:22] = 1.0  # a "1"
    assert nondigits.served(bar) is None
    bar[18:22, 5:35] = 1.0  # a "+"
    assert nondigits.served(bar) is not None


def test_halves_keep_one_side():
    x, _ = _digits(1)
    top = nondigits._cut("top", x[0])
    assert top[20:].sum() == 0 and top[:10].sum() > 0
    right = nondigits._cut("right", x[0])
    assert right[:, :8].sum() == 0 and right[:, 20:].sum() > 0


def test_the_shipped_model_reviews_nondigits_but_not_clean_digits():
    """The shipped model is calibrated; clean rendered digits pass, most non-digits go to review."""
    ckpt = load_checkpoint(SHIPPED_MODEL)
    cal = ckpt.calibration
    assert cal.fitted and cal.review_below is not None, "the shipped model is not calibrated"
    cpu = torch.device("cpu")

    def logits(images: np.ndarray) -> torch.Tensor:
        x = torch.from_numpy(images.astype(np.float32)).unsqueeze(1)
        return predict_logits(ckpt.model, x, ckpt.meta["mean"], ckpt.meta["std"], cpu, "fp32")

    clean = np.stack([digit_image(d) for d in DIGITS]).astype(np.float32) / 255.0
    z = logits(clean)
    assert z.argmax(1).tolist() == list(DIGITS)
    assert not to_review(cal, z, cal.review_below).any(), cal.probs(z).max(1).values
    x, y = _digits()
    images, _ = nondigits.evaluation_set(120, 0, x, y)
    sent = to_review(cal, logits(images), cal.review_below)
    assert float(sent.float().mean()) >= 0.7

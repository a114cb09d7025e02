"""Calibration: ECE and the temperature fit, what `mnistq train` stores, the hold-out it never
trains on, old checkpoints, and what `evaluate` and `predict` say about it."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from helpers_images import DIGITS, digit_image, make_tiny_mnist, run_mnistq
from PIL import Image

import trainer.train as train_module
from model import Calibration, load_checkpoint, predict_logits, save_checkpoint, weights_version
from trainer import calibrate, data
from trainer.calibrate import choose_thresholds, ece, fit_temperature, nll, to_review

CLI_TIMEOUT = pytest.mark.timeout(180)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    return make_tiny_mnist(tmp_path_factory.mktemp("tiny"), n_train=1000, n_test=300)


@pytest.fixture(scope="module")
def training(tiny, tmp_path_factory) -> tuple[Path, list[torch.Tensor], list[torch.Tensor]]:
    """Three epochs on the tiny set (200 images held out), with a small outlier bank; and what
    the training loop (each augmented batch, as bytes) and the outlier bank were given."""
    out = tmp_path_factory.mktemp("model") / "m.pt"
    seen: list[torch.Tensor] = []
    cut_from: list[torch.Tensor] = []
    real_augment, real_bank = train_module.augment, calibrate.outlier_bank

    def augment(x, *args):
        seen.append((x[:, :, :, :] * 255).round().to(torch.uint8).cpu())
        return real_augment(x, *args)

    def bank(n, seed, x, y):
        cut_from.append(x)
        return real_bank(n, seed, x, y)

    args = ["--data-dir", str(tiny), "--epochs", "3", "--device", "cpu", "--precision", "fp32"]
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(train_module, "augment", augment)
        mp.setattr(calibrate, "outlier_bank", bank)
        assert train_module.main([*args, "--outliers", "600", "--out", str(out)]) == 0
    return out, seen, cut_from


@pytest.fixture(scope="module")
def trained(training) -> Path:
    return training[0]


def _test_logits(path: Path, tiny: Path) -> tuple[torch.Tensor, torch.Tensor, Calibration]:
    ckpt = load_checkpoint(path)
    x, y, _ = data.load_split(tiny, "test")
    cpu = torch.device("cpu")
    return (
        predict_logits(ckpt.model, x, ckpt.meta["mean"], ckpt.meta["std"], cpu, "fp32"),
        y,
        ckpt.calibration,
    )


# --- the measures -------------------------------------------------------------------------------


def test_ece_by_hand():
    # 4 predictions at 0.9 (3 right): bin (0.8667, 0.9333], |0.75 - 0.9| = 0.15, weight 4/6;
    # 2 at 0.6 (both right): |1 - 0.6| = 0.4, weight 2/6.
    p = torch.tensor([[0.9, 0.1]] * 4 + [[0.6, 0.4]] * 2)
    p = torch.cat([p, torch.zeros(6, 8)], 1)
    y = torch.tensor([0, 0, 0, 1, 0, 0])
    assert ece(p, y) == pytest.approx(4 / 6 * 0.15 + 2 / 6 * 0.4)
    assert ece(torch.eye(10), torch.arange(10)) == pytest.approx(0.0)
    assert nll(torch.eye(10) * 0.5 + 0.05, torch.arange(10)) == pytest.approx(-math.log(0.55))


def test_fit_temperature_recovers_the_true_one():
    """Labels drawn from softmax(z); the model reports 3z (overconfident): the fit finds T = 3."""
    gen = torch.Generator().manual_seed(0)
    z = torch.randn(20000, 10, generator=gen) * 2
    y = torch.multinomial(torch.softmax(z, 1), 1, generator=gen)[:, 0]
    assert fit_temperature(3 * z, y) == pytest.approx(3.0, rel=0.05)
    assert fit_temperature(z / 2, y) == pytest.approx(0.5, rel=0.05)


def test_thresholds_spend_the_budget_on_held_out_digits():
    gen = torch.Generator().manual_seed(1)
    digits = torch.randn(2000, 10, generator=gen)
    digits[torch.arange(2000), torch.arange(2000) % 10] += 8  # confident digits
    outliers = torch.randn(500, 10, generator=gen)  # flat logits: no class stands out
    choice = choose_thresholds(1.0, digits, outliers, budget=0.02)
    cal = Calibration(1.0, choice.review_below, choice.digit_score_below)
    assert float(to_review(cal, digits, choice.review_below).float().mean()) == pytest.approx(0.02, abs=0.001)
    assert choice.outliers_to_review > 0.9
    assert choice.digits_to_review == pytest.approx(0.02, abs=0.001)


def test_the_digit_score_catches_what_p_cannot():
    """4% of the digits are torn between two classes (confidence ~0.5, yet clearly digits); the
    non-digits have one weak peak (confidence ~0.7). With 2% to spend, P cannot reach the
    non-digits without sending all the torn digits: the digit score must do it."""
    digits = torch.zeros(1000, 10)
    digits[torch.arange(1000), torch.arange(1000) % 10] = 8.0
    digits[:40, 9] = 8.0  # torn: two equal peaks
    digits += torch.linspace(0, 0.1, 1000)[:, None]  # no two alike
    outliers = torch.zeros(200, 10)
    outliers[:, 3] = 3.0
    choice = choose_thresholds(1.0, digits, outliers, budget=0.02)
    assert choice.digit_score_below is not None and choice.outliers_to_review == 1.0
    assert choice.digits_to_review <= 0.02
    assert choice.review_below < 0.5  # the floor of 0.5 would send 4%: no room for it here


# --- training stores it -------------------------------------------------------------------------


@CLI_TIMEOUT
def test_calibration_lowers_ece_and_never_changes_the_argmax(trained, tiny):
    logits, y, cal = _test_logits(trained, tiny)
    assert cal.fitted and cal.temperature != 1.0
    raw, calibrated = Calibration().probs(logits), cal.probs(logits)
    assert torch.equal(raw.argmax(1), calibrated.argmax(1))
    assert ece(calibrated, y) < ece(raw, y)
    assert nll(calibrated, y) < nll(raw, y)


@CLI_TIMEOUT
def test_the_calibration_is_stored_and_part_of_the_version(trained):
    raw = torch.load(trained, map_location="cpu", weights_only=True)
    meta, state = raw["meta"], raw["model"]
    cal = load_checkpoint(trained).calibration
    assert meta["calibration"] == cal.to_meta()
    assert set(meta["calibration"]) == {"temperature", "review_below", "digit_score_below"}
    # On so small a model P's floor (0.5) may not fit the budget, nor a score threshold.
    assert 0 < cal.review_below < 1
    assert cal.digit_score_below is None or math.isfinite(cal.digit_score_below)
    assert meta["version"] == weights_version(state, cal) != weights_version(state)
    # A new temperature alone is a new version.
    other = {**meta, "calibration": {**meta["calibration"], "temperature": cal.temperature * 1.1}}
    other.pop("version")
    assert save_checkpoint(trained.parent / "other.pt", state, other) != meta["version"]


@CLI_TIMEOUT
@pytest.mark.system
def test_an_old_checkpoint_loads_at_temperature_one_and_says_so(trained, tiny, tmp_path):
    raw = torch.load(trained, map_location="cpu", weights_only=True)
    meta = {k: v for k, v in raw["meta"].items() if k not in ("calibration", "version")}
    old = tmp_path / "old.pt"
    version = save_checkpoint(old, raw["model"], meta)
    ckpt = load_checkpoint(old)
    assert ckpt.calibration == Calibration() and not ckpt.calibration.fitted
    assert version == weights_version(raw["model"])  # the version of the weights alone, as before
    logits, _, _ = _test_logits(old, tiny)
    torch.testing.assert_close(ckpt.calibration.probs(logits), torch.softmax(logits, 1))

    r = run_mnistq("evaluate", "--json", "--model", old, "--data-dir", tiny, "--nondigits", "0", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert "uncalibrated" in r.stdout
    result = json.loads(r.stdout.strip().splitlines()[-1])
    assert result["calibrated"] is False and result["temperature"] == 1.0
    assert result["ece"] == result["ece_uncalibrated"] and result["review_below"] is None

    png = tmp_path / "seven.png"
    Image.fromarray(digit_image(DIGITS[-1])).save(png)
    r = run_mnistq("predict", "--model", old, png, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("Predicted Digit: ") and "uncalibrated" in r.stdout


def test_the_hold_out_is_never_trained_on(tiny, training):
    """Every image the training loop and the outlier bank see, against the held-out ones."""
    path, seen, cut_from = training
    x_all, y_all, _ = data.load_split(tiny, "train")
    (x_train, _), (x_held, _) = data.hold_out(x_all, y_all, 5000)
    assert len(x_held) == 200 and torch.equal(x_held, x_all[-200:])  # the last images, a fifth at most
    images = torch.cat(seen).flatten(1)
    trained_on = {bytes(row.numpy()) for row in images}
    assert {bytes(r.numpy()) for r in x_train.flatten(1)} <= trained_on  # every training image
    assert not {bytes(r.numpy()) for r in x_held.flatten(1)} & trained_on  # no held-out one
    assert all(torch.equal(x, x_train) for x in cut_from) and cut_from  # halves: training images
    meta = load_checkpoint(path).meta
    assert (meta["train_images"], meta["holdout_images"]) == (800, 200)


# --- evaluate -----------------------------------------------------------------------------------


@CLI_TIMEOUT
@pytest.mark.system
def test_evaluate_json_reports_calibration_and_review(trained, tiny, tmp_path):
    args = ("--json", "--model", trained, "--data-dir", tiny, "--nondigits", "60", "--device", "cpu")
    r = run_mnistq("evaluate", *args, "--precision", "fp32", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    result = json.loads(r.stdout.strip().splitlines()[-1])
    for key in (
        "ece",
        "ece_uncalibrated",
        "nll",
        "nll_uncalibrated",
        "temperature",
        "review_below",
        "review_table",
        "nondigits_to_review",
        "digits_to_review",
        "nondigits_by_kind",
    ):
        assert key in result, key
    logits, y, cal = _test_logits(trained, tiny)
    assert result["calibrated"] is True and result["temperature"] == pytest.approx(cal.temperature)
    assert result["ece"] == pytest.approx(ece(cal.probs(logits), y), abs=1e-6)
    assert result["ece_uncalibrated"] == pytest.approx(ece(torch.softmax(logits, 1), y), abs=1e-6)
    ps = [row["p"] for row in result["review_table"]]
    assert {0.5, 0.7, 0.8, 0.9, 0.95, 0.99, cal.review_below} <= set(ps)
    (rec,) = [row for row in result["review_table"] if row["recommended"]]
    sent = to_review(cal, logits, cal.review_below)
    assert rec["digits_to_review"] == result["digits_to_review"] == pytest.approx(float(sent.float().mean()))
    wrong = logits.argmax(1) != y
    assert rec["error_rate_rest"] == pytest.approx(float(wrong[~sent].float().mean()))
    assert 0 <= result["nondigits_to_review"] <= 1 and result["nondigits_n"] == 60
    shares = [row["digits_to_review"] for row in result["review_table"]]
    assert shares == sorted(shares)  # a higher P sends more
    assert "(recommended)" in r.stdout and "ECE (15 bins)" in r.stdout

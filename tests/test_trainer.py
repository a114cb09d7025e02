"""Training (the checkpoint it writes, its recipe, that it learns), evaluation and inference."""

from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path

import pytest
import torch
from helpers_images import REAL_DATA, SHIPPED_MODEL, make_tiny_mnist, run_mnistq

from model import (
    ARCH,
    Calibration,
    Net,
    bf16_supported,
    inference_chunk,
    load_checkpoint,
    pick_device,
    predict_probs,
    prepare,
    weights_version,
)
from trainer import data

CLI_TIMEOUT = pytest.mark.timeout(120)
HAVE_REAL_DATA = all(
    any((REAL_DATA / "MNIST" / "raw" / f"{n}{gz}").is_file() for gz in ("", ".gz"))
    for pair in data.FILES.values()
    for n in pair
)
needs_real_data = pytest.mark.skipif(
    not HAVE_REAL_DATA,
    reason=f"the real MNIST set is not under {REAL_DATA}/MNIST/raw (this test needs the 10,000 test images)",
)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    return make_tiny_mnist(tmp_path_factory.mktemp("tiny"))


@pytest.fixture(scope="module")
def trained(tiny, tmp_path_factory):
    """One epoch of `mnistq train` on the tiny set, through the installed console script."""
    out = tmp_path_factory.mktemp("model") / "m.pt"
    r = run_mnistq(
        "train", "--data-dir", tiny, "--epochs", "1", "--out", out, "--device", "cpu", cwd=out.parent
    )
    return out, r


# --- training -----------------------------------------------------------------------------------


@CLI_TIMEOUT
@pytest.mark.system
def test_train_writes_a_complete_checkpoint(trained, tiny):
    out, r = trained
    assert r.returncode == 0, r.stderr
    assert "Traceback" not in r.stdout + r.stderr
    assert out.is_file()
    assert [p.name for p in out.parent.iterdir()] == ["m.pt"]  # no temp files left behind

    raw = torch.load(out, map_location="cpu", weights_only=True)
    assert set(raw) == {"model", "meta"}
    meta = raw["meta"]
    for key in (
        "arch",
        "mean",
        "std",
        "test_accuracy",
        "epochs",
        "seed",
        "data_sha256",
        "versions",
        "created",
    ):
        assert key in meta, key
    assert meta["arch"] == ARCH
    assert meta["epochs"] == 1 and meta["seed"] == 1
    # A fifth of the 300 is held out for the calibration (the default 5000 is capped to it).
    assert (meta["train_images"], meta["holdout_images"]) == (240, 60)
    assert meta["outliers"] == meta["printed_digits"] == 240  # capped: no more than the digits
    # The recorded accuracy is the saved weights' accuracy on the test split, recomputed here.
    x, y, _ = data.load_split(tiny, "test")
    cpu = torch.device("cpu")
    model = prepare(load_checkpoint(out).model, cpu)  # channels_last, as training evaluated it
    probs = predict_probs(model, x, meta["mean"], meta["std"], cpu, meta["precision"])
    assert meta["test_accuracy"] == pytest.approx(float((probs.argmax(1) == y).float().mean()), abs=0.011)
    assert isinstance(meta["mean"], float) and meta["std"] > 0
    # The recipe is the training arguments, as plain values a program can read back.
    recipe = meta["recipe"]
    assert recipe["epochs"] == 1 and recipe["device"] == "cpu" and recipe["lr"] == 3e-3
    assert recipe["out"] == str(out) and recipe["data_dir"] == str(tiny)
    assert all(isinstance(v, (str, int, float, bool)) for v in recipe.values()), recipe
    assert meta["data_sha256"] == {
        "train": data.load_split(tiny, "train")[2],
        "test": data.load_split(tiny, "test")[2],
    }
    assert meta["versions"]["torch"] == str(torch.__version__)
    assert datetime.fromisoformat(meta["created"]).tzinfo is not None
    assert meta["version"] == weights_version(raw["model"], Calibration.from_meta(meta))
    assert Calibration.from_meta(meta).fitted and "temperature" in meta["calibration"]
    assert f"version {meta['version']}" in r.stdout


@CLI_TIMEOUT
@pytest.mark.system
def test_weights_version_is_a_content_hash(trained):
    out, _ = trained
    ckpt = load_checkpoint(out)
    shipped = load_checkpoint(SHIPPED_MODEL)
    state = ckpt.model.state_dict()
    cal = ckpt.calibration
    assert ckpt.version == ckpt.meta["version"] == weights_version(state, cal)
    assert weights_version({k: v.clone() for k, v in state.items()}, cal) == ckpt.version
    assert load_checkpoint(out).version == ckpt.version  # stable across loads
    assert shipped.version != ckpt.version

    changed = {k: v.clone() for k, v in state.items()}
    changed["0.bias"][0] += 1e-3
    assert weights_version(changed, cal) != ckpt.version


def test_training_learns_the_tiny_set(tiny, tmp_path):
    from trainer.train import main

    args = ["--data-dir", str(tiny), "--epochs", "6", "--ema", "0", "--device", "cpu", "--precision", "fp32"]
    assert main([*args, "--out", str(tmp_path / "m.pt")]) == 0
    ckpt = load_checkpoint(tmp_path / "m.pt")
    x, y, _ = data.load_split(tiny, "test")
    cpu = torch.device("cpu")
    acc = float(
        (predict_probs(ckpt.model, x, ckpt.meta["mean"], ckpt.meta["std"], cpu, "fp32").argmax(1) == y)
        .float()
        .mean()
    )
    assert acc >= 0.5, acc  # chance is 0.1
    assert ckpt.meta["test_accuracy"] == pytest.approx(acc, abs=0.011)


@pytest.mark.parametrize("micro", [64, 32, 7])
@pytest.mark.parametrize("outliers", [0, 30])
def test_passes_accumulate_the_whole_batch_gradient(micro, outliers):
    """A batch run as several smaller passes (the fp32 CPU default) gets the gradient and loss
    of one whole pass: a speed choice, not a change of recipe; non-digits (label -1) included."""
    from trainer.outliers import backward_in_passes

    gen = torch.Generator().manual_seed(0)
    x, y = torch.randn(100, 1, 28, 28, generator=gen), torch.randint(0, 10, (100,), generator=gen)
    y[len(y) - outliers :] = -1
    cpu = torch.device("cpu")
    model = Net()
    results = []
    for m in (100, micro):
        model.zero_grad(set_to_none=True)
        loss = backward_in_passes(model, x, y, m, 0.1, cpu, "fp32", 0.5)
        results.append((loss, [p.grad.clone() for p in model.parameters()]))
    (whole_loss, whole), (loss, grads) = results
    torch.testing.assert_close(loss, whole_loss)
    for g, w in zip(grads, whole, strict=True):
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-6)
    # The whole-batch loss, computed here: digits' smoothed cross-entropy + 0.5 x uniform's.
    with torch.no_grad():
        z = model(x)
        digit = torch.nn.functional.cross_entropy(z[y >= 0], y[y >= 0], label_smoothing=0.1)
        uniform = (torch.logsumexp(z[y < 0], 1) - z[y < 0].mean(1)).mean() if outliers else 0.0
    torch.testing.assert_close(whole_loss, digit + 0.5 * uniform, rtol=1e-5, atol=1e-6)


# --- evaluation ---------------------------------------------------------------------------------


@CLI_TIMEOUT
@pytest.mark.system
def test_evaluate_json_on_the_tiny_set(tiny, tmp_path):
    args = ("--json", "--data-dir", tiny, "--device", "cpu", "--precision", "fp32", "--nondigits", "30")
    r = run_mnistq("evaluate", *args, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    result = json.loads(r.stdout.strip().splitlines()[-1])
    # The same count, computed here without the evaluate command.
    ckpt = load_checkpoint(SHIPPED_MODEL)
    x, y, _ = data.load_split(tiny, "test")
    cpu = torch.device("cpu")
    pred = predict_probs(ckpt.model, x, ckpt.meta["mean"], ckpt.meta["std"], cpu, "fp32").argmax(1)
    correct = int((pred == y).sum())
    assert result["n"] == len(y) == 100
    assert result["errors"] == len(y) - correct
    assert result["accuracy"] == pytest.approx(correct / len(y))
    assert result["accuracy"] >= 0.4  # font renderings, not handwriting; chance is 0.1
    assert result["model_version"] == ckpt.version
    assert (result["device"], result["precision"]) == ("cpu", "fp32")


@CLI_TIMEOUT
@pytest.mark.slow
@needs_real_data
@pytest.mark.system
def test_shipped_model_accuracy_on_the_real_test_set(tmp_path):
    r = run_mnistq("evaluate", "--json", "--data-dir", REAL_DATA, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    result = json.loads(r.stdout.strip().splitlines()[-1])
    assert result["n"] == 10_000
    assert result["accuracy"] >= 0.993, result


@pytest.mark.slow
@needs_real_data
def test_bf16_and_fp32_agree():
    device = pick_device("auto")
    if not bf16_supported(device):
        pytest.skip(f"bf16 is not supported natively on {device} here")
    ckpt = load_checkpoint(SHIPPED_MODEL)
    model = prepare(ckpt.model, device)
    x, _, _ = data.load_split(REAL_DATA, "test")
    preds = [
        predict_probs(model, x, ckpt.meta["mean"], ckpt.meta["std"], device, p).argmax(1)
        for p in ("fp32", "bf16")
    ]
    agree = float((preds[0] == preds[1]).float().mean())
    assert agree >= 0.999, f"bf16 and fp32 disagree on {(1 - agree):.2%} of the test set"


def test_chunked_inference_matches_one_pass_in_either_memory_format():
    """The CPU runs the model in cache-sized chunks and trains in NCHW: neither changes an answer."""
    ckpt = load_checkpoint(SHIPPED_MODEL)
    cpu = torch.device("cpu")
    x = torch.randint(0, 256, (150, 1, 28, 28), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    mean, std = ckpt.meta["mean"], ckpt.meta["std"]
    whole = predict_probs(prepare(ckpt.model, cpu), x, mean, std, cpu, "fp32", batch=150)
    chunked = predict_probs(prepare(ckpt.model, cpu), x, mean, std, cpu, "fp32")
    nchw = predict_probs(prepare(ckpt.model, cpu, torch.contiguous_format), x, mean, std, cpu, "fp32")
    assert inference_chunk(cpu, "fp32") < len(x)  # so the default really ran in chunks
    torch.testing.assert_close(chunked, whole, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(nchw, whole, rtol=1e-4, atol=1e-5)

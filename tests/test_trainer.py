"""Training, checkpoints (atomic, versioned, validated on load) and evaluation."""

from __future__ import annotations

import json
import shutil
from datetime import datetime
from pathlib import Path

import pytest
import torch
from helpers_images import REAL_DATA, SHIPPED_MODEL, make_tiny_mnist, run_mnistq

from mnistq.errors import ModelError
from trainer import data
from trainer.model import (
    ARCH,
    Net,
    bf16_supported,
    inference_chunk,
    load_checkpoint,
    pick_device,
    predict_probs,
    prepare,
    save_checkpoint,
    weights_version,
)

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
    assert meta["epochs"] == 1 and meta["seed"] == 1 and meta["train_images"] == 300
    assert 0.0 <= meta["test_accuracy"] <= 1.0
    assert isinstance(meta["mean"], float) and meta["std"] > 0
    assert meta["data_sha256"] == {
        "train": data.load_split(tiny, "train")[2],
        "test": data.load_split(tiny, "test")[2],
    }
    assert meta["versions"]["torch"] == str(torch.__version__)
    assert datetime.fromisoformat(meta["created"]).tzinfo is not None
    assert meta["version"] == weights_version(raw["model"])
    assert f"version {meta['version']}" in r.stdout


@CLI_TIMEOUT
def test_weights_version_is_a_content_hash(trained):
    out, _ = trained
    ckpt = load_checkpoint(out)
    shipped = load_checkpoint(SHIPPED_MODEL)
    state = ckpt.model.state_dict()
    assert ckpt.version == ckpt.meta["version"] == weights_version(state)
    assert weights_version({k: v.clone() for k, v in state.items()}) == ckpt.version
    assert load_checkpoint(out).version == ckpt.version  # stable across loads
    assert shipped.version != ckpt.version

    changed = {k: v.clone() for k, v in state.items()}
    changed["0.bias"][0] += 1e-3
    assert weights_version(changed) != ckpt.version


def test_training_learns_the_tiny_set(tiny, tmp_path):
    from trainer.train import main

    args = ["--data-dir", str(tiny), "--epochs", "6", "--ema", "0", "--device", "cpu", "--precision", "fp32"]
    assert main([*args, "--out", str(tmp_path / "m.pt")]) == 0
    assert load_checkpoint(tmp_path / "m.pt").meta["test_accuracy"] >= 0.5  # chance is 0.1


@pytest.mark.parametrize("micro", [64, 32, 7])
def test_passes_accumulate_the_whole_batch_gradient(micro):
    """A batch run as several smaller passes (the fp32 CPU default) gets the gradient and loss
    of one whole pass: a speed choice, not a change of recipe."""
    from trainer.train import backward_in_passes

    gen = torch.Generator().manual_seed(0)
    x, y = torch.randn(100, 1, 28, 28, generator=gen), torch.randint(0, 10, (100,), generator=gen)
    cpu = torch.device("cpu")
    model = Net()
    results = []
    for m in (100, micro):
        model.zero_grad(set_to_none=True)
        loss = backward_in_passes(model, x, y, m, 0.1, cpu, "fp32")
        results.append((loss, [p.grad.clone() for p in model.parameters()]))
    (whole_loss, whole), (loss, grads) = results
    torch.testing.assert_close(loss, whole_loss)
    for g, w in zip(grads, whole, strict=True):
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-6)


# --- atomic saves -------------------------------------------------------------------------------


def _leftovers(folder: Path, keep: str) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name != keep)


@pytest.mark.parametrize("error", [RuntimeError("disk full"), KeyboardInterrupt()])
def test_failed_save_leaves_the_old_checkpoint_and_no_temp_files(tmp_path, monkeypatch, error):
    path = tmp_path / "model.pt"
    shutil.copy(SHIPPED_MODEL, path)
    good = path.read_bytes()
    shipped = load_checkpoint(path)
    seen = []

    def half_a_save(obj, f, *a, **kw):
        f.write(b"\x50\x4b\x03\x04" + b"\0" * 500_000)  # the start of a zip, never finished
        f.flush()
        seen.append(path.read_bytes() == good)  # mid-write, readers still see the old file
        seen.append(_leftovers(tmp_path, "model.pt"))
        raise error

    monkeypatch.setattr(torch, "save", half_a_save)
    state = {k: torch.zeros_like(v) for k, v in shipped.model.state_dict().items()}
    with pytest.raises(type(error)):
        save_checkpoint(path, state, {"arch": ARCH, "mean": 0.1, "std": 0.3})
    assert seen[0] is True
    assert len(seen[1]) == 1 and seen[1][0].endswith(".tmp")  # written beside it, under another name
    assert path.read_bytes() == good
    assert load_checkpoint(path).version == shipped.version
    assert _leftovers(tmp_path, "model.pt") == []


def test_save_replaces_in_one_step(tmp_path):
    path = tmp_path / "sub" / "model.pt"
    shipped = load_checkpoint(SHIPPED_MODEL)
    version = save_checkpoint(path, shipped.model.state_dict(), dict(shipped.meta))
    assert version == shipped.version
    state = {k: v + 0.01 for k, v in shipped.model.state_dict().items()}
    version2 = save_checkpoint(path, state, dict(shipped.meta))
    assert version2 != version
    assert load_checkpoint(path).version == version2
    assert _leftovers(path.parent, "model.pt") == []


# --- loading bad files --------------------------------------------------------------------------


def _bad_file(kind: str, tmp_path: Path) -> Path:
    path = tmp_path / f"{kind}.pt"
    if kind == "empty":
        path.write_bytes(b"")
    elif kind == "garbage":
        path.write_bytes(b"this is not a checkpoint\n" * 100)
    elif kind == "truncated":
        path.write_bytes(SHIPPED_MODEL.read_bytes()[: SHIPPED_MODEL.stat().st_size // 2])
    elif kind == "plain-state-dict":
        torch.save(load_checkpoint(SHIPPED_MODEL).model.state_dict(), path)
    elif kind == "wrong-arch":
        ckpt = torch.load(SHIPPED_MODEL, weights_only=True)
        torch.save({"model": ckpt["model"], "meta": {**ckpt["meta"], "arch": "resnet"}}, path)
    elif kind == "tampered":
        ckpt = torch.load(SHIPPED_MODEL, weights_only=True)
        ckpt["model"]["0.bias"][0] += 1.0
        torch.save(ckpt, path)
    elif kind == "directory":
        path.mkdir()
    return path


@pytest.mark.parametrize(
    ("kind", "message"),
    [
        ("missing", "model file not found"),
        ("directory", "is a directory"),
        ("empty", "not a readable PyTorch checkpoint"),
        ("garbage", "not a readable PyTorch checkpoint"),
        ("truncated", "not a readable PyTorch checkpoint"),
        ("plain-state-dict", "not an mnist-queue checkpoint"),
        ("wrong-arch", "architecture 'resnet'"),
        ("tampered", "do not match their recorded version"),
    ],
)
def test_load_checkpoint_bad_files(tmp_path, kind, message):
    path = _bad_file(kind, tmp_path)
    with pytest.raises(ModelError) as info:
        load_checkpoint(path)
    text = str(info.value)
    assert message in text
    assert str(path) in text
    assert "\n" not in text and len(text) < 400


@CLI_TIMEOUT
def test_cli_bad_model_is_one_error_line(tmp_path, tiny):
    path = _bad_file("truncated", tmp_path)
    r = run_mnistq("evaluate", "--model", path, "--data-dir", tiny, cwd=tmp_path)
    assert r.returncode == 1
    assert "Traceback" not in r.stdout + r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("mnistq evaluate: error: ") and str(path) in lines[0]


# --- evaluation ---------------------------------------------------------------------------------


@CLI_TIMEOUT
def test_evaluate_json_on_the_tiny_set(tiny, tmp_path):
    r = run_mnistq("evaluate", "--json", "--data-dir", tiny, "--device", "cpu", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    result = json.loads(r.stdout.strip().splitlines()[-1])
    assert 0.0 <= result["accuracy"] <= 1.0
    assert result["model_version"] == load_checkpoint(SHIPPED_MODEL).version
    assert result["n"] == 100
    assert result["errors"] == round((1 - result["accuracy"]) * 100)


@CLI_TIMEOUT
@pytest.mark.slow
@needs_real_data
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

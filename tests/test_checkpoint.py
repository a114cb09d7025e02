"""Checkpoints: atomic saves, what loads (old recipes included) and one clear error for what does not."""

from __future__ import annotations

import shutil
from fractions import Fraction
from pathlib import Path

import pytest
import torch
from helpers_images import SHIPPED_MODEL, run_mnistq

from mnistq.errors import ModelError
from mnistq.protocol import ExitCode
from model import ARCH, load_checkpoint, save_checkpoint

CLI_TIMEOUT = pytest.mark.timeout(120)


# --- what loads ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "recipe", ["AdamW lr 0.003 wd 0.0005 OneCycle, batch 128", {"lr": 0.003, "out": "m.pt"}]
)
def test_checkpoints_load_with_either_recipe(tmp_path, recipe):
    """Checkpoints before the recipe became a dict kept it as a string; both load."""
    shipped = load_checkpoint(SHIPPED_MODEL)
    path = tmp_path / "m.pt"
    save_checkpoint(path, shipped.model.state_dict(), {**shipped.meta, "recipe": recipe})
    assert torch.load(path, map_location="cpu", weights_only=True)["meta"]["recipe"] == recipe
    assert load_checkpoint(path).meta["recipe"] == recipe


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
    elif kind == "pickled-object":  # loads only with weights_only=False, i.e. by running its code
        torch.save({"model": Fraction(1, 3), "meta": {}}, path)
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
        ("pickled-object", "it holds Python objects, not only weights"),
    ],
)
def test_load_checkpoint_bad_files(tmp_path, kind, message):
    path = _bad_file(kind, tmp_path)
    with pytest.raises(ModelError) as info:
        load_checkpoint(path)
    text = str(info.value)
    assert message in text
    assert str(path) in text
    assert "\n" not in text and "\x1b" not in text and len(text) < 400


@CLI_TIMEOUT
@pytest.mark.system
def test_cli_bad_model_is_one_error_line(tmp_path):
    path = _bad_file("truncated", tmp_path)
    r = run_mnistq("evaluate", "--model", path, "--data-dir", tmp_path / "no-data", cwd=tmp_path)
    assert r.returncode == ExitCode.MODEL
    assert "Traceback" not in r.stdout + r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("mnistq evaluate: error: ") and str(path) in lines[0]

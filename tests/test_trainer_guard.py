"""`mnistq train` never silently replaces a better model; `train`/`evaluate` say in one line which
MNIST files they want and where they looked, and create nothing in the user's data."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import pytest
import torch
from helpers_images import SHIPPED_MODEL, make_tiny_mnist, run_mnistq

from mnistq.errors import ConfigError
from mnistq.protocol import ExitCode
from model import load_checkpoint, save_checkpoint
from trainer import data
from trainer.publish import KEPT_EXIT, beside
from trainer.train import main as train_main

pytestmark = pytest.mark.timeout(120)
FAST = ["--epochs", "1", "--device", "cpu", "--precision", "fp32", "--ema", "0"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    return make_tiny_mnist(tmp_path_factory.mktemp("tiny"))


def _tree(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


def _weak_copy_of_the_shipped_model(path: Path) -> str:
    """The shipped weights with the last layer zeroed: every image reads as one class (~10%)."""
    ckpt = load_checkpoint(SHIPPED_MODEL)
    state = {k: v.clone() for k, v in ckpt.model.state_dict().items()}
    state["7.weight"].zero_()
    state["7.bias"].zero_()
    meta = {k: v for k, v in ckpt.meta.items() if k != "version"}
    return save_checkpoint(path, state, meta)


def test_a_better_model_at_out_is_kept_and_the_new_one_goes_beside_it(tiny, tmp_path, capsys) -> None:
    out = tmp_path / "model_state.pt"
    shutil.copy(SHIPPED_MODEL, out)
    before = out.read_bytes()
    shipped = load_checkpoint(SHIPPED_MODEL).version
    # 40 images, one epoch: a model that reads far fewer of the tiny test set right.
    code = train_main(["--data-dir", str(tiny), "--limit", "40", *FAST, "--out", str(out)])
    said = capsys.readouterr().out.strip().splitlines()[-1]
    assert code == KEPT_EXIT == ExitCode.MODEL
    assert out.read_bytes() == before  # untouched: workers hot-reloading it see nothing
    new = load_checkpoint(beside(out))
    assert beside(out).name == "model_state.new.pt"
    assert re.match(
        rf"kept {re.escape(str(out))}: version {shipped} \(\d+\.\d\d% on the same test set\) reads "
        rf"more test digits right than the new version {new.version} \(\d+\.\d\d%\), which went to "
        rf"{re.escape(str(beside(out)))} instead \(--force replaces it\)",
        said,
    ), said

    code = train_main(["--data-dir", str(tiny), "--limit", "40", *FAST, "--out", str(out), "--force"])
    said = capsys.readouterr().out.strip().splitlines()[-1]
    assert code == 0 and load_checkpoint(out).version == new.version  # same seed, same weights
    assert said.startswith(f"replaced {out} (--force, although lower): version {shipped} (")


def test_a_worse_model_at_out_is_replaced_saying_both_versions(tiny, tmp_path, capsys) -> None:
    out = tmp_path / "m.pt"
    weak = _weak_copy_of_the_shipped_model(out)
    assert train_main(["--data-dir", str(tiny), *FAST, "--out", str(out)]) == 0
    said = capsys.readouterr().out.strip().splitlines()[-1]
    new = load_checkpoint(out).version
    assert re.match(
        rf"replaced {re.escape(str(out))}: version {weak} \(\d+\.\d\d% on the same test set\) -> "
        rf"version {new} \(\d+\.\d\d%\), \d+s$",
        said,
    ), said
    assert not beside(out).exists()


@pytest.mark.system
def test_out_that_is_not_a_checkpoint_is_refused_before_training(tiny, tmp_path) -> None:
    out = tmp_path / "notes.txt"
    out.write_text("precious")
    r = run_mnistq("train", "--data-dir", tiny, *FAST, "--out", out, cwd=tmp_path)
    assert r.returncode == ExitCode.CONFIG, r
    [line] = r.stderr.strip().splitlines()
    assert f"--out {out} exists and is not a usable mnist-queue checkpoint" in line and "--force" in line
    assert "epoch" not in r.stdout  # refused before any training
    assert out.read_text() == "precious"


WANTED = (
    "wanted train-images-idx3-ubyte, train-labels-idx1-ubyte, t10k-images-idx3-ubyte, "
    "t10k-labels-idx1-ubyte (each may end in .gz) in DIR/MNIST/raw"
)


@pytest.mark.parametrize("command", ["train", "evaluate"])
@pytest.mark.system
def test_no_data_is_one_line_naming_files_layout_and_places_and_creates_nothing(tmp_path, command) -> None:
    mine = tmp_path / "my-data"
    (mine / "MNIST" / "raw").mkdir(parents=True)
    (mine / "MNIST" / "raw" / "train-images-idx3-ubyte").write_bytes(b"")  # not all of them
    (mine / "notes.txt").write_text("mine")
    before = _tree(mine)
    for given in (mine, mine / "MNIST", mine / "MNIST" / "raw"):
        r = run_mnistq(command, "--data-dir", given, "--device", "cpu", cwd=tmp_path)
        assert r.returncode == ExitCode.CONFIG, r
        [line] = r.stderr.strip().splitlines()
        wanted = WANTED if command == "train" else "wanted t10k-images-idx3-ubyte, t10k-labels-idx1-ubyte"
        assert line.startswith(f"mnistq {command}: error: MNIST not found: {wanted}"), line
        looked = f"looked in {given}/MNIST/raw, {given}/raw, {given}; nothing downloaded into a folder"
        assert looked in line, line
        assert "Traceback" not in r.stdout + r.stderr and "torchvision" not in r.stdout
        assert _tree(mine) == before  # no MNIST/raw/MNIST/raw inside the user's data


@pytest.mark.system
def test_data_dir_may_point_at_mnist_or_its_raw_folder(tiny, tmp_path) -> None:
    before = _tree(tiny)
    for given in (tiny, tiny / "MNIST", tiny / "MNIST" / "raw"):
        r = run_mnistq(
            "evaluate", "--json", "--data-dir", given, "--device", "cpu", "--nondigits", "30", cwd=tmp_path
        )
        assert r.returncode == 0, r.stderr
        assert '"n": 100' in r.stdout.splitlines()[-1]
    assert _tree(tiny) == before


def test_a_failed_download_leaves_nothing_behind(tmp_path, monkeypatch) -> None:
    import torchvision.datasets

    def offline(*args, **kwargs):
        print("torchvision's own chatter")
        raise RuntimeError("Error downloading train-images-idx3-ubyte.gz:\n<urlopen error offline>")

    monkeypatch.setattr(torchvision.datasets, "MNIST", offline)
    default = tmp_path / "cache" / "mnistq" / "data"
    with pytest.raises(ConfigError, match=r"downloading failed: <urlopen error offline>$") as info:
        data.find(None, default=default)
    assert "\n" not in str(info.value) and f"looked in {default}/MNIST/raw" in str(info.value)
    assert list(tmp_path.iterdir()) == []  # not even the cache folders
    empty = tmp_path / "empty"
    empty.mkdir()  # an empty folder the user named is ours to fill, and stays as it was
    with pytest.raises(ConfigError, match="downloading failed"):
        data.find(empty)
    assert list(empty.iterdir()) == []


def test_download_fills_the_default_folder(tmp_path, monkeypatch, tiny) -> None:
    import torchvision.datasets

    def fake_mnist(root: str, train: bool, download: bool) -> None:
        raw = Path(root) / "MNIST" / "raw"
        raw.mkdir(parents=True, exist_ok=True)
        for name in data.FILES["train" if train else "test"]:
            shutil.copy(tiny / "MNIST" / "raw" / name, raw / name)

    monkeypatch.setattr(torchvision.datasets, "MNIST", fake_mnist)
    default = tmp_path / "cache"
    raw = data.find(None, default=default)
    assert raw == default / "MNIST" / "raw" and _tree(default) == sorted(
        ["MNIST", "MNIST/raw", *(f"MNIST/raw/{n}" for pair in data.FILES.values() for n in pair)]
    )
    x, _, _ = data.load_split(raw, "test")
    assert torch.equal(x, data.load_split(tiny, "test")[0])

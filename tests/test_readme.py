"""The README's promises that no other test holds: its install line, what git ignores, the test data
setting, and its Python API snippet run as written beside a real `mnistq run`."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from helpers_images import REPO_ROOT

from producer.finish import review_dir_for

README = REPO_ROOT / "README.md"


def blocks(lang: str) -> list[str]:
    """The README's fenced code blocks of one language, in order."""
    return re.findall(rf"^```{lang}\n(.*?)^```", README.read_text(encoding="utf-8"), re.M | re.S)


def test_the_first_install_command_takes_the_cpu_wheels_before_the_project() -> None:
    """Read literally, the first command must not pull the default (CUDA) torch first."""
    first = blocks("sh")[0]
    installs = [
        part.strip() for line in first.splitlines() for part in line.split("&&") if "pip install" in part
    ]
    assert installs[0].startswith("pip install torch torchvision --index-url "), installs
    assert installs[0].endswith("/whl/cpu") and installs[1] == "pip install -e .", installs


@pytest.mark.skipif(
    shutil.which("git") is None or not (REPO_ROOT / ".git").exists(), reason="not a git checkout"
)
def test_git_ignores_what_the_product_writes_in_the_checkout() -> None:
    from trainer.publish import beside

    written = [
        "done/x.png", "failed/x.png", str(review_dir_for(Path("done")) / "x.png"), "results.csv", "report.html",
        ".mnistq-run.json", ".results.csv.lock", beside(Path("model_state.pt")).name, "inbox/x.png",
    ]  # fmt: skip
    out = subprocess.run(
        ["git", "check-ignore", "--no-index", *written], cwd=REPO_ROOT, capture_output=True, text=True
    )
    assert out.stdout.split() == written, f"not ignored: {set(written) - set(out.stdout.split())}"


def test_the_real_mnist_folder_follows_mnistq_test_data(tmp_path: Path) -> None:
    code = "import helpers_images as h; print(h.REAL_DATA)"
    env = {**os.environ, "MNISTQ_TEST_DATA": str(tmp_path)}
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=Path(__file__).parent, env=env, capture_output=True, text=True
    )
    assert out.stdout.strip() == str(tmp_path), out.stderr

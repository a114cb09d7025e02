"""The README's promises that no other test holds: its install line, what git ignores, the test data
setting, and its Python API snippet run as written beside a real `mnistq run`."""

from __future__ import annotations

import ast
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
from conftest import write_digits
from helpers_images import REPO_ROOT
from helpers_run import Run, read_rows, run_env

from mnistq.folders import review_dir_for
from mnistq.settings import RUN_STATE_NAME

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
@pytest.mark.system
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


@pytest.mark.system
def test_the_real_mnist_folder_follows_mnistq_test_data(tmp_path: Path) -> None:
    code = "import helpers_images as h; print(h.REAL_DATA)"
    env = {**os.environ, "MNISTQ_TEST_DATA": str(tmp_path)}
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=Path(__file__).parent, env=env, capture_output=True, text=True
    )
    assert out.stdout.strip() == str(tmp_path), out.stderr


@pytest.mark.timeout(240)
def test_the_api_snippet_runs_as_written_beside_mnistq_run(
    start_run: Callable[..., Run], tmp_path: Path
) -> None:
    """The README's Python API block, unchanged, in the folder of a `mnistq run` started as its
    comment says (MNISTQ_ALLOWED_ROOTS=$PWD/images), with its files in images/."""
    (snippet,) = blocks("python")
    paths = re.search(r"^paths = (\[.*\])$", snippet, re.M)
    assert paths is not None, snippet
    assert "MNISTQ_ALLOWED_ROOTS=$PWD/images mnistq run" in snippet and "with Client() as client" in snippet
    images = tmp_path / "images"
    digits = {}
    for i, (made, d) in enumerate(write_digits(tmp_path / "made", 2).items()):
        name = Path(ast.literal_eval(paths[1])[i])  # the snippet's own names: images/a.png, images/b.png
        assert name.parent == Path("images"), name
        images.mkdir(exist_ok=True)
        made.rename(tmp_path / name)
        digits[str(tmp_path / name)] = d
    run = start_run("--workers", "1", env={"MNISTQ_ALLOWED_ROOTS": str(images)})
    run.wait_ready()
    # the inbox stays readable beside MNISTQ_ALLOWED_ROOTS: the warm-up file got its digit
    assert [r["error"] for r in read_rows(run.csv)] == [""], read_rows(run.csv)
    assert (tmp_path / RUN_STATE_NAME).exists()
    out = subprocess.run(
        [sys.executable, "-c", snippet],
        cwd=tmp_path,
        env=run_env(run.marker),  # no REDIS_URL: Client() finds the run's Redis
        capture_output=True,
        text=True,
        timeout=150,
    )
    assert out.returncode == 0, out.stderr
    lines = [line.split() for line in out.stdout.splitlines()]
    assert len(lines) == 6, out.stdout
    first, review, progress = lines[:2], lines[2:4], lines[4:]
    assert [(p, int(d), err) for p, d, _, _, err in first] == [(p, d, "None") for p, d in digits.items()]
    assert [(p, int(d)) for p, d, *_ in review] == list(digits.items())
    assert [n for n, *_ in progress] == ["1/2", "2/2"], out.stdout
    assert {(p, int(d)) for _, p, d in progress} == set(digits.items())

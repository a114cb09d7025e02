#!/usr/bin/env python3
"""Download every wheel the image needs into one folder, for a build with no index.

    python3 deploy/wheelhouse.py                      # CPU torch + torchvision, into deploy/wheels
    python3 deploy/wheelhouse.py --torch 'torch==2.13.0+cpu' --torch-index ''
    TORCH_PACKAGES='torch==2.13.0+cpu' docker compose build   # then offline: see docs/deployment.md

torch (and torchvision) come from --torch-index only (default PyTorch's CPU index; '' means
pip's own configuration), without their dependencies, so that a newer CUDA build on PyPI can
never be taken instead. Everything else, torch's dependencies included, comes from pip's usual
index, pinned by deploy/constraints.txt. The wheels are for the image's Python (3.11, Linux
x86_64, glibc 2.36), whatever the host runs. Needs only pip; run it where the indexes answer.
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
import tomllib
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
TORCH_NAMES = ("torch", "torchvision")
# pip evaluates markers such as python_full_version against the host's Python, not the target's:
# what the image's Python needs and a newer host would skip is named here (constraints pin it).
# redis: async-timeout on Python < 3.11.3, and Debian bookworm has 3.11.2.
FOR_OLDER_PATCH_RELEASES = ["async-timeout"]
DEFAULT_TORCH_INDEX = "https://download.pytorch.org/whl/cpu"
# The image's interpreter: Debian bookworm's Python 3.11 and glibc 2.36 (python:3.11-slim is
# bookworm too). pip does not widen a manylinux_2_X platform to older ones, so all are named.
GLIBC_MINOR = 36
PLATFORMS = [f"manylinux_2_{minor}_x86_64" for minor in range(GLIBC_MINOR, 4, -1)]
PLATFORMS += ["manylinux2014_x86_64", "manylinux2010_x86_64", "manylinux1_x86_64"]
TARGET = [
    "--only-binary=:all:",
    "--implementation", "cp",
    "--python-version", "3.11",
    "--abi", "cp311",
    *(arg for platform in PLATFORMS for arg in ("--platform", platform)),
]  # fmt: skip


def name_of(requirement: str) -> str:
    match = re.match(r"[A-Za-z0-9_.-]+", requirement.strip())
    if match is None:
        raise ValueError(f"not a requirement: {requirement!r}")
    return match.group().lower().replace("_", "-")


def project_requirements() -> list[str]:
    """pyproject.toml's dependencies other than torch and torchvision."""
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    return [d for d in deps if name_of(d) not in TORCH_NAMES]


def build_requirements() -> list[str]:
    """What `pip install --no-build-isolation -e .` needs in the image: the build backend."""
    return list(tomllib.loads((ROOT / "pyproject.toml").read_text())["build-system"]["requires"])


def exact_pins(dest: Path, names: list[str]) -> list[str]:
    """`name==version` of the newest wheel of each name in dest (the one just downloaded)."""
    pins = []
    for name in names:
        found = sorted(dest.glob(f"{name}-*.whl"), key=lambda p: p.stat().st_mtime)
        if not found:
            raise SystemExit(f"wheelhouse: no {name} wheel in {dest} after the download")
        version = found[-1].name.split("-")[1]
        pins.append(f"{name}=={version}")
    return pins


def pip(python: str, *args: str) -> None:
    cmd = [python, "-m", "pip", "download", "--disable-pip-version-check", *args]
    print("+", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dest", type=Path, default=HERE / "wheels", help="default: %(default)s")
    p.add_argument(
        "--torch",
        default="torch torchvision",
        help="the torch requirements, space-separated, as TORCH_PACKAGES (default: %(default)s)",
    )
    p.add_argument(
        "--torch-index",
        default=DEFAULT_TORCH_INDEX,
        help="index for torch/torchvision; '' for pip's own configuration (default: %(default)s)",
    )
    p.add_argument("--python", default=sys.executable, help="the Python whose pip downloads")
    args = p.parse_args(argv)

    dest: Path = args.dest.resolve()
    dest.mkdir(parents=True, exist_ok=True)
    torch = args.torch.split()
    index = ["--index-url", args.torch_index] if args.torch_index else []
    pip(args.python, "--no-deps", "--dest", str(dest), *TARGET, *index, *torch)
    pins = exact_pins(dest, sorted({name_of(t) for t in torch}))
    # torch again, now exactly the wheel just fetched (found in dest), for its dependencies.
    pip(
        args.python,
        "--dest", str(dest),
        "--find-links", str(dest),
        "--constraint", str(HERE / "constraints.txt"),
        *TARGET,
        *pins,
        *project_requirements(),
        *build_requirements(),
        *FOR_OLDER_PATCH_RELEASES,
    )  # fmt: skip
    size = sum(f.stat().st_size for f in dest.glob("*.whl"))
    print(f"wheelhouse: {len(list(dest.glob('*.whl')))} wheels, {size / 2**20:.0f} MiB in {dest}")
    print(f"build offline with: TORCH_PACKAGES='{' '.join(pins)}' docker compose build")
    return 0


if __name__ == "__main__":
    sys.exit(main())

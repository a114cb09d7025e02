"""The reference pages say what the code does: every setting and exit code is in
docs/reference.md's tables with the code's numbers, and every link between the README and docs/
reaches a file and a heading that exist. In-process, no Redis."""

from __future__ import annotations

import re
from dataclasses import fields
from pathlib import Path

import pytest

from mnistq.protocol import ExitCode
from mnistq.settings import Settings

REPO_ROOT = Path(__file__).resolve().parent.parent
REFERENCE = REPO_ROOT / "docs" / "reference.md"


def table_rows(text: str, heading: str) -> list[list[str]]:
    """The cells of the body rows of the first table under `## heading`."""
    section = text.split(f"\n## {heading}\n", 1)[1].split("\n## ", 1)[0]
    rows = [line for line in section.splitlines() if line.startswith("|")]
    return [[cell.strip() for cell in row.strip("|").split("|")] for row in rows[2:]]


def test_the_settings_table_names_every_setting_with_its_default() -> None:
    text = REFERENCE.read_text(encoding="utf-8")
    rows = {tuple(re.findall(r"`([A-Z_]+)`", row[0])): row[1] for row in table_rows(text, "Settings")}
    named = {name for names in rows for name in names}
    for f in fields(Settings):
        var = f.metadata["env"]
        assert var in named, f"{var} ({f.name}) is not in {REFERENCE.name}'s settings table"
        for alias in f.metadata["aliases"]:
            assert f"`{alias}`" in text, f"the older name {alias} is not said"
        default = next(d for names, d in rows.items() if names == (var,)) if (var,) in rows else None
        if default is not None and re.fullmatch(r"[\d,.]+", default):
            assert float(default.replace(",", "")) == f.default, f"{var}: table {default}, code {f.default}"
    assert named <= {f.metadata["env"] for f in fields(Settings)}, "a row names no setting"


def test_the_exit_code_table_is_the_code_s() -> None:
    rows = table_rows(REFERENCE.read_text(encoding="utf-8"), "Exit codes")
    assert sorted(int(code) for code, _ in rows) == sorted(int(c) for c in ExitCode)


PAGES = [REPO_ROOT / "README.md", *sorted((REPO_ROOT / "docs").glob("*.md"))]


def anchors(page: Path) -> set[str]:
    """GitHub's anchors for a page's headings: lower case, punctuation dropped, spaces to -."""
    heads = re.findall(r"^#+ (.+)$", page.read_text(encoding="utf-8"), re.M)
    return {re.sub(r"[^\w\- ]", "", h.lower()).replace(" ", "-") for h in heads}


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_every_link_between_the_pages_reaches_a_file_and_heading(page: Path) -> None:
    text = re.sub(r"^```.*?^```", "", page.read_text(encoding="utf-8"), flags=re.M | re.S)
    for target in re.findall(r"\]\(([^)\s]+)\)", text):
        if re.match(r"[a-z]+:", target):
            continue  # an outside address
        name, _, anchor = target.partition("#")
        linked = (page.parent / name).resolve() if name else page
        assert linked.exists(), f"{page.name}: {target} names no file"
        if anchor and linked.suffix == ".md":
            assert anchor in anchors(linked), f"{page.name}: {target} names no heading"

"""Test helpers for `mnistq report`: a results CSV written by hand, and headless Chromium on a page.

The browser checks skip where no Chromium is installed (Debian: `apt-get install chromium`).
"""

from __future__ import annotations

import csv
import re
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest

BROWSER = next((b for b in ("chromium", "chromium-browser", "google-chrome") if shutil.which(b)), None)
needs_browser = pytest.mark.skipif(
    BROWSER is None, reason="no Chromium here: `apt-get install chromium` to run the browser checks"
)


def browse(page: Path, *flags: str) -> str:
    """Chromium, headless and offline-minded, on ``page``; its stdout (the DOM with --dump-dom)."""
    assert BROWSER is not None
    with tempfile.TemporaryDirectory() as profile:
        out = subprocess.run(
            [BROWSER, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             f"--user-data-dir={profile}", *flags, page.as_uri()],
            capture_output=True, text=True, timeout=120,
        )  # fmt: skip
    assert out.returncode == 0, out.stderr[-2000:]
    return out.stdout


def tiles(page: str) -> list[str]:
    return re.findall(r'<figure class="tile[^"]*".*?</figure>', page, re.S)


def write_csv(csv_path: Path, columns: tuple[str, ...], rows: list[dict[str, str]]) -> Path:
    with open(csv_path, "w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, columns, extrasaction="ignore", lineterminator="\r\n")
        w.writeheader()
        w.writerows(rows)
    return csv_path

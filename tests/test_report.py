"""`mnistq report`: one self-contained HTML page, checked in a real browser (headless Chromium).

The browser tests skip where no Chromium is installed (Debian: `apt-get install chromium`).
The review section, shares and tiles' names: tests/test_report_review.py.
"""

from __future__ import annotations

import re
import subprocess
import sys
import time
import tracemalloc
import uuid
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from conftest import write_digits
from helpers_browser import browse, needs_browser, tiles, write_csv
from helpers_images import render_glyph, run_mnistq
from helpers_run import MNISTQ, gone, read_rows, run_env
from PIL import Image, ImageStat

from mnistq.errors import ConfigError
from mnistq.protocol import CSV_COLUMNS
from report.report import write_report
from report.tally import TILES

pytestmark = pytest.mark.timeout(240)


@pytest.fixture(scope="module")
def real_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A real `mnistq run --drain`: clean digits, harder glyphs, a subfolder, files that fail,
    a name that is not UTF-8; then one done file deleted, so its tile must say "missing"."""
    folder = tmp_path_factory.mktemp("run")
    inbox = folder / "inbox"
    write_digits(inbox, 12)
    write_digits(inbox / "sub", 3, prefix="s")
    for d in (1, 3, 4, 6, 9):  # the font's weaker digits: the least confident rows
        render_glyph(d, 2).save(inbox / f"glyph_{d}.png")
    (inbox / "bad.png").write_text("not an image")
    Image.new("L", (28, 28)).save(inbox / "blank.png")
    (inbox / "caf\udce9.png").write_bytes(b"\x89PNG broken")
    marker = uuid.uuid4().hex
    out = subprocess.run(
        [*MNISTQ, "run", "--drain", "--workers", "1"],
        cwd=folder, env=run_env(marker), capture_output=True, text=True, timeout=180,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    assert gone(marker, 5) == []
    assert len(read_rows(folder / "results.csv")) == 23
    (folder / "done" / "glyph_3.png").unlink()
    return folder


@needs_browser
@pytest.mark.system
def test_the_report_of_a_real_run_renders_in_chromium(real_run: Path) -> None:
    out = run_mnistq("report", "results.csv", cwd=real_run)
    assert out.returncode == 0, out.stderr
    page_path = real_run / "report.html"
    assert out.stdout.strip() == "report.html"
    html = page_path.read_text()
    # self-contained: nothing to fetch (the SVGs' xmlns and metadata URLs are names, not fetches)
    assert not re.search(r'(src|href)="(https?:|//)|url\((?!#)|@import|<script|<link', html)

    dom = browse(page_path, "--dump-dom")
    for heading in ("Summary", "Counts per digit", "Confidence", "Throughput", "Errors by cause"):
        assert f">{heading}</h2>" in dom
    # digits, confidence, and the throughput when rows finished over a second or more (a run
    # this small usually writes them all within a few ms)
    times = [datetime.fromisoformat(r["finished_at"]) for r in read_rows(real_run / "results.csv")]
    if max(times) - min(times) >= timedelta(seconds=1):
        assert dom.count("<svg") == 3 and "time since the first row" in dom
    else:
        assert dom.count("<svg") == 2 and " finished " in dom and ": no rate to plot" in dom
    assert "unreadable" in dom and "no_digit" in dom
    assert "<h3>Least confident (20)</h3>" in dom and "<h3>Failed (3)</h3>" in dom
    assert "Review" not in dom  # this CSV has no review column
    shown = tiles(dom)
    assert len(shown) == 23
    assert sum('src="data:image/png;base64,' in t for t in shown) == 20  # 19 done + blank.png
    missing = [t for t in shown if '"hole">missing<' in t]
    assert len(missing) == 1 and "glyph_3.png" in missing[0]
    assert sum('"hole">unreadable<' in t for t in shown) == 2  # bad.png, and the non-UTF-8 name
    assert any(r"caf\xe9.png" in t for t in shown)
    assert any("s00000_0.png" in t and "data:image" in t for t in shown)  # found in done/sub/
    # the least confident first
    confs = [float(m) for m in re.findall(r"\d at (0\.\d\d)", dom)]
    lowest = min(float(r["confidence"]) for r in read_rows(real_run / "results.csv") if r["confidence"])
    assert confs == sorted(confs) and abs(confs[0] - lowest) <= 0.005, (confs, lowest)

    shot = real_run / "shot.png"
    browse(page_path, f"--screenshot={shot}", "--window-size=1200,2000")
    with Image.open(shot) as im:
        grey = im.convert("L")
        assert grey.size == (1200, 2000)
        assert ImageStat.Stat(grey).stddev[0] > 20  # not a blank page: plots and tiles drew
        assert len(im.convert("RGB").getcolors(1 << 24) or []) > 50


@needs_browser
@pytest.mark.system
def test_missing_files_and_error_rows_only_in_an_older_csv_still_render(tmp_path: Path) -> None:
    legacy = ("path", "digit", "confidence", "model_version", "error", "id", "finished_at")
    t0 = datetime(2024, 5, 1, 12, tzinfo=UTC)
    errors = [
        "cannot read image: broken PNG chunk",
        "cannot read image: truncated",
        "not an image (unrecognised format)",
    ]
    rows = [
        {"path": f"/gone/inbox/f{i}.png", "model_version": "abc", "error": errors[i % 3], "id": f"{i:016x}",
         "finished_at": (t0 + timedelta(seconds=i)).isoformat(timespec="milliseconds")}
        for i in range(9)
    ]  # fmt: skip
    page_path = write_report(write_csv(tmp_path / "old.csv", legacy, rows), tmp_path / "out.html")
    dom = browse(page_path, "--dump-dom")
    assert "No classified rows." in dom and "No confidences to show." in dom
    assert "an older CSV without error_kind, moved_to" in dom
    # grouped by the error's text less its details: two causes, not three
    assert re.search(r"<td>cannot read image</td><td[^>]*>6</td>", dom)
    assert re.search(r"<td>not an image \(unrecognised format\)</td><td[^>]*>3</td>", dom)
    shown = tiles(dom)
    assert len(shown) == 9 and all('class="tile missing"' in t and '"hole">missing<' in t for t in shown)
    assert dom.count("<svg") == 1  # the throughput: 9 rows over 8 s


def test_an_empty_csv_gives_a_page_that_says_so(tmp_path: Path) -> None:
    page = write_report(write_csv(tmp_path / "results.csv", CSV_COLUMNS, [])).read_text()
    assert (tmp_path / "report.html").exists()
    for text in (
        "No classified rows.",
        "No finish times: no rate to plot.",
        "No errors.",
        "No rows to show.",
    ):
        assert text in page


def test_review_rows_and_folder_show_when_they_exist(tmp_path: Path) -> None:
    """The review column holds the worker's reason; the folder is review/ beside the CSV."""
    assert CSV_COLUMNS[-1] == "review"
    (tmp_path / "review").mkdir()
    Image.new("L", (200, 100), 255).save(tmp_path / "review" / "odd.png")  # found by its name
    rows = [
        {"path": "/in/odd.png", "digit": "4", "confidence": "0.41", "review": "low confidence", "id": "1"},
        {"path": "/in/ok.png", "digit": "7", "confidence": "0.99", "review": "", "id": "2"},
        {"path": "/in/x.png", "digit": "1", "confidence": "0.97", "review": "not a digit", "id": "3"},
        {"path": "/in/y.png", "digit": "1", "confidence": "0.30", "review": "low confidence", "id": "4"},
    ]
    page = write_report(write_csv(tmp_path / "r.csv", CSV_COLUMNS, rows)).read_text()
    assert "<th>sent to review</th><td>3 (low confidence 2, not a digit 1)</td>" in page
    review = tiles(page.split('<h2 id="review">')[1].split('<h2 id="sheet">')[0])
    assert len(review) == 3  # not a digit first, then the least confident
    assert "not a digit" in review[0]  # the reason, in the tile's tooltip
    assert 'class="hole">missing' in review[0]  # x.png is nowhere: said, not hidden
    assert "y.png" in review[1]
    assert "odd.png" in review[2] and "data:image/png" in review[2]


def test_sixty_thousand_rows_stream_in_bounded_memory(tmp_path: Path) -> None:
    t0 = datetime(2024, 5, 1, 12, tzinfo=UTC)
    rows = [
        {"path": f"/in/{i}.png", "digit": str(i % 10), "confidence": f"{(i % 997) / 997:.4f}", "id": str(i),
         "finished_at": (t0 + timedelta(milliseconds=7 * i)).isoformat(timespec="milliseconds"),
         "error": "no digit found (blank image)" if i % 50 == 0 else "",
         "error_kind": "no_digit" if i % 50 == 0 else ""}
        for i in range(60_000)
    ]  # fmt: skip
    csv_path = write_csv(tmp_path / "big.csv", CSV_COLUMNS, rows)
    del rows
    tracemalloc.start()
    started = time.perf_counter()
    try:
        page = write_report(csv_path).read_text()
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 30e6, f"peak {peak / 1e6:.0f} MB"  # the CSV alone is ~8 MB: it is never held whole
    assert time.perf_counter() - started < 60
    assert len(tiles(page)) == TILES
    assert "<h3>Least confident (24)</h3>" in page and "<h3>Failed (24 of 1,200)</h3>" in page
    assert '<td>no_digit</td><td class="n">1,200</td>' in page


@pytest.mark.parametrize(
    ("make", "said"),
    [
        (lambda d: d / "nope.csv", "cannot read"),
        (lambda d: d, "is a folder"),
        (lambda d: (d / "x.png").write_bytes(b"\x89PNG\r\n\x1a\n\0\0\0") and d / "x.png", "not a"),
        (lambda d: (d / "other.csv").write_text("a,b\n1,2\n") and d / "other.csv", "no 'path'"),
    ],
    ids=["missing", "a folder", "a PNG", "another CSV"],
)
@pytest.mark.system
def test_a_persons_mistake_is_one_line_and_exit_2(
    tmp_path: Path, make: Callable[[Path], Path], said: str
) -> None:
    target = make(tmp_path)
    with pytest.raises(ConfigError):
        write_report(target)
    out = run_mnistq("report", target, cwd=tmp_path)
    assert out.returncode == 2
    assert out.stderr.count("\n") == 1 and said in out.stderr and "Traceback" not in out.stderr
    assert not (tmp_path / "report.html").exists()


@pytest.mark.system
def test_only_writing_a_report_loads_matplotlib_and_nothing_loads_torch() -> None:
    code = (
        "import sys, app.watch, report.report, app.cli; "
        "print(sorted(m for m in ('matplotlib', 'torch') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.stdout.strip() == "[]", out.stderr

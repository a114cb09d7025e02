"""`mnistq report`'s review section, shares and tiles, on CSVs written here (issue 25, finding 2).

A run like the one the finding saw: thousands of rows, 44 sent to review for both reasons, two
errors (one a blank white image), namesakes in two subfolders, long names.
"""

from __future__ import annotations

import random
import re
from pathlib import Path

import pytest
from helpers_browser import browse, needs_browser, tiles, write_csv
from PIL import Image

from mnistq.protocol import CSV_COLUMNS
from report.report import percent, write_report
from report.sheet import names
from report.tally import REVIEW_TILES, read

pytestmark = pytest.mark.timeout(240)
LONG = "customer_upload_2024-05-01T12-30-00_scanner-7_page0012_item03.png"


def _row(
    i: int, path: str, digit: int = 0, conf: float = 0.999, review: str = "", **more: str
) -> dict[str, str]:
    return {
        "path": path,
        "digit": str(digit),
        "confidence": f"{conf:.4f}",
        "review": review,
        "id": str(i),
        **more,
    }


def _run(folder: Path, done: int = 2100) -> tuple[Path, list[dict[str, str]]]:
    """A results CSV with files beside it: ``done`` confident rows, 22 rows of each review reason
    (two namesakes in north/ and south/, one long name) and two errors (a blank white image)."""
    rng = random.Random(25)
    rows = [_row(i, f"/data/inbox/d{i:05d}.png", i % 10) for i in range(done)]
    for k in range(44):
        reason = ("not a digit", "low confidence")[k % 2]
        conf = rng.uniform(0.5, 0.99) if k % 2 == 0 else rng.uniform(0.2, 0.55)
        name = {0: "north/page_01.png", 1: "south/page_01.png", 2: LONG}.get(k, f"r{k:02d}.png")
        rows.insert(rng.randrange(len(rows)), _row(done + k, f"/data/inbox/{name}", k % 10, conf, reason))
    (folder / "review" / "north").mkdir(parents=True)
    (folder / "review" / "south").mkdir()
    for sub in ("north", "south"):  # found under review/ by the path's tail
        Image.new("L", (28, 28), 128).save(folder / "review" / sub / "page_01.png")
    (folder / "failed").mkdir()
    Image.new("L", (28, 28), 255).save(folder / "failed" / "blank.png")
    for i, (name, kind) in enumerate((("blank.png", "no_digit"), ("junk.png", "unreadable"))):
        error = {"error": f"{kind} here", "error_kind": kind, "digit": "", "confidence": ""}
        rows.insert(500 * (i + 1), {**_row(9000 + i, f"/data/inbox/{name}"), **error})
    return write_csv(folder / "results.csv", CSV_COLUMNS, rows), rows


def _section(page: str, start: str, end: str) -> str:
    return page.split(start)[1].split(end)[0]


def _shown(section: str) -> list[tuple[str, str, float]]:
    """(path, reason, confidence) of each tile, in the page's order."""
    out = []
    for t in tiles(section):
        title = re.search(r'title="([^"]*)"', t)
        conf = re.search(r"<figcaption>\d at (\d\.\d\d)<", t)
        assert title and conf, t
        path, _, reason = title[1].partition("\n")
        out.append((path, reason, float(conf[1])))
    return out


def test_every_review_row_is_shown_not_a_digit_first_then_the_least_confident(tmp_path: Path) -> None:
    csv_path, rows = _run(tmp_path)
    page = write_report(csv_path).read_text()
    summary = _section(page, "<th>sent to review</th>", "</tr>")
    assert summary.startswith("<td>44 (") and "not a digit 22" in summary and "low confidence 22" in summary
    review = _section(page, '<h2 id="review">', '<h2 id="sheet">')
    assert "All 44 rows sent to review: not a digit first, then the least confident." in review
    assert "<h3>Not a digit (22)</h3>" in review and "<h3>Low confidence (22)</h3>" in review
    shown = _shown(review)
    assert {p for p, _, _ in shown} == {r["path"] for r in rows if r["review"]}  # every one
    reasons = [r for _, r, _ in shown]
    assert reasons == ["not a digit"] * 22 + ["low confidence"] * 22
    confs = [c for _, _, c in shown]
    assert confs[:22] == sorted(confs[:22]) and confs[22:] == sorted(confs[22:])
    # the contact sheet shows the least confident of the rest: none of the review rows again
    sheet = page.split('<h2 id="sheet">')[1]
    assert "<h3>Least confident, not sent to review (46)</h3>" in sheet and "<h3>Failed (2)</h3>" in sheet
    assert not {p for p, _, _ in shown} & {p for p, _, _ in _shown(sheet.split("<h3>Failed")[0])}


def test_past_the_cap_the_page_says_how_many_review_rows_it_shows_and_which(tmp_path: Path) -> None:
    rng = random.Random(7)
    low = [round(rng.uniform(0.05, 0.6), 4) for _ in range(600)]
    rows = [_row(i, f"/in/low{i}.png", 3, c, "low confidence") for i, c in enumerate(low)]
    rows += [_row(1000 + i, f"/in/nd{i}.png", 1, 0.9, "not a digit") for i in range(30)]
    rows += [_row(2000 + i, f"/in/other{i}.png", 2, 0.01, "checked by hand") for i in range(10)]
    rng.shuffle(rows)
    page = write_report(write_csv(tmp_path / "r.csv", CSV_COLUMNS, rows)).read_text()
    assert REVIEW_TILES == 500
    review = _section(page, '<h2 id="review">', '<h2 id="sheet">')
    assert (
        "The first 500 of the 640 rows sent to review: not a digit first, then the least confident." in review
    )
    assert "<h3>Not a digit (30)</h3>" in review and "<h3>Low confidence (470 of 600)</h3>" in review
    assert "Other reasons" not in review  # after the cap: their 0.01 does not put them first
    shown = _shown(review)
    assert [c for p, _, c in shown if "low" in p] == sorted(float(f"{c:.2f}") for c in low)[:470]


def test_rows_judged_not_a_digit_are_not_counted_as_digits(tmp_path: Path) -> None:
    csv_path, rows = _run(tmp_path, done=300)
    t, _ = read(csv_path)
    digits = [0] * 10
    for r in rows:
        if r["digit"] and r["review"] != "not a digit":
            digits[int(r["digit"])] += 1
    assert t.digits == digits and t.not_digit == 22
    assert t.classified() == 300 + 44
    chart = _section(write_report(csv_path).read_text(), '<h2 id="digits">', '<h2 id="confidence">')
    assert "not a" in chart  # a bar of their own


def test_a_share_under_a_tenth_of_a_percent_never_reads_zero(tmp_path: Path) -> None:
    assert [percent(n, 8148) for n in (0, 2, 8, 9, 8146, 8148)] == [
        "0.0%", "<0.1%", "<0.1%", "0.1%", ">99.9%", "100.0%"
    ]  # fmt: skip
    csv_path, _ = _run(tmp_path)
    page = write_report(csv_path).read_text()
    assert '<td>no_digit</td><td class="n">1</td><td class="n">&lt;0.1%</td>' in page


def test_namesakes_show_the_folders_that_tell_them_apart(tmp_path: Path) -> None:
    assert names(["/a/x/n.png", "/a/y/n.png", "/b/x/n.png", "/c/m.png", "/c/m.png", "n.png"]) == {
        "/a/x/n.png": "a/x/n.png",
        "/a/y/n.png": "y/n.png",
        "/b/x/n.png": "b/x/n.png",
        "/c/m.png": "m.png",  # the same path twice is one file: its name says enough
        "n.png": "n.png",
    }
    csv_path, _ = _run(tmp_path)
    shown = tiles(write_report(csv_path).read_text())
    north = [t for t in shown if "/data/inbox/north/page_01.png" in t]
    south = [t for t in shown if "/data/inbox/south/page_01.png" in t]
    assert len(north) == len(south) == 1
    assert "<small>north/<wbr>page_<wbr>01.png</small>" in north[0] and "data:image/png" in north[0]
    assert "<small>south/<wbr>page_<wbr>01.png</small>" in south[0] and "data:image/png" in south[0]
    assert any("<small>r04.png</small>" in t for t in shown)  # no namesake: the name alone


def test_names_wrap_after_separators_not_mid_word(tmp_path: Path) -> None:
    csv_path, _ = _run(tmp_path)
    shown = tiles(write_report(csv_path).read_text())
    (long,) = [re.search(r"<small>(.*?)</small>", t)[1] for t in shown if "customer_" in t]  # type: ignore[index]
    assert long.startswith("customer_<wbr>upload_<wbr>2024-<wbr>05-<wbr>01T12-<wbr>")
    assert long.replace("<wbr>", "") == LONG
    assert not re.search(r"[A-Za-z0-9.]<wbr>", long)  # a break only after '/', '_' or '-'


@needs_browser
@pytest.mark.system
def test_a_blank_white_thumbnail_has_a_visible_border(tmp_path: Path) -> None:
    """A white image on the white page shows as its border: a grey line as wide as a thumbnail."""
    (tmp_path / "failed").mkdir()
    Image.new("L", (28, 28), 255).save(tmp_path / "failed" / "blank.png")
    row = {"path": "/in/blank.png", "error": "no digit found", "error_kind": "no_digit", "id": "1"}
    page = write_report(write_csv(tmp_path / "r.csv", CSV_COLUMNS, [row]))
    assert "data:image/png" in tiles(page.read_text())[0]
    shot = tmp_path / "shot.png"
    browse(page, f"--screenshot={shot}", "--window-size=900,1400", "--force-device-scale-factor=1")
    with Image.open(shot) as im:
        grey = im.convert("L")
        w, h = grey.size
        px = grey.load()
        assert px is not None
    runs = []
    for y in range(h):
        run = 0
        for x in range(w):
            run = run + 1 if 100 <= px[x, y] <= 170 else 0  # type: ignore[operator]
            if run == 60:
                runs.append(y)
    assert len(runs) >= 2, runs  # the top and the bottom of the frame

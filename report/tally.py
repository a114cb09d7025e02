"""`mnistq report`'s one pass over a results CSV: bounded tallies of a run of any length.

Counts, a histogram, finish times per ms (made coarser past 10,000 of them), at most ``TILES``
tiles on the contact sheet and ``REVIEW_TILES`` review rows, those a person should look at first:
a 60,000-row file costs little memory. Columns an older CSV lacks
(``error_kind``, ``moved_to``) and the ``review`` column (any non-empty value but 0/false/no
counts) are optional.
"""

from __future__ import annotations

import contextlib
import csv
import heapq
import re
from collections import Counter
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

from mnistq import csvread
from mnistq.csvcell import uncell
from mnistq.errors import ConfigError
from mnistq.protocol import ReviewReason

TILES = 48  # the contact sheet's cap, all groups together
REVIEW_TILES = 500  # review rows shown: all of them in most runs, the first to look at in any
_MAX_TICKS = 10_000  # distinct finish times kept; more, and they are counted 10 times coarser
_NOT_REVIEW = {"", "0", "false", "no"}


@dataclass(order=True)
class Tile:
    sort: float  # -(the key to look at first) in a heap (a max-heap on heapq): the first stay
    n: int  # the row's number (negated in the heap): ties keep the CSV's order
    path: str = field(compare=False)
    moved: str = field(compare=False)
    caption: str = field(compare=False)
    folder: str = field(compare=False)  # where a file of this kind would be put
    detail: str = field(compare=False, default="")  # the error's text: a tooltip, not the caption


@dataclass
class Tally:
    rows: int = 0
    digits: list[int] = field(default_factory=lambda: [0] * 10)
    not_digit: int = 0  # classified rows the model judged not a digit: counted as no digit
    conf: list[int] = field(default_factory=lambda: [0] * 20)  # bins of 0.05
    ticks: Counter[int] = field(default_factory=Counter)  # rows per `tick` ms of finished_at
    tick: int = 1  # ms, x10 whenever there are more than _MAX_TICKS
    errors: Counter[str] = field(default_factory=Counter)
    examples: dict[str, Counter[str]] = field(default_factory=dict)
    versions: Counter[str] = field(default_factory=Counter)
    review: int = 0
    reasons: Counter[str] = field(default_factory=Counter)  # review rows by reason (bounded)
    to_review: list[Tile] = field(default_factory=list)  # a heap: not a digit, then least confident
    least: list[Tile] = field(default_factory=list)  # a heap, of the rows not sent to review
    failed: list[Tile] = field(default_factory=list)  # the first TILES error rows

    def classified(self) -> int:
        return sum(self.digits) + self.not_digit


def _cause(text: str) -> str:
    """An error text with its details (after ': ') and numbers dropped: older CSVs group by this."""
    return re.sub(r"\d+", "N", text.split(": ", 1)[0]).strip()[:80] or "unknown"


def read(csv_path: Path) -> tuple[Tally, tuple[str, ...]]:
    """One pass over the CSV, streamed; ConfigError when it is missing or not a results file.

    A row with the wrong number of cells (a quote typed by hand runs a CSV reader on over the
    rows after it, or a torn last row) makes it read the file again as the producer does
    (mnistq/csvread.py: every row kept, the whole file in memory): no row goes uncounted."""
    try:
        f = open(csv_path, encoding="utf-8-sig", errors="replace", newline="")  # noqa: SIM115
    except OSError as e:
        raise ConfigError(f"cannot read {csv_path}: {e.strerror or e}") from None
    t = Tally()
    with f:
        rows = csv.DictReader(f)
        try:
            header = tuple(rows.fieldnames or ())
            if "path" not in header:
                raise ConfigError(f"{csv_path} is not a mnist-queue results CSV (its header has no 'path')")
            for n, row in enumerate(rows):
                if None in row or None in row.values():
                    return _read_whole(csv_path)
                _add(t, n, {k: uncell(v) for k, v in row.items()})
        except (csv.Error, UnicodeError):
            return _read_whole(csv_path)
    return t, header


def _read_whole(csv_path: Path) -> tuple[Tally, tuple[str, ...]]:
    t = Tally()
    try:
        found = csvread.read(csv_path.read_bytes())
    except OSError as e:
        raise ConfigError(f"cannot read {csv_path}: {e.strerror or e}") from None
    except csvread.TooMuchToCut as e:
        raise ConfigError(f"{csv_path} is not a CSV (line {e.line}: a quote that is never closed)") from None
    for n, row in enumerate(found.rows):
        _add(t, n, {k: uncell(v) for k, v in zip(found.header, row, strict=False)})
    return t, found.header


def _add(t: Tally, n: int, row: dict[str, str]) -> None:
    t.rows += 1
    path, moved, error, kind = row.get("path", ""), row.get("moved_to", ""), row.get("error", ""), ""
    if ts := row.get("finished_at"):
        with contextlib.suppress(ValueError, OverflowError, OSError):  # a hand-edited cell
            t.ticks[int(datetime.fromisoformat(ts).timestamp() * 1000) // t.tick] += 1
        if len(t.ticks) > _MAX_TICKS:  # a long watch: memory stays bounded, the plot loses nothing
            t.tick, ticks, t.ticks = t.tick * 10, t.ticks, Counter()
            for k, v in ticks.items():
                t.ticks[k // 10] += v
    if len(t.versions) < 50 or row.get("model_version") in t.versions:
        t.versions[row.get("model_version") or "?"] += 1
    if error or row.get("error_kind"):
        kind = row.get("error_kind") or _cause(error)
        kind = kind if len(t.errors) < 100 or kind in t.errors else "other"  # bounded, whatever the texts
        t.errors[kind] += 1
        texts = t.examples.setdefault(kind, Counter())
        if len(texts) < 20 or error in texts:  # a bounded sample of each cause's wording
            texts[error] += 1
        if len(t.failed) < TILES:
            t.failed.append(Tile(0, n, path, moved, kind, "failed", error))
        return
    try:
        digit, conf = int(row.get("digit", "")), float(row.get("confidence", ""))
    except ValueError:
        return
    reason = row.get("review", "").strip()
    if reason == ReviewReason.NOT_DIGIT:
        t.not_digit += 1
    elif 0 <= digit <= 9:
        t.digits[digit] += 1
    if not 0 <= conf <= 1:  # also NaN
        return
    t.conf[min(int(conf * 20), 19)] += 1
    caption = f"{digit} at {conf:.2f}"
    if reason.lower() not in _NOT_REVIEW:
        t.review += 1
        reason = reason[:40]
        if len(t.reasons) < 20 or reason in t.reasons:  # bounded, whatever the cells hold
            t.reasons[reason] += 1
        # not a digit first, then low confidence, then any other reason; the least confident
        # first within each (conf <= 1 < 2: the rank decides first)
        rank = 0 if reason == ReviewReason.NOT_DIGIT else 1 if reason == ReviewReason.LOW_CONFIDENCE else 2
        tile = Tile(-(2 * rank + conf), -n, path, moved, caption, "review", reason)
        _keep(t.to_review, tile, REVIEW_TILES)
        return  # shown under Review: not again among the least confident
    _keep(t.least, Tile(-conf, -n, path, moved, caption, "done"), TILES)


def _keep(heap: list[Tile], tile: Tile, most: int) -> None:
    """The ``most`` tiles with the smallest keys (the greatest ``sort``), in bounded memory."""
    (heapq.heappush if len(heap) < most else heapq.heappushpop)(heap, tile)


def in_order(heap: list[Tile]) -> list[Tile]:
    """A heap's tiles, the one to look at first first (ties: the CSV's order)."""
    return sorted(heap, reverse=True)

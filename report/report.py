"""`mnistq report results.csv [--out report.html]`: a run at a glance, as one HTML file.

The page is self-contained (no network: plots are inline SVG, thumbnails are data: URIs), so it
can be mailed or opened from a share. The CSV is read once, row by row, into bounded tallies
(report/tally.py), so a 60,000-row file costs little memory; the tiles are drawn by
report/sheet.py. Every row sent to review is shown (up to tally.REVIEW_TILES, then the page
says how many), those a person should look at first first: not a digit, then the least confident.
matplotlib is imported here only: the watcher and the workers never load it.
"""

from __future__ import annotations

import argparse
import contextlib
import html
import io
import math
import os
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from mnistq.cliargs import one_line_errors
from mnistq.errors import ConfigError
from mnistq.protocol import ReviewReason
from report import sheet
from report.tally import Tally, Tile, in_order, read

_WIDTHS_MS = (100, 200, 500, 1000, 2000, 5000, 10_000, 30_000, 60_000, 300_000, 600_000)


# -- plots -------------------------------------------------------------------------------------
def _svg(fig: Any) -> str:
    import matplotlib  # here only: see the module's docstring

    buf = io.StringIO()
    with matplotlib.rc_context({"svg.fonttype": "none"}):  # text stays text: smaller, searchable
        fig.savefig(buf, format="svg", bbox_inches="tight")
    text = buf.getvalue()
    return text[text.index("<svg") :]  # inline: no XML declaration or DOCTYPE


def _figure(height: float = 2.6) -> tuple[Any, Any]:
    from matplotlib.figure import Figure  # no pyplot: no global state, no GUI backend

    fig = Figure(figsize=(8, height))
    ax = fig.add_subplot()
    ax.spines[["top", "right"]].set_visible(False)
    return fig, ax


def digits_chart(t: Tally) -> str:
    """Rows per digit read; rows the model judged not a digit are a bar of their own, not a digit's."""
    fig, ax = _figure()
    bars = [ax.bar(range(10), t.digits, color="#3b6ea5")]
    if t.not_digit:
        bars += [ax.bar([10.5], [t.not_digit], color="#999")]
    for b in bars:
        ax.bar_label(b, fmt="{:,.0f}", padding=2, fontsize=8)
    ticks = [*range(10), *([10.5] if t.not_digit else [])]
    ax.set_xticks(ticks, [*map(str, range(10)), "not a\ndigit"][: len(ticks)])
    ax.set(xlabel="digit", ylabel="rows")
    return _svg(fig)


def confidence_chart(t: Tally) -> str:
    fig, ax = _figure()
    ax.bar([i / 20 for i in range(20)], t.conf, width=0.05, align="edge", color="#3b6ea5", edgecolor="white")
    nonzero = [c for c in t.conf if c]
    if max(nonzero) > 100 * min(nonzero):  # a clean run piles up near the top: show the tail too
        ax.set_yscale("log")
        ax.set_ylim(bottom=0.5)  # a bin of one row still shows
    ax.set(
        xlim=(0, 1), xlabel="confidence", ylabel="rows" + (" (log scale)" if ax.get_yscale() == "log" else "")
    )
    return _svg(fig)


def _time(t: Tally, tick: int) -> str:
    return datetime.fromtimestamp(tick * t.tick / 1000, UTC).isoformat(timespec="milliseconds")


def throughput_chart(t: Tally) -> tuple[str, str]:
    first, last = min(t.ticks), max(t.ticks)
    span = (last - first + 1) * t.tick  # ms, integers throughout: no bin edge rounds astray
    # the smallest round bin that keeps to ~100 bins, and ~10 rows a bin on average: a rate
    # from a bin with one row in it is noise
    most = max(10, min(100, sum(t.ticks.values()) // 10))
    width = next(
        (w for w in _WIDTHS_MS if w >= t.tick and span / w <= most),
        3_600_000 * math.ceil(span / 3_600_000 / most),
    )
    bins = [0] * math.ceil(span / width)
    for tick, count in t.ticks.items():
        bins[(tick - first) * t.tick // width] += count
    scale, unit = next(
        (s, u) for s, u in ((3_600_000, "h"), (60_000, "min"), (1000, "s")) if span >= 3 * s or s == 1000
    )
    xs = [i * width / scale for i in range(len(bins) + 1)]
    fig, ax = _figure()
    ax.stairs([c * 1000 / width for c in bins], xs, fill=True, color="#3b6ea5")
    ax.set(xlabel=f"time since the first row ({unit})", ylabel="rows per second", xlim=(0, xs[-1]))
    start = _time(t, first)
    rate = sum(t.ticks.values()) * 1000 / span
    return _svg(fig), f"from {start}, in bins of {width / 1000:g} s; {rate:,.1f} rows/s overall"


# -- the page ----------------------------------------------------------------------------------
_CSS = """body{font:14px/1.4 system-ui,sans-serif;margin:2em auto;max-width:60em;color:#222;padding:0 1em}
h1{margin-bottom:0}h2{border-bottom:1px solid #ccc;margin-top:1.6em}svg{width:100%;height:auto}
table{border-collapse:collapse}td,th{padding:.2em .8em;text-align:left;border-bottom:1px solid #eee}
td.n{text-align:right}.sub{color:#666}"""
_KINDS = {ReviewReason.NOT_DIGIT.value: "Not a digit", ReviewReason.LOW_CONFIDENCE.value: "Low confidence"}


def percent(n: int, total: int) -> str:
    """``n`` of ``total`` as a share that is 0% or 100% only when it is (2 in 8,148: "<0.1%")."""
    share = n / total
    if 0 < share < 0.001:
        return "<0.1%"
    return ">99.9%" if 0.999 < share < 1 else f"{share:.1%}"


def _shown(n: int, total: int) -> str:
    return f"{n:,}" if n == total else f"{n:,} of {total:,}"


def _review(csv_dir: Path, t: Tally, names: dict[str, str]) -> list[str]:
    """Every row sent to review, or the first REVIEW_TILES: not a digit first, then the least confident."""
    tiles = in_order(t.to_review)
    said = f"All {t.review:,}" if len(tiles) == t.review else f"The first {len(tiles):,} of the {t.review:,}"
    rest = "" if len(tiles) == t.review else " The others are in the CSV's review column."
    out = [
        f'<h2 id="review">Sent to review</h2><p>{said} rows sent to review: not a digit first, '
        f"then the least confident.{rest}</p>"
    ]
    kinds: dict[str, list[Tile]] = {}
    for x in tiles:  # in the order of their kinds: not a digit, low confidence, any other reason
        kinds.setdefault(_KINDS.get(x.detail, "Other reasons"), []).append(x)
    counted = {v: t.reasons.get(k, 0) for k, v in _KINDS.items()}
    for kind, group in kinds.items():
        total = counted.get(kind, t.review - sum(counted.values()))
        out += [f"<h3>{kind} ({_shown(len(group), total)})</h3>", sheet.sheet(csv_dir, group, names)]
    return out


def render(csv_path: Path, t: Tally, header: tuple[str, ...]) -> str:
    e, ok, errors = html.escape, t.classified(), sum(t.errors.values())
    versions = ", ".join(f"{v} ({c:,})" for v, c in t.versions.most_common(5))
    facts = {"CSV": str(csv_path), "rows": f"{t.rows:,}", "classified": f"{ok:,}", "errors": f"{errors:,}"}
    if "review" in header:
        why = ", ".join(f"{r} {c:,}" for r, c in t.reasons.most_common(5))
        facts["sent to review"] = f"{t.review:,}" + (f" ({why})" if t.review else "")
    facts["model versions"] = versions or "none"
    if lacking := [c for c in ("error_kind", "moved_to") if c not in header]:
        facts["note"] = f"an older CSV without {', '.join(lacking)}: errors grouped by their text"
    now = datetime.now(UTC).isoformat(timespec="seconds")
    out = [
        "<!DOCTYPE html><html lang=en><head><meta charset=utf-8>",
        f"<title>Run report: {e(csv_path.name)}</title><style>{_CSS}\n{sheet.CSS}</style></head><body>",
        f'<h1>Run report</h1><p class="sub">{e(csv_path.name)}, written {now}</p>',
        '<h2 id="summary">Summary</h2><table>',
        *(f"<tr><th>{k}</th><td>{e(v)}</td></tr>" for k, v in facts.items()),
        '</table><h2 id="digits">Counts per digit</h2>',
        digits_chart(t) if ok else "<p>No classified rows.</p>",
        '<h2 id="confidence">Confidence</h2>',
        confidence_chart(t) if any(t.conf) else "<p>No confidences to show.</p>",
        '<h2 id="throughput">Throughput</h2>',
    ]
    # Rows are written a reply at a time: under a second, their times show batches, not a rate.
    span = (max(t.ticks) - min(t.ticks)) * t.tick if t.ticks else 0
    if span >= 1000:
        svg, caption = throughput_chart(t)
        out += [svg, f'<p class="sub">{e(caption)}</p>']
    else:
        first = _time(t, min(t.ticks)) if t.ticks else ""
        when = (
            f"All rows finished within {span} ms from {first}" if span else f"Every row finished at {first}"
        )
        out += [f"<p>{when if t.ticks else 'No finish times'}: no rate to plot.</p>"]
    out += ['<h2 id="errors">Errors by cause</h2>', "<table>" if errors else "<p>No errors.</p>"]
    if errors:
        out += ["<tr><th>cause</th><th>rows</th><th>share</th><th>most common messages</th></tr>"]
        for kind, n in t.errors.most_common(15):
            texts = "<br>".join(e(x[:120]) for x, _ in t.examples[kind].most_common(3))
            share = e(percent(n, t.rows))
            out += [f'<tr><td>{e(kind)}</td><td class="n">{n:,}</td><td class="n">{share}</td>']
            out += [f"<td>{texts}</td></tr>"]
        out += ["</table>"]
    least = "Least confident" + (", not sent to review" if t.review else "")
    groups = sheet.share({least: in_order(t.least), "Failed": t.failed})
    names = sheet.names(x.path for x in [*t.to_review, *(x for g in groups.values() for x in g)])
    if t.review:
        out += _review(csv_path.parent, t, names)
    out += ['<h2 id="sheet">Contact sheet</h2>', "" if groups else "<p>No rows to show.</p>"]
    for name, tiles in groups.items():
        count = _shown(len(tiles), errors) if name == "Failed" else f"{len(tiles):,}"
        out += [f"<h3>{name} ({count})</h3>", sheet.sheet(csv_path.parent, tiles, names)]
    return "\n".join([*out, "</body></html>\n"])


def write_report(csv_path: Path, out: Path | None = None) -> Path:
    """Read ``csv_path``, write its report (default: report.html beside it), return its path."""
    csv_path = Path(csv_path)
    if csv_path.is_dir():
        raise ConfigError(f"{csv_path} is a folder, not a results CSV")
    out = Path(out) if out else csv_path.parent / "report.html"
    page = render(csv_path, *read(csv_path))
    tmp = out.with_name(f".{out.name}.tmp")
    try:  # whole or not at all: a reader never sees half a page
        tmp.write_text(page, encoding="utf-8")
        os.replace(tmp, out)
    except OSError as e:
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)
        raise ConfigError(f"cannot write the report to {out}: {e.strerror or e}") from None
    return out


def main(argv: list[str]) -> int:
    p = one_line_errors(argparse.ArgumentParser(prog="mnistq report", description=__doc__.split("\n\n")[0]))
    p.add_argument("csv", type=Path, help="a results CSV written by `mnistq run`/`watch`/`classify`")
    p.add_argument("--out", type=Path, help="the HTML file to write (default: report.html beside the CSV)")
    args = p.parse_args(argv)
    print(write_report(args.csv, args.out))
    return 0

"""Reading the results CSV back on start: its rows for the ledger, and the torn tail to cut.

A crash of the machine mid-write can leave a partial last row (``append`` writes whole rows or
rolls back, but a power cut has the last word). That tail, and only that, may be cut: it is at
most one record, and it has no row yet, so its file is redone.

What must never happen is cutting rows because a person edited the file. A quote typed into a
cell (``note: "check this``) is the case that matters: at the start of a cell it opens a quoted
field that a CSV reader runs on to the end of the file, so everything after it reads as one
unfinished record. Counting quotes cannot tell that from a torn write; lines can. A torn write
is one line, or a quoted path with newlines in it, never a run of lines that are whole rows on
their own. So an unfinished record is read again line by line:

- lines that are whole rows alone (they end with a newline and have the header's number of
  cells, read as CSV or, for the edited line itself, with quotes taken literally) are rows:
  they go into the ledger and stay in the file;
- what is left after the last such line is the torn tail, cut when it is at most one record's
  worth (:data:`MAX_TORN`);
- anything larger stops the start with a ConfigError (exit 2) that names the line: a person
  decides, the file is left as it was.
"""

from __future__ import annotations

import csv
from collections.abc import Iterator
from dataclasses import dataclass, field

#: the most a torn row can hold: two paths of PATH_MAX (4,096) bytes, each byte escaped as four
#: characters (``\\xNN``), an error that quotes a path, and the short cells
MAX_TORN = 64 * 1024
_SENTINEL = "mnistq-end-of-record"


@dataclass
class Read:
    """What :func:`read` found: ``rows`` after the header; ``keep`` is where the file's whole
    content ends (the torn tail, if any, starts there); ``hand_edited`` is the 1-based line where
    a quote that is never closed begins, or 0."""

    header: tuple[str, ...] = ()
    rows: list[list[str]] = field(default_factory=list)
    keep: int = 0
    hand_edited: int = 0


class TooMuchToCut(Exception):
    """The unfinished end of the file is more than one torn row: ``line`` (1-based) starts it."""

    def __init__(self, line: int, size: int) -> None:
        super().__init__(line, size)
        self.line, self.size = line, size


def _text(line: bytes, first: bool) -> str:
    # utf-8-sig: a spreadsheet that saved the file may have put a byte-order mark first
    return line.decode("utf-8-sig" if first else "utf-8", errors="replace")


def _alone(line: bytes, width: int, first: bool) -> list[str] | None:
    """``line`` as one whole row of ``width`` cells, or None: read as CSV, then with quotes
    taken as text (a quote typed into a cell by hand)."""
    if not line.endswith(b"\n"):
        return None
    text = _text(line, first)
    for quoting in (csv.QUOTE_MINIMAL, csv.QUOTE_NONE):
        row = next(csv.reader([text], quoting=quoting), [])
        if len(row) == width:
            return row
    return None


def _closed(text: str) -> bool:
    """Whether a record's text ends outside quotes: a line after it would be a record of its own."""
    if not text.endswith("\n"):  # every row written ends with \r\n; a lone \r is a write cut short
        return False
    rows = list(csv.reader([*text.splitlines(keepends=True), _SENTINEL + "\r\n"]))
    return rows[-1] == [_SENTINEL]


def read(data: bytes) -> Read:
    """The header, the rows and the length to keep of a results file's ``data``.

    Raises :class:`TooMuchToCut` when the unfinished end is larger than one torn row could be.
    """
    lines = data.splitlines(keepends=True)
    # a quote typed by hand makes one field of the rest of the file: no limit below the file's size
    csv.field_size_limit(max(csv.field_size_limit(), len(data) + 1))
    out = Read(keep=len(data))
    width, at = 0, 0  # the header's cells (0 until read); the line to read from
    while at < len(lines):
        for row, a, b in _records(lines, at):
            closed = b < len(lines) or _closed(b"".join(lines[a:b]).decode("utf-8", errors="replace"))
            if closed and (b - a == 1 or len(row) == width):
                out.rows.append(row)  # a row; a quoted path with newlines in it
                at = b
                if not width:
                    out.header, width = tuple(h.strip() for h in row), len(row)
                continue
            alone = [_alone(lines[i], width, i == 0) if width else None for i in range(a, b)]
            # a write cut short ends inside a row; a record's own end is \r\n, a path's newline \n
            if closed or any(alone) or (b - a == 1 and lines[a].endswith(b"\r\n")):
                # a quote typed by hand ran on over lines that are rows of their own: the line
                # it is in is read alone, and reading starts again on the line after it
                out.hand_edited = out.hand_edited or a + 1
                if alone[0] is not None:
                    out.rows.append(alone[0])
                at = a + 1
                break
            torn = len(data) - sum(len(x) for x in lines[:a])  # a torn write: the last record
            if torn > MAX_TORN:
                raise TooMuchToCut(a + 1, torn)
            out.keep -= torn
            return _headed(out)
        else:
            break
    return _headed(out)


def _headed(out: Read) -> Read:
    if out.rows and out.header:
        out.rows.pop(0)
    return out


def _records(lines: list[bytes], at: int) -> Iterator[tuple[list[str], int, int]]:
    """The CSV records from line ``at`` on, each with its first line and the line after it."""
    taken = at

    def feed() -> Iterator[str]:
        nonlocal taken
        for i in range(at, len(lines)):
            taken = i + 1  # the reader asks for a line only when its record needs one
            yield _text(lines[i], i == 0)

    start = at
    try:
        for row in csv.reader(feed()):
            yield row, start, taken
            start = taken
    except csv.Error:  # a NUL byte, say: that line alone is looked at, as a quote typed by hand
        yield [], start, max(taken, start + 1)

"""The results CSV: one row per file, appended and flushed as results arrive.

Each row is written with a single ``write()`` on an O_APPEND descriptor, so a killed producer
leaves whole rows or none; only a crash of the machine mid-write can leave a torn last row, and
opening the sink removes it (the file has no row, so it is redone). The ``id`` column doubles as
the record of what is done: on start the sink reads it back, which is how a restarted producer
writes no row twice.

Columns (:data:`mnistq.protocol.CSV_COLUMNS`):

- a new or empty file gets today's header;
- **a file written by an older version keeps its header**: rows are appended under it with the
  columns it has. A column it lacks (``error_kind`` in files from before it existed) is not
  written there; a column it has that this version does not know is left empty. Start a new
  file (``--csv``) to get every column;
- a file whose first line has no ``path`` and ``id`` columns is not a results file: the sink
  refuses it (ConfigError naming the file) and leaves it untouched, rather than append rows
  that would not line up with someone else's columns and could not be deduplicated.
"""

from __future__ import annotations

import csv
import io
import logging
import os
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from mnistq.errors import ConfigError
from mnistq.protocol import CSV_COLUMNS, Result

log = logging.getLogger("mnistq.producer")
_FORMULA_START = ("=", "+", "-", "@", "\t", "\r")
#: the header before error_kind existed; a torn first line is repaired only if it starts one
_LEGACY_COLUMNS = ("path", "digit", "confidence", "model_version", "error", "id", "finished_at")
_HEADERS = tuple(",".join(cols).encode() + b"\r\n" for cols in (CSV_COLUMNS, _LEGACY_COLUMNS))


def neutralise(value: Any) -> Any:
    """Spreadsheets run cells starting with = + - @ as formulas; a leading ' makes them text."""
    if isinstance(value, str) and value.startswith(_FORMULA_START):
        return "'" + value
    return value


def whole_records(data: bytes) -> int:
    """The length of ``data`` up to the end of its last complete CSV record.

    A record ends at a newline outside quotes; a newline inside a quoted field (a path may hold
    one) does not end it. Every quote toggles the state (an escaped quote is two), so a newline
    is outside quotes when the bytes before it hold an even number of quotes.
    """
    total = data.count(b'"')
    after = 0  # quotes after the newline being looked at
    end = len(data)
    while (i := data.rfind(b"\n", 0, end)) >= 0:
        after += data.count(b'"', i + 1, end)
        if (total - after) % 2 == 0:
            return i + 1
        end = i
    return 0


class CsvSink:
    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.done: set[str] = set()
        self.columns: tuple[str, ...] = CSV_COLUMNS
        self._repair_and_load()
        self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        if os.fstat(self._fd).st_size == 0:
            self.columns = CSV_COLUMNS
            self._write(list(CSV_COLUMNS))

    def _repair_and_load(self) -> None:
        try:
            data = self.path.read_bytes()
        except FileNotFoundError:
            return
        keep = whole_records(data)
        if keep == 0 and data and not any(h.startswith(data) for h in _HEADERS):
            raise self._foreign("its first line is not a CSV header")
        # utf-8-sig: a spreadsheet that saved the file may have put a byte-order mark first
        rows = csv.reader(io.StringIO(data[:keep].decode("utf-8-sig", errors="replace"), newline=""))
        header = tuple(h.strip() for h in next(rows, []))
        if keep and ("path" not in header or "id" not in header):
            raise self._foreign(f"its header has no 'path' and 'id' columns: {', '.join(header[:8])}")
        if keep < len(data):  # only a crash mid-write leaves this, and that file has no row yet
            log.warning("%s: removing a partial last row (%d bytes)", self.path, len(data) - keep)
            with open(self.path, "r+b") as f:
                f.truncate(keep)
        if not keep:
            return
        self.columns = header
        col = header.index("id")
        self.done.update(row[col] for row in rows if len(row) > col and row[col])
        missing = [c for c in CSV_COLUMNS if c not in header]
        if missing:
            log.info("%s has an older header: rows go under it without %s", self.path, ", ".join(missing))

    def _foreign(self, why: str) -> ConfigError:
        return ConfigError(
            f"{self.path} is not a mnist-queue results file ({why}); "
            "choose another file with --csv or MNISTQ_CSV, or move this one away"
        )

    def _write(self, cells: list[Any]) -> None:
        buf = io.StringIO()
        csv.writer(buf, lineterminator="\r\n").writerow(cells)
        os.write(self._fd, buf.getvalue().encode("utf-8"))

    def write(self, result: Result) -> bool:
        """Append the row for one file; False (and nothing written) if its id already has one."""
        if result.id and result.id in self.done:
            return False
        cells: dict[str, Any] = {
            "path": result.path,
            "digit": "" if result.digit is None else result.digit,
            "confidence": "" if result.confidence is None else f"{result.confidence:.4f}",
            "model_version": result.model_version or "",
            "error": result.error or "",
            "error_kind": result.error_kind.value if result.error_kind else "",
            "id": result.id or "",
            "finished_at": datetime.now(UTC).isoformat(timespec="milliseconds"),
        }
        self._write([neutralise(cells.get(c, "")) for c in self.columns])
        if result.id:
            self.done.add(result.id)
        return True

    def close(self) -> None:
        os.close(self._fd)

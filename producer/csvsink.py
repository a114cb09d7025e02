"""The results CSV: one row per file, appended and flushed as results arrive.

Each row is written with a single ``write()`` on an O_APPEND descriptor, so a killed producer
leaves whole rows or none. The ``id`` column doubles as the record of what is done: on start
the sink reads it back, which is how a restarted producer writes no row twice.
"""

from __future__ import annotations

import csv
import io
import logging
import os
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)
COLUMNS = ["path", "digit", "confidence", "model_version", "error", "id", "finished_at"]
_FORMULA_START = ("=", "+", "-", "@", "\t", "\r")


def neutralise(value: Any) -> Any:
    """Spreadsheets run cells starting with = + - @ as formulas; a leading ' makes them text."""
    if isinstance(value, str) and value.startswith(_FORMULA_START):
        return "'" + value
    return value


class CsvSink:
    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.done: set[str] = set()
        self._repair_and_load()
        self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        if os.fstat(self._fd).st_size == 0:
            self._write(COLUMNS)

    def _repair_and_load(self) -> None:
        if not self.path.exists() or self.path.stat().st_size == 0:
            return
        data = self.path.read_bytes()
        if not data.endswith(b"\n"):
            # Only a crash mid-write (power loss) can leave this; drop the partial row.
            keep = data.rfind(b"\n") + 1
            log.warning("%s: removing a partial last row (%d bytes)", self.path, len(data) - keep)
            with open(self.path, "r+b") as f:
                f.truncate(keep)
            data = data[:keep]
        rows = csv.reader(io.StringIO(data.decode("utf-8", errors="replace"), newline=""))
        header = next(rows, None)
        if header is None or "id" not in header:
            return
        col = header.index("id")
        self.done.update(row[col] for row in rows if len(row) > col and row[col])

    def _write(self, cells: list[Any]) -> None:
        buf = io.StringIO()
        csv.writer(buf, lineterminator="\r\n").writerow(cells)
        os.write(self._fd, buf.getvalue().encode("utf-8"))

    def write(self, result: dict[str, Any]) -> bool:
        """Append the row for one file; False (and nothing written) if its id already has one."""
        file_id = result.get("id")
        if file_id and file_id in self.done:
            return False
        conf = result.get("confidence")
        row = {
            **result,
            "digit": "" if result.get("digit") is None else result["digit"],
            "confidence": "" if conf is None else f"{conf:.4f}",
            "error": result.get("error") or "",
            "finished_at": datetime.now(UTC).isoformat(timespec="milliseconds"),
        }
        self._write([neutralise(row.get(c, "")) for c in COLUMNS])
        if file_id:
            self.done.add(file_id)
        return True

    def close(self) -> None:
        os.close(self._fd)

"""The results CSV: one row per file, appended whole or not at all.

**Whole rows.** ``append`` writes a message's rows as one buffer on an O_APPEND descriptor and
checks every ``write``'s count, then ``fsync``s once: per message, never per row. If a write
falls short and the rest cannot follow, or the fsync fails (a full disk: ENOSPC; a read-only
one: EROFS), the file is truncated back to the end of its last whole row and the OSError is
raised: the caller keeps the rows and tries again later (producer/finish.py). A killed producer
leaves whole rows or none; a crash of the machine mid-write can leave a torn last row, and
opening the sink removes it (that file has no row, so it is redone): that row alone, never a row
a person edited (mnistq/csvread.py). The ``id`` column doubles
as the record of what is done, the ledger: on start the sink reads it back, which is how a
restarted producer writes no row twice.

**Any name gets its row.** Cells are UTF-8. A file name that is not UTF-8 (Python holds its
bytes as lone surrogates, ``os.fsdecode(b'bad\\xff.png') == 'bad\\udcff.png'``) is written with
each such byte as the four characters ``\\xNN`` (Python's ``backslashreplace``: ``bad\\xff.png``),
and a backslash of the name that would read as one is doubled (the name ``bad\\xff.png``, four
ASCII characters, is written ``bad\\\\xff.png``): see :func:`escape`, and :func:`unescaped` for
reading cells back, an older version's included. A cell starting with ``= + - @`` gets a leading ``'`` (spreadsheets would
run it as a formula). A row that cannot be formatted at all becomes that file's error row; the
rest of its message is unaffected.

Columns (:data:`mnistq.protocol.CSV_COLUMNS`); ``moved_to`` is where the file is now (in
done/ or failed/), empty when it stayed in place (``--keep``, a folder, a file that could not
be moved: the warning says why):

- a new or empty file gets today's header;
- **a file written by an older version keeps its header**: rows are appended under it with the
  columns it has. A column it lacks (``error_kind``, ``moved_to`` in files from before they
  existed) is not written there; a column it has that this version does not know is left
  empty. Start a new file (``--csv``) to get every column;
- a file whose first line has no ``path`` and ``id`` columns is not a results file: the sink
  refuses it (ConfigError naming the file) and leaves it untouched, rather than append rows
  that would not line up with someone else's columns and could not be deduplicated.
"""

from __future__ import annotations

import csv
import io
import logging
import os
import threading
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from mnistq import csvread
from mnistq.csvcell import cell, escape, uncell
from mnistq.errors import ConfigError
from mnistq.protocol import CSV_COLUMNS, ErrorKind, Result

log = logging.getLogger("mnistq.producer")
#: the headers of older versions (before review; before moved_to; before error_kind): a torn first line is
#: repaired only if it starts one of these or today's
_BEFORE_REVIEW = tuple(c for c in CSV_COLUMNS if c != "review")
_PREVIOUS_COLUMNS = tuple(c for c in _BEFORE_REVIEW if c != "moved_to")
_LEGACY_COLUMNS = ("path", "digit", "confidence", "model_version", "error", "id", "finished_at")
_HEADERS = tuple(
    ",".join(cols).encode() + b"\r\n"
    for cols in (CSV_COLUMNS, _BEFORE_REVIEW, _PREVIOUS_COLUMNS, _LEGACY_COLUMNS)
)


def _encode(cells: list[Any]) -> bytes:
    buf = io.StringIO()
    csv.writer(buf, lineterminator="\r\n").writerow(cells)
    return buf.getvalue().encode("utf-8")


class CsvSink:
    """The results file, and its ledger: ``done`` maps each file id with a row to its row's
    ``moved_to``; ``places`` maps each path to the ``moved_to`` of its latest row (both as
    :func:`escape` gives them)."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.done: dict[str, str] = {}
        self.places: dict[str, str] = {}
        self.columns: tuple[str, ...] = CSV_COLUMNS
        # The watcher's two threads may both append (replies, and retries after a full disk).
        self._lock = threading.Lock()
        self._repair_and_load()
        # O_NOFOLLOW: rows never go through a link put in the file's place (producer/lock.py)
        self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW, 0o644)
        self._end = os.fstat(self._fd).st_size  # the end of the last whole row
        self._torn = False  # a failed write whose rollback failed too: truncate before the next
        if self._end == 0:
            self.columns = CSV_COLUMNS
            with self._lock:
                self._append(_encode(list(CSV_COLUMNS)))

    def _repair_and_load(self) -> None:
        try:
            data = self.path.read_bytes()
        except FileNotFoundError:
            return
        try:
            found = csvread.read(data)
        except csvread.TooMuchToCut as e:
            if e.line == 1:
                raise self._foreign("its first line is not a CSV header") from None
            raise ConfigError(
                f"{self.path}: line {e.line} starts {e.size} bytes that do not end as a CSV row should "
                "(a quote opened by hand?); more than one row's worth, so nothing is cut: "
                "fix that line, or start another file with --csv"
            ) from None
        keep, header = found.keep, found.header
        if not header and data and not any(h.startswith(data) for h in _HEADERS):
            raise self._foreign("its first line is not a CSV header")
        if header and ("path" not in header or "id" not in header):
            raise self._foreign(f"its header has no 'path' and 'id' columns: {', '.join(header[:8])}")
        if found.hand_edited:
            log.warning(
                "%s: line %d has a quote that is never closed (edited by hand?); its rows are read "
                "line by line and kept; close the quote for other CSV readers",
                self.path,
                found.hand_edited,
            )
        if keep < len(data):  # only a crash mid-write leaves this, and that file has no row yet
            log.warning("%s: removing a partial last row (%d bytes)", self.path, len(data) - keep)
            with open(self.path, "r+b") as f:
                f.truncate(keep)
        if not header:
            return
        self.columns = header
        at_path, at_id = header.index("path"), header.index("id")
        at_moved = header.index("moved_to") if "moved_to" in header else None
        for row in found.rows:
            if len(row) <= max(at_path, at_id):
                continue
            moved = uncell(row[at_moved]) if at_moved is not None and len(row) > at_moved else ""
            if row[at_id]:
                self.done[row[at_id]] = moved
            self.places[uncell(row[at_path])] = moved
        missing = [c for c in CSV_COLUMNS if c not in header]
        if missing:
            log.info("%s has an older header: rows go under it without %s", self.path, ", ".join(missing))

    def _foreign(self, why: str) -> ConfigError:
        return ConfigError(
            f"{self.path} is not a mnist-queue results file ({why}); "
            "choose another file with --csv or MNISTQ_CSV, or move this one away"
        )

    def _append(self, data: bytes) -> None:
        """Append ``data`` whole and fsync it, or leave the file as it was and raise OSError."""
        if self._torn:
            os.ftruncate(self._fd, self._end)  # still failing: raise, the caller retries later
            self._torn = False
        else:
            # another writer (`mnistq classify --csv`) may have appended whole rows meanwhile
            self._end = os.fstat(self._fd).st_size
        view, written = memoryview(data), 0
        try:
            while written < len(data):
                # A short count is not an error by itself: the rest is tried at once, and the
                # disk's refusal of it (ENOSPC) is the error that rolls the whole buffer back.
                n = os.write(self._fd, view[written:])
                if n <= 0:
                    raise OSError(f"{self.path}: the write took {n} bytes")
                written += n
            os.fsync(self._fd)
        except OSError:
            if written:
                self._roll_back()
            raise
        self._end += len(data)

    def _roll_back(self) -> None:
        try:
            os.ftruncate(self._fd, self._end)
        except OSError as e:
            self._torn = True
            log.warning(
                "%s: could not remove a partial row yet (%s); it is removed before the next", self.path, e
            )

    def _cells(self, result: Result, finished_at: str, first_try: bool = True) -> list[str]:
        """One row's cells, in the file's columns; a result that cannot be written gets an error
        row instead (a worker's odd answer is this file's problem, not its message's)."""
        try:
            cells: dict[str, Any] = {
                "path": result.path,
                "digit": "" if result.digit is None else int(result.digit),
                "confidence": "" if result.confidence is None else f"{float(result.confidence):.4f}",
                "model_version": result.model_version or "",
                "error": result.error or "",
                "error_kind": ErrorKind(result.error_kind).value if result.error_kind else "",
                "id": result.id or "",
                "finished_at": finished_at,
                "moved_to": result.moved_to or "",
                "review": result.review or "",
            }
            return [cell(cells.get(c, "")) for c in self.columns]
        except Exception as e:
            if not first_try:
                raise
            log.warning("%s: its result could not be written (%s); it gets an error row", result.path, e)
            failed = Result.failed(
                result.path, ErrorKind.INTERNAL, f"internal error: unwritable result ({e})", result.id
            )
            failed.moved_to = result.moved_to
            return self._cells(failed, finished_at, first_try=False)

    def _rows(self, results: Sequence[Result]) -> bytes:
        """The rows of one message as one buffer: one clock read and one CSV writer for all."""
        finished_at = datetime.now(UTC).isoformat(timespec="milliseconds")
        buf = io.StringIO()
        csv.writer(buf, lineterminator="\r\n").writerows(self._cells(r, finished_at) for r in results)
        return buf.getvalue().encode("utf-8")

    def append(self, results: Sequence[Result]) -> list[Result]:
        """Append one row per result whose id has none yet, in one write and one fsync.

        Returns the results that got their row; raises OSError (nothing written) when the file
        cannot take them now.
        """
        with self._lock:
            rows: list[Result] = []
            ids: set[str] = set()
            done = self.done
            for r in results:
                if r.id and (r.id in done or r.id in ids):
                    continue
                rows.append(r)
                if r.id:
                    ids.add(r.id)
            if not rows:
                return []
            self._append(self._rows(rows))
            places = self.places
            for r in rows:
                moved = escape(r.moved_to or "")
                if r.id:
                    done[r.id] = moved
                places[escape(r.path)] = moved
            return rows

    def close(self) -> None:
        os.close(self._fd)

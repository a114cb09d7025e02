"""The CSV cell format that the writer (producer/csvsink.py) and the readers (report/tally.py,
report/sheet.py, producer/finish.py) share: any name as UTF-8, reversibly, and no cell a
spreadsheet would run as a formula. See producer/csvsink.py for the whole rule.
"""

from __future__ import annotations

import os
import re
from typing import Any

_FORMULA_START = ("=", "+", "-", "@", "\t", "\r")

_ESCAPED_BYTE = re.compile(rb"\\x([0-9a-f]{2})")  # how cells were read before backslashes doubled
#: a literal run of backslashes that would read as (part of) an escaped byte: before ``x`` and two
#: hex digits, or before a byte that is not UTF-8 (it becomes ``\xNN``)
_BEFORE_BYTE = re.compile(r"(\\+)(?=x[0-9a-f]{2}|[\udc80-\udcff])")
_RUN_BEFORE_X = re.compile(rb"(\\+)x([0-9a-f]{2})")


def escape(text: str) -> str:
    """``text`` as UTF-8 can hold it, reversibly: a name's non-UTF-8 bytes become ``\\xNN``, and
    a backslash of the name that would read as one (before ``x`` and two hex digits, or before
    such a byte) is doubled: ``bad\\xff.png`` is the byte, ``bad\\\\xff.png`` the four characters.

    Other lone surrogates (no filesystem name makes them; a worker's JSON could) become
    ``\\udNNN``.
    """
    if "\\" in text:
        text = _BEFORE_BYTE.sub(lambda m: m[1] * 2, text)
    return _bytes_escaped(text)


def _bytes_escaped(text: str) -> str:
    """``text`` with non-UTF-8 bytes as ``\\xNN``, backslashes as they are (so cells were
    written before the doubling; :func:`escapings` gives this too)."""
    if text.isascii():  # nearly every name: no encoding needed to know
        return text
    try:
        text.encode("utf-8")
        return text
    except UnicodeEncodeError:
        pass
    try:
        return text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
    except UnicodeEncodeError:
        return text.encode("utf-8", "backslashreplace").decode("utf-8")


def escapings(text: str) -> list[str]:
    """The cells ``text`` may have been written as: :func:`escape`'s, then, where it differs
    (a literal ``\\xNN`` in the name), an older version's, which did not double backslashes."""
    today, before = escape(text), _bytes_escaped(text)
    return [today] if today == before else [today, before]


def unescaped(cell: str) -> list[str]:
    """The paths a cell may stand for, the one :func:`escape` means first: in a run of
    backslashes before ``x`` and two hex digits, each pair is one backslash and an odd one
    left makes the byte. Then the readings of an older version's cell, whose backslashes were
    never doubled (a literal ``\\xNN``, or the byte): the cell itself, and every ``\\xNN`` as
    its byte."""
    raw = cell.encode("utf-8", "surrogateescape")
    if b"\\x" not in raw:
        return [cell]

    def run(m: re.Match[bytes]) -> bytes:
        pairs, byte = divmod(len(m[1]), 2)
        return b"\\" * pairs + (bytes([int(m[2], 16)]) if byte else b"x" + m[2])

    readings = [os.fsdecode(_RUN_BEFORE_X.sub(run, raw)), cell]
    readings.append(os.fsdecode(_ESCAPED_BYTE.sub(lambda m: bytes([int(m[1], 16)]), raw)))
    return list(dict.fromkeys(readings))


def neutralise(value: Any) -> Any:
    """Spreadsheets run cells starting with = + - @ as formulas; a leading ' makes them text."""
    if isinstance(value, str) and value.startswith(_FORMULA_START):
        return "'" + value
    return value


def cell(value: object) -> str:
    """``neutralise(escape(str(value)))``, in one call per cell."""
    text = value if type(value) is str else str(value)
    if not text.isascii() or "\\" in text:
        text = escape(text)
    return "'" + text if text.startswith(_FORMULA_START) else text


def uncell(value: str) -> str:
    """A cell read back, less the ' that neutralise added: what ``escape`` gave."""
    if value.startswith("'") and value[1:].startswith(_FORMULA_START):
        return value[1:]
    return value

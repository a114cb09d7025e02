"""The results CSV: formulas, the ledger, torn rows, older and foreign headers."""

from __future__ import annotations

import csv
import errno
import io
import os
from pathlib import Path

import pytest

from mnistq.csvcell import escape, escapings, unescaped
from mnistq.errors import ConfigError
from mnistq.protocol import CSV_COLUMNS, ErrorKind, Result
from producer.csvsink import CsvSink

OLD_HEADER = "path,digit,confidence,model_version,error,id,finished_at"


def read_rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def ok(path: str, file_id: str, digit: int = 1) -> Result:
    return Result(path=path, id=file_id, digit=digit, confidence=0.9, model_version="v")


def test_formulas_are_neutralised_and_an_id_gets_one_row(tmp_path: Path) -> None:
    out = tmp_path / "r.csv"
    sink = CsvSink(out)
    assert sink.append([Result(path="=HYPERLINK(1)", id="a", error="@x", error_kind=ErrorKind.UNREADABLE)])
    assert not sink.append([ok("again", "a")])  # same file id: no second row
    sink.close()
    rows = read_rows(out)
    assert list(rows[0]) == list(CSV_COLUMNS)
    assert [(r["path"], r["error"], r["error_kind"]) for r in rows] == [
        ("'=HYPERLINK(1)", "'@x", "unreadable")
    ]


def test_a_file_written_with_plain_newlines_is_kept(tmp_path: Path) -> None:
    out = tmp_path / "r.csv"
    out.write_text(f"{OLD_HEADER}\n/a.png,1,0.9,v,,x1,t\n")
    sink = CsvSink(out)
    assert set(sink.done) == {"x1"}
    sink.close()
    assert [r["path"] for r in read_rows(out)] == ["/a.png"]


def _row(result: Result) -> bytes:
    buf = io.StringIO()
    csv.writer(buf, lineterminator="\r\n").writerow(
        [result.path, result.digit, "0.9000", "v", "", "", result.id, "t"]
    )
    return buf.getvalue().encode()


TORN = _row(ok("/in/torn\nrow.png", "t", 7))  # a quoted path with a newline in it


@pytest.mark.parametrize("cut", range(1, len(TORN)))
def test_a_row_torn_anywhere_even_inside_a_quoted_path_is_dropped_alone(tmp_path: Path, cut: int) -> None:
    out = tmp_path / "r.csv"
    sink = CsvSink(out)
    sink.append([ok("/in/with\nnewline.png", "a")])  # whole rows with quoted newlines stay
    sink.append([ok('/in/quo"te.png', "b")])
    sink.close()
    with open(out, "ab") as f:
        f.write(TORN[:cut])  # what a machine crash mid-write could leave
    sink = CsvSink(out)
    assert set(sink.done) == {"a", "b"}
    sink.append([ok("/in/c.png", "c")])
    sink.close()
    assert [(r["path"], r["id"]) for r in read_rows(out)] == [
        ("/in/with\nnewline.png", "a"),
        ('/in/quo"te.png', "b"),
        ("/in/c.png", "c"),
    ]


def test_a_torn_header_is_written_again(tmp_path: Path) -> None:
    out = tmp_path / "r.csv"
    out.write_bytes(",".join(CSV_COLUMNS).encode()[:11])
    sink = CsvSink(out)
    sink.append([ok("/in/a.png", "a")])
    sink.close()
    assert [r["id"] for r in read_rows(out)] == ["a"]
    assert out.read_bytes().startswith(",".join(CSV_COLUMNS).encode() + b"\r\n")


def test_an_older_header_is_kept_and_rows_go_under_it_with_its_columns(tmp_path: Path) -> None:
    out = tmp_path / "r.csv"
    out.write_bytes(f"{OLD_HEADER}\r\n/in/old.png,2,0.9000,v,,o,t\r\n".encode())
    sink = CsvSink(out)
    assert set(sink.done) == {"o"}
    sink.append([Result.failed("/in/bad.png", ErrorKind.TOO_LARGE, "too large", "n")])
    sink.close()
    text = out.read_text()
    assert text.splitlines()[0] == OLD_HEADER and "error_kind" not in text
    rows = read_rows(out)
    assert [list(r) for r in rows] == [OLD_HEADER.split(",")] * 2
    assert [(r["path"], r["error"], r["id"]) for r in rows] == [
        ("/in/old.png", "", "o"),
        ("/in/bad.png", "too large", "n"),
    ]


@pytest.mark.parametrize(
    "content",
    [b"name,score\r\nalice,3\r\n", b"just some notes, no header", b"path,score\n/x,1\n"],
    ids=["other_csv", "no_newline", "no_id_column"],
)
def test_a_foreign_file_is_refused_and_left_untouched(tmp_path: Path, content: bytes) -> None:
    out = tmp_path / "theirs.csv"
    out.write_bytes(content)
    with pytest.raises(ConfigError, match=r"theirs\.csv"):
        CsvSink(out)
    assert out.read_bytes() == content


def test_names_that_are_not_utf8_are_escaped_and_read_back_both_ways() -> None:
    raw = os.fsdecode(b"/in/bad\xff.png")
    assert escape(raw) == "/in/bad\\xff.png" and escape("/in/ünï.png") == "/in/ünï.png"
    assert unescaped(escape(raw)) == [raw, "/in/bad\\xff.png"]  # what it means first, then as it reads
    assert escape("lone \ud800") == "lone \\ud800"  # not from a filesystem: escaped all the same
    assert unescaped("/in/plain.png") == ["/in/plain.png"]


NAMES = [b"bad\xff.png", b"bad\\xff.png", b"bad\\\xff.png", b"bad\\\\xff.png", b"a\\\xff.png"]
NAMES += [b"a\\x4.png", b"a\\xFF.png", b"c:\\new\\x.png", b"\\\\\xfe\\x00.png", b"\xc3\xa9\\xc3.png"]


@pytest.mark.parametrize("name", NAMES, ids=lambda n: repr(n)[2:-1])
def test_escaping_is_reversible(name: bytes) -> None:
    """A byte that is not UTF-8 and the four characters \\xNN get different cells, and each cell
    reads back as its own name first (a backslash before x and two hex digits is doubled)."""
    path = os.fsdecode(b"/in/" + name)
    cell = escape(path)
    cell.encode("utf-8")  # a cell is UTF-8
    assert unescaped(cell)[0] == path
    others = [os.fsdecode(b"/in/" + n) for n in NAMES if n != name]
    assert cell not in {escape(o) for o in others}


def test_a_literal_backslash_x_name_is_not_the_byte_and_old_cells_read_both_ways() -> None:
    byte, literal = os.fsdecode(b"/in/bad\xff.png"), "/in/bad\\xff.png"
    assert escape(byte) == "/in/bad\\xff.png" and escape(literal) == "/in/bad\\\\xff.png"
    assert unescaped(escape(literal)) == [literal, "/in/bad\\\\xff.png", "/in/bad\\" + byte[7:]]
    # a cell an older version wrote, before backslashes were doubled: either name
    assert set(unescaped("/in/bad\\xff.png")) == {byte, literal}
    assert escapings(literal) == ["/in/bad\\\\xff.png", literal] and escapings(byte) == [escape(byte)]


def test_a_message_is_one_write_and_the_ledger_keeps_where_files_went(tmp_path: Path) -> None:
    out = tmp_path / "r.csv"
    sink = CsvSink(out)
    bad = os.fsdecode(b"/in/bad\xff.png")
    written = sink.append(
        [
            Result(path="/in/a.png", id="a", digit=1, confidence=0.9, moved_to="/done/a.png"),
            Result(path=bad, id="b", digit=2, confidence=0.9, moved_to=os.fsdecode(b"/done/bad\xff.png")),
            Result(path="/in/a.png", id="a", digit=1),  # the same file twice: one row
        ]
    )
    assert [r.id for r in written] == ["a", "b"]
    sink.close()
    sink = CsvSink(out)
    assert sink.done == {"a": "/done/a.png", "b": "/done/bad\\xff.png"}
    assert sink.places == {"/in/a.png": "/done/a.png", "/in/bad\\xff.png": "/done/bad\\xff.png"}
    sink.close()
    assert [(r["path"], r["moved_to"]) for r in read_rows(out)] == [
        ("/in/a.png", "/done/a.png"),
        ("/in/bad\\xff.png", "/done/bad\\xff.png"),
    ]


def test_a_failed_write_is_taken_back_and_a_failed_take_back_is_finished_first(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = tmp_path / "r.csv"
    sink = CsvSink(out)
    sink.append([ok("/in/a.png", "a")])
    whole = out.read_bytes()
    real_write, real_truncate = os.write, os.ftruncate

    def short_then_full(fd: int, data: bytes) -> int:
        if len(data) > 40:
            return real_write(fd, bytes(data)[:40])
        raise OSError(errno.ENOSPC, "No space left on device")

    def cannot_truncate(fd: int, n: int) -> None:
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(os, "write", short_then_full)
    with pytest.raises(OSError, match="No space"):
        sink.append([ok("/in/b.png", "b")])
    assert out.read_bytes() == whole and set(sink.done) == {"a"}  # taken back
    monkeypatch.setattr(os, "ftruncate", cannot_truncate)
    with pytest.raises(OSError, match="No space"):
        sink.append([ok("/in/b.png", "b")])
    assert len(out.read_bytes()) == len(whole) + 40  # torn, for now
    monkeypatch.setattr(os, "write", real_write)
    with pytest.raises(OSError, match="Input/output"):
        sink.append([ok("/in/b.png", "b")])  # the torn bytes must go first; they cannot yet
    monkeypatch.setattr(os, "ftruncate", real_truncate)
    assert sink.append([ok("/in/b.png", "b")])
    sink.close()
    assert [r["id"] for r in read_rows(out)] == ["a", "b"]


def test_an_older_header_without_moved_to_gets_rows_without_it(tmp_path: Path) -> None:
    out = tmp_path / "r.csv"
    header = ",".join(c for c in CSV_COLUMNS if c != "moved_to")
    out.write_text(header + "\r\n")
    sink = CsvSink(out)
    sink.append([Result(path="/in/a.png", id="a", digit=1, moved_to="/done/a.png")])
    sink.close()
    assert out.read_text().splitlines()[0] == header
    assert [(r["id"], "moved_to" in r) for r in read_rows(out)] == [("a", False)]


def _ledger_of(out: Path, n: int) -> list[bytes]:
    """A results file of ``n`` whole rows, as its lines."""
    sink = CsvSink(out)
    sink.append([ok(f"/in/{i}.png", f"id{i}") for i in range(n)])
    sink.close()
    return out.read_bytes().splitlines(keepends=True)


def _edit(line: bytes, note: bytes) -> bytes:
    """``line`` with ``note`` put in its error cell, as a person in a text editor would."""
    cells = line.split(b",")
    cells[CSV_COLUMNS.index("error")] = note
    return b",".join(cells)


@pytest.mark.parametrize("note", [b'note: "check this', b'"check this', b'"check, this'])
@pytest.mark.parametrize("at", [500, 2000])  # mid-file, and the last row
def test_a_quote_typed_into_a_cell_loses_no_row(tmp_path: Path, note: bytes, at: int) -> None:
    out = tmp_path / "r.csv"
    lines = _ledger_of(out, 2000)
    lines[at] = _edit(lines[at], note)
    edited = b"".join(lines)
    out.write_bytes(edited)
    sink = CsvSink(out)
    # every file keeps its row; the edited row's own cells cannot be told apart when the note
    # holds a comma too, so only its id may be missing from what is read back
    unsure = {f"id{at - 1}"} if b"," in note else set()
    assert set(sink.done) | unsure == {f"id{i}" for i in range(2000)}
    assert out.read_bytes() == edited  # nothing cut
    assert not sink.append([ok("/in/7.png", "id7")])  # and none gets a second
    sink.append([ok(f"/in/new{i}.png", f"new{i}") for i in range(500)])
    sink.close()
    again = CsvSink(out)  # the next start reads all of it too
    assert len(again.done | dict.fromkeys(unsure)) == 2500 and again.places["/in/new499.png"] == ""
    again.close()
    assert out.read_bytes().startswith(edited)


def test_after_a_quote_typed_by_hand_a_torn_row_is_still_cut_alone(tmp_path: Path) -> None:
    out = tmp_path / "r.csv"
    lines = _ledger_of(out, 30)
    lines[10] = _edit(lines[10], b'"check this')
    out.write_bytes(b"".join(lines) + TORN[:25])
    sink = CsvSink(out)
    assert set(sink.done) == {f"id{i}" for i in range(30)}
    sink.close()
    assert out.read_bytes() == b"".join(lines)


def test_an_unfinished_end_longer_than_a_row_stops_the_start_and_is_kept(tmp_path: Path) -> None:
    out = tmp_path / "r.csv"
    lines = _ledger_of(out, 3)
    # a quote opened by hand, then lines that are no rows: more than a torn write could leave
    damaged = b"".join(lines) + b'"a note\r\n' + b"x" * 70_000 + b"\r\n"
    out.write_bytes(damaged)
    with pytest.raises(ConfigError, match=r"line 5 .* nothing is cut"):
        CsvSink(out)
    assert out.read_bytes() == damaged


def test_the_report_counts_every_row_of_a_hand_edited_csv(tmp_path: Path) -> None:
    from report.tally import read

    out = tmp_path / "r.csv"
    lines = _ledger_of(out, 70)
    lines[20] = _edit(lines[20], b'"check this')  # a reader runs the quote on to the end
    out.write_bytes(b"".join(lines))
    tally, header = read(out)
    assert header == CSV_COLUMNS and tally.rows == 70

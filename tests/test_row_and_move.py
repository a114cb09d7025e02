"""The row-and-move rule (producer/finish.py): place, one row write, remove; crashes between the
steps; names any filesystem holds; a disk that refuses; the review folder. Fake broker, real
files, a real CSV."""

from __future__ import annotations

import csv
import errno
import logging
import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import pytest
from conftest import no_dac
from test_dispatch import Setup, answer

import producer.finish
from mnistq.folders import Folders
from mnistq.protocol import CSV_COLUMNS, ErrorKind, Reply, Result
from mnistq.safeopen import open_folder
from producer import inbox
from producer.csvsink import CsvSink
from producer.dispatch import Dispatcher
from producer.options import WatchOptions

pytestmark = pytest.mark.timeout(60)


class Crash(BaseException):
    """The producer dying between two steps (nothing after it runs)."""


def dies_in(monkeypatch: pytest.MonkeyPatch, owner: object, name: str, step: Callable[[], object]) -> None:
    """Run ``step`` with ``owner.name`` killing the producer (Crash): what it left stays as is."""

    def crash(*_: object) -> None:
        raise Crash

    with monkeypatch.context() as m:
        m.setattr(owner, name, crash)
        with pytest.raises(Crash):
            step()


def read_rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def restart(s: Setup) -> Dispatcher:
    """A new producer on the same inbox, CSV and folders."""
    s.sink.close()
    s.sink = CsvSink(s.csv)
    s.dispatch = Dispatcher(s.broker, s.sink, WatchOptions(Folders.of(s.inbox, s.csv, s.done, s.failed)))
    return s.dispatch


def scan(s: Setup) -> list[str]:
    """What a rescan would take in: the inbox files without a row (their rows' entries removed)."""
    left = []
    for p in sorted(s.inbox.iterdir()):
        if not s.dispatch.already_done(str(p), os.lstat(p)):
            left.append(str(p))
    return left


def test_rows_name_the_final_place_and_the_file_is_there(tmp_path: Path) -> None:
    s = Setup(tmp_path, 3)
    s.done.mkdir()
    (s.done / "f0.png").write_bytes(b"an earlier f0.png, not to be overwritten")
    contents = {p: Path(p).read_bytes() for p in s.paths}
    s.dispatch.send(s.paths)
    task_id, paths, ids = s.broker.sent[0]
    results = answer(s.broker.sent[0]).results
    results[2] = Result.failed(paths[2], ErrorKind.UNREADABLE, "not an image", ids[2])
    s.dispatch.on_reply(Reply(task_id, results))
    rows = {r["path"]: r for r in s.rows()}
    assert rows[paths[0]]["moved_to"] == str(s.done / f"f0.{ids[0][:8]}.png")  # the name was taken
    assert rows[paths[1]]["moved_to"] == str(s.done / "f1.png")
    assert rows[paths[2]]["moved_to"] == str(s.failed / "f2.png")
    for path, row in rows.items():
        assert Path(row["moved_to"]).read_bytes() == contents[path]
    assert (s.done / "f0.png").read_bytes().startswith(b"an earlier")
    assert list(s.inbox.iterdir()) == [] and s.dispatch.idle


def test_with_keep_files_stay_and_moved_to_is_empty(tmp_path: Path) -> None:
    s = Setup(tmp_path, 2, keep=True)
    s.dispatch.send(s.paths)
    s.dispatch.on_reply(answer(s.broker.sent[0]))
    assert [r["moved_to"] for r in s.rows()] == ["", ""]
    assert all(Path(p).exists() for p in s.paths) and not s.done.exists()
    # A later run without --keep: their rows say they stay, so they do (the CSV stays true).
    restart(s)
    assert scan(s) == []
    assert all(Path(p).exists() for p in s.paths) and not s.done.exists()


def test_a_crash_between_link_and_row_redoes_each_file_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    s = Setup(tmp_path, 3)
    s.dispatch.send(s.paths)

    dies_in(monkeypatch, CsvSink, "append", lambda: s.dispatch.on_reply(answer(s.broker.sent[0])))
    # What the dead run left: links in done/, no rows, every file still in the inbox.
    assert sorted(p.name for p in s.done.iterdir()) == ["f0.png", "f1.png", "f2.png"]
    assert read_rows(s.csv) == [] and len(list(s.inbox.iterdir())) == 3
    d = restart(s)
    todo = scan(s)
    assert todo == s.paths  # no row: redone (linking changed their ctime, so their ids)
    d.send(todo)
    d.on_reply(answer(s.broker.sent[-1]))
    rows = read_rows(s.csv)
    assert sorted(r["path"] for r in rows) == s.paths
    assert [r["moved_to"] for r in rows] == [str(s.done / f"f{i}.png") for i in range(3)]
    assert sorted(p.name for p in s.done.iterdir()) == ["f0.png", "f1.png", "f2.png"]  # reused
    assert list(s.inbox.iterdir()) == []


def test_a_crash_between_row_and_removal_removes_the_entry_on_restart(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    s = Setup(tmp_path, 3)
    s.dispatch.send(s.paths)

    dies_in(monkeypatch, producer.finish, "remove", lambda: s.dispatch.on_reply(answer(s.broker.sent[0])))
    assert len(read_rows(s.csv)) == 3 and len(list(s.inbox.iterdir())) == 3
    restart(s)
    assert scan(s) == []  # each has its row: its inbox entry goes, nothing is sent
    assert list(s.inbox.iterdir()) == []
    rows = read_rows(s.csv)
    assert len(rows) == 3 and all(Path(r["moved_to"]).exists() for r in rows)


def test_an_unremovable_entry_gets_one_row_and_one_warning(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    s = Setup(tmp_path, 2)
    stuck = s.paths[0]
    real_unlink = os.unlink

    def unlink(path: object, *args: object, **kw: object) -> None:
        if os.fspath(path) == stuck:  # type: ignore[call-overload]
            raise PermissionError(errno.EPERM, "Operation not permitted", stuck)
        real_unlink(path, *args, **kw)  # type: ignore[arg-type]

    monkeypatch.setattr(os, "unlink", unlink)
    with caplog.at_level(logging.WARNING, logger="mnistq.producer"):
        s.dispatch.send(s.paths)
        s.dispatch.on_reply(answer(s.broker.sent[0]))
        for _ in range(5):  # rescans, every 30 s in a real run
            assert scan(s) == []
        s.dispatch.send([stuck])  # a late event for it: no second row
    assert len(s.broker.sent) == 1
    assert [r["path"] for r in s.rows()] == s.paths
    assert [m for m in caplog.messages if stuck in m] == [
        f"could not remove {stuck} from the inbox ([Errno 1] Operation not permitted: '{stuck}'); "
        f"its row is written and it is in {s.done / 'f0.png'}"
    ]
    assert os.listdir(s.inbox) == ["f0.png"]


def test_a_symlink_leaves_the_inbox_its_target_stays(tmp_path: Path) -> None:
    s = Setup(tmp_path)
    outside = tmp_path / "target.png"
    outside.write_bytes(b"image")
    link = s.inbox / "link.png"
    link.symlink_to(outside)
    s.dispatch.send([str(link)])
    task_id, paths, ids = s.broker.sent[0]
    s.dispatch.on_reply(Reply(task_id, [Result.failed(paths[0], ErrorKind.REFUSED, "a symlink", ids[0])]))
    [row] = s.rows()
    assert row["moved_to"] == str(s.failed / "link.png")
    assert not os.path.lexists(link) and outside.read_bytes() == b"image"
    assert os.readlink(s.failed / "link.png") == str(outside)


def test_a_name_that_is_not_utf8_gets_its_row_and_its_message_is_unaffected(tmp_path: Path) -> None:
    s = Setup(tmp_path, 3)
    bad = s.make(os.fsdecode(b"bad\xff.png"))
    s.dispatch.send([*s.paths, bad])
    task_id, _, ids = s.broker.sent[0]
    results = answer(s.broker.sent[0]).results
    results[3] = Result.failed(bad, ErrorKind.UNREADABLE, f"cannot read {bad}", ids[3])
    s.dispatch.on_reply(Reply(task_id, results))
    rows = s.rows()
    assert [r["path"] for r in rows] == [*s.paths, str(s.inbox / "bad\\xff.png")]
    assert rows[3]["moved_to"] == str(s.failed / "bad\\xff.png")
    assert rows[3]["error"] == f"cannot read {s.inbox / 'bad'}\\xff.png"
    assert os.listdir(os.fsencode(s.failed)) == [b"bad\xff.png"]
    assert list(s.inbox.iterdir()) == []


def test_a_result_that_cannot_be_written_is_that_files_error_row(tmp_path: Path) -> None:
    s = Setup(tmp_path, 3)
    s.dispatch.send(s.paths)
    task_id, _, _ = s.broker.sent[0]
    results = answer(s.broker.sent[0]).results
    results[1].confidence = "very"  # type: ignore[assignment]  # a worker's odd answer
    s.dispatch.on_reply(Reply(task_id, results))
    rows = s.rows()
    assert [(r["digit"], r["error_kind"]) for r in rows] == [("3", ""), ("", "internal"), ("3", "")]
    assert "unwritable result" in rows[1]["error"] and rows[1]["moved_to"] == str(s.done / "f1.png")


class FullDisk:
    """os.write for the CSV: a short write, then ENOSPC, until ``space`` is set."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, fd: int) -> None:
        self.space, self.fd, self.calls = False, fd, 0
        self.real = os.write
        monkeypatch.setattr(os, "write", self)

    def __call__(self, fd: int, data: bytes) -> int:
        if fd != self.fd or self.space:
            return self.real(fd, data)
        self.calls += 1
        if self.calls % 2:
            return self.real(fd, bytes(data)[: len(data) // 2])  # what fits
        raise OSError(errno.ENOSPC, "No space left on device")


def test_a_full_disk_pauses_intake_and_resumes_with_nothing_lost_or_torn(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    s = Setup(tmp_path, 4, message_size=2, retry_s=2.0)
    s.dispatch.finisher.clock = s.clock
    before = s.csv.read_bytes()
    s.dispatch.send(s.paths)
    disk = FullDisk(monkeypatch, s.sink._fd)
    with caplog.at_level(logging.INFO, logger="mnistq.producer"):
        s.dispatch.on_reply(answer(s.broker.sent[0]))
        s.dispatch.on_reply(answer(s.broker.sent[1]))  # waits behind the first
        assert s.csv.read_bytes() == before  # the half row was taken back
        assert s.dispatch.room() == 0 and s.dispatch.finisher.waiting() == 4
        assert len(list(s.inbox.iterdir())) == 4 and not any(s.done.glob("*"))
        for t in (1.0, 2.5, 5.0):
            s.clock.t = t
            assert s.dispatch.tick() == []
        assert s.csv.read_bytes() == before and disk.calls == 6
        disk.space = True
        s.clock.t = 7.5
        s.dispatch.tick()
    assert s.dispatch.room() > 0 and s.dispatch.idle
    rows = s.rows()
    assert sorted(r["path"] for r in rows) == s.paths and all(Path(r["moved_to"]).exists() for r in rows)
    assert list(s.inbox.iterdir()) == []
    said = [m for m in caplog.messages if "paused" in m or "resumed" in m]
    assert len(said) == 2
    assert said[0].startswith(f"cannot write {s.csv}: No space left on device; intake paused")
    assert said[1].startswith("results can be written again after")


def test_files_are_copied_across_filesystems_and_a_full_target_pauses(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    s = Setup(tmp_path, 2, retry_s=0.0)
    real_link = os.link
    full = {"on": True}

    def link(src: object, dst: object, **kw: object) -> None:
        if Path(os.fspath(src)).parent == s.inbox:  # type: ignore[call-overload]
            raise OSError(errno.EXDEV, "Invalid cross-device link")
        if full["on"]:
            raise OSError(errno.ENOSPC, "No space left on device")
        real_link(src, dst, **kw)  # type: ignore[arg-type]

    monkeypatch.setattr(os, "link", link)
    s.dispatch.send(s.paths)
    s.dispatch.on_reply(answer(s.broker.sent[0]))
    assert s.dispatch.finisher.paused and read_rows(s.csv) == []
    assert len(list(s.inbox.iterdir())) == 2 and list(s.done.iterdir()) == []  # no .part left
    full["on"] = False
    s.dispatch.tick()
    rows = s.rows()
    assert [Path(r["moved_to"]).read_bytes() for r in rows] == [b"image", b"image"]
    assert [Path(r["moved_to"]).name for r in rows] == ["f0.png", "f1.png"]
    assert list(s.inbox.iterdir()) == []


def test_an_unexpected_failure_hands_the_files_back_to_be_redone(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    s = Setup(tmp_path, 2)
    s.dispatch.send(s.paths)

    def bug(*_: object) -> None:
        raise ValueError("a bug")

    with monkeypatch.context() as m, caplog.at_level(logging.ERROR, logger="mnistq.producer"):
        m.setattr(CsvSink, "append", bug)
        s.dispatch.on_reply(answer(s.broker.sent[0]))
    assert any("could not be written; they are redone" in m for m in caplog.messages)
    assert s.dispatch.idle and not s.dispatch.finisher.paused and read_rows(s.csv) == []
    todo = scan(s)  # the next rescan finds them (linking changed their ids: sent as new)
    assert todo == s.paths
    s.dispatch.send(todo)
    s.dispatch.on_reply(answer(s.broker.sent[-1]))
    assert [r["path"] for r in s.rows()] == s.paths and list(s.inbox.iterdir()) == []
    assert sorted(p.name for p in s.done.iterdir()) == ["f0.png", "f1.png"]


# --- the review folder: the same rule, another place --------------------------------------------


def _reviewed(task: tuple[str, list[str], list[str]], reasons: list[str | None]) -> Reply:
    """A worker's answer with these review reasons (None: not sent to review)."""
    reply = answer(task)
    for r, why in zip(reply.results, reasons, strict=True):
        r.review = why
    return reply


def test_a_file_sent_to_review_goes_to_review_and_its_row_says_why(tmp_path: Path) -> None:
    s = Setup(tmp_path, 4)
    review = tmp_path / "review"  # beside done/
    review.mkdir()
    (review / "f1.png").write_bytes(b"an earlier f1.png, not to be overwritten")
    s.dispatch.send(s.paths)
    _, paths, ids = s.broker.sent[0]
    reply = _reviewed(s.broker.sent[0], ["low confidence", "not a digit", None, "low confidence"])
    # an error result goes to failed/, whatever else it says (a worker never sets both)
    reply.results[3] = replace(Result.failed(paths[3], ErrorKind.NO_DIGIT, "no digit", ids[3]), review="x")
    s.dispatch.on_reply(reply)
    rows = s.rows()
    assert [r["moved_to"] for r in rows] == [
        str(review / "f0.png"),
        str(review / f"f1.{ids[1][:8]}.png"),  # the name was taken: the same collision rule
        str(s.done / "f2.png"),
        str(s.failed / "f3.png"),
    ]
    assert [r["review"] for r in rows] == ["low confidence", "not a digit", "", "x"]
    assert [r["digit"] for r in rows] == ["3", "3", "3", ""]  # still classified
    assert all(Path(r["moved_to"]).read_bytes() == b"image" for r in rows)
    assert list(s.inbox.iterdir()) == [] and s.dispatch.idle


def test_a_crash_at_any_step_leaves_each_reviewed_file_one_row_in_review(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    s = Setup(tmp_path, 4)
    review = tmp_path / "review"
    reasons: list[str | None] = ["low confidence", None, "not a digit", None]

    # Killed after linking, before the row: redone, the link in review/ reused.
    s.dispatch.send(s.paths[:2])
    dies_in(
        monkeypatch, CsvSink, "append", lambda: s.dispatch.on_reply(_reviewed(s.broker.sent[-1], reasons[:2]))
    )
    assert read_rows(s.csv) == [] and (review / "f0.png").exists()
    d = restart(s)
    assert scan(s) == s.paths  # f0, f1 without rows; f2, f3 never sent
    d.send(s.paths[:2])
    d.on_reply(_reviewed(s.broker.sent[-1], reasons[:2]))
    # Killed after the rows, before the inbox entries went: they go on the next scan.
    d.send(s.paths[2:])
    dies_in(
        monkeypatch, producer.finish, "remove", lambda: d.on_reply(_reviewed(s.broker.sent[-1], reasons[2:]))
    )
    restart(s)
    assert scan(s) == []
    rows = {Path(r["path"]).name: r for r in read_rows(s.csv)}
    assert {n: r["review"] for n, r in rows.items()} == {
        "f0.png": "low confidence", "f1.png": "", "f2.png": "not a digit", "f3.png": "",
    }  # fmt: skip
    assert all(Path(r["moved_to"]).exists() for r in rows.values())
    assert sorted(p.name for p in review.iterdir()) == ["f0.png", "f2.png"]
    assert sorted(p.name for p in s.done.iterdir()) == ["f1.png", "f3.png"]
    assert list(s.inbox.iterdir()) == []


def test_a_crash_before_the_row_leaves_no_link_where_the_redo_does_not_go(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Killed after linking into review/, before the row; the redo's answer differs (another
    --review-below, or a new model): the file ends in done/ only, not also in review/. And a
    name that carried the file id (f1.png was taken) is not left behind under the old id."""
    s = Setup(tmp_path, 2)
    review = tmp_path / "review"
    review.mkdir()
    (review / "f1.png").write_bytes(b"an earlier f1.png, not to be overwritten")
    s.dispatch.send(s.paths)

    dies_in(
        monkeypatch,
        CsvSink,
        "append",
        lambda: s.dispatch.on_reply(_reviewed(s.broker.sent[-1], ["low confidence", "low confidence"])),
    )
    assert len(list(review.iterdir())) == 3  # f0.png, the earlier f1.png, f1.<id>.png
    d = restart(s)
    d.send(scan(s))
    d.on_reply(_reviewed(s.broker.sent[-1], [None, "low confidence"]))
    rows = {Path(r["path"]).name: r["moved_to"] for r in read_rows(s.csv)}
    assert rows["f0.png"] == str(s.done / "f0.png")
    assert Path(rows["f1.png"]).parent == review
    # every file in the output folders is named by a row, or was there before
    left = {str(p) for f in (review, s.done) for p in f.iterdir()}
    assert left == {rows["f0.png"], rows["f1.png"], str(review / "f1.png")}
    assert (review / "f1.png").read_bytes().startswith(b"an earlier")
    assert list(s.inbox.iterdir()) == []


def test_a_stray_link_left_past_the_row_goes_with_the_inbox_entry(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Killed after the row, before the strays and the inbox entry went: the next scan removes
    both (the row stands, one row)."""
    s = Setup(tmp_path, 1)
    review = tmp_path / "review"
    review.mkdir()
    os.link(s.paths[0], review / "f0.png")  # as a run killed before its row left it
    s.dispatch.send(s.paths)

    dies_in(
        monkeypatch, producer.finish, "unlink_strays", lambda: s.dispatch.on_reply(answer(s.broker.sent[-1]))
    )
    assert (review / "f0.png").exists() and Path(s.paths[0]).exists()
    restart(s)
    assert scan(s) == []
    assert [r["moved_to"] for r in read_rows(s.csv)] == [str(s.done / "f0.png")]
    assert list(review.iterdir()) == [] and list(s.inbox.iterdir()) == []


def test_files_whose_inbox_was_renamed_away_get_no_row_until_they_are_back(tmp_path: Path) -> None:
    """Inbox renamed mid-burst, a new one made at its path: no not_found row, no row naming no
    place, for files that still exist; moved back, each gets its one row (issue 25, 17)."""
    s = Setup(tmp_path, 3)
    s.dispatch.send(s.paths)
    away = tmp_path / "inbox.away"
    os.rename(s.inbox, away)
    s.inbox.mkdir()  # a new folder there, holding another f2.png
    (s.inbox / "f2.png").write_bytes(b"another file")
    task_id, paths, ids = s.broker.sent[0]
    results = answer(s.broker.sent[0]).results  # f0, f2 read before the rename
    results[1] = Result.failed(paths[1], ErrorKind.NOT_FOUND, "file not found", ids[1])  # after
    s.dispatch.on_reply(Reply(task_id, results))
    assert read_rows(s.csv) == [] and s.dispatch.idle
    assert sorted(p.name for p in away.iterdir()) == ["f0.png", "f1.png", "f2.png"]
    assert s.replaced == [paths[2]]  # the new folder's f2.png is new work
    # Moved back: read again, one row each, every one naming where its file is.
    shutil.rmtree(s.inbox)
    os.rename(away, s.inbox)
    d = restart(s)
    d.send(scan(s))
    d.on_reply(answer(s.broker.sent[-1]))
    rows = read_rows(s.csv)
    assert sorted(Path(r["path"]).name for r in rows) == ["f0.png", "f1.png", "f2.png"]
    assert all(r["error_kind"] == "" and Path(r["moved_to"]).exists() for r in rows)


def test_files_whose_folder_moved_within_the_inbox_get_their_row_at_the_new_place(tmp_path: Path) -> None:
    s = Setup(tmp_path)
    (s.inbox / "sub").mkdir()
    path = s.make("sub/x.png")
    s.dispatch.send([path])
    os.rename(s.inbox / "sub", s.inbox / "sub2")  # in flight: the worker found no file
    task_id, _, ids = s.broker.sent[0]
    s.dispatch.on_reply(Reply(task_id, [Result.failed(path, ErrorKind.NOT_FOUND, "file not found", ids[0])]))
    assert read_rows(s.csv) == [] and s.dispatch.idle
    s.dispatch.send([str(s.inbox / "sub2" / "x.png")])
    s.dispatch.on_reply(answer(s.broker.sent[-1]))
    assert [(r["path"], r["moved_to"]) for r in read_rows(s.csv)] == [
        (str(s.inbox / "sub2" / "x.png"), str(s.done / "sub2" / "x.png"))
    ]


@pytest.mark.system
def test_an_answer_for_a_file_a_permission_hides_writes_no_row_until_it_is_back(tmp_path: Path) -> None:
    """Read by the worker, then its folder set to mode 000 before the answer: no row naming no
    place; the row once it can be read (issue 25, 17). Run as a process whose permissions hold."""
    script = """
import sys
from pathlib import Path
from test_dispatch import Setup, answer
s = Setup(Path(sys.argv[1]))
(s.inbox / "sub").mkdir()
path = s.make("sub/x.png")
s.dispatch.send([path])
(s.inbox / "sub").chmod(0)
s.dispatch.on_reply(answer(s.broker.sent[0]))
print(len(s.rows()), s.dispatch.idle)
(s.inbox / "sub").chmod(0o755)
s.dispatch.send([path])
s.dispatch.on_reply(answer(s.broker.sent[-1]))
print([r["moved_to"] for r in s.rows()])
"""
    tests = str(Path(__file__).parent)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([tests, os.environ.get("PYTHONPATH", "")])}
    out = subprocess.run(
        [*no_dac(), sys.executable, "-c", script, str(tmp_path)],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines() == ["0 True", str([str(tmp_path / "done" / "sub" / "x.png")])], out.stdout
    assert "cannot read" in out.stderr and "(permission denied)" in out.stderr


def test_links_planted_in_the_output_folders_are_not_followed(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """done/sub, failed/ and then done/ itself as symbolic links to a folder outside, planted
    mid-run (after the start's checks): nothing goes through them. Each file gets its row,
    which says it stays (moved_to empty), and one warning naming the link."""
    s = Setup(tmp_path)
    (s.inbox / "sub").mkdir()
    y, z = s.make("sub/y.png"), s.make("z.png")
    outside = tmp_path / "outside"
    outside.mkdir()
    s.done.mkdir()
    (s.done / "sub").symlink_to(outside)
    s.failed.symlink_to(outside)
    s.dispatch.send([y, z])
    task_id, paths, ids = s.broker.sent[0]
    results = answer(s.broker.sent[0]).results
    results[paths.index(z)] = Result.failed(z, ErrorKind.UNREADABLE, "not an image", ids[paths.index(z)])
    with caplog.at_level(logging.WARNING, logger="mnistq.producer"):
        s.dispatch.on_reply(Reply(task_id, results))
        shutil.rmtree(s.done)
        s.done.symlink_to(outside)
        w = s.make("w.png")
        s.dispatch.send([w])
        s.dispatch.on_reply(answer(s.broker.sent[-1]))
    assert {r["path"]: r["moved_to"] for r in s.rows()} == {y: "", z: "", w: ""}
    assert list(outside.iterdir()) == []
    assert all(Path(p).exists() for p in (y, z, w))
    link = "is a symbolic link (links are not followed); it stays"
    assert caplog.messages == [
        f"could not move {y} to {s.done}: {s.done / 'sub'} {link}",
        f"could not move {z} to {s.failed}: {s.failed} {link}",
        f"could not move {w} to {s.done}: {s.done} {link}",
    ]


def test_a_second_255_byte_name_is_cut_to_fit_with_its_id_and_extension(tmp_path: Path) -> None:
    s = Setup(tmp_path)
    name = "a" + "é" * 125 + ".png"  # 255 bytes, two per é: the longest name a folder holds
    assert len(name.encode()) == 255
    s.done.mkdir()
    (s.done / name).write_bytes(b"an earlier file of that name")
    path = s.make(name)
    s.dispatch.send([path])
    _, _, ids = s.broker.sent[0]
    s.dispatch.on_reply(answer(s.broker.sent[0]))
    [row] = s.rows()
    moved = Path(row["moved_to"])
    # cut before a whole character (never inside its two bytes), the id and extension kept
    assert moved == s.done / ("a" + "é" * 120 + f".{ids[0][:8]}.png")
    assert moved.read_bytes() == b"image" and list(s.inbox.iterdir()) == []


def test_an_older_versions_row_of_a_literal_backslash_x_name_is_still_found(tmp_path: Path) -> None:
    """Killed between row and removal by a version that wrote the name bad\\xff.png (four ASCII
    characters) as it is: today that cell is written with the backslash doubled, and the ledger
    still finds the old one. Its inbox entry goes, no second row."""
    s = Setup(tmp_path)
    path = s.make("bad\\xff.png")
    s.done.mkdir()
    os.link(path, s.done / "bad\\xff.png")
    with open(s.csv, "a", newline="", encoding="utf-8") as f:
        csv.writer(f, lineterminator="\r\n").writerow(
            {"path": path, "digit": "3", "id": "0123456789abcdef", "moved_to": s.done / "bad\\xff.png"}.get(
                c, ""
            )
            for c in CSV_COLUMNS
        )
    restart(s)
    assert scan(s) == [] and list(s.inbox.iterdir()) == []
    assert [r["path"] for r in read_rows(s.csv)] == [path]
    assert (s.done / "bad\\xff.png").read_bytes() == b"image"


def deep_file(top: Path, length: int, data: bytes, name: str = "x.png") -> str:
    """A file whose path is ``length`` bytes long, more than a path can name (PATH_MAX is
    4,096): made one folder at a time, through descriptors."""
    fd = os.open(top, os.O_RDONLY | os.O_DIRECTORY)
    path = str(top)
    try:
        while (left := length - len(os.fsencode(path)) - len(name) - 1) > 0:
            folder = "d" * min(200, max(1, left - 1))
            os.mkdir(folder, dir_fd=fd)
            child = os.open(folder, os.O_RDONLY | os.O_DIRECTORY, dir_fd=fd)
            os.close(fd)
            fd, path = child, f"{path}/{folder}"
        out = os.open(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644, dir_fd=fd)
        os.write(out, data)
        os.close(out)
    finally:
        os.close(fd)
    path = f"{path}/{name}"
    assert len(os.fsencode(path)) == length
    return path


def test_a_path_longer_than_path_max_is_found_answered_and_moved(tmp_path: Path) -> None:
    s = Setup(tmp_path)
    deep = deep_file(s.inbox, 5052, b"image")
    found = [p for p, _ in inbox.scan(s.inbox, ())]
    assert found == [deep]
    s.dispatch.send(found)
    assert s.broker.sent[0][1] == [deep]
    s.dispatch.on_reply(answer(s.broker.sent[0]))
    [row] = s.rows()
    assert row["path"] == deep and row["digit"] == "3"
    assert row["moved_to"] == str(s.done) + deep[len(str(s.inbox)) :]
    assert list(inbox.scan(s.inbox, ())) == []  # gone from the inbox
    fd = open_folder(os.path.dirname(row["moved_to"]))
    try:
        assert os.lstat("x.png", dir_fd=fd).st_size == 5
    finally:
        os.close(fd)

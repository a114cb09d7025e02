"""The intake state machine, fed events, scans and the time by hand: no sleeping, no files."""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from producer.intake import EventKind, Intake

A, B = "/in/a.png", "/in/b.png"


class FakeFs:
    """stat() over a dict: path -> (size, mtime in seconds); a missing path is a vanished file."""

    def __init__(self, **files: tuple[int, float]) -> None:
        self.files = {f"/in/{name}.png": v for name, v in files.items()}
        self.calls = 0

    def stat(self, path: str) -> os.stat_result:
        self.calls += 1
        if path not in self.files:
            raise FileNotFoundError(path)
        size, mtime = self.files[path]
        return stat_result(size, mtime)


def stat_result(size: int, mtime: float) -> os.stat_result:
    return os.stat_result(
        (0o100644, 1, 1, 1, 0, 0, size, mtime, mtime, mtime), {"st_mtime_ns": int(mtime * 1e9)}
    )


def no_stat(path: str) -> os.stat_result:
    raise AssertionError(f"inotify mode must not stat {path} to decide it arrived whole")


# -- inotify -------------------------------------------------------------------------------
def test_a_moved_in_file_is_ready_at_once_without_a_stat() -> None:
    intake = Intake()
    intake.on_event(EventKind.MOVED_IN, A, 100.0)
    assert intake.tick(100.0, stat=no_stat) == [A]
    assert intake.tick(200.0, stat=no_stat) == []  # handed out once
    assert intake.idle


def test_a_created_file_whose_open_comes_late_is_never_read_early() -> None:
    # A busy machine: the writer's open reaches the loop well after its create. No timing
    # guess makes the file ready meanwhile; it waits for its close.
    fs = FakeFs(a=(0, 5.0))
    intake = Intake(settle_s=1.0)
    intake.on_event(EventKind.CREATED, A, 0.0)
    assert intake.tick(0.05, stat=fs.stat) == []
    intake.on_event(EventKind.OPENED, A, 0.5)
    intake.on_event(EventKind.MODIFIED, A, 0.6)
    assert intake.tick(30.0, stat=fs.stat) == []
    intake.on_event(EventKind.CLOSED_WRITE, A, 31.0)
    assert intake.tick(31.0, stat=fs.stat) == [A]


def test_a_created_file_with_no_writer_in_sight_settles_like_polling() -> None:
    fs = FakeFs(a=(10, 1.0))  # a hard link: a create, and no open or close ever
    intake = Intake(settle_s=1.0)
    intake.on_event(EventKind.CREATED, A, 0.0)
    assert intake.tick(0.0, stat=fs.stat) == []
    assert intake.tick(0.9, stat=fs.stat) == []
    assert intake.tick(1.0, stat=fs.stat) == [A]


def test_a_writer_is_waited_for_until_it_closes_after_writing() -> None:
    intake = Intake()
    intake.on_event(EventKind.CREATED, A, 0.0)
    intake.on_event(EventKind.OPENED, A, 0.001)  # a writer's open follows its create
    intake.on_event(EventKind.MODIFIED, A, 0.002)
    assert intake.tick(60.0, stat=no_stat) == []  # a slow writer: still nothing, however long
    intake.on_event(EventKind.CLOSED_NO_WRITE, A, 60.0)  # someone else read it meanwhile
    assert intake.tick(60.0, stat=no_stat) == []
    intake.on_event(EventKind.MODIFIED, A, 61.0)
    intake.on_event(EventKind.CLOSED_WRITE, A, 62.0)
    assert intake.tick(62.0, stat=no_stat) == [A]
    assert intake.idle


def test_a_moved_in_file_read_by_another_program_is_ready_when_it_closes() -> None:
    intake = Intake()
    intake.on_event(EventKind.MOVED_IN, A, 0.0)
    intake.on_event(EventKind.OPENED, A, 0.001)  # a thumbnailer, say: opens, never writes
    assert intake.tick(5.0, stat=no_stat) == []
    intake.on_event(EventKind.CLOSED_NO_WRITE, A, 5.0)
    assert intake.tick(5.0, stat=no_stat) == [A]


def test_events_for_files_in_flight_or_in_the_done_folder_are_ignored() -> None:
    in_flight = {A}
    intake = Intake(skip=[Path("/in/done")], busy=in_flight.__contains__)
    # A worker reading the file it was sent: an open and a close without writing.
    intake.on_event(EventKind.OPENED, A, 0.0)
    intake.on_event(EventKind.CLOSED_NO_WRITE, A, 0.0)
    intake.on_event(EventKind.MOVED_IN, "/in/done/x.png", 0.0)  # a finished file moved there
    assert intake.tick(10.0, stat=no_stat) == []
    assert intake.idle


# -- polling -------------------------------------------------------------------------------
def test_polling_waits_until_size_and_mtime_stand_still_for_settle_s() -> None:
    fs = FakeFs(a=(10, 1.0))
    intake = Intake(polling=True, settle_s=1.0)
    intake.on_event(EventKind.MOVED_IN, A, 0.0)
    assert intake.tick(0.0, stat=fs.stat) == []  # first look
    assert intake.tick(0.9, stat=fs.stat) == []
    fs.files[A] = (20, 1.5)  # still growing
    assert intake.tick(1.2, stat=fs.stat) == []  # the change restarts the wait, from 1.2
    assert intake.tick(2.1, stat=fs.stat) == []
    assert intake.tick(2.2, stat=fs.stat) == [A]
    assert intake.idle


def test_polling_treats_every_event_as_a_change_and_forgets_a_vanished_file() -> None:
    fs = FakeFs(a=(10, 1.0), b=(10, 1.0))
    intake = Intake(polling=True, settle_s=1.0)
    intake.on_event(EventKind.MOVED_IN, A, 0.0)
    intake.on_event(EventKind.CLOSED_WRITE, B, 0.0)  # no shortcut: polling cannot trust closes
    assert intake.tick(0.5, stat=fs.stat) == []
    del fs.files[B]
    assert intake.tick(1.0, stat=fs.stat) == []
    assert intake.tick(1.5, stat=fs.stat) == [A]
    assert intake.idle  # b is forgotten, not retried forever


# -- bounds, scans, rescans ------------------------------------------------------------------
def entries(fs: FakeFs) -> Iterator[tuple[str, os.stat_result]]:
    for path in sorted(fs.files):
        yield path, fs.stat(path)


def test_a_flood_overflows_into_a_rescan_that_picks_up_the_dropped_file() -> None:
    names = "abcde"
    in_flight: set[str] = set()
    intake = Intake(cap=4, rescan_s=30.0, busy=in_flight.__contains__)
    intake.scan([], 0.0, 1000.0, lambda p, st: False)  # the start's scan: an empty inbox
    for n in names:
        intake.on_event(EventKind.MOVED_IN, f"/in/{n}.png", 0.0)
    assert intake.rescan_needed  # the fifth did not fit
    assert not intake.scan_due(1.0)  # no room yet: a rescan now would find nothing to take
    first = intake.tick(1.0, limit=3, stat=no_stat)
    assert first == ["/in/a.png", "/in/b.png", "/in/c.png"]
    in_flight.update(first)
    assert intake.scan_due(1.0)  # room again
    fs = FakeFs(**{n: (10, 0.0) for n in names})  # old files: complete
    intake.scan(entries(fs), 1.0, 1000.0, lambda p, st: False)
    assert not intake.rescan_needed
    assert intake.tick(1.0, stat=no_stat) == ["/in/d.png", "/in/e.png"]  # d waited, e was found


def test_a_pass_stops_reading_when_full_and_goes_on_where_it_stopped() -> None:
    fs = FakeFs(**{f"f{i}": (10, 0.0) for i in range(10)})
    read: list[str] = []

    def walk() -> Iterator[tuple[str, os.stat_result]]:
        for path, st in entries(fs):
            read.append(path)
            yield path, st

    intake = Intake(cap=4)
    intake.scan(walk(), 0.0, 1000.0, lambda p, st: False)
    assert intake.counts()["ready"] == 4 and intake.scanning
    assert len(read) == 4  # it stopped before taking an entry it had no room for
    assert not intake.scan_due(0.0)  # no room yet
    taken = intake.tick(0.0, limit=3, stat=no_stat)
    assert intake.scan_due(0.0)  # room again: the pass goes on (no new walk)
    intake.scan(None, 0.0, 1000.0, lambda p, st: False)
    taken += intake.tick(0.0, stat=no_stat)
    intake.scan(None, 0.0, 1000.0, lambda p, st: False)
    taken += intake.tick(0.0, stat=no_stat)
    assert not intake.scanning and intake.idle
    assert taken == sorted(fs.files) and read == sorted(fs.files)  # each read once, none lost


def test_an_ask_for_a_rescan_during_a_pass_gets_a_pass_after_it() -> None:
    # A hint dropped while a pass is under way may be for a file the pass has read past.
    fs = FakeFs(**{f"f{i}": (10, 0.0) for i in range(6)})
    intake = Intake(cap=4, rescan_s=30.0)
    intake.scan(entries(fs), 0.0, 1000.0, lambda p, st: False)
    intake.request_rescan()
    intake.tick(0.0, stat=no_stat)
    intake.scan(None, 0.0, 1000.0, lambda p, st: False)  # the pass ends
    assert not intake.scanning and intake.rescan_needed
    intake.tick(0.0, stat=no_stat)
    assert intake.scan_due(0.0)


def test_a_scan_skips_what_the_csv_has_and_lets_recent_files_settle() -> None:
    fs = FakeFs(a=(10, 999.5), b=(10, 0.0), c=(10, 0.0))  # a: modified half a second ago
    finished: list[str] = []

    def has_row(path: str, st: os.stat_result) -> bool:
        finished.append(path)
        return path == "/in/c.png"

    intake = Intake(settle_s=1.0)
    intake.scan(entries(fs), 0.0, 1000.0, has_row)
    assert finished == [A, B, "/in/c.png"]
    assert intake.tick(0.0, stat=fs.stat) == [B]
    assert intake.tick(0.5, stat=fs.stat) == []
    assert intake.tick(1.0, stat=fs.stat) == [A]  # settled: unchanged for settle_s


def test_a_periodic_rescan_is_due_every_rescan_s() -> None:
    intake = Intake(rescan_s=30.0)
    assert intake.scan_due(0.0)  # the first one, at start
    intake.scan([], 0.0, 0.0, lambda p, st: False)
    assert not intake.scan_due(29.9)
    assert intake.scan_due(30.0)


def test_put_back_goes_first_and_overflow_asks_for_a_rescan() -> None:
    intake = Intake(cap=3)
    for path in (A, B):
        intake.on_event(EventKind.MOVED_IN, path, 0.0)
    assert intake.tick(1.0, limit=1, stat=no_stat) == [A]
    intake.put_back([A])  # the broker failed: A goes again first
    assert intake.tick(1.0, stat=no_stat) == [A, B]
    intake.put_back(["/in/x.png", "/in/y.png", "/in/z.png", "/in/w.png"])  # resends, over the cap
    assert intake.rescan_needed
    assert intake.tick(1.0, stat=no_stat) == ["/in/x.png", "/in/y.png", "/in/z.png"]


@pytest.mark.parametrize("kind", [EventKind.OPENED, EventKind.MODIFIED])
def test_open_writers_are_capped_too(kind: EventKind) -> None:
    intake = Intake(cap=2)
    for i in range(3):
        intake.on_event(kind, f"/in/w{i}.png", 0.0)
    assert intake.counts()["writing"] == 2 and intake.rescan_needed
    # The one not tracked is still ready when its writer closes it.
    intake.on_event(EventKind.CLOSED_WRITE, "/in/w2.png", 1.0)
    assert intake.tick(1.0, stat=no_stat) == ["/in/w2.png"]


def test_a_candidate_a_permission_hides_asks_for_a_pass_that_says_so() -> None:
    """EACCES is not a vanished file: a pass over the inbox (which warns, and finds the file
    once it can) is asked for (issue 25, 17)."""

    def hidden(path: str) -> os.stat_result:
        raise PermissionError(13, "Permission denied", path)

    intake = Intake(settle_s=1.0)
    intake.scan([], 0.0, 0.0, lambda p, st: False)  # the periodic pass is not due for a while
    intake.on_event(EventKind.CREATED, A, 0.0)
    assert intake.tick(0.1, stat=hidden) == []
    assert intake.rescan_needed and not intake.idle
    assert intake.scan_due(0.2)


def test_denied_says_each_once_and_asks_for_looks_until_read_or_gone(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    from producer.access import Denied

    caplog.set_level(logging.INFO, logger="mnistq.producer")
    sub, other = tmp_path / "sub", tmp_path / "other"
    sub.mkdir()
    other.mkdir()
    denied = Denied(retry_s=5.0)
    assert not denied.rescan_due(0.0)  # nothing denied: no extra passes
    for _ in range(3):
        denied.note(str(sub))
    denied.note(str(other))
    assert [m.split(" (")[0] for m in caplog.messages] == [f"cannot read {sub}", f"cannot read {other}"]
    assert denied.rescan_due(1.0) and not denied.rescan_due(2.0) and denied.rescan_due(6.0)
    denied.cleared(str(sub))
    denied.cleared(str(sub))
    assert caplog.messages[-1] == f"{sub} can be read again" and len(caplog.messages) == 3
    other.rmdir()  # gone: nothing left to wait for
    assert not denied.rescan_due(11.0) and not denied.rescan_due(20.0)

"""The dispatcher with a fake broker and a clock turned by hand; real files, a real CSV."""

from __future__ import annotations

import csv
import logging
import os
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

import pytest

from app.watch import final_line
from mnistq.evidence import LostWork
from mnistq.folders import Folders
from mnistq.protocol import ErrorKind, Reply, Result
from producer.csvsink import CsvSink
from producer.dispatch import Dispatcher, Progress
from producer.inbox import file_id
from producer.options import WatchOptions


class Clock:
    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


class FakeBroker:
    """Records each message; ``fail`` makes the next sends raise like a broker that is down."""

    def __init__(self) -> None:
        self.sent: list[tuple[str, list[str], list[str]]] = []  # (task id, paths, ids)
        self.fail = False

    def send(
        self, paths: Sequence[str], ids: Sequence[str] | None = None, *, task_id: str | None = None
    ) -> str:
        if self.fail:
            raise ConnectionError("broker down")
        assert task_id is not None and ids is not None
        self.sent.append((task_id, list(paths), list(ids)))
        return task_id


def answer(task: tuple[str, list[str], list[str]], digit: int = 3) -> Reply:
    """What a correct worker replies to a message."""
    task_id, paths, ids = task
    return Reply(
        task_id,
        [
            Result(path=p, id=i, digit=digit, confidence=0.9, model_version="v")
            for p, i in zip(paths, ids, strict=True)
        ],
    )


class Setup:
    def __init__(self, tmp_path: Path, n: int = 0, **options: object) -> None:
        self.inbox = tmp_path / "inbox"
        self.inbox.mkdir()
        self.done, self.failed = tmp_path / "done", tmp_path / "failed"
        self.csv = tmp_path / "results.csv"
        self.paths = [self.make(f"f{i}.png") for i in range(n)]
        self.clock, self.broker = Clock(), FakeBroker()
        self.sink = CsvSink(self.csv)
        self.replaced: list[str] = []
        self.progress: list[Progress] = []
        # the pipeline's options (WatchOptions) from those given; the rest go to the Dispatcher
        opts = {
            k: options.pop(k)
            for k in ("keep", "message_size", "max_inflight", "resend_s", "retry_s")
            if k in options
        }
        self.dispatch = Dispatcher(
            self.broker,
            self.sink,
            WatchOptions(Folders.of(self.inbox, self.csv, self.done, self.failed), **opts),  # type: ignore[arg-type]
            clock=self.clock,
            on_replaced=self.replaced.append,
            on_progress=self.progress.append,
            **options,  # type: ignore[arg-type]
        )

    def make(self, name: str, content: bytes = b"image") -> str:
        path = self.inbox / name
        path.write_bytes(content)
        return str(path)

    def rows(self) -> list[dict[str, str]]:
        self.sink.close()
        self.sink = CsvSink(self.csv)  # reopened: later writes still work
        self.dispatch.finisher.sink = self.sink
        with open(self.csv, newline="", encoding="utf-8") as f:
            return list(csv.DictReader(f))


def test_files_go_in_messages_of_message_size_up_to_the_in_flight_cap(tmp_path: Path) -> None:
    s = Setup(tmp_path, 10, message_size=4, max_inflight=6)
    assert s.dispatch.room() == 6
    assert s.dispatch.send(s.paths[:6]) == []
    assert [len(paths) for _, paths, _ in s.broker.sent] == [4, 2]
    assert [p for _, paths, _ in s.broker.sent for p in paths] == s.paths[:6]
    assert s.dispatch.room() == 0 and all(s.dispatch.is_busy(p) for p in s.paths[:6])
    s.dispatch.on_reply(answer(s.broker.sent[0]))
    assert s.dispatch.room() == 4
    assert s.progress[-1].sent == 6 and s.progress[-1].done == 4 and s.progress[-1].in_flight == 2


def test_a_reply_writes_rows_and_moves_files_to_done_or_failed(tmp_path: Path) -> None:
    s = Setup(tmp_path, 2)
    s.dispatch.send(s.paths)
    task_id, paths, ids = s.broker.sent[0]
    bad = Result.failed(paths[1], ErrorKind.UNREADABLE, "not an image", ids[1])
    s.dispatch.on_reply(Reply(task_id, [answer(s.broker.sent[0], 7).results[0], bad]))
    rows = s.rows()
    assert [(r["path"], r["digit"], r["error_kind"], r["id"]) for r in rows] == [
        (paths[0], "7", "", ids[0]),
        (paths[1], "", "unreadable", ids[1]),
    ]
    assert (s.done / "f0.png").exists() and (s.failed / "f1.png").exists()
    assert list(s.inbox.iterdir()) == []
    assert s.dispatch.idle


def test_a_file_whose_row_exists_is_not_sent_again(tmp_path: Path) -> None:
    s = Setup(tmp_path, 2, keep=True)
    s.dispatch.send(s.paths[:1])
    s.dispatch.on_reply(answer(s.broker.sent[0]))
    assert Path(s.paths[0]).exists()  # keep
    s.dispatch.send(s.paths)  # the first again (a reader's close event, a rescan), and a new one
    assert [paths for _, paths, _ in s.broker.sent] == [s.paths[:1], s.paths[1:]]
    assert s.dispatch.already_done(s.paths[0], os.stat(s.paths[0], follow_symlinks=False))
    assert not s.dispatch.already_done(s.paths[1], os.stat(s.paths[1], follow_symlinks=False))


def test_without_a_look_at_the_broker_unanswered_files_go_again_after_resend_s(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    s = Setup(tmp_path, 3, resend_s=45.0)  # no probe: the time-based fallback alone
    s.clock.t = 1000.0
    s.dispatch.send(s.paths[:2])
    s.clock.t = 1030.0
    s.dispatch.send(s.paths[2:])
    s.clock.t = 1045.0
    assert s.dispatch.tick() == []  # exactly resend_s: not yet
    s.clock.t = 1050.5
    with caplog.at_level(logging.WARNING, logger="mnistq.producer"):
        assert s.dispatch.tick() == s.paths[:2]
    assert [m for m in caplog.messages if "again" in m] == [
        "sending 2 files again: no answer after 45 s (the broker cannot be listed)"
    ]
    assert not s.dispatch.is_busy(s.paths[0]) and s.dispatch.is_busy(s.paths[2])
    first = s.broker.sent[0]
    s.dispatch.send(s.paths[:2])  # the caller sends them again
    second = s.broker.sent[-1]
    assert second[0] != first[0] and second[1] == first[1]
    # The lost message turns up after all, then the resent one's answer: one row each.
    s.dispatch.on_reply(answer(first, 5))
    s.dispatch.on_reply(answer(second, 6))
    s.dispatch.on_reply(answer(s.broker.sent[1], 7))
    rows = s.rows()
    assert sorted((r["path"], r["digit"]) for r in rows) == [
        (s.paths[0], "5"),
        (s.paths[1], "5"),
        (s.paths[2], "7"),
    ]
    assert s.dispatch.idle


class FakeProbe:
    """What the broker holds, set by hand; counts the looks."""

    def __init__(self) -> None:
        self.held: set[str] | None = set()
        self.looks = 0

    def present(self) -> set[str] | None:
        self.looks += 1
        return None if self.held is None else set(self.held)


def test_messages_missing_from_two_looks_are_sent_again_with_one_line(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    clock, probe = Clock(), FakeProbe()
    s = Setup(tmp_path, 6, message_size=2, lost=LostWork(probe, confirm_s=5.0, clock=clock))
    s.clock = s.dispatch.clock = s.dispatch.finisher.clock = clock
    clock.t = 100.0
    s.dispatch.send(s.paths)
    lost_id, held = s.broker.sent[0][0], {t for t, _, _ in s.broker.sent[1:]}
    probe.held = held  # the first message vanished (a Redis restarted without persistence)
    clock.t = 101.0
    assert s.dispatch.tick() == [] and probe.looks == 1  # missing once: maybe mid-delivery
    clock.t = 103.0
    assert s.dispatch.tick() == [] and probe.looks == 1  # looks are confirm_s apart at least
    clock.t = 106.0
    with caplog.at_level(logging.INFO, logger="mnistq.producer"):
        assert s.dispatch.tick() == s.paths[:2]
    assert probe.looks == 2
    assert [m for m in caplog.messages if "again" in m] == [
        "sending 2 files again: their messages are in no queue, no unacked list and no worker's "
        "answer (a Redis restarted empty, a worker killed as it took them, or workers too busy to answer)"
    ]
    assert lost_id not in s.dispatch._tasks
    # held ones are never sent again, however long they wait; a look that fails decides nothing
    probe.held = None
    clock.t = 120.0
    assert s.dispatch.tick() == []
    probe.held = held
    clock.t = 1000.0
    assert s.dispatch.tick() == [] and probe.looks == 4


@pytest.mark.parametrize("count", [2, 4], ids=["too_few", "too_many"])
def test_a_reply_with_the_wrong_count_gives_each_file_an_internal_error_row(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, count: int
) -> None:
    s = Setup(tmp_path, 3)
    s.dispatch.send(s.paths)
    task_id, paths, ids = s.broker.sent[0]
    # A buggy worker: results that could belong to any of the files.
    results = [Result(path=paths[0], id=ids[0], digit=1, confidence=0.9, model_version="v")] * count
    with caplog.at_level(logging.WARNING, logger="mnistq.producer"):
        s.dispatch.on_reply(Reply(task_id, results))
    rows = s.rows()
    assert [(r["path"], r["id"], r["digit"], r["error_kind"]) for r in rows] == [
        (p, i, "", "internal") for p, i in zip(paths, ids, strict=True)
    ]
    assert all(f"{count} results for 3 files" in r["error"] for r in rows)
    assert any(f"{count} results for 3 files" in m for m in caplog.messages)
    assert sorted(p.name for p in s.failed.iterdir()) == ["f0.png", "f1.png", "f2.png"]
    assert s.dispatch.idle


def test_a_reply_that_swaps_files_does_not_give_one_file_anothers_digit(tmp_path: Path) -> None:
    s = Setup(tmp_path, 3)
    s.dispatch.send(s.paths)
    task_id, paths, ids = s.broker.sent[0]
    good = answer(s.broker.sent[0]).results
    swapped = [good[1], good[0], good[2]]
    s.dispatch.on_reply(Reply(task_id, swapped))
    by_path = {r["path"]: r for r in s.rows()}
    assert by_path[paths[0]]["error_kind"] == by_path[paths[1]]["error_kind"] == "internal"
    assert by_path[paths[0]]["id"] == ids[0] and by_path[paths[1]]["id"] == ids[1]
    assert by_path[paths[2]]["digit"] == "3" and by_path[paths[2]]["error"] == ""


def test_a_broker_failure_hands_the_files_back_unsent(tmp_path: Path) -> None:
    s = Setup(tmp_path, 5, message_size=2)
    s.dispatch.send(s.paths[:2])
    s.broker.fail = True
    assert s.dispatch.send(s.paths[2:]) == s.paths[2:]
    assert s.dispatch.room() == s.dispatch.max_inflight - 2
    assert not any(s.dispatch.is_busy(p) for p in s.paths[2:])
    s.broker.fail = False
    assert s.dispatch.send(s.paths[2:]) == []
    assert sum(len(paths) for _, paths, _ in s.broker.sent) == 5


def test_a_file_replaced_while_in_flight_stays_as_new_work(tmp_path: Path) -> None:
    s = Setup(tmp_path, 1)
    s.dispatch.send(s.paths)
    old_id = s.broker.sent[0][2][0]
    new = tmp_path / "new.png"
    new.write_bytes(b"another image, dropped under the same name")
    os.rename(new, s.paths[0])  # as mv does: another file (inode) under the name
    assert file_id(s.paths[0], os.stat(s.paths[0], follow_symlinks=False)) != old_id
    s.dispatch.on_reply(answer(s.broker.sent[0]))
    assert [r["id"] for r in s.rows()] == [old_id]
    assert Path(s.paths[0]).read_bytes().startswith(b"another")  # not moved away
    assert s.replaced == s.paths
    assert not s.dispatch.is_busy(s.paths[0])  # so the intake takes it in again


def test_a_file_written_to_while_in_flight_gets_no_row_until_read_whole(tmp_path: Path) -> None:
    """A writer that paused mid-file long enough for the file to look complete: the answer is of
    half a file (an "image file is truncated" error), so it gets no row; the file is new work."""
    s = Setup(tmp_path, 1)
    s.dispatch.send(s.paths)
    with open(s.paths[0], "ab") as f:  # the writer goes on: the same file, longer
        f.write(b" and the rest of it")
    half = answer(s.broker.sent[0])
    half.results[0] = Result.failed(
        s.paths[0], ErrorKind.UNREADABLE, "image file is truncated", half.results[0].id
    )
    s.dispatch.on_reply(half)
    assert s.rows() == [] and s.replaced == s.paths and Path(s.paths[0]).exists()
    assert not s.dispatch.is_busy(s.paths[0]) and s.dispatch.progress().done == 0
    s.dispatch.send(s.paths)  # read again, whole
    s.dispatch.on_reply(answer(s.broker.sent[-1]))
    rows = s.rows()
    assert [r["error"] for r in rows] == [""] and Path(rows[0]["moved_to"]).read_bytes().endswith(
        b"rest of it"
    )


def test_the_rate_counts_only_time_with_files_in_flight(tmp_path: Path) -> None:
    s = Setup(tmp_path, 5)
    s.clock.t = 10.0
    s.dispatch.send(s.paths[:1])
    s.clock.t = 18.0  # the workers' first answer, after loading their model: not timed
    s.dispatch.on_reply(answer(s.broker.sent[0]))
    assert s.dispatch.progress().busy_s == 0 and s.dispatch.progress().rate is None
    s.clock.t = 500.0  # idle: an empty inbox for minutes
    s.dispatch.send(s.paths[1:3])
    s.clock.t = 501.0
    s.dispatch.on_reply(answer(s.broker.sent[1]))
    s.clock.t = 800.0
    s.dispatch.send(s.paths[3:])
    s.clock.t = 800.5
    s.dispatch.on_reply(answer(s.broker.sent[2]))
    s.clock.t = 900.0
    p = s.dispatch.progress()
    assert p.done == 5 and p.rated == 4
    assert p.busy_s == pytest.approx(1.5)
    assert p.images_per_s == p.rate == pytest.approx(4 / 1.5)


def test_no_rate_is_claimed_from_a_few_files_latency(tmp_path: Path) -> None:
    """3 files answered in 0.1 s after the first answer are no throughput of 30 images/s."""
    s = Setup(tmp_path, 4)
    s.dispatch.send(s.paths[:1])
    s.dispatch.on_reply(answer(s.broker.sent[0]))
    s.clock.t = 100.0
    s.dispatch.send(s.paths[1:])
    s.clock.t = 100.1
    s.dispatch.on_reply(answer(s.broker.sent[1]))
    p = s.dispatch.progress()
    assert p.rated == 3 and p.rate is None
    assert final_line(p) == "done 4 (0 failed)"
    assert final_line(replace(p, busy_s=2.0)) == "done 4 (0 failed), 2 images/s"


def test_abandon_counts_what_was_left_in_flight(tmp_path: Path) -> None:
    s = Setup(tmp_path, 3)
    s.dispatch.send(s.paths)
    assert s.dispatch.abandon() == 3
    assert s.dispatch.idle and s.dispatch.progress().abandoned == 3
    assert s.rows() == []

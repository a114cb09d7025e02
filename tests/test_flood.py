"""A flood: many more files than the watcher holds, through a real inotify watch on a real folder.

The broker and the workers are left out (they are the same for ten files and for a flood): the
connection answers every message at once, in this process, so the watcher's own handling of a
flood is what is measured and held here.
"""

from __future__ import annotations

import os
import queue
import sys
import threading
import time
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest
from helpers_run import read_rows

from mnistq.folders import Folders
from mnistq.outage import Outage
from mnistq.protocol import Reply, Result
from producer.csvsink import CsvSink
from producer.events import Hints
from producer.inotify import InotifyHints
from producer.intake import EventKind
from producer.watcher import Watcher, WatchOptions

pytestmark = [
    pytest.mark.timeout(120),
    pytest.mark.skipif(not sys.platform.startswith("linux"), reason="inotify is Linux's"),
]


class EchoConnection:
    """A broker and workers that answer every message at once with digit 7."""

    def __init__(self) -> None:
        self.outage = Outage("the broker")
        self._replies: queue.SimpleQueue[Reply] = queue.SimpleQueue()

    def ping(self) -> None:
        pass

    def send(
        self, paths: Sequence[str], ids: Sequence[str] | None = None, *, task_id: str | None = None
    ) -> str:
        task_id = task_id or str(uuid.uuid4())
        file_ids = list(ids) if ids else [None] * len(paths)
        results = [
            Result(path=p, id=i, digit=7, confidence=0.99, model_version="v")
            for p, i in zip(paths, file_ids, strict=True)
        ]
        self._replies.put(Reply(task_id, results))
        return task_id

    def receive(self, timeout: float) -> list[Reply]:
        try:
            out = [self._replies.get(timeout=timeout)]
        except queue.Empty:
            return []
        while True:
            try:
                out.append(self._replies.get_nowait())
            except queue.Empty:
                return out


class CountedListing:
    """os.scandir of one folder, counting the entries read from it (by any thread)."""

    read = 0

    def __init__(self, it: Any) -> None:
        self._it = it

    def __enter__(self) -> CountedListing:
        return self

    def __exit__(self, *exc: object) -> None:
        self._it.close()

    def close(self) -> None:
        self._it.close()

    def __iter__(self) -> CountedListing:
        return self

    def __next__(self) -> os.DirEntry[str]:
        entry = next(self._it)
        CountedListing.read += 1
        return entry


def test_a_flood_is_read_from_the_folder_once_not_once_per_room(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    n, hold = 3000, 64  # the watcher holds 64 files each way: the flood goes through passes
    inbox, staging = tmp_path / "inbox", tmp_path / "staging"
    staging.mkdir()
    for i in range(n):
        (staging / f"f{i:05d}.png").write_bytes(b"not really an image")
    scandir = os.scandir

    def counted(path: Any = ".") -> Any:
        it = scandir(path)
        return CountedListing(it) if os.fspath(path) == str(inbox) else it

    monkeypatch.setattr(os, "scandir", counted)
    opts = WatchOptions(
        Folders.of(inbox, tmp_path / "results.csv", tmp_path / "done", tmp_path / "failed"),
        message_size=16,
        max_inflight=hold,
        hold=hold,
    )
    sink = CsvSink(tmp_path / "results.csv")
    stop = threading.Event()
    watcher = Watcher(EchoConnection(), sink, opts, stop)  # type: ignore[arg-type]
    errors: list[BaseException] = []

    def run() -> None:
        try:
            watcher.run()
        except BaseException as e:  # the test fails on it below, not in a thread's warning
            errors.append(e)

    runner = threading.Thread(target=run)
    runner.start()
    try:
        deadline = time.monotonic() + 10
        while not watcher.intake.idle or not inbox.exists():  # the start's pass is over
            assert time.monotonic() < deadline and not errors, errors
            time.sleep(0.01)
        CountedListing.read = 0
        for f in sorted(staging.iterdir()):
            os.rename(f, inbox / f.name)
        deadline = time.monotonic() + 60
        while len(rows := read_rows(tmp_path / "results.csv")) < n:
            assert time.monotonic() < deadline and not errors, f"{len(rows)} rows of {n}; {errors}"
            time.sleep(0.05)
        time.sleep(0.3)  # nothing more comes
    finally:
        stop.set()
        runner.join(30)
        sink.close()
    assert not errors and not runner.is_alive()
    rows = read_rows(tmp_path / "results.csv")
    assert sorted(Path(r["path"]).name for r in rows) == sorted(f"f{i:05d}.png" for i in range(n))
    assert [p for p in inbox.iterdir() if not p.name.startswith(".")] == []
    assert len(list((tmp_path / "done").iterdir())) == n
    # Held 64 at a time, a walk from the top per room made would read the folder ~n / 32 times
    # (~140,000 entries here); a pass that goes on where it stopped reads each entry about once
    # per pass, and a flood needs a few passes (files that arrive during one get the next).
    assert 0 < CountedListing.read <= 4 * n, CountedListing.read


def test_full_hints_drop_file_events_and_ask_for_a_pass_but_still_watch_new_folders(tmp_path: Path) -> None:
    inbox, staging = tmp_path / "inbox", tmp_path / "staging"
    inbox.mkdir()
    (staging / "sub").mkdir(parents=True)
    for i in range(20):
        (staging / f"f{i:02d}.png").write_bytes(b"x")
    hints = Hints(8)
    source = InotifyHints(inbox, hints, [], lambda path: False)
    source.start()
    try:
        for i in range(20):
            os.rename(staging / f"f{i:02d}.png", inbox / f"f{i:02d}.png")
        deadline = time.monotonic() + 10
        while not hints.full:
            assert time.monotonic() < deadline
            time.sleep(0.01)
        os.rename(staging / "sub", inbox / "sub")  # a folder moved in while the hints are full
        time.sleep(0.5)
        assert hints.take(0.01, limit=0) == ([], True)  # dropped: a pass is asked for
        first, _ = hints.take(0.01, limit=3)
        rest, _ = hints.take(0.01)
        assert [os.path.basename(p) for _, p in first + rest] == [f"f{i:02d}.png" for i in range(8)]
        (inbox / "sub" / "x.png").write_bytes(b"x")  # the folder is watched all the same
        got: list[tuple[EventKind, str]] = []
        while (EventKind.CLOSED_WRITE, str(inbox / "sub" / "x.png")) not in got:
            assert time.monotonic() < deadline, got
            got += hints.take(0.05)[0]
    finally:
        source.stop()
        source.join(5)


def test_the_progress_line_claims_no_rate_from_a_few_files(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    # 3 files answered at once are their latency, not a throughput (issue 25, finding 8: the
    # line said "46 images/s" for 4 files)
    import producer.watcher

    monkeypatch.setattr(producer.watcher, "LOG_EVERY_S", 0.05)
    inbox = tmp_path / "inbox"
    opts = WatchOptions(Folders.of(inbox, tmp_path / "results.csv", tmp_path / "done", tmp_path / "failed"))
    sink = CsvSink(tmp_path / "results.csv")
    stop = threading.Event()
    watcher = Watcher(EchoConnection(), sink, opts, stop)  # type: ignore[arg-type]
    runner = threading.Thread(target=watcher.run)
    with caplog.at_level("INFO", logger="mnistq.producer"):
        runner.start()
        try:
            deadline = time.monotonic() + 10
            while not inbox.exists():
                assert time.monotonic() < deadline
                time.sleep(0.01)
            for i in range(3):
                (inbox / f"f{i}.png").write_bytes(b"not really an image")
            while not any(m.startswith("sent 3, done 3") for m in caplog.messages):
                assert time.monotonic() < deadline, caplog.messages
                time.sleep(0.02)
        finally:
            stop.set()
            runner.join(30)
            sink.close()
    line = next(m for m in caplog.messages if m.startswith("sent 3, done 3"))
    assert line == "sent 3, done 3, failed 0, in flight 0", line

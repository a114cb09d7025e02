"""The producer under faults, with real processes: `mnistq watch`, real workers, a real Redis.

Names that are not UTF-8, a disk that fills up and grows, the producer killed again and again,
an inbox entry that cannot be removed, and a Redis restarted without persistence mid-burst.
"""

from __future__ import annotations

import csv
import io
import logging
import os
import shutil
import signal
import socket
import subprocess
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import redis
from conftest import WorkerProc, no_dac, write_digits
from helpers import MNISTQ, wait_for
from helpers_wire import Wire
from test_row_and_move import deep_file

from api.client import Client
from app.embedded import EmbeddedRedis
from mnistq.csvcell import unescaped
from mnistq.folders import Folders
from mnistq.protocol import QUEUE
from mnistq.settings import Settings
from producer import inbox
from producer.csvsink import CsvSink
from producer.watcher import Watcher, WatchOptions

pytestmark = pytest.mark.system


def read_rows(path: Path, strict: bool = True) -> list[dict[str, str]]:
    """The CSV's rows, from one read of it; fails on anything that is not whole, well-formed
    records. Not ``strict``, while the producer may be writing: only the whole rows so far (a
    reader may see an append half done, and reading twice saw a row grow between the reads)."""
    if not path.exists():
        return []
    data = path.read_bytes()
    if not strict:
        data = data[: data.rfind(b"\r\n") + 2]
    assert not data or data.endswith(b"\r\n"), f"a torn last row: {data[-80:]!r}"
    rows = list(csv.DictReader(io.StringIO(data.decode("utf-8"), newline="")))
    assert all(None not in r and all(v is not None for v in r.values()) for r in rows), "a malformed row"
    return rows


def count_rows(path: Path) -> int:
    """The whole rows written so far, for a wait while the producer writes."""
    return len(read_rows(path, strict=False))


def one_row_each(rows: list[dict[str, str]], names: set[str]) -> None:
    """Exactly one row per file, and each row names the place where its file is now."""
    counts = Counter(Path(r["path"]).name for r in rows)
    assert set(counts) == names, (len(counts), len(names))
    assert max(counts.values()) == 1, [n for n, c in counts.items() if c > 1][:5]
    # the cell of a name that is not UTF-8 holds \xNN: unescaped gives the name back
    missing = [r["moved_to"] for r in rows if not any(map(os.path.lexists, unescaped(r["moved_to"])))]
    assert not missing, missing[:5]


class Watch:
    """`mnistq watch` as a process, its output in a log file."""

    def __init__(self, env: dict[str, str], root: Path, csv_path: Path | None = None) -> None:
        self.inbox, self.log = root / "inbox", root / "watch.log"
        self.csv = csv_path or root / "out" / "results.csv"
        self.done, self.failed = root / "done", root / "failed"
        self.csv.parent.mkdir(parents=True, exist_ok=True)
        self.cmd = [
            *MNISTQ, "watch", "--inbox", str(self.inbox), "--csv", str(self.csv),
            "--done-dir", str(self.done), "--failed-dir", str(self.failed),
        ]  # fmt: skip
        self.env = {**env, "MNISTQ_LOG_LEVEL": "INFO"}
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> Watch:
        offset = self.log.stat().st_size if self.log.exists() else 0
        with open(self.log, "ab") as out:
            self.proc = subprocess.Popen(self.cmd, env=self.env, stdout=out, stderr=subprocess.STDOUT)
        wait_for(lambda: "watching" in self.text()[offset:], 30, self.text)
        return self

    def text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def stop(self, sig: int = signal.SIGTERM) -> int:
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        return self.proc.wait(90)

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


@pytest.fixture
def watch(start_worker: Callable[..., WorkerProc], tmp_path: Path) -> Iterator[Callable[..., Watch]]:
    started: list[Watch] = []
    worker = start_worker()

    def make(csv_path: Path | None = None) -> Watch:
        w = Watch(worker.env, tmp_path, csv_path)
        started.append(w)
        return w

    yield make
    for w in started:
        w.kill()


@pytest.mark.timeout(180)
def test_300_files_one_named_in_bad_utf8_and_a_symlink_give_one_row_each(
    watch: Callable[..., Watch], tmp_path: Path
) -> None:
    w = watch()
    staging = tmp_path / "staging"
    files = write_digits(staging, 299)
    bad = os.fsdecode(b"bad\xff.png")
    shutil.copy(next(iter(files)), staging / bad)
    target = write_digits(tmp_path / "elsewhere", 1, prefix="target")
    w.inbox.mkdir(parents=True)
    w.start()
    for p in staging.iterdir():
        os.rename(p, w.inbox / p.name)
    os.symlink(next(iter(target)), w.inbox / "link.png")
    names = {p.name for p in files} | {"bad\\xff.png", "link.png"}
    wait_for(lambda: count_rows(w.csv) >= 301, 120, lambda: f"{count_rows(w.csv)} rows\n{w.text()}")
    time.sleep(0.5)  # a second row would show now
    rows = read_rows(w.csv)
    one_row_each(rows, names)
    by_name = {Path(r["path"]).name: r for r in rows}
    assert by_name["bad\\xff.png"]["digit"] == str(files[next(iter(files))])
    assert os.path.exists(os.fsencode(w.done / bad))
    assert os.path.islink(Path(by_name["link.png"]["moved_to"])) and next(iter(target)).exists()
    assert [p.name for p in w.inbox.iterdir() if not p.name.startswith(".")] == []
    assert w.stop() == 0
    assert "Traceback" not in w.text()


@pytest.mark.timeout(120)
def test_a_file_deeper_than_path_max_gets_its_row_and_leaves_the_inbox(
    watch: Callable[..., Watch], tmp_path: Path
) -> None:
    """A 5,052-byte path: system calls refuse it by name (PATH_MAX is 4,096), so it is listed,
    read, linked and removed through folder descriptors; the watcher says it cannot watch it
    for events (the rescans find such files)."""
    w = watch()
    [(image, digit)] = write_digits(tmp_path / "staging", 1).items()
    w.inbox.mkdir(parents=True)
    deep = deep_file(w.inbox, 5052, image.read_bytes())
    w.start()
    wait_for(lambda: count_rows(w.csv) >= 1, 60, w.text)
    [row] = read_rows(w.csv)
    assert (row["path"], row["digit"], row["error"]) == (deep, str(digit), "")
    assert row["moved_to"] == str(w.done) + deep[len(str(w.inbox)) :]
    wait_for(lambda: not list(inbox.scan(w.inbox, ())), 10, lambda: "still in the inbox")
    assert w.stop() == 0
    assert "Traceback" not in w.text() and "File name too long); it is rescanned instead" in w.text()


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A 64 KiB tmpfs (root only); unmounted afterwards."""
    where = tmp_path / "small"
    where.mkdir()
    out = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(where)], capture_output=True, text=True
    )
    if out.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (root needed): {out.stderr.strip()}")
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], check=False)


@pytest.mark.timeout(240)
def test_a_full_disk_pauses_and_growing_it_resumes_with_every_file_one_whole_row(
    watch: Callable[..., Watch], tmp_path: Path, small_disk: Path
) -> None:
    w = watch(small_disk / "results.csv")
    staging = write_digits(tmp_path / "staging", 1000)
    w.inbox.mkdir(parents=True)
    w.start()
    for p in staging:
        os.rename(p, w.inbox / p.name)
    wait_for(lambda: "intake paused" in w.text(), 120, w.text)
    time.sleep(3)  # paused: retries fail, nothing moves
    rows = read_rows(w.csv)
    assert 0 < len(rows) < 1000
    # Nothing left the inbox without its row; the rest waits there.
    moved = {p.name for d in (w.done, w.failed) if d.exists() for p in d.iterdir()}
    assert moved == {Path(r["moved_to"]).name for r in rows}
    assert len(moved) + len([p for p in w.inbox.iterdir() if not p.name.startswith(".")]) == 1000
    subprocess.run(["mount", "-o", "remount,size=4m", str(small_disk)], check=True)
    wait_for(lambda: count_rows(w.csv) >= 1000, 120, lambda: f"{count_rows(w.csv)} rows\n{w.text()}")
    time.sleep(0.5)
    one_row_each(read_rows(w.csv), {p.name for p in staging})
    assert w.stop() == 0
    text = w.text()
    assert text.count("intake paused") == 1 and text.count("intake resumed") == 1, text
    assert "Traceback" not in text


@pytest.mark.timeout(300)
def test_the_producer_killed_again_and_again_gives_each_file_one_row(
    watch: Callable[..., Watch], tmp_path: Path
) -> None:
    w = watch()
    w.env["MNISTQ_MESSAGE_SIZE"] = "16"
    files = write_digits(w.inbox, 600)
    for n in (30, 150, 300):  # killed wherever it is: linking, writing rows, removing entries
        w.start()
        wait_for(lambda n=n: count_rows(w.csv) >= n, 120, w.text)  # type: ignore[misc]
        w.stop(signal.SIGKILL)
    w.start()
    wait_for(lambda: count_rows(w.csv) >= 600, 120, lambda: f"{count_rows(w.csv)} rows")
    time.sleep(1)
    rows = read_rows(w.csv)
    one_row_each(rows, {p.name for p in files})
    assert sorted(p.name for p in w.done.iterdir()) == sorted(p.name for p in files)  # no strays
    assert [p.name for p in w.inbox.iterdir() if not p.name.startswith(".")] == []
    assert w.stop() == 0


@pytest.mark.timeout(120)
def test_an_unremovable_inbox_entry_gets_one_row_and_one_warning(
    start_worker: Callable[..., WorkerProc], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    worker = start_worker()
    inbox, sub = tmp_path / "inbox", tmp_path / "inbox" / "locked"
    write_digits(sub, 3)
    if subprocess.run(["chattr", "+i", str(sub)], capture_output=True).returncode != 0:
        pytest.skip("chattr +i is not supported here")
    sink = CsvSink(tmp_path / "results.csv")
    opts = WatchOptions(
        Folders.of(inbox, tmp_path / "results.csv", tmp_path / "done", tmp_path / "failed"), rescan_s=0.3
    )
    stop = threading.Event()
    try:
        with Client(worker.url, settings=Settings(redis_url=worker.url)) as client:
            watcher = Watcher(client, sink, opts, stop)
            runner = threading.Thread(target=watcher.run)
            with caplog.at_level(logging.WARNING, logger="mnistq.producer"):
                runner.start()
                wait_for(lambda: count_rows(tmp_path / "results.csv") >= 3, 60, lambda: "no rows")
                time.sleep(3)  # ten rescans
                stop.set()
                runner.join(60)
    finally:
        subprocess.run(["chattr", "-i", str(sub)], check=False)
        sink.close()
    rows = read_rows(tmp_path / "results.csv")
    assert len(rows) == 3 and all(Path(r["moved_to"]).exists() for r in rows)
    assert len(list(sub.iterdir())) == 3  # still there
    warnings = [m for m in caplog.messages if "could not remove" in m]
    assert len(warnings) == 3, warnings  # one per file, not one per rescan


@pytest.mark.timeout(400)
def test_redis_restarted_without_persistence_mid_burst_every_file_gets_its_row(tmp_path: Path) -> None:
    """Redis killed twice under a burst, with messages in it each time, and started again empty on
    the same port: every file gets its one row, and both workers ride it out, a warning and a
    "back" per outage at most, and serve again."""
    server = EmbeddedRedis()
    workers = [
        WorkerProc(
            server.url, f"{name}@%h", tmp_path, tmp_path / f"{name}.log", MNISTQ_VISIBILITY_TIMEOUT="30"
        )
        for name in ("alpha", "beta")
    ]
    w = Watch(workers[0].env, tmp_path)
    try:
        for worker in workers:
            worker.start()
        staging = write_digits(tmp_path / "staging", 3000)
        w.inbox.mkdir(parents=True)
        w.start()
        for p in staging:
            os.rename(p, w.inbox / p.name)
        for outage in (1, 2):
            # Killed with messages in Redis, waiting in the queue or taken but unacknowledged (about
            # 1 s into the burst, then as soon as the restarted server holds some again): a Redis
            # that keeps nothing loses both kinds.
            queue = redis.Redis.from_url(server.url)
            wait_for(
                lambda q=queue: q.llen(QUEUE) + q.hlen("unacked") >= 2,  # type: ignore[misc]
                30,
                f"messages in Redis before outage {outage}",
            )
            queued = queue.llen(QUEUE)
            queue.close()
            server.kill()
            server.start()  # the same port, nothing in it
            restarted = time.monotonic()
            at_restart = count_rows(w.csv)
            print(f"\noutage {outage}: {queued} messages queued and {at_restart} rows at the restart")
        wait_for(
            lambda: count_rows(w.csv) >= 3000,
            90,
            lambda: f"{count_rows(w.csv)} of 3000 rows 90 s after the restart\n{w.text()[-3000:]}",
        )
        print(f"3000 rows {time.monotonic() - restarted:.1f} s after the last restart")
        time.sleep(1)  # a duplicate row would show now
        one_row_each(read_rows(w.csv), {p.name for p in staging})
        text = w.text()
        print("\n".join(line for line in text.splitlines() if "again" in line))
        assert "Traceback" not in text, text[-5000:]
        assert w.stop() == 0

        for worker in workers:
            assert worker.proc is not None and worker.proc.poll() is None, worker.text()
        with Wire(server.url) as wire:
            names = {worker.name.replace("%h", socket.gethostname()) for worker in workers}

            def both_answer() -> bool:
                return {name for reply in wire.app.control.ping(timeout=1) for name in reply} >= names

            wait_for(both_answer, 60, "both workers to be connected again")
            served: set[str] = set()
            digits = dict(list(staging.items())[:8])
            for path in digits:
                shutil.copy(next(w.done.rglob(path.name)), path)

            def both_serve() -> bool:
                results = wire.classify(list(digits), message_size=1, timeout=60)
                assert [r.digit for r in results] == list(digits.values())
                served.update((r.worker or "").split("@")[0] for r in results)
                return served == {"alpha", "beta"}

            wait_for(both_serve, 60, "both workers to serve")
        for worker in workers:
            text = worker.text()
            assert "Traceback" not in text and "AttributeError" not in text, text
            # At most one warning per outage (a worker midway through reconnecting may ride a short
            # one out without a word), and each followed by its "back".
            assert 1 <= text.count("cannot reach") == text.count("is back after") <= 2, text
    finally:
        w.kill()
        for worker in workers:
            worker.stop()
        server.stop()


def queue_settles(url: str) -> Callable[[], bool]:
    """True once the queue is empty (the worker took every message)."""
    queue = redis.Redis.from_url(url)
    return lambda: queue.llen(QUEUE) == 0


@pytest.mark.timeout(180)
def test_a_permission_lost_mid_burst_is_said_once_and_the_files_get_their_rows_when_it_is_back(
    start_worker: Callable[..., WorkerProc], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """As a user whose permissions hold (root without DAC capabilities): a folder set to mode
    000 with its files in flight, a file at mode 000, a folder at mode 000 from the start. No
    `refused` or `not_found` row, no row naming no place; one warning each; their rows once the
    permission is back (issue 25, 17)."""
    import conftest

    from app.supervisor import worker_command

    prefix = no_dac()
    monkeypatch.setattr(conftest, "worker_command", lambda *a: [*prefix, *worker_command(*a)])
    worker = start_worker()
    w = Watch(worker.env, tmp_path)
    w.cmd = [*prefix, *w.cmd]
    staged = write_digits(tmp_path / "staging", 60)
    names = sorted(p.name for p in staged)
    closed, sub = w.inbox / "closed", w.inbox / "sub"
    for i, p in enumerate(staged):
        if i < 2:
            closed.mkdir(parents=True, exist_ok=True)
            os.rename(p, closed / p.name)
    closed.chmod(0)  # never readable to this producer until the end
    sub.mkdir()
    try:
        w.start()
        worker.signal(signal.SIGSTOP)  # the messages wait: their files are in flight
        rest = [p for p in staged if p.exists()]
        locked = rest.pop()
        locked.chmod(0)
        os.rename(locked, w.inbox / locked.name)
        for p in rest:
            os.rename(p, sub / p.name)
        time.sleep(2)  # sent
        sub.chmod(0)
        worker.signal(signal.SIGCONT)
        wait_for(queue_settles(worker.url), 30, w.text)
        later = write_digits(tmp_path / "later", 1, prefix="later")
        os.rename(next(iter(later)), w.inbox / "later.png")  # the watcher goes on meanwhile
        wait_for(lambda: count_rows(w.csv) >= 1, 30, w.text)
        time.sleep(1)
        rows = read_rows(w.csv)
        assert [Path(r["path"]).name for r in rows] == ["later.png"], rows
        text = w.text()
        for folder in (closed, sub, w.inbox / locked.name):
            assert text.count(f"cannot read {folder} (permission denied)") == 1, text
        sub.chmod(0o755)
        closed.chmod(0o755)
        (w.inbox / locked.name).chmod(0o644)
        wait_for(lambda: count_rows(w.csv) >= 61, 60, lambda: f"{count_rows(w.csv)} rows\n{w.text()}")
        time.sleep(1)
        rows = read_rows(w.csv)
        one_row_each(rows, {*names, "later.png"})
        assert all(r["error"] == "" for r in rows), [r for r in rows if r["error"]][:3]
        text = w.text()
        assert text.count("WARNING") == 3 and text.count("can be read again") == 3, text
        assert w.stop() == 0
        assert "Traceback" not in w.text()
    finally:
        for folder in (closed, sub):
            if folder.exists():
                folder.chmod(0o755)
        w.kill()


@pytest.mark.timeout(180)
def test_files_in_flight_when_the_inbox_is_renamed_get_no_row_and_one_each_when_back(
    start_worker: Callable[..., WorkerProc], tmp_path: Path
) -> None:
    worker = start_worker()
    w = Watch(worker.env, tmp_path)
    staged = write_digits(tmp_path / "staging", 200)
    w.inbox.mkdir()
    try:
        w.start()
        worker.signal(signal.SIGSTOP)  # the messages wait: their files are in flight
        for p in staged:
            os.rename(p, w.inbox / p.name)
        time.sleep(2)  # sent
        away = tmp_path / "inbox.away"
        os.rename(w.inbox, away)
        worker.signal(signal.SIGCONT)  # the worker finds none of them
        wait_for(queue_settles(worker.url), 30, w.text)
        time.sleep(2)
        assert read_rows(w.csv) == [], "rows for files that were not lost"
        os.rename(away, w.inbox)  # back: each one is taken, once
        wait_for(lambda: count_rows(w.csv) >= 200, 60, lambda: f"{count_rows(w.csv)} rows\n{w.text()}")
        time.sleep(1)
        rows = read_rows(w.csv)
        one_row_each(rows, {p.name for p in staged})
        assert all(r["error"] == "" for r in rows)
        text = w.text()
        assert text.count("WARNING") == 1 and "was removed or renamed" in text, text
        assert w.stop() == 0
    finally:
        w.kill()

"""The producer: real filesystem events, real Redis, real worker and watcher processes."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import helpers_run
import pytest
import redis
from conftest import WorkerProc, fresh_db, write_digits
from helpers_images import digit_image
from helpers_run import MNISTQ, read_rows
from PIL import Image

from api import Client
from mnistq.folders import Folders
from mnistq.protocol import ErrorKind, ExitCode, Reply, Result
from mnistq.settings import Settings
from producer.csvsink import CsvSink
from producer.events import Hints
from producer.inotify import InotifyHints
from producer.intake import EventKind
from producer.watcher import Watcher, WatchOptions

pytestmark = pytest.mark.timeout(180)


def wait_rows(path: Path, n: int, timeout: float = 60) -> list[dict[str, str]]:
    return helpers_run.wait_rows(path, n, timeout, settle=0.5)


class Watch:
    def __init__(self, worker: WorkerProc, root: Path, *extra: str) -> None:
        self.inbox, self.csv, self.log = root / "inbox", root / "out" / "results.csv", root / "watch.log"
        self.csv.parent.mkdir(parents=True, exist_ok=True)  # a CSV's folder must exist
        self.cmd = [*MNISTQ, "watch", "--inbox", str(self.inbox), "--csv", str(self.csv), *extra]
        self.env = {**worker.env, "MNISTQ_LOG_LEVEL": "INFO"}
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> Watch:
        with open(self.log, "ab") as out:
            self.proc = subprocess.Popen(self.cmd, env=self.env, stdout=out, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 30
        while "watching" not in self.log.read_text(errors="replace"):
            assert self.proc.poll() is None, self.log.read_text()
            assert time.monotonic() < deadline, "watcher did not start"
            time.sleep(0.05)
        return self

    def stop(self, sig: int = signal.SIGTERM) -> int:
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        return self.proc.wait(60)


@pytest.fixture
def watch(start_worker: Callable[..., WorkerProc], tmp_path: Path) -> Iterator[Callable[..., Watch]]:
    started: list[Watch] = []
    worker = start_worker()

    def make(*extra: str) -> Watch:
        w = Watch(worker, tmp_path, *extra)
        started.append(w)
        return w

    yield make
    for w in started:
        if w.proc and w.proc.poll() is None:
            w.proc.kill()
            w.proc.wait()


def test_every_way_a_file_arrives_gives_one_row(watch: Callable[..., Watch], tmp_path: Path) -> None:
    w = watch()
    staging = write_digits(tmp_path / "staging", 7)
    files = list(staging)
    w.inbox.mkdir(parents=True)
    shutil.copy(files[0], w.inbox / "at_start.png")
    w.start()
    os.rename(files[1], w.inbox / "moved.png")  # mv: atomic, no close event
    shutil.copy(files[2], w.inbox / "copied.png")
    os.link(files[6], w.inbox / "linked.png")  # a create with no open or close: it settles
    (w.inbox / "sub").mkdir()
    shutil.copy(files[3], w.inbox / "sub" / "in_subfolder.png")
    data = files[4].read_bytes()
    with open(w.inbox / "slow.png", "wb") as f:  # must not be read before it is complete
        for i in range(0, len(data), 64):
            f.write(data[i : i + 64])
            f.flush()
            time.sleep(0.05)
    for name in (".hidden.png", "download.png.part", "notes.txt", "backup.png~"):
        shutil.copy(files[5], w.inbox / name)
    rows = wait_rows(w.csv, 6)
    got = {Path(r["path"]).name: r for r in rows}
    assert len(rows) == 6
    names = ["at_start.png", "moved.png", "copied.png", "in_subfolder.png", "slow.png"]
    assert sorted(got) == sorted([*names, "linked.png"])
    expected = [staging[files[i]] for i in range(5)]
    assert [int(got[n]["digit"]) for n in names] == expected
    assert all(r["error"] == "" and r["model_version"] for r in rows)
    assert (w.csv.parent / "done" / "sub" / "in_subfolder.png").exists()
    assert sorted(p.name for p in w.inbox.iterdir()) == [
        ".hidden.png",
        ".mnistq.lock",  # the running watcher's (hidden: never work)
        "backup.png~",
        "download.png.part",
        "notes.txt",
        "sub",
    ]
    assert w.stop() == 0


def test_bad_inputs_get_error_rows_and_the_watcher_goes_on(
    watch: Callable[..., Watch], tmp_path: Path
) -> None:
    w = watch()
    w.start()
    good = write_digits(tmp_path / "g", 1)
    png = next(iter(good)).read_bytes()
    bad = {
        "empty.png": b"",
        "truncated.png": png[: len(png) // 2],
        "text.jpg": b"hello, I am text",
    }
    for name, content in bad.items():
        (w.inbox / name).write_bytes(content)
    (w.inbox / "x.png").mkdir()
    Image.new("L", (8000, 6000)).save(w.inbox / "huge.png")  # 48 Mpx: over the default limit
    odd = ["com,ma.png", 'quo"te.png', "ünï©ødé 数字.png", "=SUM(A1).png", "-1+1.png"]
    for name in odd:
        Image.fromarray(digit_image(7)).save(w.inbox / name)
    rows = wait_rows(w.csv, 5 + len(odd))
    by_name = {Path(r["path"]).name: r for r in rows}
    assert len(rows) == len(by_name) == 5 + len(odd)
    assert "empty" in by_name["empty.png"]["error"]
    assert by_name["truncated.png"]["error"]
    assert "not an image" in by_name["text.jpg"]["error"]
    assert "directory" in by_name["x.png"]["error"]
    assert "too large" in by_name["huge.png"]["error"]
    for name in odd:
        assert by_name[name]["digit"] == "7" and by_name[name]["error"] == ""
    assert (w.csv.parent / "failed" / "empty.png").exists()
    # still going
    Image.fromarray(digit_image(0)).save(w.inbox / "after.png")
    rows = wait_rows(w.csv, 6 + len(odd))
    assert {Path(r["path"]).name: r["digit"] for r in rows}["after.png"] == "0"
    w.stop()


def test_producer_killed_mid_burst_writes_each_row_once(watch: Callable[..., Watch], tmp_path: Path) -> None:
    w = watch()
    files = write_digits(w.inbox, 400)
    w.env["MNISTQ_BATCH_SIZE"] = "16"
    w.start()
    deadline = time.monotonic() + 60
    while len(read_rows(w.csv)) < 20:
        assert time.monotonic() < deadline
        time.sleep(0.01)
    w.stop(signal.SIGKILL)
    assert len(read_rows(w.csv)) < len(files), "finished before the kill; nothing was tested"
    w.start()
    rows = wait_rows(w.csv, len(files), timeout=120)
    assert sorted(Path(r["path"]).name for r in rows) == sorted(p.name for p in files)
    assert all(int(r["digit"]) == files[Path(r["path"])] for r in rows)
    assert [p.name for p in w.inbox.iterdir()] == [".mnistq.lock"]  # the running watcher's
    w.stop()


def test_polling_keep_and_dropping_a_name_again(watch: Callable[..., Watch], tmp_path: Path) -> None:
    w = watch("--polling", "--keep")
    w.start()
    src = write_digits(tmp_path / "src", 2)
    a, b = list(src)
    shutil.copy(a, w.inbox / "a.png")
    wait_rows(w.csv, 1, timeout=30)
    assert (w.inbox / "a.png").exists()  # --keep
    w.stop()
    w.start()  # a restart does not redo what the CSV records
    time.sleep(2)
    assert len(read_rows(w.csv)) == 1
    os.unlink(w.inbox / "a.png")
    shutil.copy(b, w.inbox / "a.png")  # same name, new file: new work
    rows = wait_rows(w.csv, 2, timeout=30)
    assert [int(r["digit"]) for r in rows] == [src[a], src[b]]
    assert rows[0]["id"] != rows[1]["id"]
    w.stop()


def test_client_enqueue_progress_and_classify_cli(
    start_worker: Callable[..., WorkerProc], tmp_path: Path
) -> None:
    worker = start_worker()
    files = write_digits(tmp_path / "c", 30)
    with Client(worker.url, message_size=8) as client:
        job = client.enqueue(list(files))
        assert job.total == 30 and len(job.tasks) == 4
        seen = [r.path for r in job.as_completed(timeout=60)]
        assert sorted(seen) == sorted(str(p) for p in files) and job.done == 30
        assert [r.digit for r in job.results()] == list(files.values())
    one = next(iter(files))
    out = subprocess.run(
        [*MNISTQ, "classify", str(one)], env=worker.env, capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith(f"Predicted Digit: {files[one]}")
    # The reply lists are the channel: Celery stores no result of its own.
    assert redis.Redis.from_url(worker.url).keys("celery-task-meta-*") == []


def test_a_jobs_progress_moves_with_each_result_handed_out(shared_worker: WorkerProc) -> None:
    """The README's f"{job.done}/{job.total}": 1/20 ... 20/20, though one message brings all 20."""
    root: Path = shared_worker.root  # type: ignore[attr-defined]
    files = write_digits(root / "progress", 20)
    with Client(shared_worker.url) as client:
        job = client.enqueue(list(files))
        assert len(job.tasks) == 1 and job.done == 0
        seen = [f"{job.done}/{job.total}" for _ in job.as_completed(timeout=60)]
        assert seen == [f"{i}/20" for i in range(1, 21)]
        assert job.done == job.received == 20


def test_classify_says_a_refused_file_on_its_line_and_exits_5_as_predict_does(
    shared_worker: WorkerProc, tmp_path: Path
) -> None:
    """A file outside the allowed roots is an ordinary outcome (exit 5), not a bug (1)."""
    root: Path = shared_worker.root  # type: ignore[attr-defined]
    good = write_digits(root / "classify-exit", 2)
    outside = next(iter(write_digits(tmp_path / "elsewhere", 1)))
    paths = [*map(str, good), str(outside)]
    out = subprocess.run(
        [*MNISTQ, "classify", *paths], env=shared_worker.env, capture_output=True, text=True, timeout=60
    )
    assert out.returncode == ExitCode.FAILED_INPUT == 5, out.stderr
    assert out.stderr.splitlines() == [f"{outside}: error: {out.stderr.split(': error: ', 1)[1].strip()}"]
    assert "outside the allowed" in out.stderr and "Traceback" not in out.stderr
    lines = out.stdout.splitlines()  # the others are classified, each naming its model
    assert [line.split(": Predicted Digit: ")[0] for line in lines] == paths[:2]
    assert all(", model " in line for line in lines), lines


def test_watch_drain_does_the_inbox_and_exits(watch: Callable[..., Watch]) -> None:
    w = watch("--drain")
    files = write_digits(w.inbox, 5)
    w.csv.write_text("path,digit,confidence,model_version,error,id,finished_at\r\n")  # an older header
    w.start()
    assert w.proc is not None and w.proc.wait(60) == 0
    rows = read_rows(w.csv)
    assert {Path(r["path"]).name: int(r["digit"]) for r in rows} == {p.name: d for p, d in files.items()}
    assert list(rows[0]) == ["path", "digit", "confidence", "model_version", "error", "id", "finished_at"]
    assert list(w.inbox.iterdir()) == []
    assert "done 5 (0 failed)" in w.log.read_text()


@pytest.mark.system
def test_watch_refuses_a_csv_that_is_not_a_results_file(tmp_path: Path) -> None:
    theirs = tmp_path / "theirs.csv"
    theirs.write_bytes(b"name,score\r\nalice,3\r\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith("MNISTQ_")}
    env["REDIS_URL"] = "redis://127.0.0.1:9/0"  # never reached: the CSV is checked first
    out = subprocess.run(
        [*MNISTQ, "watch", "--drain", "--inbox", str(tmp_path / "inbox"), "--csv", str(theirs)],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == ExitCode.CONFIG, out.stderr
    assert f"{theirs} is not a mnist-queue results file" in out.stderr
    assert theirs.read_bytes() == b"name,score\r\nalice,3\r\n"


class MiscountingClient(Client):
    """A real client on a real Redis whose "worker" (this send) answers one result short."""

    def send(
        self,
        paths: Sequence[str],
        ids: Sequence[str] | None = None,
        *,
        task_id: str | None = None,
        probabilities: bool = False,
        review_below: str | float | None = None,
    ) -> str:
        task_id = task_id or "t-" + os.urandom(8).hex()
        file_ids = list(ids) if ids else [None] * len(paths)
        results = [
            Result(path=p, id=i, digit=0, confidence=1.0, model_version="v")
            for p, i in zip(paths, file_ids, strict=True)
        ]
        self.redis.rpush(self.reply_to, Reply(task_id, results[:-1]).dumps())
        return task_id


def test_a_reply_with_the_wrong_count_gives_error_rows_not_a_crash(
    redis_server: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    url = fresh_db(redis_server)
    files = write_digits(tmp_path / "inbox", 3)
    opts = WatchOptions(
        Folders.of(tmp_path / "inbox", tmp_path / "results.csv", tmp_path / "done", tmp_path / "failed"),
        drain=True,
    )
    with MiscountingClient(url, settings=Settings(redis_url=url)) as client:
        client.redis.rpush(client.reply_to, b"{not json")  # and an unreadable reply before it
        sink = CsvSink(tmp_path / "results.csv")
        progress = Watcher(client, sink, opts).run()
        sink.close()
        # The Python API, on the same bad answer: error results, no exception.
        results = client.classify(list(files), timeout=30)
    rows = read_rows(tmp_path / "results.csv")
    assert sorted(Path(r["path"]).name for r in rows) == sorted(p.name for p in files)
    assert {(r["digit"], r["error_kind"]) for r in rows} == {("", "internal")}
    assert sorted(p.name for p in (tmp_path / "failed").iterdir()) == sorted(p.name for p in files)
    assert progress.done == progress.failed == 3 and progress.abandoned == 0
    assert any("2 results for 3 files" in m for m in caplog.messages)
    assert any("unreadable reply" in m for m in caplog.messages)
    assert [(r.path, r.error_kind) for r in results] == [(str(p), ErrorKind.INTERNAL) for p in files]


def test_a_second_producer_on_the_same_inbox_or_csv_is_refused(
    watch: Callable[..., Watch], tmp_path: Path
) -> None:
    first = watch().start()
    assert first.proc is not None
    other_csv, other_inbox = tmp_path / "other.csv", tmp_path / "other-inbox"
    attempts = [
        (["watch", "--inbox", str(first.inbox), "--csv", str(other_csv)], "watching"),
        (["watch", "--inbox", str(other_inbox), "--csv", str(first.csv)], "writing"),
        (["classify", "--csv", str(first.csv), str(tmp_path / "x.png")], "writing"),
        # a folder inside its inbox, or one that holds it: the same files, a row in each CSV
        (
            ["watch", "--inbox", str(first.inbox / "sub"), "--csv", str(other_csv)],
            f"watching {first.inbox}, which",
        ),
        (["watch", "--inbox", str(tmp_path), "--csv", str(other_csv)], f"watching {first.inbox}, inside"),
    ]
    for args, what in attempts:
        started = time.monotonic()
        out = subprocess.run(
            [*MNISTQ, *args],
            env=first.env,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert out.returncode == ExitCode.CONFIG, out.stderr
        assert out.stderr.count("\n") == 1 and "Traceback" not in out.stderr, out.stderr
        assert f"another producer (pid {first.proc.pid}) is already {what}" in out.stderr
        assert time.monotonic() - started < 30
    assert not other_csv.exists() and not other_inbox.exists(), "the refused one created something"
    assert not (first.inbox / "sub").exists()
    staged = write_digits(tmp_path / "staging", 12)
    for path in staged:
        os.rename(path, first.inbox / path.name)
    rows = wait_rows(first.csv, len(staged))
    assert sorted(Path(r["path"]).name for r in rows) == sorted(p.name for p in staged)  # each once
    assert first.stop() == 0
    # A clean stop gives the locks up and leaves no lock file behind.
    assert not (first.inbox / ".mnistq.lock").exists()
    assert not (first.csv.parent / ".results.csv.lock").exists()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="inotify is Linux's")
def test_inotify_hints_follow_arrivals_writers_and_folders(tmp_path: Path) -> None:
    """The event source alone (no broker, no worker): which events become which hints."""
    inbox, staging, away = tmp_path / "inbox", tmp_path / "staging", tmp_path / "away"
    (inbox / "done").mkdir(parents=True)
    (staging / "sub").mkdir(parents=True)
    busy = {str(inbox / "busy.png")}
    hints = Hints(1000)
    source = InotifyHints(inbox, hints, [inbox / "done"], busy.__contains__)
    source.start()
    got: list[tuple[EventKind, str]] = []

    def until(path: Path, kind: EventKind) -> None:
        deadline = time.monotonic() + 10
        while (kind, str(path)) not in got:
            assert time.monotonic() < deadline, got
            got.extend(hints.take(0.05)[0])

    try:
        (staging / "a.png").write_bytes(b"x")
        os.rename(staging / "a.png", inbox / "a.png")  # moved in whole
        with open(inbox / "b.png", "wb") as f:  # written in place
            f.write(b"x")
        (inbox / "busy.png").write_bytes(b"x")  # in flight: a worker's open and close mean nothing
        (inbox / "done" / "c.png").write_bytes(b"x")  # our own folder: not watched
        (inbox / "notes.txt").write_bytes(b"x")  # not an image
        (staging / "sub" / "d.png").write_bytes(b"x")
        os.rename(staging / "sub", inbox / "sub")  # a folder moved in: what it holds, as created
        until(inbox / "sub" / "d.png", EventKind.CREATED)
        with open(inbox / "sub" / "e.png", "wb") as f:  # and it is watched from then on
            f.write(b"x")
        until(inbox / "sub" / "e.png", EventKind.CLOSED_WRITE)
        os.rename(inbox / "sub", away)  # moved out: its watches go with it
        (away / "f.png").write_bytes(b"x")
        (staging / "z.png").write_bytes(b"x")
        os.rename(staging / "z.png", inbox / "z.png")
        until(inbox / "z.png", EventKind.MOVED_IN)
    finally:
        source.stop()
        source.join(5)
    by_path: dict[str, list[EventKind]] = {}
    for kind, path in got:
        by_path.setdefault(os.path.relpath(path, inbox), []).append(kind)
    written = [EventKind.CREATED, EventKind.OPENED, EventKind.MODIFIED, EventKind.CLOSED_WRITE]
    assert by_path == {
        "a.png": [EventKind.MOVED_IN],
        "b.png": written,
        "sub/d.png": [EventKind.CREATED],
        "sub/e.png": written,
        "z.png": [EventKind.MOVED_IN],
    }


def test_an_inbox_removed_and_made_again_is_locked_and_watched_at_once(
    watch: Callable[..., Watch], tmp_path: Path
) -> None:
    """`rm -rf inbox; mkdir inbox; cp x.png inbox/` under a running producer (issue 25, 1): one
    warning; a second producer is refused while the folder is gone and after it is back; the
    new folder has its lock and its files are taken at once, not by a rescan 30 s later."""
    first = watch().start()
    assert first.proc is not None
    beside = tmp_path / ".inbox.mnistq.lock"  # the lock that outlives the folder
    other_csv = tmp_path / "other.csv"
    second = [*MNISTQ, "watch", "--drain", "--inbox", str(first.inbox), "--csv", str(other_csv)]

    def refused() -> None:
        out = subprocess.run(second, env=first.env, capture_output=True, text=True, timeout=60)
        assert out.returncode == ExitCode.CONFIG, out.stderr
        assert f"another producer (pid {first.proc.pid}) is already watching {first.inbox}" in out.stderr
        assert out.stderr.count("\n") == 1, out.stderr

    shutil.rmtree(first.inbox)
    time.sleep(0.5)
    refused()  # the inbox is gone: the lock beside it holds
    assert not first.inbox.exists()  # the refused one made nothing
    first.inbox.mkdir()
    staged = write_digits(tmp_path / "staging", 1)
    shutil.copy(next(iter(staged)), first.inbox / "x.png")
    started = time.monotonic()
    rows = helpers_run.wait_rows(first.csv, 1, timeout=20)
    assert time.monotonic() - started < 10, "found by a rescan, not at once"
    assert [Path(r["path"]).name for r in rows] == ["x.png"] and rows[0]["error"] == ""
    assert (first.inbox / ".mnistq.lock").exists()
    refused()
    assert not other_csv.exists()
    log = first.log.read_text()
    assert log.count("WARNING") == 1 and "was removed or renamed" in log, log
    assert first.stop() == 0
    assert not beside.exists() and not (first.inbox / ".mnistq.lock").exists()

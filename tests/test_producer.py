"""The producer: real filesystem events, real Redis, real worker and watcher processes."""

from __future__ import annotations

import csv
import os
import shutil
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from conftest import WorkerProc, write_digits
from helpers_images import SHIPPED_MODEL, digit_image
from PIL import Image

from producer import Client
from producer.csvsink import CsvSink

pytestmark = pytest.mark.timeout(180)
MNISTQ = [sys.executable, "-c", "import sys; from mnistq.cli import main; sys.exit(main())"]


def read_rows(path: Path) -> list[dict[str, str]]:
    if not path.exists():
        return []
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def wait_rows(path: Path, n: int, timeout: float = 60) -> list[dict[str, str]]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        rows = read_rows(path)
        if len(rows) >= n:
            time.sleep(0.5)  # anything extra (a duplicate) would show up now
            return read_rows(path)
        time.sleep(0.05)
    pytest.fail(f"{len(read_rows(path))} of {n} rows after {timeout}s")


class Watch:
    def __init__(self, worker: WorkerProc, root: Path, *extra: str) -> None:
        self.inbox, self.csv, self.log = root / "inbox", root / "out" / "results.csv", root / "watch.log"
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
    staging = write_digits(tmp_path / "staging", 6)
    files = list(staging)
    w.inbox.mkdir(parents=True)
    shutil.copy(files[0], w.inbox / "at_start.png")
    w.start()
    os.rename(files[1], w.inbox / "moved.png")  # mv: atomic, no close event
    shutil.copy(files[2], w.inbox / "copied.png")
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
    rows = wait_rows(w.csv, 5)
    got = {Path(r["path"]).name: r for r in rows}
    assert sorted(got) == ["at_start.png", "copied.png", "in_subfolder.png", "moved.png", "slow.png"]
    expected = [staging[files[i]] for i in range(5)]
    names = ["at_start.png", "moved.png", "copied.png", "in_subfolder.png", "slow.png"]
    assert [int(got[n]["digit"]) for n in names] == expected
    assert all(r["error"] == "" and r["model_version"] for r in rows)
    assert (w.csv.parent / "done" / "sub" / "in_subfolder.png").exists()
    assert sorted(p.name for p in w.inbox.iterdir()) == [
        ".hidden.png",
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
    assert list(w.inbox.iterdir()) == []
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


def test_csv_sink_neutralises_formulas_and_survives_a_torn_row(tmp_path: Path) -> None:
    out = tmp_path / "r.csv"
    sink = CsvSink(out)
    assert sink.write(
        {
            "path": "=HYPERLINK(1)",
            "digit": 3,
            "confidence": 0.5,
            "model_version": "v",
            "error": "@x",
            "id": "a",
        }
    )
    assert not sink.write({"path": "again", "id": "a"})  # same file id: no second row
    sink.close()
    with open(out, "ab") as f:
        f.write(b"/half,writ")  # what a crash mid-write would leave
    sink = CsvSink(out)
    assert sink.done == {"a"}
    sink.write(
        {"path": "/ok.png", "digit": 1, "confidence": 0.9, "model_version": "v", "error": None, "id": "b"}
    )
    sink.close()
    rows = read_rows(out)
    assert [r["path"] for r in rows] == ["'=HYPERLINK(1)", "/ok.png"]
    assert rows[0]["error"] == "'@x"


def test_csv_sink_keeps_a_file_written_with_plain_newlines(tmp_path: Path) -> None:
    out = tmp_path / "r.csv"
    out.write_text("path,digit,confidence,model_version,error,id,finished_at\n/a.png,1,0.9,v,,x1,t\n")
    sink = CsvSink(out)
    assert sink.done == {"x1"}
    sink.close()
    assert [r["path"] for r in read_rows(out)] == ["/a.png"]


def test_client_enqueue_progress_and_classify_cli(
    start_worker: Callable[..., WorkerProc], tmp_path: Path
) -> None:
    worker = start_worker()
    files = write_digits(tmp_path / "c", 30)
    with Client(worker.url, batch_size=8) as client:
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


def _descendants(pid: int) -> set[int]:
    parents = {}
    for p in filter(str.isdigit, os.listdir("/proc")):
        try:
            stat = Path(f"/proc/{p}/stat").read_text()
        except OSError:
            continue
        parents[int(p)] = int(stat.rsplit(")", 1)[1].split()[1])
    found, frontier = set(), {pid}
    while frontier:
        frontier = {c for c, parent in parents.items() if parent in frontier} - found
        found |= frontier
    return found


def _alive(pids: set[int]) -> set[int]:
    alive = set()
    for pid in pids:
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if state != "Z":
            alive.add(pid)
    return alive


def _marked_processes(marker: str) -> list[int]:
    pids = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            if marker.encode() in Path(f"/proc/{pid}/environ").read_bytes():
                pids.append(int(pid))
        except OSError:
            continue
    return pids


def test_run_drain_with_embedded_redis_leaves_nothing_running(tmp_path: Path) -> None:
    files = write_digits(tmp_path / "inbox", 12)
    (tmp_path / "inbox" / "bad.png").write_text("nope")
    marker = f"MNISTQ_TEST_MARK={uuid.uuid4().hex}"
    env = {k: v for k, v in os.environ.items() if k != "REDIS_URL" and not k.startswith("MNISTQ_")}
    env.update(MNISTQ_MODEL=str(SHIPPED_MODEL), **dict([marker.split("=")]))
    out = subprocess.run(
        [*MNISTQ, "run", "--drain"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=150
    )
    assert out.returncode == 0, out.stderr
    rows = read_rows(tmp_path / "results.csv")
    assert len(rows) == 13
    assert {Path(r["path"]).name: r["digit"] for r in rows if not r["error"]} == {
        p.name: str(d) for p, d in files.items()
    }
    assert str(tmp_path / "inbox") in out.stderr and "results.csv" in out.stderr
    assert _marked_processes(marker) == []


def test_run_stops_everything_on_sigterm(tmp_path: Path) -> None:
    marker = f"MNISTQ_TEST_MARK={uuid.uuid4().hex}"
    env = {k: v for k, v in os.environ.items() if k != "REDIS_URL" and not k.startswith("MNISTQ_")}
    env.update(MNISTQ_MODEL=str(SHIPPED_MODEL), **dict([marker.split("=")]))
    proc = subprocess.Popen([*MNISTQ, "run"], cwd=tmp_path, env=env, stderr=subprocess.PIPE, text=True)
    try:
        inbox = tmp_path / "inbox"
        deadline = time.monotonic() + 60
        while not inbox.exists():
            assert time.monotonic() < deadline
            time.sleep(0.05)
        write_digits(tmp_path / "staging", 1)
        os.rename(next((tmp_path / "staging").iterdir()), inbox / "one.png")
        wait_rows(tmp_path / "results.csv", 1, timeout=60)
        children = _descendants(proc.pid)
        assert len(children) >= 2  # Redis and a worker
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
    time.sleep(0.5)
    assert _alive(children) == set()
    assert _marked_processes(marker) == []

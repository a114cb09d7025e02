"""`mnistq run`: real processes, real signals, the embedded Redis.

Each run starts in a session of its own, as a shell starts a foreground job, so a signal to its
process group is what a terminal's Ctrl-C sends. Every process a run starts carries a marker in
its environment, so the tests can prove that nothing outlives it (and clean up if one did).
"""

from __future__ import annotations

import csv
import os
import re
import signal
import subprocess
import sys
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import redis
from conftest import write_digits
from helpers_images import SHIPPED_MODEL

from mnistq.protocol import ExitCode

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
            return rows
        time.sleep(0.05)
    pytest.fail(f"{len(read_rows(path))} of {n} rows after {timeout}s")


def _children(pid: int) -> set[int]:
    found = set()
    for p in filter(str.isdigit, os.listdir("/proc")):
        try:
            stat = Path(f"/proc/{p}/stat").read_text()
        except OSError:
            continue
        if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
            found.add(int(p))
    return found


def _cmdline(pid: int) -> list[str]:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace").split("\0")
    except OSError:
        return []


def _marked_processes(marker: str) -> list[int]:
    """Live processes (zombies excluded) with ``marker`` in their environment."""
    pids = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            if marker.encode() not in Path(f"/proc/{pid}/environ").read_bytes():
                continue
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if state != "Z":
            pids.append(int(pid))
    return pids


def _gone(marker: str, timeout: float) -> list[int]:
    deadline = time.monotonic() + timeout
    while (left := _marked_processes(marker)) and time.monotonic() < deadline:
        time.sleep(0.1)
    return left


def run_env(marker: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "REDIS_URL" and not k.startswith("MNISTQ_")}
    return {**env, "MNISTQ_MODEL": str(SHIPPED_MODEL), "MNISTQ_TEST_MARK": marker}


class Run:
    """`mnistq run` in ``folder`` (its default inbox and CSV), output in ``run.log``."""

    def __init__(self, folder: Path, *args: str) -> None:
        self.folder, self.inbox, self.csv = folder, folder / "inbox", folder / "results.csv"
        self.log = folder / "run.log"
        self.marker = uuid.uuid4().hex
        with open(self.log, "ab") as out:
            self.proc = subprocess.Popen(
                [*MNISTQ, "run", *args],
                cwd=folder,
                env=run_env(self.marker),
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def wait_ready(self, timeout: float = 90) -> None:
        """A warm-up file's row: Redis, a worker and the watcher are all up."""
        deadline = time.monotonic() + timeout
        while not self.inbox.exists():
            assert self.proc.poll() is None, self.output()
            assert time.monotonic() < deadline, self.output()
            time.sleep(0.05)
        staged = write_digits(self.folder / "warm", 1, prefix="warm")
        os.rename(next(iter(staged)), self.inbox / "warm.png")
        wait_rows(self.csv, 1, timeout=max(1.0, deadline - time.monotonic()))

    def killpg(self, sig: int) -> None:
        os.killpg(self.proc.pid, sig)

    def wait(self, timeout: float = 90) -> int:
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            pytest.fail(f"mnistq run still running after {timeout}s:\n{self.output()}")

    def redis_server(self) -> tuple[int, int] | None:
        """(pid, port) of the embedded Redis, if one is running."""
        for pid in _children(self.proc.pid):
            title = " ".join(_cmdline(pid))  # redis-server sets it to "redis-server 127.0.0.1:PORT"
            if m := re.search(r"redis-server\S* 127\.0\.0\.1:(\d+)", title):
                return pid, int(m[1])
        return None


@pytest.fixture
def start_run(tmp_path: Path) -> Iterator[Callable[..., Run]]:
    runs: list[Run] = []

    def start(*args: str) -> Run:
        runs.append(Run(tmp_path, *args))
        return runs[-1]

    yield start
    for run in runs:  # a failed test must not leave a run or its children behind
        if run.proc.poll() is None:
            run.proc.kill()
            run.proc.wait()
        for pid in _marked_processes(run.marker):
            os.kill(pid, signal.SIGKILL)


def test_run_drain_with_embedded_redis_leaves_nothing_running(tmp_path: Path) -> None:
    files = write_digits(tmp_path / "inbox", 12)
    (tmp_path / "inbox" / "bad.png").write_text("nope")
    marker = uuid.uuid4().hex
    out = subprocess.run(
        [*MNISTQ, "run", "--drain", "--workers", "1"],
        cwd=tmp_path,
        env=run_env(marker),
        capture_output=True,
        text=True,
        timeout=150,
    )
    assert out.returncode == 0, out.stderr
    rows = read_rows(tmp_path / "results.csv")
    assert len(rows) == 13
    assert {Path(r["path"]).name: r["digit"] for r in rows if not r["error"]} == {
        p.name: str(d) for p, d in files.items()
    }
    assert str(tmp_path / "inbox") in out.stderr and "results.csv" in out.stderr
    assert "Traceback" not in out.stderr
    assert _gone(marker, 5) == []


def test_run_stops_everything_on_sigterm(start_run: Callable[..., Run]) -> None:
    run = start_run("--workers", "1")
    run.wait_ready()
    children = _children(run.proc.pid)
    assert len(children) >= 2  # Redis and a worker
    # Each in a session of its own: a terminal's Ctrl-C reaches only `mnistq run`.
    assert all(os.getpgid(c) == c != os.getpgid(run.proc.pid) for c in children)
    run.proc.send_signal(signal.SIGTERM)
    assert run.wait(60) == 0, run.output()
    assert "Traceback" not in run.output()
    assert _gone(run.marker, 5) == []


def test_sigint_to_the_process_group_mid_burst_then_a_second_start_finishes_the_rest(
    start_run: Callable[..., Run], tmp_path: Path
) -> None:
    run = start_run("--workers", "2")
    run.wait_ready()
    files = [p.name for p in write_digits(tmp_path / "staging", 1500)]
    for name in files:
        os.rename(tmp_path / "staging" / name, run.inbox / name)
    wait_rows(run.csv, 2)  # the burst is being worked on
    run.killpg(signal.SIGINT)
    time.sleep(0.5)  # intake has stopped: these wait for the next start
    late = [p.name for p in write_digits(tmp_path / "late", 50, prefix="late")]
    for name in late:
        os.rename(tmp_path / "late" / name, run.inbox / name)
    files += late
    assert run.wait(120) == 0, run.output()
    assert "Traceback" not in run.output()
    assert _gone(run.marker, 5) == []

    rows = Counter(Path(r["path"]).name for r in read_rows(run.csv))
    left = {p.name for p in run.inbox.iterdir()}
    for name in files:  # its one row, or still in the inbox: the next start's backlog
        assert (rows[name], name in left) in ((1, False), (0, True)), (name, rows[name])
    assert set(late) <= left

    again = subprocess.run(
        [*MNISTQ, "run", "--drain", "--workers", "1"],
        cwd=tmp_path,
        env=run_env(run.marker),
        capture_output=True,
        text=True,
        timeout=150,
    )
    assert again.returncode == 0, again.stderr
    rows = Counter(Path(r["path"]).name for r in read_rows(run.csv))
    assert {name: rows[name] for name in files} == dict.fromkeys(files, 1)
    assert not set(files) & {p.name for p in run.inbox.iterdir()}


def test_a_second_sigint_stops_at_once_with_130(start_run: Callable[..., Run], tmp_path: Path) -> None:
    run = start_run("--workers", "1")
    run.wait_ready()
    for path in write_digits(tmp_path / "staging", 400):
        os.rename(path, run.inbox / path.name)
    run.killpg(signal.SIGINT)
    time.sleep(0.2)
    run.killpg(signal.SIGINT)
    assert run.wait(30) == ExitCode.INTERRUPTED, run.output()
    out = run.output()
    assert "stopped at once" in out and "stay in" in out
    assert "Traceback" not in out
    assert _gone(run.marker, 5) == []


def test_children_die_with_a_killed_run(start_run: Callable[..., Run]) -> None:
    run = start_run("--workers", "1")
    run.wait_ready()
    run.proc.kill()  # no chance to stop anything: PR_SET_PDEATHSIG must
    run.proc.wait()
    assert _gone(run.marker, 30) == []


def test_embedded_redis_killed_is_restarted_on_the_same_port(
    start_run: Callable[..., Run], tmp_path: Path
) -> None:
    run = start_run("--workers", "1")
    run.wait_ready()
    first = run.redis_server()
    assert first is not None
    os.kill(first[0], signal.SIGKILL)
    deadline = time.monotonic() + 30
    while (now := run.redis_server()) is None or now[0] == first[0]:
        assert time.monotonic() < deadline, run.output()
        time.sleep(0.1)
    assert now[1] == first[1]  # the same port: every client keeps its URL
    assert redis.Redis(port=now[1], socket_connect_timeout=5).ping()
    # The run goes on: new files get their rows through the new server.
    for path in write_digits(tmp_path / "after", 3, prefix="after"):
        os.rename(path, run.inbox / path.name)
    wait_rows(run.csv, 4, timeout=120)
    run.proc.send_signal(signal.SIGTERM)
    assert run.wait(60) == 0, run.output()
    assert _gone(run.marker, 5) == []


@pytest.mark.parametrize("value", ["0", "-1", "two"])
def test_workers_below_one_is_one_line(tmp_path: Path, value: str) -> None:
    out = subprocess.run(
        [*MNISTQ, "run", "--workers", value],
        cwd=tmp_path,
        env=run_env(uuid.uuid4().hex),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 2
    assert out.stderr.count("\n") == 1 and "--workers" in out.stderr, out.stderr
    assert out.stdout == "" and not (tmp_path / "inbox").exists()


def test_a_worker_that_cannot_load_its_model_stops_the_run_with_3(tmp_path: Path) -> None:
    marker = uuid.uuid4().hex
    out = subprocess.run(
        [*MNISTQ, "run", "--workers", "1"],
        cwd=tmp_path,
        env={**run_env(marker), "MNISTQ_MODEL": str(tmp_path / "missing.pt")},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == ExitCode.MODEL, out.stderr
    assert "Traceback" not in out.stderr
    assert out.stderr.count("mnistq run: error:") == 1, out.stderr
    assert _gone(marker, 5) == []

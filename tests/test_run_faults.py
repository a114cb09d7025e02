"""`mnistq run` off the happy path: its embedded Redis killed mid-burst, and a failure that leaves
work in flight undone (see helpers_run.py for how runs are started). A broker that is down when the
run starts: the `run` case of test_worker_broker.py's dead-broker test."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import pytest
from conftest import write_digits
from helpers_images import SHIPPED_MODEL
from helpers_run import MNISTQ, Run, children, cmdline, gone, read_rows, run_env, wait_rows

from mnistq.protocol import ExitCode

pytestmark = [pytest.mark.system, pytest.mark.timeout(240)]


def move_in(run: Run, files: dict[Path, int]) -> list[str]:
    for path in files:
        os.rename(path, run.inbox / path.name)
    return [p.name for p in files]


def one_row_each(run: Run, names: list[str]) -> None:
    rows = read_rows(run.csv)
    counts = Counter(Path(r["path"]).name for r in rows)
    assert {n: counts[n] for n in names} == dict.fromkeys(names, 1)
    assert not [r for r in rows if r["error"]], "error rows"


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

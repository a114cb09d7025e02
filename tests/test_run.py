"""`mnistq run`: real processes, real signals, the embedded Redis (see helpers_run.py)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import uuid
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import pytest
from conftest import write_digits
from helpers_images import SHIPPED_MODEL
from helpers_run import MNISTQ, Run, children, gone, read_rows, run_env, wait_rows

from mnistq.protocol import ExitCode
from mnistq.settings import RUN_STATE_NAME, Settings
from model import load_checkpoint

pytestmark = [pytest.mark.system, pytest.mark.timeout(180)]


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
    # As root (a container, CI): one line of ours, not Celery's six per worker.
    assert "superuser" not in out.stderr
    assert ("running as root" in out.stderr) == (os.geteuid() == 0), out.stderr
    assert gone(marker, 5) == []


def test_a_run_says_ready_serves_the_commands_beside_it_and_stops_on_sigterm(
    start_run: Callable[..., Run], tmp_path: Path
) -> None:
    """One run, from its first line to its last: a line says when the workers can classify
    ("watching" comes while they still load their model); its children are out of the terminal's
    reach; commands in its folder find its Redis and a second run there is refused; SIGTERM stops
    everything, exit 0, and its state file goes with it."""
    ((picture, digit),) = write_digits(tmp_path / "elsewhere", 1).items()
    roots = os.pathsep.join(str(tmp_path / d) for d in ("inbox", "elsewhere"))
    run = start_run("--workers", "1", env={"MNISTQ_ALLOWED_ROOTS": roots})
    deadline = time.monotonic() + 120
    while "ready: worker mnistq0 serves model " not in run.output():
        assert run.proc.poll() is None and time.monotonic() < deadline, run.output()
        time.sleep(0.1)
    version = load_checkpoint(SHIPPED_MODEL).version
    assert f"serves model {version}; files in {run.inbox} are classified now" in run.output()
    staged = write_digits(run.folder / "staged", 1)
    os.rename(next(iter(staged)), run.inbox / "a.png")  # a worker is up: its row comes at once
    assert [r["error"] for r in wait_rows(run.csv, 1, timeout=30)] == [""]

    kids = children(run.proc.pid)
    assert len(kids) >= 2  # Redis and a worker
    # Each in a session of its own: a terminal's Ctrl-C reaches only `mnistq run`.
    assert all(os.getpgid(c) == c != os.getpgid(run.proc.pid) for c in kids)

    state = tmp_path / RUN_STATE_NAME
    url = json.loads(state.read_text())["url"]
    assert url.startswith("redis://127.0.0.1:")
    # No REDIS_URL and the default settings, in the run's folder: its Redis is found.
    env = run_env(uuid.uuid4().hex)
    status = subprocess.run(
        [*MNISTQ, "status", "--json"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60
    )
    assert status.returncode == 0, status.stderr
    info = json.loads(status.stdout)
    assert info["broker"] == url and [w.split("@")[0] for w in info["workers"]] == ["mnistq0"]
    api = "import sys; from api import Client; r = Client().classify(sys.argv[1:], timeout=60)[0]; print(r.digit)"
    out = subprocess.run(
        [sys.executable, "-c", api, str(picture)],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=90,
    )
    assert out.stdout.strip() == str(digit), out.stderr

    # A second run on the same folder is refused before it starts anything.
    second = subprocess.run(
        [*MNISTQ, "run", "--workers", "1"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60
    )
    assert second.returncode == ExitCode.CONFIG, second.stderr
    assert second.stderr.count("\n") == 1 and f"pid {run.proc.pid}" in second.stderr, second.stderr
    assert "embedded Redis" not in second.stderr
    assert json.loads(state.read_text())["url"] == url

    run.proc.send_signal(signal.SIGTERM)
    assert run.wait(60) == 0, run.output()
    assert "Traceback" not in run.output() and run.output().count("ready: ") == 1, run.output()
    assert gone(run.marker, 5) == []
    assert not state.exists() and Settings.from_env({"MNISTQ_CSV": str(run.csv)}).redis_url is None
    after = subprocess.run(
        [*MNISTQ, "status"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60
    )
    assert after.returncode == ExitCode.CONFIG and "REDIS_URL is not set" in after.stderr, after.stderr


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
    assert gone(run.marker, 5) == []

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
    assert gone(run.marker, 5) == []


def test_children_die_with_a_killed_run(start_run: Callable[..., Run]) -> None:
    run = start_run("--workers", "1")
    run.wait_ready()
    run.proc.kill()  # no chance to stop anything: PR_SET_PDEATHSIG must
    run.proc.wait()
    assert gone(run.marker, 30) == []
    # Its state file stays behind, naming a dead process: ignored, and the next run replaces it.
    state = run.folder / RUN_STATE_NAME
    assert json.loads(state.read_text())["pid"] == run.proc.pid
    assert Settings.from_env({"MNISTQ_CSV": str(run.csv)}).redis_url is None
    following = start_run("--workers", "1")
    deadline = time.monotonic() + 60
    while Settings.from_env({"MNISTQ_CSV": str(run.csv)}).redis_url is None:
        assert following.proc.poll() is None and time.monotonic() < deadline, following.output()
        time.sleep(0.1)
    assert json.loads(state.read_text())["pid"] == following.proc.pid
    following.proc.send_signal(signal.SIGTERM)
    assert following.wait(60) == 0, following.output()
    assert not state.exists()


@pytest.mark.parametrize("after_s", [1.0, 2.5])
def test_ctrl_c_during_start_up_stops_cleanly(start_run: Callable[..., Run], after_s: float) -> None:
    run = start_run("--workers", "2")
    time.sleep(after_s)
    run.killpg(signal.SIGINT)
    assert run.wait(60) == 0, run.output()
    assert "Traceback" not in run.output()
    assert gone(run.marker, 5) == []
    assert not (run.folder / RUN_STATE_NAME).exists()


@pytest.mark.parametrize("value", ["0", "-1", "two", "100000"])
def test_workers_out_of_range_is_one_line(tmp_path: Path, value: str) -> None:
    """Below one, not a number, or past 4 a core (a typo that would start processes until the
    machine gave out): refused before anything starts."""
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
    assert gone(marker, 5) == []

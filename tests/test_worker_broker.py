"""A broker that is down, or goes down: `mnistq status` says so in one line, a worker waits for
it quietly and serves again when it is back. Real processes, a Redis of their own (killed here)."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import WorkerProc, write_digits
from helpers_images import SHIPPED_MODEL
from helpers_wire import Wire, wait_for

from app.embedded import EmbeddedRedis
from mnistq.protocol import ExitCode

pytestmark = pytest.mark.timeout(180)

MNISTQ = [sys.executable, "-c", "import sys; from app.cli import main; sys.exit(main())"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _env(url: str, root: Path) -> dict[str, str]:
    return {
        **{k: v for k, v in os.environ.items() if not k.startswith("MNISTQ_")},
        "REDIS_URL": url,
        "MNISTQ_ALLOWED_ROOTS": str(root),
        "MNISTQ_MODEL": str(SHIPPED_MODEL),
        "MNISTQ_THREADS": "1",
    }


def test_status_with_a_dead_broker_is_one_line_and_exit_2(tmp_path: Path) -> None:
    url = f"redis://:secret@127.0.0.1:{_free_port()}/0"
    t0 = time.monotonic()
    out = subprocess.run(
        [*MNISTQ, "status"], env=_env(url, tmp_path), capture_output=True, text=True, timeout=30
    )
    elapsed = time.monotonic() - t0
    assert out.returncode == ExitCode.CONFIG, out
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and out.stdout == "", out
    assert "cannot reach the broker at redis://:**@127.0.0.1:" in lines[0]
    assert "secret" not in lines[0]
    assert elapsed < 5, elapsed


def _outage_lines(text: str) -> list[str]:
    return [x for x in text.splitlines() if re.search(r"cannot reach|still unreachable|is back after", x)]


def test_worker_waits_for_its_broker_quietly_then_serves(tmp_path: Path) -> None:
    port = _free_port()
    url = f"redis://127.0.0.1:{port}/0"
    log = tmp_path / "worker.log"
    cmd = [*MNISTQ, "worker", "-n", "patient@%h", "--without-mingle", "--without-gossip"]
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            cmd, env=_env(url, tmp_path), stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )
    server = None
    try:
        wait_for(lambda: _outage_lines(log.read_text()), 60, "the worker to find no broker")
        time.sleep(15)  # a broker away for a while: still waiting, and saying little
        assert proc.poll() is None, log.read_text()
        text = log.read_text()
        assert "Traceback" not in text and "Trying again" not in text and "ERROR" not in text, text
        [line] = _outage_lines(text)
        assert "WARNING" in line and f"cannot reach redis://127.0.0.1:{port}/0" in line

        server = EmbeddedRedis(port=port)
        wait_for(lambda: " ready." in log.read_text(), 30, "the worker to connect once Redis is up")
        digits = write_digits(tmp_path / "d", 3)
        with Wire(url) as wire:
            assert [r.digit for r in wire.classify(list(digits))] == list(digits.values())
        text = log.read_text()
        _, back = _outage_lines(text)  # the warning (checked above), then this
        assert "INFO" in back and f"redis://127.0.0.1:{port}/0 is back after" in back, text
        assert "Traceback" not in text
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(30)
        if server is not None:
            server.stop()


def test_two_workers_survive_redis_killed_and_restarted_under_them(tmp_path: Path) -> None:
    server = EmbeddedRedis()
    env = {"MNISTQ_VISIBILITY_TIMEOUT": "5"}
    workers = [
        WorkerProc(server.url, f"{name}@%h", tmp_path, tmp_path / f"{name}.log", **env)
        for name in ("alpha", "beta")
    ]
    try:
        for w in workers:
            w.start()
        digits = write_digits(tmp_path / "d", 50)
        for _ in range(2):
            with Wire(server.url) as wire:
                tasks = wire.enqueue(list(digits) * 6, message_size=8)  # a burst in flight
                wait_for(lambda: wire.pump(0.05) >= 0 and len(wire.answers) >= 3, 60, "answers")
                assert len(wire.answers) < len(tasks), "the burst was over before Redis died"
            server.kill()  # no persistence: what was queued or held is gone, as in production
            time.sleep(1)
            server.start()
        for w in workers:
            assert w.proc is not None and w.proc.poll() is None, w.text()
        with Wire(server.url) as wire:
            names = {w.name.replace("%h", socket.gethostname()) for w in workers}

            def both_answer() -> bool:
                return {name for reply in wire.app.control.ping(timeout=1) for name in reply} >= names

            wait_for(both_answer, 60, "both workers to be connected again")
            served: set[str] = set()

            def both_serve() -> bool:
                results = wire.classify(list(digits)[:8], message_size=1, timeout=60)
                assert [r.digit for r in results] == list(digits.values())[:8]
                served.update((r.worker or "").split("@")[0] for r in results)
                return served == {"alpha", "beta"}

            wait_for(both_serve, 60, "both workers to serve")
        for w in workers:
            text = w.text()
            assert "Traceback" not in text and "AttributeError" not in text, text
            # At most one warning per outage (a worker midway through reconnecting may ride
            # a short one out without a word), and each followed by its "back".
            assert 1 <= text.count("cannot reach") == text.count("is back after") <= 2, text
    finally:
        for w in workers:
            w.stop()
        server.stop()

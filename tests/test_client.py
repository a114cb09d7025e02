"""The Python API off the happy path: no worker, no broker, a Redis restarted under a job."""

from __future__ import annotations

import logging
import os
import subprocess
import threading
import time
from pathlib import Path

import pytest
from conftest import WorkerProc, fresh_db, write_digits
from helpers import MNISTQ, free_port, wait_for

import api.job
from api import Client, Job, NoWorker, ResultTimeout
from app.embedded import EmbeddedRedis
from mnistq.broker import BrokerUnavailable
from mnistq.errors import ConfigError
from mnistq.protocol import ExitCode
from mnistq.settings import Settings

pytestmark = pytest.mark.timeout(180)


@pytest.mark.system
def test_no_worker_is_named_when_results_are_late(
    redis_server: str, tmp_path: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    url = fresh_db(redis_server)
    files = write_digits(tmp_path, 2)
    monkeypatch.setattr(api.job, "LATE_S", 0.5)  # a wait says so before the timeout
    caplog.set_level(logging.WARNING, "mnistq.producer")
    with Client(url, settings=Settings(redis_url=url)) as client, pytest.raises(NoWorker) as err:
        client.classify(list(files), timeout=2)
    message = str(err.value)
    assert isinstance(err.value, ResultTimeout) and err.value.exit_code == ExitCode.CONFIG
    assert message.startswith("2 of 2 results missing after 2")
    assert f"no worker is consuming queue 'mnistq' on {url}" in message
    assert f"`REDIS_URL={url} mnistq worker`" in message
    assert any("results are late: no worker is consuming" in m for m in caplog.messages)

    # The command says the same, in one line, exit 2.
    env = {k: v for k, v in os.environ.items() if not k.startswith("MNISTQ_")}
    out = subprocess.run(
        [*MNISTQ, "classify", "--timeout", "2", *map(str, files)],
        env={**env, "REDIS_URL": url},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == ExitCode.CONFIG, out.stderr
    assert out.stderr.count("\n") == 1 and "no worker is consuming queue 'mnistq'" in out.stderr


def test_a_broker_never_reached_is_said_at_once_without_waiting(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The README's snippet with nothing on the port: the error within seconds, not after the
    60 s an outage is ridden out, and no "waiting for it"."""
    url = f"redis://:secret@127.0.0.1:{free_port()}/0"
    files = write_digits(tmp_path, 1)
    caplog.set_level(logging.INFO, "mnistq.producer")
    with Client(url, settings=Settings(redis_url=url)) as client:  # the default reconnect_s (60)
        with pytest.raises(BrokerUnavailable) as err:
            client.ping()
        for call in (lambda: client.classify(list(files)), lambda: client.enqueue(list(files))):
            started = time.monotonic()
            with pytest.raises(BrokerUnavailable) as err:
                call()
            assert time.monotonic() - started < 5
    assert isinstance(err.value, ConfigError) and err.value.exit_code == ExitCode.CONFIG
    assert "cannot reach Redis at redis://:**@127.0.0.1:" in str(err.value)
    assert "secret" not in str(err.value)
    assert not any("waiting for it" in m for m in caplog.messages), caplog.messages


@pytest.mark.system
def test_a_job_rides_out_an_outage_then_gives_up_after_reconnect_s(tmp_path: Path) -> None:
    """Once the broker answered, its going away is an outage: waited out for reconnect_s."""
    server = EmbeddedRedis()
    files = write_digits(tmp_path, 1)
    try:
        with Client(server.url, settings=Settings(redis_url=server.url), reconnect_s=3) as client:
            job = client.enqueue(list(files))  # reached: no worker, the message waits in the queue
            server.kill()
            started = time.monotonic()
            with pytest.raises(BrokerUnavailable, match="gave up after 3s"):
                job.results()
            assert 3 <= time.monotonic() - started < 15
    finally:
        server.stop()


@pytest.mark.system
def test_job_results_survive_a_redis_restart_without_persistence(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The queue is lost with Redis; the job finds its messages gone and sends them again."""
    caplog.set_level(logging.INFO, "mnistq.producer")
    server = EmbeddedRedis()  # of its own: this test kills it
    worker = WorkerProc(server.url, "restart@%h", tmp_path, tmp_path / "worker.log")
    files = write_digits(tmp_path / "files", 40)
    got: list[object] = []

    def wait(job: Job) -> None:
        started = time.monotonic()
        try:
            got.append(job.results())  # the default: until done, resending lost work
        except BaseException as e:  # handed to the test's thread
            got.append(e)
        got.append(time.monotonic() - started)

    try:
        with Client(server.url, message_size=8, settings=Settings(redis_url=server.url)) as client:
            job = client.enqueue(list(files))  # no worker yet: the messages wait in the queue
            assert len(job.tasks) == 5
            waiter = threading.Thread(target=wait, args=(job,))
            waiter.start()
            # Restarted from this thread: the server dies with the thread that started it.
            time.sleep(1)  # the job is waiting on its results now
            server.kill()
            wait_for(
                lambda: any("cannot reach Redis" in m for m in caplog.messages),
                30,
                "the job to meet the outage",
            )
            server.start()  # same port, empty: the 5 messages are gone
            worker.start(wait=False)
            waiter.join(150)
        assert len(got) == 2, "results() is still waiting"
        results, took = got
        assert isinstance(results, list), results
        assert [r.digit for r in results] == list(files.values())
        assert [r.path for r in results] == [str(p) for p in files]
        assert isinstance(took, float) and took < 60, f"took {took}s"
        messages = caplog.messages
        assert sum("cannot reach Redis" in m for m in messages) == 1, messages
        assert any("is back after" in m for m in messages), messages
        assert any("messages in flight are in no queue, no unacked list" in m for m in messages), messages
    finally:
        worker.stop()
        server.stop()


def test_mistakes_in_the_api_are_said_before_anything_is_sent(tmp_path: Path, redis_server: str) -> None:
    with pytest.raises(ConfigError, match="REDIS_URL must be a redis://"):
        Client("http://localhost:6379")
    url = fresh_db(redis_server)  # no worker consumes it
    with pytest.raises(ConfigError, match="message_size must be 1 to 4096, not -1"):
        Client(url, settings=Settings(redis_url=url), message_size=-1)
    with pytest.raises(ConfigError, match="message_size must be 1 to 4096, not 4097"):
        Client(url, settings=Settings(redis_url=url), message_size=4097)  # workers refuse more
    with Client(url, settings=Settings(redis_url=url)) as client:
        with pytest.raises(TypeError, match="a list of paths, not one str"):
            client.enqueue(str(tmp_path / "a.png"))  # type: ignore[arg-type]
        # bytes name the same file: its path comes back as str
        job = client.enqueue([os.fsencode(tmp_path / "a.png")])  # type: ignore[list-item]
        assert job.paths == [str(tmp_path / "a.png")]

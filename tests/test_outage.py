"""What a worker says while its Redis is away (worker/outage.py), and its reply push riding out a
restart (worker/reply.py): in process, with a fake clock and a fake client."""

from __future__ import annotations

import logging

import pytest
import redis

from worker import outage
from worker.reply import push_reply

pytestmark = pytest.mark.timeout(30)


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.now += seconds


def _lines(caplog: pytest.LogCaptureFixture) -> list[tuple[str, str]]:
    return [(r.levelname, r.getMessage()) for r in caplog.records if r.name == "mnistq.worker"]


def test_one_warning_a_reminder_every_30_s_and_one_info_when_back(caplog) -> None:
    caplog.set_level(logging.INFO)
    clock = Clock()
    o = outage.Outage("redis://:**@db:6379/0", clock=clock, log=outage.log)
    refused = redis.exceptions.ConnectionError("Error 111 connecting to db:6379.\nConnection refused.")
    for _ in range(29):  # a try a second for 29 s
        o.failed(refused)
        clock.sleep(1)
    o.failed(refused)  # 29 s after the first
    clock.sleep(1)
    o.failed(refused)  # 30 s: a reminder
    o.back(clock.now - 31)  # begun before the outage was noticed, reported late: no evidence
    clock.sleep(12)
    o.back(clock.now - 1)
    o.back(clock.now)  # already back: nothing more
    o.failed(refused, clock.now - 5)  # begun before it came back: that outage is over
    assert not o.down
    reason = "Error 111 connecting to db:6379. Connection refused."  # on one line
    assert _lines(caplog) == [
        ("WARNING", f"cannot reach redis://:**@db:6379/0 ({reason}); waiting for it"),
        ("WARNING", f"redis://:**@db:6379/0 still unreachable after 30 s ({reason}); waiting for it"),
        ("INFO", "redis://:**@db:6379/0 is back after 42 s"),
    ]
    assert not o.down


def test_broker_and_results_share_one_outage_when_they_are_one_server() -> None:
    try:
        outage.configure("redis://:pw@db:6379/0", "redis://:pw@db:6379/0")
        assert outage.broker() is outage.results() and outage.broker().name == "redis://:**@db:6379/0"
        outage.configure("amqp://guest:pw@mq//", "redis://db:6379/0")
        assert outage.broker() is not outage.results()
    finally:
        outage.configure("redis://test-default/0")


class FlakyClient:
    """A redis client whose pipeline fails ``failures`` times with a connection error."""

    def __init__(self, failures: int) -> None:
        self.failures = failures
        self.pushed: list[tuple[str, str, int]] = []

    def pipeline(self) -> FlakyClient:
        self._ops: list[tuple[str, ...]] = []
        return self

    def rpush(self, key: str, message: str) -> FlakyClient:
        self._key, self._message = key, message
        return self

    def expire(self, key: str, seconds: int) -> FlakyClient:
        self._expires = seconds
        return self

    def execute(self) -> None:
        if self.failures:
            self.failures -= 1
            raise redis.exceptions.ConnectionError("Connection closed by server.")
        self.pushed.append((self._key, self._message, self._expires))


def test_reply_is_pushed_once_redis_is_back(caplog) -> None:
    caplog.set_level(logging.INFO)
    outage.configure("redis://results:6379/0")
    clock, client = Clock(), FlakyClient(failures=4)
    assert push_reply(client, "k", "m", 60, sleep=clock.sleep, clock=clock)
    assert client.pushed == [("k", "m", 60)]
    levels = [level for level, _ in _lines(caplog)]
    assert levels == ["WARNING", "INFO"]  # four failures, one line; then "back"


def test_reply_is_dropped_with_one_warning_when_redis_stays_away(caplog) -> None:
    caplog.set_level(logging.INFO)
    outage.configure("redis://results:6379/0")
    clock, client = Clock(), FlakyClient(failures=10**6)  # (the outage keeps real time: one line)
    assert not push_reply(client, "k", "m", 60, retry_for=120, sleep=clock.sleep, clock=clock)
    assert client.pushed == [] and 115 <= clock.now - 100 <= 120
    messages = [m for _, m in _lines(caplog)]
    assert messages[0].startswith("cannot reach redis://results:6379/0")
    assert messages[-1].startswith("reply to k dropped")

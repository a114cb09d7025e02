"""Redis faults a worker rides out or names: work in hand kept past the visibility timeout, a
Redis out of memory, a wrong password. Real worker processes, Redis servers of their own."""

from __future__ import annotations

import re
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
from conftest import WorkerProc, write_digits
from helpers_wire import Wire, wait_for

from mnistq.embedded import EmbeddedRedis

pytestmark = pytest.mark.timeout(180)


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

"""Finding lost work by looking (mnistq/evidence.py), against a real Redis and kombu's layout."""

from __future__ import annotations

import json
import threading
import time

import pytest
import redis
from conftest import fresh_db

from mnistq.celeryconf import make_app
from mnistq.evidence import Lookout, LostWork, NoProbe, RedisProbe, lost_work_for
from mnistq.protocol import QUEUE, TASK_NAME, ClassifyRequest
from mnistq.settings import Settings

pytestmark = pytest.mark.timeout(60)


@pytest.fixture
def broker(redis_server: str) -> tuple[RedisProbe, redis.Redis]:
    """A probe on a database no worker consumes, so messages stay where a test puts them."""
    url = fresh_db(redis_server)
    app = make_app(Settings(redis_url=url))
    client = redis.Redis.from_url(url)
    return RedisProbe(app, client, inspect_timeout=0.3), client


def send(probe: RedisProbe, task_id: str) -> None:
    kwargs = ClassifyRequest(paths=["/x.png"]).to_kwargs()
    probe.app.send_task(TASK_NAME, kwargs=kwargs, queue=QUEUE, task_id=task_id)


def fetch(client: redis.Redis, tag: str, record: bool = True) -> None:
    """What a worker's kombu does on delivery: pop the message, then record it as unacked
    (two steps; ``record=False`` stops in between, as a worker killed there does)."""
    raw = client.rpop(QUEUE)
    assert isinstance(raw, bytes)
    if record:
        client.hset("unacked", tag, json.dumps([json.loads(raw), "", QUEUE]))
        client.zadd("unacked_index", {tag: time.time()})


def test_a_task_is_present_in_the_queue_and_in_the_unacked_hash(
    broker: tuple[RedisProbe, redis.Redis],
) -> None:
    probe, client = broker
    send(probe, "queued")
    send(probe, "fetched")
    assert probe.present() == {"queued", "fetched"}
    fetch(client, "tag-1")  # the oldest, "queued", moves to unacked
    assert probe.present() == {"queued", "fetched"}
    assert probe.present_among(["queued", "gone"]) == {"queued", "fetched"}  # asked the workers: none
    client.flushdb()  # a Redis restarted without persistence
    assert probe.present() == set()


def test_only_work_missing_from_two_looks_apart_is_lost(broker: tuple[RedisProbe, redis.Redis]) -> None:
    probe, client = broker
    lost = LostWork(probe, confirm_s=0.5)
    send(probe, "held")
    send(probe, "in-the-gap")
    sent = {"held": time.monotonic() - 1, "in-the-gap": time.monotonic() - 1}
    fetch(client, "tag-1")  # "held" is unacked
    fetch(client, "tag-2", record=False)  # "in-the-gap": popped, not yet recorded
    assert lost.lost(sent) == set()  # missing once: maybe between the two steps
    client.hset("unacked", "tag-2", json.dumps([{"headers": {"id": "in-the-gap"}}, "", QUEUE]))
    time.sleep(0.6)
    assert lost.lost(sent) == set()  # it was: recorded by the second look
    for _ in range(3):  # and held work is never lost, however long it waits
        time.sleep(0.6)
        assert lost.lost(sent) == set()


def test_work_flushed_away_is_found_lost_within_two_looks(broker: tuple[RedisProbe, redis.Redis]) -> None:
    probe, client = broker
    confirm_s = 1.0
    lost = LostWork(probe, confirm_s=confirm_s)
    send(probe, "a")
    send(probe, "b")
    fetch(client, "tag-1")
    sent = {"a": time.monotonic(), "b": time.monotonic(), "new": time.monotonic() + 60}
    time.sleep(0.01)
    client.flushdb()
    start = time.monotonic()
    found: set[str] = set()
    while not found:
        found = lost.lost(sent)
        time.sleep(0.05)
    took = time.monotonic() - start
    assert found == {"a", "b"}  # "new" was sent after the first look: not yet judged
    assert took <= 2 * confirm_s + 2 * probe.inspect_timeout + 0.5, took


def test_a_broker_that_cannot_be_listed_falls_back_to_time() -> None:
    app = make_app(Settings(redis_url="redis://127.0.0.1:9/0", broker_url="amqp://guest@127.0.0.1:9//"))
    probe = RedisProbe(app, redis.Redis.from_url("redis://127.0.0.1:9/0"))
    assert probe.present() is None
    t = [0.0]
    lost = LostWork(probe, confirm_s=5.0, fallback_s=45.0, clock=lambda: t[0])
    t[0] = 50.0
    assert lost.lost({"old": 1.0, "young": 10.0}) == {"old"} and lost.by_fallback
    assert isinstance(lost_work_for(object(), 45.0).probe, NoProbe)


def test_a_redis_that_is_down_is_no_evidence() -> None:
    app = make_app(Settings(redis_url="redis://127.0.0.1:9/0"))
    probe = RedisProbe(app, redis.Redis.from_url("redis://127.0.0.1:9/0", socket_connect_timeout=1))
    assert probe.present() is None


class SlowProbe:
    """A probe whose look waits (as an inspect of the workers does) until it is let go."""

    blocking = True

    def __init__(self) -> None:
        self.go = threading.Event()
        self.looks = 0

    def present(self) -> set[str] | None:
        self.looks += 1
        assert self.go.wait(10)
        return set()  # nothing present: all in flight is missing


def test_a_look_that_waits_does_not_hold_up_the_loop() -> None:
    probe = SlowProbe()
    clock = [100.0]
    lookout = Lookout(LostWork(probe, confirm_s=0.0, clock=lambda: clock[0]), every_s=0.0)
    in_flight = {"t1": 50.0}
    started = time.monotonic()
    assert lookout.lost_now(clock[0], lambda: dict(in_flight)) == set()  # the look goes aside
    assert lookout.lost_now(clock[0], lambda: dict(in_flight)) == set()  # still looking: no second
    assert time.monotonic() - started < 1.0 and probe.looks == 1
    probe.go.set()
    deadline = time.monotonic() + 10
    while (answer := lookout.lost_now(clock[0], lambda: dict(in_flight))) == set():
        assert time.monotonic() < deadline
        time.sleep(0.01)
    # the answer of the look made aside (confirm_s 0: one look that missed it is enough)
    assert answer == {"t1"} and probe.looks == 1


def test_looks_come_no_oftener_than_every_s() -> None:
    probe = NoProbe()
    lost = LostWork(probe, confirm_s=0.0, fallback_s=1.0, clock=lambda: 100.0)
    lookout = Lookout(lost, every_s=0.5)
    asked: list[int] = []

    def in_flight() -> dict[str, float]:
        asked.append(1)
        return {"old": 10.0}

    assert lookout.lost_now(100.0, in_flight) == {"old"}  # fallback: unanswered for 90 s
    assert lookout.lost_now(100.2, in_flight) == set() and len(asked) == 1
    assert lookout.lost_now(100.6, in_flight) == {"old"} and len(asked) == 2

"""kombu's crash on reconnect, reproduced in process, and the guard in worker/redis_transport.py.

What Celery's consumer does when Redis dies under it: ``connection.collect()``, then
``connection.close()``. With unacknowledged messages held and a BRPOP in flight, kombu 5.7.0's
own Redis transport raises AttributeError from the second call (see the transport's docstring),
which kills a worker. A Redis of its own per test: it is killed here.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from kombu import Connection, Exchange, Queue

from app.embedded import EmbeddedRedis

pytestmark = [pytest.mark.system, pytest.mark.timeout(60)]
STOCK = "kombu.transport.redis:Transport"  # by path: the worker's install() re-aliases "redis"
GUARDED = "worker.redis_transport:Transport"


@pytest.fixture
def server() -> Iterator[EmbeddedRedis]:
    s = EmbeddedRedis()
    yield s
    s.stop()


def _stranded(server: EmbeddedRedis, transport: str) -> tuple[Connection, Any, list[Any]]:
    """A consumer as a worker has one (2 messages held, a BRPOP waiting, a pidbox channel),
    after Redis died and Celery's consumer ran ``collect()``: the connection, its default
    channel, the messages held."""
    conn = Connection(server.url, transport=transport)
    jobs = Queue("jobs", Exchange("jobs"), "jobs")
    with conn.Producer() as producer:
        for i in range(2):
            producer.publish({"i": i}, exchange=jobs.exchange, routing_key="jobs", declare=[jobs])
    held: list[Any] = []
    default = conn.default_channel
    box = Queue("box", Exchange("box", "fanout"), auto_delete=True)  # as Celery's pidbox
    conn.Consumer([box], channel=conn.channel(), no_ack=True, callbacks=[lambda *_: None]).consume()
    default.basic_qos(0, 3, False)
    conn.Consumer([jobs], channel=default, callbacks=[lambda _, m: held.append(m)]).consume()
    for _ in range(20):  # until nothing is left to read (the pidbox's subscribe reply included)
        try:
            conn.drain_events(timeout=0.3)
        except TimeoutError:  # socket.timeout: drained
            break
    assert len(held) == 2 and default._in_poll, "not the scenario: 2 held, a BRPOP in flight"
    server.kill()
    conn.collect(socket_timeout=5)
    return conn, default, held


def test_stock_kombu_transport_crashes_on_close_after_collect(server: EmbeddedRedis) -> None:
    conn, default, _ = _stranded(server, STOCK)
    # If this stops raising, kombu has fixed it: worker/redis_transport.py can go.
    with pytest.raises(AttributeError, match="'NoneType' object has no attribute 'hostname'"):
        conn.close()
    default.qos._on_collect.cancel()  # or the process's exit tries the same restore again


def test_guarded_transport_closes_and_acks_without_a_crash(server: EmbeddedRedis) -> None:
    import worker.redis_transport  # noqa: F401  (the transport is named by its path)

    conn, _, held = _stranded(server, GUARDED)
    conn.close()  # the stock transport raises AttributeError here
    for message in held:  # a task thread finishing after the reconnect began
        message.ack()
    server.start()
    # The guard only applies to closed channels: a new connection works as ever.
    with Connection(server.url, transport=GUARDED) as fresh:
        fresh.ensure_connection(max_retries=1)
        assert fresh.default_channel.client.ping()

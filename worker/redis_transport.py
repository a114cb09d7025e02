"""kombu's Redis transport with a guard against its crash on reconnect (kombu 5.7.0).

The bug: when Redis dies under a worker, Celery's consumer calls ``connection.collect()``
and then ``connection.close()``. ``collect()`` closes the default channel, but that close
raises early when a BRPOP is in flight (``Channel.close`` reads the pending reply first, and
the socket is dead), so the channel stays open with its unacknowledged messages; ``collect()``
then drops the transport's link to its connection (``transport.client = None``). The second
``close()`` closes the channel for real: ``restore_unacked_once`` builds a new connection pool
from ``transport.client.hostname`` and raises ``AttributeError: 'NoneType' object has no
attribute 'hostname'``, which is not a connection error, so nothing on the way catches it and
the worker process dies. (The same ``None`` reaches an ack sent by a task thread after the
close.) ``tests/test_redis_transport.py`` reproduces it in process.

The guard: a channel whose connection is gone raises a Redis ``ConnectionError`` instead, which
kombu and Celery already handle, and the QoS leaves messages it cannot restore or acknowledge
where they are, in Redis's ``unacked`` set: any worker puts them back on the queue once the
visibility timeout has passed (and a Redis that restarted empty lost them anyway: the producer
sends lost work again). ``install()`` makes ``redis://`` and ``rediss://`` URLs use it in this
process only (the worker's).
"""

from __future__ import annotations

import logging
from typing import Any

import kombu.transport
import redis
from kombu.transport import redis as kredis
from kombu.transport import virtual

log = logging.getLogger(__name__)

CONNECTION_ERRORS: tuple[type[BaseException], ...] = kredis.Transport.connection_errors


class QoS(kredis.QoS):
    """Acks and restores that fail because Redis is away leave the message in ``unacked``."""

    def ack(self, delivery_tag: str) -> None:
        try:
            super().ack(delivery_tag)
        except CONNECTION_ERRORS as e:
            # Forget it here; in Redis it waits for the visibility timeout (or died with Redis).
            virtual.QoS.ack(self, delivery_tag)
            self._report(e, f"could not acknowledge message {delivery_tag}")

    def reject(self, delivery_tag: str, requeue: bool = False) -> None:
        try:
            super().reject(delivery_tag, requeue)
        except CONNECTION_ERRORS as e:
            virtual.QoS.ack(self, delivery_tag)
            self._report(e, f"could not reject message {delivery_tag}")

    def restore_unacked(self, client: Any = None) -> None:
        try:
            super().restore_unacked(client)
        except CONNECTION_ERRORS as e:
            # restore_unacked_once asserts the state is empty once restored: clear it.
            held = len(self._delivered)
            self._delivered.clear()
            self._report(e, f"{held} unacknowledged message(s) left for the visibility-timeout restore")

    def _report(self, error: BaseException, what: str) -> None:
        # Not an outage report: a late ack on a channel closed by a reconnect fails too, while
        # the broker is fine. The consumer notices a broker that is away by itself.
        log.debug("%s: %s", what, error)


class Channel(kredis.Channel):
    QoS = QoS

    def _connparams(self, asynchronous: bool = False) -> dict[str, Any]:
        transport = self.connection
        if transport is None or transport.client is None:
            # Closed: a connection error, which every caller handles, not an AttributeError.
            raise redis.exceptions.ConnectionError("this channel's broker connection was closed")
        return dict(super()._connparams(asynchronous))


class Transport(kredis.Transport):
    Channel = Channel


def install() -> None:
    """Use this transport for ``redis://`` and ``rediss://`` broker URLs in this process."""
    for scheme in ("redis", "rediss"):
        kombu.transport.TRANSPORT_ALIASES[scheme] = f"{__name__}:Transport"
        kombu.transport._transport_cache.pop(scheme, None)  # resolved again, to this class

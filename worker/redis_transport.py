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

Two more guards. Work in hand is kept visible: kombu puts a message back on the queue once its
``unacked_index`` score (the time it was delivered) is older than the visibility timeout, even
while a task thread is still working on it, so a task slower than the timeout was delivered
again every timeout. ``KeepAlive`` renews the score of every message this channel holds, every
quarter timeout, until it is acknowledged; a worker that is frozen or dead renews nothing, and
its messages come back as before. And an entry on the queue that is not a message (not JSON,
not kombu's envelope) is dropped with one warning, where kombu's exception ended the worker.
"""

from __future__ import annotations

import contextlib
import json
import logging
import threading
import time
import weakref
from typing import Any

import kombu.transport
import redis
from kombu.transport import redis as kredis
from kombu.transport import virtual

from mnistq.redisfaults import out_of_memory
from mnistq.urls import TCP_SCHEMES
from worker import outage

log = logging.getLogger(__name__)

CONNECTION_ERRORS: tuple[type[BaseException], ...] = kredis.Transport.connection_errors


def _clip(error: BaseException) -> str:
    text = f"{type(error).__name__}: {' '.join(str(error).split())}"
    return text if len(text) <= 160 else text[:157] + "..."


class KeepAlive:
    """Renews the ``unacked_index`` score of the messages a QoS holds, while it holds them."""

    def __init__(self, qos: QoS, timeout: float) -> None:
        self._qos = weakref.ref(qos)  # a QoS dropped without close() ends the thread too
        self.every = timeout / 4
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="mnistq-keepalive", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()

    def _run(self) -> None:
        while not self._stop.wait(self.every):
            qos = self._qos()
            if qos is None:
                return
            try:
                qos.renew()
            except Exception as e:  # Redis away or out of memory: the next round tries again
                log.debug("could not renew held messages: %s", e)
            del qos


class _Full(Exception):
    """Redis refused a write for want of memory (reported already)."""


def _unless_full(call: Any, *args: Any, writes: bool = False) -> Any:
    """``call(*args)``; _Full (reported to the broker's outage: one warning, a reminder every
    30 s) if Redis refused it for want of memory, where kombu's error ended the worker. A call
    that ``writes`` for sure, done, says Redis has room again (others may have written nothing)."""
    watch = outage.broker()
    started = watch.clock()
    try:
        result = call(*args)
    except redis.exceptions.ResponseError as e:
        if not out_of_memory(e):
            raise
        watch.failed(e, started)
        raise _Full from None
    if writes:
        watch.back(started)
    return result


class BadEntry(ValueError):
    """A queue entry that is JSON but not kombu's message envelope."""


class Message(virtual.Message):
    """A message read from Redis; BadEntry for anything the QoS or Celery could not handle
    (kombu's KeyError or TypeError ended the worker's consumer)."""

    def __init__(self, payload: Any, channel: Any = None, **kwargs: Any) -> None:
        props = payload.get("properties") if isinstance(payload, dict) else None
        info = props.get("delivery_info") if isinstance(props, dict) else None
        if not (
            isinstance(info, dict)
            and "exchange" in info
            and "routing_key" in info
            and isinstance(props.get("delivery_tag"), str)  # type: ignore[union-attr]
        ):
            raise BadEntry("not a message envelope")
        try:
            super().__init__(payload, channel, **kwargs)
        except Exception as e:  # e.g. a body that is not the base64 it says it is
            raise BadEntry(_clip(e)) from None


class QoS(kredis.QoS):
    """Acks and restores that fail because Redis is away leave the message in ``unacked``;
    held messages stay visible to this worker only (``KeepAlive``)."""

    _keepalive: KeepAlive | None = None

    def append(self, message: Any, delivery_tag: str) -> None:
        try:
            _unless_full(super().append, message, delivery_tag, writes=True)
        except _Full:
            # BRPOP has taken it off the queue already: do it rather than lose it. Not in
            # ``unacked``, it does not come back if this worker dies; the producer sends again
            # what it never got an answer for.
            virtual.QoS.append(self, message, delivery_tag)
            log.info("message %s taken while Redis is out of memory: no crash-safety record", delivery_tag)
        if self._keepalive is None and self.visibility_timeout > 0:
            self._keepalive = KeepAlive(self, float(self.visibility_timeout))

    def restore_visible(self, start: int = 0, num: int = 10, interval: int = 10) -> None:
        with contextlib.suppress(_Full):  # the next sweep tries again
            _unless_full(super().restore_visible, start, num, interval)

    def renew(self) -> None:
        """Mark every message held and not yet acknowledged as delivered now (XX: an acked or
        restored one is not added back)."""
        dirty = self._dirty
        tags = [t for t in list(self._delivered) if t not in dirty]
        if tags:
            now = time.time()
            with self.channel.conn_or_acquire() as client:
                scores = dict.fromkeys(tags, now)
                _unless_full(lambda: client.zadd(self.unacked_index_key, scores, xx=True), writes=True)

    def stop_keepalive(self) -> None:
        if self._keepalive is not None:
            self._keepalive.stop()
            self._keepalive = None

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

    Message = Message

    def maybe_refresh_binding_expiry(self) -> None:
        with contextlib.suppress(_Full):  # kombu logs a traceback per second; the next round tries again
            _unless_full(super().maybe_refresh_binding_expiry)

    def _brpop_read(self, **options: Any) -> bool:
        try:
            return bool(super()._brpop_read(**options))
        except (json.JSONDecodeError, UnicodeDecodeError, BadEntry) as e:
            # BRPOP took it off the queue already, and nothing was delivered: dropped. Raised,
            # it ended the worker (or, for a bad envelope, restarted its consumer).
            log.warning("dropped an entry on the queue that is not a task message (%s)", _clip(e))
            return True

    def close(self) -> None:
        qos = self._qos
        if qos is not None:
            qos.stop_keepalive()
        super().close()

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
    for scheme in TCP_SCHEMES:
        kombu.transport.TRANSPORT_ALIASES[scheme] = f"{__name__}:Transport"
        kombu.transport._transport_cache.pop(scheme, None)  # resolved again, to this class

"""Evidence that sent work is lost, so it is sent again within seconds, not after a fixed delay.

A task message lives in one of three places until its answer is pushed: the queue (a Redis
list), kombu's ``unacked`` hash (a worker fetched it and has not acknowledged it; with
``task_acks_late`` it stays there until the task is done), or a worker's memory (active or
reserved, which ``app.control.inspect`` reports). A message that is in none of them is lost: a
Redis restarted without persistence (a fresh container, the embedded server), or a worker
killed between taking it from the queue and recording it as unacked.

That last gap is why one look is not enough: kombu's Redis transport pops a message (BRPOP)
and records it in ``unacked`` in two steps, so for a moment a message being delivered is in
neither. :class:`LostWork` calls a task lost only when two looks at least ``confirm_s`` apart
both missed it, and it was sent before the first.

- :class:`RedisProbe` looks: the queue's lists (one per priority step) and the ``unacked`` hash
  in one MULTI (an atomic snapshot), each message's task id read from its JSON
  (``headers.id``, protocol 2); then, only for ids still missing, the workers (``query_task``,
  one broadcast, ``inspect_timeout`` seconds). A broker that is not Redis (RabbitMQ) cannot be
  listed: ``present()`` is None.
- :class:`LostWork` decides, and rate-limits the looking (at most once per ``confirm_s``).
  Where there is no looking (``present()`` None), a task unanswered for ``fallback_s``
  (MNISTQ_RESEND_AFTER_S, 45 s by default) counts as lost.
- :class:`Lookout` asks it from the watcher's loop, a look that may wait on a thread aside.

Sending lost work again is safe: the ledger (the CSV's ids, or a Job's slots) takes the first
answer per file and drops any later one.
"""

from __future__ import annotations

import contextlib
import json
import logging
import threading
import time
from collections.abc import Callable, Collection, Mapping
from typing import Any, Protocol

import celery
import redis
from kombu.transport.redis import PRIORITY_STEPS, Channel

from mnistq.protocol import QUEUE
from mnistq.tuning import CONFIRM_S, LOOK_EVERY_S
from mnistq.urls import is_redis_broker

log = logging.getLogger("mnistq.producer")

#: Where lost work went, as the resend warnings say it: what the look found (nothing) and what
#: can cause that. Not "broker restarted?" alone: a worker killed in the fetch window, or one too
#: busy to answer the look, leaves the same evidence.
LOST_WHY = (
    "in no queue, no unacked list and no worker's answer (a Redis restarted empty, a worker "
    "killed as it took them, or workers too busy to answer)"
)


class Probe(Protocol):
    def present(self) -> set[str] | None:
        """The task ids the broker and the workers hold; None when that cannot be known."""
        ...


class NoProbe:
    """A broker that cannot be listed: only the time-based fallback applies."""

    def present(self) -> set[str] | None:
        return None


def _task_id(message: Any) -> str | None:
    if not isinstance(message, dict):
        return None
    headers, props = message.get("headers") or {}, message.get("properties") or {}
    tid = headers.get("id") or props.get("correlation_id")  # protocol 2; else 1's
    return tid if isinstance(tid, str) else None


class RedisProbe:
    """Which task ids are in the queue, in kombu's unacked hash, or on a worker."""

    #: a look may wait for the workers' answers (``inspect_timeout``): callers with a loop to
    #: keep going look on another thread (Lookout)
    blocking = True

    def __init__(
        self,
        app: celery.Celery,
        redis_client: redis.Redis,
        queue: str = QUEUE,
        *,
        inspect_timeout: float = 1.0,
    ) -> None:
        self.app, self.inspect_timeout = app, inspect_timeout
        url = str(app.conf.broker_url or "")
        self.listable = is_redis_broker(url)
        opts = app.conf.broker_transport_options or {}
        prefix = opts.get("global_keyprefix", "")
        sep = opts.get("sep", Channel.sep)
        steps = opts.get("priority_steps", PRIORITY_STEPS)
        # kombu's names: the queue itself for priority 0, queue + sep + step for the others
        self.queue_keys = [prefix + queue] + [f"{prefix}{queue}{sep}{p}" for p in steps if p]
        self.unacked_key = prefix + opts.get("unacked_key", Channel.unacked_key)
        self.redis = redis_client
        if self.listable and not _same_server(redis_client, url):
            # a broker other than the results Redis (MNISTQ_BROKER_URL): look there
            # A URL only kombu reads (redis+socket://) raises ValueError: keep the given client.
            with contextlib.suppress(ValueError):
                self.redis = redis.Redis.from_url(url, socket_timeout=10, socket_connect_timeout=5)

    def present(self) -> set[str] | None:
        """Task ids in the queue, in kombu's ``unacked`` hash, or active/reserved on a worker;
        None when the broker cannot be listed or the look failed."""
        return self.present_among(None)

    def present_among(self, ids: Collection[str] | None) -> set[str] | None:
        """Like ``present``; with ``ids``, the workers are asked only about those of them the
        broker does not hold (a worker's tasks are in ``unacked`` unless Redis lost it), so the
        usual look costs one round trip, not an inspect timeout."""
        if not self.listable:
            return None
        try:
            found = self._listed()
            missing = None if ids is None else [i for i in ids if i not in found]
            if missing is None or missing:
                found |= self._on_workers(missing)
        except Exception as e:  # redis or kombu, down or restarting: no evidence either way
            log.debug("could not look for lost work: %s: %s", type(e).__name__, e)
            return None
        return found

    def _listed(self) -> set[str]:
        with self.redis.pipeline(transaction=True) as pipe:
            for key in self.queue_keys:
                pipe.lrange(key, 0, -1)
            pipe.hvals(self.unacked_key)
            *queues, unacked = pipe.execute()
        found: set[str] = set()
        for raw in (m for q in queues for m in q):
            try:
                tid = _task_id(json.loads(raw))
            except ValueError:
                continue  # not a kombu message: not ours
            if tid:
                found.add(tid)
        for raw in unacked:  # [message, exchange, routing key]
            try:
                entry = json.loads(raw)
            except ValueError:
                continue
            tid = _task_id(entry[0]) if isinstance(entry, list) and entry else None
            if tid:
                found.add(tid)
        return found

    def _on_workers(self, ids: list[str] | None) -> set[str]:
        inspect = self.app.control.inspect(timeout=self.inspect_timeout)
        found: set[str] = set()
        if ids is not None:
            for tasks in (inspect.query_task(*ids) or {}).values():
                found.update(t for t in tasks or {} if isinstance(t, str))
            return found
        for reply in (inspect.active(), inspect.reserved()):
            for tasks in (reply or {}).values():
                found.update(t["id"] for t in tasks or [] if isinstance(t, dict) and t.get("id"))
        return found


def _same_server(client: redis.Redis, url: str) -> bool:
    try:
        want = redis.connection.parse_url(url)
    except (ValueError, TypeError):
        return False
    have = client.connection_pool.connection_kwargs
    keys = ("host", "port", "path", "db")
    defaults = {"host": "localhost", "port": 6379, "path": None, "db": 0}
    return all(have.get(k, defaults[k]) == want.get(k, defaults[k]) for k in keys)


class LostWork:
    """Which of the tasks in flight to send again."""

    def __init__(
        self,
        probe: Probe,
        *,
        confirm_s: float = CONFIRM_S,
        fallback_s: float = 45.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.probe, self.confirm_s, self.fallback_s, self.clock = probe, confirm_s, fallback_s, clock
        self._looked_at: float | None = None
        self._absent: dict[str, float] = {}  # task id -> the first look (of a run of looks) that missed it
        #: whether the last answer came from the time-based fallback (no look was possible)
        self.by_fallback = False

    def due(self) -> bool:
        """Whether ``lost`` would look now (else it answers at once, from what it knows)."""
        return self._looked_at is None or self.clock() - self._looked_at >= self.confirm_s

    def lost(self, in_flight: Mapping[str, float]) -> set[str]:
        """``in_flight``: task id -> sent_at (this clock's time, taken before sending). Returns
        the task ids to send again: missed by two looks at least ``confirm_s`` apart and sent
        before the first; or, where no look is possible, unanswered for ``fallback_s``."""
        if not in_flight:
            self._absent.clear()
            return set()
        now = self.clock()
        if self._looked_at is not None and now - self._looked_at < self.confirm_s:
            return set()
        self._looked_at = now
        seen = self._look([t for t, sent in in_flight.items() if sent < now])
        self.by_fallback = seen is None
        if seen is None:
            # Keep what earlier looks saw missing: the next look that works still counts.
            return {t for t, sent in in_flight.items() if now - sent > self.fallback_s}
        lost: set[str] = set()
        absent: dict[str, float] = {}
        for tid, sent in in_flight.items():
            if tid in seen or sent >= now:
                continue
            first = self._absent.get(tid, now)
            if now - first >= self.confirm_s:
                lost.add(tid)
            else:
                absent[tid] = first
        self._absent = absent
        return lost

    def _look(self, ids: list[str]) -> set[str] | None:
        try:
            among = getattr(self.probe, "present_among", None)
            return among(ids) if among is not None else self.probe.present()
        except Exception as e:  # a probe's failure is no evidence
            log.debug("could not look for lost work: %s: %s", type(e).__name__, e)
            return None


class _Look(threading.Thread):
    """One look for lost work, on a thread of its own."""

    def __init__(self, lost: LostWork, in_flight: dict[str, float]) -> None:
        super().__init__(name="mnistq-look", daemon=True)
        self.lost, self.in_flight = lost, in_flight
        self.answer: set[str] = set()
        self.start()

    def run(self) -> None:
        try:
            self.answer = self.lost.lost(self.in_flight)
        except Exception as e:  # a look that fails is no evidence either way
            log.debug("could not look for lost work: %s: %s", type(e).__name__, e)


class Lookout:
    """Asks ``LostWork`` from a loop that must never wait. A look that may wait (on the
    workers' answers to an inspect, up to a second, whenever a task is between the broker's
    lists, e.g. answered but not yet read) runs on a thread of its own: the loop goes on, so
    files that arrive meanwhile are sent at once, and the look's answer is taken on a later
    call."""

    def __init__(self, lost: LostWork, every_s: float = LOOK_EVERY_S) -> None:
        self.lost, self.every_s = lost, every_s
        self._aside = getattr(lost.probe, "blocking", False)
        self._next = 0.0
        self._look: _Look | None = None

    def lost_now(self, now: float, in_flight: Callable[[], dict[str, float]]) -> set[str]:
        """The task ids a look found lost (empty until one has); ``in_flight()``: task id ->
        sent_at, a copy taken under the caller's lock."""
        look = self._look
        if look is not None:
            if look.is_alive():
                return set()
            self._look = None
            return look.answer
        if now < self._next:
            return set()
        self._next = now + self.every_s
        tasks = in_flight()
        if not tasks or not self._aside or not self.lost.due():
            return self.lost.lost(tasks)  # no look now, or a quick one: here
        self._look = _Look(self.lost, tasks)
        return set()


def lost_work_for(client: object, fallback_s: float, confirm_s: float = CONFIRM_S) -> LostWork:
    """A LostWork for a Client (its app and Redis), or the fallback alone for anything else."""
    app, r = getattr(client, "app", None), getattr(client, "redis", None)
    probe: Probe = RedisProbe(app, r) if isinstance(app, celery.Celery) and r is not None else NoProbe()
    return LostWork(probe, confirm_s=confirm_s, fallback_s=fallback_s)

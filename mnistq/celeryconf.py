"""The Celery configuration shared by workers and producers (no torch here).

``config(settings)`` is the one place Celery is configured. The worker's app applies it lazily
(``worker/app.py``, on ``app.on_configure``), so importing the worker reads no settings; a
producer builds a ready app with ``make_app(settings)``.
"""

from __future__ import annotations

from typing import Any

from celery import Celery

from mnistq.protocol import QUEUE
from mnistq.settings import Settings


def config(settings: Settings) -> dict[str, Any]:
    """Celery's settings for mnist-queue, from ours."""
    return {
        "broker_url": settings.broker_url or settings.redis_url,
        # Kept although no task result is stored: the worker pushes replies through
        # app.backend.client, the Redis connection of the result backend.
        "result_backend": settings.redis_url,
        # The reply list is the channel (mnistq/protocol.py): no celery-task-meta-* keys.
        "task_ignore_result": True,
        # JSON only: a pickle message would let anyone who can write to the queue run code.
        "task_serializer": "json",
        "result_serializer": "json",
        "accept_content": ["json"],
        "result_accept_content": ["json"],
        # Crash safety: ack after the work, requeue when the worker dies, do not hoard messages.
        "task_acks_late": True,
        "task_reject_on_worker_lost": True,
        "worker_prefetch_multiplier": 1,
        # A killed worker's unacked messages return after visibility_timeout; kombu looks for
        # them every interval x throttle seconds (default 10 x 10), so sweep every 5 s instead.
        "broker_transport_options": {
            "visibility_timeout": settings.visibility_timeout,
            "unacked_restore_interval": 5,
            "unacked_restore_throttle": 1,
        },
        # A worker waits for its broker however long it is away (worker/broker.py says so
        # once, then every 30 s); Celery's default gives up after 100 tries, ~46 minutes.
        "broker_connection_retry_on_startup": True,
        "broker_connection_max_retries": None,
        # On Redis kombu's QoS is per consumer, so Celery skips this reduction after every
        # reconnect anyway, with an INFO line saying so.
        "worker_enable_prefetch_count_reduction": False,
        "result_expires": settings.result_expires,
        "task_default_queue": QUEUE,
        # Celery's CLI treats `--pool prefork` as "the default" and keeps this setting, so the
        # pool is chosen here (MNISTQ_POOL), not on the command line.
        "worker_pool": settings.pool,
        "worker_concurrency": settings.concurrency,
        # Events on, so Flower and `celery events` can follow the work from the worker's side.
        # No "sent" event from producers: it halved send_task's cost (0.85 -> 0.40 ms p50).
        "worker_send_task_events": True,
        "task_send_sent_event": False,
    }


def make_app(settings: Settings) -> Celery:
    """A configured app for a producer (sending tasks, reading the queue's depth)."""
    app = Celery("mnistq")
    app.conf.update(config(settings))
    return app

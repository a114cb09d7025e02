"""Pushing a task's reply onto its reply list, riding out a Redis that restarts meanwhile."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

import redis

from mnistq.redisfaults import out_of_memory
from mnistq.tuning import REPLY_RETRY_S
from worker import outage

log = logging.getLogger("mnistq.worker")


#: a Redis away, or at maxmemory with noeviction (it takes no write until memory is freed)
_RETRY_ON = (
    redis.exceptions.ConnectionError,
    redis.exceptions.TimeoutError,
    redis.exceptions.OutOfMemoryError,
)


def push_reply(
    client: Any,
    key: str,
    message: str,
    expires: int,
    retry_for: float = REPLY_RETRY_S,
    sleep: Callable[[float], None] = time.sleep,
    clock: Callable[[], float] = time.monotonic,
) -> bool:
    """RPUSH ``message`` onto ``key`` (and renew its expiry); False if it could not be delivered.

    Connection failures are retried for ``retry_for`` seconds and reported to the results
    Redis's outage (one warning, not a traceback per task); other errors propagate.
    """
    watch = outage.results()
    deadline = clock() + retry_for
    delay = 0.25
    while True:
        started = watch.clock()
        try:
            client.pipeline().rpush(key, message).expire(key, expires).execute()
        except _RETRY_ON as e:
            watch.failed(e, started)
            if clock() + delay > deadline:
                log.warning(
                    "reply to %s dropped: the results Redis was %s for %.0f s "
                    "(the producer sends lost work again)",
                    key,
                    "out of memory" if out_of_memory(e) else "unreachable",
                    retry_for,
                )
                return False
            sleep(delay)
            delay = min(delay * 2, 5.0)
        else:
            watch.back(started)
            return True

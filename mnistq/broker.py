"""What the producer says when the broker goes away: one error type, and few lines.

A lost connection surfaces as :class:`BrokerUnavailable` (a ConfigError: exit code 2), never as
a raw ``redis.exceptions.*`` or ``kombu`` error, and its message names the URL with any
password hidden. :class:`Outage` turns a stream of failed retries into one WARNING, at most one
line per ``every_s`` while it lasts, and one INFO when the server is back.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

import redis
from kombu.exceptions import OperationalError
from kombu.utils.url import maybe_sanitize_url

from mnistq.errors import ConfigError
from mnistq.redisfaults import credentials_refused, out_of_memory, refused_message
from mnistq.tuning import REMIND_EVERY_S
from mnistq.urls import is_redis

log = logging.getLogger("mnistq.producer")

#: What a lost connection raises: redis-py (the reply lists), kombu (the broker), the socket.
CONNECTION_ERRORS: tuple[type[Exception], ...] = (
    redis.ConnectionError,
    redis.TimeoutError,
    OperationalError,
    OSError,
)
#: Those, and a server that answers but not as Redis (a protocol error, a refused command).
SERVER_ERRORS: tuple[type[Exception], ...] = (*CONNECTION_ERRORS, redis.RedisError)


class BrokerUnavailable(ConfigError):
    """The broker, or the Redis that carries the reply lists, cannot be reached (or is full)."""


class BrokerRefused(ConfigError):
    """The broker or Redis refused our password: waiting does not help, so nothing waits on
    this one (it is no BrokerUnavailable); the command stops with exit 2."""


def safe_url(url: str) -> str:
    """The URL with its password hidden, for messages."""
    return str(maybe_sanitize_url(url))


def server_name(url: str) -> str:
    """'Redis at redis://...' or 'the broker at amqp://...'."""
    kind = "Redis" if is_redis(url) else "the broker"
    return f"{kind} at {safe_url(url)}"


def unreachable(url: str, error: BaseException) -> BrokerUnavailable | BrokerRefused:
    """The error for a server that cannot be reached, or that answers but not as expected:
    BrokerRefused for a refused password."""
    if credentials_refused(error):
        return BrokerRefused(refused_message(server_name(url), error))
    reason = " ".join(str(error).split()).rstrip(".") or type(error).__name__
    if out_of_memory(error):  # it answers, but takes no new message until memory is freed
        return BrokerUnavailable(
            f"{server_name(url)} is out of memory: it refuses new messages (maxmemory reached, "
            f"nothing it may evict; free memory or raise maxmemory): {reason}"
        )
    verb = "reach" if isinstance(error, CONNECTION_ERRORS) else "use"  # e.g. not Redis at all
    return BrokerUnavailable(f"cannot {verb} {server_name(url)}: {reason}")


class Outage:
    """Reports one server's outages in a few lines; thread-safe."""

    def __init__(
        self, name: str, every_s: float = REMIND_EVERY_S, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.name, self.every_s, self.clock = name, every_s, clock
        self.since: float | None = None  # when the current outage began
        self.error: str | None = None  # what it last said
        self._said = 0.0
        self._lock = threading.Lock()

    @property
    def down(self) -> bool:
        return self.since is not None

    def down_for(self) -> float:
        since = self.since
        return 0.0 if since is None else self.clock() - since

    def failed(self, error: BaseException) -> None:
        with self._lock:
            now = self.clock()
            self.error = str(error)
            if self.since is None:
                self.since = self._said = now
                log.warning("%s; waiting for it", error)
            elif now - self._said >= self.every_s:
                self._said = now
                log.warning("%s (for %.0fs); still waiting", error, now - self.since)

    def ok(self) -> None:
        with self._lock:
            if self.since is None:
                return
            log.info("%s is back after %.0fs", self.name, self.clock() - self.since)
            self.since = self.error = None

"""What the producer says when the broker goes away: one error type, and few lines.

A lost connection surfaces as :class:`BrokerUnavailable` (a ConfigError: exit code 2), never as
a raw ``redis.exceptions.*`` or ``kombu`` error, and its message names the URL with any
password hidden. Its outages are told in a few lines by mnistq/outage.py.
"""

from __future__ import annotations

import logging

import redis
from kombu.exceptions import OperationalError
from kombu.utils.url import maybe_sanitize_url

from mnistq.errors import ConfigError
from mnistq.redisfaults import credentials_refused, out_of_memory, refused_message
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

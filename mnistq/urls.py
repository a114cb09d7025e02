"""The Redis URL schemes, in one place: which URLs name a Redis, for each reader of them."""

from __future__ import annotations

from urllib.parse import urlsplit

#: redis-py's URLs: REDIS_URL (it carries the replies, whatever the broker)
REDIS_SCHEMES = ("redis", "rediss", "unix")
#: kombu's Redis transport: a broker URL whose queue can be listed (mnistq/evidence.py)
BROKER_REDIS_SCHEMES = ("redis", "rediss", "redis+socket")
#: a Redis over TCP, with or without TLS: what the worker's own transport serves (worker/redis_transport.py)
TCP_SCHEMES = ("redis", "rediss")


def scheme(url: str) -> str:
    return urlsplit(url).scheme


def is_redis(url: str) -> bool:
    """A URL redis-py can open (redis://, rediss://, unix://)."""
    return url.split(":", 1)[0] in REDIS_SCHEMES


def is_redis_broker(url: str) -> bool:
    """A broker URL served by kombu's Redis transport."""
    return scheme(url) in BROKER_REDIS_SCHEMES

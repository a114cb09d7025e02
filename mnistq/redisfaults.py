"""Two Redis faults that are not "cannot reach", for workers and producers alike to name.

A Redis at ``maxmemory`` with nothing it may evict answers but takes no write: that passes
when memory is freed, so callers wait, saying why. A refused password (or none given where one
is required) never passes by waiting: callers stop, exit 2, in one line. kombu wraps redis-py's
errors (an OperationalError around an OutOfMemoryError), so the chain of causes is looked at.
"""

from __future__ import annotations

from collections.abc import Iterator

import redis


def _chain(error: BaseException | None) -> Iterator[BaseException]:
    seen: set[int] = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        yield error
        error = error.__cause__ or error.__context__


def out_of_memory(error: BaseException) -> bool:
    """Redis refused a write: at maxmemory, with nothing it may evict (noeviction)."""
    return any(
        isinstance(e, redis.exceptions.OutOfMemoryError) or str(e).startswith("OOM ") for e in _chain(error)
    )


def credentials_refused(error: BaseException) -> bool:
    """Redis refused this client's password (WRONGPASS, NOAUTH, invalid password)."""
    return any(isinstance(e, redis.exceptions.AuthenticationError) for e in _chain(error))


def refused_message(what: str, error: BaseException) -> str:
    """One line for a refused password: ``what`` names the server, password hidden."""
    reason = " ".join(str(error).split()).rstrip(".") or type(error).__name__
    reason = reason if len(reason) <= 100 else reason[:97] + "..."
    return (
        f"{what} refused to let us in ({reason}): a wrong or missing password; give the right one "
        "in REDIS_URL (redis://:PASSWORD@host)"
    )

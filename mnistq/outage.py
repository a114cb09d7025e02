"""A server (the broker, the Redis of the replies) that went away, or is out of memory: one
WARNING, a reminder at most every ``every_s`` while it lasts, one INFO when it is back.

Celery, kombu and redis-py report every failed retry (and the worker's tasks a traceback each);
both sides report their failures here instead, from whichever thread saw them, and this decides
what is worth a line. One class for the producer, the Python API and the worker; they differ
only in their logger and in what their errors already say (``described``).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

from mnistq.redisfaults import out_of_memory
from mnistq.tuning import REMIND_EVERY_S


def _reason(error: BaseException) -> str:
    text = " ".join(str(error).split()) or type(error).__name__
    return text if len(text) <= 160 else text[:157] + "..."


class Outage:
    """One server's reachability as this process sees it; thread-safe.

    ``name``: the server as lines name it (a URL without its password, or 'Redis at ...').
    ``described``: the errors already say what failed where (the producer's BrokerUnavailable,
    see mnistq/broker.py ``unreachable``), so they are said as they are; otherwise (a worker's
    raw redis and kombu errors) a line names the server and gives the error as its reason.
    """

    def __init__(
        self,
        name: str,
        every_s: float = REMIND_EVERY_S,
        clock: Callable[[], float] = time.monotonic,
        *,
        log: logging.Logger | None = None,
        described: bool = False,
    ) -> None:
        self.name, self.every_s, self.clock = name, every_s, clock
        self.log = log or logging.getLogger("mnistq")
        self.described = described
        self._lock = threading.Lock()
        self.since: float | None = None  # when it went away; None while it is reachable
        self.error: str | None = None  # what it last said
        self._said = 0.0
        self._back_at = float("-inf")  # when it was last seen back

    @property
    def down(self) -> bool:
        return self.since is not None

    def down_for(self) -> float:
        since = self.since
        return 0.0 if since is None else self.clock() - since

    def failed(self, error: BaseException, started: float | None = None) -> None:
        """A connection to it failed: a WARNING the first time, then one per ``every_s`` seconds.

        ``started``: when the failed operation began, if known; one begun before the server was
        last seen back failed in the outage that is over, and starts no new one.
        """
        with self._lock:
            now = self.clock()
            if self.since is None and started is not None and started < self._back_at:
                return
            self.error = str(error)
            if self.since is None:
                self.since = self._said = now
                self._first(error)
            elif now - self._said >= self.every_s:
                self._said = now
                self._again(error, now - self.since)

    def back(self, started: float | None = None) -> None:
        """It answered: one INFO line if it had been away. ``started``: when the operation that
        worked began, if known; one begun before the outage was noticed proves nothing (a thread
        may report its success late, after another saw the server go)."""
        with self._lock:
            since = self.since
            if since is None or (started is not None and started < since):
                return
            self._back_at = self.clock()
            unit = "s" if self.described else " s"
            self.log.info("%s is back after %.0f%s", self.name, self._back_at - since, unit)
            self.since = self.error = None

    def _first(self, error: BaseException) -> None:
        if self.described:
            self.log.warning("%s; waiting for it", error)
        elif out_of_memory(error):  # it answers, but takes no writes: say that, not "reach"
            self.log.warning(
                "%s is out of memory: it refuses writes (maxmemory reached, nothing it may "
                "evict) (%s); waiting for room",
                self.name,
                _reason(error),
            )
        else:
            self.log.warning("cannot reach %s (%s); waiting for it", self.name, _reason(error))

    def _again(self, error: BaseException, for_s: float) -> None:
        if self.described:
            self.log.warning("%s (for %.0fs); still waiting", error, for_s)
        else:
            self.log.warning(
                "%s still %s after %.0f s (%s); waiting for it",
                self.name,
                "out of memory" if out_of_memory(error) else "unreachable",
                for_s,
                _reason(error),
            )

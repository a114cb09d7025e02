"""A Redis (broker or results) that went away, or is out of memory: one warning, a reminder every
30 s, one "back".

Celery and kombu log every failed reconnect (an ERROR line, "Trying again in N seconds", and
on a lost connection a traceback from each task that touched Redis). The worker reports each
failure here instead, from whichever thread saw it; this decides what is worth a line.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

from kombu.utils.url import maybe_sanitize_url

from mnistq.redisfaults import out_of_memory
from mnistq.tuning import REMIND_EVERY_S

log = logging.getLogger("mnistq.worker")


def _reason(error: BaseException) -> str:
    text = " ".join(str(error).split()) or type(error).__name__
    return text if len(text) <= 160 else text[:157] + "..."


class Outage:
    """One server's reachability as this process sees it."""

    def __init__(
        self, url: str, every: float = REMIND_EVERY_S, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.url = url  # sanitized: no password
        self.every = every
        self.clock = clock
        self._lock = threading.Lock()
        self.since: float | None = None  # when it went away; None while it is reachable
        self._said = 0.0
        self._back_at = float("-inf")  # when it was last seen back

    @property
    def down(self) -> bool:
        return self.since is not None

    def failed(self, error: BaseException, started: float | None = None) -> None:
        """A connection to it failed: a WARNING the first time, then one per ``every`` seconds.

        ``started``: when the failed operation began, if known; one begun before the server was
        last seen back failed in the outage that is over, and starts no new one.
        """
        with self._lock:
            now = self.clock()
            if self.since is None and started is not None and started < self._back_at:
                return
            full = out_of_memory(error)  # it answers, but takes no writes: say that, not "reach"
            if self.since is None:
                self.since = self._said = now
                if full:
                    log.warning(
                        "%s is out of memory: it refuses writes (maxmemory reached, nothing it may "
                        "evict) (%s); waiting for room",
                        self.url,
                        _reason(error),
                    )
                else:
                    log.warning("cannot reach %s (%s); waiting for it", self.url, _reason(error))
            elif now - self._said >= self.every:
                self._said = now
                log.warning(
                    "%s still %s after %.0f s (%s); waiting for it",
                    self.url,
                    "out of memory" if full else "unreachable",
                    now - self.since,
                    _reason(error),
                )

    def back(self, started: float) -> None:
        """An operation begun at ``started`` (this outage's clock) worked: one INFO line if the
        server had been away. One begun before the outage was noticed proves nothing: a thread
        may report its success late, after another saw the server go."""
        with self._lock:
            if self.since is not None and started >= self.since:
                self._back_at = self.clock()
                log.info("%s is back after %.0f s", self.url, self._back_at - self.since)
                self.since = None


_broker = _results = Outage("the broker")


def configure(broker_url: str, results_url: str | None = None) -> None:
    """Name this process's broker and results Redis (one Outage when they are the same server)."""
    global _broker, _results
    _broker = Outage(maybe_sanitize_url(broker_url))
    same = results_url is None or results_url == broker_url
    _results = _broker if same else Outage(maybe_sanitize_url(results_url))


def broker() -> Outage:
    return _broker


def results() -> Outage:
    return _results

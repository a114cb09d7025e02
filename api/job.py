"""A Job: the results of one ``Client.enqueue`` call, and how waiting for them goes wrong.

Waiting is honest about what is missing: work the broker lost (a Redis restarted without
persistence) is sent again on evidence (mnistq/evidence.py), a broker outage is waited out
for the client's ``reconnect_s``, and results late with no worker consuming the queue say so.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Protocol

from mnistq.broker import BrokerUnavailable
from mnistq.errors import MnistqError
from mnistq.evidence import LOST_WHY
from mnistq.outage import Outage
from mnistq.protocol import ExitCode, Reply, Result, miscounted
from mnistq.tuning import LATE_S, WORKER_CHECK_S

if TYPE_CHECKING:
    from mnistq.evidence import LostWork

log = logging.getLogger("mnistq.producer")


class ResultTimeout(MnistqError):
    """Results did not all arrive within the timeout; the message says what is missing."""


class NoWorker(ResultTimeout):
    """Timed out with no worker consuming the queue: a person must start one."""

    exit_code = ExitCode.CONFIG


class Sender(Protocol):
    """What a Job needs of its client (api/client.py's Client): public calls only, so the client
    and its jobs stay one-way (the client makes jobs; a job knows only this)."""

    outage: Outage

    def send(
        self, paths: Sequence[str], *, task_id: str, probabilities: bool, review_below: str | float | None
    ) -> str: ...

    def pump(self, timeout: float) -> None: ...

    def broker_ok(self) -> None: ...

    def wait_for_broker(self, error: BrokerUnavailable, pause: float = 1.0) -> None: ...

    def missing_worker(self, timeout: float = 2.0) -> str | None: ...

    def lost_work(self) -> LostWork: ...


class Job:
    """The results of one ``enqueue`` call, filled in as tasks finish."""

    def __init__(
        self,
        client: Sender,
        paths: list[str],
        tasks: dict[str, tuple[int, int]] | None = None,
        *,
        probabilities: bool = False,
        review_below: str | float | None = None,
    ) -> None:
        self.client = client
        self.paths = paths
        self.tasks = tasks if tasks is not None else {}  # task id -> (start, end) slice of paths
        self.probabilities = probabilities
        self.review_below = review_below  # the call's, checked (None: the client's setting)
        self._results: list[Result | None] = [None] * len(paths)
        self._new: list[Result] = []  # in arrival order
        self._handed = 0  # results handed to the caller (see done)
        self._lock = threading.Lock()  # guards _sent_at: any thread that pumps may deliver
        self._sent_at: dict[str, float] = {}  # unanswered task id -> when it was last sent
        self._lost: LostWork | None = None  # made on first use: it may look at the broker
        self._news = time.monotonic()  # the last send or answer
        self._next_worker_check = 0.0

    @property
    def total(self) -> int:
        return len(self.paths)

    @property
    def done(self) -> int:
        """Results handed out so far by ``as_completed`` (all of them once ``results`` returns):
        a progress that moves one by one, though a message's results arrive together."""
        return self._handed

    @property
    def received(self) -> int:
        """Results arrived so far, handed out or not."""
        return len(self._new)

    def send(self, task_id: str) -> None:
        """Send (or send again) one task, riding out a broker outage of up to ``reconnect_s``."""
        start, end = self.tasks[task_id]
        client = self.client
        while True:
            try:
                paths, probs = self.paths[start:end], self.probabilities
                client.send(paths, task_id=task_id, probabilities=probs, review_below=self.review_below)
                break
            except BrokerUnavailable as e:
                client.wait_for_broker(e)
        client.broker_ok()
        with self._lock:
            self._sent_at[task_id] = self._news = time.monotonic()

    def deliver(self, reply: Reply) -> None:
        start, end = self.tasks[reply.task_id]
        # Called once per task: the client forgets a task on its first answer, so a redelivered
        # or resent task's second answer never gets here.
        paths = self.paths[start:end]
        results = miscounted(reply, paths, [None] * len(paths)) or reply.results
        for i, res in zip(range(start, end), results, strict=True):
            self._results[i] = res
            self._new.append(res)
        with self._lock:
            self._sent_at.pop(reply.task_id, None)
            self._news = time.monotonic()

    def as_completed(self, timeout: float | None = None) -> Iterator[Result]:
        """Yield each result as it arrives (any order).

        ``timeout=None`` waits until every result is in: work the broker lost (a Redis restarted
        without persistence) is sent again, a broker outage of up to the client's
        ``reconnect_s`` is waited out (longer: BrokerUnavailable), and results late with no
        worker consuming the queue are logged as such. With a number: ResultTimeout after that
        many seconds, saying what is missing (NoWorker when no worker consumes the queue).
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        yielded = 0
        while True:
            while yielded < len(self._new):
                yielded += 1
                self._handed = max(self._handed, yielded)  # counted before the caller sees it
                yield self._new[yielded - 1]
            if self.received >= self.total:
                return
            left = None if deadline is None else deadline - time.monotonic()
            if left is not None and left <= 0:
                raise self._timed_out(timeout)
            self._wait(1.0 if left is None else min(1.0, left))

    def results(self, timeout: float | None = None) -> list[Result]:
        """All results, in input order; ``timeout`` as in :meth:`as_completed` (None: until done,
        resending lost work)."""
        for _ in self.as_completed(timeout):
            pass
        return [r for r in self._results if r is not None]

    def _wait(self, timeout: float) -> None:
        client = self.client
        try:
            client.pump(timeout)
        except BrokerUnavailable as e:
            client.wait_for_broker(e, pause=min(timeout, 0.5))
            return
        client.broker_ok()
        self._resend_lost()  # LostWork looks at most once per its confirm_s
        now = time.monotonic()
        if now - self._news > LATE_S and now >= self._next_worker_check:
            self._next_worker_check = now + WORKER_CHECK_S
            if hint := client.missing_worker():
                log.warning("%d of %d results are late: %s", self.total - self.received, self.total, hint)

    def _resend_lost(self) -> None:
        with self._lock:
            flying = dict(self._sent_at)
        if not flying:
            return
        if self._lost is None:
            self._lost = self.client.lost_work()
        lost = self._lost.lost(flying)
        with self._lock:
            lost &= self._sent_at.keys()  # answered meanwhile: not lost
        if not lost:
            return
        # a broker that cannot be listed: time is the only evidence
        why = f"unanswered after {self._lost.fallback_s:.0f}s" if self._lost.by_fallback else LOST_WHY
        log.warning("%d of %d messages in flight are %s; sending them again", len(lost), len(flying), why)
        for task_id in lost:
            self.send(task_id)

    def _timed_out(self, timeout: float | None) -> ResultTimeout:
        missing = f"{self.total - self.received} of {self.total} results missing after {timeout}s"
        if self.client.outage.down:
            return ResultTimeout(f"{missing}: {self.client.outage.error}")
        if hint := self.client.missing_worker():
            return NoWorker(f"{missing}: {hint}")
        return ResultTimeout(missing)

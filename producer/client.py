"""Python API: ``Client(redis_url).classify(paths)`` or ``enqueue(paths)`` and collect later.

Messages follow :mod:`mnistq.protocol`: keyword arguments only (:class:`ClassifyRequest`), and
the answers come back as :class:`Reply` objects on a Redis list of this client's own
(``reply_to``): the client blocks on it (BLPOP) instead of polling one result key per task, and
a redelivered task's second answer is simply ignored. Nothing here imports torch.
"""

from __future__ import annotations

import logging
import os
import threading
import time
import uuid
from collections.abc import Iterator, Sequence

import redis

from mnistq.celeryconf import make_app
from mnistq.errors import MnistqError
from mnistq.protocol import QUEUE, TASK_NAME, ClassifyRequest, ErrorKind, Reply, Result, reply_key
from mnistq.settings import Settings

log = logging.getLogger("mnistq.producer")


class ResultTimeout(MnistqError):
    """Results did not all arrive within the timeout."""


def miscounted(reply: Reply, paths: Sequence[str], ids: Sequence[str | None]) -> list[Result] | None:
    """Error results for every path of a reply whose count does not match the request (a worker
    bug: which result belongs to which path cannot be trusted); None when the count is right."""
    if len(reply.results) == len(paths):
        return None
    message = f"internal error: the worker answered {len(reply.results)} results for {len(paths)} files"
    log.warning("task %s: %s; every file of it gets an error row", reply.task_id, message)
    return [Result.failed(p, ErrorKind.INTERNAL, message, i) for p, i in zip(paths, ids, strict=True)]


class Job:
    """The results of one ``enqueue`` call, filled in as tasks finish."""

    def __init__(self, client: Client, paths: list[str], tasks: dict[str, tuple[int, int]]) -> None:
        self.client = client
        self.paths = paths
        self.tasks = tasks  # task id -> (start, end) slice of paths
        self._results: list[Result | None] = [None] * len(paths)
        self._new: list[Result] = []  # in arrival order

    @property
    def total(self) -> int:
        return len(self.paths)

    @property
    def done(self) -> int:
        return len(self._new)

    def _deliver(self, reply: Reply) -> None:
        start, end = self.tasks[reply.task_id]
        # Called once per task: the client forgets a task on its first answer, so a redelivered
        # task's second answer never gets here.
        paths = self.paths[start:end]
        results = miscounted(reply, paths, [None] * len(paths)) or reply.results
        for i, res in zip(range(start, end), results, strict=True):
            self._results[i] = res
            self._new.append(res)

    def as_completed(self, timeout: float | None = None) -> Iterator[Result]:
        """Yield each result as it arrives (any order)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        yielded = 0
        while True:
            while yielded < len(self._new):
                yielded += 1
                yield self._new[yielded - 1]
            if self.done >= self.total:
                return
            left = None if deadline is None else deadline - time.monotonic()
            if left is not None and left <= 0:
                raise ResultTimeout(
                    f"{self.total - self.done} of {self.total} results missing after {timeout}s"
                )
            self.client.pump(1.0 if left is None else min(1.0, left))

    def results(self, timeout: float | None = None) -> list[Result]:
        """All results, in input order."""
        for _ in self.as_completed(timeout):
            pass
        return [r for r in self._results if r is not None]


class Client:
    """Sends image paths to the workers and gathers their results.

    ``settings`` default to ``Settings.from_env()``; ``message_size`` (paths per message)
    defaults to the settings' ``message_size``.
    """

    def __init__(
        self,
        redis_url: str | None = None,
        *,
        message_size: int | None = None,
        settings: Settings | None = None,
    ) -> None:
        settings = settings or Settings.from_env()
        url = redis_url or settings.require_redis()
        self.app = make_app(settings.with_(redis_url=url))
        # A timeout on the socket, so a vanished broker raises instead of hanging a BLPOP forever.
        self.redis = redis.Redis.from_url(url, socket_timeout=30)
        self.message_size = message_size or settings.message_size
        self.reply_to = reply_key(uuid.uuid4().hex)
        self._jobs: dict[str, Job] = {}
        self._lock = threading.Lock()  # guards _jobs
        self._pump_lock = threading.Lock()  # one thread blocks on the reply list at a time

    def send(
        self,
        paths: Sequence[str],
        ids: Sequence[str] | None = None,
        *,
        task_id: str | None = None,
        probabilities: bool = False,
    ) -> str:
        """One message for these paths; returns its task id. Results arrive through ``receive``.

        Pass ``task_id`` to know it before the message leaves: a reply can come back before
        this returns.
        """
        task_id = task_id or str(uuid.uuid4())
        request = ClassifyRequest(
            paths=list(paths),
            ids=list(ids) if ids else None,
            reply_to=self.reply_to,
            probabilities=probabilities,
        )
        self.app.send_task(TASK_NAME, kwargs=request.to_kwargs(), queue=QUEUE, task_id=task_id)
        return task_id

    def enqueue(self, paths: Sequence[str | os.PathLike[str]], *, probabilities: bool = False) -> Job:
        absolute = [os.path.abspath(p) for p in paths]
        tasks: dict[str, tuple[int, int]] = {}
        job = Job(self, absolute, tasks)
        for start in range(0, len(absolute), self.message_size):
            end = min(start + self.message_size, len(absolute))
            task_id = str(uuid.uuid4())
            tasks[task_id] = (start, end)
            with self._lock:
                self._jobs[task_id] = job
            self.send(absolute[start:end], task_id=task_id, probabilities=probabilities)
        return job

    def classify(
        self,
        paths: Sequence[str | os.PathLike[str]],
        timeout: float | None = None,
        *,
        probabilities: bool = False,
    ) -> list[Result]:
        return self.enqueue(paths, probabilities=probabilities).results(timeout)

    def receive(self, timeout: float) -> list[Reply]:
        """Block up to ``timeout`` for finished tasks; a reply that cannot be read is logged and
        skipped (its files are never answered: the watcher sends them again, a Job times out)."""
        first = self.redis.blpop([self.reply_to], timeout=max(timeout, 0.001))
        if first is None:
            return []
        replies = []
        for raw in [first[1], *(self.redis.lpop(self.reply_to, 256) or [])]:
            try:
                replies.append(Reply.loads(raw))
            except (ValueError, KeyError, TypeError, AttributeError) as e:
                log.warning("ignoring an unreadable reply on %s (%s): %.200r", self.reply_to, e, raw)
        return replies

    def pump(self, timeout: float) -> None:
        """Route finished tasks to their jobs (whoever waits pumps for everyone)."""
        with self._pump_lock:
            for reply in self.receive(timeout):
                with self._lock:
                    job = self._jobs.pop(reply.task_id, None)
                if job is not None:
                    job._deliver(reply)

    def close(self) -> None:
        self.redis.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

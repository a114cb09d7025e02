"""Python API: ``Client(redis_url).classify(paths)`` or ``enqueue(paths)`` and collect later.

Results come back on a Redis list of this client's own (``reply_to``): the client blocks on it
(BLPOP) instead of polling one result key per task, and a redelivered task's second answer is
simply ignored. Nothing here imports torch.
"""

from __future__ import annotations

import json
import os
import threading
import time
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import redis

from mnistq.celeryconf import make_app
from mnistq.errors import MnistqError
from mnistq.protocol import QUEUE, TASK_NAME
from mnistq.settings import Settings


class ResultTimeout(MnistqError):
    """Results did not all arrive within the timeout."""


@dataclass(frozen=True)
class Result:
    path: str
    digit: int | None
    confidence: float | None
    model_version: str | None
    error: str | None
    id: str | None = None
    probabilities: list[float] | None = None
    extra: dict[str, Any] = field(default_factory=dict, compare=False)

    @property
    def ok(self) -> bool:
        return self.error is None

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Result:
        known = {"path", "digit", "confidence", "model_version", "error", "id", "probabilities"}
        return cls(
            path=str(d["path"]),
            digit=d.get("digit"),
            confidence=d.get("confidence"),
            model_version=d.get("model_version"),
            error=d.get("error"),
            id=d.get("id"),
            probabilities=d.get("probabilities"),
            extra={k: v for k, v in d.items() if k not in known},
        )


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

    def _deliver(self, task_id: str, results: list[dict[str, Any]]) -> None:
        start, end = self.tasks[task_id]
        # Called once per task: the client forgets a task on its first answer, so a redelivered
        # task's second answer never gets here.
        for i, r in zip(range(start, end), results, strict=True):
            self._results[i] = res = Result.from_dict(r)
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
    """Sends image paths to the workers and gathers their results."""

    def __init__(self, redis_url: str | None = None, *, batch_size: int | None = None) -> None:
        settings = Settings.from_env()
        url = redis_url or settings.require_redis()
        self.app = make_app(Settings(redis_url=url, broker_url=settings.broker_url))
        # A timeout on the socket, so a vanished broker raises instead of hanging a BLPOP forever.
        self.redis = redis.Redis.from_url(url, socket_timeout=30)
        self.batch_size = batch_size or settings.batch_size
        self.reply_to = f"mnistq:reply:{uuid.uuid4().hex}"
        self._jobs: dict[str, Job] = {}
        self._lock = threading.Lock()  # guards _jobs
        self._pump_lock = threading.Lock()  # one thread blocks on the reply list at a time

    def send(self, paths: Sequence[str], ids: Sequence[str] | None = None) -> str:
        """One message for these paths; returns its task id. Results arrive through ``receive``."""
        task_id = str(uuid.uuid4())
        self.app.send_task(
            TASK_NAME,
            args=[list(paths), list(ids) if ids else None, self.reply_to],
            queue=QUEUE,
            task_id=task_id,
        )
        return task_id

    def enqueue(self, paths: Sequence[str | os.PathLike[str]]) -> Job:
        absolute = [os.path.abspath(p) for p in paths]
        tasks: dict[str, tuple[int, int]] = {}
        job = Job(self, absolute, tasks)
        for start in range(0, len(absolute), self.batch_size):
            end = min(start + self.batch_size, len(absolute))
            task_id = str(uuid.uuid4())
            tasks[task_id] = (start, end)
            with self._lock:
                self._jobs[task_id] = job
            self.app.send_task(
                TASK_NAME, args=[absolute[start:end], None, self.reply_to], queue=QUEUE, task_id=task_id
            )
        return job

    def classify(self, paths: Sequence[str | os.PathLike[str]], timeout: float | None = None) -> list[Result]:
        return self.enqueue(paths).results(timeout)

    def receive(self, timeout: float) -> list[tuple[str, list[dict[str, Any]]]]:
        """Block up to ``timeout`` for finished tasks: [(task id, result dicts)]."""
        first = self.redis.blpop([self.reply_to], timeout=max(timeout, 0.001))
        if first is None:
            return []
        raw = [first[1], *(self.redis.lpop(self.reply_to, 256) or [])]
        out = []
        for item in raw:
            msg = json.loads(item)
            out.append((msg["task_id"], msg["results"]))
        return out

    def pump(self, timeout: float) -> None:
        """Route finished tasks to their jobs (whoever waits pumps for everyone)."""
        with self._pump_lock:
            for task_id, results in self.receive(timeout):
                with self._lock:
                    job = self._jobs.pop(task_id, None)
                if job is not None:
                    job._deliver(task_id, results)

    def close(self) -> None:
        self.redis.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

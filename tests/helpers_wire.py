"""Talking to a real worker through the protocol alone (mnistq/protocol.py), not api.Client.

Requests go out with Celery's ``send_task(TASK_NAME, kwargs=ClassifyRequest(...).to_kwargs())``;
replies come back on a reply list read with Redis BLPOP. So the worker's tests check the
contract itself, whatever the client on top of it does.
"""

from __future__ import annotations

import json
import os
import time
import uuid
from collections.abc import Sequence
from typing import Any

import redis

from mnistq.celeryconf import make_app
from mnistq.protocol import QUEUE, TASK_NAME, ClassifyRequest, Reply, Result, reply_key
from mnistq.settings import Settings


class Wire:
    """One client's end of the queue: its own reply list, its tasks' answers by task id."""

    def __init__(self, url: str, broker_url: str | None = None) -> None:
        """Replies on ``url``; requests through ``broker_url`` (default: the same Redis)."""
        self.app = make_app(Settings(redis_url=url, broker_url=broker_url))
        self.redis = redis.Redis.from_url(url, socket_timeout=60)
        self.reply_to = reply_key(uuid.uuid4().hex)
        self.answers: dict[str, list[Reply]] = {}  # task id -> every reply seen, in arrival order

    def send_raw(
        self, args: list[Any] | None = None, kwargs: dict[str, Any] | None = None, **options: Any
    ) -> str:
        """Any message at all (hand-made arguments, another serializer); returns its task id."""
        task_id = str(uuid.uuid4())
        # ignore_result, as api.Client: else Celery subscribes to each task's result channel
        options.setdefault("ignore_result", True)
        self.app.send_task(TASK_NAME, args=args, kwargs=kwargs, queue=QUEUE, task_id=task_id, **options)
        return task_id

    def send(
        self, paths: Sequence[str | os.PathLike[str]], *, probabilities: bool = False, **changes: Any
    ) -> str:
        """A well-formed request for these paths, answered on this wire's reply list."""
        request = ClassifyRequest(
            paths=[str(p) for p in paths], reply_to=self.reply_to, probabilities=probabilities
        )
        return self.send_raw(kwargs={**request.to_kwargs(), **changes})

    def pump(self, timeout: float) -> int:
        """Wait up to ``timeout`` for replies; record them; returns how many came."""
        first = self.redis.blpop([self.reply_to], timeout=max(timeout, 0.01))
        if first is None:
            return 0
        raw = [first[1], *(self.redis.lpop(self.reply_to, 1000) or [])]
        for item in raw:
            reply = Reply.loads(item)
            self.answers.setdefault(reply.task_id, []).append(reply)
        return len(raw)

    def wait(self, task_ids: Sequence[str], timeout: float = 60) -> dict[str, Reply]:
        """The first reply to each task; fails the test if one is missing after ``timeout``."""
        deadline = time.monotonic() + timeout
        while missing := [t for t in task_ids if t not in self.answers]:
            left = deadline - time.monotonic()
            assert left > 0, f"{len(missing)} of {len(task_ids)} tasks unanswered after {timeout}s"
            self.pump(min(left, 1.0))
        return {t: self.answers[t][0] for t in task_ids}

    def enqueue(
        self, paths: Sequence[str | os.PathLike[str]], message_size: int, probabilities: bool = False
    ) -> list[str]:
        """The paths in messages of ``message_size``; the task ids in the paths' order."""
        return [
            self.send(paths[i : i + message_size], probabilities=probabilities)
            for i in range(0, len(paths), message_size)
        ]

    def results(self, task_ids: Sequence[str], timeout: float = 60) -> list[Result]:
        replies = self.wait(task_ids, timeout)
        return [r for t in task_ids for r in replies[t].results]

    def classify(
        self,
        paths: Sequence[str | os.PathLike[str]],
        timeout: float = 60,
        probabilities: bool = False,
        message_size: int = 256,
    ) -> list[Result]:
        return self.results(self.enqueue(paths, message_size, probabilities), timeout)

    def unacked_task_ids(self) -> set[str]:
        """Tasks a worker has taken but not acknowledged (kombu's Redis ``unacked`` hash)."""
        out = set()
        for raw in self.redis.hvals("unacked"):
            message = json.loads(raw)[0]
            out.add(message["headers"]["id"])
        return out

    def queued_task_ids(self) -> set[str]:
        """Tasks waiting in the queue (kombu's Redis list; priority sub-queues are not used)."""
        return {json.loads(raw)["headers"]["id"] for raw in self.redis.lrange(QUEUE, 0, -1)}

    def task_meta_keys(self) -> list[bytes]:
        return list(self.redis.scan_iter("celery-task-meta-*"))

    def close(self) -> None:
        self.redis.close()

    def __enter__(self) -> Wire:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

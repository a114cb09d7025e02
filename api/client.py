"""Python API: ``Client(redis_url).classify(paths)`` or ``enqueue(paths)`` and collect later.

Messages follow :mod:`mnistq.protocol`: keyword arguments only (:class:`ClassifyRequest`), and
the answers come back as :class:`Reply` objects on a Redis list of this client's own
(``reply_to``): the client blocks on it (BLPOP) instead of polling one result key per task, and
a redelivered task's second answer is simply ignored. Nothing here imports torch.

**Review**: ``review_below`` (a call's argument, else ``Settings.review_below``, from
MNISTQ_REVIEW_BELOW; default off) asks the workers to judge each image for review: a number
0 < P < 1, or ``"auto"`` for the serving model's recommended threshold. The worker decides, with
the model that classified the image, and sets ``Result.review`` to the reason ("not a digit",
"low confidence"); the client loads no model.

What can go wrong is said in words: a broker that cannot be reached is
:class:`~mnistq.broker.BrokerUnavailable` naming its URL (never a raw redis or kombu error),
a short outage (a Redis restart) is ridden out, work the broker lost is sent again, and late
results with no worker consuming the queue say so.
"""

from __future__ import annotations

import logging
import os
import threading
import time
import uuid
from collections.abc import Sequence
from typing import TYPE_CHECKING

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from api.job import Job
from mnistq.broker import SERVER_ERRORS, BrokerUnavailable, safe_url, server_name, unreachable
from mnistq.celeryconf import make_app
from mnistq.errors import ConfigError
from mnistq.outage import Outage
from mnistq.protocol import MAX_PATHS, QUEUE, TASK_NAME, ClassifyRequest, Reply, Result, reply_key
from mnistq.settings import AUTO, ReviewBelow, Settings, parse_review_below

if TYPE_CHECKING:
    from mnistq.evidence import LostWork

log = logging.getLogger("mnistq.producer")


def review_fields(review_below: ReviewBelow) -> tuple[bool, float | None]:
    """A review setting as the request's (review, review_below): off, the model's threshold
    (AUTO), or a P of its own."""
    if review_below is None:
        return False, None
    return True, None if review_below == AUTO else float(review_below)


def _review(value: str | float | None, default: ReviewBelow) -> ReviewBelow:
    """A call's review argument (None: the client's setting), checked: ConfigError if bad."""
    if value is None:
        return default
    try:
        return parse_review_below(value)
    except ValueError as e:
        raise ConfigError(f"review_below: {e}") from None


class Client:
    """Sends image paths to the workers and gathers their results.

    ``settings`` default to ``Settings.from_env()``; ``message_size`` (paths per message)
    defaults to the settings' ``message_size``. ``reconnect_s``: how long ``enqueue`` and a
    job's wait ride out a broker that went away before raising BrokerUnavailable; one that never
    answered this client raises it at once.
    ``review_below`` on a call: see the module; None there means the settings' (default off),
    ``"off"`` turns it off.
    """

    def __init__(
        self,
        redis_url: str | None = None,
        *,
        message_size: int | None = None,
        settings: Settings | None = None,
        reconnect_s: float = 60.0,
    ) -> None:
        settings = settings or Settings.from_env()
        self.url = redis_url or settings.require_redis()
        self.settings = settings.with_(redis_url=self.url)
        self.broker_url = self.settings.broker_url or self.url
        self.app = make_app(self.settings)
        # A socket timeout, so a vanished server raises instead of hanging a BLPOP forever; one
        # immediate retry, so the first command after a Redis restart reconnects by itself;
        # no backoff of redis-py's own: the callers here pace their retries and say why.
        self.redis = redis.Redis.from_url(
            self.url, socket_timeout=30, socket_connect_timeout=3, retry=Retry(NoBackoff(), 1)
        )
        self.message_size = settings.message_size if message_size is None else message_size
        if not 1 <= self.message_size <= MAX_PATHS:  # workers refuse a longer message
            raise ConfigError(f"message_size must be 1 to {MAX_PATHS}, not {message_size}")
        self.reconnect_s = reconnect_s
        self.outage = Outage(server_name(self.url), log=log, described=True)
        #: whether the broker ever answered this client: until it has, a failure is a wrong URL or
        #: nothing running (said at once), not an outage to ride out
        self.contacted = False
        self.reply_to = reply_key(uuid.uuid4().hex)
        self._jobs: dict[str, Job] = {}
        self._lock = threading.Lock()  # guards _jobs
        self._pump_lock = threading.Lock()  # one thread blocks on the reply list at a time

    def ping(self) -> None:
        """Raise BrokerUnavailable unless Redis (and a broker of its own, if set) answers now."""
        try:
            self.redis.ping()
        except SERVER_ERRORS as e:
            raise unreachable(self.url, e) from None
        if self.broker_url != self.url:
            try:
                with self.app.connection_for_write() as conn:
                    conn.ensure_connection(max_retries=1, timeout=3)
            except SERVER_ERRORS as e:
                raise unreachable(self.broker_url, e) from None
        self.contacted = True

    def send(
        self,
        paths: Sequence[str],
        ids: Sequence[str] | None = None,
        *,
        task_id: str | None = None,
        probabilities: bool = False,
        review_below: str | float | None = None,
    ) -> str:
        """One message for these paths; returns its task id. Results arrive through ``receive``.

        Pass ``task_id`` to know it before the message leaves: a reply can come back before
        this returns. BrokerUnavailable when the broker did not take it.
        """
        task_id = task_id or str(uuid.uuid4())
        review, below = review_fields(_review(review_below, self.settings.review_below))
        request = ClassifyRequest(
            paths=list(paths),
            ids=list(ids) if ids else None,
            reply_to=self.reply_to,
            probabilities=probabilities,
            review=review,
            review_below=below,
        )
        try:
            # ignore_result: the answer comes on the reply list; without it Celery subscribes to
            # a result channel per task, and retries a dead result store for 20 s first.
            self.app.send_task(
                TASK_NAME, kwargs=request.to_kwargs(), queue=QUEUE, task_id=task_id, ignore_result=True
            )
        except SERVER_ERRORS as e:
            raise unreachable(self.broker_url, e) from None
        return task_id

    def enqueue(
        self,
        paths: Sequence[str | os.PathLike[str]],
        *,
        probabilities: bool = False,
        review_below: str | float | None = None,
    ) -> Job:
        """Send the paths now (``message_size`` per message); the Job collects their results."""
        _review(review_below, self.settings.review_below)  # a bad one fails here, before any send
        if isinstance(paths, (str, bytes, os.PathLike)):  # one path, which would read as its letters
            raise TypeError(f"paths must be a list of paths, not one {type(paths).__name__}: [{paths!r}]")
        # os.fsdecode: a path given as bytes is the same file by its str name
        absolute = [os.path.abspath(os.fsdecode(p)) for p in paths]
        job = Job(self, absolute, probabilities=probabilities, review_below=review_below)
        for start in range(0, len(absolute), self.message_size):
            task_id = str(uuid.uuid4())
            job.tasks[task_id] = (start, min(start + self.message_size, len(absolute)))
            with self._lock:
                self._jobs[task_id] = job
            try:
                job.send(task_id)
            except BaseException:
                with self._lock:
                    for tid in job.tasks:
                        self._jobs.pop(tid, None)
                raise
        return job

    def classify(
        self,
        paths: Sequence[str | os.PathLike[str]],
        timeout: float | None = None,
        *,
        probabilities: bool = False,
        review_below: str | float | None = None,
    ) -> list[Result]:
        """Results in input order; ``timeout`` as in :meth:`Job.as_completed` (None: until done).
        ``review_below``: see the class (each result's ``review`` says why it was sent)."""
        return self.enqueue(paths, probabilities=probabilities, review_below=review_below).results(timeout)

    def receive(self, timeout: float) -> list[Reply]:
        """Block up to ``timeout`` for finished tasks; a reply that cannot be read is logged and
        skipped (its files are never answered: the watcher sends them again, a Job times out).
        BrokerUnavailable when Redis cannot be reached."""
        try:
            first = self.redis.blpop([self.reply_to], timeout=max(timeout, 0.001))
            if first is None:
                return []
            raws = [first[1], *(self.redis.lpop(self.reply_to, 256) or [])]
        except SERVER_ERRORS as e:
            raise unreachable(self.url, e) from None
        replies = []
        for raw in raws:
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
                    job.deliver(reply)

    def missing_worker(self, timeout: float = 2.0) -> str | None:
        """What to do when no worker consumes the queue, or None: one does, or nobody can tell."""
        try:
            answers = self.app.control.inspect(timeout=timeout).active_queues() or {}
        except Exception as e:  # a diagnosis only: never let it replace the real error
            log.debug("could not ask the workers: %s", e)
            return None
        if any(q.get("name") == QUEUE for queues in answers.values() for q in queues or ()):
            return None
        env = f"REDIS_URL={safe_url(self.url)}"
        if self.broker_url != self.url:
            env += f" MNISTQ_BROKER_URL={safe_url(self.broker_url)}"
        return (
            f"no worker is consuming queue '{QUEUE}' on {safe_url(self.broker_url)}: "
            f"start one with `{env} mnistq worker`"
        )

    def lost_work(self) -> LostWork:
        """A detector of this client's messages the broker no longer has (mnistq/evidence.py)."""
        from mnistq.evidence import LostWork, RedisProbe

        probe = RedisProbe(self.app, self.redis, QUEUE)
        return LostWork(probe, fallback_s=self.settings.resend_after_s)

    def broker_ok(self) -> None:
        """The broker answered: from now on a failure is an outage, ridden out."""
        self.contacted = True
        self.outage.back()

    def wait_for_broker(self, error: BrokerUnavailable, pause: float = 1.0) -> None:
        """Count an outage: say so (a few lines, see Outage), pause, or give up past reconnect_s.

        A broker this client never reached is no outage but a wrong URL or nothing running: that
        is raised at once, for a person at a prompt to see within seconds."""
        if not self.contacted:
            raise error
        self.outage.failed(error)
        if self.outage.down_for() > self.reconnect_s:
            raise BrokerUnavailable(f"{error} (gave up after {self.reconnect_s:.0f}s)") from None
        time.sleep(pause)

    def close(self) -> None:
        self.redis.close()
        self.app.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

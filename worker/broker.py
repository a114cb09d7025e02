"""A worker waits for its broker, quietly: Celery's consumer with our reconnect reporting.

Celery retries the broker with an ERROR line and "Trying again in N seconds" each time, up to
``broker_connection_max_retries`` (100 by default, then it exits). Ours retries forever (the
configuration sets no limit) at most every ``RETRY_MAX_S`` seconds, and says so through
``worker.outage``: one WARNING when the broker is unreachable, a reminder every 30 s, one INFO
when it is back. Used through Celery's ``worker_consumer`` setting (see worker/app.py).

It also runs our task only (Celery's built-in tasks, ``celery.backend_cleanup`` and the rest,
are refused like any unknown name), and says in one line why it dropped an entry it could not
run: Celery logged a page (the body, a traceback) and stored a failure result for an unknown
name, a ``celery-task-meta-*`` key kept for an hour.
"""

from __future__ import annotations

import logging
import os
from typing import Any

from celery.worker import consumer as celery_consumer
from celery.worker.state import maybe_shutdown

from mnistq.protocol import TASK_NAME, ExitCode
from mnistq.redisfaults import credentials_refused, refused_message
from mnistq.tuning import RETRY_MAX_S
from worker import outage

log = logging.getLogger("mnistq.worker")


class Consumer(celery_consumer.Consumer):
    """Celery's consumer; only how it retries the broker and what it logs meanwhile differ."""

    def ensure_connected(self, conn: Any) -> Any:
        # Celery's version also honours broker_connection_retry(_on_startup)=False; ours always
        # retries (mnistq/celeryconf.py enables both), a worker is a service that waits.
        watch = outage.broker()
        attempt = watch.clock()  # when the attempt that succeeds began (see Outage.back)

        def errback(error: BaseException, interval: float) -> None:
            nonlocal attempt
            _unless_refused(error, watch.name)
            watch.failed(error, attempt)
            attempt = watch.clock()  # the next attempt begins after this

        conn = conn.ensure_connection(
            errback,
            self.app.conf.broker_connection_max_retries,
            interval_start=1,
            interval_step=1,
            interval_max=RETRY_MAX_S,
            callback=maybe_shutdown,  # a TERM or Ctrl-C while waiting still stops the worker
        )
        self.first_connection_attempt = False
        self.broker_connection_retry_attempt = 0
        watch.back(attempt)
        return conn

    def update_strategies(self) -> None:
        super().update_strategies()
        for name in [n for n in self.strategies if n != TASK_NAME]:
            del self.strategies[name]  # its messages now go to on_unknown_task

    def _drop(self, message: Any, why: str) -> None:
        headers = message.headers if isinstance(message.headers, dict) else {}
        log.warning("message %s dropped: %s", _clip(headers.get("id", message.delivery_tag)), why)
        message.reject_log_error(log, self.connection_errors)

    def on_unknown_message(self, body: Any, message: Any) -> None:
        self._drop(message, "not a Celery task message")

    def on_unknown_task(self, body: Any, message: Any, exc: BaseException) -> None:
        headers = message.headers if isinstance(message.headers, dict) else {}
        self._drop(message, f"task {_clip(headers.get('task'))} is not {TASK_NAME}, the only task run here")

    def on_invalid_task(self, body: Any, message: Any, exc: BaseException) -> None:
        self._drop(message, f"not a valid task message ({_clip(exc)})")

    def on_decode_error(self, message: Any, exc: BaseException) -> None:
        self._drop(message, f"its body cannot be read ({_clip(exc)})")

    def on_connection_error_before_connected(self, exc: BaseException) -> None:
        _unless_refused(exc, outage.broker().name)
        outage.broker().failed(exc)

    def on_connection_error_after_connected(self, exc: BaseException) -> None:
        _unless_refused(exc, outage.broker().name)
        outage.broker().failed(exc)  # in place of Celery's warning, which _Quiet drops
        super().on_connection_error_after_connected(exc)


def _unless_refused(error: BaseException, url: str) -> None:
    """A refused password does not get better by waiting: one line, and the worker exits 2."""
    if not credentials_refused(error):
        return
    log.critical("cannot go on: %s", refused_message(f"the broker at {url}", error))
    for handler in logging.getLogger().handlers:
        handler.flush()
    # At once: what it held (nothing, at start) comes back after the visibility timeout.
    os._exit(ExitCode.CONFIG)


def _clip(value: object) -> str:
    """A received value for a log line: repr'd or said (no line breaks), at most 80 characters."""
    text = " ".join(str(value).split()) if isinstance(value, BaseException) else repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


class _Quiet(logging.Filter):
    """Drops the consumer's own reconnect lines: worker.outage has said what matters."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.msg is celery_consumer.consumer.CONNECTION_ERROR:
            return False
        args = record.args
        first = args[0] if isinstance(args, tuple) and args else None
        return first is not celery_consumer.consumer.CONNECTION_RETRY


def quiet_celery_reconnect_logs() -> None:
    logger = logging.getLogger(celery_consumer.consumer.__name__)
    if not any(isinstance(f, _Quiet) for f in logger.filters):
        logger.addFilter(_Quiet())

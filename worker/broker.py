"""A worker waits for its broker, quietly: Celery's consumer with our reconnect reporting.

Celery retries the broker with an ERROR line and "Trying again in N seconds" each time, up to
``broker_connection_max_retries`` (100 by default, then it exits). Ours retries forever (the
configuration sets no limit) at most every ``RETRY_MAX_S`` seconds, and says so through
``worker.outage``: one WARNING when the broker is unreachable, a reminder every 30 s, one INFO
when it is back. Used through Celery's ``worker_consumer`` setting (see worker/app.py).
"""

from __future__ import annotations

import logging
from typing import Any

from celery.worker import consumer as celery_consumer
from celery.worker.state import maybe_shutdown

from worker import outage

#: seconds between reconnect attempts, at most (1, 2, 3, ... then every RETRY_MAX_S)
RETRY_MAX_S = 5


class Consumer(celery_consumer.Consumer):
    """Celery's consumer; only how it retries the broker and what it logs meanwhile differ."""

    def ensure_connected(self, conn: Any) -> Any:
        # Celery's version also honours broker_connection_retry(_on_startup)=False; ours always
        # retries (mnistq/celeryconf.py enables both), a worker is a service that waits.
        watch = outage.broker()
        attempt = watch.clock()  # when the attempt that succeeds began (see Outage.back)

        def errback(error: BaseException, interval: float) -> None:
            nonlocal attempt
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

    def on_connection_error_before_connected(self, exc: BaseException) -> None:
        outage.broker().failed(exc)

    def on_connection_error_after_connected(self, exc: BaseException) -> None:
        outage.broker().failed(exc)  # in place of Celery's warning, which _Quiet drops
        super().on_connection_error_after_connected(exc)


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

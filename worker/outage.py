"""This worker's outages: its broker's and its results Redis's (one Outage, mnistq/outage.py,
when they are one server). A Redis that went away, or is out of memory: one warning, a reminder
every 30 s, one "back".

Celery and kombu log every failed reconnect (an ERROR line, "Trying again in N seconds", and
on a lost connection a traceback from each task that touched Redis). The worker reports each
failure here instead, from whichever thread saw it; this decides what is worth a line.
"""

from __future__ import annotations

import logging

from kombu.utils.url import maybe_sanitize_url

from mnistq.outage import Outage

log = logging.getLogger("mnistq.worker")


_broker = _results = Outage("the broker", log=log)


def configure(broker_url: str, results_url: str | None = None) -> None:
    """Name this process's broker and results Redis (one Outage when they are the same server)."""
    global _broker, _results
    _broker = Outage(maybe_sanitize_url(broker_url), log=log)
    same = results_url is None or results_url == broker_url
    _results = _broker if same else Outage(maybe_sanitize_url(results_url), log=log)


def broker() -> Outage:
    return _broker


def results() -> Outage:
    return _results

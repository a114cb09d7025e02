"""`mnistq worker` (a Celery worker with our defaults) and `mnistq status`."""

from __future__ import annotations

import argparse
import socket
from typing import Any

from kombu.utils.url import maybe_sanitize_url

from mnistq.errors import ConfigError
from mnistq.protocol import QUEUE
from mnistq.settings import Settings
from mnistq.tuning import BROKER_TIMEOUT_S


def main(argv: list[str]) -> int:
    """Everything after `mnistq worker` is passed to `celery worker` (``-h`` as ``--help``).

    Pool, concurrency and the rest come from the settings (mnistq/celeryconf.py).
    """
    settings = Settings.from_env()
    argv = ["--help" if a == "-h" else a for a in argv]  # Celery's worker knows only --help
    if "--help" not in argv:  # which needs no broker
        settings.require_redis()  # says clearly that a broker is needed
    from worker.app import app

    args = ["worker", "--queues", QUEUE, "--loglevel", settings.log_level.upper(), *argv]
    # worker_main() drops the code Celery's start() returns (1 after an unrecoverable error).
    return int(app.start(args) or 0)


def require_broker(url: str, timeout: float = BROKER_TIMEOUT_S) -> None:
    """Connect once, no retries; ConfigError naming the URL (password hidden) if that fails."""
    from kombu import Connection

    # Both timeouts: kombu's connect_timeout is what AMQP uses, Redis reads its own option.
    conn = Connection(
        url,
        connect_timeout=timeout,
        transport_options={"socket_connect_timeout": timeout, "socket_timeout": timeout},
    )
    try:
        conn.ensure_connection(max_retries=0)
    except Exception as e:  # refused, timed out, unknown host, bad password: all mean "not there"
        reason = " ".join(str(e).split()) or type(e).__name__
        raise ConfigError(f"cannot reach the broker at {maybe_sanitize_url(url)}: {reason}") from None
    finally:
        conn.release()


def collect_status(timeout: float = 1.0) -> dict[str, Any]:
    """Queue depth and each live worker's model version, as one dict."""
    from worker.app import app, queue_depth

    require_broker(str(app.conf.broker_url))
    replies = app.control.broadcast("mnistq_model", reply=True, timeout=timeout)
    workers = {name: info for reply in replies for name, info in reply.items()}
    return {
        "broker": maybe_sanitize_url(app.conf.broker_url),
        "queue": QUEUE,
        "queue_depth": queue_depth(),
        "workers": workers,
    }


def status_main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(
        prog="mnistq status", description="Queue depth, live workers, model versions."
    )
    p.add_argument(
        "--timeout",
        type=float,
        default=1.0,
        help="seconds to wait for workers to answer (default: %(default)s)",
    )
    p.add_argument("--json", action="store_true", help="print one JSON object")
    args = p.parse_args(argv)
    Settings.from_env().require_redis()
    info = collect_status(args.timeout)
    if args.json:
        import json

        print(json.dumps(info))
        return 0
    print(f"broker {info['broker']} on {socket.gethostname()}")
    print(f"queue {info['queue']}: {info['queue_depth']} messages waiting")
    print(f"{len(info['workers'])} live worker(s)")
    for name, model in sorted(info["workers"].items()):
        print(
            f"  {name}: model {model.get('version')} {model.get('device', '')} {model.get('precision', '')}"
        )
    return 0

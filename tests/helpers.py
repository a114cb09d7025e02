"""What the tests that start processes share: the `mnistq` command line, waiting for a condition
(not a guessed sleep) and a free port. The module that holds `main` is named here only."""

from __future__ import annotations

import os
import socket
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from helpers_images import SHIPPED_MODEL

#: the module of the `mnistq` command line's ``main()``
CLI_MODULE = "app.cli"


def mnistq_argv(before: str = "") -> list[str]:
    """`mnistq` run by this interpreter (so PYTHONPATH picks the code under test); ``before`` is
    Python run first, with the command-line module imported as ``c``."""
    code = [f"import sys; import {CLI_MODULE} as c", before, "sys.exit(c.main())"]
    return [sys.executable, "-c", "; ".join(part for part in code if part)]


#: argv prefix of `mnistq`: ``[*MNISTQ, "run", ...]``
MNISTQ = mnistq_argv()


def wait_for(
    predicate: Callable[[], Any], timeout: float = 30, what: str | Callable[[], str] = "a condition"
) -> Any:
    """Poll until ``predicate()`` is truthy and return it; on timeout fail, saying ``what``
    (a text, or a function that gives one then, e.g. a log's tail)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if value := predicate():
            return value
        time.sleep(0.05)
    said = what() if callable(what) else f"waiting for {what}"
    raise AssertionError(f"timed out after {timeout}s: {said}")


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on (now)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def worker_env(url: str, roots: Path, **env: str) -> dict[str, str]:
    """The environment of a worker (or command) on ``url`` that opens files under ``roots``: none
    of the caller's MNISTQ_* settings, the shipped model, one thread."""
    return {
        **{k: v for k, v in os.environ.items() if not k.startswith("MNISTQ_")},
        "REDIS_URL": url,
        "MNISTQ_ALLOWED_ROOTS": str(roots),
        "MNISTQ_MODEL": str(SHIPPED_MODEL),
        "MNISTQ_THREADS": "1",
        **env,
    }

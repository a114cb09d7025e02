"""Running `mnistq run` in a test: real processes, real signals, the embedded Redis.

Each run starts in a session of its own, as a shell starts a foreground job, so a signal to its
process group is what a terminal's Ctrl-C sends. Every process a run starts carries a marker in
its environment, so the tests can prove that nothing outlives it (and clean up if one did).
"""

from __future__ import annotations

import csv
import os
import re
import subprocess
import time
import uuid
from pathlib import Path

import pytest
from conftest import write_digits
from helpers import MNISTQ
from helpers_images import SHIPPED_MODEL


def read_rows(path: Path) -> list[dict[str, str]]:
    if not path.exists():
        return []
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def wait_rows(path: Path, n: int, timeout: float = 60, settle: float = 0.0) -> list[dict[str, str]]:
    """At least ``n`` rows; ``settle`` seconds later, so that anything extra (a duplicate) shows."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        rows = read_rows(path)
        if len(rows) >= n:
            if settle:
                time.sleep(settle)
                return read_rows(path)
            return rows
        time.sleep(0.05)
    pytest.fail(f"{len(read_rows(path))} of {n} rows after {timeout}s")


def children(pid: int) -> set[int]:
    found = set()
    for p in filter(str.isdigit, os.listdir("/proc")):
        try:
            stat = Path(f"/proc/{p}/stat").read_text()
        except OSError:
            continue
        if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
            found.add(int(p))
    return found


def cmdline(pid: int) -> list[str]:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace").split("\0")
    except OSError:
        return []


def marked_processes(marker: str) -> list[int]:
    """Live processes (zombies excluded) with ``marker`` in their environment."""
    pids = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            if marker.encode() not in Path(f"/proc/{pid}/environ").read_bytes():
                continue
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if state != "Z":
            pids.append(int(pid))
    return pids


def gone(marker: str, timeout: float) -> list[int]:
    deadline = time.monotonic() + timeout
    while (left := marked_processes(marker)) and time.monotonic() < deadline:
        time.sleep(0.1)
    return left


def run_env(marker: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "REDIS_URL" and not k.startswith("MNISTQ_")}
    return {**env, "MNISTQ_MODEL": str(SHIPPED_MODEL), "MNISTQ_TEST_MARK": marker}


class Run:
    """`mnistq run` in ``folder`` (its default inbox and CSV), output in ``run.log``."""

    def __init__(self, folder: Path, *args: str, env: dict[str, str] | None = None) -> None:
        self.folder, self.inbox, self.csv = folder, folder / "inbox", folder / "results.csv"
        self.log = folder / "run.log"
        self.marker = uuid.uuid4().hex
        with open(self.log, "ab") as out:
            self.proc = subprocess.Popen(
                [*MNISTQ, "run", *args],
                cwd=folder,
                env={**run_env(self.marker), **(env or {})},
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def wait_ready(self, timeout: float = 90) -> None:
        """A warm-up file's row: Redis, a worker and the watcher are all up."""
        deadline = time.monotonic() + timeout
        while not self.inbox.exists():
            assert self.proc.poll() is None, self.output()
            assert time.monotonic() < deadline, self.output()
            time.sleep(0.05)
        staged = write_digits(self.folder / "warm", 1, prefix="warm")
        os.rename(next(iter(staged)), self.inbox / "warm.png")
        wait_rows(self.csv, 1, timeout=max(1.0, deadline - time.monotonic()))

    def killpg(self, sig: int) -> None:
        os.killpg(self.proc.pid, sig)

    def wait(self, timeout: float = 90) -> int:
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            pytest.fail(f"mnistq run still running after {timeout}s:\n{self.output()}")

    def redis_server(self) -> tuple[int, int] | None:
        """(pid, port) of the embedded Redis, if one is running."""
        for pid in children(self.proc.pid):
            title = " ".join(cmdline(pid))  # redis-server sets it to "redis-server 127.0.0.1:PORT"
            if m := re.search(r"redis-server\S* 127\.0\.0\.1:(\d+)", title):
                return pid, int(m[1])
        return None

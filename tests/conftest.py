"""Real Redis, real worker processes: the embedded Redis by default, REDIS_URL when given.

With REDIS_URL set, the tests use (and flush) databases 1-15 of that server.
"""

from __future__ import annotations

import contextlib
import itertools
import multiprocessing.process
import os
import shutil
import signal
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
import redis
from helpers import worker_env
from helpers_images import DIGITS, digit_image
from PIL import Image

from app.supervisor import worker_command

if TYPE_CHECKING:
    from helpers_run import Run

_db = itertools.count()

#: fixtures that start a process (a Redis server, `mnistq run`): a test that uses one, through any
#: fixture of its own, is a `system` test without saying so
PROCESS_FIXTURES = {"redis_server", "start_run"}


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if PROCESS_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.system)


@contextlib.contextmanager
def _no_processes(item: pytest.Item) -> Iterator[None]:
    """While a test that is not `system` is set up and runs (its module or session fixtures
    included), starting a process fails it."""
    if item.get_closest_marker("system"):
        yield
        return
    popen, start = subprocess.Popen.__init__, multiprocessing.process.BaseProcess.start

    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError(f"{item.nodeid} starts a process: mark it `system` (pyproject.toml's markers)")

    def checked(self: subprocess.Popen[bytes], argv: object, *args: object, **kwargs: object) -> None:
        # ctypes.util.find_library asks ldconfig where a library is: not a process of the test's
        if not (isinstance(argv, list) and argv and os.path.basename(str(argv[0])) == "ldconfig"):
            refuse()
        popen(self, argv, *args, **kwargs)  # type: ignore[arg-type]

    subprocess.Popen.__init__ = checked  # type: ignore[method-assign]
    multiprocessing.process.BaseProcess.start = refuse  # type: ignore[method-assign]
    try:
        yield
    finally:
        subprocess.Popen.__init__ = popen  # type: ignore[method-assign]
        multiprocessing.process.BaseProcess.start = start  # type: ignore[method-assign]


@pytest.hookimpl(wrapper=True)
def pytest_runtest_setup(item: pytest.Item) -> Iterator[None]:
    """`pytest -m "not system"` is the fast loop: a test outside it that starts a process fails,
    so the split stays true as tests are added."""
    with _no_processes(item):
        return (yield)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_call(item: pytest.Item) -> Iterator[None]:
    with _no_processes(item):
        return (yield)


@pytest.fixture(scope="session")
def redis_server() -> Iterator[str]:
    """Base URL of a real Redis: the one in REDIS_URL, else an embedded one for this session."""
    if os.environ.get("REDIS_URL"):
        yield os.environ["REDIS_URL"]
        return
    from app.embedded import EmbeddedRedis

    server = EmbeddedRedis()
    try:
        yield server.url
    finally:
        server.stop()


def fresh_db(base: str, n: int | None = None) -> str:
    """A flushed database, so workers of different tests never share a queue.

    Tests run one after another and stop their workers, so databases 1-14 are reused in turn;
    15 belongs to the session-wide shared worker.
    """
    n = n if n is not None else 1 + next(_db) % 14
    url = base.rsplit("/", 1)[0] + f"/{n}" if base.count("/") > 2 else f"{base.rstrip('/')}/{n}"
    redis.Redis.from_url(url).flushdb()
    return url


class WorkerProc:
    def __init__(self, url: str, name: str, roots: Path, log: Path, **env: str) -> None:
        self.url, self.name, self.log = url, name, log
        self.env = worker_env(url, roots, **env)
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, wait: bool = True) -> WorkerProc:
        cmd = worker_command(self.name, "INFO")
        with open(self.log, "ab") as out:
            self.proc = subprocess.Popen(
                cmd, env=self.env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
            )
        if wait:
            self.wait_ready()
        return self

    def wait_ready(self, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if " ready." in self.text():
                return
            assert self.proc is not None
            if self.proc.poll() is not None:
                pytest.fail(f"worker exited with {self.proc.returncode}:\n{self.text()}")
            time.sleep(0.1)
        pytest.fail(f"worker not ready after {timeout}s:\n{self.text()}")

    def text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def signal(self, sig: int) -> None:
        if self.proc and self.proc.poll() is None:
            os.killpg(self.proc.pid, sig)

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.signal(signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.signal(signal.SIGKILL)
                self.proc.wait()


@pytest.fixture
def start_worker(redis_server: str, tmp_path: Path) -> Iterator[Callable[..., WorkerProc]]:
    """Start isolated workers (their own Redis database); all are stopped after the test."""
    started: list[WorkerProc] = []
    db = fresh_db(redis_server)

    def start(name: str = "w1@%h", wait: bool = True, **env: str) -> WorkerProc:
        w = WorkerProc(db, name, tmp_path, tmp_path / f"{name.split('@')[0]}.log", **env)
        started.append(w)
        return w.start(wait)

    yield start
    for w in started:
        w.stop()


@pytest.fixture
def start_run(tmp_path: Path) -> Iterator[Callable[..., Run]]:
    """Start `mnistq run` in ``tmp_path`` (see helpers_run.py); nothing it started outlives the test."""
    from helpers_run import Run, marked_processes  # it imports this module

    runs: list[Run] = []

    def start(*args: str, env: dict[str, str] | None = None) -> Run:
        runs.append(Run(tmp_path, *args, env=env))
        return runs[-1]

    yield start
    for run in runs:  # a failed test must not leave a run or its children behind
        if run.proc.poll() is None:
            run.proc.kill()
            run.proc.wait()
        for pid in marked_processes(run.marker):
            os.kill(pid, signal.SIGKILL)


@pytest.fixture(scope="session")
def shared_worker(redis_server: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[WorkerProc]:
    """One worker for the tests that only send it work; files must live under its ``root``."""
    root = tmp_path_factory.mktemp("files")
    w = WorkerProc(fresh_db(redis_server, 15), "shared@%h", root, root.parent / "shared-worker.log")
    w.root = root  # type: ignore[attr-defined]
    w.start()
    yield w
    w.stop()


def write_digits(folder: Path, count: int, prefix: str = "img") -> dict[Path, int]:
    """PNG digits the shipped model reads correctly: {path: digit}."""
    folder.mkdir(parents=True, exist_ok=True)
    out = {}
    for i in range(count):
        d = DIGITS[i % len(DIGITS)]
        path = folder / f"{prefix}{i:05d}_{d}.png"
        Image.fromarray(digit_image(d)).save(path)
        out[path] = d
    return out


def no_dac() -> list[str]:
    """A command prefix that runs a process without the capabilities that let root ignore file
    permissions ([] for another user, who has none); skips where that cannot be done."""
    if os.geteuid() != 0:
        return []
    setpriv = shutil.which("setpriv")
    if setpriv is None:
        pytest.skip("root here, and no setpriv to drop CAP_DAC_OVERRIDE: no permission error can happen")
    drop = "-dac_override,-dac_read_search"
    prefix = [setpriv, f"--inh-caps={drop}", f"--bounding-set={drop}"]
    check = subprocess.run([*prefix, "true"], capture_output=True, text=True)
    if check.returncode != 0:
        pytest.skip(f"setpriv cannot drop capabilities here: {check.stderr.strip()}")
    return prefix

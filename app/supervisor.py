"""The processes behind `mnistq run`: the embedded Redis and N Celery workers, watched and stopped in order.

Every child starts in a session of its own, so a terminal's Ctrl-C (SIGINT to the foreground
process group) reaches only `mnistq run`, which then stops them in order: workers first (SIGTERM,
Celery's warm shutdown, then SIGKILL to the whole group after a grace), the embedded Redis last.
Each child also dies with `mnistq run` if that is killed outright (PR_SET_PDEATHSIG).

Call everything here from the main thread: the parent-death signal follows the thread that
started a child, and only the main thread lives as long as the process.

A broker it did not start (REDIS_URL) is left alone: while it is away the workers and the
watcher wait for it by themselves, the watcher's client saying so once and then once per 30 s
(mnistq/broker.py); restarting them would not bring it back.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

from app.embedded import EmbeddedRedis, die_with_parent
from mnistq.errors import ConfigError, MnistqError, ModelError
from mnistq.protocol import QUEUE, ExitCode
from mnistq.settings import Settings, cores
from mnistq.tuning import MAX_RESTART_DELAY_S, QUICK_EXIT_S

log = logging.getLogger("mnistq.run")


def worker_command(
    name: str,
    loglevel: str = "INFO",
    extra: Sequence[str] = (),
    *,
    app: str = "worker",
    queue: str = QUEUE,
) -> list[str]:
    """The command line of one Celery worker process named ``name`` (e.g. ``w1@%h``).

    ``extra`` is appended as is (``--pool``, ``-c`` ...); ``app`` and ``queue`` exist for the
    benchmarks' naive baseline, which is another Celery app.
    """
    return [
        sys.executable, "-m", "celery", "-A", app, "--quiet", "worker", "-Q", queue, "-n", name,
        "--loglevel", loglevel, "--without-mingle", "--without-gossip", *extra,
    ]  # fmt: skip


#: Celery's warning when a worker runs as root: six lines, once per worker process. `mnistq run`
#: says it in one line, once (Supervisor.start); a message filter, so no Celery import at start.
_ROOT_WARNING = "ignore:You're running the worker with superuser privileges"


def _as_root() -> bool:
    return hasattr(os, "geteuid") and os.geteuid() == 0


def worker_env(
    settings: Settings, redis_url: str, workers: int, base: Mapping[str, str] | None = None
) -> dict[str, str]:
    """The workers' environment: ``base`` (default: ours) plus what `mnistq run` decides for them."""
    env = {**(os.environ if base is None else base)}
    if _as_root():
        env["PYTHONWARNINGS"] = ",".join(w for w in (env.get("PYTHONWARNINGS"), _ROOT_WARNING) if w)
    return {
        **env,
        "REDIS_URL": redis_url,
        "MNISTQ_ALLOWED_ROOTS": os.pathsep.join(str(root) for root in settings.roots()),
        # Each process decodes on about one core (the GIL) while its model threads wait, so the
        # model may use twice its share of the cores: on 2 cores, 2 processes x 2 threads ran
        # 3-13% ahead of 2 x 1 (bench/pipeline.py --workers 2 --threads 1 2 --alternate).
        "MNISTQ_THREADS": str(settings.threads or min(cores(), max(1, 2 * cores() // workers))),
    }


def _fatal(name: str, code: int) -> MnistqError:
    why = "its model" if code == ExitCode.MODEL else "its configuration or broker"
    text = f"worker {name} could not start (exit {code}: {why}); see its message above"
    return ModelError(text) if code == ExitCode.MODEL else ConfigError(text)


@dataclass
class _Worker:
    name: str  # Celery's node name; %h is the host name
    proc: subprocess.Popen[bytes] | None = None
    started: float = 0.0
    quick_exits: int = 0
    restart_at: float | None = None  # set while it waits to be started again

    @property
    def short(self) -> str:
        return self.name.split("@", 1)[0]


class Supervisor:
    """Starts the embedded Redis (unless ``settings.redis_url`` names one) and ``workers`` workers.

    ``check()`` (call it every fraction of a second) restarts a worker that died, except one that
    exited 2 or 3 (configuration or model: restarting cannot help, it raises ConfigError or
    ModelError), and restarts a dead embedded Redis on the same port, so every client keeps its URL.
    """

    def __init__(
        self,
        settings: Settings,
        workers: int,
        loglevel: str = "WARNING",
        *,
        grace_s: float = 30.0,
        env: Mapping[str, str] | None = None,
    ) -> None:
        if workers < 1:
            raise ValueError(f"workers must be >= 1, not {workers}")
        self.settings, self.loglevel, self.grace_s = settings, loglevel, grace_s
        self.base_env = env
        self.redis: EmbeddedRedis | None = None
        self.url: str | None = None
        self.workers = [_Worker(f"mnistq{i}@%h") for i in range(workers)]
        self._env: dict[str, str] = {}

    def start(self) -> str:
        """Start everything; returns the broker URL the watcher and the workers share."""
        if self.settings.redis_url:
            self.url = self.settings.redis_url
        else:
            self.redis = EmbeddedRedis()
            self.url = self.redis.url
        self._env = worker_env(self.settings, self.url, len(self.workers), self.base_env)
        if _as_root():
            log.warning(
                "running as root, which Celery advises against (the Docker image runs as a "
                "user of its own); the workers read only what lies under %s",
                self._env["MNISTQ_ALLOWED_ROOTS"].replace(os.pathsep, ", "),
            )
        for w in self.workers:
            self._start(w)
        return self.url

    def _start(self, w: _Worker) -> None:
        w.proc = subprocess.Popen(
            worker_command(w.name, self.loglevel),
            env=self._env,
            stdin=subprocess.DEVNULL,
            # Celery writes only its "Warm shutdown" chatter there; logs and errors go to stderr.
            stdout=subprocess.DEVNULL,
            start_new_session=True,
            preexec_fn=die_with_parent,
        )
        w.started, w.restart_at = time.monotonic(), None
        log.debug("worker %s started (pid %d)", w.short, w.proc.pid)

    def check(self) -> None:
        """Restart what died; raise ConfigError or ModelError for a worker that cannot start."""
        if self.redis is not None and not self.redis.alive():
            log.warning(
                "embedded Redis exited with %s; starting it again on port %d (its queue and replies are lost)",
                self.redis.returncode(),
                self.redis.port,
            )
            self.redis.start()
        now = time.monotonic()
        for w in self.workers:
            if w.restart_at is not None:
                if now >= w.restart_at:
                    self._start(w)
                continue
            code = w.proc.poll() if w.proc is not None else None
            if code is None:
                continue
            if code in (ExitCode.CONFIG, ExitCode.MODEL):
                raise _fatal(w.short, code)
            # One that keeps dying at start-up (a broken environment) must not spin.
            w.quick_exits = w.quick_exits + 1 if now - w.started < QUICK_EXIT_S else 0
            delay = min(MAX_RESTART_DELAY_S, 2.0 ** (w.quick_exits - 1)) if w.quick_exits else 0.0
            log.warning("worker %s exited with %s; restarting it in %.0fs", w.short, code, delay)
            w.restart_at = now + delay

    def stop(self, abort: Callable[[], bool] = lambda: False) -> None:
        """Workers first (warm shutdown, SIGKILL after the grace), then the embedded Redis.

        ``abort()`` turning true (a second Ctrl-C) skips the waiting: everything is killed.
        """
        live = [w.proc for w in self.workers if w.proc is not None and w.proc.poll() is None]
        for w in self.workers:
            w.restart_at = None
        for proc in live:
            # Only the leader: Celery stops its own pool; children signalled directly count as lost.
            _signal(proc, signal.SIGTERM, group=False)
        deadline = time.monotonic() + self.grace_s
        while any(p.poll() is None for p in live) and time.monotonic() < deadline and not abort():
            time.sleep(0.05)
        for proc in live:
            if proc.poll() is None:
                if not abort():
                    log.warning("worker pid %d still busy after %.0fs; killing it", proc.pid, self.grace_s)
                _signal(proc, signal.SIGKILL, group=True)
                proc.wait()
        if self.redis is not None:
            if abort():
                self.redis.kill()
            self.redis.stop()

    def kill(self) -> None:
        """Stop everything at once (SIGKILL to each child's process group)."""
        for w in self.workers:
            w.restart_at = None
            if w.proc is not None and w.proc.poll() is None:
                _signal(w.proc, signal.SIGKILL, group=True)
                w.proc.wait()
        if self.redis is not None:
            self.redis.kill()
            self.redis.stop()


def _signal(proc: subprocess.Popen[bytes], sig: int, group: bool) -> None:
    # Only while the child is unreaped (poll() is None) can its pid, and so its group id, not
    # belong to some other process.
    if proc.poll() is not None:
        return
    try:
        if group:
            os.killpg(proc.pid, sig)
        else:
            proc.send_signal(sig)
    except ProcessLookupError:
        pass

"""One settings object, read from the environment with defaults.

Every process (worker, producer, CLI) builds it with ``Settings.from_env()``; nothing else in
the project reads ``os.environ`` for configuration.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

from mnistq.errors import ConfigError

#: The shipped model lives at the repository root, next to this package.
DEFAULT_MODEL = Path(__file__).resolve().parent.parent / "model_state.pt"
QUEUE = "mnistq"
TASK_NAME = "mnistq.classify"
N = TypeVar("N", int, float)


def _number(name: str, default: N) -> N:
    """The variable as a number of the default's type; the default when unset or empty."""
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return default
    try:
        return type(default)(raw)
    except ValueError:
        kind = "an integer" if isinstance(default, int) else "a number"
        raise ConfigError(f"{name} must be {kind}, got {raw!r}") from None


def cores() -> int:
    """The CPUs this process may use (affinity and container limits included where visible)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def _paths(raw: str) -> tuple[Path, ...]:
    return tuple(Path(p).expanduser().resolve() for p in raw.split(os.pathsep) if p)


@dataclass(frozen=True)
class Settings:
    """Settings for every part of mnist-queue; each field names its variable."""

    redis_url: str | None = None  # REDIS_URL: broker and result backend
    broker_url: str | None = None  # MNISTQ_BROKER_URL: another broker (amqp://...); default REDIS_URL
    model: Path = DEFAULT_MODEL  # MNISTQ_MODEL
    inbox: Path = Path("inbox")  # MNISTQ_INBOX
    csv: Path = Path("results.csv")  # MNISTQ_CSV
    batch_size: int = 256  # MNISTQ_BATCH_SIZE: images per coalesced batch / per message
    batch_wait_ms: int = 5  # MNISTQ_BATCH_WAIT_MS: how long to wait to fill a batch
    threads: int = 0  # MNISTQ_THREADS: torch threads per worker process (0: cores/processes)
    device: str = "auto"  # MNISTQ_DEVICE: auto|cpu|cuda
    precision: str = "auto"  # MNISTQ_PRECISION: auto|bf16|fp32
    allowed_roots: tuple[Path, ...] = field(default_factory=tuple)  # MNISTQ_ALLOWED_ROOTS
    max_pixels: int = 40_000_000  # MNISTQ_MAX_PIXELS: refuse larger images before decoding
    result_expires: int = 3600  # MNISTQ_RESULT_EXPIRES: seconds results stay in Redis
    visibility_timeout: int = 30  # MNISTQ_VISIBILITY_TIMEOUT: redelivery after a lost worker
    stats_interval: float = 10.0  # MNISTQ_STATS_INTERVAL: seconds between throughput lines
    pool: str = "threads"  # MNISTQ_POOL: threads (coalescing batcher) or prefork

    @classmethod
    def from_env(cls) -> Settings:
        env = os.environ
        inbox = Path(env.get("MNISTQ_INBOX") or "inbox").expanduser()
        roots = env.get("MNISTQ_ALLOWED_ROOTS", "")
        s = cls(
            redis_url=env.get("REDIS_URL") or None,
            broker_url=env.get("MNISTQ_BROKER_URL") or None,
            model=Path(env.get("MNISTQ_MODEL") or DEFAULT_MODEL).expanduser(),
            inbox=inbox,
            csv=Path(env.get("MNISTQ_CSV") or "results.csv").expanduser(),
            batch_size=_number("MNISTQ_BATCH_SIZE", 256),
            batch_wait_ms=_number("MNISTQ_BATCH_WAIT_MS", 5),
            threads=_number("MNISTQ_THREADS", 0),
            device=env.get("MNISTQ_DEVICE", "auto"),
            precision=env.get("MNISTQ_PRECISION", "auto"),
            allowed_roots=_paths(roots) if roots else (inbox.resolve(),),
            max_pixels=_number("MNISTQ_MAX_PIXELS", 40_000_000),
            result_expires=_number("MNISTQ_RESULT_EXPIRES", 3600),
            visibility_timeout=_number("MNISTQ_VISIBILITY_TIMEOUT", 30),
            stats_interval=_number("MNISTQ_STATS_INTERVAL", 10.0),
            pool=env.get("MNISTQ_POOL") or "threads",
        )
        s.validate()
        return s

    def validate(self) -> None:
        if self.batch_size < 1:
            raise ConfigError("MNISTQ_BATCH_SIZE must be >= 1")
        if self.device not in ("auto", "cpu", "cuda"):
            raise ConfigError(f"MNISTQ_DEVICE must be auto, cpu or cuda, not {self.device!r}")
        if self.precision not in ("auto", "bf16", "fp32"):
            raise ConfigError(f"MNISTQ_PRECISION must be auto, bf16 or fp32, not {self.precision!r}")
        if self.pool not in ("threads", "prefork"):
            raise ConfigError(f"MNISTQ_POOL must be threads or prefork, not {self.pool!r}")
        if self.max_pixels < 1:
            raise ConfigError("MNISTQ_MAX_PIXELS must be >= 1")

    def require_redis(self) -> str:
        if not self.redis_url:
            raise ConfigError(
                "REDIS_URL is not set: point it at a Redis (e.g. redis://localhost:6379/0), "
                "or use `mnistq run`, which starts an embedded Redis of its own"
            )
        return self.redis_url

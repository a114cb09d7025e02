"""One settings object, read from the environment; each default is written once, on its field.

Every process (worker, producer, CLI) builds it with ``Settings.from_env()``; nothing else in
the project reads ``os.environ`` for configuration.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from mnistq.errors import ConfigError

#: The shipped model lives at the repository root, next to this package.
DEFAULT_MODEL = Path(__file__).resolve().parent.parent / "model_state.pt"


def cores() -> int:
    """The CPUs this process may use (affinity and container limits included where visible)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def _text(raw: str) -> str:
    return raw


def _int(raw: str) -> int:
    return int(raw)


def _float(raw: str) -> float:
    return float(raw)


def _path(raw: str) -> Path:
    return Path(raw).expanduser()


def _paths(raw: str) -> tuple[Path, ...]:
    return tuple(Path(p).expanduser().resolve() for p in raw.split(os.pathsep) if p)


def _env(name: str, parse: Callable[[str], Any], *aliases: str) -> dict[str, Any]:
    return {"env": name, "parse": parse, "aliases": aliases}


@dataclass(frozen=True)
class Settings:
    """Settings for every part of mnist-queue; each field's metadata names its variable."""

    redis_url: str | None = field(default=None, metadata=_env("REDIS_URL", _text))
    #: another broker (amqp://...); default: REDIS_URL, which always carries the reply lists
    broker_url: str | None = field(default=None, metadata=_env("MNISTQ_BROKER_URL", _text))
    model: Path = field(default=DEFAULT_MODEL, metadata=_env("MNISTQ_MODEL", _path))
    inbox: Path = field(default=Path("inbox"), metadata=_env("MNISTQ_INBOX", _path))
    csv: Path = field(default=Path("results.csv"), metadata=_env("MNISTQ_CSV", _path))
    #: paths per task message (producer, Python API)
    message_size: int = field(default=256, metadata=_env("MNISTQ_MESSAGE_SIZE", _int, "MNISTQ_BATCH_SIZE"))
    #: images per coalesced forward pass in a worker
    forward_batch: int = field(default=256, metadata=_env("MNISTQ_FORWARD_BATCH", _int, "MNISTQ_BATCH_SIZE"))
    #: how long a worker's model thread waits for more images to fill a forward batch
    coalesce_wait_ms: float = field(
        default=5.0, metadata=_env("MNISTQ_COALESCE_WAIT_MS", _float, "MNISTQ_BATCH_WAIT_MS")
    )
    #: torch threads per worker process (0: cores / processes)
    threads: int = field(default=0, metadata=_env("MNISTQ_THREADS", _int))
    #: task threads per worker process (threads pool) or child processes (prefork pool)
    concurrency: int = field(default=4, metadata=_env("MNISTQ_CONCURRENCY", _int))
    device: str = field(default="auto", metadata=_env("MNISTQ_DEVICE", _text))  # auto|cpu|cuda
    precision: str = field(default="auto", metadata=_env("MNISTQ_PRECISION", _text))  # auto|bf16|fp32
    #: the only folders workers open files under (default: the inbox)
    allowed_roots: tuple[Path, ...] = field(default=(), metadata=_env("MNISTQ_ALLOWED_ROOTS", _paths))
    #: images with more pixels are refused from their header, before decoding
    max_pixels: int = field(default=40_000_000, metadata=_env("MNISTQ_MAX_PIXELS", _int))
    #: seconds an unread reply list stays in Redis
    result_expires: int = field(default=3600, metadata=_env("MNISTQ_RESULT_EXPIRES", _int))
    #: seconds before a lost worker's unacknowledged messages are delivered again
    visibility_timeout: int = field(default=30, metadata=_env("MNISTQ_VISIBILITY_TIMEOUT", _int))
    #: seconds after which unanswered work is sent again where the broker's queue cannot be
    #: listed (RabbitMQ); on Redis, lost work is found by looking (see producer/evidence.py)
    resend_after_s: float = field(default=45.0, metadata=_env("MNISTQ_RESEND_AFTER_S", _float))
    #: seconds between a worker's throughput lines
    stats_interval: float = field(default=10.0, metadata=_env("MNISTQ_STATS_INTERVAL", _float))
    pool: str = field(default="threads", metadata=_env("MNISTQ_POOL", _text))  # threads|prefork
    log_level: str = field(default="INFO", metadata=_env("MNISTQ_LOG_LEVEL", _text))

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> Settings:
        """Unset or empty variables keep the field's default; a bad value is a ConfigError."""
        env = os.environ if env is None else env
        values: dict[str, Any] = {}
        for f in fields(cls):
            meta = f.metadata
            name = next((n for n in (meta["env"], *meta["aliases"]) if env.get(n)), None)
            if name is None:
                continue
            try:
                values[f.name] = meta["parse"](env[name])
            except ValueError:
                raise ConfigError(f"{name}: {env[name]!r} is not a valid value") from None
        s = cls(**values)
        s.validate()
        return s

    def with_(self, **changes: Any) -> Settings:
        """A copy with some fields changed (command-line options), validated."""
        s = replace(self, **changes)
        s.validate()
        return s

    def validate(self) -> None:
        for name in ("message_size", "forward_batch", "concurrency", "max_pixels"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{self.variable(name)} must be >= 1")
        for name in ("threads", "coalesce_wait_ms", "result_expires", "visibility_timeout", "resend_after_s"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{self.variable(name)} must be >= 0")
        choices = {
            "device": ("auto", "cpu", "cuda"),
            "precision": ("auto", "bf16", "fp32"),
            "pool": ("threads", "prefork"),
        }
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ConfigError(
                    f"{self.variable(name)} must be one of {', '.join(allowed)}, not {getattr(self, name)!r}"
                )
        if self.log_level.upper() not in ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"):
            raise ConfigError(
                f"MNISTQ_LOG_LEVEL must be DEBUG, INFO, WARNING or ERROR, not {self.log_level!r}"
            )

    @classmethod
    def variable(cls, name: str) -> str:
        """The environment variable of a field."""
        return str(next(f for f in fields(cls) if f.name == name).metadata["env"])

    def roots(self) -> tuple[Path, ...]:
        """The folders workers may open files under: MNISTQ_ALLOWED_ROOTS, else the inbox."""
        return self.allowed_roots or (self.inbox.resolve(),)

    def require_redis(self) -> str:
        if not self.redis_url:
            raise ConfigError(
                "REDIS_URL is not set: point it at a Redis (e.g. redis://localhost:6379/0), "
                "or use `mnistq run`, which starts an embedded Redis of its own"
            )
        return self.redis_url

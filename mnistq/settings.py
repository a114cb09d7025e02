"""One settings object, read from the environment; each default is written once, on its field.

Every process (worker, producer, CLI) builds it with ``Settings.from_env()``; nothing else in
the project reads ``os.environ`` for configuration. The one other source is the state file of a
running `mnistq run` (see :class:`Settings` and app/runstate.py, which writes it).
"""

from __future__ import annotations

import json
import logging
import math
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any, Final, Literal

from mnistq.errors import ConfigError
from mnistq.protocol import MAX_PATHS
from mnistq.urls import REDIS_SCHEMES, scheme

log = logging.getLogger(__name__)

#: The shipped model lives at the repository root, next to this package.
DEFAULT_MODEL = Path(__file__).resolve().parent.parent / "model_state.pt"
#: Where a running `mnistq run` records its embedded Redis: in the folder of its CSV.
RUN_STATE_NAME = ".mnistq-run.json"


def cores() -> int:
    """The CPUs this process may use (affinity and container limits included where visible)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def _text(raw: str) -> str:
    return raw


def _int(raw: str) -> int:
    return int(raw)


def _float(raw: str) -> float:
    value = float(raw)
    if not math.isfinite(value):  # inf would reach a wait as an overflow, nan every comparison
        raise ValueError(raw)
    return value


def _path(raw: str) -> Path:
    return Path(raw).expanduser()


def _paths(raw: str) -> tuple[Path, ...]:
    return tuple(Path(p).expanduser().resolve() for p in raw.split(os.pathsep) if p)


#: ``review_below``'s "the serving model's recommended threshold" (the worker knows it)
AUTO: Final = "auto"
#: off (None), the model's recommended threshold (AUTO), or a P of one's own, 0 < P < 1
ReviewBelow = float | Literal["auto"] | None
REVIEW_BELOW_HELP = (
    "a number between 0 and 1, such as 0.9, auto for the model's recommended threshold, or off"
)


def parse_review_below(raw: str | float | None) -> ReviewBelow:
    """The review setting from a variable, an option or an API argument; ValueError if bad.

    ``auto``/``recommended``: the serving model's recommended threshold; ``off`` (or None): no
    review; a number P, 0 < P < 1: a calibrated confidence under P is sent to review.
    """
    if raw is None:
        return None
    if isinstance(raw, str):
        word = raw.strip().lower()  # any case
        if word in ("auto", "recommended"):
            return AUTO
        if word == "off":
            return None
    if isinstance(raw, bool):  # True would read as 1.0: a mistake, not a threshold
        raise ValueError(f"expected {REVIEW_BELOW_HELP}, not {raw!r}")
    try:
        p = float(raw)
    except (TypeError, ValueError):
        raise ValueError(f"expected {REVIEW_BELOW_HELP}, not {raw!r}") from None
    if not 0 < p < 1:  # NaN too
        raise ValueError(f"expected {REVIEW_BELOW_HELP}, not {raw!r}")
    return p


def _env(name: str, parse: Callable[[str], Any], *aliases: str, hint: str = "") -> dict[str, Any]:
    return {"env": name, "parse": parse, "aliases": aliases, "hint": hint}


@dataclass(frozen=True)
class Settings:
    """Settings for every part of mnist-queue; each field's metadata names its variable.

    ``redis_url`` comes from REDIS_URL. When that is unset, ``from_env`` looks for a running
    `mnistq run` whose CSV is in the same folder as this CSV (MNISTQ_CSV, default
    ``results.csv`` in the current folder): it records its embedded Redis's URL in
    ``.mnistq-run.json`` there while it runs, so `mnistq status`, `mnistq classify`, an extra
    `mnistq worker` and ``api.Client()`` started beside it need no REDIS_URL. The file
    names the run's process (pid and start time); a file whose process is gone (a killed run) is
    ignored, the next run replaces it, and a clean stop removes it.
    """

    redis_url: str | None = field(default=None, metadata=_env("REDIS_URL", _text))
    #: another broker (amqp://...); default: REDIS_URL, which always carries the reply lists
    broker_url: str | None = field(default=None, metadata=_env("MNISTQ_BROKER_URL", _text))
    model: Path = field(default=DEFAULT_MODEL, metadata=_env("MNISTQ_MODEL", _path))
    inbox: Path = field(default=Path("inbox"), metadata=_env("MNISTQ_INBOX", _path))
    csv: Path = field(default=Path("results.csv"), metadata=_env("MNISTQ_CSV", _path))
    #: paths per task message (producer, Python API), at most protocol.MAX_PATHS
    message_size: int = field(default=256, metadata=_env("MNISTQ_MESSAGE_SIZE", _int, "MNISTQ_BATCH_SIZE"))
    #: images per coalesced forward pass in a worker
    forward_batch: int = field(default=256, metadata=_env("MNISTQ_FORWARD_BATCH", _int, "MNISTQ_BATCH_SIZE"))
    #: how long a worker's model thread waits for the images of requests still being decoded,
    #: to fill a forward batch (a lone request never waits)
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
    #: listed (RabbitMQ); on Redis, lost work is found by looking (see mnistq/evidence.py)
    resend_after_s: float = field(default=45.0, metadata=_env("MNISTQ_RESEND_AFTER_S", _float))
    #: producers: seconds a file's size and time must stand still before it counts as complete
    #: where no event says so (--polling; a file found already there, or hard-linked in)
    settle_s: float = field(default=1.0, metadata=_env("MNISTQ_SETTLE_S", _float))
    #: seconds between a worker's throughput lines
    stats_interval: float = field(default=10.0, metadata=_env("MNISTQ_STATS_INTERVAL", _float))
    pool: str = field(default="threads", metadata=_env("MNISTQ_POOL", _text))  # threads|prefork
    #: producers and the API: send to review files judged not a digit or under this confidence
    #: (None: off; AUTO: the serving model's recommended threshold); the worker decides
    review_below: ReviewBelow = field(
        default=None, metadata=_env("MNISTQ_REVIEW_BELOW", parse_review_below, hint=REVIEW_BELOW_HELP)
    )
    log_level: str = field(default="INFO", metadata=_env("MNISTQ_LOG_LEVEL", _text))

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None, *, run_state: bool = True) -> Settings:
        """Unset or empty variables keep the field's default; a bad value is a ConfigError.

        ``run_state=False`` ignores a running `mnistq run`'s state file (see the class): a new
        `mnistq run` starts its own Redis rather than borrowing another run's.
        """
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
                hint = f" (expected {meta['hint']})" if meta["hint"] else ""
                raise ConfigError(f"{name}: {env[name]!r} is not a valid value{hint}") from None
        if run_state and "redis_url" not in values:
            values["redis_url"] = read_run_state(values.get("csv", cls.csv))
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
        if self.message_size > MAX_PATHS:  # workers refuse a longer message whole
            raise ConfigError(f"{self.variable('message_size')} must be at most {MAX_PATHS}")
        for name in (
            "threads", "coalesce_wait_ms", "result_expires", "visibility_timeout", "resend_after_s", "settle_s"
        ):  # fmt: skip
            if not getattr(self, name) >= 0:  # nan too, from a caller that bypassed from_env
                raise ConfigError(f"{self.variable(name)} must be >= 0")
        if not self.stats_interval > 0:
            raise ConfigError(f"{self.variable('stats_interval')} must be > 0 (seconds)")
        if self.coalesce_wait_ms > 60_000:  # a forward batch held a minute for images to come
            raise ConfigError(f"{self.variable('coalesce_wait_ms')} must be at most 60000 (ms)")
        if self.redis_url and scheme(self.redis_url) not in REDIS_SCHEMES:
            raise ConfigError(
                f"REDIS_URL must be a redis://, rediss:// or unix:// URL, not {self.redis_url!r} "
                "(another broker goes in MNISTQ_BROKER_URL; Redis still carries the replies)"
            )
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
        try:  # held in its parsed form only: None, AUTO or a float
            if parse_review_below(self.review_below) != self.review_below:
                raise ValueError(f"expected {REVIEW_BELOW_HELP}, not {self.review_below!r}")
        except ValueError as e:
            raise ConfigError(f"MNISTQ_REVIEW_BELOW: {e}") from None
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
                "REDIS_URL is not set: point it at a Redis (e.g. redis://localhost:6379/0), or use "
                "`mnistq run`, which starts an embedded Redis of its own (while it runs, commands "
                f"started beside it find it through {run_state_path(self.csv)})"
            )
        return self.redis_url


def run_state_path(csv: Path) -> Path:
    """The state file of a `mnistq run` writing ``csv``: beside it."""
    return csv.expanduser().absolute().parent / RUN_STATE_NAME


def process_started(pid: int) -> int | None:
    """When a process started (clock ticks since boot; Linux), to tell a recycled pid apart."""
    try:
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19])
    except (OSError, ValueError, IndexError):
        return None


def _alive(pid: int, started: int | None) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process: alive
        pass
    return started is None or process_started(pid) in (None, started)


def read_run_state(csv: Path) -> str | None:
    """The URL recorded beside ``csv`` by a `mnistq run` that is still running, else None."""
    try:
        state = json.loads(run_state_path(csv).read_text(encoding="utf-8"))
        url, pid, started = state["url"], state["pid"], state.get("started")
    except (OSError, ValueError, TypeError, KeyError):  # none, or torn: as good as none
        return None
    if not (isinstance(url, str) and url and isinstance(pid, int) and pid > 0 and _alive(pid, started)):
        return None
    return url

"""The contract between producers and workers: task, result record, CSV columns, exit codes.

Everything that crosses a process boundary is spelled here once. Torch-, PIL- and numpy-free,
so any side may import it.

- **Task** ``mnistq.classify`` on queue ``mnistq``, called with keyword arguments only
  (:class:`ClassifyRequest`). It stores no Celery result: answers go to the caller's reply list.
- **Reply**: the worker pushes one JSON object ``{"task_id": ..., "results": [Result, ...]}``
  (:class:`Reply`) onto the Redis list named by ``reply_to``, which must be ``REPLY_PREFIX`` +
  32 hex digits. A message the worker refuses whole (over :data:`MAX_PATHS` paths, malformed)
  is answered with no results and ``refused``, the reason.
- **Result**: one per path, in the request's order, failures included (:class:`Result`).
- **CSV**: one row per file, columns :data:`CSV_COLUMNS`.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, fields
from enum import IntEnum, StrEnum
from typing import Any

#: miscounted() speaks for its callers, the producer's dispatch and the API's Job
_log = logging.getLogger("mnistq.producer")

QUEUE = "mnistq"
TASK_NAME = "mnistq.classify"
REPLY_PREFIX = "mnistq:reply:"
_REPLY_KEY = re.compile(re.escape(REPLY_PREFIX) + r"[0-9a-f]{32}\Z")
#: the most paths one message may carry (MNISTQ_MESSAGE_SIZE is at most this): a worker refuses
#: a longer one whole, before opening any file (200,000 paths took 5 GB at once)
MAX_PATHS = 4096

#: The image files the product reads (by extension); the watcher ignores everything else.
EXTENSIONS = frozenset(
    {".png", ".jpg", ".jpeg", ".gif", ".bmp", ".tif", ".tiff", ".webp", ".pgm", ".ppm", ".pbm"}
)


class ExitCode(IntEnum):
    """Every command's exit status (EXIT_CODES_HELP says them in words)."""

    OK = 0
    UNEXPECTED = 1  # a bug or an unforeseen failure: the log has the details
    CONFIG = 2  # configuration, broker or lock: a person must act
    MODEL = 3  # the model file is missing or unusable
    ABANDONED = 4  # stopped by a failure with work in flight left undone (redone on the next start)
    #: `classify` and `predict`: a file got an error (refused, not found, unreadable, no digit);
    #: each is said on its line and the others are still classified. An ordinary outcome, not a bug.
    FAILED_INPUT = 5
    INTERRUPTED = 130  # a second Ctrl-C: stopped at once


#: The exit-code table of `--help` (the README's says the same).
EXIT_CODES_HELP = (
    "exit status: 0 done; 1 unexpected (a bug); 2 a setting, the broker or a lock needs a person; "
    "3 the model file is missing or unusable; 4 stopped by a failure with work left undone; "
    "5 a file got an error (said on its line; the others are still classified); 130 a second Ctrl-C"
)


class ReviewReason(StrEnum):
    """Why a classified file was sent to review (its digit and confidence are still given)."""

    NOT_DIGIT = "not a digit"  # the model judges the image not a digit at all
    LOW_CONFIDENCE = "low confidence"  # the calibrated confidence is under the request's P


#: The P of a review request with none of its own, when the serving model recommends none
#: (a checkpoint from before calibration): a prediction less likely right than wrong.
FALLBACK_REVIEW_BELOW = 0.5


class ErrorKind(StrEnum):
    """Why a file got an error row; the ``error`` text says the details."""

    NOT_FOUND = "not_found"  # gone before a worker opened it
    REFUSED = "refused"  # outside the allowed roots, not a regular file, a relative path
    TOO_LARGE = "too_large"  # over MNISTQ_MAX_PIXELS
    UNREADABLE = "unreadable"  # not an image, or damaged
    NO_DIGIT = "no_digit"  # blank or only noise
    INTERNAL = "internal"  # a bug or a failed batch: the worker's log has the traceback


def reply_key(token: str) -> str:
    """The reply list for a client token (32 hex digits, e.g. ``uuid4().hex``)."""
    key = REPLY_PREFIX + token
    if not is_reply_key(key):
        raise ValueError(f"not a reply token: {token!r}")
    return key


def is_reply_key(key: object) -> bool:
    return isinstance(key, str) and _REPLY_KEY.match(key) is not None


@dataclass(frozen=True)
class ClassifyRequest:
    """The task's keyword arguments."""

    paths: list[str]
    ids: list[str] | None = None  # the producer's file ids, echoed back in the results
    reply_to: str | None = None  # a reply key (see reply_key)
    probabilities: bool = False  # also return the 10 class probabilities per image
    #: decide review per image (see Result.review); an older worker ignores it (no review)
    review: bool = False
    #: the P of review: a confidence under it is sent to review; None: the serving model's
    #: recommended threshold (FALLBACK_REVIEW_BELOW when it has none)
    review_below: float | None = None

    def to_kwargs(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_kwargs(cls, kwargs: dict[str, Any]) -> ClassifyRequest:
        """Validate a received message's arguments; ValueError says what is wrong."""
        paths, ids = kwargs.get("paths"), kwargs.get("ids")
        if isinstance(paths, list) and len(paths) > MAX_PATHS:
            raise ValueError(f"{len(paths)} paths in one message, over the limit of {MAX_PATHS}")
        if not isinstance(paths, list) or not all(isinstance(p, str) for p in paths):
            raise ValueError("paths must be a list of strings")
        if ids is not None and (
            not isinstance(ids, list) or len(ids) != len(paths) or not all(isinstance(i, str) for i in ids)
        ):
            raise ValueError("ids must be a list of strings, one per path")
        below = kwargs.get("review_below")
        if below is not None and not (
            isinstance(below, int | float) and not isinstance(below, bool) and 0 < below < 1
        ):
            raise ValueError(f"review_below must be a number between 0 and 1, or None, not {below!r}")
        return cls(
            paths=paths,
            ids=ids,
            reply_to=kwargs.get("reply_to"),
            probabilities=bool(kwargs.get("probabilities", False)),
            review=bool(kwargs.get("review", False)),
            review_below=None if below is None else float(below),
        )


@dataclass
class Result:
    """One image's outcome. ``error`` and ``error_kind`` are set together, or neither.

    Fields may be added over time; ``from_dict`` ignores keys it does not know, so an older
    producer keeps working beside a newer worker.
    """

    path: str
    id: str | None = None
    digit: int | None = None
    confidence: float | None = None
    model_version: str | None = None
    error: str | None = None
    error_kind: ErrorKind | None = None
    probabilities: list[float] | None = None
    #: why the file goes to review/ (a ReviewReason's text), None when it does not: set by the
    #: worker, only when the request asked for review, never on an error result
    review: str | None = None
    worker: str | None = None
    decode_ms_per_image: float | None = None
    forward_ms_per_batch: float | None = None
    forward_batch_size: int | None = None
    #: where the producer put the file once its row was written (done/, review/ or failed/); set by
    #: the watcher, never by a worker; None when the file stayed where it was (--keep, a folder)
    moved_to: str | None = None

    @classmethod
    def failed(cls, path: str, kind: ErrorKind, message: str, file_id: str | None = None) -> Result:
        return cls(path=path, id=file_id, error=message, error_kind=kind)

    def to_dict(self) -> dict[str, Any]:
        # Not dataclasses.asdict: its deep copy was ~40 us a result, per image in the worker.
        mine = self.__dict__
        d = {k: mine[k] for k in _RESULT_FIELDS if mine[k] is not None}
        if "probabilities" in d:
            d["probabilities"] = list(d["probabilities"])
        return d

    def but(self, **changes: Any) -> Result:
        """A copy with these fields changed (dataclasses.replace, at half its cost)."""
        return Result(**{**self.__dict__, **changes})

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Result:
        kwargs = {k: v for k, v in d.items() if k in _RESULT_KNOWN}
        kind = kwargs.get("error_kind")
        if kind is not None:
            kwargs["error_kind"] = (
                ErrorKind(kind) if kind in ErrorKind._value2member_map_ else ErrorKind.INTERNAL
            )
        elif kwargs.get("error"):
            kwargs["error_kind"] = ErrorKind.INTERNAL
        return cls(**kwargs)


_RESULT_FIELDS = tuple(f.name for f in fields(Result))
_RESULT_KNOWN = frozenset(_RESULT_FIELDS)


@dataclass
class Reply:
    """What a worker pushes onto a reply list for one task.

    ``refused``: why the worker refused the message whole (no results then): the sender gives
    each file it sent an error result saying so. An older sender sees no results, which it
    errors as a miscount.
    """

    task_id: str
    results: list[Result] = field(default_factory=list)
    refused: str | None = None

    def dumps(self) -> str:
        msg: dict[str, Any] = {"task_id": self.task_id, "results": [r.to_dict() for r in self.results]}
        if self.refused is not None:
            msg["refused"] = self.refused
        return json.dumps(msg)

    @classmethod
    def loads(cls, raw: bytes | str) -> Reply:
        msg = json.loads(raw)
        refused = msg.get("refused")
        return cls(
            task_id=str(msg["task_id"]),
            results=[Result.from_dict(r) for r in msg["results"]],
            refused=None if refused is None else str(refused),
        )


#: The results CSV, in order. A CSV written by an older version keeps its own header: rows are
#: appended under it with the columns it has (see producer/csvsink.py). ``moved_to`` is where
#: the file is now (done/, review/ or failed/), empty when it stayed in place (--keep, a folder);
#: ``review`` is why it was sent to review (Result.review), empty when it was not.
CSV_COLUMNS = (
    "path", "digit", "confidence", "model_version", "error", "error_kind", "id", "finished_at", "moved_to",
    "review",
)  # fmt: skip


def miscounted(reply: Reply, paths: Sequence[str], ids: Sequence[str | None]) -> list[Result] | None:
    """Error results for every path of a reply whose count does not match the request (a worker
    bug: which result belongs to which path cannot be trusted), or of a message the worker refused
    whole; None when the count is right."""
    if reply.refused is not None:
        message = f"refused by the worker: {reply.refused}"
        _log.warning("task %s %s; every file of it gets an error row", reply.task_id, message)
        return [Result.failed(p, ErrorKind.REFUSED, message, i) for p, i in zip(paths, ids, strict=True)]
    if len(reply.results) == len(paths):
        return None
    message = f"internal error: the worker answered {len(reply.results)} results for {len(paths)} files"
    _log.warning("task %s: %s; every file of it gets an error row", reply.task_id, message)
    return [Result.failed(p, ErrorKind.INTERNAL, message, i) for p, i in zip(paths, ids, strict=True)]

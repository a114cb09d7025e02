"""A worker process's runtime, built at start-up, and the per-request work done with it.

``Runtime.load`` loads the model (torch is imported there, never at import) and starts the
batcher; ``worker/app.py`` calls it from Celery's start-up signals. ``classify_paths`` is the
work of one task as a plain function of the settings and a batcher, so it can be tested in
process with a fake batcher: no Redis, no worker process.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

from mnistq.errors import ImageError
from mnistq.images import load_images
from mnistq.protocol import FALLBACK_REVIEW_BELOW, ClassifyRequest, ErrorKind, Result, ReviewReason
from mnistq.settings import Settings
from worker.heap import HeapTrimmer
from worker.paths import checked_path

if TYPE_CHECKING:
    from worker.engine import Batcher, Engine, Prediction

log = logging.getLogger("mnistq.worker")


class Predictor(Protocol):
    """What ``classify_paths`` needs: ``worker.engine.Batcher``, or a fake in tests."""

    @property
    def version(self) -> str: ...

    def predict(self, images: np.ndarray, expected: Any = None) -> Prediction: ...


class Throughput:
    """Counts images and forward passes; every ``interval`` seconds returns what they came to."""

    def __init__(self, interval: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.interval = interval
        self.clock = clock
        self._lock = threading.Lock()
        self._images = self._batches = 0
        self._since = clock()

    def add(self, images: int) -> tuple[float, float] | None:
        """Count one forward pass; (images/s, images per pass) once an interval is over."""
        with self._lock:
            self._images += images
            self._batches += 1
            elapsed = self.clock() - self._since
            if elapsed < self.interval:
                return None
            rate, per_batch = self._images / max(elapsed, 1e-9), self._images / self._batches
            self._images = self._batches = 0
            self._since = self.clock()
        return rate, per_batch


@dataclass
class Runtime:
    """What one worker process serves with: its settings, its batcher (the model), its stats.

    In a prefork parent ``engine`` and ``batcher`` stay None (the children load the model) and
    ``start_version`` records the checkpoint it checked at start.
    """

    settings: Settings
    processes: int = 1  # processes on this machine sharing the cores (prefork children)
    engine: Engine | None = None  # the model, once loaded
    batcher: Batcher | None = None  # feeds the engine coalesced forward passes
    start_version: str | None = None
    queue_depth: Callable[[], int | None] = field(default=lambda: None, repr=False)
    stats: Throughput = field(init=False, repr=False)
    heap: HeapTrimmer = field(default_factory=HeapTrimmer, repr=False)

    def __post_init__(self) -> None:
        self.stats = Throughput(self.settings.stats_interval)

    def load(self) -> Runtime:
        """Load the model and start the batcher; raises ModelError (or torch's errors) on failure."""
        from worker.engine import Batcher, Engine  # torch is imported here, in the worker only

        self.engine = engine = Engine(self.settings, processes=self.processes)
        s = self.settings
        self.batcher = Batcher(engine, s.forward_batch, s.coalesce_wait_ms, on_batch=self._on_batch)
        return self

    def close(self) -> None:
        if self.batcher is not None:
            self.batcher.close()

    def model_info(self) -> dict[str, Any]:
        """What `mnistq status` shows for this worker."""
        engine = self.engine
        if engine is None:  # prefork parent: the children hold the model and reload it
            return {"version": self.start_version, "device": "prefork", "precision": "(version at start)"}
        return {"version": engine.version, "device": str(engine.device), "precision": engine.precision}

    def serving(self) -> str | None:
        """The model this process serves, in words (None in a prefork parent)."""
        from worker.engine import describe

        engine = self.engine
        if engine is None:
            return None
        return f"serving model {engine.path} version {engine.version}, {describe(engine.calibration)}"

    def _on_batch(self, images: int, forward_ms: float) -> None:
        log.debug("forward pass of %d images in %.1f ms", images, forward_ms)
        tick = self.stats.add(images)
        if tick is not None:
            log.info(
                "%.0f images/s, %.1f images per forward pass, queue depth %s, model %s",
                tick[0],
                tick[1],
                self.queue_depth(),
                self.batcher.version if self.batcher is not None else None,
            )


#: model versions already said to have no recommended review threshold (one line each)
_fallback_said: set[str] = set()


def review_threshold(request: ClassifyRequest, pred: Prediction) -> float:
    """The P a request's images are judged by: its own, else the serving model's recommended
    one, else FALLBACK_REVIEW_BELOW (said once per model version)."""
    if request.review_below is not None:
        return request.review_below
    if pred.review_below is not None:
        return pred.review_below
    if pred.version not in _fallback_said:
        _fallback_said.add(pred.version)
        log.warning(
            "model %s recommends no review threshold (a checkpoint from before calibration): "
            "review below %g, unless a request gives its own P",
            pred.version,
            FALLBACK_REVIEW_BELOW,
        )
    return FALLBACK_REVIEW_BELOW


def review_reason(confidence: float, not_digit: bool, below: float) -> str | None:
    """Why a classified image goes to review, or None: not a digit first, then low confidence."""
    if not_digit:
        return ReviewReason.NOT_DIGIT.value
    if confidence < below:
        return ReviewReason.LOW_CONFIDENCE.value
    return None


def classify_paths(
    settings: Settings, batcher: Predictor, request: ClassifyRequest, hostname: str | None = None
) -> list[Result]:
    """One result per path, in order. A bad file gets its own error result and never fails the
    batch; a failed forward pass gives its images an ``internal`` error. With ``request.review``,
    each classified image is judged for review here, by the model that classified it (an error
    result never is: a blank image keeps its no_digit error)."""
    # The batcher waits for this request's images rather than run a pass without them, and
    # for nothing else (test fakes have no expect).
    expect = getattr(batcher, "expect", None)
    expected = expect() if expect is not None else None
    try:
        return _classify(settings, batcher, request, hostname, expected)
    finally:
        if expected is not None:
            expected.done()


def _classify(
    settings: Settings, batcher: Predictor, request: ClassifyRequest, hostname: str | None, expected: Any
) -> list[Result]:
    ids, roots = request.ids, settings.roots()
    t0 = time.perf_counter()
    results: list[Result] = []
    arrays, slots = [], []
    checked, checked_slots = [], []
    for i, raw in enumerate(request.paths):
        result = Result(path=raw, id=ids[i] if ids else None, worker=hostname)
        results.append(result)
        try:
            # checked_path refuses a path outside the roots before anything opens it.
            checked.append(checked_path(raw, roots))
            checked_slots.append(i)
        except Exception as e:
            _file_error(result, e)
    # One call for the message's files: small 8-bit images of one size are normalised together.
    for i, got in zip(checked_slots, load_images(checked, settings.max_pixels), strict=True):
        if isinstance(got, Exception):
            _file_error(results[i], got)
        else:
            arrays.append(got)
            slots.append(i)
    decode_ms = round((time.perf_counter() - t0) * 1000 / max(1, len(request.paths)), 3)
    version, forward_ms, batch_size = batcher.version, 0.0, 0
    if arrays:
        try:
            x = np.stack(arrays)
            pred = batcher.predict(x) if expected is None else batcher.predict(x, expected)
        except Exception as e:  # logged with its traceback by the batcher's thread
            for slot in slots:
                results[slot].error = f"internal error: {type(e).__name__}: {e}"
                results[slot].error_kind = ErrorKind.INTERNAL
        else:
            version, forward_ms, batch_size = pred.version, pred.forward_ms, pred.batch_size
            below = review_threshold(request, pred) if request.review else None
            not_digit = pred.not_digit if pred.not_digit is not None else np.zeros(len(slots), bool)
            for slot, probs, odd in zip(slots, pred.probs, not_digit, strict=True):
                r = results[slot]
                r.digit = int(probs.argmax())
                r.confidence = round(float(probs[r.digit]), 6)
                if request.probabilities:
                    r.probabilities = [round(float(p), 5) for p in probs]
                if below is not None:  # judged on the confidence the result carries
                    r.review = review_reason(r.confidence, bool(odd), below)
    for r in results:
        r.model_version = version
        r.decode_ms_per_image = decode_ms
        r.forward_ms_per_batch = round(forward_ms, 3)
        r.forward_batch_size = batch_size
    return results


def _file_error(result: Result, e: Exception) -> None:
    """This file's error on its own result; an unexpected one (a decoder's or ours) is logged."""
    if isinstance(e, ImageError):
        result.error, result.error_kind = str(e), e.kind
        return
    log.warning("unexpected error reading %s", result.path, exc_info=e)
    result.error = f"cannot read image: {type(e).__name__}: {e}"
    result.error_kind = ErrorKind.UNREADABLE


def internal_failure(request: ClassifyRequest, error: Exception, hostname: str | None) -> list[Result]:
    """Every path's result when the request failed as a whole (a bug: the log has the traceback)."""
    message = f"internal error: {type(error).__name__}: {error}"
    ids = request.ids
    return [
        Result(
            path=p, id=ids[i] if ids else None, error=message, error_kind=ErrorKind.INTERNAL, worker=hostname
        )
        for i, p in enumerate(request.paths)
    ]

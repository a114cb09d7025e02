"""The model in a worker process: loaded once, hot-reloaded between batches, fed in batches.

Many task threads submit decoded images; one inference thread coalesces whatever is waiting
(up to ``forward_batch`` images, waiting at most ``coalesce_wait_ms`` for more) into one forward
pass. Decoding keeps running in the task threads meanwhile, so the cores are not idle while the
model works. The model runs through ``model.predict_logits``, and the checkpoint's
``Calibration`` turns the logits into the served (calibrated) probabilities and the not-a-digit
judgement; model and calibration are one version, installed and swapped together.
"""

from __future__ import annotations

import logging
import os
import queue
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np
import torch

from mnistq.settings import Settings, cores
from model import (
    Calibration,
    Checkpoint,
    load_checkpoint,
    pick_device,
    pick_precision,
    predict_logits,
    prepare,
)

log = logging.getLogger(__name__)


def _signature(path: Path) -> tuple[int, int, int] | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_ino, st.st_mtime_ns, st.st_size)


def cpu_threads(processes: int) -> int:
    """Torch threads per process so that processes x threads fits the cores we may use."""
    return max(1, cores() // max(1, processes))


@dataclass
class Prediction:
    """Calibrated class probabilities for one request's images, and the forward pass they rode
    in; everything in it comes from one model version."""

    probs: np.ndarray  # [N, 10]
    version: str
    forward_ms: float  # the whole forward pass, shared by every request in it
    batch_size: int  # images in that forward pass
    not_digit: np.ndarray | None = None  # [N] bool: judged not a digit (None: none is)
    review_below: float | None = None  # the model's recommended review threshold, if it has one

    def slice(self, start: int, end: int) -> Prediction:
        """The rows of one request of a coalesced pass."""
        nd = None if self.not_digit is None else self.not_digit[start:end]
        return Prediction(
            self.probs[start:end], self.version, self.forward_ms, self.batch_size, nd, self.review_below
        )


@dataclass(frozen=True)
class _Served:
    """What serves together: one checkpoint's model, constants and calibration."""

    model: torch.nn.Module
    version: str
    mean: float
    std: float
    calibration: Calibration


def describe(calibration: Calibration) -> str:
    """The calibration in a log line."""
    if not calibration.fitted:
        return "uncalibrated (temperature 1, no recommended review threshold)"
    below = calibration.review_below
    return (
        f"calibrated (temperature {calibration.temperature:.3g}, recommended review below "
        f"{'none' if below is None else f'{below:g}'}, "
        f"not-a-digit check {'on' if calibration.digit_score_below is not None else 'off'})"
    )


class Engine:
    """Holds the current model; ``infer`` classifies a stack of 28x28 images."""

    def __init__(self, settings: Settings, processes: int = 1) -> None:
        self.path = settings.model
        self.device = pick_device(settings.device)
        self.precision = pick_precision(self.device, settings.precision)
        if self.device.type == "cpu":
            torch.set_num_threads(settings.threads or cpu_threads(processes))
        self._signature = _signature(self.path)
        self._refused: tuple[int, int, int] | None = None
        self._install(load_checkpoint(self.path))  # raises ModelError: the start must fail loudly
        # Warm up so the first real batch does not pay for oneDNN's kernel selection.
        self.infer(np.zeros((8, 28, 28), dtype=np.float32))

    @property
    def version(self) -> str:
        return self._served.version

    @property
    def calibration(self) -> Calibration:
        return self._served.calibration

    def _install(self, ckpt: Checkpoint) -> None:
        # Everything that may fail first: nothing is replaced until all of it has not. One
        # assignment swaps model and calibration together: a pass never mixes two versions.
        mean, std = float(ckpt.meta["mean"]), float(ckpt.meta["std"])
        model = prepare(ckpt.model, self.device)
        self._served = _Served(model, ckpt.version, mean, std, ckpt.calibration)
        log.info(
            "model %s version %s on %s %s, %d threads, %s",
            self.path,
            self.version,
            self.device,
            self.precision,
            torch.get_num_threads(),
            describe(ckpt.calibration),
        )

    def maybe_reload(self) -> None:
        """Pick up a replaced model file; a bad one is refused and the old model keeps serving."""
        sig = _signature(self.path)
        if sig is None or sig == self._signature or sig == self._refused:
            return
        old = self.version
        try:
            ckpt = load_checkpoint(self.path)
            if ckpt.version != old:
                self._install(ckpt)
                log.info("hot reload: model version %s -> %s", old, self.version)
        except Exception as e:  # a bad file must never take the serving model down with it
            self._refused = sig
            log.warning("new model file refused, still serving version %s: %s", self.version, e)
            return
        self._signature = sig

    def infer(self, images: np.ndarray) -> Prediction:
        t0 = time.perf_counter()
        served = self._served
        x = torch.from_numpy(images).unsqueeze(1)
        logits = predict_logits(served.model, x, served.mean, served.std, self.device, self.precision)
        cal = served.calibration
        return Prediction(
            cal.probs(logits).numpy(),
            served.version,
            (time.perf_counter() - t0) * 1000,
            len(x),
            not_digit=cal.not_digit(logits).numpy(),
            review_below=cal.review_below,
        )


class Model(Protocol):
    """What the batcher needs of an engine (tests pass a fake)."""

    @property
    def version(self) -> str: ...

    def maybe_reload(self) -> None: ...

    def infer(self, images: np.ndarray) -> Prediction: ...


class Expected:
    """One request's promise of images (``Batcher.expect``)."""

    def __init__(self, batcher: Batcher) -> None:
        self._batcher: Batcher | None = batcher

    def done(self) -> None:
        batcher, self._batcher = self._batcher, None
        if batcher is not None:
            batcher._unexpect()


class Batcher:
    """Coalesces requests from many threads into forward passes on one inference thread.

    ``on_batch(images, forward_ms)`` is called on that thread after each forward pass.
    """

    def __init__(
        self,
        engine: Model,
        forward_batch: int,
        coalesce_wait_ms: float,
        on_batch: Callable[[int, float], None] | None = None,
    ) -> None:
        self.engine = engine
        self.forward_batch = forward_batch
        self.wait = coalesce_wait_ms / 1000
        self.on_batch = on_batch
        self._queue: queue.Queue[tuple[np.ndarray, Future[Prediction]] | None] = queue.Queue()
        self._held: tuple[np.ndarray, Future[Prediction]] | None = None  # starts the next batch
        # Requests decoding images they will submit (see expect): a pass waits for them, and for
        # nothing else, so a lone image runs at once instead of after coalesce_wait_ms.
        self._expected = 0
        self._expected_lock = threading.Lock()
        self._thread = threading.Thread(target=self._run, name="mnistq-batcher", daemon=True)
        self._thread.start()

    def expect(self) -> Expected:
        """Say that a request is decoding images it will submit; ``submit(..., expected=)`` or
        ``Expected.done()`` (idempotent: call it in a ``finally``) ends it."""
        with self._expected_lock:
            self._expected += 1
        return Expected(self)

    def _unexpect(self) -> None:
        with self._expected_lock:
            self._expected -= 1

    def submit(self, images: np.ndarray, expected: Expected | None = None) -> Future[Prediction]:
        fut: Future[Prediction] = Future()
        # Before the put: the put then wakes a pass waiting for it. After it, a pass could take
        # these images, still see them expected and wait coalesce_wait_ms for nothing. The other
        # order's worst case is a pass that closes just before they arrive (they open the next).
        if expected is not None:
            expected.done()
        self._queue.put((images, fut))
        return fut

    def predict(self, images: np.ndarray, expected: Expected | None = None) -> Prediction:
        return self.submit(images, expected).result()

    @property
    def version(self) -> str:
        """The version of the model serving now."""
        return self.engine.version

    def close(self) -> None:
        self._queue.put(None)
        self._thread.join(timeout=10)

    def _gather(self) -> list[tuple[np.ndarray, Future[Prediction]]] | None:
        first, self._held = self._held or self._queue.get(), None
        if first is None:
            return None
        items, n = [first], len(first[0])
        deadline = time.monotonic() + self.wait
        while n < self.forward_batch:
            if self._expected <= 0 and self._queue.empty():
                break  # nothing is coming: waiting would only delay these images
            try:
                item = self._queue.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                break
            if item is None:
                self._queue.put(None)  # finish this batch, then stop
                break
            if n + len(item[0]) > self.forward_batch:
                self._held = item  # would overflow the batch: it opens the next one
                break
            items.append(item)
            n += len(item[0])
        return items

    def _run(self) -> None:
        while (items := self._gather()) is not None:
            try:
                self.engine.maybe_reload()
                pred = self.engine.infer(np.concatenate([images for images, _ in items]))
            except Exception as e:  # the loop's edge: fail these requests, keep serving
                log.exception("inference failed for a batch of %d requests", len(items))
                for _, fut in items:
                    fut.set_exception(e)
                continue
            start = 0
            for images, fut in items:
                end = start + len(images)
                fut.set_result(pred.slice(start, end))
                start = end
            if self.on_batch:
                self.on_batch(pred.batch_size, pred.forward_ms)

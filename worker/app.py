"""The Celery app, its settings, the model's lifecycle signals and the one task.

The model is loaded at process start, never at import: in ``worker_init`` for the threads
pool (the default: task threads decode images while one inference thread runs coalesced
batches, see worker/engine.py), in ``worker_process_init`` for the prefork pool, after the fork,
so no oneDNN thread pool or CUDA context crosses it (the prefork parent only reads the
checkpoint once, on the CPU, to fail the start early).
"""

from __future__ import annotations

import json
import logging
import os
import sys
import threading
import time
from typing import Any

from celery import signals
from celery.worker.control import inspect_command

from mnistq.celeryconf import make_app
from mnistq.errors import ImageError, MnistqError
from mnistq.protocol import QUEUE, TASK_NAME
from mnistq.settings import Settings

log = logging.getLogger("mnistq.worker")
settings = Settings.from_env()
app = make_app(settings)


class _State:
    batcher: Any = None
    start_version: str | None = None
    processes = 1  # prefork children on this machine, for the threads-per-process split
    images = 0
    batches = 0
    since = time.monotonic()
    lock = threading.Lock()


state = _State()


def _start_engine(processes: int) -> None:
    from worker.engine import Batcher, Engine  # torch is imported here, in the worker only

    try:
        engine = Engine(settings, processes=processes)
    except MnistqError as e:
        _fail_start(str(e), 3)
    except Exception as e:  # CUDA out of memory, a failed warm-up: Celery would swallow these
        _fail_start(f"loading the model failed: {type(e).__name__}: {e}", 3)
    state.batcher = Batcher(engine, settings.batch_size, settings.batch_wait_ms, on_batch=_on_batch)


def _on_batch(n: int, infer_ms: float) -> None:
    log.debug("batch of %d images in %.1f ms", n, infer_ms)
    with state.lock:
        state.images += n
        state.batches += 1
        elapsed = time.monotonic() - state.since
        if elapsed < settings.stats_interval:
            return
        images, batches = state.images, state.batches
        state.images = state.batches = 0
        state.since = time.monotonic()
    log.info(
        "%.0f images/s, %.1f images per batch, queue depth %s, model %s",
        images / elapsed,
        images / max(1, batches),
        queue_depth(),
        state.batcher.engine.version,
    )


def queue_depth() -> int | None:
    try:
        with app.connection_for_read() as conn:
            return int(conn.default_channel.client.llen(QUEUE))
    except Exception:  # depth is informational; a broker without LLEN just reports nothing
        return None


def _fail_start(message: str, code: int) -> None:
    log.critical("cannot start: %s", message)
    sys.stderr.write(f"mnistq worker: cannot start: {message}\n")
    sys.stderr.flush()
    # Exit the whole process: a worker without a model or broker must not take tasks.
    os._exit(code)


@signals.worker_init.connect
def _on_worker_init(sender: Any = None, **_: Any) -> None:
    try:
        settings.require_redis()
    except MnistqError as e:
        _fail_start(str(e), 2)
    # The command line's --pool/--concurrency override the config; the sender knows the result.
    pool = str(getattr(sender, "pool_cls", app.conf.worker_pool))
    state.processes = int(getattr(sender, "concurrency", None) or 1)
    if "prefork" in pool:
        # Check the checkpoint once here, so a bad file fails the start, not every child.
        from trainer.model import load_checkpoint

        try:
            state.start_version = load_checkpoint(settings.model).version
        except MnistqError as e:
            _fail_start(str(e), 3)
        return
    _start_engine(processes=1)


@signals.worker_process_init.connect
def _on_worker_process_init(**_: Any) -> None:
    _start_engine(processes=state.processes)


@inspect_command()
def mnistq_model(state_: Any) -> dict[str, Any]:
    """`mnistq status`: the model this worker serves."""
    batcher = state.batcher
    if batcher is None:  # prefork: the model lives in the children, which reload on their own
        return {"version": state.start_version, "device": "prefork", "precision": "(version at start)"}
    engine = batcher.engine
    return {"version": engine.version, "device": str(engine.device), "precision": engine.precision}


@signals.worker_shutdown.connect
def _on_worker_shutdown(**_: Any) -> None:
    if state.batcher is not None:
        state.batcher.close()


def _blank_result(path: str, file_id: str | None, error: str | None = None) -> dict[str, Any]:
    return {"path": path, "id": file_id, "digit": None, "confidence": None, "probabilities": None,
            "model_version": None, "error": error}  # fmt: skip


def classify_paths(
    paths: list[str], ids: list[str] | None = None, hostname: str | None = None
) -> list[dict[str, Any]]:
    """One result per path, in order; a bad file gets an error result, never fails the batch."""
    import numpy as np

    from mnistq.images import load_image
    from worker.paths import checked_path

    t0 = time.perf_counter()
    results: list[dict[str, Any]] = []
    arrays, slots = [], []
    for i, raw in enumerate(paths):
        result = _blank_result(raw, ids[i] if ids else None)
        try:
            arrays.append(load_image(checked_path(raw, settings.allowed_roots), settings.max_pixels))
            slots.append(i)
        except ImageError as e:
            result["error"] = str(e)
        except Exception as e:  # an unexpected decoder failure is still this file's result
            log.warning("unexpected error reading %s", raw, exc_info=True)
            result["error"] = f"cannot read image: {type(e).__name__}: {e}"
        results.append(result)
    decode_ms = (time.perf_counter() - t0) * 1000
    version = state.batcher.engine.version
    infer_ms, batch = 0.0, 0
    if arrays:
        pred = state.batcher.predict(np.stack(arrays))
        version, infer_ms, batch = pred.version, pred.infer_ms, pred.batch
        for slot, probs in zip(slots, pred.probs, strict=True):
            digit = int(probs.argmax())
            results[slot].update(
                digit=digit,
                confidence=round(float(probs[digit]), 6),
                probabilities=[round(float(p), 6) for p in probs],
            )
    for r in results:
        r["model_version"] = version
        r["decode_ms"] = round(decode_ms / max(1, len(paths)), 3)
        r["infer_ms"] = round(infer_ms, 3)
        r["batch"] = batch
        r["worker"] = hostname
    return results


@app.task(name=TASK_NAME, bind=True)
def classify(
    self: Any, paths: list[str], ids: list[str] | None = None, reply_to: str | None = None
) -> list[dict[str, Any]]:
    """Classify a list of image paths; results also go to the ``reply_to`` Redis list if given."""
    if state.batcher is None:
        raise MnistqError("model not loaded in this process")
    try:
        results = classify_paths(list(paths), ids, self.request.hostname)
    except Exception as e:  # the loop's edge: every path still gets its (error) result
        log.exception("classifying %d paths failed", len(paths))
        error = f"internal error: {type(e).__name__}: {e}"
        results = [_blank_result(p, ids[i] if ids else None, error) for i, p in enumerate(paths)]
    if reply_to:
        # A list per client: the producer pops whole task results as they finish, no polling.
        client = app.backend.client
        message = json.dumps({"task_id": self.request.id, "results": results})
        client.pipeline().rpush(reply_to, message).expire(reply_to, settings.result_expires).execute()
    return results

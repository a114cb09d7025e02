"""The baseline a first attempt would build: one Celery task per image, model per process.

Run as ``celery -A bench.naive_worker worker`` (prefork); results through the result backend.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np
from celery import Celery, signals

from mnistq.images import load_image
from mnistq.settings import Settings

app = Celery("naive", broker=os.environ["REDIS_URL"], backend=os.environ["REDIS_URL"])
app.conf.update(task_default_queue="naive", accept_content=["json"], worker_prefetch_multiplier=4)
_engine: Any = None


@signals.worker_process_init.connect
def _load(**_: Any) -> None:
    global _engine
    from worker.engine import Engine

    _engine = Engine(Settings.from_env(), processes=int(app.conf.worker_concurrency or 1))


@app.task(name="naive.classify")
def classify(path: str) -> dict[str, Any]:
    pred = _engine.infer(load_image(path)[np.newaxis])
    digit = int(pred.probs[0].argmax())
    return {
        "path": path,
        "digit": digit,
        "confidence": float(pred.probs[0][digit]),
        "model_version": pred.version,
    }

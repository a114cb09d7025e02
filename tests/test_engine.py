"""The worker's engine and batcher in process: coalescing with a fake engine, bf16 and calibration
with the real one."""

from __future__ import annotations

import logging
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers_images import DIGITS, SHIPPED_MODEL, digit_image
from test_review import write_checkpoint

from mnistq.settings import Settings
from model import Calibration, bf16_supported, load_checkpoint, pick_device, predict_logits, prepare
from worker.engine import Batcher, Engine, Prediction

pytestmark = pytest.mark.timeout(60)


# --- the batcher, with a fake engine and explicit events (no sleeps, no timing) ------------------


class GatedEngine:
    """Blocks its first forward pass until ``release`` is set, so the test decides what queues up."""

    version = "v"

    def __init__(self, fail_sizes: tuple[int, ...] = ()) -> None:
        self.entered, self.release = threading.Event(), threading.Event()
        self.sizes: list[int] = []
        self.fail_sizes = fail_sizes

    def maybe_reload(self) -> None:
        pass

    def infer(self, images: np.ndarray) -> Prediction:
        self.sizes.append(len(images))
        if len(self.sizes) == 1:
            self.entered.set()
            assert self.release.wait(10)
        if len(images) in self.fail_sizes:
            raise RuntimeError("forward pass failed")
        # Each row's probabilities repeat its image's first pixel, so a request can find its rows.
        return Prediction(np.tile(images[:, :1, 0], (1, 10)), self.version, 1.0, len(images))


def _requests(sizes: list[int]) -> list[np.ndarray]:
    return [np.full((n, 28, 28), i, dtype=np.float32) for i, n in enumerate(sizes)]


def test_batcher_fills_forward_passes_and_never_exceeds_them() -> None:
    engine = GatedEngine()
    batcher = Batcher(engine, forward_batch=10, coalesce_wait_ms=0)
    first, *rest = _requests([3, 4, 6, 1, 9, 2])
    futures = [batcher.submit(first)]
    assert engine.entered.wait(10)  # the first pass is running: the rest queue up behind it
    futures += [batcher.submit(r) for r in rest]
    engine.release.set()
    preds = [f.result(timeout=10) for f in futures]
    batcher.close()
    # 4 + 6 fill a pass; 1 + 9 fill the next (9 would have overflowed 4 + 6); 2 goes alone.
    assert engine.sizes == [3, 10, 10, 2]
    assert [p.batch_size for p in preds] == [3, 10, 10, 10, 10, 2]
    for i, (req, pred) in enumerate(zip([first, *rest], preds, strict=True)):
        assert pred.probs.shape == (len(req), 10) and (pred.probs == i).all()


def test_a_full_batch_does_not_wait_for_more() -> None:
    engine = GatedEngine()
    engine.release.set()
    batcher = Batcher(engine, forward_batch=10, coalesce_wait_ms=600_000)  # would wait 10 minutes
    a, b = _requests([4, 6])
    fa, fb = batcher.submit(a), batcher.submit(b)
    assert fa.result(timeout=10).batch_size == fb.result(timeout=10).batch_size == 10
    batcher.close()


def test_a_lone_request_runs_at_once_and_one_still_decoding_is_waited_for() -> None:
    """coalesce_wait_ms is spent only on requests that said they are coming (expect)."""
    engine = GatedEngine()
    engine.release.set()
    batcher = Batcher(engine, forward_batch=10, coalesce_wait_ms=600_000)  # would wait 10 minutes
    a, b, c = _requests([2, 3, 4])
    lone = batcher.expect()
    assert batcher.predict(a, lone).batch_size == 2  # nothing else coming: no wait at all
    lone.done()  # idempotent, as the worker's finally calls it again
    first, second = batcher.expect(), batcher.expect()
    fb = batcher.submit(b, first)
    time.sleep(0.2)
    assert not fb.done()  # the second request is still decoding: its images are waited for
    fc = batcher.submit(c, second)
    assert fb.result(timeout=10).batch_size == fc.result(timeout=10).batch_size == 7
    failed = batcher.expect()
    failed.done()  # a request whose files all failed hands nothing: no one waits for it
    assert batcher.predict(a).batch_size == 2
    assert engine.sizes == [2, 7, 2]
    batcher.close()


def test_a_failed_pass_fails_only_its_requests_and_the_batcher_keeps_serving() -> None:
    engine = GatedEngine(fail_sizes=(7,))
    batcher = Batcher(engine, forward_batch=10, coalesce_wait_ms=0)
    first, doomed1, doomed2, later = _requests([1, 3, 4, 5])
    f_first = batcher.submit(first)
    assert engine.entered.wait(10)
    f1, f2 = batcher.submit(doomed1), batcher.submit(doomed2)  # 3 + 4 = 7: the failing pass
    engine.release.set()
    assert f_first.result(timeout=10).batch_size == 1
    for f in (f1, f2):
        with pytest.raises(RuntimeError, match="forward pass failed"):
            f.result(timeout=10)
    assert batcher.predict(later).batch_size == 5
    batcher.close()


def test_bf16_and_fp32_agree_in_the_worker_engine() -> None:
    if not bf16_supported(pick_device("cpu")):
        pytest.skip("this CPU has no native bf16 (avx512_bf16 / AMX): bf16 would only be emulated")
    rng = np.random.default_rng(0)
    x = rng.random((256, 28, 28), dtype=np.float32) ** 4  # sparse bright strokes, like digits
    fp32 = Engine(Settings(precision="fp32", device="cpu", model=SHIPPED_MODEL))
    bf16 = Engine(Settings(precision="bf16", device="cpu", model=SHIPPED_MODEL))
    assert (fp32.precision, bf16.precision) == ("fp32", "bf16")
    p32, p16 = fp32.infer(x).probs, bf16.infer(x).probs
    assert not np.array_equal(p32, p16)  # bf16 really ran: its rounding shows
    same = (p16.argmax(1) == p32.argmax(1)).mean()
    assert same >= 0.99, f"bf16 and fp32 disagree on {1 - same:.1%} of inputs"


# --- calibration: what the engine serves, and that it changes with its model ---------------------


def _images() -> np.ndarray:
    """Clean digits and noise: some look like digits, some do not."""
    rng = np.random.default_rng(1)
    digits = [digit_image(d).astype(np.float32) / 255 for d in DIGITS]
    noise = [rng.random((28, 28), dtype=np.float32) ** 3 for _ in range(5)]
    return np.stack(digits + noise)


def _logits(x: np.ndarray) -> torch.Tensor:
    ckpt = load_checkpoint(SHIPPED_MODEL)
    cpu = pick_device("cpu")
    model = prepare(ckpt.model, cpu)
    mean, std = float(ckpt.meta["mean"]), float(ckpt.meta["std"])
    return predict_logits(model, torch.from_numpy(x).unsqueeze(1), mean, std, cpu, "fp32")


def test_the_engine_serves_calibrated_probabilities_and_reloads_them_with_their_model(
    tmp_path: Path,
) -> None:
    x = _images()
    logits = _logits(x)
    scores = np.sort(Calibration(2.0).digit_score(logits).numpy())
    middle = float(scores[len(scores) // 2 - 1] + scores[len(scores) // 2]) / 2
    first = Calibration(2.0, review_below=0.6, digit_score_below=middle, fitted=True)
    path = write_checkpoint(tmp_path / "m.pt", first)
    engine = Engine(Settings(model=path, device="cpu", precision="fp32"))
    pred = engine.infer(x)
    assert np.allclose(pred.probs, torch.softmax(logits / 2.0, 1).numpy(), atol=1e-5)
    assert pred.review_below == 0.6 and pred.not_digit is not None
    assert pred.not_digit.tolist() == (Calibration(2.0).digit_score(logits).numpy() < middle).tolist()
    assert 0 < pred.not_digit.sum() < len(x)
    old = pred.version

    # Same weights, another calibration: a new version, installed whole between batches.
    second = Calibration(0.5, review_below=0.9, fitted=True)
    write_checkpoint(path, second)
    engine.maybe_reload()
    pred = engine.infer(x)
    assert pred.version != old and engine.calibration == second
    assert np.allclose(pred.probs, torch.softmax(logits / 0.5, 1).numpy(), atol=1e-5)
    assert pred.review_below == 0.9 and not pred.not_digit.any()  # type: ignore[union-attr]
    # a coalesced pass's slice keeps it all together
    part = pred.slice(2, 4)
    assert part.probs.shape == (2, 10) and part.review_below == 0.9 and part.version == pred.version


def test_an_uncalibrated_model_is_served_at_temperature_one_and_says_so(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = write_checkpoint(tmp_path / "old.pt", None)
    caplog.set_level(logging.INFO, "worker.engine")
    engine = Engine(Settings(model=path, device="cpu", precision="fp32"))
    assert any("uncalibrated" in m for m in caplog.messages), caplog.messages
    x = _images()
    pred = engine.infer(x)
    assert np.allclose(pred.probs, torch.softmax(_logits(x), 1).numpy(), atol=1e-5)
    assert pred.review_below is None and not pred.not_digit.any()  # type: ignore[union-attr]

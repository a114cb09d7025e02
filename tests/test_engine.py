"""The worker's engine and batcher in process: coalescing with a fake engine, bf16 with the real one."""

from __future__ import annotations

import threading

import numpy as np
import pytest
from helpers_images import SHIPPED_MODEL

from mnistq.settings import Settings
from trainer.model import bf16_supported, pick_device
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

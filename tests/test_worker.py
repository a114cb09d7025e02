"""The worker against a real Redis, as real processes."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import WorkerProc, write_digits
from helpers_images import SHIPPED_MODEL
from PIL import Image

from producer import Client, Result
from trainer.model import load_checkpoint, save_checkpoint

pytestmark = pytest.mark.timeout(180)


def test_results_in_order_with_bad_files_in_the_same_batch(shared_worker: WorkerProc) -> None:
    root: Path = shared_worker.root  # type: ignore[attr-defined]
    folder = root / "order"
    digits = write_digits(folder, 6)
    (folder / "text.png").write_text("not a png")
    (folder / "empty.png").write_bytes(b"")
    (folder / "dir.png").mkdir()
    paths = [
        *list(digits)[:3],
        folder / "text.png",
        folder / "missing.png",
        folder / "empty.png",
        folder / "dir.png",
        *list(digits)[3:],
    ]
    with Client(shared_worker.url) as client:
        results = client.classify(paths, timeout=60)
    assert [r.path for r in results] == [str(p) for p in paths]
    for p, r in zip(paths, results, strict=True):
        if p in digits:
            assert r.error is None and r.digit == digits[p], r
            assert len(r.probabilities or []) == 10 and abs(sum(r.probabilities or []) - 1) < 1e-3
        else:
            assert r.digit is None and r.error
    errors = {Path(r.path).name: r.error for r in results if r.error}
    assert "not an image" in errors["text.png"]
    assert "not found" in errors["missing.png"]
    assert "empty" in errors["empty.png"]
    assert "directory" in errors["dir.png"]
    assert {r.model_version for r in results} == {load_checkpoint(SHIPPED_MODEL).version}


def test_single_path_requests_are_coalesced(shared_worker: WorkerProc) -> None:
    root: Path = shared_worker.root  # type: ignore[attr-defined]
    digits = write_digits(root / "single", 40)
    with Client(shared_worker.url) as client:
        jobs = [client.enqueue([p]) for p in digits]
        results = [job.results(timeout=60)[0] for job in jobs]
    assert [r.digit for r in results] == list(digits.values())
    # Tasks that arrived together shared forward passes.
    assert max(r.extra["batch"] for r in results) > 1


def test_disallowed_paths_are_refused_unopened(shared_worker: WorkerProc, tmp_path: Path) -> None:
    root: Path = shared_worker.root  # type: ignore[attr-defined]
    outside = write_digits(tmp_path / "outside", 1)
    target = next(iter(outside))
    link = root / "escape.png"
    link.symlink_to(target)
    inside = write_digits(root / "sub", 1)
    dotdot = str(root / "sub" / ".." / "sub" / next(iter(inside)).name)
    with Client(shared_worker.url) as client:
        # send() passes paths as given (enqueue would make them absolute and normalised).
        client.send([str(target), str(link), dotdot, "/dev/zero", "relative.png"])
        replies = client.receive(30)
    assert len(replies) == 1
    results = [Result.from_dict(r) for r in replies[0][1]]
    r_target, r_link, r_dotdot, r_dev, r_rel = results
    assert "outside the allowed roots" in (r_target.error or "")
    assert "outside the allowed roots" in (r_link.error or "")
    assert r_dotdot.error and "'..'" in r_dotdot.error
    assert "outside the allowed roots" in (r_dev.error or "")
    assert "absolute" in (r_rel.error or "")
    assert all(r.digit is None for r in results)


def test_device_and_huge_image_inside_root(start_worker, tmp_path: Path) -> None:
    w = start_worker(MNISTQ_MAX_PIXELS="10000")
    fifo = tmp_path / "pipe.png"
    os.mkfifo(fifo)  # opening a FIFO would block the worker: it must be refused by stat alone
    big = tmp_path / "big.png"
    Image.new("L", (200, 200), 255).save(big)
    small = write_digits(tmp_path / "ok", 1)
    with Client(w.url) as client:
        r_fifo, r_big, r_ok = client.classify([fifo, big, *small], timeout=60)
    assert "not a regular file" in (r_fifo.error or "")
    assert "too large" in (r_big.error or "") and "200x200" in (r_big.error or "")
    assert r_ok.error is None and r_ok.digit == next(iter(small.values()))


def test_pickle_message_is_refused(start_worker, tmp_path: Path) -> None:
    w = start_worker()
    digits = write_digits(tmp_path / "p", 1)
    with Client(w.url) as client:
        client.app.send_task(
            "mnistq.classify", args=[[str(p) for p in digits], None, client.reply_to], serializer="pickle"
        )
        assert client.receive(3.0) == []  # nothing ran
        assert client.classify(list(digits), timeout=30)[0].digit == next(iter(digits.values()))
    assert "pickle" in w.text() and ("Refusing" in w.text() or "ContentDisallowed" in w.text())


def test_sigkill_mid_batch_loses_nothing(start_worker, tmp_path: Path) -> None:
    env = {"MNISTQ_VISIBILITY_TIMEOUT": "3", "MNISTQ_BATCH_SIZE": "32"}
    w1 = start_worker("victim@%h", **env)
    digits = write_digits(tmp_path / "k", 600)
    paths = list(digits)
    with Client(w1.url, batch_size=16) as client:
        job = client.enqueue(paths)
        while job.done == 0:
            client.pump(0.5)
        w1.signal(signal.SIGKILL)
        w1.proc.wait()  # type: ignore[union-attr]
        assert job.done < len(paths), "the worker finished before it could be killed"
        start_worker("rescuer@%h", **env)
        results = job.results(timeout=120)
    assert [r.path for r in results] == [str(p) for p in paths]
    assert [r.digit for r in results] == list(digits.values())
    assert {r.extra["worker"].split("@")[0] for r in results} == {"victim", "rescuer"}


def test_hot_reload_and_bad_model_refused(start_worker, tmp_path: Path) -> None:
    model = tmp_path / "model.pt"
    ckpt = load_checkpoint(SHIPPED_MODEL)
    save_checkpoint(model, ckpt.model.state_dict(), ckpt.meta)
    w = start_worker(MNISTQ_MODEL=str(model))
    digits = write_digits(tmp_path / "h", 2)
    with Client(w.url) as client:
        assert client.classify(list(digits), timeout=30)[0].model_version == ckpt.version
        state = {k: v.clone() for k, v in ckpt.model.state_dict().items()}
        state["7.bias"] += torch.linspace(-1e-3, 1e-3, 10)
        meta = {k: v for k, v in ckpt.meta.items() if k != "version"}
        new_version = save_checkpoint(model, state, meta)
        assert new_version != ckpt.version
        seen = set()
        for _ in range(50):
            seen |= {r.model_version for r in client.classify(list(digits), timeout=30)}
            if new_version in seen:
                break
            time.sleep(0.1)
        assert new_version in seen
        bad = tmp_path / "garbage.tmp"
        bad.write_bytes(b"this is not a checkpoint")
        os.replace(bad, model)
        time.sleep(0.2)
        results = client.classify(list(digits), timeout=30)
    assert {r.model_version for r in results} == {new_version}
    assert [r.digit for r in results] == list(digits.values())
    assert "new model file refused" in w.text()


@pytest.mark.parametrize("content", [None, b"", b"garbage", "truncated"])
def test_bad_checkpoint_fails_the_start_loudly(
    start_worker, tmp_path: Path, content: bytes | str | None
) -> None:
    model = tmp_path / "model.pt"
    if content == "truncated":
        model.write_bytes(SHIPPED_MODEL.read_bytes()[:100_000])
    elif content is not None:
        model.write_bytes(content)
    w = start_worker(wait=False, MNISTQ_MODEL=str(model))
    assert w.proc is not None
    assert w.proc.wait(60) != 0
    text = w.text()
    assert "cannot start" in text and str(model) in text
    assert "Traceback" not in text


def test_mnistq_worker_needs_redis_url() -> None:
    env = {k: v for k, v in os.environ.items() if k != "REDIS_URL"}
    cmd = [sys.executable, "-c", "import sys; from mnistq.cli import main; sys.exit(main(['worker']))"]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=60)
    assert out.returncode != 0
    assert "REDIS_URL is not set" in out.stderr and "mnistq run" in out.stderr
    assert "Traceback" not in out.stderr


def test_bf16_and_fp32_agree_in_the_worker_engine() -> None:
    from mnistq.settings import Settings
    from worker.engine import Engine

    rng = np.random.default_rng(0)
    x = rng.random((256, 28, 28), dtype=np.float32) ** 4  # sparse bright strokes, like digits
    fp32 = Engine(Settings(precision="fp32", model=SHIPPED_MODEL)).infer(x).probs.argmax(1)
    auto = Engine(Settings(precision="auto", model=SHIPPED_MODEL))
    same = (auto.infer(x).probs.argmax(1) == fp32).mean()
    assert same >= 0.99, f"{auto.precision} and fp32 disagree on {1 - same:.1%} of inputs"


def test_two_workers_share_one_redis_and_sigterm_loses_nothing(start_worker, tmp_path: Path) -> None:
    alpha = start_worker("alpha@%h", MNISTQ_BATCH_SIZE="16")
    start_worker("beta@%h", MNISTQ_BATCH_SIZE="16")
    digits = write_digits(tmp_path / "two", 500)
    with Client(alpha.url, batch_size=8) as client:
        job = client.enqueue(list(digits))
        while job.done < 40:
            client.pump(0.5)
        alpha.signal(signal.SIGTERM)  # warm shutdown: it finishes what it holds, beta does the rest
        results = job.results(timeout=120)
    assert alpha.proc is not None and alpha.proc.wait(30) == 0
    assert [r.digit for r in results] == list(digits.values())
    by_worker = {name: sum(r.extra["worker"].startswith(name) for r in results) for name in ("alpha", "beta")}
    assert by_worker["alpha"] > 0 and by_worker["beta"] > 0, by_worker
    assert "Warm shutdown" in alpha.text()


def test_prefork_pool_loads_the_model_in_each_child(start_worker, tmp_path: Path) -> None:
    w = start_worker("pre@%h", MNISTQ_POOL="prefork")
    digits = write_digits(tmp_path / "pf", 3)
    with Client(w.url) as client:
        assert [r.digit for r in client.classify(list(digits), timeout=60)] == list(digits.values())
    loads = [line for line in w.text().splitlines() if "version" in line and "threads" in line]
    assert loads and all("ForkPoolWorker" in line for line in loads), loads  # never in the parent


def test_status_lists_live_workers_and_their_model(start_worker) -> None:
    import json

    w = start_worker("seen@%h")
    cmd = [
        sys.executable,
        "-c",
        "import sys; from mnistq.cli import main; sys.exit(main(['status', '--json']))",
    ]
    out = subprocess.run(cmd, env=w.env, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    info = json.loads(out.stdout.strip().splitlines()[-1])
    assert info["queue_depth"] == 0
    [(name, model)] = info["workers"].items()
    assert name.startswith("seen@") and model["version"] == load_checkpoint(SHIPPED_MODEL).version


def test_batcher_coalesces_but_never_exceeds_the_batch_size() -> None:
    from worker.engine import Batcher, Prediction

    sizes: list[int] = []

    class Recorder:
        def maybe_reload(self) -> None:
            pass

        def infer(self, images: np.ndarray) -> Prediction:
            sizes.append(len(images))
            time.sleep(0.05)  # while this runs, more requests queue up
            return Prediction(np.tile(images[:, :1, 0], (1, 10)), "v", 1.0, len(images))

    batcher = Batcher(Recorder(), batch_size=10, wait_ms=50)  # type: ignore[arg-type]
    requests = [np.full((n, 28, 28), i, dtype=np.float32) for i, n in enumerate([3, 4, 6, 1, 9, 2])]
    futures = [batcher.submit(r) for r in requests]
    preds = [f.result(timeout=10) for f in futures]
    batcher.close()
    assert max(sizes) <= 10 and sum(sizes) == 25 and len(sizes) < len(requests)
    for i, (req, pred) in enumerate(zip(requests, preds, strict=True)):  # each got its own rows back
        assert pred.probs.shape == (len(req), 10) and (pred.probs == i).all()

"""Real workers that die, stop or see their model file replaced while work is in flight."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest
import torch
from conftest import write_digits
from helpers import wait_for
from helpers_images import SHIPPED_MODEL
from helpers_wire import Wire

from model import load_checkpoint, save_checkpoint

pytestmark = [pytest.mark.system, pytest.mark.timeout(180)]


def test_sigkill_mid_batch_loses_nothing(start_worker, tmp_path: Path) -> None:
    """What a SIGKILLed worker held comes back to another worker by itself.

    Redis's fetch (BRPOP) and kombu's record of the message in its ``unacked`` hash are two
    steps: a message taken in between is gone from Redis with the worker. No worker can bring
    that back; the producer finds it missing everywhere and sends it again (mnistq/evidence.py,
    tests/test_evidence.py). Here the test does what the producer does, so the whole is checked.
    """
    env = {"MNISTQ_VISIBILITY_TIMEOUT": "3", "MNISTQ_FORWARD_BATCH": "32"}
    victim = start_worker("victim@%h", **env)
    digits = write_digits(tmp_path / "k", 600)
    paths = list(digits)
    with Wire(victim.url) as wire:
        tasks = wire.enqueue(paths, message_size=16)
        paths_of = {t: paths[i * 16 : (i + 1) * 16] for i, t in enumerate(tasks)}

        def working() -> bool:
            # Some tasks answered, and others taken but unanswered: Redis's unacked hash names them.
            wire.pump(0.01)
            return bool(wire.answers) and bool(wire.unacked_task_ids() - set(wire.answers))

        wait_for(working, 60, "the victim to be midway through its work")
        victim.signal(signal.SIGKILL)
        assert victim.proc is not None and victim.proc.wait(30) == -signal.SIGKILL
        while wire.pump(0.1):  # whatever it answered before it died
            pass
        # In its hands when it died: taken, never acknowledged, never answered.
        held = wire.unacked_task_ids() - set(wire.answers)
        assert held, "the victim held no unanswered task when it was killed"
        assert len(wire.answers) < len(tasks), "the victim finished before it could be killed"
        known = held | wire.queued_task_ids() | set(wire.answers)
        lost = [t for t in tasks if t not in known]  # taken between BRPOP and kombu's record
        assert len(lost) <= 4, f"more lost than the victim's task threads could take: {lost}"
        start_worker("rescuer@%h", **env)
        resent = {wire.send(paths_of[t]): t for t in lost}
        replies = wire.wait([t for t in tasks if t not in lost] + list(resent), timeout=120)
    for new, old in resent.items():
        replies[old] = replies[new]
    results = [r for t in tasks for r in replies[t].results]
    assert [r.path for r in results] == [str(p) for p in paths]
    assert [r.digit for r in results] == list(digits.values())
    for task_id in held:
        assert {r.worker.split("@")[0] for r in replies[task_id].results if r.worker} == {"rescuer"}
    assert {r.worker.split("@")[0] for r in results if r.worker} == {"victim", "rescuer"}


def test_two_workers_share_one_redis_and_sigterm_loses_nothing(start_worker, tmp_path: Path) -> None:
    alpha = start_worker("alpha@%h", MNISTQ_FORWARD_BATCH="16")
    start_worker("beta@%h", MNISTQ_FORWARD_BATCH="16")
    digits = write_digits(tmp_path / "two", 500)
    with Wire(alpha.url) as wire:
        tasks = wire.enqueue(list(digits), message_size=8)
        wait_for(lambda: wire.pump(0.01) >= 0 and len(wire.answers) >= 5, 60, "the first answers")
        alpha.signal(signal.SIGTERM)  # warm shutdown: it finishes what it holds, beta does the rest
        replies = wire.wait(tasks, timeout=120)
        wire.pump(0.5)
        duplicates = [t for t, answers in wire.answers.items() if len(answers) > 1]
    assert alpha.proc is not None and alpha.proc.wait(30) == 0
    results = [r for t in tasks for r in replies[t].results]
    assert [r.digit for r in results] == list(digits.values())
    by_worker = {name: sum((r.worker or "").startswith(name) for r in results) for name in ("alpha", "beta")}
    assert by_worker["alpha"] > 0 and by_worker["beta"] > 0, by_worker
    assert duplicates == []  # what alpha held it finished, rather than leave it to be redone
    assert "Warm shutdown" in alpha.text()


def test_hot_reload_and_bad_model_refused(start_worker, tmp_path: Path) -> None:
    model = tmp_path / "model.pt"
    ckpt = load_checkpoint(SHIPPED_MODEL)
    save_checkpoint(model, ckpt.model.state_dict(), ckpt.meta)
    w = start_worker(MNISTQ_MODEL=str(model))
    digits = write_digits(tmp_path / "h", 2)
    with Wire(w.url) as wire:
        assert wire.classify(list(digits))[0].model_version == ckpt.version
        state = {k: v.clone() for k, v in ckpt.model.state_dict().items()}
        state["7.bias"] += torch.linspace(-1e-3, 1e-3, 10)
        meta = {k: v for k, v in ckpt.meta.items() if k != "version"}
        new_version = save_checkpoint(model, state, meta)
        assert new_version != ckpt.version
        # The model is checked between forward passes: ask until one of them runs the new file.
        wait_for(
            lambda: new_version in {r.model_version for r in wire.classify(list(digits))},
            30,
            "the new model version",
        )
        bad = tmp_path / "garbage.tmp"
        bad.write_bytes(b"this is not a checkpoint")
        os.replace(bad, model)
        wait_for(
            lambda: wire.classify(list(digits)) and "new model file refused" in w.text(),
            30,
            "the bad model file to be refused",
        )
        results = wire.classify(list(digits))
    assert {r.model_version for r in results} == {new_version}
    assert [r.digit for r in results] == list(digits.values())

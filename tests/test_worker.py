"""The worker against a real Redis, as real processes, spoken to through mnistq.protocol."""

from __future__ import annotations

import json
import os
import re
import subprocess
from pathlib import Path

import pytest
import redis
from conftest import WorkerProc, write_digits
from helpers import MNISTQ, wait_for
from helpers_images import SHIPPED_MODEL
from helpers_wire import Wire

from mnistq.protocol import ErrorKind, ExitCode, reply_key
from model import load_checkpoint, pick_device

pytestmark = pytest.mark.timeout(180)


def _warned(w: WorkerProc, task_id: str) -> str:
    """The worker's WARNING line about this task, once it is in the log."""

    def line() -> str | None:
        return next((x for x in w.text().splitlines() if "WARNING" in x and task_id in x), None)

    return wait_for(line, 30, f"a warning about task {task_id}")


def test_results_in_order_with_bad_files_and_no_stored_results(shared_worker: WorkerProc) -> None:
    root: Path = shared_worker.root  # type: ignore[attr-defined]
    folder = root / "order"
    digits = write_digits(folder, 6)
    (folder / "text.png").write_text("not a png")
    (folder / "dir.png").mkdir()
    good = list(digits)
    paths = [*good[:3], folder / "text.png", folder / "missing.png", folder / "dir.png", *good[3:]]
    version = load_checkpoint(SHIPPED_MODEL).version
    with Wire(shared_worker.url) as wire:
        with_probs, plain = wire.send(paths, probabilities=True), wire.send(paths)
        replies = wire.wait([with_probs, plain])
        meta_keys = wire.task_meta_keys()
    for reply in replies.values():
        assert [r.path for r in reply.results] == [str(p) for p in paths]
        assert [r.digit for r in reply.results if r.path in map(str, good)] == list(digits.values())
        kinds = [r.error_kind for r in reply.results]
        assert kinds[3:6] == [ErrorKind.UNREADABLE, ErrorKind.NOT_FOUND, ErrorKind.REFUSED]
        assert {r.model_version for r in reply.results} == {version}
        assert all(r.worker and r.worker.startswith("shared@") for r in reply.results)
    for r in replies[with_probs].results:
        if r.error is None:
            assert r.probabilities and len(r.probabilities) == 10 and abs(sum(r.probabilities) - 1) < 1e-3
    assert all(r.probabilities is None for r in replies[plain].results)
    assert all(r.confidence for r in replies[plain].results if r.error is None)
    # The reply list is the only channel: Celery stored no result, and logged none.
    assert meta_keys == []
    for task_id in replies:  # Celery logs the outcome just after the reply is pushed

        def logged(task_id: str = task_id) -> list[str]:
            return [x for x in shared_worker.text().splitlines() if task_id in x and "succeeded" in x]

        [line] = wait_for(logged, 30, f"task {task_id} logged as succeeded")
        assert line.endswith(": None"), line


def test_single_path_requests_are_coalesced(shared_worker: WorkerProc) -> None:
    root: Path = shared_worker.root  # type: ignore[attr-defined]
    digits = write_digits(root / "single", 40)
    with Wire(shared_worker.url) as wire:
        results = wire.classify(list(digits), message_size=1)
    assert [r.digit for r in results] == list(digits.values())
    # Tasks that arrived together shared forward passes.
    assert max(r.forward_batch_size or 0 for r in results) > 1


def test_reply_to_that_is_not_a_reply_key_is_refused(shared_worker: WorkerProc) -> None:
    root: Path = shared_worker.root  # type: ignore[attr-defined]
    digits = write_digits(root / "victim", 1)
    paths = list(digits)
    db = redis.Redis.from_url(shared_worker.url)
    db.set("victim:list", "precious")
    near_miss = reply_key("0" * 32) + "x"  # the prefix, but not 32 hex digits
    with Wire(shared_worker.url) as wire:
        tasks = [wire.send(paths, reply_to="victim:list"), wire.send(paths, reply_to=near_miss)]
        for task_id in tasks:
            assert "reply_to" in _warned(shared_worker, task_id) and "refused" in _warned(
                shared_worker, task_id
            )
        assert [r.digit for r in wire.classify(paths)] == list(digits.values())  # still serving
    assert db.get("victim:list") == b"precious" and db.type("victim:list") == b"string"
    assert db.ttl("victim:list") == -1  # no EXPIRE either
    assert not db.exists(near_miss)


def test_malformed_requests_are_refused_with_a_warning(shared_worker: WorkerProc) -> None:
    """Refused, and answered with no results where a reply list is named: the sender then gives
    its files error results (mnistq/protocol.py miscounted) instead of sending them forever."""
    root: Path = shared_worker.root  # type: ignore[attr-defined]
    paths = [str(p) for p in write_digits(root / "malformed", 2)]
    with Wire(shared_worker.url) as wire:
        positional = wire.send_raw(args=[paths, None, wire.reply_to])  # the old wire format
        answered = {
            wire.send_raw(kwargs={"paths": "/a.png", "reply_to": wire.reply_to}): "paths must be a list",
            wire.send(paths, ids=["only-one"]): "ids must be",
        }
        assert "positional" in _warned(shared_worker, positional)
        for task_id, reason in answered.items():
            assert reason in _warned(shared_worker, task_id)
        assert all(r.results == [] for r in wire.wait(list(answered), 30).values())
        assert [r.digit for r in wire.classify(paths)] == [0, 2]  # still serving
        assert positional not in wire.answers


def test_pickle_message_is_refused(shared_worker: WorkerProc) -> None:
    root: Path = shared_worker.root  # type: ignore[attr-defined]
    paths = [str(p) for p in write_digits(root / "pickle", 1)]
    with Wire(shared_worker.url) as wire:
        task_id = wire.send_raw(kwargs={"paths": paths, "reply_to": wire.reply_to}, serializer="pickle")

        line = _warned(shared_worker, task_id)  # one line, naming the message (worker/broker.py)
        assert "dropped" in line and "Refusing to deserialize untrusted content of type pickle" in line
        # Rejected, not held or queued for later: and it never ran, so it has no reply.
        wait_for(lambda: task_id not in wire.unacked_task_ids(), 30, "the message to leave unacked")
        assert wire.redis.llen("mnistq") == 0
        assert wire.classify(paths)[0].digit == 0
        assert task_id not in wire.answers


def test_settings_error_fails_the_start_in_one_line(start_worker) -> None:
    w = start_worker(wait=False, MNISTQ_CONCURRENCY="0")
    assert w.proc is not None and w.proc.wait(60) == ExitCode.CONFIG
    lines = [x for x in w.text().splitlines() if "cannot start" in x]
    assert lines == ["mnistq worker: cannot start: MNISTQ_CONCURRENCY must be >= 1"], w.text()
    assert "Traceback" not in w.text()


@pytest.mark.parametrize("content", [None, b"", b"garbage", "truncated"])
def test_bad_checkpoint_fails_the_start_loudly(
    start_worker, tmp_path: Path, content: bytes | str | None
) -> None:
    model = tmp_path / "model.pt"
    if content == "truncated":
        model.write_bytes(SHIPPED_MODEL.read_bytes()[:100_000])
    elif isinstance(content, bytes):
        model.write_bytes(content)
    w = start_worker(wait=False, MNISTQ_MODEL=str(model))
    assert w.proc is not None
    assert w.proc.wait(60) == ExitCode.MODEL
    text = w.text()
    assert "cannot start" in text and str(model) in text
    assert "Traceback" not in text


def _mnistq(args: list[str], env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    cmd = [*MNISTQ, *args]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=60)


@pytest.mark.system
def test_mnistq_worker_needs_redis_url_but_not_for_help() -> None:
    env = {k: v for k, v in os.environ.items() if k != "REDIS_URL" and not k.startswith("MNISTQ_")}
    out = _mnistq(["worker"], env)
    assert out.returncode == ExitCode.CONFIG
    assert "REDIS_URL is not set" in out.stderr and "mnistq run" in out.stderr
    assert "Traceback" not in out.stderr
    for flag in ("--help", "-h"):
        out = _mnistq(["worker", flag], env)
        assert out.returncode == 0, out.stderr
        assert "--concurrency" in out.stdout and "REDIS_URL" not in out.stderr


def test_prefork_pool_loads_the_model_in_each_child(start_worker, tmp_path: Path) -> None:
    w = start_worker("pre@%h", MNISTQ_POOL="prefork", MNISTQ_CONCURRENCY="2")
    digits = write_digits(tmp_path / "pf", 3)
    with Wire(w.url) as wire:
        assert [r.digit for r in wire.classify(list(digits))] == list(digits.values())
    loads = [line for line in w.text().splitlines() if "version" in line and "threads" in line]
    assert len(loads) == 2 and all("ForkPoolWorker" in line for line in loads), loads  # never the parent


def test_status_lists_live_workers_and_their_model(start_worker) -> None:
    w = start_worker("seen@%h")
    out = _mnistq(["status", "--json"], w.env)
    assert out.returncode == 0, out.stderr
    info = json.loads(out.stdout.strip().splitlines()[-1])
    assert info["queue_depth"] == 0
    [(name, model)] = info["workers"].items()
    assert name.startswith("seen@") and model["version"] == load_checkpoint(SHIPPED_MODEL).version
    assert re.fullmatch(r"bf16|fp32", model["precision"]) and model["device"] == str(pick_device("auto"))

"""Whatever lands on the queue, a worker goes on: entries that are not messages, tasks it does not
run, a message over the path bound. A real worker, a real Redis, entries pushed by hand."""

from __future__ import annotations

import base64
import json
from pathlib import Path

import pytest
from conftest import write_digits
from helpers import wait_for
from helpers_wire import Wire

from mnistq.protocol import MAX_PATHS, QUEUE, ErrorKind, miscounted

pytestmark = pytest.mark.timeout(180)


def _envelope(tag: str, body: object, headers: object, content_type: str = "application/json") -> str:
    """kombu's Redis message envelope around ``body``."""
    return json.dumps(
        {
            "body": base64.b64encode(json.dumps(body).encode()).decode(),
            "content-type": content_type,
            "content-encoding": "utf-8",
            "headers": headers,
            "properties": {
                "body_encoding": "base64",
                "delivery_tag": tag,
                "delivery_info": {"exchange": "", "routing_key": QUEUE},
            },
        }
    )


def test_a_worker_survives_any_entry_on_its_queue_and_runs_only_our_task(
    start_worker, tmp_path: Path
) -> None:
    w = start_worker()
    digits = write_digits(tmp_path / "d", 2)
    with Wire(w.url) as wire:
        junk = [
            "{this is not json",  # ended the worker: JSONDecodeError
            json.dumps({"body": 12345}),  # restarted its consumer, said as "cannot reach redis"
            "12345",
            "[1, 2]",
            b"\xff\xfe",
            _envelope("no-headers", [[], {}, {}], None),
            _envelope(
                "pickled", "x", {"task": "mnistq.classify", "id": "pickled"}, "application/x-python-serialize"
            ),
        ]
        for entry in junk:
            wire.redis.lpush(QUEUE, entry)
        unknown = wire.app.send_task("no.such.task", kwargs={}, queue=QUEUE, ignore_result=True).id
        cleanup = wire.app.send_task("celery.backend_cleanup", queue=QUEUE, ignore_result=True).id
        # Still serving, after all of them (one queue, taken in order).
        assert [r.digit for r in wire.classify(list(digits))] == list(digits.values())
        warnings = [x for x in w.text().splitlines() if "WARNING" in x and "dropped" in x]
        assert len(warnings) == len(junk) + 2, w.text()
        assert any(unknown in x and "'no.such.task' is not mnistq.classify" in x for x in warnings)
        assert any(cleanup in x and "'celery.backend_cleanup' is not" in x for x in warnings)
        # Rejected: nothing held, nothing queued, no failure result stored for an hour.
        wait_for(lambda: not wire.redis.hlen("unacked"), 10, "the last ack")  # it follows the reply
        assert wire.redis.llen(QUEUE) == 0
        assert wire.task_meta_keys() == []
    assert w.proc is not None and w.proc.poll() is None
    text = w.text()
    assert "Traceback" not in text and "ERROR" not in text and "CRITICAL" not in text, text
    assert "cannot reach" not in text and "succeeded" in text
    assert f"Task celery.backend_cleanup[{cleanup}] succeeded" not in text


def test_a_message_over_the_path_bound_is_refused_and_its_files_get_error_rows(
    start_worker, tmp_path: Path
) -> None:
    """200,000 copies of one path took 5 GB and ran twice; now the message is refused whole,
    before any file is opened, and the sender gives each file it named an error row."""
    w = start_worker()
    [path] = write_digits(tmp_path / "d", 1)
    paths = [str(path)] * (MAX_PATHS + 1)
    ids = [f"f{i}" for i in range(len(paths))]
    with Wire(w.url) as wire:
        task_id = wire.send(paths, ids=ids)
        [reply] = wire.wait([task_id], 60).values()
        assert (
            reply.results == []
            and reply.refused == f"{len(paths)} paths in one message, over the limit of {MAX_PATHS}"
        )
        results = miscounted(reply, paths, ids)
        assert results is not None and len(results) == len(paths)
        assert {r.error_kind for r in results} == {ErrorKind.REFUSED}
        assert [r.id for r in results] == ids and results[
            0
        ].error == f"refused by the worker: {reply.refused}"
        assert [r.digit for r in wire.classify(paths[:MAX_PATHS], timeout=120)][:1] == [
            0
        ]  # at the bound: done
    wait_for(lambda: task_id in w.text() and "refused" in w.text(), 10, "the refusal in the log")

"""The worker's heap (worker/heap.py HeapTrimmer), in a process of its own: mallopt's
settings hold for a whole process, and this one's must not change the test runner's."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest

from worker.heap import HeapTrimmer

pytestmark = [
    pytest.mark.system,
    pytest.mark.timeout(120),
    pytest.mark.skipif(HeapTrimmer().free_bytes() is None, reason="needs glibc 2.33+ (mallinfo2)"),
]

SCRIPT = textwrap.dedent(
    """
    import json, queue, threading
    import numpy as np
    from worker.heap import HeapTrimmer

    def rss_mb():
        return int(open("/proc/self/statm").read().split()[1]) * 4096 / 2**20

    heap = HeapTrimmer()
    heap.tune(forward_batch=64)  # keeps 64 + 128 MB
    out = {"keep_mb": heap.keep / 2**20}

    def work(mb, pieces):
        # Like a pass's activations or a big decode's blocks: allocated, touched, freed.
        arrays = [np.ones(mb * 2**20 // pieces, dtype=np.uint8) for _ in range(pieces)]
        del arrays
        heap.trim()  # after the task, as the worker does

    # One long-lived thread, as the worker's model thread is: glibc gives a thread one arena.
    jobs, answers = queue.Queue(), queue.Queue()

    def serve():
        while (job := jobs.get()) is not None:
            work(*job)
            answers.put(None)

    threading.Thread(target=serve, daemon=True).start()

    def run(name, mb, pieces):
        jobs.put((mb, pieces))
        answers.get()
        out[name] = {"rss_mb": rss_mb(), "free_mb": heap.free_bytes() / 2**20}

    run("baseline", 1, 1)
    for i in range(3):
        run(f"pass{i}", 60, 4)  # a pass's worth of memory, in 15 MB pieces: kept for the next
    run("big", 600, 40)  # big decodes: more than the heap keeps, given back
    print(json.dumps(out))
    """
)


def test_a_pass_worth_of_memory_is_kept_and_big_decodes_are_given_back() -> None:
    done = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, timeout=100)
    assert done.returncode == 0, done.stderr
    got = json.loads(done.stdout)
    assert got["keep_mb"] == 64 + 128
    base = got["baseline"]["rss_mb"]
    # The first pass's memory stays in the heap (no trim, no mmap): the next passes reuse it
    # instead of faulting it in again, so the RSS does not move.
    assert got["pass0"]["free_mb"] >= 55
    assert abs(got["pass2"]["rss_mb"] - got["pass0"]["rss_mb"]) < 10
    # 600 MB freed at once is more than the heap keeps: the trim gives it back.
    assert got["big"]["free_mb"] < got["keep_mb"]
    assert got["big"]["rss_mb"] - base < got["keep_mb"] + 20, got

"""The worker's heap: glibc's allocator tuned so forward passes reuse their memory, and trimmed
after a task only when big decodes left more free memory than the passes keep."""

from __future__ import annotations

import ctypes
import ctypes.util

# mallopt's parameter numbers (malloc.h)
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD, _M_ARENA_MAX = -1, -3, -8
#: Memory a forward pass works in, per image of a pass (its activations, ~0.7 MB, rounded up).
PASS_BYTES_PER_IMAGE = 1 << 20
#: Above what the passes keep, this much free memory may stay in the heap between tasks.
SLACK_BYTES = 128 << 20


class _MallInfo2(ctypes.Structure):
    _fields_ = [
        (name, ctypes.c_size_t)
        for name in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks",
                     "fordblks", "keepcost")
    ]  # fmt: skip


def _libc() -> ctypes.CDLL | None:
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    except OSError:
        return None
    # glibc only: elsewhere the allocator is left as it is.
    if not (hasattr(libc, "malloc_trim") and hasattr(libc, "mallopt")):
        return None
    if hasattr(libc, "mallinfo2"):  # glibc 2.33+
        libc.mallinfo2.restype = _MallInfo2
    return libc


class HeapTrimmer:
    """Keeps the memory the forward passes work in, and gives back what big decodes leave.

    A forward pass of 256 images works in ~180 MB of activations, freed when it ends. glibc's
    defaults hand most of it back to the OS at once (allocations over 32 MB are mmapped, a heap
    top over its trim threshold is cut) and a ``malloc_trim`` after each task gave back the rest:
    every pass then faulted ~50,000 fresh zeroed pages in again, ~40% of a pass's time on a
    2-core Xeon (``bench/pagefaults.py``). Tuned (``tune``), the passes' memory stays in the heap
    and is reused.

    A big PNG or TIFF is decoded whole (in Pillow's 16 MB blocks) in a task thread, and glibc
    keeps such freed blocks in that thread's arena: after 8 of them a worker's RSS stayed ~0.6 GB
    above its baseline (577 -> 1145 MB). Two arenas (not 8 per core) and, after a task, a trim
    when the heap holds more free memory than the passes keep (``keep``) bring it back; a task
    of small images finds nothing to give back and trims nothing.
    """

    def __init__(self) -> None:
        self._libc = _libc()
        self._info = getattr(self._libc, "mallinfo2", None)
        self.keep = 0  # untuned: a trim after every task

    def tune(self, forward_batch: int, arenas: int = 2) -> None:
        """Call before the task threads start: arenas that exist already stay."""
        if self._libc is None:
            return
        self._libc.mallopt(_M_ARENA_MAX, arenas)
        if self._info is None:  # no way to tell what a trim would give back: trim every task
            return
        self.keep = forward_batch * PASS_BYTES_PER_IMAGE + SLACK_BYTES
        # A pass's largest activation (64 x 24 x 24 floats an image, 38 MB for 256) is not
        # mmapped; what is freed stays unless more than ``keep`` is free at the top.
        self._libc.mallopt(_M_MMAP_THRESHOLD, 64 << 20)
        self._libc.mallopt(_M_TRIM_THRESHOLD, self.keep)

    def free_bytes(self) -> int | None:
        """Free memory held in the heap's arenas (glibc 2.33+), None where it cannot be told."""
        return int(self._info().fordblks) if self._info is not None else None

    def trim(self) -> None:
        if self._libc is None:
            return
        if self.keep and (free := self.free_bytes()) is not None and free <= self.keep:
            return
        self._libc.malloc_trim(0)

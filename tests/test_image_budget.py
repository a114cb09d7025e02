"""What one image may cost a worker: memory bounded by the pixels that matter, big decodes one at
a time per process, and a JPEG's scans bounded (issue 25, findings 14 and 15). Each figure is
taken in a fresh process (peak RSS), so the test's own arrays do not count."""

from __future__ import annotations

import io
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image, ImageDraw

from mnistq.errors import ImageError
from mnistq.images import MAX_SCANS, load_image
from mnistq.protocol import ErrorKind

pytestmark = pytest.mark.timeout(120)

# Prints the peak RSS in MB of loading argv[2:] in argv[1] threads at once, and each outcome.
PEAK = """
import sys, threading
from mnistq.images import load_images
threads, paths = int(sys.argv[1]), sys.argv[2:]
out = []
ts = [threading.Thread(target=lambda: out.extend(load_images(paths))) for _ in range(threads)]
for t in ts: t.start()
for t in ts: t.join()
# VmHWM, not ru_maxrss: that one starts from the forking parent's peak (pytest's)
print(next(int(x.split()[1]) for x in open('/proc/self/status') if x.startswith('VmHWM')) // 1024)
print(" ".join(type(x).__name__ if isinstance(x, Exception) else str(x.shape) for x in out))
"""


def _peak(paths: list[Path], threads: int = 1) -> tuple[int, str]:
    got = subprocess.run(
        [sys.executable, "-c", PEAK, str(threads), *map(str, paths)],
        capture_output=True,
        text=True,
        timeout=100,
        check=True,
    ).stdout.split("\n")
    return int(got[0]), got[1]


def _seven(path: Path, size: tuple[int, int], mode: str = "L") -> Path:
    """A 7 drawn in the middle of a white canvas of ``size``."""
    im = Image.new(mode, size, "white")
    w, h = size
    s = min(w, h) // 3
    ImageDraw.Draw(im).line(
        [
            (w // 2 - s // 2, h // 2 - s // 2),
            (w // 2 + s // 2, h // 2 - s // 2),
            (w // 2 - s // 4, h // 2 + s),
        ],
        fill="black",
        width=max(2, s // 6),
    )
    im.save(path)
    return path


@pytest.mark.system
def test_a_long_narrow_image_is_reduced_before_it_costs_gigabytes(tmp_path: Path) -> None:
    # 1000 x 39,000 is under the 40 Mpx limit and ~100 KB as a PNG; worked on at full size in
    # float it took 2.2 GB and 6-10 s; reduced first, ~70 MB
    strip = _seven(tmp_path / "strip.png", (1000, 39_000))
    assert strip.stat().st_size < 500_000
    peak, outcome = _peak([strip])
    assert outcome == "(28, 28)"
    assert peak < 400, f"{peak} MB for one {strip.stat().st_size}-byte image"
    assert load_image(strip).max() > 0.5  # the digit is still found


@pytest.mark.system
def test_big_decodes_take_turns_in_a_process(tmp_path: Path) -> None:
    # a 6000 x 6000 RGBA PNG decodes to 144 MB; three task threads at once held all three (2.8x
    # one image's peak; 1.2-1.6x taking turns)
    big = _seven(tmp_path / "big.png", (6000, 6000), "RGBA")
    one, _ = _peak([big])
    three, outcome = _peak([big], threads=3)
    assert outcome == " ".join(["(28, 28)"] * 3)
    assert three < one * 2.2, f"one image: {one} MB; three at once: {three} MB"


def _progressive_with_scans(path: Path, extra: int) -> Path:
    """A progressive JPEG whose last scan is repeated ``extra`` times (a hostile file)."""
    buf = io.BytesIO()
    Image.open(_seven(path.with_suffix(".png"), (600, 600))).convert("RGB").save(
        buf, "JPEG", progressive=True, quality=90
    )
    data = buf.getvalue()
    last, end = data.rfind(b"\xff\xda"), data.rfind(b"\xff\xd9")
    path.write_bytes(data[:end] + data[last:end] * extra + data[end:])
    return path


def test_a_jpeg_of_too_many_scans_gets_an_error_not_minutes(tmp_path: Path) -> None:
    normal = _progressive_with_scans(tmp_path / "normal.jpg", 0)
    assert load_image(normal).max() > 0.5  # ~10 scans: read as ever
    hostile = _progressive_with_scans(tmp_path / "hostile.jpg", MAX_SCANS)
    with pytest.raises(ImageError, match=f"more than {MAX_SCANS} scans") as info:
        load_image(hostile)
    assert info.value.kind is ErrorKind.TOO_LARGE

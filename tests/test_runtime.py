"""The worker's per-request work (classify_paths) and its runtime, in process: no Redis, no worker."""

from __future__ import annotations

import builtins
import io
import logging
import os
from pathlib import Path

import numpy as np
import pytest
from conftest import write_digits
from helpers_images import SHIPPED_MODEL
from PIL import Image

import mnistq.images
import worker.runtime
from mnistq.images import load_image
from mnistq.protocol import FALLBACK_REVIEW_BELOW, ClassifyRequest, ErrorKind, ReviewReason
from mnistq.settings import Settings
from model import load_checkpoint
from worker.engine import Prediction
from worker.runtime import Runtime, Throughput, classify_paths

pytestmark = pytest.mark.timeout(60)
LOW, NOT_DIGIT = ReviewReason.LOW_CONFIDENCE.value, ReviewReason.NOT_DIGIT.value


class FakeBatcher:
    """Row k of each request gets digit k % 10 with confidence ``base`` + k / 100 (rows in
    ``not_digit`` judged not a digit); records its input."""

    version = "fake-v1"

    def __init__(
        self,
        fail: Exception | None = None,
        *,
        base: float = 0.5,
        not_digit: tuple[int, ...] = (),
        review_below: float | None = None,
    ) -> None:
        self.fail = fail
        self.seen: list[np.ndarray] = []
        self.base, self.not_digit, self.review_below = base, not_digit, review_below

    def predict(self, images: np.ndarray) -> Prediction:
        if self.fail is not None:
            raise self.fail
        self.seen.append(images)
        n = len(images)
        probs = np.full((n, 10), 0.0, dtype=np.float32)
        for k in range(n):
            probs[k] = (1 - self.base - k / 100) / 9
            probs[k, k % 10] = self.base + k / 100
        odd = np.array([k in self.not_digit for k in range(n)])
        return Prediction(probs, self.version, 7.0, n + 5, not_digit=odd, review_below=self.review_below)


def _settings(root: Path, **changes: object) -> Settings:
    return Settings(allowed_roots=(root.resolve(),), **changes)  # type: ignore[arg-type]


def _mixed_folder(root: Path) -> tuple[list[str], dict[str, ErrorKind | None]]:
    """Good digits between files that fail in every way: paths, and each path's expected kind."""
    good = [str(p) for p in write_digits(root / "good", 3)]
    (root / "text.png").write_text("not a png")
    (root / "empty.png").write_bytes(b"")
    (root / "dir.png").mkdir()
    Image.new("L", (28, 28), 0).save(root / "blank.png")
    Image.new("L", (200, 200), 255).save(root / "big.png")
    os.mkfifo(root / "pipe.png")  # opening a FIFO would block: it must be refused by stat alone
    kinds: dict[str, ErrorKind | None] = {
        good[0]: None,
        str(root / "text.png"): ErrorKind.UNREADABLE,
        str(root / "missing.png"): ErrorKind.NOT_FOUND,
        str(root / "empty.png"): ErrorKind.UNREADABLE,
        good[1]: None,
        str(root / "dir.png"): ErrorKind.REFUSED,
        str(root / "blank.png"): ErrorKind.NO_DIGIT,
        str(root / "big.png"): ErrorKind.TOO_LARGE,
        str(root / "pipe.png"): ErrorKind.REFUSED,
        "/etc/hostname": ErrorKind.REFUSED,
        "relative.png": ErrorKind.REFUSED,
        good[2]: None,
    }
    return list(kinds), kinds


def test_one_result_per_path_in_order_with_error_kinds(tmp_path: Path) -> None:
    paths, kinds = _mixed_folder(tmp_path)
    ids = [f"id-{i}" for i in range(len(paths))]
    batcher = FakeBatcher()
    request = ClassifyRequest(paths=paths, ids=ids)
    results = classify_paths(_settings(tmp_path, max_pixels=10_000), batcher, request, "w@test")

    assert [r.path for r in results] == paths and [r.id for r in results] == ids
    assert [r.error_kind for r in results] == list(kinds.values())
    good = [p for p, kind in kinds.items() if kind is None]
    # The good files went to the model as one stack, in order, and each got its own row back.
    [stack] = batcher.seen
    assert np.array_equal(stack, np.stack([load_image(p) for p in good]))
    by_path = {r.path: r for r in results}
    assert [by_path[p].digit for p in good] == [0, 1, 2]
    assert [by_path[p].confidence for p in good] == [0.5, 0.51, 0.52]
    for r in results:
        assert r.probabilities is None  # not asked for
        assert r.model_version == "fake-v1" and r.worker == "w@test"
        assert r.forward_ms_per_batch == 7.0 and r.forward_batch_size == 3 + 5
        assert r.decode_ms_per_image is not None and r.decode_ms_per_image >= 0
        assert (r.error is None) == (r.error_kind is None) == (r.digit is not None)
    errors = {Path(r.path).name: r.error or "" for r in results}
    assert "not an image" in errors["text.png"] and "empty" in errors["empty.png"]
    assert "directory" in errors["dir.png"] and "not a regular file" in errors["pipe.png"]
    assert "200x200" in errors["big.png"] and "absolute" in errors["relative.png"]
    assert "outside the allowed roots" in errors["hostname"]


def test_probabilities_only_when_asked(tmp_path: Path) -> None:
    paths = [str(p) for p in write_digits(tmp_path, 2)]
    settings = _settings(tmp_path)
    plain = classify_paths(settings, FakeBatcher(), ClassifyRequest(paths=paths))
    full = classify_paths(settings, FakeBatcher(), ClassifyRequest(paths=paths, probabilities=True))
    assert all(r.probabilities is None and r.confidence is not None for r in plain)
    for r in full:
        assert r.probabilities is not None and len(r.probabilities) == 10
        assert r.digit == int(np.argmax(r.probabilities)) and r.probabilities[r.digit] == r.confidence
        assert abs(sum(r.probabilities) - 1) < 1e-3
        assert all(len(repr(p)) <= 8 for p in r.probabilities)  # rounded: compact JSON
    assert "probabilities" not in plain[0].to_dict()


def test_review_is_judged_per_image_only_when_asked_and_never_on_an_error(tmp_path: Path) -> None:
    paths = [*map(str, write_digits(tmp_path, 4)), str(tmp_path / "missing.png")]
    settings = _settings(tmp_path)
    # confidences 0.5, 0.51, 0.52, 0.53; the second is not a digit; the model recommends 0.515
    batcher = FakeBatcher(not_digit=(1,), review_below=0.515)
    off = classify_paths(settings, batcher, ClassifyRequest(paths=paths, review_below=0.9))
    assert [r.review for r in off] == [None] * 5  # review=False: not judged, whatever P says
    own = classify_paths(settings, batcher, ClassifyRequest(paths=paths, review=True, review_below=0.525))
    assert [r.review for r in own] == [LOW, NOT_DIGIT, LOW, None, None]
    assert [r.digit for r in own] == [0, 1, 2, 3, None]  # sent to review, still classified
    assert own[4].error_kind == ErrorKind.NOT_FOUND
    auto = classify_paths(settings, batcher, ClassifyRequest(paths=paths, review=True))
    assert [r.review for r in auto] == [LOW, NOT_DIGIT, None, None, None]  # the model's 0.515
    assert "review" not in off[0].to_dict() and own[0].to_dict()["review"] == "low confidence"


def test_review_with_no_threshold_anywhere_uses_the_fallback_and_says_so_once(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    paths = [str(p) for p in write_digits(tmp_path, 8)]
    batcher = FakeBatcher(base=FALLBACK_REVIEW_BELOW - 0.045)  # rows 0-4 under it, 5-7 not
    batcher.version = "no-threshold-v1"
    caplog.set_level(logging.WARNING, "mnistq.worker")
    for _ in range(2):
        results = classify_paths(_settings(tmp_path), batcher, ClassifyRequest(paths=paths, review=True))
        assert [r.review for r in results] == [LOW] * 5 + [None] * 3
    said = [m for m in caplog.messages if "recommends no review threshold" in m]
    assert len(said) == 1 and f"review below {FALLBACK_REVIEW_BELOW:g}" in said[0], said


def test_unexpected_decoder_error_is_that_files_unreadable(tmp_path: Path, monkeypatch) -> None:
    paths = [str(p) for p in write_digits(tmp_path, 3)]
    real = mnistq.images.read_luminance

    def flaky(path: Path, *args) -> np.ndarray:
        if str(path) == paths[1]:
            raise ZeroDivisionError("decoder bug")
        return real(path, *args)

    monkeypatch.setattr(mnistq.images, "read_luminance", flaky)
    results = classify_paths(_settings(tmp_path), FakeBatcher(), ClassifyRequest(paths=paths))
    assert [r.error_kind for r in results] == [None, ErrorKind.UNREADABLE, None]
    assert "ZeroDivisionError: decoder bug" in (results[1].error or "")
    assert [r.digit for r in results] == [0, None, 1]


def test_failed_forward_pass_is_internal_for_its_images_only(tmp_path: Path) -> None:
    paths = [*map(str, write_digits(tmp_path, 2)), str(tmp_path / "missing.png")]
    batcher = FakeBatcher(fail=RuntimeError("out of memory"))
    results = classify_paths(_settings(tmp_path), batcher, ClassifyRequest(paths=paths))
    assert [r.error_kind for r in results] == [ErrorKind.INTERNAL, ErrorKind.INTERNAL, ErrorKind.NOT_FOUND]
    assert "RuntimeError: out of memory" in (results[0].error or "")
    assert all(r.digit is None for r in results)


def test_no_good_file_never_calls_the_model(tmp_path: Path) -> None:
    batcher = FakeBatcher(fail=AssertionError("the model was called with nothing to classify"))
    results = classify_paths(_settings(tmp_path), batcher, ClassifyRequest(paths=["/nope.png", "x.png"]))
    assert [r.error_kind for r in results] == [ErrorKind.REFUSED, ErrorKind.REFUSED]
    assert {r.model_version for r in results} == {"fake-v1"} and results[0].forward_batch_size == 0


def test_disallowed_paths_are_refused_unopened(tmp_path: Path, monkeypatch) -> None:
    root, outside = tmp_path / "root", tmp_path / "outside"
    target = next(iter(write_digits(outside, 1)))
    fifo = outside / "pipe.png"
    os.mkfifo(fifo)  # were it opened, the test would block (and time out) right there
    allowed = next(iter(write_digits(root / "sub", 1)))
    (root / "escape.png").symlink_to(target)
    refused = [
        str(target),
        str(root / "escape.png"),  # a link inside the root to a file outside it
        str(root / "sub" / ".." / "sub" / allowed.name),
        "/dev/zero",
        str(fifo),
        "relative.png",
    ]
    opened: list[str] = []

    def spy(real):
        def wrapper(file, *args, **kwargs):
            if isinstance(file, (str, os.PathLike)):
                # load_image opens one component at a time, each relative to its folder's fd.
                folder = kwargs.get("dir_fd")
                base = os.readlink(f"/proc/self/fd/{folder}") if folder is not None else ""
                opened.append(os.path.realpath(os.path.join(base, file)))
            return real(file, *args, **kwargs)

        return wrapper

    monkeypatch.setattr(builtins, "open", spy(builtins.open))
    monkeypatch.setattr(io, "open", spy(io.open))
    monkeypatch.setattr(os, "open", spy(os.open))
    monkeypatch.setattr(Image, "open", spy(Image.open))
    request = ClassifyRequest(paths=[*refused, str(allowed)])
    results = classify_paths(_settings(root), FakeBatcher(), request)
    monkeypatch.undo()

    # The spy works (the allowed file was opened) and saw none of the refused ones.
    assert os.path.realpath(allowed) in opened
    forbidden = {os.path.realpath(target), os.path.realpath(fifo), "/dev/zero"}
    assert forbidden.isdisjoint(opened), opened
    assert [r.error_kind for r in results] == [ErrorKind.REFUSED] * len(refused) + [None]
    assert "'..'" in (results[2].error or "") and "absolute" in (results[5].error or "")
    assert all("outside the allowed roots" in (r.error or "") for r in (*results[:2], *results[3:5]))


def test_throughput_reports_once_per_interval() -> None:
    now = [0.0]
    stats = Throughput(10.0, clock=lambda: now[0])
    assert stats.add(30) is None
    now[0] = 5.0
    assert stats.add(10) is None
    now[0] = 10.0
    assert stats.add(60) == (10.0, 100 / 3)  # 100 images in 10 s, over 3 passes
    now[0] = 11.0
    assert stats.add(5) is None  # a new interval began


# --- the real model, in process ----------------------------------------------------------------


def test_runtime_loads_the_model_and_classifies(tmp_path: Path) -> None:
    digits = write_digits(tmp_path, 5)
    rt = Runtime(_settings(tmp_path, model=SHIPPED_MODEL, device="cpu", precision="fp32")).load()
    try:
        assert rt.batcher is not None
        version = load_checkpoint(SHIPPED_MODEL).version
        assert rt.model_info() == {"version": version, "device": "cpu", "precision": "fp32"}
        results = classify_paths(rt.settings, rt.batcher, ClassifyRequest(paths=[str(p) for p in digits]))
    finally:
        rt.close()
    assert [r.digit for r in results] == list(digits.values())
    assert {r.model_version for r in results} == {version}
    assert Runtime(Settings(), start_version="abc").model_info()["version"] == "abc"  # prefork parent


# --- check, then open: what is swapped in between is refused, never read -------------------------


def _swap_after_check(monkeypatch, victim: Path, swap) -> None:
    """checked_path passes ``victim``, then ``swap(victim)`` replaces it before it is opened."""
    real_check = worker.runtime.checked_path

    def check_then_swap(raw: str, roots: tuple[Path, ...]) -> Path:
        checked = real_check(raw, roots)
        if checked == victim:
            swap(victim)
        return checked

    monkeypatch.setattr(worker.runtime, "checked_path", check_then_swap)


def _to_fifo(path: Path) -> None:
    path.unlink()
    os.mkfifo(path)  # no writer ever: a blocking open would wait forever


def _to_link_out(path: Path) -> None:
    path.unlink()
    path.symlink_to("/etc/hostname")


def _folder_to_link_out(path: Path) -> None:
    outside = path.parent.parent.parent / "outside"  # beside the root, not under it
    outside.mkdir()
    (outside / path.name).write_text("secret")
    path.parent.rename(path.parent.parent / "moved")
    path.parent.symlink_to(outside)


@pytest.mark.timeout(20)
@pytest.mark.parametrize(
    ("swap", "message"),
    [
        (_to_fifo, "not a regular file"),
        (_to_link_out, "the file is a symbolic link"),
        (_folder_to_link_out, "a folder on its path is a symbolic link"),
    ],
)
def test_a_file_swapped_after_the_check_is_refused_unread(tmp_path: Path, monkeypatch, swap, message) -> None:
    root = tmp_path / "root"
    good = [str(p) for p in write_digits(root / "in", 2)]
    victim = next(iter(write_digits(root / "victim", 1)))  # a folder of its own, for the folder swap
    paths = [good[0], str(victim), good[1]]
    _swap_after_check(monkeypatch, victim, swap)
    results = classify_paths(_settings(root), FakeBatcher(), ClassifyRequest(paths=paths))
    assert [r.error_kind for r in results] == [None, ErrorKind.REFUSED, None]
    assert message in (results[1].error or "")
    assert [r.digit for r in results] == [0, None, 1]  # the others unaffected, nothing blocked


def test_outside_the_roots_names_the_roots(tmp_path: Path) -> None:
    roots = (tmp_path / "a", tmp_path / "b")
    settings = Settings(allowed_roots=roots)
    [result] = classify_paths(settings, FakeBatcher(), ClassifyRequest(paths=["/etc/hostname"]))
    assert result.error == (
        f"path is outside the allowed roots ({roots[0]}, {roots[1]}); set MNISTQ_ALLOWED_ROOTS on the worker"
    )

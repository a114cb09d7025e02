"""The review folder (issue 15, item 2): the worker judges each image with the model that read
it, the producer puts the file in review/ and says why in the ``review`` column.

Real Redis, real worker, watcher and `mnistq run` processes, real files. What each file should
get is worked out here with the same checkpoint (``model``), so the tests hold for any
shipped model: thresholds are put in the widest gap between the images' own figures.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import WorkerProc, fresh_db
from helpers_images import SHIPPED_MODEL
from helpers_run import MNISTQ, Run, read_rows, run_env, wait_rows
from PIL import Image, ImageDraw, ImageFont

from api import Client
from mnistq.errors import ConfigError
from mnistq.images import load_image, normalise
from mnistq.protocol import CSV_COLUMNS, ClassifyRequest, ExitCode, Result, ReviewReason
from mnistq.settings import Settings
from model import Calibration, load_checkpoint, pick_device, predict_logits, prepare, save_checkpoint
from producer.csvsink import CsvSink

pytestmark = pytest.mark.timeout(240)
NOT_DIGIT, LOW = ReviewReason.NOT_DIGIT.value, ReviewReason.LOW_CONFIDENCE.value
#: the workers' numbers must match this process's: fp32 on the CPU, one thread
SAME_MATHS = {"MNISTQ_PRECISION": "fp32", "MNISTQ_DEVICE": "cpu", "MNISTQ_THREADS": "1"}


# -- images with a spread of confidences, and what a checkpoint makes of them ------------------
def _render(text: str, stroke: int) -> np.ndarray:
    font = ImageFont.load_default(size=64)
    im = Image.new("L", (160, 160), 0)
    ImageDraw.Draw(im).text((40, 30), text, fill=255, font=font, stroke_width=stroke, stroke_fill=255)
    return np.round(normalise(np.asarray(im, dtype=np.float32) / 255.0) * 255).astype(np.uint8)


def write_spread(folder: Path) -> list[Path]:
    """Digits in Pillow's font at many stroke widths (some read well, some badly) and a few
    letters and signs: distinct images whose confidences and digit scores spread out."""
    folder.mkdir(parents=True, exist_ok=True)
    seen: set[bytes] = set()
    out = []
    for text in [*"0123456789", *"AXK#%&"]:
        for stroke in (0, 2, 4, 6, 8):
            a = _render(text, stroke)
            if a.max() == 0 or a.tobytes() in seen:
                continue
            seen.add(a.tobytes())
            path = folder / f"g{len(out):03d}.png"
            Image.fromarray(a).save(path)
            out.append(path)
    return out


def logits_of(paths: list[Path]) -> torch.Tensor:
    """What the worker's forward pass gives for these files (the shipped weights, fp32, CPU)."""
    ckpt = load_checkpoint(SHIPPED_MODEL)
    x = torch.from_numpy(np.stack([load_image(p, 40_000_000) for p in paths])).unsqueeze(1)
    device = pick_device("cpu")
    model = prepare(ckpt.model, device)
    return predict_logits(model, x, float(ckpt.meta["mean"]), float(ckpt.meta["std"]), device, "fp32")


def gap(values: np.ndarray, low: float = 0.2, high: float = 0.2) -> float:
    """The middle of the widest gap between sorted values with at least ``low`` of them below
    and ``high`` above: a threshold no rounding or batching can tip an image across."""
    v = np.sort(values)
    n = len(v)
    i = max(range(max(1, int(n * low)), n - max(1, int(n * high)) + 1), key=lambda k: v[k] - v[k - 1])
    assert v[i] - v[i - 1] > 2e-3, f"no clear gap to put a threshold in: {v}"
    return float((v[i] + v[i - 1]) / 2)


def expected(logits: torch.Tensor, cal: Calibration, below: float) -> list[str]:
    """Each image's review reason ("" for none), as the worker must decide it."""
    conf = cal.probs(logits).max(1).values.numpy()
    odd = cal.not_digit(logits).numpy()
    return [NOT_DIGIT if o else LOW if c < below else "" for c, o in zip(conf, odd, strict=True)]


def write_checkpoint(path: Path, cal: Calibration | None) -> Path:
    """The shipped weights with a calibration chosen by the test (None: none, as before
    calibration existed)."""
    ckpt = load_checkpoint(SHIPPED_MODEL)
    meta = {k: v for k, v in ckpt.meta.items() if k not in ("version", "calibration")}
    if cal is not None:
        meta["calibration"] = cal.to_meta()
    save_checkpoint(path, ckpt.model.state_dict(), meta)
    return path


def check_places(rows: list[dict[str, str]], want: dict[str, str], base: Path) -> None:
    """One row per file; the reason in its row; the file in review/ or done/ as the row says."""
    assert Counter(Path(r["path"]).name for r in rows) == Counter(want.keys()), "not one row per file"
    for r in rows:
        name, reason = Path(r["path"]).name, want[Path(r["path"]).name]
        assert (r["review"], r["error"]) == (reason, ""), (name, r)
        assert r["digit"] and r["confidence"], r  # sent to review, still classified
        folder = base / ("review" if reason else "done")
        assert Path(r["moved_to"]).parent == folder and Path(r["moved_to"]).is_file(), r


# -- a worker serving a checkpoint with a calibration of the test's choosing -------------------
class Served:
    """The worker, its checkpoint's calibration, and the images with what they should get."""

    def __init__(self, worker: WorkerProc, root: Path, cal: Calibration, files: list[Path]) -> None:
        self.worker, self.root, self.cal, self.files = worker, root, cal, files
        self.logits = logits_of(files)


@pytest.fixture(scope="module")
def served(redis_server: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    root = tmp_path_factory.mktemp("review")
    files = write_spread(root / "images")
    logits = logits_of(files)
    temperature = 1.5  # not the shipped one: the rows must show the calibrated confidence
    score = Calibration(temperature).digit_score(logits).numpy()
    digit_below = gap(score, low=0.1, high=0.5)
    digits = score >= digit_below
    conf = Calibration(temperature).probs(logits).max(1).values.numpy()
    cal = Calibration(temperature, gap(conf[digits], 0.25, 0.25), digit_below, fitted=True)
    model = write_checkpoint(root / "calibrated.pt", cal)
    worker = WorkerProc(
        fresh_db(redis_server), "review@%h", root, root / "worker.log", MNISTQ_MODEL=str(model), **SAME_MATHS
    )
    worker.start()
    yield Served(worker, root, cal, files)
    worker.stop()


def test_the_worker_log_says_how_its_model_is_calibrated(served: Served) -> None:
    text = served.worker.text()
    assert "calibrated (temperature 1.5, recommended review below" in text, text
    assert "not-a-digit check on" in text


# -- `mnistq watch`: the producer has no model; the worker's recommended threshold -------------
def _watch(served: Served, folder: Path, *args: str, csv: Path | None = None) -> subprocess.Popen[bytes]:
    inbox, csv = folder / "inbox", csv or folder / "results.csv"
    env = {
        **served.worker.env,
        "MNISTQ_MODEL": str(folder / "no-such-model.pt"),  # the producer must never need one
        "MNISTQ_LOG_LEVEL": "INFO",
    }
    cmd = [*MNISTQ, "watch", "--inbox", str(inbox), "--csv", str(csv), *args]
    with open(folder / "watch.log", "ab") as out:
        return subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT)


def _copies(served: Served, inbox: Path, copies: int) -> dict[str, str]:
    """``copies`` of each image in ``inbox``: {name: the reason it should get}."""
    reasons = expected(served.logits, served.cal, served.cal.review_below or 0)
    inbox.mkdir(parents=True, exist_ok=True)
    want = {}
    for k in range(copies):
        for f, reason in zip(served.files, reasons, strict=True):
            name = f"c{k}-{f.name}"
            shutil.copyfile(f, inbox / name)
            want[name] = reason
    return want


def test_watch_with_no_p_sends_files_to_review_by_the_served_models_threshold(
    served: Served, tmp_path: Path
) -> None:
    folder = served.root / "watch-auto"
    folder.mkdir()
    want = _copies(served, folder / "inbox", 2)
    assert set(want.values()) == {NOT_DIGIT, LOW, ""}, "the images do not cover every case"
    proc = _watch(served, folder, "--review-below")
    try:
        rows = wait_rows(folder / "results.csv", len(want), timeout=90, settle=1.0)
        maps = Path(f"/proc/{proc.pid}/maps").read_text()
        assert "libtorch" not in maps, "the producer loaded torch"
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(60) == 0
    log = (folder / "watch.log").read_text()
    assert "review:  " in log and "the model's recommended threshold" in log, log
    sent = sum(1 for reason in want.values() if reason)
    assert f"done {len(want)} (0 failed, {sent} to review)" in log, log  # the final line
    check_places(rows, want, folder)
    # the confidence is the calibrated one (temperature 1.5), as the row writes it
    probs = served.cal.probs(served.logits).max(1).values.numpy()
    conf = {f"c0-{f.name}": f"{c:.4f}" for f, c in zip(served.files, probs, strict=True)}
    for r in rows:
        name = Path(r["path"]).name
        if name in conf:
            assert abs(float(r["confidence"]) - float(conf[name])) <= 2e-4, (name, r["confidence"])
    assert [p.name for p in (folder / "inbox").iterdir() if not p.name.startswith(".")] == []


def test_review_inside_the_inbox_is_never_taken_as_new_work(served: Served) -> None:
    """The CSV in the inbox puts done/ and review/ there too: files put there stay there."""
    folder = served.root / "inside"
    folder.mkdir()
    inbox = folder / "inbox"
    want = _copies(served, inbox, 1)
    proc = _watch(served, folder, "--review-below", csv=inbox / "results.csv")
    try:
        rows = wait_rows(inbox / "results.csv", len(want), timeout=90, settle=4.0)  # > settle_s
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(60) == 0
    check_places(rows, want, inbox)
    assert not (inbox / "review" / "review").exists() and not (inbox / "done" / "review").exists()
    assert len(list((inbox / "review").iterdir())) == sum(1 for r in want.values() if r)


# -- the Python API -------------------------------------------------------------------------------
def test_the_api_takes_the_same_p_and_its_results_carry_the_reason(served: Served) -> None:
    url = served.worker.url
    paths = [str(p) for p in served.files]
    p = gap(served.cal.probs(served.logits).max(1).values.numpy())
    with Client(url, settings=Settings(redis_url=url)) as client:
        default = client.classify(paths, timeout=60)
        assert [r.review for r in default] == [None] * len(paths)  # off unless asked
        mine = client.classify(paths, timeout=60, review_below=p)
        auto = client.enqueue(paths, review_below="auto")
        auto_results = {r.path: r.review for r in auto.as_completed(timeout=60)}
        with pytest.raises(ConfigError, match="review_below"):
            client.classify(paths, review_below=1.5)
    assert [r.review or "" for r in mine] == expected(served.logits, served.cal, p)
    below = served.cal.review_below or 0
    assert [auto_results[x] or "" for x in paths] == expected(served.logits, served.cal, below)
    # the setting (MNISTQ_REVIEW_BELOW) is the client's default; "off" turns it off per call
    with Client(url, settings=Settings(redis_url=url, review_below=p)) as client:
        assert [r.review or "" for r in client.classify(paths, timeout=60)] == [r.review or "" for r in mine]
        assert all(r.review is None for r in client.classify(paths, timeout=60, review_below="off"))


def test_classify_follows_the_setting_and_says_why_in_its_output_and_csv(served: Served) -> None:
    reasons = expected(served.logits, served.cal, served.cal.review_below or 0)
    env = {**served.worker.env, "MNISTQ_REVIEW_BELOW": "auto"}
    csv = served.root / "classify.csv"
    paths = [str(p) for p in served.files]
    out = subprocess.run(
        [*MNISTQ, "classify", "--csv", str(csv), *paths], env=env, capture_output=True, text=True, timeout=90
    )
    assert out.returncode == 0, out.stderr
    said = {line.split(": ")[0]: line for line in out.stdout.splitlines()}
    for path, reason in zip(paths, reasons, strict=True):
        assert said[path].endswith(f"  [review: {reason}]" if reason else ")"), said[path]
    assert [r["review"] for r in read_rows(csv)] == reasons


def test_an_error_row_is_never_sent_to_review(served: Served) -> None:
    blank = served.root / "blank.png"
    Image.new("L", (64, 64), 255).save(blank)
    url = served.worker.url
    with Client(url, settings=Settings(redis_url=url)) as client:
        (r,) = client.classify([str(blank)], timeout=60, review_below=0.999999)
    assert r.error_kind == "no_digit" and r.review is None


# -- `mnistq run`, killed mid-run and started again ------------------------------------------------
def test_run_with_a_p_through_a_kill_and_a_restart_gives_one_row_each_in_the_right_folder(
    start_run: Callable[..., Run], tmp_path: Path
) -> None:
    files = write_spread(tmp_path / "images")
    logits = logits_of(files)
    cal = load_checkpoint(SHIPPED_MODEL).calibration  # whatever the shipped model carries
    p = gap(cal.probs(logits).max(1).values.numpy(), 0.3, 0.3)
    reasons = expected(logits, cal, p)
    want: dict[str, str] = {}
    (tmp_path / "inbox").mkdir()
    for k in range(12):  # ~600 files, in messages of 16: a kill lands mid-run
        for f, reason in zip(files, reasons, strict=True):
            shutil.copyfile(f, tmp_path / "inbox" / f"c{k:02d}-{f.name}")
            want[f"c{k:02d}-{f.name}"] = reason
    env = {**SAME_MATHS, "MNISTQ_MESSAGE_SIZE": "16"}
    run = start_run("--workers", "1", "--review-below", f"{p}", env=env)
    wait_rows(run.csv, 40, timeout=120)
    run.proc.kill()  # no goodbye: rows, links and inbox entries wherever they were
    run.wait(30)
    assert len(read_rows(run.csv)) < len(want), "finished before the kill; nothing was tested"
    again = subprocess.run(
        [*MNISTQ, "run", "--drain", "--workers", "1", "--review-below", f"{p}"],
        cwd=tmp_path,
        env={**run_env(run.marker), **env},
        capture_output=True,
        text=True,
        timeout=200,
    )
    assert again.returncode == 0, again.stderr
    assert "Traceback" not in again.stderr
    check_places(read_rows(run.csv), want, tmp_path)
    assert [p.name for p in run.inbox.iterdir() if not p.name.startswith(".")] == []
    in_review = {p.name for p in (tmp_path / "review").iterdir()}
    assert in_review == {n for n, r in want.items() if r}  # nothing stray, nothing twice


# -- a person's mistakes: one line, exit 2 ---------------------------------------------------------
@pytest.mark.parametrize(
    ("args", "env"),
    [
        (["run", "--drain"], {"MNISTQ_REVIEW_BELOW": "1.5"}),
        (["watch"], {"MNISTQ_REVIEW_BELOW": "sometimes"}),
        (["watch", "--review-below", "0"], {}),
        (["run", "--review-below", "high"], {}),
    ],
)
@pytest.mark.system
def test_a_bad_review_setting_is_one_line(tmp_path: Path, args: list[str], env: dict[str, str]) -> None:
    base = {k: v for k, v in os.environ.items() if not k.startswith("MNISTQ_") and k != "REDIS_URL"}
    out = subprocess.run(
        [*MNISTQ, *args],
        cwd=tmp_path,
        env={**base, "REDIS_URL": "redis://127.0.0.1:1/0", **env},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == ExitCode.CONFIG, out.stderr
    assert "Traceback" not in out.stderr and out.stderr.count("\n") == 1, out.stderr
    assert "between 0 and 1" in out.stderr and "auto" in out.stderr
    assert list(tmp_path.iterdir()) == []  # nothing started, nothing created


# -- the wire and the CSV ------------------------------------------------------------------------
@pytest.mark.parametrize("bad", [0, 1, 1.5, -0.1, "0.5", True, float("nan")])
def test_a_request_with_a_bad_p_is_refused(bad: object) -> None:
    with pytest.raises(ValueError, match="review_below"):
        ClassifyRequest.from_kwargs({"paths": ["/x.png"], "review": True, "review_below": bad})


def test_a_request_round_trips_its_review_and_an_older_one_asks_none() -> None:
    r = ClassifyRequest(paths=["/x.png"], review=True, review_below=0.8)
    assert ClassifyRequest.from_kwargs(r.to_kwargs()) == r
    old = ClassifyRequest.from_kwargs({"paths": ["/x.png"]})
    assert (old.review, old.review_below) == (False, None)


def test_an_older_csv_keeps_its_header_and_new_rows_fit_under_it(tmp_path: Path) -> None:
    before = [c for c in CSV_COLUMNS if c != "review"]
    csv = tmp_path / "results.csv"
    csv.write_text(",".join(before) + "\r\n/in/a.png,1,0.9000,v,,,id-a,t,/done/a.png\r\n")
    sink = CsvSink(csv)
    sink.append([Result("/in/b.png", "id-b", 4, 0.3, "v", review=LOW, moved_to="/review/b.png")])
    sink.close()
    lines = csv.read_text().splitlines()
    assert lines[0] == ",".join(before) and len(lines) == 3
    assert lines[2].startswith("/in/b.png,4,0.3000,v,,,id-b,") and lines[2].endswith(",/review/b.png")
    new = tmp_path / "new.csv"
    sink = CsvSink(new)
    sink.append([Result("/in/b.png", "id-b", 4, 0.3, "v", review=LOW, moved_to="/review/b.png")])
    sink.close()
    assert new.read_text().splitlines()[1].endswith(",/review/b.png,low confidence")

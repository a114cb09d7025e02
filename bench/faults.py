"""Faults mid-burst: does every file still get exactly one row, and how long until the last one?

Real processes on real MNIST test PNGs moved into an inbox. Each scenario starts its own stack,
moves the burst in, injects one fault when a quarter of the rows are written (the disk: when it
fills), and waits for the last row (at most WAIT_S after the fault). Then it checks the CSV:
exactly one row per file, none missing, every row whole and naming the place its file is now,
nothing left in the inbox, nothing in done/ or failed/ without its row, and the accuracy
against the labels. It never fails on speed; it exits 1 if a file lost or doubled its row.

Stacks: ``watch`` is `mnistq watch` + 2 workers (``app.supervisor.worker_command``, one
torch thread each) on an embedded Redis with no persistence; ``run`` is `mnistq run --workers 2`.
Settings are the defaults (visibility timeout 30 s, a resend after two looks 5 s apart) but
one: messages of 64 files (MNISTQ_MESSAGE_SIZE; 256 by default), so that most of the burst
waits in the queue when the fault strikes, where a Redis restart loses it. With 256, two
workers (4 task threads each, prefetch 1) hold a burst of 2,000 in hand, and a Redis restart
loses no queued message (--message-size 256 shows it).

- ``baseline``: the burst under ``watch``, no fault (the comparison for the next five);
- ``worker-kill``: of the two workers, the one with the most messages in hand (its log's task
  lines) SIGKILLed (killing an idle one costs nothing); nothing restarts it here;
- ``producer-kill``: `mnistq watch` SIGKILLed and started again at once;
- ``redis-restart``: Redis SIGKILLed and started again on the same port, empty;
- ``redis-down``: Redis SIGKILLed, started again REDIS_DOWN_S later, empty;
- ``disk-full``: the CSV on a small tmpfs (256 KiB for 2,000 files) that fills mid-burst,
  grown to 16 MiB DISK_FULL_S after the producer says it paused (root only: skipped otherwise);
- ``run-baseline``: the burst under ``run``, no fault;
- ``run-redis-kill``: the embedded Redis SIGKILLed under `mnistq run` (its supervisor restarts
  it on the same port: the repair).

Columns: ``at row`` the rows written when the fault struck; ``held`` how long the fault lasted
(Redis away, disk full); ``fault->last`` from the fault to the last row; ``repair->last`` from
the repair (Redis back, disk grown, producer restarted) to the last row; ``no fault`` the
baseline's time from the same row to its last; ``cost`` = fault->last - no fault; ``resent``
the files the producer sent again because their messages were lost (its WARNING lines). Below
the table, per scenario: the other checks and the log lines a person would notice.

    python bench/faults.py                         # everything, 2,000 files (~3 minutes)
    python bench/faults.py --scenario worker-kill  # one (its baseline runs too)
"""

from __future__ import annotations

import argparse
import csv
import io
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from common import DATA, REPO, export_pngs, label_of, table
from common import rows as lines

from app.embedded import EmbeddedRedis, die_with_parent
from app.supervisor import worker_command
from mnistq.csvcell import unescaped

MNISTQ = [sys.executable, "-c", "import sys; from app.cli import main; sys.exit(main())"]
#: the longest wait for the last row after a fault (a scenario stays under ~2 minutes)
WAIT_S = 100.0
#: after the last row: time for a late duplicate to show
SETTLE_S = 3.0
POLL_S = 0.02
REDIS_DOWN_S = 10.0
DISK_FULL_S = 5.0
#: what a person would notice in the logs after the fault
NOTEWORTHY = re.compile(
    r"WARNING|ERROR|CRITICAL|Traceback|is back|resumed|starting it again|restarting|Error:", re.I
)
RESENT = re.compile(r"sending (\d+) files again")
_STAMP = re.compile(r"^\[?\d{4}-\d\d-\d\d[ T][\d:,.]+\]?\s*")


#: files per message (MNISTQ_MESSAGE_SIZE) for every stack; --message-size sets it
MESSAGE_SIZE = 64


def clean_env(**extra: str) -> dict[str, str]:
    """Ours without REDIS_URL and MNISTQ_*: the defaults, whatever the shell has set."""
    env = {k: v for k, v in os.environ.items() if k != "REDIS_URL" and not k.startswith("MNISTQ_")}
    return {**env, "MNISTQ_LOG_LEVEL": "INFO", "MNISTQ_MESSAGE_SIZE": str(MESSAGE_SIZE), **extra}


class Proc:
    """A child in a session of its own, dying with us, its output appended to a log file."""

    def __init__(self, name: str, cmd: list[str], log: Path, env: dict[str, str], cwd: Path) -> None:
        self.name, self.cmd, self.log, self.env, self.cwd = name, cmd, log, env, cwd
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> Proc:
        with open(self.log, "ab") as out:
            self.proc = subprocess.Popen(
                self.cmd,
                cwd=self.cwd,
                env=self.env,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                preexec_fn=die_with_parent,
            )
        return self

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def text(self, offset: int = 0) -> str:
        try:
            with open(self.log, "rb") as f:
                f.seek(offset)
                return f.read().decode(errors="replace")
        except FileNotFoundError:
            return ""

    def size(self) -> int:
        try:
            return self.log.stat().st_size
        except FileNotFoundError:
            return 0

    def signal(self, sig: int) -> None:
        if self.alive():
            assert self.proc is not None
            os.killpg(self.proc.pid, sig)

    def stop(self, timeout: float = 60) -> None:
        if self.proc is None:
            return
        self.signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.signal(signal.SIGKILL)
            self.proc.wait()


def wait_for(what: Callable[[], bool], timeout: float, why: str) -> None:
    deadline = time.monotonic() + timeout
    while not what():
        if time.monotonic() > deadline:
            raise RuntimeError(f"{why} after {timeout:.0f} s")
        time.sleep(0.05)


def distinct(csv_path: Path, names: set[str]) -> int:
    """Burst files with at least one row."""
    try:
        text = csv_path.read_bytes().decode("utf-8", "replace")
    except FileNotFoundError:
        return 0
    return len(
        {Path(r.get("path") or "").name for r in csv.DictReader(io.StringIO(text, newline=""))} & names
    )


# -- the stacks -----------------------------------------------------------------------------
class WatchStack:
    """`mnistq watch` + 2 workers on an embedded Redis (no persistence)."""

    kind = "watch"
    note = ""  # what the fault did, for the report

    def __init__(self, root: Path, csv_path: Path | None = None, workers: int = 2) -> None:
        self.root, self.inbox = root, root / "inbox"
        self.csv = csv_path or root / "results.csv"
        self.done, self.failed = root / "done", root / "failed"
        self.redis = EmbeddedRedis()
        env = clean_env(REDIS_URL=self.redis.url, MNISTQ_ALLOWED_ROOTS=str(root), MNISTQ_THREADS="1")
        self.workers = [
            Proc(f"w{i}", worker_command(f"w{i}@%h", "INFO"), root / f"w{i}.log", env, REPO)
            for i in range(1, workers + 1)
        ]
        cmd = [
            *MNISTQ, "watch", "--inbox", str(self.inbox), "--csv", str(self.csv),
            "--done-dir", str(self.done), "--failed-dir", str(self.failed),
        ]  # fmt: skip
        self.watch = Proc("watch", cmd, root / "watch.log", env, root)

    def procs(self) -> list[Proc]:
        return [self.watch, *self.workers]

    def start(self) -> None:
        for w in self.workers:
            w.start()
        self.start_watch()
        for w in self.workers:
            wait_for(lambda w=w: " ready." in w.text(), 90, f"worker {w.name} not ready")  # type: ignore[misc]

    def start_watch(self) -> None:
        offset = self.watch.size()
        self.watch.start()
        wait_for(lambda: "watching" in self.watch.text(offset), 60, "mnistq watch not watching")

    def stop(self) -> None:
        self.watch.stop()
        for w in self.workers:
            w.stop()
        self.redis.stop()

    def kill(self) -> None:
        for p in self.procs():
            p.signal(signal.SIGKILL)
        self.redis.kill()
        self.redis.stop()


class RunStack:
    """`mnistq run --workers 2`, its default inbox and CSV in ``root``."""

    kind = "run"
    note = ""

    def __init__(self, root: Path, workers: int = 2) -> None:
        self.root, self.inbox, self.csv = root, root / "inbox", root / "results.csv"
        self.done, self.failed = root / "done", root / "failed"
        self.run = Proc(
            "run", [*MNISTQ, "run", "--workers", str(workers)], root / "run.log", clean_env(), root
        )

    def procs(self) -> list[Proc]:
        return [self.run]

    def start(self) -> None:
        self.run.start()
        wait_for(lambda: self.inbox.exists() or not self.run.alive(), 60, "no inbox from mnistq run")

    def redis_pid(self) -> int | None:
        assert self.run.proc is not None
        for pid in filter(str.isdigit, os.listdir("/proc")):
            try:
                stat = Path(f"/proc/{pid}/stat").read_text()
                cmd = Path(f"/proc/{pid}/cmdline").read_bytes()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == self.run.proc.pid and b"redis-server" in cmd:
                return int(pid)
        return None

    def stop(self) -> None:
        self.run.stop(120)

    def kill(self) -> None:
        self.run.signal(signal.SIGKILL)


Stack = WatchStack | RunStack


# -- one scenario ---------------------------------------------------------------------------
@dataclass
class Step:
    after_s: float  # seconds after the trigger
    what: str  # "fault" or "repair"
    action: Callable[[], object]


@dataclass
class Fault:
    steps: list[Step]
    #: when to strike, given the rows so far (default: a quarter of the burst)
    trigger: Callable[[int], bool] | None = None
    #: whether something else has repaired it yet (a supervisor), asked after the fault
    repaired: Callable[[], bool] | None = None


@dataclass
class Outcome:
    name: str
    files: int
    rows: int = 0
    missing: int = 0
    dups: int = 0
    errors: int = 0
    correct: int = 0
    torn: bool = False
    leftover: int = 0  # files still in the inbox
    strays: int = 0  # files in done/ or failed/ that no row names
    unplaced: int = 0  # rows whose moved_to does not exist
    fault_row: int | None = None
    held_s: float | None = None
    fault_to_last: float | None = None
    repair_to_last: float | None = None
    burst_s: float | None = None
    trace: list[tuple[float, int]] = field(default_factory=list)  # (s since the first move, rows)
    seen: list[str] = field(default_factory=list)
    tracebacks: int = 0
    resent: int = 0  # files the producer sent again (lost messages)
    note: str = ""
    skipped: str = ""
    error: str = ""

    @property
    def sound(self) -> bool:
        """Every file exactly one whole row, in its place, nothing left over."""
        bad = self.missing or self.dups or self.torn or self.leftover or self.strays or self.unplaced
        return not (bad or self.error)

    def span_from(self, row: int) -> float | None:
        """This (fault-free) run's time from its ``row``-th row to its last."""
        if self.burst_s is None:
            return None
        t = next((t for t, n in self.trace if n >= row), None)
        return None if t is None else self.burst_s - t


def burst(name: str, stack: Stack, staged: dict[Path, int], fault: Fault | None) -> Outcome:
    """Warm up, move the burst in, strike, wait for the last row, check the CSV."""
    out = Outcome(name, len(staged))
    names = {p.name for p in staged}
    warm_file = stack.root / "warm" / "warm_0.png"
    os.rename(warm_file, stack.inbox / warm_file.name)
    wait_for(lambda: lines(stack.csv) >= 1, 120, "no row for the warm-up file")
    base = lines(stack.csv)

    steps = list(fault.steps) if fault else []
    trigger = (fault.trigger if fault and fault.trigger else None) or (lambda n: n >= len(staged) // 4)
    struck_at: float | None = None
    repaired_at: float | None = None
    offsets = {p.name: p.size() for p in stack.procs()}  # what the logs say from here on
    t0 = time.monotonic()
    for p in staged:
        os.rename(p, stack.inbox / p.name)
    last_n, deadline, done_at = -1, t0 + WAIT_S + 60, None
    while True:
        now = time.monotonic()
        n = lines(stack.csv) - base
        if n != last_n:
            last_n = n
            out.trace.append((now - t0, n))
        if fault and struck_at is None and n < len(staged) and trigger(n):
            struck_at, out.fault_row = now, n
            deadline = now + WAIT_S
        while steps and struck_at is not None and now >= struck_at + steps[0].after_s:
            step = steps.pop(0)
            step.action()
            if step.what == "repair":
                repaired_at = time.monotonic()
        if fault and fault.repaired and struck_at is not None and repaired_at is None and fault.repaired():
            repaired_at = now
        if n >= len(staged) and distinct(stack.csv, names) >= len(staged):
            done_at = now
            break
        if now > deadline:
            break
        time.sleep(POLL_S)
    if done_at is not None:
        out.burst_s = done_at - t0
        if struck_at is not None:
            out.fault_to_last = done_at - struck_at
        if repaired_at is not None:
            out.repair_to_last = done_at - repaired_at
    else:
        got = distinct(stack.csv, names)
        out.note = (
            f"{got} of {len(staged)} rows {time.monotonic() - (struck_at or t0):.0f} s after the fault; "
        )
    if struck_at is not None and repaired_at is not None:
        out.held_s = repaired_at - struck_at
    if fault and struck_at is None:
        out.note += "the fault never struck: the burst was over first (try more --files); "
    time.sleep(SETTLE_S)
    out.seen = noteworthy(stack, offsets)
    for proc in stack.procs():
        out.resent += sum(int(m) for m in RESENT.findall(proc.text(offsets[proc.name])))
    return out


def in_hand(worker: Proc) -> int:
    """Messages a worker has taken and not finished, from its INFO log (Celery's task lines)."""
    text = worker.text()
    return text.count("] received") - text.count("] succeeded in ") - text.count("] raised ")


def noteworthy(stack: Stack, offsets: dict[str, int]) -> list[str]:
    """The log lines a person would notice after the fault, each once (with a count)."""
    counts: Counter[str] = Counter()
    first: dict[str, str] = {}
    for p in stack.procs():
        for line in p.text(offsets.get(p.name, p.size())).splitlines():
            if not NOTEWORTHY.search(line):
                continue
            text = _STAMP.sub("", line.strip())[:220]
            key = p.name + ": " + re.sub(r"\d+", "#", text)
            counts[key] += 1
            first.setdefault(key, f"{p.name}: {text}")
    return [first[k] + (f"  (x{c})" if c > 1 else "") for k, c in counts.items()]


def check(out: Outcome, stack: Stack, staged: dict[Path, int]) -> None:
    """Exactly one whole row per file, each naming where its file is now; accuracy."""
    data = stack.csv.read_bytes() if stack.csv.exists() else b""
    out.torn = bool(data) and not data.endswith(b"\r\n")
    rows = list(csv.DictReader(io.StringIO(data.decode("utf-8", "replace"), newline="")))
    labels = {p.name: d for p, d in staged.items()}
    counts = Counter(Path(r["path"]).name for r in rows)
    out.rows = sum(counts[n] for n in labels)
    out.missing = sum(1 for n in labels if counts[n] == 0)
    out.dups = sum(counts[n] - 1 for n in labels if counts[n] > 1)
    seen: set[str] = set()
    places: set[str] = set()
    for r in rows:
        moved = unescaped(r.get("moved_to") or "")
        places.update(moved)
        if not any(os.path.lexists(m) for m in moved):
            out.unplaced += 1
        name = Path(r["path"]).name
        if name not in labels or name in seen:
            continue
        seen.add(name)
        out.errors += bool(r["error"])
        out.correct += r["digit"] == str(labels[name])
    out.leftover = sum(len([f for f in fs if not f.startswith(".")]) for _, _, fs in os.walk(stack.inbox))
    for folder in (stack.done, stack.failed):
        if folder.exists():
            out.strays += sum(1 for p in folder.iterdir() if str(p) not in places)
    out.tracebacks = sum(p.text().count("Traceback") for p in stack.procs())


# -- the scenarios --------------------------------------------------------------------------
class Bench:
    def __init__(self, tmp: Path, files: int, data_dir: Path) -> None:
        self.tmp = tmp
        self.cache = tmp / "mnist"
        exported = export_pngs(self.cache, files + 1, data_dir=data_dir)
        paths = sorted(exported)
        self.warm = paths[-1]
        self.files = {p: exported[p] for p in paths[:-1]}
        self.n = 0

    def folder(self, name: str) -> tuple[Path, dict[Path, int]]:
        """A fresh folder with the burst staged beside its inbox (same filesystem: moves)."""
        root = self.tmp / name
        staging, warm = root / "staging", root / "warm"
        staging.mkdir(parents=True)
        warm.mkdir()
        shutil.copy(self.warm, warm / "warm_0.png")
        staged = {}
        for p, label in self.files.items():
            shutil.copy(p, staging / p.name)
            staged[staging / p.name] = label
        assert label_of(next(iter(staged))) == next(iter(staged.values()))
        return root, staged

    def run(self, name: str) -> Outcome:
        root, staged = self.folder(name)
        if name == "disk-full":
            return self.disk_full(root, staged)
        stack: Stack = RunStack(root) if name.startswith("run-") else WatchStack(root)
        fault = self.fault_for(name, stack)
        return self.execute(name, stack, staged, fault)

    def execute(self, name: str, stack: Stack, staged: dict[Path, int], fault: Fault | None) -> Outcome:
        out = Outcome(name, len(staged))
        try:
            stack.start()
            out = burst(name, stack, staged, fault)
            alive = self.workers_alive(stack)
            stack.stop()
            check(out, stack, staged)
            out.note += stack.note + alive
        except Exception as e:  # one scenario's trouble is its row of the table, not the end
            out.error = f"{type(e).__name__}: {e}"
            out.seen = [line for p in stack.procs() for line in p.text().splitlines()[-5:]]
            stack.kill()
        return out

    @staticmethod
    def workers_alive(stack: Stack) -> str:
        if isinstance(stack, WatchStack):
            return (
                f"workers alive at the end: {sum(w.alive() for w in stack.workers)} of {len(stack.workers)}"
            )
        return "mnistq run alive at the end" if stack.run.alive() else "mnistq run had exited"

    def fault_for(self, name: str, stack: Stack) -> Fault | None:
        if isinstance(stack, RunStack):
            if name == "run-redis-kill":
                killed: list[int] = []

                def kill_embedded() -> None:
                    pid = stack.redis_pid()
                    if pid is None:
                        raise RuntimeError("no embedded redis-server under mnistq run")
                    os.kill(pid, signal.SIGKILL)
                    killed.append(pid)

                def restarted() -> bool:  # the supervisor started a new one
                    pid = stack.redis_pid()
                    return pid is not None and pid not in killed

                return Fault([Step(0, "fault", kill_embedded)], repaired=restarted)
            return None
        if name == "worker-kill":
            # The worker with the most messages in hand: killing an idle one costs nothing.
            def busiest() -> Proc | None:
                best = max(stack.workers, key=in_hand)
                return best if in_hand(best) > 0 else None

            def kill_busiest() -> None:
                w = busiest()
                assert w is not None
                stack.note = f"killed {w.name} with {in_hand(w)} message(s) in hand; "
                w.signal(signal.SIGKILL)

            return Fault(
                [Step(0, "fault", kill_busiest)],
                trigger=lambda n: n >= len(self.files) // 4 and busiest() is not None,
            )
        if name == "producer-kill":

            def kill_producer() -> None:
                stack.watch.signal(signal.SIGKILL)
                assert stack.watch.proc is not None
                stack.watch.proc.wait()

            return Fault([Step(0, "fault", kill_producer), Step(0, "repair", stack.watch.start)])
        if name == "redis-restart":
            return Fault([Step(0, "fault", stack.redis.kill), Step(0, "repair", stack.redis.start)])
        if name == "redis-down":
            return Fault(
                [Step(0, "fault", stack.redis.kill), Step(REDIS_DOWN_S, "repair", stack.redis.start)]
            )
        return None

    def disk_full(self, root: Path, staged: dict[Path, int]) -> Outcome:
        small = root / "small"
        small.mkdir()
        # ~200 bytes a row: a quarter to a half of the burst fits; tmpfs counts in 4 KiB pages
        size_k = max(16, round(256 * len(staged) / 2000 / 4) * 4)
        mount = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", f"size={size_k}k", "tmpfs", str(small)],
            capture_output=True,
            text=True,
        )
        if mount.returncode != 0:
            reason = mount.stderr.strip() or f"mount exited {mount.returncode}"
            return Outcome("disk-full", len(staged), skipped=f"cannot mount a tmpfs here: {reason}")
        try:
            stack = WatchStack(root, csv_path=small / "results.csv")

            def paused(_: int) -> bool:
                return "intake paused" in stack.watch.text()

            def grow() -> None:
                subprocess.run(["mount", "-o", "remount,size=16m", str(small)], check=True)

            fault = Fault([Step(0, "fault", lambda: None), Step(DISK_FULL_S, "repair", grow)], paused)
            out = self.execute("disk-full", stack, staged, fault)
            out.note = f"CSV on a {size_k} KiB tmpfs, grown to 16 MiB; " + out.note
            return out
        finally:
            subprocess.run(["umount", "-l", str(small)], check=False)


SCENARIOS = (
    "baseline",
    "worker-kill",
    "producer-kill",
    "redis-restart",
    "redis-down",
    "disk-full",
    "run-baseline",
    "run-redis-kill",
)


HEADER = [
    "scenario", "rows", "missing", "dup", "errors", "accuracy", "at row", "held s",
    "fault->last s", "repair->last s", "no fault s", "cost s", "resent",
]  # fmt: skip


def cpu() -> str:
    model = next(
        (
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        ),
        "unknown CPU",
    )
    bf16 = "avx512_bf16" in Path("/proc/cpuinfo").read_text()
    return f"{model}, {len(os.sched_getaffinity(0))} cores, avx512_bf16 {'yes' if bf16 else 'no'}"


def main() -> None:
    global MESSAGE_SIZE
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--files", type=int, default=2000, help="burst size (default: %(default)s)")
    p.add_argument(
        "--scenario",
        action="append",
        choices=SCENARIOS,
        help="run only this one (repeatable); its baseline runs too",
    )
    p.add_argument(
        "--message-size",
        type=int,
        default=MESSAGE_SIZE,
        help="files per message, MNISTQ_MESSAGE_SIZE (default: %(default)s)",
    )
    p.add_argument("--data-dir", type=Path, default=DATA, help="MNIST folder (default: %(default)s)")
    p.add_argument("--keep", action="store_true", help="keep the temporary folder (logs, CSVs)")
    args = p.parse_args()
    MESSAGE_SIZE = args.message_size
    chosen = args.scenario or list(SCENARIOS)
    wanted = set(chosen)
    for name in chosen:
        if name.startswith("run-") and name != "run-baseline":
            wanted.add("run-baseline")
        elif name not in ("baseline", "run-baseline"):
            wanted.add("baseline")
    order = [s for s in SCENARIOS if s in wanted]

    started = time.monotonic()
    tmp = Path(tempfile.mkdtemp(prefix="mnistq-faults-"))
    print(
        f"{cpu()}; load average {os.getloadavg()[0]:.2f}; {args.files} files, "
        f"messages of {MESSAGE_SIZE}; in {tmp}",
        flush=True,
    )
    outcomes: dict[str, Outcome] = {}
    try:
        bench = Bench(tmp, args.files, args.data_dir)
        for name in order:
            t = time.monotonic()
            out = bench.run(name)
            outcomes[name] = out
            status = (
                out.skipped
                or out.error
                or (
                    f"{out.rows} rows, last {out.fault_to_last or out.burst_s or 0:.1f} s after the "
                    f"{'fault' if out.fault_row is not None else 'first move'}"
                )
            )
            print(f"  {name}: {status} ({time.monotonic() - t:.0f} s)", flush=True)
    finally:
        if args.keep:
            print(f"kept {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)

    report: list[list[object]] = []
    for name, out in outcomes.items():
        if out.skipped:
            report.append([name, "skipped", *[""] * (len(HEADER) - 2)])
            continue
        base = outcomes.get("run-baseline" if name.startswith("run-") else "baseline")
        span = base.span_from(out.fault_row) if base and out.fault_row is not None else None
        cost = out.fault_to_last - span if out.fault_to_last is not None and span is not None else None
        report.append(
            [
                name,
                f"{out.rows}/{out.files}",
                out.missing,
                out.dups,
                out.errors,
                f"{out.correct / max(1, out.files):.2%}",
                "" if out.fault_row is None else out.fault_row,
                "" if out.held_s is None else out.held_s,
                "" if out.fault_to_last is None else out.fault_to_last,
                "" if out.repair_to_last is None else out.repair_to_last,
                "" if span is None else span,
                "" if cost is None else cost,
                out.resent,
            ]
        )
    print()
    print(table(report, HEADER))
    print()
    for name, out in outcomes.items():
        verdict = out.skipped or out.error or ("ok" if out.sound else "NOT SOUND: see the checks below")
        print(f"{name}: {verdict}")
        facts = []
        if not out.skipped:
            facts = [
                f"burst {out.burst_s:.1f} s" if out.burst_s is not None else "no last row",
                f"torn last row: {'yes' if out.torn else 'no'}",
                f"left in inbox {out.leftover}",
                f"in done/failed without a row {out.strays}",
                f"rows naming a missing place {out.unplaced}",
                f"tracebacks {out.tracebacks}",
            ]
        print("  " + "; ".join(f for f in [*facts, out.note.rstrip("; ")] if f))
        for line in out.seen[:10]:
            print(f"    {line}")
        if len(out.seen) > 10:
            print(f"    ... {len(out.seen) - 10} more kinds of line")
    print(f"\ntook {time.monotonic() - started:.0f} s; load average now {os.getloadavg()[0]:.2f}")
    if not all(o.sound for o in outcomes.values() if not o.skipped):
        sys.exit(1)


if __name__ == "__main__":
    main()

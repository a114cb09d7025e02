"""A person's mistakes and a dead broker at the producer's commands: one clear line, the exit code
from the table, no traceback, nothing created that was not asked for."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import fresh_db
from helpers import MNISTQ, free_port

from mnistq.protocol import ExitCode

pytestmark = pytest.mark.timeout(180)


def dead_url(password: str = "hunter2") -> str:
    """A Redis URL where nothing listens (with a password, which must never be shown)."""
    port = free_port()
    return f"redis://{':' + password + '@' if password else ''}127.0.0.1:{port}/0"


def environ(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MNISTQ_") and k != "REDIS_URL"}
    return {**env, **extra}


def mnistq(
    *args: str, cwd: Path, env: dict[str, str], timeout: float = 60
) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*MNISTQ, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


def tree(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*")}


def one_line(out: subprocess.CompletedProcess[str]) -> str:
    assert "Traceback" not in out.stderr + out.stdout, out.stderr
    assert out.stderr.count("\n") == 1, f"not one line:\n{out.stderr}"
    assert "usage:" not in out.stderr
    return out.stderr


MISTAKES = {
    "an inbox that is a file": (["watch", "--inbox", "README.md"], "is a file, not a folder"),
    "an inbox that cannot be created": (["watch", "--inbox", "/proc/nope"], "cannot create the inbox"),
    "an inbox whose folder is missing (a typo)": (
        ["watch", "--inbox", "no/such/inbox"],
        "the folder of the inbox no/such/inbox does not exist",
    ),
    "a CSV whose folder is missing": (
        ["watch", "--csv", "nonexistent/dir/results.csv"],
        "does not exist: create",
    ),
    "a CSV that is a folder": (["watch", "--csv", "."], "is a folder"),
    "a CSV where nothing can be written": (["watch", "--csv", "/proc/results.csv"], "cannot write in /proc"),
    "a done folder that is a file": (["watch", "--done-dir", "README.md"], "is a file, not a folder"),
    "a failed folder that is the inbox": (["watch", "--failed-dir", "inbox"], "is the inbox or holds it"),
    "a done folder that holds the inbox": (["watch", "--done-dir", "."], "is the inbox or holds it"),
    "an unknown option": (["watch", "--bogus"], "unrecognized arguments: --bogus"),
    "a review threshold that is not a probability": (
        ["watch", "--review-below", "90"],
        "argument --review-below: expected a number between 0 and 1",
    ),
    "a review folder that is a file": (["watch", "--done-dir", "x/done"], "the review folder"),
    "a results file that is a symbolic link": (["watch", "--csv", "link.csv"], "link.csv is a symbolic link"),
    "a done folder that is a symbolic link": (["watch", "--done-dir", "linked"], "linked is a symbolic link"),
    "a failed folder that is a symbolic link": (
        ["watch", "--failed-dir", "linked"],
        "linked is a symbolic link",
    ),
    "a review folder that is a symbolic link": (
        ["watch", "--done-dir", "y/done"],
        "y/review is a symbolic link",
    ),
    "classify into a CSV that is a symbolic link": (
        ["classify", "--csv", "link.csv", "x.png"],
        "link.csv is a symbolic link",
    ),
    "an option without its value": (["watch", "--inbox"], "expected one argument"),
    "classify without paths": (["classify"], "required: paths"),
    "classify with a bad timeout": (["classify", "--timeout", "soon", "x.png"], "invalid float value"),
    "classify with a timeout below 0": (["classify", "--timeout", "-1", "x.png"], "above 0"),
    "classify into a CSV whose folder is missing": (
        ["classify", "--csv", "nonexistent/r.csv", "x.png"],
        "does not exist: create",
    ),
}


@pytest.mark.parametrize("name", list(MISTAKES))
@pytest.mark.system
def test_each_mistake_is_one_line_and_creates_nothing(name: str, tmp_path: Path) -> None:
    args, expected = MISTAKES[name]
    (tmp_path / "README.md").write_text("not a folder\n")
    (tmp_path / "x").mkdir()
    (tmp_path / "x" / "review").write_text("a file where review/ would go\n")
    # links to a folder and a file outside: nothing is ever written through them
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "elsewhere" / "results.csv").write_text("")
    (tmp_path / "link.csv").symlink_to("elsewhere/results.csv")
    (tmp_path / "linked").symlink_to("elsewhere")
    (tmp_path / "y").mkdir()
    (tmp_path / "y" / "review").symlink_to("../elsewhere")
    before = tree(tmp_path)
    # a dead broker: every mistake is found before the broker is needed
    out = mnistq(*args, cwd=tmp_path, env=environ(REDIS_URL=dead_url()))
    assert out.returncode == ExitCode.CONFIG, out.stderr
    assert expected in one_line(out)
    assert out.stdout == ""
    assert tree(tmp_path) == before, "a mistake created files"
    assert not Path("/proc/nope").exists()


@pytest.mark.parametrize("command", ["watch", "classify"])
@pytest.mark.system
def test_help_needs_no_broker(command: str, tmp_path: Path) -> None:
    out = mnistq(command, "--help", cwd=tmp_path, env=environ())
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith(f"usage: mnistq {command}") and out.stderr == ""
    assert tree(tmp_path) == set()


@pytest.mark.system
def test_classify_with_a_dead_broker_fails_at_once(tmp_path: Path) -> None:
    url = dead_url()
    started = time.monotonic()
    out = mnistq("classify", str(tmp_path / "x.png"), cwd=tmp_path, env=environ(REDIS_URL=url))
    took = time.monotonic() - started
    assert out.returncode == ExitCode.CONFIG, out.stderr
    line = one_line(out)
    assert took < 5, f"took {took:.1f}s"
    assert url.replace("hunter2", "**") in line and "hunter2" not in line, line
    assert out.stdout == ""


# `watch` with its broker down: the `watch` case of test_worker_broker.py's dead-broker test.


def test_log_lines_go_above_the_progress_bar(capsys: pytest.CaptureFixture[str]) -> None:
    from tqdm import tqdm

    from app.watch import _logs_above

    handler = logging.StreamHandler(sys.stderr)  # what app/cli.py's basicConfig installs
    root = logging.getLogger()
    root.addHandler(handler)
    bar = tqdm(total=2, desc="results", disable=False, file=sys.stderr)
    try:
        bar.update(1)
        with _logs_above(bar):
            logging.getLogger("mnistq.producer").warning("LOGGED while the bar is up")
        bar.update(1)
    finally:
        bar.close()
        root.removeHandler(handler)
    err = capsys.readouterr().err
    # On a terminal a line is what lies between \r and \n: the record must start one.
    segments = [s for line in err.split("\n") for s in line.split("\r")]
    assert "LOGGED while the bar is up" in segments, repr(err)


def test_a_new_inbox_is_said_on_the_first_line(tmp_path: Path, redis_server: str) -> None:
    """A misspelt --inbox whose folder exists is created: the first line says so, so it is seen."""
    env = environ(REDIS_URL=fresh_db(redis_server))
    out = mnistq("watch", "--drain", "--inbox", "inbxo", cwd=tmp_path, env=env)
    assert out.returncode == ExitCode.OK, out.stderr
    assert out.stderr.splitlines()[0] == "created inbox inbxo (it did not exist)", out.stderr
    assert (tmp_path / "inbxo").is_dir()
    again = mnistq("watch", "--drain", "--inbox", "inbxo", cwd=tmp_path, env=env)  # there now: not said
    assert again.returncode == ExitCode.OK and "created inbox" not in again.stderr, again.stderr

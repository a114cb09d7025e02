"""`mnistq` itself: help without a broker, and what an unexpected failure looks like."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest
from helpers import mnistq_argv

from app.cli import COMMANDS
from mnistq.protocol import ExitCode

pytestmark = [pytest.mark.system, pytest.mark.timeout(120)]
#: Nothing listens there: a command that tried to reach it would fail or hang.
DEAD_URL = "redis://:secret@127.0.0.1:9/0"


def mnistq(cwd: Path, *args: str, code: str = "", **env: str) -> subprocess.CompletedProcess[str]:
    base = {k: v for k, v in os.environ.items() if k != "REDIS_URL" and not k.startswith("MNISTQ_")}
    argv = [*mnistq_argv(code), *args]
    return subprocess.run(argv, cwd=cwd, env={**base, **env}, capture_output=True, text=True, timeout=90)


@pytest.mark.parametrize("args", [[], ["--help"], ["-h"], ["help"]])
def test_mnistq_alone_or_help_lists_the_commands(tmp_path: Path, args: list[str]) -> None:
    out = mnistq(tmp_path, *args)
    assert out.returncode == 0 and out.stderr == ""
    assert all(name in out.stdout for name in COMMANDS)


@pytest.mark.parametrize("command", list(COMMANDS))
def test_each_commands_help_needs_no_broker(tmp_path: Path, command: str) -> None:
    out = mnistq(tmp_path, command, "--help")
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith(f"usage: mnistq {command}") or (
        command == "worker" and "Usage:" in out.stdout  # Celery's own help
    ), out.stdout
    assert "Traceback" not in out.stderr
    assert os.listdir(tmp_path) == []  # help creates nothing


@pytest.mark.parametrize("command", ["classify", "predict"])
def test_classify_and_predicts_help_give_the_exit_code_of_a_failed_file(tmp_path: Path, command: str) -> None:
    out = mnistq(tmp_path, command, "--help")
    assert out.returncode == 0, out.stderr
    text = " ".join(out.stdout.split())  # argparse wraps the epilog
    assert f"{int(ExitCode.FAILED_INPUT)} a file got an error" in text and "1 unexpected (a bug)" in text


@pytest.mark.parametrize("command", ["run", "watch", "classify", "worker", "status"])
def test_help_with_a_dead_broker_is_still_help(tmp_path: Path, command: str) -> None:
    out = mnistq(tmp_path, command, "-h", REDIS_URL=DEAD_URL)
    assert out.returncode == 0, out.stderr
    assert "usage" in out.stdout.lower() and "Traceback" not in out.stderr


def test_an_unknown_command_is_exit_2(tmp_path: Path) -> None:
    out = mnistq(tmp_path, "frobnicate")
    assert out.returncode == 2 and "unknown command 'frobnicate'" in out.stderr


BOOM = "c.COMMANDS['boom'] = (lambda argv: 1 / 0, 'fails')"


def test_an_unexpected_error_is_one_line_and_exit_1(tmp_path: Path) -> None:
    out = mnistq(tmp_path, "boom", code=BOOM)
    assert out.returncode == ExitCode.UNEXPECTED
    assert out.stderr == (
        "mnistq boom: unexpected error: ZeroDivisionError: division by zero "
        "(run with MNISTQ_LOG_LEVEL=DEBUG for details)\n"
    )


def test_the_traceback_is_shown_at_debug(tmp_path: Path) -> None:
    out = mnistq(tmp_path, "boom", code=BOOM, MNISTQ_LOG_LEVEL="DEBUG")
    assert out.returncode == ExitCode.UNEXPECTED
    assert "Traceback" in out.stderr and "in <lambda>" in out.stderr
    assert out.stderr.endswith("mnistq boom: unexpected error: ZeroDivisionError: division by zero\n")


def test_a_multi_line_message_stays_one_line(tmp_path: Path) -> None:
    code = "c.COMMANDS['boom'] = (lambda argv: (_ for _ in ()).throw(OSError('first\\nsecond')), '')"
    out = mnistq(tmp_path, "boom", code=code)
    assert out.returncode == ExitCode.UNEXPECTED
    assert out.stderr.count("\n") == 1 and "OSError: first (run with" in out.stderr


def test_ctrl_c_is_130_without_a_traceback(tmp_path: Path) -> None:
    code = "c.COMMANDS['boom'] = (lambda argv: (_ for _ in ()).throw(KeyboardInterrupt()), '')"
    out = mnistq(tmp_path, "boom", code=code)
    assert out.returncode == ExitCode.INTERRUPTED
    assert "Traceback" not in out.stderr and "error" not in out.stderr


def test_a_bad_variable_is_one_line_before_anything_starts(tmp_path: Path) -> None:
    out = mnistq(tmp_path, "status", MNISTQ_THREADS="lots")
    assert out.returncode == ExitCode.CONFIG
    assert out.stderr == "mnistq status: error: MNISTQ_THREADS: 'lots' is not a valid value\n"

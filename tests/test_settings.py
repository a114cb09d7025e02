"""The one settings object: defaults, bad values, aliases, copies, roots, and the run's state file."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from app.runstate import remove_run_state, write_run_state
from mnistq.errors import ConfigError
from mnistq.protocol import ExitCode
from mnistq.settings import (
    DEFAULT_MODEL,
    RUN_STATE_NAME,
    Settings,
    read_run_state,
    run_state_path,
)


@pytest.fixture(autouse=True)
def _elsewhere(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A folder of its own: relative defaults and state files land here, not in the checkout."""
    monkeypatch.chdir(tmp_path)


def test_defaults_from_an_empty_environment() -> None:
    s = Settings.from_env({})
    assert s == Settings()
    assert s.redis_url is None and s.broker_url is None
    assert s.model == DEFAULT_MODEL and s.inbox == Path("inbox") and s.csv == Path("results.csv")
    assert (s.message_size, s.forward_batch, s.concurrency, s.pool) == (256, 256, 4, "threads")


def test_empty_values_keep_the_defaults() -> None:
    assert Settings.from_env({"MNISTQ_THREADS": "", "REDIS_URL": "", "MNISTQ_DEVICE": ""}) == Settings()


def test_values_are_parsed_by_type(tmp_path: Path) -> None:
    s = Settings.from_env(
        {
            "REDIS_URL": "redis://h:1/2",
            "MNISTQ_THREADS": "3",
            "MNISTQ_COALESCE_WAIT_MS": "2.5",
            "MNISTQ_INBOX": "~/in",
            "MNISTQ_ALLOWED_ROOTS": os.pathsep.join(["a", "", str(tmp_path / "b")]),
            "MNISTQ_DEVICE": "cpu",
        }
    )
    assert (s.redis_url, s.threads, s.coalesce_wait_ms, s.device) == ("redis://h:1/2", 3, 2.5, "cpu")
    assert s.inbox == Path.home() / "in"
    assert s.allowed_roots == (tmp_path / "a", tmp_path / "b")  # resolved, empty parts skipped


@pytest.mark.parametrize(
    ("variable", "value"),
    [
        ("MNISTQ_THREADS", "two"),  # not a number
        ("MNISTQ_COALESCE_WAIT_MS", "soon"),
        ("MNISTQ_MESSAGE_SIZE", "0"),  # below its minimum
        ("MNISTQ_CONCURRENCY", "-3"),
        ("MNISTQ_MAX_PIXELS", "0"),
        ("MNISTQ_THREADS", "-1"),
        ("MNISTQ_RESEND_AFTER_S", "-0.5"),
        ("MNISTQ_VISIBILITY_TIMEOUT", "-1"),
        ("MNISTQ_DEVICE", "tpu"),  # not one of the choices
        ("MNISTQ_PRECISION", "fp16"),
        ("MNISTQ_POOL", "gevent"),
        ("MNISTQ_LOG_LEVEL", "LOUD"),
        ("MNISTQ_BATCH_SIZE", "many"),  # an alias names itself
        ("MNISTQ_REVIEW_BELOW", "1.5"),  # a probability: 0 < P < 1
        ("MNISTQ_REVIEW_BELOW", "0"),
        ("MNISTQ_REVIEW_BELOW", "sometimes"),
        ("MNISTQ_COALESCE_WAIT_MS", "inf"),  # a wait that overflows: the batcher died, work hung
        ("MNISTQ_COALESCE_WAIT_MS", "nan"),
        ("MNISTQ_COALESCE_WAIT_MS", "1e12"),
        ("MNISTQ_RESEND_AFTER_S", "nan"),  # every comparison false: never resent
        ("MNISTQ_STATS_INTERVAL", "-5"),
        ("MNISTQ_STATS_INTERVAL", "0"),
        ("MNISTQ_SETTLE_S", "-1"),
        ("REDIS_URL", "http://localhost:6379"),  # redis-py reads it: a bug's "unexpected error" before
        ("REDIS_URL", "amqp://guest@localhost//"),  # that one is MNISTQ_BROKER_URL's
    ],
)
def test_a_bad_value_is_a_config_error_naming_its_variable(variable: str, value: str) -> None:
    with pytest.raises(ConfigError, match=variable) as caught:
        Settings.from_env({variable: value})
    assert caught.value.exit_code == ExitCode.CONFIG
    assert "\n" not in str(caught.value)


@pytest.mark.parametrize(
    ("raw", "value"),
    [("0.9", 0.9), (" 0.25 ", 0.25), ("auto", "auto"), ("Recommended", "auto"), ("off", None), ("", None)],
)
def test_the_review_threshold_is_off_a_number_or_the_models_own(raw: str, value: object) -> None:
    assert Settings.from_env({"MNISTQ_REVIEW_BELOW": raw}).review_below == value


def test_a_bad_review_threshold_says_what_would_do() -> None:
    with pytest.raises(ConfigError) as caught:
        Settings.from_env({"MNISTQ_REVIEW_BELOW": "95%"})
    assert str(caught.value) == (
        "MNISTQ_REVIEW_BELOW: '95%' is not a valid value (expected a number between 0 and 1, such as "
        "0.9, auto for the model's recommended threshold, or off)"
    )
    with pytest.raises(ConfigError, match="MNISTQ_REVIEW_BELOW"):
        Settings().with_(review_below=1.0)


def test_the_log_level_is_case_blind() -> None:
    assert Settings.from_env({"MNISTQ_LOG_LEVEL": "debug"}).log_level == "debug"


def test_an_alias_sets_every_field_it_stands_for_and_the_own_name_wins() -> None:
    s = Settings.from_env({"MNISTQ_BATCH_SIZE": "32", "MNISTQ_BATCH_WAIT_MS": "1"})
    assert (s.message_size, s.forward_batch, s.coalesce_wait_ms) == (32, 32, 1.0)
    s = Settings.from_env({"MNISTQ_BATCH_SIZE": "32", "MNISTQ_MESSAGE_SIZE": "8"})
    assert (s.message_size, s.forward_batch) == (8, 32)


def test_with_changes_a_copy_and_validates_it() -> None:
    base = Settings.from_env({})
    changed = base.with_(concurrency=2, inbox=Path("elsewhere"))
    assert (changed.concurrency, changed.inbox) == (2, Path("elsewhere"))
    assert (base.concurrency, base.inbox) == (4, Path("inbox"))  # frozen: the original stays
    with pytest.raises(ConfigError, match="MNISTQ_CONCURRENCY must be >= 1"):
        base.with_(concurrency=0)
    with pytest.raises(ConfigError, match="MNISTQ_POOL"):
        base.with_(pool="solo")


def test_roots_are_the_allowed_roots_else_the_inbox(tmp_path: Path) -> None:
    assert Settings().roots() == (tmp_path / "inbox",)
    assert Settings(inbox=Path("in")).roots() == (tmp_path / "in",)
    roots = (tmp_path / "a", tmp_path / "b")
    assert Settings(allowed_roots=roots).roots() == roots
    assert Settings.variable("allowed_roots") == "MNISTQ_ALLOWED_ROOTS"


def test_require_redis_says_what_to_do() -> None:
    assert Settings(redis_url="redis://h/0").require_redis() == "redis://h/0"
    with pytest.raises(ConfigError, match="REDIS_URL is not set") as caught:
        Settings().require_redis()
    assert "mnistq run" in str(caught.value) and RUN_STATE_NAME in str(caught.value)


# -- the state file of a running `mnistq run` -------------------------------------------------
def _dead_pid() -> int:
    """A pid that no process has now, as a run's that has exited."""
    pid_max = int(Path("/proc/sys/kernel/pid_max").read_text())
    return next(p for p in range(pid_max - 1, 1, -1) if not Path(f"/proc/{p}").exists())


def test_a_live_runs_url_is_found_beside_the_csv(tmp_path: Path) -> None:
    path = write_run_state(Path("results.csv"), "redis://127.0.0.1:1234/0")
    assert path == tmp_path / RUN_STATE_NAME == run_state_path(Path("results.csv"))
    assert Settings.from_env({}).redis_url == "redis://127.0.0.1:1234/0"
    # REDIS_URL wins; a new `mnistq run` asks not to look; another CSV folder has no run.
    assert Settings.from_env({"REDIS_URL": "redis://other/0"}).redis_url == "redis://other/0"
    assert Settings.from_env({}, run_state=False).redis_url is None
    (tmp_path / "sub").mkdir()
    assert Settings.from_env({"MNISTQ_CSV": "sub/r.csv"}).redis_url is None
    remove_run_state(path)
    assert not path.exists() and Settings.from_env({}).redis_url is None


def test_the_state_file_follows_the_csvs_folder(tmp_path: Path) -> None:
    (tmp_path / "out").mkdir()
    write_run_state(Path("out/r.csv"), "redis://127.0.0.1:1/0")
    assert (tmp_path / "out" / RUN_STATE_NAME).exists()
    assert (
        Settings.from_env({"MNISTQ_CSV": str(tmp_path / "out" / "other.csv")}).redis_url
        == "redis://127.0.0.1:1/0"
    )
    assert Settings.from_env({}).redis_url is None


@pytest.mark.parametrize(
    "state",
    [
        {"url": "redis://127.0.0.1:1/0", "pid": "dead"},  # replaced by a dead pid below
        {"url": "redis://127.0.0.1:1/0", "pid": os.getpid(), "started": -1},  # a recycled pid
        {"url": "", "pid": os.getpid()},
        {"pid": os.getpid()},
        ["not", "a", "dict"],
        '{"url": "redis://127.0.0.1:1/0", "pid": ',  # torn
    ],
)
def test_a_stale_or_broken_state_file_is_ignored(tmp_path: Path, state: object) -> None:
    if isinstance(state, dict) and state.get("pid") == "dead":
        state["pid"] = _dead_pid()
    text = state if isinstance(state, str) else json.dumps(state)
    (tmp_path / RUN_STATE_NAME).write_text(text)
    assert read_run_state(Path("results.csv")) is None
    assert Settings.from_env({}).redis_url is None


def test_a_new_run_replaces_a_stale_file_and_removes_only_its_own(tmp_path: Path) -> None:
    path = tmp_path / RUN_STATE_NAME
    path.write_text(json.dumps({"url": "redis://127.0.0.1:1/0", "pid": _dead_pid()}))
    assert write_run_state(Path("results.csv"), "redis://127.0.0.1:2/0") == path
    assert read_run_state(Path("results.csv")) == "redis://127.0.0.1:2/0"
    assert [p.name for p in tmp_path.iterdir()] == [RUN_STATE_NAME]  # no temporary file left
    # A later run's file is not ours to remove.
    path.write_text(json.dumps({"url": "redis://127.0.0.1:3/0", "pid": os.getppid()}))
    remove_run_state(path)
    assert path.exists()


def test_a_state_file_that_cannot_be_written_is_a_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    assert write_run_state(tmp_path / "missing" / "results.csv", "redis://127.0.0.1:1/0") is None
    assert "REDIS_URL=redis://127.0.0.1:1/0" in caplog.text

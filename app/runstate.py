"""Writing the run state: where a running `mnistq run` records its embedded Redis, so that
commands started beside its CSV find it (reading it is the core's: mnistq/settings.py
``read_run_state``, which ``Settings.from_env`` uses)."""

from __future__ import annotations

import json
import logging
import os
import tempfile
from pathlib import Path

from mnistq.settings import RUN_STATE_NAME, process_started, run_state_path

log = logging.getLogger("mnistq.settings")


def write_run_state(csv: Path, url: str) -> Path | None:
    """Record ``url`` for this process beside ``csv`` (atomically); the path, None if it failed."""
    path = run_state_path(csv)
    state = {"url": url, "pid": os.getpid(), "started": process_started(os.getpid())}
    try:
        # A reader sees the old file or the new one, never half of one.
        fd, tmp = tempfile.mkstemp(prefix=RUN_STATE_NAME, dir=path.parent)
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                json.dump(state, f)
            os.chmod(tmp, 0o644)  # mkstemp's 0600 would hide it from other users' `mnistq status`
            os.replace(tmp, path)
        except BaseException:
            os.unlink(tmp)
            raise
    except OSError as e:  # only the finding of this run is lost: the run itself goes on
        log.warning(
            "could not record this run's Redis in %s (%s); set REDIS_URL=%s to reach it", path, e, url
        )
        return None
    return path


def remove_run_state(path: Path) -> None:
    """Remove a state file this process wrote (not one a later run has put in its place)."""
    try:
        if json.loads(path.read_text(encoding="utf-8")).get("pid") == os.getpid():
            path.unlink()
    except (OSError, ValueError, AttributeError):
        pass

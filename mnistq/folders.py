"""The folders of one inbox pipeline, and the rule that places them (in one place).

done/ and failed/ sit beside the results CSV unless given (--done-dir, --failed-dir); review/
sits beside done/. The watcher skips all three when they are inside the inbox, the finisher
moves files into them, the lock checks them, and `mnistq run` counts the files left outside
them.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

#: the folder names used when none is given
DONE, REVIEW, FAILED = "done", "review", "failed"


def review_dir_for(done_dir: Path) -> Path:
    """Where files sent to review go: review/ beside done/."""
    return done_dir.parent / REVIEW


@dataclass(frozen=True)
class Folders:
    inbox: Path
    csv: Path
    done: Path
    review: Path
    failed: Path

    @classmethod
    def of(cls, inbox: Path, csv: Path, done: Path | None = None, failed: Path | None = None) -> Folders:
        """The rule: a folder not given goes beside the CSV (its real folder); review/ beside
        done/. Given folders are kept as given (messages name them so)."""
        base = csv.expanduser().resolve().parent
        done = base / DONE if done is None else done
        failed = base / FAILED if failed is None else failed
        return cls(inbox=inbox, csv=csv, done=done, review=review_dir_for(done), failed=failed)

    def resolved(self) -> Folders:
        """Each folder as an absolute path with links resolved (review/ beside the real done/)."""
        done = self.done.expanduser().resolve()
        return Folders(
            inbox=self.inbox.expanduser().resolve(),
            csv=self.csv.expanduser().resolve(),
            done=done,
            review=review_dir_for(done),
            failed=self.failed.expanduser().resolve(),
        )

    @property
    def outputs(self) -> tuple[Path, Path, Path]:
        """done, review and failed: where finished files go (never new work, even inside the inbox)."""
        return (self.done, self.review, self.failed)

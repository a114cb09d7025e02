"""The inbox pipeline's options: built from Settings (``WatchOptions.from_settings``), their
defaults the settings' own and mnistq/tuning.py's."""

from __future__ import annotations

from dataclasses import dataclass

from mnistq.folders import Folders
from mnistq.settings import Settings
from mnistq.tuning import GRACE_S, HOLD, MAX_IN_FLIGHT, RESCAN_S, RETRY_S

#: the settings' defaults, for options built without Settings (WatchOptions.from_settings)
_DEFAULTS = Settings()


@dataclass
class WatchOptions:
    """How the inbox pipeline runs: its folders, and the bounds and timings of the watcher, the
    dispatcher and the finisher (one object, not loose arguments)."""

    folders: Folders
    polling: bool = False
    keep: bool = False
    drain: bool = False  # process what is in the inbox, then return
    message_size: int = _DEFAULTS.message_size
    max_inflight: int = MAX_IN_FLIGHT
    hold: int = HOLD
    settle_s: float = _DEFAULTS.settle_s
    rescan_s: float = RESCAN_S
    #: where the broker cannot be listed, unanswered work is sent again after this long
    #: (settings.resend_after_s); on Redis, lost work is found by looking (mnistq/evidence.py)
    resend_s: float = _DEFAULTS.resend_after_s
    grace_s: float = GRACE_S
    retry_s: float = RETRY_S  # between tries while the disk refuses the rows

    @classmethod
    def from_settings(
        cls,
        settings: Settings,
        folders: Folders,
        *,
        polling: bool = False,
        keep: bool = False,
        drain: bool = False,
    ) -> WatchOptions:
        """The options that the settings set (message size, resend, settle); the rest default."""
        return cls(
            folders=folders,
            polling=polling,
            keep=keep,
            drain=drain,
            message_size=settings.message_size,
            resend_s=settings.resend_after_s,
            settle_s=settings.settle_s,
        )

"""One root exception, so callers can catch everything the project raises on purpose."""

from __future__ import annotations

from mnistq.protocol import ErrorKind, ExitCode


class MnistqError(Exception):
    """Root of every error mnist-queue raises deliberately; ``exit_code`` is what a CLI returns."""

    exit_code: ExitCode = ExitCode.UNEXPECTED


class ImageError(MnistqError):
    """An input could not be read as a digit image (the message says why, ``kind`` classifies it)."""

    def __init__(self, message: str, kind: ErrorKind = ErrorKind.UNREADABLE) -> None:
        super().__init__(message)
        self.kind = kind


class ModelError(MnistqError):
    """A checkpoint is missing, unreadable or not ours."""

    exit_code = ExitCode.MODEL


class ConfigError(MnistqError):
    """A setting is missing or invalid, or a broker or lock stands in the way."""

    exit_code = ExitCode.CONFIG

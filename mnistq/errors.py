"""One root exception, so callers can catch everything the project raises on purpose."""


class MnistqError(Exception):
    """Root of every error mnist-queue raises deliberately."""


class ImageError(MnistqError):
    """An input could not be read as a digit image (the message says why)."""


class ModelError(MnistqError):
    """A checkpoint is missing, unreadable or not ours."""


class ConfigError(MnistqError):
    """A setting is missing or invalid."""

"""mnist-queue: shared pieces (settings, errors, CLI). Never imports torch."""

from mnistq.errors import MnistqError

__all__ = ["MnistqError"]

"""The producer side: inbox watcher, results CSV and the Python API. Never imports torch."""

from producer.client import Client, Job, Result, ResultTimeout

__all__ = ["Client", "Job", "Result", "ResultTimeout"]

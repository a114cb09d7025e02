"""The producer side: inbox watcher, results CSV and the Python API. Never imports torch.

``Result`` is the protocol's result record (:class:`mnistq.protocol.Result`), re-exported here.
"""

from mnistq.protocol import ErrorKind, Result
from producer.client import Client, Job, ResultTimeout

__all__ = ["Client", "ErrorKind", "Job", "Result", "ResultTimeout"]

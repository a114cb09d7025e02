"""The producer side: inbox watcher, results CSV and the Python API. Never imports torch.

``Result`` is the protocol's result record (:class:`mnistq.protocol.Result`), re-exported here.
"""

from mnistq.protocol import ErrorKind, Result
from producer.broker import BrokerUnavailable
from producer.client import Client, Job, ResultTimeout
from producer.job import NoWorker

__all__ = ["BrokerUnavailable", "Client", "ErrorKind", "Job", "NoWorker", "Result", "ResultTimeout"]

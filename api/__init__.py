"""The Python API: ``Client`` sends image paths through the queue and ``Job`` holds their results.
Never imports torch.

``Result`` is the protocol's result record (:class:`mnistq.protocol.Result`), re-exported here.
"""

from api.client import Client
from api.job import Job, NoWorker, ResultTimeout
from mnistq.broker import BrokerUnavailable
from mnistq.protocol import ErrorKind, Result

__all__ = ["BrokerUnavailable", "Client", "ErrorKind", "Job", "NoWorker", "Result", "ResultTimeout"]

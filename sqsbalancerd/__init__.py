"""sqsbalancerd: consume many SQS queues across several instances through your handler."""

from sqsbalancerd.errors import Retry
from sqsbalancerd.handler import BatchResult, batch
from sqsbalancerd.message import Message

__version__ = "0.1.0"

__all__ = ["BatchResult", "Message", "Retry", "__version__", "batch"]

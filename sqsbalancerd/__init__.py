"""sqsbalancerd: consume many SQS queues across several instances through your handler."""

from sqsbalancerd.engine.context import HandlerContext, handler_context
from sqsbalancerd.errors import Retry
from sqsbalancerd.handler import BatchResult, batch
from sqsbalancerd.message import BinaryAttribute, Message, TextAttribute

__version__ = "0.1.0"

__all__ = [
    "BatchResult",
    "BinaryAttribute",
    "HandlerContext",
    "Message",
    "Retry",
    "TextAttribute",
    "__version__",
    "batch",
    "handler_context",
]

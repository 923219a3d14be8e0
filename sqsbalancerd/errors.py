"""Exceptions raised by sqsbalancerd.

    SqsBalancerError
    ├── ConfigError            invalid configuration (file, env or flag); names the key
    ├── HandlerImportError     a "module:function" path that does not resolve
    ├── AwsUnavailableError    AWS could not be reached after bounded retries
    ├── QueueNotFoundError     a configured queue does not exist
    └── CoordinationError      the coordination table misbehaves
        ├── TableMissingError          missing with create_table = false
        ├── DuplicateInstanceError     a live instance already uses this instance_id
        └── IncompatibleProtocolError  a record written by an incompatible version

Exit codes are chosen in cli.py only; this module knows nothing about them.
"""

from __future__ import annotations


class SqsBalancerError(Exception):
    """Base of every error sqsbalancerd raises on purpose."""


class ConfigError(SqsBalancerError):
    """The configuration is invalid; the message names the key and the source."""


class HandlerImportError(SqsBalancerError):
    """A handler path ("module:function") could not be resolved."""


class AwsUnavailableError(SqsBalancerError):
    """AWS did not answer after the bounded retries."""


class QueueNotFoundError(SqsBalancerError):
    """A queue named in the configuration does not exist."""


class CoordinationError(SqsBalancerError):
    """The coordination table could not be used."""


class TableMissingError(CoordinationError):
    """The coordination table is missing and create_table is false."""


class DuplicateInstanceError(CoordinationError):
    """Another live instance already uses this instance_id."""


class IncompatibleProtocolError(CoordinationError):
    """The table holds records written by an incompatible protocol version."""


class Retry(Exception):
    """Raised by a handler to have its message delivered again after `after` seconds."""

    def __init__(self, after: float = 0.0, reason: str = "") -> None:
        super().__init__(reason or f"retry after {after}s")
        self.after = max(0.0, float(after))

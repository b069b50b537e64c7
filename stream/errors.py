"""The stream runtime's errors: three kinds of failure, three paths (docs/architecture.md, Conventions)."""

from __future__ import annotations


class StreamError(Exception):
    """Base of the runtime's errors."""


class TransientError(StreamError):
    """A dependency is unavailable (clamd, Cassandra, MinIO, the registry): back off, then retry topic."""


class InvalidRecord(StreamError):
    """The record can never be processed: DLQ at once, and a REJECTED result.

    ``code`` is the stable error code reported to the client (e.g. UNSUPPORTED_FORMAT).
    """

    def __init__(self, code: str, message: str):
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message


class DeliveryError(StreamError):
    """Outputs could not be made durable; the batch is not committed and will be redelivered."""

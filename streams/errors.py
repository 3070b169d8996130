"""Errors raised by ``streams``. Each names the offending value and what to do."""

from __future__ import annotations


class StreamError(Exception):
    """Base class of every error raised by ``streams``."""


class BackpressureError(StreamError):
    """A bounded queue stayed full: its consumer is not draining it."""

    def __init__(self, maxsize: int, timeout: float) -> None:
        self.maxsize = maxsize
        self.timeout = timeout
        super().__init__(
            f"document queue full ({maxsize=}) for {timeout=} s: the consumer is not draining it; "
            "drain the source (iterate it or call drain()) or raise maxsize"
        )


class DocumentError(StreamError):
    """A document failed validation against event-model's schema or its run's state."""

    def __init__(self, name: str, uid: str | None, reason: str) -> None:
        self.name = name
        self.uid = uid
        self.reason = reason
        super().__init__(f"invalid {name!r} document (uid={uid!r}): {reason}")


class StoreError(StreamError):
    """A zarr store is missing, of the wrong kind, or inconsistent."""

"""The seams of ``streams``: where documents come from and where they go.

A document is event-model's ``(name, doc)`` pair; nothing here invents its own shape.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any, Protocol, runtime_checkable


@runtime_checkable
class DocumentSource(Protocol):
    """Yields ``(name, doc)`` pairs in the order they were produced."""

    def __iter__(self) -> Iterator[tuple[str, dict[str, Any]]]: ...

    def close(self) -> None: ...


@runtime_checkable
class DocumentSink(Protocol):
    """Receives ``(name, doc)`` pairs; a RunEngine callback has this shape too."""

    def __call__(self, name: str, doc: dict[str, Any]) -> None: ...

    def close(self) -> None: ...

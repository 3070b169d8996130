"""Everything that moves event-model documents: sources, sinks, routing, stores.

``streams`` knows documents, not ML: it never imports ``models`` or ``agents``.
"""

from streams.errors import BackpressureError, DocumentError, StoreError, StreamError
from streams.protocols import DocumentSink, DocumentSource

__all__ = [
    "BackpressureError",
    "DocumentError",
    "DocumentSink",
    "DocumentSource",
    "StoreError",
    "StreamError",
]

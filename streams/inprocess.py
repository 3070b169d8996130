"""The embedded document source: a RunEngine subscription feeding a bounded queue.

A ``RunEngineSource`` is subscribed to a RunEngine in the same process. The RunEngine calls it
with every ``(name, doc)`` pair; the pairs wait, in order, in a bounded queue until a consumer
takes them, by iterating the source (blocking) or by calling :meth:`RunEngineSource.drain`
(non-blocking). A consumer that falls behind slows the experiment down (back-pressure) for at
most ``put_timeout`` seconds; after that the RunEngine's callback raises
:class:`~streams.errors.BackpressureError`, which aborts the plan loudly rather than dropping
documents.
"""

from __future__ import annotations

import math
import queue
import threading
from collections.abc import Iterator
from typing import Any

from streams.errors import BackpressureError, StreamError

__all__ = ["RunEngineSource"]

# How often a waiting iterator wakes up to notice close().
_POLL_S = 0.05


class RunEngineSource:
    """A :class:`~streams.protocols.DocumentSource` fed by a RunEngine subscription.

    Parameters
    ----------
    maxsize : int
        How many documents may wait in the queue; must be > 0.
    put_timeout : float
        Seconds the producer (the RunEngine) waits on a full queue before
        :class:`~streams.errors.BackpressureError` is raised; must be >= 0 and finite.

    Notes
    -----
    Documents are queued by reference, not copied: the RunEngine does not mutate a document
    after it has emitted it, and consumers must not mutate them either (copy first).

    Examples
    --------
    >>> source = RunEngineSource(maxsize=8)
    >>> source("start", {"uid": "abc", "time": 0.0})
    >>> source.drain()
    [('start', {'uid': 'abc', 'time': 0.0})]
    """

    def __init__(self, maxsize: int = 1024, *, put_timeout: float = 10.0) -> None:
        if isinstance(maxsize, bool) or not isinstance(maxsize, int) or maxsize <= 0:
            raise ValueError(f"{maxsize=} must be an integer > 0 (the queue must be bounded)")
        if not (isinstance(put_timeout, int | float) and math.isfinite(put_timeout)) or (
            put_timeout < 0
        ):
            raise ValueError(f"{put_timeout=} must be a finite number of seconds >= 0")
        self._maxsize = maxsize
        self._put_timeout = float(put_timeout)
        self._queue: queue.Queue[Any] = queue.Queue(maxsize)
        self._closed = threading.Event()
        # Puts that passed the closed-check but may not have landed yet: an iterator must not
        # end while one is in flight, or its document would be lost.
        self._lock = threading.Lock()
        self._in_flight = 0
        self._run_engine: Any = None
        self._token: int | None = None

    @property
    def maxsize(self) -> int:
        """The queue's capacity."""
        return self._maxsize

    @property
    def closed(self) -> bool:
        """Whether :meth:`close` has been called."""
        return self._closed.is_set()

    def __call__(self, name: str, doc: dict[str, Any]) -> None:
        """Queue one document; block while the queue is full.

        Raises
        ------
        BackpressureError
            If the queue stayed full for ``put_timeout`` seconds.
        StreamError
            If the source is closed.
        """
        with self._lock:
            if self._closed.is_set():
                raise StreamError(
                    f"RunEngineSource is closed; cannot accept {name!r} document. "
                    "Unsubscribe it from the RunEngine before closing it."
                )
            self._in_flight += 1
        try:
            self._queue.put((name, doc), timeout=self._put_timeout)
        except queue.Full:
            raise BackpressureError(self._maxsize, self._put_timeout) from None
        finally:
            with self._lock:
                self._in_flight -= 1

    def qsize(self) -> int:
        """Number of documents waiting (approximate while a producer runs)."""
        return self._queue.qsize()

    def __len__(self) -> int:
        return self._queue.qsize()

    def drain(self) -> list[tuple[str, dict[str, Any]]]:
        """Return every document queued now, oldest first, without blocking."""
        out: list[tuple[str, dict[str, Any]]] = []
        while True:
            try:
                out.append(self._queue.get_nowait())
            except queue.Empty:
                return out

    def __iter__(self) -> Iterator[tuple[str, dict[str, Any]]]:
        """Yield documents as they arrive, blocking; end once closed and drained."""
        while True:
            try:
                yield self._queue.get(timeout=_POLL_S)
            except queue.Empty:
                if self._finished():
                    return

    def close(self) -> None:
        """Stop accepting documents; iterators end after the queued ones. Idempotent.

        Also unsubscribes from the RunEngine given to :meth:`subscribe`, if any. Queued
        documents are kept: :meth:`drain` and iteration still return them.
        """
        self.unsubscribe()
        with self._lock:
            self._closed.set()

    def subscribe(self, run_engine: Any) -> int:
        """Subscribe to ``run_engine`` (``RE.subscribe(self)``) and return the token."""
        if self._token is not None:
            raise RuntimeError(
                f"RunEngineSource is already subscribed (token {self._token}); "
                "call unsubscribe() first"
            )
        self._token = run_engine.subscribe(self)
        self._run_engine = run_engine
        return self._token

    def unsubscribe(self) -> None:
        """Undo :meth:`subscribe`; does nothing if not subscribed."""
        if self._token is not None:
            self._run_engine.unsubscribe(self._token)
        self._token = None
        self._run_engine = None

    def _finished(self) -> bool:
        with self._lock:
            return self._closed.is_set() and self._in_flight == 0 and self._queue.empty()

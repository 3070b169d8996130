"""``with`` support for the stream classes that hold a connection or run a server.

:class:`ClosesOnExit`: ``with sink:`` closes it on the way out, after an error too (sinks,
sources, plan sinks). :class:`StopsOnExit`: ``with server:`` starts it and stops it on the way
out (the local servers the tests and ``deploy/dev-stack`` start).
"""

from __future__ import annotations

from types import TracebackType
from typing import Self

__all__ = ["ClosesOnExit", "StopsOnExit"]


class ClosesOnExit:
    """Mixin: ``__enter__`` returns the object, ``__exit__`` calls its ``close()``."""

    def close(self) -> None:
        raise NotImplementedError

    def __enter__(self) -> Self:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()


class StopsOnExit:
    """Mixin: ``__enter__`` returns ``start()``, ``__exit__`` calls ``stop()``."""

    def start(self) -> Self:
        raise NotImplementedError

    def stop(self) -> None:
        raise NotImplementedError

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()

"""What the steering agents (Q sampling, mapping, tuning, sextupoles) share.

Each keeps its settings, observations, decisions and model state in an
:class:`agents.store.AgentStore`, so :meth:`StoredAgent.resume` re-opens any of them from its
store alone; and each writes one derived run per raw run, closed with the raw run's exit status.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any, ClassVar, Self

from agents.config import _Strict, load_settings
from agents.store import AgentStore
from streams.derived import DerivedRunWriter
from streams.protocols import DocumentSink

__all__ = ["StoredAgent"]


class StoredAgent:
    """Mixin for an agent built as ``cls(settings, store, *, sinks, _create)``.

    ``settings_class`` is the pydantic model of its settings; ``_derived`` its open derived run.
    """

    settings_class: ClassVar[type[_Strict]]
    _derived: DerivedRunWriter | None
    settings: Any  # an instance of settings_class (with max_retries)
    store: AgentStore
    errors: list[str]
    _tries: dict[Any, int]  # failed readings per position (or per evaluation)

    def _close(self, key: str, outcome: str, reason: str) -> None:
        """Close position ``key`` for good with ``outcome`` and ``reason`` (each agent its way)."""
        raise NotImplementedError

    @classmethod
    def resume(cls, store: str | Path, *, sinks: Sequence[DocumentSink] = ()) -> Self:
        """Re-open an agent from its store: same settings, observations, decisions and model state."""
        config = AgentStore.stored_config(store, cls.__name__)
        return cls(load_settings(cls.settings_class, config), store, sinks=sinks, _create=False)  # type: ignore[call-arg]

    def _failed_reading(self, key: str, err: Exception) -> None:
        """A reading of position ``key`` failed: named in ``errors`` and the log, stored as an
        ``error`` outcome; the position is asked again until ``max_retries`` readings failed, then
        closed as failed (the subclass's ``_close``)."""
        self.errors.append(str(err))
        logging.getLogger(type(self).__module__).warning("%s", err)
        self.store.append("outcomes", {"point_key": [key], "outcome": ["error"], "reason": [str(err)]})
        tries = self._tries[key] = self._tries.get(key, 0) + 1
        if tries > self.settings.max_retries:
            self._close(key, "failed", f"gave up after {tries} failed readings: {err}")

    def _close_derived(self, exit_status: str) -> None:
        """Close the open derived run (if any) with the raw run's ``exit_status``."""
        if self._derived is not None:
            self._derived.close(exit_status=exit_status)
            self._derived = None

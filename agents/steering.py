"""What the steering agents (Q sampling, mapping, tuning, sextupoles) share.

Each keeps its settings, observations, decisions and model state in an
:class:`agents.store.AgentStore`, so :meth:`StoredAgent.resume` re-opens any of them from its
store alone; and each writes one derived run per raw run, closed with the raw run's exit status.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import ClassVar, Self

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

    @classmethod
    def resume(cls, store: str | Path, *, sinks: Sequence[DocumentSink] = ()) -> Self:
        """Re-open an agent from its store: same settings, observations, decisions and model state."""
        config = AgentStore.stored_config(store, cls.__name__)
        return cls(load_settings(cls.settings_class, config), store, sinks=sinks, _create=False)  # type: ignore[call-arg]

    def _close_derived(self, exit_status: str) -> None:
        """Close the open derived run (if any) with the raw run's ``exit_status``."""
        if self._derived is not None:
            self._derived.close(exit_status=exit_status)
            self._derived = None

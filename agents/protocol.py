"""The agent seam: ``tell(name, doc)``, ``ask(n)``, ``report()``, and the plan request they trade.

An agent's decision logic is a pure function of its observations and its frozen config, so it
can be tested without any stream; documents reach it through ``tell`` and decisions leave it as
:class:`PlanRequest` objects, which pass the safety gate before anything runs them.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Protocol, runtime_checkable

from streams.requests import PlanRequest

__all__ = ["Agent", "PlanRequest", "PositionAware", "RejectionAware"]


@runtime_checkable
class Agent(Protocol):
    """Told documents, asked for plans, reports its state."""

    name: str

    def tell(self, name: str, doc: dict[str, Any]) -> None:
        """Take one event-model document."""

    def ask(self, n: int) -> list[PlanRequest]:
        """Return up to ``n`` plan requests; an empty list means the agent is done."""

    def report(self) -> dict[str, Any]:
        """A JSON-able summary of the agent's state."""


@runtime_checkable
class RejectionAware(Protocol):
    """An agent that wants to hear which of its requests the safety gate rejected."""

    def rejected(self, request: PlanRequest, reason: str) -> None: ...


@runtime_checkable
class PositionAware(Protocol):
    """An agent that wants to know where its axes are before its first request, so that its
    first step, like every later one, stays within the safety gate's ``max_step``."""

    def observe_positions(self, positions: Mapping[str, float]) -> None: ...

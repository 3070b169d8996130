"""Plan requests: what an agent asks a plan sink to run. They cross processes, so they live here.

A request names an allowed plan, its args and kwargs, and an idempotency key; it is frozen so it
cannot change after the safety gate has checked it.
"""

from __future__ import annotations

import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

__all__ = ["PlanRequest"]


def _freeze(value: Any) -> Any:
    if isinstance(value, Mapping):
        return MappingProxyType({k: _freeze(v) for k, v in value.items()})
    if isinstance(value, list | tuple):
        return tuple(_freeze(v) for v in value)
    return value


def _thaw(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {k: _thaw(v) for k, v in value.items()}
    if isinstance(value, tuple):
        return [_thaw(v) for v in value]
    return value


@dataclass(frozen=True)
class PlanRequest:
    """A request to run one allowed plan.

    Parameters
    ----------
    plan
        Name of a plan on the plan sink's allow-list (never a Python attribute looked up by name).
    args, kwargs
        The plan's arguments; frozen (tuples and read-only mappings) so a request cannot change
        after the safety gate has checked it.
    key
        Idempotency key: a sink that has already run (or queued) a request with this key does
        not run it again.
    agent
        Name of the agent that asked for it, for reports and logs.
    """

    plan: str
    args: tuple[Any, ...] = ()
    kwargs: Mapping[str, Any] = field(default_factory=dict)
    key: str = field(default_factory=lambda: uuid.uuid4().hex)
    agent: str = ""

    def __post_init__(self) -> None:
        if not isinstance(self.plan, str) or not self.plan:
            raise ValueError(f"PlanRequest.plan must be a non-empty string, got {self.plan!r}")
        if not isinstance(self.key, str) or not self.key:
            raise ValueError(f"PlanRequest.key must be a non-empty string, got {self.key!r}")
        object.__setattr__(self, "args", _freeze(tuple(self.args)))
        object.__setattr__(self, "kwargs", _freeze(dict(self.kwargs)))

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able form (lists and dicts), for stores, logs and queue items."""
        return {
            "plan": self.plan,
            "args": _thaw(self.args),
            "kwargs": _thaw(self.kwargs),
            "key": self.key,
            "agent": self.agent,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> PlanRequest:
        return cls(
            plan=data["plan"],
            args=tuple(data.get("args", ())),
            kwargs=dict(data.get("kwargs", {})),
            key=data["key"],
            agent=data.get("agent", ""),
        )

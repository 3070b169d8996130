"""How a steering agent reads runs: the events of one named stream, per run.

Every steering agent is told whole runs but learns only from the events of one stream (usually
``primary``). :func:`stream_router` builds the event-model ``RunRouter`` that does this: fresh
per-run state for each start document, descriptors of that stream remembered, each of their
events handed on with the run's uid, and the stop document handed on when the run ends.

A daemon tells every agent every run on its topic. A run another agent asked for (its start
names that agent under ``beampilot_agent``, as a queued request's runs do) is that agent's, so
the router given ``agent`` leaves it alone: the tuning agent has nothing to learn from the mapping
agent's frames, and would only report each of its events as one it never asked for. Runs that
name no agent (an operator's own scan) are read by all.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from event_model import DocumentRouter, RunRouter

from streams.queueserver import AGENT_META_KEY

__all__ = ["stream_router"]


class _StreamParser(DocumentRouter):
    def __init__(self, start: dict, stream: str, on_event: Callable[[str, dict], Any],
                 on_stop: Callable[[str, dict], Any], on_descriptor: Callable[[dict], Any] | None) -> None:
        super().__init__()
        self.run_uid = start["uid"]
        self.stream, self.on_event, self.on_stop, self.on_descriptor = stream, on_event, on_stop, on_descriptor
        self.descriptors: set[str] = set()

    def descriptor(self, doc: dict) -> None:
        if doc.get("name") == self.stream:
            self.descriptors.add(doc["uid"])
            if self.on_descriptor is not None:
                self.on_descriptor(doc)

    def event(self, doc: dict) -> None:
        if doc["descriptor"] in self.descriptors:
            self.on_event(self.run_uid, doc)

    def stop(self, doc: dict) -> None:
        self.on_stop(self.run_uid, doc)


def stream_router(
    stream: str,
    on_event: Callable[[str, dict], Any],
    on_stop: Callable[[str, dict], Any],
    on_descriptor: Callable[[dict], Any] | None = None,
    *,
    on_start: Callable[[dict], Any] | None = None,
    agent: str | None = None,
) -> RunRouter:
    """A ``RunRouter`` calling ``on_start(start)`` for each run it reads, ``on_event(run_uid,
    event)`` for each event of ``stream``, ``on_descriptor(descriptor)`` for each of its
    descriptors and ``on_stop(run_uid, stop)``; with ``agent``, none of them for runs whose start
    names another agent (see the module docs)."""

    def factory(name: str, start: dict) -> tuple[list[Any], list[Any]]:
        asked = start.get(AGENT_META_KEY)
        if agent is not None and asked is not None and asked != agent:
            return [], []
        if on_start is not None:
            on_start(start)
        return [_StreamParser(start, stream, on_event, on_stop, on_descriptor)], []

    return RunRouter([factory])

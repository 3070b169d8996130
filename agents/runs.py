"""How a steering agent reads runs: the events of one named stream, per run.

Every steering agent is told whole runs but learns only from the events of one stream (usually
``primary``). :func:`stream_router` builds the event-model ``RunRouter`` that does this: fresh
per-run state for each start document, descriptors of that stream remembered, each of their
events handed on with the run's uid, and the stop document handed on when the run ends.

A daemon tells every agent every run on its topic. A run another agent asked for (its start
names that agent under ``beampilot_agent``, as a queued request's runs do) is that agent's, so
the router given ``agent`` leaves it alone: the tuning agent has nothing to learn from the mapping
agent's frames, and would only report each of its events as one it never asked for. Runs that
name no agent (an operator's own scan) are read by all. A run that names this agent but a request
it has no record of (``asked``) was an earlier agent's of the same name, with another store (a
daemon started afresh on a topic that still holds the last session's runs): it is not read
either, and the log says so once per run.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from event_model import DocumentRouter, RunRouter

from streams.queueserver import AGENT_META_KEY, REQUEST_META_KEY

__all__ = ["stream_router"]

logger = logging.getLogger(__name__)


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
    asked: Callable[[str], bool] | None = None,
) -> RunRouter:
    """A ``RunRouter`` calling ``on_start(start)`` for each run it reads, ``on_event(run_uid,
    event)`` for each event of ``stream``, ``on_descriptor(descriptor)`` for each of its
    descriptors and ``on_stop(run_uid, stop)``; with ``agent``, none of them for runs whose start
    names another agent, nor, with ``asked`` (a request key -> whether this agent made that
    request; a retry's key ``<key>:retry<n>`` is asked about as ``<key>``), for runs naming
    ``agent`` and a request it did not make (see the module docs)."""

    def factory(name: str, start: dict) -> tuple[list[Any], list[Any]]:
        asked_by, key = start.get(AGENT_META_KEY), start.get(REQUEST_META_KEY)
        if agent is not None and asked_by is not None and asked_by != agent:
            return [], []
        if agent is not None and asked_by == agent and asked is not None and isinstance(key, str) \
                and not asked(key.split(":")[0]):
            logger.info("agent %s: run %s was asked for by an earlier agent %r (request %s is not in this "
                        "agent's store); not read", agent, start.get("uid"), agent, key)
            return [], []
        if on_start is not None:
            on_start(start)
        return [_StreamParser(start, stream, on_event, on_stop, on_descriptor)], []

    return RunRouter([factory])

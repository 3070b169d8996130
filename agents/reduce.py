"""An analysis agent: every raw SAS event becomes a derived event of count rates with errors.

It is the simplest useful analysis a daemon runs beside a scattering experiment — detector counts
and exposure turned into a rate with its Poisson standard error — and it is what the streaming
benchmark pushes through the broker: one derived event out for every raw event in.

Derived runs link to their raw run by ``raw_run_uid`` and hold one stream, ``rate``, with the
raw event's Q, rate, rate error, and the raw ``seq_num`` and ``time`` (so a consumer can join
them back, and measure how long the analysis took end to end).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from agents.config import DataKeySettings, _Strict
from agents.protocol import PlanRequest
from streams.derived import DerivedRunWriter
from streams.protocols import DocumentSink
from streams.sequence import events_of

__all__ = ["RateAgent", "RateSettings"]

logger = logging.getLogger(__name__)


class RateSettings(_Strict):
    """Settings of :class:`RateAgent`: its name and which data keys hold Q, counts and exposure."""

    name: str = "rate"
    keys: DataKeySettings = DataKeySettings()


_NUMBER = {"dtype": "number", "shape": []}


class RateAgent:
    """Turn each raw event's counts and exposure into ``rate = counts / exposure`` and its error.

    An analysis agent: it never asks for plans. Events of other streams, and events without the
    configured keys, are counted in the report and skipped.

    Parameters
    ----------
    settings
        A :class:`RateSettings` (or a mapping validated into one).
    sinks
        Where derived runs go (Kafka, zarr, tiled sinks).
    """

    def __init__(self, settings: RateSettings | dict[str, Any] | None = None, *,
                 sinks: Sequence[DocumentSink] = ()) -> None:
        if not isinstance(settings, RateSettings):
            settings = RateSettings.model_validate(settings or {})
        self.settings = settings
        self.name = settings.name
        self.sinks = list(sinks)
        self._runs: dict[str, DerivedRunWriter] = {}
        self._streams: dict[str, tuple[str, str]] = {}  # descriptor uid -> (run uid, stream name)
        self.events_in = 0
        self.events_out = 0
        self.skipped = 0

    def tell(self, name: str, doc: dict[str, Any]) -> None:
        if name == "start":
            if doc["uid"] in self._runs or doc.get("raw_run_uid"):  # a repeat, or a derived run
                return
            writer = DerivedRunWriter(self.sinks, raw_run_uid=doc["uid"],
                                      metadata={"agent": self.name, "analysis": "rate"})
            keys = {k: {**_NUMBER, "source": self.name} for k in ("q", "rate", "rate_sigma", "raw_seq_num", "raw_time")}
            writer.add_stream("rate", keys)
            self._runs[doc["uid"]] = writer
        elif name == "descriptor":
            if doc["run_start"] in self._runs:
                self._streams[doc["uid"]] = (doc["run_start"], doc.get("name", "primary"))
        elif name in ("event", "event_page"):
            for event in events_of(name, doc):
                self._event(event)
        elif name == "stop":
            writer = self._runs.pop(doc["run_start"], None)
            if writer is not None:
                self._streams = {k: v for k, v in self._streams.items() if v[0] != doc["run_start"]}
                writer.close(exit_status=doc.get("exit_status", "success"))

    def _event(self, event: dict[str, Any]) -> None:
        where = self._streams.get(event["descriptor"])
        if where is None or where[1] != self.settings.keys.stream:
            return
        self.events_in += 1
        keys, data = self.settings.keys, event["data"]
        try:
            counts = float(np.sum(data[keys.counts]))
            exposure = float(data[keys.exposure])
            q = float(np.mean(data[keys.q]))
        except (KeyError, TypeError, ValueError) as err:
            self.skipped += 1
            logger.warning("event %s: cannot read %s/%s/%s (%s); skipped", event.get("uid"), keys.q,
                           keys.counts, keys.exposure, err)
            return
        if not (exposure > 0 and math.isfinite(counts) and counts >= 0):
            self.skipped += 1
            logger.warning("event %s: counts %r / exposure %r make no rate; skipped", event.get("uid"),
                           counts, exposure)
            return
        rate, sigma = counts / exposure, math.sqrt(max(counts, 1.0)) / exposure
        self._runs[where[0]].emit("rate", {"q": q, "rate": rate, "rate_sigma": sigma,
                                           "raw_seq_num": int(event["seq_num"]), "raw_time": float(event["time"])})
        self.events_out += 1

    def ask(self, n: int) -> list[PlanRequest]:
        return []

    def report(self) -> dict[str, Any]:
        return {"agent": self.name, "kind": type(self).__name__, "open_runs": len(self._runs),
                "events_in": self.events_in, "events_out": self.events_out, "skipped": self.skipped}

    def close(self) -> None:
        for writer in self._runs.values():
            writer.close(exit_status="abort", reason="agent closed before the raw run stopped")
        self._runs.clear()

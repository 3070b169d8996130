"""``beampilot replay --on-sim``: run a recorded run's measurements again on the simulated instrument.

A stored run (tiled or beampilot's zarr store) says where the instrument went: every event of its
primary stream holds the axis positions (``sas_q``, ``sas_exposure``). This module re-measures
exactly those points, in the recorded order, on a :class:`~simulators.sas.SimSASInstrument`
through a real RunEngine, so the new documents have yesterday's plan but fresh (simulated)
counts. A steering agent fed from it can be tested against yesterday's beamtime: its decisions
are checked by the safety gate exactly as on the beamline.

The simulated sample comes from the recorded start document when it carries ``sample_kind`` and
``sample_truth`` (runs written by beampilot's demos do), otherwise from ``--sample`` / ``--seed``.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from typing import Any

import numpy as np
from bluesky import RunEngine
from ophyd import Signal

from agents.demo_sas import DemoSetup, make_instrument
from agents.errors import AgentError
from agents.plans import POINT_KEY, measure_run
from simulators.sas import SimClock

__all__ = ["recorded_points", "rerun_on_sim"]

logger = logging.getLogger(__name__)


def recorded_points(documents: Iterable[tuple[str, dict[str, Any]]], *, q_key: str = "sas_q",
                    exposure_key: str = "sas_exposure", stream: str = "primary") -> tuple[dict, list[dict[str, float]]]:
    """The start document and the ``[{q, exposure}]`` points of a recorded run's events, in order."""
    start: dict[str, Any] | None = None
    descriptors: set[str] = set()
    points: list[dict[str, float]] = []
    for name, doc in documents:
        if name == "start":
            start = doc
        elif name == "descriptor" and doc.get("name", "primary") == stream:
            descriptors.add(doc["uid"])
        elif name == "event" and doc["descriptor"] in descriptors:
            data = doc["data"]
            if q_key not in data or exposure_key not in data:
                raise AgentError(f"event {doc['uid']} has no {q_key!r}/{exposure_key!r}; this run was not "
                                 "measured on a SAS instrument beampilot can simulate")
            points.append({"q": float(np.mean(data[q_key])), "exposure": float(data[exposure_key])})
    if start is None:
        raise AgentError("the recorded run has no start document")
    return start, points


def rerun_on_sim(documents: Iterable[tuple[str, dict[str, Any]]], sink: Callable[[str, dict], Any], *,
                 sample_kind: str = "polydisperse_sphere", seed: int = 0) -> dict[str, Any]:
    """Re-measure a recorded run's points on the simulated instrument; send the new documents to ``sink``.

    Returns a summary: the recorded run's uid, the new run's uid, the number of points.
    """
    start, points = recorded_points(documents)
    if not points:
        raise AgentError(f"run {start['uid']} has no events to re-run")
    truth = start.get("sample_truth")
    setup = (DemoSetup(sample_kind=start.get("sample_kind", sample_kind), seed=seed, truth=dict(truth))
             if truth else DemoSetup.draw(sample_kind, seed))
    clock = SimClock()
    instrument = make_instrument(setup, clock, seed=seed)
    key_signal = Signal(name=POINT_KEY, value="")
    RE = RunEngine({}, context_managers=[])
    new_uid: list[str] = []
    RE.subscribe(lambda name, doc: new_uid.append(doc["uid"]) if name == "start" else None)
    RE.subscribe(sink)
    keys = [f"rerun:{start['uid']}:{i}" for i in range(len(points))]
    md = {"replay_of": start["uid"], "sample_kind": setup.sample_kind, "plan_name": "measure",
          "original_plan_name": start.get("plan_name")}
    RE(measure_run([instrument], {"q": instrument.q, "exposure": instrument.exposure}, points, keys,
                   key_signal, md=md))
    logger.info("re-ran %d points of run %s on the simulated instrument", len(points), start["uid"])
    return {"recorded_run": start["uid"], "new_run": new_uid[0], "points": len(points),
            "sample_kind": setup.sample_kind, "simulated_beam_time_s": clock.time()}

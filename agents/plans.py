"""Bluesky plans through which an agent steers a run: the in-process plan sink.

:func:`steered_scan` opens one run, and until the agent says stop: feeds the agent the run's
documents (through a bounded in-process queue subscribed to the RunEngine), asks it for plan
requests, passes each through the :class:`~agents.safety.SafetyGate`, and runs the admitted ones.
The plans it can run are a fixed registry (:data:`STEP_PLANS`), never looked up by attribute name.

Pause and resume are safe: each measurement starts at a checkpoint, so the RunEngine rewinds to
the start of the interrupted measurement and no event is recorded twice. On abort, the run
closes with ``exit_status='abort'``; points the agent asked for but never saw measured stay
pending in the agent, which asks for them again (with the same keys) in its next run.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import bluesky.plan_stubs as bps
import bluesky.preprocessors as bpp
from bluesky.utils import MsgGenerator
from ophyd import Signal

from agents.errors import SafetyRejectedError
from agents.protocol import Agent, PlanRequest, PositionAware, RejectionAware
from agents.safety import SafetyGate, is_finite_number
from streams.inprocess import RunEngineSource

__all__ = ["POINT_KEY", "STEP_PLANS", "measure_points", "measure_run", "steered_scan"]

logger = logging.getLogger(__name__)

#: data key of the signal that carries each measurement's idempotency key into its event
POINT_KEY = "beampilot_point_key"


def measure_points(
    detectors: Sequence[Any],
    axes: Mapping[str, Any],
    points: Sequence[Mapping[str, float]],
    point_keys: Sequence[str],
    key_signal: Signal,
) -> MsgGenerator:
    """Move to each point, then trigger and read, one event per point.

    Each point is ``{axis name: value}``; ``point_keys[i]`` is recorded in the event under
    :data:`POINT_KEY` so an agent knows which of its requests the event answers.
    """
    for point, key in zip(points, point_keys, strict=True):
        yield from bps.checkpoint()
        moves: list[Any] = []
        for axis, value in point.items():
            moves += [axes[axis], value]
        yield from bps.mv(*moves, key_signal, key)
        yield from bps.trigger_and_read([*detectors, *axes.values(), key_signal])


def measure_run(
    detectors: Sequence[Any],
    axes: Mapping[str, Any],
    points: Sequence[Mapping[str, float]],
    point_keys: Sequence[str],
    key_signal: Signal,
    *,
    md: Mapping[str, Any] | None = None,
) -> MsgGenerator:
    """One run of :func:`measure_points`, with the devices staged: what a queued request runs.

    The in-process loop measures inside the run :func:`steered_scan` holds open; a remote
    RunEngine (bluesky-queueserver) runs one queue item at a time, so each request is its own run.

    Parameters
    ----------
    detectors, axes, points, point_keys, key_signal
        As for :func:`measure_points`.
    md
        Extra metadata for the start document (e.g. the request's idempotency key).

    Examples
    --------
    >>> RE(measure_run([sas], {"q": sas.q}, [{"q": 0.01}], ["k:0"], key))  # doctest: +SKIP
    """
    if len(points) != len(point_keys):
        raise ValueError(f"one key per point is needed: {len(points)=} but {len(point_keys)=}")
    _md: dict[str, Any] = {
        "plan_name": "measure_run",
        "detectors": [d.name for d in detectors],
        "motors": [a.name for a in axes.values()],
        "num_points": len(points),
        "num_intervals": max(len(points) - 1, 0),
    }
    _md.update(md or {})
    plan = measure_points(detectors, axes, points, point_keys, key_signal)
    plan = bpp.run_wrapper(plan, md=_md)
    return (yield from bpp.stage_wrapper(plan, [*detectors, *axes.values()]))


def _measure(request: PlanRequest, detectors, axes, key_signal) -> MsgGenerator:
    points = request.kwargs["points"]
    keys = request.kwargs.get("point_keys") or [f"{request.key}:{i}" for i in range(len(points))]
    missing = {a for p in points for a in p} - set(axes)
    if missing:
        raise KeyError(f"request {request.key} moves axes {sorted(missing)} this scan was not given")
    return measure_points(detectors, axes, points, keys, key_signal)


#: the plans an agent may ask for inside a steered scan, by name
STEP_PLANS: dict[str, Callable[..., MsgGenerator]] = {"measure": _measure}


def _axes_by_name(axes: Mapping[str, Any] | Sequence[Any]) -> dict[str, Any]:
    if isinstance(axes, Mapping):
        return dict(axes)
    return {axis.name: axis for axis in axes}


def steered_scan(
    agent: Agent,
    detectors: Sequence[Any],
    axes: Mapping[str, Any] | Sequence[Any],
    *,
    gate: SafetyGate,
    batch_size: int = 4,
    max_rounds: int | None = None,
    max_rejected_rounds: int = 3,
    queue_size: int = 10_000,
    md: Mapping[str, Any] | None = None,
    sleep: Callable[[float], None] | None = None,
) -> MsgGenerator:
    """One run steered by ``agent``: ask, check, measure, tell, until the agent says stop.

    Parameters
    ----------
    agent
        Anything with ``tell``/``ask``/``report``.
    detectors
        Readable devices triggered at every point.
    axes
        Settable devices the agent may move, as ``{name: device}`` or a list (named by ``.name``).
    gate
        The safety gate every request must pass.
    batch_size
        ``n`` passed to ``agent.ask(n)``.
    max_rounds
        Stop after this many ask/measure rounds even if the agent would go on.
    max_rejected_rounds
        Stop with :class:`~agents.errors.SafetyRejectedError` after this many rounds in a row
        in which every request was rejected.
    queue_size
        Bound of the in-process document queue between the RunEngine and the agent.
    md
        Extra metadata for the start document.
    sleep
        How to wait when the gate's rate limit (``max_requests_per_minute``) would reject the
        next plan: ``None`` waits in the RunEngine (``bps.sleep``, so a pause still pauses), the
        wait for a gate on real time; a simulation whose gate runs on its virtual clock passes
        that clock's ``sleep``. The agent is asked, and each plan put to the gate, only once
        the rate admits it, so no plan is rejected for the rate (a limit under one request a
        minute admits nothing: those plans are rejected, as every rejection, and end the scan).

    Examples
    --------
    >>> RE(steered_scan(agent, [sas], {"q": sas.q, "exposure": sas.exposure}, gate=gate))  # doctest: +SKIP
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size=}")
    axes = _axes_by_name(axes)
    source = RunEngineSource(maxsize=queue_size)
    key_signal = Signal(name=POINT_KEY, value="")
    _md = {"plan_name": "steered_scan", "agent": getattr(agent, "name", type(agent).__name__)}
    _md.update(md or {})

    def feed() -> None:
        for name, doc in source.drain():
            agent.tell(name, doc)

    def rounds() -> MsgGenerator:
        # the first step is measured from where the axes are, not from where the gate last saw them
        here = yield from _read_positions(axes)
        gate.restore_positions(here)
        if isinstance(agent, PositionAware):
            agent.observe_positions(here)
        done, rejected_in_a_row = 0, 0
        while max_rounds is None or done < max_rounds:
            yield from _wait_for_rate(gate, sleep, _md["agent"])
            feed()
            requests = agent.ask(batch_size)
            if not requests:
                logger.info("agent %s says stop", _md["agent"])
                return
            admitted = 0
            for request in requests:  # one at a time: a later request of the batch may wait for the rate
                yield from _wait_for_rate(gate, sleep, _md["agent"])
                if _admit(gate, agent, request):
                    admitted += 1
                    yield from STEP_PLANS[request.plan](request, detectors, axes, key_signal)
            rejected_in_a_row = 0 if admitted else rejected_in_a_row + 1
            if rejected_in_a_row >= max_rejected_rounds:
                raise SafetyRejectedError(
                    f"every request was rejected {rejected_in_a_row} rounds in a row; last: "
                    f"{gate.verdicts[-1].reason}. Check the agent's limits against the safety config"
                )
            done += 1

    plan = bpp.run_wrapper(rounds(), md=_md)
    plan = bpp.stage_wrapper(plan, [*detectors, *axes.values()])
    plan = bpp.subs_wrapper(plan, {"all": [source]})
    return (yield from bpp.finalize_wrapper(plan, _final_feed(feed)))


def _wait_for_rate(gate: SafetyGate, sleep: Callable[[float], None] | None, agent: str) -> MsgGenerator:
    """Wait until the gate's rate limit admits one more request (see :func:`steered_scan`)."""
    wait = gate.rate_wait()
    if wait == 0.0 or math.isinf(wait):  # inf: nothing is ever admitted; the gate says so
        return
    logger.info("agent %s: its next plan waits %.1f s for the rate limit (max_requests_per_minute=%g)",
                agent, wait, gate.config.max_requests_per_minute)
    if sleep is None:
        yield from bps.sleep(wait)
    else:
        sleep(wait)
    if gate.rate_wait() >= wait:  # the gate's clock did not move while we waited
        raise RuntimeError(
            f"waited {wait:.3g} s for the safety gate's rate limit, but the gate's clock did not advance: "
            "a gate on a simulation's virtual clock needs steered_scan(sleep=<that clock>.sleep)")


def _read_positions(axes: Mapping[str, Any]) -> MsgGenerator:
    """The current value of each axis, read from its device (``{name: value}``); an axis whose
    reading is not a finite number is left out (logged), so the gate keeps its last admitted value."""
    here: dict[str, float] = {}
    for name, device in axes.items():
        value = yield from bps.rd(device)
        if is_finite_number(value):
            here[name] = float(value)
        else:
            logger.warning("axis %s reads %r, not a finite number: its first step is measured from the gate's "
                           "last admitted value", name, value)
    return here


def _final_feed(feed: Callable[[], None]) -> MsgGenerator:
    feed()  # the stop document (and anything after the last ask) reaches the agent
    yield from bps.null()


def _admit(gate: SafetyGate, agent: Agent, request: PlanRequest) -> bool:
    if request.plan not in STEP_PLANS:
        verdict = gate.refuse(
            request, f"plan {request.plan!r} cannot run inside a steered scan (known: {sorted(STEP_PLANS)})"
        )
    else:
        verdict = gate.admit(request)
    if not verdict.accepted and isinstance(agent, RejectionAware):
        agent.rejected(request, verdict.reason)
    return verdict.accepted

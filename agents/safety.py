"""The safety gate: nothing an agent asks for runs unless it passes here.

Four checks, each of which rejects (never clamps):

* the plan is on the allow-list;
* every axis value is a finite number inside that axis's limits, and every axis a request moves
  has limits (an axis nobody bounded is refused, not trusted);
* no move is larger than the axis's maximum step, from the last admitted position of that axis
  and between consecutive points of one request; after a plan that was cut short
  (:meth:`SafetyGate.interrupted`), from every position the cut may have left the axis in;
* no more requests per minute than allowed, and no more points per request than allowed.

Axis values are read from a request's ``kwargs``: either a ``points`` list of ``{axis: value}``
mappings (the in-process ``measure`` plan) or scalar keyword arguments named after axes.
Positional arguments cannot be checked and are refused.
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from numbers import Real
from typing import Any

from streams.requests import PlanRequest

__all__ = ["AxisLimits", "SafetyConfig", "SafetyGate", "Verdict", "is_finite_number"]

logger = logging.getLogger(__name__)

#: keys of a point that are bookkeeping, not axes
NON_AXIS_KEYS = frozenset({"key"})
#: admitted plans whose points the gate keeps, for :meth:`SafetyGate.interrupted`
KEEP_PLANS = 256


@dataclass(frozen=True)
class AxisLimits:
    """Inclusive limits of one axis and its largest allowed move (``None``: any move)."""

    low: float
    high: float
    max_step: float | None = None

    def __post_init__(self) -> None:
        if not (math.isfinite(self.low) and math.isfinite(self.high) and self.low <= self.high):
            raise ValueError(f"axis limits need finite low <= high, got {self.low=}, {self.high=}")
        if self.max_step is not None and not self.max_step > 0:
            raise ValueError(f"max_step must be > 0 or None, got {self.max_step=}")


@dataclass(frozen=True)
class SafetyConfig:
    """What the gate allows. Frozen: an operator sets it; agents cannot change it."""

    allowed_plans: frozenset[str]
    limits: Mapping[str, AxisLimits]
    max_requests_per_minute: float | None = None
    max_points_per_request: int | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "allowed_plans", frozenset(self.allowed_plans))
        if not self.allowed_plans:
            raise ValueError("SafetyConfig.allowed_plans is empty: no plan could ever run")


@dataclass(frozen=True)
class Verdict:
    """The gate's answer on one request."""

    request: PlanRequest
    accepted: bool
    reasons: tuple[str, ...] = ()
    at: float = field(default=0.0)

    @property
    def reason(self) -> str:
        return "; ".join(self.reasons)


def is_finite_number(value: Any) -> bool:
    """A real, finite number (not a bool): what an axis value or reading must be."""
    return not isinstance(value, bool) and isinstance(value, Real) and math.isfinite(value)


def _axis_values(request: PlanRequest) -> Iterator[tuple[int | None, str, Any]]:
    """Yield ``(point index or None, axis, value)`` for every axis value in the request."""
    for name, value in request.kwargs.items():
        if name == "points":
            for i, point in enumerate(value):
                for axis, v in point.items():
                    if axis not in NON_AXIS_KEYS:
                        yield i, axis, v
        elif name != "point_keys":
            yield None, name, value


class SafetyGate:
    """Checks plan requests against a :class:`SafetyConfig`; admitted ones update its state.

    Parameters
    ----------
    config
        The limits.
    clock
        Monotonic seconds, injectable for tests.
    """

    def __init__(self, config: SafetyConfig, clock: Callable[[], float] = time.monotonic) -> None:
        self.config = config
        self._clock = clock
        self._admitted_at: deque[float] = deque()
        self._position: dict[str, float] = {}
        # where a plan cut short may have left an axis: (low, high), until a request moves it
        self._span: dict[str, tuple[float, float]] = {}
        # key -> (positions before it, its points): what an interruption is judged from
        self._plans: OrderedDict[str, tuple[dict[str, float], list[dict[str, float]]]] = OrderedDict()
        self.verdicts: list[Verdict] = []

    @property
    def positions(self) -> dict[str, float]:
        """The last admitted value of each axis (what the next step is measured from)."""
        return dict(self._position)

    @property
    def spans(self) -> dict[str, tuple[float, float]]:
        """Axes a plan cut short left somewhere in ``(low, high)`` (see :meth:`interrupted`)."""
        return dict(self._span)

    def restore_positions(self, positions: Mapping[str, float],
                          spans: Mapping[str, tuple[float, float]] | None = None) -> None:
        """Take up ``positions`` as where the axes are: :attr:`positions` saved before a restart, or
        the devices' readings at the start of a :func:`~agents.plans.steered_scan`, so the first step
        is checked against ``max_step`` too; with ``spans`` (:attr:`spans` saved before a restart),
        the axes a cut plan left somewhere in a span."""
        self._position.update({axis: float(v) for axis, v in positions.items()})
        for axis in positions:
            self._span.pop(axis, None)
        self._span.update({axis: (float(lo), float(hi)) for axis, (lo, hi) in (spans or {}).items()})

    def admitted_plan(self, key: str) -> tuple[dict[str, float], list[dict[str, float]]] | None:
        """An admitted request's positions before it and its points, while the gate keeps them."""
        return self._plans.get(key)

    def keep_plan(self, key: str, before: Mapping[str, float], points: list[dict[str, float]]) -> None:
        """Keep an admitted request's points (:meth:`admitted_plan` saved before a restart)."""
        self._plans[key] = (dict(before), [dict(p) for p in points])
        self._plans.move_to_end(key)  # the newest last: see interrupted
        while len(self._plans) > KEEP_PLANS:
            self._plans.popitem(last=False)

    def interrupted(self, key: str, measured: int | None, readings: Mapping[str, float] | None = None
                    ) -> dict[str, tuple[float, float]] | None:
        """Plan ``key`` was cut short after measuring ``measured`` of its points (a stop, an abort,
        a RunEngine or manager that died); ``readings``: its last event's readings of the axes.

        Its axes were last read at the ``measured``-th point (or stood where they were before the
        plan, if it measured none) and may have gone on towards the next point; so each is taken
        to be anywhere between the two, and the next request's first move of it must be within
        ``max_step`` from every position in between. ``measured=None`` (not known: the run's
        documents were never read) spans every point of the plan and where the axes stood
        before it. Positions are not guessed: a span that makes the next request fail is reported
        by the gate's usual rejection.

        Returns
        -------
        dict | None
            The spans set (axis: (low, high)); ``None`` if the gate does not know the plan (not
            admitted here, or long ago: the positions are then the readings, if any), or has
            admitted another plan since (nothing changes: that plan's moves stand).
        """
        later = bool(self._plans) and key in self._plans and next(reversed(self._plans)) != key
        plan = self._plans.pop(key, None)
        reads = {a: float(v) for a, v in (readings or {}).items() if is_finite_number(v)}
        if later:  # a plan admitted since moves the axes on: where this one left them no longer counts
            logger.warning("plan %s was cut short, but later plans were admitted since; the gate keeps "
                           "their positions", key)
            return None
        if plan is None:
            self._position.update(reads)
            for axis in reads:
                self._span.pop(axis, None)
            return None
        before, points = plan
        if measured is None:
            last, passed = {**before, **reads}, points
        else:
            measured = max(0, min(int(measured), len(points)))
            last = {**(points[measured - 1] if measured else before), **reads}
            passed = points[measured:measured + 1]
        spans: dict[str, tuple[float, float]] = {}
        for axis in set(last).union(*passed):
            values = [v for v in (last.get(axis), *(p.get(axis) for p in passed)) if v is not None]
            self._position[axis] = float(values[0])
            self._span.pop(axis, None)
            if max(values) > min(values):
                spans[axis] = self._span[axis] = (float(min(values)), float(max(values)))
        return spans

    def check(self, request: PlanRequest) -> Verdict:
        """Judge ``request`` without changing the gate's state."""
        reasons = [*self._check_plan(request), *self._check_axes(request), *self._check_rate()]
        return Verdict(request, not reasons, tuple(reasons), self._clock())

    def admit(self, request: PlanRequest) -> Verdict:
        """Judge ``request``; if accepted, record its moves and time. Rejections are logged."""
        verdict = self.check(request)
        self.verdicts.append(verdict)
        if verdict.accepted:
            self._admitted_at.append(verdict.at)
            before = dict(self._position)
            points: dict[int | None, dict[str, float]] = {}
            for i, axis, value in _axis_values(request):
                self._position[axis] = float(value)
                self._span.pop(axis, None)
                points.setdefault(i, {})[axis] = float(value)
            self.keep_plan(request.key, before, list(points.values()))
        else:
            logger.warning("safety gate rejected %s (key %s): %s", request.plan, request.key, verdict.reason)
        return verdict

    def retract(self, admitted: Verdict, reason: str, positions: Mapping[str, float],
                spans: Mapping[str, tuple[float, float]] | None = None) -> Verdict:
        """Take back an admitted request that will never run (its plan sink refused it): the axes
        are where they were before it (``positions`` and ``spans``, :attr:`positions` and
        :attr:`spans` read before :meth:`admit`), its slot in the rate window is freed, and it is
        recorded as rejected for ``reason``."""
        if not admitted.accepted:
            raise ValueError(f"only an admitted request can be retracted; {admitted.request.key!r} was rejected")
        self._position = {axis: float(v) for axis, v in positions.items()}
        self._span = {axis: (float(lo), float(hi)) for axis, (lo, hi) in (spans or {}).items()}
        self._plans.pop(admitted.request.key, None)
        with contextlib.suppress(ValueError):
            self._admitted_at.remove(admitted.at)
        with contextlib.suppress(ValueError):
            self.verdicts.remove(admitted)
        return self.refuse(admitted.request, reason)

    def refuse(self, request: PlanRequest, reason: str) -> Verdict:
        """Record a rejection decided by the caller (e.g. a plan sink that cannot run the plan)."""
        verdict = Verdict(request, False, (reason,), self._clock())
        self.verdicts.append(verdict)
        logger.warning("rejected %s (key %s): %s", request.plan, request.key, reason)
        return verdict

    def _check_plan(self, request: PlanRequest) -> list[str]:
        reasons = []
        if request.plan not in self.config.allowed_plans:
            allowed = sorted(self.config.allowed_plans)
            reasons.append(f"plan {request.plan!r} is not on the allow-list {allowed}")
        if request.args:
            reasons.append(f"positional args {list(request.args)!r} cannot be checked; pass axes as kwargs")
        n_points = len(request.kwargs.get("points", ()))
        limit = self.config.max_points_per_request
        if limit is not None and n_points > limit:
            reasons.append(f"{n_points} points in one request exceed max_points_per_request={limit}")
        return reasons

    def _check_axes(self, request: PlanRequest) -> list[str]:
        reasons: list[str] = []
        last = dict(self._position)
        span = dict(self._span)  # for each axis's first move in this request only
        for i, axis, value in _axis_values(request):
            where = f"{axis}={value!r}" + ("" if i is None else f" (point {i})")
            limits = self.config.limits.get(axis)
            if limits is None:
                reasons.append(f"{where}: axis {axis!r} has no limits configured; add them to the safety config")
                continue
            if not is_finite_number(value):
                reasons.append(f"{where}: not a finite number")
                continue
            if not limits.low <= value <= limits.high:
                reasons.append(f"{where}: outside limits [{limits.low}, {limits.high}]")
            previous = last.get(axis)
            where_from = span.pop(axis, None)
            if limits.max_step is not None and where_from is not None:
                lo, hi = where_from
                if max(abs(value - lo), abs(value - hi)) > limits.max_step:
                    reasons.append(
                        f"{where}: step up to {max(abs(value - lo), abs(value - hi)):g} from anywhere in [{lo:g}, "
                        f"{hi:g}], where a plan cut short may have left the axis, exceeds max_step {limits.max_step:g}"
                    )
            elif limits.max_step is not None and previous is not None and abs(value - previous) > limits.max_step:
                reasons.append(
                    f"{where}: step {abs(value - previous):g} from {previous:g} exceeds max_step {limits.max_step:g}"
                )
            last[axis] = float(value)
        return reasons

    def _check_rate(self) -> list[str]:
        limit = self.config.max_requests_per_minute
        if limit is None:
            return []
        now = self._clock()
        while self._admitted_at and now - self._admitted_at[0] >= 60.0:
            self._admitted_at.popleft()
        if len(self._admitted_at) + 1 > limit:
            return [f"rate limit: {len(self._admitted_at)} requests in the last 60 s, max_requests_per_minute={limit:g}"]
        return []

    def rate_wait(self) -> float:
        """Seconds until the rate limit admits one more request (0: it would now).

        A caller that waits this long before it asks its agent for a plan never has a plan
        rejected for the rate (a rejected plan's points are given up by the agent that asked);
        nothing is admitted any faster.
        """
        if not self._check_rate():
            return 0.0
        room = math.floor(self.config.max_requests_per_minute or 0)  # requests the window holds
        if room < 1:
            return math.inf  # under one a minute: nothing is ever admitted
        # the oldest admissions leave the 60 s window first; one more fits once all but room - 1 have
        return max(0.0, self._admitted_at[len(self._admitted_at) - room] + 60.0 - self._clock())

    def report(self) -> dict[str, Any]:
        """Counts and the rejections with their reasons (JSON-able)."""
        rejected = [v for v in self.verdicts if not v.accepted]
        return {
            "admitted": len(self.verdicts) - len(rejected),
            "rejected": len(rejected),
            "rejections": [
                {"plan": v.request.plan, "key": v.request.key, "agent": v.request.agent, "reasons": list(v.reasons)}
                for v in rejected
            ],
        }

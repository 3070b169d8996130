"""``SextupoleAgent``: multi-objective optimisation of a storage ring's sextupoles, as plans.

The agent maximises the beam lifetime and the injection efficiency over the optimiser's knobs:
the harmonic families' strengths and the two target chromaticities, from which the chromatic
families follow by the ring's (measured) chromaticity response, an affine map
``s_chrom = matrix @ (chrom_x, chrom_y) + offset``. The optimiser is
:class:`models.moga.GeneticOptimizer` (NSGA-II, or the ML-enhanced MOGA), which wants a whole
generation told at once; the agent hands a generation out as ``measure`` requests, so
:func:`agents.plans.steered_scan`, the daemon and the safety gate run it unchanged: each point
sets the families through their ophyd signals and reads lifetime and injection efficiency.

Safety: a generation's individuals are visited along a greedy nearest-neighbour path from the
current setting, in units of each family's ``max_step``. A move larger than a family's
``max_step`` is preceded by a linear ramp of intermediate points, so every step the gate sees is
allowed; ramp points are measured (the ring is read at each) and stored as ramp observations,
never told to the optimiser. Nothing is clamped: an individual whose family strengths fall
outside the families' limits is recorded infeasible without being sent, and reported. A
request the gate rejects is reported; its individuals are asked again one per request, and one
rejected alone is closed as infeasible.

Bad input: an event whose lifetime or efficiency is NaN or missing is named by run uid and
``seq_num``, and its individual is measured again with the same key, up to ``max_retries``
times, then given up as infeasible. Infeasible individuals are told with the worst objectives
(zero lifetime and efficiency) and a violated constraint, so they never reach the Pareto front.
The agent stops, with the reason in ``report()["stop_reason"]``, when ``generations``
generations have been told.

Everything is persisted as it happens (each point before its request is returned, observations
and outcomes on arrival, the asked generation before it is handed out, the optimiser's state
after each generation), so :meth:`SextupoleAgent.resume` continues a killed run in the same
generation without measuring an individual twice (the optimiser re-asks the same generation
from its state: it is seeded by ``(seed, generation)``).
"""

from __future__ import annotations

import json
import logging
import math
import time
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from pydantic import Field, model_validator

from agents.config import _Strict, load_settings
from agents.errors import AgentStoreError, ObservationError
from agents.plans import POINT_KEY
from agents.protocol import PlanRequest
from agents.runs import stream_router
from agents.steering import StoredAgent
from agents.store import AgentStore
from models.moga import GeneticOptimizer, MLMogaConfig, NSGA2Config, hypervolume
from streams.derived import DerivedRunWriter
from streams.protocols import DocumentSink

__all__ = [
    "CHROMATICITIES",
    "ChromaticResponse",
    "FamilyLimits",
    "SextupoleAgent",
    "SextupoleSettings",
    "nearest_neighbour_path",
    "ramp",
    "response_from_model",
]

logger = logging.getLogger(__name__)

#: the chromaticity knobs, in the order of the response matrix's columns
CHROMATICITIES: tuple[str, str] = ("chrom_x", "chrom_y")
_HAIR = 1e-9  # relative margin, so round-off never turns an allowed step into a rejected one


class FamilyLimits(_Strict):
    """Limits of one family's strength the agent may set, and its largest step per move."""

    low: float
    high: float
    max_step: float = Field(gt=0)

    @model_validator(mode="after")
    def _ordered(self) -> FamilyLimits:
        if not (math.isfinite(self.low) and math.isfinite(self.high) and self.low < self.high):
            raise ValueError(f"need finite low < high, got low={self.low}, high={self.high}")
        return self


class ChromaticResponse(_Strict):
    """The chromatic families as an affine function of the target chromaticity.

    ``strength[families[r]] = matrix[r][0] * chrom_x + matrix[r][1] * chrom_y + offset[r]``:
    the inverse of the ring's measured chromaticity response (``offset`` cancels the natural
    chromaticity).
    """

    families: tuple[str, str] = ("SF", "SD")
    matrix: tuple[tuple[float, float], tuple[float, float]]
    offset: tuple[float, float]

    @model_validator(mode="after")
    def _finite(self) -> ChromaticResponse:
        values = [*self.matrix[0], *self.matrix[1], *self.offset]
        if not all(math.isfinite(v) for v in values):
            raise ValueError(f"matrix and offset must be finite, got matrix={self.matrix}, offset={self.offset}")
        if self.families[0] == self.families[1]:
            raise ValueError(f"families must be two different families, got {self.families}")
        return self


class SextupoleSettings(_Strict):
    """Settings of :class:`SextupoleAgent`.

    ``prefix``: the ring device's name, so family ``F`` is the data key ``{prefix}_F`` (an axis
    of the steered scan and of the safety gate) and the readings are ``{prefix}_{lifetime}`` and
    ``{prefix}_{efficiency}`` in ``stream``. ``hardware_limits``: each family's power-supply
    range; ``families`` (in the device's order) give the agent's limits inside it and the
    largest step of one move. ``knobs``: the optimiser's bounds on each harmonic family (every
    family not in ``chromatic.families``) and on ``chrom_x``, ``chrom_y``. ``start``: the
    ring's current strengths (the path and the first ramp start there; ``None``: at the first
    individual). ``pop_size``, ``generations`` (the budget, the initial sample included),
    ``ml`` (the ML enhancement, configured by ``ml_config``, the fields of
    :class:`models.moga.MLMogaConfig`), ``seed``, ``max_retries`` (re-measurements of a lost
    reading).
    """

    name: str = "sextupole"
    prefix: str = "ring"
    lifetime: str = "lifetime"
    efficiency: str = "injection_efficiency"
    stream: str = "primary"
    hardware_limits: dict[str, tuple[float, float]] = Field(min_length=3)
    families: dict[str, FamilyLimits] = Field(min_length=3)
    knobs: dict[str, tuple[float, float]]
    chromatic: ChromaticResponse
    start: dict[str, float] | None = None
    pop_size: int = Field(default=8, ge=4)
    generations: int = Field(default=10, ge=1)
    ml: bool = True
    ml_config: dict[str, Any] = Field(default_factory=dict)
    max_retries: int = Field(default=2, ge=0)
    seed: int = 0

    @model_validator(mode="after")
    def _consistent(self) -> SextupoleSettings:
        if self.pop_size % 2:
            raise ValueError(f"pop_size={self.pop_size} must be even (NSGA-II mates pairs)")
        for fam, lim in self.families.items():
            if fam not in self.hardware_limits:
                raise ValueError(f"family {fam!r} has no hardware_limits; give its power-supply range")
            lo, hi = self.hardware_limits[fam]
            if not lo <= lim.low < lim.high <= hi:
                raise ValueError(f"families.{fam}: limits [{lim.low}, {lim.high}] are outside the hardware "
                                 f"limits [{lo}, {hi}]")
        missing = [f for f in self.chromatic.families if f not in self.families]
        if missing:
            raise ValueError(f"chromatic.families {missing} are not in families {list(self.families)}")
        expected = [*self.harmonic, *CHROMATICITIES]
        if sorted(self.knobs) != sorted(expected):
            raise ValueError(f"knobs must bound exactly {expected}; got {sorted(self.knobs)}")
        for knob, (lo, hi) in self.knobs.items():
            if not (math.isfinite(lo) and math.isfinite(hi) and lo < hi):
                raise ValueError(f"knobs.{knob}: need finite low < high, got ({lo}, {hi})")
            lim = self.families.get(knob)
            if lim is not None and not lim.low <= lo < hi <= lim.high:
                raise ValueError(f"knobs.{knob}: bounds ({lo}, {hi}) are outside the family's limits "
                                 f"[{lim.low}, {lim.high}]")
        if self.start is not None:
            if sorted(self.start) != sorted(self.families):
                raise ValueError(f"start must give every family and only those ({list(self.families)}), "
                                 f"got {sorted(self.start)}")
            out = {f: v for f, v in self.start.items() if not self.families[f].low <= v <= self.families[f].high}
            if out:
                raise ValueError(f"start values {out} are outside the families' limits")
        try:
            self.ml_moga_config()
        except (TypeError, ValueError) as err:
            raise ValueError(f"ml_config {self.ml_config}: {err}") from None
        return self

    @property
    def harmonic(self) -> list[str]:
        return [f for f in self.families if f not in self.chromatic.families]

    @property
    def knob_names(self) -> list[str]:
        return [*self.harmonic, *CHROMATICITIES]

    def data_key(self, name: str) -> str:
        return f"{self.prefix}_{name}"

    def ml_moga_config(self) -> MLMogaConfig | None:
        if not self.ml:
            return None
        config = dict(self.ml_config)
        if "weights" in config:
            config["weights"] = tuple(config["weights"])
        return MLMogaConfig(**config)

    def strengths(self, X: np.ndarray) -> np.ndarray:
        """Family strengths (`n x f`, in ``families`` order) of knob settings ``X`` (`n x d`)."""
        X = np.atleast_2d(np.asarray(X, dtype=float))
        knobs = dict(zip(self.knob_names, X.T, strict=True))
        chrom = np.column_stack([knobs[c] for c in CHROMATICITIES])
        response = dict(zip(self.chromatic.families,
                            (chrom @ np.asarray(row) + off for row, off in
                             zip(self.chromatic.matrix, self.chromatic.offset, strict=True)), strict=True))
        return np.column_stack([knobs[f] if f in knobs else response[f] for f in self.families])


def response_from_model(model: Any, harmonic: Sequence[str] = ("SH1", "SH2", "SH3"),
                        chromatic: tuple[str, str] = ("SF", "SD")) -> ChromaticResponse:
    """The affine chromatic map of anything with ``strengths(knobs) -> {family: strength}``.

    For the demo and tests, e.g. :class:`simulators.ring.RingModel` (linear in the
    chromaticities); a real ring's response comes from a measurement instead.
    """
    base = {**{h: 0.0 for h in harmonic}, **{c: 0.0 for c in CHROMATICITIES}}
    s0 = model.strengths(base)
    sx = model.strengths({**base, CHROMATICITIES[0]: 1.0})
    sy = model.strengths({**base, CHROMATICITIES[1]: 1.0})
    matrix = tuple((float(sx[f] - s0[f]), float(sy[f] - s0[f])) for f in chromatic)
    return ChromaticResponse(families=chromatic, matrix=matrix, offset=tuple(float(s0[f]) for f in chromatic))


def nearest_neighbour_path(start: np.ndarray | None, points: np.ndarray, scale: np.ndarray) -> list[int]:
    """Greedy visiting order of ``points`` (`n x f`) from ``start``; distance: ``max |dx| / scale``.

    The distance is the number of ``scale``-sized steps a move needs. Without ``start`` the path
    begins at the first point.
    """
    remaining = list(range(len(points)))
    order: list[int] = []
    here = None if start is None else np.asarray(start, dtype=float)
    while remaining:
        if here is None:
            j = remaining[0]
        else:
            steps = np.max(np.abs(points[remaining] - here) / scale, axis=1)
            j = remaining[int(np.argmin(steps))]
        order.append(j)
        remaining.remove(j)
        here = points[j]
    return order


def ramp(start: np.ndarray, end: np.ndarray, max_step: np.ndarray) -> np.ndarray:
    """Intermediate points (`m x f`) of a linear ramp so that no step exceeds ``max_step``.

    ``m = ceil(max |end - start| / max_step) - 1`` (none when the move itself is allowed; a move
    of exactly ``max_step`` is split too, so round-off never makes it one the gate rejects).
    """
    start, end = np.asarray(start, dtype=float), np.asarray(end, dtype=float)
    ratio = float(np.max(np.abs(end - start) / max_step))
    n = max(1, math.ceil(ratio * (1.0 + _HAIR)))
    t = np.arange(1, n)[:, None] / n
    points = start + (end - start) * t
    # keep round-off inside the segment (convex, so inside the limits); not a clamp of a setting
    return np.clip(points, np.minimum(start, end), np.maximum(start, end))


def _tables(families: Sequence[str]) -> dict[str, dict[str, Any]]:
    x = {f"x:{f}": "f8" for f in families}
    return {
        # every point handed out; index -1: a ramp point
        "points": {**x, "generation": "f8", "index": "f8", "time": "f8",
                   "point_key": str, "request_key": str, "kind": str},
        "observations": {**x, "lifetime": "f8", "efficiency": "f8", "generation": "f8", "index": "f8",
                         "seq_num": "f8", "time": "f8", "point_key": str, "kind": str, "event_uid": str,
                         "run_uid": str},
        # error / failed / rejected-batch / rejected / out_of_limits
        "outcomes": {"generation": "f8", "point_key": str, "request_key": str, "outcome": str, "reason": str},
    }


_CLOSING = frozenset({"failed", "rejected", "out_of_limits"})


class SextupoleAgent(StoredAgent):
    """Maximises lifetime and injection efficiency over sextupole settings by (ML-)NSGA-II.

    Parameters
    ----------
    settings
        A :class:`SextupoleSettings` (or a dict / YAML path validated into one).
    store
        Directory of its zarr store (created if absent).
    sinks
        Where derived runs (a summary event per generation) go.
    """

    settings_class = SextupoleSettings

    def __init__(self, settings: SextupoleSettings | dict | str | Path, store: str | Path, *,
                 sinks: Sequence[DocumentSink] = (), _create: bool = True) -> None:
        self.settings = settings = load_settings(SextupoleSettings, settings)
        self.name = settings.name
        self.families = list(settings.families)
        self.axes = [settings.data_key(f) for f in self.families]
        self.sinks = list(sinks)
        self.store = AgentStore.for_agent(store, type(self).__name__, _tables(self.families), settings,
                                          create=_create)
        if _create and self.store.get_attr("run_id") is None:
            self.store.set_attr("run_id", uuid.uuid4().hex[:12])
        self._run_id = str(self.store.get_attr("run_id"))
        self.bounds = np.array([[settings.knobs[k][i] for k in settings.knob_names] for i in (0, 1)])
        self._limits = np.array([[settings.families[f].low for f in self.families],
                                 [settings.families[f].high for f in self.families]])
        self._max_step = np.array([settings.families[f].max_step for f in self.families])
        self.errors: list[str] = []
        self.duplicates = 0
        self.stop_reason: str | None = None
        self._router = stream_router(settings.stream, self._observe_event,
                                     lambda _uid, stop: self._close_derived(stop.get("exit_status", "success")),
                                     on_start=self._open_derived, agent=self.name,
                                     asked=lambda key: any(p["request_key"] == key for p in self._points.values()))
        self._derived: DerivedRunWriter | None = None
        self._load()

    # -- state --------------------------------------------------------------------------------
    def _new_optimizer(self) -> GeneticOptimizer:
        state = self.store.get_attr("optimizer_state")
        lower, upper = self.bounds
        if state:
            return GeneticOptimizer.from_state(state, lower, upper, n_obj=2, n_constr=1)
        s = self.settings
        return GeneticOptimizer(lower, upper, n_obj=2, n_constr=1, config=NSGA2Config(pop_size=s.pop_size),
                                ml=s.ml_moga_config(), seed=s.seed)

    def _load(self) -> None:
        self.optimizer = self._new_optimizer()
        pts = self.store.read("points")
        self._points: dict[str, dict[str, Any]] = {}  # point key -> its last row
        for i, key in enumerate(pts["point_key"]):
            self._points[key] = {c: v[i] for c, v in pts.items()}
        obs = self.store.read("observations")
        self._observed = set(obs["point_key"])
        self._event_uids = set(obs["event_uid"])
        self._n_ramp_observed = int(np.sum(obs["kind"] == "ramp"))
        self._n_measured = int(np.sum(obs["kind"] == "individual"))
        self._last_asked, self._before_request = None, None
        out = self.store.read("outcomes")
        rejected = {r for r, o in zip(out["request_key"], out["outcome"], strict=True) if o.startswith("rejected")}
        for key, request_key in zip(pts["point_key"], pts["request_key"], strict=True):
            if request_key not in rejected:  # the gate's last position: where the last admitted request ended
                self._last_asked = np.array([self._points[key][f"x:{f}"] for f in self.families])
        if self._last_asked is None and self.settings.start is not None:
            self._last_asked = np.array([self.settings.start[f] for f in self.families])
        self._open = False
        asked = self.store.get_attr("generation_asked")
        if asked and int(asked["generation"]) == self.optimizer.generation:
            X = self.optimizer.ask()
            if not np.array_equal(X, np.asarray(asked["X"], dtype=float).reshape(X.shape)):
                raise AgentStoreError(f"{self.store.path}: the optimiser re-asked generation {asked['generation']} "
                                      "differently than stored; the store was written by another version")
            self._open_generation(X)
            self._replay(obs, out)

    def _open_generation(self, X: np.ndarray) -> None:
        g = self.optimizer.generation
        self._open, self._X, self._S = True, X, self.settings.strengths(X)
        self._keys = [f"{self._run_id}:g{g}:{i}" for i in range(len(X))]
        self._index = {k: i for i, k in enumerate(self._keys)}
        self._results: dict[int, tuple[float, float]] = {}
        self._closed: dict[int, str] = {}
        self._tries: dict[int, int] = {}
        self._solo: set[int] = set()
        known = {k for k, o in zip(*(self.store.read("outcomes")[c] for c in ("point_key", "outcome")), strict=True)
                 if o == "out_of_limits"}
        for i, s in enumerate(self._S):
            out = {f: round(float(v), 6) for f, v, lo, hi in zip(self.families, s, *self._limits, strict=True)
                   if not lo <= v <= hi}
            if out:
                self._closed[i] = "out_of_limits"
                if self._keys[i] not in known:
                    self._outcome(i, "out_of_limits", "", f"family strengths {out} outside the families' limits; "
                                  "not sent")

    def _replay(self, obs: dict[str, np.ndarray], out: dict[str, np.ndarray]) -> None:
        """Take up the open generation's observations and outcomes from the store."""
        for j, key in enumerate(obs["point_key"]):
            if key in self._index:
                self._results[self._index[key]] = (float(obs["lifetime"][j]), float(obs["efficiency"][j]))
        for key, outcome in zip(out["point_key"], out["outcome"], strict=True):
            i = self._index.get(key)
            if i is None:
                continue
            if outcome == "error":
                self._tries[i] = self._tries.get(i, 0) + 1
            elif outcome == "rejected-batch":
                self._solo.add(i)
            elif outcome in _CLOSING:
                self._closed[i] = outcome

    def _outcome(self, i: int, outcome: str, request_key: str, reason: str) -> None:
        self.store.append("outcomes", {"generation": [float(self.optimizer.generation)], "point_key": [self._keys[i]],
                                       "request_key": [request_key], "outcome": [outcome], "reason": [reason]})
        if outcome in _CLOSING:
            self._closed[i] = outcome
            self.errors.append(f"individual {self._keys[i]}: {reason}")

    @property
    def n_observations(self) -> int:
        """Individuals measured (ramp points not counted)."""
        return self._n_measured

    def _todo(self) -> list[int]:
        if not self._open:
            return []
        return [i for i in range(len(self._keys)) if i not in self._results and i not in self._closed]

    def pending(self) -> list[str]:
        """Keys of the open generation's individuals neither measured nor given up."""
        return [self._keys[i] for i in self._todo()]

    # -- tell ---------------------------------------------------------------------------------
    def tell(self, name: str, doc: dict[str, Any]) -> None:
        self._router(name, doc)

    def _observe_event(self, run_uid: str, event: dict) -> None:
        data = event["data"]
        key = str(data.get(POINT_KEY, ""))
        where = f"run {run_uid}, event seq_num {event.get('seq_num')}"
        point = self._points.get(key)
        if point is None:
            self.errors.append(f"{where}: point key {key!r} is not one this agent asked for; the event is ignored")
            return
        i = self._index.get(key) if self._open else None
        if key in self._observed or event["uid"] in self._event_uids or (
                point["kind"] == "individual" and (i is None or i in self._results or i in self._closed)):
            self.duplicates += 1
            return
        names = {self.settings.data_key(self.settings.lifetime): "lifetime",
                 self.settings.data_key(self.settings.efficiency): "efficiency"}
        values = {v: float(data.get(k, math.nan)) for k, v in names.items()}
        if point["kind"] == "individual" and not all(math.isfinite(v) for v in values.values()):
            self._lost_reading(i, key, where, names, data)
            return
        row = {c: [point[c]] for c in (*(f"x:{f}" for f in self.families), "generation", "index", "kind")}
        row.update({"lifetime": [values["lifetime"]], "efficiency": [values["efficiency"]],
                    "seq_num": [float(event.get("seq_num", -1))], "time": [float(event["time"])],
                    "point_key": [key], "event_uid": [event["uid"]], "run_uid": [run_uid]})
        self.store.append("observations", row)  # persist first, then mirror in memory
        self._observed.add(key)
        self._event_uids.add(event["uid"])
        if point["kind"] == "ramp":
            self._n_ramp_observed += 1
            return
        self._n_measured += 1
        self._results[i] = (values["lifetime"], values["efficiency"])
        self._finish_generation()

    def _lost_reading(self, i: int, key: str, where: str, names: dict[str, str], data: dict) -> None:
        shown = ", ".join(f"{k}={data[k]!r}" if k in data else f"{k} missing" for k in names)
        tries = self._tries.get(i, 0) + 1
        err = ObservationError(f"{where}: {shown} (a lost reading?) at individual {key}; failed reading {tries} "
                               f"of at most {self.settings.max_retries + 1}, it is measured again while tries remain")
        self.errors.append(str(err))
        logger.warning("%s", err)
        self._tries[i] = tries
        self._outcome(i, "error", "", str(err))
        if tries > self.settings.max_retries:
            self._outcome(i, "failed", "", f"gave up after {tries} failed readings; told as infeasible")
            self._finish_generation()

    def rejected(self, request: PlanRequest, reason: str) -> None:
        """The safety gate refused ``request``: its individuals are asked again alone, or, if it
        held only one, closed as infeasible."""
        individuals = [self._index[k] for k in request.kwargs.get("point_keys", ()) if self._open and k in self._index]
        outcome = "rejected" if len(individuals) == 1 else "rejected-batch"
        for i in individuals:
            self._outcome(i, outcome, request.key, f"safety gate: {reason}")
            if outcome == "rejected-batch":
                self._solo.add(i)
        if self._before_request is not None and self._before_request[0] == request.key:
            self._last_asked = self._before_request[1]  # the gate did not move
        self._finish_generation()

    # -- generations --------------------------------------------------------------------------
    def _finish_generation(self) -> None:
        """Tell the optimiser a generation whose every individual is measured or given up."""
        if not self._open or self._todo():
            return
        F = np.zeros((len(self._X), 2))  # given up: the worst objectives (nothing lives, nothing injects)
        G = np.ones((len(self._X), 1))
        for i, (lifetime, efficiency) in self._results.items():
            F[i], G[i] = (-lifetime, -efficiency), 0.0
        self.optimizer.tell(self._X, F, G)
        self.store.set_attr("optimizer_state", self.optimizer.state())
        self._open = False
        if self._derived is not None:
            self._derived.emit("generation", self._summary())

    def _next_generation(self) -> bool:
        """Open the next generation unless the budget is spent (then set ``stop_reason``)."""
        while not self._open:
            g = self.optimizer.generation
            if g >= self.settings.generations:
                self.stop_reason = (f"budget spent: {g} generations of a budget of {self.settings.generations} "
                                    f"({self.n_observations} individuals measured)")
                return False
            X = self.optimizer.ask()
            self.store.set_attr("generation_asked", {"generation": g, "X": X.tolist()})
            self._open_generation(X)
            self._finish_generation()  # a generation wholly out of limits is told at once
        return True

    # -- ask ----------------------------------------------------------------------------------
    def ask(self, n: int) -> list[PlanRequest]:
        if n < 1:
            raise ValueError(f"ask(n) needs n >= 1, got {n=}")
        self.stop_reason = None
        self._finish_generation()
        if not self._next_generation():
            return []
        todo = self._todo()
        path = [todo[j] for j in nearest_neighbour_path(self._last_asked, self._S[todo], self._max_step)]
        solo = [i for i in path if i in self._solo]
        return [self._request(solo[:1] or path[:n])]

    def _request(self, individuals: list[int]) -> PlanRequest:
        request_key = uuid.uuid4().hex
        rows: list[tuple[np.ndarray, str, int]] = []
        here = self._last_asked
        for i in individuals:
            if here is not None:
                rows += [(p, "ramp", -1) for p in ramp(here, self._S[i], self._max_step)]
            rows.append((self._S[i], "individual", i))
            here = self._S[i]
        keys = [self._keys[i] if kind == "individual" else f"{request_key}:ramp{j}"
                for j, (_, kind, i) in enumerate(rows)]
        table: dict[str, list] = {f"x:{f}": [float(p[c]) for p, _, _ in rows] for c, f in enumerate(self.families)}
        table.update({"generation": [float(self.optimizer.generation)] * len(rows), "index": [float(i) for *_, i in rows],
                      "time": [time.time()] * len(rows), "point_key": keys, "request_key": [request_key] * len(rows),
                      "kind": [kind for _, kind, _ in rows]})
        self.store.append("points", table)  # persist before anyone sees the request
        for j, key in enumerate(keys):
            self._points[key] = {c: v[j] for c, v in table.items()}
        self._before_request = (request_key, self._last_asked)
        self._last_asked = np.asarray(here, dtype=float)
        points = [{a: float(p[c]) for c, a in enumerate(self.axes)} for p, _, _ in rows]
        return PlanRequest("measure", kwargs={"points": points, "point_keys": keys}, key=request_key, agent=self.name)

    # -- report -------------------------------------------------------------------------------
    def pareto_front(self) -> list[dict[str, Any]]:
        """The feasible non-dominated settings so far: knobs, family strengths, both objectives."""
        X, F = self.optimizer.pareto_front()
        S = self.settings.strengths(X) if len(X) else np.empty((0, len(self.families)))
        return [{"knobs": dict(zip(self.settings.knob_names, x.tolist(), strict=True)),
                 "settings": dict(zip(self.axes, s.tolist(), strict=True)),
                 "lifetime": -float(f[0]), "injection_efficiency": -float(f[1])}
                for x, s, f in zip(X, S, F, strict=True)]

    def hypervolume(self) -> float:
        """Area (hours x efficiency) the Pareto front dominates above zero lifetime and efficiency."""
        return hypervolume(self.optimizer.pareto_front()[1], (0.0, 0.0))

    def _summary(self) -> dict[str, Any]:
        front = self.pareto_front()
        return {"generation": self.optimizer.generation, "evaluations": self.n_observations,
                "hypervolume": self.hypervolume(), "n_front": len(front),
                "best_lifetime": max((p["lifetime"] for p in front), default=math.nan),
                "best_efficiency": max((p["injection_efficiency"] for p in front), default=math.nan)}

    def report(self) -> dict[str, Any]:
        outcomes = self.store.read("outcomes")
        counts = {o: int(np.sum(outcomes["outcome"] == o)) for o in ("failed", "rejected", "out_of_limits")}
        rejected_requests = {r for r, o in zip(outcomes["request_key"], outcomes["outcome"], strict=True)
                             if o.startswith("rejected")}
        return {
            "agent": self.name, "kind": type(self).__name__, **self._summary(),
            "generations": self.settings.generations, "pareto_front": self.pareto_front(),
            "ramp_points_measured": self._n_ramp_observed, "infeasible": counts,
            "rejected_requests": len(rejected_requests), "pending": len(self.pending()),
            "stop_reason": self.stop_reason, "errors": list(self.errors), "duplicates_ignored": self.duplicates,
            "optimizer": self.optimizer.report(),
        }

    def to_json(self) -> str:
        """The report as JSON (for logs and the daemon's health endpoint)."""
        return json.dumps(self.report(), default=float)

    # -- derived documents --------------------------------------------------------------------
    def _open_derived(self, start: dict) -> None:
        if not self.sinks:
            return
        self._close_derived("success")
        self._derived = DerivedRunWriter(self.sinks, raw_run_uid=start["uid"],
                                         metadata={"agent": self.name, "analysis": "sextupole-pareto"})
        self._derived.add_stream("generation", {k: {"dtype": "number", "shape": [], "source": self.name}
                                                for k in self._summary()})


"""``TuningAgent``: Bayesian optimisation of beamline settings, one plan on the RunEngine per batch.

The agent maximises an objective read from each event (the flux) subject to an upper limit on
another reading (the beam size), over the axes of its settings. Asked for ``n`` points it returns
one ``measure`` request: first a scrambled Sobol design, then batches chosen by constrained qLogNEI
(:class:`models.bo.BayesOptimizer`), so :func:`agents.plans.steered_scan` and the safety gate run
it unchanged. The GP models ``ln(flux)`` (flux spans decades and is positive) and
``ln(beam_size / required)`` (feasible when <= 0), with the readings' noise known from the
settings (an instrument's specification) or inferred. Every ``local_every``-th decision searches
only near the current recommendation (a trust region around the incumbent, as in TuRBO); by
default every decision does. The region is a ball: the settings within Euclidean distance
``local_radius`` (0.25) of the recommendation, in units of each axis's range. When the
recommendation sits at an axis's limit, every other local decision is a probe: it searches only
at least ``limit_probe`` (0.1) of the range inside that limit. Why both, and what was measured,
is in the paragraphs below; until 2026-12-07 the region was a box of 0.15 of each range either
side, with no probes, and the figures before that date are for the box. Searched over the whole box,
qLogNEI after a small design keeps spending evaluations on corners the model knows little about (on
the optics of ``benchmarks/tuning.py``, 45% of its global steps measured beam sizes over 15 µm for
a 12 µm requirement, and 7% came within 10% of the optimum, against 4% and 32% of the local ones),
while the optimum lies on the constraint's boundary and is refined by steps near it. The feasible
region itself is still searched for over all the limits: without a recommendation there is no box
to search in. On the tuning seeds of that benchmark (100-109), with every decision local the agent
came within 5% of the optimum in <= 30 evaluations on 7 of 10 seeds on the optics and 6 of 10 on
Hartmann-6, against 4 and 5 of 10 with every 2nd decision local; boxes of 0.1 or 0.25 of the
ranges, or one that grows and shrinks by TuRBO's rule, did no better. Re-measured on the current
code: 9 of 10 (optics, median 24 evaluations) and 7 of 10 (Hartmann-6, median 28). None of these
did better (seeds within 5% by 30, Hartmann-6 / optics; -: not run): in the box, every 2nd step
maximising the posterior mean (4 / -) or every step a Thompson sample over 1024 Sobol candidates
(3 / -); a box weighted by the GP's lengthscales as in TuRBO (5 / -); 12 restarts and 1024 raw
samples for the acquisition (4 / -); 6 initial points (7 / -); a Matern-5/2 kernel with the
dimension-scaled lengthscale prior (8 / 7), or with botorch's former Gamma(3, 6) lengthscale and
Gamma(2, 0.15) outputscale priors (8 / 8; medians 26 / 20.5; with 6 initial points 8 / 5, with a
box of 0.2 7 / -, with the box centred on the best point feasible with probability >= 0.5 - / 7);
an RBF kernel with those Gamma priors (7 / -). Gains on one problem came with losses on the other,
all within the spread of ten seeds. The recommendation is the evaluated setting with the best
posterior-mean objective among those feasible with probability >= ``recommend_p_feasible``. It is
not what holds Hartmann-6 back: on seeds 100-109, after 20, 25, 30, 35 and 40 evaluations, its
true value was within 2% of the best evaluated point's in 48 of those 50 cases (not: seed 103 at
30 and 35, 0.78 and 0.82 of the optimum against 0.835), and at 30 the same 6 of 10 runs were
within 5% of the optimum either way; the search itself gets there late.

Re-measured on 2026-12-04 on more seeds (within 5% by 30 evaluations): Hartmann-6 24 of 40
(seeds 100-139), optics 11 of 20 (100-119); with the Matérn-5/2 kernel and Gamma priors above
25 of 40 and 13 of 20, with a Kumaraswamy input warping 4 of 20 (Hartmann-6): neither adopted.
What holds Hartmann-6 back is one trap: of the 11 runs (of 100-139) not within 5% after 40
evaluations, 9 settled in the basin of its second maximum (3.2032, at x = (0.405, 0.882, 0.846,
0.574, 0.139, 0.0385): itself within 5%) with x6 at its lower limit, where the best value is
3.1377, 0.944 of the optimum. That peak lies 0.04 of the range inside the limit, much closer
than the GP's lengthscale in x6 (0.4-0.6 of the range) resolves at this noise (0.05, the size of
the difference), so every local step keeps x6 at the limit. Fitting the local steps' GP only to
the observations inside the box, or inside twice its size (as TuRBO's local models do), did not
free them: 11 and 12 of 20 (seeds 100-119; the defaults 11), the trapped runs still trapped.
Measured 2026-12-06 on seeds 100-139 (within 5% by 30; the defaults 25 of 40): a quadratic prior
mean (``c + sum_i l_i x_i + a_i x_i^2`` per outcome, Normal(0, 2) priors on the coefficients), so
the model can hold an optimum inside the limits, 12 of 40 (and each fit 2.5 times slower); the
local box kept at its full width where it meets a limit (shifted inward, not cut), 19 of 40; the
noise inferred rather than given, 19 of 40. None adopted. In each, about half of the runs not
there by 30 ended with some coordinate at a limit. The size of the initial design (stop 40, same
seeds and measure): ``n_initial`` 4 / 6 / 10 / 12 gave 24 / 21 / 17 / 14 of 40, against the
default 8's 24-25: a larger design finds the global basin no more often and leaves fewer local
steps. Not changed. Measured 2026-12-07, same seeds and measure (the defaults 24 of 40; 10 of
the 16 others ended with x6 at its lower limit): the first 4 model-based decisions over the whole
box, then local, 19 of 40 (7 at the limit); a box of 0.3 of the ranges until 20 evaluations, then
0.15, 21 (6); a second trust region, as in TuRBO-m (until the 10th model-based decision, every
2nd searched around the best-modelled evaluated point at a Euclidean distance of at least 0.5,
in units of each axis's range, from the recommendation), 17 (9). The first two leave fewer runs
at the limit but spend evaluations that the runs in the right basin needed to get within 5%;
none adopted. The trap is one of resolution as much as of the limit: qLogNEI's optimum lies on
the local box's edges, so the steps move coordinates by whole box half-widths (0.15 of the
range), too coarse to find a peak 0.04 inside a limit. Local boxes alternating between 0.15
and 0.05 of the ranges freed nearly every trapped run (1 of 40 ended at the limit, against 10)
and 33 of 40 got within 5% by 40 evaluations (the defaults 29), but by 30 it was 24 of 40 again
(the finer steps slow the climb), and on the optics 10 of 20 (seeds 100-119; the defaults 11).
Also measured: 0.15, 0.15, 0.05 in turn 21 of 40 (36 by 40); 0.15 until 20 evaluations, then
alternating, 20; a box of 0.05 after each step that did not become the recommendation (TuRBO's
shrink, at once) 14; the recommendation (and box centre) moved to the posterior mean's maximum
over a box of 0.15 around the best evaluated point, 18 (its final values are better: 0.98-0.996
of the optimum at 40 on seeds 100-105). None adopted.

The ball and the probes (2026-12-07). Traced runs showed two ways the box wasted evaluations.
qLogNEI rewards uncertainty, which is largest at a box's corners, so a step moved every
coordinate by the full half-width at once, also the ones the model already had right: the runs
climbed like a sign-gradient method and could not refine. In a ball the step's length is shared
out by the acquisition's own gradient. And a coordinate whose optimum lies a little inside a
limit (on Hartmann-6, x2 at 0.15 of the global maximum, x6 at 0.04 of the second) went to the
limit in the first local steps, where the GP, fitted to the design's far points, extrapolates a
trend; with data on one side only, it stayed there for 10-20 evaluations (seeds 100, 113). A
probe measures the other side. Same seeds and measure as above (runs within 5% by 30 and by 40
evaluations; median fraction of the optimum at 30 and at 40): on Hartmann-6 (100-139) the box
24 / 29 (0.958, 0.986); balls of radius 0.18, 0.25 and 0.37 without probes 21 / 33, 24 / 34 and
12 / 23; the ball of 0.25 with probes 25 / 35 (0.960, 0.988) as first measured, through a
patch, and 27 / 34 (0.961, 0.990) as committed. On the optics (100-119) the box 11 / 15 (0.948,
0.969), the ball of 0.25 with probes 12 / 15 (0.956, 0.974) through the patch and 10 / 14
(0.950, 0.968) as committed. The patch computed the same ball in another order of floating-point
operations: the runs are chaotic, so a difference of two or three runs in 40 is noise. Adopted
for what it does by 40 on Hartmann-6 (5 or 6 more runs within 5%), with the optics within that
noise. It costs some runs: seed 107, within 5% by 26 in the box, climbed slowly in the ball
(0.49-0.64 of the optimum at 30). It does not bring Hartmann-6 within 5% by 30 much more often.

Log-scale axes (2026-12-07). An axis with ``scale: "log"`` (:class:`TuningAxis`) is designed,
modelled and searched in ``ln(value)``: the Sobol design spreads over its decades, the GP's input
is ``ln`` of the setting, and the ball's radius and ``limit_probe`` are fractions of its range in
``ln``; requests, observations, recommendations and step limits stay in the axis's units. This is
how a setting that acts multiplicatively over decades is usually given to an optimiser (Ax's
``log_scale`` parameters). Slit gaps are such settings: flux and spot size vary with the gap's
logarithm near closed slits. Fitted in the linear gap, the GP's lengthscale for ``ln(flux)`` along
``slit_h`` came out at 0.05 of the range (optics seed 110 after 40 evaluations; 0.39 along the
pitch), so it modelled the whole axis at the resolution the narrowest gaps need; with ``slit_h``
and ``slit_v`` on a log scale it came out at 0.42 and 0.72 (0.05 and 0.41 linear). The demo gives
both slit axes a log scale (:data:`agents.demo_tune.LOG_SCALE_AXES`). On the optics of
``benchmarks/tuning.py`` (runs within 5% of the optimum by 30 and by 40 evaluations; median
fraction of the optimum at 30 and at 40): seeds 100-119 14 / 20 (0.962, 0.978) against 10 / 14
(0.950, 0.968) linear, seeds 120-139 15 / 20 (0.965, 0.984) against 12 / 17 (0.961, 0.974); every
one of the 40 runs got there by 40. Driven through :func:`tune_function` (no RunEngine, no step
limits, seeds 100-119): 13 / 16 against 6 / 9. Checked afterwards on seeds 3-14 (used for
nothing else; 3 is the demo's): 6 / 10 (0.950, 0.981) against 6 / 11 (0.944, 0.974), no better by
30, and seed 3 itself worse (0.77 of the optimum at 30, against 0.95). Over all 52 seeds 35 / 50
against 28 / 42. Hartmann-6 has no such axis and is unchanged.

Safety: the agent searches only inside its axes' limits, and when an axis has a ``max_step`` it
searches only where the step is allowed: a batch of one within ``max_step`` of the last point it
asked for, a larger batch within ``max_step / 2`` (so every step inside the batch is allowed too),
and the initial design within ``max_step / 2`` of ``start`` (else of where a steered scan read the
axes to be, else of the middle of the limits). A
request the gate rejects anyway is reported, its points closed, and they are given to the
acquisition as pending points so the next proposal looks elsewhere.

Bad input: an event whose objective or constraint is NaN (a lost reading), missing or not
positive is named by run uid and ``seq_num``, and its point is measured again, with the same key,
up to ``max_retries`` times, then given up and reported. The agent stops, with the reason in
``report()["stop_reason"]``, when its budget of evaluations is spent, when the expected
improvement stays below ``converge_tol`` for ``converge_patience`` decisions, or when no
evaluation met the constraint and the model gives no setting a probability of feasibility above
``min_p_feasible``.

Everything is persisted as it happens (observations on ``tell``; decisions before ``ask``
returns; the recommendation and the GP's hyper-parameters after each fit), so
:meth:`TuningAgent.resume` continues where a killed process stopped, asking first for the points
that were asked for but never measured, with their original keys.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
from pydantic import Field, model_validator

from agents.config import _Strict, load_settings
from agents.errors import ObservationError
from agents.plans import POINT_KEY
from agents.protocol import PlanRequest
from agents.runs import stream_router
from agents.steering import StoredAgent
from agents.store import AgentStore
from models.bo import BayesOptimizer, BOConfig, sobol_design
from models.errors import ModelError
from streams.derived import DerivedRunWriter
from streams.protocols import DocumentSink

__all__ = ["ObservationError", "TuningAgent", "TuningAxis", "TuningKeys", "TuningSettings", "tune_function"]

logger = logging.getLogger(__name__)

_N_SOBOL = 1024  # candidates on which the probability of feasibility is judged
_AT_LIMIT = 1e-6  # a recommendation this close to a limit (a fraction of the range) sits at it


class TuningAxis(_Strict):
    """Limits of one axis the agent may move, its largest allowed step (as in the gate), and the
    scale it is searched on: ``"log"`` for a setting that acts multiplicatively over a range of
    decades (a slit gap, an exposure time), where the model and the search see ``ln(value)``."""

    low: float
    high: float
    max_step: float | None = Field(default=None, gt=0)
    scale: Literal["linear", "log"] = "linear"

    @model_validator(mode="after")
    def _ordered(self) -> TuningAxis:
        if not (math.isfinite(self.low) and math.isfinite(self.high) and self.low < self.high):
            raise ValueError(f"need finite low < high, got low={self.low}, high={self.high}")
        if self.scale == "log" and self.low <= 0:
            raise ValueError(f"scale 'log' needs low > 0, got low={self.low}: give a positive lower limit or scale 'linear'")
        return self


class TuningKeys(_Strict):
    """Event data keys of the objective (maximised) and the constrained reading, and the stream."""

    objective: str = "optics_flux"
    constraint: str = "optics_beam_size"
    stream: str = "primary"


class TuningSettings(_Strict):
    """Settings of :class:`TuningAgent`.

    ``axes`` maps each axis name (as the steered scan's ``axes`` mapping names it) to its limits;
    ``required_beam_size`` is the upper limit of ``keys.constraint`` (``None``: unconstrained).
    ``budget`` counts evaluations (successful readings); ``n_initial`` of them are a Sobol design.
    ``log_objective``: model ``ln(objective)`` (for a positive quantity spanning decades, like
    flux; readings must then be > 0) rather than the objective itself.
    ``objective_noise``/``constraint_noise``: the readings' known rms noise, relative (as they are
    modelled in logs; absolute for an objective with ``log_objective: false``); ``None``: inferred.
    Give both or neither when there is a constraint.
    ``start``: the beamline's current settings (default: as read by the steered scan, else the
    middle of the limits); the initial design lies within ``max_step / 2`` of it. ``max_retries``:
    re-measurements of a lost reading.
    ``converge_tol``/``converge_patience``: stop when qLogNEI's expected improvement (of
    ``ln(objective)``, so relative, with ``log_objective``) stays below the tolerance for that many
    decisions in a row that searched the whole box (a local one cannot tell: there may be more to
    gain outside it, so with every decision local the budget is spent); ``None`` never stops early.
    ``infeasible_after`` (default ``2 n_initial``) evaluations with none meeting the constraint, and
    no setting with a modelled probability of feasibility above ``min_p_feasible``, stop the agent.
    ``recommend_p_feasible``: what the recommendation needs. ``local_every`` (0 turns local steps
    off), ``local_radius`` (the trust region's radius, in units of each axis's range) and
    ``limit_probe`` (how far inside a limit a probe step searches, a fraction of the range;
    ``None``: no probes), both of the range of ``ln(value)`` on an axis with ``scale: "log"``:
    see the module docs. ``acq_restarts``, ``acq_raw_samples``,
    ``mc_samples``: the acquisition optimiser's effort. ``seed``: design and samplers.
    """

    name: str = "tuning"
    axes: dict[str, TuningAxis] = Field(min_length=1)
    keys: TuningKeys = Field(default_factory=TuningKeys)
    required_beam_size: float | None = Field(default=None, gt=0)
    log_objective: bool = True
    objective_noise: float | None = Field(default=None, gt=0)
    constraint_noise: float | None = Field(default=None, gt=0)
    start: dict[str, float] | None = None
    batch_size: int = Field(default=1, ge=1, le=32)
    budget: int = Field(default=40, ge=2)
    n_initial: int = Field(default=8, ge=2)
    max_retries: int = Field(default=2, ge=0)
    converge_tol: float | None = Field(default=1e-3, gt=0)
    converge_patience: int = Field(default=3, ge=1)
    min_p_feasible: float = Field(default=1e-3, gt=0, lt=1)
    infeasible_after: int | None = Field(default=None, ge=2)
    recommend_p_feasible: float = Field(default=0.9, gt=0, lt=1)
    local_every: int = Field(default=1, ge=0)
    local_radius: float = Field(default=0.25, gt=0, le=2)
    limit_probe: float | None = Field(default=0.1, gt=0, lt=0.5)
    acq_restarts: int = Field(default=6, ge=1)
    acq_raw_samples: int = Field(default=256, ge=8)
    mc_samples: int = Field(default=128, ge=8)
    seed: int = 0

    @model_validator(mode="after")
    def _consistent(self) -> TuningSettings:
        if self.required_beam_size is not None and (self.objective_noise is None) != (self.constraint_noise is None):
            raise ValueError("give both objective_noise and constraint_noise, or neither (then both are inferred)")
        if self.n_initial > self.budget:
            raise ValueError(f"n_initial={self.n_initial} exceeds budget={self.budget}")
        if self.start is not None:
            unknown = sorted(set(self.start) - set(self.axes))
            missing = sorted(set(self.axes) - set(self.start))
            if unknown or missing:
                raise ValueError(f"start must give every axis and only those: unknown {unknown}, missing {missing}")
            out = {a: v for a, v in self.start.items() if not self.axes[a].low <= v <= self.axes[a].high}
            if out:
                raise ValueError(f"start values {out} are outside the axes' limits")
        return self

    @property
    def axis_names(self) -> list[str]:
        return list(self.axes)


def _tables(axes: Sequence[str]) -> dict[str, dict[str, Any]]:
    x = {f"x:{a}": "f8" for a in axes}
    return {
        "observations": {**x, "objective": "f8", "constraint": "f8", "seq_num": "f8", "time": "f8",
                         "point_key": str, "event_uid": str, "run_uid": str},
        "decisions": {**x, "log_acq": "f8", "time": "f8", "point_key": str, "request_key": str, "why": str},
        "outcomes": {"point_key": str, "outcome": str, "reason": str},  # error / failed / rejected
        "recommendations": {**x, "n_observations": "f8", "predicted_objective": "f8",
                            "p_feasible": "f8", "point_key": str},
    }


class TuningAgent(StoredAgent):
    """Maximises flux at a required beam size by constrained Bayesian optimisation.

    Parameters
    ----------
    settings
        A :class:`TuningSettings` (or a dict / YAML path validated into one).
    store
        Directory of its zarr store (created if absent).
    sinks
        Where derived runs (each recommendation as an event) go.
    """

    settings_class = TuningSettings

    def __init__(
        self,
        settings: TuningSettings | dict | str | Path,
        store: str | Path,
        *,
        sinks: Sequence[DocumentSink] = (),
        _create: bool = True,
    ) -> None:
        self.settings = settings = load_settings(TuningSettings, settings)
        self.name = settings.name
        self.axes = settings.axis_names
        self.sinks = list(sinks)
        self.store = AgentStore.for_agent(store, type(self).__name__, _tables(self.axes), settings, create=_create)
        lows = [settings.axes[a].low for a in self.axes]
        highs = [settings.axes[a].high for a in self.axes]
        self.bounds = np.array([lows, highs])
        self._log = np.array([settings.axes[a].scale == "log" for a in self.axes])
        self._zbounds = self._to_z(self.bounds)
        self.optimizer = BayesOptimizer(
            self._zbounds, n_constraints=int(settings.required_beam_size is not None),
            config=BOConfig(num_restarts=settings.acq_restarts, raw_samples=settings.acq_raw_samples,
                            mc_samples=settings.mc_samples, seed=settings.seed),
        )
        self.errors: list[str] = []
        self.duplicates = 0
        self.stop_reason: str | None = None
        self._router = stream_router(settings.keys.stream, self._observe_event,
                                     lambda _uid, stop: self._close_derived(stop.get("exit_status", "success")),
                                     on_start=self._open_derived, agent=self.name,
                                     asked=lambda key: key in self._dec["request_key"])
        self._derived: DerivedRunWriter | None = None
        self._load()

    # -- state --------------------------------------------------------------------------------
    def _load(self) -> None:
        self._obs = {k: list(v) for k, v in self.store.read("observations").items()}
        self._dec = {k: list(v) for k, v in self.store.read("decisions").items()}
        self._index = {k: i for i, k in enumerate(self._dec["point_key"])}
        self._done = set(self._obs["point_key"])
        self._event_uids = set(self._obs["event_uid"])
        out = self.store.read("outcomes")
        self._closed: dict[str, str] = {}
        self._tries: dict[str, int] = {}
        for key, outcome in zip(out["point_key"], out["outcome"], strict=True):
            if outcome == "error":
                self._tries[key] = self._tries.get(key, 0) + 1
            else:
                self._closed[key] = outcome
        state = self.store.get_attr("model_state") or {}
        if state.get("bo"):
            self.optimizer.load_state(state["bo"])
        self._quiet = int(state.get("quiet_decisions", 0))
        self._last_asked = self._last_point()
        self._before_request: tuple[str, np.ndarray | None] | None = None
        self._axes_at: np.ndarray | None = None

    def observe_positions(self, positions: Mapping[str, float]) -> None:
        """Where the axes are now (read by :func:`~agents.plans.steered_scan` before the first
        request). Without ``start`` in the settings the initial design is centred here (inside the
        limits), and until the agent has asked for a point its steps are measured from here."""
        if all(a in positions for a in self.axes):
            here = np.clip([float(positions[a]) for a in self.axes], self.bounds[0], self.bounds[1])
            self._axes_at = here
            if self._last_asked is None:
                self._last_asked = here

    def _last_point(self) -> np.ndarray | None:
        """Where the last request that was not rejected ended (the gate's last position)."""
        for i in range(len(self._dec["point_key"]) - 1, -1, -1):
            if self._closed.get(self._dec["point_key"][i]) != "rejected":
                return self._x(i)
        return None

    def _to_z(self, X: np.ndarray) -> np.ndarray:
        """Settings (axis units) to the coordinates the model and the search see (``ln`` on log axes)."""
        return np.where(self._log, np.log(np.where(self._log, X, 1.0)), X)

    def _to_x(self, Z: np.ndarray) -> np.ndarray:
        """The search's coordinates back to settings, kept inside the limits against round-off."""
        return np.clip(np.where(self._log, np.exp(np.where(self._log, Z, 0.0)), Z), self.bounds[0], self.bounds[1])

    def _x(self, i: int, table: dict[str, list] | None = None) -> np.ndarray:
        t = self._dec if table is None else table
        return np.array([t[f"x:{a}"][i] for a in self.axes])

    @property
    def n_observations(self) -> int:
        return len(self._obs["point_key"])

    def pending(self) -> list[str]:
        """Keys of points asked for, not yet measured, not given up or rejected."""
        return [k for k in self._dec["point_key"] if k not in self._done and k not in self._closed]

    def observations(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``X`` (`n x d`, axis units), objective `n` and constraint `n` of every evaluation."""
        X = np.array([[self._obs[f"x:{a}"][i] for a in self.axes] for i in range(self.n_observations)])
        return X.reshape(-1, len(self.axes)), np.asarray(self._obs["objective"]), np.asarray(self._obs["constraint"])

    # -- tell ---------------------------------------------------------------------------------
    def tell(self, name: str, doc: dict[str, Any]) -> None:
        self._router(name, doc)

    def _observe_event(self, run_uid: str, event: dict) -> None:
        key = str(event["data"].get(POINT_KEY, ""))
        try:
            row = self._parse(run_uid, event, key)
        except ObservationError as err:
            if key in self._index:
                self._failed_reading(key, err)
            else:  # not one of ours: named, nothing to retry
                self.errors.append(str(err))
                logger.warning("%s", err)
            return
        if row is not None:
            self.store.append("observations", row)  # persist first, then mirror in memory
            for column, values in row.items():
                self._obs[column].extend(values)
            self._done.add(key)
            self._event_uids.add(event["uid"])

    def _parse(self, run_uid: str, event: dict, key: str) -> dict[str, list] | None:
        data, keys = event["data"], self.settings.keys
        where = f"run {run_uid}, event seq_num {event.get('seq_num')}"
        if key not in self._index:
            raise ObservationError(
                f"{where}: point key {key!r} is not one this agent asked for; the event is ignored"
            )
        if key in self._done or event["uid"] in self._event_uids:
            self.duplicates += 1
            return None
        wanted = [keys.objective] + ([keys.constraint] if self.settings.required_beam_size else [])
        missing = [k for k in wanted if k not in data]
        if missing:
            raise ObservationError(f"{where}: no data keys {missing}; set keys.* in the settings to this detector's names")
        values = {k: float(data[k]) for k in wanted}
        positive = {keys.constraint, *([keys.objective] if self.settings.log_objective else [])}
        bad = {k: v for k, v in values.items() if not math.isfinite(v) or (k in positive and v <= 0)}
        if bad:
            tries = self._tries.get(key, 0) + 1
            shown = ", ".join(f"{k}={v!r}" for k, v in bad.items())
            raise ObservationError(
                f"{where}: {shown} is NaN or not positive (a lost reading?) at point {key}; "
                f"failed reading {tries} of at most {self.settings.max_retries + 1}, the point will be "
                "measured again while tries remain"
            )
        i = self._index[key]
        constraint = values.get(keys.constraint, float("nan"))
        row: dict[str, list] = {f"x:{a}": [self._dec[f"x:{a}"][i]] for a in self.axes}
        row.update({
            "objective": [values[keys.objective]], "constraint": [constraint],
            "seq_num": [float(event.get("seq_num", -1))], "time": [float(event["time"])],
            "point_key": [key], "event_uid": [event["uid"]], "run_uid": [run_uid],
        })
        return row

    def _close(self, key: str, outcome: str, reason: str) -> None:
        self._closed[key] = outcome
        self.store.append("outcomes", {"point_key": [key], "outcome": [outcome], "reason": [reason]})
        self.errors.append(f"point {key}: {reason}")

    def rejected(self, request: PlanRequest, reason: str) -> None:
        """The safety gate refused ``request``: its points are closed, not retried."""
        for key in request.kwargs.get("point_keys", ()):
            self._close(key, "rejected", f"safety gate: {reason}")
        if self._before_request is not None and self._before_request[0] == request.key:
            self._last_asked = self._before_request[1]  # the gate did not move

    # -- ask ----------------------------------------------------------------------------------
    def ask(self, n: int) -> list[PlanRequest]:
        if n < 1:
            raise ValueError(f"ask(n) needs n >= 1, got {n=}")
        self.stop_reason = None  # judged afresh on every ask
        pending = self.pending()
        if pending:
            keys = pending[:n]
            request_key = f"{self._dec['request_key'][self._index[keys[0]]]}:retry{self.n_observations}"
            return [self._request(keys, request_key)]
        n_initial = sum(w == "initial" for w in self._dec["why"])
        if self.n_observations >= self.settings.budget:
            self._decide_with_model(0)  # the final recommendation uses every evaluation
            self.stop_reason = self.stop_reason or (
                f"budget spent: {self.n_observations} evaluations of a budget of {self.settings.budget}"
            )
            return []
        room = self.settings.budget - self.n_observations
        if n_initial < self.settings.n_initial or np.sum(np.isfinite(self.observations()[1])) < 2:
            X = self._initial_design(n_initial, min(n, room, max(self.settings.n_initial - n_initial, 1)))
            return [self._new_request(X, "initial", [float("nan")] * len(X))]
        q = min(n, self.settings.batch_size, room)
        decided = self._decide_with_model(q)
        if decided is None:
            return []
        suggestion, why = decided
        return [self._new_request(suggestion.X, why, [suggestion.log_acq] * len(suggestion.X))]

    def _initial_design(self, start: int, m: int) -> np.ndarray:
        """Points ``start .. start+m`` of the agent's Sobol design (extended if points failed)."""
        box = self._to_z(self._step_box(self._anchor_for_design(), halve=True))
        total = max(self.settings.n_initial, start + m)
        design = sobol_design(box, 1 << max(total - 1, 1).bit_length(), seed=self.settings.seed)
        return self._to_x(design[start : start + m])

    def _anchor_for_design(self) -> np.ndarray:
        if self.settings.start is not None:
            return np.array([self.settings.start[a] for a in self.axes])
        if self._axes_at is not None:
            return self._axes_at
        return self.bounds.mean(axis=0)

    def _step_box(self, anchor: np.ndarray | None, *, halve: bool) -> np.ndarray:
        """The limits, narrowed around ``anchor`` to what each axis's max_step allows."""
        box = self.bounds.copy()
        if anchor is None:
            return box
        for j, a in enumerate(self.axes):
            step = self.settings.axes[a].max_step
            if step is not None:
                # a hair inside the step, so round-off never makes an allowed move a rejected one
                reach = (step / 2 if halve else step) * (1.0 - 1e-9)
                box[0, j] = max(box[0, j], anchor[j] - reach)
                box[1, j] = min(box[1, j], anchor[j] + reach)
        return box

    def _is_local(self) -> bool:
        every = self.settings.local_every
        n_model = sum(w != "initial" for w in self._dec["why"])
        return bool(every) and (n_model + 1) % every == 0

    def _fit(self) -> bool:
        X, f, c = self.observations()
        Y = np.log(f) if self.settings.log_objective else f
        C = None
        if self.settings.required_beam_size is not None:
            C = np.log(c / self.settings.required_beam_size).reshape(-1, 1)
        noise = None
        if self.settings.objective_noise is not None:
            noise = [self.settings.objective_noise] + ([self.settings.constraint_noise] if C is not None else [])
        try:
            self.optimizer.fit(self._to_z(X), Y, C, noise_std=noise)
        except ModelError as err:
            self.errors.append(f"model: {err}")
            return False
        return True

    def _decide_with_model(self, q: int) -> tuple[Any, str] | None:
        """Fit, record the recommendation, check for infeasibility; if ``q``, suggest a batch and
        say why (``local-<kind>`` when it searched the ball around the recommendation,
        ``local-probe-<kind>`` when that search was also kept off a limit)."""
        if not self._fit():
            return None
        self._record_recommendation()
        self.store.set_attr("model_state", {"bo": self.optimizer.state(), "quiet_decisions": self._quiet})
        if self._infeasible():
            return None
        if q == 0:
            return None
        box = self._to_z(self._step_box(self._last_asked, halve=q > 1))
        ball, probe = None, False  # no recommendation yet: the whole box, local turn or not
        if self._is_local() and (best := self.recommendation()) is not None:
            x = self._to_z(np.array([best["settings"][a] for a in self.axes]))
            # None: the step limit around the last point asked for misses the ball; search it all
            if (local := self._local_box(box, x)) is not None:
                (box, probe), ball = local, (x, self.settings.local_radius)
        rejected = [self._to_z(self._x(self._index[k])) for k, o in self._closed.items() if o == "rejected"]
        suggestion = self.optimizer.suggest(q, search_bounds=box, X_pending=np.array(rejected) if rejected else None,
                                            seed=self.settings.seed + len(self._dec["point_key"]), ball=ball)
        # only an EI over the whole box can say "nothing to gain"
        if ball is None and suggestion.kind == "qlognei":
            self._check_convergence(suggestion.log_acq)
            self.store.set_attr("model_state", {"bo": self.optimizer.state(), "quiet_decisions": self._quiet})
        if self.stop_reason:
            return None
        suggestion = dataclasses.replace(suggestion, X=self._to_x(suggestion.X))
        if ball is None:
            return suggestion, suggestion.kind
        return suggestion, f"local-probe-{suggestion.kind}" if probe else f"local-{suggestion.kind}"

    def _local_box(self, box: np.ndarray, x: np.ndarray) -> tuple[np.ndarray, bool] | None:
        """``box`` narrowed to the local ball's bounding box around ``x``, and, on a probe turn,
        to at least ``limit_probe`` of the range inside each limit that ``x`` sits at; and
        whether it is a probe turn (``x`` at a limit, and the last model decision no probe).
        ``None`` when ``box`` (a step limit around the last point asked for) misses the ball."""
        bounds = self._zbounds
        span = bounds[1] - bounds[0]
        reach = self.settings.local_radius * span
        lo, hi = np.maximum(box[0], x - reach), np.minimum(box[1], x + reach)
        if not np.all(lo < hi):
            return None
        at_low, at_high = x - bounds[0] <= _AT_LIMIT * span, bounds[1] - x <= _AT_LIMIT * span
        models = [w for w in self._dec["why"] if w != "initial"]
        probe = (self.settings.limit_probe is not None and bool(np.any(at_low | at_high))
                 and not (models and models[-1].startswith("local-probe-")))
        if probe:
            inset = self.settings.limit_probe * span
            plo = np.where(at_low, np.maximum(lo, bounds[0] + inset), lo)
            phi = np.where(at_high, np.minimum(hi, bounds[1] - inset), hi)
            if np.all(plo < phi):  # else a step limit keeps the probe out of reach: no probe
                return np.stack([plo, phi]), True
            probe = False
        return np.stack([lo, hi]), probe

    def _infeasible(self) -> bool:
        required = self.settings.required_beam_size
        if required is None:
            return False
        _, _, c = self.observations()
        after = self.settings.infeasible_after or 2 * self.settings.n_initial
        if np.any(c <= required) or self.n_observations < after:
            return False
        candidates = np.vstack([sobol_design(self._zbounds, _N_SOBOL, seed=self.settings.seed + 1),
                                self._to_z(self.observations()[0])])
        p = self.optimizer.probability_feasible(candidates)
        j = int(np.argmax(p))
        if p[j] >= self.settings.min_p_feasible:
            return False
        where = ", ".join(f"{a}={v:.4g}" for a, v in zip(self.axes, self._to_x(candidates[j]), strict=True))
        self.stop_reason = (
            f"constraint infeasible: no setting found meeting {self.settings.keys.constraint} <= {required:g} "
            f"after {self.n_observations} evaluations; the model's highest probability of feasibility is "
            f"{p[j]:.2g} (at {where}), below min_p_feasible={self.settings.min_p_feasible:g}. The smallest "
            f"{self.settings.keys.constraint} measured was {np.nanmin(c):.4g}: ask for a larger one or widen the axes' limits"
        )
        return True

    def _check_convergence(self, log_acq: float) -> None:
        tol = self.settings.converge_tol
        if tol is None or not math.isfinite(log_acq):
            return
        self._quiet = self._quiet + 1 if log_acq < math.log(tol) else 0
        if self._quiet >= self.settings.converge_patience:
            self.stop_reason = (
                f"converged: the expected relative improvement stayed below converge_tol={tol:g} for "
                f"{self._quiet} decisions in a row (last {math.exp(log_acq):.2g}) after {self.n_observations} evaluations"
            )

    def _new_request(self, X: np.ndarray, why: str, log_acq: list[float]) -> PlanRequest:
        request_key = uuid.uuid4().hex
        keys = [f"{request_key}:{i}" for i in range(len(X))]
        rows: dict[str, list] = {f"x:{a}": [float(v) for v in X[:, j]] for j, a in enumerate(self.axes)}
        rows.update({"log_acq": log_acq, "time": [time.time()] * len(keys), "point_key": keys,
                     "request_key": [request_key] * len(keys), "why": [why] * len(keys)})
        self.store.append("decisions", rows)  # persist before anyone sees the request
        for column, values in rows.items():
            self._dec[column].extend(values)
        self._index.update({k: len(self._index) + i for i, k in enumerate(keys)})
        return self._request(keys, request_key)

    def _request(self, keys: list[str], request_key: str) -> PlanRequest:
        points = [{a: float(self._dec[f"x:{a}"][self._index[k]]) for a in self.axes} for k in keys]
        self._before_request = (request_key, self._last_asked)
        self._last_asked = self._x(self._index[keys[-1]])
        return PlanRequest("measure", kwargs={"points": points, "point_keys": keys}, key=request_key, agent=self.name)

    # -- recommendation -----------------------------------------------------------------------
    def _record_recommendation(self) -> None:
        rec = self.optimizer.recommend(min_p_feasible=self.settings.recommend_p_feasible)
        if rec is None:
            return
        rows = self.store.read("recommendations")["n_observations"]
        if len(rows) and int(rows[-1]) == self.n_observations:
            return
        x = self._to_x(rec.x)
        row: dict[str, list] = {f"x:{a}": [float(v)] for a, v in zip(self.axes, x, strict=True)}
        predicted = math.exp(rec.mean) if self.settings.log_objective else rec.mean
        row.update({"n_observations": [self.n_observations], "predicted_objective": [predicted],
                    "p_feasible": [rec.p_feasible], "point_key": [self._obs["point_key"][rec.index]]})
        self.store.append("recommendations", row)
        if self._derived is not None:
            self._derived.emit("recommendation", {
                **{a: float(v) for a, v in zip(self.axes, x, strict=True)},
                "predicted_objective": predicted, "p_feasible": rec.p_feasible,
                "n_observations": self.n_observations,
            })

    def recommendation_history(self) -> list[dict[str, Any]]:
        """Each recommendation made: evaluations so far, settings, predicted objective, P(feasible)."""
        t = self.store.read("recommendations")
        return [
            {"n_observations": int(t["n_observations"][i]),
             "settings": {a: float(t[f"x:{a}"][i]) for a in self.axes},
             "predicted_objective": float(t["predicted_objective"][i]),
             "p_feasible": float(t["p_feasible"][i]), "point_key": str(t["point_key"][i])}
            for i in range(len(t["n_observations"]))
        ]

    def recommendation(self) -> dict[str, Any] | None:
        """The latest recommendation (the evaluated setting with the best posterior-mean
        objective among those feasible with probability >= recommend_p_feasible), or None."""
        history = self.recommendation_history()
        return history[-1] if history else None

    # -- derived documents --------------------------------------------------------------------
    def _open_derived(self, start: dict) -> None:
        if not self.sinks:
            return
        self._close_derived("success")
        writer = DerivedRunWriter(self.sinks, raw_run_uid=start["uid"],
                                  metadata={"agent": self.name, "analysis": "tuning-recommendation"})
        names = [*self.axes, "predicted_objective", "p_feasible", "n_observations"]
        writer.add_stream("recommendation", {k: {"dtype": "number", "shape": [], "source": self.name} for k in names})
        self._derived = writer

    # -- report -------------------------------------------------------------------------------
    def report(self) -> dict[str, Any]:
        X, f, c = self.observations()
        required = self.settings.required_beam_size
        feasible = np.isfinite(f) & ((c <= required) if required is not None else True)
        best_observed = None
        if np.any(feasible):
            i = int(np.argmax(np.where(feasible, f, -np.inf)))
            best_observed = {"settings": dict(zip(self.axes, X[i].tolist(), strict=True)),
                             self.settings.keys.objective: float(f[i]), self.settings.keys.constraint: float(c[i])}
        why = self._dec["why"]
        return {
            "agent": self.name, "kind": type(self).__name__, "n_observations": self.n_observations,
            "budget": self.settings.budget, "required_beam_size": required,
            "decisions": {w: why.count(w) for w in sorted(set(why))}, "pending": len(self.pending()),
            "recommendation": self.recommendation(), "best_observed_feasible": best_observed,
            "stop_reason": self.stop_reason, "errors": list(self.errors), "duplicates_ignored": self.duplicates,
            "model_fits": self.optimizer.n_fits, "model_warnings": len(self.optimizer.warnings),
        }

    def to_json(self) -> str:
        """The report as JSON (for logs and the daemon's health endpoint)."""
        return json.dumps(self.report(), default=float)


def tune_function(agent: TuningAgent, f: Callable[[dict[str, float]], Mapping[str, float]]) -> TuningAgent:
    """Run ``agent`` until it stops on a Python function instead of an instrument; return it.

    Each point the agent asks for goes to ``f`` as ``{axis: value}``, one at a time, in the order
    asked. ``f`` returns the readings: the objective's key, and the constraint's when the agent
    has a ``required_beam_size``. They are told to the agent as the events of one run of
    event-model documents composed here, in the stream it reads. So the agent sees what a
    RunEngine would send, with no instrument. This is for benchmarks, tests and trying settings
    offline.

    Raises
    ------
    ValueError
        If ``f`` returns readings without a key the agent needs (named).
    """
    from event_model import compose_run

    keys = agent.settings.keys
    needed = [keys.objective] + ([keys.constraint] if agent.settings.required_beam_size is not None else [])
    run = compose_run()
    agent.tell("start", run.start_doc)
    data_keys: dict[str, Any] = {k: {"dtype": "number", "shape": [], "source": "tune_function"} for k in [*agent.axes, *needed]}
    data_keys[POINT_KEY] = {"dtype": "string", "shape": [], "source": "agent"}
    desc = run.compose_descriptor(name=keys.stream, data_keys=data_keys)
    agent.tell("descriptor", desc.descriptor_doc)
    seq = 0
    while requests := agent.ask(1):
        for point, key in zip(requests[0].kwargs["points"], requests[0].kwargs["point_keys"], strict=True):
            readings = f(dict(point))
            if missing := [k for k in needed if k not in readings]:
                raise ValueError(f"f returned readings {sorted(readings)} without {missing}: it must return "
                                 f"the agent's objective and constraint keys {needed}")
            seq += 1
            data = {**dict(point), **{k: float(readings[k]) for k in needed}, POINT_KEY: key}
            now = time.time()
            agent.tell("event", desc.compose_event(data=data, timestamps=dict.fromkeys(data, now), seq_num=seq))
    agent.tell("stop", run.compose_stop())
    return agent

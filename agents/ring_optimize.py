"""Offline sextupole optimisation of the simulated ring: tracking on Dask, generations in zarr.

This is how an accelerator physicist prepares a machine study: many candidate settings,
each judged by particle tracking (:class:`simulators.ring.RingModel`), a generation at a time.

* :class:`RingProblem` - the decision box (the knobs: harmonic strengths and chromaticities),
  the tracking resolution and the fixed hypervolume reference point. Objectives, minimised:
  ``(-dynamic aperture mm^2, -momentum acceptance %)``; one constraint ``g <= 0``: a setting
  whose optics are unstable, that loses every particle, or whose tracking failed is infeasible
  (``g = 1``, objectives 0 - the reference point, so it adds no hypervolume). Nothing raises.
* :class:`DaskEvaluator` sends each setting to a Dask cluster as its own task (a
  ``LocalCluster`` by default; any scheduler address scales it to a facility cluster). A
  worker that dies mid-generation costs nothing: the scheduler re-runs its tasks elsewhere
  (up to ``retries`` more times); a task that still fails is an infeasible outcome, counted
  and reported. :class:`SerialEvaluator` is the same in-process.
* :func:`optimize` runs any ask/tell optimizer (NSGA-II, ML-MOGA, MOBO) for a number of
  generations and, with an :class:`OptimizationStore`, writes every evaluation and the
  optimizer's state after each completed generation, so :func:`optimize` on the same store
  resumes at the last completed generation (nothing evaluated twice).
"""

from __future__ import annotations

import functools
import json
import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from agents.errors import AgentStoreError
from agents.store import AgentStore
from models.mobo import MOBOConfig, MultiObjectiveBO
from models.moga import GeneticOptimizer, MLMogaConfig, NSGA2Config, hypervolume, non_dominated
from simulators.ring import KNOBS, RingModel, TrackingConfig

__all__ = [
    "DEFAULT_ML",
    "KNOB_BOUNDS",
    "DaskEvaluator",
    "OptimizationStore",
    "Outcome",
    "RingProblem",
    "SerialEvaluator",
    "evaluate_knobs",
    "make_optimizer",
    "optimize",
]

logger = logging.getLogger(__name__)

#: the search box of each knob: harmonic strengths (1/m^3) and chromaticities
KNOB_BOUNDS: dict[str, tuple[float, float]] = {
    "SH1": (-60.0, 60.0),
    "SH2": (-60.0, 60.0),
    "SH3": (-60.0, 60.0),
    "chrom_x": (0.5, 4.0),
    "chrom_y": (0.5, 4.0),
}

#: the ML-MOGA enhancement used by the demo and the benchmark (``MLMogaConfig``'s defaults,
#: chosen on seeds 10-14 of ``benchmarks/moga.py``'s cheap configuration; it reports seeds 0-4)
DEFAULT_ML = MLMogaConfig()


@dataclass(frozen=True)
class RingProblem:
    """What is optimised: knob box, tracking resolution, hypervolume reference point."""

    tracking: TrackingConfig = field(default_factory=TrackingConfig.cheap)
    bounds: tuple[tuple[float, float], ...] = tuple(KNOB_BOUNDS[k] for k in KNOBS)
    ref: tuple[float, float] = (0.0, 0.0)

    @property
    def lower(self) -> np.ndarray:
        return np.array([b[0] for b in self.bounds])

    @property
    def upper(self) -> np.ndarray:
        return np.array([b[1] for b in self.bounds])


@dataclass(frozen=True)
class Outcome:
    """One evaluated setting: objectives (minimised), constraint, and what tracking said."""

    F: tuple[float, float]
    g: float
    status: str  # ok | unstable | all_lost | failed
    lifetime_h: float = 0.0
    injection_efficiency: float = 0.0
    reason: str = ""


@functools.lru_cache(maxsize=4)
def _model(tracking: TrackingConfig) -> RingModel:
    return RingModel(tracking)


def evaluate_knobs(tracking: TrackingConfig, knobs: Sequence[float]) -> Outcome:
    """Track one knob setting (the unit of work a Dask task runs); never raises."""
    try:
        model = _model(tracking)
        result = model.evaluate(model.strengths(knobs))
    except Exception as exc:  # noqa: BLE001 -- a failed evaluation is an outcome, not a crash
        logger.warning("tracking failed for knobs %s: %s", list(knobs), exc)
        return Outcome((0.0, 0.0), 1.0, "failed", reason=f"{type(exc).__name__}: {exc}")
    if result.status != "ok":
        return Outcome((0.0, 0.0), 1.0, result.status)
    da, ma = result.objectives
    return Outcome((-da, -ma), -1.0, "ok", result.lifetime_h, result.injection_efficiency)


class Evaluator(Protocol):
    def __call__(self, X: np.ndarray) -> list[Outcome]: ...


class SerialEvaluator:
    """Evaluate a generation in this process, one setting after another."""

    def __init__(self, tracking: TrackingConfig) -> None:
        self.tracking = tracking

    def __call__(self, X: np.ndarray) -> list[Outcome]:
        return [evaluate_knobs(self.tracking, x) for x in np.asarray(X)]


class DaskEvaluator:
    """Evaluate a generation on a Dask cluster, one task per setting.

    Parameters
    ----------
    client
        A ``distributed.Client``.
    tracking
        Tracking resolution (sent with every task; the model is built once per worker).
    retries
        Extra attempts of a task whose worker died or that raised.
    """

    def __init__(self, client: Any, tracking: TrackingConfig, *, retries: int = 2) -> None:
        self.client = client
        self.tracking = tracking
        self.retries = int(retries)
        self.failed = 0

    def __call__(self, X: np.ndarray) -> list[Outcome]:
        rows = [tuple(float(v) for v in x) for x in np.asarray(X)]
        futures = self.client.map(evaluate_knobs, [self.tracking] * len(rows), rows,
                                  pure=False, retries=self.retries)
        outcomes = []
        for future, row in zip(futures, rows, strict=True):
            try:
                outcomes.append(future.result())
            except Exception as exc:  # noqa: BLE001 -- e.g. KilledWorker after every retry
                self.failed += 1
                logger.warning("evaluation of %s failed on the cluster: %s", list(row), exc)
                outcomes.append(Outcome((0.0, 0.0), 1.0, "failed", reason=f"{type(exc).__name__}: {exc}"))
        return outcomes


def make_optimizer(kind: str, problem: RingProblem, *, seed: int, pop_size: int = 24,
                   ml: MLMogaConfig | None = None, mobo: MOBOConfig | None = None) -> Any:
    """``"ml_moga"``, ``"nsga2"`` (the same NSGA-II without the enhancement) or ``"mobo"``."""
    if kind == "mobo":
        return MultiObjectiveBO(problem.lower, problem.upper, ref=problem.ref,
                                config=mobo or MOBOConfig(n_initial=pop_size, q=max(1, pop_size // 3)), seed=seed)
    if kind not in ("ml_moga", "nsga2"):
        raise ValueError(f"unknown optimizer {kind!r}; choose ml_moga, nsga2 or mobo")
    return GeneticOptimizer(problem.lower, problem.upper, n_obj=2, n_constr=1,
                            config=NSGA2Config(pop_size=pop_size),
                            ml=(ml or DEFAULT_ML) if kind == "ml_moga" else None, seed=seed)


_COLUMNS = {"generation": float, **{k: float for k in KNOBS}, "f_da": float, "f_ma": float, "g": float,
            "lifetime_h": float, "injection_efficiency": float, "status": str, "reason": str}


class OptimizationStore:
    """Every evaluation, and the optimizer's state after each completed generation, in zarr."""

    def __init__(self, path: str | Path, *, create: bool = True) -> None:
        self.store = AgentStore(path, "RingOptimization", {"evaluations": _COLUMNS}, create=create)

    def save_generation(self, generation: int, X: np.ndarray, outcomes: Sequence[Outcome], state: dict[str, Any],
                        meta: dict[str, Any]) -> None:
        rows: dict[str, list[Any]] = {c: [] for c in _COLUMNS}
        for x, o in zip(np.asarray(X), outcomes, strict=True):
            rows["generation"].append(generation)
            for k, v in zip(KNOBS, x, strict=True):
                rows[k].append(float(v))
            rows["f_da"].append(o.F[0])
            rows["f_ma"].append(o.F[1])
            rows["g"].append(o.g)
            rows["lifetime_h"].append(o.lifetime_h)
            rows["injection_efficiency"].append(o.injection_efficiency)
            rows["status"].append(o.status)
            rows["reason"].append(o.reason)
        self.store.append("evaluations", rows)
        # the state last: a generation counts as done only once it is there
        self.store.set_attr("meta", meta)
        self.store.set_attr("optimizer_state", state)

    def evaluations(self) -> dict[str, np.ndarray]:
        return self.store.read("evaluations")

    def state(self) -> dict[str, Any] | None:
        return self.store.get_attr("optimizer_state")

    def meta(self) -> dict[str, Any] | None:
        return self.store.get_attr("meta")


@dataclass
class History:
    """Per generation: evaluations so far, hypervolume of everything feasible so far, and the front."""

    evaluations: list[int] = field(default_factory=list)
    hypervolume: list[float] = field(default_factory=list)
    fronts: list[np.ndarray] = field(default_factory=list)
    seconds: list[float] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {"evaluations": self.evaluations, "hypervolume": self.hypervolume,
                "seconds": self.seconds, "fronts": [f.tolist() for f in self.fronts]}


def _front_and_hv(F: np.ndarray, g: np.ndarray, ref: Sequence[float]) -> tuple[np.ndarray, float]:
    ok = g <= 0
    Fo = F[ok]
    front = Fo[non_dominated(Fo)] if len(Fo) else np.empty((0, 2))
    return front[np.argsort(front[:, 0])] if len(front) else front, hypervolume(Fo, ref) if len(Fo) else 0.0


def optimize(
    optimizer: Any,
    evaluate: Callable[[np.ndarray], list[Outcome]],
    problem: RingProblem,
    *,
    max_evaluations: int,
    store: OptimizationStore | None = None,
    progress: Callable[[int, int, float], None] | None = None,
) -> tuple[Any, History]:
    """Run ``optimizer`` a generation (a batch) at a time until ``max_evaluations`` settings are
    evaluated; resume from ``store``. A genetic optimizer evaluates whole generations, so it may
    end past ``max_evaluations`` by up to a population less one; MOBO's last batch is cut to what is left.

    Returns the optimizer (possibly rebuilt from the store) and the :class:`History` of every
    generation (including those read back from the store).
    """
    F_all = np.empty((0, 2))
    g_all = np.empty(0)
    history = History()
    if store is not None and store.state() is not None:
        optimizer = _restore(optimizer, store, problem)
        ev = store.evaluations()
        gens = ev["generation"].astype(int)
        for gen in range(int(gens.max()) + 1 if len(gens) else 0):
            sel = gens <= gen
            front, hv = _front_and_hv(np.column_stack([ev["f_da"][sel], ev["f_ma"][sel]]), ev["g"][sel], problem.ref)
            history.evaluations.append(int(sel.sum()))
            history.hypervolume.append(hv)
            history.fronts.append(front)
            history.seconds.append(math.nan)
        F_all = np.column_stack([ev["f_da"], ev["f_ma"]])
        g_all = ev["g"]
        logger.info("resumed %s at generation %d (%d evaluations)", optimizer.name, len(history.evaluations), len(g_all))
    while len(g_all) < max_evaluations:
        generation = len(history.evaluations)
        t0 = time.perf_counter()
        left = max_evaluations - len(g_all)
        X = optimizer.ask(limit=left) if isinstance(optimizer, MultiObjectiveBO) else optimizer.ask()
        outcomes = evaluate(X)
        F = np.array([o.F for o in outcomes], dtype=float)
        g = np.array([o.g for o in outcomes], dtype=float)
        optimizer.tell(X, F, g[:, None])
        F_all = np.vstack([F_all, F])
        g_all = np.append(g_all, g)
        front, hv = _front_and_hv(F_all, g_all, problem.ref)
        history.evaluations.append(len(g_all))
        history.hypervolume.append(hv)
        history.fronts.append(front)
        history.seconds.append(time.perf_counter() - t0)
        if store is not None:
            state = {k: v for k, v in optimizer.state().items() if not k.startswith("archive_")}
            store.save_generation(generation, X, outcomes, state,
                                  {"optimizer": optimizer.name, "seed": optimizer.seed,
                                   "tracking": asdict(problem.tracking)})
        if progress is not None:
            progress(generation, len(g_all), hv)
    return optimizer, history


def _restore(optimizer: Any, store: OptimizationStore, problem: RingProblem) -> Any:
    meta = store.meta() or {}
    if meta.get("optimizer") != optimizer.name or meta.get("seed") != optimizer.seed:
        raise AgentStoreError(
            f"{store.store.path} holds a {meta.get('optimizer')} run with seed {meta.get('seed')}, not "
            f"{optimizer.name} with seed {optimizer.seed}: resume with the same settings or use a new --out"
        )
    if meta.get("tracking") != json.loads(json.dumps(asdict(problem.tracking))):
        raise AgentStoreError(f"{store.store.path} was tracked with {meta.get('tracking')}; "
                              "resume with the same tracking configuration or use a new --out")
    state = store.state()
    ev = store.evaluations()
    X = np.column_stack([ev[k] for k in KNOBS])
    F = np.column_stack([ev["f_da"], ev["f_ma"]])
    if optimizer.name == "mobo":
        return MultiObjectiveBO.from_state({**state, "X": X, "F": F}, problem.lower, problem.upper, ref=problem.ref)
    state = {**state, "archive_X": X, "archive_F": F, "archive_G": ev["g"][:, None],
             "archive_generation": ev["generation"].astype(int)}
    return GeneticOptimizer.from_state(state, problem.lower, problem.upper, n_obj=2, n_constr=1)

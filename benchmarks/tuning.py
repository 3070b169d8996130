"""Evaluations to reach the optimum: beampilot's TuningAgent against Sobol sampling and Nelder-Mead.

Two problems, three seeds each (seeds 0, 1, 2; every setting of the agent and of this benchmark
was chosen on seeds 100-139 only):

* **optics** — maximise flux at beam size <= 12 µm on :class:`simulators.optics.SimBeamlineOptics`
  within the demo's operating limits (5 axes), with the device's noise (2% flux, 1% beam size).
  The true optimum is :func:`simulators.optics.true_optimum` (64 SLSQP runs from a dense Sobol
  set on the noise-free model).
* **hartmann6** — maximise the 6-D Hartmann function (optimum 3.32237) on the unit cube, with
  Gaussian noise of standard deviation 0.05, no constraint.

Methods, each with its own budget of evaluations:

* **beampilot** — the real :class:`agents.tuning.TuningAgent`, budget 40. On the optics it runs
  the closed loop of ``beampilot demo tune`` (RunEngine, steered_scan, safety gate with the
  operating limits and largest steps, so its moves are also step-limited); on Hartmann-6 it is
  told event-model documents composed here (no instrument). On the optics it searches the slit
  gaps on a log scale, as the demo's settings say (:data:`agents.demo_tune.LOG_SCALE_AXES`). Its
  recommendation after ``n`` evaluations is the evaluated setting with the best posterior-mean
  objective among those feasible with probability >= 0.9, from the model fitted to those ``n``
  evaluations. It is told the readings' noise (2%/1%; 0.05 on Hartmann-6), as an instrument's
  specification would.
* **sobol** — scrambled Sobol points over the box, budget 300; recommends the best observed
  feasible point (noisy readings).
* **nelder_mead** — ``scipy.optimize.minimize(method="Nelder-Mead", adaptive)`` in the unit cube
  from a random start (seeded) with an initial simplex of edge 0.25, on ``-ln(flux)`` plus an
  exterior penalty ``50 max(0, ln(size/required))`` (optics) or ``-f`` (Hartmann), budget 300;
  recommends the best observed feasible point. No step limits (an advantage over beampilot).

"Best value" after ``n`` evaluations is the noise-free true value at the method's recommendation
then, 0 when the recommended optics setting truly misses the beam-size requirement by more than
1% (the rms resolution of the beam-size readout: no measurement can tell 12.0 from 12.1 µm). The
optimum itself is computed at exactly 12 µm. Keys ending in ``_strict`` repeat every figure with
no tolerance at all.
``evals_to_within_5pct`` is the first ``n`` at which it is >= 95% of the true optimum: the median
over seeds, ``null`` when the median seed did not get there within the method's budget.
``evals_ratio_nelder_mead_over_beampilot`` divides the medians; where Nelder-Mead did not get
there, its budget stands in and ``evals_ratio_is_lower_bound`` says so.

Prints one JSON object on stdout; progress goes to stderr. Seeds run in parallel subprocesses
(``--workers``, default 2), each with one torch thread.

    python benchmarks/tuning.py
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import statistics
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path
from typing import Any

import numpy as np
from scipy.optimize import minimize
from tqdm import tqdm

SEEDS = (0, 1, 2)
REQUIRED = 12.0  # µm
#: a recommended optics setting counts as meeting the requirement when its true beam size is at
#: most REQUIRED * (1 + SIZE_TOLERANCE): the 1% rms resolution of the beam-size readout, below
#: which no measurement can tell. The "strict" figures use no tolerance.
SIZE_TOLERANCE = 0.01
RULES = {"tolerant": SIZE_TOLERANCE, "strict": 0.0}
BUDGET = {"beampilot": 40, "sobol": 300, "nelder_mead": 300}
HARTMANN_NOISE = 0.05
PENALTY = 50.0
CHECKPOINTS = (5, 10, 15, 20, 25, 30, 40, 60, 100, 200, 300)


# -- problems ------------------------------------------------------------------------------------
def _optics_problem() -> dict[str, Any]:
    from agents.demo_tune import OPERATING_LIMITS
    from simulators.optics import AXES, true_optimum

    limits = tuple((OPERATING_LIMITS[a]["low"], OPERATING_LIMITS[a]["high"]) for a in AXES)
    _, flux, _ = true_optimum(REQUIRED, limits)
    return {"name": "optics", "bounds": np.array(limits).T, "optimum": flux}


def _true_value(problem: str, x: np.ndarray, tol: float) -> float:
    """Noise-free value at ``x``; 0 for an optics setting whose true beam size exceeds
    ``REQUIRED * (1 + tol)``."""
    if problem == "hartmann6":
        from models.bo import hartmann6

        return float(hartmann6(np.atleast_2d(x))[0])
    from simulators.optics import optics_response

    flux, size = optics_response(np.asarray(x, dtype=float))
    return float(flux) if float(size) <= REQUIRED * (1.0 + tol) else 0.0


class _NoisyProblem:
    """Noisy evaluations for the baselines, drawn like the device draws them."""

    def __init__(self, problem: str, seed: int) -> None:
        self.problem = problem
        self.rng = np.random.default_rng(seed + 7919)

    def __call__(self, x: np.ndarray) -> tuple[float, float]:
        """``(objective, beam size)`` of one noisy evaluation (size 0 for Hartmann-6)."""
        if self.problem == "hartmann6":
            from models.bo import hartmann6

            return float(hartmann6(np.atleast_2d(x), noise_std=HARTMANN_NOISE, rng=self.rng)[0]), 0.0
        from simulators.optics import optics_response

        flux, size = (float(v) for v in optics_response(np.asarray(x, dtype=float)))
        flux *= 1.0 + 0.02 * self.rng.standard_normal()
        size *= 1.0 + 0.01 * self.rng.standard_normal()
        return flux, size


# -- methods -------------------------------------------------------------------------------------
def _values(problem: str, recommended: list[np.ndarray | None]) -> dict[str, list[float]]:
    """True value of each evaluation's recommendation, under each rule of :data:`RULES`."""
    return {rule: [0.0 if x is None else _true_value(problem, x, tol) for x in recommended]
            for rule, tol in RULES.items()}


def _curve_from_recommendations(problem: str, recs: list[tuple[int, np.ndarray]], n_evals: int) -> dict[str, list[float]]:
    """True value at the latest recommendation after each evaluation 1..n_evals."""
    recommended: list[np.ndarray | None] = []
    j = -1
    for n in range(1, n_evals + 1):
        while j + 1 < len(recs) and recs[j + 1][0] <= n:
            j += 1
        recommended.append(recs[j][1] if j >= 0 else None)
    return _values(problem, recommended)


def _best_observed_curve(problem: str, xs: list[np.ndarray], ys: list[float], ok: list[bool]) -> dict[str, list[float]]:
    recommended: list[np.ndarray | None] = []
    best, best_x = -np.inf, None
    for x, y, feasible in zip(xs, ys, ok, strict=True):
        if feasible and y > best:
            best, best_x = y, x
        recommended.append(best_x)
    return _values(problem, recommended)


def run_sobol(problem: str, bounds: np.ndarray, seed: int) -> dict[str, list[float]]:
    from scipy.stats import qmc

    f = _NoisyProblem(problem, seed)
    u = qmc.Sobol(bounds.shape[1], seed=seed).random(BUDGET["sobol"])
    xs = list(bounds[0] + u * (bounds[1] - bounds[0]))
    evals = [f(x) for x in xs]
    return _best_observed_curve(problem, xs, [e[0] for e in evals], [e[1] <= REQUIRED for e in evals])


def run_nelder_mead(problem: str, bounds: np.ndarray, seed: int) -> dict[str, list[float]]:
    f = _NoisyProblem(problem, seed)
    lo, span = bounds[0], bounds[1] - bounds[0]
    xs: list[np.ndarray] = []
    ys: list[float] = []
    ok: list[bool] = []

    def loss(u: np.ndarray) -> float:
        x = lo + np.clip(u, 0.0, 1.0) * span
        y, size = f(x)
        xs.append(x)
        ys.append(y)
        ok.append(size <= REQUIRED)
        if problem == "hartmann6":
            return -y
        return -np.log(max(y, 1.0)) + PENALTY * max(0.0, np.log(size / REQUIRED))

    rng = np.random.default_rng(seed + 104729)
    d = bounds.shape[1]
    u0 = rng.uniform(0.1, 0.9, d)
    simplex = np.vstack([u0, u0 + 0.25 * np.eye(d) * np.where(u0 > 0.5, -1.0, 1.0)])
    minimize(loss, u0, method="Nelder-Mead", bounds=[(0.0, 1.0)] * d,
             options={"maxfev": BUDGET["nelder_mead"], "initial_simplex": simplex, "adaptive": True,
                      "xatol": 1e-6, "fatol": 1e-9})
    n = BUDGET["nelder_mead"]
    return _best_observed_curve(problem, xs[:n], ys[:n], ok[:n])


def run_beampilot(problem: str, seed: int) -> dict[str, Any]:
    """One closed loop of the TuningAgent; returns its true-value curve and wall time."""
    import torch

    torch.set_num_threads(1)
    wall = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        if problem == "optics":
            agent = _beampilot_optics(Path(tmp), seed)
        else:
            agent = _beampilot_hartmann(Path(tmp), seed)
        history = agent.recommendation_history()
        recs = [(h["n_observations"], np.array(list(h["settings"].values()))) for h in history]
        n = agent.n_observations
        report = agent.report()
    return {"curve": _curve_from_recommendations(problem, recs, n), "wall_s": time.perf_counter() - wall,
            "n_evaluations": n, "stop_reason": report["stop_reason"], "errors": len(report["errors"])}


def _beampilot_optics(tmp: Path, seed: int) -> Any:
    from agents.demo_tune import TuneSetup, agent_settings, closed_loop
    from agents.tuning import TuningAgent
    from simulators.sas import SimClock

    setup = TuneSetup(seed=seed, required_beam_size=REQUIRED, budget=BUDGET["beampilot"])
    agent = TuningAgent(agent_settings(setup), tmp / "store.zarr")
    closed_loop(setup, agent, clock=SimClock())
    return agent


def _beampilot_hartmann(tmp: Path, seed: int) -> Any:
    """The agent told event-model documents composed by :func:`agents.tuning.tune_function`."""
    from agents.tuning import TuningAgent, tune_function
    from models.bo import hartmann6

    axes = [f"x{i}" for i in range(6)]
    agent = TuningAgent({
        "name": "hartmann6", "axes": {a: {"low": 0.0, "high": 1.0} for a in axes},
        "keys": {"objective": "hartmann6"}, "log_objective": False, "objective_noise": HARTMANN_NOISE,
        "budget": BUDGET["beampilot"], "seed": seed,
    }, tmp / "store.zarr")
    rng = np.random.default_rng(seed)

    def f(point: dict[str, float]) -> dict[str, float]:
        x = np.array([[point[a] for a in axes]])
        return {"hartmann6": float(hartmann6(x, noise_std=HARTMANN_NOISE, rng=rng)[0])}

    tune_function(agent, f)
    return agent


# -- summary -------------------------------------------------------------------------------------
def _first_within(curve: list[float], optimum: float) -> int | None:
    return next((i + 1 for i, v in enumerate(curve) if v >= 0.95 * optimum), None)


def _median_evals(values: list[int | None]) -> float | None:
    """Median with 'not reached' as +inf; None when the median seed did not reach."""
    ordered = sorted(np.inf if v is None else v for v in values)
    m = statistics.median(ordered)
    return None if not np.isfinite(m) else float(m)


def _checkpoints(curves: list[list[float]], optimum: float, budget: int) -> dict[str, float]:
    out = {}
    for n in CHECKPOINTS:
        if n <= budget:
            out[str(n)] = round(float(np.median([c[min(n, len(c)) - 1] / optimum for c in curves])), 4)
    return out


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--seeds", type=int, nargs="+", default=list(SEEDS))
    parser.add_argument("--problems", nargs="+", choices=["optics", "hartmann6"], default=["optics", "hartmann6"],
                        help="run only these problems (default: both)")
    parser.add_argument("--methods", nargs="+", choices=list(BUDGET), default=list(BUDGET),
                        help="run only these methods (default: all)")
    args = parser.parse_args(argv)
    wall0 = time.perf_counter()
    problems = {"optics": _optics_problem,
                "hartmann6": lambda: {"name": "hartmann6", "bounds": np.array([[0.0] * 6, [1.0] * 6]), "optimum": 3.32237}}
    problems = {p: make() for p, make in problems.items() if p in args.problems}
    methods = [m for m in BUDGET if m in args.methods]
    curves: dict[str, dict[str, list]] = {p: {m: [None] * len(args.seeds) for m in methods} for p in problems}
    details: dict[str, list] = {p: [None] * len(args.seeds) for p in problems}
    jobs = [(p, i, s) for p in problems for i, s in enumerate(args.seeds)]
    bar = tqdm(total=len(jobs) * len(methods), desc="tuning benchmark", unit="run", file=sys.stderr)
    ctx = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(max_workers=args.workers, mp_context=ctx) as pool:
        futures = {pool.submit(run_beampilot, p, s): (p, i) for p, i, s in jobs if "beampilot" in methods}
        for p, i, s in jobs:  # the cheap baselines, here while the workers run the agent
            for m, run in (("sobol", run_sobol), ("nelder_mead", run_nelder_mead)):
                if m in methods:
                    curves[p][m][i] = run(p, problems[p]["bounds"], s)
                    bar.update(1)
        for future in as_completed(futures):
            p, i = futures[future]
            result = future.result()
            curves[p]["beampilot"][i] = result.pop("curve")
            details[p][i] = result
            bar.update(1)
    bar.close()
    from agents.tuning import TuningSettings

    p_min = TuningSettings.model_fields["recommend_p_feasible"].default
    out: dict[str, Any] = {
        "benchmark": "tuning", "seeds": args.seeds, "tuned_on_seeds": list(range(100, 140)),
        "budgets": dict(BUDGET), "required_beam_size_um": REQUIRED, "hartmann6_noise_std": HARTMANN_NOISE,
        "beam_size_tolerance": SIZE_TOLERANCE,
        "true_optimum": {p: problems[p]["optimum"] for p in problems},
        "recommendation": {"beampilot": f"best posterior-mean evaluated point with P(feasible) >= {p_min}",
                           "sobol": "best observed feasible", "nelder_mead": "best observed feasible"},
    }
    for rule in RULES:
        suffix = "" if rule == "tolerant" else "_strict"
        for key in ("evals_to_within_5pct", "evals_to_within_5pct_per_seed", "evals_ratio_nelder_mead_over_beampilot",
                    "evals_ratio_is_lower_bound", "best_fraction_of_optimum_vs_evals", "final_fraction_of_optimum"):
            out[key + suffix] = {}
        for p, problem in problems.items():
            opt = problem["optimum"]
            runs = {m: [c[rule] for c in curves[p][m]] for m in methods}
            per_seed = {m: [_first_within(c, opt) for c in runs[m]] for m in methods}
            medians = {m: _median_evals(v) for m, v in per_seed.items()}
            nm = medians.get("nelder_mead")
            nm = nm if nm is not None else float(BUDGET["nelder_mead"])
            bp = medians.get("beampilot")
            out["evals_to_within_5pct" + suffix][p] = medians
            out["evals_to_within_5pct_per_seed" + suffix][p] = per_seed
            out["evals_ratio_nelder_mead_over_beampilot" + suffix][p] = None if bp is None else round(nm / bp, 2)
            out["evals_ratio_is_lower_bound" + suffix][p] = medians.get("nelder_mead") is None
            out["best_fraction_of_optimum_vs_evals" + suffix][p] = {
                m: _checkpoints(runs[m], opt, BUDGET[m]) for m in methods}
            out["final_fraction_of_optimum" + suffix][p] = {
                m: round(float(np.median([c[-1] for c in runs[m]])) / opt, 4) for m in methods}
    out["beampilot_runs"] = details
    out["wall_time_s"] = round(time.perf_counter() - wall0, 1)
    print(json.dumps(out, default=float))
    return out


if __name__ == "__main__":
    main()

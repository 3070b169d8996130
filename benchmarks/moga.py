"""Hypervolume against tracking evaluations: ML-MOGA versus NSGA-II (pymoo), Xopt's NSGA-II and MOBO.

The problem is the sextupole optimisation of ``beampilot demo ring``: five knobs (three harmonic
sextupole families, two chromaticities) of :class:`simulators.ring.RingModel`'s 20-cell DBA ring,
objectives dynamic aperture (mm^2) and momentum acceptance (%), both maximised, each setting
judged by pyAT tracking; unstable, fully lost and failed settings are infeasible. Hypervolume
is always taken with the fixed reference point (0 mm^2, 0 %) over every feasible setting
evaluated so far.

Optimisers, each with the same budget of tracked settings (population 24, 16 generations =
384 in the cheap configuration):

* **ml_moga** - :class:`models.moga.GeneticOptimizer` with :class:`models.moga.MLMogaConfig`'s
  defaults (the enhancement of Li et al., PRAB 21, 054601, 2018). Its settings were chosen on
  seeds 10-14; this benchmark reports seeds 0-4.
* **nsga2_pymoo** - the same class without the enhancement: pymoo's NSGA-II (SBX eta 15,
  polynomial mutation eta 20, LHS initial sample) through its ask/tell interface.
* **xopt_nsga2** - Xopt's ``NSGA2Generator`` (its own operators, defaults), installed side by
  side (``pip install '.[bench]'``), driven through ``generate`` / ``add_data``.
* **mobo** - :class:`models.mobo.MultiObjectiveBO` (qLogNEHVI): a Sobol design of 24, then
  batches of 12, for a small budget: ``--mobo-budget`` (default 96) settings, because each of
  its decisions costs seconds and grows with the data (``--mobo-budget 384`` runs it to the GA
  budget: about ten times longer).

Runs (optimiser x seed) are Dask tasks on a ``LocalCluster`` of ``--workers`` single-threaded
processes. Before them, ``dask_speedup_2_workers`` times one generation of 48 tracked settings
on one worker and on two (median of 3 after a warm-up; nothing else runs meanwhile).

Figures: per optimiser, the median and the min/max over seeds of the hypervolume after each
generation (each multiple of 24 settings). ``final_hv`` is the median at each optimiser's own
budget (``final_hv_evaluations``); ``hv_at_equal_evaluations`` compares them all at MOBO's budget
and at the GA budget (``null`` where an optimiser stopped before).
``evals_fraction_to_nsga2_final_hv`` is the number of settings after which the median ML-MOGA
curve first reaches the median final hypervolume of plain NSGA-II, divided by NSGA-II's budget
(``null`` if it never does); ``..._per_seed`` is the same seed by seed.

Prints one JSON object on stdout; progress on stderr. ``--full`` tracks at full resolution
(224 particles, 512 turns; hours on 2 cores).

    python benchmarks/moga.py [--plot benchmarks/results/moga.png]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from typing import Any

import numpy as np

os.environ.setdefault("OMP_NUM_THREADS", "1")

SEEDS = (0, 1, 2, 3, 4)
OPTIMIZERS = ("ml_moga", "nsga2_pymoo", "xopt_nsga2", "mobo")


def run_one(kind: str, seed: int, pop: int, budget: int, full: bool) -> dict[str, Any]:
    """One optimiser, one seed: hypervolume after each generation (a Dask task)."""
    import torch

    from agents.ring_optimize import RingProblem, SerialEvaluator, make_optimizer, optimize
    from models.mobo import MOBOConfig
    from simulators.ring import TrackingConfig

    torch.set_num_threads(1)
    problem = RingProblem(tracking=TrackingConfig.full() if full else TrackingConfig.cheap())
    evaluate = SerialEvaluator(problem.tracking)
    t0 = time.perf_counter()
    if kind == "xopt_nsga2":
        evals, hv = _run_xopt(problem, evaluate, seed, pop, budget)
    else:
        mobo = MOBOConfig(n_initial=pop, q=pop // 2, num_restarts=2, raw_samples=64, mc_samples=32, maxiter=50)
        optimizer = make_optimizer("nsga2" if kind == "nsga2_pymoo" else kind, problem, seed=seed, pop_size=pop,
                                   mobo=mobo)
        _, history = optimize(optimizer, evaluate, problem, max_evaluations=budget)
        evals, hv = history.evaluations, history.hypervolume
    return {"kind": kind, "seed": seed, "evaluations": evals, "hypervolume": hv,
            "wall_s": time.perf_counter() - t0}


def _run_xopt(problem: Any, evaluate: Any, seed: int, pop: int, budget: int) -> tuple[list[int], list[float]]:
    import pandas as pd
    from xopt import VOCS
    from xopt.generators.ga.nsga2 import NSGA2Generator

    from models.moga import hypervolume
    from simulators.ring import KNOBS

    np.random.seed(seed)  # Xopt's NSGA-II draws from numpy's global generator
    vocs = VOCS(variables={k: list(b) for k, b in zip(KNOBS, problem.bounds, strict=True)},
                objectives={"da": "MAXIMIZE", "ma": "MAXIMIZE"}, constraints={"g": ["LESS_THAN", 0.0]})
    generator = NSGA2Generator(vocs=vocs, population_size=pop)
    F_all, g_all, evals, hvs = [], [], [], []
    while len(F_all) < budget:
        frame = pd.DataFrame(generator.generate(pop))
        X = frame[list(KNOBS)].to_numpy(dtype=float)
        t0 = time.perf_counter()
        outcomes = evaluate(X)
        frame["da"] = [-o.F[0] for o in outcomes]
        frame["ma"] = [-o.F[1] for o in outcomes]
        frame["g"] = [o.g for o in outcomes]
        frame["xopt_runtime"] = (time.perf_counter() - t0) / len(X)
        frame["xopt_error"] = False
        generator.add_data(frame)
        F_all += [o.F for o in outcomes]
        g_all += [o.g for o in outcomes]
        F, g = np.asarray(F_all), np.asarray(g_all)
        evals.append(len(F))
        hvs.append(hypervolume(F[g <= 0], problem.ref) if np.any(g <= 0) else 0.0)
    return evals, hvs


def dask_speedup(client_factory: Any, n: int = 48, repeats: int = 3) -> dict[str, Any]:
    from agents.ring_optimize import DaskEvaluator, RingProblem

    problem = RingProblem()
    X = np.random.default_rng(123).uniform(problem.lower, problem.upper, size=(n, 5))
    seconds = {}
    for workers in (1, 2):
        with client_factory(workers) as client:
            evaluate = DaskEvaluator(client, problem.tracking)
            evaluate(X[:4])  # warm-up: workers build the lattice once
            times = []
            for _ in range(repeats):
                t0 = time.perf_counter()
                evaluate(X)
                times.append(time.perf_counter() - t0)
            seconds[workers] = statistics.median(times)
    return {"settings_per_generation": n, "seconds_1_worker": seconds[1], "seconds_2_workers": seconds[2],
            "speedup": seconds[1] / seconds[2]}


def _curve_stats(runs: list[dict[str, Any]]) -> dict[str, Any]:
    H = np.array([r["hypervolume"] for r in runs])
    return {"evaluations": runs[0]["evaluations"], "median": np.median(H, axis=0).tolist(),
            "min": H.min(axis=0).tolist(), "max": H.max(axis=0).tolist(),
            "final_per_seed": {r["seed"]: r["hypervolume"][-1] for r in runs}}


def _at(curve: dict[str, Any], n: int) -> float | None:
    """Median hypervolume after ``n`` settings (``None`` if the curve stops before)."""
    for e, h in zip(curve["evaluations"], curve["median"], strict=True):
        if e >= n:
            return h
    return None


def _first_reaching(evals: list[int], hv: list[float], target: float) -> int | None:
    for n, h in zip(evals, hv, strict=True):
        if h >= target:
            return n
    return None


def summarize(results: list[dict[str, Any]], budget: int) -> dict[str, Any]:
    by_kind = {k: sorted([r for r in results if r["kind"] == k], key=lambda r: r["seed"]) for k in OPTIMIZERS}
    curves = {k: _curve_stats(v) for k, v in by_kind.items() if v}
    ml, ns = curves["ml_moga"], curves["nsga2_pymoo"]
    target = ns["median"][-1]
    reach = _first_reaching(ml["evaluations"], ml["median"], target)
    per_seed = {}
    for rm, rn in zip(by_kind["ml_moga"], by_kind["nsga2_pymoo"], strict=True):
        n = _first_reaching(rm["evaluations"], rm["hypervolume"], rn["hypervolume"][-1])
        per_seed[rm["seed"]] = None if n is None else n / rn["evaluations"][-1]
    final = {k: c["median"][-1] for k, c in curves.items()}
    checkpoints = sorted({c["evaluations"][-1] for c in curves.values()})
    at_equal = {str(n): {k: _at(c, n) for k, c in curves.items()} for n in checkpoints}
    highest = {n: all(v is None or row["ml_moga"] >= v for k, v in row.items() if k != "ml_moga")
               for n, row in at_equal.items()}
    return {
        "evals_fraction_to_nsga2_final_hv": None if reach is None else reach / ns["evaluations"][-1],
        "evals_fraction_to_nsga2_final_hv_per_seed": per_seed,
        "final_hv": final,
        "final_hv_evaluations": {k: c["evaluations"][-1] for k, c in curves.items()},
        "hv_at_equal_evaluations": at_equal,
        "ml_moga_highest_at_equal_evaluations": highest,
        "hv_curves": curves,
        "wall_s_per_run": {k: statistics.median(r["wall_s"] for r in v) for k, v in by_kind.items() if v},
    }


def plot(path: str, summary: dict[str, Any]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for kind, c in summary["hv_curves"].items():
        line, = ax.plot(c["evaluations"], c["median"], "o-", ms=3, label=kind)
        ax.fill_between(c["evaluations"], c["min"], c["max"], color=line.get_color(), alpha=0.15)
    ax.set(xlabel="tracked settings", ylabel="hypervolume (mm² × %)",
           title="ring sextupoles: median and range over 5 seeds")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--seeds", type=int, nargs="+", default=list(SEEDS))
    parser.add_argument("--pop", type=int, default=24)
    parser.add_argument("--generations", type=int, default=16)
    parser.add_argument("--mobo-budget", type=int, default=96, help="settings MOBO may track (default 96)")
    parser.add_argument("--optimizers", nargs="+", default=list(OPTIMIZERS), choices=OPTIMIZERS)
    parser.add_argument("--full", action="store_true", help="full-resolution tracking (hours)")
    parser.add_argument("--no-speedup", action="store_true", help="skip the Dask speed-up measurement")
    parser.add_argument("--plot", default=None, help="write the hypervolume curves to this PNG")
    args = parser.parse_args()
    from distributed import as_completed
    from tqdm import tqdm

    from agents.demo_ring import dask_client

    t0 = time.perf_counter()
    budget = args.pop * args.generations
    speedup = None if args.no_speedup else dask_speedup(lambda n: dask_client(None, n_workers=n))
    print(f"dask speed-up: {speedup}", file=sys.stderr)
    results = []
    with dask_client(None, n_workers=args.workers) as client:
        futures = [client.submit(run_one, kind, seed, args.pop,
                                 min(args.mobo_budget, budget) if kind == "mobo" else budget, args.full, pure=False)
                   for kind in args.optimizers for seed in args.seeds]
        with tqdm(total=len(futures), desc="moga benchmark", unit="run", file=sys.stderr) as bar:
            for future in as_completed(futures, loop=client.loop):
                results.append(future.result())
                bar.update()
    summary = summarize(results, budget) if {"ml_moga", "nsga2_pymoo"} <= set(args.optimizers) else {}
    out = {
        "benchmark": "moga",
        "configuration": "full" if args.full else "cheap",
        "seeds": args.seeds,
        "population": args.pop,
        "budget": budget,
        "mobo_budget": min(args.mobo_budget, budget),
        "reference_point": [0.0, 0.0],
        **summary,
        "dask_speedup_2_workers": None if speedup is None else speedup["speedup"],
        "dask": speedup,
        "wall_s": round(time.perf_counter() - t0, 1),
    }
    if args.plot and summary:
        plot(args.plot, summary)
    print(json.dumps(out, default=float))


if __name__ == "__main__":
    main()

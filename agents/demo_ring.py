"""``beampilot demo ring``: sextupole optimisation of the simulated storage ring, on Dask.

Three optimisers get the same budget of tracked settings on the same ring: ML-MOGA (NSGA-II
with the enhancement of Li et al. 2018), the same NSGA-II without it, and multi-objective
Bayesian optimisation (qLogNEHVI, a smaller budget: its cost per decision grows with the data).
Every setting is tracked as a Dask task (a ``LocalCluster`` unless ``dask`` names a scheduler).
Each run is stored in ``OUT/<optimizer>.zarr`` and resumes from there if the demo is killed.

The report (``OUT``):

* ``fronts.png`` - ML-MOGA's Pareto front after each generation;
* ``hypervolume.png`` - hypervolume (fixed reference point) against tracked settings, per optimiser;
* ``aperture.png`` - dynamic aperture of the chosen solution against the starting setting
  (harmonic sextupoles off, chromaticity (1, 1)), tracked again at full resolution, with the
  injected beam;
* ``summary.json`` - the figures behind them.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from agents.errors import AgentError
from agents.ring_optimize import (
    DaskEvaluator,
    OptimizationStore,
    RingProblem,
    make_optimizer,
    optimize,
)
from models.mobo import MOBOConfig
from models.moga import non_dominated
from simulators.ring import KNOBS, RingModel, RingResult, TrackingConfig

__all__ = ["START_KNOBS", "dask_client", "run_ring_demo"]

logger = logging.getLogger(__name__)

#: the ring before optimisation: harmonic sextupoles off, chromaticity corrected to (1, 1)
START_KNOBS = {"SH1": 0.0, "SH2": 0.0, "SH3": 0.0, "chrom_x": 1.0, "chrom_y": 1.0}


@contextmanager
def dask_client(scheduler: str | None, n_workers: int = 2, *, connect_timeout: float = 10.0) -> Iterator[Any]:
    """A ``distributed.Client`` on ``scheduler`` (``host:port``; an :class:`AgentError` naming it
    when it does not answer within ``connect_timeout`` seconds), or on a new ``LocalCluster`` of
    ``n_workers`` single-threaded worker processes, closed on exit."""
    from distributed import Client, LocalCluster

    logging.getLogger("distributed").setLevel(logging.WARNING)  # its INFO lines drown the progress bars
    if scheduler:
        try:
            # not set as dask's default: a Client whose address fails to parse stays the default
            # (distributed 2025), and every later dask computation in the process waits on it
            client = Client(scheduler, timeout=f"{connect_timeout}s", set_as_default=False)
        except ValueError as err:  # distributed's parse of the address
            raise AgentError(f"{scheduler!r} is not a Dask scheduler address ({err}); give host:port, "
                             "e.g. 127.0.0.1:8786, or tcp://host:port") from None
        except OSError as err:  # distributed's connection timeout or refusal
            raise AgentError(f"cannot reach the Dask scheduler at {scheduler!r} ({err}); start it "
                             "(`dask scheduler`, with workers) or leave --dask out to track on a LocalCluster") from None
        with client:
            yield client
        return
    with LocalCluster(n_workers=n_workers, threads_per_worker=1, processes=True, dashboard_address=":0",
                      silence_logs=logging.ERROR) as cluster, Client(cluster, set_as_default=False) as client:
        yield client


def run_ring_demo(
    out: Path,
    *,
    generations: int = 12,
    pop_size: int = 24,
    mobo_evaluations: int = 96,
    seed: int = 0,
    full: bool = False,
    dask: str | None = None,
    n_workers: int = 2,
    progress: bool = True,
    aperture_tracking: TrackingConfig | None = None,
) -> dict[str, Any]:
    """Run the three optimisers, write the report into ``out`` and return its summary.

    ``aperture_tracking`` is the resolution at which the chosen and the starting settings are
    tracked again for ``aperture.png`` (default: :meth:`TrackingConfig.full`).
    """
    out.mkdir(parents=True, exist_ok=True)
    problem = RingProblem(tracking=TrackingConfig.full() if full else TrackingConfig.cheap())
    budget = generations * pop_size
    t0 = time.perf_counter()
    runs: dict[str, Any] = {}
    with dask_client(dask, n_workers) as client:
        evaluate = DaskEvaluator(client, problem.tracking)
        for kind, evals in (("ml_moga", budget), ("nsga2", budget), ("mobo", min(mobo_evaluations, budget))):
            mobo = MOBOConfig(n_initial=pop_size, q=max(1, pop_size // 3))
            optimizer = make_optimizer(kind, problem, seed=seed, pop_size=pop_size, mobo=mobo)
            store = OptimizationStore(out / f"{kind}.zarr")
            bar = tqdm(total=evals, desc=f"{kind:>7}", unit="setting", disable=not progress)

            def tick(gen: int, n: int, hv: float, bar: tqdm = bar) -> None:
                bar.update(n - bar.n)
                bar.set_postfix(generation=gen, hypervolume=f"{hv:.0f}")

            optimizer, history = optimize(optimizer, evaluate, problem, max_evaluations=evals, store=store,
                                          progress=tick)
            bar.close()
            runs[kind] = {"optimizer": optimizer, "history": history}
        chosen_knobs = _choose(OptimizationStore(out / "ml_moga.zarr", create=False))
        full_cfg = aperture_tracking or TrackingConfig.full()
        futures = [client.submit(_track, full_cfg, k, pure=False) for k in (START_KNOBS, chosen_knobs)]
        start_result, chosen_result = (f.result() for f in futures)
        failed = evaluate.failed
    summary = _summary(runs, problem, chosen_knobs, start_result, chosen_result, full_cfg, budget, failed,
                       time.perf_counter() - t0)
    write_report(out, runs, problem, start_result, chosen_result, summary)
    return summary


def _track(tracking: TrackingConfig, knobs: dict[str, float]) -> RingResult:
    model = RingModel(tracking)
    return model.evaluate(model.strengths(knobs))


def _choose(store: OptimizationStore) -> dict[str, float]:
    """Of the Pareto-optimal settings, the one with the most beam lifetime x injection efficiency
    (what the control room runs on: the objectives are their tracking proxies)."""
    ev = store.evaluations()
    ok = np.flatnonzero(ev["g"] <= 0)
    if ok.size == 0:
        return dict(START_KNOBS)
    F = np.column_stack([ev["f_da"][ok], ev["f_ma"][ok]])
    front = ok[non_dominated(F)]
    best = front[int(np.argmax(ev["lifetime_h"][front] * ev["injection_efficiency"][front]))]
    return {k: float(ev[k][best]) for k in KNOBS}


def _result_dict(r: RingResult) -> dict[str, Any]:
    d = asdict(r)
    d["boundary_mm"] = (r.boundary * 1e3).round(3).tolist()
    del d["boundary"]
    return d


def _summary(runs: dict[str, Any], problem: RingProblem, chosen: dict[str, float], start: RingResult,
             result: RingResult, full_cfg: TrackingConfig, budget: int, failed: int, wall: float) -> dict[str, Any]:
    return {
        "budget": budget,
        "tracking": asdict(problem.tracking),
        "reference_point": list(problem.ref),
        "hypervolume": {k: {"evaluations": r["history"].evaluations, "hypervolume": r["history"].hypervolume}
                        for k, r in runs.items()},
        "final_hypervolume": {k: r["history"].hypervolume[-1] for k, r in runs.items()},
        "ml_replaced_per_generation": runs["ml_moga"]["optimizer"].report()["ml_replaced"],
        "chosen_knobs": chosen,
        "chosen_strengths": RingModel(full_cfg).strengths(chosen),
        "start": _result_dict(start),
        "chosen": _result_dict(result),
        "full_tracking": asdict(full_cfg),
        "failed_evaluations": failed,
        "wall_s": round(wall, 1),
    }


def write_report(out: Path, runs: dict[str, Any], problem: RingProblem, start: RingResult, chosen: RingResult,
                 summary: dict[str, Any]) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    # Pareto front per generation (ML-MOGA)
    fig, ax = plt.subplots(figsize=(7, 5))
    fronts = runs["ml_moga"]["history"].fronts
    cmap = plt.get_cmap("viridis")
    for i, front in enumerate(fronts):
        if len(front):
            ax.step(-front[:, 0], -front[:, 1], where="post", color=cmap(i / max(len(fronts) - 1, 1)),
                    marker="o", ms=3, lw=1, label=f"gen {i}" if i in (0, len(fronts) // 2, len(fronts) - 1) else None)
    ax.set(xlabel="dynamic aperture (mm²)", ylabel="momentum acceptance (%)",
           title="ML-MOGA: Pareto front after each generation")
    ax.legend(fontsize=8)
    paths.append(_save(fig, out / "fronts.png"))
    # hypervolume versus evaluations
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for kind, run in runs.items():
        h = run["history"]
        ax.plot(h.evaluations, h.hypervolume, "o-", ms=3, label=kind)
    ax.set(xlabel="tracked settings", ylabel="hypervolume (mm² × %)",
           title=f"hypervolume, reference point {tuple(problem.ref)}")
    ax.legend()
    paths.append(_save(fig, out / "hypervolume.png"))
    # dynamic aperture, chosen versus start
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for label, r, color in (("start", start, "tab:gray"), ("chosen", chosen, "tab:red")):
        bx, by = r.boundary * 1e3
        ax.plot(bx, by, "o-", color=color, ms=3,
                label=f"{label}: {r.da_area_mm2:.0f} mm², δ±{100 * r.momentum_acceptance:.2f} %, "
                      f"injection {100 * r.injection_efficiency:.0f} %")
    inj = problem.tracking
    ax.add_patch(matplotlib.patches.Ellipse((inj.injection_offset * 1e3, 0.0), 4e3 * inj.injection_sigma[0],
                                            4e3 * inj.injection_sigma[1], color="tab:blue", alpha=0.3,
                                            label="injected beam (±2σ)"))
    ax.set(xlabel="x (mm)", ylabel="y (mm)", title="dynamic aperture (full tracking) at the injection point")
    ax.set_ylim(bottom=0)
    ax.legend(fontsize=8)
    paths.append(_save(fig, out / "aperture.png"))
    summary["figures"] = [p.name for p in paths]
    path = out / "summary.json"
    path.write_text(json.dumps(summary, indent=2, default=float))
    return [*paths, path]


def _save(fig: Any, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    import matplotlib.pyplot as plt

    plt.close(fig)
    return path

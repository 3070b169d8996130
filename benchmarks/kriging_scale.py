"""Kriging past a few thousand points: the exact incremental posterior against the
inducing-point one (:class:`models.kriging.MappingGP` with ``exact_limit`` set), side by side.

For each number of observations ``n`` and each kind of map (:class:`simulators.maps.SmoothMap`
and :class:`simulators.maps.DiscontinuousMap`, 10 x 10 mm, noise sd 2% of the map's spread),
both models are given the same ``n`` noisy observations and then timed as the mapping agent
uses them: add a batch of 4 observations and choose the next 4 (``select_batch``,
gradient-weighted variance, travel-aware), 30 times. Reported per model:

* ``build_s`` — hyper-parameter fit (on at most 800 points) and the posterior built from all
  ``n`` points: the work a background refit does;
* ``decision_ms_p50`` / ``decision_ms_p95`` — add 4 and choose 4;
* ``factor_mb`` — the memory the posterior keeps per mapped quantity;
* ``error_map`` — RMSE of the map :meth:`MappingGP.predict` draws (kriging or triangulation,
  whichever it chose) over the 100 x 100 truth grid, over the truth's sd (the mapping
  benchmark's normalised error); ``error_kriging`` the same for the kriging mean itself;
  ``error_candidates`` for the posterior mean at the 50 x 50 candidates, which the decisions
  read (the inducing posterior past the limit);
* ``coverage_90`` — fraction of the truth grid inside the calibrated 90% intervals.

The observations are drawn half uniformly and half where the truth changes fast (probability
proportional to its gradient), as a boundary-seeking acquisition crowds them. The exact model
is skipped where its posterior would need more than ``--max-exact-gb``. Map seeds 900-901 and
point seeds 60,000 + n are used nowhere else. Progress goes to stderr; one JSON object to
stdout; ``--plot PATH`` draws the figures against the number of points
(``benchmarks/results/kriging_scale.png``).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

EXTENT = (0.0, 10.0, 0.0, 10.0)
NOISE_FRACTION = 0.02
MAP_SEEDS = {"smooth": 900, "discontinuous": 901}
CANDIDATES = 50  # 50 x 50 candidate positions, as the mapping benchmark's latency runs


def _points(m: Any, n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """``n + 120`` positions: half uniform, half drawn where the truth's gradient is large."""
    from simulators.maps import truth_grid

    rng = np.random.default_rng(seed)
    xs, ys, grid = truth_grid(m, 200)
    v = grid["value"]
    gy, gx = np.gradient(v, ys, xs)
    p = np.hypot(gx, gy).reshape(-1)
    p = p / p.sum()
    k = (n + 120) // 2
    cell = rng.choice(p.size, k, p=p)
    h = (xs[1] - xs[0]) / 2
    steep = np.column_stack([xs[cell % len(xs)], ys[cell // len(xs)]]) + rng.uniform(-h, h, (k, 2))
    flat = rng.uniform(EXTENT[0], EXTENT[1], (n + 120 - k, 2))
    P = np.clip(np.concatenate([flat, steep])[rng.permutation(n + 120)], EXTENT[0], EXTENT[1])
    return P, m.values(P[:, 0], P[:, 1])["value"]


def _nbytes(factor: Any) -> int:
    import torch

    return sum(v.element_size() * v.nelement() for v in vars(factor).values() if isinstance(v, torch.Tensor))


def _run(kind: str, n: int, exact: bool, inducing_points: int = 1024) -> dict[str, Any]:
    import torch

    from models.kriging import KrigingConfig, MappingGP
    from models.mapping import MapAcquisitionConfig, select_batch
    from simulators.maps import DiscontinuousMap, SmoothMap, truth_grid

    torch.set_num_threads(1)
    m = (SmoothMap if kind == "smooth" else DiscontinuousMap)(seed=MAP_SEEDS[kind], extent=EXTENT)
    xs, ys, grid = truth_grid(m, 100)
    T = np.stack(np.meshgrid(xs, ys), -1).reshape(-1, 2)
    truth = grid["value"].reshape(-1)
    noise = NOISE_FRACTION * float(np.std(truth))
    P, V = _points(m, n, 60_000 + n)
    V = V + noise * np.random.default_rng(70_000 + n).normal(size=len(V))
    g = np.linspace(EXTENT[0], EXTENT[1], CANDIDATES)
    C = np.stack(np.meshgrid(g, g), -1).reshape(-1, 2)
    cfg = KrigingConfig(multiscale=True, background=True, exact_limit=None if exact else 4000,
                        inducing_points=inducing_points)
    gp = MappingGP([[0, 0], [10, 10]], C, 1, cfg)
    t0 = time.perf_counter()
    gp.add(P[:n], V[:n, None], np.full((n, 1), noise**2))
    gp.wait()
    build = time.perf_counter() - t0
    model = type(gp._factors[0]).__name__
    acq = MapAcquisitionConfig(kind="gradient_variance", gradient_weight=2.0, travel_weight=2.0)
    times, pos = [], P[n - 1]
    for i in range(n, n + 120, 4):
        t = time.perf_counter()
        gp.add(P[i : i + 4], V[i : i + 4, None], np.full((4, 1), noise**2))
        idx = select_batch(gp, acq, 4, position=pos, grid_shape=(CANDIDATES, CANDIDATES))
        times.append(time.perf_counter() - t)
        pos = C[idx[-1]]
    cand_mean = gp.posterior()[0][:, 0]  # what the decisions read
    cand_truth = m.values(C[:, 0], C[:, 1])["value"]
    mean, var = gp.predict(T)  # the map the model draws, and its calibrated intervals
    f = gp._factors[0]
    Xs = gp._unit(gp._X[: f.n])
    mu = torch.cat([f.at(Xs, u)[0] for u in torch.split(gp._unit(T), 4096)])  # the kriging mean itself
    mean_k = (mu * f.hyper.y_std + f.hyper.y_mean).cpu().numpy()
    sd = float(np.std(truth))
    inside = float(np.mean(np.abs(mean[:, 0] - truth) <= 1.6449 * np.sqrt(var[:, 0])))
    gp.close()
    return {
        "model": {"_Factor": "exact", "_Inducing": "inducing"}[model],
        "build_s": round(build, 2),
        "decision_ms_p50": round(1e3 * float(np.median(times)), 1),
        "decision_ms_p95": round(1e3 * float(np.percentile(times, 95)), 1),
        "factor_mb": round(_nbytes(gp._factors[0]) / 2**20, 1),
        "error_kriging": round(float(np.sqrt(np.mean((mean_k - truth) ** 2)) / sd), 4),
        "error_candidates": round(float(np.sqrt(np.mean((cand_mean - cand_truth) ** 2)) / sd), 4),
        "error_map": round(float(np.sqrt(np.mean((mean[:, 0] - truth) ** 2)) / sd), 4),
        "reconstruction": gp.reconstruction[0],
        "coverage_90": round(inside, 3),
    }


def _plot(path: Path, results: dict[str, Any]) -> None:
    """Decision time (p95), memory per map and map error against the number of points."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = (("decision_ms_p95", "add 4, choose 4: p95 (ms)"), ("factor_mb", "memory per map (MB)"),
              ("error_map", "map error (RMSE / sd)"), ("error_candidates", "candidates' error (decisions)"))
    fig, axes = plt.subplots(1, len(panels), figsize=(16, 3.8))
    for ax, (key, label) in zip(axes, panels, strict=True):
        for model, colour in (("exact", "tab:blue"), ("inducing", "tab:orange")):
            for kind, style in (("smooth", "-o"), ("discontinuous", "--s")):
                pts = [(int(n), r[kind][model][key]) for n, r in results.items() if key in r[kind][model]]
                if pts:
                    ax.plot(*zip(*pts, strict=True), style, color=colour, label=f"{model}, {kind}")
        ax.set(xlabel="points", ylabel=label, xscale="log", yscale="log")
    axes[0].legend(fontsize=8)
    fig.suptitle("kriging past a few thousand points: exact against inducing-point (FITC) posterior")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, nargs="+", default=[5000, 10000, 20000], help="numbers of observations")
    parser.add_argument("--max-exact-gb", type=float, default=1.0,
                        help="skip the exact model where its factor would need more than this (default 1)")
    parser.add_argument("--plot", type=Path, default=None,
                        help="write decision time, memory and map error against points here (PNG)")
    parser.add_argument("--inducing-points", type=int, default=1024, help="of the inducing model (default 1024)")
    args = parser.parse_args(argv)
    c = CANDIDATES**2
    out: dict[str, Any] = {"benchmark": "kriging_scale", "candidates": c, "inducing_points": args.inducing_points,
                           "date": time.strftime("%Y-%m-%d"), "results": {}}
    t_all = time.perf_counter()
    for n in args.n:
        for kind in MAP_SEEDS:
            row: dict[str, Any] = {}
            for exact in (True, False):
                name = "exact" if exact else "inducing"
                need_gb = 8 * (n * n + n * c) / 2**30
                if exact and need_gb > args.max_exact_gb:
                    row[name] = {"skipped": f"its factor would need {need_gb:.1f} GB (--max-exact-gb {args.max_exact_gb})"}
                    continue
                print(f"[kriging_scale] n={n} {kind} {name} ...", file=sys.stderr, flush=True)
                row[name] = _run(kind, n, exact, args.inducing_points)
            out["results"].setdefault(str(n), {})[kind] = row
    out["wall_s"] = round(time.perf_counter() - t_all, 1)
    if args.plot is not None:
        _plot(args.plot, out["results"])
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""``beampilot demo mapping``: autonomous SAXS mapping of a simulated film, against a raster.

A Bluesky RunEngine drives :class:`simulators.stage.SimSampleStage` over a hidden
:class:`simulators.maps.FilmMap` (grains with their own orientation, a disordered phase, smooth
variation of the ring). :class:`agents.mapping.MappingAgent` chooses each batch of positions
through :func:`agents.plans.steered_scan`, every request passing the safety gate (stage limits,
maximum step, rate); each frame is reduced to peak position, intensity and orientation
components, and the kriging map improves until the budget or the precision goal is met.

Then a serpentine raster of the same number of points is measured on the same stage and shown
as users show a raster (linear interpolation). The report (``OUT``) has ``maps.png`` (truth,
reconstruction, uncertainty with the stage's path, raster; one row per quantity),
``summary.json`` (errors against truth for both, travel, beam and move time, agent report), and
the store ``OUT/store.zarr`` (raw runs, derived runs, agent state).

A run that fails (a refused move, a lost frame the RunEngine cannot take) is reported and the
next run continues: positions asked for and never measured are asked for again first.

The kriging hyper-parameters are refitted in a background thread, as in a live session, and
swapped in when done, so two runs with the same seed differ a little (4 runs of the defaults:
peak-position error 0.137-0.180). ``overrides={"background_refit": False}`` (the CLI's
``--reproducible``) refits inline: the same seed then gives the same run.
"""

from __future__ import annotations

import json
import logging
import math
import time
from pathlib import Path
from typing import Any

import numpy as np
from bluesky import RunEngine
from ophyd import Signal
from scipy.interpolate import RegularGridInterpolator
from tqdm import tqdm

from agents.mapping import MappingAgent, MappingSettings
from agents.plans import POINT_KEY, measure_run, steered_scan
from agents.safety import AxisLimits, SafetyConfig, SafetyGate
from models.mapping import path_length
from models.saxs2d import ReductionError, reduce_frame
from simulators.maps import FilmMap, truth_grid
from simulators.sas import SimClock
from simulators.stage import SimSampleStage, StageFaults
from streams.zarr_writer import ZarrRunWriter

__all__ = ["run_mapping_demo"]

logger = logging.getLogger(__name__)

QUANTITIES = ("peak_q", "intensity", "order_x", "order_y")
EXPOSURE = 0.5  # s per frame
MAX_STEP = 4.0  # mm per axis per move: in the gate, and known to the agent so it never asks for more


def _settings(film: FilmMap, budget: int, seed: int, overrides: dict[str, Any] | None) -> MappingSettings:
    base = {"extent": list(film.extent), "quantities": list(QUANTITIES), "max_points": budget,
            "weights": [1.0, 1.0, 1.0, 1.0], "seed": seed, "max_step": MAX_STEP}
    base.update(overrides or {})
    return MappingSettings.model_validate(base)


def _gate(film: FilmMap, clock: SimClock) -> SafetyGate:
    x0, x1, y0, y1 = film.extent
    return SafetyGate(SafetyConfig(
        allowed_plans=frozenset({"measure"}),
        limits={"stage_x": AxisLimits(x0, x1, max_step=MAX_STEP), "stage_y": AxisLimits(y0, y1, max_step=MAX_STEP)},
        max_requests_per_minute=60, max_points_per_request=8), clock=clock.time)


def run_mapping_demo(
    out: Path,
    *,
    seed: int = 3,
    budget: int = 120,
    batch: int = 4,
    progress: bool = True,
    faults: StageFaults | None = None,
    overrides: dict[str, Any] | None = None,
    max_runs: int = 10,
) -> dict[str, Any]:
    """Map a hidden film autonomously, then by raster; write the report; return the summary."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    t_wall = time.perf_counter()
    film = FilmMap(seed=seed)
    clock = SimClock(start=0.0)
    stage = SimSampleStage("stage", truth=film, speed=2.0, seed=seed, clock=clock, faults=faults)
    stage.saxs.exposure.set(EXPOSURE).wait()
    store = out / "store.zarr"
    writer = ZarrRunWriter(store)
    agent = MappingAgent(_settings(film, budget, seed, overrides), store, sinks=[writer])
    gate = _gate(film, clock)
    RE = RunEngine({}, context_managers=[])
    RE.subscribe(writer)
    bar = tqdm(total=budget, desc="mapping", unit="pt", disable=not progress, dynamic_ncols=True)
    RE.subscribe(lambda name, doc: bar.update(1) if name == "event" else None)
    failures: list[str] = []
    for _ in range(max_runs):
        try:
            RE(steered_scan(agent, [stage.saxs], {"stage_x": stage.x, "stage_y": stage.y}, gate=gate,
                            batch_size=batch, sleep=clock.sleep, md={"sample": f"film seed {seed}"}))
        except Exception as err:  # a refused move or a detector fault ends this run, not the session
            failures.append(f"{type(err).__name__}: {err}")
            logger.warning("run failed (%s); continuing with the next run", err)
            continue
        break
    bar.close()
    agent.gp.wait()
    beam_time_agent = len(agent.path()) * EXPOSURE
    travel_agent, move_time_agent = stage.travel, stage.move_time

    raster = _raster(RE, stage, film, agent.n_observations)
    summary = _compare(out, agent, film, raster)
    summary.update({
        "agent": agent.report(), "safety": gate.report(), "failed_runs": failures,
        "stage": {"agent_travel_mm": travel_agent, "agent_move_time_s": move_time_agent,
                  "agent_beam_time_s": beam_time_agent, "raster_travel_mm": raster["travel"],
                  "raster_move_time_s": raster["move_time"], "raster_points": raster["n"]},
        "seed": seed, "budget": budget, "wall_time_s": time.perf_counter() - t_wall,
        "store": str(store), "figures": ["maps.png"],
    })
    agent.close()
    (out / "summary.json").write_text(json.dumps(summary, indent=2, default=float))
    return summary


def raster_shape(n: int, width: float, height: float) -> tuple[int, int]:
    """``(nx, ny)``, both >= 2, of the raster with the most points ``nx * ny <= max(n, 4)``; of
    those, the one whose spacing is most nearly the same along x and y (``nx / ny`` closest to
    ``width / height``). 120 points on a square: ``(12, 10)``."""
    n = max(int(n), 4)
    best = (4, -abs(math.log(height / width)), 2, 2)
    for ny in range(2, n // 2 + 1):
        nx = n // ny
        if nx < 2:
            break
        key = (nx * ny, -abs(math.log((nx - 1) / (ny - 1) * height / width)), nx, ny)
        if key[:2] > best[:2]:
            best = key
    return best[2], best[3]


def _raster(RE: RunEngine, stage: SimSampleStage, film: FilmMap, n: int) -> dict[str, Any]:
    """Measure a serpentine raster of as many points as the agent measured (``n``, or the
    nearest raster below it) on the same stage; reduce its frames."""
    x0, x1, y0, y1 = film.extent
    nx, ny = raster_shape(n, x1 - x0, y1 - y0)
    gx, gy = np.linspace(x0, x1, nx), np.linspace(y0, y1, ny)
    points = []
    for i, y in enumerate(gy):
        for x in (gx if i % 2 == 0 else gx[::-1]):
            points.append({"stage_x": float(x), "stage_y": float(y)})
    frames: list[tuple[float, float, np.ndarray, float]] = []

    def collect(name: str, doc: dict) -> None:
        if name == "event":
            d = doc["data"]
            frames.append((d["stage_x"], d["stage_y"], np.asarray(d["stage_saxs_counts"]), d["stage_saxs_exposure"]))

    travel0, move0 = stage.travel, stage.move_time
    RE(measure_run([stage.saxs], {"stage_x": stage.x, "stage_y": stage.y}, points,
                   [f"raster:{i}" for i in range(len(points))], Signal(name=POINT_KEY, value=""),
                   md={"plan_name": "raster", "purpose": "comparison with the agent"}), collect)
    values = {q: np.full((ny, nx), np.nan) for q in QUANTITIES}
    for x, y, counts, t in frames:
        ix = int(np.argmin(np.abs(gx - x)))
        iy = int(np.argmin(np.abs(gy - y)))
        try:
            r = reduce_frame(counts, t, stage.geometry)
        except ReductionError as err:
            logger.warning("raster frame at (%g, %g) failed reduction: %s", x, y, err)
            continue
        for q in QUANTITIES:
            values[q][iy, ix] = r.values[q]
    return {"gx": gx, "gy": gy, "values": values, "n": len(points),
            "travel": stage.travel - travel0, "move_time": stage.move_time - move0}


def _compare(out: Path, agent: MappingAgent, film: FilmMap, raster: dict[str, Any]) -> dict[str, Any]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    xs, ys, truth = truth_grid(film, 100)
    T = np.stack(np.meshgrid(xs, ys), -1).reshape(-1, 2)
    mean, var = agent.gp.predict(T)
    drawn = agent.gp.drawn or agent.gp.reconstruction
    errors: dict[str, dict[str, float]] = {}
    fig, axes = plt.subplots(len(QUANTITIES), 4, figsize=(15, 3.4 * len(QUANTITIES)))
    extent = film.extent
    path = agent.path()
    for row, q in enumerate(QUANTITIES):
        t = truth[q]
        m = mean[:, row].reshape(100, 100)
        sd = np.sqrt(var[:, row]).reshape(100, 100)
        grid = raster["values"][q]
        filled = np.where(np.isfinite(grid), grid, np.nanmean(grid))
        interp = RegularGridInterpolator((raster["gy"], raster["gx"]), filled, method="linear")
        r = interp(T[:, ::-1]).reshape(100, 100)
        scale = float(np.std(t)) or 1.0
        errors[q] = {"agent": float(np.sqrt(np.mean((m - t) ** 2)) / scale),
                     "raster": float(np.sqrt(np.mean((r - t) ** 2)) / scale)}
        lo, hi = np.percentile(t, [1, 99])
        panels = [(t, "truth"), (m, f"beampilot ({len(path)} pts, {drawn[row]}), err {errors[q]['agent']:.3f}"),
                  (sd, "posterior sd + path"), (r, f"raster ({raster['n']} pts), err {errors[q]['raster']:.3f}")]
        for col, (img, title) in enumerate(panels):
            ax = axes[row, col]
            kw = {} if col == 2 else {"vmin": lo, "vmax": hi}
            im = ax.imshow(img, origin="lower", extent=extent, cmap="magma" if col == 2 else "viridis", **kw)
            if col == 2 and len(path):
                ax.plot(path[:, 0], path[:, 1], "-", color="w", lw=0.5, alpha=0.8)
                ax.plot(path[:, 0], path[:, 1], ".", color="c", ms=2)
            ax.set_title(f"{q}: {title}", fontsize=9)
            fig.colorbar(im, ax=ax, fraction=0.046)
    fig.tight_layout()
    fig.savefig(out / "maps.png", dpi=90)
    plt.close(fig)
    return {"normalised_rmse": errors, "agent_path_length_mm": path_length(path),
            "reconstruction": dict(zip(QUANTITIES, drawn, strict=True))}

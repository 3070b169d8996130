"""``beampilot demo tune``: Bayesian optimisation of a simulated beamline's optics, in one process.

A Bluesky RunEngine drives :class:`simulators.optics.SimBeamlineOptics` (mirror pitch and bender,
two slit gaps, a focusing lens; a noisy flux and beam-size readout). :class:`agents.tuning.TuningAgent`
chooses each next setting through :func:`agents.plans.steered_scan`, every request passing a
:class:`~agents.safety.SafetyGate` with the optics' operating limits and largest steps, until its
budget is spent. It maximises flux at a required beam size, searching the slit gaps on a log
scale (:data:`LOG_SCALE_AXES`).

Outputs in ``OUT``: ``store.zarr`` (raw runs and the agent's state), ``convergence.png`` (best
feasible flux against evaluations, with the true optimum; beam size against evaluations, with the
requirement), ``settings.png`` (the settings tried, and the final ones against the limits) and
``summary.json``. The true optimum comes from :func:`simulators.optics.true_optimum` (dense
optimisation of the noise-free model, hidden from the agent).

``resume=OUT/store.zarr`` continues a killed demo: the setup comes back from the store, the agent
from its own state, and points asked for but never measured are measured first.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
import zarr
from bluesky import RunEngine
from tqdm import tqdm

from agents.config import SafetySettings, load_settings
from agents.errors import AgentStoreError
from agents.plans import steered_scan
from agents.safety import SafetyGate
from agents.tuning import TuningAgent, TuningSettings
from simulators.optics import AXES, OpticsFaults, SimBeamlineOptics, optics_response, true_optimum
from simulators.sas import SimClock
from streams.zarr_writer import ZarrRunWriter

__all__ = ["LOG_SCALE_AXES", "OPERATING_LIMITS", "TuneSetup", "agent_settings", "closed_loop", "make_optics",
           "run_tune_demo", "safety_settings", "summarize", "true_value_curve", "write_report"]

DEMO_ATTR = "beampilot_tune_demo"

#: the operator's window for each axis (inside the hardware limits) and its largest safe step
OPERATING_LIMITS: dict[str, dict[str, float]] = {
    "mirror_pitch": {"low": 1.5, "high": 4.0, "max_step": 1.5},  # mrad
    "mirror_bender": {"low": 0.3, "high": 1.0, "max_step": 0.4},  # 1/km
    "slit_h": {"low": 0.05, "high": 3.0, "max_step": 2.0},  # mm
    "slit_v": {"low": 0.01, "high": 0.5, "max_step": 0.3},  # mm
    "focus": {"low": -10.0, "high": 10.0, "max_step": 12.0},  # mm
}
#: axes the agent searches on a log scale: slit gaps span decades (0.05-3 mm is a factor of 60) and
#: act multiplicatively on flux and spot size, as an operator who has scanned slits knows
LOG_SCALE_AXES: tuple[str, ...] = ("slit_h", "slit_v")
KEYS = {"objective": "optics_flux", "constraint": "optics_beam_size", "stream": "primary"}
#: relative rms noise of the beam monitor's flux and beam-size readings: the instrument's
#: specification, which the agent is told (it is not the hidden physics)
FLUX_NOISE, SIZE_NOISE = 0.02, 0.01


@dataclass(frozen=True)
class TuneSetup:
    """The demo's world, kept in the store so a resume rebuilds the same one."""

    seed: int = 0
    required_beam_size: float = 12.0  # µm
    budget: int = 40
    batch_size: int = 1
    nan_probability: float = 0.0

    def limits(self) -> tuple[tuple[float, float], ...]:
        return tuple((OPERATING_LIMITS[a]["low"], OPERATING_LIMITS[a]["high"]) for a in AXES)


def agent_settings(setup: TuneSetup, overrides: dict[str, Any] | None = None) -> TuningSettings:
    """The agent's settings: the operating window, the requirement, the budget; not the physics."""
    base: dict[str, Any] = {
        "name": "tuning", "keys": dict(KEYS),
        "axes": {a: {**OPERATING_LIMITS[a], **({"scale": "log"} if a in LOG_SCALE_AXES else {})} for a in AXES},
        "required_beam_size": setup.required_beam_size, "budget": setup.budget,
        "batch_size": setup.batch_size, "seed": setup.seed,
        "objective_noise": FLUX_NOISE, "constraint_noise": SIZE_NOISE,
        # a short demo keeps at least 2 evaluations for the optimizer
        "n_initial": max(2, min(TuningSettings.model_fields["n_initial"].default, setup.budget - 2)),
    }
    base.update(overrides or {})
    return load_settings(TuningSettings, base, where="the demo's agent settings")


def safety_settings() -> SafetySettings:
    return SafetySettings(
        allowed_plans=["measure"], limits={a: dict(OPERATING_LIMITS[a]) for a in AXES},
        max_points_per_request=8,
    )


def make_optics(setup: TuneSetup, clock: Any, seed: int) -> SimBeamlineOptics:
    return SimBeamlineOptics("optics", seed=seed, clock=clock, flux_noise=FLUX_NOISE, size_noise=SIZE_NOISE,
                             faults=OpticsFaults(nan_probability=setup.nan_probability))


def closed_loop(
    setup: TuneSetup,
    agent: TuningAgent,
    *,
    clock: Any,
    subscribers: tuple[Any, ...] = (),
    gate: SafetySettings | None = None,
    max_rounds: int | None = None,
) -> SafetyGate:
    """Run ``agent`` on the simulated optics until it stops; return the safety gate.

    The noise is seeded from the setup's seed and the evaluations already made, so a resumed
    loop draws new noise.
    """
    optics = make_optics(setup, clock, seed=setup.seed * 100_003 + agent.n_observations)
    safety = SafetyGate((gate or safety_settings()).to_config(), clock=clock.time)
    RE = RunEngine({}, context_managers=[])
    for subscriber in subscribers:
        RE.subscribe(subscriber)
    axes = {a: getattr(optics, a) for a in agent.axes}
    RE(steered_scan(agent, [optics], axes, gate=safety, batch_size=setup.batch_size, max_rounds=max_rounds,
                    sleep=clock.sleep, md={"demo": "tune", "required_beam_size": setup.required_beam_size}))
    return safety


class _Progress:
    """A live line on stderr: readings taken (lost ones too), best feasible flux, against the budget."""

    def __init__(self, agent: TuningAgent, enabled: bool) -> None:
        self.agent = agent
        self.bar = tqdm(desc="tuning", unit="eval", total=agent.settings.budget, disable=not enabled,
                        dynamic_ncols=True, initial=agent.n_observations)

    def __call__(self, name: str, doc: dict) -> None:
        if name != "event":
            return
        self.bar.update(1)  # readings taken (the agent hears of each one a moment later)
        best = self.agent.report()["best_observed_feasible"]
        self.bar.set_postfix_str(f"best feasible flux {best[KEYS['objective']]:.3g}/s" if best else
                                 "no setting has met the beam size yet")
        self.bar.refresh()


def run_tune_demo(
    out: Path,
    *,
    seed: int = 0,
    budget: int = 40,
    progress: bool = True,
    required_beam_size: float = 12.0,
    batch_size: int = 1,
    nan_probability: float = 0.0,
    resume: Path | None = None,
    overrides: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Run the closed loop; write the report into ``out``; return the summary (also ``summary.json``)."""
    wall0 = time.perf_counter()
    if resume is not None:
        store = Path(resume)
        setup = _load_setup(store)
        out = store.parent
    else:
        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        store = out / "store.zarr"
        if store.exists():
            raise AgentStoreError(f"{store} exists; resume it (resume={store}) or choose a new output directory")
        setup = TuneSetup(seed, required_beam_size, budget, batch_size, nan_probability)
        settings = agent_settings(setup, overrides)  # checked before the store is made
    writer = ZarrRunWriter(store)
    if resume is None:
        zarr.open_group(store, mode="a").attrs[DEMO_ATTR] = asdict(setup)
        agent = TuningAgent(settings, store)
    else:
        agent = TuningAgent.resume(store)
    clock = SimClock()
    bar = _Progress(agent, progress)
    try:
        gate = closed_loop(setup, agent, clock=clock, subscribers=(writer, bar))
    finally:
        bar.bar.close()
        writer.close()
    summary = summarize(agent, gate, setup, time.perf_counter() - wall0)
    summary["store"] = str(store)
    write_report(out, agent, setup, summary)
    return summary


def _load_setup(store: Path) -> TuneSetup:
    if not store.exists():
        raise AgentStoreError(f"no store at {store}; pass the store.zarr of an earlier tune demo")
    attrs = zarr.open_group(store, mode="r").attrs
    if DEMO_ATTR not in attrs:
        raise AgentStoreError(f"{store} was not written by 'beampilot demo tune'; nothing to resume")
    return TuneSetup(**dict(attrs[DEMO_ATTR]))


def true_value_curve(agent: TuningAgent, required: float) -> list[float | None]:
    """Noise-free flux at the agent's recommendation after each evaluation (1..n), 0 where the
    recommended setting truly misses the requirement, ``None`` before the first recommendation."""
    history = agent.recommendation_history()
    curve: list[float | None] = []
    j = -1
    for n in range(1, agent.n_observations + 1):
        while j + 1 < len(history) and history[j + 1]["n_observations"] <= n:
            j += 1
        if j < 0:
            curve.append(None)
            continue
        flux, size = optics_response(history[j]["settings"])
        curve.append(float(flux) if float(size) <= required else 0.0)
    return curve


def summarize(agent: TuningAgent, gate: SafetyGate, setup: TuneSetup, wall: float) -> dict[str, Any]:
    report = agent.report()
    opt_settings, opt_flux, opt_size = true_optimum(setup.required_beam_size, setup.limits())
    rec = report["recommendation"]
    final = None
    if rec is not None:
        flux, size = (float(v) for v in optics_response(rec["settings"]))
        final = {"settings": rec["settings"], "true_flux": flux, "true_beam_size": size,
                 "meets_requirement": size <= setup.required_beam_size, "fraction_of_optimum": flux / opt_flux,
                 "predicted_flux": rec["predicted_objective"], "p_feasible": rec["p_feasible"]}
    curve = true_value_curve(agent, setup.required_beam_size)
    within = next((i + 1 for i, v in enumerate(curve) if v is not None and v >= 0.95 * opt_flux), None)
    return {
        "setup": asdict(setup),
        "true_optimum": {"settings": opt_settings, "flux": opt_flux, "beam_size": opt_size},
        "final": final, "recommendation_rule": "evaluated setting with the best posterior-mean flux among "
        f"those feasible with probability >= {agent.settings.recommend_p_feasible}",
        "evals_to_within_5pct": within, "n_evaluations": report["n_observations"],
        "decisions": report["decisions"], "stop_reason": report["stop_reason"],
        "best_observed_feasible": report["best_observed_feasible"], "errors": report["errors"],
        "safety": gate.report(), "wall_time_s": wall,
    }


# -- report ------------------------------------------------------------------------------------
def write_report(out: Path, agent: TuningAgent, setup: TuneSetup, summary: dict[str, Any]) -> list[Path]:
    """``convergence.png``, ``settings.png`` and ``summary.json`` into ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    paths = [_plot_convergence(out, agent, setup, summary), _plot_settings(out, agent, summary)]
    summary["figures"] = [p.name for p in paths]
    path = out / "summary.json"
    path.write_text(json.dumps(summary, indent=2, default=float))
    return [*paths, path]


def _plot_convergence(out: Path, agent: TuningAgent, setup: TuneSetup, summary: dict[str, Any]) -> Path:
    _, f, c = agent.observations()
    n = np.arange(1, len(f) + 1)
    req = setup.required_beam_size
    feasible = c <= req
    best = np.maximum.accumulate(np.where(feasible, f, 0.0)) if len(f) else f
    opt = summary["true_optimum"]["flux"]
    truth = np.array([np.nan if v is None else v for v in true_value_curve(agent, req)], dtype=float)
    fig, (ax, ax2) = plt.subplots(2, 1, figsize=(7.5, 7), sharex=True)
    ax.axhline(opt, color="k", ls="--", lw=1, label=f"true optimum {opt:.3g}/s")
    ax.axhspan(0.95 * opt, opt, color="tab:green", alpha=0.15, label="within 5%")
    ax.step(n, best, where="post", color="tab:blue", label="best feasible flux measured")
    ax.step(n, truth, where="post", color="tab:orange", label="true flux at the recommendation")
    ax.scatter(n, f, s=10, c=np.where(feasible, "tab:blue", "tab:gray"), alpha=0.6, label="each evaluation")
    ax.set(ylabel="flux (photons/s)", title=f"maximise flux at beam size <= {req:g} µm")
    ax.legend(fontsize=8, loc="lower right")
    ax2.scatter(n, c, s=12, c=np.where(feasible, "tab:blue", "tab:red"))
    ax2.axhline(req, color="k", ls="--", lw=1, label=f"required <= {req:g} µm")
    ax2.set(xlabel="evaluation", ylabel="beam size (µm)", yscale="log")
    ax2.yaxis.set_major_formatter(matplotlib.ticker.ScalarFormatter())
    ax2.yaxis.set_minor_formatter(matplotlib.ticker.ScalarFormatter())
    ax2.legend(fontsize=8)
    return _save(fig, out / "convergence.png")


def _plot_settings(out: Path, agent: TuningAgent, summary: dict[str, Any]) -> Path:
    X, _, c = agent.observations()
    final = (summary.get("final") or {}).get("settings")
    opt = summary["true_optimum"]["settings"]
    fig, axes = plt.subplots(len(agent.axes), 1, figsize=(7.5, 1.7 * len(agent.axes) + 0.8), sharex=True)
    n = np.arange(1, len(X) + 1)
    for j, (a, ax) in enumerate(zip(agent.axes, np.atleast_1d(axes), strict=True)):
        lim = agent.settings.axes[a]
        ax.axhspan(lim.low, lim.high, color="tab:gray", alpha=0.1)
        ax.scatter(n, X[:, j], s=10, c=np.where(c <= agent.settings.required_beam_size, "tab:blue", "tab:red"))
        ax.axhline(opt[a], color="k", ls="--", lw=1)
        if final is not None:
            ax.axhline(final[a], color="tab:orange", lw=1.5)
        if lim.scale == "log":  # drawn as the agent searches it
            ax.set_yscale("log")
            ax.set_ylim(lim.low / (lim.high / lim.low) ** 0.05, lim.high * (lim.high / lim.low) ** 0.05)
        else:
            ax.set_ylim(lim.low - 0.05 * (lim.high - lim.low), lim.high + 0.05 * (lim.high - lim.low))
        ax.set_ylabel(a + (" (log)" if lim.scale == "log" else ""), fontsize=8)
    axes[0].set_title("settings tried (blue: met the requirement); final (orange), true optimum (dashed), limits (gray)",
                      fontsize=8)
    axes[-1].set_xlabel("evaluation")
    return _save(fig, out / "settings.png")


def _save(fig: Any, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path

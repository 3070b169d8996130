"""The Q-scan report: what a beamline scientist looks at first, then the numbers.

* ``iq.png`` — measured I(Q) with error bars, the GP's posterior band, the fitted model and, in a
  demo, the hidden truth;
* ``sampling.png`` — where (Q) and when (measurement order) each point was measured, by reason;
* ``convergence.png`` — relative 1-sigma of the size parameters against beam time, with the goal;
* ``summary.json`` — fitted parameters with uncertainties, beam time, counts, wall time.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import matplotlib.ticker  # noqa: E402
import numpy as np  # noqa: E402

from models.sas import SASModel  # noqa: E402
from models.sasfit import merge_observations  # noqa: E402

if TYPE_CHECKING:
    from agents.qsampling import QSamplingAgent

__all__ = ["write_report"]

COLORS = {"survey": "tab:gray", "design": "tab:blue", "discriminate": "tab:purple", "ivr": "tab:orange", "variance": "tab:orange", "ucb": "tab:orange"}


def write_report(out: Path, agent: QSamplingAgent, setup: Any, summary: dict[str, Any]) -> list[Path]:
    """Write the plots and ``summary.json`` into ``out``; return the paths written."""
    out.mkdir(parents=True, exist_ok=True)
    paths = [_plot_iq(out, agent, setup), _plot_sampling(out, agent), _plot_convergence(out, agent, setup)]
    path = out / "summary.json"
    summary["figures"] = [p.name for p in paths]
    path.write_text(json.dumps(summary, indent=2, default=float))
    return [*paths, path]


def _to_intensity(rate: np.ndarray, flux: float, dark: float) -> np.ndarray:
    return (rate - dark) / flux


def _plot_iq(out: Path, agent: QSamplingAgent, setup: Any) -> Path:
    obs = agent.store.read("observations")
    q, c, t = merge_observations(obs["q"], obs["counts"], obs["exposure"])
    flux, dark = agent.flux, agent.dark_rate
    fig, ax = plt.subplots(figsize=(7, 5))
    value = _to_intensity(c / t, flux, dark)
    sigma = np.sqrt(np.maximum(c, 1)) / t / flux
    shown = value > 0  # a point at or below the dark rate has no place on a log axis
    lower = np.minimum(sigma, 0.9 * value)  # keep bars on the log axis
    ax.errorbar(q[shown], value[shown], yerr=[lower[shown], sigma[shown]], fmt="o", ms=3, color="k",
                label=f"measured ({len(obs['q'])} counts at {q.size} Q)", zorder=3)
    if np.any(~shown):
        ax.plot([], [], " ", label=f"{int(np.sum(~shown))} Q at or below the dark rate (not shown)")
    grid = np.geomspace(*agent.settings.q_range, 400)
    curves = []
    policy = agent.decision_policy()
    if policy.gp.n_points:
        mean, var = policy.gp.predict(grid)
        lo, hi = (_to_intensity(np.exp(mean + s * 2 * np.sqrt(var)), flux, dark) for s in (-1, 1))
        ax.fill_between(grid, np.clip(lo, 1e-6, None), np.clip(hi, 1e-6, None), color="tab:orange", alpha=0.3,
                        label="GP posterior ±2σ")
    fit = policy.fit.result
    if fit is not None:
        curves.append(policy.model.intensity(grid, fit.values))
        ax.plot(grid, curves[-1], color="tab:blue", label="fitted model")
    if setup is not None:
        kind_model = SASModel(policy.model.model_name, dq_over_q=setup.dq_over_q, fixed=agent.settings.fit.fixed)
        curves.append(kind_model.intensity(grid, setup.truth))
        ax.plot(grid, curves[-1], "--", color="tab:red", lw=1, label="truth (hidden from the agent)")
    floor = min([np.min(value[shown])] * bool(np.any(shown)) + [np.min(cv) for cv in curves] or [1e-3])
    ax.set_ylim(bottom=0.2 * floor)
    ax.set(xscale="log", yscale="log", xlabel="Q (1/Å)", ylabel="I(Q) (1/cm)", title=f"I(Q): {agent.settings.fit.model_name}")
    ax.legend(fontsize=8)
    return _save(fig, out / "iq.png")


def _plot_sampling(out: Path, agent: QSamplingAgent) -> Path:
    dec = agent.store.read("decisions")
    obs = agent.store.read("observations")
    measured = {k: i for i, k in enumerate(obs["point_key"])}
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(11, 4.5))
    for why in sorted(set(dec["why"])):
        rows = [i for i, w in enumerate(dec["why"]) if w == why and dec["point_key"][i] in measured]
        order = [measured[dec["point_key"][i]] for i in rows]
        ax.scatter(dec["q"][rows], order, s=8 + 4 * np.sqrt(dec["exposure"][rows]), c=COLORS.get(why, "tab:green"),
                   label=f"{why} ({len(rows)})", alpha=0.8)
    ax.set(xscale="log", xlabel="Q (1/Å)", ylabel="measurement number (time →)", title="where and when each Q was measured")
    ax.legend(fontsize=8)
    q, _, t = merge_observations(obs["q"], obs["counts"], obs["exposure"])
    ax2.bar(q, t, width=q * 0.04, color="tab:blue")
    ax2.set(xscale="log", xlabel="Q (1/Å)", ylabel="total exposure (s)", title="beam time spent at each Q")
    return _save(fig, out / "sampling.png")


def _plot_convergence(out: Path, agent: QSamplingAgent, setup: Any) -> Path:
    history = agent.fit_history()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for p in agent.settings.fit.size_params:
        pts = [(h["exposure"], h["relative_sigma"][p]) for h in history if np.isfinite(h["relative_sigma"].get(p, np.inf))]
        if pts:
            x, y = zip(*pts, strict=True)
            ax.plot(x, y, "o-", ms=3, label=f"σ({p})/{p}")
    ax.axhline(agent.settings.target_rel_sigma, color="k", ls=":", label="goal")
    ax.set(xscale="log", yscale="log", xlabel="cumulative exposure (s)", ylabel="relative 1σ", title="precision versus beam time")
    for axis in (ax.xaxis, ax.yaxis):
        axis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    ax.yaxis.set_major_locator(matplotlib.ticker.FixedLocator([0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0]))
    ax.yaxis.set_major_formatter(matplotlib.ticker.PercentFormatter(1.0, decimals=1))
    ax.legend(fontsize=8)
    return _save(fig, out / "convergence.png")


def _save(fig: plt.Figure, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path

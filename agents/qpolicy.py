"""The Q-sampling decision: a pure function of observations and a frozen config.

Given every observation so far (Q, counts, exposure) and the settings, :func:`decide` returns
the next measurements (Q, exposure, and why each was chosen), or that the experiment is done.
No documents, stores or devices here, so it can be tested with fixed inputs.

The policy has three phases:

1. **survey** — ``n_initial`` points spread evenly in log Q at ``initial_exposure``;
2. **explore** — while the sasmodels fit is not yet trustworthy (no convergence, a reduced
   deviance above ``max_reduced_deviance``, or undetermined parameters), every point comes from
   the GP's acquisition (integrated variance reduction by default), counted to ``target_counts``
   as the GP predicts the rate there;
3. **design** — once the fit is trustworthy, points come from the optimal design for the size
   parameters (:func:`models.design.design_batch`), with an ``explore_fraction`` of each batch
   still from the GP, which guards against a model that does not describe the sample.

It stops when every size parameter's relative 1-sigma is at most ``target_rel_sigma`` with a
trustworthy fit, or when the exposure budget or the measurement count is spent.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from agents.config import QSamplingSettings
from models.acquisition import greedy_variance_batch, ucb_batch
from models.design import design_batch
from models.gp import LogLogGP, merge_observations
from models.sas import SASModel
from models.sasfit import FitResult, fisher_information, fit_poisson

__all__ = ["Decision", "FitState", "QPolicy"]


@dataclass(frozen=True)
class Decision:
    """Next points (``q``, ``exposure``, ``why`` per point) or a stop with its reason."""

    q: tuple[float, ...] = ()
    exposure: tuple[float, ...] = ()
    why: tuple[str, ...] = ()
    stop_reason: str | None = None


@dataclass
class FitState:
    """The latest fit and how it was obtained (kept between decisions; persisted by the agent)."""

    result: FitResult | None = None
    n_obs_at_fit: int = -1
    fits_since_full: int = 0
    history: list[dict] = field(default_factory=list)


class QPolicy:
    """Holds the numerics (sasmodels kernel, GP, fit state) that :meth:`decide` reuses."""

    def __init__(self, settings: QSamplingSettings, flux: float, dark_rate: float) -> None:
        self.s = settings
        self.flux = flux
        self.dark_rate = dark_rate
        fit = settings.fit
        self.model = SASModel(fit.model_name, dq_over_q=settings.dq_over_q, fixed=fit.fixed)
        self.candidates = np.geomspace(*settings.q_range, settings.n_candidates)
        self.gp = LogLogGP(settings.q_range)
        self.fit = FitState()
        self.names = list(fit.fit_params)
        self.targets = np.array([self.names.index(p) for p in fit.size_params])
        self._merged = (np.empty(0), np.empty(0), np.empty(0))

    # -- fit ----------------------------------------------------------------------------------
    def refit(self, merged: tuple[np.ndarray, np.ndarray, np.ndarray], n_obs: int) -> FitResult | None:
        """Fit the model to the merged data if new data arrived.

        Warm-started from the last fit; a multi-start fit every ``full_refit_every`` fits, and
        whenever the last one was not trustworthy (sphere-like models have local minima).
        """
        if n_obs == self.fit.n_obs_at_fit:
            return self.fit.result
        q_u, c_u, t_u = merged
        if q_u.size <= len(self.names):
            return None
        previous = self.fit.result
        full = (
            previous is None
            or self.fit.fits_since_full >= self.s.full_refit_every
            or not self.trustworthy(previous)
        )
        initial = dict(previous.values) if previous is not None else self._initial()
        result = fit_poisson(
            self.model, q_u, c_u, t_u, flux=self.flux, dark_rate=self.dark_rate, names=self.names,
            initial=initial, bounds={p: tuple(self.s.fit.bounds[p]) for p in self.names},
            starts=self.s.fit_starts if full else 1, rng=np.random.default_rng(n_obs),
        )
        self.fit.fits_since_full = 0 if full else self.fit.fits_since_full + 1
        self.fit.result, self.fit.n_obs_at_fit = result, n_obs
        return result

    def _initial(self) -> dict[str, float]:
        fit = self.s.fit
        if fit.initial:
            return dict(fit.initial)
        return {p: math.sqrt(lo * hi) for p, (lo, hi) in fit.bounds.items() if p in self.names}

    def trustworthy(self, result: FitResult | None) -> bool:
        if result is None or not result.success:
            return False
        sig = np.array([result.sigmas[p] for p in self.names])
        return bool(np.all(np.isfinite(sig)) and result.reduced_deviance <= self.s.max_reduced_deviance)

    def precision(self, result: FitResult | None) -> dict[str, float]:
        """Relative 1-sigma of each size parameter (inf when unknown)."""
        if result is None:
            return {p: math.inf for p in self.s.fit.size_params}
        return {p: float(result.sigmas[p] / abs(result.values[p])) for p in self.s.fit.size_params}

    # -- decision -----------------------------------------------------------------------------
    def decide(self, q: np.ndarray, counts: np.ndarray, exposure: np.ndarray, n: int, n_explored: int) -> Decision:
        """The next up-to-``n`` points, given all observations and how many explore points were chosen so far."""
        s = self.s
        used, n_obs = float(np.sum(exposure)), len(q)
        if n_obs < s.n_initial:
            return self._survey(n_obs, n)
        self._merged = merge_observations(q, counts, exposure)
        result = self.refit(self._merged, n_obs)
        good = self.trustworthy(result)
        if good and max(self.precision(result).values()) <= s.target_rel_sigma:
            return Decision(stop_reason=f"target precision reached ({self._fmt(result)})")
        if used >= s.budget_exposure:
            return Decision(stop_reason=f"exposure budget spent ({used:.1f} s >= {s.budget_exposure} s)")
        if n_obs >= s.max_measurements:
            return Decision(stop_reason=f"measurement budget spent ({n_obs} >= {s.max_measurements})")
        n = min(n, s.max_measurements - n_obs)
        self.gp.update(q, counts, exposure)
        n_explore = n if not good else self._explore_share(n, n_obs, n_explored)
        design = self._design(n - n_explore, result) if n_explore < n else ([], [], [])
        explore = self._explore(n_explore)
        qs, ts, why = (a + b for a, b in zip(design, explore, strict=True))
        return Decision(tuple(qs), tuple(ts), tuple(why))

    def _fmt(self, result: FitResult) -> str:
        return ", ".join(f"{p}={result.values[p]:.4g}±{result.sigmas[p]:.2g}" for p in self.s.fit.size_params)

    def _survey(self, n_obs: int, n: int) -> Decision:
        s = self.s
        grid = np.geomspace(*s.q_range, s.n_initial)[n_obs : n_obs + n]
        return Decision(tuple(grid.tolist()), (s.initial_exposure,) * len(grid), ("survey",) * len(grid))

    def _explore_share(self, n: int, n_obs: int, n_explored: int) -> int:
        # keep the running share of explore points at explore_fraction of all points after the survey
        after = n_obs + n - self.s.n_initial
        return int(np.clip(round(self.s.explore_fraction * after) - n_explored, 0, n))

    def _exposure(self, rate: np.ndarray) -> np.ndarray:
        return np.clip(self.s.target_counts / rate, *self.s.exposure_bounds)

    def _explore(self, n: int) -> tuple[list[float], list[float], list[str]]:
        if n == 0:
            return [], [], []
        mean, cov = self.gp.joint(self.candidates)
        rate = np.exp(mean)
        t = self._exposure(rate)
        if self.s.acquisition == "ucb":
            X = self.gp._x(self.candidates)
            idx = ucb_batch(self.gp.model, X, n)
        else:
            noise = 1.0 / (rate * t + 0.5)
            idx, _ = greedy_variance_batch(cov, noise, n, integrated=self.s.acquisition == "ivr")
        return [float(self.candidates[i]) for i in idx], [float(t[i]) for i in idx], [self.s.acquisition] * n

    def _design(self, n: int, result: FitResult) -> tuple[list[float], list[float], list[str]]:
        q, params = self.candidates, result.values
        theta = np.array([params[p] for p in self.names])
        info_log = self._info_log(result) + np.diag(self._prior_precision())
        cov_log = np.linalg.pinv(info_log)
        jac = self.model.jacobian(q, params, self.names) * self.flux * theta  # d rate / d ln(theta)
        rate = self.flux * self.model.intensity(q, params) + self.dark_rate
        points = design_batch(
            jac, rate, cov_log, self.targets, n, exposure_bounds=self.s.exposure_bounds,
            target_counts=self.s.target_counts, goal=self.s.target_rel_sigma, overhead=self.s.overhead,
        )
        return [float(q[p.index]) for p in points], [p.exposure for p in points], ["design"] * len(points)

    def _info_log(self, result: FitResult) -> np.ndarray:
        """Fisher information of all data so far, in ``ln(theta)``."""
        theta = np.array([result.values[p] for p in self.names])
        q_u, _, t_u = self._merged
        info = fisher_information(
            self.model, q_u, t_u, result.values, self.names, flux=self.flux, dark_rate=self.dark_rate
        )
        return info * np.outer(theta, theta)

    def _prior_precision(self) -> np.ndarray:
        # the bounds as a broad Gaussian prior in ln(theta): +-2 sigma spans [low, high]
        b = self.s.fit.bounds
        return np.array([16.0 / math.log(b[p][1] / b[p][0]) ** 2 for p in self.names])

"""The Q-sampling decision: a function of observations and a frozen config.

Given every observation so far (Q, counts, exposure) and the settings, :meth:`QPolicy.decide`
returns the next measurements (Q, exposure, and why each was chosen), or that the experiment is
done. No documents, stores or devices here, so it can be tested with fixed inputs. The
:class:`QPolicy` object only caches what is costly to rebuild (the sasmodels kernel, the last
fit to warm-start from, GP hyper-parameters): the same observations give the same decision.

1. **survey** — ``n_initial`` points spread evenly in log Q at ``initial_exposure``;
2. **explore** — while the sasmodels fit is not trustworthy (no convergence, a reduced deviance
   above ``max_reduced_deviance``, or undetermined size parameters), every point comes from the
   GP's acquisition (integrated variance reduction by default);
3. **design** — once it is, points come from the optimal design for the size parameters
   (:func:`models.design.design_batch`), with an ``explore_fraction`` of each batch still from
   the GP, which guards against a model that does not describe the sample. Each batch's beam
   time is ``max_batch_growth`` times what was spent so far, ``explore_time_fraction`` of it
   to the GP's points;
4. **check** — at the target precision a multi-start fit looks for a rival optimum that fits as
   well with other sizes; while there is one, design points go where the two predictions
   differ most, until the data reject one.

It stops when every size parameter's relative 1-sigma (widened by ``sqrt(max(1, reduced
deviance))``) is at most ``target_rel_sigma`` with a trustworthy fit and no rival, or when the
exposure budget or the measurement count is spent.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from agents.config import QSamplingSettings
from models.acquisition import greedy_variance_batch, ucb_batch
from models.design import design_batch
from models.gp import LogLogGP
from models.sas import SASModel
from models.sasfit import (
    FitResult,
    fisher_information,
    fit_poisson,
    fit_poisson_starts,
    merge_observations,
)

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
    """The latest fit and when it was made (kept between decisions)."""

    result: FitResult | None = None
    n_obs: int = -1
    exposure: float = 0.0
    n_obs_full: int = 0


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
        # size parameters first: multi-start fits spread the leading `n_size` over their bounds
        self.names = [*fit.size_params, *(p for p in fit.fit_params if p not in fit.size_params)]
        self.n_size = len(fit.size_params)
        self.targets = np.arange(self.n_size)
        self._merged = (np.empty(0), np.empty(0), np.empty(0))
        self.rival: FitResult | None = None
        self._info_cache: tuple[tuple[FitResult, tuple], np.ndarray] | None = None

    # -- fit ----------------------------------------------------------------------------------
    def fit_due(self, n_obs: int, exposure: float) -> bool:
        """Refit when the data grew by ``refit_growth`` (in count or exposure) since the last fit,
        or when the last fit is not trustworthy; in between, decisions use the last fit's
        parameters with the Fisher information of all data, which costs no fit."""
        f, g = self.fit, self.s.refit_growth
        if f.result is None or not self.trustworthy(f.result):
            return n_obs != f.n_obs
        return n_obs >= g * f.n_obs or exposure >= g * f.exposure

    def refit(self, n_obs: int, exposure: float) -> FitResult | None:
        """Fit the model to all (merged) data.

        Warm-started from the last fit; multi-start (sphere-like models have a local minimum per
        fringe) when there is no trustworthy fit yet or the data have doubled since the last one.
        """
        q_u, c_u, t_u = self._merged
        if q_u.size <= len(self.names):
            return None
        f = self.fit
        full = not self.trustworthy(f.result) or n_obs >= 2 * f.n_obs_full
        initial = dict(f.result.values) if f.result is not None else self._initial()
        result = fit_poisson(
            self.model, q_u, c_u, t_u, flux=self.flux, dark_rate=self.dark_rate, names=self.names,
            initial=initial, bounds={p: tuple(self.s.fit.bounds[p]) for p in self.names},
            starts=self.s.fit_starts if full else 1, rng=np.random.default_rng(n_obs), vary=self.n_size,
        )
        f.result, f.n_obs, f.exposure = result, n_obs, exposure
        if full:
            f.n_obs_full = n_obs
        return result

    # -- rival explanations ----------------------------------------------------------------
    def _find_rival(self, result: FitResult, n_obs: int) -> FitResult | None:
        """A multi-start search around ``result``.

        It adopts a better optimum if it finds one (deviance lower by more than 1: not the same
        optimum found again), then returns another optimum that fits about as well (deviance
        within ``rival_deviance``) with size parameters more than 3 sigma away, or ``None``.
        """
        q_u, c_u, t_u = self._merged
        fits = fit_poisson_starts(
            self.model, q_u, c_u, t_u, flux=self.flux, dark_rate=self.dark_rate, names=self.names,
            initial=dict(result.values), bounds={p: tuple(self.s.fit.bounds[p]) for p in self.names},
            starts=self.s.fit_starts, rng=np.random.default_rng(n_obs + 1), vary=self.n_size,
        )
        best = min(fits, key=lambda r: r.deviance)
        if best.deviance < result.deviance - 1.0:  # a better optimum, not the same one re-found
            self.fit.result = result = best
        for other in fits:
            close = other.deviance <= result.deviance + self.s.rival_deviance
            if close and other.success and self._differs(result, other):
                return other
        return None

    def _differs(self, a: FitResult, b: FitResult) -> bool:
        return any(abs(a.values[p] - b.values[p]) > 3 * a.sigmas[p] for p in self.s.fit.size_params)

    def _settle_rival(self, n_obs: int, used: float) -> FitResult:
        """Refit the main and the rival solution on all data; drop the one the data now reject."""
        q_u, c_u, t_u = self._merged
        rival = fit_poisson(
            self.model, q_u, c_u, t_u, flux=self.flux, dark_rate=self.dark_rate, names=self.names,
            initial=dict(self.rival.values), bounds={p: tuple(self.s.fit.bounds[p]) for p in self.names},
        )
        main = self.refit(n_obs, used) if self.fit.n_obs != n_obs else self.fit.result
        if not self._differs(main, rival):
            self.rival = None  # both starts now land in one optimum
        elif rival.deviance + self.s.rival_deviance < main.deviance:
            self.fit.result, self.rival = rival, None
        elif main.deviance + self.s.rival_deviance < rival.deviance:
            self.rival = None
        else:
            self.rival = rival
        return self.fit.result

    def _discriminate(
        self, n: int, main: FitResult, rival: FitResult, t_point: float
    ) -> tuple[list[float], list[float], list[str]]:
        """Measure where the two explanations predict the most different counts per second:
        ``(r_main - r_rival)^2 / r_main`` is the deviance each second there adds."""
        q = self.candidates
        r_main = self.flux * self.model.intensity(q, main.values) + self.dark_rate
        r_rival = self.flux * self.model.intensity(q, rival.values) + self.dark_rate
        gain = (r_main - r_rival) ** 2 / r_main
        idx = np.argsort(gain)[::-1][:n]
        t = float(np.clip(t_point, *self.s.exposure_bounds))
        return [float(q[i]) for i in idx], [t] * len(idx), ["discriminate"] * len(idx)

    def _initial(self) -> dict[str, float]:
        fit = self.s.fit
        if fit.initial:
            return dict(fit.initial)
        return {p: math.sqrt(lo * hi) for p, (lo, hi) in fit.bounds.items() if p in self.names}

    def trustworthy(self, result: FitResult | None) -> bool:
        """Converged, describes the data (reduced deviance), and determines the size parameters.

        A nuisance parameter may stay undetermined (e.g. a small polydispersity at its bound):
        the design then works with the prior on it.
        """
        if result is None or not result.success:
            return False
        sig = np.array([result.sigmas[p] for p in self.s.fit.size_params])
        return bool(np.all(np.isfinite(sig)) and result.reduced_deviance <= self.s.max_reduced_deviance)

    def precision(self, result: FitResult | None) -> dict[str, float]:
        """Relative 1-sigma of each size parameter (inf when unknown), widened by the fit's
        ``sigma_scale`` when the data scatter more than counting noise explains."""
        if result is None:
            return {p: math.inf for p in self.s.fit.size_params}
        return {p: result.relative_sigma(p) for p in self.s.fit.size_params}

    # -- decision -----------------------------------------------------------------------------
    def decide(self, q: np.ndarray, counts: np.ndarray, exposure: np.ndarray, n: int, n_explored: int) -> Decision:
        """The next up-to-``n`` points after the survey, or a stop, given all observations and
        how many explore points were chosen so far."""
        used, n_obs = float(np.sum(exposure)), len(q)
        self._merged = merge_observations(q, counts, exposure)
        if self.rival is not None:
            self._settle_rival(n_obs, used)
        elif self.fit_due(n_obs, used):
            self.refit(n_obs, used)
        stop = self._stop_reason(n_obs, used)
        if stop is not None:
            return Decision(stop_reason=stop)
        self.gp.update(q, counts, exposure)
        return self._next_batch(min(n, self.s.max_measurements - n_obs), n_obs, n_explored, used)

    def _precise(self, result: FitResult | None) -> bool:
        """Trustworthy, and the size parameters at the goal (from the information of all data)."""
        return self.trustworthy(result) and self._worst(self._info_log(result), result.sigma_scale) <= self.s.target_rel_sigma

    def _stop_reason(self, n_obs: int, used: float) -> str | None:
        s = self.s
        if self.rival is None and self._precise(self.fit.result):
            if self.fit.n_obs != n_obs:  # confirm on a fit of all the data before stopping
                self.refit(n_obs, used)
            result = self.fit.result
            if self.trustworthy(result) and max(self.precision(result).values()) <= s.target_rel_sigma:
                self.rival = self._find_rival(result, n_obs)
                # stop only if the search neither found a rival nor moved the fit to a better
                # optimum (whose precision is judged afresh next round)
                if self.rival is None and self.fit.result is result:
                    return f"target precision reached ({self._fmt(result)})"
        if used >= s.budget_exposure:
            return f"exposure budget spent ({used:.1f} s >= {s.budget_exposure} s)"
        if n_obs >= s.max_measurements:
            return f"measurement budget spent ({n_obs} >= {s.max_measurements})"
        return None

    def _next_batch(self, n: int, n_obs: int, n_explored: int, used: float) -> Decision:
        """Design (or discrimination) points and GP explore points sharing a time budget that
        grows with what was spent, so no batch overshoots the goal by much."""
        s, result = self.s, self.fit.result
        good = self.trustworthy(result)
        n_explore = n if not good else self._explore_share(n, n_obs, n_explored)
        budget = s.max_batch_growth * used
        t_explore = budget * (s.explore_time_fraction if n_explore < n else 1.0) / max(n_explore, 1)
        t_design = budget * (1 - s.explore_time_fraction) / max(n - n_explore, 1)
        if n_explore == n:
            design: tuple[list, list, list] = ([], [], [])
        elif self.rival is not None:
            design = self._discriminate(n - n_explore, result, self.rival, t_design)
        else:
            design = self._design(n - n_explore, result, self._info_log(result), t_design)
        explore = self._explore(n_explore, t_explore)
        qs, ts, why = (a + b for a, b in zip(design, explore, strict=True))
        return Decision(tuple(qs), tuple(ts), tuple(why))

    def _cov_log(self, info_log: np.ndarray, scale: float = 1.0) -> np.ndarray:
        """Covariance of ``ln(theta)`` from the information of all data.

        The bounds enter as a Gaussian prior 100x wider than themselves: it only keeps a
        parameter the data cannot fix (a nuisance at its bound) finite, and leaves every
        determined one as the fit reports it, so the design's goal and the stopping rule agree.
        """
        b = self.s.fit.bounds
        prior = np.array([16e-4 / math.log(b[p][1] / b[p][0]) ** 2 for p in self.names])
        return np.linalg.inv(info_log + np.diag(prior)) * scale**2

    def _worst(self, info_log: np.ndarray, scale: float) -> float:
        """Worst relative 1-sigma of the size parameters from the information of all data
        (widened like the fit's, so this, the design's goal and the stop agree)."""
        cov = self._cov_log(info_log, scale)
        return float(np.sqrt(np.diag(cov)[self.targets]).max())

    def _fmt(self, result: FitResult) -> str:
        return ", ".join(f"{p}={result.values[p]:.4g}±{result.sigmas[p]:.2g}" for p in self.s.fit.size_params)

    @staticmethod
    def survey(settings: QSamplingSettings, n_surveyed: int, n: int) -> Decision:
        """The next up-to-``n`` of the ``n_initial`` survey points (empty once all were asked for).

        Needs no instrument constants, so it can run before the first descriptor arrives.
        """
        grid = np.geomspace(*settings.q_range, settings.n_initial)[n_surveyed : n_surveyed + n]
        k = len(grid)
        return Decision(tuple(grid.tolist()), (settings.initial_exposure,) * k, ("survey",) * k)

    def _explore_share(self, n: int, n_obs: int, n_explored: int) -> int:
        # keep the running share of explore points at explore_fraction of all points after the survey
        after = n_obs + n - self.s.n_initial
        return int(np.clip(round(self.s.explore_fraction * after) - n_explored, 0, n))

    def _exposure(self, rate: np.ndarray, t_cap: float) -> np.ndarray:
        """Count to ``target_counts``, but within the exposure bounds and at most ``t_cap``."""
        t_min, t_max = self.s.exposure_bounds
        return np.clip(self.s.target_counts / rate, t_min, max(t_min, min(t_max, t_cap)))

    def _explore(self, n: int, t_cap: float) -> tuple[list[float], list[float], list[str]]:
        if n == 0:
            return [], [], []
        mean, cov = self.gp.joint(self.candidates)
        rate = np.exp(mean)
        t = self._exposure(rate, t_cap)
        if self.s.acquisition == "ucb":
            X = self.gp._x(self.candidates)
            idx = ucb_batch(self.gp.model, X, n)
        else:
            noise = 1.0 / (rate * t + 0.5)
            idx, _ = greedy_variance_batch(cov, noise, n, integrated=self.s.acquisition == "ivr")
        return [float(self.candidates[i]) for i in idx], [float(t[i]) for i in idx], [self.s.acquisition] * n

    def _design(
        self, n: int, result: FitResult, info_log: np.ndarray, t_point: float
    ) -> tuple[list[float], list[float], list[str]]:
        """``n`` design points of about ``t_point`` seconds each (cut short where the goal is met)."""
        q, params = self.candidates, result.values
        theta = np.array([params[p] for p in self.names])
        cov_log = self._cov_log(info_log, result.sigma_scale)
        jac = self.model.jacobian(q, params, self.names) * self.flux * theta  # d rate / d ln(theta)
        rate = self.flux * self.model.intensity(q, params) + self.dark_rate
        t_min, t_max = self.s.exposure_bounds
        t = max(t_min, min(t_max, t_point))
        points = design_batch(
            jac, rate, cov_log, self.targets, n, exposure_bounds=(t_min, t),
            target_counts=np.inf, goal=self.s.target_rel_sigma, overhead=self.s.overhead,
        )
        return [float(q[p.index]) for p in points], [p.exposure for p in points], ["design"] * len(points)

    def _info_log(self, result: FitResult) -> np.ndarray:
        """Fisher information of all data so far at the fitted parameters, in ``ln(theta)``.

        The stop check and the design both need it within one decision; it costs several
        model evaluations per distinct Q, so it is kept for the same fit and the same data.
        """
        key = (result, self._merged)
        if self._info_cache is not None and all(a is b for a, b in zip(self._info_cache[0], key, strict=True)):
            return self._info_cache[1]
        theta = np.array([result.values[p] for p in self.names])
        q_u, _, t_u = self._merged
        info = fisher_information(
            self.model, q_u, t_u, result.values, self.names, flux=self.flux, dark_rate=self.dark_rate
        )
        info_log = info * np.outer(theta, theta)
        self._info_cache = (key, info_log)
        return info_log

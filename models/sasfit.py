"""Maximum-likelihood fits of a :class:`~models.sas.SASModel` to counted (Poisson) data.

Counting model: the counts ``c_i`` at ``q_i`` after exposure ``t_i`` (s) are Poisson with mean

    ``mu_i = t_i * (flux * I(q_i; θ) + dark_rate)``,

``flux`` in counts/s per 1/cm (an instrument constant) and ``dark_rate`` in counts/s (known).
The fit minimises the Poisson deviance ``D = sum_i 2 (mu_i - c_i + c_i log(c_i / mu_i))``, which
for a good fit is about chi-squared with ``n - p`` degrees of freedom. Its covariance is the
inverse of the expected Fisher information ``F = J^T diag(1/mu) J``, ``J = d mu / d θ``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

import numpy as np
from scipy.optimize import OptimizeResult, least_squares
from scipy.special import xlogy

from models.errors import FitError
from models.sas import SASModel

__all__ = [
    "FitResult",
    "covariance_from_fisher",
    "fisher_information",
    "fit_poisson",
    "merge_observations",
]

#: Relative eigenvalue below which a direction of the scaled information counts as unidentified.
_RCOND = 1e-12


@dataclass(frozen=True)
class FitResult:
    """Outcome of :func:`fit_poisson`.

    Attributes
    ----------
    names : tuple[str, ...]
        The `p` fitted parameters, in the order of ``cov``.
    values : Mapping[str, float]
        Best-fit values.
    sigmas : Mapping[str, float]
        One-sigma uncertainties, ``sqrt(diag(cov))``; ``inf`` for an unidentified parameter.
    cov : np.ndarray
        Covariance, `p x p`, in natural units; rows and columns of unidentified parameters
        are ``inf``.
    deviance : float
        Poisson deviance at the optimum (distinct-``q`` data).
    dof : int
        Degrees of freedom: distinct ``q`` values minus `p`.
    nfev : int
        Model evaluations over all starts (finite-difference ones included).
    success : bool
        Whether the optimiser of the best start reports convergence.
    message : str
        The optimiser's message for the best start.
    """

    names: tuple[str, ...]
    values: Mapping[str, float]
    sigmas: Mapping[str, float]
    cov: np.ndarray
    deviance: float
    dof: int
    nfev: int
    success: bool
    message: str = ""

    @property
    def reduced_deviance(self) -> float:
        """``deviance / dof``: about 1 for an adequate model; ``nan`` when ``dof == 0``."""
        return self.deviance / self.dof if self.dof > 0 else float("nan")

    @property
    def sigma_scale(self) -> float:
        """``sqrt(max(1, reduced deviance))``: how much to widen the sigmas when the data scatter
        more than counting noise explains (model error, or too few counts for the Fisher
        approximation); 1 when the fit is as good as Poisson noise allows."""
        rd = self.reduced_deviance
        return float(np.sqrt(max(1.0, rd))) if np.isfinite(rd) else 1.0

    def relative_sigma(self, name: str, *, scaled: bool = True) -> float:
        """``sigma / |value|`` of one parameter, widened by :attr:`sigma_scale` unless ``scaled=False``."""
        if name not in self.values:
            raise KeyError(f"{name!r} was not fitted; fitted: {list(self.names)}")
        return self.sigmas[name] * (self.sigma_scale if scaled else 1.0) / abs(self.values[name])


def _check_observations(q: Any, counts: Any, exposure: Any) -> tuple[np.ndarray, ...]:
    q_arr = np.asarray(q, dtype=np.float64)
    c_arr = np.asarray(counts, dtype=np.float64)
    t_arr = np.asarray(exposure, dtype=np.float64)
    if t_arr.ndim == 0:
        t_arr = np.full(q_arr.shape, float(t_arr))
    if q_arr.ndim != 1 or c_arr.shape != q_arr.shape or t_arr.shape != q_arr.shape:
        raise ValueError(
            f"q, counts, exposure must be 1D of one length; got {q_arr.shape=}, "
            f"{c_arr.shape=}, {t_arr.shape=}"
        )
    for label, arr, ok in (
        ("q", q_arr, q_arr > 0),
        ("counts", c_arr, c_arr >= 0),
        ("exposure", t_arr, t_arr > 0),
    ):
        bad = ~(np.isfinite(arr) & ok)
        if bad.any():
            rule = ">= 0" if label == "counts" else "> 0"
            raise ValueError(
                f"{label} must be finite and {rule}; bad values at indices "
                f"{np.flatnonzero(bad)[:5].tolist()}: {arr[bad][:5].tolist()} (drop them first)"
            )
    return q_arr, c_arr, t_arr


def merge_observations(
    q: Any, counts: Any, exposure: Any
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Merge observations at equal ``q`` by summing counts and exposures.

    Summed counts and exposure are sufficient statistics of a Poisson rate, so the fit of the
    merged data has the same likelihood maximum, at a cost set by distinct ``q`` only.

    Parameters
    ----------
    q, counts, exposure : array_like
        Observations, each `n` (``exposure`` may be a scalar).

    Returns
    -------
    tuple[np.ndarray, np.ndarray, np.ndarray]
        Sorted distinct ``q``, summed counts, summed exposure; each `m`, ``m <= n``.

    Raises
    ------
    ValueError
        On mismatched shapes, ``q <= 0``, negative or non-finite counts, ``exposure <= 0``.
    """
    q_arr, c_arr, t_arr = _check_observations(q, counts, exposure)
    q_u, inverse = np.unique(q_arr, return_inverse=True)
    counts_u = np.bincount(inverse, weights=c_arr, minlength=q_u.size)
    exposure_u = np.bincount(inverse, weights=t_arr, minlength=q_u.size)
    return q_u, counts_u, exposure_u


def _check_rates(flux: float, dark_rate: float) -> None:
    if not (np.isfinite(flux) and flux > 0):
        raise ValueError(f"flux must be finite and > 0 (counts/s per 1/cm); got {flux=}")
    if not (np.isfinite(dark_rate) and dark_rate >= 0):
        raise ValueError(f"dark_rate must be finite and >= 0 (counts/s); got {dark_rate=}")


def fisher_information(
    model: SASModel,
    q: Any,
    exposure: Any,
    params: Mapping[str, float],
    names: Sequence[str],
    *,
    flux: float,
    dark_rate: float,
) -> np.ndarray:
    """Expected Fisher information of counting at ``q`` for ``exposure``.

    ``I_F = sum_i t_i g_i g_i^T / r_i`` with ``g_i = flux * dI/dθ (q_i)`` and
    ``r_i = flux * I(q_i) + dark_rate``.

    Parameters
    ----------
    model : SASModel
        The model.
    q : array_like
        Measurement points, `n`, 1/Å.
    exposure : array_like
        Exposure at each point (s), `n`, or a scalar for all.
    params : Mapping[str, float]
        Parameter values at which to evaluate (updating the model's fixed ones).
    names : Sequence[str]
        The `p` parameters of interest.
    flux, dark_rate : float
        Counts/s per 1/cm, and dark counts/s.

    Returns
    -------
    np.ndarray
        Information matrix, `p x p`, in natural units of the parameters.
    """
    _check_rates(flux, dark_rate)
    q_arr = np.asarray(q, dtype=np.float64)
    t_arr = np.broadcast_to(np.asarray(exposure, dtype=np.float64), q_arr.shape)
    if not np.all(np.isfinite(t_arr) & (t_arr > 0)):
        raise ValueError(f"exposure must be finite and > 0; got {exposure!r}")
    rate = flux * model.intensity(q_arr, params) + dark_rate
    grad = flux * model.jacobian(q_arr, params, names)
    weighted = grad * (t_arr / rate)[:, None]
    return np.asarray(weighted.T @ grad)


def covariance_from_fisher(info: np.ndarray) -> np.ndarray:
    """Covariance ``inv(info)``, with ``inf`` rows/columns for unidentified parameters.

    The information is scaled to unit diagonal; eigenvectors with eigenvalue below
    ``1e-12 * max`` are unidentified directions, and every parameter with weight in one gets
    infinite variance. The rest is the pseudo-inverse.

    Parameters
    ----------
    info : np.ndarray
        Symmetric positive semi-definite information, `p x p`.

    Returns
    -------
    np.ndarray
        Covariance, `p x p`.
    """
    info = np.asarray(info, dtype=np.float64)
    if info.ndim != 2 or info.shape[0] != info.shape[1] or not np.all(np.isfinite(info)):
        raise ValueError(f"info must be a finite square matrix; got {info.shape=}")
    diag = np.diag(info).copy()
    scale = np.where(diag > 0, np.sqrt(np.abs(diag)), 1.0)
    scaled = info / np.outer(scale, scale)
    evals, evecs = np.linalg.eigh(scaled)
    null = evals <= _RCOND * max(evals.max(), 0.0)
    unidentified = (diag <= 0) | np.any(np.abs(evecs[:, null]) > 1e-6, axis=1)
    kept = evecs[:, ~null]
    cov = (kept / evals[~null]) @ kept.T / np.outer(scale, scale)
    cov[unidentified, :] = np.inf
    cov[:, unidentified] = np.inf
    return cov


@dataclass(frozen=True)
class _Space:
    """Optimiser coordinates: log for parameters with a positive lower bound, else linear."""

    log: np.ndarray
    lo: np.ndarray
    hi: np.ndarray

    @property
    def lower(self) -> np.ndarray:
        return np.where(self.log, np.log(np.where(self.log, self.lo, 1.0)), self.lo)

    @property
    def upper(self) -> np.ndarray:
        return np.where(self.log, np.log(np.where(self.log, self.hi, 1.0)), self.hi)

    def to_x(self, theta: np.ndarray) -> np.ndarray:
        x = np.where(self.log, np.log(np.where(self.log, theta, 1.0)), theta)
        # log(exp(b)) may differ from b in the last bit; keep a valid point inside.
        return np.clip(x, self.lower, self.upper)

    def to_theta(self, x: np.ndarray) -> np.ndarray:
        # Likewise exp(log(b)): keep results inside bounds, usable as the next fit's initial.
        return np.clip(np.where(self.log, np.exp(x), x), self.lo, self.hi)


def _make_space(names: Sequence[str], bounds: Mapping[str, tuple[float, float]]) -> _Space:
    lo = np.array([float(bounds[n][0]) for n in names])
    hi = np.array([float(bounds[n][1]) for n in names])
    return _Space(log=lo > 0, lo=lo, hi=hi)


def _check_problem(
    names: Sequence[str],
    initial: Mapping[str, float],
    bounds: Mapping[str, tuple[float, float]],
) -> None:
    if not names or len(set(names)) != len(names):
        raise ValueError(f"names must be non-empty and distinct; got {list(names)}")
    missing = [n for n in names if n not in initial or n not in bounds]
    if missing:
        raise ValueError(f"parameter(s) {missing} need an initial value and bounds")
    for n in names:
        lo, hi = bounds[n]
        if not (np.isfinite(lo) and np.isfinite(hi) and lo < hi):
            raise ValueError(f"bounds[{n!r}] must be finite with lo < hi; got {(lo, hi)}")
        if not lo <= initial[n] <= hi:
            raise ValueError(f"initial[{n!r}] = {initial[n]} is outside bounds {(lo, hi)}")


def _deviance_residuals(counts: np.ndarray, mu: np.ndarray) -> np.ndarray:
    """``sign(c - mu) sqrt(2 (mu - c + c log(c/mu)))``, `n` (``c log c = 0`` at ``c = 0``)."""
    unit = 2.0 * (mu - counts + xlogy(counts, counts / mu))
    # Rounding can make a zero deviance slightly negative.
    return np.sign(counts - mu) * np.sqrt(np.maximum(unit, 0.0))


def _start_points(
    space: _Space, x0: np.ndarray, starts: int, rng: np.random.Generator | None, vary: int = 1
) -> list[np.ndarray]:
    """``x0``, then `starts - 1` points in a Latin hypercube over the first ``vary`` parameters'
    ranges (each range cut in `starts - 1` strata, visited once per parameter); the others
    stay at ``x0``. Several sizes need spreading together: a cylinder's length has its own
    local optima, independent of its radius."""
    points = [x0]
    n = starts - 1
    if n == 0:
        return points
    gen = rng if rng is not None else np.random.default_rng(0)
    strata = [np.arange(n) if j == 0 else gen.permutation(n) for j in range(vary)]
    for k in range(n):
        x = x0.copy()
        for j in range(min(vary, x0.size)):
            u = (strata[j][k] + (gen.uniform() if rng is not None else 0.5)) / n
            x[j] = space.lower[j] + u * (space.upper[j] - space.lower[j])
        points.append(x)
    return points


def fit_poisson(
    model: SASModel,
    q: Any,
    counts: Any,
    exposure: Any,
    *,
    flux: float,
    dark_rate: float,
    names: Sequence[str],
    initial: Mapping[str, float],
    bounds: Mapping[str, tuple[float, float]],
    starts: int = 1,
    rng: np.random.Generator | None = None,
    max_nfev: int | None = None,
    vary: int = 1,
) -> FitResult:
    """Fit ``names`` by maximum Poisson likelihood (minimum deviance).

    ``mu_i = t_i (flux I(q_i; θ) + dark_rate)``; minimises
    ``sum_i 2 (mu_i - c_i + c_i log(c_i / mu_i))`` with :func:`scipy.optimize.least_squares`
    on deviance residuals, in log coordinates for parameters with a positive lower bound
    (so steps are relative) and within ``bounds``. Observations at equal ``q`` are merged first.

    Parameters
    ----------
    model : SASModel
        The model; parameters not in ``names`` or ``initial`` keep its fixed values.
    q, counts, exposure : array_like
        Observations, each `n` (``exposure`` in s, may be a scalar).
    flux, dark_rate : float
        Counts/s per 1/cm, and dark counts/s (both known).
    names : Sequence[str]
        The `p` parameters to fit. With ``starts > 1`` put the multimodal one (the size) first.
    initial : Mapping[str, float]
        Starting values (others given here are held at these values).
    bounds : Mapping[str, tuple[float, float]]
        ``(lo, hi)`` for each fitted parameter.
    starts : int
        Number of starts: ``initial``, then `starts - 1` with the first ``vary`` parameters in a
        Latin hypercube over their bounds (log-spaced when positive) and the rest at
        ``initial``; the lowest deviance wins. Sphere-like models have a local minimum per
        fringe, in size.
    rng : np.random.Generator | None
        Draws each extra start uniformly in its stratum; ``None``: stratum centres.
    max_nfev : int | None
        Limit on evaluations per start (``least_squares``' default when ``None``).
    vary : int
        How many leading ``names`` the extra starts spread (put the size parameters first).

    Returns
    -------
    FitResult
        Values, covariance ``inv(F)`` at the optimum, deviance and degrees of freedom.

    Raises
    ------
    ValueError
        On invalid observations, names, bounds, an initial value outside its bounds, or
        ``starts < 1``.
    FitError
        With fewer distinct ``q`` than parameters, or a non-positive or non-finite expected
        count during the fit.
    """
    problem = _Problem.build(model, q, counts, exposure, flux, dark_rate, names, initial, bounds, starts)
    solutions = _minimise(problem.residuals, problem.space, problem.start_points(starts, rng, vary), max_nfev)
    best = min((sol for sol, _ in solutions), key=lambda sol: sol.cost)
    return problem.result(best, sum(n for _, n in solutions))


def fit_poisson_starts(
    model: SASModel,
    q: Any,
    counts: Any,
    exposure: Any,
    *,
    flux: float,
    dark_rate: float,
    names: Sequence[str],
    initial: Mapping[str, float],
    bounds: Mapping[str, tuple[float, float]],
    starts: int = 1,
    rng: np.random.Generator | None = None,
    max_nfev: int | None = None,
    vary: int = 1,
) -> list[FitResult]:
    """Like :func:`fit_poisson`, but one :class:`FitResult` per start, lowest deviance first.

    The distinct optima among them are the rival explanations of the data that a multi-start
    search finds (e.g. a core-shell particle with its core and shell sizes traded off).
    """
    problem = _Problem.build(model, q, counts, exposure, flux, dark_rate, names, initial, bounds, starts)
    solutions = _minimise(problem.residuals, problem.space, problem.start_points(starts, rng, vary), max_nfev)
    return sorted((problem.result(sol, n) for sol, n in solutions), key=lambda r: r.deviance)


@dataclass(frozen=True)
class _Problem:
    """Merged data, parameter space and residuals of one fit: shared by every start."""

    model: SASModel
    names: tuple[str, ...]
    base: dict[str, float]
    space: _Space
    data: tuple[np.ndarray, np.ndarray, np.ndarray]
    flux: float
    dark_rate: float

    @classmethod
    def build(cls, model, q, counts, exposure, flux, dark_rate, names, initial, bounds, starts) -> _Problem:
        _check_rates(flux, dark_rate)
        _check_problem(names, initial, bounds)
        if starts < 1:
            raise ValueError(f"starts must be >= 1; got {starts=}")
        data = merge_observations(q, counts, exposure)
        if data[0].size < len(names):
            raise FitError(f"{data[0].size} distinct q values cannot fix {len(names)} parameters {names}")
        return cls(model, tuple(names), dict(initial), _make_space(names, bounds), data, flux, dark_rate)

    def params(self, x: np.ndarray) -> dict[str, float]:
        return {**self.base, **dict(zip(self.names, self.space.to_theta(x).tolist(), strict=True))}

    def residuals(self, x: np.ndarray) -> np.ndarray:
        q_u, c_u, t_u = self.data
        params = self.params(x)
        mu = t_u * (self.flux * self.model.intensity(q_u, params) + self.dark_rate)
        if not np.all(np.isfinite(mu) & (mu > 0)):
            raise FitError(f"expected counts not finite and > 0 at {params}; check the bounds")
        return _deviance_residuals(c_u, mu)

    def start_points(self, starts: int, rng: np.random.Generator | None, vary: int) -> list[np.ndarray]:
        x0 = self.space.to_x(np.array([float(self.base[n]) for n in self.names]))
        return _start_points(self.space, x0, starts, rng, vary)

    def result(self, sol: OptimizeResult, nfev: int) -> FitResult:
        q_u, _, t_u = self.data
        values = {n: float(v) for n, v in zip(self.names, self.space.to_theta(sol.x), strict=True)}
        info = fisher_information(
            self.model, q_u, t_u, {**self.base, **values}, self.names, flux=self.flux, dark_rate=self.dark_rate
        )
        cov = covariance_from_fisher(info)
        cov.setflags(write=False)
        return FitResult(
            names=self.names,
            values=MappingProxyType(values),
            sigmas=MappingProxyType({n: float(np.sqrt(cov[i, i])) for i, n in enumerate(self.names)}),
            cov=cov,
            deviance=float(2.0 * sol.cost),
            dof=int(q_u.size - len(self.names)),
            nfev=nfev,
            success=bool(sol.success),
            message=str(sol.message),
        )


def _minimise(
    residuals: Callable[[np.ndarray], np.ndarray],
    space: _Space,
    starts: list[np.ndarray],
    max_nfev: int | None,
) -> list[tuple[OptimizeResult, int]]:
    """One ``least_squares`` solution per start, each with the evaluations it spent."""
    solutions = []
    for start in starts:
        # Tolerances far below any parameter's sigma; the defaults (1e-8) only add evaluations.
        sol = least_squares(
            residuals, start, bounds=(space.lower, space.upper), method="trf", max_nfev=max_nfev,
            xtol=1e-6, ftol=1e-6,
        )
        # Finite-difference Jacobians cost one evaluation per parameter.
        solutions.append((sol, int(sol.nfev) + int(sol.njev or 0) * start.size))
    return solutions

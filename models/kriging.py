"""Kriging for autonomous mapping: a GP posterior over a grid of candidate positions, kept
up to date point by point so a decision never waits on a full refit.

Each mapped quantity (peak position, intensity, an orientation component, ...) has its own
Gaussian process on inputs normalised to the unit square, with a Matérn-5/2 kernel that is
anisotropic (one length-scale per axis) by default and optionally non-stationary (a learned
Kumaraswamy warping of each input, botorch's :class:`~botorch.models.transforms.input.Warp`,
so length-scales can shrink where the map changes fast). Noise is the measurement's own
variance when the reduction gives one (heteroscedastic, fixed), learned otherwise.

**Incremental posterior.** For the ``n`` observations ``X`` and the ``c`` candidates ``C`` the
model keeps the Cholesky factor ``L`` of ``K(X, X) + diag(noise)``, ``W = L^-1 K(X, C)``,
``z = L^-1 (y - mean)`` and the candidates' posterior variance ``k(C, C) - colsum(W**2)``.
``m`` new observations extend all four by one block row (the rank-``m`` form of a rank-one
Cholesky update): ``O(n^2 m + n m c)`` work, against ``O(n^3 + n^2 c)`` for a rebuild.
``L`` is held as a contiguous leading block plus a short tail of recent rows, merged every
``tail_rows`` rows, so every triangular solve runs on contiguous memory.

**Hyper-parameters** come from the marginal likelihood (botorch's ``fit_gpytorch_mll``) on at
most ``max_fit_points`` observations, refitted when the data have grown by ``refit_growth``.
With ``background=True`` the refit and the rebuild it needs run in a worker thread while
decisions go on with the previous hyper-parameters; the new state is swapped in, with the
points that arrived meanwhile added, at the next update after it is ready. A numerical failure
does not stop the map: a background refit that raises is logged and dropped (the map goes on
with the hyper-parameters it has; the next refit is due as usual), an update whose Cholesky
factor fails is redone by a fresh fit on every point, and only a fresh fit that fails too raises
a :class:`ModelError` saying what to look at. ``n_failed_refits`` and ``n_failed_updates`` count
them (the mapping agent's report carries both).

**Scale.** The exact posterior's memory grows as ``n^2 + n c`` doubles per quantity. Past
``exact_limit`` observations (4,000 by default) the model keeps an inducing-point posterior
instead (:class:`_Inducing`, FITC) on ``inducing_points`` inducing inputs (1,024 by default:
a quarter on a grid, the rest k-means centres of the measured positions, chosen again at
every refit). Its memory is ``q^2 + q c`` whatever ``n``, and new points are added by Woodbury
updates, so decisions stay as fast at 20,000 points as at 5,000. An inducing posterior blurs
a sharp boundary where thousands of points crowd along it, so the maps :meth:`predict`
draws, and the estimates a triangulated map passes through, come from exact solves on each
position's 64 nearest observations (the screening of a Matérn kernel makes these close to
the exact posterior's). Measured by ``python benchmarks/kriging_scale.py`` (2026-12-05, one
thread, one quantity, 2,500 candidates; half the points uniform, half where the map changes
fast; ``benchmarks/results/kriging_scale.json``):

=======  ========  ===========  ==============  =======  ================  ================
points   model     build (in    add 4, choose   memory   map error,        candidates' error,
                   background)  4: p50 / p95    per map  smooth / discont  smooth / discont
=======  ========  ===========  ==============  =======  ================  ================
5,000    exact     12.2 s       94 / 117 ms     344 MB   0.0072 / 0.0828   0.0074 / 0.196
5,000    inducing  6.5 s        58 / 66 ms      63 MB    0.0075 / 0.0828   0.0070 / 0.266
10,000   exact     40.1 s       169 / 175 ms    1069 MB  0.0054 / 0.0669   0.0056 / 0.170
10,000   inducing  5.9 s        57 / 61 ms      63 MB    0.0060 / 0.0669   0.0051 / 0.249
20,000   exact     skipped: its factor would need 3.4 GB
20,000   inducing  7.6 s        57 / 60 ms      64 MB    0.0055 / 0.0640   0.0039 / 0.248
=======  ========  ===========  ==============  =======  ================  ================

Errors are RMSE over the truth's sd: the map on a 100 x 100 grid (the discontinuous maps
are drawn by triangulation), and the candidates' posterior mean, which the decisions read, on
the 50 x 50 candidates. So past the limit the drawn maps are as good as the exact model's,
and the decisions see a smooth map as well and a map of domains about 1.4x less sharply
(0.25-0.27 against 0.17-0.20). The 90% intervals of the drawn maps held 0.91-0.95 of the
truth for both models (smooth: exact 0.952 / 0.950, inducing 0.946 / 0.929 / 0.909 at
5,000 / 10,000 / 20,000; domains 0.92-0.93). No KISS-GP/SKI is built.

**The map.** On a map with sharp domain boundaries, sampled densely along them, a stationary
kernel's posterior mean blurs each jump over its length-scale and wanders between the crowded
points: on the discontinuous maps of ``benchmarks/mapping.py`` (probe seeds 101-104) it was
1.3-1.5x further from the truth than piecewise-linear interpolation of the same points, and 3x
closer on the smooth ones.
So at each refit, for each output with at least 20 points, the model compares the leave-one-out
residuals of both (kriging's in closed form, the triangulation's from each point's star), and
:meth:`MappingGP.predict` draws the map with the one whose median absolute residual is smaller
(``reconstruction="auto"``; either can be forced). In 2-D the triangles are chosen by the data
(:mod:`models.triangulation`), so they lie along a boundary rather than across it; in more
dimensions they are Delaunay's. The triangulation passes through the kriging estimates at the
measured positions, so noise is smoothed as kriging smooths it; the posterior at the candidates
(:meth:`MappingGP.posterior`, used by the acquisitions) is always the kriging posterior.

**Calibrated intervals.** The marginal likelihood's posterior variance is often far from the
errors it should describe (on the benchmark's smooth maps 98% of the truth fell inside the
90% intervals). At each refit every output's variance is rescaled by one factor chosen so that
``calibration_level`` of the fit's leave-one-out residuals fall inside their intervals, each
residual weighted by the area its point stands for (:func:`variance_scale`; closed form, no
refits). The posterior mean, and acquisitions that compare variance with prior variance, do
not change. Past ``max_fit_points`` the residuals are those of the fit's subsample, and
describe errors at its density, not the map's: there a factor below 1 is not applied. On
smooth probe maps (seeds 950, 952, 953; 2,000 / 5,000 / 10,000 points, half of them where the
map changes fast) the subsample's factors, 0.11-0.64, put 0.79-0.91 / 0.40-0.75 / 0.61-0.71 of
the truth inside the 90% intervals; the marginal likelihood's variance, 0.96 / 0.89-0.94 /
0.85-0.93.

A triangulated map in 2-D gets intervals of its own shape, since its errors crowd on the
boundaries and a stationary variance cannot say so: ``s spread**2 + floor``, ``spread`` the
slope of the triangle times the distance to the nearest measured position
(:meth:`models.triangulation.Interpolant.spread`), ``s`` calibrated as above on the
triangulation's leave-one-out residuals and their spreads, ``floor`` the kriging estimates'
median error variance carried through the interpolation (times ``sum w_i**2`` of the
barycentric weights, :meth:`models.triangulation.Interpolant.weight_energy`: the full variance
at a measured position, a third of it at a triangle's centroid). On the benchmark's
discontinuous maps (probe seeds 101-106, at the points where each reached the raster's
error) the kriging variance rescaled this way put 0.98 of the truth inside the 90% intervals
(0.976-0.992): 14x too wide away from the boundaries, too narrow on them. The spread's
intervals put 0.95 (0.88-0.98) inside with a constant floor, 0.93 (0.86-0.97; probe seeds
101-108: 0.940 -> 0.926) with the floor carried by the weights; without any floor 0.88, but a
noisy map far from its boundaries is then under-covered; with the change of gradient to the
neighbouring triangles instead of the slope, 0.97. What over-covers is the interior: there
the error is the field's curvature, which grows as distance squared, not as the spread does,
so residuals left out at the measured positions (a neighbour's distance away) overstate it.
"""

from __future__ import annotations

import logging
import math
import threading
import warnings
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import torch
from botorch.exceptions.warnings import InputDataWarning
from botorch.fit import fit_gpytorch_mll
from botorch.models import SingleTaskGP
from botorch.models.transforms.input import Warp
from gpytorch.constraints import GreaterThan
from gpytorch.kernels import MaternKernel, RBFKernel, ScaleKernel
from gpytorch.likelihoods import GaussianLikelihood
from gpytorch.mlls import ExactMarginalLogLikelihood
from gpytorch.priors import LogNormalPrior

from models.device import default_device, default_dtype
from models.errors import ModelError

__all__ = [
    "KrigingConfig", "MappingGP", "loo_residuals", "triangulated",
    "triangulated_loo_residuals", "variance_scale",
]

logger = logging.getLogger(__name__)

_JITTER = 1e-6  # added to the diagonal, in standardised units
_LOCAL_NEIGHBOURS = 64  # observations in each local solve of _Inducing.at (maps drawn past exact_limit)
_MIN_CALIBRATION_POINTS = 20  # fewer, and leave-one-out says too little to calibrate on
_MIN_DOMAIN_POINTS = 20  # fewer, and a triangulated map is not split into domains
# Smallest length-scale on the unit square. The short-range kernel has no prior, and a fit on a
# few points once drove one to 3e-11: inputs over such a length-scale are ~1e10, their squared
# distances lose every digit, and the kernel matrix stops being positive definite (the next
# Cholesky update failed; film probe seed 16, peak position at 20 points). 1e-3 is far below
# any grid (50 positions a side: 0.02) and leaves the distances exact.
_MIN_LENGTHSCALE = 1e-3


def _floor_lengthscales(covar: torch.nn.Module) -> None:
    """Raise every length-scale of ``covar``'s kernels below :data:`_MIN_LENGTHSCALE` to it
    (fits above it are left bit for bit)."""
    for module in covar.modules():
        if getattr(module, "has_lengthscale", False):
            ls = module.lengthscale.detach()
            if bool(torch.any(ls < _MIN_LENGTHSCALE)):
                module.lengthscale = torch.clamp(ls, min=_MIN_LENGTHSCALE)


def loo_residuals(K: torch.Tensor, noise: torch.Tensor, r: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """Leave-one-out residuals and latent predictive variances of a GP, in closed form.

    ``K`` is the latent covariance of the ``n`` observations, ``noise`` their noise variances,
    ``r`` the observations minus the prior mean (all standardised). With
    ``A = (K + diag(noise))^-1`` the leave-one-out residual of observation ``i`` is
    ``(A r)_i / A_ii`` and its predictive variance ``1 / A_ii``, of which ``1 / A_ii - noise_i``
    is latent (Sundararajan & Keerthi, Neural Comput. 13, 1103, 2001).
    """
    A = torch.cholesky_inverse(torch.linalg.cholesky(K + torch.diag(noise + _JITTER)))
    a = torch.diagonal(A)
    resid = ((A @ r) / a).cpu().numpy()
    latent = np.maximum((1.0 / a - noise - _JITTER).cpu().numpy(), 1e-12)
    return resid, latent


def variance_scale(resid: np.ndarray, latent: np.ndarray, noise: np.ndarray, level: float,
                   weights: np.ndarray | None = None) -> float:
    """The factor ``s2`` on the latent variance that puts a fraction ``level`` of the residuals
    ``resid`` inside their central ``level`` intervals, ``|resid_i| <= z sqrt(s2 latent_i + noise_i)``.

    With ``weights`` the fraction is weighted: by the area each observation stands for, the
    intervals are calibrated over the sample rather than over where the points crowd. The
    smallest ``s2`` in ``[1e-3, 1e3]`` that does is found by bisection (the fraction only grows
    with ``s2``); a bound is returned when the fraction is reached already at the low one or
    never at the high one.
    """
    resid = np.abs(np.asarray(resid, dtype=float))
    w = np.ones(resid.size) if weights is None else np.asarray(weights, dtype=float)
    z = math.sqrt(2.0) * float(torch.erfinv(torch.tensor(level, dtype=torch.float64)))
    need = level * float(w.sum()) * (1.0 - 1e-12)

    def enough(s2: float) -> bool:
        return float(w[resid <= z * np.sqrt(s2 * latent + noise)].sum()) >= need

    lo, hi = math.log(1e-3), math.log(1e3)
    if enough(math.exp(lo)):
        return math.exp(lo)
    if not enough(math.exp(hi)):
        return math.exp(hi)
    for _ in range(50):
        mid = 0.5 * (lo + hi)
        lo, hi = (lo, mid) if enough(math.exp(mid)) else (mid, hi)
    return math.exp(hi)


def triangulated(points: np.ndarray, values: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """Piecewise-linear interpolation of ``values`` (``n``) at ``points`` (``n x d``, ``d >= 2``)
    over a triangulation of them, at ``targets`` (``m x d``); outside the points' convex hull
    the nearest point's value. Sharp where the points are dense, so a domain boundary sampled
    closely stays sharp. In 2-D the triangles are chosen by the data
    (:class:`models.triangulation.Interpolant`), so they lie along a boundary rather than
    across it; in more dimensions they are Delaunay's."""
    from scipy.interpolate import LinearNDInterpolator, NearestNDInterpolator
    from scipy.spatial import QhullError

    from models.triangulation import Interpolant

    points, values = np.asarray(points, dtype=float), np.asarray(values, dtype=float)
    targets = np.atleast_2d(np.asarray(targets, dtype=float))
    try:
        if points.shape[1] == 2:
            return Interpolant(points, values)(targets)
        out = LinearNDInterpolator(points, values)(targets)
    except (QhullError, ValueError):  # too few or degenerate (collinear) points: nearest only
        out = np.full(len(targets), np.nan)
    gap = np.isnan(out)
    if np.any(gap):
        out[gap] = NearestNDInterpolator(points, values)(targets[gap])
    return out


def triangulated_loo_residuals(points: np.ndarray, values: np.ndarray) -> np.ndarray:
    """Leave-one-out residuals of :func:`triangulated`: each value minus its interpolation
    without it.

    Removing a vertex changes the triangulation only inside its star, so each point is
    interpolated from the triangulation of its neighbours alone (``O(n)`` small
    triangulations, not ``n`` large ones); a point on the hull is predicted by its nearest
    neighbour. In 2-D the triangulations are data-dependent, as :func:`triangulated`'s are
    (:func:`models.triangulation.leave_one_out`); in more dimensions, Delaunay.
    """
    from scipy.spatial import Delaunay, QhullError

    points, values = np.asarray(points, dtype=float), np.asarray(values, dtype=float)
    if points.ndim == 2 and points.shape[1] == 2:
        from models.triangulation import leave_one_out

        return leave_one_out(points, values).residual
    out = np.empty(len(points))
    indptr, nbrs = Delaunay(points).vertex_neighbor_vertices
    for i in range(len(points)):
        near = nbrs[indptr[i] : indptr[i + 1]]
        pred = np.nan
        if len(near) > points.shape[1]:
            try:
                tri = Delaunay(points[near])
                s = int(tri.find_simplex(points[i]))
                if s >= 0:
                    b = tri.transform[s, :-1] @ (points[i] - tri.transform[s, -1])
                    bary = np.append(b, 1.0 - b.sum())
                    pred = float(bary @ values[near[tri.simplices[s]]])
            except QhullError:
                pass
        if np.isnan(pred):
            pred = float(values[near[np.argmin(np.linalg.norm(points[near] - points[i], axis=1))]])
        out[i] = values[i] - pred
    return out


@dataclass(frozen=True)
class KrigingConfig:
    """Settings of :class:`MappingGP`.

    Parameters
    ----------
    kernel
        ``"matern52"``, ``"matern32"`` or ``"rbf"``.
    anisotropic
        One length-scale per input axis (ARD) instead of one for all.
    nonstationary
        Learn a Kumaraswamy warping of each input before the stationary kernel.
    multiscale
        A sum of two kernels, one started at a long and one at a short length-scale: smooth
        variation plus sharp features (domain boundaries) where the points are dense.
    refit_growth
        Refit hyper-parameters when the number of observations has grown by this factor.
    max_fit_points
        Hyper-parameters are fitted on at most this many observations (a seeded subsample).
    min_points
        Fewer observations than this and the model has no posterior yet.
    background
        Refit (and rebuild) in a worker thread; ``False`` refits inline (reproducible timing).
    tail_rows
        Rows of the Cholesky factor kept apart before they are merged into its leading block.
    noise_floor
        Smallest noise variance, as a fraction of the output's variance.
    calibration_level
        Scale each output's posterior variance so that this fraction of the leave-one-out
        residuals of its fit lies inside the matching central interval (``None``: the marginal
        likelihood's variance as it is). See :func:`loo_residuals` and :func:`variance_scale`.
        When the fit is on a subsample (past ``max_fit_points``), only a factor above 1 is
        applied (module docs, "Calibrated intervals").
    reconstruction
        How :meth:`MappingGP.predict` draws each output's map: ``"kriging"`` (the posterior
        mean), ``"triangulation"`` (piecewise-linear over a triangulation of the measured
        positions, data-dependent in 2-D, through the posterior mean there) or ``"auto"``: at each refit, the
        one whose leave-one-out residuals have the smaller median absolute value.
    domains
        A triangulated output in 2-D whose values split into domains (jumps well above the
        rest between neighbouring positions) is drawn domain by domain instead
        (:class:`models.domains.DomainMap`: the boundaries as smooth curves through all the
        straddling pairs, each domain's values from its own positions); with one domain, or
        ``False``, by the triangulation.
    exact_limit
        Past this many observations the posterior is kept with ``inducing_points`` inducing
        inputs instead of exactly (memory ``q^2 + q c`` instead of ``n^2 + n c``; see
        :class:`_Inducing` and the module docs). The switch is made at the next rebuild,
        which is scheduled as soon as the limit is passed. ``None``: always exact.
    inducing_points
        How many inducing inputs: a coarse grid over the whole extent (a quarter of them) and
        k-means centres of the measured positions (the rest), chosen again at every refit.
    """

    kernel: Literal["matern52", "matern32", "rbf"] = "matern52"
    anisotropic: bool = True
    nonstationary: bool = False
    multiscale: bool = False
    refit_growth: float = 1.5
    max_fit_points: int = 800
    min_points: int = 4
    background: bool = True
    tail_rows: int = 256
    noise_floor: float = 1e-4
    calibration_level: float | None = 0.9
    reconstruction: Literal["auto", "kriging", "triangulation"] = "auto"
    domains: bool = True
    exact_limit: int | None = 4000
    inducing_points: int = 1024

    def __post_init__(self) -> None:
        if self.kernel not in ("matern52", "matern32", "rbf"):
            raise ValueError(f"KrigingConfig.kernel must be matern52, matern32 or rbf, got {self.kernel!r}")
        if not self.refit_growth > 1.0:
            raise ValueError(f"KrigingConfig.refit_growth must be > 1, got {self.refit_growth=}")
        if self.min_points < 2:
            raise ValueError(f"KrigingConfig.min_points must be >= 2, got {self.min_points=}")
        if self.max_fit_points < self.min_points:
            raise ValueError(f"max_fit_points={self.max_fit_points} is below min_points={self.min_points}")
        if self.tail_rows < 1:
            raise ValueError(f"KrigingConfig.tail_rows must be >= 1, got {self.tail_rows=}")
        if self.calibration_level is not None and not 0.5 <= self.calibration_level < 1.0:
            raise ValueError(f"KrigingConfig.calibration_level must be in [0.5, 1) or None, got {self.calibration_level=}")
        if self.exact_limit is not None and self.exact_limit < self.min_points:
            raise ValueError(f"KrigingConfig.exact_limit={self.exact_limit} is below min_points={self.min_points}")
        if self.inducing_points < 16:
            raise ValueError(f"KrigingConfig.inducing_points must be >= 16, got {self.inducing_points=}")
        if self.reconstruction not in ("auto", "kriging", "triangulation"):
            raise ValueError(f"KrigingConfig.reconstruction must be auto, kriging or triangulation, "
                             f"got {self.reconstruction!r}")


@dataclass(eq=False)
class _Hyper:
    """What one output's fit gives: a kernel on warped unit-square inputs, a constant mean,
    the output's standardisation and (when no measurement variance is given) its noise."""

    covar: torch.nn.Module
    warp: torch.nn.Module | None
    mean: float
    y_mean: float
    y_std: float
    noise: float | None  # standardised; None: the observations carry their own variance
    var_scale: float = 1.0  # calibration of the posterior variance (leave-one-out)
    tri_scale: float = 1.0  # calibration of a triangulated map's intervals (leave-one-out)
    tri_floor: float | None = None  # 2-D: those intervals are tri_scale spread**2 + tri_floor (standardised)
    reconstruction: str = "kriging"  # how predict() draws the map: "kriging" or "triangulation"
    loo_median: dict[str, float] | None = None  # median |leave-one-out residual| per reconstruction

    @property
    def var_unit(self) -> float:
        """Standardised variance to output units, calibration included."""
        return self.y_std**2 * self.var_scale

    def inputs(self, u: torch.Tensor) -> torch.Tensor:
        if self.warp is None:
            return u
        with torch.no_grad():
            return self.warp(u)

    def k(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return self.covar(self.inputs(a), self.inputs(b)).to_dense()

    def k_diag(self, a: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return self.covar(self.inputs(a), diag=True)

    def summary(self) -> dict[str, Any]:
        parts = getattr(self.covar, "kernels", [self.covar])
        return {
            "lengthscale": [k.base_kernel.lengthscale.detach().reshape(-1).cpu().tolist() for k in parts],
            "outputscale": [float(k.outputscale.detach()) for k in parts],
            "mean": self.mean, "y_mean": self.y_mean, "y_std": self.y_std, "noise": self.noise,
            "reconstruction": self.reconstruction, "loo_median_abs": self.loo_median,
            "variance_scale": self.var_scale, "triangulation_variance_scale": self.tri_scale,
            "warp": None if self.warp is None else {
                "concentration0": self.warp.concentration0.detach().reshape(-1).cpu().tolist(),
                "concentration1": self.warp.concentration1.detach().reshape(-1).cpu().tolist(),
            },
        }


@dataclass(eq=False)
class _Factor:
    """One output's exact incremental posterior over the candidates (see the module docstring).

    :class:`_Factor` and :class:`_Inducing` answer the same questions (``extend``, ``mean``,
    ``cov_col``, ``at``, ``fitted``), all in standardised units; :class:`MappingGP` does not
    ask which it holds."""

    hyper: _Hyper
    n: int = 0
    L_main: torch.Tensor | None = None  # n0 x n0, contiguous
    tail_left: torch.Tensor | None = None  # R x n0 rows below L_main (first r used)
    tail_diag: torch.Tensor | None = None  # R x R lower block (r x r used)
    n0: int = 0
    r: int = 0
    W: torch.Tensor | None = None  # capacity x c, rows [:n] used
    z: torch.Tensor | None = None  # capacity
    var: torch.Tensor | None = None  # c: posterior variance at the candidates (standardised)
    prior_var: torch.Tensor | None = None  # c
    tail_rows: int = 256

    def solve(self, b: torch.Tensor) -> torch.Tensor:
        """``L^-1 b`` for ``b`` of shape ``n x m`` (contiguous solves only)."""
        parts = []
        if self.n0:
            parts.append(torch.linalg.solve_triangular(self.L_main, b[: self.n0], upper=False))
        if self.r:
            top = parts[0] if parts else b[:0]
            rhs = b[self.n0 : self.n]
            if self.n0:
                rhs = rhs - self.tail_left[: self.r] @ top
            parts.append(torch.linalg.solve_triangular(self.tail_diag[: self.r, : self.r].contiguous(), rhs, upper=False))
        return torch.cat(parts) if parts else b[:0]

    def solve_t(self, b: torch.Tensor) -> torch.Tensor:
        """``L^-T b`` for ``b`` of shape ``n``."""
        b = b.reshape(-1, 1)
        top, low = b[: self.n0], b[self.n0 : self.n]
        if self.r:
            low = torch.linalg.solve_triangular(self.tail_diag[: self.r, : self.r].T.contiguous(), low, upper=True)
            if self.n0:
                top = top - self.tail_left[: self.r].T @ low
        if self.n0:
            top = torch.linalg.solve_triangular(self.L_main.T, top, upper=True)
        return torch.cat([top, low]).reshape(-1)

    def extend(self, X_old: torch.Tensor, xn: torch.Tensor, yn: torch.Tensor, noise: torch.Tensor,
               C: torch.Tensor) -> None:
        """Add observations at unit inputs ``xn`` (``m x d``) with standardised residuals ``yn``
        and noise variances ``noise``; ``X_old`` are the ``n`` already held (block Cholesky update)."""
        h = self.hyper
        K22 = h.k(xn, xn) + torch.diag(noise + _JITTER)
        k_nc = h.k(xn, C)  # m x c
        if self.n:
            L21 = self.solve(h.k(X_old, xn)).T  # m x n
            S = K22 - L21 @ L21.T
            w_new_rhs = k_nc - L21 @ self.W[: self.n]
            z_rhs = yn - L21 @ self.z[: self.n]
        else:
            L21 = torch.zeros((len(xn), 0), dtype=xn.dtype, device=xn.device)
            S, w_new_rhs, z_rhs = K22, k_nc, yn
        L22 = torch.linalg.cholesky(S)
        W_new = torch.linalg.solve_triangular(L22, w_new_rhs, upper=False)
        z_new = torch.linalg.solve_triangular(L22, z_rhs.reshape(-1, 1), upper=False).reshape(-1)
        self._store_rows(L21, L22, W_new, z_new)
        self.var = torch.clamp(self.var - (W_new * W_new).sum(0), min=0.0)

    def _store_rows(self, L21: torch.Tensor, L22: torch.Tensor, W_new: torch.Tensor, z_new: torch.Tensor) -> None:
        m, n, c = L22.shape[0], self.n, W_new.shape[1]
        kw: dict[str, Any] = {"dtype": L22.dtype, "device": L22.device}
        # W and z: row-major buffers that grow by half again, rows [:n] in use (contiguous)
        if self.W is None or n + m > self.W.shape[0]:
            cap = max(n + m, int(1.5 * (0 if self.W is None else self.W.shape[0])), 64)
            W = torch.empty((cap, c), **kw)
            z = torch.empty((cap,), **kw)
            if n:
                W[:n], z[:n] = self.W[:n], self.z[:n]
            self.W, self.z = W, z
        self.W[n : n + m], self.z[n : n + m] = W_new, z_new
        # L: contiguous leading block + tail rows; merge when the tail is full
        R = self.tail_rows
        if self.r and self.r + m > R:
            self._merge_tail()
        if m >= R:  # a large block (a rebuild) goes straight into the leading block
            L = torch.zeros((self.n0 + m, self.n0 + m), **kw)
            if self.n0:
                L[: self.n0, : self.n0] = self.L_main
            L[self.n0 :, : self.n0] = L21
            L[self.n0 :, self.n0 :] = L22
            self.L_main, self.n0 = L, self.n0 + m
        else:
            if self.tail_left is None or self.tail_left.shape[1] != self.n0:
                self.tail_left = torch.zeros((R, self.n0), **kw)
                self.tail_diag = torch.zeros((R, R), **kw)
            r = self.r
            self.tail_left[r : r + m] = L21[:, : self.n0]
            self.tail_diag[r : r + m, :r] = L21[:, self.n0 :]
            self.tail_diag[r : r + m, r : r + m] = L22
            self.r += m
        self.n += m

    def _merge_tail(self) -> None:
        n0, r = self.n0, self.r
        L = torch.zeros((n0 + r, n0 + r), dtype=self.tail_diag.dtype, device=self.tail_diag.device)
        if n0:
            L[:n0, :n0] = self.L_main
            L[n0:, :n0] = self.tail_left[:r]
        L[n0:, n0:] = self.tail_diag[:r, :r]
        self.L_main, self.n0, self.r = L, n0 + r, 0

    def mean(self) -> torch.Tensor:
        """Posterior mean at the candidates."""
        return self.hyper.mean + self.W[: self.n].T @ self.z[: self.n]

    def cov_col(self, C: torch.Tensor, j: int) -> torch.Tensor:
        """Posterior covariance of every candidate with candidate ``j``."""
        kc = self.hyper.k(C, C[j : j + 1]).reshape(-1)
        return kc - self.W[: self.n].T @ self.W[: self.n, j]

    def at(self, X_obs: torch.Tensor, U: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Posterior mean and latent variance at unit inputs ``U``; ``X_obs`` the observations'."""
        h = self.hyper
        V = self.solve(h.k(X_obs[: self.n], U))
        return h.mean + V.T @ self.z[: self.n], torch.clamp(h.k_diag(U) - (V * V).sum(0), min=0.0)

    def fitted(self, X_obs: torch.Tensor, yn: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """The posterior mean at the observations: ``y - noise * alpha`` with
        ``alpha = (K + noise)^-1 (y - mean) = L^-T z`` (no kernel evaluations)."""
        return self.hyper.mean + yn - (noise + _JITTER) * self.solve_t(self.z[: self.n])


@dataclass(eq=False)
class _Inducing:
    """One output's inducing-point posterior over the candidates, for maps past
    :attr:`KrigingConfig.exact_limit` observations.

    With inducing inputs ``Z`` (``q`` of them), ``Lz`` the Cholesky factor of ``K(Z, Z)`` and
    ``Phi(x) = Lz^-1 K(Z, x)``, the posterior is ``mean(x) = Phi(x)^T B^-1 b`` and
    ``var(x) = k(x, x) - |Phi(x)|^2 + Phi(x)^T B^-1 Phi(x)``, with ``B = I + Phi Lambda^-1 Phi^T``
    and ``b = Phi Lambda^-1 y`` summed over the observations. ``Lambda`` is each observation's
    noise plus what the inducing inputs cannot carry of its prior variance,
    ``k(x, x) - |Phi(x)|^2``: the FITC approximation (Snelson & Ghahramani, NIPS 2005). The
    variational one (SVGP's optimal posterior, Titsias 2009: the same without that term) was
    tried first: on the discontinuous maps of ``benchmarks/kriging_scale.py`` its mean at the
    candidates was 0.68 / 1.04 sd from the truth at 5,000 / 10,000 points, against the exact
    posterior's 0.20 / 0.17. The kernel's short-range part, fitted far shorter than the
    inducing inputs' spacing, cannot be carried by them, and without it the data's small noise
    forced a wild fit (``B``'s condition number 10^6, against 10^4 with FITC's term).

    Memory is ``q^2 + q c`` whatever the number of observations; ``m`` new ones cost
    ``O(q^2 m + q m c)`` (a Woodbury update of ``B^-1`` and ``H = B^-1 Phi(C)``); a block of
    at least ``q / 4`` (a rebuild) is summed into ``B`` and inverted once.
    """

    hyper: _Hyper
    Z: torch.Tensor  # q x d, unit inputs
    C: torch.Tensor  # c x d
    n: int = 0
    var: torch.Tensor | None = None
    prior_var: torch.Tensor | None = None

    def __post_init__(self) -> None:
        h, Z = self.hyper, self.Z
        q = len(Z)
        K = h.k(Z, Z)
        jitter = _JITTER * float(torch.diagonal(K).mean())
        for _ in range(6):  # inducing inputs close together: more jitter until K is definite
            L, info = torch.linalg.cholesky_ex(K + jitter * torch.eye(q, dtype=K.dtype, device=K.device))
            if int(info) == 0:
                break
            jitter *= 10.0
        else:
            raise ModelError(f"the kernel matrix of {q} inducing points is not positive definite")
        self.Lz = L
        self.Phi_c = self._phi(self.C)  # q x c
        self.B = torch.eye(q, dtype=K.dtype, device=K.device)
        self.Binv = self.B.clone()
        self.b = torch.zeros(q, dtype=K.dtype, device=K.device)
        self.H = self.Phi_c.clone()  # B^-1 Phi(C)
        self.prior_var = h.k_diag(self.C)
        self.var = self.prior_var.clone()
        self.y = self.b.new_empty(0)  # the observations' standardised residuals, for at()
        self.noise = self.b.new_empty(0)

    def _phi(self, U: torch.Tensor) -> torch.Tensor:
        return torch.linalg.solve_triangular(self.Lz, self.hyper.k(self.Z, U), upper=False)

    def extend(self, X_old: torch.Tensor, xn: torch.Tensor, yn: torch.Tensor, noise: torch.Tensor,
               C: torch.Tensor) -> None:
        """Add observations (as :meth:`_Factor.extend`; ``X_old`` is not needed)."""
        q, bulk = len(self.Z), False
        for lo in range(0, len(xn), 2048):  # bounds Phi's memory on a rebuild: q x 2048
            x, y = xn[lo : lo + 2048], yn[lo : lo + 2048]
            phi = self._phi(x)  # q x m
            # FITC: what the inducing inputs cannot carry, k(x, x) - |phi(x)|^2, counts as noise
            s = noise[lo : lo + 2048] + _JITTER + torch.clamp(self.hyper.k_diag(x) - (phi * phi).sum(0), min=0.0)
            V = phi / torch.sqrt(s)
            self.b += V @ (y / torch.sqrt(s))
            self.B += V @ V.T
            bulk = bulk or len(x) >= q // 4
            if bulk:
                continue  # a large block: B^-1 and H are rebuilt from B below
            # Woodbury: B'^-1 = B^-1 - Q S^-1 Q^T with Q = B^-1 V and S = I + V^T Q
            Q = self.Binv @ V
            Ls = torch.linalg.cholesky(torch.eye(len(x), dtype=V.dtype, device=V.device) + V.T @ Q)
            Qs = torch.linalg.solve_triangular(Ls, Q.T, upper=False)  # Ls^-1 Q^T, m x q
            R = torch.linalg.solve_triangular(Ls, V.T @ self.H, upper=False)  # m x c
            self.Binv -= Qs.T @ Qs
            self.H -= Qs.T @ R
            self.var = torch.clamp(self.var - (R * R).sum(0), min=0.0)
        if bulk:
            self.Binv = torch.cholesky_inverse(torch.linalg.cholesky(self.B))
            self.H = self.Binv @ self.Phi_c
            self.var = torch.clamp(self.prior_var - (self.Phi_c * self.Phi_c).sum(0)
                                   + (self.Phi_c * self.H).sum(0), min=0.0)
        self.n += len(xn)
        self.y = torch.cat([self.y, yn])
        self.noise = torch.cat([self.noise, noise])

    def mean(self) -> torch.Tensor:
        return self.hyper.mean + self.H.T @ self.b

    def cov_col(self, C: torch.Tensor, j: int) -> torch.Tensor:
        kc = self.hyper.k(C, C[j : j + 1]).reshape(-1)
        return kc - self.Phi_c.T @ self.Phi_c[:, j] + self.Phi_c.T @ self.H[:, j]

    def at(self, X_obs: torch.Tensor, U: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Posterior mean and latent variance at unit inputs ``U``, each from an exact solve on
        its ``_LOCAL_NEIGHBOURS`` nearest observations (``X_obs``, the observations' unit
        inputs). The inducing inputs are too few to resolve a sharp boundary where thousands
        of points crowd along it; the observations' own neighbourhoods are not, and a Matérn
        kernel's screening makes the nearest observations carry nearly all the weight (Stein,
        J. Stat. Plan. Inference 2002), so these are close to the exact posterior's. For maps
        and reports (:meth:`MappingGP.predict`): ``O(k^3)`` per position."""
        from scipy.spatial import cKDTree

        X = X_obs[: self.n]
        k = min(_LOCAL_NEIGHBOURS, self.n)
        nbrs = torch.as_tensor(cKDTree(X.cpu().numpy()).query(U.cpu().numpy(), k=k)[1].reshape(len(U), k),
                               device=X.device)
        h, means, variances = self.hyper, [], []
        for rows, idx in zip(torch.split(U, 1024), torch.split(nbrs, 1024), strict=True):
            P = X[idx]  # b x k x d
            K = h.k(P, P) + torch.diag_embed(self.noise[idx] + _JITTER)
            kx = h.k(rows[:, None], P).transpose(1, 2)  # b x k x 1
            L = torch.linalg.cholesky(K)
            v = torch.linalg.solve_triangular(L, kx, upper=False)[..., 0]  # b x k
            a = torch.linalg.solve_triangular(L, self.y[idx, None], upper=False)[..., 0]
            means.append(h.mean + (v * a).sum(1))
            variances.append(torch.clamp(h.k_diag(rows) - (v * v).sum(1), min=0.0))
        return torch.cat(means), torch.cat(variances)

    def fitted(self, X_obs: torch.Tensor, yn: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """The posterior mean at the observations (:meth:`at` there)."""
        return self.at(X_obs, X_obs[: self.n])[0]


def _inducing_inputs(U: np.ndarray, q: int, seed: int) -> np.ndarray:
    """``q`` inducing inputs for the unit-cube positions ``U``: a grid over the whole cube
    (about a quarter of them, so every part of the map has some, including where no point
    has been measured yet) and k-means centres of ``U`` (the rest: many where the points
    crowd, as along a boundary the acquisition has found)."""
    from scipy.cluster.vq import kmeans2

    n, d = U.shape
    g = max(2, int((q / 4) ** (1.0 / d)))
    axis = (np.arange(g) + 0.5) / g
    grid = np.stack(np.meshgrid(*[axis] * d, indexing="ij"), -1).reshape(-1, d)
    rest = q - len(grid)
    if rest <= 0:
        return grid[:q]
    if n <= rest:
        return np.concatenate([grid, np.unique(U, axis=0)])
    rng = np.random.default_rng(seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # an empty cluster is dropped below
        centres, label = kmeans2(U, U[rng.choice(n, rest, replace=False)], iter=10, minit="matrix", seed=rng)
    centres = centres[np.bincount(label, minlength=rest) > 0]
    return np.concatenate([grid, centres])


def _area_weights(X: np.ndarray) -> np.ndarray:
    """Each point's share of the sample: the squared distance to its nearest neighbour (a proxy
    of its Voronoi cell's area). Boundary-seeking acquisitions crowd points where the map is
    hardest, and there the leave-one-out residuals are largest; weighting by area calibrates
    the intervals for the whole sample, which is where they are read."""
    from scipy.spatial import cKDTree

    if len(X) < 2:
        return np.ones(len(X))
    d = cKDTree(X).query(X, k=2)[0][:, 1]
    return np.maximum(d, 1e-12 * max(float(d.max()), 1e-300)) ** 2


def _triangulated_loo(X: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray | None] | None:
    """:func:`triangulated_loo_residuals` and, in 2-D, each one's interpolation spread
    (:class:`models.triangulation.LeaveOneOut`); ``None`` when the points cannot be
    triangulated (fewer than ``d + 1``, or all on a line)."""
    from scipy.spatial import QhullError

    from models.triangulation import leave_one_out

    try:
        if X.shape[1] == 2:
            loo = leave_one_out(X, y)
            return loo.residual, loo.spread
        return triangulated_loo_residuals(X, y), None
    except (QhullError, ValueError):
        return None


class MappingGP:
    """Multi-output kriging over a fixed set of candidate positions, updated incrementally.

    Parameters
    ----------
    bounds
        ``[[x0, y0, ...], [x1, y1, ...]]`` (``2 x d``): the physical extent; inputs are scaled
        to the unit cube by it.
    candidates
        ``c x d`` positions (physical units) where the posterior is kept current; decisions
        choose among them.
    n_outputs
        Number of mapped quantities.
    config
        A :class:`KrigingConfig`.
    seed
        Seeds the subsample the hyper-parameters are fitted on.

    Examples
    --------
    >>> g = np.linspace(0.0, 10.0, 11)
    >>> grid = np.stack(np.meshgrid(g, g), -1).reshape(-1, 2)   # c x 2 candidate positions
    >>> gp = MappingGP([[0, 0], [10, 10]], grid, n_outputs=2, config=KrigingConfig(background=False))
    >>> xy = np.random.default_rng(0).uniform(0.0, 10.0, (30, 2))
    >>> gp.add(xy, np.column_stack([np.sin(xy[:, 0]), np.cos(xy[:, 1])]))   # n x 2 and n x 2
    >>> mean, var = gp.posterior()           # c x 2 each, in the outputs' own units
    >>> mean.shape, bool(np.all(var > 0))
    ((121, 2), True)
    """

    def __init__(
        self,
        bounds: Sequence[Sequence[float]] | np.ndarray,
        candidates: np.ndarray,
        n_outputs: int = 1,
        config: KrigingConfig | None = None,
        *,
        seed: int = 0,
    ) -> None:
        self.config = config or KrigingConfig()
        self._tkw: dict[str, Any] = {"device": default_device(), "dtype": default_dtype()}
        b = np.asarray(bounds, dtype=float)
        if b.ndim != 2 or b.shape[0] != 2 or not np.all(np.isfinite(b)) or not np.all(b[1] > b[0]):
            raise ValueError(f"bounds must be 2 x d with finite lower < upper, got {bounds!r}")
        self.bounds = b
        self.dim = b.shape[1]
        cand = np.asarray(candidates, dtype=float)
        if cand.ndim != 2 or cand.shape[1] != self.dim or cand.shape[0] < 1:
            raise ValueError(f"candidates must be c x {self.dim}, got shape {cand.shape}")
        self.candidates = cand
        self._C = self._unit(cand)
        if n_outputs < 1:
            raise ValueError(f"n_outputs must be >= 1, got {n_outputs=}")
        self.n_outputs = n_outputs
        self._rng = np.random.default_rng(seed)
        self._X = np.empty((0, self.dim))
        self._Y = np.empty((0, n_outputs))
        self._Yvar: np.ndarray | None = None  # n x k, or None when noise is learned
        self._drawn: list[str] | None = None  # how the last predict() drew each output
        self._factors: list[_Factor | _Inducing] | None = None
        self._n_at_fit = 0
        self.n_fits = 0
        self.n_failed_refits = 0  # background refits that raised (the map went on without them)
        self.n_failed_updates = 0  # updates that could not be factored (each recovered by a refit)
        self._lock = threading.Lock()
        self._pool: ThreadPoolExecutor | None = None
        self._pending: Future[tuple[int, list[_Factor | _Inducing]]] | None = None
        self._saved_hyper: list[dict[str, Any]] | None = None

    # -- inputs -------------------------------------------------------------------------------
    def _unit(self, x: np.ndarray) -> torch.Tensor:
        u = (np.asarray(x, dtype=float) - self.bounds[0]) / (self.bounds[1] - self.bounds[0])
        return torch.as_tensor(u, **self._tkw)

    @property
    def n_points(self) -> int:
        return int(self._X.shape[0])

    @property
    def ready(self) -> bool:
        """Whether a posterior exists (at least ``min_points`` observations)."""
        return self._factors is not None

    @property
    def refit_pending(self) -> bool:
        return self._pending is not None and not self._pending.done()

    # -- data ---------------------------------------------------------------------------------
    def add(self, X: np.ndarray, Y: np.ndarray, Yvar: np.ndarray | None = None) -> None:
        """Add ``m`` observations: positions ``m x d``, values ``m x k``, variances ``m x k``.

        Either every call gives ``Yvar`` (noise known per measurement) or none does (learned).
        """
        X = np.atleast_2d(np.asarray(X, dtype=float))
        Y = np.asarray(Y, dtype=float)
        if X.shape[1] != self.dim or Y.size != X.shape[0] * self.n_outputs:
            raise ValueError(f"need X of shape m x {self.dim} and Y m x {self.n_outputs}, got {X.shape}, {Y.shape}")
        Y = Y.reshape(X.shape[0], self.n_outputs)
        if not (np.all(np.isfinite(X)) and np.all(np.isfinite(Y))):
            raise ValueError("X and Y must be finite: drop NaN observations before add() and report them")
        if Yvar is not None:
            Yvar = np.asarray(Yvar, dtype=float).reshape(Y.shape)
            if not np.all(np.isfinite(Yvar)) or np.any(Yvar < 0):
                raise ValueError("Yvar must be finite and >= 0")
        if (Yvar is None) != (self._Yvar is None) and self.n_points:
            raise ValueError("give Yvar on every add() or on none")
        if X.shape[0] == 0:
            return
        self._X = np.concatenate([self._X, X])
        self._Y = np.concatenate([self._Y, Y])
        if Yvar is not None:
            self._Yvar = Yvar if self._Yvar is None else np.concatenate([self._Yvar, Yvar])
        self._advance()

    def _advance(self) -> None:
        """Swap in a finished background refit, start one when due, extend the factors."""
        n = self.n_points
        if self._pending is not None and self._pending.done():
            pending, self._pending = self._pending, None
            try:
                n_snap, factors = pending.result()
            except RuntimeError as err:  # torch's LinAlgError, gpytorch's NotPSDError
                # the posterior in use stays; the next refit is due after refit_growth more
                self.n_failed_refits += 1
                logger.warning("kriging: a background refit failed (%s); the map goes on with the "
                               "hyper-parameters it has and refits again at %d points", err,
                               math.ceil(self.config.refit_growth * self._n_at_fit))
            else:
                self._factors = factors
                logger.debug("kriging refit on %d points swapped in at %d", n_snap, n)
        if self._factors is None:
            if n < self.config.min_points:
                return
            self._factors = self._refit(n, warm=self._saved_hyper)
            return
        limit = self.config.exact_limit
        passed = limit is not None and n > limit and isinstance(self._factors[0], _Factor)
        if (n >= self.config.refit_growth * self._n_at_fit or passed) and self._pending is None:
            if self.config.background:
                self._n_at_fit = n  # scheduled now; no second refit while this one runs
                self._pool = self._pool or ThreadPoolExecutor(1, thread_name_prefix="kriging-refit")
                self._pending = self._pool.submit(lambda: (n, self._refit(n, None)))
            else:
                self._factors = self._refit(n, warm=None)
                return
        try:
            for k, f in enumerate(self._factors):
                if f.n < n:
                    self._extend(f, f.n, n, k=k)
        except torch.linalg.LinAlgError as err:
            # an update that cannot be factored: fit afresh on every point (every factor is
            # rebuilt, so one left half-updated does not matter) rather than fail every later add
            self.n_failed_updates += 1
            logger.warning("kriging: the update to %d points could not be factored (%s); refitting", n, err)
            try:
                self._factors = self._refit(n, warm=None)
            except RuntimeError as again:
                raise ModelError(
                    f"kriging: the covariance of {n} points cannot be factored ({err}), nor after a fresh "
                    f"fit ({again}); look for repeated positions with near-zero noise variance, or raise "
                    f"noise_floor (now {self.config.noise_floor:g})") from again

    def _refit(self, n: int, warm: list[dict[str, Any]] | None) -> list[_Factor | _Inducing]:
        """Fit hyper-parameters on (a subsample of) the first ``n`` points; build fresh factors."""
        X, Y = self._X[:n].copy(), self._Y[:n].copy()
        Yvar = None if self._Yvar is None else self._Yvar[:n].copy()
        with self._lock:
            idx = np.arange(n)
            if n > self.config.max_fit_points:
                idx = np.sort(self._rng.choice(n, self.config.max_fit_points, replace=False))
        factors = []
        for k in range(self.n_outputs):
            hyper = self._fit_output(X[idx], Y[idx, k], None if Yvar is None else Yvar[idx, k],
                                     warm=None if warm is None else warm[k])
            if len(idx) < n:  # a sparser subsample may widen the intervals, never narrow them
                hyper.var_scale = max(hyper.var_scale, 1.0)
            f = self._new_factor(hyper, X[:n])
            self._extend(f, 0, n, X=X, Y=Y, Yvar=Yvar, k=k)
            factors.append(f)
        self._n_at_fit = max(self._n_at_fit, n)
        self.n_fits += 1
        return factors

    def _fit_output(self, X: np.ndarray, y: np.ndarray, yvar: np.ndarray | None,
                    warm: dict[str, Any] | None) -> _Hyper:
        y_mean = float(np.mean(y))
        y_std = float(np.std(y)) or 1.0
        tx = self._unit(X)
        ty = torch.as_tensor((y - y_mean) / y_std, **self._tkw).reshape(-1, 1)
        tvar = None
        if yvar is not None:
            tvar = torch.as_tensor(np.maximum(yvar / y_std**2, self.config.noise_floor), **self._tkw).reshape(-1, 1)
        d = self.dim
        ard = d if self.config.anisotropic else None
        prior = LogNormalPrior(loc=math.sqrt(2) + math.log(d) / 2, scale=math.sqrt(3))
        covar = self._kernel(ard, prior)
        if self.config.multiscale:
            short = self._kernel(ard, None)
            short.base_kernel.lengthscale = 0.05
            short.outputscale = 0.1
            covar = covar + short
        warp = None
        if self.config.nonstationary:
            warp = Warp(d=d, indices=list(range(d)), bounds=torch.tensor([[0.0] * d, [1.0] * d], **self._tkw)).to(**self._tkw)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", InputDataWarning)  # inputs/outputs are scaled here
            likelihood = None if tvar is not None else GaussianLikelihood(
                noise_constraint=GreaterThan(self.config.noise_floor)).to(**self._tkw)
            model = SingleTaskGP(tx, ty, tvar, likelihood=likelihood, covar_module=covar,
                                 input_transform=warp, outcome_transform=None)
        if warm:
            model.load_state_dict(warm, strict=False)
        mll = ExactMarginalLogLikelihood(model.likelihood, model)
        try:
            fit_gpytorch_mll(mll)
        except Exception as err:  # botorch raises several kinds; keep the start values
            logger.warning("kriging hyper-parameter fit failed (%s); keeping the starting values", err)
        _floor_lengthscales(model.covar_module)
        model.eval()
        noise = None if tvar is not None else float(model.likelihood.noise.detach().reshape(-1)[0])
        hyper = _Hyper(covar=model.covar_module, warp=model.input_transform if warp is not None else None,
                       mean=float(model.mean_module.constant.detach()), y_mean=y_mean, y_std=y_std, noise=noise)
        nv = tvar.reshape(-1) if tvar is not None else torch.full((len(y),), noise, **self._tkw)
        choice = self.config.reconstruction
        if len(y) >= _MIN_CALIBRATION_POINTS:
            resid, latent = loo_residuals(hyper.k(tx, tx), nv, ty.reshape(-1) - hyper.mean)
            loo = None
            if choice != "kriging" and X.shape[1] >= 2:
                loo = _triangulated_loo(X, ty.reshape(-1).cpu().numpy())
                if loo is not None:
                    hyper.loo_median = {"kriging": float(np.median(np.abs(resid)) * y_std),
                                        "triangulation": float(np.median(np.abs(loo[0])) * y_std)}
                    if choice == "triangulation" or hyper.loo_median["triangulation"] < hyper.loo_median["kriging"]:
                        hyper.reconstruction = "triangulation"
            if self.config.calibration_level is not None:
                self._calibrate(hyper, _area_weights(X), nv.cpu().numpy(), resid, latent, loo)
        elif choice == "triangulation" and X.shape[1] >= 2:
            hyper.reconstruction = "triangulation"
        return hyper

    def _calibrate(self, hyper: _Hyper, weights: np.ndarray, noise: np.ndarray, resid: np.ndarray,
                   latent: np.ndarray, loo: tuple[np.ndarray, np.ndarray | None] | None) -> None:
        """Set ``hyper``'s interval scales from the leave-one-out residuals (standardised)."""
        level = self.config.calibration_level
        assert level is not None
        hyper.var_scale = variance_scale(resid, latent, noise, level, weights=weights)
        if hyper.reconstruction != "triangulation" or loo is None:
            return
        # the intervals are put around the map that predict() draws: calibrated on its
        # residuals, against its own error scale in 2-D, else the kriging variance
        tri, spread = loo
        hyper.tri_scale = variance_scale(tri, latent if spread is None else spread**2, noise, level, weights=weights)
        if spread is not None:
            # the map passes through the kriging estimates at the points, whose error
            # variance is 1 / (1 / leave-one-out variance + 1 / noise): the floor
            hyper.tri_floor = float(np.median(1.0 / (1.0 / (hyper.var_scale * latent) + 1.0 / noise)))

    def _kernel(self, ard: int | None, prior: Any) -> ScaleKernel:
        if self.config.kernel == "rbf":
            base: torch.nn.Module = RBFKernel(ard_num_dims=ard, lengthscale_prior=prior)
        else:
            nu = 2.5 if self.config.kernel == "matern52" else 1.5
            base = MaternKernel(nu=nu, ard_num_dims=ard, lengthscale_prior=prior)
        return ScaleKernel(base).to(**self._tkw)

    def _new_factor(self, hyper: _Hyper, X: np.ndarray) -> _Factor | _Inducing:
        """An empty posterior for the observations ``X``: exact up to ``exact_limit`` of them,
        on inducing inputs past it."""
        limit = self.config.exact_limit
        if limit is None or len(X) <= limit:
            f = _Factor(hyper, tail_rows=self.config.tail_rows)
            f.prior_var = hyper.k_diag(self._C)
            f.var = f.prior_var.clone()
            return f
        with self._lock:
            seed = int(self._rng.integers(2**31))
        Z = _inducing_inputs(np.asarray(self._unit(X).cpu()), self.config.inducing_points, seed)
        return _Inducing(hyper, torch.as_tensor(Z, **self._tkw), self._C)

    def _extend(self, f: _Factor | _Inducing, lo: int, hi: int, *, X: np.ndarray | None = None,
                Y: np.ndarray | None = None, Yvar: np.ndarray | None = None, k: int) -> None:
        """Add observations ``lo:hi`` to factor ``f``."""
        X = self._X if X is None else X
        Y = self._Y if Y is None else Y
        Yvar = self._Yvar if Yvar is None and X is self._X else Yvar
        h = f.hyper
        yn = torch.as_tensor((Y[lo:hi, k] - h.y_mean) / h.y_std - h.mean, **self._tkw)
        f.extend(self._unit(X[:lo]), self._unit(X[lo:hi]), yn, self._noise(h, Yvar, lo, hi, k), self._C)

    def _noise(self, h: _Hyper, Yvar: np.ndarray | None, lo: int, hi: int, k: int) -> torch.Tensor:
        """Standardised noise variances of observations ``lo:hi`` of output ``k``."""
        if h.noise is not None:
            return torch.full((hi - lo,), h.noise, **self._tkw)
        return torch.as_tensor(np.maximum(Yvar[lo:hi, k] / h.y_std**2, self.config.noise_floor), **self._tkw)

    # -- posterior ----------------------------------------------------------------------------
    def _need(self) -> list[_Factor | _Inducing]:
        if self._factors is None:
            raise ModelError(f"the map has {self.n_points} observations; kriging needs at least {self.config.min_points}")
        return self._factors

    def posterior(self) -> tuple[np.ndarray, np.ndarray]:
        """Posterior mean and variance at the candidates, ``c x k`` each, in output units."""
        means, variances = [], []
        for f in self._need():
            h = f.hyper
            mu = f.mean()
            means.append((mu * h.y_std + h.y_mean).cpu().numpy())
            variances.append((f.var * h.var_unit).cpu().numpy())
        return np.stack(means, axis=1), np.stack(variances, axis=1)

    def prior_variance(self) -> np.ndarray:
        """Prior variance at the candidates, ``c x k``, in output units."""
        return np.stack([(f.prior_var * f.hyper.var_unit).cpu().numpy() for f in self._need()], axis=1)

    def noise_variance(self) -> np.ndarray:
        """Typical noise variance of each output (learned, or the median given), ``k``, output units."""
        out = []
        for k, f in enumerate(self._need()):
            h = f.hyper
            if h.noise is not None:
                out.append(h.noise * h.y_std**2)
            else:
                out.append(float(np.median(self._Yvar[:, k])))
        return np.asarray(out)

    def covariance_with(self, j: int) -> np.ndarray:
        """Posterior covariance between every candidate and candidate ``j``: ``c x k``."""
        cols = []
        for f in self._need():
            cols.append((f.cov_col(self._C, j) * f.hyper.var_unit).cpu().numpy())
        return np.stack(cols, axis=1)

    def predict(self, X: np.ndarray, chunk: int = 4096) -> tuple[np.ndarray, np.ndarray]:
        """The map at arbitrary positions ``p x d``: mean and variance, ``p x k`` each (a full
        solve; for evaluation and reports, not for decisions).

        The mean is each output's chosen :attr:`reconstruction`: the kriging posterior mean, or
        the triangulation through the kriging estimates at the measured positions. The variance
        is the kriging posterior's, calibrated on its leave-one-out residuals; for a
        triangulated map in 2-D, the triangulation's own error scale instead,
        ``s spread**2 + floor`` (:meth:`models.triangulation.Interpolant.spread`: slope times
        distance to the nearest measured position, so the intervals widen across boundaries
        and narrow between them; ``s`` calibrated on its leave-one-out residuals, ``floor`` the
        error variance of the estimates it passes through, carried by the interpolation
        weights; see the module docs)."""
        from models.triangulation import Interpolant

        factors = self._need()
        X = np.atleast_2d(np.asarray(X, dtype=float))
        U = self._unit(X)
        Xs = self._unit(self._X)
        means, variances, drawn = [], [], []
        for k, f in enumerate(factors):
            h = f.hyper
            triangulation = h.reconstruction == "triangulation"
            drawn.append(h.reconstruction)
            if triangulation and h.tri_floor is not None:
                # its own mean and intervals: the kriging solve over the targets is not needed
                estimates = self._estimates(f, k)
                interpolant = Interpolant(self._X[: f.n], estimates)
                mean, drawn[-1] = self._triangulated_mean(self._X[: f.n], estimates, X, interpolant)
                means.append(mean)
                # the estimates' error carried by the interpolation weights: sum w_i**2 floor
                floor = h.tri_floor * h.y_std**2 * interpolant.weight_energy(X)
                variances.append(h.tri_scale * interpolant.spread(X) ** 2 + floor)
                continue
            mu_parts, var_parts = [], []
            for u in torch.split(U, chunk):
                mu_u, var_u = f.at(Xs, u)
                mu_parts.append(mu_u)
                var_parts.append(var_u)
            mean = (torch.cat(mu_parts) * h.y_std + h.y_mean).cpu().numpy()
            var = (torch.cat(var_parts) * h.var_unit).cpu().numpy()
            if triangulation:
                # through the kriging estimates at the measured positions (noise smoothed as kriging does)
                mean, drawn[-1] = self._triangulated_mean(self._X[: f.n], self._estimates(f, k), X)
                var = var / h.var_scale * h.tri_scale
            means.append(mean)
            variances.append(var)
        self._drawn = drawn
        return np.stack(means, axis=1), np.stack(variances, axis=1)

    def _triangulated_mean(self, points: np.ndarray, estimates: np.ndarray, X: np.ndarray,
                           interpolant: Any = None) -> tuple[np.ndarray, str]:
        """A triangulated output's map at ``X`` through its ``estimates`` at ``points``, and how it
        was drawn: by its domains (:class:`models.domains.DomainMap`, ``"domains (m)"``) where
        :attr:`KrigingConfig.domains` asks for it and the values split into ``m >= 2`` domains
        (2-D, at least ``_MIN_DOMAIN_POINTS`` positions), else by the triangulation
        (``interpolant``, when the caller has built it)."""
        from scipy.spatial import QhullError

        from models.domains import DomainMap

        if self.config.domains and points.shape[1] == 2 and len(points) >= _MIN_DOMAIN_POINTS:
            try:
                by_domains = DomainMap.build(points, estimates)
            except (QhullError, ValueError):  # degenerate (collinear) positions: the triangulation
                by_domains = None
            if by_domains is not None:
                return by_domains(X), f"domains ({by_domains.n_domains})"
        return (triangulated(points, estimates, X) if interpolant is None else interpolant(X)), "triangulation"

    def _estimates(self, f: _Factor | _Inducing, k: int) -> np.ndarray:
        """The posterior mean at the measured positions, ``f.n``, in output units."""
        h, n = f.hyper, f.n
        yn = torch.as_tensor((self._Y[:n, k] - h.y_mean) / h.y_std - h.mean, **self._tkw)
        fitted = f.fitted(self._unit(self._X[:n]), yn, self._noise(h, self._Yvar, 0, n, k))
        return (fitted * h.y_std + h.y_mean).cpu().numpy()

    @property
    def drawn(self) -> list[str] | None:
        """How the last :meth:`predict` drew each output's map: ``"kriging"``,
        ``"triangulation"`` or ``"domains (m)"`` (a triangulated output drawn by its ``m``
        domains, :class:`models.domains.DomainMap`); ``None`` before the first."""
        return None if self._drawn is None else list(self._drawn)

    @property
    def reconstruction(self) -> list[str]:
        """How :meth:`predict` draws each output's map (``"kriging"`` or ``"triangulation"``)."""
        return [f.hyper.reconstruction for f in self._need()]

    @property
    def posterior_model(self) -> str:
        """``"exact"``, or ``"inducing"`` past :attr:`KrigingConfig.exact_limit` (the candidates'
        posterior on inducing inputs; see the module docs, "Scale")."""
        return "inducing" if isinstance(self._need()[0], _Inducing) else "exact"

    @property
    def variance_scale(self) -> np.ndarray:
        """Each output's calibration factor on the posterior variance, ``k``."""
        return np.asarray([f.hyper.var_scale for f in self._need()])

    @property
    def positions(self) -> np.ndarray:
        """The measured positions, ``n x d`` (physical units)."""
        return self._X.copy()

    # -- state --------------------------------------------------------------------------------
    def wait(self) -> None:
        """Block until a background refit is done and swapped in (tests, reports, shutdown)."""
        while self._pending is not None:
            self._pending.exception()  # waits; a failed refit is dealt with (and logged) by _advance
            self._advance()

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None
            self._pending = None

    def hyperparameters(self) -> list[dict[str, Any]]:
        """Per output: length-scales (unit-square units), output scale, mean, noise, warping."""
        return [f.hyper.summary() for f in self._need()]

    def state(self) -> dict[str, Any]:
        """JSON-able state: fitted hyper-parameters per output and the refit schedule."""
        hyper = None
        if self._factors is not None:
            hyper = []
            for f in self._factors:
                params = {f"covar_module.{k}": v.detach().cpu().tolist() for k, v in f.hyper.covar.named_parameters()}
                if f.hyper.warp is not None:
                    params.update({f"input_transform.{k}": v.detach().cpu().tolist()
                                   for k, v in f.hyper.warp.named_parameters()})
                hyper.append(params)
        return {"hyperparameters": hyper, "n_at_fit": self._n_at_fit, "n_fits": self.n_fits}

    def load_state(self, state: dict[str, Any]) -> None:
        """Start from saved hyper-parameters: the first fit is warm-started from them."""
        hyper = state.get("hyperparameters")
        if hyper:
            self._saved_hyper = [{k: torch.as_tensor(v, **self._tkw) for k, v in h.items()} for h in hyper]
        self.n_fits = int(state.get("n_fits", 0))


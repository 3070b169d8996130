"""Classical baselines for the detector analyses: denoising, Bragg-peak integration, upsampling.

Each ML model of ``models`` is measured against the classical method it replaces, and both go
through the same code where they overlap (:func:`integrate_in_mask` integrates the U-Net's masks
and the threshold baseline's alike), so the comparison is fair.

* Denoising of Poisson counts: the Anscombe transform, a Gaussian filter or BM3D for unit-variance
  Gaussian noise, and the exact unbiased inverse of Mäkitalo & Foi. For an integrating detector,
  whose readings add Gaussian read noise to the Poisson counts, the generalized Anscombe
  transform with that read noise and its exact unbiased inverse (:func:`anscombe_bm3d`'s
  ``read_noise``).
* Bragg peaks: sphere and ellipsoid summation with a background shell (Mantid's
  ``IntegratePeaksMD`` and ``IntegrateEllipsoids``), and threshold + connected components.
* Super-resolution: cubic-spline ("bicubic") interpolation that conserves the total intensity.

A ``mask`` argument follows numpy's masked-array convention everywhere: ``True`` marks a pixel
to leave out (a module gap, a dead or hot pixel). Masked pixels may hold anything, NaN included.

References
----------
F. J. Anscombe, "The transformation of Poisson, binomial and negative-binomial data",
Biometrika 35, 246-254 (1948).
M. Mäkitalo and A. Foi, "Optimal inversion of the Anscombe transformation in low-count Poisson
image denoising", IEEE Trans. Image Process. 20(1), 99-109 (2011).
M. Mäkitalo and A. Foi, "A closed-form approximation of the exact unbiased inverse of the
Anscombe variance-stabilizing transformation", IEEE Trans. Image Process. 20(9), 2697-2698 (2011).
M. Mäkitalo and A. Foi, "Optimal inversion of the generalized Anscombe transformation for
Poisson-Gaussian noise", IEEE Trans. Image Process. 22(1), 91-103 (2013).
K. Dabov, A. Foi, V. Katkovnik and K. Egiazarian, "Image denoising by sparse 3-D
transform-domain collaborative filtering", IEEE Trans. Image Process. 16(8), 2080-2095 (2007).
C. M. Stein, "Estimation of the mean of a multivariate normal distribution", Ann. Stat. 9(6),
1135-1151 (1981).
Mantid, ``IntegratePeaksMD`` and ``IntegrateEllipsoids`` algorithm documentation,
https://docs.mantidproject.org.
"""

from __future__ import annotations

import heapq
import itertools
import math
from dataclasses import dataclass
from functools import lru_cache
from typing import Literal

import numpy as np
from numpy.typing import ArrayLike, NDArray
from scipy import ndimage
from scipy.stats import poisson

__all__ = [
    "PeakIntegrals",
    "anscombe",
    "anscombe_bm3d",
    "anscombe_gaussian",
    "bicubic_upsample",
    "ellipsoid_integrate",
    "generalized_anscombe",
    "integrate_in_mask",
    "inverse_anscombe_algebraic",
    "inverse_anscombe_closed_form",
    "inverse_anscombe_exact",
    "neighbour_noise_rms",
    "rebin",
    "sphere_integrate",
    "split_peaks",
    "sure_gaussian_sigma",
    "threshold_components",
]

FloatArray = NDArray[np.float64]
BoolArray = NDArray[np.bool_]

#: Largest Poisson mean of the exact-inverse table; above it the closed form is within 2e-5 (relative).
_EXACT_MAX_LAMBDA = 400.0
#: Gaussian filter widths (px) searched by :func:`sure_gaussian_sigma`.
_SURE_SIGMAS = tuple(float(s) for s in np.geomspace(0.3, 12.0, 25))
#: Width (px) of the pilot estimate of λ that sets the Anscombe-domain noise variance for SURE.
_SURE_PILOT_SIGMA = 2.0


# --------------------------------------------------------------------------------------------
# input checks


def _counts(counts: ArrayLike, mask: ArrayLike | None, name: str = "counts",
            ndim: tuple[int, ...] | None = None, negative: bool = False) -> tuple[FloatArray, BoolArray]:
    """Return ``counts`` as float64 and the boolean bad-pixel mask, checking the unmasked values
    (finite; and >= 0 unless ``negative``: readings with read noise may lie below 0)."""
    x = np.asarray(counts)
    if x.dtype.kind not in "biuf":
        raise ValueError(f"{name} must be a real numeric array: {x.dtype=}")
    x = x.astype(np.float64)
    if ndim is not None and x.ndim not in ndim:
        raise ValueError(f"{name} must have {' or '.join(map(str, ndim))} dimensions: {x.shape=}")
    if x.size == 0:
        raise ValueError(f"{name} is empty: {x.shape=}")
    if mask is None:
        bad = np.zeros(x.shape, dtype=bool)
    else:
        bad = np.asarray(mask)
        if bad.dtype != np.bool_ or bad.shape != x.shape:
            raise ValueError(f"mask must be boolean and of {name}'s shape: {bad.dtype=}, "
                             f"{bad.shape=}, {x.shape=}")
    good = x[~bad]
    if not np.isfinite(good).all():
        idx = tuple(int(i[0]) for i in np.nonzero(~np.isfinite(x) & ~bad))
        raise ValueError(f"{name} has a non-finite value at {idx} (mask it instead)")
    if not negative and (good < 0).any():
        idx = tuple(int(i[0]) for i in np.nonzero((x < 0) & ~bad))
        raise ValueError(f"{name} has a negative count {x[idx]} at {idx}")
    return np.where(bad, 0.0, x), bad


def _read_noise(value: float) -> float:
    try:
        ok = math.isfinite(float(value)) and float(value) >= 0
    except (TypeError, ValueError):
        ok = False
    if not ok:
        raise ValueError(f"read_noise must be a finite number >= 0 (counts, the detector's Gaussian read "
                         f"noise; 0 for a photon-counting detector): read_noise={value!r}")
    return float(value)


def _positive(name: str, value: float) -> float:
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"{name} must be positive and finite: {name}={value!r}")
    return float(value)


#: median of a chi-square variable with one degree of freedom: ``median(d**2) = 0.4549 var(d)``
#: for a zero-mean Gaussian ``d``
_CHI2_1_MEDIAN = 0.45493642311957283


def neighbour_noise_rms(counts: ArrayLike, mask: ArrayLike | None = None, *,
                        max_pairs: int = 16384, min_pairs: int = 256) -> float | None:
    """A robust estimate of a frame's per-pixel noise (rms, in the frame's units) from the
    differences of neighbouring pixels along its last axis.

    ``sqrt(median(d**2) / (2 * 0.4549))`` over the differences ``d`` of pairs with neither pixel
    masked (exact for independent Gaussian noise of one variance). Structure in the frame only
    raises it, and on a detector's readings (Poisson counts plus independent Gaussian read noise
    ``s``) it is about ``sqrt(mean counts + s**2)`` on flat parts, so it is never much below
    ``s``: a read-noise setting well above it cannot be right (the agent refuses frames on that
    ground; :class:`agents.detector_agent.DetectorSettings`). At most ``max_pairs`` pairs are
    used, from evenly spaced rows (the estimate's relative error is then about 1%; only those
    rows are read and checked); ``None`` when fewer than ``min_pairs`` are unmasked.

    >>> rng = np.random.default_rng(0)
    >>> round(neighbour_noise_rms(rng.normal(0.0, 2.0, (256, 256))), 1)
    2.0
    """
    a = np.asarray(counts)
    if a.ndim < 1 or a.shape[-1] < 2:
        return None
    m = None if mask is None else np.asarray(mask)
    if m is not None and m.shape != a.shape:
        raise ValueError(f"mask must be of counts' shape: {m.shape=}, {a.shape=}")
    # evenly spaced rows along the last axis, about max_pairs pairs: a frame is not read whole
    rows = a.reshape(-1, a.shape[-1])
    step = max(1, rows.shape[0] * (rows.shape[1] - 1) // max(max_pairs, 1))
    x, bad = _counts(rows[::step], None if m is None else m.reshape(rows.shape)[::step], negative=True)
    ok = ~(bad[:, 1:] | bad[:, :-1])
    d = (x[:, 1:] - x[:, :-1])[ok]
    if d.size < max(min_pairs, 1):
        return None
    if d.size > max_pairs:
        d = d[:: d.size // max_pairs]
    return float(math.sqrt(float(np.median(d * d)) / (2.0 * _CHI2_1_MEDIAN)))


# --------------------------------------------------------------------------------------------
# Anscombe transform and its inverses


def anscombe(x: ArrayLike) -> FloatArray:
    """Anscombe variance-stabilising transform, ``A(x) = 2 sqrt(x + 3/8)``.

    For Poisson ``x`` of mean λ ≳ 4, ``A(x)`` is close to Gaussian with unit variance.

    Raises
    ------
    ValueError
        ``x`` is not finite or is negative.

    Examples
    --------
    >>> float(anscombe(0.0)) == 2 * (3 / 8) ** 0.5
    True
    """
    v, _ = _counts(x, None, name="x")
    return 2.0 * np.sqrt(v + 0.375)


def _transformed(d: ArrayLike) -> FloatArray:
    v = np.asarray(d, dtype=np.float64)
    if not np.isfinite(v).all():
        raise ValueError("transformed values must be finite")
    return v


def inverse_anscombe_algebraic(d: ArrayLike) -> FloatArray:
    """Algebraic inverse of the Anscombe transform, ``(D / 2)² - 3/8``.

    Biased at low counts: ``E[A(x)]`` lies below ``A(E[x])``, so it underestimates λ there.
    """
    v = _transformed(d)
    return (v / 2.0) ** 2 - 0.375


def inverse_anscombe_closed_form(d: ArrayLike) -> FloatArray:
    """Closed-form approximation of the exact unbiased inverse (Mäkitalo & Foi, TIP 20(9), 2011).

    ``I(D) = D²/4 + sqrt(3/2)/(4 D) - 11/(8 D²) + 5 sqrt(3/2)/(8 D³) - 1/8``, clipped at 0 (the
    exact inverse's value for ``D <= 2 sqrt(3/8)``). Its error against the exact inverse is
    largest below ``D ≈ 2``, i.e. below λ ≈ 0.5.
    """
    v = _transformed(d)
    out = np.zeros_like(v)
    pos = v > 0
    D = v[pos]
    s = math.sqrt(1.5)
    out[pos] = 0.25 * D**2 + 0.25 * s / D - 1.375 / D**2 + 0.625 * s / D**3 - 0.125
    return np.maximum(out, 0.0)


def generalized_anscombe(x: ArrayLike, read_noise: float) -> FloatArray:
    """Generalized Anscombe transform, ``2 sqrt(max(x + 3/8 + σ², 0))``, ``σ`` the read noise.

    For ``x = Poisson(λ) + N(0, σ²)`` (an integrating detector's reading, in counts) it is close
    to Gaussian with unit variance where ``λ + σ²`` is large (Mäkitalo & Foi 2013, detector gain 1
    and no offset); with ``σ = 0`` it is :func:`anscombe`. ``x`` may be negative (read noise).
    """
    v, _ = _counts(x, None, name="x", negative=True)
    s = _read_noise(read_noise)
    return 2.0 * np.sqrt(np.maximum(v + 0.375 + s * s, 0.0))


@lru_cache(maxsize=1)
def _poisson_grid() -> tuple[FloatArray, FloatArray, FloatArray]:
    """``(k, λ, pmf)``: counts, a grid of λ from 0 to :data:`_EXACT_MAX_LAMBDA`, and ``P(k | λ)``
    (``k x λ``), shared by the exact-inverse tables of every read noise."""
    lam = np.concatenate([[0.0], np.geomspace(1e-4, _EXACT_MAX_LAMBDA, 4000)])
    k = np.arange(int(_EXACT_MAX_LAMBDA + 15 * math.sqrt(_EXACT_MAX_LAMBDA) + 60), dtype=np.float64)
    return k, lam, poisson.pmf(k[:, None], lam[None, :])


@lru_cache(maxsize=16)
def _exact_table(read_noise: float = 0.0) -> tuple[FloatArray, FloatArray, FloatArray]:
    """``(E[f(x)], λ, E[f(x)²])`` on the grid of :func:`_poisson_grid`, ``f`` the (generalized)
    Anscombe transform and ``x = Poisson(λ) + N(0, read_noise²)``; the Gaussian expectation by
    80-node Gauss-Hermite quadrature for each Poisson count."""
    k, lam, pmf = _poisson_grid()
    if read_noise == 0:
        inside = (k + 0.375)[:, None]
        w = np.ones(1)
    else:
        t, w = np.polynomial.hermite_e.hermegauss(80)  # nodes and weights for N(0, 1)
        inside = np.maximum(k[:, None] + read_noise * t[None, :] + 0.375 + read_noise**2, 0.0)
    w = w / w.sum()
    return (2.0 * np.sqrt(inside) @ w) @ pmf, lam, (4.0 * inside @ w) @ pmf


def inverse_anscombe_exact(d: ArrayLike, read_noise: float = 0.0) -> FloatArray:
    """Exact unbiased inverse of the Anscombe transform (Mäkitalo & Foi, TIP 20(1), 2011), or
    with ``read_noise`` of the generalized one (:func:`generalized_anscombe`; TIP 22(1), 2013).

    The inverse of ``λ ↦ E[A(x) | x ~ Poisson(λ)] = Σ_k 2 sqrt(k + 3/8) λ^k e^{-λ} / k!``:
    a denoiser that estimates ``E[A(x)]`` is mapped back to λ without bias. The expectation is
    tabulated once (per read noise) for λ in ``[0, 400]`` and inverted by linear interpolation on
    4,000 log-spaced nodes; above the table the closed form (:func:`inverse_anscombe_closed_form`)
    is used (with read noise ``σ``: ``D²/4 - 1/8 - σ²``, its leading terms), and values below
    ``E[f(x) | λ = 0]`` map to 0.

    Parameters
    ----------
    d : array_like
        Estimates of ``E[A(x)]``, any shape.
    read_noise : float
        The read noise ``σ`` (counts) the transform was taken with; 0: the plain Anscombe one.

    Returns
    -------
    ndarray
        λ, of ``d``'s shape.

    Examples
    --------
    >>> lam = 0.2
    >>> k = np.arange(40)
    >>> from scipy.stats import poisson
    >>> e = float((2 * np.sqrt(k + 0.375) * poisson.pmf(k, lam)).sum())
    >>> round(float(inverse_anscombe_exact(e)), 4)
    0.2
    """
    v = _transformed(d)
    s = _read_noise(read_noise)
    expect, lam, _ = _exact_table(s)
    out = np.interp(v.ravel(), expect, lam).reshape(v.shape)
    high = v > expect[-1]
    if high.any():
        out[high] = inverse_anscombe_closed_form(v[high]) if s == 0 else v[high] ** 2 / 4 - 0.125 - s * s
    return out


# --------------------------------------------------------------------------------------------
# denoising


def _fill_masked(a: FloatArray, bad: BoolArray, width: float) -> FloatArray:
    """Replace masked pixels by the Gaussian-weighted mean of their unmasked neighbours."""
    if not bad.any():
        return a
    good = (~bad).astype(np.float64)
    num = ndimage.gaussian_filter(np.where(bad, 0.0, a), width, mode="reflect")
    den = ndimage.gaussian_filter(good, width, mode="reflect")
    fallback = float(a[~bad].mean())  # far from any good pixel: the frame's mean
    local = np.divide(num, den, out=np.full_like(a, fallback), where=den > 1e-3)
    return np.where(bad, local, a)


def _filter_diagonal_trace(n: int, sigma: float) -> float:
    """Trace of the ``n x n`` matrix of a 1D Gaussian filter with reflecting boundaries."""
    radius = int(4.0 * sigma + 0.5)
    m = min(n, 4 * radius + 4)
    diag = np.diag(ndimage.gaussian_filter1d(np.eye(m), sigma, axis=0, mode="reflect"))
    if m == n:
        return float(diag.sum())
    edge = diag[: 2 * radius + 2]  # the left edge; the right one mirrors it
    centre = float(diag[m // 2])
    return float(2 * edge.sum() + (n - 2 * edge.size) * centre)


def _anscombe_variance(lam: FloatArray, read_noise: float = 0.0) -> FloatArray:
    """``Var[f(x)]`` of the (generalized, with ``read_noise``) Anscombe transform ``f`` for
    ``x = Poisson(lam) + N(0, read_noise²)``: ``E[f²] - E[f]²`` from :func:`_exact_table`, 1 above
    the table."""
    expect, grid, second = _exact_table(read_noise)
    var = np.interp(lam, grid, second) - np.interp(lam, grid, expect) ** 2
    return np.where(lam > grid[-1], 1.0, np.clip(var, 1e-6, None))


def sure_gaussian_sigma(
    counts: ArrayLike,
    mask: ArrayLike | None = None,
    sigmas: tuple[float, ...] = _SURE_SIGMAS,
    read_noise: float = 0.0,
) -> float:
    """Width of the Gaussian filter that minimises Stein's unbiased risk estimate (SURE).

    In the Anscombe domain the noise is close to Gaussian, and a Gaussian filter is a linear
    smoother ``H``, so its risk is estimated without the truth as
    ``SURE(σ) = Σ w_i ((H y - y)_i² - v_i + 2 v_i H_ii)``. The noise variance ``v_i`` is 1 at
    high counts but falls below it under ~4 counts, so it is taken as ``Var[A(x) | λ̂_i]`` of a
    pilot estimate ``λ̂`` (counts smoothed at 2 px). The weights ``w_i = λ̂_i + 3/8 = (dλ/dA)²``
    make it estimate the count-domain squared error (delta method), the error PSNR measures;
    unweighted, it over-smooths bright peaks. ``H_ii`` is the filter's mean diagonal, from the
    exact traces of the 1D filters (reflecting boundaries). Masked pixels are filled as in
    :func:`anscombe_gaussian` and left out of the sums; the fill's effect on ``H`` is ignored.
    With ``read_noise`` ``σ`` the transform is the generalized one, ``v_i`` its variance for
    Poisson-Gaussian readings and ``w_i = λ̂_i + 3/8 + σ²`` (``λ̂`` floored at 0).

    Parameters
    ----------
    counts : array_like
        Poisson counts, any dimension.
    mask : array_like of bool, optional
        ``True`` where a pixel is left out.
    sigmas : tuple of float
        Candidate widths in pixels.
    read_noise : float
        The detector's Gaussian read noise in counts (rms); 0 for photon counting. With it,
        unmasked readings may be negative.

    Returns
    -------
    float
        The candidate with the smallest SURE.
    """
    rn = _read_noise(read_noise)
    x, bad = _counts(counts, mask, negative=rn > 0)
    if not sigmas or any(not (math.isfinite(s) and s > 0) for s in sigmas):
        raise ValueError(f"sigmas must be positive and finite: {sigmas=}")
    y = _fill_masked(generalized_anscombe(x, rn), bad, 3.0)
    keep = ~bad
    # below ~4 counts the Anscombe variance falls short of 1; taking it as 1 there over-smooths
    pilot = np.maximum(ndimage.gaussian_filter(_fill_masked(x, bad, 3.0), _SURE_PILOT_SIGMA, mode="reflect"), 0.0)
    var = _anscombe_variance(pilot, rn)[keep]
    # (dλ/dA)² = λ + 3/8 + σ² turns an Anscombe-domain error into a count-domain one (delta method)
    weight = pilot[keep] + 0.375 + rn * rn
    wvar = float((weight * var).sum())
    risks = []
    for s in sigmas:
        hy = ndimage.gaussian_filter(y, s, mode="reflect")
        # the filter's diagonal is the same at every interior pixel: tr(H) / N per pixel
        h_ii = math.prod(_filter_diagonal_trace(n, s) for n in y.shape) / y.size
        err2 = float((weight * (hy - y)[keep] ** 2).sum())
        risks.append(err2 - wvar + 2.0 * h_ii * wvar)
    return sigmas[int(np.argmin(risks))]


def anscombe_gaussian(
    counts: ArrayLike,
    sigma: float | Literal["sure"] = "sure",
    mask: ArrayLike | None = None,
    read_noise: float = 0.0,
) -> FloatArray:
    """Denoise Poisson counts: Anscombe transform, Gaussian filter, exact unbiased inverse.

    ``λ̂ = I⁻¹(G_σ * A(counts))`` with ``I⁻¹`` :func:`inverse_anscombe_exact`. With ``read_noise``
    (an integrating detector's) the transform, its inverse and the SURE width are the
    generalized ones for Poisson-Gaussian readings, as in :func:`anscombe_bm3d`.

    Parameters
    ----------
    counts : array_like
        Poisson counts, any dimension (a 2D frame, a 3D volume).
    sigma : float or "sure"
        Filter width in pixels, or ``"sure"`` to choose it by :func:`sure_gaussian_sigma`.
    mask : array_like of bool, optional
        ``True`` where a pixel is left out: it is filled by the local mean of its unmasked
        neighbours before filtering (so it does not drag them down) and set to 0 in the result.
    read_noise : float
        The detector's Gaussian read noise in counts (rms); 0 (the default) for photon counting.
        With it, unmasked readings may be negative.

    Returns
    -------
    ndarray
        Estimated expected counts, float64, of ``counts``' shape.

    Raises
    ------
    ValueError
        Unmasked counts are not finite or (without read noise) negative, the mask does not
        match, ``sigma`` is not positive, or ``read_noise`` is negative or not finite.
    """
    rn = _read_noise(read_noise)
    x, bad = _counts(counts, mask, negative=rn > 0)
    if isinstance(sigma, str):
        if sigma != "sure":
            raise ValueError(f"sigma must be a positive number or 'sure': {sigma=}")
        width = sure_gaussian_sigma(x, bad, read_noise=rn)
    else:
        width = _positive("sigma", sigma)
    a = _fill_masked(generalized_anscombe(x, rn), bad, max(width, 2.0))
    out = inverse_anscombe_exact(ndimage.gaussian_filter(a, width, mode="reflect"), rn)
    out[bad] = 0.0
    return out


def anscombe_bm3d(
    counts: ArrayLike,
    mask: ArrayLike | None = None,
    profile: str = "np",
    read_noise: float = 0.0,
) -> FloatArray:
    """Denoise a Poisson frame: Anscombe transform, BM3D at unit noise, exact unbiased inverse.

    ``λ̂ = I⁻¹(BM3D(A(counts), σ = 1))`` (Mäkitalo & Foi 2011; Dabov et al. 2007), the strongest
    classical Poisson denoiser. With ``read_noise`` (an integrating detector's) the transform and
    its inverse are the generalized ones for Poisson-Gaussian readings (Mäkitalo & Foi 2013): the
    plain transform takes such a frame for a Poisson one and under-smooths it. Where the read
    noise swamps the counts, BM3D's residual fluctuation through the convex inverse, floored at
    0, biases the result up: on flat 64 x 64 frames with read noise 2, mean 0.1 / 1 / 5 counts
    came out 0.20 / 1.08 / 5.05 (read noise 0.5: 0.15 / 1.00 / 5.07). Needs the ``bm3d``
    package, a benchmark-only dependency.

    Parameters
    ----------
    counts : array_like
        A 2D frame of Poisson counts, ``H x W``.
    mask : array_like of bool, optional
        ``True`` where a pixel is left out: filled by the local mean of its unmasked neighbours
        before filtering and set to 0 in the result.
    profile : str
        BM3D profile (``"np"`` normal, ``"refilter"``, ``"vn"``, ``"high"``, ``"deb"``).
    read_noise : float
        The detector's Gaussian read noise in counts (rms); 0 (the default) for photon counting.
        With it, unmasked readings may be negative.

    Returns
    -------
    ndarray
        Estimated expected counts, float64, ``H x W``.

    Raises
    ------
    ImportError
        ``bm3d`` is not installed.
    ValueError
        ``counts`` is not 2D, unmasked counts are not finite or (without read noise) negative,
        the mask does not match, or ``read_noise`` is negative or not finite.
    """
    s = _read_noise(read_noise)
    x, bad = _counts(counts, mask, ndim=(2,), negative=s > 0)
    try:
        import bm3d
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise ImportError(
            "anscombe_bm3d needs the 'bm3d' package, a benchmark-only dependency: "
            "pip install '.[bench]' (or pip install bm3d)"
        ) from err
    a = _fill_masked(generalized_anscombe(x, s), bad, 3.0)
    out = inverse_anscombe_exact(np.asarray(bm3d.bm3d(a, sigma_psd=1.0, profile=profile)), s)
    out[bad] = 0.0
    return out


# --------------------------------------------------------------------------------------------
# Bragg-peak integration


@dataclass(frozen=True)
class PeakIntegrals:
    """Integrated intensities of ``n`` peaks and how they were obtained.

    ``intensity = S_peak - n_peak b``, ``b = S_shell / n_shell`` the background per pixel, and
    ``sigma = sqrt(S_peak + (n_peak / n_shell)² S_shell)`` (Poisson propagation, as Mantid's
    ``IntegratePeaksMD``). A peak whose shell holds no pixel has NaN intensity, sigma and
    background.

    Attributes
    ----------
    intensity, sigma, background : ndarray
        ``n``: integrated intensity, its standard deviation and the background per pixel.
    n_peak, n_shell : ndarray of int
        ``n``: pixels summed in the peak region and in the background shell.
    centroids : ndarray
        ``n x d``: peak positions in pixel coordinates (given, or the components' centroids).
    labels : ndarray of int or None
        For the mask-based integrators, the label image: peak ``i`` is ``labels == i + 1``.
    """

    intensity: FloatArray
    sigma: FloatArray
    background: FloatArray
    n_peak: NDArray[np.int64]
    n_shell: NDArray[np.int64]
    centroids: FloatArray
    labels: NDArray[np.int64] | None = None


def _summed(rows: list[tuple[float, float, int, int]], centroids: FloatArray,
            labels: NDArray[np.int64] | None = None, under: FloatArray | None = None) -> PeakIntegrals:
    """Build :class:`PeakIntegrals` from per-peak ``(S_peak, S_shell, n_peak, n_shell)``; the
    background under each peak is ``n_peak`` times the shell's mean, or ``under`` where given
    (a sloping background's sum over the peak region). ``σ(I)`` keeps the shell's Poisson term."""
    s_in, s_sh, n_in, n_sh = np.array(rows, dtype=np.float64).reshape(-1, 4).T
    with np.errstate(divide="ignore", invalid="ignore"):
        per_pixel = (s_sh / np.maximum(n_sh, 1) if under is None
                     else np.asarray(under, dtype=np.float64) / np.maximum(n_in, 1))
        bkg = np.where(n_sh > 0, per_pixel, np.nan)
        ratio = np.where(n_sh > 0, n_in / np.maximum(n_sh, 1), np.nan)
    return PeakIntegrals(
        intensity=s_in - n_in * bkg,
        sigma=np.sqrt(s_in + ratio**2 * s_sh),
        background=bkg,
        n_peak=n_in.astype(np.int64),
        n_shell=n_sh.astype(np.int64),
        centroids=centroids,
        labels=labels,
    )


def _centres(centers: ArrayLike, ndim: int) -> FloatArray:
    c = np.asarray(centers, dtype=np.float64)
    if c.ndim == 1 and c.size == ndim:
        c = c[None, :]
    if c.ndim != 2 or c.shape[1] != ndim or not np.isfinite(c).all():
        raise ValueError(f"centers must be a finite `n x {ndim}` array of pixel coordinates: "
                         f"{c.shape=}")
    return c


def _region_sums(x: FloatArray, bad: BoolArray, centre: FloatArray, metric: FloatArray,
                 r_peak: float, r_inner: float, r_outer: float) -> tuple[float, float, int, int]:
    """Sums over ``d ≤ r_peak`` and ``r_inner < d ≤ r_outer``, ``d² = Δᵀ metric Δ``."""
    half = r_outer * np.sqrt(np.diag(np.linalg.inv(metric)))
    lo = np.maximum(np.floor(centre - half).astype(int), 0)
    hi = np.minimum(np.ceil(centre + half).astype(int) + 1, x.shape)
    if (hi <= lo).any():
        return 0.0, 0.0, 0, 0
    box = tuple(slice(a, b) for a, b in zip(lo, hi))
    grids = np.meshgrid(*(np.arange(a, b) - c for a, b, c in zip(lo, hi, centre)), indexing="ij")
    delta = np.stack(grids, axis=-1)
    d2 = np.einsum("...i,ij,...j->...", delta, metric, delta)
    sub, ok = x[box], ~bad[box]
    peak = ok & (d2 <= r_peak**2)
    shell = ok & (d2 > r_inner**2) & (d2 <= r_outer**2)
    return float(sub[peak].sum()), float(sub[shell].sum()), int(peak.sum()), int(shell.sum())


def sphere_integrate(
    data: ArrayLike,
    centers: ArrayLike,
    radius: float,
    bkg_inner: float,
    bkg_outer: float,
    mask: ArrayLike | None = None,
) -> PeakIntegrals:
    """Sum counts in a sphere (circle in 2D) minus the background from a spherical shell.

    Mantid's ``IntegratePeaksMD``: ``I = S_in - n_in S_shell / n_shell`` over the pixels whose
    centres lie within ``radius`` of a peak centre, with the shell ``bkg_inner < r ≤ bkg_outer``,
    and ``σ(I)² = S_in + (n_in / n_shell)² S_shell``. Pixels outside the array or masked are
    left out of both sums (``n_peak`` then says how much of the sphere was summed).

    Parameters
    ----------
    data : array_like
        Counts, a 2D frame or 3D volume (any dimension ``d``).
    centers : array_like
        Peak centres in pixel (array index) coordinates, ``n x d``.
    radius : float
        Peak radius in pixels.
    bkg_inner, bkg_outer : float
        Radii bounding the background shell, ``radius ≤ bkg_inner < bkg_outer``.
    mask : array_like of bool, optional
        ``True`` where a pixel is left out.

    Returns
    -------
    PeakIntegrals

    Raises
    ------
    ValueError
        Counts are negative or not finite, centres have the wrong shape, or the radii are out of
        order.
    """
    x, bad = _counts(data, mask, name="data")
    c = _centres(centers, x.ndim)
    radius = _positive("radius", radius)
    if not radius <= bkg_inner < bkg_outer:
        raise ValueError(f"need radius <= bkg_inner < bkg_outer: {radius=}, {bkg_inner=}, "
                         f"{bkg_outer=}")
    eye = np.eye(x.ndim)
    rows = [_region_sums(x, bad, ci, eye, radius, bkg_inner, bkg_outer) for ci in c]
    return _summed(rows, c)


def _peak_covariance(x: FloatArray, bad: BoolArray, centre: FloatArray,
                     region_radius: float) -> FloatArray | None:
    """Covariance of the counts above the local background within ``region_radius``."""
    lo = np.maximum(np.floor(centre - region_radius).astype(int), 0)
    hi = np.minimum(np.ceil(centre + region_radius).astype(int) + 1, x.shape)
    if (hi <= lo).any():
        return None
    box = tuple(slice(a, b) for a, b in zip(lo, hi))
    grids = np.meshgrid(*(np.arange(a, b) - c for a, b, c in zip(lo, hi, centre)), indexing="ij")
    delta = np.stack(grids, axis=-1)
    r = np.sqrt((delta**2).sum(-1))
    inside = ~bad[box] & (r <= region_radius)
    rim = inside & (r > 0.8 * region_radius)
    if not rim.any():
        return None
    # the rim of the region is mostly background. Its mean, not its median: the median of
    # integer counts jumps by whole counts, and the moments amplify that by ~R^(d+2). The
    # weights keep their sign: clipping them at 0 would turn background noise into spread.
    weight = np.where(inside, x[box] - x[box][rim].mean(), 0.0)
    total = weight.sum()
    if total <= 0:
        return None
    pts = delta[inside]
    w = weight[inside] / total
    mean = w @ pts
    dev = pts - mean
    cov = (dev * w[:, None]).T @ dev
    return cov if np.isfinite(cov).all() else None


def ellipsoid_integrate(
    data: ArrayLike,
    centers: ArrayLike,
    region_radius: float,
    n_sigma: float = 3.0,
    bkg_inner_scale: float = 1.0,
    bkg_outer_scale: float | None = None,
    min_sigma: float = 0.5,
    weak_threshold: float | None = None,
    mask: ArrayLike | None = None,
) -> PeakIntegrals:
    """Sum counts in an ellipsoid fitted to each peak, minus the background from an ellipsoidal shell.

    Mantid's ``IntegrateEllipsoids``: the covariance ``Σ`` of the counts above the local
    background within ``region_radius`` of the centre (background: mean of the region's outer
    fifth) gives the principal axes; the peak region is ``Δᵀ Σ⁻¹ Δ ≤ n_sigma²`` and the shell
    ``bkg_inner_scale < sqrt(Δᵀ Σ⁻¹ Δ) / n_sigma ≤ bkg_outer_scale`` (by default
    ``2^(1/d)``: a shell of the peak's volume, like Mantid's defaults in 3D). Intensity and σ(I) as in
    :func:`sphere_integrate`. Principal widths are floored at ``min_sigma`` pixels and capped at
    ``region_radius / n_sigma`` (the ellipsoid stays inside the region that measured it); where
    no count stands above the background it falls back to a sphere of radius ``region_radius``.

    The moments of a weak peak are mostly noise. With ``weak_threshold`` set, a peak whose
    ``I/σ(I)`` falls below it is integrated again with the ellipsoid of the nearest peak above
    it, as Mantid's ``IntegrateEllipsoidsTwoStep`` does.

    Parameters
    ----------
    data : array_like
        Counts, any dimension ``d``.
    centers : array_like
        Peak centres in pixel coordinates, ``n x d``.
    region_radius : float
        Radius in pixels of the neighbourhood whose counts define the ellipsoid; make it at least
        ``3 σ`` of the widest peak, or the covariance is truncated.
    n_sigma : float
        Size of the peak ellipsoid in standard deviations.
    bkg_inner_scale, bkg_outer_scale : float
        Shell bounds as multiples of the peak ellipsoid, ``1 ≤ inner < outer``; the outer one
        defaults to ``2^(1/d) bkg_inner_scale``.
    min_sigma : float
        Smallest principal width, pixels.
    weak_threshold : float, optional
        ``I/σ(I)`` below which a peak borrows the shape of the nearest stronger one; by default
        every peak keeps its own.
    mask : array_like of bool, optional
        ``True`` where a pixel is left out.

    Returns
    -------
    PeakIntegrals

    Raises
    ------
    ValueError
        Counts are negative or not finite, centres have the wrong shape, or a size is out of
        range.
    """
    x, bad = _counts(data, mask, name="data")
    c = _centres(centers, x.ndim)
    region_radius = _positive("region_radius", region_radius)
    n_sigma = _positive("n_sigma", n_sigma)
    min_sigma = _positive("min_sigma", min_sigma)
    if bkg_outer_scale is None:
        bkg_outer_scale = 2.0 ** (1.0 / x.ndim) * bkg_inner_scale
    if not 1.0 <= bkg_inner_scale < bkg_outer_scale:
        raise ValueError(f"need 1 <= bkg_inner_scale < bkg_outer_scale: {bkg_inner_scale=}, "
                         f"{bkg_outer_scale=}")
    if weak_threshold is not None:
        _positive("weak_threshold", weak_threshold)
    radii = (n_sigma, n_sigma * bkg_inner_scale, n_sigma * bkg_outer_scale)
    metrics = []
    for ci in c:
        cov = _peak_covariance(x, bad, ci, region_radius)
        if cov is None:
            cov = np.eye(x.ndim) * (region_radius / n_sigma) ** 2
        vals, vecs = np.linalg.eigh(cov)
        # no wider than the region that measured it: noise can inflate a weak peak's moments
        vals = np.clip(vals, min_sigma**2, max((region_radius / n_sigma) ** 2, min_sigma**2))
        metrics.append((vecs / vals) @ vecs.T)
    rows = [_region_sums(x, bad, ci, m, *radii) for ci, m in zip(c, metrics)]
    if weak_threshold is None or not rows:
        return _summed(rows, c)
    first = _summed(rows, c)
    with np.errstate(divide="ignore", invalid="ignore"):
        strong = np.nan_to_num(first.intensity / first.sigma) >= weak_threshold
    if strong.all() or not strong.any():
        return first
    strong_idx = np.flatnonzero(strong)
    for i in np.flatnonzero(~strong):
        nearest = strong_idx[np.argmin(((c[strong_idx] - c[i]) ** 2).sum(axis=1))]
        rows[i] = _region_sums(x, bad, c[i], metrics[nearest], *radii)
    return _summed(rows, c)


def _window_extreme(a: FloatArray, reach: int, op: np.ufunc) -> FloatArray:
    """``op`` (np.maximum or np.minimum) over the window of ``reach`` pixels either side along every
    axis, edges repeated (scipy's ``maximum_filter(a, 2 reach + 1, mode="nearest")``, to the bit):
    shifted views, one axis after another, several times faster than scipy's filter here."""
    out = a
    for axis in range(a.ndim):
        pad = [(0, 0)] * a.ndim
        pad[axis] = (reach, reach)
        padded = np.pad(out, pad, mode="edge")
        n = out.shape[axis]

        def view(k: int, padded: FloatArray = padded, axis: int = axis, n: int = n) -> FloatArray:
            return padded[(slice(None),) * axis + (slice(k, k + n),)]

        out = view(0).copy()
        for k in range(1, 2 * reach + 1):
            op(out, view(k), out=out)
    return out


def _flood(comp: BoolArray, score: FloatArray, seeds: list[BoolArray]) -> NDArray[np.int64]:
    """Watershed of ``score`` inside ``comp`` from ``seeds`` (priority flood, highest score first).

    Each pixel of ``comp`` takes the index (into ``seeds``) of the flood that reaches it first when
    the floods rise from the seeds through ever lower score, moving between neighbours (full
    connectivity) inside ``comp`` only, so every part is connected. -1 off ``comp``.
    """
    # a one-pixel border of "outside" lets every neighbour be a fixed offset in the flat array
    inside = np.pad(comp, 1).ravel()
    height = np.pad(score, 1).ravel().tolist()
    strides = np.cumprod((1,) + tuple(np.array(comp.shape[::-1]) + 2))[:-1][::-1]
    offsets = [int(np.dot(o, strides)) for o in itertools.product((-1, 0, 1), repeat=comp.ndim) if any(o)]
    part = np.full(inside.size, -1, np.int64)
    heap: list[tuple[float, int, int]] = []
    for k, seed in enumerate(seeds):
        for i in np.flatnonzero(np.pad(seed, 1).ravel() & inside).tolist():
            part[i] = k
            heap.append((-height[i], i, k))
    heapq.heapify(heap)
    free = (inside & (part < 0)).tolist()  # Python lists: the loop below reads them per pixel
    while heap:
        _, i, k = heapq.heappop(heap)
        for o in offsets:
            j = i + o
            if free[j]:
                free[j] = False
                part[j] = k
                heapq.heappush(heap, (-height[j], j, k))
    return part.reshape(np.array(comp.shape) + 2)[(slice(1, -1),) * comp.ndim]


def split_peaks(
    peak_mask: ArrayLike,
    score: ArrayLike,
    min_separation: float = 3.0,
    smoothing: float = 0.0,
) -> tuple[NDArray[np.int64], int]:
    """Label the components of a peak mask, splitting those that hold several peaks.

    Touching peaks make one component of a mask, and integrating it as one peak gives the sum of
    both to one of them and nothing to the other. The peaks' seeds are the local maxima of
    ``score`` (the segmentation's own evidence for a peak: the U-Net's logits, smooth already; give
    a noisy score some ``smoothing``) inside the mask: the largest value within ``min_separation``
    pixels along each axis and above some value there (a flat region has no top; a flat top, or
    equal tops closer than ``min_separation``, is one seed). A component with one seed, or none,
    stays whole; one with several is cut along the watershed of the score between its seeds (a
    priority flood from the seeds down the score, inside the component only), so each part is
    connected and holds one seed. Full connectivity throughout (8 neighbours in 2D, 26 in 3D).

    Parameters
    ----------
    peak_mask : array_like of bool
        ``True`` on peak pixels, any dimension.
    score : array_like
        Finite, of ``peak_mask``'s shape; larger where a peak is more likely.
    min_separation : float
        Seeds closer than this (pixels, per axis) merge; > 0.
    smoothing : float
        Gaussian sigma (pixels) applied to ``score`` first; 0 (the default) for none.

    Returns
    -------
    labels : ndarray of int64
        0 off the mask, else ``1..n``.
    n : int
        The number of peaks.

    Raises
    ------
    ValueError
        The shapes differ, the mask is not boolean, the score is not finite, or a parameter is out
        of range.
    """
    pm = np.asarray(peak_mask)
    sc = np.asarray(score, dtype=np.float64)
    if pm.dtype != np.bool_ or pm.shape != sc.shape:
        raise ValueError(f"peak_mask must be boolean and of score's shape: {pm.dtype=}, {pm.shape=}, {sc.shape=}")
    if not np.isfinite(sc[pm]).all():
        raise ValueError("score must be finite on the peak mask (NaN or inf found there)")
    _positive("min_separation", min_separation)
    if not smoothing >= 0:
        raise ValueError(f"smoothing must be >= 0 pixels: {smoothing=}")
    structure = ndimage.generate_binary_structure(pm.ndim, pm.ndim)
    labels, n = ndimage.label(pm, structure=structure)
    labels = labels.astype(np.int64)
    if n == 0:
        return labels, 0
    reach = math.ceil(min_separation)
    # off the mask the score may be anything: non-finite values there take the mask's lowest, so
    # they neither hide a top nor make one
    filled = np.where(np.isfinite(sc), sc, sc[pm].min())
    sm = ndimage.gaussian_filter(filled, smoothing) if smoothing else filled
    highest = _window_extreme(sm, reach, np.maximum)
    # a top is the highest within the window and above something in it (a flat region is no top);
    # only a component with two top pixels or more may need cutting
    maybe = (sm == highest) & pm
    several = np.flatnonzero(np.bincount(labels[maybe], minlength=n + 1)[1:] >= 2) + 1
    if not len(several):
        return labels, n
    objects = ndimage.find_objects(labels)
    out = labels.copy()
    nxt = n
    for c in several:
        box = objects[c - 1]
        assert box is not None  # labels are consecutive
        wide = tuple(slice(max(b.start - reach, 0), min(b.stop + reach, dim)) for b, dim in zip(box, pm.shape))
        comp = labels[wide] == c
        s = sm[wide]
        tops = maybe[wide] & comp & (s > _window_extreme(s, reach, np.minimum))
        # tops closer than min_separation (a flat top, or equal maxima a pixel or two apart) are one seed
        near = ndimage.binary_dilation(tops, structure, iterations=max(1, reach // 2))
        seeds = ndimage.label(near, structure=structure)[0] * tops
        ids = np.unique(seeds[seeds > 0])
        if len(ids) < 2:
            continue
        part = _flood(comp, s, [seeds == sid for sid in ids])
        region = out[wide]
        region[part > 0] = nxt + part[part > 0]  # part 0 keeps the label c
        nxt += len(ids) - 1
    if nxt == n:
        return labels, n
    # renumber so labels run 1..n in order of their first pixel, as ndimage.label numbers them
    first = np.unique(out[out > 0], return_index=True)
    order = np.argsort(first[1])
    remap = np.zeros(nxt + 1, np.int64)
    remap[first[0][order]] = np.arange(1, len(order) + 1)
    return remap[out], int(len(order))


def integrate_in_mask(
    counts: ArrayLike,
    peak_mask: ArrayLike,
    background_shell_width: float = 3.0,
    mask: ArrayLike | None = None,
    score: ArrayLike | None = None,
    min_separation: float = 3.0,
    grow_sigma: float | None = None,
    max_grow: int = 6,
) -> PeakIntegrals:
    """Integrate every connected component of a peak mask, with the background from a shell.

    The integrator of any segmentation (the Bragg U-Net, :func:`threshold_components`): each
    component (full connectivity: 8 neighbours in 2D, 26 in 3D) is summed over its *aperture*,
    and the background per pixel is the mean over the shell of pixels within
    ``background_shell_width`` (Euclidean) beyond the aperture; pixels of other components and
    masked pixels belong to neither.
    ``I = S_in - n_in S_shell / n_shell``, ``σ(I)² = S_in + (n_in / n_shell)² S_shell``.
    With a ``score`` (the U-Net's logits), components holding several peaks are first cut apart
    along the score's watershed (:func:`split_peaks`), so touching peaks are integrated apart.

    With ``grow_sigma`` (off by default) the aperture grows by a curve of growth, as in aperture
    photometry: the component, and one-pixel rings around it for as long as each ring, from the
    first, stands above the background under it by more than ``grow_sigma`` sigmas, is not brighter
    per pixel than the ring inside it (by more than ``grow_sigma`` sigmas: a peak's wings fall off
    outwards), and the rings hold at most three times the component's pixels; at least the first
    ring, at most ``max_grow``. The background under a ring, and under the final aperture, is a
    plane fitted to the shell beyond it, and only pixels no nearer another component take part, so a
    sloping background or a neighbour's tail does not pass for wings. A segmentation's mask ends
    where a peak sinks into the noise, and its wings lie beyond: summed over the mask alone
    (``grow_sigma=None``, the constant background of the shell right outside it), with that shell on
    the wings, a peak loses them twice. On probe frames of the Bragg benchmark
    (``benchmarks/detector_ml.py``'s recipes, the shipped U-Nets' masks), ``R = sum|I - I_true| /
    sum I_true`` by true ``I/σ`` (0-5 / 5-10 / 10-30 / over 30), mask alone against aperture: 2D
    seed 777 (120 frames) 0.691 / 0.290 / 0.239 / 0.197 against 0.668 / 0.265 / 0.200 / 0.110, seed
    783 0.784 / 0.331 / 0.282 / 0.165 against 0.785 / 0.312 / 0.251 / 0.058; time-of-flight seeds
    778, 779, 780 (60 volumes each) 0.926 / 0.630 / 0.245 / 0.170 against 0.924 / 0.598 / 0.211 /
    0.090, 0.973 / 0.498 / 0.306 / 0.212 against 0.981 / 0.449 / 0.348 / 0.124, 0.985 / 0.548 /
    0.247 / 0.215 against 0.978 / 0.508 / 0.177 / 0.140. The weakest peaks gain nothing: most of
    their error is peaks the mask misses. Growth costs noise where there is nothing to gain: on
    background alone, a 3 x 3 mask's ``σ(I)`` is about 1.6 times the mask-only one (the first ring),
    and the mean stays within its standard error of 0.

    Parameters
    ----------
    counts : array_like
        Counts, any dimension.
    peak_mask : array_like of bool
        ``True`` on peak pixels, of ``counts``' shape.
    background_shell_width : float
        Shell width in pixels.
    mask : array_like of bool, optional
        ``True`` where a pixel is left out (it is also dropped from the peaks).
    score : array_like, optional
        Evidence for a peak per pixel, of ``counts``' shape: split touching peaks by it.
    min_separation : float
        With ``score``: seeds closer than this (pixels) are one peak (:func:`split_peaks`).
    grow_sigma : float or None
        Significance (Poisson sigmas) a ring's excess needs to join the aperture (2 is a good
        choice); ``None`` (the default): the aperture is the component alone. On the detector
        benchmark's frames (2D and TOF) the curve of growth halved ``R`` of the peaks with
        ``I/σ`` over 30 and cut it by a fifth at 10-30, left the weakest no better (2D) or
        worse (TOF: 0.99 to 1.14 below ``I/σ`` 5), and about doubled the Bragg agent's time a
        frame (30-60 peaks at 512 x 512: 10.7 frames/s with it, 17.7-20.3 without, in benchmark
        runs a day apart), so it stays a choice.
    max_grow : int
        Most rings of the aperture beyond the component (>= 1).

    Returns
    -------
    PeakIntegrals
        Peaks in label order, with ``labels`` (the components; ``n_peak`` counts the apertures'
        pixels); centroids over each component, weighted by the counts above its background
        (unweighted where none are above it, or the shell is empty).

    Raises
    ------
    ValueError
        Counts are negative or not finite, a mask does not match, or the width, ``grow_sigma`` or
        ``max_grow`` is not positive.
    """
    x, bad = _counts(counts, mask)
    pm = np.asarray(peak_mask)
    if pm.dtype != np.bool_ or pm.shape != x.shape:
        raise ValueError(f"peak_mask must be boolean and of counts' shape: {pm.dtype=}, "
                         f"{pm.shape=}, {x.shape=}")
    width = _positive("background_shell_width", background_shell_width)
    grow = None if grow_sigma is None else _positive("grow_sigma", grow_sigma)
    if isinstance(max_grow, bool) or not isinstance(max_grow, int | np.integer) or max_grow < 1:
        raise ValueError(f"max_grow must be an integer >= 1 (rings of pixels): {max_grow=}")
    pm = pm & ~bad
    if score is None:
        structure = ndimage.generate_binary_structure(x.ndim, x.ndim)
        labels, n = ndimage.label(pm, structure=structure)
        labels = labels.astype(np.int64)
    else:
        sc = np.asarray(score)
        if sc.shape != x.shape:
            raise ValueError(f"score must be of counts' shape: {sc.shape=}, {x.shape=}")
        labels, n = split_peaks(pm, sc, min_separation)
    pad = math.ceil(width) + (0 if grow is None else max_grow)
    rows = []
    under: list[float] = []
    centroids: list[FloatArray] = []
    for i, sl in enumerate(ndimage.find_objects(labels), start=1):
        assert sl is not None  # labels are consecutive
        box = tuple(slice(max(s.start - pad, 0), min(s.stop + pad, dim))
                    for s, dim in zip(sl, x.shape))
        comp = labels[box] == i
        dist = ndimage.distance_transform_edt(~comp)
        free = ~pm[box] & ~bad[box]
        if grow is not None:
            # the peak's own ground: pixels no nearer another component, so that neither its
            # rings nor its shell reach into a neighbour's wings
            others = (labels[box] > 0) & ~comp
            if others.any():
                free &= dist <= ndimage.distance_transform_edt(~others)
        sub = x[box]
        coords = np.indices(sub.shape, dtype=np.float64) if grow is not None else np.empty(0)
        rings = 0 if grow is None else _aperture_rings(sub, dist, free, width, grow, max_grow, coords)
        aperture = comp | ((dist > 0) & (dist <= rings) & free)
        shell = (dist > rings) & (dist <= rings + width) & free
        outer = sub[shell]
        rows.append((float(sub[aperture].sum()), float(outer.sum()), int(aperture.sum()), int(shell.sum())))
        # with growth, the background under the aperture is the shell's plane (it may slope)
        under.append(_plane_sum(sub, shell, aperture, coords) if grow is not None and outer.size else math.nan)
        # the centroid weighted by the counts above the background (the centre of mass of the
        # peak, not of its mask: a part cut from a component is lopsided); unweighted where
        # nothing stands above the background or there is no shell
        at = np.array(np.nonzero(comp), dtype=np.float64) + np.array([b.start for b in box])[:, None]
        w = np.maximum(sub[comp] - outer.mean(), 0.0) if outer.size else np.zeros(0)
        centroids.append(at @ w / w.sum() if w.sum() > 0 else at.mean(axis=1))
    return _summed(rows, np.array(centroids, dtype=np.float64).reshape(n, x.ndim), labels,
                   None if grow is None else np.array(under, dtype=np.float64))


#: The rings of a curve-of-growth aperture hold at most this many times the component's pixels:
#: a structured background (a blob, a ring) under a peak otherwise passes for ever wider wings.
_MAX_RING_SHARE = 3


def _plane_sum(sub: FloatArray, shell: BoolArray, where: BoolArray, coords: FloatArray) -> float:
    """The background a shell says lies under ``where``: a plane (linear in every axis) fitted to
    the shell's counts by least squares, summed over ``where``; the shell's mean where it has too
    few pixels to fix a plane. A background that slopes across a peak (a neighbour's tail, the
    structure of the frame) then neither hides nor feeds a wide aperture. ``coords`` holds each
    pixel's coordinates (``np.indices(sub.shape)``)."""
    n_where = int(where.sum())
    values = sub[shell]
    mean = float(values.mean())
    if values.size < 4 * (sub.ndim + 1):
        return n_where * mean
    at = coords[:, shell]
    centre = at.mean(axis=1, keepdims=True)
    at = at - centre
    try:  # the normal equations of the centred fit: the intercept is the mean
        slope = np.linalg.solve(at @ at.T, at @ (values - mean))
    except np.linalg.LinAlgError:  # the shell's pixels on a line or a plane: no slope to fit
        return n_where * mean
    return float(n_where * mean + slope @ (coords[:, where] - centre).sum(axis=1))


def _aperture_rings(sub: FloatArray, dist: FloatArray, free: BoolArray, width: float, z: float,
                    most: int, coords: FloatArray) -> int:
    """Rings of pixels (distances ``(k - 1, k]`` from the component, ``k = 1..most``) in the
    aperture: as many as there are, from the first, whose counts each exceed the background the
    shell beyond them says lies under them (:func:`_plane_sum`) by more than ``z`` sigmas, none
    of them brighter per pixel than the ring inside it by more than ``z`` sigmas, and all of
    them holding at most ``_MAX_RING_SHARE`` times the component's pixels; at least one
    (:func:`integrate_in_mask`)."""
    rings = 0
    n_comp, grown = int((dist == 0).sum()), 0
    last, last_var = math.inf, 0.0  # the previous ring's excess per pixel, and its variance
    while rings < most:
        ring = (dist > rings) & (dist <= rings + 1) & free
        shell = (dist > rings + 1) & (dist <= rings + 1 + width) & free
        if not ring.any() or not shell.any():
            break
        n_ring, n_shell = int(ring.sum()), int(shell.sum())
        total, beyond = float(sub[ring].sum()), float(sub[shell].sum())
        excess = total - _plane_sum(sub, shell, ring, coords)
        variance = max(total + (n_ring / n_shell) ** 2 * beyond, 1.0)
        per_pixel, per_pixel_var = excess / n_ring, variance / n_ring**2
        # not significant, or significantly brighter than the ring inside it (a peak's wings fall
        # off outwards: what rises is a neighbour or the background's structure)
        if excess <= z * math.sqrt(variance) or per_pixel - last > z * math.sqrt(per_pixel_var + last_var):
            break
        if grown + n_ring > _MAX_RING_SHARE * n_comp:
            break
        grown += n_ring  # the rings are disjoint: their pixels add up
        last, last_var = per_pixel, per_pixel_var
        rings += 1
    return max(rings, 1)


def threshold_components(
    frame: ArrayLike,
    threshold: float = 5.0,
    background: Literal["median", "percentile"] = "median",
    size: int = 15,
    percentile: float = 50.0,
    min_pixels: int = 3,
    dilate: int = 1,
    background_shell_width: float = 3.0,
    mask: ArrayLike | None = None,
) -> tuple[BoolArray, PeakIntegrals]:
    """Find peaks by thresholding above the background, then integrate each component.

    The background ``b`` is a median filter of width ``size`` (wider than the peaks) or one
    percentile of the frame; a pixel is a peak pixel when ``counts > b + k sqrt(max(b, 1))``
    (Poisson noise, floored at one count so an empty background does not let single counts
    through). Components (full connectivity) smaller than ``min_pixels`` are dropped, the rest
    are grown by ``dilate`` pixels to take in the peaks' tails, and each is integrated by
    :func:`integrate_in_mask` — the same integrator as the U-Net's.

    Parameters
    ----------
    frame : array_like
        Counts, any dimension.
    threshold : float
        ``k``, the threshold in Poisson standard deviations.
    background : {"median", "percentile"}
        How ``b`` is estimated.
    size : int
        Median filter width in pixels.
    percentile : float
        Percentile for ``background="percentile"``.
    min_pixels : int
        Smallest component kept, pixels (before dilation).
    dilate : int
        Dilation of the kept components, pixels (0: none).
    background_shell_width : float
        Passed to :func:`integrate_in_mask`.
    mask : array_like of bool, optional
        ``True`` where a pixel is left out.

    Returns
    -------
    peak_mask : ndarray of bool
        The peak pixels, of ``frame``'s shape.
    integrals : PeakIntegrals
        One entry per component of ``peak_mask``.

    Raises
    ------
    ValueError
        Counts are negative or not finite, or a parameter is out of range.
    """
    x, bad = _counts(frame, mask, name="frame")
    _positive("threshold", threshold)
    if size < 1 or min_pixels < 1 or dilate < 0 or not 0 <= percentile <= 100:
        raise ValueError(f"need size >= 1, min_pixels >= 1, dilate >= 0, 0 <= percentile <= 100: "
                         f"{size=}, {min_pixels=}, {dilate=}, {percentile=}")
    if background == "median":
        # masked pixels take the frame's median so gaps do not pull the local background down
        filled = np.where(bad, np.median(x[~bad]), x)
        b = ndimage.median_filter(filled, size=size, mode="reflect")
    elif background == "percentile":
        b = np.full_like(x, np.percentile(x[~bad], percentile))
    else:
        raise ValueError(f"background must be 'median' or 'percentile': {background=}")
    hot = (x > b + threshold * np.sqrt(np.maximum(b, 1.0))) & ~bad
    structure = ndimage.generate_binary_structure(x.ndim, x.ndim)
    labels, n = ndimage.label(hot, structure=structure)
    sizes = np.bincount(labels.ravel(), minlength=n + 1)
    keep = sizes >= min_pixels
    keep[0] = False
    peaks = keep[labels]
    if dilate:
        peaks = ndimage.binary_dilation(peaks, structure, iterations=dilate) & ~bad
    return peaks, integrate_in_mask(x, peaks, background_shell_width, bad)


# --------------------------------------------------------------------------------------------
# super-resolution


def _factor(factor: int) -> int:
    if isinstance(factor, bool) or not isinstance(factor, int | np.integer) or factor < 1:
        raise ValueError(f"factor must be a positive integer: {factor=}")
    return int(factor)


def rebin(fine: ArrayLike, factor: int) -> FloatArray:
    """Sum ``factor``-sided blocks of pixels: the coarse detector that sees the same photons.

    Raises
    ------
    ValueError
        A side is not a multiple of ``factor``.
    """
    f = _factor(factor)
    x = np.asarray(fine, dtype=np.float64)
    if any(n % f for n in x.shape):
        raise ValueError(f"every side must be a multiple of {factor=}: {x.shape=}")
    shape = [v for n in x.shape for v in (n // f, f)]
    return x.reshape(shape).sum(axis=tuple(range(1, 2 * x.ndim, 2)))


def bicubic_upsample(
    coarse: ArrayLike,
    factor: int,
    space: Literal["linear", "log"] = "linear",
    floor: float | None = None,
) -> FloatArray:
    """Upsample an intensity image by cubic-spline interpolation, conserving counts per pixel area.

    ``fine = zoom(coarse, factor, order=3) / factor^d`` with pixel-edge alignment
    (``grid_mode=True``): each coarse pixel becomes ``factor^d`` fine pixels whose intensities
    sum, approximately, to the coarse one (exactly for a locally linear image). This is scipy's
    order-3 B-spline interpolation, the usual stand-in for bicubic. With ``space="log"`` the
    interpolation runs on ``log(coarse + floor)`` and the result is ``exp(...) - floor``, scaled
    the same way: better for patterns spanning decades, such as SANS, but the total is then only
    approximately conserved. Linear-space results can undershoot below 0 next to sharp edges;
    they are returned as they are, not clipped.

    Parameters
    ----------
    coarse : array_like
        Non-negative intensities, any dimension ``d``.
    factor : int
        Upsampling factor per axis.
    space : {"linear", "log"}
        Where to interpolate.
    floor : float, optional
        Offset of the log (``space="log"``); by default half the smallest positive intensity.

    Returns
    -------
    ndarray
        ``factor`` times larger along every axis.

    Raises
    ------
    ValueError
        Intensities are negative or not finite, or ``factor``, ``space`` or ``floor`` is invalid.
    """
    x, _ = _counts(coarse, None, name="coarse")
    f = _factor(factor)
    scale = float(f**x.ndim)

    def zoom(a: FloatArray) -> FloatArray:
        return ndimage.zoom(a, f, order=3, mode="reflect", grid_mode=True)

    if space == "linear":
        return zoom(x) / scale
    if space != "log":
        raise ValueError(f"space must be 'linear' or 'log': {space=}")
    if floor is None:
        positive = x[x > 0]
        if positive.size == 0:
            return np.zeros([n * f for n in x.shape])
        floor = 0.5 * float(positive.min())
    floor = _positive("floor", floor)
    return (np.exp(zoom(np.log(x + floor))) - floor) / scale

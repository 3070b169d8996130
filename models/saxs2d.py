"""2D SAXS frames of an oriented ring, and their reduction to mapped quantities.

A block-copolymer film (lamellae or cylinders) scatters into a ring at ``q* = 2π / d`` of its
domain spacing ``d``. In a grain the domains share an orientation, so the ring is brighter along
one azimuth. On a flat detector, small angle, with the beam at the frame centre, the expected
count rate of a pixel at scattering vector ``q`` and azimuth ``χ`` is

    ``rate(q, χ) = A exp(-(q - q*)² / (2 w²)) (1 + a cos 2(χ - θ)) + b``

with ``A = intensity / Z(q*, w)``: ``intensity`` is the ring's whole count rate (counts/s over
the full, unclipped circle), ``Z`` the number of pixels a unit-amplitude ring covers
(:func:`ring_pixels`), ``a`` in ``[0, 1)`` the anisotropy, ``θ`` the orientation (the azimuth of
maximum intensity) and ``b`` a flat background per pixel. ``(a cos 2θ, a sin 2θ)`` is the
2D nematic order vector: unlike ``θ``, which wraps at 180°, it varies continuously across a map.

:func:`reduce_frame` inverts this for one frame of Poisson counts: a maximum-likelihood fit of
the azimuthally integrated radial profile (Gaussian peak + flat background), then a linear fit of
the pixels in an annulus around the peak to ``g(q) [1, cos 2χ, sin 2χ]``, with 1-sigma
uncertainties from the Fisher information and the delta method.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import cached_property
from typing import Any

import numpy as np
from scipy.optimize import least_squares
from scipy.special import erf, xlogy

from models.errors import ModelError

__all__ = [
    "REDUCED_NAMES",
    "DetectorGeometry",
    "ReducedFrame",
    "ReductionError",
    "reduce_frame",
    "ring_intensity",
    "ring_pixels",
]

#: Keys of :attr:`ReducedFrame.values` and :attr:`ReducedFrame.sigmas`.
REDUCED_NAMES: tuple[str, ...] = (
    "peak_q", "width", "intensity", "orientation", "anisotropy", "order_x", "order_y", "background",
)

#: Significance (peak amplitude / its sigma) below which a frame has no ring.
_MIN_SIGNIFICANCE = 5.0
#: Significance of the largest 3-bin radial excess needed to start a fit (a coarser, weaker
#: statistic than the fit's: the fit's own 5-sigma test is the one that decides).
_MIN_CANDIDATE = 4.0
#: Half-width of the annulus of the azimuthal fit, in peak widths.
_ANNULUS_HALF_WIDTH = 2.0
#: Below this |deviance residual| its derivative takes the Pearson limit, avoiding 0/0.
_SMALL_RESIDUAL = 1e-6


class ReductionError(ModelError, ValueError):
    """A frame cannot be reduced: bad shape, dtype or values, bad exposure, or no ring in it."""


@dataclass(frozen=True)
class DetectorGeometry:
    """A square area detector with the direct beam at its centre, in the small-angle limit.

    Pixel ``[iy, ix]`` sits at ``(x, y) = (ix - (n-1)/2, iy - (n-1)/2)`` pixels from the beam;
    its ``q = r * q_max / (n/2)`` (``r = hypot(x, y)``, so ``q = q_max`` at the middle of an
    edge) and its azimuth ``χ = atan2(y, x)``, from the +x (column) axis toward +y (rows).

    Parameters
    ----------
    n_pixels : int
        Pixels along each side (>= 8, even or odd).
    q_max : float
        ``q`` (1/Å) at the middle of the frame's edge, > 0.

    Examples
    --------
    >>> g = DetectorGeometry(n_pixels=64, q_max=0.08)
    >>> g.q.shape, g.pixel_q
    ((64, 64), 0.0025)
    """

    n_pixels: int = 64
    q_max: float = 0.08

    def __post_init__(self) -> None:
        n = self.n_pixels
        if isinstance(n, bool) or not isinstance(n, int | np.integer) or n < 8:
            raise ValueError(f"n_pixels must be an int >= 8; got {n!r}")
        if not (isinstance(self.q_max, int | float) and math.isfinite(self.q_max)
                and self.q_max > 0):
            raise ValueError(f"q_max must be a finite number > 0 (1/Å); got {self.q_max!r}")
        object.__setattr__(self, "n_pixels", int(n))
        object.__setattr__(self, "q_max", float(self.q_max))

    @property
    def shape(self) -> tuple[int, int]:
        """Frame shape ``(n_pixels, n_pixels)``."""
        return (self.n_pixels, self.n_pixels)

    @property
    def pixel_q(self) -> float:
        """``q`` step of one pixel (1/Å): ``q_max / (n_pixels / 2)``."""
        return self.q_max / (self.n_pixels / 2.0)

    @cached_property
    def _offsets(self) -> tuple[np.ndarray, np.ndarray]:
        centre = (self.n_pixels - 1) / 2.0
        offset = np.arange(self.n_pixels, dtype=np.float64) - centre
        y, x = np.meshgrid(offset, offset, indexing="ij")
        return x, y

    @cached_property
    def q(self) -> np.ndarray:
        """Scattering vector of each pixel (1/Å), `n x n`, read-only."""
        x, y = self._offsets
        return _read_only(np.hypot(x, y) * self.pixel_q)

    @cached_property
    def chi(self) -> np.ndarray:
        """Azimuth of each pixel (radians, in ``(-π, π]``), `n x n`, read-only."""
        x, y = self._offsets
        return _read_only(np.arctan2(y, x))

    @cached_property
    def _radial(self) -> _RadialBins:
        return _RadialBins.build(self)


@dataclass(frozen=True)
class _RadialBins:
    """One-pixel-wide radial bins; each is a union of 90°-rotation orbits of pixels, so
    ``cos 2χ`` and ``sin 2χ`` sum to zero over it and the anisotropy drops out of bin sums."""

    index: np.ndarray  # bin of each pixel, `n*n`
    n_bins: int
    n_pix: np.ndarray  # pixels per bin
    q_mean: np.ndarray  # mean q of each bin's pixels
    q_flat: np.ndarray
    cos2: np.ndarray
    sin2: np.ndarray

    @classmethod
    def build(cls, geometry: DetectorGeometry) -> _RadialBins:
        q_flat = geometry.q.ravel()
        index = np.floor(q_flat / geometry.pixel_q).astype(np.intp)
        n_bins = int(index.max()) + 1
        n_pix = np.bincount(index, minlength=n_bins).astype(np.float64)
        q_mean = np.bincount(index, weights=q_flat, minlength=n_bins) / n_pix
        chi = geometry.chi.ravel()
        return cls(index, n_bins, n_pix, q_mean, q_flat, np.cos(2 * chi), np.sin(2 * chi))

    def sums(self, values: np.ndarray) -> np.ndarray:
        return np.bincount(self.index, weights=values, minlength=self.n_bins)


def _read_only(arr: np.ndarray) -> np.ndarray:
    arr.setflags(write=False)
    return arr


def ring_pixels(geometry: DetectorGeometry, peak_q: float, width: float) -> float:
    """Pixels covered by a unit-amplitude ring: ``Z = ∫ 2π q g(q) dq / Δq²`` over ``q >= 0``.

    ``g(q) = exp(-(q - q*)² / (2 w²))`` and ``Δq`` is :attr:`DetectorGeometry.pixel_q`; in
    closed form ``Z = 2π (w q* P(q*/w) + w² exp(-q*²/(2w²))) / Δq²``,
    ``P(c) = sqrt(π/2) (1 + erf(c/√2))``. The ring's whole count rate is ``A Z``.
    """
    return float(_ring_pixels_and_grad(geometry, peak_q, width)[0])


def _ring_pixels_and_grad(
    geometry: DetectorGeometry, peak_q: float, width: float
) -> tuple[float, float, float]:
    """``Z`` and its derivatives by ``q*`` and ``w`` (see :func:`ring_pixels`)."""
    c = peak_q / width
    p = math.sqrt(math.pi / 2.0) * (1.0 + float(erf(c / math.sqrt(2.0))))
    e = math.exp(-0.5 * c * c)
    k = 2.0 * math.pi / geometry.pixel_q**2
    z = k * (width * peak_q * p + width * width * e)
    return z, k * width * p, k * (peak_q * p + 2.0 * width * e)


def ring_intensity(
    geometry: DetectorGeometry,
    *,
    peak_q: float,
    width: float,
    intensity: float,
    orientation_deg: float,
    anisotropy: float,
    background: float,
) -> np.ndarray:
    """Expected count rate of each pixel (counts/s) of an oriented ring over flat background.

    ``rate = intensity / Z exp(-(q - q*)² / (2 w²)) (1 + a cos 2(χ - θ)) + b``, with ``Z`` from
    :func:`ring_pixels`.

    Parameters
    ----------
    geometry : DetectorGeometry
        The detector.
    peak_q : float
        Ring position ``q*`` (1/Å), > 0.
    width : float
        Gaussian radial sigma ``w`` (1/Å), > 0.
    intensity : float
        The ring's whole count rate (counts/s, over the full circle), >= 0.
    orientation_deg : float
        Azimuth ``θ`` of maximum intensity (degrees; any value, it has period 180).
    anisotropy : float
        Azimuthal modulation ``a`` in ``[0, 1)``.
    background : float
        Flat background ``b`` (counts/s per pixel), >= 0.

    Returns
    -------
    np.ndarray
        Count rate per pixel, `n x n`.

    Raises
    ------
    ValueError
        If a parameter is not a finite scalar in its range.

    Examples
    --------
    >>> g = DetectorGeometry()
    >>> rate = ring_intensity(g, peak_q=0.04, width=0.004, intensity=1e4, orientation_deg=30.0,
    ...                       anisotropy=0.5, background=0.0)
    >>> round(float(rate.sum()) / 1e4, 2)
    1.0
    """
    if not isinstance(geometry, DetectorGeometry):
        raise TypeError(f"geometry must be a DetectorGeometry; got {type(geometry).__name__}")
    values = {
        "peak_q": peak_q, "width": width, "intensity": intensity,
        "orientation_deg": orientation_deg, "anisotropy": anisotropy, "background": background,
    }
    for name, value in values.items():
        if np.ndim(value) != 0 or not np.isfinite(value):
            raise ValueError(f"{name} must be a finite scalar; got {name}={value!r}")
    if not (peak_q > 0 and width > 0):
        raise ValueError(f"peak_q and width must be > 0 (1/Å); got {peak_q=}, {width=}")
    if not (intensity >= 0 and background >= 0):
        raise ValueError(f"intensity and background must be >= 0; got {intensity=}, {background=}")
    if not 0.0 <= anisotropy < 1.0:
        raise ValueError(f"anisotropy must be in [0, 1) so rates stay >= 0; got {anisotropy=}")
    amplitude = float(intensity) / ring_pixels(geometry, float(peak_q), float(width))
    radial = np.exp(-0.5 * ((geometry.q - peak_q) / width) ** 2)
    azimuthal = 1.0 + anisotropy * np.cos(2.0 * (geometry.chi - np.deg2rad(orientation_deg)))
    return amplitude * radial * azimuthal + background


@dataclass(frozen=True)
class ReducedFrame:
    """Quantities of one reduced frame and their 1-sigma uncertainties.

    Attributes
    ----------
    values : dict[str, float]
        :data:`REDUCED_NAMES`: ``peak_q``, ``width`` (1/Å), ``intensity`` (counts/s),
        ``orientation`` (degrees in ``[0, 180)``), ``anisotropy``, ``order_x``, ``order_y``
        (``a cos 2θ``, ``a sin 2θ``) and ``background`` (counts/s per pixel).
    sigmas : dict[str, float]
        The same keys: 1-sigma uncertainties (``inf`` where undefined, e.g. the orientation
        of an exactly isotropic ring).

    Notes
    -----
    Plain dicts (copied on construction) so they serialise into documents as they are.
    """

    values: dict[str, float]
    sigmas: dict[str, float]

    def __post_init__(self) -> None:
        values = {str(k): float(v) for k, v in self.values.items()}
        sigmas = {str(k): float(v) for k, v in self.sigmas.items()}
        if set(values) != set(sigmas):
            raise ValueError(f"values and sigmas need the same keys; got {sorted(values)} "
                             f"and {sorted(sigmas)}")
        object.__setattr__(self, "values", values)
        object.__setattr__(self, "sigmas", sigmas)


def reduce_frame(counts: Any, exposure: float, geometry: DetectorGeometry) -> ReducedFrame:
    """Ring position, width, intensity and orientation of one frame of Poisson counts.

    1. Radial profile: counts summed in one-pixel-wide rings, ``S_k``; the anisotropy cancels
       in these sums (see :class:`DetectorGeometry`'s binning).
    2. Maximum-likelihood fit of ``E[S_k] = t sum_{p in k} (A g(q_p) + b)`` (minimum Poisson
       deviance, :func:`scipy.optimize.least_squares`); covariance ``inv(J^T diag(1/E[S]) J)``.
    3. Linear weighted least squares of the background-subtracted pixels with
       ``|q - q*| <= 2 w`` on ``t A g(q) [1, cos 2χ, sin 2χ]``, giving ``(β0, β1, β2)``; then
       ``order_x = β1/β0``, ``order_y = β2/β0``, ``a = hypot(order_x, order_y)``,
       ``θ = atan2(order_y, order_x) / 2``, with uncertainties by the delta method.

    Parameters
    ----------
    counts : array_like
        Counts, `n x n` (``geometry.shape``), real, finite and >= 0 (float or int dtype).
    exposure : float
        Counting time (s), > 0.
    geometry : DetectorGeometry
        The detector the frame was taken on.

    Returns
    -------
    ReducedFrame
        Values and 1-sigma uncertainties of :data:`REDUCED_NAMES`.

    Raises
    ------
    ReductionError
        On a wrong shape or dtype, NaN, infinite or negative counts, a bad exposure, or a frame
        with no ring (amplitude under 5 sigma, or a fit outside the frame).

    Examples
    --------
    >>> g = DetectorGeometry()
    >>> rate = ring_intensity(g, peak_q=0.04, width=0.004, intensity=2e4, orientation_deg=30.0,
    ...                       anisotropy=0.5, background=1.0)
    >>> frame = np.random.default_rng(0).poisson(rate * 2.0)
    >>> r = reduce_frame(frame, 2.0, g)
    >>> abs(r.values["peak_q"] - 0.04) < 4 * r.sigmas["peak_q"]
    True
    """
    if not isinstance(geometry, DetectorGeometry):
        raise TypeError(f"geometry must be a DetectorGeometry; got {type(geometry).__name__}")
    frame = _check_frame(counts, geometry)
    t = _check_exposure(exposure)
    bins = geometry._radial
    c_flat = frame.ravel()
    peak, cov = _fit_radial(bins, c_flat, t, geometry)
    values, sigmas = _radial_quantities(peak, cov, geometry)
    values_az, sigmas_az = _fit_azimuthal(bins, c_flat, t, peak)
    values, sigmas = {**values, **values_az}, {**sigmas, **sigmas_az}
    return ReducedFrame({k: values[k] for k in REDUCED_NAMES},
                        {k: sigmas[k] for k in REDUCED_NAMES})


def _check_frame(counts: Any, geometry: DetectorGeometry) -> np.ndarray:
    arr = np.asarray(counts)
    if arr.dtype == np.bool_ or arr.dtype.kind not in "iuf":
        raise ReductionError(
            f"counts must have an int or float dtype; got {arr.dtype=}: pass the raw counts"
        )
    if arr.shape != geometry.shape:
        raise ReductionError(
            f"counts must be a {geometry.shape} frame for this geometry; got {arr.shape=}: "
            "use the DetectorGeometry the frame was taken with"
        )
    frame = arr.astype(np.float64, copy=False)
    n_bad = int(np.count_nonzero(~np.isfinite(frame)))
    if n_bad:
        raise ReductionError(
            f"counts has {n_bad} NaN or infinite pixels (a lost frame?): discard it and re-take it"
        )
    n_neg = int(np.count_nonzero(frame < 0))
    if n_neg:
        raise ReductionError(
            f"counts has {n_neg} negative pixels (min {frame.min()}): reduce raw counts, "
            "not background-subtracted data"
        )
    return frame


def _check_exposure(exposure: Any) -> float:
    if np.ndim(exposure) != 0 or isinstance(exposure, bool):
        raise ReductionError(f"exposure must be a scalar (s); got {exposure!r}")
    t = float(exposure)
    if not (math.isfinite(t) and t > 0):
        raise ReductionError(f"exposure must be finite and > 0 s; got {exposure=}: "
                             "pass the counting time of the frame")
    return t


@dataclass(frozen=True)
class _Peak:
    q0: float
    w: float
    amplitude: float
    background: float


def _fit_radial(
    bins: _RadialBins, c_flat: np.ndarray, t: float, geometry: DetectorGeometry
) -> tuple[_Peak, np.ndarray]:
    """ML fit of the radial profile; covariance of ``(q0, w, A, b)`` in natural units."""
    s = bins.sums(c_flat)
    x0 = _initial_guess(bins, s, t, geometry)
    q = bins.q_flat

    def model_and_jac(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        q0, w, amp, bg = x[0], math.exp(x[1]), math.exp(x[2]), math.exp(x[3])
        u = (q - q0) / w
        g = np.exp(-0.5 * u * u)
        g_sum = bins.sums(g)
        d_q0 = bins.sums(g * u) / w  # d g / d q0
        d_logw = bins.sums(g * u * u)  # d g / d log w
        mu = t * (amp * g_sum + bg * bins.n_pix)
        # Columns: d mu / d (q0, log w, log A, log b).
        jac = t * np.column_stack((amp * d_q0, amp * d_logw, amp * g_sum, bg * bins.n_pix))
        return mu, jac

    def residuals(x: np.ndarray) -> np.ndarray:
        return _deviance_residuals(s, model_and_jac(x)[0])

    def jacobian(x: np.ndarray) -> np.ndarray:
        mu, jac = model_and_jac(x)
        r = _deviance_residuals(s, mu)
        small = np.abs(r) < _SMALL_RESIDUAL
        # d r / d mu = (1 - S/mu) / r, whose limit at S = mu is -1/sqrt(mu).
        factor = np.where(small, -1.0 / np.sqrt(mu), (1.0 - s / mu) / np.where(small, 1.0, r))
        return jac * factor[:, None]

    # On noise alone the fit may wander off (w -> 0, A -> 0) and overflow: that is no ring,
    # found by the checks below, not a numerical warning.
    with np.errstate(all="ignore"):
        try:
            sol = least_squares(residuals, x0, jac=jacobian, method="lm", xtol=1e-8, ftol=1e-8)
        except ValueError as exc:
            raise ReductionError(f"radial fit failed ({exc}); no usable ring in the frame") from exc
        x = sol.x
        if not np.all(np.isfinite(x)) or np.any(np.abs(x[1:]) > 700):
            raise ReductionError(f"radial fit diverged ({x=}); no usable ring in the frame")
        peak = _Peak(float(x[0]), math.exp(x[1]), math.exp(x[2]), math.exp(x[3]))
        mu, jac_log = model_and_jac(x)
        jac = jac_log / np.array([1.0, peak.w, peak.amplitude, peak.background])  # natural units
        cov = _inverse_information(jac, mu)
    _check_ring(peak, cov, geometry)
    return peak, cov


def _deviance_residuals(s: np.ndarray, mu: np.ndarray) -> np.ndarray:
    """``sign(S - mu) sqrt(2 (mu - S + S log(S/mu)))``: their squares sum to the deviance."""
    dev = 2.0 * (mu - s + xlogy(s, s) - xlogy(s, mu))
    return np.sign(s - mu) * np.sqrt(np.maximum(dev, 0.0))


def _inverse_information(jac: np.ndarray, mu: np.ndarray) -> np.ndarray:
    info = jac.T @ (jac / mu[:, None])
    scale = np.sqrt(np.diag(info))
    if not (np.all(np.isfinite(info)) and np.all(scale > 0)):
        raise ReductionError(
            "radial fit has an unidentified parameter; no usable ring in the frame"
        )
    return np.linalg.pinv(info / np.outer(scale, scale)) / np.outer(scale, scale)


def _initial_guess(
    bins: _RadialBins, s: np.ndarray, t: float, geometry: DetectorGeometry
) -> np.ndarray:
    """Start values ``(q0, log w, log A, log b)``, or ReductionError if no bump stands out."""
    big = bins.n_pix >= 8
    mean = s / (t * bins.n_pix)
    bg = max(float(np.median(mean[big])), 0.1 / (t * bins.n_pix.max()))
    # Excess over background, in a 3-bin window, in units of its Poisson sigma.
    excess = np.convolve(s - t * bg * bins.n_pix, np.ones(3), mode="same")
    expected = np.convolve(t * bg * bins.n_pix, np.ones(3), mode="same")
    z = excess / np.sqrt(expected + 1.0)
    k = int(np.argmax(z))
    if z[k] < _MIN_CANDIDATE:
        raise ReductionError(
            f"no ring found: the largest radial excess is {z[k]:.1f} sigma (< "
            f"{_MIN_CANDIDATE:g}); count longer (raise the exposure, now {t} s) or check the "
            "sample is in the beam"
        )
    amp = max(float(mean[k] - bg), 1e-3 * bg + 1e-12)
    near = np.abs(np.arange(bins.n_bins) - k) <= 6
    area = float(np.sum(np.clip(mean[near] - bg, 0.0, None))) * geometry.pixel_q
    w = float(np.clip(area / (amp * math.sqrt(2 * math.pi)), 0.5 * geometry.pixel_q,
                      0.3 * bins.q_mean[k]))
    return np.array([bins.q_mean[k], math.log(w), math.log(amp), math.log(bg)])


def _check_ring(peak: _Peak, cov: np.ndarray, geometry: DetectorGeometry) -> None:
    sigma_amp = math.sqrt(cov[2, 2])
    q_edge = geometry.q_max * math.sqrt(2.0)
    if not (geometry.pixel_q < peak.q0 < q_edge and 0.1 * geometry.pixel_q < peak.w < peak.q0):
        raise ReductionError(
            f"no ring found: the radial fit went to peak_q={peak.q0:.4g}, width={peak.w:.3g} "
            f"1/Å; a ring needs {geometry.pixel_q:.3g} < peak_q < {q_edge:.3g} and "
            f"{0.1 * geometry.pixel_q:.2g} < width < peak_q; count longer or check the geometry"
        )
    if not peak.amplitude > _MIN_SIGNIFICANCE * sigma_amp:
        raise ReductionError(
            f"no ring found: fitted amplitude {peak.amplitude:.3g} ± {sigma_amp:.2g} counts/s per "
            f"pixel is under {_MIN_SIGNIFICANCE:g} sigma; count longer (raise the exposure)"
        )


def _radial_quantities(
    peak: _Peak, cov: np.ndarray, geometry: DetectorGeometry
) -> tuple[dict[str, float], dict[str, float]]:
    z, dz_dq0, dz_dw = _ring_pixels_and_grad(geometry, peak.q0, peak.w)
    grad = np.array([peak.amplitude * dz_dq0, peak.amplitude * dz_dw, z, 0.0])
    sd = np.sqrt(np.diag(cov))
    values = {"peak_q": peak.q0, "width": peak.w, "intensity": peak.amplitude * z,
              "background": peak.background}
    sigmas = {"peak_q": sd[0], "width": sd[1], "intensity": float(np.sqrt(grad @ cov @ grad)),
              "background": sd[3]}
    return values, {k: float(v) for k, v in sigmas.items()}


def _fit_azimuthal(
    bins: _RadialBins, c_flat: np.ndarray, t: float, peak: _Peak
) -> tuple[dict[str, float], dict[str, float]]:
    """Order vector, anisotropy and orientation from the pixels of the annulus at the peak."""
    sel = np.abs(bins.q_flat - peak.q0) <= _ANNULUS_HALF_WIDTH * peak.w
    if np.count_nonzero(sel) < 12:
        raise ReductionError(
            f"ring at peak_q={peak.q0:.4g} 1/Å, width={peak.w:.3g} covers "
            f"{np.count_nonzero(sel)} pixels (< 12); use a finer detector geometry"
        )
    ring = t * peak.amplitude * np.exp(-0.5 * ((bins.q_flat[sel] - peak.q0) / peak.w) ** 2)
    design = np.column_stack((ring, ring * bins.cos2[sel], ring * bins.sin2[sel]))
    y = c_flat[sel] - t * peak.background
    # Two passes: weights from the isotropic ring, then from the fitted anisotropic one.
    var = ring + t * peak.background
    for _ in range(2):
        weighted = design / var[:, None]
        info = design.T @ weighted
        beta = np.linalg.solve(info, weighted.T @ y)
        var = np.maximum(design @ beta + t * peak.background, 1e-12)
    cov_beta = np.linalg.inv(info)
    b0, b1, b2 = beta
    ox, oy = b1 / b0, b2 / b0
    grad = np.array([[-ox / b0, 1.0 / b0, 0.0], [-oy / b0, 0.0, 1.0 / b0]])
    cov = grad @ cov_beta @ grad.T
    a = math.hypot(ox, oy)
    with np.errstate(divide="ignore", invalid="ignore"):
        var_a = (ox * ox * cov[0, 0] + oy * oy * cov[1, 1] + 2 * ox * oy * cov[0, 1]) / a**2
        var_th = (oy * oy * cov[0, 0] + ox * ox * cov[1, 1] - 2 * ox * oy * cov[0, 1]) / a**4
    sigma_a = math.sqrt(var_a) if a > 0 else math.sqrt(max(cov[0, 0], cov[1, 1]))
    sigma_th = math.degrees(0.5 * math.sqrt(var_th)) if a > 0 else math.inf
    orientation = math.degrees(0.5 * math.atan2(oy, ox)) % 180.0
    orientation = 0.0 if orientation >= 180.0 else orientation  # -1e-17 % 180 rounds to 180
    values = {"orientation": orientation, "anisotropy": a, "order_x": ox, "order_y": oy}
    sigmas = {"orientation": sigma_th, "anisotropy": sigma_a,
              "order_x": math.sqrt(cov[0, 0]), "order_y": math.sqrt(cov[1, 1])}
    return values, {k: float(v) for k, v in sigmas.items()}

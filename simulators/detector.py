"""Training data for the live detector models: Bragg frames, TOF volumes, noisy frames, SANS pairs.

Every generator is a pure function of an explicit ``np.random.Generator`` (or an integer seed) and
keeps the ground truth: ``expected`` is the mean of ``counts``, and ``counts`` is one Poisson draw
of it read out through a :class:`DetectorEffects`.

What ``expected`` holds (the target a denoiser must recover, the reference of every metric)::

    expected = gain * blur(photons)          # at every pixel, gaps and bad pixels included

``photons`` is the scene's expected photon count per pixel, ``blur`` the charge-sharing Gaussian
(detector axes only) and ``gain`` the fixed per-pixel gain map. ``counts`` is
``Poisson(expected) + N(0, read_noise^2)``, then 0 in module gaps and dead pixels and
``hot_value`` in hot pixels. ``mask`` (True = exclude) marks gaps, dead and hot pixels: they must
be left out of every metric and integration, since their ``counts`` say nothing of ``expected``.

Bragg peaks keep one expected image per peak (``peak_expected``, after the detector response),
from which the truth is derived, and re-derived after any augmentation:

* ``true_intensity``: the sum of a peak's expected counts over the frame;
* ``support``: pixels where some peak's expected counts exceed both ``SUPPORT_FRACTION`` (5%) of
  that peak's maximum in the frame and ``SUPPORT_MIN_COUNTS`` (0.1 counts). The support holds
  ``1 - exp(-3)`` = 95% of a bright Gaussian peak's counts, less of a pseudo-Voigt one (its
  Lorentzian tail: 65-90%) and of a faint peak (the 0.1-count floor), so summing counts over the
  support alone underestimates ``true_intensity``;
* ``labels``: 0 off the support, else 1 + the index of the strongest peak supported there;
* ``sigma_intensity``: ``sqrt(sum of expected over the peak's support)``, the Poisson sigma of
  the summed counts there (signal + background, no background-estimation error), so
  ``true_intensity / sigma_intensity`` is the peak's ``I/sigma``.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Mapping
from dataclasses import dataclass, replace
from functools import cached_property
from types import MappingProxyType
from typing import Any

import numpy as np
from scipy.ndimage import gaussian_filter
from scipy.special import erfc, erfcx

from models.masks import pyfai_mask

__all__ = [
    "DENOISE_HELD_OUT_KINDS",
    "DENOISE_KINDS",
    "DENOISE_TRAIN_KINDS",
    "EIGER",
    "IDEAL",
    "INTEGRATING",
    "PILATUS",
    "SANS_HELD_OUT_KINDS",
    "SANS_KINDS",
    "SANS_TRAIN_KINDS",
    "SUPPORT_FRACTION",
    "SUPPORT_MIN_COUNTS",
    "Augmentation",
    "BraggRecipe",
    "DetectorEffects",
    "FrameSample",
    "SANSKind",
    "SANSPair",
    "augment",
    "bragg_frame_2d",
    "bragg_volume_tof",
    "denoise_frame",
    "random_effects",
    "rebin",
    "sans_pair",
]

#: A pixel is in a peak's support where the peak's expected counts exceed this fraction of its max.
SUPPORT_FRACTION = 0.05
#: ... and exceed this many expected counts.
SUPPORT_MIN_COUNTS = 0.1
#: Profiles are cut to zero beyond this Mahalanobis distance (in sigmas).
_TRUNCATION = 6.0
#: Lorentzian half-width in sigmas giving the Gaussian's FWHM: sqrt(2 ln 2).
_GAMMA = math.sqrt(2.0 * math.log(2.0))


def _as_rng(rng: np.random.Generator | int) -> np.random.Generator:
    if isinstance(rng, np.random.Generator):
        return rng
    if isinstance(rng, int | np.integer) and not isinstance(rng, bool):
        return np.random.default_rng(int(rng))
    raise TypeError(f"rng must be a np.random.Generator or an int seed; got {type(rng).__name__}")


def _check_shape(shape: tuple[int, ...], ndim: int, name: str = "shape", least: int = 4) -> None:
    if len(shape) != ndim or not all(isinstance(n, int | np.integer) and n >= least for n in shape):
        raise ValueError(f"{name} must be {ndim} integers >= {least}; got {name}={shape!r}")


def _check_range(name: str, value: tuple[float, float], low: float, high: float = math.inf) -> None:
    lo, hi = value
    if not (low <= lo <= hi <= high):
        raise ValueError(
            f"{name} must be (lo, hi) with {low} <= lo <= hi <= {high}; got {name}={value!r}"
        )


# ---------------------------------------------------------------------------------------- detector
def _module_mask(detector: str) -> np.ndarray:
    """pyFAI's mask of a detector (True: no pixel there), read-only, cached."""
    try:
        return pyfai_mask(detector)
    except ValueError as exc:
        raise ValueError(f"{exc}, or None for no gaps") from None


@dataclass(frozen=True)
class _Pattern:
    gain: np.ndarray
    gaps: np.ndarray
    dead: np.ndarray
    hot: np.ndarray


@dataclass(frozen=True)
class DetectorEffects:
    """What a real detector does to an image; the fixed pattern comes from ``seed``.

    Attributes
    ----------
    detector : str | None
        pyFAI detector whose module gaps to show (``"Pilatus1M"``, ``"Eiger1M"``, ...): the frame
        is a window of the detector's mask at an offset drawn from ``seed`` (tiled periodically
        when the frame is larger). ``None``: no gaps.
    blur_sigma : float
        Charge-sharing Gaussian blur of the expected image, in pixels (0.3-0.7 is typical).
    gain_rms : float
        Relative rms of the per-pixel gain, ``gain ~ 1 + N(0, gain_rms^2)`` (0.01-0.05).
    dead_fraction, hot_fraction : float
        Fractions of pixels that read 0 / read ``hot_value``.
    hot_value : float
        What a hot pixel reads.
    read_noise : float
        Gaussian read noise in counts (integrating detectors); 0 for photon counting. With it,
        counts are not integers and may be negative: nothing is clipped.
    seed : int
        Seed of the fixed pattern (gap offset, gain map, dead and hot pixels).
    """

    detector: str | None = None
    blur_sigma: float = 0.0
    gain_rms: float = 0.0
    dead_fraction: float = 0.0
    hot_fraction: float = 0.0
    hot_value: float = 1.0e6
    read_noise: float = 0.0
    seed: int = 0

    def __post_init__(self) -> None:
        checks = {
            "blur_sigma": 0.0 <= self.blur_sigma <= 5.0,
            "gain_rms": 0.0 <= self.gain_rms <= 0.3,
            "dead_fraction": 0.0 <= self.dead_fraction <= 0.1,
            "hot_fraction": 0.0 <= self.hot_fraction <= 0.1,
            "hot_value": self.hot_value > 0 and math.isfinite(self.hot_value),
            "read_noise": 0.0 <= self.read_noise < math.inf,
        }
        for name, ok in checks.items():
            if not ok:
                raise ValueError(
                    f"DetectorEffects.{name}={getattr(self, name)!r} is out of range: blur_sigma "
                    "in [0, 5] px, gain_rms in [0, 0.3], dead/hot_fraction in [0, 0.1], "
                    "hot_value > 0, read_noise >= 0"
                )
        if self.detector is not None:
            _module_mask(self.detector)  # fail here, not at the first frame

    def pattern(self, shape: tuple[int, ...]) -> _Pattern:
        """The fixed pattern (read-only arrays) for a frame of detector shape `ny x nx`."""
        return _fixed_pattern(self, (int(shape[0]), int(shape[1])))

    def respond(self, photons: np.ndarray) -> np.ndarray:
        """``gain * blur(photons)``, blur and gain over the last two (detector) axes."""
        out = np.asarray(photons, dtype=np.float64)
        if self.blur_sigma > 0:
            sigma = (0.0,) * (out.ndim - 2) + (self.blur_sigma, self.blur_sigma)
            out = gaussian_filter(out, sigma, mode="reflect")
        if self.gain_rms > 0:
            out = out * self.pattern(out.shape[-2:]).gain
        return out

    def mask(self, shape: tuple[int, ...]) -> np.ndarray:
        """Pixels to exclude (gaps, dead, hot), broadcast to ``shape``."""
        p = self.pattern(shape[-2:])
        return np.broadcast_to(p.gaps | p.dead | p.hot, shape).copy()

    def read(self, rng: np.random.Generator, expected: np.ndarray) -> np.ndarray:
        """A readout of ``expected``: Poisson, read noise, then gaps/dead -> 0, hot -> hot_value."""
        counts = rng.poisson(expected).astype(np.float64)
        if self.read_noise > 0:
            counts += rng.normal(0.0, self.read_noise, counts.shape)
        p = self.pattern(expected.shape[-2:])
        counts[..., p.gaps | p.dead] = 0.0
        counts[..., p.hot] = self.hot_value
        return counts


@functools.lru_cache(maxsize=16)
def _fixed_pattern(effects: DetectorEffects, shape: tuple[int, int]) -> _Pattern:
    rng = np.random.default_rng([effects.seed, 0x5EED])
    if effects.detector is None:
        gaps = np.zeros(shape, bool)
    else:
        full = _module_mask(effects.detector)
        r0, c0 = rng.integers(full.shape[0]), rng.integers(full.shape[1])
        rows = (r0 + np.arange(shape[0])) % full.shape[0]
        cols = (c0 + np.arange(shape[1])) % full.shape[1]
        gaps = full[np.ix_(rows, cols)]
    gain = 1.0 + effects.gain_rms * rng.standard_normal(shape)
    u = rng.random(shape)
    dead = (u < effects.dead_fraction) & ~gaps
    hot = (u >= effects.dead_fraction) & (u < effects.dead_fraction + effects.hot_fraction) & ~gaps
    for a in (gain, gaps, dead, hot):
        a.setflags(write=False)
    return _Pattern(gain=gain, gaps=gaps, dead=dead, hot=hot)


def random_effects(rng: np.random.Generator | int, *, integrating: bool | None = None
                   ) -> DetectorEffects:
    """Draw a detector for training, so a model does not learn one detector's quirks.

    Parameters
    ----------
    rng : np.random.Generator | int
        Random source (or seed).
    integrating : bool | None
        ``True``: an integrating detector (no gaps, read noise 0.5-3 counts); ``False``: photon
        counting (Pilatus or Eiger gaps, no read noise); ``None``: either, with equal odds.

    Returns
    -------
    DetectorEffects
        Blur 0.3-0.7 px, gain rms 1-5%, up to 0.1% dead and 0.02% hot pixels, a random seed.
    """
    rng = _as_rng(rng)
    if integrating is None:
        integrating = bool(rng.random() < 0.5)
    return DetectorEffects(
        detector=None if integrating else ("Pilatus1M", "Eiger1M")[int(rng.integers(2))],
        blur_sigma=float(rng.uniform(0.3, 0.7)), gain_rms=float(rng.uniform(0.01, 0.05)),
        dead_fraction=float(rng.uniform(0, 1e-3)), hot_fraction=float(rng.uniform(0, 2e-4)),
        read_noise=float(rng.uniform(0.5, 3.0)) if integrating else 0.0,
        seed=int(rng.integers(2**31)))


#: No detector effects: ``counts`` is a plain Poisson draw of ``expected``.
IDEAL = DetectorEffects()
#: A photon-counting hybrid pixel detector with Pilatus modules.
PILATUS = DetectorEffects("Pilatus1M", blur_sigma=0.5, gain_rms=0.02, dead_fraction=5e-4,
                          hot_fraction=1e-4)
#: A photon-counting hybrid pixel detector with Eiger modules.
EIGER = DetectorEffects("Eiger1M", blur_sigma=0.4, gain_rms=0.015, dead_fraction=5e-4,
                        hot_fraction=1e-4)
#: An integrating (CCD-like) detector: no gaps, more blur, read noise.
INTEGRATING = DetectorEffects(None, blur_sigma=0.7, gain_rms=0.03, dead_fraction=2e-4,
                              hot_fraction=2e-4, read_noise=1.5)


# ------------------------------------------------------------------------------------------ sample
@dataclass(frozen=True, eq=False)
class FrameSample:
    """One simulated frame (2D `ny x nx`) or TOF volume (3D `nt x ny x nx`) with its truth.

    Attributes
    ----------
    expected : np.ndarray
        Expected counts ``gain * blur(photons)``, float64 (see the module docstring).
    counts : np.ndarray
        One readout of ``expected``, float64.
    mask : np.ndarray
        bool, True where a pixel is a module gap, dead or hot: exclude it from metrics.
    kind : str
        ``"bragg2d"``, ``"bragg_tof"`` or the denoising kind.
    counts2 : np.ndarray | None
        A second, independent readout of ``expected`` (Noise2Noise pair), if asked for.
    peak_expected : np.ndarray | None
        Expected counts of each peak alone, `n_peaks x *shape` (Bragg samples only).
    centers : np.ndarray | None
        Peak centres in pixel index coordinates, `n_peaks x ndim`.
    profiles : tuple[str, ...]
        Each peak's profile: ``"gaussian"``, ``"pseudo_voigt"`` or ``"tof"``.
    read_noise : float
        Read-noise rms the counts carry (re-noising needs it).
    """

    expected: np.ndarray
    counts: np.ndarray
    mask: np.ndarray
    kind: str
    counts2: np.ndarray | None = None
    peak_expected: np.ndarray | None = None
    centers: np.ndarray | None = None
    profiles: tuple[str, ...] = ()
    read_noise: float = 0.0

    @cached_property
    def _own_support(self) -> np.ndarray:
        if self.peak_expected is None or len(self.peak_expected) == 0:
            return np.zeros((0, *self.expected.shape), bool)
        pe = self.peak_expected
        peak_max = pe.reshape(len(pe), -1).max(axis=1)
        thresh = np.maximum(SUPPORT_FRACTION * peak_max, SUPPORT_MIN_COUNTS)
        return pe > thresh.reshape((-1,) + (1,) * (pe.ndim - 1))

    @property
    def support(self) -> np.ndarray:
        """bool, the union of the peaks' supports (all False without peaks)."""
        if not len(self._own_support):
            return np.zeros(self.expected.shape, bool)
        return np.asarray(self._own_support.any(axis=0))

    @property
    def labels(self) -> np.ndarray:
        """int, 0 off the support, else 1 + index of the strongest peak supported there."""
        own = self._own_support
        if not len(own):
            return np.zeros(self.expected.shape, np.int64)
        assert self.peak_expected is not None
        best = np.argmax(np.where(own, self.peak_expected, -1.0), axis=0) + 1
        return np.where(own.any(axis=0), best, 0)

    @property
    def true_intensity(self) -> np.ndarray:
        """Each peak's expected counts summed over the frame, `n_peaks`."""
        if self.peak_expected is None:
            return np.zeros(0)
        return self.peak_expected.reshape(len(self.peak_expected), -1).sum(axis=1)

    @property
    def sigma_intensity(self) -> np.ndarray:
        """Poisson sigma of the counts summed over each peak's own support, `n_peaks`."""
        own = self._own_support
        return np.sqrt((own * self.expected).reshape(len(own), -1).sum(axis=1))

    @property
    def background(self) -> np.ndarray:
        """Expected counts without the peaks."""
        if self.peak_expected is None:
            return self.expected
        return self.expected - self.peak_expected.sum(axis=0)


def _readout(rng: np.random.Generator, expected: np.ndarray, effects: DetectorEffects,
             kind: str, pair: bool, **peaks: Any) -> FrameSample:
    counts = effects.read(rng, expected)
    counts2 = effects.read(rng, expected) if pair else None
    return FrameSample(expected=expected, counts=counts, mask=effects.mask(expected.shape),
                       kind=kind, counts2=counts2, read_noise=effects.read_noise, **peaks)


# ------------------------------------------------------------------------------- scene components
def _axes(shape: tuple[int, ...]) -> list[np.ndarray]:
    """Pixel index grids (float), one per axis, broadcastable (`ogrid`-like)."""
    return [a.astype(np.float64) for a in np.ogrid[tuple(slice(0, n) for n in shape)]]


def _smooth_field(rng: np.random.Generator, shape: tuple[int, ...],
                  structured: float) -> np.ndarray:
    """A positive background of mean 1: a sloping plane mixed with broad blobs (a ring in 2D)."""
    grids = [(g + 0.5) / n - 0.5 for g, n in zip(_axes(shape), shape, strict=True)]
    slopes = rng.uniform(-0.8, 0.8, len(shape)) / len(shape)  # plane stays within [0.6, 1.4]
    plane = 1.0 + sum(s * g for s, g in zip(slopes, grids, strict=True))
    blobs = np.zeros(shape)
    for _ in range(rng.integers(1, 4)):
        c = rng.uniform(-0.5, 0.5, len(shape))
        w = rng.uniform(0.15, 0.4)
        blobs = blobs + rng.uniform(0.5, 1.0) * np.exp(
            -sum((g - ci) ** 2 for g, ci in zip(grids, c, strict=True)) / (2 * w**2))
    if len(shape) == 2 and rng.random() < 0.5:
        r = np.hypot(grids[0], grids[1])
        blobs = blobs + rng.uniform(0.5, 1.5) * np.exp(
            -((r - rng.uniform(0.15, 0.45)) ** 2) / (2 * rng.uniform(0.03, 0.08) ** 2))
    field = (1.0 - structured) * plane / plane.mean() + structured * blobs / blobs.mean()
    return field / field.mean()


def _mahalanobis2(shape: tuple[int, int], center: np.ndarray, sigmas: np.ndarray,
                  angle: float) -> np.ndarray:
    """Squared Mahalanobis distance of each pixel to a rotated anisotropic ellipse."""
    gy, gx = _axes(shape)
    dy, dx = gy - center[0], gx - center[1]
    u = math.cos(angle) * dx + math.sin(angle) * dy
    v = -math.sin(angle) * dx + math.cos(angle) * dy
    return (u / sigmas[1]) ** 2 + (v / sigmas[0]) ** 2


def _normalized(p: np.ndarray) -> np.ndarray:
    total = p.sum()
    return p / total if total > 0 else p


def _profile_2d(d2: np.ndarray, kind: str, eta: float) -> np.ndarray:
    """Unit-sum profile: Gaussian, or pseudo-Voigt ``eta L + (1 - eta) G`` of the same FWHM."""
    inside = d2 <= _TRUNCATION**2
    g = _normalized(np.where(inside, np.exp(-0.5 * d2), 0.0))
    if kind == "gaussian":
        return g
    lorentz = _normalized(np.where(inside, 1.0 / (1.0 + d2 / _GAMMA**2), 0.0))
    return eta * lorentz + (1.0 - eta) * g


def _emg(t: np.ndarray, mu: float, sigma: float, lam: float) -> np.ndarray:
    """Exponentially modified Gaussian (Gaussian * one-sided decay of rate ``lam``), unit area.

    ``f(t) = (lam/2) exp(lam (mu - t + lam sigma^2 / 2)) erfc((mu + lam sigma^2 - t) / (√2 sigma))``,
    evaluated through ``erfcx`` where the erfc argument is positive, so nothing overflows.
    """
    u = np.asarray(t, dtype=np.float64) - mu
    z = (lam * sigma**2 - u) / (math.sqrt(2.0) * sigma)
    out = np.empty_like(u)
    neg = z < 0  # each branch only where it is finite: erfc(z) <= 2, erfcx(z) <= 1
    with np.errstate(under="ignore"):
        out[neg] = 0.5 * lam * np.exp(-lam * u[neg] + 0.5 * (lam * sigma) ** 2) * erfc(z[neg])
        out[~neg] = 0.5 * lam * np.exp(-0.5 * (u[~neg] / sigma) ** 2) * erfcx(z[~neg])
    return out


# ------------------------------------------------------------------------------------ Bragg peaks
@dataclass(frozen=True)
class BraggRecipe:
    """How to draw a Bragg frame (2D) or TOF volume (3D).

    Attributes
    ----------
    shape : tuple[int, ...]
        `ny x nx` (2D) or `nt x ny x nx` (3D, TOF first).
    n_peaks : tuple[int, int]
        Inclusive range of the number of peaks.
    intensity : tuple[float, float]
        Range of each peak's integrated expected photons (drawn log-uniform), before
        ``count_scale``.
    background : tuple[float, float]
        Range of the mean background photons per pixel (log-uniform), before ``count_scale``.
    sigma : tuple[float, float]
        Range of the peak sigmas in the detector axes, pixels (each axis drawn apart).
    pseudo_voigt_fraction : float
        Probability that a 2D peak is pseudo-Voigt rather than Gaussian.
    eta : tuple[float, float]
        Range of the pseudo-Voigt Lorentzian fraction.
    structured : tuple[float, float]
        Range of the background's structured (blob/ring) share; the rest is a sloping plane.
    tof_sigma : tuple[float, float]
        Range of the Gaussian sigma along TOF, bins (3D).
    tof_decay : tuple[float, float]
        Range of the exponential tail length ``1 / lam`` along TOF, bins (3D).
    count_scale : float
        Multiplies peaks and background: the knob from high counts to very low counts. With the
        defaults, peaks span ``I/sigma`` from about 1 to about 100.
    """

    shape: tuple[int, ...] = (128, 128)
    n_peaks: tuple[int, int] = (3, 20)
    intensity: tuple[float, float] = (5.0, 1.0e4)
    background: tuple[float, float] = (0.05, 2.0)
    sigma: tuple[float, float] = (0.8, 3.0)
    pseudo_voigt_fraction: float = 0.5
    eta: tuple[float, float] = (0.1, 0.7)
    structured: tuple[float, float] = (0.0, 0.7)
    tof_sigma: tuple[float, float] = (0.7, 1.5)
    tof_decay: tuple[float, float] = (1.0, 4.0)
    count_scale: float = 1.0

    def __post_init__(self) -> None:
        if len(self.shape) not in (2, 3):
            raise ValueError(f"BraggRecipe.shape must be 2D or 3D; got shape={self.shape!r}")
        _check_shape(self.shape, len(self.shape), "shape", least=8)
        lo, hi = self.n_peaks
        if not (isinstance(lo, int) and isinstance(hi, int) and 0 <= lo <= hi <= 500):
            raise ValueError(f"n_peaks must be ints 0 <= lo <= hi <= 500; got {self.n_peaks=}")
        _check_range("intensity", self.intensity, 1e-6)
        _check_range("background", self.background, 0.0)
        _check_range("sigma", self.sigma, 0.3, min(self.shape[-2:]) / 8)
        _check_range("eta", self.eta, 0.0, 1.0)
        _check_range("structured", self.structured, 0.0, 1.0)
        if len(self.shape) == 3:
            _check_range("tof_sigma", self.tof_sigma, 0.3, self.shape[0] / 8)
            _check_range("tof_decay", self.tof_decay, 0.1, self.shape[0] / 4)
            if 4 * self.tof_sigma[1] + 2 * self.tof_decay[1] > self.shape[0] - 2:
                raise ValueError(
                    f"peaks do not fit along TOF: need 4 tof_sigma + 2 tof_decay <= nt - 2; got "
                    f"{self.tof_sigma=}, {self.tof_decay=}, nt={self.shape[0]}")
        if not 0.0 <= self.pseudo_voigt_fraction <= 1.0:
            raise ValueError(f"pseudo_voigt_fraction must be in [0, 1]; got "
                             f"{self.pseudo_voigt_fraction=}")
        if not (self.count_scale > 0 and math.isfinite(self.count_scale)):
            raise ValueError(f"count_scale must be finite and > 0; got {self.count_scale=}")


def _log_uniform(rng: np.random.Generator, lo_hi: tuple[float, float], size: Any = None) -> Any:
    lo, hi = lo_hi
    if lo == hi or lo <= 0:
        return rng.uniform(lo, hi, size)
    return np.exp(rng.uniform(math.log(lo), math.log(hi), size))


def _draw_peaks(rng: np.random.Generator, recipe: BraggRecipe) -> tuple[
        np.ndarray, np.ndarray, tuple[str, ...]]:
    """Unit-sum photon profiles of each peak, `n x *shape`, their centres and profile kinds."""
    shape = recipe.shape
    n = int(rng.integers(recipe.n_peaks[0], recipe.n_peaks[1] + 1))
    margin = 2.0 * recipe.sigma[1]
    profiles, centers, kinds = [], [], []
    for _ in range(n):
        sigmas = rng.uniform(*recipe.sigma, 2)
        angle = rng.uniform(0.0, math.pi)
        det = np.array([rng.uniform(margin, s - 1 - margin) for s in shape[-2:]])
        d2 = _mahalanobis2((shape[-2], shape[-1]), det, sigmas, angle)
        if len(shape) == 2:
            kind = "pseudo_voigt" if rng.random() < recipe.pseudo_voigt_fraction else "gaussian"
            profile = _profile_2d(d2, kind, rng.uniform(*recipe.eta))
            center = det
        else:
            kind = "tof"
            sig_t, tau = rng.uniform(*recipe.tof_sigma), rng.uniform(*recipe.tof_decay)
            t0 = rng.uniform(2 * sig_t, shape[0] - 1 - 2 * sig_t - 2 * tau)
            tof = _emg(np.arange(shape[0], dtype=np.float64), t0, sig_t, 1.0 / tau)
            spatial = _profile_2d(d2, "gaussian", 0.0)
            profile = _normalized(tof[:, None, None] * spatial[None])
            center = np.concatenate([[t0 + tau], det])  # TOF mean of the EMG is mu + tau
        profiles.append(profile)
        centers.append(center)
        kinds.append(kind)
    stack = np.array(profiles) if profiles else np.zeros((0, *shape))
    return stack, np.array(centers).reshape(n, len(shape)), tuple(kinds)


def _bragg(rng: np.random.Generator | int, recipe: BraggRecipe, effects: DetectorEffects,
           pair: bool) -> FrameSample:
    rng = _as_rng(rng)
    unit, centers, kinds = _draw_peaks(rng, recipe)
    intens = recipe.count_scale * _log_uniform(rng, recipe.intensity, len(unit))
    level = recipe.count_scale * _log_uniform(rng, recipe.background)
    bg = level * _smooth_field(rng, recipe.shape, rng.uniform(*recipe.structured))
    peaks = np.array([effects.respond(i * p) for i, p in zip(intens, unit, strict=True)])
    peaks = peaks.reshape(len(unit), *recipe.shape)
    expected = effects.respond(bg) + peaks.sum(axis=0)
    kind = "bragg2d" if len(recipe.shape) == 2 else "bragg_tof"
    return _readout(rng, expected, effects, kind, pair, peak_expected=peaks, centers=centers,
                    profiles=kinds)


def bragg_frame_2d(rng: np.random.Generator | int, recipe: BraggRecipe | None = None, *,
                   effects: DetectorEffects = IDEAL, pair: bool = False) -> FrameSample:
    """A 2D frame of Bragg peaks (anisotropic Gaussian / pseudo-Voigt) over a smooth background.

    Parameters
    ----------
    rng : np.random.Generator | int
        Random source (or seed).
    recipe : BraggRecipe | None
        What to draw; ``None``: ``BraggRecipe()`` (128 x 128).
    effects : DetectorEffects
        The detector's response and readout.
    pair : bool
        Also draw ``counts2``, an independent readout (Noise2Noise).

    Returns
    -------
    FrameSample
        ``expected``, ``counts``, ``mask``, the per-peak truth (``peak_expected``, ``centers``,
        ``profiles``) and what derives from it (``support``, ``true_intensity``, ...).

    Raises
    ------
    ValueError
        If ``recipe.shape`` is not 2D.

    Examples
    --------
    >>> s = bragg_frame_2d(0)
    >>> s.counts.shape, bool(s.support.any())
    ((128, 128), True)
    """
    recipe = BraggRecipe() if recipe is None else recipe
    if len(recipe.shape) != 2:
        raise ValueError(f"bragg_frame_2d needs a 2D recipe.shape; got {recipe.shape=}; "
                         "use bragg_volume_tof for 3D")
    return _bragg(rng, recipe, effects, pair)


def bragg_volume_tof(rng: np.random.Generator | int, recipe: BraggRecipe | None = None, *,
                     effects: DetectorEffects = IDEAL, pair: bool = False) -> FrameSample:
    """A 3D time-of-flight volume (`nt x ny x nx`) of Bragg peaks with the moderator tail.

    Each peak is ``EMG(t; t0, sigma_t, 1/tau) x G(y, x)``: along TOF an exponentially modified
    Gaussian (a Gaussian convolved with a one-sided exponential decay, the Ikeda-Carpenter-like
    tail toward late TOF), in the detector axes an anisotropic rotated Gaussian. Detector effects
    act on the detector axes only (same gaps, gain and bad pixels in every TOF bin).

    Parameters
    ----------
    rng : np.random.Generator | int
        Random source (or seed).
    recipe : BraggRecipe | None
        ``None``: ``BraggRecipe(shape=(32, 32, 32), sigma=(0.8, 2.0))``.
    effects : DetectorEffects
        The detector's response and readout.
    pair : bool
        Also draw ``counts2``.

    Returns
    -------
    FrameSample
        As :func:`bragg_frame_2d`; ``centers`` are ``(t_mean, y, x)`` with ``t_mean = t0 + tau``.
    """
    if recipe is None:
        recipe = BraggRecipe(shape=(32, 32, 32), sigma=(0.8, 2.0), n_peaks=(2, 10))
    if len(recipe.shape) != 3:
        raise ValueError(f"bragg_volume_tof needs a 3D recipe.shape (nt, ny, nx); got "
                         f"{recipe.shape=}")
    return _bragg(rng, recipe, effects, pair)


# -------------------------------------------------------------------------------------- denoising
DENOISE_KINDS: tuple[str, ...] = ("spots", "rings", "saxs", "speckle", "smooth", "texture")
#: Kinds to train denoisers on; benchmarks evaluate on :data:`DENOISE_HELD_OUT_KINDS`.
DENOISE_TRAIN_KINDS: tuple[str, ...] = ("spots", "rings", "saxs", "smooth", "texture")
DENOISE_HELD_OUT_KINDS: tuple[str, ...] = ("speckle",)


def _saxs_envelope(rng: np.random.Generator, shape: tuple[int, int]) -> np.ndarray:
    """``(1 + (r_e / xi)^2)^(-p/2)`` about a beam near the centre; ``r_e`` elliptic (anisotropic)."""
    n = min(shape)
    center = np.array(shape) / 2 + rng.uniform(-0.15, 0.15, 2) * n
    ratio = rng.uniform(1.0, 2.0)
    d2 = _mahalanobis2(shape, center, np.array([1.0, ratio]), rng.uniform(0, math.pi))
    xi = rng.uniform(0.02, 0.12) * n
    return (1.0 + d2 / xi**2) ** (-rng.uniform(1.0, 2.0)) + 1e-3


def _scene_spots(rng: np.random.Generator, shape: tuple[int, int]) -> np.ndarray:
    recipe = BraggRecipe(shape=shape, n_peaks=(5, 30), sigma=(0.8, min(3.0, min(shape) / 8)))
    unit, _, _ = _draw_peaks(rng, recipe)
    intens = _log_uniform(rng, (50.0, 5000.0), len(unit))
    bg = 0.05 * _smooth_field(rng, shape, rng.uniform(0, 0.7))
    return bg + np.tensordot(intens, unit, axes=1)


def _scene_rings(rng: np.random.Generator, shape: tuple[int, int]) -> np.ndarray:
    n = min(shape)
    center = np.array(shape) / 2 + rng.uniform(-0.3, 0.3, 2) * n
    gy, gx = _axes(shape)
    r = np.hypot(gy - center[0], gx - center[1])
    chi = np.arctan2(gy - center[0], gx - center[1])
    image = 0.2 / (1.0 + (r / (0.3 * n)) ** 2)
    for radius in rng.uniform(0.08, 0.9, rng.integers(3, 9)) * n:
        width = rng.uniform(0.5, 2.5)
        texture = 1.0 + rng.uniform(0, 0.6) * np.cos(2 * (chi - rng.uniform(0, math.pi)))
        image = image + rng.uniform(0.3, 1.0) * texture * np.exp(-0.5 * ((r - radius) / width) ** 2)
    return image


def _speckle(rng: np.random.Generator, shape: tuple[int, int], size: float) -> np.ndarray:
    """Fully developed speckle of mean 1: ``|g * (a + i b)|^2``, ``a, b`` white, ``g`` a Gaussian.

    Its intensity is exponential (std = mean) and correlated over about ``size`` pixels.
    """
    f = gaussian_filter(rng.standard_normal(shape), size, mode="wrap") + 1j * gaussian_filter(
        rng.standard_normal(shape), size, mode="wrap")
    speckle = np.abs(f) ** 2
    return speckle / speckle.mean()


def _scene_speckle(rng: np.random.Generator, shape: tuple[int, int]) -> np.ndarray:
    """Speckle (grain 0.7-2.5 px) on a smooth SAXS-like envelope."""
    return _saxs_envelope(rng, shape) * _speckle(rng, shape, rng.uniform(0.7, 2.5))


def _scene_texture(rng: np.random.Generator, shape: tuple[int, int]) -> np.ndarray:
    """Fine log-normal texture on a smooth field or a SAXS envelope: ``exp(s g)``, ``g`` a
    unit-variance Gaussian random field correlated over 0.5-4 px, ``s`` 0.2-1.2, optionally
    thresholded into domains with sharp walls (as of a rough surface, a grainy film, a
    polycrystal's diffuse scattering). Not speckle: its statistics are log-normal, not
    exponential, and its contrast varies."""
    g = gaussian_filter(rng.standard_normal(shape), rng.uniform(0.5, 4.0), mode="wrap")
    g = (g - g.mean()) / g.std()
    if rng.random() < 0.3:  # domains: two or three levels with sharp walls
        g = np.digitize(g, np.sort(rng.uniform(-1.0, 1.0, int(rng.integers(1, 3))))).astype(float)
        g = (g - g.mean()) / max(float(g.std()), 1e-6)
    base = _saxs_envelope(rng, shape) if rng.random() < 0.5 else _smooth_field(rng, shape, rng.uniform(0.0, 1.0))
    return base * np.exp(rng.uniform(0.2, 1.2) * g)


def _scene(rng: np.random.Generator, kind: str, shape: tuple[int, int]) -> np.ndarray:
    if kind == "spots":
        return _scene_spots(rng, shape)
    if kind == "rings":
        return _scene_rings(rng, shape)
    if kind == "saxs":
        return _saxs_envelope(rng, shape)
    if kind == "speckle":
        return _scene_speckle(rng, shape)
    if kind == "texture":
        return _scene_texture(rng, shape)
    return _smooth_field(rng, shape, rng.uniform(0.0, 1.0))


def denoise_frame(rng: np.random.Generator | int, kind: str, shape: tuple[int, int] = (128, 128),
                  mean_counts: float = 1.0, *, effects: DetectorEffects = IDEAL,
                  pair: bool = False) -> FrameSample:
    """A low-count 2D frame for denoising, scaled so ``expected.mean() == mean_counts``.

    Parameters
    ----------
    rng : np.random.Generator | int
        Random source (or seed).
    kind : str
        One of :data:`DENOISE_KINDS`: ``"spots"`` (Bragg-like spots), ``"rings"`` (textured powder
        rings), ``"saxs"`` (anisotropic radial decay), ``"speckle"`` (exponential speckle,
        spatially correlated, on a SAXS envelope), ``"smooth"`` (plane + broad blobs),
        ``"texture"`` (fine log-normal texture or sharp-walled domains on a smooth field).
    shape : tuple[int, int]
        `ny x nx`.
    mean_counts : float
        Mean expected counts per pixel over the whole frame (masked pixels included), 0.01-100
        is the intended range (1e-4 to 1e5 accepted).
    effects : DetectorEffects
        The detector's response and readout.
    pair : bool
        Also draw ``counts2``, an independent readout of the same ``expected`` (Noise2Noise).

    Returns
    -------
    FrameSample
        ``expected``, ``counts``, ``mask`` and, with ``pair``, ``counts2``.

    Examples
    --------
    >>> s = denoise_frame(1, "rings", (64, 64), 0.1, pair=True)
    >>> round(float(s.expected.mean()), 6), s.counts2 is not None
    (0.1, True)
    """
    if kind not in DENOISE_KINDS:
        raise ValueError(f"unknown denoising {kind=}; use one of {DENOISE_KINDS}")
    _check_shape(tuple(shape), 2, "shape", least=16)
    if not 1e-4 <= mean_counts <= 1e5:
        raise ValueError(f"mean_counts must be in [1e-4, 1e5] counts/pixel; got {mean_counts=}")
    rng = _as_rng(rng)
    shape = (int(shape[0]), int(shape[1]))
    expected = effects.respond(_scene(rng, kind, shape))
    expected *= mean_counts / expected.mean()
    return _readout(rng, expected, effects, kind, pair)


# ----------------------------------------------------------------------------------- augmentation
def rebin(a: np.ndarray, factor: int = 2, axes: tuple[int, ...] | None = None) -> np.ndarray:
    """Sum ``factor``-wide blocks along ``axes`` (all axes by default): histogramming.

    Raises
    ------
    ValueError
        If an axis length is not a multiple of ``factor``.
    """
    axes = tuple(range(a.ndim)) if axes is None else tuple(ax % a.ndim for ax in axes)
    for ax in axes:
        if a.shape[ax] % factor:
            raise ValueError(f"axis {ax} of length {a.shape[ax]} is not a multiple of {factor=}; "
                             "crop first")
    new: list[int] = []
    positions: list[int] = []  # the block axes of the reshaped array, summed away
    for ax, n in enumerate(a.shape):
        if ax in axes:
            positions.append(len(new) + 1)
            new += [n // factor, factor]
        else:
            new.append(n)
    return a.reshape(new).sum(axis=tuple(positions))


@dataclass(frozen=True)
class Augmentation:
    """Which augmentations :func:`augment` draws, in the order they are applied.

    Attributes
    ----------
    rebin_probability : float
        Probability of summing 2 x 2 (x 2 in 3D) blocks (histogramming).
    rotate : bool
        Rotate the detector axes by a random multiple of 90 degrees.
    max_shift : float
        Largest periodic shift (recentering) of the detector axes, as a fraction of their size.
    thin : tuple[float, float]
        Range of the count-level factor ``p``: ``expected *= p`` and counts are re-noised
        (binomial thinning of the same photons; a fresh Poisson draw plus read noise when the
        sample carries read noise). ``(1, 1)``: no re-noising.
    crop : tuple[int, ...] | None
        Shape of a random crop (after rebinning), or ``None``.
    """

    rebin_probability: float = 0.3
    rotate: bool = True
    max_shift: float = 0.25
    thin: tuple[float, float] = (0.1, 1.0)
    crop: tuple[int, ...] | None = None

    def __post_init__(self) -> None:
        if not 0.0 <= self.rebin_probability <= 1.0:
            raise ValueError(f"rebin_probability must be in [0, 1]; got {self.rebin_probability=}")
        if not 0.0 <= self.max_shift <= 1.0:
            raise ValueError(f"max_shift must be in [0, 1]; got {self.max_shift=}")
        _check_range("thin", self.thin, 1e-6, 1.0)


def _transform(sample: FrameSample, fn: Any) -> FrameSample:
    """Apply an array -> array map to every image of a sample (peak images included)."""
    pe = sample.peak_expected
    expected = fn(sample.expected)
    return replace(
        sample, expected=expected, counts=fn(sample.counts),
        mask=fn(sample.mask.astype(np.float64)) > 0,
        counts2=None if sample.counts2 is None else fn(sample.counts2),
        peak_expected=None if pe is None else np.array([fn(p) for p in pe]).reshape(
            len(pe), *expected.shape))


def _rotate_centers(c: np.ndarray, shape: tuple[int, ...], k: int) -> np.ndarray:
    """Centres after ``np.rot90(a, k, axes=(-2, -1))``: one turn maps (r, c) to (nc - 1 - c, r)."""
    c = c.copy()
    ny, nx = shape[-2:]
    for _ in range(k % 4):
        c[:, -2], c[:, -1] = nx - 1 - c[:, -1], c[:, -2].copy()
        ny, nx = nx, ny
    return c


def augment(rng: np.random.Generator | int, sample: FrameSample,
            recipe: Augmentation | None = None) -> FrameSample:
    """Histogram, rotate, recentre, re-noise at a lower count level and crop a sample.

    Every image (``expected``, ``counts``, ``counts2``, ``mask``, ``peak_expected``) goes through
    the same geometric transforms, and ``centers`` follow; the derived truth (``support``,
    ``true_intensity``, ...) is recomputed from the transformed ``peak_expected`` by the same rule.
    A rebinned pixel is masked if any of its pixels was; its counts are the sum of the readouts.
    After a crop, peaks left with no support are dropped.

    Parameters
    ----------
    rng : np.random.Generator | int
        Random source (or seed).
    sample : FrameSample
        What to augment (2D or 3D; 3D rotates and shifts the detector axes only).
    recipe : Augmentation | None
        ``None``: ``Augmentation()``.

    Returns
    -------
    FrameSample

    Raises
    ------
    ValueError
        If ``recipe.crop`` does not fit the (rebinned) sample or rebinning needs even sizes.
    """
    rng = _as_rng(rng)
    recipe = Augmentation() if recipe is None else recipe
    out = sample
    centers = None if sample.centers is None else sample.centers.astype(np.float64)
    if rng.random() < recipe.rebin_probability:
        out = _transform(out, lambda a: rebin(a, 2))
        # a summed pixel carries the read noise of all 2^ndim pixels it sums
        out = replace(out, read_noise=out.read_noise * math.sqrt(2**out.expected.ndim))
        centers = None if centers is None else (centers - 0.5) / 2
    if recipe.rotate:
        k = int(rng.integers(4))
        if centers is not None:
            centers = _rotate_centers(centers, out.expected.shape, k)
        out = _transform(out, lambda a: np.rot90(a, k, axes=(-2, -1)).copy())
    if recipe.max_shift > 0:
        det = out.expected.shape[-2:]
        shift = tuple(int(rng.integers(-int(recipe.max_shift * n), int(recipe.max_shift * n) + 1))
                      for n in det)
        out = _transform(out, lambda a: np.roll(a, shift, axis=(-2, -1)))
        if centers is not None:
            centers[:, -2:] = (centers[:, -2:] + shift) % det
    p = rng.uniform(*recipe.thin)
    if p < 1.0:
        out = _thin(rng, out, p)
    if recipe.crop is not None:
        out, centers = _crop(rng, out, centers, recipe.crop)
    return replace(out, centers=centers)


def _thin(rng: np.random.Generator, s: FrameSample, p: float) -> FrameSample:
    def renoise(counts: np.ndarray) -> np.ndarray:
        good = ~s.mask
        new = counts.copy()
        if s.read_noise == 0:
            new[good] = rng.binomial(counts[good].astype(np.int64), p)
        else:
            new[good] = rng.poisson(p * s.expected[good]) + rng.normal(
                0.0, s.read_noise, int(good.sum()))
        return new

    return replace(s, expected=p * s.expected, counts=renoise(s.counts),
                   counts2=None if s.counts2 is None else renoise(s.counts2),
                   peak_expected=None if s.peak_expected is None else p * s.peak_expected)


def _crop(rng: np.random.Generator, s: FrameSample, centers: np.ndarray | None,
          crop: tuple[int, ...]) -> tuple[FrameSample, np.ndarray | None]:
    shape = s.expected.shape
    if len(crop) != len(shape) or any(not 1 <= c <= n for c, n in zip(crop, shape, strict=True)):
        raise ValueError(f"crop={crop!r} must have one size per axis of the sample, each within "
                         f"its shape {shape}")
    start = [int(rng.integers(0, n - c + 1)) for c, n in zip(crop, shape, strict=True)]
    window = tuple(slice(a, a + c) for a, c in zip(start, crop, strict=True))
    out = _transform(s, lambda a: a[window].copy())
    if out.peak_expected is None or centers is None:
        return out, centers
    keep = np.asarray(out._own_support.reshape(len(out.peak_expected), -1).any(axis=1))
    centers = (centers - np.array(start))[keep]
    kept = replace(out, peak_expected=out.peak_expected[keep],
                   profiles=tuple(k for k, ok in zip(out.profiles, keep.tolist(), strict=True)
                                  if ok))
    return kept, centers


# ------------------------------------------------------------------------- SANS super-resolution
@dataclass(frozen=True)
class SANSKind:
    """A kind of SANS sample for super-resolution pairs.

    Attributes
    ----------
    model_name : str
        sasmodels model name or expression.
    fixed : Mapping[str, float]
        Values that stay fixed (SLDs, polydispersity settings).
    ranges : Mapping[str, tuple[float, float]]
        Uniform ranges of the parameters drawn for each pattern (angles in degrees).
    anisotropic : bool
        Whether the 2D pattern depends on azimuth (oriented particles).
    description : str
    """

    model_name: str
    fixed: Mapping[str, float]
    ranges: Mapping[str, tuple[float, float]]
    anisotropic: bool
    description: str

    def recipe(self) -> dict[str, Any]:
        """The kind as plain data (model, fixed values, drawn ranges), for weights' metadata."""
        return {"model": self.model_name, "fixed": dict(self.fixed),
                "ranges": {k: list(v) for k, v in self.ranges.items()}, "anisotropic": self.anisotropic}

    def draw(self, rng: np.random.Generator) -> dict[str, float]:
        """Parameters of one sample: the fixed values plus a uniform draw of each range."""
        return {**self.fixed, **{k: float(rng.uniform(*r)) for k, r in self.ranges.items()}}


def _sans(name: str, fixed: dict[str, float], ranges: dict[str, tuple[float, float]],
          anisotropic: bool, description: str) -> SANSKind:
    return SANSKind(name, MappingProxyType({"background": 0.0, **fixed}),
                    MappingProxyType(ranges), anisotropic, description)


_ORIENT = {"theta": (50.0, 90.0), "phi": (0.0, 180.0)}
SANS_KINDS: Mapping[str, SANSKind] = MappingProxyType({
    "sphere": _sans("sphere", {"sld": 3.47, "sld_solvent": 6.36, "radius_pd_n": 15},
                    {"radius": (20.0, 80.0), "radius_pd": (0.05, 0.15)}, False,
                    "polydisperse silica spheres in D2O"),
    "sphere_monodisperse": _sans("sphere", {"sld": 1.41, "sld_solvent": 6.36, "radius_pd": 0.0},
                                 {"radius": (20.0, 100.0)}, False,
                                 "dilute monodisperse spheres (latex standards, globular proteins): sharp "
                                 "form-factor minima with no structure factor, radii to 100 A, where the "
                                 "minima are two coarse pixels apart (the hard-sphere kind's monodisperse "
                                 "spheres stop at 60 A)"),
    "sphere_hardsphere": _sans(
        "sphere@hardsphere", {"sld": 3.47, "sld_solvent": 6.36, "radius_effective_mode": 1},
        {"radius": (20.0, 60.0), "volfraction": (0.05, 0.35)}, False,
        "concentrated spheres: hard-sphere structure-factor peak"),
    "cylinder_oriented": _sans(
        "cylinder", {"sld": 0.5, "sld_solvent": 6.36},
        {"radius": (10.0, 40.0), "length": (100.0, 600.0), **_ORIENT}, True,
        "aligned rods (flow or field), axis at theta to the beam, phi in the detector plane"),
    "ellipsoid_oriented": _sans(
        "ellipsoid", {"sld": 0.5, "sld_solvent": 6.36},
        {"radius_polar": (60.0, 200.0), "radius_equatorial": (15.0, 40.0), **_ORIENT}, True,
        "aligned prolate ellipsoids"),
    "core_shell_sphere": _sans(
        "core_shell_sphere", {"sld_core": 3.47, "sld_shell": 0.8, "sld_solvent": 6.36},
        {"radius": (20.0, 70.0), "thickness": (5.0, 25.0)}, False,
        "silica cores with a polymer shell: a shifted minima pattern"),
    "core_shell_cylinder_oriented": _sans(
        "core_shell_cylinder", {"sld_core": 0.5, "sld_shell": 3.0, "sld_solvent": 6.36},
        {"radius": (10.0, 30.0), "thickness": (3.0, 15.0), "length": (100.0, 500.0), **_ORIENT},
        True, "aligned core-shell rods"),
})
#: Kinds for training SANS super-resolution; benchmarks evaluate on :data:`SANS_HELD_OUT_KINDS`.
SANS_TRAIN_KINDS: tuple[str, ...] = (
    "sphere", "sphere_monodisperse", "sphere_hardsphere", "cylinder_oriented", "ellipsoid_oriented")
SANS_HELD_OUT_KINDS: tuple[str, ...] = ("core_shell_sphere", "core_shell_cylinder_oriented")


@functools.cache
def _sans_model(model_name: str) -> Any:
    from sasmodels.core import load_model  # deferred: only SANS pairs need the kernels

    return load_model(model_name, dtype="double", platform="dll")


@dataclass(frozen=True, eq=False)
class SANSPair:
    """A fine / coarse 2D SANS pair: ``coarse_expected`` is ``fine_expected`` summed in blocks.

    Attributes
    ----------
    kind : str
    params : Mapping[str, float]
        The sasmodels parameters of the sample.
    factor : int
        Fine pixels per coarse pixel along each axis.
    fine_expected : np.ndarray
        Expected counts per fine pixel, `(factor ny) x (factor nx)`.
    coarse_expected : np.ndarray
        Expected counts per coarse pixel, `ny x nx`; sums to ``total_counts``.
    coarse_counts : np.ndarray
        Poisson draw of ``coarse_expected`` (float64).
    qx_fine, qy_fine, qx_coarse, qy_coarse : np.ndarray
        Pixel-centre scattering vectors, 1/Å (``qx`` along the last axis).
    """

    kind: str
    params: Mapping[str, float]
    factor: int
    fine_expected: np.ndarray
    coarse_expected: np.ndarray
    coarse_counts: np.ndarray
    qx_fine: np.ndarray
    qy_fine: np.ndarray
    qx_coarse: np.ndarray
    qy_coarse: np.ndarray


def sans_pair(rng: np.random.Generator | int, kind: str, *, params: Mapping[str, float] | None =
              None, factor: int = 2, coarse_shape: tuple[int, int] = (32, 32),
              total_counts: float = 3.0e5, q_max: float = 0.25) -> SANSPair:
    """A 2D SANS pattern at high resolution and the same pattern counted on a coarse detector.

    ``fine_expected = k I(qx, qy)`` at the fine pixel centres (sasmodels, 2D kernel, beam at the
    detector centre, ``q`` from ``-q_max`` to ``q_max`` across the detector), ``k`` set so the
    coarse pattern holds ``total_counts`` expected counts; ``coarse_expected`` sums
    ``factor x factor`` blocks of it, and ``coarse_counts`` is a Poisson draw.

    Parameters
    ----------
    rng : np.random.Generator | int
        Random source (or seed).
    kind : str
        A key of :data:`SANS_KINDS`.
    params : Mapping[str, float] | None
        Parameters overriding the kind's draw (names of the sasmodels model), e.g.
        ``{"background": 0.01}`` for a flat incoherent background (the kinds have none).
    factor : int
        2 or 4.
    coarse_shape : tuple[int, int]
        Coarse detector pixels, `ny x nx`, each in [8, 256].
    total_counts : float
        Expected counts in the whole coarse pattern (1e5-1e6 is the count-limited regime).
    q_max : float
        Largest ``|qx|``, ``|qy|`` at the detector edge, 1/Å.

    Returns
    -------
    SANSPair
    """
    if kind not in SANS_KINDS:
        raise ValueError(f"unknown SANS {kind=}; use one of {tuple(SANS_KINDS)}")
    if factor not in (2, 4):
        raise ValueError(f"factor must be 2 or 4; got {factor=}")
    _check_shape(tuple(coarse_shape), 2, "coarse_shape", least=8)
    if max(coarse_shape) > 256:
        raise ValueError(f"coarse_shape must be at most 256 per axis; got {coarse_shape=}")
    if not (total_counts > 0 and math.isfinite(total_counts)):
        raise ValueError(f"total_counts must be finite and > 0; got {total_counts=}")
    if not 0 < q_max <= 2.0:
        raise ValueError(f"q_max must be in (0, 2] 1/Å; got {q_max=}")
    rng = _as_rng(rng)
    spec = SANS_KINDS[kind]
    values = spec.draw(rng)
    model = _sans_model(spec.model_name)
    if params:
        known = {p.name for p in model.info.parameters.call_parameters} | set(values)
        unknown = sorted(set(params) - known)
        if unknown:
            raise ValueError(f"unknown parameters {unknown} for sasmodels model "
                             f"{spec.model_name!r}")
        values.update(params)
    from sasmodels.direct_model import call_kernel

    fine = (coarse_shape[0] * factor, coarse_shape[1] * factor)
    qy1, qx1 = (q_max * ((np.arange(n) + 0.5) * 2.0 / n - 1.0) for n in fine)
    qx, qy = np.meshgrid(qx1, qy1)
    kernel = model.make_kernel([qx.ravel(), qy.ravel()])
    try:
        intensity = np.asarray(call_kernel(kernel, values), np.float64).reshape(fine)
    finally:
        kernel.release()
    fine_expected = intensity * (total_counts / intensity.sum())
    coarse_expected = rebin(fine_expected, factor)
    return SANSPair(
        kind=kind, params=MappingProxyType(values), factor=factor, fine_expected=fine_expected,
        coarse_expected=coarse_expected,
        coarse_counts=rng.poisson(coarse_expected).astype(np.float64), qx_fine=qx, qy_fine=qy,
        qx_coarse=rebin(qx, factor) / factor**2, qy_coarse=rebin(qy, factor) / factor**2)


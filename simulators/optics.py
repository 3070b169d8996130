"""A simulated focusing beamline: flux and spot size versus five optics settings, with noise.

The physics is :func:`optics_response`, a pure, noise-free function of the settings; the device
:class:`SimBeamlineOptics` wraps it with measurement noise, hardware limits, a controllable clock
and injectable faults, so a bluesky RunEngine can drive it like real optics.

Layout (all distances from the source). A Gaussian beam (rms ``sigma_beam_h`` x ``sigma_beam_v``
at the slits) passes

* **slits** ``slit_h``, ``slit_v`` (full gaps, mm) just upstream of the optics. A gap ``g`` passes
  ``T = erf(g / (2 sqrt(2) sigma))`` of a Gaussian beam, and the beam behind it has rms
  ``s = (1/sigma^2 + 12/g^2)^(-1/2)`` (Gaussian for wide gaps, a uniform ``g/sqrt(12)`` for
  narrow ones).
* a **vertically focusing bendable mirror** at grazing angle ``mirror_pitch`` (mrad), length
  ``L``. Its footprint accepts a beam height ``L theta``; together with the slit, the aperture is
  the soft minimum ``a = (g^-4 + (L theta)^-4)^(-1/4)``, so acceptance grows with pitch. Its
  reflectivity falls past the coating's critical angle: ``R = R0 / (1 + exp((theta - theta_c)/w))``.
  The bender sets the curvature ``kappa`` (``mirror_bender``, 1/km); the mirror images the source
  at ``1/q' = 2 kappa / theta - 1/p`` (meridional focusing), so the ideal bending is
  ``kappa* = theta (1/p + 1/q) / 2``: it moves with the pitch.
* a **horizontally focusing lens** (a compound refractive lens, CRL) whose longitudinal position
  ``focus`` (mm) puts its focus ``focus - focus_ideal`` off the sample. The lens absorbs more at
  its rim: a Gaussian beam of rms ``s`` passes ``sigma_a / sqrt(sigma_a^2 + s^2)``.

Spot size at the sample, per direction, as FWHM added in quadrature:

* the demagnified source, ``(q / p) FWHM_source``;
* mirror slope error, ``2 q sigma_slope`` (vertical);
* aberration growing with the illuminated aperture, ``k (s / s_ref)^2``;
* defocus, ``2.355 s |1 - q / q'|`` (a beam of rms ``s`` at the optic converging on a focus
  ``q'`` is that wide at ``q``): quadratic in the bender and focus errors;
* diffraction by the aperture, ``2.355 lambda q / (4 pi s)``: negligible except at the
  narrowest gaps.

``beam_size`` is the geometric mean of the horizontal and vertical FWHM (the side of a square
of the same area), ``flux = F0 T_h T_v(a) R(theta) T_lens``. Wide slits and a pitch near the
critical angle give the most flux and a large, aberrated spot; closing the slits trades flux for
a smaller spot. Maximum flux at a required spot is therefore an interior, constrained optimum:
bender and focus at their (pitch-dependent) ideals, pitch just below the reflectivity edge, slits
part-closed until the spot meets the requirement (:func:`true_optimum` finds it densely).

Noise: flux carries relative Gaussian noise (source and monochromator fluctuations) on top of
Poisson counting in the monitor; beam size carries relative Gaussian noise (profile fits).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from functools import lru_cache
from types import MappingProxyType
from typing import Any

import numpy as np
from ophyd import Component as Cpt
from ophyd import Device, DeviceStatus
from scipy.optimize import minimize
from scipy.special import erf
from scipy.stats import qmc

from simulators.errors import OutOfRangeError, SimulatedFaultError
from simulators.readout import ReadoutFaults, complete_after, noise_and_fault_rngs
from simulators.sas import Clock, SimClock, _CheckedSignal, _ResultSignal

__all__ = [
    "AXES",
    "DEFAULT_MODEL",
    "HARDWARE_LIMITS",
    "OpticsFaults",
    "OpticsModel",
    "SimBeamlineOptics",
    "optics_response",
    "true_optimum",
]

#: the five settable axes, in the order of every array of settings
AXES: tuple[str, ...] = ("mirror_pitch", "mirror_bender", "slit_h", "slit_v", "focus")

#: hardware limits (inclusive) of each axis: mrad, 1/km, mm, mm, mm
HARDWARE_LIMITS: Mapping[str, tuple[float, float]] = MappingProxyType({
    "mirror_pitch": (1.0, 6.0),
    "mirror_bender": (0.2, 1.5),
    "slit_h": (0.01, 3.0),
    "slit_v": (0.005, 1.0),
    "focus": (-20.0, 20.0),
})

_FWHM = 2.0 * math.sqrt(2.0 * math.log(2.0))


@dataclass(frozen=True)
class OpticsModel:
    """Constants of the simulated beamline (lengths in mm unless named otherwise).

    Attributes
    ----------
    flux0 : float
        Photons/s at the slits.
    sigma_beam_h, sigma_beam_v : float
        Rms beam size at the slits (mm).
    source_fwhm_h, source_fwhm_v : float
        Source FWHM (µm).
    p_h, q_h, p_v, q_v : float
        Source-to-optic and optic-to-sample distances (m) of the lens (h) and the mirror (v).
    mirror_length : float
        Mirror length (mm).
    critical_angle, edge_width : float
        Critical angle of the mirror coating and width of its reflectivity edge (mrad).
    reflectivity : float
        Reflectivity well below the critical angle.
    slope_error : float
        Rms mirror slope error (µrad).
    aberration_h, aberration_v : float
        Aberration FWHM (µm) at an illuminated rms of ``aberration_ref_h``/``_v`` (mm).
    lens_aperture : float
        Rms of the lens's Gaussian absorption aperture (mm).
    focus_ideal : float
        Lens position (mm) that focuses on the sample.
    wavelength : float
        X-ray wavelength (m); 1.03e-10 is 12 keV.
    """

    flux0: float = 2.0e12
    sigma_beam_h: float = 0.6
    sigma_beam_v: float = 0.04
    source_fwhm_h: float = 1000.0
    source_fwhm_v: float = 40.0
    p_h: float = 30.0
    q_h: float = 0.25
    p_v: float = 20.0
    q_v: float = 2.0
    mirror_length: float = 50.0
    critical_angle: float = 3.2
    edge_width: float = 0.25
    reflectivity: float = 0.9
    slope_error: float = 2.0
    aberration_h: float = 15.0
    aberration_ref_h: float = 0.3
    aberration_v: float = 12.0
    aberration_ref_v: float = 0.033
    edge_scatter: float = 100.0
    lens_aperture: float = 0.4
    focus_ideal: float = 2.5
    wavelength: float = 1.03e-10

    def ideal_bender(self, pitch: Any) -> Any:
        """Bender curvature (1/km) that focuses on the sample at ``pitch`` (mrad)."""
        return np.asarray(pitch) * (1.0 / self.p_v + 1.0 / self.q_v) / 2.0


DEFAULT_MODEL = OpticsModel()


def _settings_arrays(settings: Mapping[str, Any] | np.ndarray) -> list[np.ndarray]:
    if isinstance(settings, Mapping):
        missing = [a for a in AXES if a not in settings]
        if missing:
            raise KeyError(f"settings lack axes {missing}; optics_response needs all of {list(AXES)}")
        return [np.asarray(settings[a], dtype=np.float64) for a in AXES]
    arr = np.asarray(settings, dtype=np.float64)
    if arr.shape[-1:] != (len(AXES),):
        raise ValueError(f"settings array must be `... x {len(AXES)}` (axes {list(AXES)}); got {arr.shape=}")
    return [arr[..., j] for j in range(len(AXES))]


def _rms_behind(gap: np.ndarray, sigma: float) -> np.ndarray:
    return (1.0 / sigma**2 + 12.0 / gap**2) ** -0.5


def optics_response(
    settings: Mapping[str, Any] | np.ndarray, model: OpticsModel = DEFAULT_MODEL
) -> tuple[np.ndarray, np.ndarray]:
    """Noise-free ``(flux, beam_size)`` of the beamline at ``settings``.

    Parameters
    ----------
    settings : Mapping[str, array_like] or np.ndarray
        ``{axis: value}`` for every axis of :data:`AXES` (values broadcast), or an array
        `... x 5` with the axes in :data:`AXES` order. Units: mrad, 1/km, mm, mm, mm.
    model : OpticsModel
        The beamline's constants.

    Returns
    -------
    flux, beam_size : np.ndarray
        Photons/s, and the geometric mean of the horizontal and vertical FWHM (µm), broadcast
        over the settings (0-d arrays for scalar settings).

    Examples
    --------
    >>> flux, size = optics_response({"mirror_pitch": 2.5, "mirror_bender": 0.66,
    ...                               "slit_h": 0.5, "slit_v": 0.3, "focus": 2.5})
    """
    pitch, bender, slit_h, slit_v, focus = _settings_arrays(settings)
    m = model
    # horizontal: slit, then the lens
    s_h = _rms_behind(slit_h, m.sigma_beam_h)
    t_h = erf(slit_h / (2.0 * math.sqrt(2.0) * m.sigma_beam_h))
    t_lens = m.lens_aperture / np.sqrt(m.lens_aperture**2 + s_h**2)
    defocus_h = _FWHM * s_h * 1e3 * np.abs(focus - m.focus_ideal) / (m.q_h * 1e3)  # µm
    fwhm_h = np.sqrt(
        (m.q_h / m.p_h * m.source_fwhm_h) ** 2
        + (m.aberration_h * (s_h / m.aberration_ref_h) ** 2) ** 2
        + defocus_h**2
        + (_FWHM * m.wavelength * m.q_h / (4 * math.pi * s_h * 1e-3) * 1e6) ** 2
    )
    # vertical: slit and mirror footprint together set the aperture
    footprint = m.mirror_length * pitch * 1e-3  # mm of beam height the mirror accepts
    aperture = (slit_v**-4 + footprint**-4) ** -0.25
    s_v = _rms_behind(aperture, m.sigma_beam_v)
    # beam past the slit that misses the mirror hits its ends and scatters around the focus
    spill = 1.0 - erf(footprint / (2.0 * math.sqrt(2.0) * _rms_behind(slit_v, m.sigma_beam_v)))
    t_v = erf(aperture / (2.0 * math.sqrt(2.0) * m.sigma_beam_v))
    refl = m.reflectivity / (1.0 + np.exp((pitch - m.critical_angle) / m.edge_width))
    inv_image = 2.0 * bender / pitch - 1.0 / m.p_v  # 1/m: (1/km) / mrad = 1/m
    defocus_v = _FWHM * s_v * 1e3 * np.abs(1.0 - m.q_v * inv_image)  # µm
    fwhm_v = np.sqrt(
        (m.q_v / m.p_v * m.source_fwhm_v) ** 2
        + (2.0 * m.q_v * m.slope_error) ** 2  # µrad x m = µm
        + (m.aberration_v * (s_v / m.aberration_ref_v) ** 2) ** 2
        + (m.edge_scatter * spill) ** 2
        + defocus_v**2
        + (_FWHM * m.wavelength * m.q_v / (4 * math.pi * s_v * 1e-3) * 1e6) ** 2
    )
    flux = m.flux0 * t_h * t_lens * t_v * refl
    return flux, np.sqrt(fwhm_h * fwhm_v)


@lru_cache(maxsize=32)
def true_optimum(
    required_beam_size: float,
    limits: tuple[tuple[float, float], ...] | None = None,
    model: OpticsModel = DEFAULT_MODEL,
    *,
    n_starts: int = 64,
) -> tuple[dict[str, float], float, float]:
    """Maximum noise-free flux with ``beam_size <= required_beam_size``, found densely.

    A scrambled Sobol set of 8192 settings seeds ``n_starts`` SLSQP runs (from the best
    feasible points and from the least infeasible ones) on ``log(flux)`` with the constraint
    ``log(required) - log(beam_size) >= 0``; the best feasible result wins.

    Parameters
    ----------
    required_beam_size : float
        Largest acceptable beam size (µm).
    limits : tuple of (low, high) or None
        Per axis of :data:`AXES`; ``None``: :data:`HARDWARE_LIMITS`.
    model : OpticsModel
        The beamline's constants.
    n_starts : int
        Local optimisations run.

    Returns
    -------
    settings, flux, beam_size
        The optimum as ``{axis: value}``, its flux (photons/s) and beam size (µm).

    Raises
    ------
    ValueError
        If no setting within the limits meets the requirement.
    """
    box = np.array(limits if limits is not None else [HARDWARE_LIMITS[a] for a in AXES], dtype=float)
    lo, hi = box[:, 0], box[:, 1]
    span = hi - lo

    def unpack(u: np.ndarray) -> np.ndarray:
        return lo + span * np.clip(u, 0.0, 1.0)

    def neg_log_flux(u: np.ndarray) -> float:
        return -float(np.log(optics_response(unpack(u), model)[0]))

    def margin(u: np.ndarray) -> float:
        return float(np.log(required_beam_size) - np.log(optics_response(unpack(u), model)[1]))

    u0 = qmc.Sobol(len(AXES), seed=12345).random(8192)
    flux, size = optics_response(unpack(u0), model)
    feasible = size <= required_beam_size
    order = np.argsort(np.where(feasible, -flux, np.inf))
    starts = list(order[: n_starts // 2]) + list(np.argsort(size)[: n_starts - n_starts // 2])
    best: tuple[float, np.ndarray] | None = None
    for i in starts:
        res = minimize(neg_log_flux, u0[i], method="SLSQP", bounds=[(0.0, 1.0)] * len(AXES),
                       constraints=[{"type": "ineq", "fun": margin}], options={"maxiter": 300, "ftol": 1e-12})
        u = np.clip(res.x, 0.0, 1.0)
        if margin(u) >= -1e-9 and (best is None or -neg_log_flux(u) > best[0]):
            best = (-neg_log_flux(u), u)
    if best is None:
        raise ValueError(
            f"no setting within the limits gives beam_size <= {required_beam_size} µm (smallest "
            f"found {float(size.min()):.3g} µm); ask for a larger beam size"
        )
    x = unpack(best[1])
    f, s = optics_response(x, model)
    return {a: float(v) for a, v in zip(AXES, x, strict=True)}, float(f), float(s)


#: faults of the beam monitor (see :class:`simulators.readout.ReadoutFaults`)
OpticsFaults = ReadoutFaults


class SimBeamlineOptics(Device):
    """Five settable optics axes and a beam monitor reading flux and beam size.

    Setting an axis outside its hardware limits raises :class:`OutOfRangeError` (at once, in
    the caller). Each :meth:`trigger` reads the beam at the current settings for ``exposure``
    seconds: the monitor counts ``Poisson(flux * exposure * monitor_efficiency)``, the flux
    also carries relative noise ``flux_noise``, the beam size relative noise ``size_noise``. With
    ``name="optics"`` the data keys are ``optics_mirror_pitch`` ... ``optics_focus``,
    ``optics_flux``, ``optics_beam_size``, ``optics_beam_size_h``, ``optics_beam_size_v`` (the last
    two noise-free diagnostics are not read; see :func:`optics_response` for the model).

    Parameters
    ----------
    name : str
        Device name, the prefix of its data keys.
    model : OpticsModel
        The beamline's constants.
    limits : Mapping[str, tuple[float, float]] | None
        Hardware limits per axis; ``None``: :data:`HARDWARE_LIMITS`.
    flux_noise, size_noise : float
        Relative rms noise of the flux and the beam size readings.
    monitor_efficiency : float
        Counts per photon in the flux monitor (sets the Poisson part of the flux noise).
    seed : int
        Seed of the noise and, independently, of the faults.
    clock : Clock | None
        Time source; ``None``: a new :class:`~simulators.sas.SimClock`.
    faults : OpticsFaults | None
        Faults to inject; ``None``: none.
    """

    mirror_pitch = Cpt(_CheckedSignal, value=2.5, kind="normal")
    mirror_bender = Cpt(_CheckedSignal, value=0.7, kind="normal")
    slit_h = Cpt(_CheckedSignal, value=1.0, kind="normal")
    slit_v = Cpt(_CheckedSignal, value=0.2, kind="normal")
    focus = Cpt(_CheckedSignal, value=0.0, kind="normal")
    exposure = Cpt(_CheckedSignal, value=1.0, kind="config")
    flux = Cpt(_ResultSignal, value=float("nan"), kind="hinted")
    beam_size = Cpt(_ResultSignal, value=float("nan"), kind="hinted")

    def __init__(
        self,
        name: str = "optics",
        *,
        model: OpticsModel = DEFAULT_MODEL,
        limits: Mapping[str, tuple[float, float]] | None = None,
        flux_noise: float = 0.02,
        size_noise: float = 0.01,
        monitor_efficiency: float = 1e-7,
        seed: int = 0,
        clock: Clock | None = None,
        faults: OpticsFaults | None = None,
        **kwargs: Any,
    ) -> None:
        limits = dict(HARDWARE_LIMITS if limits is None else limits)
        _check_settings(limits, flux_noise, size_noise, monitor_efficiency)
        super().__init__(prefix="", name=name, **kwargs)
        self._model = model
        self._limits = MappingProxyType({a: (float(limits[a][0]), float(limits[a][1])) for a in AXES})
        self._noise = (float(flux_noise), float(size_noise), float(monitor_efficiency))
        self._clock: Clock = SimClock() if clock is None else clock
        self._faults = OpticsFaults() if faults is None else faults
        self.reseed(seed)
        now = self._clock.time()
        for axis in AXES:
            signal = getattr(self, axis)
            signal.checker = self._checker(axis)
            lo, hi = self._limits[axis]
            signal.put(float(np.clip(signal.get(), lo, hi)), timestamp=now)
            signal.subscribe(self._on_move, run=False)
        self.exposure.checker = _check_exposure

    @property
    def clock(self) -> Clock:
        """The device's time source."""
        return self._clock

    @property
    def model(self) -> OpticsModel:
        """The beamline's constants (the hidden truth of a demo)."""
        return self._model

    @property
    def limits(self) -> Mapping[str, tuple[float, float]]:
        """Hardware limits per axis (inclusive)."""
        return self._limits

    @property
    def faults(self) -> OpticsFaults:
        """The injected faults."""
        return self._faults

    @faults.setter
    def faults(self, faults: OpticsFaults) -> None:
        self._faults = faults

    def settings(self) -> dict[str, float]:
        """The current value of every axis."""
        return {a: float(getattr(self, a).get()) for a in AXES}

    def reseed(self, seed: int) -> None:
        """Restart the noise and fault random streams from ``seed`` (e.g. on resuming)."""
        self._rng, self._fault_rng = noise_and_fault_rngs(seed)

    def _checker(self, axis: str) -> Any:
        lo, hi = self._limits[axis]

        def check(value: Any) -> float:
            v = np.asarray(value, dtype=np.float64)
            if v.ndim != 0 or not (np.isfinite(v) and lo <= v <= hi):
                raise OutOfRangeError(
                    f"{self.name}.{axis} = {value!r} is outside its hardware limits [{lo}, {hi}]; "
                    "choose a value within them"
                )
            return float(v)

        return check

    def _on_move(self, **kwargs: Any) -> None:
        # a reading belongs to the settings it was taken at: a move invalidates it
        now = self._clock.time()
        self.flux.put(float("nan"), internal=True, timestamp=now)
        self.beam_size.put(float("nan"), internal=True, timestamp=now)

    def trigger(self) -> DeviceStatus:
        """Read flux and beam size at the current settings; fails on an injected error."""
        status = DeviceStatus(self)
        error_draw, nan_draw = self._fault_rng.uniform(size=2)
        if error_draw < self._faults.error_probability:
            status.set_exception(SimulatedFaultError(
                f"simulated beam-monitor fault on {self.name!r} "
                f"(error_probability={self._faults.error_probability})"))
            return status
        exposure = float(self.exposure.get())
        flux, size = (float(v) for v in optics_response(self.settings(), self._model))
        flux_noise, size_noise, efficiency = self._noise
        counts = self._rng.poisson(flux * exposure * efficiency)
        flux_read = counts / (exposure * efficiency) * (1.0 + flux_noise * self._rng.standard_normal())
        size_read = size * (1.0 + size_noise * self._rng.standard_normal())
        if nan_draw < self._faults.nan_probability:
            flux_read = size_read = float("nan")
        duration = exposure + self._faults.read_latency
        complete_after(status, self._clock, duration, lambda: self._publish(flux_read, size_read))
        return status

    def _publish(self, flux: float, size: float) -> None:
        now = self._clock.time()
        self.flux.put(flux, internal=True, timestamp=now)
        self.beam_size.put(size, internal=True, timestamp=now)


def _check_exposure(value: Any) -> float:
    t = np.asarray(value, dtype=np.float64)
    if t.ndim != 0 or not (np.isfinite(t) and 0.0 < t <= 3600.0):
        raise OutOfRangeError(f"exposure = {value!r} s must be a scalar in (0, 3600]")
    return float(t)


def _check_settings(limits: Mapping[str, tuple[float, float]], flux_noise: float, size_noise: float,
                    efficiency: float) -> None:
    missing = [a for a in AXES if a not in limits]
    if missing:
        raise ValueError(f"limits lack axes {missing}; give (low, high) for every one of {list(AXES)}")
    for axis in AXES:
        lo, hi = limits[axis]
        hw_lo, hw_hi = HARDWARE_LIMITS[axis]
        if not (np.isfinite(lo) and np.isfinite(hi) and hw_lo <= lo < hi <= hw_hi):
            raise ValueError(f"limits[{axis!r}] = {(lo, hi)} must satisfy {hw_lo} <= low < high <= {hw_hi}")
    for name, value in (("flux_noise", flux_noise), ("size_noise", size_noise)):
        if not (np.isfinite(value) and 0.0 <= value < 0.5):
            raise ValueError(f"{name} must be a relative rms in [0, 0.5); got {value}")
    if not (np.isfinite(efficiency) and efficiency > 0):
        raise ValueError(f"monitor_efficiency must be finite and > 0; got {efficiency=}")

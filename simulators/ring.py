"""A simulated storage ring: sextupole families in, dynamic and momentum acceptance out, by tracking.

The physics is :class:`RingModel`: a lattice built here and tracked with pyAT
(``accelerator-toolbox``, compiled symplectic integrators). The device :class:`SimStorageRing`
wraps it as ophyd signals (the five sextupole families to set; beam lifetime and injection
efficiency to read, with noise), so a bluesky RunEngine can drive it like a ring in machine-study
time.

Lattice. A 3 GeV ring of 20 identical double-bend achromat cells (the Chasman-Green cell: R.
Chasman, G. K. Green, E. M. Rowe, IEEE Trans. Nucl. Sci. 22, 1765 (1975)), 314 m round. The
geometry is ours, in the range of third-generation DBA rings such as SPEAR3 and the NSLS-II
cell (two 1.5 m bends of 9 degrees, a 4.8 m straight, quadrupoles of 0.15-0.35 m). The four
quadrupole strengths (:data:`QUADRUPOLES`) were matched by :func:`match_quadrupoles` (kept, and
tested, so they can be re-derived) for zero dispersion in the straights (an achromat) and ring
tunes (14.22, 5.31), away from low-order resonances (three conditions on four strengths: the
matcher starts from the shipped values and finds a neighbour of them). The natural chromaticity is about
(-19.6, -26.7).

Sextupoles. Five families per cell: ``SF`` and ``SD`` in the dispersive arc correct the
chromaticity; ``SH1``, ``SH2``, ``SH3`` in the dispersion-free straight do not change it (to
first order) but shape the nonlinear dynamics, and so the acceptances. The optimisation knobs
are :data:`KNOBS`: the three harmonic strengths and the two chromaticities; the chromatic
families follow from the linear chromaticity response (:meth:`RingModel.strengths`), as in the
control room.

Objectives, from one tracking call per setting (all particles at once, from the middle of a
straight, where the off-momentum closed orbit is zero to first order):

* **dynamic aperture** (mm^2, on momentum): particles on rays at ``n_angles`` angles in the
  upper half of the (x, y) plane, ``n_amplitudes`` each out to ``(max_x, max_y)``, each 1 um
  off the plane (a particle launched exactly at y = 0 never moves vertically, so coupling
  resonances could not lose it). Along a ray
  the aperture ends at the first lost particle; the boundary radius there is interpolated
  between the last survivor and that particle by the fraction of turns it survived, so the
  figure changes smoothly with the settings. The area is twice the half-plane polygon's.
* **momentum acceptance** (%): particles at ``+-delta`` (``n_delta`` values up to
  ``max_delta``), with the same rule; the acceptance is the smaller of the two sides (the
  Touschek lifetime is limited by the weaker one).

Readings derived from them: the Touschek-limited **lifetime**, a proxy scaling as the cube of
the momentum acceptance (``lifetime_at_3pct * (delta / 3 %)^3``; the Touschek integral's other
factors vary slowly in that range), and the **injection efficiency**, the fraction of a
Gaussian injected beam, ``injection_offset`` off axis, that falls inside the dynamic aperture.

A vacuum chamber (``+-chamber_x``, ``+-chamber_y``) is checked in every straight. A setting
whose linear optics are unstable is reported as such (nothing tracked); one that loses every
particle has zero apertures; neither raises.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

import at
import numpy as np
from ophyd import Component as Cpt
from ophyd import Device, DeviceStatus
from scipy.optimize import minimize

from simulators.errors import OutOfRangeError, SimulatedFaultError, SimulatorError
from simulators.readout import ReadoutFaults, complete_after, noise_and_fault_rngs
from simulators.sas import Clock, SimClock, _CheckedSignal, _ResultSignal

__all__ = [
    "CHROMATIC",
    "FAMILIES",
    "HARDWARE_LIMITS",
    "HARMONIC",
    "KNOBS",
    "N_CELLS",
    "QUADRUPOLES",
    "RingFaults",
    "RingModel",
    "RingResult",
    "SimStorageRing",
    "TrackingConfig",
    "build_cell",
    "match_quadrupoles",
]

N_CELLS = 20
ENERGY_EV = 3.0e9

#: matched quadrupole strengths k1 (1/m^2): see :func:`match_quadrupoles`
QUADRUPOLES: Mapping[str, float] = MappingProxyType({
    "QF1": 1.660238470615224,
    "QD1": -2.644656600407095,
    "QF2": 2.5844139192745095,
    "QD2": -2.02715978982966,
})
TARGET_TUNES = (14.22, 5.31)

#: the sextupole families, in the order of every array of strengths (h = k2 / 2, 1/m^3)
FAMILIES: tuple[str, ...] = ("SH1", "SH2", "SH3", "SF", "SD")
HARMONIC: tuple[str, ...] = ("SH1", "SH2", "SH3")
CHROMATIC: tuple[str, ...] = ("SF", "SD")
#: the optimisation knobs: harmonic strengths, then the horizontal and vertical chromaticity
KNOBS: tuple[str, ...] = (*HARMONIC, "chrom_x", "chrom_y")

#: power-supply limits of each family (inclusive), 1/m^3
HARDWARE_LIMITS: Mapping[str, tuple[float, float]] = MappingProxyType({
    "SH1": (-60.0, 60.0),
    "SH2": (-60.0, 60.0),
    "SH3": (-60.0, 60.0),
    "SF": (0.0, 250.0),
    "SD": (-250.0, 0.0),
})


def build_cell(
    sextupoles: Mapping[str, float] | None = None,
    quadrupoles: Mapping[str, float] = QUADRUPOLES,
    *,
    integrator_steps: int = 10,
    chamber: tuple[float, float] | None = (0.03, 0.012),
) -> at.Lattice:
    """One DBA cell (mirror-symmetric, starting in the middle of a straight), periodicity 20.

    ``sextupoles`` maps families to strengths (missing ones are 0); ``chamber`` is the half
    aperture (x, y) in metres checked at the straight's drifts (``None``: no chamber).
    """
    s = dict(sextupoles or {})
    unknown = set(s) - set(FAMILIES)
    if unknown:
        raise ValueError(f"unknown sextupole families {sorted(unknown)}; the families are {list(FAMILIES)}")
    theta = 2.0 * math.pi / (2 * N_CELLS)
    steps = int(integrator_steps)

    def sext(name: str) -> at.Element:
        return at.Sextupole(name, 0.2, float(s.get(name, 0.0)), NumIntSteps=steps)

    def quad(name: str, length: float) -> at.Element:
        return at.Quadrupole(name, length, float(quadrupoles[name]), NumIntSteps=steps)

    straight = at.Drift("DS", 2.4)
    if chamber is not None:
        straight.RApertures = np.array([-chamber[0], chamber[0], -chamber[1], chamber[1]])
    half = [
        straight, sext("SH1"), at.Drift("D1", 0.2), quad("QF1", 0.35), at.Drift("D2", 0.1),
        sext("SH2"), at.Drift("D2", 0.1), quad("QD1", 0.25), at.Drift("D3", 0.2), sext("SH3"),
        at.Drift("D4", 0.35),
        at.Dipole("B", 1.5, theta, 0.0, EntranceAngle=theta / 2, ExitAngle=theta / 2, NumIntSteps=steps),
        at.Drift("D5", 0.3), sext("SF"), at.Drift("D6", 0.2), quad("QF2", 0.35), at.Drift("D7", 0.2),
        sext("SD"), at.Drift("D8", 0.2), quad("QD2", 0.15),
    ]
    elements = half + [e.deepcopy() for e in reversed(half)]
    return at.Lattice(elements, name="beampilot-dba", energy=ENERGY_EV, periodicity=N_CELLS)


def _linear(cell: at.Lattice) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
    """Ring tunes, chromaticities and dispersion at the cell start; ``None`` if unstable."""
    m44, _ = at.find_m44(cell, 0.0)
    for plane in (slice(0, 2), slice(2, 4)):
        if not abs(np.trace(m44[plane, plane])) < 2.0 - 1e-9:
            return None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        _, ring_data, elem = cell.linopt4(refpts=[0], get_chrom=True)
    return ring_data.tune * N_CELLS, ring_data.chromaticity * N_CELLS, elem.dispersion[0]


def match_quadrupoles(tunes: tuple[float, float] = TARGET_TUNES, seed: int = 0) -> dict[str, float]:
    """Re-derive :data:`QUADRUPOLES`: an achromat with the given ring tunes (Nelder-Mead)."""
    names = tuple(QUADRUPOLES)
    target = np.asarray(tunes, dtype=float)

    def misfit(k: np.ndarray) -> float:
        lin = _linear(build_cell(quadrupoles=dict(zip(names, k, strict=True)), chamber=None))
        if lin is None:
            return 10.0 + float(np.sum(k**2)) * 1e-6
        tune, _, eta = lin
        return float(100.0 * (eta[0] ** 2 + eta[1] ** 2) + np.sum(((tune - target) / N_CELLS) ** 2))

    rng = np.random.default_rng(seed)
    start = np.array([QUADRUPOLES[n] for n in names])
    best = None
    for _ in range(8):
        res = minimize(misfit, start * rng.uniform(0.95, 1.05, len(names)), method="Nelder-Mead",
                       options={"maxiter": 4000, "xatol": 1e-11, "fatol": 1e-18})
        if best is None or res.fun < best.fun:
            best = res
        if best.fun < 1e-14:
            break
    return dict(zip(names, (float(v) for v in best.x), strict=True))


@dataclass(frozen=True)
class TrackingConfig:
    """How objectives are computed: particles, turns, grids and integrator steps.

    :meth:`cheap` (tests, the cheap benchmark, the demo's default) and :meth:`full` (a study)
    differ only in resolution.
    """

    n_turns: int = 512
    n_angles: int = 11
    n_amplitudes: int = 16
    max_x: float = 0.045
    max_y: float = 0.018
    n_delta: int = 24
    max_delta: float = 0.08
    integrator_steps: int = 10
    chamber_x: float = 0.05
    chamber_y: float = 0.02
    injection_offset: float = -0.008
    injection_sigma: tuple[float, float] = (0.0012, 0.0004)
    lifetime_at_3pct: float = 10.0  # hours

    def __post_init__(self) -> None:
        for name in ("n_turns", "n_angles", "n_amplitudes", "n_delta", "integrator_steps"):
            if int(getattr(self, name)) < (3 if name == "n_angles" else 2 if name != "n_turns" else 1):
                raise ValueError(f"TrackingConfig.{name}={getattr(self, name)} is too small")
        for name in ("max_x", "max_y", "max_delta", "chamber_x", "chamber_y", "lifetime_at_3pct"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value > 0):
                raise ValueError(f"TrackingConfig.{name}={value} must be finite and > 0")

    @classmethod
    def cheap(cls) -> TrackingConfig:
        """Tens of milliseconds per setting: 88 particles over 32 turns, 2 integrator steps."""
        return cls(n_turns=32, n_angles=7, n_amplitudes=8, n_delta=16, integrator_steps=2)

    @classmethod
    def full(cls) -> TrackingConfig:
        """A study-grade evaluation: 224 particles over 512 turns, 10 integrator steps."""
        return cls()

    @property
    def n_particles(self) -> int:
        return self.n_angles * self.n_amplitudes + 2 * self.n_delta


@dataclass(frozen=True)
class RingResult:
    """What tracking one setting gave. ``status``: ``"ok"``, ``"unstable"`` or ``"all_lost"``."""

    status: str
    da_area_mm2: float
    momentum_acceptance: float  # fraction (0.03 is 3 %)
    delta_plus: float
    delta_minus: float
    lifetime_h: float
    injection_efficiency: float
    tunes: tuple[float, float]
    chromaticity: tuple[float, float]
    boundary: np.ndarray = field(repr=False)  # (2, n_angles) x, y in metres

    @property
    def objectives(self) -> tuple[float, float]:
        """``(dynamic aperture mm^2, momentum acceptance %)``, both to be maximised."""
        return self.da_area_mm2, 100.0 * self.momentum_acceptance


class RingModel:
    """The ring's physics for one :class:`TrackingConfig`: knobs to strengths, strengths to results.

    Builds the lattice and the chromaticity response once; :meth:`evaluate` is a pure function
    of the strengths (same input, same result), cheap to send to another process.
    """

    def __init__(self, config: TrackingConfig | None = None) -> None:
        self.config = TrackingConfig.cheap() if config is None else config
        c = self.config
        self._chamber = (c.chamber_x, c.chamber_y)
        lin0 = _linear(self._cell({}))
        if lin0 is None:  # pragma: no cover - the matched lattice is tested to be stable
            raise SimulatorError("the bare lattice is unstable: QUADRUPOLES were edited; re-run match_quadrupoles")
        self.natural_chromaticity = lin0[1]
        response = []
        for fam in CHROMATIC:
            lin = _linear(self._cell({fam: 10.0}))
            response.append((lin[1] - lin0[1]) / 10.0)
        self._chrom_response = np.column_stack(response)  # d(chrom)/d(SF, SD)
        angles = np.linspace(0.0, math.pi, c.n_angles)
        self._angles = angles
        # amplitudes from 1/n to 1 of the ellipse (max_x, max_y) along each ray
        self._fractions = np.arange(1, c.n_amplitudes + 1) / c.n_amplitudes
        self._deltas = np.arange(1, c.n_delta + 1) / c.n_delta * c.max_delta
        rng = np.random.default_rng(20181)  # fixed: the injected beam is part of the model
        self._injected = rng.standard_normal((2, 4096)) * np.asarray(c.injection_sigma)[:, None]
        self._injected[0] += c.injection_offset

    def _cell(self, strengths: Mapping[str, float]) -> at.Lattice:
        return build_cell(strengths, integrator_steps=self.config.integrator_steps, chamber=self._chamber)

    def strengths(self, knobs: Mapping[str, float] | Sequence[float]) -> dict[str, float]:
        """Family strengths for knobs (harmonic strengths and target chromaticities)."""
        k = _as_vector(knobs, KNOBS)
        chrom_target = k[3:5]
        sf_sd = np.linalg.solve(self._chrom_response, chrom_target - self.natural_chromaticity)
        values = dict(zip(HARMONIC, (float(v) for v in k[:3]), strict=True))
        values.update(zip(CHROMATIC, (float(v) for v in sf_sd), strict=True))
        return {f: values[f] for f in FAMILIES}

    def limit_violation(self, strengths: Mapping[str, float]) -> float:
        """How far the strengths lie outside :data:`HARDWARE_LIMITS`, relative to each range (<= 0 inside)."""
        worst = -math.inf
        for fam in FAMILIES:
            lo, hi = HARDWARE_LIMITS[fam]
            v = float(strengths[fam])
            worst = max(worst, (lo - v) / (hi - lo), (v - hi) / (hi - lo))
        return worst

    def evaluate(self, strengths: Mapping[str, float] | Sequence[float]) -> RingResult:
        """Track one setting of the five families."""
        s = dict(zip(FAMILIES, (float(v) for v in _as_vector(strengths, FAMILIES)), strict=True))
        c = self.config
        cell = self._cell(s)
        lin = _linear(cell)
        empty = np.zeros((2, c.n_angles))
        if lin is None:
            return RingResult("unstable", 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, (math.nan, math.nan),
                              (math.nan, math.nan), empty)
        tunes, chrom, _ = lin
        r_in = self._initial()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # pyAT warns about particles it loses: that is the point
            _, _, data = cell.track(r_in, nturns=c.n_turns * N_CELLS, losses=True, refpts=None)
        lost_turn = np.asarray(data["loss_map"]["turn"], dtype=float)
        survived = np.where(np.asarray(data["loss_map"]["islost"]), lost_turn / (c.n_turns * N_CELLS), 1.0)
        n_grid = c.n_angles * c.n_amplitudes
        grid = survived[:n_grid].reshape(c.n_angles, c.n_amplitudes)
        radius = np.array([_edge(self._fractions, row) for row in grid])  # fraction of the ellipse
        bx = radius * c.max_x * np.cos(self._angles)
        by = radius * c.max_y * np.sin(self._angles)
        area = abs(float(np.sum(bx[:-1] * by[1:] - bx[1:] * by[:-1])))  # 2 x half-polygon area / 2
        area_mm2 = area * 1e6
        d_plus = _edge(self._deltas, survived[n_grid:n_grid + c.n_delta])
        d_minus = _edge(self._deltas, survived[n_grid + c.n_delta:])
        acceptance = min(d_plus, d_minus)
        lifetime = c.lifetime_at_3pct * (acceptance / 0.03) ** 3
        efficiency = self._injection_efficiency(radius)
        status = "all_lost" if not np.any(survived >= 1.0) else "ok"
        return RingResult(status, area_mm2, acceptance, d_plus, d_minus, lifetime, efficiency,
                          (float(tunes[0]), float(tunes[1])), (float(chrom[0]), float(chrom[1])),
                          np.vstack([bx, by]))

    def _initial(self) -> np.ndarray:
        c = self.config
        n_grid = c.n_angles * c.n_amplitudes
        r = np.zeros((6, c.n_particles))
        rad = np.repeat(self._fractions[None, :], c.n_angles, axis=0)
        ang = np.repeat(self._angles[:, None], c.n_amplitudes, axis=1)
        r[0, :n_grid] = (rad * c.max_x * np.cos(ang)).ravel()
        r[2, :n_grid] = (rad * c.max_y * np.sin(ang)).ravel() + 1e-6  # a tiny y keeps coupling alive
        r[0, n_grid:] = 1e-5
        r[2, n_grid:] = 1e-6
        r[4, n_grid:n_grid + c.n_delta] = self._deltas
        r[4, n_grid + c.n_delta:] = -self._deltas
        return np.asfortranarray(r)

    def _injection_efficiency(self, radius: np.ndarray) -> float:
        c = self.config
        x, y = self._injected
        # normalised polar coordinates of the injected particles on the ellipse (max_x, max_y)
        u, v = x / c.max_x, np.abs(y) / c.max_y
        rho = np.hypot(u, v)
        phi = np.arctan2(v, u)
        inside = rho <= np.interp(phi, self._angles, radius)
        return float(np.mean(inside))


def _edge(amplitudes: np.ndarray, survived: np.ndarray) -> float:
    """Where survival along a ray ends: the last survivor before the first loss, interpolated
    towards the first lost particle by the fraction of turns it survived."""
    lost = np.flatnonzero(survived < 1.0)
    if lost.size == 0:
        return float(amplitudes[-1])
    j = int(lost[0])
    inner = float(amplitudes[j - 1]) if j > 0 else 0.0
    return inner + (float(amplitudes[j]) - inner) * float(survived[j])


def _as_vector(values: Mapping[str, float] | Sequence[float], names: Sequence[str]) -> np.ndarray:
    if isinstance(values, Mapping):
        missing = [n for n in names if n not in values]
        extra = [n for n in values if n not in names]
        if missing or extra:
            raise ValueError(f"need exactly {list(names)}; missing {missing}, unknown {extra}")
        vec = np.array([values[n] for n in names], dtype=float)
    else:
        vec = np.asarray(values, dtype=float).reshape(-1)
        if vec.size != len(names):
            raise ValueError(f"need {len(names)} values ({list(names)}), got {vec.size}")
    if not np.all(np.isfinite(vec)):
        raise ValueError(f"values for {list(names)} must be finite, got {vec.tolist()}")
    return vec


#: faults of the ring's lifetime and injection-efficiency readings (see
#: :class:`simulators.readout.ReadoutFaults`)
RingFaults = ReadoutFaults


class SimStorageRing(Device):
    """Five settable sextupole families; beam lifetime and injection efficiency to read.

    With ``name="ring"`` the data keys are ``ring_SH1`` ... ``ring_SD`` (strengths, 1/m^3),
    ``ring_lifetime`` (hours) and ``ring_injection_efficiency`` (0-1), both with relative noise,
    and the noise-free diagnostics ``ring_dynamic_aperture`` (mm^2) and
    ``ring_momentum_acceptance`` (%), which a real ring does not measure in routine operation
    (``kind="omitted"``, not read). Each :meth:`trigger` tracks the current setting (taking the
    tracking's wall time) and waits ``measure_time`` clock seconds (a lifetime measurement).

    Parameters
    ----------
    name
        Device name, the prefix of its data keys.
    config
        Tracking resolution (default :meth:`TrackingConfig.cheap`).
    lifetime_noise, efficiency_noise
        Relative rms noise of the two readings.
    measure_time
        Clock seconds per reading.
    seed, clock, faults
        As for the other simulated devices.
    """

    SH1 = Cpt(_CheckedSignal, value=0.0, kind="normal")
    SH2 = Cpt(_CheckedSignal, value=0.0, kind="normal")
    SH3 = Cpt(_CheckedSignal, value=0.0, kind="normal")
    SF = Cpt(_CheckedSignal, value=0.0, kind="normal")
    SD = Cpt(_CheckedSignal, value=0.0, kind="normal")
    lifetime = Cpt(_ResultSignal, value=float("nan"), kind="hinted")
    injection_efficiency = Cpt(_ResultSignal, value=float("nan"), kind="hinted")
    dynamic_aperture = Cpt(_ResultSignal, value=float("nan"), kind="omitted")
    momentum_acceptance = Cpt(_ResultSignal, value=float("nan"), kind="omitted")

    def __init__(
        self,
        name: str = "ring",
        *,
        config: TrackingConfig | None = None,
        lifetime_noise: float = 0.02,
        efficiency_noise: float = 0.01,
        measure_time: float = 10.0,
        seed: int = 0,
        clock: Clock | None = None,
        faults: RingFaults | None = None,
        **kwargs: Any,
    ) -> None:
        for label, value in (("lifetime_noise", lifetime_noise), ("efficiency_noise", efficiency_noise)):
            if not (math.isfinite(value) and 0.0 <= value < 0.5):
                raise ValueError(f"{label} must be a relative rms in [0, 0.5); got {value}")
        if not (math.isfinite(measure_time) and measure_time >= 0):
            raise ValueError(f"measure_time must be finite and >= 0 s; got {measure_time}")
        super().__init__(prefix="", name=name, **kwargs)
        self._model = RingModel(config)
        self._noise = (float(lifetime_noise), float(efficiency_noise))
        self._measure_time = float(measure_time)
        self._clock: Clock = SimClock() if clock is None else clock
        self._faults = RingFaults() if faults is None else faults
        self.reseed(seed)
        start = self._model.strengths({"SH1": 0.0, "SH2": 0.0, "SH3": 0.0, "chrom_x": 1.0, "chrom_y": 1.0})
        now = self._clock.time()
        for fam in FAMILIES:
            signal = getattr(self, fam)
            signal.checker = self._checker(fam)
            signal.put(start[fam], timestamp=now)
            signal.subscribe(self._on_move, run=False)

    @property
    def model(self) -> RingModel:
        """The ring's physics (the hidden truth of a demo)."""
        return self._model

    @property
    def clock(self) -> Clock:
        return self._clock

    @property
    def faults(self) -> RingFaults:
        return self._faults

    @faults.setter
    def faults(self, faults: RingFaults) -> None:
        self._faults = faults

    def strengths(self) -> dict[str, float]:
        """The current strength of every family."""
        return {f: float(getattr(self, f).get()) for f in FAMILIES}

    def reseed(self, seed: int) -> None:
        """Restart the noise and fault random streams from ``seed``."""
        self._rng, self._fault_rng = noise_and_fault_rngs(seed)

    def _checker(self, family: str) -> Any:
        lo, hi = HARDWARE_LIMITS[family]

        def check(value: Any) -> float:
            v = np.asarray(value, dtype=np.float64)
            if v.ndim != 0 or not (np.isfinite(v) and lo <= v <= hi):
                raise OutOfRangeError(
                    f"{self.name}.{family} = {value!r} is outside its power-supply limits [{lo}, {hi}] 1/m^3; "
                    "choose a value within them"
                )
            return float(v)

        return check

    def _on_move(self, **kwargs: Any) -> None:
        now = self._clock.time()
        for signal in (self.lifetime, self.injection_efficiency, self.dynamic_aperture, self.momentum_acceptance):
            signal.put(float("nan"), internal=True, timestamp=now)

    def trigger(self) -> DeviceStatus:
        """Track the current setting and read lifetime and injection efficiency."""
        status = DeviceStatus(self)
        error_draw, nan_draw = self._fault_rng.uniform(size=2)
        if error_draw < self._faults.error_probability:
            status.set_exception(SimulatedFaultError(
                f"simulated beam-loss monitor fault on {self.name!r} "
                f"(error_probability={self._faults.error_probability})"))
            return status
        result = self._model.evaluate(self.strengths())
        lt_noise, eff_noise = self._noise
        lifetime = result.lifetime_h * max(0.0, 1.0 + lt_noise * self._rng.standard_normal())
        efficiency = float(np.clip(result.injection_efficiency + eff_noise * self._rng.standard_normal(), 0.0, 1.0))
        if nan_draw < self._faults.nan_probability:
            lifetime = efficiency = float("nan")
        values = (lifetime, efficiency, result.da_area_mm2, 100.0 * result.momentum_acceptance)
        duration = self._measure_time + self._faults.read_latency
        complete_after(status, self._clock, duration, lambda: self._publish(values))
        return status

    def _publish(self, values: tuple[float, ...]) -> None:
        now = self._clock.time()
        signals = (self.lifetime, self.injection_efficiency, self.dynamic_aperture, self.momentum_acceptance)
        for signal, value in zip(signals, values, strict=True):
            signal.put(float(value), internal=True, timestamp=now)

"""A simulated small-angle scattering instrument: Poisson counts of ``I(Q)`` of a hidden sample.

The physics is :func:`expected_counts` (``mu = t * (flux * I(q) + dark_rate)``, with ``I`` from a
:class:`~models.sas.SASModel`, resolution smearing included) and :func:`count` (a Poisson draw).
:class:`SimSASInstrument` wraps them in an ophyd Device with a controllable clock and injectable
faults, so a bluesky RunEngine can drive it reproducibly with no hardware and no wall time.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any, Protocol

import numpy as np
from ophyd import Component as Cpt
from ophyd import Device, DeviceStatus, Signal
from ophyd.signal import InternalSignal
from ophyd.status import Status

from models.sas import SASModel
from simulators.errors import OutOfRangeError, SimulatedFaultError
from simulators.readout import complete_after

__all__ = [
    "Clock",
    "SASFaults",
    "SimClock",
    "SimSASInstrument",
    "WallClock",
    "count",
    "expected_counts",
]


def expected_counts(
    sample_model: SASModel,
    truth: Mapping[str, float],
    q: Any,
    exposure: Any,
    *,
    flux: float,
    dark_rate: float,
) -> np.ndarray:
    """Mean counts ``mu = t * (flux * I(q; truth) + dark_rate)``.

    Parameters
    ----------
    sample_model : SASModel
        The sample's scattering model (its resolution is the instrument's).
    truth : Mapping[str, float]
        The sample's true parameter values.
    q : array_like
        Scattering vectors, `n`, 1/Å.
    exposure : array_like
        Exposure time(s) in s: a scalar or `n`.
    flux, dark_rate : float
        Counts/s per 1/cm of intensity, and dark counts/s.

    Returns
    -------
    np.ndarray
        Expected counts, `n`.
    """
    q_arr = np.atleast_1d(np.asarray(q, dtype=np.float64))
    rate = flux * sample_model.intensity(q_arr, truth) + dark_rate
    return np.asarray(exposure, dtype=np.float64) * rate


def count(rng: np.random.Generator, expected: np.ndarray) -> np.ndarray:
    """Poisson counts with mean ``expected`` (same shape), as floats so a lost frame can be NaN."""
    return rng.poisson(expected).astype(np.float64)


class Clock(Protocol):
    """Time source of a simulated device. ``virtual`` clocks advance instantly on sleep."""

    virtual: bool

    def time(self) -> float: ...

    def sleep(self, dt: float) -> None: ...


class SimClock:
    """Virtual time: :meth:`sleep` advances it at once, so exposures take no wall time.

    Parameters
    ----------
    start : float | None
        Initial time (s since the epoch); ``None``: the wall time now, so timestamps look real.
    """

    virtual = True

    def __init__(self, start: float | None = None) -> None:
        self._now = time.time() if start is None else float(start)
        self._lock = threading.Lock()

    def time(self) -> float:
        """Current virtual time (s)."""
        return self._now

    def sleep(self, dt: float) -> None:
        """Advance the virtual time by ``dt >= 0`` seconds, instantly."""
        if not dt >= 0:
            raise ValueError(f"sleep needs dt >= 0 s; got {dt=}")
        with self._lock:
            self._now += float(dt)


class WallClock:
    """Real time, optionally accelerated: :meth:`sleep` really waits ``dt / speed`` seconds.

    A device sleeps on it in a background thread, so the RunEngine stays responsive.

    Parameters
    ----------
    speed : float
        Clock seconds per wall second (> 0); 1 is real time, 10 runs ten times faster.
    """

    virtual = False

    def __init__(self, speed: float = 1.0) -> None:
        if not (np.isfinite(speed) and speed > 0):
            raise ValueError(f"speed must be finite and > 0; got {speed=}")
        self.speed = float(speed)
        self._start = time.time()

    def time(self) -> float:
        """Clock time (s): the wall time at creation plus ``speed`` times the wall time since."""
        return self._start + (time.time() - self._start) * self.speed

    def sleep(self, dt: float) -> None:
        """Wait ``dt / speed`` wall seconds (``dt >= 0``)."""
        if not dt >= 0:
            raise ValueError(f"sleep needs dt >= 0 s; got {dt=}")
        time.sleep(dt / self.speed)


@dataclass(frozen=True)
class SASFaults:
    """Faults to inject, drawn from an rng seeded from the instrument's seed.

    Attributes
    ----------
    read_latency : float
        Clock seconds added to every reading, on top of the exposure.
    drop_probability : float
        Probability that a reading loses its frame: counts are NaN.
    error_probability : float
        Probability that a trigger fails with :class:`SimulatedFaultError`.
    """

    read_latency: float = 0.0
    drop_probability: float = 0.0
    error_probability: float = 0.0

    def __post_init__(self) -> None:
        if not (np.isfinite(self.read_latency) and self.read_latency >= 0):
            raise ValueError(f"read_latency must be finite and >= 0 s; got {self.read_latency=}")
        for name in ("drop_probability", "error_probability"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"{name} must be in [0, 1]; got {value}")


class _CheckedSignal(Signal):
    """A soft Signal whose value is checked, and normalised, by its device on every put/set.

    ``set`` checks synchronously, so a bad value raises inside the caller (the RunEngine) rather
    than failing a status later, and returns a finished Status (a soft signal moves at once).
    """

    checker: Callable[[Any], Any] | None = None

    def _normalise(self, value: Any) -> Any:
        return value if self.checker is None else self.checker(value)

    def check_value(self, value: Any) -> None:
        self._normalise(value)

    def put(self, value: Any, **kwargs: Any) -> None:
        super().put(self._normalise(value), **kwargs)

    def set(self, value: Any, *, timeout: float | None = None,
            settle_time: float | None = None) -> Status:
        # A soft setting takes effect at once: timeout and settle_time have nothing to bound.
        self.put(value)
        status = Status(obj=self)
        status.set_finished()
        return status

    def describe(self) -> dict[str, dict[str, Any]]:
        desc = super().describe()
        desc[self.name]["dtype_numpy"] = np.dtype(np.float64).str
        return desc


class _ResultSignal(InternalSignal):
    """Read-only (to users) float result; its descriptor names the numpy dtype."""

    def describe(self) -> dict[str, dict[str, Any]]:
        desc = super().describe()
        desc[self.name]["dtype_numpy"] = np.dtype(np.float64).str
        return desc


class SimSASInstrument(Device):
    """A small-angle scattering instrument counting ``I(Q)`` of a hidden sample.

    Set ``q`` (a scalar, or a 1D array of Q bins read in one exposure) and ``exposure``; each
    :meth:`trigger` counts for ``exposure`` seconds (Poisson noise, the instrument's rng) and
    advances the clock by ``exposure + faults.read_latency``. With ``name="sas"`` the data keys
    are ``sas_q``, ``sas_exposure``, ``sas_counts``, ``sas_beam_time``; ``sas_flux`` and
    ``sas_dark_rate`` go to the descriptor's configuration. ``beam_time`` (total exposure so far,
    s) is read with each event, not as configuration, because it changes at every reading and
    configuration is recorded once per descriptor. Do not change the shape of ``q`` within a
    run: the descriptor fixes the data shape.

    Parameters
    ----------
    name : str
        Device name, the prefix of its data keys.
    sample : SASModel
        The sample's scattering model (its ``dq_over_q`` is the instrument resolution).
    truth : Mapping[str, float]
        The sample's hidden parameter values.
    q_range : tuple[float, float]
        Reachable Q (1/Å), inclusive.
    max_exposure : float
        Longest exposure (s).
    flux : float
        Counts/s per 1/cm of intensity.
    dark_rate : float
        Dark (detector and room background) counts/s.
    seed : int
        Seed of the counting noise and, independently, of the faults.
    clock : Clock | None
        Time source; ``None``: a new :class:`SimClock`.
    faults : SASFaults | None
        Faults to inject; ``None``: none.
    """

    q = Cpt(_CheckedSignal, value=0.01, kind="normal")
    exposure = Cpt(_CheckedSignal, value=1.0, kind="normal")
    counts = Cpt(_ResultSignal, value=float("nan"), kind="hinted")
    beam_time = Cpt(_ResultSignal, value=0.0, kind="normal")
    flux = Cpt(_ResultSignal, value=1.0, kind="config")
    dark_rate = Cpt(_ResultSignal, value=0.0, kind="config")

    def __init__(
        self,
        name: str = "sas",
        *,
        sample: SASModel,
        truth: Mapping[str, float],
        q_range: tuple[float, float] = (0.003, 0.5),
        max_exposure: float = 600.0,
        flux: float = 100.0,
        dark_rate: float = 0.1,
        seed: int = 0,
        clock: Clock | None = None,
        faults: SASFaults | None = None,
        **kwargs: Any,
    ) -> None:
        _check_settings(q_range, max_exposure, flux, dark_rate)
        super().__init__(prefix="", name=name, **kwargs)
        self._sample = sample
        self._truth = MappingProxyType(dict(truth))
        sample.intensity(np.array([q_range[0]]), self._truth)  # fail now on a bad truth
        self._q_range = (float(q_range[0]), float(q_range[1]))
        self._max_exposure = float(max_exposure)
        self._clock: Clock = SimClock() if clock is None else clock
        self._faults = SASFaults() if faults is None else faults
        self.reseed(seed)
        now = self._clock.time()
        self.flux.put(float(flux), internal=True, timestamp=now)
        self.dark_rate.put(float(dark_rate), internal=True, timestamp=now)
        self.q.checker = self._check_q
        self.exposure.checker = self._check_exposure
        self.q.put(float(np.sqrt(q_range[0] * q_range[1])), timestamp=now)
        self.exposure.put(min(1.0, self._max_exposure), timestamp=now)
        self.q.subscribe(self._on_q_change, run=False)

    @property
    def clock(self) -> Clock:
        """The instrument's time source."""
        return self._clock

    @property
    def faults(self) -> SASFaults:
        """The injected faults."""
        return self._faults

    @property
    def q_range(self) -> tuple[float, float]:
        """Reachable Q (1/Å), inclusive."""
        return self._q_range

    def reseed(self, seed: int) -> None:
        """Restart the noise and fault random streams from ``seed`` (e.g. on resuming a run)."""
        noise_seq, fault_seq = np.random.SeedSequence(seed).spawn(2)
        self._rng = np.random.default_rng(noise_seq)
        self._fault_rng = np.random.default_rng(fault_seq)

    def _check_q(self, value: Any) -> float | np.ndarray:
        arr = np.asarray(value, dtype=np.float64)
        lo, hi = self._q_range
        if arr.ndim > 1 or arr.size == 0:
            raise OutOfRangeError(f"q must be a scalar or a non-empty 1D array; got {arr.shape=}")
        bad = ~(np.isfinite(arr) & (arr >= lo) & (arr <= hi))
        if np.any(bad):
            raise OutOfRangeError(
                f"q = {np.atleast_1d(arr)[np.atleast_1d(bad)][:5].tolist()} 1/Å is outside the "
                f"instrument's q_range [{lo}, {hi}]; choose q within it"
            )
        return float(arr) if arr.ndim == 0 else arr.copy()

    def _check_exposure(self, value: Any) -> float:
        t = np.asarray(value, dtype=np.float64)
        if t.ndim != 0 or not (np.isfinite(t) and 0.0 < t <= self._max_exposure):
            raise OutOfRangeError(
                f"exposure = {value!r} s must be a scalar in (0, {self._max_exposure}]"
            )
        return float(t)

    def _on_q_change(self, value: Any, **kwargs: Any) -> None:
        # Counts belong to the q they were taken at: a new q has no reading yet.
        empty = float("nan") if np.ndim(value) == 0 else np.full(np.shape(value), np.nan)
        self.counts.put(empty, internal=True, timestamp=self._clock.time())

    def trigger(self) -> DeviceStatus:
        """Count at the current ``q`` for ``exposure`` s; the status fails on an injected error."""
        status = DeviceStatus(self)
        error_draw, drop_draw = self._fault_rng.uniform(size=2)
        if error_draw < self._faults.error_probability:
            status.set_exception(
                SimulatedFaultError(
                    f"simulated detector fault on {self.name!r} "
                    f"(error_probability={self._faults.error_probability})"
                )
            )
            return status
        q, exposure = self.q.get(), self.exposure.get()
        mean = expected_counts(
            self._sample, self._truth, q, exposure,
            flux=self.flux.get(), dark_rate=self.dark_rate.get(),
        )
        counts = count(self._rng, mean)
        if drop_draw < self._faults.drop_probability:
            counts[:] = np.nan
        result = float(counts[0]) if np.ndim(q) == 0 else counts
        duration = exposure + self._faults.read_latency
        complete_after(status, self._clock, duration, lambda: self._publish(result, exposure))
        return status

    def _publish(self, result: Any, exposure: float) -> None:
        now = self._clock.time()
        self.counts.put(result, internal=True, timestamp=now)
        self.beam_time.put(self.beam_time.get() + exposure, internal=True, timestamp=now)


def _check_settings(
    q_range: tuple[float, float], max_exposure: float, flux: float, dark_rate: float
) -> None:
    lo, hi = q_range
    if not (np.isfinite(lo) and np.isfinite(hi) and 0 < lo < hi):
        raise ValueError(f"q_range must be finite with 0 < lo < hi (1/Å); got {q_range=}")
    if not (np.isfinite(max_exposure) and max_exposure > 0):
        raise ValueError(f"max_exposure must be finite and > 0 s; got {max_exposure=}")
    if not (np.isfinite(flux) and flux > 0):
        raise ValueError(f"flux must be finite and > 0 (counts/s per 1/cm); got {flux=}")
    if not (np.isfinite(dark_rate) and dark_rate >= 0):
        raise ValueError(f"dark_rate must be finite and >= 0 (counts/s); got {dark_rate=}")

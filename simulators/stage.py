"""A simulated sample stage with a SAXS area detector, over a ground-truth map of the sample.

The stage moves the sample under the beam in ``x`` and ``y`` (mm) at a fixed speed, one axis at
a time, so a move of ``(dx, dy)`` takes ``(|dx| + |dy|) / speed`` on the device's clock. At each
position the detector counts a frame: Poisson counts of
:func:`models.saxs2d.ring_intensity` ``* exposure``, the oriented ring of the sample there,
whose parameters come from the truth map (:mod:`simulators.maps`). A
:class:`~simulators.maps.FilmMap` gives all ring parameters; a scalar map (``"value"``) gives
the ring's ``intensity`` (times :attr:`ScalarRing.intensity_per_unit`) with the other ring
parameters fixed, so any map can be measured through frames and
:func:`models.saxs2d.reduce_frame`.

Like :class:`~simulators.sas.SimSASInstrument`, the device takes a controllable clock and fault
settings (lost frames, refused moves), so a RunEngine drives it reproducibly in tests.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
from ophyd import Component as Cpt
from ophyd import Device, DeviceStatus, Signal
from ophyd.signal import InternalSignal, InternalSignalError
from ophyd.status import Status

from models.saxs2d import DetectorGeometry, ring_intensity
from simulators.errors import OutOfRangeError, SimulatedFaultError
from simulators.maps import TruthMap
from simulators.readout import complete_after
from simulators.sas import Clock, SimClock

__all__ = [
    "RING_NAMES",
    "ScalarRing",
    "SimFrameDetector",
    "SimSampleStage",
    "StageFaults",
]

#: Map quantities that give every ring parameter (what a :class:`~simulators.maps.FilmMap` has).
RING_NAMES: tuple[str, ...] = ("peak_q", "width", "intensity", "orientation", "anisotropy")


@dataclass(frozen=True)
class StageFaults:
    """Faults to inject, drawn from rngs seeded from the stage's seed.

    Attributes
    ----------
    drop_probability : float
        Probability that a frame is lost: every pixel of its counts is NaN.
    refuse_probability : float
        Probability that a move is refused: its status fails with
        :class:`~simulators.errors.SimulatedFaultError` and the stage stays where it was.
    """

    drop_probability: float = 0.0
    refuse_probability: float = 0.0

    def __post_init__(self) -> None:
        for name in ("drop_probability", "refuse_probability"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"{name} must be in [0, 1]; got {name}={value!r}")


@dataclass(frozen=True)
class ScalarRing:
    """The ring measured over a scalar map: fixed parameters, intensity from the map's value.

    Attributes
    ----------
    peak_q, width : float
        Ring position and Gaussian radial sigma (1/Å).
    orientation : float
        Azimuth of maximum intensity (degrees).
    anisotropy : float
        Azimuthal modulation, in ``[0, 1)``.
    intensity_per_unit : float
        Ring count rate (counts/s) per unit of the map's ``"value"``: ``intensity =
        intensity_per_unit * value``.
    """

    peak_q: float = 0.04
    width: float = 0.0045
    orientation: float = 45.0
    anisotropy: float = 0.3
    intensity_per_unit: float = 1e4

    def __post_init__(self) -> None:
        if not (self.peak_q > 0 and self.width > 0 and math.isfinite(self.peak_q + self.width)):
            raise ValueError(f"peak_q and width must be finite and > 0; got {self.peak_q=}, "
                             f"{self.width=}")
        if not math.isfinite(self.orientation):
            raise ValueError(f"orientation must be finite (degrees); got {self.orientation=}")
        if not 0.0 <= self.anisotropy < 1.0:
            raise ValueError(f"anisotropy must be in [0, 1); got {self.anisotropy=}")
        if not (math.isfinite(self.intensity_per_unit) and self.intensity_per_unit > 0):
            raise ValueError(f"intensity_per_unit must be finite and > 0 (counts/s); got "
                             f"{self.intensity_per_unit=}")


class _FloatSignal(InternalSignal):
    """Read-only (to users) result; its descriptor names the numpy dtype and the units."""

    units: str | None = None

    def describe(self) -> dict[str, dict[str, Any]]:
        desc = super().describe()
        desc[self.name]["dtype_numpy"] = np.dtype(np.float64).str
        if self.units is not None:
            desc[self.name]["units"] = self.units
        return desc


class _ExposureSignal(Signal):
    """Exposure time (s): checked on every put/set; a set finishes at once."""

    checker: Callable[[Any], float] | None = None

    def put(self, value: Any, **kwargs: Any) -> None:
        super().put(value if self.checker is None else self.checker(value), **kwargs)

    def set(self, value: Any, *, timeout: float | None = None,
            settle_time: float | None = None) -> Status:
        # A soft setting takes effect at once: timeout and settle_time have nothing to bound.
        self.put(value)
        status = Status(obj=self)
        status.set_finished()
        return status

    def describe(self) -> dict[str, dict[str, Any]]:
        desc = super().describe()
        desc[self.name].update(dtype_numpy=np.dtype(np.float64).str, units="s")
        return desc


class _StageAxis(Signal):
    """One stage axis (mm): ``set`` moves it on the stage's clock; its value is the readback.

    Only :meth:`set` (``bps.mv``) moves it; ``put`` is the stage's own, to post the readback.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._travel_limits = (-math.inf, math.inf)

    @property
    def limits(self) -> tuple[float, float]:
        """Travel ``(low, high)`` in mm, inclusive."""
        return self._travel_limits

    @property
    def position(self) -> float:
        """Current position (mm)."""
        return float(self.get())

    def check_value(self, value: Any) -> None:
        self._checked(value)

    def _checked(self, value: Any) -> float:
        lo, hi = self._travel_limits
        if np.ndim(value) != 0 or isinstance(value, bool):
            raise OutOfRangeError(f"stage axis {self.attr_name!r} takes a scalar position in mm; "
                                  f"got {value!r}")
        target = float(value)
        if not (math.isfinite(target) and lo <= target <= hi):
            raise OutOfRangeError(
                f"stage axis {self.attr_name!r} cannot move to {target!r} mm: outside its "
                f"travel [{lo}, {hi}] mm; choose a position within it"
            )
        return target

    def put(self, value: Any, *, internal: bool = False, **kwargs: Any) -> None:
        if not internal:
            raise InternalSignalError(
                f"{self.name} is a motor: move it with set() (bps.mv), which takes time"
            )
        super().put(value, **kwargs)

    def set(self, value: Any, *, timeout: float | None = None,
            settle_time: float | None = None) -> Status:
        # Checked here, synchronously, so the RunEngine raises at once on a move out of travel.
        target = self._checked(value)
        stage = self.parent
        assert isinstance(stage, SimSampleStage)
        return stage._move(self, target)

    def describe(self) -> dict[str, dict[str, Any]]:
        desc = super().describe()
        desc[self.name].update(dtype_numpy=np.dtype(np.float64).str, units="mm")
        return desc


class _FrameSignal(InternalSignal):
    """A detector frame, `n x n` float counts; NaN before the first exposure or when lost."""

    def describe(self) -> dict[str, dict[str, Any]]:
        desc = super().describe()
        desc[self.name].update(dtype="array", shape=list(np.shape(self.get())),
                               dtype_numpy=np.dtype(np.float64).str, units="counts")
        return desc


class SimFrameDetector(Device):
    """The stage's SAXS area detector: :meth:`trigger` counts one frame at the stage's position.

    Only usable as the ``saxs`` component of a :class:`SimSampleStage`. Set ``exposure`` (s);
    read ``counts`` (`n x n`, inline in the event), ``exposure`` and ``beam_time`` (total
    exposure so far, s).
    """

    counts = Cpt(_FrameSignal, value=float("nan"), kind="normal")
    exposure = Cpt(_ExposureSignal, value=1.0, kind="normal")
    beam_time = Cpt(_FloatSignal, value=0.0, kind="normal")

    def trigger(self) -> DeviceStatus:
        """Count a frame for ``exposure`` s; the clock advances by the exposure."""
        stage = self.parent
        if not isinstance(stage, SimSampleStage):
            raise TypeError("SimFrameDetector works only as the saxs component of SimSampleStage")
        return stage._expose()


class SimSampleStage(Device):
    """An x/y sample stage under a SAXS beam, over a ground-truth map of the sample.

    With ``name="stage"`` the data keys are ``stage_x``, ``stage_y`` (mm), ``stage_saxs_counts``
    (the frame, `n x n`), ``stage_saxs_exposure`` (s) and ``stage_saxs_beam_time`` (s); the
    speed (mm/s) goes to the configuration. Read ``[stage]`` (or ``[stage.saxs, stage.x,
    stage.y]``) so each frame's event carries its position. Moving ``x`` or ``y`` (``bps.mv``)
    takes ``distance / speed`` on the clock; axes moved together go one after the other.
    Triggering ``stage`` or ``stage.saxs`` counts a frame at the current position.

    Parameters
    ----------
    name : str
        Device name, the prefix of its data keys.
    truth : TruthMap
        The sample: a map with the quantities of :data:`RING_NAMES` (e.g. a
        :class:`~simulators.maps.FilmMap`) or a scalar ``"value"`` (then ``scalar_ring``).
        Its extent is the stage's travel.
    geometry : DetectorGeometry | None
        The detector; ``None``: ``DetectorGeometry()`` (64 x 64, q_max 0.08 1/Å).
    speed : float
        Axis speed (mm/s), > 0.
    background : float
        Flat background of every frame (counts/s per pixel), >= 0.
    scalar_ring : ScalarRing | None
        The ring over a scalar map; ``None``: ``ScalarRing()``.
    max_exposure : float
        Longest exposure (s).
    seed : int
        Seed of the counting noise and, independently, of the move and frame faults.
    clock : Clock | None
        Time source; ``None``: a new :class:`~simulators.sas.SimClock`.
    faults : StageFaults | None
        Faults to inject; ``None``: none.

    Raises
    ------
    ValueError
        On a bad setting, or a truth map with neither the ring quantities nor ``"value"``.
    """

    x = Cpt(_StageAxis, value=0.0, kind="hinted")
    y = Cpt(_StageAxis, value=0.0, kind="hinted")
    saxs = Cpt(SimFrameDetector, "", kind="normal")
    speed = Cpt(_FloatSignal, value=1.0, kind="config")

    def __init__(
        self,
        name: str = "stage",
        *,
        truth: TruthMap,
        geometry: DetectorGeometry | None = None,
        speed: float = 1.0,
        background: float = 0.5,
        scalar_ring: ScalarRing | None = None,
        max_exposure: float = 60.0,
        seed: int = 0,
        clock: Clock | None = None,
        faults: StageFaults | None = None,
        **kwargs: Any,
    ) -> None:
        for label, value, low in (("speed", speed, 0.0), ("max_exposure", max_exposure, 0.0)):
            if not (math.isfinite(value) and value > low):
                raise ValueError(f"{label} must be finite and > 0; got {label}={value!r}")
        if not (math.isfinite(background) and background >= 0):
            raise ValueError(f"background must be finite and >= 0 (counts/s per pixel); got "
                             f"{background=}")
        super().__init__(prefix="", name=name, **kwargs)
        self._truth = truth
        self._scalar = _is_scalar(truth)
        self._geometry = DetectorGeometry() if geometry is None else geometry
        self._background = float(background)
        self._scalar_ring = ScalarRing() if scalar_ring is None else scalar_ring
        self._max_exposure = float(max_exposure)
        self._clock: Clock = SimClock() if clock is None else clock
        self._faults = StageFaults() if faults is None else faults
        self._motion_lock = threading.Lock()
        self._travel = 0.0
        self._move_time = 0.0
        self.reseed(seed)
        x0, x1, y0, y1 = truth.extent
        now = self._clock.time()
        self.x._travel_limits = (float(x0), float(x1))
        self.y._travel_limits = (float(y0), float(y1))
        self.x.put((x0 + x1) / 2.0, internal=True, timestamp=now)
        self.y.put((y0 + y1) / 2.0, internal=True, timestamp=now)
        self.speed.units = "mm/s"
        self.speed.put(float(speed), internal=True, timestamp=now)
        self.saxs.beam_time.units = "s"
        self.saxs.exposure.checker = self._check_exposure
        self.saxs.exposure.put(min(1.0, self._max_exposure), timestamp=now)
        self.saxs.counts.put(np.full(self._geometry.shape, np.nan), internal=True, timestamp=now)
        self.ring_parameters(x0, y0)  # fail now on a map the detector cannot measure

    @property
    def truth(self) -> TruthMap:
        """The sample's ground-truth map."""
        return self._truth

    @property
    def geometry(self) -> DetectorGeometry:
        """The detector geometry."""
        return self._geometry

    @property
    def clock(self) -> Clock:
        """The stage's time source."""
        return self._clock

    @property
    def faults(self) -> StageFaults:
        """The injected faults."""
        return self._faults

    @property
    def travel(self) -> float:
        """Total distance moved so far (mm), summed over both axes."""
        return self._travel

    @property
    def move_time(self) -> float:
        """Total clock time spent moving so far (s)."""
        return self._move_time

    def reseed(self, seed: int) -> None:
        """Restart the noise and fault random streams from ``seed`` (e.g. on resuming a run)."""
        noise, moves, frames = np.random.SeedSequence(seed).spawn(3)
        self._rng = np.random.default_rng(noise)
        self._move_fault_rng = np.random.default_rng(moves)
        self._frame_fault_rng = np.random.default_rng(frames)

    def ring_parameters(self, x: float, y: float) -> dict[str, float]:
        """Keyword arguments of :func:`models.saxs2d.ring_intensity` for the sample at ``(x, y)``.

        Parameters
        ----------
        x, y : float
            Position (mm), inside the map's extent.

        Returns
        -------
        dict[str, float]
            ``peak_q``, ``width``, ``intensity``, ``orientation_deg``, ``anisotropy``,
            ``background``.
        """
        values = {k: float(v) for k, v in self._truth.values(x, y).items()}
        if self._scalar:
            ring = self._scalar_ring
            return {"peak_q": ring.peak_q, "width": ring.width,
                    "intensity": ring.intensity_per_unit * values["value"],
                    "orientation_deg": ring.orientation, "anisotropy": ring.anisotropy,
                    "background": self._background}
        return {"peak_q": values["peak_q"], "width": values["width"],
                "intensity": values["intensity"], "orientation_deg": values["orientation"],
                "anisotropy": values["anisotropy"], "background": self._background}

    def trigger(self) -> DeviceStatus:
        """Count a frame (the ``saxs`` detector's trigger), so ``trigger_and_read([stage])``
        works."""
        return self._expose()

    def _check_exposure(self, value: Any) -> float:
        if np.ndim(value) != 0 or isinstance(value, bool):
            raise OutOfRangeError(f"exposure must be a scalar in (0, {self._max_exposure}] s; "
                                  f"got {value!r}")
        t = float(value)
        if not (math.isfinite(t) and 0.0 < t <= self._max_exposure):
            raise OutOfRangeError(f"exposure = {value!r} s must be a scalar in "
                                  f"(0, {self._max_exposure}]")
        return t

    def _move(self, axis: _StageAxis, target: float) -> Status:
        status = Status(obj=axis)
        if self._move_fault_rng.uniform() < self._faults.refuse_probability:
            status.set_exception(SimulatedFaultError(
                f"simulated stage fault: move of {axis.name!r} to {target} mm refused "
                f"(refuse_probability={self._faults.refuse_probability})"
            ))
            return status
        if self._clock.virtual:
            self._run_move(axis, target)
            status.set_finished()
        else:
            threading.Thread(target=self._move_in_thread, args=(status, axis, target),
                             daemon=True).start()
        return status

    def _move_in_thread(self, status: Status, axis: _StageAxis, target: float) -> None:
        try:
            self._run_move(axis, target)
        except Exception as exc:  # noqa: BLE001 - a failed move must fail the status, not vanish
            status.set_exception(exc)
        else:
            status.set_finished()

    def _run_move(self, axis: _StageAxis, target: float) -> None:
        # One axis at a time: a second move waits for the first (the lock), also on a WallClock.
        with self._motion_lock:
            distance = abs(target - axis.position)
            duration = distance / self.speed.get()
            self._clock.sleep(duration)
            axis.put(target, internal=True, timestamp=self._clock.time())
            self._travel += distance
            self._move_time += duration

    def _expose(self) -> DeviceStatus:
        detector = self.saxs
        status = DeviceStatus(detector)
        lost = self._frame_fault_rng.uniform() < self._faults.drop_probability
        exposure = float(detector.exposure.get())
        rate = ring_intensity(self._geometry, **self.ring_parameters(self.x.position,
                                                                       self.y.position))
        frame = self._rng.poisson(rate * exposure).astype(np.float64)
        if lost:
            frame[:] = np.nan
        complete_after(status, self._clock, exposure, lambda: self._publish(frame, exposure))
        return status

    def _publish(self, frame: np.ndarray, exposure: float) -> None:
        detector = self.saxs
        now = self._clock.time()
        detector.counts.put(frame, internal=True, timestamp=now)
        detector.beam_time.put(detector.beam_time.get() + exposure, internal=True, timestamp=now)


def _is_scalar(truth: Any) -> bool:
    """Whether the stage measures ``truth`` through its scalar ``"value"`` (else: ring maps)."""
    names = getattr(truth, "names", None)
    if names is None or not hasattr(truth, "values") or not hasattr(truth, "extent"):
        raise ValueError(f"truth must be a map with names, extent and values(); got {truth!r}")
    if set(RING_NAMES) <= set(names):
        return False
    if "value" in names:
        return True
    raise ValueError(
        f"truth map names {tuple(names)} have neither all of {RING_NAMES} nor 'value'; "
        "give a FilmMap-like or a scalar map"
    )

"""Tests of simulators.optics: the physics of flux and spot size, and the device under a RunEngine."""

from __future__ import annotations

import time

import bluesky.plans as bp
import numpy as np
import pytest
from bluesky import RunEngine
from bluesky.utils import FailedStatus

from simulators.errors import OutOfRangeError, SimulatedFaultError
from simulators.optics import (
    AXES,
    DEFAULT_MODEL,
    HARDWARE_LIMITS,
    OpticsFaults,
    SimBeamlineOptics,
    optics_response,
    true_optimum,
)
from simulators.sas import SimClock, WallClock

WINDOW = ((1.5, 4.0), (0.3, 1.0), (0.05, 3.0), (0.01, 0.5), (-10.0, 10.0))  # the demo's operating limits
GOOD = {"mirror_pitch": 2.4, "mirror_bender": float(DEFAULT_MODEL.ideal_bender(2.4)), "slit_h": 0.9,
        "slit_v": 0.13, "focus": DEFAULT_MODEL.focus_ideal}


def _at(**change: float) -> tuple[float, float]:
    flux, size = optics_response({**GOOD, **change})
    return float(flux), float(size)


@pytest.fixture
def RE():
    engine = RunEngine({}, context_managers=[])
    engine.docs = []
    engine.subscribe(lambda name, doc: engine.docs.append((name, doc)))
    return engine


def test_slits_trade_flux_for_spot_size():
    gaps = [0.1, 0.3, 0.9, 2.0]
    flux, size = zip(*(_at(slit_h=g) for g in gaps), strict=True)
    assert all(np.diff(flux) > 0) and all(np.diff(size) > 0)
    # wider still, the lens's rim absorbs more than the slit adds
    assert _at(slit_h=3.0)[0] < _at(slit_h=2.0)[0]
    vflux, vsize = zip(*(_at(slit_v=g) for g in (0.08, 0.13, 0.25, 0.4)), strict=True)
    assert all(np.diff(vflux) > 0) and all(np.diff(vsize) > 0)
    # a very narrow slit broadens the spot again: diffraction
    assert _at(slit_h=0.01)[1] > _at(slit_h=0.05)[1]


def test_reflectivity_falls_past_the_critical_angle_and_acceptance_grows_with_pitch():
    flux = {p: _at(mirror_pitch=p, mirror_bender=float(DEFAULT_MODEL.ideal_bender(p)), slit_v=1.0)[0]
            for p in (1.2, 2.4, 4.0)}
    assert flux[2.4] > flux[1.2]  # a larger footprint accepts more beam
    assert flux[4.0] < 0.2 * flux[2.4]  # well past the critical angle (3.2 mrad) little is reflected


def test_spot_grows_quadratically_away_from_the_ideal_bender_which_moves_with_pitch():
    for pitch in (2.0, 3.0):
        benders = np.linspace(0.3, 1.0, 141)
        sizes = [_at(mirror_pitch=pitch, mirror_bender=b)[1] for b in benders]
        assert benders[int(np.argmin(sizes))] == pytest.approx(float(DEFAULT_MODEL.ideal_bender(pitch)), abs=0.01)
    ideal = float(DEFAULT_MODEL.ideal_bender(2.4))
    fwhm = [_at(mirror_bender=ideal + d)[1] ** 2 for d in (0.0, 0.1, 0.2)]
    # size^2 = h * v and v^2 = v0^2 + (k d)^2: the excess of v^2 grows 4x when d doubles
    v2 = [(s / np.sqrt(fwhm[0])) ** 2 for s in fwhm]  # v^2 / v0^2 up to a constant h
    assert (v2[2] - v2[0]) / (v2[1] - v2[0]) == pytest.approx(4.0, rel=0.05)
    sizes = [_at(focus=f)[1] for f in np.linspace(-10, 10, 201)]
    assert np.linspace(-10, 10, 201)[int(np.argmin(sizes))] == pytest.approx(DEFAULT_MODEL.focus_ideal, abs=0.1)


def test_array_and_mapping_inputs_agree():
    X = np.array([[GOOD[a] for a in AXES], [2.0, 0.55, 0.5, 0.1, 0.0]])
    flux, size = optics_response(X)
    assert flux.shape == (2,) and float(flux[0]) == pytest.approx(_at()[0]) and float(size[0]) == pytest.approx(_at()[1])
    with pytest.raises(KeyError, match="lack axes"):
        optics_response({"mirror_pitch": 2.0})
    with pytest.raises(ValueError, match="x 5"):
        optics_response(np.zeros((2, 4)))


def test_the_constrained_optimum_is_interior_and_the_constraint_is_active():
    settings, flux, size = true_optimum(12.0, WINDOW)
    assert size == pytest.approx(12.0, rel=1e-6)  # active
    for (lo, hi), a in zip(WINDOW, AXES, strict=True):
        assert lo + 0.02 * (hi - lo) < settings[a] < hi - 0.02 * (hi - lo), f"{a}={settings[a]} at a limit"
    assert settings["mirror_bender"] == pytest.approx(float(DEFAULT_MODEL.ideal_bender(settings["mirror_pitch"])), abs=0.01)
    # better than every point of a dense random search that meets the requirement
    rng = np.random.default_rng(0)
    box = np.array(WINDOW)
    X = box[:, 0] + rng.uniform(size=(20000, 5)) * (box[:, 1] - box[:, 0])
    f, s = optics_response(X)
    assert flux >= f[s <= 12.0].max()
    # the unconstrained maximum is bigger and misses the requirement: the constraint matters
    wide = optics_response({**settings, "slit_h": 3.0, "slit_v": 0.5})
    assert float(wide[0]) > 1.2 * flux and float(wide[1]) > 12.0
    with pytest.raises(ValueError, match="no setting within the limits gives beam_size <= 1"):
        true_optimum(1.0, WINDOW, n_starts=4)


def test_device_reads_flux_and_beam_size_with_noise_around_the_model(RE):
    optics = SimBeamlineOptics("optics", seed=1, clock=SimClock(start=0.0))
    RE(bp.scan([optics], optics.slit_h, 0.3, 1.5, 5))
    events = [d for n, d in RE.docs if n == "event"]
    assert len(events) == 5
    for e in events:
        flux, size = optics_response({**optics.settings(), "slit_h": e["data"]["optics_slit_h"]})
        assert e["data"]["optics_flux"] == pytest.approx(float(flux), rel=0.1)
        assert e["data"]["optics_beam_size"] == pytest.approx(float(size), rel=0.05)
    assert optics.clock.time() == pytest.approx(5.0)  # 1 s exposure each, on the virtual clock
    again = SimBeamlineOptics("optics", seed=1, clock=SimClock(start=0.0))
    again.slit_h.set(0.3)
    again.trigger()
    assert again.flux.get() == events[0]["data"]["optics_flux"]  # seeded


def test_settings_outside_the_hardware_limits_are_refused_with_the_axis_named():
    optics = SimBeamlineOptics("optics")
    with pytest.raises(OutOfRangeError, match=r"optics.mirror_pitch = 9.0 is outside its hardware limits \[1.0, 6.0\]"):
        optics.mirror_pitch.set(9.0)
    with pytest.raises(OutOfRangeError, match="slit_v"):
        optics.slit_v.put(float("nan"))
    with pytest.raises(ValueError, match=r"limits\['focus'\]"):
        SimBeamlineOptics("optics", limits={**HARDWARE_LIMITS, "focus": (-50.0, 0.0)})
    with pytest.raises(ValueError, match="flux_noise"):
        SimBeamlineOptics("optics", flux_noise=-0.1)


def test_faults_give_nan_readings_and_failed_triggers(RE):
    optics = SimBeamlineOptics("optics", seed=2, faults=OpticsFaults(nan_probability=1.0))
    RE(bp.count([optics], 2))
    events = [d for n, d in RE.docs if n == "event"]
    assert all(np.isnan(e["data"]["optics_flux"]) and np.isnan(e["data"]["optics_beam_size"]) for e in events)
    optics.faults = OpticsFaults(error_probability=1.0)
    with pytest.raises(FailedStatus) as info:
        RE(bp.count([optics], 1))
    assert isinstance(info.value.__cause__, SimulatedFaultError)
    with pytest.raises(ValueError, match="nan_probability"):
        OpticsFaults(nan_probability=1.5)


def test_a_move_invalidates_the_last_reading_and_a_wall_clock_reads_in_the_background():
    optics = SimBeamlineOptics("optics", clock=WallClock(speed=100.0))
    optics.exposure.put(0.5)
    t0 = time.perf_counter()
    status = optics.trigger()
    status.wait(timeout=5)
    assert time.perf_counter() - t0 >= 0.004 and np.isfinite(optics.flux.get())
    optics.focus.set(1.0)
    assert np.isnan(optics.flux.get())

"""Tests of simulators.ring: the lattice, the tracked objectives, and the device under a RunEngine."""

from __future__ import annotations

import dataclasses

import at
import bluesky.plan_stubs as bps
import bluesky.plans as bp
import numpy as np
import pytest
from bluesky import RunEngine
from bluesky.utils import FailedStatus

from simulators.errors import OutOfRangeError, SimulatedFaultError
from simulators.ring import (
    FAMILIES,
    HARDWARE_LIMITS,
    N_CELLS,
    QUADRUPOLES,
    TARGET_TUNES,
    RingFaults,
    RingModel,
    SimStorageRing,
    TrackingConfig,
    build_cell,
    match_quadrupoles,
)
from simulators.sas import SimClock

START = {"SH1": 0.0, "SH2": 0.0, "SH3": 0.0, "chrom_x": 1.0, "chrom_y": 1.0}


@pytest.fixture(scope="module")
def model():
    return RingModel(TrackingConfig.cheap())


def test_the_bare_lattice_is_a_stable_achromat_with_the_matched_tunes():
    cell = build_cell()
    _, ring, elem = cell.linopt4(refpts=range(len(cell) + 1), get_chrom=True)
    np.testing.assert_allclose(ring.tune * N_CELLS, TARGET_TUNES, atol=1e-6)
    assert abs(elem.dispersion[0, 0]) < 1e-9 and abs(elem.dispersion[0, 1]) < 1e-9  # no dispersion in the straight
    assert elem.dispersion[:, 0].max() > 0.1  # but in the arc, where the chromatic sextupoles sit
    assert np.all(ring.chromaticity * N_CELLS < -15)  # natural chromaticity: strongly negative
    assert cell.circumference == pytest.approx(314.0)


def test_match_quadrupoles_rederives_an_achromat_with_the_tunes():
    # three conditions (dispersion-free straight, two tunes) on four quadrupoles: a family of
    # solutions, of which the shipped strengths are one; the matcher finds one near them
    matched = match_quadrupoles(tunes=(14.18, 5.35))
    _, ring, elem = build_cell(quadrupoles=matched).linopt4(refpts=[0])
    np.testing.assert_allclose(ring.tune * N_CELLS, (14.18, 5.35), atol=1e-5)
    assert abs(elem.dispersion[0, 0]) < 1e-6
    for name, k in QUADRUPOLES.items():
        assert matched[name] == pytest.approx(k, rel=0.1)


def test_the_chromaticity_knobs_set_the_chromaticity_and_leave_the_tunes(model):
    for target in ((1.0, 1.0), (3.5, 0.5)):
        s = model.strengths({**START, "chrom_x": target[0], "chrom_y": target[1]})
        result = model.evaluate(s)
        np.testing.assert_allclose(result.chromaticity, target, atol=1e-3)
        np.testing.assert_allclose(result.tunes, TARGET_TUNES, atol=0.03)
    # harmonic families sit where there is no dispersion: they leave the chromaticity alone
    a, b = model.strengths(START), model.strengths({**START, "SH1": 40.0, "SH3": -30.0})
    assert (a["SF"], a["SD"]) == pytest.approx((b["SF"], b["SD"]))


def test_objectives_come_from_tracking_and_respond_to_the_harmonics(model):
    start = model.evaluate(model.strengths(START))
    assert start.status == "ok"
    assert 50 < start.da_area_mm2 < 600 and 0.01 < start.momentum_acceptance < 0.08
    assert start.lifetime_h == pytest.approx(10.0 * (start.momentum_acceptance / 0.03) ** 3)
    assert 0.0 <= start.injection_efficiency <= 1.0
    bad = model.evaluate(model.strengths({**START, "SH1": 60.0, "SH2": -60.0, "SH3": 60.0}))
    assert bad.da_area_mm2 < 0.5 * start.da_area_mm2  # strong harmonics, badly set, shrink the aperture
    again = model.evaluate(model.strengths(START))
    assert again.da_area_mm2 == start.da_area_mm2  # a pure function of the setting


def test_the_boundary_agrees_with_pyat_acceptance_along_x(model):
    """Our one-call grid tracking against pyAT's own acceptance search, on the same lattice.

    Both start particles 1 um off the plane: without it, a particle launched exactly at y = 0
    never moves vertically and the sextupoles' coupling resonances cannot lose it."""
    c = model.config
    cfg = dataclasses.replace(c, n_angles=3, n_amplitudes=32)
    m = RingModel(cfg)
    s = m.strengths(START)
    ours = m.evaluate(s).boundary[0] * 1e3  # x of the rays at 0 and 180 degrees, mm
    cell = build_cell(s, integrator_steps=c.integrator_steps, chamber=(c.chamber_x, c.chamber_y))
    b, _, _ = at.get_1d_acceptance(cell, "x", resolution=c.max_x / 32, amplitude=c.max_x,
                                   nturns=c.n_turns * N_CELLS, grid_mode=at.GridMode.RADIAL,
                                   offset=[0.0, 0.0, 1e-6, 0.0, 0.0, 0.0])  # our 1 um vertical seed
    step = c.max_x / 32 * 1e3
    assert ours[0] == pytest.approx(b[1] * 1e3, abs=1.5 * step)
    assert ours[-1] == pytest.approx(b[0] * 1e3, abs=1.5 * step)


def test_unstable_and_lossy_settings_are_outcomes_not_errors(model):
    quads = dict(QUADRUPOLES, QF1=4.0)
    cell = build_cell(quadrupoles=quads, chamber=None)
    m44, _ = at.find_m44(cell, 0.0)
    assert abs(np.trace(m44[:2, :2])) > 2  # the test's premise: these optics are unstable
    unstable = RingModel(TrackingConfig.cheap())
    unstable._cell = lambda s: build_cell(s, quadrupoles=quads, chamber=None)
    result = unstable.evaluate(unstable.strengths(START))
    assert result.status == "unstable" and result.da_area_mm2 == 0 and result.lifetime_h == 0
    with pytest.raises(ValueError, match="missing"):
        model.evaluate({"SH1": 1.0})
    with pytest.raises(ValueError, match="finite"):
        model.strengths({**START, "chrom_x": float("nan")})


def test_tracking_config_validates():
    with pytest.raises(ValueError, match="n_angles"):
        TrackingConfig(n_angles=1)
    with pytest.raises(ValueError, match="max_x"):
        TrackingConfig(max_x=-1.0)
    assert TrackingConfig.full().n_particles > TrackingConfig.cheap().n_particles


def test_the_device_reads_lifetime_and_injection_efficiency_under_a_run_engine():
    RE = RunEngine({}, context_managers=[])
    docs = []
    RE.subscribe(lambda name, doc: docs.append((name, doc)))
    ring = SimStorageRing(config=TrackingConfig.cheap(), clock=SimClock(), seed=1)
    truth = ring.model.evaluate(ring.strengths())
    RE(bp.count([ring], num=2))
    events = [d for n, d in docs if n == "event"]
    assert len(events) == 2
    data = events[0]["data"]
    assert {f"ring_{f}" for f in FAMILIES} <= set(data)
    assert data["ring_lifetime"] == pytest.approx(truth.lifetime_h, rel=0.1)
    assert data["ring_injection_efficiency"] == pytest.approx(truth.injection_efficiency, abs=0.05)
    assert "ring_dynamic_aperture" not in data  # a diagnostic a real ring does not measure
    # moving a family invalidates the last reading
    RE(bps.mv(ring.SH1, 10.0))
    assert np.isnan(ring.lifetime.get())
    with pytest.raises(OutOfRangeError, match=r"ring.SH1 = 500.0 is outside its power-supply limits"):
        ring.SH1.set(500.0).wait(1)
    assert ring.strengths()["SH1"] == 10.0
    assert HARDWARE_LIMITS["SF"][0] <= ring.strengths()["SF"] <= HARDWARE_LIMITS["SF"][1]


def test_device_faults():
    ring = SimStorageRing(config=TrackingConfig.cheap(), clock=SimClock(), faults=RingFaults(nan_probability=1.0))
    ring.trigger().wait(5)
    assert np.isnan(ring.lifetime.get()) and np.isnan(ring.injection_efficiency.get())
    ring.faults = RingFaults(error_probability=1.0)
    with pytest.raises((SimulatedFaultError, FailedStatus)):
        ring.trigger().wait(5)
    with pytest.raises(ValueError, match="nan_probability"):
        RingFaults(nan_probability=2.0)


def test_a_setting_that_loses_every_particle_is_reported_as_such():
    # a chamber of a micrometre: every particle is lost in the first straight
    tiny_chamber = dataclasses.replace(TrackingConfig.cheap(), chamber_x=1e-6, chamber_y=1e-6)
    m = RingModel(tiny_chamber)
    result = m.evaluate(m.strengths(START))
    assert result.status == "all_lost"
    assert result.da_area_mm2 == 0 and result.momentum_acceptance == 0 and result.injection_efficiency == 0

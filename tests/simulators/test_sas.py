"""Tests of simulators.sas: the SAS instrument under a real bluesky RunEngine."""

from __future__ import annotations

import time

import bluesky.plan_stubs as bps
import bluesky.plans as bp
import numpy as np
import pytest
from bluesky import RunEngine
from bluesky.utils import FailedStatus
from ophyd.signal import InternalSignalError

from models.sas import SAMPLE_KINDS, SASModel
from simulators.errors import OutOfRangeError, SimulatedFaultError
from simulators.sas import (
    SASFaults,
    SimClock,
    SimSASInstrument,
    WallClock,
    count,
    expected_counts,
)

KIND = SAMPLE_KINDS["polydisperse_sphere"]
TRUTH = {"radius": 60.0, "radius_pd": 0.1, "scale": 0.01, "background": 0.02}
FLUX, DARK = 100.0, 0.1


@pytest.fixture(scope="module")
def sample() -> SASModel:
    return KIND.model(dq_over_q=0.05)


@pytest.fixture
def make(sample: SASModel):
    def _make(**kwargs: object) -> SimSASInstrument:
        kwargs = {"sample": sample, "truth": TRUTH, "flux": FLUX, "dark_rate": DARK, **kwargs}
        return SimSASInstrument("sas", **kwargs)

    return _make


@pytest.fixture
def RE():
    engine = RunEngine({}, context_managers=[])
    docs: list[tuple[str, dict]] = []
    engine.subscribe(lambda name, doc: docs.append((name, doc)))
    engine.docs = docs
    return engine


def events(docs: list[tuple[str, dict]]) -> list[dict]:
    return [doc for name, doc in docs if name == "event"]


def test_expected_counts_is_exposure_times_rate(sample: SASModel) -> None:
    q = np.array([0.01, 0.1])
    mu = expected_counts(sample, TRUTH, q, 3.0, flux=FLUX, dark_rate=DARK)
    np.testing.assert_allclose(mu, 3.0 * (FLUX * sample.intensity(q, TRUTH) + DARK))
    draws = count(np.random.default_rng(0), np.full(20_000, 7.5))
    assert draws.dtype == np.float64
    assert draws.mean() == pytest.approx(7.5, abs=4 * np.sqrt(7.5 / 20_000))
    assert draws.var() == pytest.approx(7.5, rel=0.05)


def test_count_plan_events_and_descriptor(make, RE, sample: SASModel) -> None:
    sas = make()
    RE(bps.mv(sas.q, 0.02, sas.exposure, 5.0))
    RE(bp.count([sas], num=3))
    (descriptor,) = [doc for name, doc in RE.docs if name == "descriptor"]
    keys = descriptor["data_keys"]
    assert {"sas_q", "sas_exposure", "sas_counts", "sas_beam_time"} == set(keys)
    assert keys["sas_counts"]["dtype"] == "number" and keys["sas_counts"]["shape"] == []
    assert descriptor["configuration"]["sas"]["data"] == {"sas_flux": FLUX, "sas_dark_rate": DARK}
    evs = events(RE.docs)
    assert [e["data"]["sas_q"] for e in evs] == [0.02] * 3
    assert [e["data"]["sas_exposure"] for e in evs] == [5.0] * 3
    assert [e["data"]["sas_beam_time"] for e in evs] == [5.0, 10.0, 15.0]
    mu = expected_counts(sample, TRUTH, 0.02, 5.0, flux=FLUX, dark_rate=DARK)[0]
    for e in evs:
        assert abs(e["data"]["sas_counts"] - mu) < 5 * np.sqrt(mu)


def test_list_scan_moves_q(make, RE) -> None:
    sas = make()
    RE(bp.list_scan([sas], sas.q, [0.01, 0.02, 0.05]))
    evs = events(RE.docs)
    assert [e["data"]["sas_q"] for e in evs] == [0.01, 0.02, 0.05]
    counts = [e["data"]["sas_counts"] for e in evs]
    assert counts[0] > counts[1] > counts[2]  # I(q) falls with q


def test_array_q_reads_one_count_per_bin(make, RE) -> None:
    sas = make()
    q = np.geomspace(0.01, 0.3, 7)
    RE(bps.mv(sas.q, q, sas.exposure, 2.0))
    assert np.isnan(sas.counts.get()).all() and sas.counts.get().shape == (7,)
    RE(bp.count([sas]))
    (descriptor,) = [doc for name, doc in RE.docs if name == "descriptor"]
    assert descriptor["data_keys"]["sas_q"]["shape"] == [7]
    assert descriptor["data_keys"]["sas_counts"] == {
        "source": "SIM:sas_counts", "dtype": "array", "shape": [7], "dtype_numpy": "<f8",
        "object_name": "sas",
    }
    (event,) = events(RE.docs)
    np.testing.assert_array_equal(event["data"]["sas_q"], q)
    assert np.all(np.isfinite(event["data"]["sas_counts"]))


def test_counts_are_poisson_around_the_expectation(make, sample: SASModel) -> None:
    sas = make(seed=11)
    sas.q.put(0.1)
    sas.exposure.put(2.0)
    mu = expected_counts(sample, TRUTH, 0.1, 2.0, flux=FLUX, dark_rate=DARK)[0]
    draws = []
    for _ in range(400):
        sas.trigger()
        draws.append(sas.counts.get())
    assert np.mean(draws) == pytest.approx(mu, abs=4 * np.sqrt(mu / 400))
    assert np.var(draws, ddof=1) == pytest.approx(mu, rel=0.25)


@pytest.mark.parametrize("bad", [0.9, 0.001, np.nan, -0.1, [0.01, 0.6], [[0.01]]])
def test_out_of_range_q_raises_from_the_run_engine(make, RE, bad: object) -> None:
    sas = make()
    with pytest.raises(OutOfRangeError, match="q"):
        RE(bps.mv(sas.q, bad))
    with pytest.raises(OutOfRangeError):
        sas.q.put(bad)
    assert sas.q.get() == pytest.approx(np.sqrt(0.003 * 0.5))


@pytest.mark.parametrize("bad", [0.0, -1.0, 601.0, np.inf])
def test_out_of_range_exposure_raises(make, RE, bad: float) -> None:
    sas = make()
    with pytest.raises(OutOfRangeError, match=r"exposure = .* must be a scalar in \(0, 600.0\]"):
        RE(bps.mv(sas.exposure, bad))


def test_results_are_read_only(make) -> None:
    sas = make()
    with pytest.raises(InternalSignalError):
        sas.counts.put(1.0)
    with pytest.raises(InternalSignalError):
        sas.flux.put(1.0)


def test_injected_error_fails_the_plan(make, RE) -> None:
    sas = make(faults=SASFaults(error_probability=1.0))
    with pytest.raises(FailedStatus) as info:
        RE(bp.count([sas]))
    assert isinstance(info.value.__cause__, SimulatedFaultError)
    assert "simulated detector fault" in str(info.value.__cause__)
    assert sas.beam_time.get() == 0.0


def test_injected_drop_gives_nan_counts(make, RE) -> None:
    sas = make(faults=SASFaults(drop_probability=1.0))
    RE(bp.count([sas], num=2))
    assert all(np.isnan(e["data"]["sas_counts"]) for e in events(RE.docs))


def test_faults_are_reproducible_and_independent_of_noise(make) -> None:
    def pattern(seed: int) -> list[bool]:
        sas = make(seed=seed, faults=SASFaults(drop_probability=0.5))
        out = []
        for _ in range(40):
            sas.trigger()
            out.append(bool(np.isnan(sas.counts.get())))
        return out

    first = pattern(3)
    assert first == pattern(3)
    assert 5 < sum(first) < 35
    assert first != pattern(4)


def test_sim_clock_advances_by_exposure_and_latency_without_wall_time(make, RE) -> None:
    clock = SimClock(start=1000.0)
    sas = make(clock=clock, faults=SASFaults(read_latency=0.5))
    wall = time.monotonic()
    RE(bps.mv(sas.exposure, 600.0))
    RE(bp.count([sas], num=3))
    assert clock.time() == pytest.approx(1000.0 + 3 * 600.5)
    assert time.monotonic() - wall < 5.0
    (event,) = events(RE.docs)[-1:]
    assert event["timestamps"]["sas_counts"] == pytest.approx(1000.0 + 3 * 600.5)


def test_wall_clock_exposure_takes_real_time(make) -> None:
    sas = make(clock=WallClock(speed=10.0))
    sas.exposure.put(0.5)
    start = time.monotonic()
    status = sas.trigger()
    status.wait(timeout=5)
    assert status.success
    assert 0.04 <= time.monotonic() - start < 2.0
    assert np.isfinite(sas.counts.get())


def test_reseed_restarts_the_noise(make) -> None:
    sas = make(seed=1)
    first = [sas.trigger() and sas.counts.get() for _ in range(5)]
    sas.reseed(1)
    assert [sas.trigger() and sas.counts.get() for _ in range(5)] == first
    sas.reseed(2)
    assert [sas.trigger() and sas.counts.get() for _ in range(5)] != first


@pytest.mark.parametrize(
    "kwargs",
    [{"drop_probability": 1.5}, {"error_probability": -0.1}, {"read_latency": -1.0}],
)
def test_faults_are_validated(kwargs: dict) -> None:
    with pytest.raises(ValueError, match=next(iter(kwargs))):
        SASFaults(**kwargs)


def test_instrument_settings_are_validated(make) -> None:
    with pytest.raises(ValueError, match="q_range"):
        make(q_range=(0.5, 0.1))
    with pytest.raises(ValueError, match="flux"):
        make(flux=-1.0)
    with pytest.raises(ValueError, match="unknown parameter"):
        make(truth={"radios": 50.0})

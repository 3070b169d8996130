"""SextupoleAgent through a real RunEngine and SimStorageRing: ramps, generations, NaN, gate, resume."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from agents.config import load_settings
from agents.errors import ConfigError
from agents.plans import POINT_KEY, steered_scan
from agents.safety import AxisLimits, SafetyConfig, SafetyGate
from agents.sextupole import (
    SextupoleAgent,
    SextupoleSettings,
    nearest_neighbour_path,
    ramp,
    response_from_model,
)
from simulators.ring import (
    FAMILIES,
    HARDWARE_LIMITS,
    RingFaults,
    RingModel,
    SimStorageRing,
    TrackingConfig,
)
from simulators.sas import SimClock

#: the agent's limits (and the gate's): steps tight enough that most moves need a ramp; SF's
#: upper limit cuts into the chromaticity box, so some individuals are out of limits
LIMITS = {"SH1": (-30.0, 30.0, 12.0), "SH2": (-30.0, 30.0, 12.0), "SH3": (-30.0, 30.0, 12.0),
          "SF": (90.0, 120.0, 6.0), "SD": (-160.0, -110.0, 6.0)}
KNOBS = {"SH1": (-25.0, 25.0), "SH2": (-25.0, 25.0), "SH3": (-25.0, 25.0), "chrom_x": (0.0, 6.0),
         "chrom_y": (0.0, 6.0)}
AXES = [f"ring_{f}" for f in FAMILIES]


@pytest.fixture
def clock():
    return SimClock(start=0.0)


@pytest.fixture
def ring(clock):
    return SimStorageRing(config=TrackingConfig.cheap(), clock=clock, seed=1)


def _gate(clock, limits=LIMITS) -> SafetyGate:
    gate = SafetyGate(SafetyConfig({"measure"}, {f"ring_{f}": AxisLimits(*v) for f, v in limits.items()}),
                      clock=clock.time)
    return gate  # steered_scan gives it the ring's strengths before the first step


def _settings(ring, **over) -> SextupoleSettings:
    base = {"hardware_limits": dict(HARDWARE_LIMITS),
            "families": {f: {"low": lo, "high": hi, "max_step": step} for f, (lo, hi, step) in LIMITS.items()},
            "knobs": KNOBS, "chromatic": response_from_model(ring.model).model_dump(mode="json"),
            "start": ring.strengths(), "pop_size": 8, "generations": 2, "seed": 2}
    return SextupoleSettings.model_validate({**base, **over})


def _scan(RE, agent, ring, gate, **kw):
    events = []
    token = RE.subscribe(lambda name, doc: events.append(doc) if name == "event" else None)
    try:
        RE(steered_scan(agent, [ring], {f"ring_{f}": getattr(ring, f) for f in FAMILIES}, gate=gate, **kw))
    finally:
        RE.unsubscribe(token)
    return events


def _individual_keys(events):
    return [e["data"][POINT_KEY] for e in events if ":ramp" not in e["data"][POINT_KEY]]


def test_ramp_and_path_keep_every_step_within_max_step():
    steps = ramp(np.array([0.0, 10.0]), np.array([25.0, 10.0]), np.array([10.0, 1.0]))
    np.testing.assert_allclose(steps, [[25 / 3, 10.0], [50 / 3, 10.0]])
    assert ramp(np.zeros(2), np.array([9.9, -0.99]), np.array([10.0, 1.0])).shape == (0, 2)  # allowed as is
    points = np.array([[9.0, 0.0], [1.0, 0.0], [0.0, 5.0]])
    assert nearest_neighbour_path(np.zeros(2), points, np.array([1.0, 10.0])) == [2, 1, 0]
    assert nearest_neighbour_path(None, points, np.ones(2)) == [0, 1, 2]


def test_the_response_from_the_model_gives_its_strengths():
    model = RingModel(TrackingConfig.cheap())
    response = response_from_model(model)
    settings = _settings(SimStorageRing(clock=SimClock(start=0.0)), chromatic=response.model_dump())
    knobs = np.array([[5.0, -3.0, 2.0, 1.5, 2.5]])
    expected = model.strengths(dict(zip(settings.knob_names, knobs[0], strict=True)))
    np.testing.assert_allclose(settings.strengths(knobs)[0], [expected[f] for f in FAMILIES], rtol=1e-9)


def test_closed_loop_ramps_within_the_gate_and_tells_whole_generations(RE, ring, clock, tmp_path):
    gate = _gate(clock)
    start = np.array([ring.strengths()[f] for f in FAMILIES])
    derived = []
    agent = SextupoleAgent(_settings(ring), tmp_path / "s.zarr", sinks=[lambda n, d: derived.append((n, d))])
    events = _scan(RE, agent, ring, gate)
    report = agent.report()
    # (a) nothing rejected, and every step the ring made (from where it was) is within max_step
    assert gate.report()["rejected"] == 0 and report["rejected_requests"] == 0
    X = np.vstack([start, [[e["data"][a] for a in AXES] for e in events]])
    assert np.all(np.abs(np.diff(X, axis=0)).max(axis=0) <= [LIMITS[f][2] for f in FAMILIES])
    assert np.all((X[1:] >= [LIMITS[f][0] for f in FAMILIES]) & (X[1:] <= [LIMITS[f][1] for f in FAMILIES]))
    ramps = len(events) - len(_individual_keys(events))
    assert ramps > 0 and report["ramp_points_measured"] == ramps
    # (b) whole generations told: measured and out-of-limits individuals together, each measured once
    archive = agent.optimizer.archive
    keys = _individual_keys(events)
    assert len(keys) == len(set(keys)) == report["evaluations"]
    out = report["infeasible"]["out_of_limits"]
    assert out > 0 and len(archive["F"]) == len(keys) + out
    assert Counter(archive["generation"].tolist()) == {0: 8, 1: len(archive["F"]) - 8}
    assert np.sum(archive["G"] > 0) == out  # never sent, told as infeasible
    assert report["stop_reason"] == f"budget spent: 2 generations of a budget of 2 ({len(keys)} individuals measured)"
    assert report["pareto_front"] and report["hypervolume"] > 0
    for point in report["pareto_front"]:
        assert all(LIMITS[f][0] <= point["settings"][f"ring_{f}"] <= LIMITS[f][1] for f in FAMILIES)
        assert point["lifetime"] > 0 and 0 < point["injection_efficiency"] <= 1
    # a derived run: one summary event per generation told, the last one the report's
    assert derived[0][0] == "start" and derived[-1][0] == "stop"
    summaries = [d["data"] for n, d in derived if n == "event"]
    assert [s["generation"] for s in summaries] == [1, 2]
    assert summaries[-1]["hypervolume"] == pytest.approx(report["hypervolume"])


def test_a_lost_reading_is_measured_again_with_the_same_key(RE, ring, clock, tmp_path):
    ring.faults = RingFaults(nan_probability=0.3)
    agent = SextupoleAgent(_settings(ring, generations=1, max_retries=4), tmp_path / "s.zarr")
    events = _scan(RE, agent, ring, _gate(clock))
    lost = [e for e in events if np.isnan(e["data"]["ring_lifetime"]) and ":ramp" not in e["data"][POINT_KEY]]
    assert lost, "the fault setting should have lost some readings"
    first = lost[0]
    again = [e for e in events if e["data"][POINT_KEY] == first["data"][POINT_KEY] and e["seq_num"] > first["seq_num"]]
    assert again, "the lost individual was asked for again with its key"
    errors = agent.report()["errors"]
    assert any(f"event seq_num {first['seq_num']}: ring_lifetime=nan, ring_injection_efficiency=nan" in e
               and "measured again" in e for e in errors)
    observed = agent.store.read("observations")
    individual = observed["kind"] == "individual"
    assert np.all(np.isfinite(observed["lifetime"][individual]))
    assert agent.report()["stop_reason"].startswith("budget spent: 1 generations")


def test_a_rejected_request_is_reported_and_its_individuals_are_not_lost(RE, ring, clock, tmp_path):
    tight = {**LIMITS, "SH1": (-5.0, 30.0, 12.0)}  # the operator allows less than the agent thinks
    gate = _gate(clock, tight)
    agent = SextupoleAgent(_settings(ring, generations=1), tmp_path / "s.zarr")
    events = _scan(RE, agent, ring, gate, batch_size=3, max_rejected_rounds=20)
    report = agent.report()
    assert report["rejected_requests"] == gate.report()["rejected"] > 0
    assert report["infeasible"]["rejected"] > 0
    assert any("safety gate: " in e and "outside limits [-5.0, 30.0]" in e for e in report["errors"])
    outcomes = agent.store.read("outcomes")
    closed = {k for k, o in zip(outcomes["point_key"], outcomes["outcome"], strict=True) if o != "error"}
    batch = {k for k, o in zip(outcomes["point_key"], outcomes["outcome"], strict=True) if o == "rejected-batch"}
    measured = set(_individual_keys(events))
    assert batch and batch <= measured | closed  # asked again alone: measured, or rejected alone
    assert batch & measured, "innocent individuals of a rejected batch were measured later"
    assert len(agent.optimizer.archive["F"]) == len(measured) + len(closed - measured) == 8
    assert report["stop_reason"].startswith("budget spent")


def test_a_killed_agent_resumes_in_the_same_generation_without_measuring_twice(RE, ring, clock, tmp_path):
    settings = _settings(ring)
    gate = _gate(clock)
    agent = SextupoleAgent(settings, tmp_path / "s.zarr")
    first = _scan(RE, agent, ring, gate, batch_size=2, max_rounds=2)  # 4 of generation 0's 8
    pending = agent.pending()
    assert agent.optimizer.generation == 0 and len(pending) == 8 - 4 - agent.report()["infeasible"]["out_of_limits"]
    again = SextupoleAgent.resume(tmp_path / "s.zarr")
    assert again.settings == settings and again.optimizer.generation == 0 and again.pending() == pending
    assert again.n_observations == 4
    later = _scan(RE, again, ring, gate)  # the gate's positions are the daemon's to keep: same gate
    keys = _individual_keys(first + later)
    assert len(keys) == len(set(keys)) == again.n_observations
    assert gate.report()["rejected"] == 0
    assert again.report()["stop_reason"].startswith("budget spent: 2 generations")
    finished = SextupoleAgent.resume(tmp_path / "s.zarr")
    assert finished.optimizer.generation == 2 and finished.ask(4) == []
    np.testing.assert_array_equal(finished.optimizer.archive["F"], again.optimizer.archive["F"])


def test_bad_settings_are_refused_with_the_bad_value(ring, tmp_path):
    base = _settings(ring).model_dump(mode="json")
    with pytest.raises(ConfigError, match="unknown key 'pop_sise'"):
        load_settings(SextupoleSettings, {**base, "pop_sise": 8})
    wide = {**base["families"], "SF": {"low": 90.0, "high": 300.0, "max_step": 6.0}}
    with pytest.raises(ConfigError, match=r"families.SF: limits \[90.0, 300.0\] are outside the hardware limits"):
        load_settings(SextupoleSettings, {**base, "families": wide})
    with pytest.raises(ConfigError, match=r"knobs.SH2: bounds \(-40.0, 25.0\) are outside the family's limits"):
        load_settings(SextupoleSettings, {**base, "knobs": {**base["knobs"], "SH2": [-40.0, 25.0]}})
    with pytest.raises(ConfigError, match=r"knobs must bound exactly .* got \['SH1', 'SH2', 'SH3', 'chrom_x'\]"):
        load_settings(SextupoleSettings, {**base, "knobs": {k: v for k, v in base["knobs"].items() if k != "chrom_y"}})
    with pytest.raises(ConfigError, match="pop_size=7 must be even"):
        load_settings(SextupoleSettings, {**base, "pop_size": 7})
    with pytest.raises(ConfigError, match=r"start values \{'SD': -100.0\} are outside"):
        load_settings(SextupoleSettings, {**base, "start": {**base["start"], "SD": -100.0}})
    with pytest.raises(ConfigError, match=r"ml_config \{'n_cluster': 3\}"):
        load_settings(SextupoleSettings, {**base, "ml_config": {"n_cluster": 3}})
    with pytest.raises(ConfigError, match="families.SH1.max_step"):
        load_settings(SextupoleSettings, {**base, "families": {**base["families"], "SH1": {"low": -1, "high": 1,
                                                                                           "max_step": 0}}})
    with pytest.raises(ValueError, match="n >= 1"):
        SextupoleAgent(_settings(ring), tmp_path / "s.zarr").ask(0)


def test_the_daemon_builds_and_resumes_a_sextupole_agent(ring, tmp_path):
    from agents.daemon import build_agent
    from agents.daemon_config import AgentEntry

    settings = _settings(ring).model_dump(mode="json")
    settings.pop("name")
    entry = AgentEntry(kind="sextupole", name="sext1", settings=settings)
    agent = build_agent(entry, tmp_path, [])
    assert isinstance(agent, SextupoleAgent) and agent.name == "sext1"
    request = agent.ask(4)[0]
    assert request.plan == "measure" and set(request.kwargs["points"][0]) == set(AXES)
    again = build_agent(entry, tmp_path, [])  # the store exists: resumed, the same individuals pending
    assert again.pending() == agent.pending() and again.n_observations == 0
    # unmeasured, so asked again, from where the gate last moved (the end of the request): as the
    # process that was not restarted would ask
    resumed, uninterrupted = again.ask(4)[0], agent.ask(4)[0]
    assert resumed.kwargs["points"] == uninterrupted.kwargs["points"]
    assert [k for k in resumed.kwargs["point_keys"] if ":ramp" not in k] == \
        [k for k in uninterrupted.kwargs["point_keys"] if ":ramp" not in k]


def test_the_shipped_example_settings_match_the_simulated_ring():
    settings = load_settings(SextupoleSettings, str(Path(__file__).parents[2] / "deploy" / "sextupole.example.yaml"))
    model = RingModel(TrackingConfig.full())  # the ring at full integrator resolution
    X = np.array([[0.0, 0.0, 0.0, 1.0, 1.0], [10.0, -20.0, 30.0, 3.5, 0.5]])
    for x, s in zip(X, settings.strengths(X), strict=True):
        expected = model.strengths(dict(zip(settings.knob_names, x, strict=True)))
        np.testing.assert_allclose(s, [expected[f] for f in settings.families], atol=0.05)

"""TuningAgent through a real RunEngine: optimum, safety gate, NaN readings, infeasibility, resume."""

from __future__ import annotations

import threading
from collections import Counter

import numpy as np
import pytest
from bluesky.utils import RunEngineInterrupted

from agents.config import SafetySettings, load_settings
from agents.demo_tune import (
    OPERATING_LIMITS,
    TuneSetup,
    agent_settings,
    make_optics,
    run_tune_demo,
    safety_settings,
)
from agents.errors import ConfigError
from agents.plans import POINT_KEY, steered_scan
from agents.safety import SafetyGate
from agents.tuning import TuningAgent, TuningSettings, tune_function
from simulators.optics import AXES, OpticsFaults, optics_response, true_optimum
from simulators.sas import SimClock

#: a cheap acquisition: these tests check the loop's behaviour, the benchmark its efficiency
FAST = {"acq_restarts": 2, "acq_raw_samples": 48, "mc_samples": 32}
SETUP = TuneSetup(seed=11, required_beam_size=12.0, budget=14)


@pytest.fixture
def clock():
    return SimClock(start=0.0)


@pytest.fixture
def optics(clock):
    return make_optics(SETUP, clock, seed=5)


@pytest.fixture
def gate(clock):
    return SafetyGate(safety_settings().to_config(), clock=clock.time)


def _settings(**over) -> TuningSettings:
    return agent_settings(SETUP, {**FAST, **over})


def _scan(RE, agent, optics, gate, **kw):
    events = []
    token = RE.subscribe(lambda name, doc: events.append(doc) if name == "event" else None)
    try:
        RE(steered_scan(agent, [optics], {a: getattr(optics, a) for a in AXES}, gate=gate, **kw))
    finally:
        RE.unsubscribe(token)
    return events


def test_closed_loop_finds_a_good_feasible_setting_within_the_step_limits(RE, optics, gate, tmp_path):
    # three of the five axes (the mirror stays where it is): a small budget is enough
    moved = ("slit_h", "slit_v", "focus")
    agent = TuningAgent(_settings(n_initial=6, budget=12, axes={a: OPERATING_LIMITS[a] for a in moved}),
                        tmp_path / "s.zarr")
    events = _scan(RE, agent, optics, gate)
    report = agent.report()
    assert report["stop_reason"] == "budget spent: 12 evaluations of a budget of 12"
    fixed = {a: (v, v) for a, v in optics.settings().items() if a not in moved}
    limits = tuple(fixed.get(a, (OPERATING_LIMITS[a]["low"], OPERATING_LIMITS[a]["high"])) for a in AXES)
    _, best_flux, _ = true_optimum(12.0, limits)
    flux, size = optics_response({**optics.settings(), **report["recommendation"]["settings"]})
    assert float(size) <= 12.0 * 1.01 and float(flux) >= 0.8 * best_flux
    # one observation per event, each point measured once, no rejections: the agent kept to the steps
    keys = [e["data"][POINT_KEY] for e in events]
    assert sorted(agent.store.read("observations")["point_key"]) == sorted(keys)
    assert Counter(keys).most_common(1)[0][1] == 1
    assert gate.report()["rejected"] == 0
    X = np.array([[e["data"][f"optics_{a}"] for a in moved] for e in events])
    steps = np.abs(np.diff(X, axis=0)).max(axis=0)
    assert all(steps[j] <= OPERATING_LIMITS[a]["max_step"] for j, a in enumerate(moved))
    assert report["decisions"]["initial"] == 6 and report["errors"] == []


def test_gate_rejections_are_reported_to_the_agent_and_the_loop_goes_on(RE, optics, clock, tmp_path):
    tight = SafetySettings(limits={**OPERATING_LIMITS, "slit_h": {"low": 0.05, "high": 1.2, "max_step": 2.0}})
    gate = SafetyGate(tight.to_config(), clock=clock.time)
    agent = TuningAgent(_settings(budget=9), tmp_path / "s.zarr")
    _scan(RE, agent, optics, gate, max_rounds=9, max_rejected_rounds=20)
    rejected = [r for r in agent.report()["errors"] if "safety gate" in r]
    assert rejected and all("slit_h=" in r and "outside limits [0.05, 1.2]" in r for r in rejected)
    outcomes = agent.store.read("outcomes")
    refused_points = sum(len(v.request.kwargs["points"]) for v in gate.verdicts if not v.accepted)
    assert Counter(outcomes["outcome"])["rejected"] == refused_points == len(rejected)
    # the loop went on after the first rejection, and only admitted points were measured
    accepted = [v.accepted for v in gate.verdicts]
    assert True in accepted[accepted.index(False):]
    assert agent.n_observations == sum(len(v.request.kwargs["points"]) for v in gate.verdicts if v.accepted)
    assert not set(outcomes["point_key"]) & set(agent.store.read("observations")["point_key"])


def test_nan_readings_are_named_and_measured_again(RE, optics, gate, tmp_path):
    optics.faults = OpticsFaults(nan_probability=0.3)
    agent = TuningAgent(_settings(budget=10, n_initial=8), tmp_path / "s.zarr")
    events = _scan(RE, agent, optics, gate)
    lost = [e for e in events if np.isnan(e["data"]["optics_flux"])]
    assert lost, "the fault setting should have lost some readings"
    errors = agent.report()["errors"]
    first, run_uid = lost[0], agent.store.read("observations")["run_uid"][0]  # one run: the steered scan
    assert any(f"run {run_uid}, event seq_num {first['seq_num']}: optics_flux=nan, optics_beam_size=nan" in e
               and "measured again" in e for e in errors)
    measured = set(agent.store.read("observations")["point_key"])
    failed = {k for k, o in zip(*(agent.store.read("outcomes")[c] for c in ("point_key", "outcome")), strict=True)
              if o == "failed"}
    assert all(e["data"][POINT_KEY] in measured | failed for e in lost)  # retried with the same key
    assert agent.n_observations == 10


def test_a_requirement_that_cannot_be_met_stops_with_the_reason(RE, optics, gate, tmp_path):
    agent = TuningAgent(_settings(required_beam_size=5.0, budget=30, n_initial=6, infeasible_after=9),
                        tmp_path / "s.zarr")
    _scan(RE, agent, optics, gate)
    reason = agent.report()["stop_reason"]
    assert reason.startswith("constraint infeasible: no setting found meeting optics_beam_size <= 5 after 9 "
                             "evaluations; the model's highest probability of feasibility is ")
    assert "ask for a larger one" in reason
    assert agent.n_observations == 9 and agent.report()["recommendation"] is None


def test_resume_from_the_store_continues_without_repeating_points(RE, optics, gate, tmp_path):
    settings = _settings(budget=11)
    agent = TuningAgent(settings, tmp_path / "s.zarr")
    first = _scan(RE, agent, optics, gate, max_rounds=3)  # two rounds of the design (4 points each), one BO
    again = TuningAgent.resume(tmp_path / "s.zarr")
    assert again.settings == settings and again.n_observations == agent.n_observations == 9
    assert again.optimizer.state() == agent.optimizer.state()  # hyper-parameters to warm-start from
    later = _scan(RE, again, optics, gate)
    keys = [e["data"][POINT_KEY] for e in first + later]
    assert len(keys) == len(set(keys)) == 11
    assert again.report()["stop_reason"].startswith("budget spent")
    history = again.recommendation_history()
    assert [h["n_observations"] for h in history] == sorted({h["n_observations"] for h in history})


def test_an_aborted_run_leaves_pending_points_asked_for_first_with_their_keys(RE, optics, gate, tmp_path):
    agent = TuningAgent(_settings(budget=12, batch_size=4, n_initial=8), tmp_path / "s.zarr")
    seen = []

    def pause_after_three(name, doc):
        if name == "event":
            seen.append(doc)
            if len(seen) == 3:
                threading.Thread(target=RE.request_pause, kwargs={"defer": True}).start()

    token = RE.subscribe(pause_after_three)
    with pytest.raises(RunEngineInterrupted):
        RE(steered_scan(agent, [optics], {a: getattr(optics, a) for a in AXES}, gate=gate, batch_size=4))
    RE.abort()
    RE.unsubscribe(token)
    pending = agent.pending()
    assert pending and agent.n_observations == len(seen)
    request = agent.ask(4)[0]
    assert list(request.kwargs["point_keys"]) == pending[:4]
    agent.rejected(request, "refused by a test")
    assert agent.pending() == []


def test_bad_settings_are_refused_with_their_names(tmp_path):
    base = _settings().model_dump(mode="json")
    with pytest.raises(ConfigError, match="unknown key 'budgte'"):
        load_settings(TuningSettings, {**base, "budgte": 10})
    with pytest.raises(ConfigError, match="unknown key 'axes.slit_h.maxstep'"):
        load_settings(TuningSettings, {**base, "axes": {**base["axes"], "slit_h": {"low": 0.1, "high": 1, "maxstep": 1}}})
    with pytest.raises(ConfigError, match=r"start values \{'focus': 50.0\} are outside"):
        load_settings(TuningSettings, {**base, "start": {**{a: OPERATING_LIMITS[a]["low"] for a in AXES}, "focus": 50.0}})
    with pytest.raises(ConfigError, match="n_initial=8 exceeds budget=4"):
        load_settings(TuningSettings, {**base, "budget": 4})
    with pytest.raises(ValueError, match="n >= 1"):
        TuningAgent(_settings(), tmp_path / "s.zarr").ask(0)


def test_the_demo_writes_its_report(tmp_path):
    summary = run_tune_demo(tmp_path / "demo", seed=3, budget=9, progress=False, overrides=FAST)
    assert {p.name for p in (tmp_path / "demo").iterdir()} >= {"store.zarr", "convergence.png", "settings.png",
                                                               "summary.json"}
    assert summary["n_evaluations"] == 9 and summary["stop_reason"].startswith("budget spent")
    assert summary["true_optimum"]["beam_size"] == pytest.approx(12.0)
    assert summary["safety"]["admitted"] >= 3 and summary["safety"]["rejected"] == 0
    # resuming a finished demo adds nothing: the budget is spent
    again = run_tune_demo(tmp_path / "unused", resume=tmp_path / "demo" / "store.zarr", progress=False)
    assert again["n_evaluations"] == 9 and again["safety"]["admitted"] == 0


def test_a_short_demo_keeps_evaluations_for_the_optimizer_and_bad_settings_leave_no_store(tmp_path):
    assert [agent_settings(TuneSetup(seed=3, required_beam_size=12.0, budget=b)).n_initial
            for b in (4, 7, 10, 30)] == [2, 5, 8, 8]
    with pytest.raises(ConfigError, match="(?s)the demo's agent settings.*n_initial=9 exceeds budget=4"):
        run_tune_demo(tmp_path / "bad", budget=4, progress=False, overrides={"n_initial": 9})
    assert not (tmp_path / "bad" / "store.zarr").exists()  # so the same --out works once fixed
    summary = run_tune_demo(tmp_path / "bad", seed=3, budget=4, progress=False, overrides=FAST)
    assert summary["n_evaluations"] == 4


def test_model_decisions_search_near_the_recommendation(RE, optics, gate, tmp_path):
    agent = TuningAgent(_settings(budget=12, n_initial=6), tmp_path / "s.zarr")
    _scan(RE, agent, optics, gate)
    decisions, history = agent.store.read("decisions"), agent.recommendation_history()
    span = np.array([OPERATING_LIMITS[a]["high"] - OPERATING_LIMITS[a]["low"] for a in AXES])
    n_before, local = 0, 0
    for i, why in enumerate(decisions["why"]):
        if why == "initial":
            n_before += 1
            continue
        x = np.array([decisions[f"x:{a}"][i] for a in AXES])
        # the recommendation the decision was made from: the latest one at that many evaluations
        recs = [h for h in history if h["n_observations"] <= n_before]
        n_before += 1
        # by default every model decision with a recommendation to search around is local
        assert why.startswith("local-") == bool(recs)
        if recs:
            best = np.array([recs[-1]["settings"][a] for a in AXES])
            # inside the ball around it; a probe's box moves the ball's points up to limit_probe
            # inwards in each coordinate at a limit
            reach = agent.settings.local_radius
            if why.startswith("local-probe-"):
                reach += agent.settings.limit_probe * np.sqrt(len(AXES))
            assert np.linalg.norm((x - best) / span) <= reach + 1e-9
            local += 1
    assert local > 0


def test_a_recommendation_at_a_limit_is_probed_from_inside_every_other_step(tmp_path):
    # the optimum lies beyond x0's upper limit: the recommendation goes to the limit and stays
    axes = ["x0", "x1"]
    agent = TuningAgent({
        "axes": {a: {"low": 0.0, "high": 1.0} for a in axes}, "keys": {"objective": "y"},
        "log_objective": False, "objective_noise": 0.01, "budget": 16, "n_initial": 4, **FAST,
    }, tmp_path / "s.zarr")
    tune_function(agent, lambda p: {"y": -((p["x0"] - 1.3) ** 2) - (p["x1"] - 0.5) ** 2})
    decisions, history = agent.store.read("decisions"), agent.recommendation_history()
    whys = list(decisions["why"])
    probes, previous = 0, ""
    for i, why in enumerate(whys):
        if why == "initial":
            continue
        best = [h for h in history if h["n_observations"] <= i][-1]["settings"]
        at_limit = [a for a in axes if best[a] in (0.0, 1.0)]
        x = {a: decisions[f"x:{a}"][i] for a in axes}
        assert why.startswith("local-probe-") == bool(at_limit and not previous.startswith("local-probe-")), (i, why)
        if why.startswith("local-probe-"):
            probes += 1
            for a in at_limit:
                assert 0.1 - 1e-9 <= x[a] <= 0.9 + 1e-9, (a, x[a])  # at least limit_probe inside
        previous = why
    assert probes >= 2 and agent.recommendation()["settings"]["x0"] > 0.95


def test_the_design_starts_where_the_optics_are(RE, optics, gate, tmp_path):
    # the pitch sits at its low limit: a design around the middle of the limits is out of one step
    optics.mirror_pitch.set(OPERATING_LIMITS["mirror_pitch"]["low"]).wait()
    here = optics.settings()
    agent = TuningAgent(_settings(n_initial=4, budget=5), tmp_path / "s.zarr")
    events = _scan(RE, agent, optics, gate)
    assert gate.report()["rejected"] == 0 and len(events) == 5
    for a in AXES:
        first = events[0]["data"][f"optics_{a}"]
        assert abs(first - here[a]) <= OPERATING_LIMITS[a]["max_step"] / 2


def test_tune_function_names_a_missing_reading(tmp_path):
    settings = {"axes": {"x": {"low": 0.0, "high": 1.0}}, "keys": {"objective": "y"},
                "log_objective": False, "budget": 4, "n_initial": 2, **FAST}
    with pytest.raises(ValueError, match=r"without \['y'\]: it must return the agent's objective"):
        tune_function(TuningAgent(settings, tmp_path / "s.zarr"), lambda p: {"flux": 1.0})
    agent = TuningAgent(settings, tmp_path / "t.zarr")
    assert tune_function(agent, lambda p: {"y": -((p["x"] - 0.3) ** 2)}).n_observations == 4


def test_the_local_box_is_the_balls_and_a_step_limit_that_misses_it_searches_without_it(tmp_path):
    agent = TuningAgent({"axes": {"x": {"low": 0.0, "high": 1.0}, "z": {"low": -1.0, "high": 1.0}},
                         "keys": {"objective": "y"}, "log_objective": False, **FAST}, tmp_path / "s.zarr")
    whole = agent.bounds.copy()
    box, probe = agent._local_box(whole, np.array([0.5, 0.0]))
    assert not probe and np.allclose(box, [[0.25, -0.5], [0.75, 0.5]])  # radius 0.25 of each range
    box, probe = agent._local_box(whole, np.array([0.0, 1.0]))  # at x's low and z's high limits
    assert probe and np.allclose(box, [[0.1, 0.5], [0.25, 0.8]])  # at least 0.1 of each range inside
    assert agent._local_box(np.array([[0.0, -1.0], [0.1, 1.0]]), np.array([0.9, 0.0])) is None


def test_a_log_scale_axis_is_designed_modelled_and_stepped_in_decades(tmp_path):
    # a gap over three decades whose best value, 0.01, lies in the lowest 1% of its linear range
    settings = {"axes": {"gap": {"low": 1e-3, "high": 1.0, "scale": "log"}, "z": {"low": 0.0, "high": 1.0}},
                "keys": {"objective": "y"}, "log_objective": False, "objective_noise": 0.01,
                "budget": 14, "n_initial": 6, **FAST}
    agent = TuningAgent(settings, tmp_path / "s.zarr")
    assert np.allclose(agent.optimizer.bounds_np, [[np.log(1e-3), 0.0], [0.0, 1.0]])  # the model sees ln(gap)
    tune_function(agent, lambda p: {"y": -np.log(p["gap"] / 0.01) ** 2 - (p["z"] - 0.5) ** 2})
    decisions = agent.store.read("decisions")
    gaps = np.asarray(decisions["x:gap"])
    design = gaps[np.asarray(decisions["why"]) == "initial"]
    # spread over decades: a linear design puts 3% of its points below the geometric middle, 0.032
    assert np.sum(design < 0.0316) >= 2 and np.all((gaps >= 1e-3) & (gaps <= 1.0))
    assert 0.01 / 3 < agent.recommendation()["settings"]["gap"] < 0.01 * 3
    # the local ball's radius is a quarter of the axis's range in ln: a factor exp(0.25 ln 1000) = 5.6
    box, _ = agent._local_box(agent._zbounds, agent._to_z(np.array([0.01, 0.5])))
    assert np.allclose(np.exp(box[:, 0]), [0.01 / 1000**0.25, 0.01 * 1000**0.25])
    with pytest.raises(ConfigError, match="scale 'log' needs low > 0, got low=0.0"):
        TuningAgent({**settings, "axes": {"gap": {"low": 0.0, "high": 1.0, "scale": "log"}}}, tmp_path / "t.zarr")

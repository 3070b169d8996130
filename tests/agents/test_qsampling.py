import threading
from collections import Counter

import numpy as np
import pytest
from bluesky.utils import FailedStatus, RunEngineInterrupted
from event_model import DocumentNames, schema_validators

from agents.errors import AgentError, AgentStoreError
from agents.plans import POINT_KEY, steered_scan
from agents.qsampling import QSamplingAgent
from agents.store import AgentStore
from simulators.errors import SimulatedFaultError
from simulators.sas import SASFaults


def _scan(agent, instrument, gate, **kw):
    return steered_scan(agent, [instrument], {"q": instrument.q, "exposure": instrument.exposure}, gate=gate, **kw)


def _events(RE):
    events = []
    RE.subscribe(lambda name, doc: events.append(doc) if name == "event" else None)
    return events


def test_closed_loop_reaches_the_goal_and_recovers_the_hidden_size(RE, instrument, gate, settings, setup, tmp_path):
    agent = QSamplingAgent(settings, tmp_path / "s.zarr")
    events = _events(RE)
    RE(_scan(agent, instrument, gate))
    report = agent.report()
    assert report["stop_reason"].startswith("target precision reached")
    fit = report["fit"]
    assert fit["relative_sigma"]["radius"] <= 0.05
    assert abs(fit["values"]["radius"] - setup.truth["radius"]) < 4 * fit["sigmas"]["radius"]
    # every event is one observation in the store, and every decision was measured exactly once
    obs = agent.store.read("observations")
    assert sorted(obs["point_key"]) == sorted(e["data"][POINT_KEY] for e in events)
    assert Counter(obs["point_key"]).most_common(1)[0][1] == 1
    assert set(agent.store.read("decisions")["point_key"]) == set(obs["point_key"])
    assert report["exposure_total_s"] == pytest.approx(sum(e["data"]["sas_exposure"] for e in events))


def test_dropped_readings_are_named_and_measured_again(RE, setup, clock, gate, settings, tmp_path):
    from agents.demo_sas import make_instrument

    instrument = make_instrument(setup, clock, seed=3)
    instrument._faults = SASFaults(drop_probability=0.2)
    agent = QSamplingAgent(settings, tmp_path / "s.zarr")
    events = _events(RE)
    RE(_scan(agent, instrument, gate))
    dropped = [e for e in events if np.isnan(e["data"]["sas_counts"])]
    assert dropped, "the fault setting should have dropped some readings"
    errors = agent.report()["errors"]
    assert any("NaN or negative" in e and f"seq_num {dropped[0]['seq_num']}" in e for e in errors)
    # each dropped point was asked for again, with the same key, and then measured
    measured = set(agent.store.read("observations")["point_key"])
    assert all(e["data"][POINT_KEY] in measured for e in dropped)
    assert agent.report()["stop_reason"].startswith("target precision reached")


def test_detector_error_fails_the_run_and_a_new_run_continues_without_loss(RE, setup, clock, gate, settings, tmp_path):
    from agents.demo_sas import make_instrument

    instrument = make_instrument(setup, clock, seed=4)
    agent = QSamplingAgent(settings, tmp_path / "s.zarr")
    events = _events(RE)
    RE(_scan(agent, instrument, gate, max_rounds=4))
    instrument._faults = SASFaults(error_probability=1.0)
    with pytest.raises(FailedStatus) as info:
        RE(_scan(agent, instrument, gate))
    assert isinstance(info.value.__cause__, SimulatedFaultError)
    assert agent.pending(), "the point being measured when the detector failed stays pending"
    pending = {agent.store.read("decisions")["point_key"][i] for i in agent.pending()}
    instrument._faults = SASFaults()
    RE(_scan(agent, instrument, gate))
    keys = [e["data"][POINT_KEY] for e in events]
    assert len(keys) == len(set(keys)) and pending <= set(keys)


def test_abort_keeps_state_consistent_and_pending_points_come_first(RE, instrument, gate, settings, tmp_path):
    agent = QSamplingAgent(settings, tmp_path / "s.zarr")
    events = []

    def abort_after_five(name, doc):
        if name == "event":
            events.append(doc)
            if len(events) == 5:
                threading.Thread(target=RE.request_pause, kwargs={"defer": True}).start()

    token = RE.subscribe(abort_after_five)
    with pytest.raises(RunEngineInterrupted):
        RE(_scan(agent, instrument, gate))
    RE.abort()
    assert agent.n_observations == len(events)
    first_pending = [agent.store.read("decisions")["point_key"][i] for i in agent.pending()]
    assert first_pending
    RE.unsubscribe(token)
    later = _events(RE)
    RE(_scan(agent, instrument, gate))
    assert [e["data"][POINT_KEY] for e in later][: len(first_pending)] == first_pending
    keys = [e["data"][POINT_KEY] for e in events + later]
    assert len(keys) == len(set(keys))


def test_resume_from_the_store_restores_everything(RE, instrument, gate, settings, tmp_path):
    agent = QSamplingAgent(settings, tmp_path / "s.zarr")
    RE(_scan(agent, instrument, gate, max_rounds=5))
    again = QSamplingAgent.resume(tmp_path / "s.zarr")
    assert again.settings == settings
    assert again.n_observations == agent.n_observations and again.exposure_total == agent.exposure_total
    events = _events(RE)
    RE(_scan(again, instrument, gate))
    before = set(agent.store.read("observations")["point_key"])
    assert not before & {e["data"][POINT_KEY] for e in events}  # nothing measured twice
    assert again.report()["stop_reason"].startswith("target precision reached")


def test_a_store_of_another_agent_kind_is_refused(tmp_path):
    AgentStore(tmp_path / "s.zarr", "MappingAgent", {"t": {"x": "f8"}})
    with pytest.raises(AgentStoreError, match="'MappingAgent' agent, not a 'QSamplingAgent'"):
        QSamplingAgent.resume(tmp_path / "s.zarr")


def test_events_without_the_configured_keys_are_reported(RE, settings, tmp_path):
    import bluesky.plans as bp
    from ophyd.sim import det, motor

    agent = QSamplingAgent(settings.model_copy(update={"flux": 100.0, "dark_rate": 0.5}), tmp_path / "s.zarr")
    RE.subscribe(agent.tell)
    RE(bp.scan([det], motor, 0, 1, 2))
    assert agent.n_observations == 0
    assert "no data keys ['sas_q', 'sas_counts', 'sas_exposure']" in agent.report()["errors"][0]


def test_derived_fit_runs_validate_and_point_at_the_raw_run(RE, instrument, gate, settings, tmp_path):
    derived = []
    agent = QSamplingAgent(settings, tmp_path / "s.zarr", sinks=[type("Sink", (), {
        "__call__": lambda self, n, d: derived.append((n, d)), "close": lambda self: None})()])
    starts = []
    RE.subscribe(lambda n, d: starts.append(d) if n == "start" else None)
    RE(_scan(agent, instrument, gate))
    names = [n for n, _ in derived]
    assert names[0] == "start" and names[1] == "descriptor" and names[-1] == "stop" and "event" in names
    assert derived[0][1]["raw_run_uid"] == starts[0]["uid"]
    for name, doc in derived:
        schema_validators[DocumentNames[name]].validate(
            {k: (v.tolist() if hasattr(v, "tolist") else v) for k, v in doc.items()} if name != "event" else
            {**doc, "data": {k: float(v) for k, v in doc["data"].items()}})
    last = [d for n, d in derived if n == "event"][-1]["data"]
    assert last["radius_sigma"] / last["radius"] <= settings.target_rel_sigma


def test_ask_validates_its_argument(settings, tmp_path):
    agent = QSamplingAgent(settings, tmp_path / "s.zarr")
    with pytest.raises(ValueError, match="n >= 1"):
        agent.ask(0)
    # the survey needs no instrument constants, what comes after does
    survey = agent.ask(100)[0]
    assert survey.kwargs["points"][0]["q"] == settings.q_range[0]
    assert len(survey.kwargs["points"]) == settings.n_initial
    agent.rejected(survey, "refused by a test")  # closes them: not pending, not retried
    assert agent.pending() == []
    with pytest.raises(AgentError, match="flux and dark rate"):
        agent.ask(1)


def test_a_change_of_flux_between_runs_is_refused(RE, setup, clock, gate, settings, tmp_path):
    from agents.demo_sas import make_instrument

    agent = QSamplingAgent(settings, tmp_path / "s.zarr")
    RE(_scan(agent, make_instrument(setup, clock, seed=5), gate, max_rounds=1))
    brighter = make_instrument(setup, clock, seed=6)
    brighter.flux.put(2 * setup.flux, internal=True)
    with pytest.raises(AgentError, match="differ from .* start a new store"):
        RE(_scan(agent, brighter, gate, max_rounds=1))

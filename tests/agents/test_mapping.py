import contextlib
import json

import numpy as np
import pytest
from bluesky import RunEngine
from bluesky.utils import FailedStatus

from agents.errors import ConfigError, SafetyRejectedError
from agents.mapping import MappingAgent, MappingSettings
from agents.plans import steered_scan
from agents.safety import AxisLimits, SafetyConfig, SafetyGate
from simulators.maps import FilmMap
from simulators.sas import SimClock
from simulators.stage import SimSampleStage, StageFaults

QUANTITIES = ["peak_q", "intensity", "order_x", "order_y"]


class ListSink:
    def __init__(self):
        self.docs = []

    def __call__(self, name, doc):
        self.docs.append((name, doc))

    def close(self):
        pass


@pytest.fixture
def film():
    return FilmMap(seed=3)


@pytest.fixture
def clock():
    return SimClock(start=0.0)


def _stage(film, clock, faults=None):
    stage = SimSampleStage("stage", truth=film, speed=2.0, seed=1, clock=clock, faults=faults)
    stage.saxs.exposure.set(0.5).wait()
    return stage


def _gate(film, clock, max_step=4.0, shrink=0.0):
    x0, x1, y0, y1 = film.extent
    limits = {"stage_x": AxisLimits(x0 + shrink, x1 - shrink, max_step), "stage_y": AxisLimits(y0, y1, max_step)}
    return SafetyGate(SafetyConfig(frozenset({"measure"}), limits, max_points_per_request=8), clock=clock.time)


def _agent(film, store, sinks=(), **overrides):
    settings = {"extent": list(film.extent), "quantities": QUANTITIES, "max_points": 16, "grid": [20, 20],
                "max_step": 4.0, "n_initial": 6, **overrides}
    return MappingAgent(settings, store, sinks=sinks)


def _run(agent, stage, gate, batch=4):
    RE = RunEngine({}, context_managers=[])
    RE(steered_scan(agent, [stage.saxs], {"stage_x": stage.x, "stage_y": stage.y}, gate=gate, batch_size=batch))


def test_closed_loop_maps_the_film_through_the_gate(film, clock, tmp_path):
    sink = ListSink()
    agent = _agent(film, tmp_path / "s.zarr", sinks=[sink])
    stage = _stage(film, clock)
    gate = _gate(film, clock)
    _run(agent, stage, gate)
    report = agent.report()
    assert report["n_observations"] == 16 and report["stop_reason"].startswith("measured 16 positions")
    assert gate.report()["rejected"] == 0 and report["errors"] == []
    path = agent.path()
    assert np.abs(np.diff(path, axis=0)).max() <= 4.0 + 1e-9  # the agent knows the gate's max_step
    assert stage.travel > 0 and report["travel"] > 0
    # derived run: one reduced event per frame, linked to the raw run
    events = [d for n, d in sink.docs if n == "event"]
    start = next(d for n, d in sink.docs if n == "start")
    assert len(events) == 16 and start["raw_run_uid"]
    truth = film.values(path[:, 0], path[:, 1])
    got = np.array([e["data"]["peak_q"] for e in events])
    assert np.allclose(got, truth["peak_q"], rtol=0.05)
    mean, var = agent.gp.posterior()
    assert mean.shape == (400, 4) and np.all(var >= 0) and report["kriging"]["posterior"] == "exact"
    assert report["kriging"]["drawn"] is None  # no map drawn yet
    assert report["kriging"]["failed_refits"] == report["kriging"]["failed_updates"] == 0
    agent.gp.predict(path)
    drawn = agent.report()["kriging"]["drawn"]
    assert set(drawn) == set(agent.settings.quantities)
    for q, how in drawn.items():  # what was drawn follows the choice: a triangulation may be by domains
        chosen = agent.report()["kriging"]["reconstruction"][q]
        assert how == chosen or (chosen == "triangulation" and how.startswith("domains ("))
    assert agent.store.get_attr("model_state")["hyperparameters"]
    agent.close()


def test_lost_frames_are_named_and_measured_again(film, clock, tmp_path):
    agent = _agent(film, tmp_path / "s.zarr", max_points=12)
    _run(agent, _stage(film, clock, StageFaults(drop_probability=0.3)), _gate(film, clock))
    report = agent.report()
    assert report["n_observations"] == 12
    assert report["errors"] and all("seq_num" in e and "failed reduction" in e for e in report["errors"])
    outcomes = agent.store.read("outcomes")
    retried = set(outcomes["point_key"][outcomes["outcome"] == "error"])
    assert retried <= set(agent.store.read("observations")["point_key"])  # each measured in the end
    agent.close()


def test_refused_moves_end_the_run_then_the_position_is_given_up(film, clock, tmp_path):
    agent = _agent(film, tmp_path / "s.zarr", max_retries=1)
    stage = _stage(film, clock, StageFaults(refuse_probability=1.0))
    gate = _gate(film, clock)
    for _ in range(3):
        with pytest.raises(FailedStatus):
            _run(agent, stage, gate)
    outcomes = agent.store.read("outcomes")
    failed = outcomes["reason"][outcomes["outcome"] == "failed"]
    assert len(failed) and "never measured after 2 requests" in failed[0]
    assert agent.n_observations == 0
    agent.close()


def test_gate_rejections_close_positions_and_stop_the_scan(film, clock, tmp_path):
    agent = _agent(film, tmp_path / "s.zarr")
    with pytest.raises(SafetyRejectedError):
        _run(agent, _stage(film, clock), _gate(film, clock, shrink=4.9))  # x limits 4.9..5.1
    outcomes = agent.store.read("outcomes")
    assert "rejected" in set(outcomes["outcome"])
    assert any("outside limits" in r for r in outcomes["reason"])
    agent.close()


def test_resume_continues_without_repeating(film, clock, tmp_path):
    store = tmp_path / "s.zarr"
    agent = _agent(film, store, max_points=8)
    stage, gate = _stage(film, clock), _gate(film, clock)
    _run(agent, stage, gate)
    first = agent.store.read("observations")["point_key"].tolist()
    agent.close()
    again = MappingAgent.resume(store)
    assert again.n_observations == 8 and again.settings.max_points == 8
    again.store.set_attr("config", {**again.store.get_attr("config")})  # untouched by resume
    resumed = MappingAgent(again.settings.model_copy(update={"max_points": 16}), store)
    _run(resumed, stage, gate)
    keys = resumed.store.read("observations")["point_key"].tolist()
    assert keys[:8] == first and len(keys) == len(set(keys)) == 16
    resumed.close()


def test_bad_settings_are_named(film, tmp_path):
    with pytest.raises(ConfigError, match="unknown key 'target_precision'"):
        MappingAgent({"extent": [0, 10, 0, 10], "target_precision": 0.1}, tmp_path / "a.zarr")
    with pytest.raises(ConfigError, match="extent"):
        MappingAgent({"extent": [10, 0, 0, 10]}, tmp_path / "b.zarr")
    with pytest.raises(ConfigError, match="weights"):
        MappingAgent({"extent": [0, 10, 0, 10], "weights": [1.0]}, tmp_path / "c.zarr")
    with pytest.raises(ConfigError, match="inducing_points"):
        MappingAgent({"extent": [0, 10, 0, 10], "inducing_points": 8}, tmp_path / "d.zarr")


def test_the_scale_settings_reach_the_kriging():
    settings = MappingSettings(extent=(0, 10, 0, 10), exact_limit=500, inducing_points=256)
    assert (settings.kriging().exact_limit, settings.kriging().inducing_points) == (500, 256)
    assert MappingSettings(extent=(0, 10, 0, 10), exact_limit=None).kriging().exact_limit is None


def test_demo_writes_the_report(tmp_path):
    from typer.testing import CliRunner

    from agents.cli import app

    out = tmp_path / "demo"
    result = CliRunner().invoke(app, ["demo", "mapping", "--out", str(out), "--budget", "12", "--quiet"])
    assert result.exit_code == 0, result.output
    assert "measured 12 positions" in result.output and "raster" in result.output
    assert (out / "maps.png").stat().st_size > 10_000
    summary = json.loads((out / "summary.json").read_text())
    assert summary["safety"]["rejected"] == 0 and summary["failed_runs"] == []
    assert set(summary["normalised_rmse"]) == {"peak_q", "intensity", "order_x", "order_y"}
    assert summary["stage"]["agent_travel_mm"] > 0 and summary["stage"]["raster_travel_mm"] > 0
    assert summary["stage"]["raster_points"] == 12 and "raster (12 points)" in result.output


def test_the_demo_with_inline_refits_gives_the_same_run_for_the_same_seed(tmp_path):
    from typer.testing import CliRunner

    from agents.cli import app

    outputs = []
    for name in ("a", "b"):
        result = CliRunner().invoke(app, ["demo", "mapping", "--out", str(tmp_path / name), "--budget", "16",
                                          "--reproducible", "--quiet"])
        assert result.exit_code == 0, result.output
        outputs.append(json.loads((tmp_path / name / "summary.json").read_text()))
    assert outputs[0]["normalised_rmse"] == outputs[1]["normalised_rmse"]
    assert outputs[0]["stage"]["agent_travel_mm"] == outputs[1]["stage"]["agent_travel_mm"]


def test_the_demos_raster_has_as_many_points_as_the_agent_measured():
    from agents.demo_mapping import raster_shape

    assert raster_shape(120, 10, 10) in ((12, 10), (10, 12))  # not the 10 x 10 below 120
    for n, width, height in ((12, 10, 10), (400, 10, 10), (120, 20, 10), (97, 10, 10), (4, 5, 1)):
        nx, ny = raster_shape(n, width, height)
        assert nx >= 2 and ny >= 2 and nx * ny <= n
        # no other raster of at least 2 x 2 holds more points within n
        assert nx * ny == max(a * (n // a) for a in range(2, n // 2 + 1) if n // a >= 2)
    assert raster_shape(120, 20, 10)[0] > raster_shape(120, 20, 10)[1]  # more columns on a wide sample


def test_the_daemon_builds_and_resumes_a_mapping_agent(tmp_path):
    from agents.daemon import build_agent
    from agents.daemon_config import AgentEntry

    entry = AgentEntry(kind="mapping", name="map1", settings={"extent": [0, 10, 0, 10]},
                       safety={"limits": {"stage_x": {"low": 0, "high": 10}, "stage_y": {"low": 0, "high": 10}}})
    agent = build_agent(entry, tmp_path, [])
    assert isinstance(agent, MappingAgent) and agent.name == "map1"
    requests = agent.ask(4)
    assert requests[0].plan == "measure" and len(requests[0].kwargs["points"]) == 4
    again = build_agent(entry, tmp_path, [])  # the store exists: resumed, the points still pending
    assert again.ask(4)[0].kwargs["point_keys"] == requests[0].kwargs["point_keys"]


def test_the_design_starts_where_the_stage_is_and_every_step_passes_the_gate(film, clock, tmp_path):
    stage, gate = _stage(film, clock), _gate(film, clock, max_step=2.0)
    stage.x.set(film.extent[1]).wait()
    stage.y.set(film.extent[3]).wait()  # a corner: most of the design is out of one step's reach
    agent = _agent(film, tmp_path / "s.zarr", max_points=12, max_step=2.0)
    _run(agent, stage, gate)
    report = agent.report()
    assert report["n_observations"] == 12 and gate.report()["rejected"] == 0 and report["errors"] == []
    path = np.vstack([[film.extent[1], film.extent[3]], agent.path()])
    assert np.abs(np.diff(path, axis=0)).max() <= 2.0
    agent.close()


class _PlanQueue:
    """The RE Manager's queue as the daemon sees it (one look, find, outstanding, take back,
    submit, start), held in memory: this test is of the daemon's own gate, not of the queue
    server (test_replay_and_stack)."""

    def __init__(self) -> None:
        self.submitted = []

    def one_look(self):
        return contextlib.nullcontext()

    def find(self, key):
        return None

    def take_back_reruns(self, agent):
        return []

    def outstanding(self, name):
        return 0

    def submit(self, request):
        self.submitted.append(request)

    def start_queue(self):
        pass

    def close(self):
        pass


@pytest.mark.parametrize("reading", [True, False])
def test_the_daemon_takes_up_where_the_stage_is_from_the_stream(tmp_path, reading):
    """A daemon that has admitted nothing yet measures the first step from the stage's readings."""
    from event_model import compose_run

    from agents.daemon import Daemon
    from agents.daemon_config import load_daemon_config
    from tests.agents.test_detector_agent import _ListSink, _ListSource

    limits = {axis: {"low": 0, "high": 10, "max_step": 2.0} for axis in ("stage_x", "stage_y")}
    config = load_daemon_config({
        "agents": [{"kind": "mapping", "name": "map1", "batch_size": 4,
                    "settings": {"extent": [0, 10, 0, 10], "reduction": "none", "quantities": ["value"],
                                 "max_step": 2.0, "max_points": 8},
                    "safety": {"allowed_plans": ["measure"], "limits": limits}}],
        "queueserver": {"zmq_control_addr": "tcp://127.0.0.1:1"},  # never dialled: the queue is given
        "state_dir": str(tmp_path / "state"), "fsync": False})
    run = compose_run(metadata={"plan_name": "count"})
    num = {"dtype": "number", "shape": [], "source": "sim"}
    # a run before the agent's first (an alignment scan): it read the stage, or read nothing of it
    keys = ("stage_x", "stage_y") if reading else ("diode",)
    desc = run.compose_descriptor(name="primary", data_keys={k: num for k in keys})
    data = {"stage_x": 9.5, "stage_y": 9.8, "diode": 1.0}
    event = desc.compose_event(data={k: data[k] for k in keys}, timestamps={k: 0.0 for k in keys})
    docs = [("start", run.start_doc), ("descriptor", desc.descriptor_doc), ("event", event), ("stop", run.compose_stop())]
    queue = _PlanQueue()
    daemon = Daemon(config, source=_ListSource(docs), derived_sink=_ListSink(), plan_sink=queue)
    try:
        while daemon.step():  # when the stream runs dry the agent is asked for plans
            pass
    finally:
        daemon.close()
    assert len(queue.submitted) == 1 and daemon.steering["map1"].gate.report()["rejected"] == 0
    points = np.array([[p["stage_x"], p["stage_y"]] for p in queue.submitted[0].kwargs["points"]])
    assert np.abs(np.diff(points, axis=0)).max() <= 2.0  # within the batch, as ever
    first_step = np.abs(points[0] - [9.5, 9.8]).max()
    if reading:
        assert first_step <= 2.0  # the first step too: gate and agent start from the reading
    else:
        assert first_step > 2.0  # nothing to start from (the test would not see a missing take-up)


def test_past_its_exact_limit_the_agent_maps_on_and_resumes(film, clock, tmp_path):
    store = tmp_path / "s.zarr"
    agent = _agent(film, store, exact_limit=10, inducing_points=16, background_refit=False)
    stage, gate = _stage(film, clock), _gate(film, clock)
    _run(agent, stage, gate)
    assert agent.n_observations == 16 and agent.report()["errors"] == []
    assert {type(f).__name__ for f in agent.gp._factors} == {"_Inducing"}
    assert agent.report()["kriging"]["posterior"] == "inducing"  # what /status.json shows
    mean, var = agent.gp.predict(agent.path())
    assert mean.shape == (16, 4) and np.all(np.isfinite(mean)) and np.all(var >= 0)
    agent.close()
    resumed = MappingAgent(MappingAgent.resume(store).settings.model_copy(update={"max_points": 24}), store)
    assert {type(f).__name__ for f in resumed.gp._factors} == {"_Inducing"}  # rebuilt from the store
    _run(resumed, stage, gate)
    keys = resumed.store.read("observations")["point_key"].tolist()
    assert len(keys) == len(set(keys)) == 24
    resumed.close()


def test_an_agent_at_its_rate_limit_is_not_asked_until_the_gate_would_admit_its_plan(tmp_path):
    """Asked anyway, its plan would be rejected for the rate, its positions given up, and three
    such rounds would pause it until a restart: a fast instrument stopped by the limit meant to
    pace it. The daemon waits instead, and says so."""
    import time

    from agents.daemon import Daemon, render_status_page
    from agents.daemon_config import load_daemon_config
    from tests.agents.test_detector_agent import _ListSink, _ListSource

    limits = {axis: {"low": 0, "high": 10, "max_step": 4.0} for axis in ("stage_x", "stage_y")}
    config = load_daemon_config({
        "agents": [{"kind": "mapping", "name": "map1", "batch_size": 4,
                    "settings": {"extent": [0, 10, 0, 10], "reduction": "none", "quantities": ["value"],
                                 "max_step": 4.0, "max_points": 40},
                    "safety": {"allowed_plans": ["measure"], "limits": limits, "max_requests_per_minute": 2}}],
        "queueserver": {"zmq_control_addr": "tcp://127.0.0.1:1"},  # never dialled: the queue is given
        "settle_s": 0.0, "state_dir": str(tmp_path / "state"), "fsync": False})
    queue = _PlanQueue()  # every plan is gone from it at once: the agent is asked again each round
    daemon = Daemon(config, source=_ListSource([]), derived_sink=_ListSink(), plan_sink=queue)
    try:
        t0 = time.monotonic()
        while time.monotonic() - t0 < 2.0:  # 8 plan rounds
            daemon.step()
        status = daemon.status()
        page = render_status_page(status)
        # the daemon's own deadline for the wait passed while the gate still gives it a moment more
        daemon.steering["map1"].rate_until = time.monotonic() - 0.001
        daemon.step()
        waits_after_deadline = daemon.status()["counters"]["beampilot_rate_limit_waits_total"]
    finally:
        daemon.close()
    assert waits_after_deadline == 1  # the same wait, not said again
    assert len(queue.submitted) == 2 and daemon.steering["map1"].gate.report()["rejected"] == 0
    assert status["paused"] == {} and 55 < status["rate_limited_s"]["map1"] <= 60
    assert "map1 waits 5" in page and "rate limit" in page
    assert status["counters"]["beampilot_rate_limit_waits_total"] == 1  # one wait, said once


def test_a_run_an_earlier_agent_of_the_same_name_asked_for_is_not_taken_as_a_measurement(tmp_path):
    """A fresh agent on a topic that still holds the last session's runs: those naming its name,
    but a request its store never made, are not measurements of its sample; its own are."""
    from event_model import compose_run

    from streams.queueserver import AGENT_META_KEY, REQUEST_META_KEY

    agent = MappingAgent({"name": "map1", "extent": [0, 10, 0, 10], "reduction": "none", "quantities": ["value"],
                          "max_points": 8}, tmp_path / "s.zarr")

    def tell(request_key, points, keys):
        run = compose_run(metadata={AGENT_META_KEY: "map1", REQUEST_META_KEY: request_key})
        num = {"dtype": "number", "shape": [], "source": "sim"}
        desc = run.compose_descriptor(name="primary", data_keys={
            "stage_x": num, "stage_y": num, "value": num, "beampilot_point_key": {"dtype": "string", "shape": [], "source": "sim"}})
        agent.tell("start", run.start_doc)
        agent.tell("descriptor", desc.descriptor_doc)
        for p, key in zip(points, keys, strict=True):
            data = {"stage_x": p["stage_x"], "stage_y": p["stage_y"], "value": 1.0, "beampilot_point_key": key}
            agent.tell("event", desc.compose_event(data=data, timestamps={k: 0.0 for k in data}))
        agent.tell("stop", run.compose_stop())

    old = [{"stage_x": 1.0 + i, "stage_y": 2.0} for i in range(3)]
    tell("0f" * 16, old, [f"{'0f' * 16}:{i}" for i in range(3)])  # last session's agent of the same name
    assert agent.n_observations == 0
    request = agent.ask(4)[0]
    tell(request.key, request.kwargs["points"], request.kwargs["point_keys"])
    assert agent.n_observations == len(request.kwargs["points"]) == 4
    agent.close()


def test_an_agent_that_cannot_decide_is_said_once_and_stops_neither_the_daemon_nor_the_others(tmp_path):
    """An agent's model raising in ask (a kriging update that failed, once) used to leave the
    daemon's loop: every agent's analysis and steering stopped, and a restart met it again."""
    import time

    from agents.daemon import Daemon
    from agents.daemon_config import load_daemon_config
    from tests.agents.test_detector_agent import _ListSink, _ListSource

    limits = {axis: {"low": 0, "high": 10, "max_step": 20.0} for axis in ("stage_x", "stage_y")}
    config = load_daemon_config({
        "agents": [{"kind": "mapping", "name": name, "batch_size": 4,
                    "settings": {"extent": [0, 10, 0, 10], "reduction": "none", "quantities": ["value"],
                                 "max_points": 400},
                    "safety": {"allowed_plans": ["measure"], "limits": limits, "max_requests_per_minute": 600}}
                   for name in ("map1", "map2")],
        "queueserver": {"zmq_control_addr": "tcp://127.0.0.1:1"},  # never dialled: the queue is given
        "settle_s": 0.0, "state_dir": str(tmp_path / "state"), "fsync": False})
    queue = _PlanQueue()
    daemon = Daemon(config, source=_ListSource([]), derived_sink=_ListSink(), plan_sink=queue)

    def broken(n):
        raise RuntimeError("linalg.cholesky: the input is not positive-definite")

    daemon.agents["map1"].ask = broken
    try:
        t0 = time.monotonic()
        while time.monotonic() - t0 < 1.5:  # about 6 plan rounds
            daemon.step()
        status = daemon.status()
    finally:
        daemon.close()
    assert {r.agent for r in queue.submitted} == {"map2"} and len(queue.submitted) >= 3
    said = [e for e in status["errors"] if "map1 could not decide" in e]
    assert len(said) == 1 and "not positive-definite" in said[0] and "asked again" in said[0]
    assert status["counters"]["beampilot_errors_total"] >= 3  # every failed round is counted

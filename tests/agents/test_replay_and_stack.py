"""Replay into agents and onto the simulator; the closed loop through a real RE Manager and broker."""

from __future__ import annotations

import json
import re
import threading
import time
from collections import Counter
from contextlib import contextmanager
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from agents.cli import app
from agents.daemon import AUTOSTART_WARNING, Daemon, render_status_page
from agents.daemon_config import load_daemon_config
from agents.demo_sas import DemoSetup
from agents.demo_stack import stack_daemon_config
from agents.devstack import StackConfig, start_stack
from agents.reduce import RateAgent
from agents.replay_sim import recorded_points, rerun_on_sim
from simulators.sas_documents import sas_run_documents
from streams.derived import validate_document
from streams.zarr_writer import ZarrRunWriter

runner = CliRunner()
REPO = Path(__file__).resolve().parents[2]


def _store_with_runs(path, n_runs=2, n_events=6):
    writer = ZarrRunWriter(path)
    runs = []
    for seed in range(n_runs):
        docs = list(sas_run_documents(n_events, seed=seed))
        for name, doc in docs:
            writer(name, doc)
        runs.append(docs)
    writer.close()
    return runs


def test_rate_agent_turns_counts_into_rates_and_skips_what_it_cannot_read():
    out = []
    agent = RateAgent(sinks=[lambda n, d: out.append((n, d))])
    docs = list(sas_run_documents(3, seed=1))
    docs[3][1]["data"]["sas_exposure"] = 0.0  # a dropped reading: no rate can come of it
    for name, doc in docs:
        agent.tell(name, doc)
    for name, doc in out:
        validate_document(name, doc)
    events = [d for n, d in out if n == "event"]
    assert len(events) == 2 and agent.skipped == 1
    raw = {d["seq_num"]: d for n, d in docs if n == "event"}
    for e in events:
        r = raw[e["data"]["raw_seq_num"]]["data"]
        assert e["data"]["rate"] == pytest.approx(r["sas_counts"] / r["sas_exposure"])
        assert e["data"]["raw_time"] == raw[e["data"]["raw_seq_num"]]["time"]
    assert out[0][1]["raw_run_uid"] == docs[0][1]["uid"] and out[-1][0] == "stop"


def test_replay_a_zarr_store_into_in_process_agents(tmp_path):
    runs = _store_with_runs(tmp_path / "store.zarr")
    config = tmp_path / "agents.yaml"
    config.write_text(yaml.safe_dump({"state_dir": str(tmp_path / "state"), "agents": [{"kind": "rate", "name": "rate"}]}))
    result = runner.invoke(app, ["replay", str(tmp_path / "store.zarr"), "--fast", "--agents", str(config), "--quiet"])
    assert result.exit_code == 0, result.output
    stats = json.loads(result.stdout)
    assert stats["runs"] == 2
    assert stats["target"]["agents"]["rate"]["events_out"] == sum(n == "event" for d in runs for n, _ in d)


def test_replay_on_sim_feeds_fresh_measurements_of_the_recorded_points(tmp_path):
    runs = _store_with_runs(tmp_path / "store.zarr", n_runs=1, n_events=4)
    config = tmp_path / "agents.yaml"
    config.write_text(yaml.safe_dump({"state_dir": str(tmp_path / "state"), "agents": [{"kind": "rate", "name": "rate"}]}))
    result = runner.invoke(app, ["replay", str(tmp_path / "store.zarr"), "--on-sim", "--agents", str(config),
                                 "--sample", "cylinder", "--quiet"])
    assert result.exit_code == 0, result.output
    stats = json.loads(result.stdout)
    assert stats["reruns"][0]["recorded_run"] == runs[0][0][1]["uid"] and stats["reruns"][0]["points"] == 4
    assert stats["target"]["agents"]["rate"]["events_out"] == 4


def test_replay_needs_exactly_one_target(tmp_path):
    _store_with_runs(tmp_path / "store.zarr", n_runs=1)
    result = runner.invoke(app, ["replay", str(tmp_path / "store.zarr")])
    assert result.exit_code != 0 and "exactly one target" in result.output


def test_replay_of_a_run_the_store_does_not_hold_names_it_before_anything_is_sent(tmp_path):
    runs = _store_with_runs(tmp_path / "store.zarr", n_runs=2)
    config = tmp_path / "agents.yaml"
    config.write_text(yaml.safe_dump({"state_dir": str(tmp_path / "state"), "agents": [{"kind": "rate", "name": "rate"}]}))
    held = runs[0][0][1]["uid"]
    result = runner.invoke(app, ["replay", str(tmp_path / "store.zarr"), "--fast", "--agents", str(config), "--quiet",
                                 "--run", held, "--run", "no-such-run"])
    assert result.exit_code == 2
    said = " ".join(result.output.replace("│", " ").split())  # the error box, unwrapped
    assert "no run 'no-such-run'" in said and "holds 2 run(s)" in said and held in said
    assert "events_out" not in said  # nothing was replayed


def test_rerun_on_sim_measures_the_recorded_points_again():
    recorded = list(sas_run_documents(5, seed=7))
    start, points = recorded_points(recorded)
    new = []
    summary = rerun_on_sim(recorded, lambda n, d: new.append((n, d)), sample_kind="cylinder", seed=3)
    events = [d for n, d in new if n == "event"]
    assert summary["points"] == 5 and summary["recorded_run"] == start["uid"]
    assert [pytest.approx(e["data"]["sas_q"]) for e in events] == [p["q"] for p in points]
    assert [e["data"]["sas_exposure"] for e in events] == pytest.approx([p["exposure"] for p in points])
    assert new[0][1]["replay_of"] == start["uid"]
    for name, doc in new:
        validate_document(name, doc)


@contextmanager
def _stack_loop(tmp_path, queueserver=None, tiled=False, open_environment=True, sim_speed=1000, agents=None,
                sim_ring=False):
    """A real dev stack (broker, Redis, RE Manager with the simulated instruments, and tiled if
    asked) and a daemon whose Q-sampling agent steers it; ``queueserver``: more of the daemon's
    queueserver settings; ``sim_speed``: how many times faster than real time the instruments
    run; ``agents``: the daemon's agents instead; ``sim_ring``: the storage ring too."""
    cfg = StackConfig(state_dir=tmp_path / "stack", beamline="loop", kafka_port=0, redis_port=0,
                      zmq_control_port=0, zmq_info_port=0, http_port=0, tiled_port=0, sim_speed=sim_speed,
                      sim_ring=sim_ring)
    stack = start_stack(cfg, tiled=tiled, http=False)
    try:
        setup = DemoSetup.draw(cfg.sim_sample, cfg.sim_seed)
        config = stack_daemon_config(stack.addresses(cfg), setup, tmp_path / "state",
                                     overrides={"target_rel_sigma": 0.05})
        config["queueserver"].update(queueserver or {})
        if agents is not None:
            config["agents"] = agents
        before = set(threading.enumerate())
        daemon = Daemon(load_daemon_config(config))
        try:
            if open_environment:
                daemon.plan_sink.ensure_environment()
            yield stack, daemon
        finally:
            daemon.close()
        _assert_api_threads_end(before)  # the daemon closed its plan sink's queue-server API
    finally:
        stack.stop()


def _assert_api_threads_end(before):
    """The bluesky-queueserver-api threads started since ``before`` end (each looks every 0.1 s)."""
    names = ("RE API: status poll", "RM API: status get", "QServer ZMQ API")
    deadline = time.monotonic() + 5.0
    while left := [t.name for t in set(threading.enumerate()) - before if t.name in names]:
        assert time.monotonic() < deadline, f"queue-server API threads still running: {left}"
        time.sleep(0.05)


def _step_until(daemon, done, seconds, what):
    deadline = time.monotonic() + seconds
    while not done():
        assert time.monotonic() < deadline, f"no {what} within {seconds} s: {daemon.status()}"
        daemon.step()


def _errors_while_down(daemon, part, seconds, *, mid_plan=False):
    """Stop ``part`` of the stack once the agent has 8 points (``mid_plan``: and a plan is
    running), step the daemon for ``seconds``, and return the errors it recorded meanwhile."""
    agent = daemon.agents["qsampling"]
    _step_until(daemon, lambda: agent.n_observations >= 8 and (
        not mid_plan or daemon.plan_sink.status()["manager_state"] == "executing_queue"), 60, "8 points")
    before = len(daemon.recent_errors)
    part.stop()
    t0 = time.monotonic()
    while time.monotonic() - t0 < seconds:
        daemon.step()
    return list(daemon.recent_errors)[before:]


def _history(daemon):
    items = daemon.plan_sink._api.history_get()["items"]
    return (items, Counter(item["meta"]["beampilot_request_key"] for item in items),
            Counter(k for item in items for k in item["kwargs"]["point_keys"]))


@pytest.mark.integration
@pytest.mark.timeout(240)
@pytest.mark.filterwarnings("ignore:unclosed <socket.socket:ResourceWarning")
def test_closed_loop_through_broker_and_queueserver_reaches_the_goal_sending_each_plan_once(tmp_path):
    """The RunEngine in a real RE Manager publishes to a real broker; the daemon steers it, and
    every derived run it publishes reaches tiled whole."""
    from streams.tiled_io import TiledRunSource

    with _stack_loop(tmp_path, tiled=True) as (stack, daemon):
        agent = daemon.agents["qsampling"]
        _step_until(daemon, lambda: agent.stop_reason is not None and not daemon.state.awaiting.get("qsampling"),
                    180, "goal")
        history, keys, points = _history(daemon)
        daemon.close()  # lets the tiled mirror catch up
        derived = _derived_documents(daemon)
        with TiledRunSource(stack.tiled.uri, api_key=stack.tiled.api_key) as tiled:
            in_tiled = {uid: [name for name, _ in tiled.documents(uid)] for uid in tiled.runs()}
    assert agent.stop_reason.startswith("target precision")
    assert keys and max(keys.values()) == 1 and max(points.values()) == 1
    assert {item["result"]["exit_status"] for item in history} == {"completed"}
    assert agent.n_observations == sum(points.values())  # every point measured reached the agent
    starts = [doc["uid"] for name, doc in derived if name == "start"]
    assert starts and sorted(in_tiled) == sorted(starts)
    assert all(names[0] == "start" and names[-1] == "stop" for names in in_tiled.values())
    assert sum(len(names) for names in in_tiled.values()) == len(derived)


@pytest.mark.integration
@pytest.mark.timeout(300)
@pytest.mark.filterwarnings("ignore:unclosed <socket.socket:ResourceWarning")
def test_a_restarted_re_manager_is_waited_for_reported_once_and_left_to_the_operator(tmp_path):
    """The RE Manager stops mid-plan and comes back without an RE environment (as a restarted
    manager does), the cut plan back in its queue: the daemon says once that no plans go out and
    retries with a growing wait; once the manager answers it takes the cut plan back (it would
    repeat its moves from wherever the stop left the axes) and says what its next plan waits for,
    and again when that changes; it neither opens the environment nor starts the queue; started by
    the operator, the loop reaches its goal, every point reaching the agent once and no plan run
    twice."""
    with _stack_loop(tmp_path, queueserver={"stall_report_s": 1.0}) as (stack, daemon):
        agent = daemon.agents["qsampling"]
        outage = _errors_while_down(daemon, stack.manager, 10, mid_plan=True)
        assert len(outage) == 1 and "no plans go out" in outage[0] and "did not answer" in outage[0], outage
        ok, why = daemon.healthy()
        assert not ok and why.startswith("queue server unreachable")
        assert b"beampilot_queueserver_connected 0.0" in daemon.metrics.render()

        stack.manager.start()

        def stalled():
            return daemon.status()["stalled"].get("qsampling", "")

        _step_until(daemon, lambda: "environment is closed" in stalled(), 60, "report of the closed environment")
        assert daemon.healthy() == (True, "ok")
        status = daemon.plan_sink.status()  # the daemon opened nothing, started nothing
        assert not status["worker_environment_exists"] and status["items_in_queue"] >= 1

        daemon.plan_sink.ensure_environment()  # the operator
        _step_until(daemon, lambda: "queue is stopped" in stalled(), 30, "report of the stopped queue")
        assert daemon.plan_sink.status()["manager_state"] == "idle"
        daemon.plan_sink.start_queue()  # the operator
        _step_until(daemon, lambda: agent.stop_reason is not None and not daemon.state.awaiting.get("qsampling"),
                    180, "goal")
        assert daemon.status()["stalled"] == {}
        history, keys, points = _history(daemon)
        taken_back = [p for p in daemon.recent_plans if p["status"] == "taken back"]
        cut_short = [p["key"] for p in daemon.recent_plans if p["status"] == "cut short"]
        errors = list(daemon.recent_errors)
    assert agent.stop_reason.startswith("target precision")
    # the queue server put the plan the stop cut short back in the queue; the daemon took it back
    # rather than let it repeat its moves, so every key ran once, the cut one ending failed
    assert max(keys.values()) == 1
    cut = [i["meta"]["beampilot_request_key"] for i in history if i["result"]["exit_status"] != "completed"]
    assert [i["result"]["exit_status"] for i in history if i["meta"]["beampilot_request_key"] in cut] == ["failed"] * len(cut)
    assert [p["key"] for p in taken_back] == cut == cut_short  # and its gate judged the cut
    assert len([e for e in errors if "was put back in the queue after its run ended 'failed'" in e]) == len(cut)
    assert agent.n_observations == len(points)  # every point reached the agent once


def _paused(api):
    """Pause the plan the RunEngine runs now, if one runs long enough to be paused: True once the
    manager says paused (plans are short: most looks find none, or one that ends first)."""
    if api.status(reload=True)["re_state"] != "running":
        return False
    try:
        api.re_pause(option="immediate")
    except api.RequestFailedError:  # it ended between the look and the pause
        return False
    deadline = time.monotonic() + 5.0
    while time.monotonic() < deadline:
        state = api.status(reload=True)["manager_state"]
        if state != "executing_queue":
            return state == "paused"
        time.sleep(0.05)
    return False


@pytest.mark.integration
@pytest.mark.timeout(240)
@pytest.mark.filterwarnings("ignore:unclosed <socket.socket:ResourceWarning")
def test_a_plan_the_operator_aborts_is_taken_as_cut_short_and_the_queue_left_to_the_operator(tmp_path):
    """The operator pauses a running plan and aborts it: its run stops 'abort' part-way, so the
    axes are not where the gate had them (the plan's last point). The daemon takes the run's last
    measured point and the plan's next one as where they may be, says so, takes back the plan the
    queue server put back in the queue, and leaves the queue stopped (until stop 40 its next plan
    started the queue again, a second after the operator's abort); started by the operator, the
    loop goes on with no plan run twice. The instrument runs at 2x real time, so a plan lasts long
    enough to be paused."""
    with _stack_loop(tmp_path, sim_speed=2) as (_, daemon):
        agent = daemon.agents["qsampling"]
        api = daemon.plan_sink._api
        _step_until(daemon, lambda: agent.n_observations >= 4, 120, "4 points")
        # with the manager's autostart mode on, the plan taken back below could run again first
        api.queue_autostart(True)
        _step_until(daemon, lambda: AUTOSTART_WARNING in " ".join(daemon.recent_errors), 10, "the autostart warning")
        api.queue_autostart(False)
        _step_until(daemon, lambda: not daemon._autostart_said, 10, "autostart seen off")
        assert " ".join(daemon.recent_errors).count(AUTOSTART_WARNING) == 1  # said once, not every look
        _step_until(daemon, lambda: _paused(api), 120, "a plan paused")  # the operator
        api.re_abort()
        _step_until(daemon, lambda: any(p["status"] == "cut short" for p in daemon.recent_plans), 30, "the cut")
        cut = next(p for p in daemon.recent_plans if p["status"] == "cut short")
        assert re.fullmatch(r"its run ended 'abort' after \d+ point\(s\)", cut["reason"])
        assert daemon.steering["qsampling"].gate.admitted_plan(cut["key"]) is None  # judged once
        # the queue server put the aborted plan back at the head of its (stopped) queue: taken back
        _step_until(daemon, lambda: [p["key"] for p in daemon.recent_plans if p["status"] == "taken back"]
                    == [cut["key"]], 30, "the take-back")
        held = daemon.state.held
        assert held is not None and held["why"] == f"plan {cut['key']} of agent qsampling was aborted"
        # its next plan goes into the queue, and the queue stays stopped
        _step_until(daemon, lambda: daemon.plan_sink.status()["items_in_queue"] >= 1, 30, "the next plan queued")
        t0 = time.monotonic()
        while time.monotonic() - t0 < 2.0:
            daemon.step()
        status = daemon.plan_sink.status()
        assert status["manager_state"] == "idle" and status["items_in_queue"] >= 1
        assert 'beampilot_steering_held 1.0' in daemon.metrics.render().decode()
        assert "steering held since" in render_status_page(daemon.status())
        api.queue_start()  # the operator
        _step_until(daemon, lambda: daemon.state.held is None, 30, "the hold to end")
        _step_until(daemon, lambda: agent.stop_reason is not None and not daemon.state.awaiting.get("qsampling"),
                    180, "goal")
        history, keys, _ = _history(daemon)
    assert [i["result"]["exit_status"] for i in history].count("aborted") == 1
    assert max(keys.values()) == 1
    assert [p["status"] for p in daemon.recent_plans if p["key"] == cut["key"]] == ["sent", "cut short", "taken back"]


def _queue_stopped(daemon, api):
    """Ask the queue to stop while a plan runs (``qserver queue stop``) and step the daemon until
    it holds: True then. False when there was nothing to stop, or when the plan ended before the
    daemon's next look saw the stop pending (it looks every quarter second: a stop asked in a
    plan's last moments can pass unseen, see deploy/README.md); the caller tries again."""
    if api.status(reload=True)["manager_state"] != "executing_queue":
        return False
    try:
        api.queue_stop()
    except api.RequestFailedError:  # the queue stopped between the look and the request
        return False
    deadline = time.monotonic() + 30
    while daemon.state.held is None and time.monotonic() < deadline:
        daemon.step()
        status = api.status(reload=True)
        if not status["queue_stop_pending"] and daemon.state.held is None:
            return False  # the stop took effect unseen
    return daemon.state.held is not None


@pytest.mark.integration
@pytest.mark.timeout(240)
@pytest.mark.filterwarnings("ignore:unclosed <socket.socket:ResourceWarning")
def test_a_queue_the_operator_stops_stays_stopped_across_a_restart_until_the_operator_starts_it(tmp_path):
    """``qserver queue stop`` while one of the agent's plans runs (the operator wants the
    beamline): that plan ends, the agent's next plan waits in the queue, and the daemon does not
    start it, not even after a restart; once the operator starts the queue, the daemon starts it
    after its plans again. Until stop 40 the next plan restarted the queue at once."""
    with _stack_loop(tmp_path, sim_speed=2) as (_, daemon):
        agent = daemon.agents["qsampling"]
        api = daemon.plan_sink._api
        _step_until(daemon, lambda: agent.n_observations >= 4, 120, "4 points")
        _step_until(daemon, lambda: _queue_stopped(daemon, api), 120, "a stop seen while a plan runs")  # the operator
        _step_until(daemon, lambda: daemon.state.held is not None and daemon.state.held["stopped"], 60, "the hold")
        assert "the queue was asked to stop" in daemon.state.held["why"]
        _step_until(daemon, lambda: daemon.plan_sink.status()["items_in_queue"] >= 1, 30, "the next plan queued")
        measured = agent.n_observations
        config = daemon.config
        daemon.close()  # a restart: the hold is in the checkpoint
        daemon = Daemon(config)
        try:
            t0 = time.monotonic()
            while time.monotonic() - t0 < 3.0:
                daemon.step()
            status = daemon.plan_sink.status()
            assert daemon.state.held is not None and daemon.status()["held"]["why"].startswith("the queue was asked")
            assert status["manager_state"] == "idle" and status["items_in_queue"] >= 1
            again = daemon.agents["qsampling"]
            assert again.n_observations == measured  # nothing ran while held
            daemon.plan_sink._api.queue_start()  # the operator
            _step_until(daemon, lambda: daemon.state.held is None, 30, "the hold to end")
            _step_until(daemon, lambda: again.n_observations >= measured + 8, 120, "two more plans")
            _, keys, _ = _history(daemon)
        finally:
            daemon.close()
    assert max(keys.values()) == 1


@pytest.mark.integration
@pytest.mark.timeout(120)
@pytest.mark.filterwarnings("ignore:unclosed <socket.socket:ResourceWarning")
def test_plans_the_queue_server_refuses_are_reported_and_pause_the_agent(tmp_path):
    """A user group the RE Manager does not know: every item is refused. Each refusal is reported
    as the gate's are, nothing is retried as it was, and after three rounds the agent is paused
    with what to check."""
    with _stack_loop(tmp_path, queueserver={"user_group": "nobody"}) as (_, daemon):
        _step_until(daemon, lambda: daemon.steering["qsampling"].paused, 60, "pause")
        paused = daemon.steering["qsampling"].paused
        metrics = daemon.metrics.render().decode()
        plans = list(daemon.recent_plans)
        gate = daemon.steering["qsampling"].gate
        _, keys, _ = _history(daemon)
    assert "the queue server's reason" in paused and "rounds in a row" in paused
    assert 'beampilot_agent_paused{agent="qsampling"} 1.0' in metrics  # what an alert reads
    assert gate.report()["admitted"] == 0 and gate.report()["rejected"] == 3  # taken back at the gate
    assert daemon.state.gate_positions["qsampling"] == gate.positions == {}
    assert [p["status"] for p in plans] == ["rejected"] * 3
    assert all(p["reason"].startswith("queue server:") for p in plans)
    assert not keys and daemon.state.awaiting["qsampling"] == {}


@pytest.mark.integration
@pytest.mark.timeout(120)
@pytest.mark.filterwarnings("ignore:unclosed <socket.socket:ResourceWarning")
def test_a_manager_whose_environment_never_opened_refuses_plans_and_the_reason_says_to_open_it(tmp_path):
    """A freshly started RE Manager knows no plans until an environment has opened once: the
    refusal names that, not only the (empty) list of allowed plans."""
    with _stack_loop(tmp_path, open_environment=False) as (_, daemon):
        _step_until(daemon, lambda: daemon.steering["qsampling"].paused, 60, "pause")
        errors = list(daemon.recent_errors)
    assert "allows no plans" in errors[0] and "qserver environment open" in errors[0]


@pytest.mark.integration
@pytest.mark.timeout(120)
@pytest.mark.filterwarnings("ignore:unclosed <socket.socket:ResourceWarning")
def test_a_plan_queued_while_the_environment_is_closed_counts_as_sent_and_its_wait_is_reported(tmp_path):
    """The RE environment was closed (by an operator): the next plan goes into the queue, the
    queue cannot start; the plan is recorded as sent, the failed start is named, and the wait is
    reported with what to do."""
    with _stack_loop(tmp_path, queueserver={"stall_report_s": 0.5}) as (_, daemon):
        sink = daemon.plan_sink
        sink._call("environment_close")
        sink._wait(lambda s: not s["worker_environment_exists"], 30, "closing the environment")
        _step_until(daemon, lambda: daemon.status()["stalled"].get("qsampling"), 30, "report of the wait")
        plans = list(daemon.recent_plans)
        errors = list(daemon.recent_errors)
        queued = sink.status()["items_in_queue"]
        stalled = daemon.status()["stalled"]["qsampling"]
    assert [p["status"] for p in plans] == ["sent"] and queued == 1
    assert any("is queued, but the queue did not start" in e for e in errors)
    assert "the RE environment is closed" in stalled


@pytest.mark.integration
@pytest.mark.timeout(180)
@pytest.mark.filterwarnings("ignore:unclosed <socket.socket:ResourceWarning")
def test_a_redis_outage_under_the_re_manager_is_logged_once_and_never_waited_out_in_silence(tmp_path):
    """The manager's Redis stops mid-loop: its errors are logged once, not four times a second.
    When Redis is back, the loop either goes on to its goal or, where the manager is left saying
    it executes the queue while running nothing (as it was in every probe run), the daemon says so
    and what to do."""
    with _stack_loop(tmp_path, queueserver={"stall_report_s": 1.0}) as (stack, daemon):
        agent = daemon.agents["qsampling"]
        outage = _errors_while_down(daemon, stack.redis, 5)
        stack.redis.start()
        _step_until(daemon, lambda: agent.stop_reason is not None or daemon.status()["stalled"], 60, "goal or report")
        stalled = daemon.status()["stalled"].get("qsampling", "")
    assert 1 <= len(outage) <= 3, outage  # one per distinct message; 20 rounds ran
    assert agent.stop_reason is not None or "runs no plan" in stalled, stalled


def _derived_documents(daemon):
    """Every ``(name, doc)`` on the daemon's derived topic, in order."""
    from streams.kafka import KafkaDocumentSource

    documents = []
    with KafkaDocumentSource(daemon.config.derived_topic, daemon.kafka_settings) as topic:
        while batch := topic.poll(1.0):
            documents += [(r.name, r.doc) for r in batch]
    return documents


def _derived_runs(daemon):
    """Each run on the daemon's derived topic, by uid: its start, and its documents' names."""
    runs, run_of_descriptor = {}, {}
    for name, doc in _derived_documents(daemon):
        if name == "start":
            runs[doc["uid"]] = (doc, [])
        if name == "descriptor":
            run_of_descriptor[doc["uid"]] = doc["run_start"]
        uid = doc["uid"] if name == "start" else doc.get("run_start") or run_of_descriptor[doc["descriptor"]]
        runs[uid][1].append(name)
    return runs


def _example_agents(kind, **settings):
    """The deploy example's entries of ``kind`` (deploy/agents.example.yaml), their settings updated."""
    entries = yaml.safe_load((REPO / "deploy" / "agents.example.yaml").read_text())["agents"]
    chosen = [e for e in entries if e["kind"] == kind]
    for entry in chosen:
        entry["settings"].update(settings)
    return chosen


@pytest.mark.integration
@pytest.mark.timeout(240)
@pytest.mark.filterwarnings("ignore:unclosed <socket.socket:ResourceWarning")
def test_the_mapping_and_tuning_agents_steer_the_stage_and_optics_through_the_queue_server(tmp_path):
    """The deploy example's agents in one daemon: the two steering agents' plans are queue items
    that the RE Manager's RunEngine runs on the dev stack's simulated stage (SAXS frames reduced
    as they come back over Kafka) or optics; every point measured once, reaching its agent, inside
    the limits. The example's detector agents (for a detector the stack does not have) see runs
    without their frame key: not analysed, nothing failed."""
    agents = [*_example_agents("detector"), *_example_agents("mapping", max_points=12, grid=[20, 20]),
              *_example_agents("tuning", budget=6, n_initial=4)]
    with _stack_loop(tmp_path, agents=agents) as (_, daemon):
        mapper, tuner = daemon.agents["film-map"], daemon.agents["focus"]
        _step_until(daemon, lambda: all(a.stop_reason and not daemon.state.awaiting.get(n)
                                        for n, a in (("film-map", mapper), ("focus", tuner))), 180, "both budgets")
        history, keys, points = _history(daemon)
        status = daemon.status()
        positions = mapper.path()
        detectors = [daemon.agents[name].report() for name in ("denoise", "peaks")]
        daemon.close()
        derived = _derived_runs(daemon)
    assert max(keys.values()) == 1 and max(points.values()) == 1
    assert {item["result"]["exit_status"] for item in history} == {"completed"}
    by_agent = Counter(item["meta"]["beampilot_agent"] for item in history)
    assert by_agent == {"film-map": 3, "focus": 6}, by_agent  # batches of 4 positions; of 1 setting
    assert mapper.n_observations == 12 and tuner.n_observations == 6
    assert not mapper.report()["errors"] and not tuner.report()["errors"]
    assert ((positions >= 0) & (positions <= 10)).all()
    assert status["errors"] == [] and not status["stalled"]
    assert [(d["runs_without_frame_key"], d["frames_in"], d["failed_frames"]) for d in detectors] == [(9, 0, {})] * 2
    page = render_status_page(status)  # what the operator sees of each: why no frames, where each agent is
    assert page.count("runs without its frame key: <b>9</b> (the last had ") == 2
    assert "n_observations: <b>12</b>" in page and "travel: <b>" in page and "decision p95: <b>" in page
    assert "budget: <b>6</b>" in page and "best: <b>no setting has met the requirement yet</b>" in page  # 6 is few
    status["agents"]["focus"]["best_observed_feasible"] = {"settings": {"slit_h": 0.8}, "optics_flux": 6.46e11,
                                                           "optics_beam_size": 11.76}
    assert "best optics_flux = <b>6.46e+11</b> · best optics_beam_size = <b>11.76</b>" in render_status_page(status)
    assert "<td>4 points</td>" in page and "<td>1 point</td>" in page
    # each agent's derived runs (the mapping agent's reductions, the tuning agent's recommendations):
    # one for each of its own runs, none for the other's, each whole
    asked_by = {uid: item["meta"]["beampilot_agent"] for item in history for uid in item["result"]["run_uids"]}
    assert sorted((start["agent"], asked_by[start["raw_run_uid"]]) for start, _ in derived.values()) == \
        [("film-map", "film-map")] * 3 + [("focus", "focus")] * 6
    assert all(names[0] == "start" and names[-1] == "stop" for _, names in derived.values())


@pytest.mark.integration
@pytest.mark.timeout(180)
@pytest.mark.filterwarnings("ignore:unclosed <socket.socket:ResourceWarning")
def test_a_plan_the_device_refuses_is_reported_with_its_reason_and_never_run_again(tmp_path):
    """An agent whose limits reach past the device's: the move raises in the RE Manager, the run
    ends 'fail', and the queue server puts the item back at the head of its queue. The daemon
    says why (the device's own message), and takes the item back rather than run it again."""
    [tuning] = _example_agents("tuning", budget=4, n_initial=2, start={
        "mirror_pitch": 0.5, "mirror_bender": 0.7, "slit_h": 1.0, "slit_v": 0.2, "focus": 0.0})
    tuning["settings"]["axes"]["mirror_pitch"]["low"] = 0.0  # the hardware's is 1.0
    tuning["safety"]["limits"]["mirror_pitch"]["low"] = 0.0
    with _stack_loop(tmp_path, agents=[tuning]) as (_, daemon):
        _step_until(daemon, lambda: any(p["status"] == "taken back" for p in daemon.recent_plans), 60, "a take-back")
        plans = list(daemon.recent_plans)
        _, keys, _ = _history(daemon)
    [cut, *_] = [p for p in plans if p["status"] == "cut short"]
    assert "its run ended 'fail' after 0 point(s)" in cut["reason"]
    assert "optics.mirror_pitch = " in cut["reason"] and "outside its hardware limits [1.0, 6.0]" in cut["reason"]
    taken = [p for p in plans if p["status"] == "taken back"]
    assert taken[0]["key"] == cut["key"] and keys[cut["key"]] == 1  # ran once, never again


@pytest.mark.integration
@pytest.mark.timeout(240)
@pytest.mark.filterwarnings("ignore:unclosed <socket.socket:ResourceWarning")
def test_the_sextupole_agent_steers_the_simulated_ring_through_the_queue_server(tmp_path):
    """The deploy example's sextupole settings as a daemon agent: each plan sets the families
    through the ring's ophyd signals in the RE Manager (ramped within the largest step) and
    reads lifetime and injection efficiency; a whole generation comes back and the next opens."""
    settings = yaml.safe_load((REPO / "deploy" / "sextupole.example.yaml").read_text())
    settings.update(pop_size=6, generations=2)
    limits = {f"ring_{f}": v for f, v in settings["families"].items()}
    agent = {"kind": "sextupole", "name": "sext", "batch_size": 3, "settings": settings,
             "safety": {"allowed_plans": ["measure"], "limits": limits, "max_points_per_request": 40}}
    with _stack_loop(tmp_path, agents=[agent], sim_ring=True) as (_, daemon):
        sext = daemon.agents["sext"]
        _step_until(daemon, lambda: sext.stop_reason and not daemon.state.awaiting.get("sext"), 180, "2 generations")
        history, keys, points = _history(daemon)
        status = daemon.status()
        report = sext.report()
    assert sext.stop_reason.startswith("budget spent: 2 generations")
    assert max(keys.values()) == 1 and max(points.values()) == 1
    assert {item["result"]["exit_status"] for item in history} == {"completed"}
    assert status["errors"] == [] and status["paused"] == {} and report["errors"] == []
    assert sext.optimizer.generation == 2 and len(sext.pareto_front()) >= 1
    steps = [abs(b[a] - c[a]) for item in history for b, c in zip(item["kwargs"]["points"][:-1],
             item["kwargs"]["points"][1:], strict=True) for a in b]
    assert steps and max(steps) <= 20.0 + 1e-9  # every move within the largest step (SF, SD: 10)


@pytest.mark.integration
@pytest.mark.timeout(240)
@pytest.mark.filterwarnings("ignore:unclosed <socket.socket:ResourceWarning")
def test_a_check_before_a_beamtime_finds_what_would_fail_and_changes_nothing(tmp_path, monkeypatch):
    """``beampilot run --check`` on the real dev stack: a manager whose RE environment never
    opened knows no plans, so the agent's plans would be refused (a failure, with what to do);
    once it is open they pass; a user group the manager does not know fails again. Nothing is
    queued, no topic is made, and state_dir is not created."""
    from agents.preflight import preflight
    from streams.kafka import KafkaSettings
    from streams.queueserver import QueueServerPlanSink

    cfg = StackConfig(state_dir=tmp_path / "stack", beamline="check", kafka_port=0, redis_port=0,
                      zmq_control_port=0, zmq_info_port=0, http_port=0, tiled_port=0, sim_speed=1000)
    stack = start_stack(cfg, tiled=True, http=False)
    try:
        setup = DemoSetup.draw(cfg.sim_sample, cfg.sim_seed)
        raw = stack_daemon_config(stack.addresses(cfg), setup, tmp_path / "state", overrides={"target_rel_sigma": 0.05})
        raw["http"] = {"port": 0}
        config = load_daemon_config(raw)

        def checked(conf):
            return {c.what: (c.status, c.detail) for c in preflight(conf)}

        before = checked(config)
        zmq = raw["queueserver"]["zmq_control_addr"]
        with QueueServerPlanSink(zmq_control_addr=zmq) as sink:
            sink.ensure_environment(timeout=60)
            after = checked(config)
            sink._api.queue_autostart(True)  # someone switched the manager's autostart mode on
            autostart = checked(config)
            sink._api.queue_autostart(False)
            nobody = checked(load_daemon_config({**raw, "queueserver": {**raw["queueserver"], "user_group": "nobody"}}))
            from streams.requests import PlanRequest

            bogus = sink.check_request(PlanRequest("measure", kwargs={"points": [], "bogus": 1}))
            queued = sink.status()["items_in_queue"]
        cli = CliRunner().invoke(app, ["run", "--config", str(_write_yaml(tmp_path / "daemon.yaml", raw)), "--check"])
        # a first start from the beginning reads what the topic holds: counted, and said when it is much
        from streams.kafka import KafkaDocumentSink

        settings = KafkaSettings(bootstrap_servers=raw["kafka"]["bootstrap_servers"])
        empty = checked(config)["first start"]
        with KafkaDocumentSink(config.documents_topic, settings, create_topic=False) as publish:
            for name, doc in sas_run_documents(3, seed=1):
                publish(name, doc)
                # one batch each: tansu's end offset is its last batch's first offset + 1 (Kafka's
                # is its last message's + 1), so documents batched together would be undercounted
                publish.flush()
        monkeypatch.setattr("agents.preflight.FIRST_START_MANY", 5)
        held = checked(config)["first start"]
        at_end = checked(config.model_copy(update={"start_at": "end"}))["first start"]
        topics = KafkaSettings(bootstrap_servers=raw["kafka"]["bootstrap_servers"]).topic_partitions(
            [config.derived_topic])
    finally:
        stack.stop()
    assert before["queue server"][0] == "warn" and "no RE environment open" in before["queue server"][1]
    assert before["plans of qsampling"][0] == "fail" and "qserver environment open" in before["plans of qsampling"][1]
    assert before["agent qsampling"][0] == "ok" and before["broker"][0] == "ok" and before["tiled"][0] == "ok"
    assert after["queue server"][0] == "ok" and after["plans of qsampling"] == ("ok", "allowed for user group 'primary'")
    assert nobody["plans of qsampling"][0] == "fail" and "user group 'nobody'" in nobody["plans of qsampling"][1]
    assert not [w for w, (s, _) in after.items() if s == "fail"], after
    assert "queue autostart" not in after and autostart["queue autostart"][0] == "warn"
    assert "can run again from its first point" in autostart["queue autostart"][1]
    assert "'qserver queue autostart disable'" in autostart["queue autostart"][1]
    assert bogus.startswith("plan 'measure' takes no argument(s) ['bogus']; its parameters are [")
    made = f"{config.derived_topic} does not exist yet: the daemon makes it at start (1 partition)"
    assert after["derived topic"] == ("ok", made)
    assert cli.exit_code == 0 and "0 failed, 0 warning(s)" in cli.output
    assert queued == 0 and topics == {config.derived_topic: None} and not (tmp_path / "state").exists()
    n = len(list(sas_run_documents(3, seed=1)))
    assert empty[0] == "ok" and "reads all 0 document(s)" in empty[1]
    assert held[0] == "warn", held
    assert f"reads all {n} document(s)" in held[1] and "set start_at: end" in held[1]
    assert at_end[0] == "ok" and f"the {n} document(s) {config.documents_topic} holds are not read" in at_end[1]


def _write_yaml(path, data):
    path.write_text(yaml.safe_dump(json.loads(json.dumps(data, default=str))))
    return path

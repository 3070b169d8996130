"""Replay into agents and onto the simulator; the closed loop through a real RE Manager and broker."""

from __future__ import annotations

import json
from collections import Counter

import pytest
import yaml
from typer.testing import CliRunner

from agents.cli import app
from agents.daemon import Daemon
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


@pytest.mark.integration
@pytest.mark.timeout(240)
@pytest.mark.filterwarnings("ignore:unclosed <socket.socket:ResourceWarning")
def test_closed_loop_through_broker_and_queueserver_reaches_the_goal_sending_each_plan_once(tmp_path):
    """The RunEngine in a real RE Manager publishes to a real broker; the daemon steers it."""
    cfg = StackConfig(state_dir=tmp_path / "stack", beamline="loop", kafka_port=0, redis_port=0,
                      zmq_control_port=0, zmq_info_port=0, http_port=0, tiled_port=0, sim_speed=1000)
    stack = start_stack(cfg, tiled=False, http=False)
    try:
        setup = DemoSetup.draw(cfg.sim_sample, cfg.sim_seed)
        config = load_daemon_config(stack_daemon_config(
            stack.addresses(cfg), setup, tmp_path / "state", overrides={"target_rel_sigma": 0.05}))
        daemon = Daemon(config)
        daemon.plan_sink.ensure_environment()
        agent = daemon.agents["qsampling"]
        import time

        deadline = time.monotonic() + 180
        while agent.stop_reason is None or daemon.state.awaiting.get("qsampling"):
            assert time.monotonic() < deadline, daemon.status()
            daemon.step()
        history = daemon.plan_sink._api.history_get()["items"]
        daemon.close()
    finally:
        stack.stop()
    assert agent.stop_reason.startswith("target precision")
    keys = Counter(item["meta"]["beampilot_request_key"] for item in history)
    points = Counter(k for item in history for k in item["kwargs"]["point_keys"])
    assert keys and max(keys.values()) == 1 and max(points.values()) == 1
    assert {item["result"]["exit_status"] for item in history} == {"completed"}
    assert agent.n_observations == sum(points.values())  # every point measured reached the agent

"""The daemon configs in deploy/ are what operators copy: each must load, and every agent in it
must build and (for a steering agent) make a first request its own safety gate admits."""

from pathlib import Path

import pytest

from agents.daemon import build_agent
from agents.daemon_config import load_daemon_config
from agents.safety import SafetyGate

DEPLOY = Path(__file__).parents[2] / "deploy"


@pytest.mark.parametrize("name", ["agent.example.yaml", "agents.example.yaml"])
def test_every_agent_of_a_deploy_example_builds_and_its_first_request_passes_its_gate(name, tmp_path):
    config = load_daemon_config(DEPLOY / name)
    kinds = []
    for entry in config.agents:
        agent = build_agent(entry, tmp_path, [])
        kinds.append(entry.kind)
        requests = agent.ask(entry.batch_size)
        if entry.safety is None:
            assert requests == []  # an analysis agent asks for nothing
            continue
        gate = SafetyGate(entry.safety.to_config())
        assert requests, f"{entry.name} asked for nothing"
        for request in requests:
            verdict = gate.admit(request)
            assert verdict.accepted, f"{name}, agent {entry.name}: {verdict.reason}"
        if hasattr(agent, "close"):  # the mapping agent's background refits
            agent.close()
    if name == "agents.example.yaml":
        assert sorted(set(kinds)) == ["detector", "mapping", "tuning"]

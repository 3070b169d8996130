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


def _selectors(node):
    """Every vector selector in a parsed PromQL expression."""
    import promql_parser

    if isinstance(node, promql_parser.VectorSelector):
        yield node
    for attr in ("lhs", "rhs", "expr", "vector_selector", "param"):
        child = getattr(node, attr, None)
        if child is not None:
            yield from _selectors(child)
    for arg in getattr(node, "args", None) or []:
        yield from _selectors(arg)


def test_every_alert_rule_parses_and_names_only_metrics_and_labels_the_daemon_exports():
    """deploy/alerts.yaml is what a facility loads into Prometheus: a typo in a metric's name
    would be an alert that can never fire, so every expression is parsed (a real PromQL parser)
    and each selector checked against the daemon's own metrics, label names included."""
    import promql_parser
    import yaml
    from prometheus_client import Counter, Gauge, Histogram

    from agents.daemon import AgentMetrics, DaemonMetrics

    exported = {}  # the names Prometheus scrapes -> a check of a selector's label names
    for metric in vars(DaemonMetrics()).values():
        if isinstance(metric, (Counter, Gauge, Histogram)):
            (family,) = metric.describe()
            suffixes = {Counter: ("_total",), Gauge: ("",), Histogram: ("_bucket", "_sum", "_count")}[type(metric)]
            # prometheus_client refuses label names the metric was not made with
            exported.update({family.name + s: (lambda labels, m=metric: m.labels(**labels)) for s in suffixes})
    for name, (kind, _, names) in AgentMetrics.FAMILIES.items():
        def known(labels, names=names, name=name):
            assert set(labels) <= set(names), f"{name} has labels {names}, not {sorted(labels)}"
        exported[name + ("_total" if kind == "counter" else "")] = known
    rules = yaml.safe_load((DEPLOY / "alerts.yaml").read_text())["groups"][0]["rules"]
    assert len({r["alert"] for r in rules}) == len(rules) >= 10
    used = set()
    for rule in rules:
        assert rule["labels"]["severity"] in ("info", "warning", "critical"), rule["alert"]
        assert rule["annotations"]["summary"] and rule["annotations"]["description"], rule["alert"]
        expr = promql_parser.parse(rule["expr"])  # raises on a malformed expression
        for sel in _selectors(expr):
            if sel.name == "up":  # Prometheus's own, per scrape target
                continue
            assert sel.name in exported, f"{rule['alert']}: {sel.name} is not a metric the daemon exports"
            used.add(sel.name)
            labels = {m.name: m.value for m in sel.matchers.matchers}
            if labels:  # the metric has these label names
                exported[sel.name](labels)
    # the conditions a night shift must hear of, each covered
    for name in ("beampilot_broker_connected", "beampilot_consumer_lag", "beampilot_documents_lost_total",
                 "beampilot_frame_files_seconds_to_full", "beampilot_errors_total"):
        assert name in used, f"no alert reads {name}"


import threading
from collections import Counter

import pytest
from bluesky.utils import Msg, RunEngineInterrupted
from ophyd import Signal

from agents.errors import SafetyRejectedError
from agents.plans import POINT_KEY, measure_points, measure_run, steered_scan
from agents.protocol import PlanRequest
from agents.safety import AxisLimits, SafetyConfig, SafetyGate


class ScriptedAgent:
    """A test double with a fixed script of requests; records what it is told."""

    name = "scripted"

    def __init__(self, script):
        self.script = list(script)
        self.told = []
        self.rejections = []

    def tell(self, name, doc):
        self.told.append((name, doc))

    def ask(self, n):
        return [self.script.pop(0)] if self.script else []

    def report(self):
        return {"told": len(self.told)}

    def rejected(self, request, reason):
        self.rejections.append((request.key, reason))


def _measure(key, *qs):
    return PlanRequest("measure", kwargs={"points": [{"q": q, "exposure": 0.5} for q in qs]}, key=key)


def test_measure_points_moves_then_triggers_and_reads_each_point(instrument):
    key_signal = Signal(name=POINT_KEY, value="")
    axes = {"q": instrument.q, "exposure": instrument.exposure}
    msgs = list(measure_points([instrument], axes, [{"q": 0.01, "exposure": 2.0}], ["k:0"], key_signal))
    commands = [m.command for m in msgs]
    assert commands[0] == "checkpoint"
    sets = [(m.obj.name, m.args[0]) for m in msgs if m.command == "set"]
    assert sets == [("sas_q", 0.01), ("sas_exposure", 2.0), (POINT_KEY, "k:0")]
    assert commands.index("trigger") > max(i for i, c in enumerate(commands) if c == "set")
    assert commands[-1] == "save" and Msg("create", name="primary") in msgs


def test_measure_run_is_one_run_with_one_keyed_event_per_point(RE, instrument):
    key_signal = Signal(name=POINT_KEY, value="")
    axes = {"q": instrument.q, "exposure": instrument.exposure}
    docs = []
    RE.subscribe(lambda name, doc: docs.append((name, doc)))
    points = [{"q": 0.01, "exposure": 0.5}, {"q": 0.03, "exposure": 1.0}]
    RE(measure_run([instrument], axes, points, ["r:0", "r:1"], key_signal, md={"request": "r"}))
    names = [n for n, _ in docs]
    assert names.count("start") == 1 and names.count("stop") == 1
    start = docs[0][1]
    assert start["request"] == "r" and start["plan_name"] == "measure_run" and start["num_points"] == 2
    events = [d for n, d in docs if n == "event"]
    assert [e["data"][POINT_KEY] for e in events] == ["r:0", "r:1"]
    assert [e["data"]["sas_q"] for e in events] == [0.01, 0.03]
    assert docs[-1][1]["exit_status"] == "success"


def test_measure_run_needs_one_key_per_point(RE, instrument):
    axes = {"q": instrument.q, "exposure": instrument.exposure}
    with pytest.raises(ValueError, match="one key per point"):
        RE(measure_run([instrument], axes, [{"q": 0.01}], [], Signal(name=POINT_KEY, value="")))


def test_steered_scan_runs_what_the_agent_asks_and_tells_it_every_document(RE, instrument, gate):
    agent = ScriptedAgent([_measure("a", 0.01, 0.02), _measure("b", 0.05)])
    docs = []
    RE.subscribe(lambda name, doc: docs.append((name, doc)))
    RE(steered_scan(agent, [instrument], {"q": instrument.q, "exposure": instrument.exposure}, gate=gate))
    events = [d for n, d in docs if n == "event"]
    assert [e["data"][POINT_KEY] for e in events] == ["a:0", "a:1", "b:0"]
    assert [e["data"]["sas_q"] for e in events] == [0.01, 0.02, 0.05]
    # the agent saw exactly the RunEngine's documents, in order, the stop document included
    assert [n for n, _ in agent.told] == [n for n, _ in docs]
    assert docs[-1][1]["exit_status"] == "success"


def test_rejected_requests_are_reported_never_run_and_end_the_scan(RE, instrument, gate):
    bad = [_measure(f"x{i}", 0.9) for i in range(3)]  # q above the gate's limit
    agent = ScriptedAgent([_measure("ok", 0.01), *bad])
    docs = []
    RE.subscribe(lambda name, doc: docs.append((name, doc)))
    with pytest.raises(SafetyRejectedError, match="rejected 3 rounds in a row"):
        RE(steered_scan(agent, [instrument], {"q": instrument.q, "exposure": instrument.exposure}, gate=gate,
                        max_rejected_rounds=3))
    events = [d for n, d in docs if n == "event"]
    assert [e["data"]["sas_q"] for e in events] == [0.01]  # nothing was clamped into range and run
    assert [k for k, _ in agent.rejections] == ["x0", "x1", "x2"]
    assert "q=0.9 (point 0): outside limits" in agent.rejections[0][1]
    assert gate.report()["rejected"] == 3


def test_a_plan_outside_the_in_process_registry_is_refused(RE, instrument, gate):
    agent = ScriptedAgent([PlanRequest("count", kwargs={}, key="c")])
    with pytest.raises(SafetyRejectedError):
        RE(steered_scan(agent, [instrument], {"q": instrument.q}, gate=gate, max_rejected_rounds=1))
    assert "cannot run inside a steered scan" in agent.rejections[0][1]


def test_pause_and_resume_record_each_point_once(RE, instrument, gate):
    agent = ScriptedAgent([_measure("a", 0.01, 0.02, 0.03), _measure("b", 0.04, 0.05)])
    events = []

    def pause_after_second(name, doc):
        if name == "event":
            events.append(doc)
            if len(events) == 2:  # as Ctrl+C would: from another thread, at the next checkpoint
                threading.Thread(target=RE.request_pause, kwargs={"defer": True}).start()

    RE.subscribe(pause_after_second)
    with pytest.raises(RunEngineInterrupted):
        RE(steered_scan(agent, [instrument], {"q": instrument.q, "exposure": instrument.exposure}, gate=gate))
    assert RE.state == "paused"
    assert len(events) < 5
    RE.resume()
    keys = [e["data"][POINT_KEY] for e in events]
    assert keys == ["a:0", "a:1", "a:2", "b:0", "b:1"]
    assert Counter(n for n, _ in agent.told)["event"] == 5


def _rate_gate(clock, per_minute):
    return SafetyGate(SafetyConfig(frozenset({"measure"}), {"q": AxisLimits(0.001, 0.5),
                                                                "exposure": AxisLimits(0.1, 10.0)},
                                   max_requests_per_minute=per_minute), clock=clock.time)


def test_a_plan_over_the_rate_limit_waits_on_the_gates_clock_and_is_never_rejected(RE, instrument, clock):
    gate = _rate_gate(clock, 2)
    agent = ScriptedAgent([_measure(k, q) for k, q in zip("abcde", (0.01, 0.02, 0.03, 0.04, 0.05))])
    asked_at, admitted_at = [], []
    ask, admit = agent.ask, gate.admit
    agent.ask = lambda n: asked_at.append(clock.time()) or ask(n)
    gate.admit = lambda request: admitted_at.append(clock.time()) or admit(request)
    docs = []
    RE.subscribe(lambda name, doc: docs.append((name, doc)))
    RE(steered_scan(agent, [instrument], {"q": instrument.q, "exposure": instrument.exposure}, gate=gate,
                    sleep=clock.sleep, max_rejected_rounds=1))
    assert gate.report()["rejected"] == 0 and agent.rejections == []
    assert [e["data"][POINT_KEY] for n, e in docs if n == "event"] == ["a:0", "b:0", "c:0", "d:0", "e:0"]
    assert all(later - first >= 60.0 for first, later in zip(admitted_at, admitted_at[2:]))  # 2 a minute
    assert asked_at[2] - asked_at[0] >= 60.0 and asked_at[4] - asked_at[2] >= 60.0  # asked only once it admits


def test_the_rate_wait_sleeps_in_the_runengine_and_a_clock_that_stands_still_is_named(clock):
    from agents.plans import _wait_for_rate

    gate = _rate_gate(clock, 1)
    assert list(_wait_for_rate(gate, None, "a")) == []  # room: no wait
    gate.admit(_measure("a", 0.01))
    clock.sleep(15.0)
    waiting = _wait_for_rate(gate, None, "a")
    msg = next(waiting)  # a pausable sleep of the RunEngine's, as long as the limit needs
    assert msg.command == "sleep" and msg.args == (45.0,)
    clock.sleep(45.0)
    assert list(waiting) == []
    gate.admit(_measure("b", 0.01))
    with pytest.raises(RuntimeError, match="clock did not advance.*sleep=<that clock>.sleep"):
        list(_wait_for_rate(gate, lambda dt: None, "a"))  # a sleep that is not the gate's clock's
    never = _rate_gate(clock, 0.5)  # under one a minute: not waited for, the gate rejects
    never.admit(_measure("c", 0.01))
    assert list(_wait_for_rate(never, None, "a")) == []


class PositionAwareAgent(ScriptedAgent):
    def observe_positions(self, positions):
        self.positions = dict(positions)


def test_the_first_step_is_measured_from_where_the_axes_are(RE, instrument, clock):
    # the gate has never admitted anything: it must take up the device's reading, not wave the
    # first move through
    gate = SafetyGate(SafetyConfig(frozenset({"measure"}), {"q": AxisLimits(0.001, 0.5, 0.02)}), clock=clock.time)
    instrument.q.set(0.3).wait()
    far = PlanRequest("measure", kwargs={"points": [{"q": 0.01}]}, key="far")
    near = PlanRequest("measure", kwargs={"points": [{"q": 0.31}, {"q": 0.32}]}, key="near")
    agent = PositionAwareAgent([far, near])
    docs = []
    RE.subscribe(lambda name, doc: docs.append((name, doc)))
    RE(steered_scan(agent, [instrument], {"q": instrument.q}, gate=gate, max_rejected_rounds=2))
    assert agent.positions == {"q": 0.3}
    assert [k for k, _ in agent.rejections] == ["far"]
    assert "step 0.29 from 0.3 exceeds max_step 0.02" in agent.rejections[0][1]
    assert [d["data"]["sas_q"] for n, d in docs if n == "event"] == [0.31, 0.32]


@pytest.mark.parametrize(("asked_by", "request_key", "read"), [
    ("me", "k1", True), ("me", "k1:retry7", True), ("me", "k0", False), (None, None, True), ("another", "k1", False)])
def test_a_steering_agent_reads_its_own_runs_and_the_operators_but_not_another_agents(asked_by, request_key, read):
    """A daemon tells every agent every run; one that another agent asked for (its start names
    that agent, as the queue server's runs of a request do) is left to that agent, and so is one
    naming this agent's name but a request it never made (an earlier agent's, with another store)."""
    from event_model import compose_run

    from agents.runs import stream_router
    from streams.queueserver import AGENT_META_KEY, REQUEST_META_KEY

    starts, events, stops = [], [], []
    router = stream_router("primary", lambda uid, e: events.append(e), lambda uid, s: stops.append(s),
                           on_start=starts.append, agent="me", asked=lambda key: key == "k1")
    run = compose_run(metadata={} if asked_by is None else {AGENT_META_KEY: asked_by, REQUEST_META_KEY: request_key})
    router("start", run.start_doc)
    desc = run.compose_descriptor(name="primary", data_keys={"x": {"dtype": "number", "shape": [], "source": "s"}})
    router("descriptor", desc.descriptor_doc)
    router("event", desc.compose_event(data={"x": 1.0}, timestamps={"x": 0.0}, seq_num=1))
    router("stop", run.compose_stop())
    assert (len(starts), len(events), len(stops)) == ((1, 1, 1) if read else (0, 0, 0))  # no derived run either

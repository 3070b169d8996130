import math

import pytest

from agents.protocol import PlanRequest
from agents.safety import AxisLimits, SafetyConfig, SafetyGate


class Clock:
    def __init__(self):
        self.t = 0.0

    def __call__(self):
        return self.t


def _gate(clock=None, **kw):
    config = SafetyConfig(
        allowed_plans=frozenset({"measure"}),
        limits={"q": AxisLimits(0.003, 0.5), "x": AxisLimits(-10, 10, max_step=2.0), "exposure": AxisLimits(0, 60)},
        **kw,
    )
    return SafetyGate(config, clock=clock or Clock())


def _measure(*points, key="k"):
    return PlanRequest("measure", kwargs={"points": list(points)}, key=key)


def test_a_request_inside_every_limit_is_admitted():
    verdict = _gate().admit(_measure({"q": 0.1, "exposure": 5.0}, {"q": 0.2, "exposure": 1.0}))
    assert verdict.accepted and verdict.reasons == ()


@pytest.mark.parametrize(
    ("point", "fragment"),
    [
        ({"q": 0.6, "exposure": 1.0}, "q=0.6 (point 0): outside limits [0.003, 0.5]"),
        ({"q": math.nan, "exposure": 1.0}, "not a finite number"),
        ({"q": "0.1", "exposure": 1.0}, "not a finite number"),
        ({"q": 0.1, "exposure": 61.0}, "exposure=61.0 (point 0): outside limits"),
        ({"q": 0.1, "theta": 1.0}, "axis 'theta' has no limits configured"),
    ],
)
def test_out_of_limit_values_are_rejected_not_clamped(point, fragment):
    gate = _gate()
    request = _measure(point)
    verdict = gate.admit(request)
    assert not verdict.accepted
    assert any(fragment in r for r in verdict.reasons), verdict.reasons
    assert verdict.request is request  # nothing was changed to make it fit
    assert gate.report()["rejected"] == 1 and gate.report()["rejections"][0]["key"] == "k"


def test_plan_not_on_allow_list_and_positional_args_are_rejected():
    gate = _gate()
    v = gate.admit(PlanRequest("mv", args=("motor", 3.0), key="a"))
    assert not v.accepted
    assert "not on the allow-list ['measure']" in v.reason and "positional args" in v.reason


def test_max_step_applies_within_a_request_and_from_the_last_admitted_position():
    gate = _gate()
    assert gate.admit(_measure({"x": 0.0}, {"x": 1.5})).accepted
    v = gate.admit(_measure({"x": 4.0}))
    assert not v.accepted and "step 2.5 from 1.5 exceeds max_step 2" in v.reason
    assert not gate.admit(_measure({"x": 2.0}, {"x": 5.0})).accepted  # second point jumps 3
    assert gate.admit(_measure({"x": 3.0})).accepted  # rejected requests did not move the axis


def test_rate_limit_uses_the_injected_clock():
    clock = Clock()
    gate = _gate(clock, max_requests_per_minute=2)
    assert gate.admit(_measure({"q": 0.1})).accepted
    assert gate.admit(_measure({"q": 0.1})).accepted
    v = gate.admit(_measure({"q": 0.1}))
    assert not v.accepted and "rate limit" in v.reason
    clock.t = 60.0
    assert gate.admit(_measure({"q": 0.1})).accepted


def test_a_retracted_request_gives_back_its_moves_and_its_rate_slot():
    """A plan the queue server refused never ran: the axes are where they were, the rate window
    has room again, and the request counts as rejected, with the reason."""
    gate = _gate(max_requests_per_minute=2)
    assert gate.admit(_measure({"x": 1.0})).accepted
    before = gate.positions
    refused = gate.admit(_measure({"x": 3.0, "q": 0.2}, key="r"))
    assert refused.accepted and gate.positions == {"x": 3.0, "q": 0.2}
    gate.retract(refused, "the queue server refused it: unknown user group", before)
    assert gate.positions == {"x": 1.0}  # the axis it alone had moved is unknown again
    assert not gate.admit(_measure({"x": 4.0})).accepted  # 3 from 1.0 exceeds max_step: measured from 1.0
    assert gate.admit(_measure({"x": 2.5})).accepted  # the freed slot: 2 per minute, 2 admitted
    report = gate.report()
    assert report["admitted"] == 2 and report["rejected"] == 2
    assert report["rejections"][0] == {"plan": "measure", "key": "r", "agent": "",
                                       "reasons": ["the queue server refused it: unknown user group"]}
    with pytest.raises(ValueError, match="only an admitted request"):
        gate.retract(gate.verdicts[-2], "again", before)


def test_check_does_not_change_state_and_max_points_is_enforced():
    gate = _gate(max_points_per_request=2)
    assert gate.check(_measure({"x": 0.0})).accepted
    assert gate.admit(_measure({"x": 9.0})).accepted  # check() recorded no position
    v = gate.admit(_measure({"x": 9.0}, {"x": 9.0}, {"x": 9.0}))
    assert "3 points in one request exceed max_points_per_request=2" in v.reason


def test_config_itself_is_validated():
    with pytest.raises(ValueError, match="low <= high"):
        AxisLimits(1.0, 0.0)
    with pytest.raises(ValueError, match="allowed_plans is empty"):
        SafetyConfig(allowed_plans=frozenset(), limits={})

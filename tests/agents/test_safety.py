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


@pytest.mark.parametrize("limit", [3, 3.5])
def test_rate_wait_says_when_the_window_admits_one_more(limit):
    clock = Clock()
    gate = _gate(clock, max_requests_per_minute=limit)
    for t in (0.0, 10.0, 25.0):
        assert gate.rate_wait() == 0.0
        clock.t = t
        assert gate.admit(_measure({"q": 0.1})).accepted
    clock.t = 30.0
    assert gate.rate_wait() == pytest.approx(30.0)  # when the one admitted at 0 leaves the window
    clock.t = 59.9
    assert not gate.admit(_measure({"q": 0.1})).accepted and gate.rate_wait() == pytest.approx(0.1)
    clock.t = 60.0
    assert gate.rate_wait() == 0.0 and gate.admit(_measure({"q": 0.1})).accepted
    assert gate.rate_wait() == pytest.approx(10.0)  # now the one admitted at 10
    assert _gate(clock, max_requests_per_minute=0.5).rate_wait() == math.inf  # never admits


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


def test_after_a_plan_cut_short_the_next_step_is_checked_from_everywhere_it_may_have_left_the_axis():
    """The gate had the axis at the cut plan's last point (4.5); it was read last at the first
    point and may have gone on towards the second. From 4.5, 3.4 is a step of 1.1; from where the
    axis may be, [0.02, 1.5], it is up to 3.38 and is refused. The plan's next point is allowed."""
    gate = _gate()
    assert gate.admit(_measure({"x": 0.0}, {"x": 1.5}, {"x": 3.0}, {"x": 4.5}, key="cut")).accepted
    assert gate.positions == {"x": 4.5}
    assert gate.interrupted("cut", 1, {"x": 0.02}) == {"x": (0.02, 1.5)}
    assert gate.positions == {"x": 0.02} and gate.spans == {"x": (0.02, 1.5)}
    v = gate.admit(_measure({"x": 3.4}))
    assert not v.accepted and "step up to 3.38 from anywhere in [0.02, 1.5], where a plan cut short" in v.reason
    assert not gate.admit(_measure({"x": -0.6})).accepted  # 0.62 from 0.02, but 2.1 from 1.5
    assert gate.admit(_measure({"x": 1.5}, {"x": 3.0}, key="again")).accepted  # 1.48 at most, then 1.5
    assert gate.spans == {} and gate.positions == {"x": 3.0}


def test_a_plan_cut_before_its_first_point_spans_from_where_the_axis_stood():
    gate = _gate()
    assert gate.admit(_measure({"x": 1.0})).accepted
    assert gate.admit(_measure({"x": 2.5, "q": 0.1}, {"x": 4.0, "q": 0.2}, key="cut")).accepted
    assert gate.interrupted("cut", 0) == {"x": (1.0, 2.5)}  # q had no known place: its first point
    assert gate.positions == {"x": 1.0, "q": 0.1}
    assert not gate.admit(_measure({"x": 3.1})).accepted and gate.admit(_measure({"x": 2.9})).accepted
    # how far it got not known: anywhere from where the axis stood to any of its points
    assert gate.admit(_measure({"x": 4.0}, {"x": 5.5}, key="unread")).accepted
    assert gate.interrupted("unread", None) == {"x": (2.9, 5.5)}
    assert not gate.admit(_measure({"x": 5.0})).accepted and gate.admit(_measure({"x": 4.2})).accepted
    # a plan the gate never admitted (or forgot): the readings are all there is
    assert gate.interrupted("unknown", 3, {"x": 2.0, "q": math.nan}) is None
    assert gate.positions == {"x": 2.0, "q": 0.1} and gate.spans == {}
    assert gate.interrupted("unread", None) is None  # judged once: the gate forgot it then


def test_spans_and_kept_plans_survive_a_restart_and_a_retraction_gives_the_span_back():
    gate = _gate()
    assert gate.admit(_measure({"x": 0.0}, {"x": 1.5}, key="cut")).accepted
    restarted = _gate()
    restarted.keep_plan("cut", *gate.admitted_plan("cut"))
    restarted.restore_positions(gate.positions)
    restarted.interrupted("cut", 1, {"x": 0.1})
    fresh = _gate()
    fresh.restore_positions(restarted.positions, restarted.spans)
    assert fresh.spans == {"x": (0.1, 1.5)}
    before, spans = fresh.positions, fresh.spans
    admitted = fresh.admit(_measure({"x": 1.0}, key="refused"))
    assert admitted.accepted and fresh.spans == {}
    fresh.retract(admitted, "the queue server refused it", before, spans)
    assert fresh.spans == {"x": (0.1, 1.5)} and fresh.admitted_plan("refused") is None


def test_a_cut_reported_after_a_later_plan_was_admitted_changes_nothing():
    """The later plan's moves are where the axes go: a late word of the earlier cut must not
    move the gate back to the earlier plan's readings."""
    gate = _gate()
    assert gate.admit(_measure({"x": 0.0}, {"x": 1.5}, key="cut")).accepted
    assert gate.admit(_measure({"x": 3.0}, key="later")).accepted
    assert gate.interrupted("cut", 1, {"x": 0.0}) is None
    assert gate.positions == {"x": 3.0} and gate.spans == {}

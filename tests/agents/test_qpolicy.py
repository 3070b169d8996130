"""The Q-sampling decision as a pure function of observations: no RunEngine, no documents."""

import numpy as np
import pytest

from agents.demo_sas import DemoSetup, agent_settings
from agents.qpolicy import QPolicy
from models.sas import SAMPLE_KINDS
from simulators.sas import expected_counts

SETUP = DemoSetup.draw("polydisperse_sphere", 1000)


def _counts(q, t, seed):
    kind = SAMPLE_KINDS[SETUP.sample_kind]
    mu = expected_counts(kind.model(dq_over_q=SETUP.dq_over_q), SETUP.truth, q, t,
                         flux=SETUP.flux, dark_rate=SETUP.dark_rate)
    return np.random.default_rng(seed).poisson(mu).astype(float)


def _policy(**overrides):
    return QPolicy(agent_settings(SETUP, {"fit_starts": 4, **overrides}), SETUP.flux, SETUP.dark_rate)


def test_survey_spreads_points_evenly_in_log_q_and_then_runs_out():
    settings = agent_settings(SETUP)
    first = QPolicy.survey(settings, 0, 5)
    rest = QPolicy.survey(settings, 5, 100)
    q = np.array(first.q + rest.q)
    assert len(q) == settings.n_initial and q[0] == settings.q_range[0] and q[-1] == pytest.approx(settings.q_range[1])
    np.testing.assert_allclose(np.diff(np.log(q)), np.log(q[1] / q[0]))
    assert QPolicy.survey(settings, settings.n_initial, 4).q == ()


def test_with_a_good_fit_the_design_goes_where_the_size_is_decided():
    q = np.geomspace(*SETUP.q_range, 24)
    t = np.full(q.size, 2.0)
    policy = _policy(explore_fraction=0.0)
    decision = policy.decide(q, _counts(q, t, 1), t, 4, 0)
    assert decision.stop_reason is None and set(decision.why) == {"design"}
    # the knee and first minimum of a ~60 A sphere: qR ~ 2-5, not the flat Guinier plateau or the background
    r = SETUP.truth["radius"]
    assert all(1.5 < qi * r < 6 for qi in decision.q), decision.q
    assert all(t_i <= 0.5 * t.sum() / 4 + 1e-9 for t_i in decision.exposure)  # the batch budget


def test_it_stops_at_the_goal_and_says_why():
    q = np.geomspace(*SETUP.q_range, 24)
    t = np.full(q.size, 200.0)
    decision = _policy().decide(q, _counts(q, t, 2), t, 4, 0)
    assert decision.q == () and decision.stop_reason.startswith("target precision reached (radius=")


def test_budgets_stop_it_too():
    q = np.geomspace(*SETUP.q_range, 24)
    t = np.full(q.size, 0.05)
    d = _policy(budget_exposure=1.0).decide(q, _counts(q, t, 3), t, 4, 0)
    assert d.stop_reason == "exposure budget spent (1.2 s >= 1.0 s)"
    d = _policy(max_measurements=24).decide(q, _counts(q, t, 3), t, 4, 0)
    assert d.stop_reason == "measurement budget spent (24 >= 24)"


def test_without_a_usable_fit_every_point_explores_with_the_gp():
    q = np.geomspace(*SETUP.q_range, 4)  # four distinct Q cannot fix four parameters
    t = np.full(q.size, 0.1)
    decision = _policy().decide(q, _counts(q, t, 4), t, 3, 0)
    assert decision.why == ("ivr",) * 3
    assert len(set(decision.q)) == 3 and not set(decision.q) & set(q.tolist())


def test_the_same_observations_give_the_same_decision():
    q = np.geomspace(*SETUP.q_range, 20)
    t = np.full(q.size, 1.0)
    c = _counts(q, t, 5)
    assert _policy().decide(q, c, t, 4, 0) == _policy().decide(q, c, t, 4, 0)

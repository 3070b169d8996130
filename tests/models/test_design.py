import numpy as np
import pytest

from models.design import design_batch, relative_sigmas


def _linear_problem():
    # rate = a + b x over x in [0, 1]: information on b lives at the ends
    x = np.linspace(0, 1, 21)
    a, b = 100.0, 50.0
    rate = a + b * x
    jac_log = np.stack([a * np.ones_like(x), b * x], axis=1)  # d rate / d ln(a), d ln(b)
    return x, rate, jac_log


def test_design_for_a_slope_uses_the_two_ends():
    # the textbook optimal design for a slope puts all measurements at the ends of the range:
    # the high end first (most slope information), then the low end to pin the intercept down
    x, rate, jac = _linear_problem()
    cov = np.diag([0.01, 1.0])
    pts = design_batch(jac, rate, cov, np.array([1]), 6, exposure_bounds=(1.0, 10.0), target_counts=500)
    assert x[pts[0].index] == 1.0
    assert {x[p.index] for p in pts} == {0.0, 1.0}
    assert all(1.0 <= p.exposure <= 10.0 for p in pts)


def test_batch_ends_when_goal_reached_and_exposure_is_cut():
    x, rate, jac = _linear_problem()
    cov = np.diag([1e-4, 0.03**2])
    pts = design_batch(jac, rate, cov, np.array([1]), 5, exposure_bounds=(0.1, 1000.0), target_counts=1e5, goal=0.02)
    assert len(pts) == 1
    # the cut exposure reaches exactly the goal: verify with the Sherman-Morrison update
    g, r, t = jac[pts[0].index], rate[pts[0].index], pts[0].exposure
    post = np.linalg.inv(np.linalg.inv(cov) + t * np.outer(g, g) / r)
    assert relative_sigmas(post)[1] == pytest.approx(0.02, rel=1e-3)


def test_predicted_gain_equals_the_posterior_variance_drop():
    x, rate, jac = _linear_problem()
    cov = np.array([[0.02, 0.005], [0.005, 0.04]])
    p = design_batch(jac, rate, cov, np.array([0, 1]), 1, exposure_bounds=(2.0, 2.0), target_counts=1.0)[0]
    g, r = jac[p.index], rate[p.index]
    post = np.linalg.inv(np.linalg.inv(cov) + 2.0 * np.outer(g, g) / r)
    w = np.diag(cov) / np.diag(cov).max()
    assert p.gain * 2.0 == pytest.approx(np.sum(w * (np.diag(cov) - np.diag(post))), rel=1e-9)


def test_bad_inputs_raise():
    x, rate, jac = _linear_problem()
    with pytest.raises(ValueError, match="rate"):
        design_batch(jac, -rate, np.eye(2), np.array([1]), 1, exposure_bounds=(1, 2), target_counts=1)
    with pytest.raises(ValueError, match="t_min"):
        design_batch(jac, rate, np.eye(2), np.array([1]), 1, exposure_bounds=(0, 2), target_counts=1)
    with pytest.raises(ValueError, match="shapes"):
        design_batch(jac, rate[:3], np.eye(2), np.array([1]), 1, exposure_bounds=(1, 2), target_counts=1)

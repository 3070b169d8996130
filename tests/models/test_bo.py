"""Tests of models.bo: constrained qLogNEI, feasibility, recommendation, NaN rows, test function."""

from __future__ import annotations

import numpy as np
import pytest

from models.bo import (
    HARTMANN6_OPTIMIZER,
    HARTMANN6_OPTIMUM,
    BayesOptimizer,
    BOConfig,
    hartmann6,
    sobol_design,
    suggest,
)
from models.errors import ModelError

CHEAP = BOConfig(num_restarts=3, raw_samples=64, mc_samples=32, maxiter=60)
BOUNDS = np.array([[0.0, 0.0], [2.0, 1.0]])


def _f(X):
    """A smooth bump peaking at (1.6, 0.8), outside the feasible half-plane x + 2y <= 2."""
    return -((X[:, 0] - 1.6) ** 2) - 2 * (X[:, 1] - 0.8) ** 2


def _c(X):
    return (X[:, 0] + 2 * X[:, 1] - 2.0).reshape(-1, 1)


def test_sobol_design_fills_the_box_reproducibly():
    X = sobol_design(BOUNDS, 16, seed=3)
    assert X.shape == (16, 2) and np.all(X >= BOUNDS[0]) and np.all(X <= BOUNDS[1])
    np.testing.assert_array_equal(X, sobol_design(BOUNDS, 16, seed=3))
    np.testing.assert_array_equal(X[:8], sobol_design(BOUNDS, 8, seed=3))  # a prefix: designs extend
    with pytest.raises(ValueError, match="lows < highs"):
        sobol_design([[0.0, 1.0], [1.0, 1.0]], 4)


def test_hartmann6_is_maximised_at_its_known_optimum():
    assert hartmann6(np.array([HARTMANN6_OPTIMIZER]))[0] == pytest.approx(HARTMANN6_OPTIMUM, abs=1e-4)
    X = sobol_design([[0.0] * 6, [1.0] * 6], 256, seed=0)
    assert hartmann6(X).max() < HARTMANN6_OPTIMUM
    noisy = hartmann6(np.repeat([HARTMANN6_OPTIMIZER], 2000, axis=0), noise_std=0.05, rng=np.random.default_rng(0))
    assert noisy.std() == pytest.approx(0.05, rel=0.1)
    with pytest.raises(ValueError, match="needs an rng"):
        hartmann6(X, noise_std=0.1)


def test_constrained_bo_climbs_to_the_constraint_boundary():
    rng = np.random.default_rng(0)
    bo = BayesOptimizer(BOUNDS, n_constraints=1, config=CHEAP)
    X = sobol_design(BOUNDS, 6, seed=0)
    for _ in range(8):
        noise = 0.01 * rng.standard_normal(len(X))
        bo.fit(X, _f(X) + noise, _c(X))
        X = np.vstack([X, bo.suggest(1).X])
    rec = bo.recommend(min_p_feasible=0.5)
    # the optimum on x + 2y = 2 nearest to (1.6, 0.8) is at (1.28, 0.36), f = -0.4896
    assert rec is not None and _c(rec.x[None])[0, 0] <= 0.05
    assert _f(rec.x[None])[0] > -0.6
    assert np.min(np.abs(_c(X[6:]))) < 0.05  # it measured near the boundary
    assert all(w.startswith(("GP fit", "acquisition", "posterior")) for w in bo.warnings)


def test_batches_are_distinct_inside_the_search_box():
    X = sobol_design(BOUNDS, 8, seed=1)
    box = np.array([[0.5, 0.2], [1.0, 0.6]])
    batch = suggest(X, _f(X), _c(X), BOUNDS, q=3, config=CHEAP, search_bounds=box)
    assert batch.shape == (3, 2)
    assert np.all(batch >= box[0]) and np.all(batch <= box[1])
    assert min(np.linalg.norm(batch[i] - batch[j]) for i in range(3) for j in range(i)) > 1e-3
    bo = BayesOptimizer(BOUNDS, n_constraints=1, config=CHEAP)
    bo.fit(X, _f(X), _c(X))
    with pytest.raises(ValueError, match="reach outside the model's bounds"):
        bo.suggest(1, search_bounds=[[-1.0, 0.0], [1.0, 1.0]])


def test_a_ball_shares_the_step_out_by_the_gradient_instead_of_taking_a_box_corner():
    X = sobol_design(BOUNDS, 8, seed=1)
    bo = BayesOptimizer(BOUNDS, config=CHEAP)
    bo.fit(X, _f(X))
    span = BOUNDS[1] - BOUNDS[0]
    centre = np.array([0.5, 0.3])  # the optimum (1.6, 0.8) lies far outside a ball of 0.2
    for q in (1, 2):
        x = bo.suggest(q, ball=(centre, 0.2)).X
        dist = np.linalg.norm((x - centre) / span, axis=1)
        assert np.all(dist <= 0.2 + 1e-9), dist  # a box of half-width 0.2 reaches 0.28
        if q == 1:
            assert np.all(x > centre) and dist[0] > 0.15  # uphill in both, the ball's full step
    # a centre outside the search box (inside the bounds): the ball's points moved onto the box
    box = np.array([[0.2, 0.0], [2.0, 1.0]])
    x = bo.suggest(1, search_bounds=box, ball=(np.array([0.05, 0.3]), 0.2)).X
    assert np.all(x >= box[0]) and np.all(x <= box[1])
    assert np.linalg.norm((x[0] - [0.05, 0.3]) / span) <= 0.2 + 0.075 + 1e-9
    with pytest.raises(ValueError, match="ball radius must be finite and > 0"):
        bo.suggest(1, ball=(centre, 0.0))
    with pytest.raises(ValueError, match="outside the model's bounds"):
        bo.suggest(1, ball=(np.array([2.5, 0.3]), 0.2))
    with pytest.raises(ValueError, match="ball centre must be 2 finite values"):
        bo.suggest(1, ball=(np.array([0.5, np.nan]), 0.2))


def test_nan_rows_are_skipped_and_too_few_rows_refused():
    X = sobol_design(BOUNDS, 8, seed=2)
    Y = _f(X)
    Y[[1, 4]] = np.nan
    C = _c(X)
    C[6, 0] = np.nan
    bo = BayesOptimizer(BOUNDS, n_constraints=1, config=CHEAP)
    used = bo.fit(X, Y, C)
    assert used.tolist() == [True, False, True, True, False, True, False, True] and bo.n_train == 5
    rec = bo.recommend()
    assert rec is not None and rec.index not in (1, 4, 6)
    np.testing.assert_array_equal(rec.x, X[rec.index])
    with pytest.raises(ModelError, match="only 1 of 3 observations are finite"):
        bo.fit(X[:3], [np.nan, 1.0, np.nan], C[:3])
    with pytest.raises(ValueError, match="pass C"):
        bo.fit(X, _f(X))


def test_probability_of_feasibility_separates_the_regions_and_drives_the_search_when_none_is_feasible():
    X = sobol_design(BOUNDS, 12, seed=4)
    bo = BayesOptimizer(BOUNDS, n_constraints=1, config=CHEAP)
    bo.fit(X, _f(X), _c(X))
    p = bo.probability_feasible(np.array([[0.1, 0.1], [1.9, 0.95]]))
    assert p[0] > 0.95 and p[1] < 0.05
    # demand the impossible (x + 2y <= -1): nothing observed is feasible, so it searches for feasibility
    bo.fit(X, _f(X), _c(X) + 3.0)
    s = bo.suggest(1)
    assert s.kind == "feasibility"
    assert bo.probability_feasible(sobol_design(BOUNDS, 256, seed=5)).max() < 1e-3


def test_known_noise_and_warm_started_state_round_trip():
    X = sobol_design(BOUNDS, 10, seed=6)
    bo = BayesOptimizer(BOUNDS, n_constraints=1, config=CHEAP)
    bo.fit(X, _f(X), _c(X), noise_std=[0.01, 0.01])
    state = bo.state()
    assert state["n_fits"] == 1 and any("lengthscale" in k for k in state["hyperparameters"])
    again = BayesOptimizer(BOUNDS, n_constraints=1, config=CHEAP)
    again.load_state(state)
    again.fit(X, _f(X), _c(X), noise_std=[0.01, 0.01])
    m1, _ = bo.predict(X[:3])
    m2, _ = again.predict(X[:3])
    np.testing.assert_allclose(m1, m2, atol=0.05)
    with pytest.raises(ValueError, match="noise_std must be finite and > 0"):
        bo.fit(X, _f(X), _c(X), noise_std=[0.01, 0.0])


def test_bad_arguments_name_the_value():
    with pytest.raises(ValueError, match=r"bounds must be `2 x d`"):
        BayesOptimizer(np.zeros((3, 2)))
    with pytest.raises(ValueError, match="num_restarts"):
        BOConfig(num_restarts=0)
    bo = BayesOptimizer(BOUNDS)
    with pytest.raises(ModelError, match="call fit"):
        bo.suggest(1)
    with pytest.raises(ValueError, match=r"X must be `n x 2`"):
        bo.fit(np.zeros((4, 3)), np.zeros(4))

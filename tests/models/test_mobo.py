"""Tests of models.mobo: qLogNEHVI improves a two-objective front; state round trip."""

from __future__ import annotations

import numpy as np
import pytest

from models.errors import ModelError
from models.mobo import MOBOConfig, MultiObjectiveBO
from models.moga import hypervolume

CHEAP = MOBOConfig(n_initial=8, q=2, num_restarts=2, raw_samples=32, mc_samples=32, maxiter=30)


def bi(X):
    """Two smooth objectives with a curved front between (0.2, 0.2) and (0.8, 0.8)."""
    return np.column_stack([np.sum((X - 0.2) ** 2, axis=1), np.sum((X - 0.8) ** 2, axis=1)])


def test_mobo_extends_the_front_beyond_its_sobol_design():
    opt = MultiObjectiveBO([0, 0], [1, 1], ref=[1.0, 1.0], config=CHEAP, seed=2)
    X = opt.ask()
    assert X.shape == (8, 2)
    opt.tell(X, bi(X))
    hv0 = hypervolume(opt.F, [1.0, 1.0])
    for _ in range(4):
        X = opt.ask()
        assert X.shape == (2, 2) and np.all((X >= 0) & (X <= 1))
        opt.tell(X, bi(X))
    assert hypervolume(opt.F, [1.0, 1.0]) > hv0 + 0.02
    assert opt.generation == 5 and opt.report()["evaluations"] == 16


def test_state_round_trip_and_bad_use():
    opt = MultiObjectiveBO([0, 0], [1, 1], ref=[1.0, 1.0], config=CHEAP, seed=2)
    X = opt.ask()
    with pytest.raises(ModelError, match="between ask"):
        opt.state()
    F = bi(X)
    F[0, 0] = np.inf
    with pytest.raises(ModelError, match="finite"):
        opt.tell(X, F)
    opt.tell(X, bi(X))
    again = MultiObjectiveBO.from_state(opt.state(), [0, 0], [1, 1], ref=[1.0, 1.0])
    np.testing.assert_array_equal(again.X, opt.X)
    np.testing.assert_array_equal(again.ask(), opt.ask())  # same data, same seed: the same decision
    with pytest.raises(ValueError, match="q"):
        MOBOConfig(q=0)


def test_ask_takes_at_most_what_is_left_of_a_budget():
    opt = MultiObjectiveBO([0, 0], [1, 1], ref=[1.0, 1.0], config=CHEAP, seed=2)
    X = opt.ask(limit=5)
    assert X.shape == (5, 2)
    np.testing.assert_array_equal(X, MultiObjectiveBO([0, 0], [1, 1], ref=[1.0, 1.0], config=CHEAP, seed=2).ask()[:5])
    np.testing.assert_array_equal(opt.ask(), X)  # asked again before tell: the same points
    opt.tell(X, bi(X))
    X = opt.ask(limit=1)
    assert X.shape == (1, 2)
    opt.tell(X, bi(X))
    assert opt.ask(limit=10).shape == (2, 2)  # no more than q
    with pytest.raises(ValueError, match="limit"):
        MultiObjectiveBO([0, 0], [1, 1], ref=[1.0, 1.0], config=CHEAP, seed=2).ask(limit=0)

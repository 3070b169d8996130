"""Tests of models.moga: hypervolume, NSGA-II by ask/tell, the ML enhancement, resuming."""

from __future__ import annotations

import numpy as np
import pytest

from models.errors import ModelError
from models.moga import GeneticOptimizer, MLMogaConfig, NSGA2Config, hypervolume, non_dominated

LOWER, UPPER = np.zeros(4), np.ones(4)


def zdt1(X):
    f1 = X[:, 0]
    g = 1 + 9 * X[:, 1:].mean(axis=1)
    return np.column_stack([f1, g * (1 - np.sqrt(f1 / g))])


def _run(opt, f, generations):
    hv = []
    for _ in range(generations):
        X = opt.ask()
        opt.tell(X, f(X))
        hv.append(hypervolume(opt.archive["F"], [1.1, 1.1]))
    return hv


def test_hypervolume_and_non_domination_by_hand():
    F = np.array([[1.0, 3.0], [2.0, 2.0], [3.0, 1.0], [2.5, 2.5], [5.0, 0.5]])
    assert non_dominated(F).tolist() == [True, True, True, False, True]
    # ref (4, 4): rectangles 1x1 + 1x2 + 1x3 from the sweep; (5, 0.5) lies beyond the reference
    assert hypervolume(F, [4.0, 4.0]) == pytest.approx(1 * 1 + 1 * 2 + 1 * 3)
    assert hypervolume(np.array([[5.0, 5.0]]), [4.0, 4.0]) == 0.0
    assert hypervolume(np.empty((0, 2)), [1.0, 1.0]) == 0.0
    # three objectives go through pymoo's exact algorithm: a unit cube minus nothing
    assert hypervolume(np.zeros((1, 3)), [1.0, 1.0, 1.0]) == pytest.approx(1.0)


def test_nsga2_converges_towards_the_zdt1_front():
    opt = GeneticOptimizer(LOWER, UPPER, n_obj=2, config=NSGA2Config(pop_size=20), seed=3)
    hv = _run(opt, zdt1, 25)
    assert hv[-1] > hv[0] + 0.2
    assert hv[-1] > 0.7  # the true front's hypervolume at (1.1, 1.1) is 0.87
    _X, F = opt.pareto_front()
    assert len(F) >= 5 and np.all(non_dominated(F))
    assert opt.name == "nsga2" and opt.report()["evaluations"] == 500


def test_the_ml_enhancement_replaces_offspring_when_the_knn_is_trusted():
    ml = MLMogaConfig(discrepancy_full=0.3, discrepancy_skip=1.0, rank_fitness=True)
    opt = GeneticOptimizer(LOWER, UPPER, n_obj=2, config=NSGA2Config(pop_size=20), ml=ml, seed=3)
    hv = _run(opt, zdt1, 12)
    rep = opt.report()
    assert rep["optimizer"] == "ml_moga"
    assert len(rep["ml_discrepancy"]) == 11  # checked on every generation after the first
    assert rep["ml_replaced"][0] == 0  # nothing to check the kNN against yet
    assert sum(rep["ml_replaced"]) > 20 and max(rep["ml_replaced"]) <= 10  # at most half of 20
    assert hv[-1] > hv[0]


def test_an_untrustworthy_knn_does_not_steer():
    rng = np.random.default_rng(0)

    def noise(X):  # no relation between settings and objectives: the kNN can predict nothing
        return rng.uniform(size=(len(X), 2))

    opt = GeneticOptimizer(LOWER, UPPER, n_obj=2, config=NSGA2Config(pop_size=20),
                           ml=MLMogaConfig(discrepancy_full=0.1, discrepancy_skip=0.5), seed=1)
    _run(opt, noise, 8)
    rep = opt.report()
    assert min(rep["ml_discrepancy"]) > 0.5
    assert sum(rep["ml_replaced"]) == 0


@pytest.mark.parametrize("ml", [None, MLMogaConfig(rank_fitness=True, discrepancy_skip=1.0)])
def test_a_resumed_optimizer_proposes_what_the_uninterrupted_one_would(ml):
    a = GeneticOptimizer(LOWER, UPPER, n_obj=2, config=NSGA2Config(pop_size=12), ml=ml, seed=5)
    _run(a, zdt1, 4)
    b = GeneticOptimizer.from_state(a.state(), LOWER, UPPER, n_obj=2)
    assert b.generation == a.generation == 4
    Xa, Xb = a.ask(), b.ask()
    np.testing.assert_array_equal(Xa, Xb)
    a.tell(Xa, zdt1(Xa))
    b.tell(Xb, zdt1(Xb))
    np.testing.assert_array_equal(a.ask(), b.ask())


def test_constraints_rank_infeasible_below_feasible():
    opt = GeneticOptimizer(LOWER, UPPER, n_obj=2, n_constr=1, config=NSGA2Config(pop_size=12), seed=0)
    for _ in range(5):
        X = opt.ask()
        G = (X[:, 1] - 0.5)[:, None]  # feasible when x1 <= 0.5
        opt.tell(X, zdt1(X), G)
    X, _F, G = opt.population
    assert np.mean(G <= 0) > 0.8
    Xf, _ = opt.pareto_front()
    assert np.all(Xf[:, 1] <= 0.5)


def test_bad_use_is_named():
    opt = GeneticOptimizer(LOWER, UPPER, n_obj=2, seed=0)
    with pytest.raises(ModelError, match="without ask"):
        opt.tell(np.zeros((2, 4)), np.zeros((2, 2)))
    X = opt.ask()
    F = zdt1(X)
    F[0, 0] = np.nan
    with pytest.raises(ModelError, match="finite"):
        opt.tell(X, F)
    with pytest.raises(ModelError, match="other individuals"):
        opt.tell(X[::-1], zdt1(X[::-1]))
    with pytest.raises(ModelError, match="between ask"):
        opt.state()
    with pytest.raises(ModelError, match="lower < upper"):
        GeneticOptimizer([1.0], [0.0], n_obj=2)
    with pytest.raises(ValueError, match="pop_size"):
        NSGA2Config(pop_size=7)
    with pytest.raises(ValueError, match="discrepancy"):
        MLMogaConfig(discrepancy_full=0.5, discrepancy_skip=0.2)
    with pytest.raises(ModelError, match="weights"):
        GeneticOptimizer(LOWER, UPPER, n_obj=2, ml=MLMogaConfig(weights=(1.0, 1.0, 1.0)))

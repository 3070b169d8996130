import numpy as np
import pytest
import torch

from models.acquisition import greedy_variance_batch, ucb_batch
from models.gp import LogLogGP


def _rbf(x, ls=0.2):
    return np.exp(-0.5 * (x[:, None] - x[None, :]) ** 2 / ls**2)


def test_variance_picks_the_most_uncertain_point_first():
    cov = np.diag([0.1, 0.5, 0.2])
    idx, scores = greedy_variance_batch(cov, np.zeros(3), 1, integrated=False)
    assert idx == [1] and scores == [0.5]


def test_ivr_matches_brute_force_integrated_variance_drop():
    x = np.linspace(0, 1, 15)
    cov = _rbf(x) + 1e-9 * np.eye(15)
    noise = np.full(15, 0.05)
    idx, scores = greedy_variance_batch(cov, noise, 1, integrated=True)
    drops = []
    for j in range(15):
        k = cov[:, j]
        post = cov - np.outer(k, k) / (cov[j, j] + noise[j])
        drops.append(np.trace(cov) - np.trace(post))
    assert idx[0] == int(np.argmax(drops))
    assert scores[0] == pytest.approx(max(drops))


def test_greedy_batch_spreads_out_and_never_repeats():
    x = np.linspace(0, 1, 40)
    idx, _ = greedy_variance_batch(_rbf(x, 0.1), np.full(40, 0.01), 4, integrated=True)
    assert len(set(idx)) == 4
    assert np.min(np.diff(np.sort(x[idx]))) > 0.1  # conditioning pushes picks apart


def test_noisier_candidates_are_less_attractive():
    cov = np.eye(2)
    idx, _ = greedy_variance_batch(cov, np.array([10.0, 0.1]), 1, integrated=True)
    assert idx == [1]


def test_bad_batch_arguments_raise():
    with pytest.raises(ValueError, match="batch size"):
        greedy_variance_batch(np.eye(3), np.zeros(3), 4)
    with pytest.raises(ValueError, match="noise_var"):
        greedy_variance_batch(np.eye(3), np.array([0.0, -1.0, 0.0]), 1)


def test_ucb_batch_returns_distinct_candidates_near_the_peak():
    q = np.geomspace(0.003, 0.5, 25)
    counts = 1000 * np.exp(-((np.log10(q) + 1.5) ** 2) / 0.1) + 10
    gp = LogLogGP((0.003, 0.5))
    gp.update(q, counts, np.ones(q.size))
    cand = np.geomspace(0.003, 0.5, 60)
    idx = ucb_batch(gp.model, gp._x(cand), 3, beta=0.1)
    assert len(set(idx)) == 3
    assert all(abs(np.log10(cand[i]) + 1.5) < 0.3 for i in idx)
    assert isinstance(idx[0], int) and torch.is_tensor(gp._x(cand))

"""Active-learning acquisition over a discrete candidate set, with batch (q > 1) selection.

Three acquisitions, each on a GP posterior:

* ``"variance"`` — the posterior variance at the candidate, ``sigma_n^2(x)``;
* ``"ivr"`` — integrated variance reduction, in closed form for a GP with fixed hyper-parameters:
  ``IVR(x) = sum_r w_r k_n(r, x)^2 / (k_n(x, x) + s^2(x))`` over a reference set ``r``, where
  ``s^2(x)`` is the noise the measurement at ``x`` will have;
* ``"ucb"`` — upper confidence bound ``mu(x) + sqrt(beta) sigma(x)`` (botorch).

A GP's posterior variance does not depend on the values observed, only on where and how noisily,
so greedy batches for ``variance`` and ``ivr`` are exact: after each pick the joint covariance gets
the rank-one update of conditioning on that point (with its noise). ``ucb`` batches use botorch's
sequential conditioning on pending points (``qUpperConfidenceBound`` with
``optimize_acqf_discrete``).
"""

from __future__ import annotations

from typing import Literal

import numpy as np
import torch
from botorch.acquisition import qUpperConfidenceBound
from botorch.models.model import Model
from botorch.optim import optimize_acqf_discrete
from botorch.sampling import SobolQMCNormalSampler

__all__ = ["Acquisition", "greedy_variance_batch", "ucb_batch"]

Acquisition = Literal["variance", "ivr", "ucb"]


def greedy_variance_batch(
    cov: np.ndarray,
    noise_var: np.ndarray,
    q: int,
    *,
    integrated: bool = True,
    weights: np.ndarray | None = None,
) -> tuple[list[int], list[float]]:
    """Pick ``q`` distinct candidates greedily by variance or integrated variance reduction.

    Parameters
    ----------
    cov
        `c x c` joint posterior covariance over the candidates, which also serve as the reference
        set of the integral.
    noise_var
        `c` noise variances the measurements would have (same units as ``cov``).
    q
        Batch size; at most ``c``.
    integrated
        ``True`` for integrated variance reduction, ``False`` for plain posterior variance.
    weights
        `c` non-negative weights of the reference points (default: equal).

    Returns
    -------
    indices, scores
        The chosen candidates in pick order, and each one's acquisition value when picked.
    """
    cov = np.array(cov, dtype=float, copy=True)
    c = cov.shape[0]
    if cov.shape != (c, c) or np.shape(noise_var) != (c,):
        raise ValueError(f"need cov `c x c` and noise_var `c`, got {cov.shape=}, {np.shape(noise_var)=}")
    if not 1 <= q <= c:
        raise ValueError(f"batch size must be in [1, {c}] (the number of candidates), got {q=}")
    noise = np.asarray(noise_var, dtype=float)
    if np.any(~np.isfinite(noise)) or np.any(noise < 0):
        raise ValueError("noise_var must be finite and non-negative")
    w = np.ones(c) if weights is None else np.asarray(weights, dtype=float)
    chosen: list[int] = []
    scores: list[float] = []
    for _ in range(q):
        diag = np.clip(np.diag(cov), 0.0, None)
        if integrated:
            score = (w[:, None] * cov**2).sum(axis=0) / (diag + noise)
        else:
            score = diag.copy()
        score[chosen] = -np.inf
        j = int(np.argmax(score))
        chosen.append(j)
        scores.append(float(score[j]))
        k = cov[:, j].copy()
        cov -= np.outer(k, k) / (k[j] + noise[j])
    return chosen, scores


def ucb_batch(model: Model, candidates: torch.Tensor, q: int, *, beta: float = 4.0, seed: int = 0) -> list[int]:
    """Pick ``q`` distinct rows of ``candidates`` (`c x d`) by batch UCB with botorch.

    ``beta`` weighs exploration: ``mu + sqrt(beta) * sigma``.
    """
    if not 1 <= q <= candidates.shape[0]:
        raise ValueError(f"batch size must be in [1, {candidates.shape[0]}], got {q=}")
    sampler = SobolQMCNormalSampler(sample_shape=torch.Size([256]), seed=seed)
    acq = qUpperConfidenceBound(model, beta=beta, sampler=sampler)
    chosen, _ = optimize_acqf_discrete(acq, q=q, choices=candidates, unique=True)
    # map the chosen rows back to indices of `candidates`
    dist = torch.cdist(chosen, candidates)
    return [int(i) for i in dist.argmin(dim=-1)]

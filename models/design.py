"""Optimal experiment design for a fitted model: where to count next, and for how long.

With Poisson counts at rate ``r(x; theta)``, measuring at ``x`` for ``t`` seconds adds Fisher
information ``t g g^T / r`` with ``g = dr/d ln(theta)``. Working in ``ln(theta)`` makes variances
relative: ``var(ln theta_k) = (sigma_k / theta_k)^2``. With the current parameter covariance
``C`` (inverse information), one more measurement gives, by Sherman-Morrison,

    C' = C - t C g g^T C / (r + t g^T C g),

so the drop of the weighted variance ``sum_k w_k C_kk`` is
``t (g^T C W C g) / (r + t g^T C g)``. Candidates are ranked by that drop per second of beam time;
batches are built greedily, updating ``C`` after each pick (repeats allowed: optimal designs put
many measurements on few points). When a pick would reach the goal precision, its exposure is cut
to what the goal needs and the batch ends there, so the experiment stops without overshoot.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

__all__ = ["DesignPoint", "design_batch", "relative_sigmas"]


@dataclass(frozen=True)
class DesignPoint:
    """One chosen measurement: candidate ``index``, ``exposure`` (s), predicted variance drop."""

    index: int
    exposure: float
    gain: float


def relative_sigmas(cov_log: np.ndarray) -> np.ndarray:
    """Relative 1-sigma of each parameter from a covariance in ``ln(theta)``: `p`."""
    return np.sqrt(np.clip(np.diag(cov_log), 0.0, None))


def _gain(C: np.ndarray, G: np.ndarray, rate: np.ndarray, t: np.ndarray, w: np.ndarray) -> np.ndarray:
    CG = G @ C  # `c x p`: rows are (C g)^T
    num = (CG**2 * w).sum(axis=1)  # g^T C W C g
    den = rate + t * (CG * G).sum(axis=1)  # r + t g^T C g
    return t * num / den


def _sherman_morrison(C: np.ndarray, g: np.ndarray, rate: float, t: float) -> np.ndarray:
    Cg = C @ g
    return C - t * np.outer(Cg, Cg) / (rate + t * g @ Cg)


def _exposure_to_goal(
    C: np.ndarray, g: np.ndarray, rate: float, targets: np.ndarray, goal: float, t_lo: float, t_hi: float
) -> float | None:
    """Smallest ``t`` in ``[t_lo, t_hi]`` after which every target's relative sigma is <= goal."""

    def worst(t: float) -> float:
        return float(relative_sigmas(_sherman_morrison(C, g, rate, t))[targets].max())

    if worst(t_hi) > goal:
        return None
    if worst(t_lo) <= goal:
        return t_lo
    lo, hi = t_lo, t_hi
    for _ in range(40):
        mid = 0.5 * (lo + hi)
        lo, hi = (lo, mid) if worst(mid) <= goal else (mid, hi)
    return hi


def design_batch(
    jac_log: np.ndarray,
    rate: np.ndarray,
    cov_log: np.ndarray,
    targets: np.ndarray,
    q: int,
    *,
    exposure_bounds: tuple[float, float],
    target_counts: float,
    goal: float | None = None,
    overhead: float = 0.0,
) -> list[DesignPoint]:
    """Choose up to ``q`` measurements that shrink the targets' relative variance fastest.

    Parameters
    ----------
    jac_log
        `c x p` derivatives of the count rate (counts/s) by ``ln(theta)`` at each candidate.
    rate
        `c` expected count rates (counts/s), all > 0.
    cov_log
        `p x p` current covariance of ``ln(theta)`` (inverse Fisher information, prior included).
    targets
        Indices of the parameters whose relative precision is wanted (the size parameters).
    q
        Most measurements to return.
    exposure_bounds
        ``(t_min, t_max)`` seconds per measurement.
    target_counts
        Default exposure aims at this many counts: ``t = clip(target_counts / rate, t_min, t_max)``.
    goal
        Relative 1-sigma wanted on every target; reaching it ends the batch early.
    overhead
        Dead time per measurement (s), charged in the ranking so short counts are not free.

    Returns
    -------
    list of DesignPoint
        Possibly fewer than ``q`` when the goal is reached within the batch.
    """
    G = np.asarray(jac_log, dtype=float)
    r = np.asarray(rate, dtype=float)
    C = np.array(cov_log, dtype=float, copy=True)
    c, p = G.shape
    if r.shape != (c,) or C.shape != (p, p):
        raise ValueError(f"shapes disagree: {G.shape=}, {r.shape=}, {C.shape=}")
    if np.any(~np.isfinite(r)) or np.any(r <= 0):
        raise ValueError("every candidate's rate must be finite and > 0")
    targets = np.asarray(targets, dtype=int)
    t_min, t_max = exposure_bounds
    if not 0 < t_min <= t_max:
        raise ValueError(f"need 0 < t_min <= t_max, got {exposure_bounds=}")
    t = np.clip(target_counts / r, t_min, t_max)
    points: list[DesignPoint] = []
    for _ in range(q):
        w = np.zeros(p)
        var = np.clip(np.diag(C)[targets], 1e-300, None)
        w[targets] = var / var.max()  # weigh the worst-determined target most
        score = _gain(C, G, r, t, w) / (t + overhead)
        j = int(np.argmax(score))
        t_j = float(t[j])
        done = False
        if goal is not None:
            t_goal = _exposure_to_goal(C, G[j], r[j], targets, goal, t_min, t_j)
            if t_goal is not None:
                t_j, done = t_goal, True
        points.append(DesignPoint(index=j, exposure=t_j, gain=float(score[j])))
        C = _sherman_morrison(C, G[j], r[j], t_j)
        if done:
            break
    return points

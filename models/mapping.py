"""Where to measure next on a sample: acquisition over a grid of stage positions, batches
chosen so the stage does not zig-zag.

Acquisitions (all computed from a :class:`~models.kriging.MappingGP`'s current posterior):

* ``variance`` — posterior variance, each output's divided by its prior variance and weighted;
  fills the sample where the map is least known.
* ``gradient_variance`` — variance times ``1 + g * |grad mean| / max |grad mean|``: more points
  where the map changes fast, which is where domain boundaries are.
* ``ucb`` — ``mean + beta * sd`` of one output: seeks where that quantity is high.
* ``ivr`` — integrated variance reduction: how much measuring at a candidate would lower the
  summed posterior variance over the whole grid. Evaluated on the ``shortlist`` candidates of
  highest (gradient-weighted) variance, since each costs ``O(n c)``.

A batch of ``n`` positions is chosen greedily. After each choice the posterior variance is
updated as if that position had been measured at its posterior mean (the "kriging believer":
the variance update does not depend on the value), so the next choice goes elsewhere. With
``travel_weight > 0`` each candidate's score is divided by ``1 + travel_weight * d / D``,
``d`` its distance from the previous position of the batch and ``D`` the sample's diagonal; the
chosen batch is then ordered along a short path from the stage's position (nearest neighbour
then 2-opt).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np

from models.kriging import MappingGP

__all__ = ["MapAcquisitionConfig", "acquisition", "order_path", "path_length", "select_batch"]


@dataclass(frozen=True)
class MapAcquisitionConfig:
    """Settings of :func:`acquisition` and :func:`select_batch`.

    Parameters
    ----------
    kind
        ``"variance"``, ``"gradient_variance"``, ``"ucb"`` or ``"ivr"``.
    weights
        Weight of each output in the summed (normalised) variance; ``None``: equal.
    gradient_weight
        ``g`` of ``gradient_variance`` (and of the shortlist of ``ivr``).
    ucb_beta, ucb_output
        ``beta`` and the output of ``ucb``.
    travel_weight
        Score discount per sample diagonal travelled (0: travel is free).
    shortlist
        Candidates ``ivr`` is evaluated on.
    """

    kind: Literal["variance", "gradient_variance", "ucb", "ivr"] = "variance"
    weights: tuple[float, ...] | None = None
    gradient_weight: float = 2.0
    ucb_beta: float = 2.0
    ucb_output: int = 0
    travel_weight: float = 0.0
    shortlist: int = 24

    def __post_init__(self) -> None:
        if self.kind not in ("variance", "gradient_variance", "ucb", "ivr"):
            raise ValueError(f"unknown acquisition kind {self.kind!r}; use variance, gradient_variance, ucb or ivr")
        if self.travel_weight < 0 or self.gradient_weight < 0 or self.ucb_beta < 0:
            raise ValueError("travel_weight, gradient_weight and ucb_beta must be >= 0")
        if self.shortlist < 1:
            raise ValueError(f"shortlist must be >= 1, got {self.shortlist=}")


def _weights(cfg: MapAcquisitionConfig, k: int) -> np.ndarray:
    if cfg.weights is None:
        return np.full(k, 1.0 / k)
    w = np.asarray(cfg.weights, dtype=float)
    if w.shape != (k,) or np.any(w < 0) or not w.sum() > 0:
        raise ValueError(f"weights {cfg.weights} must be {k} non-negative numbers, not all zero")
    return w / w.sum()


def _gradient_factor(mean: np.ndarray, grid_shape: tuple[int, int] | None, w: np.ndarray, g: float) -> np.ndarray:
    """``1 + g * |grad mean| / max``, summed over outputs (``mean`` is ``c x k``)."""
    if grid_shape is None or g == 0:
        return np.ones(mean.shape[0])
    ny, nx = grid_shape
    total = np.zeros(mean.shape[0])
    for k in range(mean.shape[1]):
        gy, gx = np.gradient(mean[:, k].reshape(ny, nx))
        mag = np.hypot(gx, gy).reshape(-1)
        top = mag.max()
        if top > 0:
            total += w[k] * mag / top
    return 1.0 + g * total


def acquisition(
    gp: MappingGP,
    cfg: MapAcquisitionConfig,
    grid_shape: tuple[int, int] | None = None,
    *,
    variance: np.ndarray | None = None,
) -> np.ndarray:
    """Score of every candidate (higher: measure sooner), shape ``c``.

    ``grid_shape`` (``ny, nx``) says the candidates are a row-major grid, which the gradient
    needs; ``variance`` overrides the posterior variance (a batch in progress).
    """
    mean, var = gp.posterior()
    if variance is not None:
        var = variance
    w = _weights(cfg, gp.n_outputs)
    prior = gp.prior_variance()
    normalised = (var / np.maximum(prior, 1e-300)) @ w
    if cfg.kind == "variance":
        return normalised
    if cfg.kind in ("gradient_variance", "ivr"):
        return normalised * _gradient_factor(mean, grid_shape, w, cfg.gradient_weight)
    k = cfg.ucb_output
    if not 0 <= k < gp.n_outputs:
        raise ValueError(f"ucb_output={k} but the map has {gp.n_outputs} outputs")
    return mean[:, k] + cfg.ucb_beta * np.sqrt(var[:, k])


def _ivr(gp: MappingGP, candidates: np.ndarray, var: np.ndarray, w: np.ndarray,
         batch_cov: list[np.ndarray]) -> np.ndarray:
    """Summed normalised variance reduction over the grid of measuring at each candidate."""
    prior = np.maximum(gp.prior_variance(), 1e-300)
    noise = gp.noise_variance()
    out = np.empty(len(candidates))
    for i, j in enumerate(candidates):
        cov = _conditioned_cov(gp, j, batch_cov)
        out[i] = float((((cov**2) / (var[j] + noise)) / prior).sum(0) @ w)
    return out


def _conditioned_cov(gp: MappingGP, j: int, batch_cov: list[tuple[int, np.ndarray, np.ndarray]]) -> np.ndarray:
    """Covariance of all candidates with ``j`` after the batch's earlier picks are "measured"."""
    cov = gp.covariance_with(int(j))
    for jb, cov_b, denom in batch_cov:
        cov = cov - cov_b * cov_b[j] / denom
    return cov


def select_batch(
    gp: MappingGP,
    cfg: MapAcquisitionConfig,
    n: int,
    *,
    position: Sequence[float] | None = None,
    grid_shape: tuple[int, int] | None = None,
    exclude: Sequence[int] = (),
    max_step: float | None = None,
) -> list[int]:
    """Choose ``n`` candidate indices, ordered as the stage should visit them.

    Parameters
    ----------
    gp
        The current map model.
    cfg
        The acquisition.
    n
        Batch size.
    position
        Where the stage is now (physical units); the path starts here.
    grid_shape
        ``(ny, nx)`` when the candidates are a row-major grid (needed by the gradient).
    exclude
        Candidate indices not to choose (e.g. asked for and not yet measured).
    max_step
        Largest move of any one axis from one position to the next (the safety gate's
        ``max_step``): candidates out of reach of the previous position are not chosen.
    """
    if n < 1:
        raise ValueError(f"select_batch needs n >= 1, got {n=}")
    cand = gp.candidates
    c = cand.shape[0]
    w = _weights(cfg, gp.n_outputs)
    _, var = gp.posterior()
    var = var.copy()
    noise = gp.noise_variance()
    scale = float(np.linalg.norm(gp.bounds[1] - gp.bounds[0]))
    last = None if position is None else np.asarray(position, dtype=float)
    blocked = np.zeros(c, dtype=bool)
    blocked[list(exclude)] = True
    chosen: list[int] = []
    batch_cov: list[tuple[int, np.ndarray, np.ndarray]] = []
    for _ in range(min(n, c - int(blocked.sum()))):
        score = acquisition(gp, cfg, grid_shape, variance=var)
        if cfg.kind == "ucb":
            score = score - score.min() + 1e-12  # positive, so the travel discount divides it
        if cfg.travel_weight and last is not None:
            score = score / (1.0 + cfg.travel_weight * np.linalg.norm(cand - last, axis=1) / scale)
        score[blocked] = -np.inf
        if max_step is not None and last is not None:
            score[np.abs(cand - last).max(axis=1) > max_step] = -np.inf
        if not np.any(np.isfinite(score)):
            break
        if cfg.kind == "ivr":
            top = np.argsort(score)[::-1][: cfg.shortlist]
            top = top[np.isfinite(score[top])]
            gain = _ivr(gp, top, var, w, batch_cov)
            if cfg.travel_weight and last is not None:
                gain = gain / (1.0 + cfg.travel_weight * np.linalg.norm(cand[top] - last, axis=1) / scale)
            j = int(top[int(np.argmax(gain))])
        else:
            j = int(np.argmax(score))
        chosen.append(j)
        blocked[j] = True
        last = cand[j]
        # kriging believer: measuring at j lowers every candidate's variance by cov^2 / (var_j + noise)
        cov = _conditioned_cov(gp, j, batch_cov)
        denom = var[j] + noise
        var = np.maximum(var - cov**2 / denom, 0.0)
        batch_cov.append((j, cov, denom))
    start = np.asarray(position, dtype=float) if position is not None else None
    order = order_path(cand[chosen], start)
    path = [chosen[i] for i in order]
    if max_step is not None and not _within(cand[path], start, max_step):
        return chosen  # the greedy order respects max_step by construction
    return path


def _within(points: np.ndarray, start: np.ndarray | None, max_step: float) -> bool:
    pts = points if start is None else np.vstack([start, points])
    return bool(np.all(np.abs(np.diff(pts, axis=0)).max(axis=1) <= max_step)) if len(pts) > 1 else True


def path_length(points: np.ndarray, start: Sequence[float] | None = None) -> float:
    """Length of the path through ``points`` in order (from ``start`` if given)."""
    pts = np.asarray(points, dtype=float)
    if start is not None:
        pts = np.vstack([np.asarray(start, dtype=float), pts])
    return float(np.linalg.norm(np.diff(pts, axis=0), axis=1).sum()) if len(pts) > 1 else 0.0


def order_path(points: np.ndarray, start: Sequence[float] | None = None) -> list[int]:
    """A short open path through ``points`` from ``start``: nearest neighbour, then 2-opt."""
    pts = np.asarray(points, dtype=float)
    m = len(pts)
    if m <= 1:
        return list(range(m))
    here = pts[0] if start is None else np.asarray(start, dtype=float)
    left = list(range(m))
    order: list[int] = []
    while left:
        i = min(left, key=lambda j: float(np.linalg.norm(pts[j] - here)))
        order.append(i)
        left.remove(i)
        here = pts[i]
    full = pts if start is None else np.vstack([np.asarray(start, dtype=float), pts])
    off = 0 if start is None else 1
    route = [off + i for i in order]
    if start is not None:
        route = [0, *route]
    improved = True
    while improved:
        improved = False
        for a in range(1 if start is not None else 0, len(route) - 2):
            for b in range(a + 1, len(route) - 1):
                p, q, r, s = full[route[a - 1]] if a else None, full[route[a]], full[route[b]], full[route[b + 1]]
                if p is None:
                    continue
                before = np.linalg.norm(p - q) + np.linalg.norm(r - s)
                after = np.linalg.norm(p - r) + np.linalg.norm(q - s)
                if after < before - 1e-12:
                    route[a : b + 1] = route[a : b + 1][::-1]
                    improved = True
    if start is not None:
        route = route[1:]
    return [i - off for i in route]

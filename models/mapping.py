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

An output whose map is drawn by triangulation (:attr:`MappingGP.reconstruction`: the model chose
it because its leave-one-out error was smaller, as on maps with domain boundaries) is scored for
``variance``, ``gradient_variance`` and ``ivr`` by its own error estimate instead:
``(var + interpolation_weight * (|grad mean| * h)**2 * h / a) / prior``, ``h`` the candidate's
distance to the nearest measured (or already chosen) position, ``a`` the measured positions'
mean spacing (``(area / n)**(1/d)``), with variance and prior taken before the intervals'
calibration (so, like ``var / prior``, the score does not depend on it). ``|grad| * h`` is the
first-order error of interpolating across the gap, so points go on refining a boundary until
they are close enough to resolve its jump, while the variance still draws them to parts of the
sample not yet seen. (The gradient factor alone cannot do this: a stationary posterior's
variance falls near a boundary as fast as anywhere else.) Across a jump ``J`` the gradient is
about ``J / h``, so ``|grad| * h`` stays near ``J`` however closely the jump is sampled; the
factor ``h / a``, the width of the strip that error covers, makes a resolved boundary count less
than one still drawn as a wide ramp. Without it the boundary with the largest jump kept
drawing points long after it was resolved, while a weaker one (the wavy line of
:class:`simulators.maps.DiscontinuousMap`, jump 0.3-0.5 against the blob's 0.6-1.0) stayed a
ramp 1-2 mm wide. On the discontinuous maps of ``benchmarks/mapping.py`` the points needed to
reach the raster's final error (median; sum over the seeds) went, with ``interpolation_weight``
4.8 chosen on probe seeds 117-132, from 180 (2864) to 144 (2408) there; on seeds 133-148, not
used in choosing, from 180 (2712) to 144 (2384); on seeds 101-116 from 152 (2664) to 152 (2296;
seed 111 from 392 to 152). The weight is broad: 2.4 / 9.6 / 20 gave 160 / 152 / 156 on 117-132,
and 4.8 without ``h / a`` 196. With the weight at 0.6, ``(h / a)**2`` in place of ``h / a``
gave 184, and ``(h / a)**2`` on the variance term as well 224. Smooth maps are drawn by
kriging and seldom change: the same points to the raster's error on 47 of 48 probe seeds
(101-148; seed 146 152 -> 176) and on 2 of the benchmark's 3 (seed 2 72 -> 104: drawn by
triangulation for a while early on, so its path changed). On the four quantities of
:class:`simulators.maps.FilmMap` (seeds 11-16, 120 points, the quantities themselves with 2%
noise), the mean normalised error went 0.287 -> 0.269 (peak position 0.217 -> 0.194, intensity
0.016 -> 0.018, orientation components 0.465 / 0.448 -> 0.436 / 0.431). The variance term
weighted by ``h / a`` as well, to favour unvisited parts of a many-boundary film, did not help:
0.278 there, and 2456 against 2408 on the discontinuous maps (117-132). Before (stop 27),
without the strip width, on probe seeds 101-104: 164 / 160 / 172 / 232 with
``interpolation_weight`` 0.3 / 0.6 / 1 / 0.1, against 240-400 for kriging with the gradient
factor alone.

With several outputs the scores add, so each triangulated output's is first put on the kriged
outputs' scale: divided by ``max(1, max / (1 + gradient_weight))`` (``1 + gradient_weight`` is
the most a kriged output's normalised score reaches; 1 for ``variance``). A single output's
choices do not change (a constant factor). Without it a film with many grain boundaries gave
its triangulated orientation maps all the points: in ``beampilot demo mapping`` (5 runs) the
peak position's error was 0.176-0.236 and 2 runs never visited a corner where the intensity
peaks (error 0.17); with it (4 runs) peak position 0.121-0.164, intensity 0.048-0.051,
orientation 0.41-0.47 / 0.38-0.40 against 0.38-0.46 / 0.43-0.50. On the film probe above
(no detector) it made no difference (0.272 against 0.269).

A batch of ``n`` positions is chosen greedily. After each choice the posterior variance is
updated as if that position had been measured at its posterior mean (the "kriging believer":
the variance update does not depend on the value), so the next choice goes elsewhere. With
``travel_weight > 0`` each candidate's score is divided by ``1 + travel_weight * d / D``,
``d`` its distance from the previous position of the batch and ``D`` the sample's diagonal; the
chosen batch is then ordered along a short path from the stage's position (nearest neighbour
then 2-opt). A weaker travel penalty does not find a map's features sooner: on the same probe
seeds the points to the raster's error were (median of 4, discontinuous / smooth) 160 / 116 with
``travel_weight`` 2, 164 / 120 with 1 and 152 / 120 with 0.5, for 10% / 18% more travel with 1
and 13% / 42% more with 0.5. Nor did, measured the same way, ``gradient_weight`` 1 or 4
(172 / 140, 184 / 116), a Matérn-3/2 kernel (176 / 144) or the non-stationary kernel (188 / 140).
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
    interpolation_weight
        Weight of the squared interpolation error in the score of outputs drawn by
        triangulation (see the module docs).
    """

    kind: Literal["variance", "gradient_variance", "ucb", "ivr"] = "variance"
    weights: tuple[float, ...] | None = None
    gradient_weight: float = 2.0
    ucb_beta: float = 2.0
    ucb_output: int = 0
    travel_weight: float = 0.0
    shortlist: int = 24
    interpolation_weight: float = 4.8

    def __post_init__(self) -> None:
        if self.kind not in ("variance", "gradient_variance", "ucb", "ivr"):
            raise ValueError(f"unknown acquisition kind {self.kind!r}; use variance, gradient_variance, ucb or ivr")
        if min(self.travel_weight, self.gradient_weight, self.ucb_beta, self.interpolation_weight) < 0:
            raise ValueError("travel_weight, gradient_weight, ucb_beta and interpolation_weight must be >= 0")
        if self.shortlist < 1:
            raise ValueError(f"shortlist must be >= 1, got {self.shortlist=}")


def _weights(cfg: MapAcquisitionConfig, k: int) -> np.ndarray:
    if cfg.weights is None:
        return np.full(k, 1.0 / k)
    w = np.asarray(cfg.weights, dtype=float)
    if w.shape != (k,) or np.any(w < 0) or not w.sum() > 0:
        raise ValueError(f"weights {cfg.weights} must be {k} non-negative numbers, not all zero")
    return w / w.sum()


def _gradient_magnitude(mean: np.ndarray, grid_shape: tuple[int, int], spacing: tuple[float, float]) -> np.ndarray:
    """``|grad mean|`` per output on a row-major ``(ny, nx)`` grid, ``c x k``, per unit length."""
    ny, nx = grid_shape
    out = np.empty_like(mean)
    for k in range(mean.shape[1]):
        gy, gx = np.gradient(mean[:, k].reshape(ny, nx), *spacing)
        out[:, k] = np.hypot(gx, gy).reshape(-1)
    return out


def _gradient_factor(mag: np.ndarray, w: np.ndarray, g: float) -> np.ndarray:
    """``1 + g * |grad mean| / max``, weighted over outputs (``mag`` is ``c x k``)."""
    total = np.zeros(mag.shape[0])
    for k in range(mag.shape[1]):
        top = mag[:, k].max()
        if top > 0:
            total += w[k] * mag[:, k] / top
    return 1.0 + g * total


def _spacing(candidates: np.ndarray, grid_shape: tuple[int, int]) -> tuple[float, float]:
    """``(dy, dx)`` of a row-major grid of candidates."""
    ny, nx = grid_shape
    span = candidates.max(axis=0) - candidates.min(axis=0)
    return (float(span[1]) / max(ny - 1, 1) or 1.0, float(span[0]) / max(nx - 1, 1) or 1.0)


def acquisition(
    gp: MappingGP,
    cfg: MapAcquisitionConfig,
    grid_shape: tuple[int, int] | None = None,
    *,
    variance: np.ndarray | None = None,
    nearest: np.ndarray | None = None,
) -> np.ndarray:
    """Score of every candidate (higher: measure sooner), shape ``c``.

    ``grid_shape`` (``ny, nx``) says the candidates are a row-major grid, which the gradient
    needs; ``variance`` overrides the posterior variance (a batch in progress) and ``nearest``
    each candidate's distance to the nearest measured position (default: computed).
    """
    mean, var = gp.posterior()
    if variance is not None:
        var = variance
    w = _weights(cfg, gp.n_outputs)
    if cfg.kind == "ucb":
        k = cfg.ucb_output
        if not 0 <= k < gp.n_outputs:
            raise ValueError(f"ucb_output={k} but the map has {gp.n_outputs} outputs")
        return mean[:, k] + cfg.ucb_beta * np.sqrt(var[:, k])
    prior = np.maximum(gp.prior_variance(), 1e-300)
    tri = np.array([r == "triangulation" for r in gp.reconstruction]) if grid_shape is not None else \
        np.zeros(gp.n_outputs, dtype=bool)
    krig = ~tri
    normalised = var / prior
    mag = None
    if grid_shape is not None and (np.any(tri) or (cfg.kind != "variance" and cfg.gradient_weight)):
        mag = _gradient_magnitude(mean, grid_shape, _spacing(gp.candidates, grid_shape))
    score = normalised[:, krig] @ w[krig]
    if cfg.kind in ("gradient_variance", "ivr") and mag is not None and cfg.gradient_weight:
        score = score * _gradient_factor(mag[:, krig], w[krig], cfg.gradient_weight)
    if np.any(tri):
        h = nearest if nearest is not None else _distance_to(gp.candidates, gp.positions)
        # against the prior before calibration, so the score does not depend on it (as var / prior does not)
        raw_prior = prior[:, tri] / gp.variance_scale[tri]
        # the squared first-order error, times the width of the strip it spans (h) over the
        # points' mean spacing: a boundary resolved to a gap h counts in proportion to h
        d = gp.candidates.shape[1]
        spacing = (float(np.prod(np.ptp(gp.candidates, axis=0))) / max(len(gp.positions), 1)) ** (1.0 / d) or 1.0
        first_order = (mag[:, tri] * h[:, None]) ** 2 * (h[:, None] / spacing)
        err2 = normalised[:, tri] + cfg.interpolation_weight * first_order / raw_prior
        # on the kriged outputs' scale: none scores above what a kriged output can reach, so
        # an output with many boundaries cannot starve the others of points (a constant
        # factor per output: a single output's choices do not change)
        top = 1.0 + (cfg.gradient_weight if cfg.kind in ("gradient_variance", "ivr") else 0.0)
        err2 = err2 / np.maximum(1.0, err2.max(axis=0) / top)
        score = score + err2 @ w[tri]
    return score


def _distance_to(candidates: np.ndarray, points: np.ndarray) -> np.ndarray:
    """Each candidate's distance to the nearest of ``points`` (``inf`` when there are none)."""
    if len(points) == 0:
        return np.full(len(candidates), np.inf)
    from scipy.spatial import cKDTree

    return cKDTree(points).query(candidates)[0]


def _ivr(gp: MappingGP, candidates: np.ndarray, var: np.ndarray, w: np.ndarray,
         batch_cov: list[np.ndarray]) -> np.ndarray:
    """Summed normalised variance reduction over the grid of measuring at each candidate."""
    prior = np.maximum(gp.prior_variance(), 1e-300)
    noise = _calibrated_noise(gp)
    out = np.empty(len(candidates))
    for i, j in enumerate(candidates):
        cov = _conditioned_cov(gp, j, batch_cov)
        out[i] = float((((cov**2) / (var[j] + noise)) / prior).sum(0) @ w)
    return out


def _calibrated_noise(gp: MappingGP) -> np.ndarray:
    """The noise variance in the units of the calibrated posterior: the posterior is the model's,
    scaled by ``s2`` after the fit, so measuring at ``j`` lowers it by
    ``s2 c^2 / (v_j + noise) = C^2 / (V_j + s2 noise)`` (``C``, ``V``: calibrated)."""
    return gp.noise_variance() * gp.variance_scale


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
    noise = _calibrated_noise(gp)
    scale = float(np.linalg.norm(gp.bounds[1] - gp.bounds[0]))
    last = None if position is None else np.asarray(position, dtype=float)
    blocked = np.zeros(c, dtype=bool)
    blocked[list(exclude)] = True
    chosen: list[int] = []
    batch_cov: list[tuple[int, np.ndarray, np.ndarray]] = []
    nearest = _distance_to(cand, gp.positions)
    for _ in range(min(n, c - int(blocked.sum()))):
        score = acquisition(gp, cfg, grid_shape, variance=var, nearest=nearest)
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
        nearest = np.minimum(nearest, np.linalg.norm(cand - last, axis=1))
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

"""Maps of domains: the measured positions split where the values jump, each domain drawn on its own.

A map with sharp domain boundaries (phases, grains, a film's edge) drawn by triangulation
(:mod:`models.triangulation`) puts a linear ramp across every boundary, from the last point on
one side to the first on the other. A ramp is the best guess for one pair of points when the
boundary may lie anywhere between them. But a boundary is a curve, crossed by many such pairs,
and where it runs in one pair tells where it runs in the next. :class:`DomainMap` uses that:

1. **Domains.** The Delaunay edges between the measured positions whose values differ by more
   than ``cut`` times the median difference over all edges are cut; the connected groups of
   positions left are the domains (:func:`segment`). A group of fewer than ``min_size``
   positions (a noisy reading, a point caught on a boundary) joins its neighbour across its
   smallest jump. With every jump under the cut there is one domain, and nothing to draw here.
2. **Where each domain lies.** For each domain, its indicator (1 at its positions, 0 at the
   others) is interpolated by a smoothing thin-plate spline over all positions. The smoothing
   makes the boundary a smooth curve fitted through all the straddling pairs, not one pair's
   midpoint at a time.
3. **The values.** Each domain's values are interpolated by a thin-plate spline through its own
   positions alone (so no value leaks across a boundary), and carried a little past it, kept
   within a quarter of the domain's range of values beyond that range (a spline through a few
   nearly collinear positions can reach any value away from them: on a film's orientation map
   of 19 domains one did, before this bound).
4. **The map** at each target is the domains' values weighted by their indicators raised to the
   4th power (clipped at 0, normalised): sharp where the indicators agree, a short blend where
   they do not.

Coordinates are scaled by the longest side of the points' extent, so the settings do not depend
on the units; ``smoothing`` (0.01) is in those unit coordinates.

Measured on the discontinuous maps of ``benchmarks/mapping.py``, probe seeds 101-116 (2026-12-06):

* On the positions the mapping agent chose (112-208 points, 112 maps, through the same kriging
  estimates; measured before the bound of step 3, which moved the geometric-mean error of the
  40 maps of seeds 101-108 from 0.2326 to 0.2316): the drawn error over the triangulation's,
  geometric mean 0.937 with ``cut`` 4
  (0.941 with 6); with every position's true domain given, about 0.92 (seeds 101-108). Worse
  than the triangulation on 7 of the 112 maps (12 with ``cut`` 6), by up to 15%: where a
  small jump (0.3, in values spanning about 2) is not cut, two domains merge, and a spline through
  a jump rings. Each domain's values by linear interpolation instead of splines: 0.952;
  choosing between the domains and the triangulation by 5-fold cross-validation of each map:
  0.979 (it kept the triangulation on many maps the domains would have helped). Neither adopted.
  Without the indicators' smoothing and power (1) the domains drew worse than the
  triangulation; a hard assignment to the likeliest domain was worse still (2-4% of the area on
  the wrong side of a boundary at 144-176 points).
* With the agent (its positions unchanged: its choices use the triangulation's error scale,
  not the drawn map), points to reach the raster's final error: median 118 with ``cut`` 4,
  116 with 6, against 152 drawn by triangulation (sums 1904 / 1948 / 2276 over the 16 seeds;
  better on 14 and worse on 2 with ``cut`` 6; with 4 better on 14, the same on 1, worse
  on 1). ``cut`` 4 for fewer merged domains. The smooth
  maps (kriged) do not change (seeds 101-108, median 114 both).

On the synthetic film (:class:`simulators.maps.FilmMap`, its seven quantities measured directly
with 2% noise by the agent, probe seeds 11-15, 120 and 240 points), against the same runs drawn
by triangulation: the peak position's and width's errors 0.87-0.89 of the triangulation's
(geometric means), the orientation's 0.98-0.99, the anisotropy's and the two order components'
1.00-1.03 (their small jumps split into domains that help little), the intensity (kriged)
unchanged; worst single map 1.11.

Drawing costs about 0.1 s at 160 points and 10,000 targets (global splines up to 1,500
positions, then each spline on its 50-60 nearest), paid when a map is drawn, never in a
decision.
"""

from __future__ import annotations

from typing import Any

import numpy as np

__all__ = ["DomainMap", "segment"]

_GLOBAL_LIMIT = 1500  # up to this many positions one global spline; past it, local ones


def _edges(points: np.ndarray) -> np.ndarray:
    from scipy.spatial import Delaunay

    tri = Delaunay(points)
    s = tri.simplices
    e = np.vstack([s[:, [0, 1]], s[:, [1, 2]], s[:, [0, 2]]])
    return np.unique(np.sort(e, axis=1), axis=0)


def _merged(points: np.ndarray, values: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Each distinct position once, with the mean of its values (a position measured again);
    the index of each of the ``n`` positions among them, and of each one's first measurement."""
    unique, first, inverse = np.unique(points, axis=0, return_index=True, return_inverse=True)
    inverse = inverse.reshape(-1)
    mean = np.bincount(inverse, weights=values) / np.bincount(inverse)
    return unique, mean, inverse, first


def segment(points: np.ndarray, values: np.ndarray, cut: float = 4.0, min_size: int = 3) -> np.ndarray:
    """Domain label of each of ``n`` positions in 2-D (``0 .. m-1``; see the module docs, step 1).

    Parameters
    ----------
    points : ndarray
        ``n x 2`` positions.
    values : ndarray
        ``n`` values there.
    cut : float
        An edge is cut where its two values differ by more than ``cut`` times the median
        difference over all edges.
    min_size : int
        Groups of fewer positions join the neighbour across their smallest jump.

    A position measured more than once counts once, with the mean of its values; its
    measurements share its label.
    """
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    points = np.asarray(points, dtype=float)
    values = np.asarray(values, dtype=float)
    if points.ndim != 2 or points.shape[1] != 2 or values.shape != (len(points),):
        raise ValueError(f"segment needs n x 2 positions and n values, got {points.shape} and {values.shape}")
    points, values, inverse, _ = _merged(points, values)
    n = len(points)
    e = _edges(points)
    jump = np.abs(values[e[:, 0]] - values[e[:, 1]])
    tau = cut * float(np.median(jump))
    kept = e[jump <= tau]
    graph = coo_matrix((np.ones(len(kept)), (kept[:, 0], kept[:, 1])), shape=(n, n))
    _, label = connected_components(graph, directed=False)
    # small groups join a neighbour, smallest jump first (Kruskal's order over the cut edges)
    parent = np.arange(label.max() + 1)
    size = np.bincount(label).astype(np.int64)

    def root(c: int) -> int:
        while parent[c] != c:
            parent[c] = parent[parent[c]]
            c = int(parent[c])
        return c

    for k in np.argsort(jump, kind="stable"):
        a, b = root(int(label[e[k, 0]])), root(int(label[e[k, 1]]))
        if a != b and (size[a] < min_size or size[b] < min_size):
            parent[b] = a
            size[a] += size[b]
    roots = np.array([root(int(c)) for c in range(len(parent))])
    return np.unique(roots[label], return_inverse=True)[1].reshape(-1)[inverse]


class DomainMap:
    """A map drawn domain by domain (module docs); ``None`` from :meth:`build` when the
    positions make one domain only.

    Parameters
    ----------
    points : ndarray
        ``n x 2`` positions.
    values : ndarray
        ``n`` values (for a noisy map, smoothed ones: the mapping model passes its kriging
        estimates at the positions, as it does to the triangulation).
    labels : ndarray
        ``n`` domain labels ``0 .. m-1`` (:func:`segment`), ``m >= 2``.
    smoothing : float
        Smoothing of the indicator splines, in unit coordinates.
    power : float
        Power of the indicators in the weights.
    """

    def __init__(self, points: np.ndarray, values: np.ndarray, labels: np.ndarray,
                 smoothing: float = 0.01, power: float = 4.0) -> None:
        from scipy.interpolate import RBFInterpolator

        points = np.asarray(points, dtype=float)
        values = np.asarray(values, dtype=float)
        self.labels = np.asarray(labels)
        if points.ndim != 2 or points.shape[1] != 2 or values.shape != (len(points),) \
                or self.labels.shape != (len(points),):
            raise ValueError(f"DomainMap needs n x 2 positions, n values and n labels, got {points.shape}, "
                             f"{values.shape} and {self.labels.shape}")
        # a position measured again counts once, with its mean value and its first label
        points, values, _, first = _merged(points, values)
        labels = self.labels[first]
        self._lo = points.min(axis=0)
        self._scale = float(np.max(np.ptp(points, axis=0))) or 1.0
        u = self._unit(points)
        self.n_domains = int(self.labels.max()) + 1
        if self.n_domains < 2:
            raise ValueError("DomainMap needs at least two domains; use a triangulation for one")
        self.power = power
        local = len(points) > _GLOBAL_LIMIT
        self._indicators = [RBFInterpolator(u, (labels == c).astype(float), kernel="thin_plate_spline",
                                            smoothing=smoothing, neighbors=60 if local else None)
                            for c in range(self.n_domains)]
        self._values: list[Any] = []  # a spline, or a float (the domain's mean)
        # each domain's map stays near its own values: a spline through a few nearly collinear
        # positions can reach any value away from them (a quarter of the domain's range beyond)
        self._bounds = []
        for c in range(self.n_domains):
            mine = labels == c
            low, high = float(values[mine].min()), float(values[mine].max())
            self._bounds.append((low - 0.25 * (high - low), high + 0.25 * (high - low)))
            try:
                self._values.append(RBFInterpolator(u[mine], values[mine], kernel="thin_plate_spline", degree=1,
                                                    neighbors=50 if mine.sum() > _GLOBAL_LIMIT else None))
            except (ValueError, np.linalg.LinAlgError):  # too few, or all on a line: its mean
                self._values.append(float(np.mean(values[mine])))

    @classmethod
    def build(cls, points: np.ndarray, values: np.ndarray, cut: float = 4.0, min_size: int = 3,
              smoothing: float = 0.01) -> DomainMap | None:
        """Segment ``points`` by ``values`` and draw them by domains; ``None`` for one domain."""
        labels = segment(points, values, cut=cut, min_size=min_size)
        if labels.max() < 1:
            return None
        return cls(np.asarray(points, dtype=float), np.asarray(values, dtype=float), labels, smoothing)

    def _unit(self, x: np.ndarray) -> np.ndarray:
        return (np.asarray(x, dtype=float) - self._lo) / self._scale

    def __call__(self, targets: np.ndarray) -> np.ndarray:
        u = self._unit(np.atleast_2d(targets))
        weights = np.stack([np.clip(ind(u), 1e-6, None) ** self.power for ind in self._indicators], axis=1)
        weights /= weights.sum(axis=1, keepdims=True)
        values = np.stack([np.full(len(u), v) if isinstance(v, float) else np.clip(v(u), *bounds)
                           for v, bounds in zip(self._values, self._bounds, strict=True)], axis=1)
        return np.sum(weights * values, axis=1)

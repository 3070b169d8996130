"""Ground-truth maps over a sample area, for simulated autonomous mapping.

A map gives, at sample positions ``(x, y)`` in mm, the values of one or more quantities that a
measurement there would find. Three kinds, each seeded and deterministic:

* :class:`SmoothMap` — a smooth scalar: a few Gaussian bumps of different widths and a gentle
  trend, exponentiated so it stays > 0 (it can stand for a scattered intensity);
* :class:`DiscontinuousMap` — a smooth scalar with jumps across two curved boundaries (a wavy
  closed domain and a wavy line), piecewise constant plus smooth variation;
* :class:`FilmMap` — a synthetic block-copolymer film: grains (Voronoi cells of warped
  coordinates, so their boundaries curve) each with its own orientation, two phases (a
  thresholded Gaussian random field: well-ordered, and a poorly ordered one with a shifted peak),
  and smooth variation of the SAXS ring's position, width and intensity.

The scalar maps are test functions in the spirit of those used to benchmark kriging-based
autonomous experiments (Noack et al., Sci. Rep. 9, 11809 (2019); Noack et al., Sci. Rep. 10,
1325 (2020), doi:10.1038/s41598-020-57887-x); the film is in the spirit of the block-copolymer
films mapped by autonomous SAXS in those papers. None reproduces a published function exactly.
Smooth random fields are random Fourier features of a squared-exponential covariance, so every
map evaluates at any point without a grid.
"""

from __future__ import annotations

import math
from typing import Any, Protocol, runtime_checkable

import numpy as np

__all__ = [
    "FILM_NAMES",
    "DiscontinuousMap",
    "Extent",
    "FilmMap",
    "SmoothMap",
    "TruthMap",
    "truth_grid",
]

Extent = tuple[float, float, float, float]
"""``(x0, x1, y0, y1)`` of a sample area, mm."""

#: Quantities of a :class:`FilmMap`, in the order of :data:`models.saxs2d.REDUCED_NAMES`.
FILM_NAMES: tuple[str, ...] = (
    "peak_q", "width", "intensity", "orientation", "anisotropy", "order_x", "order_y",
)


@runtime_checkable
class TruthMap(Protocol):
    """A ground truth over a sample area.

    Attributes
    ----------
    names : tuple[str, ...]
        The quantities :meth:`values` returns.
    extent : tuple[float, float, float, float]
        ``(x0, x1, y0, y1)`` in mm; the map is defined on this closed rectangle.
    """

    names: tuple[str, ...]
    extent: Extent

    def values(self, x: Any, y: Any) -> dict[str, np.ndarray]:
        """Each quantity at ``(x, y)`` (mm, broadcast together), shaped like the broadcast."""
        ...


def truth_grid(
    truth: TruthMap, n: int = 100
) -> tuple[np.ndarray, np.ndarray, dict[str, np.ndarray]]:
    """The map on an ``n x n`` grid spanning its extent, edges included.

    Parameters
    ----------
    truth : TruthMap
        The map.
    n : int
        Points per axis, >= 2.

    Returns
    -------
    xs, ys : np.ndarray
        Grid coordinates (mm), `n` each.
    values : dict[str, np.ndarray]
        Each quantity, `n x n`, indexed ``[iy, ix]`` (as ``imshow(origin="lower")`` draws it).

    Examples
    --------
    >>> xs, ys, grid = truth_grid(SmoothMap(seed=1), n=5)
    >>> grid["value"].shape
    (5, 5)
    """
    if isinstance(n, bool) or not isinstance(n, int | np.integer) or n < 2:
        raise ValueError(f"n must be an int >= 2; got {n!r}")
    x0, x1, y0, y1 = truth.extent
    xs, ys = np.linspace(x0, x1, int(n)), np.linspace(y0, y1, int(n))
    gx, gy = np.meshgrid(xs, ys, indexing="xy")
    return xs, ys, truth.values(gx, gy)


def _check_extent(extent: Any) -> Extent:
    try:
        x0, x1, y0, y1 = (float(v) for v in extent)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"extent must be four numbers (x0, x1, y0, y1) in mm; got {extent!r}") \
            from exc
    if not (all(map(math.isfinite, (x0, x1, y0, y1))) and x0 < x1 and y0 < y1):
        raise ValueError(f"extent must be finite with x0 < x1 and y0 < y1 (mm); got {extent!r}")
    return (x0, x1, y0, y1)


class _RandomField:
    """A smooth random field of unit variance and squared-exponential covariance of length ``ℓ``.

    ``f(r) = sqrt(2/K) sum_k cos(ω_k · r + φ_k)``, ``ω_k ~ N(0, I/ℓ²)``, ``φ_k ~ U(0, 2π)``.
    """

    def __init__(self, rng: np.random.Generator, length: float, n_features: int = 64) -> None:
        self._omega = rng.normal(0.0, 1.0 / length, size=(n_features, 2))
        self._phase = rng.uniform(0.0, 2.0 * np.pi, size=n_features)
        self._norm = math.sqrt(2.0 / n_features)

    def __call__(self, x: np.ndarray, y: np.ndarray) -> np.ndarray:
        arg = x[..., None] * self._omega[:, 0] + y[..., None] * self._omega[:, 1] + self._phase
        return self._norm * np.cos(arg).sum(axis=-1)


class _MapBase:
    """Extent, seed and checked evaluation, shared by the maps."""

    names: tuple[str, ...] = ("value",)

    def __init__(self, seed: int, extent: Any) -> None:
        self._seed = int(seed)
        self._extent = _check_extent(extent)
        x0, x1, y0, y1 = self._extent
        self._centre = np.array([(x0 + x1) / 2.0, (y0 + y1) / 2.0])
        self._size = max(x1 - x0, y1 - y0)

    @property
    def extent(self) -> Extent:
        """``(x0, x1, y0, y1)`` in mm."""
        return self._extent

    @property
    def seed(self) -> int:
        """The seed the map was drawn from."""
        return self._seed

    def _rng(self) -> np.random.Generator:
        return np.random.default_rng(self._seed)

    def _check_xy(self, x: Any, y: Any) -> tuple[np.ndarray, np.ndarray]:
        xa, ya = np.broadcast_arrays(np.asarray(x, dtype=np.float64),
                                     np.asarray(y, dtype=np.float64))
        x0, x1, y0, y1 = self._extent
        outside = ~((xa >= x0) & (xa <= x1) & (ya >= y0) & (ya <= y1))
        if np.any(outside):
            bad = np.column_stack((xa[outside], ya[outside]))[:3].tolist()
            raise ValueError(
                f"{int(outside.sum())} point(s) outside the map's extent {self._extent} mm "
                f"(or not finite), e.g. {bad}; evaluate inside the sample area"
            )
        return xa, ya

    def values(self, x: Any, y: Any) -> dict[str, np.ndarray]:
        """Each of :attr:`names` at ``(x, y)`` (mm).

        Parameters
        ----------
        x, y : array_like
            Positions in mm, broadcast together, inside :attr:`extent`.

        Returns
        -------
        dict[str, np.ndarray]
            One array per name, shaped like the broadcast of ``x`` and ``y``.

        Raises
        ------
        ValueError
            If a point is outside the extent or not finite.
        """
        return self._values(*self._check_xy(x, y))

    def _values(self, x: np.ndarray, y: np.ndarray) -> dict[str, np.ndarray]:
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}(seed={self._seed}, extent={self._extent})"


class SmoothMap(_MapBase):
    """A smooth positive scalar ``"value"``: Gaussian bumps of several widths and a gentle trend.

    ``value = exp(g · (r - r_c) / L + sum_k a_k exp(-|r - c_k|² / (2 s_k²)))``, with ``L`` the
    larger side of the extent, ``|g| <= 0.3``, ``|a_k|`` in ``[0.3, 0.7]`` of random sign,
    ``c_k`` uniform in the extent and ``s_k`` in ``[0.06, 0.3] L``: about ``[0.3, 3]``.

    Parameters
    ----------
    seed : int
        Seed of the bumps and trend.
    extent : tuple[float, float, float, float]
        ``(x0, x1, y0, y1)`` in mm.
    n_bumps : int
        Number of bumps, >= 1.

    Examples
    --------
    >>> m = SmoothMap(seed=0)
    >>> float(m.values(5.0, 5.0)["value"]) > 0
    True
    """

    names = ("value",)

    def __init__(self, seed: int = 0, extent: Any = (0.0, 10.0, 0.0, 10.0), *,
                 n_bumps: int = 5) -> None:
        super().__init__(seed, extent)
        if isinstance(n_bumps, bool) or not isinstance(n_bumps, int) or n_bumps < 1:
            raise ValueError(f"n_bumps must be an int >= 1; got {n_bumps!r}")
        rng = self._rng()
        x0, x1, y0, y1 = self._extent
        self._centres = np.column_stack(
            (rng.uniform(x0, x1, n_bumps), rng.uniform(y0, y1, n_bumps))
        )
        self._widths = self._size * rng.uniform(0.06, 0.3, n_bumps)
        self._heights = rng.uniform(0.3, 0.7, n_bumps) * rng.choice([-1.0, 1.0], n_bumps)
        angle = rng.uniform(0.0, 2.0 * np.pi)
        self._gradient = rng.uniform(0.1, 0.3) * np.array([np.cos(angle), np.sin(angle)])

    def _values(self, x: np.ndarray, y: np.ndarray) -> dict[str, np.ndarray]:
        dx, dy = x - self._centre[0], y - self._centre[1]
        log_value = (self._gradient[0] * dx + self._gradient[1] * dy) / self._size
        for (cx, cy), s, a in zip(self._centres, self._widths, self._heights, strict=True):
            log_value = log_value + a * np.exp(-((x - cx) ** 2 + (y - cy) ** 2) / (2.0 * s * s))
        return {"value": np.exp(log_value)}


class DiscontinuousMap(_MapBase):
    """A positive scalar ``"value"``: smooth variation plus jumps across two curved boundaries.

    ``value = 1 + 0.2 tanh(f(r)) + J1 [r inside the blob] + J2 [r beyond the wavy line]``, with
    ``f`` a smooth random field of length ``0.25 L``; the blob is a closed curve
    ``ρ(φ) = R (1 + 0.2 sin(3φ + φ0))`` (``R`` in ``[0.15, 0.25] L``), the line a sine wave
    across the sample at a random angle; ``J1`` in ``[0.6, 1.0]``, ``J2`` in ``[-0.5, -0.3]``,
    so the value stays in about ``[0.3, 2.2]``.

    Parameters
    ----------
    seed : int
        Seed of the field and the boundaries.
    extent : tuple[float, float, float, float]
        ``(x0, x1, y0, y1)`` in mm.
    """

    names = ("value",)

    def __init__(self, seed: int = 0, extent: Any = (0.0, 10.0, 0.0, 10.0)) -> None:
        super().__init__(seed, extent)
        rng = self._rng()
        x0, x1, y0, y1 = self._extent
        self._field = _RandomField(rng, 0.25 * self._size)
        self._blob_centre = np.array([rng.uniform(x0 + 0.3 * (x1 - x0), x1 - 0.3 * (x1 - x0)),
                                      rng.uniform(y0 + 0.3 * (y1 - y0), y1 - 0.3 * (y1 - y0))])
        self._blob_radius = self._size * rng.uniform(0.15, 0.25)
        self._blob_phase = rng.uniform(0.0, 2.0 * np.pi)
        self._line_angle = rng.uniform(0.0, np.pi)
        self._line_offset = rng.uniform(-0.25, 0.25) * self._size
        self._line_amplitude = rng.uniform(0.04, 0.08) * self._size
        self._line_wavelength = rng.uniform(0.4, 0.8) * self._size
        self._jumps = (rng.uniform(0.6, 1.0), -rng.uniform(0.3, 0.5))

    def domain(self, x: Any, y: Any) -> np.ndarray:
        """Domain label at ``(x, y)``: ``[inside the blob] + 2 [beyond the line]``, in 0..3."""
        xa, ya = self._check_xy(x, y)
        inside, beyond = self._sides(xa, ya)
        return inside.astype(np.int64) + 2 * beyond.astype(np.int64)

    def _sides(self, x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        bx, by = x - self._blob_centre[0], y - self._blob_centre[1]
        phi = np.arctan2(by, bx)
        radius = self._blob_radius * (1.0 + 0.2 * np.sin(3.0 * phi + self._blob_phase))
        inside = np.hypot(bx, by) < radius
        # Line coordinates: u along the line, v across it.
        c, s = math.cos(self._line_angle), math.sin(self._line_angle)
        dx, dy = x - self._centre[0], y - self._centre[1]
        u, v = c * dx + s * dy, -s * dx + c * dy
        wave = self._line_amplitude * np.sin(2.0 * np.pi * u / self._line_wavelength)
        beyond = v > self._line_offset + wave
        return inside, beyond

    def _values(self, x: np.ndarray, y: np.ndarray) -> dict[str, np.ndarray]:
        inside, beyond = self._sides(x, y)
        smooth = 1.0 + 0.2 * np.tanh(self._field(x, y))
        return {"value": smooth + self._jumps[0] * inside + self._jumps[1] * beyond}


class FilmMap(_MapBase):
    """A synthetic block-copolymer film: oriented grains, two phases, smooth ring variation.

    * Grains: Voronoi cells of ``n ≈ area / grain_size²`` random seeds, computed on coordinates
      warped by a smooth displacement (amplitude ``0.25 grain_size``) so boundaries curve. Each
      grain has an orientation uniform in ``[0, 180)`` degrees, twisted within it by a smooth
      field of amplitude ~5°.
    * Phases: where a smooth random field of length ``phase_length`` is below
      ``phase_threshold`` the film is poorly ordered: anisotropy ~0.12 instead of ~0.55, peak
      0.004 1/Å lower (a larger spacing) and 0.001 1/Å wider. The jump is sharp.
    * Order also drops near grain boundaries (by up to 60%, over ``boundary_width``).
    * Smooth variation: ``peak_q = 0.042 + 0.006 tanh(f1)`` (minus the phase shift: about
      0.03-0.05 1/Å), ``width = 0.0045 + 0.001 tanh(f2)``, ``intensity = intensity_scale
      exp(0.3 f3)`` (counts/s), each ``f`` a unit smooth field of length ``2 grain_size``.

    ``order_x = anisotropy cos 2θ``, ``order_y = anisotropy sin 2θ`` (θ the orientation).

    Parameters
    ----------
    seed : int
        Seed of the whole film.
    extent : tuple[float, float, float, float]
        ``(x0, x1, y0, y1)`` in mm.
    grain_size : float
        Typical grain diameter (mm), > 0.
    intensity_scale : float
        Typical ring count rate (counts/s), > 0.
    phase_length : float | None
        Correlation length of the phase field (mm); ``None``: ``0.3`` of the larger side.
    phase_threshold : float
        Threshold of the unit phase field; below it the film is poorly ordered (-0.6: a quarter
        of the area on average over seeds, from none to ~70% for one seed; ``-inf``: none).
    boundary_width : float
        Width (mm) over which order drops at grain boundaries, > 0.

    Examples
    --------
    >>> film = FilmMap(seed=3)
    >>> sorted(film.values(1.0, 2.0))[:3]
    ['anisotropy', 'intensity', 'order_x']
    """

    names = FILM_NAMES

    def __init__(
        self,
        seed: int = 0,
        extent: Any = (0.0, 10.0, 0.0, 10.0),
        *,
        grain_size: float = 2.0,
        intensity_scale: float = 1e4,
        phase_length: float | None = None,
        phase_threshold: float = -0.6,
        boundary_width: float = 0.15,
    ) -> None:
        super().__init__(seed, extent)
        for name, value in (("grain_size", grain_size), ("intensity_scale", intensity_scale),
                            ("boundary_width", boundary_width)):
            if not (math.isfinite(value) and value > 0):
                raise ValueError(f"{name} must be finite and > 0; got {name}={value!r}")
        if math.isnan(phase_threshold):
            raise ValueError(f"phase_threshold must be a number; got {phase_threshold=}")
        rng = self._rng()
        x0, x1, y0, y1 = self._extent
        area = (x1 - x0) * (y1 - y0)
        n_grains = max(2, round(area / grain_size**2))
        pad = 0.25 * grain_size  # seeds slightly outside too, so edge grains are not huge
        self._seeds = np.column_stack((rng.uniform(x0 - pad, x1 + pad, n_grains),
                                       rng.uniform(y0 - pad, y1 + pad, n_grains)))
        self._grain_orientation = rng.uniform(0.0, 180.0, n_grains)
        self._warp = (_RandomField(rng, grain_size), _RandomField(rng, grain_size))
        self._warp_amplitude = 0.25 * grain_size
        length = 2.0 * grain_size
        self._twist, self._f_q, self._f_w, self._f_i, self._f_a = (
            _RandomField(rng, length) for _ in range(5)
        )
        self._phase_field = _RandomField(
            rng, 0.3 * self._size if phase_length is None else float(phase_length)
        )
        self._phase_threshold = float(phase_threshold)
        self._intensity_scale = float(intensity_scale)
        self._boundary_width = float(boundary_width)

    @property
    def n_grains(self) -> int:
        """Number of grains (Voronoi seeds, some just outside the extent)."""
        return int(self._seeds.shape[0])

    def grain(self, x: Any, y: Any) -> np.ndarray:
        """Index of the grain at ``(x, y)`` (mm), in ``0 .. n_grains - 1``."""
        return self._grains(*self._check_xy(x, y))[0]

    def disordered(self, x: Any, y: Any) -> np.ndarray:
        """Whether ``(x, y)`` (mm) is in the poorly ordered phase."""
        xa, ya = self._check_xy(x, y)
        return self._phase_field(xa, ya) < self._phase_threshold

    def _grains(self, x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Grain index and ``d2 - d1`` (second-nearest minus nearest seed distance, mm)."""
        wx = x + self._warp_amplitude * self._warp[0](x, y)
        wy = y + self._warp_amplitude * self._warp[1](x, y)
        d = np.hypot(wx[..., None] - self._seeds[:, 0], wy[..., None] - self._seeds[:, 1])
        index = np.argmin(d, axis=-1)
        two = np.partition(d, 1, axis=-1)
        return index, two[..., 1] - two[..., 0]

    def _values(self, x: np.ndarray, y: np.ndarray) -> dict[str, np.ndarray]:
        index, gap = self._grains(x, y)
        disordered = self._phase_field(x, y) < self._phase_threshold
        orientation = (self._grain_orientation[index] + 5.0 * self._twist(x, y)) % 180.0
        # gap / 2 is about the distance to the boundary.
        near_boundary = np.exp(-0.5 * (0.5 * gap / self._boundary_width) ** 2)
        order_field = np.tanh(self._f_a(x, y))
        anisotropy = np.where(disordered, 0.12 + 0.04 * order_field, 0.55 + 0.15 * order_field)
        anisotropy = anisotropy * (1.0 - 0.6 * near_boundary)
        two_theta = np.deg2rad(2.0 * orientation)
        return {
            "peak_q": 0.042 + 0.006 * np.tanh(self._f_q(x, y)) - 0.004 * disordered,
            "width": 0.0045 + 0.001 * np.tanh(self._f_w(x, y)) + 0.001 * disordered,
            "intensity": self._intensity_scale * np.exp(0.3 * self._f_i(x, y)),
            "orientation": orientation,
            "anisotropy": anisotropy,
            "order_x": anisotropy * np.cos(two_theta),
            "order_y": anisotropy * np.sin(two_theta),
        }

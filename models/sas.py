"""Small-angle scattering intensities ``I(q)`` of model samples, with pinhole resolution smearing.

The physics is that of sasmodels (the SasView model library): for a form factor ``F`` and an
optional structure factor ``S``,

    ``I(q) = scale / <V> * <|F(q)|^2> * S(q) + background``,

with ``<.>`` the average over the size distribution (polydispersity). Units are sasmodels': ``q``
in 1/Å, scattering-length densities in 1e-6/Å², volumes in Å³; the kernels multiply
``(Δρ V)^2 / V`` by 1e-4, which turns (1e-6/Å²)²·Å³ into 1/cm, so ``I`` is in absolute units
(1/cm) when ``scale`` is the particle volume fraction. For a product ``P@S`` sasmodels multiplies
by ``volfraction`` as well, so there ``scale`` is a calibration factor near 1.

Instrumental resolution is pinhole smearing: each measured point is the average of ``I`` over a
Gaussian in ``q`` of width ``sigma_q = dq_over_q * q``, truncated to ``(-2.5, +3) sigma``
(Barker & Pedersen, J. Appl. Cryst. 28 (1995) 105), by :class:`sasmodels.resolution.Pinhole1D`.
Its kernel points are chosen here (see :func:`_smearing_grid`): sasmodels' default takes the
measured points themselves, which under-samples the sparse ``q`` sets an autonomous experiment
makes. Kernels are compiled C in double precision (sasmodels' "dll" engine, cached on disk).
"""

from __future__ import annotations

import functools
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

import numpy as np
from sasmodels.core import load_model
from sasmodels.direct_model import call_kernel
from sasmodels.resolution import Pinhole1D

from models.errors import ModelError

__all__ = ["SAMPLE_KINDS", "SASModel", "SampleKind"]

#: Gaussian half-widths (low, high) in sigma over which pinhole smearing is computed (sasmodels').
_NSIGMA = (2.5, 3.0)
#: Kernel evaluation points per sigma of the resolution function.
_POINTS_PER_SIGMA = 4
#: Accepted non-zero dq/q: below the minimum the grid gets needlessly dense (smearing is then
#: negligible, use 0); above the maximum q - 2.5 sigma would reach q <= 0.
_MIN_DQ_OVER_Q, _MAX_DQ_OVER_Q = 1e-3, 0.35
#: Distinct q sets whose kernels are kept (a fit evaluates one q set many times).
_CACHE_SIZE = 8
#: Parameter suffixes that select a distribution or a mode, never a continuous value.
_DISCRETE_SUFFIXES = ("_pd_n", "_pd_type", "_pd_nsigma", "_mode")

ParamValue = float | str


@functools.cache
def _load(model_name: str) -> Any:
    """Build (compile on first use) the sasmodels kernel model, shared by every instance."""
    try:
        return load_model(model_name, dtype="double", platform="dll")
    except (ImportError, ValueError, KeyError) as exc:
        raise ValueError(
            f"unknown sasmodels model {model_name!r}; use a name from sasmodels' model list "
            "(e.g. 'sphere', 'cylinder', 'core_shell_sphere', 'sphere@hardsphere')"
        ) from exc


def _valid_names(info: Any) -> tuple[str, ...]:
    names: list[str] = []
    for par in info.parameters.call_parameters:
        names.append(par.name)
        if par.polydisperse:
            names.extend(par.name + s for s in ("_pd", "_pd_n", "_pd_nsigma", "_pd_type"))
    return tuple(names)


def _as_q(q: Any) -> np.ndarray:
    arr = np.ascontiguousarray(q, dtype=np.float64)
    if arr.ndim != 1 or arr.size == 0:
        raise ValueError(f"q must be a non-empty 1D array of 1/Å values; got {arr.shape=}")
    bad = ~np.isfinite(arr) | (arr <= 0)
    if bad.any():
        raise ValueError(f"q must be finite and > 0 (1/Å); bad values: {arr[bad][:5].tolist()}")
    return arr


def _smearing_grid(q: np.ndarray, dq_over_q: float) -> np.ndarray:
    """Kernel points, `m`, covering every point's resolution window.

    The points are ``ratio**k`` for integers ``k`` (a grid anchored at 1/Å), kept within one step
    of some window. A measured point thus sees the same kernel points and bin edges whatever
    other points are in the set, so its smeared value does not depend on them.
    """
    log_ratio = np.log1p(dq_over_q / _POINTS_PER_SIGMA)
    lo = q * (1.0 - _NSIGMA[0] * dq_over_q)
    hi = q * (1.0 + _NSIGMA[1] * dq_over_q)
    k = np.arange(np.floor(np.log(lo.min()) / log_ratio) - 1,
                  np.ceil(np.log(hi.max()) / log_ratio) + 2)
    grid = np.exp(k * log_ratio)
    order = np.argsort(lo)
    pad = np.exp(log_ratio)
    # Keep a grid point when it is within a step of a window: find the last window starting
    # below it, and compare with the furthest end of the windows up to there.
    idx = np.searchsorted(lo[order] / pad, grid, side="right") - 1
    running_hi = np.maximum.accumulate(hi[order] * pad)
    keep = (idx >= 0) & (grid <= running_hi[np.maximum(idx, 0)])
    return grid[keep]


@dataclass(frozen=True)
class _Evaluator:
    """A kernel for one q set and, when smearing, the resolution that maps it to the data."""

    kernel: Any
    resolution: Pinhole1D | None


class SASModel:
    """A sasmodels model evaluated at given ``q``, optionally smeared by pinhole resolution.

    Parameters
    ----------
    model_name : str
        A sasmodels model name or expression, e.g. ``"sphere"``, ``"cylinder"``,
        ``"sphere@hardsphere"`` (form factor @ structure factor).
    dq_over_q : float
        Relative Gaussian resolution ``sigma_q / q``: 0 (no smearing) or in ``[0.001, 0.35]``.
    fixed : Mapping[str, float | str] | None
        Parameter values that stay fixed (SLDs, ``radius_pd_n``, ...); the values given to
        :meth:`intensity` update them. Unset parameters take sasmodels' defaults.

    Raises
    ------
    ValueError
        If the model is unknown, ``dq_over_q`` is out of range, or ``fixed`` names an unknown
        parameter.

    Examples
    --------
    >>> m = SASModel("sphere", fixed={"sld": 3.47, "sld_solvent": 6.36})
    >>> m.intensity(np.array([0.01, 0.1]), {"radius": 50.0, "scale": 0.01}).shape
    (2,)
    """

    def __init__(
        self,
        model_name: str,
        *,
        dq_over_q: float = 0.0,
        fixed: Mapping[str, ParamValue] | None = None,
    ) -> None:
        if not (dq_over_q == 0.0 or _MIN_DQ_OVER_Q <= dq_over_q <= _MAX_DQ_OVER_Q):
            raise ValueError(
                f"dq_over_q must be 0 (no smearing) or in [{_MIN_DQ_OVER_Q}, {_MAX_DQ_OVER_Q}]; "
                f"got {dq_over_q=}"
            )
        self._model = _load(model_name)
        self._model_name = model_name
        self._dq_over_q = float(dq_over_q)
        self._names = _valid_names(self._model.info)
        fixed_dict = dict(fixed or {})
        self._check_names(fixed_dict)
        self._fixed = MappingProxyType(fixed_dict)
        self._cache: OrderedDict[bytes, _Evaluator] = OrderedDict()

    @property
    def model_name(self) -> str:
        """The sasmodels model name or expression."""
        return self._model_name

    @property
    def dq_over_q(self) -> float:
        """Relative resolution ``sigma_q / q`` (0: no smearing)."""
        return self._dq_over_q

    @property
    def fixed(self) -> Mapping[str, ParamValue]:
        """Fixed parameter values (read-only)."""
        return self._fixed

    @property
    def parameter_names(self) -> tuple[str, ...]:
        """Every parameter name the model accepts, polydispersity settings included."""
        return self._names

    def _check_names(self, params: Mapping[str, Any]) -> None:
        unknown = sorted(set(params) - set(self._names))
        if unknown:
            raise ValueError(
                f"unknown parameter(s) {unknown} for model {self._model_name!r}; "
                f"valid names: {list(self._names)}"
            )

    def _evaluator(self, q: np.ndarray) -> _Evaluator:
        key = q.tobytes()
        hit = self._cache.get(key)
        if hit is not None:
            self._cache.move_to_end(key)
            return hit
        if self._dq_over_q > 0:
            q_calc = _smearing_grid(q, self._dq_over_q)
            resolution = Pinhole1D(q, q * self._dq_over_q, q_calc=q_calc, nsigma=_NSIGMA)
            kernel = self._model.make_kernel([resolution.q_calc])
        else:
            resolution = None
            kernel = self._model.make_kernel([q])
        evaluator = _Evaluator(kernel=kernel, resolution=resolution)
        self._cache[key] = evaluator
        if len(self._cache) > _CACHE_SIZE:
            _, old = self._cache.popitem(last=False)
            old.kernel.release()
        return evaluator

    def intensity(self, q: Any, params: Mapping[str, ParamValue] | None = None) -> np.ndarray:
        """Scattered intensity, smeared by the resolution when ``dq_over_q > 0``.

        Parameters
        ----------
        q : array_like
            Scattering vectors, `n`, in 1/Å; finite and > 0, any order.
        params : Mapping[str, float | str] | None
            Parameter values; they update the fixed values.

        Returns
        -------
        np.ndarray
            ``I(q)`` in 1/cm, `n`.

        Raises
        ------
        ValueError
            If ``q`` is not a valid 1D array or a parameter name is unknown.
        ModelError
            If the model gives a non-finite intensity for these parameters.
        """
        q_arr = _as_q(q)
        values = {**self._fixed, **(params or {})}
        self._check_names(values)
        evaluator = self._evaluator(q_arr)
        theory = np.asarray(call_kernel(evaluator.kernel, values), dtype=np.float64)
        if evaluator.resolution is not None:
            theory = np.asarray(evaluator.resolution.apply(theory), dtype=np.float64)
        if not np.all(np.isfinite(theory)):
            raise ModelError(
                f"model {self._model_name!r} gave non-finite I(q) for parameters "
                f"{dict(params or {})}; check they are physical"
            )
        return theory

    def jacobian(
        self,
        q: Any,
        params: Mapping[str, ParamValue],
        names: Sequence[str],
        rel_step: float = 1e-4,
    ) -> np.ndarray:
        """Derivatives of ``I(q)`` by central finite differences with relative steps.

        ``dI/dθ_j ≈ (I(θ + h_j e_j) - I(θ - h_j e_j)) / (2 h_j)``, ``h_j = rel_step * |θ_j|``
        (a forward difference of step ``rel_step`` where ``θ_j = 0``).

        Parameters
        ----------
        q : array_like
            Scattering vectors, `n`, in 1/Å.
        params : Mapping[str, float | str]
            Values at which to differentiate (updating the fixed ones, then sasmodels' defaults).
        names : Sequence[str]
            The `p` continuous parameters to differentiate by.
        rel_step : float
            Relative step, in ``(0, 0.1]``.

        Returns
        -------
        np.ndarray
            ``dI/dθ`` in 1/cm per unit of each parameter, `n x p`.

        Raises
        ------
        ValueError
            If a name is unknown, repeated or discrete (``*_pd_n``, ``*_mode``, ...), or
            ``rel_step`` is out of range.
        """
        if not 0.0 < rel_step <= 0.1:
            raise ValueError(f"rel_step must be in (0, 0.1]; got {rel_step=}")
        self._check_derivative_names(names)
        base = {**self._model.info.parameters.defaults, **self._fixed, **params}
        q_arr = _as_q(q)
        jac = np.empty((q_arr.size, len(names)))
        i0: np.ndarray | None = None
        for j, name in enumerate(names):
            value = float(base.get(name, 0.0))  # only *_pd widths lack a default: theirs is 0
            if value == 0.0:
                i0 = self.intensity(q_arr, base) if i0 is None else i0
                jac[:, j] = (self.intensity(q_arr, {**base, name: rel_step}) - i0) / rel_step
                continue
            h = rel_step * abs(value)
            up = self.intensity(q_arr, {**base, name: value + h})
            down = self.intensity(q_arr, {**base, name: value - h})
            jac[:, j] = (up - down) / (2.0 * h)
        return jac

    def _check_derivative_names(self, names: Sequence[str]) -> None:
        if len(set(names)) != len(names) or not names:
            raise ValueError(f"names must be non-empty and distinct; got {list(names)}")
        self._check_names(dict.fromkeys(names))
        discrete = [n for n in names if n.endswith(_DISCRETE_SUFFIXES)]
        if discrete:
            raise ValueError(f"cannot differentiate by discrete parameter(s) {discrete}")


@dataclass(frozen=True)
class SampleKind:
    """A kind of sample: its sasmodels model, fixed values and the ranges a user would give.

    Attributes
    ----------
    model_name : str
        sasmodels model name or expression.
    fixed : Mapping[str, float | str]
        Values never fitted (SLDs in 1e-6/Å², polydispersity settings, modes).
    size_params, fit_params : tuple[str, ...]
        The size parameters (Å); every fitted one (sizes, ``scale``, ``background``, nuisances).
    bounds, truth_ranges : Mapping[str, tuple[float, float]]
        Prior range ``(lo, hi) > 0`` of each fitted parameter; the sub-range from which
        :meth:`draw_truth` draws, log-uniformly.
    description : str
        What the sample is, physically.
    """

    model_name: str
    fixed: Mapping[str, ParamValue]
    size_params: tuple[str, ...]
    fit_params: tuple[str, ...]
    bounds: Mapping[str, tuple[float, float]]
    truth_ranges: Mapping[str, tuple[float, float]]
    description: str = ""

    def __post_init__(self) -> None:
        for field in ("fixed", "bounds", "truth_ranges"):
            object.__setattr__(self, field, MappingProxyType(dict(getattr(self, field))))
        if not set(self.size_params) <= set(self.fit_params):
            raise ValueError(f"{self.size_params=} must be among {self.fit_params=}")
        for name in self.fit_params:
            lo, hi = self.bounds[name]
            t_lo, t_hi = self.truth_ranges[name]
            if not 0 < lo <= t_lo < t_hi <= hi:
                raise ValueError(f"{name}: need 0 < bounds lo <= truth range <= bounds hi; got "
                                 f"bounds {(lo, hi)}, truth range {(t_lo, t_hi)}")

    def model(self, *, dq_over_q: float = 0.0) -> SASModel:
        """The :class:`SASModel` of this kind, with its fixed values."""
        return SASModel(self.model_name, dq_over_q=dq_over_q, fixed=self.fixed)

    def draw_truth(self, rng: np.random.Generator) -> dict[str, float]:
        """A random ground truth: each fitted parameter log-uniform in its truth range."""
        return {
            name: float(np.exp(rng.uniform(*np.log(self.truth_ranges[name]))))
            for name in self.fit_params
        }

    def initial(self) -> dict[str, float]:
        """A user's first guess: the geometric centre of each truth range."""
        return {name: float(np.sqrt(np.prod(self.truth_ranges[name]))) for name in self.fit_params}


# SLDs (1e-6/Å², neutrons): D2O 6.36, silica 3.47, hydrogenous polymer ~0.5-1.
# Ranges are ((bounds lo, hi), (truth lo, hi)). "scale" is a volume fraction, "background" the
# incoherent background (1/cm): both make I(0.3/Å) mostly background, as in real SANS.
_Ranges = tuple[tuple[float, float], tuple[float, float]]
_NUISANCE: dict[str, _Ranges] = {
    "scale": ((1e-4, 0.2), (0.002, 0.03)),
    "background": ((1e-4, 1.0), (0.003, 0.05)),
}
_GAUSS: dict[str, ParamValue] = {"radius_pd_type": "gaussian", "radius_pd_nsigma": 3.0}


def _kind(model_name: str, fixed: dict[str, ParamValue], size: dict[str, _Ranges],
          nuisance: dict[str, _Ranges], description: str) -> SampleKind:
    ranges = {**size, **nuisance}
    for name, default in _NUISANCE.items():  # last, after the kind's own nuisances
        ranges[name] = ranges.pop(name, default)
    return SampleKind(
        model_name=model_name, fixed={**_GAUSS, **fixed}, size_params=tuple(size),
        fit_params=tuple(ranges), bounds={n: r[0] for n, r in ranges.items()},
        truth_ranges={n: r[1] for n, r in ranges.items()}, description=description,
    )


SAMPLE_KINDS: dict[str, SampleKind] = {
    "polydisperse_sphere": _kind(
        "sphere", {"sld": 3.47, "sld_solvent": 6.36, "radius_pd_n": 35},
        {"radius": ((10.0, 300.0), (30.0, 120.0))},
        {"radius_pd": ((0.01, 0.3), (0.05, 0.15))},
        "silica spheres in D2O, Gaussian radius distribution of relative width radius_pd",
    ),
    "core_shell_sphere": _kind(
        "core_shell_sphere",
        {"sld_core": 3.47, "sld_shell": 0.8, "sld_solvent": 6.36, "radius_pd": 0.05,
         "radius_pd_n": 21},
        {"radius": ((10.0, 300.0), (30.0, 120.0)), "thickness": ((1.0, 100.0), (5.0, 40.0))},
        {},
        "silica cores (5% size spread) with a hydrogenous polymer shell, in D2O",
    ),
    "cylinder": _kind(
        "cylinder", {"sld": 0.5, "sld_solvent": 6.36, "radius_pd": 0.1, "radius_pd_n": 15},
        {"radius": ((5.0, 200.0), (15.0, 60.0)), "length": ((20.0, 5000.0), (150.0, 1500.0))},
        {},
        "randomly oriented hydrogenous polymer rods (10% radius spread) in D2O",
    ),
    "sphere_hardsphere": _kind(
        "sphere@hardsphere",
        {"sld": 3.47, "sld_solvent": 6.36, "radius_pd": 0.05, "radius_pd_n": 21,
         # mode 1: R_eff is the form factor's radius; structure factor mode 0: decoupling approx.
         "radius_effective_mode": 1, "structure_factor_mode": 0},
        {"radius": ((10.0, 300.0), (30.0, 120.0))},
        # sasmodels multiplies P@S by volfraction too, so scale is a calibration factor ~1.
        {"volfraction": ((0.005, 0.5), (0.05, 0.3)), "scale": ((0.1, 10.0), (0.7, 1.4))},
        "concentrated silica (5% size spread) in D2O: hard-sphere S(q) with R_eff = radius",
    ),
}

"""gpCAM as a mapping baseline: the autonomous-experiment GP tool beamlines run today.

:class:`GpcamMapper` drives gpCAM's :class:`gpcam.GPOptimizer` (gpCAM 8.6.1, fvgp 4.9.3) the
way gpCAM's own examples do (``examples/GPOptimizer_Minimal.ipynb``: construct with data,
``train()``, then ``ask(bounds)["x"]`` / ``tell(x, y)`` in a loop, re-training now and then),
so the mapping benchmark can put it beside our kriging agent on the same truth maps and
budgets. Everything that decides where gpCAM measures is gpCAM's default:

* **Model.** The default kernel, an anisotropic (ARD) Matérn-3/2 with hyper-parameters
  ``[signal variance, length-scale x, length-scale y]``, and the default prior mean, a constant
  equal to ``mean(y_data)``. The measurement noise is the known, fixed ``noise_variance``
  handed over as ``noise_variances`` ("use ``noise_variances`` if noise is known and uniform",
  gpCAM's experiment-designer guide); it is not a trained hyper-parameter. Without it gpCAM
  would assume ``(mean(|y|) / 100)**2``, a value tied to the offset of the data.
* **Training.** ``GPOptimizer.train`` with gpCAM's default method (``"local"``: L-BFGS-B on
  the log marginal likelihood from 5 starts, the current hyper-parameters and 4 random ones)
  within bounds of the same form as fvgp's own default
  (``_get_default_hyperparameter_bounds``): signal variance in ``[var(y) / 100, 10 var(y)]``,
  each length-scale in ``[extent / 100, 10 extent]``, with the extent of the mapped domain in
  place of the extent of the data so far. When to train is the :class:`TrainSchedule`: first
  at ``min_points`` observations, then whenever the data have grown by ``growth`` since the
  last training (gpCAM's ``optimize()`` trains at 10, 20, 50, 100, 200 points: about x2).
* **Acquisition.** ``GPOptimizer.ask(bounds, acquisition_function="variance", n=1,
  method="global")``: gpCAM maximises the posterior standard deviation over the box with
  scipy's differential evolution (population 20 per dimension, 20 generations, no polish).
  For ``n > 1`` points gpCAM's default is to maximise the ``"total correlation"`` of the
  whole batch, again by differential evolution, now over the ``n * 2``-dimensional product
  box (``ask`` switches to it, with a warning, whatever acquisition is given); this adapter
  asks for ``"total correlation"`` outright. Each evaluation of it factorises two
  ``(N + n)``-square matrices, so it is only practical up to a few hundred observations
  (about 4 s per ask of 4 at N = 100, minutes at N = 1000). gpCAM's other batch route,
  ``method="hgdl"``, starts a dask ``LocalCluster`` of worker processes for every ask and is
  not used.

gpCAM draws its random numbers from numpy's global generator (scipy's differential evolution
and the random restarts of the training both take ``seed=None``). Every gpCAM call here runs
with that generator seeded from the mapper's own seeded sequence and restored afterwards, so a
run is reproducible and leaves the caller's global state alone. Every call also runs with
stdout redirected to stderr and with warnings recorded (:attr:`GpcamMapper.gpcam_warnings`)
rather than raised or printed, and importing gpCAM is done lazily, inside a
``warnings.catch_warnings`` block, because fvgp installs a process-wide ``"once"`` filter for
``UserWarning`` at import.

:func:`latency` times ``ask`` (and one ``train``) at a given data size. Training costs
O(N^3) per likelihood evaluation (about 70 evaluations at N = 1000, each with an N x N x 3
kernel-gradient tensor), so above ``train_max_points`` it is timed on a random subsample and
the hyper-parameters from that subsample are used for the asks on the full data.

Timings depend strongly on BLAS threading: on the 2-core benchmark machine, with other work
running, OpenBLAS's default 2 threads made a 100-point ``ask`` about 30x slower (0.33 s against
0.01 s) and a 5000-point one 1.5x slower than ``OPENBLAS_NUM_THREADS=1``; :func:`latency`
reports the thread variables it ran under.

    python benchmarks/baselines/gpcam.py    # smoke check: a 100-point closed loop, to stderr
"""

from __future__ import annotations

import contextlib
import math
import os
import sys
import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np

__all__ = ["GpcamMapper", "TrainSchedule", "latency"]

_PREDICT_CHUNK = 1000  # fvgp's posterior_covariance forms the full chunk x chunk covariance
_THREAD_ENV = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")


def _gpcam() -> Any:
    """Import gpCAM without letting its import-time warning filters escape.

    Returns
    -------
    module
        The :mod:`gpcam` package.
    """
    with warnings.catch_warnings():  # fvgp calls warnings.simplefilter("once", UserWarning)
        import gpcam

    return gpcam


@dataclass(frozen=True)
class TrainSchedule:
    """When :class:`GpcamMapper` re-trains gpCAM's hyper-parameters, and how.

    Parameters
    ----------
    min_points : int
        The first training happens once this many observations have been told.
    growth : float
        Later trainings happen once the number of observations is at least ``growth`` times
        the number at the previous training.
    max_points : int or None
        No training beyond this many observations (the last hyper-parameters are kept), as a
        user would stop once a training takes minutes. ``None``: no limit.
    method : str
        ``GPOptimizer.train``'s ``method``: ``"local"`` (gpCAM's default), ``"global"``
        (differential evolution), ``"mcmc"``, ``"adam"``, ``"bo"``; ``"hgdl"`` needs a dask
        cluster and is not supported here.
    n_restarts : int
        Starting points of the ``"local"`` method (gpCAM's default 5).
    max_iter : int
        ``GPOptimizer.train``'s ``max_iter`` (gpCAM's default 10000).
    """

    min_points: int = 10
    growth: float = 1.5
    max_points: int | None = None
    method: str = "local"
    n_restarts: int = 5
    max_iter: int = 10000

    def __post_init__(self) -> None:
        if self.min_points < 2:
            raise ValueError("min_points must be at least 2")
        if self.growth <= 1.0:
            raise ValueError("growth must be above 1")
        if self.max_points is not None and self.max_points < self.min_points:
            raise ValueError("max_points must be at least min_points")
        if self.method == "hgdl":
            raise ValueError("method='hgdl' starts a dask cluster; use 'local' or 'global'")

    def due(self, n_points: int, n_at_last_train: int | None) -> bool:
        """Whether a training is due with ``n_points`` observations.

        Parameters
        ----------
        n_points : int
            Observations told so far.
        n_at_last_train : int or None
            Observations at the previous training, ``None`` if there was none.

        Returns
        -------
        bool
            True when the schedule asks for a training now.
        """
        if n_points < self.min_points:
            return False
        if self.max_points is not None and n_points > self.max_points:
            return False
        return n_at_last_train is None or n_points >= self.growth * n_at_last_train


class GpcamMapper:
    """Map a scalar field over a rectangle with gpCAM's ``GPOptimizer`` and variance acquisition.

    Parameters
    ----------
    extent : tuple of float
        The domain ``(x0, x1, y0, y1)``; ``ask`` searches the box ``[x0, x1] x [y0, y1]``.
    noise_variance : float
        Variance of the measurement noise, positive; given to gpCAM as the (fixed)
        ``noise_variances`` of every observation.
    seed : int
        Seed of the random numbers gpCAM draws (and of the first points, see :meth:`ask`).
    train_schedule : TrainSchedule
        When and how the hyper-parameters are re-trained.
    ask_pop_size : int
        ``ask``'s ``pop_size`` (gpCAM's default 20, per dimension).
    ask_max_iter : int
        ``ask``'s ``max_iter`` (gpCAM's default 20 generations).
    linalg_mode : str or None
        ``GPOptimizer``'s ``linalg_mode``; ``None`` (gpCAM's default) is a Cholesky factor.

    Attributes
    ----------
    ask_seconds : list of float
        Wall time of each gpCAM ``ask``.
    train_seconds : list of float
        Wall time of each training.
    tell_seconds : list of float
        Wall time of each ``tell`` (the first one builds the GP), training excluded.
    train_sizes : list of int
        Number of observations at each training.
    gpcam_warnings : dict of str to int
        Warnings gpCAM emitted (``"Category: message"``) and how often.
    """

    def __init__(
        self,
        extent: tuple[float, float, float, float],
        *,
        noise_variance: float,
        seed: int,
        train_schedule: TrainSchedule = TrainSchedule(),
        ask_pop_size: int = 20,
        ask_max_iter: int = 20,
        linalg_mode: str | None = None,
    ) -> None:
        x0, x1, y0, y1 = (float(v) for v in extent)
        if not (x1 > x0 and y1 > y0):
            raise ValueError(f"extent must be (x0, x1, y0, y1) with x1 > x0 and y1 > y0: {extent}")
        if not (math.isfinite(noise_variance) and noise_variance > 0):
            raise ValueError("noise_variance must be positive (gpCAM asserts noise_variances > 0)")
        self.extent = (x0, x1, y0, y1)
        self.bounds = np.array([[x0, x1], [y0, y1]])
        self.noise_variance = float(noise_variance)
        self.seed = int(seed)
        self.schedule = train_schedule
        self.ask_pop_size = int(ask_pop_size)
        self.ask_max_iter = int(ask_max_iter)
        self.linalg_mode = linalg_mode
        self._rng = np.random.default_rng(seed)
        self._gp: Any = None
        self._n_at_last_train: int | None = None
        self.ask_seconds: list[float] = []
        self.train_seconds: list[float] = []
        self.tell_seconds: list[float] = []
        self.train_sizes: list[int] = []
        self.gpcam_warnings: dict[str, int] = {}

    # -- plumbing ---------------------------------------------------------------------------
    @contextlib.contextmanager
    def _gpcam_call(self) -> Iterator[None]:
        """Run a gpCAM call seeded, silent on stdout, with its warnings recorded."""
        state = np.random.get_state()
        np.random.seed(int(self._rng.integers(2**32)))
        caught: list[warnings.WarningMessage] = []
        try:
            with (
                warnings.catch_warnings(record=True) as record,
                contextlib.redirect_stdout(sys.stderr),
            ):
                warnings.simplefilter("always")
                caught = record
                yield
        finally:
            np.random.set_state(state)
            for w in caught:
                key = f"{w.category.__name__}: {w.message}"
                self.gpcam_warnings[key] = self.gpcam_warnings.get(key, 0) + 1

    def _hyperparameter_bounds(self) -> np.ndarray:
        var_y = max(float(np.var(self._gp.y_data)), 1e-12)
        span = self.bounds[:, 1] - self.bounds[:, 0]
        length_scales = np.column_stack([span / 100.0, span * 10.0])
        return np.vstack([[var_y / 100.0, var_y * 10.0], length_scales])

    # -- state ------------------------------------------------------------------------------
    @property
    def n_points(self) -> int:
        """Number of observations told so far."""
        return 0 if self._gp is None else len(self._gp.x_data)

    @property
    def hyperparameters(self) -> np.ndarray | None:
        """gpCAM's current ``[signal variance, length-scale x, length-scale y]``."""
        return None if self._gp is None else np.array(self._gp.hyperparameters, dtype=float)

    @property
    def gp(self) -> Any:
        """The underlying :class:`gpcam.GPOptimizer` (``None`` before the first ``tell``)."""
        return self._gp

    # -- the loop ---------------------------------------------------------------------------
    def tell(self, xy: np.ndarray, values: np.ndarray) -> None:
        """Add observations, then train if the schedule says so.

        Parameters
        ----------
        xy : numpy.ndarray
            Positions, shape ``(n, 2)``.
        values : numpy.ndarray
            Measured values, shape ``(n,)``.
        """
        xy = np.asarray(xy, dtype=float).reshape(-1, 2)
        values = np.asarray(values, dtype=float).reshape(-1)
        if len(xy) != len(values):
            raise ValueError(f"{len(xy)} positions but {len(values)} values")
        if len(xy) == 0:
            return
        if not (np.all(np.isfinite(xy)) and np.all(np.isfinite(values))):
            raise ValueError("positions and values must be finite")
        noise = np.full(len(values), self.noise_variance)
        gpcam = _gpcam()  # imported before the clock starts (about 1 s, once)
        start = time.perf_counter()
        with self._gpcam_call():
            if self._gp is None:
                var_y = float(np.var(values)) if len(values) > 1 else 0.0
                span = self.bounds[:, 1] - self.bounds[:, 0]
                # gpCAM's default start is a vector of ones; this is the same up to the scales
                init = np.concatenate([[var_y if var_y > 0 else 1.0], span / 10.0])
                self._gp = gpcam.GPOptimizer(
                    xy, values, init_hyperparameters=init, noise_variances=noise,
                    linalg_mode=self.linalg_mode,
                )
            else:
                self._gp.tell(xy, values, noise_variances=noise, append=True)
        self.tell_seconds.append(time.perf_counter() - start)
        if self.schedule.due(self.n_points, self._n_at_last_train):
            self.train()

    def train(self) -> np.ndarray:
        """Train the hyper-parameters now (``GPOptimizer.train``), timed.

        Returns
        -------
        numpy.ndarray
            The hyper-parameters in use afterwards.
        """
        if self._gp is None:
            raise RuntimeError("tell() some observations before train()")
        s = self.schedule
        start = time.perf_counter()
        with self._gpcam_call():
            self._gp.train(hyperparameter_bounds=self._hyperparameter_bounds(), method=s.method,
                           n_restarts=s.n_restarts, max_iter=s.max_iter)
        self.train_seconds.append(time.perf_counter() - start)
        self.train_sizes.append(self.n_points)
        self._n_at_last_train = self.n_points
        return np.array(self._gp.hyperparameters, dtype=float)

    def set_hyperparameters(self, hyperparameters: np.ndarray) -> None:
        """Use given hyper-parameters (``GPOptimizer.set_hyperparameters``), without training.

        Parameters
        ----------
        hyperparameters : numpy.ndarray
            ``[signal variance, length-scale x, length-scale y]``.
        """
        if self._gp is None:
            raise RuntimeError("tell() some observations before set_hyperparameters()")
        with self._gpcam_call():
            self._gp.set_hyperparameters(np.asarray(hyperparameters, dtype=float))

    def ask(self, n: int = 1) -> np.ndarray:
        """Next positions to measure: gpCAM's maximum of the posterior variance.

        ``n == 1``: ``ask(bounds, acquisition_function="variance", n=1, method="global")``.
        ``n > 1``: gpCAM's batch, the maximum of ``"total correlation"`` over ``n`` points
        (see the module notes on its cost). Before any observation gpCAM cannot ask; the
        positions are then uniform random in the domain (as gpCAM's ``optimize()`` starts),
        drawn from the mapper's seed and not timed.

        Parameters
        ----------
        n : int
            Number of positions.

        Returns
        -------
        numpy.ndarray
            Positions, shape ``(n, 2)``, inside the domain.
        """
        if n < 1:
            raise ValueError("n must be at least 1")
        if self._gp is None:
            return self._rng.uniform(self.bounds[:, 0], self.bounds[:, 1], size=(n, 2))
        acquisition = "variance" if n == 1 else "total correlation"
        start = time.perf_counter()
        with self._gpcam_call():
            result = self._gp.ask(self.bounds, acquisition_function=acquisition, n=n,
                                  method="global", pop_size=self.ask_pop_size,
                                  max_iter=self.ask_max_iter)
        self.ask_seconds.append(time.perf_counter() - start)
        x = np.asarray(result["x"], dtype=float).reshape(n, 2)
        return np.clip(x, self.bounds[:, 0], self.bounds[:, 1])

    def predict(self, xy: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Posterior mean and variance of the field (noise not included).

        Parameters
        ----------
        xy : numpy.ndarray
            Positions, shape ``(m, 2)``; evaluated in chunks of 1000.

        Returns
        -------
        mean, variance : numpy.ndarray
            Each of shape ``(m,)``.
        """
        if self._gp is None:
            raise RuntimeError("tell() some observations before predict()")
        xy = np.asarray(xy, dtype=float).reshape(-1, 2)
        mean = np.empty(len(xy))
        var = np.empty(len(xy))
        with self._gpcam_call():
            for lo in range(0, len(xy), _PREDICT_CHUNK):
                chunk = xy[lo:lo + _PREDICT_CHUNK]
                mean[lo:lo + len(chunk)] = np.reshape(self._gp.posterior_mean(chunk)["m(x)"], -1)
                cov = self._gp.posterior_covariance(chunk, variance_only=True, add_noise=False)
                var[lo:lo + len(chunk)] = np.reshape(cov["v(x)"], -1)
        return mean, var


def _versions() -> dict[str, str]:
    gpcam = _gpcam()
    import fvgp

    return {"gpcam": gpcam.__version__, "fvgp": fvgp.__version__}


def latency(
    points_xy: np.ndarray,
    values: np.ndarray,
    n_asks: int = 5,
    *,
    noise_variance: float | None = None,
    extent: tuple[float, float, float, float] | None = None,
    seed: int = 0,
    train_max_points: int = 1000,
) -> dict[str, Any]:
    """Seconds per gpCAM ``ask`` (batch of 1) and per ``train`` at a given data size.

    A :class:`GpcamMapper` is given all the points in one ``tell`` (timed as
    ``construct_seconds``: gpCAM builds and factorises the covariance). If there are at most
    ``train_max_points`` points one training on all of them is timed; otherwise the training
    is timed on a random subsample of ``train_max_points`` points (it costs O(N^3) per
    likelihood evaluation: about 40 s at N = 1000 on 2 cores, so well over an hour at 5000),
    and its hyper-parameters are set on the full GP. Then ``n_asks`` asks are timed on the
    same state.

    Parameters
    ----------
    points_xy : numpy.ndarray
        Positions, shape ``(N, 2)``.
    values : numpy.ndarray
        Values, shape ``(N,)``.
    n_asks : int
        Number of timed asks.
    noise_variance : float or None
        Measurement noise variance; ``None``: 1% of the variance of ``values``.
    extent : tuple of float or None
        ``(x0, x1, y0, y1)``; ``None``: the bounding box of the points.
    seed : int
        Seed of the mapper and of the subsample.
    train_max_points : int
        Largest data size at which training is timed.

    Returns
    -------
    dict
        ``ask_seconds`` (list), ``ask_median_s``, ``ask_p95_s`` (numpy's linear-interpolated
        95th percentile, so with 5 asks close to the maximum), ``train_seconds``,
        ``train_n_points``, ``train_on_subsample``, ``train_note``,
        ``train_seconds_extrapolated`` (the subsample's time scaled by N^3, an estimate),
        ``construct_seconds``, hyper-parameters, machine load and versions.
    """
    xy = np.asarray(points_xy, dtype=float).reshape(-1, 2)
    y = np.asarray(values, dtype=float).reshape(-1)
    n = len(xy)
    if extent is None:
        lo, hi = xy.min(axis=0), xy.max(axis=0)
        extent = (float(lo[0]), float(hi[0]), float(lo[1]), float(hi[1]))
    if noise_variance is None:
        noise_variance = max(0.01 * float(np.var(y)), 1e-12)
    never = TrainSchedule(min_points=n + 1)  # training is timed explicitly below
    mapper = GpcamMapper(extent, noise_variance=noise_variance, seed=seed, train_schedule=never)
    mapper.tell(xy, y)
    out: dict[str, Any] = {"n_points": n, "construct_seconds": mapper.tell_seconds[0]}

    if n <= train_max_points:
        mapper.train()
        out.update(train_seconds=mapper.train_seconds[0], train_n_points=n,
                   train_on_subsample=False, train_seconds_extrapolated=None,
                   train_note="trained on all points")
        warned: dict[str, int] = {}
    else:
        idx = np.random.default_rng(seed).choice(n, size=train_max_points, replace=False)
        sub = GpcamMapper(extent, noise_variance=noise_variance, seed=seed,
                          train_schedule=TrainSchedule(min_points=train_max_points + 1))
        sub.tell(xy[idx], y[idx])
        hyperparameters = sub.train()
        start = time.perf_counter()
        mapper.set_hyperparameters(hyperparameters)
        t_sub = sub.train_seconds[0]
        out.update(
            train_seconds=t_sub, train_n_points=train_max_points, train_on_subsample=True,
            train_seconds_extrapolated=t_sub * (n / train_max_points) ** 3,
            set_hyperparameters_seconds=time.perf_counter() - start,
            train_note=(f"training not timed at {n} points (O(N^3) per likelihood evaluation; "
                        f"extrapolated from {train_max_points}); timed on a random subsample of "
                        f"{train_max_points}, whose hyper-parameters are used for the asks"),
        )
        warned = sub.gpcam_warnings

    for _ in range(n_asks):
        mapper.ask(1)
    asks = np.asarray(mapper.ask_seconds)
    out.update(
        n_asks=n_asks, ask_batch_size=1, ask_seconds=asks.tolist(),
        ask_median_s=float(np.median(asks)), ask_p95_s=float(np.percentile(asks, 95)),
        train_method=mapper.schedule.method,
        hyperparameters=np.asarray(mapper.gp.hyperparameters, dtype=float).tolist(),
        cpu_count=os.cpu_count(), loadavg_1min=os.getloadavg()[0],
        blas_thread_env={k: os.environ[k] for k in _THREAD_ENV if k in os.environ},
        gpcam_warnings={k: warned.get(k, 0) + mapper.gpcam_warnings.get(k, 0)
                        for k in {*warned, *mapper.gpcam_warnings}},
        **_versions(),
    )
    return out


def _smoke() -> None:
    """Closed loop of 100 points on a smooth noisy test field; report to stderr."""

    def field(p: np.ndarray) -> np.ndarray:
        x, y = p[:, 0], p[:, 1]
        return (np.sin(0.6 * x) * np.cos(0.45 * y)
                + 0.8 * np.exp(-((x - 6.5) ** 2 + (y - 3.0) ** 2) / 3.0))

    def log(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    noise_sd, budget, n_init = 0.05, 100, 10
    rng = np.random.default_rng(1)
    g = np.linspace(0.0, 10.0, 60)
    grid = np.column_stack([a.ravel() for a in np.meshgrid(g, g)])
    truth = field(grid)
    mapper = GpcamMapper((0.0, 10.0, 0.0, 10.0), noise_variance=noise_sd**2, seed=0)

    def measure(p: np.ndarray) -> np.ndarray:
        return field(p) + noise_sd * rng.standard_normal(len(p))

    p = mapper.ask(n_init)  # uniform random: gpCAM cannot ask without data
    mapper.tell(p, measure(p))
    asked = []
    log(f"{'points':>6} {'rmse':>8} {'max|err|':>8} {'mean sd':>8}  hyper-parameters")
    while mapper.n_points < budget:
        p = mapper.ask(1)
        asked.append(p[0])
        mapper.tell(p, measure(p))
        if mapper.n_points % 10 == 0:
            mean, var = mapper.predict(grid)
            err = mean - truth
            hp = np.array2string(np.asarray(mapper.gp.hyperparameters), precision=3)
            log(f"{mapper.n_points:>6} {np.sqrt(np.mean(err**2)):8.4f} {np.max(np.abs(err)):8.4f} "
                f"{np.mean(np.sqrt(var)):8.4f}  {hp}")
    a = np.asarray(mapper.ask_seconds)
    log(f"ask   : {len(a)} x, median {np.median(a) * 1e3:.1f} ms, p95 "
        f"{np.percentile(a, 95) * 1e3:.1f} ms, max {a.max() * 1e3:.1f} ms")
    log("train : " + ", ".join(f"{s:.2f} s at {k}" for s, k in
                               zip(mapper.train_seconds, mapper.train_sizes, strict=True)))
    t = np.asarray(mapper.tell_seconds)
    log(f"tell  : median {np.median(t) * 1e3:.1f} ms")
    pts = np.asarray(asked)
    edge = np.any((pts <= 0.1) | (pts >= 9.9), axis=1)
    log(f"asked points within 1% of the domain edge: {edge.sum()} of {len(pts)}")
    for key, count in mapper.gpcam_warnings.items():
        log(f"gpCAM warning x{count}: {key}")


if __name__ == "__main__":
    _smoke()

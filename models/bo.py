"""Constrained Bayesian optimisation: qLogNEI on a GP surrogate, with inputs in physical units.

The surrogate is one botorch ``SingleTaskGP`` over all outcomes (the objective and ``m``
constraints, independent outputs with their own hyper-parameters), with a ``Normalize`` input
transform (the search box to the unit cube) and a ``Standardize`` outcome transform. The noise is
inferred. Hyper-parameters come from the marginal likelihood (``fit_gpytorch_mll``), warm-started
from the previous fit, so each refit is a few optimiser steps.

The next batch of ``q`` points maximises q-log noisy expected improvement (qLogNEI, Ament et al.
2023) of the objective ``f`` under outcome constraints ``c_j(x) <= 0``:

    qLogNEI(X) = log E[ max_i (f(x_i) - f*)_+ prod_j s(-c_j(x_i) / eta) ]

with ``f*`` the best feasible value among the observed points (sampled jointly, so noise does not
inflate it) and ``s`` a fat-tailed sigmoid. It is optimised jointly over the ``q`` points with
``optimize_acqf`` (multi-start L-BFGS-B from Sobol raw samples), within a search box that can be
smaller than the model's bounds (a trust region, e.g. an instrument's largest safe step).

Rows with a NaN objective or constraint are skipped (the caller names and reports them).
:meth:`BayesOptimizer.probability_feasible` gives ``P(c(x) <= 0)`` under the posterior, so a
caller can decide that a constraint can never be met; :meth:`BayesOptimizer.recommend` picks the
evaluated point with the best posterior-mean objective among those likely feasible.

Numerical warnings from the fits and the acquisition optimiser (jitter added to a covariance,
an L-BFGS line search that stopped early) are expected in routine use: they are recorded in
:attr:`BayesOptimizer.warnings` and logged, not raised. Everything else propagates.

:func:`hartmann6` is the standard 6-D test function (maximised, optimum 3.32237), with noise.
"""

from __future__ import annotations

import logging
import math
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial
from typing import Any

import numpy as np
import torch
from botorch.acquisition.logei import qLogNoisyExpectedImprovement, qLogProbabilityOfFeasibility
from botorch.acquisition.monte_carlo import qSimpleRegret
from botorch.acquisition.objective import ConstrainedMCObjective, GenericMCObjective
from botorch.exceptions.errors import ModelFittingError
from botorch.exceptions.warnings import (
    BadInitialCandidatesWarning,
    NumericsWarning,
    OptimizationWarning,
)
from botorch.fit import fit_gpytorch_mll
from botorch.models import SingleTaskGP
from botorch.models.transforms import Normalize, Standardize
from botorch.optim import optimize_acqf
from botorch.sampling import SobolQMCNormalSampler
from botorch.test_functions import Hartmann
from botorch.utils.sampling import draw_sobol_samples, manual_seed
from gpytorch.mlls import ExactMarginalLogLikelihood
from gpytorch.utils.warnings import NumericalWarning

from models.device import default_device, default_dtype
from models.errors import ModelError

__all__ = [
    "HARTMANN6_OPTIMIZER",
    "HARTMANN6_OPTIMUM",
    "BOConfig",
    "BayesOptimizer",
    "Recommendation",
    "Suggestion",
    "hartmann6",
    "sobol_design",
    "suggest",
]

logger = logging.getLogger(__name__)

#: warnings of routine numerics, recorded rather than raised
_NUMERICS = (OptimizationWarning, NumericsWarning, NumericalWarning, BadInitialCandidatesWarning)
#: notices of situations botorch handles itself, recorded, not raised: qLogNEI's that in some
#: posterior samples no observed point is feasible (it then takes a lower bound of the objective
#: as the incumbent), and optimize_acqf's that it restarts from new initial conditions (and
#: that the restart failed too: it then returns the best candidates it found)
_HANDLED = ("When all training points are infeasible", "Optimization failed in `gen_candidates_scipy`",
            "Optimization failed on the second try")


#: the cube the ball's points are searched through (see BayesOptimizer.suggest)
_CUBE = torch.tensor([[-1.0], [1.0]], dtype=torch.float64)


class _Composed(torch.nn.Module):
    """An acquisition function of ``to_box(U)``: what ``optimize_acqf`` maximises over ``U``."""

    def __init__(self, acq: Any, to_box: Any) -> None:
        super().__init__()
        self.acq, self.to_box = acq, to_box

    def forward(self, U: torch.Tensor) -> torch.Tensor:
        return self.acq(self.to_box(U))


@dataclass(frozen=True)
class BOConfig:
    """Settings of :class:`BayesOptimizer`.

    Parameters
    ----------
    num_restarts
        Starting points of the acquisition optimiser.
    raw_samples
        Sobol points scored to choose the starting points.
    mc_samples
        Quasi-Monte-Carlo samples of the posterior in qLogNEI.
    maxiter
        L-BFGS-B iterations per start.
    eta
        Temperature of the constraints' sigmoid (in constraint units, here standardised ones are
        not used: the constraint is evaluated in its own units).
    seed
        Seed of the samplers (combined with the number of observations, so each decision has
        its own draw and a resumed run makes the same one).
    torch_threads
        Intra-op threads torch uses while fitting and optimising (restored afterwards). These
        are small matrices: more threads gain little, and on a busy machine their spin-waiting
        makes a step ten times slower. ``None`` leaves torch's setting alone.
    """

    num_restarts: int = 8
    raw_samples: int = 256
    mc_samples: int = 128
    maxiter: int = 200
    eta: float = 1e-3
    seed: int = 0
    torch_threads: int | None = 1

    def __post_init__(self) -> None:
        for name in ("num_restarts", "raw_samples", "mc_samples", "maxiter"):
            if getattr(self, name) < 1:
                raise ValueError(f"BOConfig.{name} must be >= 1, got {getattr(self, name)}")
        if not self.eta > 0:
            raise ValueError(f"BOConfig.eta must be > 0, got {self.eta=}")
        if self.torch_threads is not None and self.torch_threads < 1:
            raise ValueError(f"BOConfig.torch_threads must be >= 1 or None, got {self.torch_threads=}")


@dataclass(frozen=True)
class Suggestion:
    """The next batch: ``X`` (`q x d`, physical units), the acquisition that chose it and its
    value (natural log): ``"qlognei"`` (log expected improvement), ``"feasibility"`` (log
    probability that the batch has a feasible point, used while no observation is feasible) or
    ``"exploit"`` (``nan``)."""

    X: np.ndarray
    log_acq: float
    kind: str = "qlognei"


@dataclass(frozen=True)
class Recommendation:
    """The evaluated point the model believes best.

    ``index`` counts rows of the ``X`` passed to :meth:`BayesOptimizer.fit` (NaN rows included);
    ``mean`` is the posterior mean of the objective there, ``p_feasible`` the posterior
    probability that every constraint holds.
    """

    index: int
    x: np.ndarray
    mean: float
    p_feasible: float


def _as_bounds(bounds: Any, tkw: dict[str, Any]) -> torch.Tensor:
    b = torch.as_tensor(np.asarray(bounds, dtype=np.float64), **tkw)
    if b.ndim != 2 or b.shape[0] != 2 or b.shape[1] < 1:
        raise ValueError(f"bounds must be `2 x d` (lows, highs); got {tuple(b.shape)=}")
    if not bool(torch.all(torch.isfinite(b))) or not bool(torch.all(b[0] < b[1])):
        raise ValueError(f"bounds need finite lows < highs; got {b.cpu().numpy().tolist()}")
    return b


def sobol_design(bounds: Any, n: int, *, seed: int = 0) -> np.ndarray:
    """``n`` scrambled Sobol points in the box ``bounds`` (`2 x d`): an `n x d` array."""
    if n < 1:
        raise ValueError(f"sobol_design needs n >= 1, got {n=}")
    b = _as_bounds(bounds, {"dtype": torch.float64})
    return draw_sobol_samples(b, n=n, q=1, seed=seed).squeeze(-2).numpy()


@contextmanager
def _recorded(into: list[str], what: str, threads: int | None = None) -> Iterator[None]:
    """Record (and log) routine numerical warnings raised inside; let any other through.
    With ``threads``, torch uses that many intra-op threads inside (process-wide, restored)."""
    before = torch.get_num_threads()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        if threads is not None:
            torch.set_num_threads(threads)
        try:
            yield
        finally:
            torch.set_num_threads(before)
    for w in caught:
        if issubclass(w.category, _NUMERICS) or str(w.message).startswith(_HANDLED):
            message = f"{what}: {w.category.__name__}: {w.message}"
            into.append(message)
            logger.info("%s", message)
        else:
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno, source=w.source)


def _outcome(Z: torch.Tensor, j: int) -> torch.Tensor:
    """Outcome ``j`` of posterior samples `... x q x (1+m)`: `... x q`."""
    return Z[..., j]


def _objective(Z: torch.Tensor, X: torch.Tensor | None = None) -> torch.Tensor:
    return Z[..., 0]


class BayesOptimizer:
    """Fits a GP to observations and proposes batches by constrained qLogNEI.

    Parameters
    ----------
    bounds
        `2 x d` lows and highs of the inputs (physical units): the ``Normalize`` transform's box.
    n_constraints
        Number ``m`` of outcome constraints; each observation carries ``m`` values ``c_j``,
        feasible when ``c_j <= 0``.
    config
        A :class:`BOConfig`.

    Examples
    --------
    >>> bo = BayesOptimizer([[0.0] * 6, [1.0] * 6])
    >>> X = sobol_design(bo.bounds_np, 8, seed=1)
    >>> bo.fit(X, hartmann6(X))  # doctest: +SKIP
    >>> bo.suggest(q=2).X.shape  # doctest: +SKIP
    (2, 6)
    """

    def __init__(self, bounds: Any, *, n_constraints: int = 0, config: BOConfig | None = None) -> None:
        self._tkw: dict[str, Any] = {"device": default_device(), "dtype": default_dtype()}
        self.bounds = _as_bounds(bounds, self._tkw)
        if n_constraints < 0:
            raise ValueError(f"n_constraints must be >= 0, got {n_constraints=}")
        self.n_constraints = int(n_constraints)
        self.config = config or BOConfig()
        self.model: SingleTaskGP | None = None
        self.warnings: list[str] = []
        self.n_fits = 0
        self._hyper: dict[str, torch.Tensor] | None = None
        self._rows = np.zeros(0, dtype=int)  # rows of the last fit's X that were used

    @property
    def d(self) -> int:
        return int(self.bounds.shape[1])

    @property
    def bounds_np(self) -> np.ndarray:
        return self.bounds.cpu().numpy()

    @property
    def n_train(self) -> int:
        return int(self._rows.size)

    # -- fitting ------------------------------------------------------------------------------
    def _check(self, X: Any, Y: Any, C: Any) -> tuple[np.ndarray, np.ndarray]:
        X = np.asarray(X, dtype=np.float64)
        Y = np.asarray(Y, dtype=np.float64).reshape(-1, 1)
        if X.ndim != 2 or X.shape[1] != self.d:
            raise ValueError(f"X must be `n x {self.d}`; got {X.shape=}")
        if Y.shape[0] != X.shape[0]:
            raise ValueError(f"one objective value per row of X is needed: {X.shape=}, {Y.shape=}")
        m = self.n_constraints
        if m:
            if C is None:
                raise ValueError(f"this optimiser has {m} constraint(s): pass C of shape `n x {m}`")
            C = np.asarray(C, dtype=np.float64).reshape(X.shape[0], -1)
            if C.shape[1] != m:
                raise ValueError(f"C must be `n x {m}`; got {C.shape=}")
            Y = np.concatenate([Y, C], axis=1)
        elif C is not None and np.size(C):
            raise ValueError("C given but n_constraints=0; build the optimiser with n_constraints")
        return X, Y

    def fit(self, X: Any, Y: Any, C: Any = None, *, noise_std: Any = None) -> np.ndarray:
        """Fit the GP to the finite rows of ``(X, Y, C)``; return the boolean mask of rows used.

        Parameters
        ----------
        X
            `n x d` inputs in physical units.
        Y
            `n` objective values (maximised).
        C
            `n x m` constraint values (feasible when ``<= 0``); required when ``m > 0``.
        noise_std
            Known noise standard deviation of each outcome (``1 + m`` values, objective first,
            in the units of ``Y`` and ``C``), e.g. from an instrument's specification; ``None``:
            inferred with the hyper-parameters. Known noise keeps the posterior honest near
            the constraint's boundary, where a wrongly small inferred noise makes it overconfident.

        Raises
        ------
        ModelError
            If fewer than 2 rows are finite.
        """
        X, Yall = self._check(X, Y, C)
        used = np.all(np.isfinite(X), axis=1) & np.all(np.isfinite(Yall), axis=1)
        if int(used.sum()) < 2:
            raise ModelError(
                f"only {int(used.sum())} of {len(X)} observations are finite; the GP needs at least 2"
            )
        train_X = torch.as_tensor(X[used], **self._tkw)
        train_Y = torch.as_tensor(Yall[used], **self._tkw)
        train_Yvar = None
        if noise_std is not None:
            sd = np.broadcast_to(np.asarray(noise_std, dtype=np.float64), (Yall.shape[1],))
            if not np.all(np.isfinite(sd) & (sd > 0)):
                raise ValueError(f"noise_std must be finite and > 0 for each of the {Yall.shape[1]} outcomes; got {sd.tolist()}")
            train_Yvar = torch.as_tensor(np.tile(sd**2, (int(used.sum()), 1)), **self._tkw)
        model = SingleTaskGP(
            train_X, train_Y, train_Yvar,
            input_transform=Normalize(d=self.d, bounds=self.bounds),
            outcome_transform=Standardize(m=train_Y.shape[-1]),
        )
        if self._hyper is not None:
            model.load_state_dict(self._hyper, strict=False)  # warm start
        mll = ExactMarginalLogLikelihood(model.likelihood, model)
        # fit restarts draw from torch's global generator: seed it here (and restore it after),
        # so the same observations always give the same model
        with _recorded(self.warnings, "GP fit", self.config.torch_threads), manual_seed(self.config.seed + len(X)):
            try:
                fit_gpytorch_mll(mll)
            except ModelFittingError as err:
                # keep the warm-start (or default) hyper-parameters: a usable, if stale, model
                self.warnings.append(f"GP fit: {err}")
                logger.warning("GP hyper-parameter fit failed (%s); keeping the previous values", err)
        model.eval()
        self.model = model
        self._hyper = self.hyperparameters()
        self._rows = np.flatnonzero(used)
        self._train_X = train_X
        self._train_Y = Yall[used]
        self.n_fits += 1
        return used

    def _model(self) -> SingleTaskGP:
        if self.model is None:
            raise ModelError("the optimiser has no model yet: call fit() first")
        return self.model

    def hyperparameters(self) -> dict[str, torch.Tensor]:
        """Learned kernel, mean and noise parameters (no data or transforms)."""
        return {
            k: v.detach().clone()
            for k, v in self._model().named_parameters()
            if k.startswith(("covar_module.", "mean_module.", "likelihood."))
        }

    def state(self) -> dict[str, Any]:
        """JSON-able state: the hyper-parameters to warm-start from, and the fit count."""
        hyper = {k: v.cpu().tolist() for k, v in (self._hyper or {}).items()}
        return {"hyperparameters": hyper, "n_fits": self.n_fits}

    def load_state(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`state` returned; the next :meth:`fit` starts from it."""
        hyper = state.get("hyperparameters") or {}
        self._hyper = {k: torch.as_tensor(v, **self._tkw) for k, v in hyper.items()} or None
        self.n_fits = int(state.get("n_fits", 0))

    # -- predictions --------------------------------------------------------------------------
    def predict(self, X: Any) -> tuple[np.ndarray, np.ndarray]:
        """Posterior mean and variance of the latent outcomes at ``X`` (`n x d`): each `n x (1+m)`."""
        Xt = torch.as_tensor(np.asarray(X, dtype=np.float64).reshape(-1, self.d), **self._tkw)
        with torch.no_grad(), _recorded(self.warnings, "posterior", self.config.torch_threads):
            post = self._model().posterior(Xt.unsqueeze(-2))  # marginals: `n x 1 x d` t-batches
            mean = post.mean.reshape(Xt.shape[0], -1)
            var = post.variance.reshape(Xt.shape[0], -1)
        return mean.cpu().numpy(), var.clamp_min(0.0).cpu().numpy()

    def probability_feasible(self, X: Any) -> np.ndarray:
        """``P(c_j(x) <= 0 for all j)`` under the posterior, outputs independent: `n`.

        ``prod_j Phi(-mu_j(x) / sigma_j(x))``; all ones when there are no constraints.
        """
        mean, var = self.predict(X)
        if self.n_constraints == 0:
            return np.ones(mean.shape[0])
        mu = torch.as_tensor(mean[:, 1:])
        sd = torch.as_tensor(np.sqrt(np.maximum(var[:, 1:], 1e-300)))
        p = torch.special.ndtr(-mu / sd).prod(dim=-1)
        return p.numpy()

    def recommend(self, *, min_p_feasible: float = 0.5) -> Recommendation | None:
        """The evaluated point (a row used in the last :meth:`fit`) with the best posterior-mean
        objective among those feasible with probability ``>= min_p_feasible``; ``None`` if none.

        Rows skipped by the fit (NaN) are never recommended; ``index`` counts rows of the ``X``
        passed to :meth:`fit`.
        """
        if not 0 < min_p_feasible < 1:
            raise ValueError(f"min_p_feasible must be in (0, 1), got {min_p_feasible=}")
        self._model()
        X = self._train_X.cpu().numpy()
        mean, _ = self.predict(X)
        p = self.probability_feasible(X)
        ok = p >= min_p_feasible
        if not np.any(ok):
            return None
        j = int(np.argmax(np.where(ok, mean[:, 0], -np.inf)))
        return Recommendation(int(self._rows[j]), X[j].copy(), float(mean[j, 0]), float(p[j]))

    # -- acquisition --------------------------------------------------------------------------
    def suggest(
        self,
        q: int = 1,
        *,
        search_bounds: Any = None,
        X_pending: Any = None,
        seed: int | None = None,
        exploit: bool = False,
        ball: tuple[Any, float] | None = None,
    ) -> Suggestion:
        """The next ``q`` points by qLogNEI with the outcome constraints.

        While no observation meets the constraints, qLogNEI has no incumbent to improve on:
        the batch then maximises the log probability that one of its points is feasible
        (``qLogProbabilityOfFeasibility``), which is how the feasible region is found first.

        Parameters
        ----------
        q
            Batch size (joint optimisation of the ``q`` points).
        search_bounds
            `2 x d` box to search (physical units, inside :attr:`bounds`); default: the bounds.
        X_pending
            `p x d` points asked for but not yet observed (the acquisition counts them as taken).
        seed
            Seed of the MC sampler and the raw samples; default ``config.seed + n_train``.
        exploit
            Maximise ``E[f(x) 1(c(x) <= 0)]`` (qSimpleRegret with the constraints smoothed,
            infeasible points scored well below the worst observed value) instead of qLogNEI:
            measures where the model believes the optimum is (pure exploitation, e.g. a last
            confirming measurement). ``log_acq`` is then ``nan``.
        ball
            ``(centre, radius)``: search only the points of the box within Euclidean distance
            ``radius`` of ``centre`` (physical units), the distance measured in units of each
            axis's range of :attr:`bounds` (a trust region). In a box, an acquisition that
            rewards uncertainty peaks at its corners, so every coordinate moves by the box's full
            half-width at once, even one the model says is already right; in a ball a step's
            length is shared out by the acquisition's own gradient. The ball is searched through
            a radial map of the cube ``[-1, 1]^d`` onto it (``u ||u||_inf / ||u||_2``), with
            points outside the box moved onto it (so the centre may lie outside the box, inside
            the bounds: the search is then over the ball's projection onto the box), and the
            optimiser needs no nonlinear constraint.

        Returns
        -------
        Suggestion
        """
        if q < 1:
            raise ValueError(f"q must be >= 1, got {q=}")
        self._model()  # fitted, or ModelError
        box = self.bounds if search_bounds is None else _as_bounds(search_bounds, self._tkw)
        if box.shape != self.bounds.shape:
            raise ValueError(f"search_bounds must be `2 x {self.d}`; got {tuple(box.shape)}")
        if bool(torch.any(box[0] < self.bounds[0])) or bool(torch.any(box[1] > self.bounds[1])):
            raise ValueError(
                f"search_bounds {box.cpu().numpy().tolist()} reach outside the model's bounds "
                f"{self.bounds_np.tolist()}; intersect them with the bounds first"
            )
        seed = self.config.seed + self.n_train if seed is None else int(seed)
        pending = None
        if X_pending is not None and np.size(X_pending):
            pending = torch.as_tensor(np.asarray(X_pending, dtype=np.float64).reshape(-1, self.d), **self._tkw)
        sampler = SobolQMCNormalSampler(sample_shape=torch.Size([self.config.mc_samples]), seed=seed)
        kind = "exploit" if exploit else "qlognei"
        if self.n_constraints and not np.any(np.all(self._train_Y[:, 1:] <= 0, axis=1)):
            kind = "feasibility"  # nothing feasible seen: find the feasible region first
        build = {"exploit": self._exploit, "qlognei": self._qlognei, "feasibility": self._feasibility}[kind]
        to_box: Any = None
        if ball is not None:
            to_box = self._ball_map(ball, box)
        with _recorded(self.warnings, "acquisition", self.config.torch_threads), manual_seed(seed):
            acq = build(sampler, pending)
            candidates, value = optimize_acqf(
                acq if to_box is None else _Composed(acq, to_box),
                bounds=box if to_box is None else _CUBE.to(box).expand(2, self.d),
                q=q, num_restarts=self.config.num_restarts, raw_samples=self.config.raw_samples,
                options={"maxiter": self.config.maxiter, "seed": seed, "batch_limit": self.config.num_restarts},
            )
            if to_box is not None:
                candidates = to_box(candidates)
        X = candidates.detach().cpu().numpy().reshape(q, self.d)
        lo, hi = box.cpu().numpy()
        X = np.minimum(np.maximum(X, lo), hi)  # float round-off only: L-BFGS-B stays in the box
        log_acq = float("nan")
        if kind != "exploit" and value is not None:
            log_acq = float(value.detach().cpu().reshape(-1)[0])
        return Suggestion(X, log_acq, kind)

    def _ball_map(self, ball: tuple[Any, float], box: torch.Tensor) -> Any:
        """The map from the cube ``[-1, 1]^d`` onto the ball's points in ``box`` (see :meth:`suggest`)."""
        centre, radius = ball
        c = torch.as_tensor(np.asarray(centre, dtype=np.float64).reshape(-1), **self._tkw)
        if c.shape != (self.d,) or not bool(torch.all(torch.isfinite(c))):
            raise ValueError(f"ball centre must be {self.d} finite values; got {np.asarray(centre).tolist()}")
        if not (math.isfinite(radius) and radius > 0):
            raise ValueError(f"ball radius must be finite and > 0 (in units of each axis's range); got {radius=}")
        if bool(torch.any(c < self.bounds[0])) or bool(torch.any(c > self.bounds[1])):
            raise ValueError(f"ball centre {c.tolist()} lies outside the model's bounds {self.bounds_np.tolist()}")
        scale = radius * (self.bounds[1] - self.bounds[0])

        def to_box(U: torch.Tensor) -> torch.Tensor:
            stretch = U.abs().amax(dim=-1, keepdim=True) / U.norm(dim=-1, keepdim=True).clamp_min(1e-12)
            return torch.minimum(torch.maximum(c + U * stretch * scale, box[0]), box[1])

        return to_box

    def _feasibility(self, sampler: SobolQMCNormalSampler, pending: torch.Tensor | None) -> Any:
        return qLogProbabilityOfFeasibility(
            self._model(), constraints=self._constraints(), sampler=sampler, X_pending=pending, eta=self.config.eta,
        )

    def _constraints(self) -> list[Any]:
        return [partial(_outcome, j=1 + j) for j in range(self.n_constraints)]

    def _qlognei(self, sampler: SobolQMCNormalSampler, pending: torch.Tensor | None) -> Any:
        return qLogNoisyExpectedImprovement(
            model=self._model(),
            X_baseline=self._train_X,  # physical units: the model's input transform applies
            sampler=sampler,
            objective=GenericMCObjective(_objective),
            constraints=self._constraints() or None,
            eta=self.config.eta,
            X_pending=pending,
            prune_baseline=True,
        )

    def _exploit(self, sampler: SobolQMCNormalSampler, pending: torch.Tensor | None) -> Any:
        objective: Any = GenericMCObjective(_objective)
        if self.n_constraints:
            # infeasible samples score at the worst observed value, less one spread of the data
            y = self._train_Y[:, 0]
            worst = float(y.min() - (y.max() - y.min()))
            objective = ConstrainedMCObjective(
                objective=_objective, constraints=self._constraints(),
                infeasible_cost=-worst, eta=self.config.eta,
            )
        return qSimpleRegret(self._model(), sampler=sampler, objective=objective, X_pending=pending)


def suggest(
    X: Any,
    Y: Any,
    C: Any,
    bounds: Any,
    q: int = 1,
    *,
    config: BOConfig | None = None,
    search_bounds: Any = None,
) -> np.ndarray:
    """One-shot: fit a :class:`BayesOptimizer` to ``(X, Y, C)`` and return the next `q x d` batch.

    ``C`` is `n x m` constraint values (feasible when ``<= 0``) or ``None`` for none.
    """
    m = 0 if C is None else np.asarray(C, dtype=np.float64).reshape(len(np.asarray(X)), -1).shape[1]
    bo = BayesOptimizer(bounds, n_constraints=m, config=config)
    bo.fit(X, Y, C)
    return bo.suggest(q, search_bounds=search_bounds).X


#: maximum of :func:`hartmann6` (the negated Hartmann function) and where it is
HARTMANN6_OPTIMUM = 3.32237
HARTMANN6_OPTIMIZER = (0.20169, 0.150011, 0.476874, 0.275332, 0.311652, 0.6573)


def hartmann6(X: Any, *, noise_std: float = 0.0, rng: np.random.Generator | None = None) -> np.ndarray:
    """The 6-D Hartmann function, negated to be maximised on ``[0, 1]^6``, plus Gaussian noise.

    ``f(x) = sum_i alpha_i exp(-sum_j A_ij (x_j - P_ij)^2)``; maximum :data:`HARTMANN6_OPTIMUM`.

    Parameters
    ----------
    X
        `n x 6` points in the unit cube.
    noise_std
        Standard deviation of the additive noise (0: the true value).
    rng
        Source of the noise (required when ``noise_std > 0``).

    Returns
    -------
    np.ndarray
        `n` values.
    """
    X = np.asarray(X, dtype=np.float64)
    if X.ndim != 2 or X.shape[1] != 6:
        raise ValueError(f"hartmann6 takes `n x 6` points; got {X.shape=}")
    # ``evaluate_true`` ignores ``negate``: the sign is flipped here
    f = -Hartmann(dim=6).evaluate_true(torch.as_tensor(X)).numpy()
    if noise_std > 0:
        if rng is None:
            raise ValueError("noise_std > 0 needs an rng (np.random.default_rng(seed))")
        f = f + noise_std * rng.standard_normal(f.shape)
    return f

"""Multi-objective Bayesian optimisation: qLogNEHVI on a GP surrogate, for small budgets.

The alternative to a genetic algorithm when evaluations are few (tens to a few hundred): a
botorch ``SingleTaskGP`` over all objectives (independent outputs, ``Normalize`` input and
``Standardize`` outcome transforms, hyper-parameters from the marginal likelihood, fitted afresh
each time so a decision depends only on the data and the seed - a resumed run decides as the
uninterrupted one would), and batches chosen by q-log noisy expected hypervolume improvement (qLogNEHVI,
Daulton et al. 2021; Ament et al. 2023) against a fixed reference point, optimised
sequentially over the ``q`` points of a batch (greedy, which is how qNEHVI scales in ``q``).

Same conventions as :class:`models.moga.GeneticOptimizer`: objectives are minimised, the
reference point is given in the same (minimised) units, and :meth:`ask` / :meth:`tell` hand
out and take back whole batches. The first batch is a scrambled Sobol design.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch
from botorch.acquisition.multi_objective.logei import qLogNoisyExpectedHypervolumeImprovement
from botorch.fit import fit_gpytorch_mll
from botorch.models import SingleTaskGP
from botorch.models.transforms import Normalize, Standardize
from botorch.optim import optimize_acqf
from botorch.sampling import SobolQMCNormalSampler
from botorch.utils.sampling import manual_seed
from gpytorch.mlls import ExactMarginalLogLikelihood

from models.bo import _as_bounds, _recorded, sobol_design
from models.errors import ModelError
from models.moga import non_dominated

__all__ = ["MOBOConfig", "MultiObjectiveBO"]


@dataclass(frozen=True)
class MOBOConfig:
    """Settings of :class:`MultiObjectiveBO`: batch sizes and the acquisition optimiser's effort."""

    n_initial: int = 12
    q: int = 4
    num_restarts: int = 4
    raw_samples: int = 128
    mc_samples: int = 64
    maxiter: int = 100
    torch_threads: int | None = 1

    def __post_init__(self) -> None:
        for name in ("n_initial", "q", "num_restarts", "raw_samples", "mc_samples", "maxiter"):
            if getattr(self, name) < 1:
                raise ValueError(f"MOBOConfig.{name} must be >= 1, got {getattr(self, name)}")


class MultiObjectiveBO:
    """qLogNEHVI by ask/tell, objectives minimised.

    Parameters
    ----------
    lower, upper
        The decision box.
    ref
        Reference point of the hypervolume (minimised units): only points better than it in
        every objective count.
    config
        Batch sizes and optimiser effort.
    seed
        Seeds the initial design and, with the number of observations, every decision.
    """

    def __init__(self, lower: Sequence[float], upper: Sequence[float], *, ref: Sequence[float],
                 config: MOBOConfig | None = None, seed: int = 0) -> None:
        self._tkw: dict[str, Any] = {"dtype": torch.float64}
        self.bounds = _as_bounds(np.vstack([lower, upper]), self._tkw)
        self.ref = np.asarray(ref, dtype=float)
        self.config = MOBOConfig() if config is None else config
        self.seed = int(seed)
        self.X = np.empty((0, self.bounds.shape[1]))
        self.F = np.empty((0, len(self.ref)))
        self.warnings: list[str] = []
        self._asked: np.ndarray | None = None

    name = "mobo"

    @property
    def generation(self) -> int:
        """Batches told so far."""
        return 0 if len(self.X) == 0 else 1 + max(0, (len(self.X) - self.config.n_initial)) // self.config.q

    def ask(self, limit: int | None = None) -> np.ndarray:
        """The next batch: the Sobol design first, then ``q`` points by qLogNEHVI; at most
        ``limit`` points (what is left of a budget), the rest of a batch asked for again, as it
        was, until told."""
        if self._asked is not None:
            return self._asked.copy()
        if limit is not None and limit < 1:
            raise ValueError(f"limit must be >= 1 (points to ask for), got {limit}")
        if len(self.X) == 0:
            n = self.config.n_initial if limit is None else min(self.config.n_initial, limit)
            X = sobol_design(self.bounds.numpy(), self.config.n_initial, seed=self.seed)[:n]
        else:
            X = self._suggest(self.config.q if limit is None else min(self.config.q, limit))
        self._asked = X
        return X.copy()

    def tell(self, X: np.ndarray, F: np.ndarray, G: np.ndarray | None = None) -> None:
        """Give the objectives (minimised) of the batch :meth:`ask` returned.

        ``G`` (constraints, ``<= 0`` feasible) is accepted for a common interface with
        :class:`~models.moga.GeneticOptimizer`; a caller that has constraints gives infeasible
        points objectives no better than the reference point, which the acquisition then ignores.
        """
        if self._asked is None or not np.array_equal(np.asarray(X, dtype=float), self._asked):
            raise ModelError("tell() must return the X that ask() gave, in order")
        F = np.asarray(F, dtype=float).reshape(len(X), len(self.ref))
        if not np.all(np.isfinite(F)):
            raise ModelError("objectives must be finite: report a failed evaluation with bad values, not NaN")
        self.X = np.vstack([self.X, X])
        self.F = np.vstack([self.F, F])
        self._asked = None

    def state(self) -> dict[str, Any]:
        """What :meth:`from_state` needs (the observations and the settings)."""
        if self._asked is not None:
            raise ModelError("state() between ask() and tell(): save after a batch is told")
        return {"seed": self.seed, "X": self.X.copy(), "F": self.F.copy(), "config": asdict(self.config)}

    @classmethod
    def from_state(cls, state: dict[str, Any], lower: Sequence[float], upper: Sequence[float], *,
                   ref: Sequence[float]) -> MultiObjectiveBO:
        opt = cls(lower, upper, ref=ref, config=MOBOConfig(**state["config"]), seed=int(state["seed"]))
        opt.X = np.asarray(state["X"], dtype=float).reshape(-1, opt.bounds.shape[1])
        opt.F = np.asarray(state["F"], dtype=float).reshape(len(opt.X), len(opt.ref))
        return opt

    def pareto_front(self) -> tuple[np.ndarray, np.ndarray]:
        keep = non_dominated(self.F) if len(self.F) else np.zeros(0, bool)
        return self.X[keep], self.F[keep]

    def report(self) -> dict[str, Any]:
        return {"optimizer": self.name, "evaluations": len(self.F), "warnings": len(self.warnings)}

    def _suggest(self, q: int) -> np.ndarray:
        c = self.config
        train_X = torch.as_tensor(self.X, **self._tkw)
        train_Y = torch.as_tensor(-self.F, **self._tkw)  # botorch maximises
        model = SingleTaskGP(train_X, train_Y, input_transform=Normalize(d=train_X.shape[-1], bounds=self.bounds),
                             outcome_transform=Standardize(m=train_Y.shape[-1]))
        seed = self.seed * 100_003 + len(self.X)
        with _recorded(self.warnings, "MOBO fit", c.torch_threads), manual_seed(seed):
            fit_gpytorch_mll(ExactMarginalLogLikelihood(model.likelihood, model))
        sampler = SobolQMCNormalSampler(sample_shape=torch.Size([c.mc_samples]), seed=seed)
        with _recorded(self.warnings, "MOBO acquisition", c.torch_threads), manual_seed(seed):
            acq = qLogNoisyExpectedHypervolumeImprovement(
                model=model, ref_point=(-torch.as_tensor(self.ref, **self._tkw)).tolist(), X_baseline=train_X,
                sampler=sampler, prune_baseline=True, cache_root=False,
            )
            candidates, _ = optimize_acqf(acq, bounds=self.bounds, q=q, num_restarts=c.num_restarts,
                                          raw_samples=c.raw_samples, sequential=True,
                                          options={"maxiter": c.maxiter, "seed": seed})
        lo, hi = self.bounds.numpy()
        return np.minimum(np.maximum(candidates.detach().numpy().reshape(q, -1), lo), hi)

"""A Gaussian-process surrogate of a counted 1D pattern, such as I(Q), in log-log space.

The GP models ``y = ln(rate)`` against ``x = log10(Q)``: scattering curves span many decades in
both, and are smooth there. Counting noise is known, not inferred: for ``c`` counts in ``t``
seconds, ``y = ln((c + 1/2) / t)`` with variance ``1 / (c + 1/2)`` (delta method on Poisson).
Observations at equal Q are merged first (:func:`models.sasfit.merge_observations`: summed counts
and exposure, the sufficient statistic of a Poisson rate), so the GP's size is the number of distinct Q, not of measurements.

Hyper-parameters come from the marginal likelihood (botorch's ``fit_gpytorch_mll``), refitted on a
schedule (when the data have grown by a factor since the last fit) and kept in between, so a
decision never waits on a full refit.
"""

from __future__ import annotations

import logging
import math
import warnings
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from botorch.exceptions.warnings import InputDataWarning
from botorch.fit import fit_gpytorch_mll
from botorch.models import SingleTaskGP
from botorch.models.transforms import Normalize, Standardize
from botorch.posteriors import GPyTorchPosterior
from gpytorch.mlls import ExactMarginalLogLikelihood

from models.device import default_device, default_dtype
from models.errors import ModelError
from models.sasfit import merge_observations

__all__ = ["GPConfig", "LogLogGP", "counts_to_log_rate"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class GPConfig:
    """Settings of :class:`LogLogGP`.

    Parameters
    ----------
    refit_growth
        Refit hyper-parameters when the number of distinct points has grown by this factor since
        the last fit (amortises the O(n^3 * iterations) fit over many decisions).
    min_points
        Fewer distinct points than this and the GP refuses to build.
    max_joint
        Largest set of points whose joint posterior is formed at once (memory guard).
    min_log_variance
        Floor of the noise variance of ``ln(rate)``: a systematic error of ~0.3% that no
        counting beats (detector calibration), which also keeps the GP well conditioned
        when a point has millions of counts.
    """

    refit_growth: float = 1.3
    min_points: int = 3
    max_joint: int = 2048
    min_log_variance: float = 1e-5

    def __post_init__(self) -> None:
        if not self.refit_growth > 1.0:
            raise ValueError(f"GPConfig.refit_growth must be > 1, got {self.refit_growth=}")
        if self.min_points < 2:
            raise ValueError(f"GPConfig.min_points must be >= 2, got {self.min_points=}")


def counts_to_log_rate(counts: np.ndarray, exposure: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(ln((c + 1/2) / t), 1 / (c + 1/2))``: log rate and its variance from counts."""
    c = np.asarray(counts, dtype=float) + 0.5
    return np.log(c / np.asarray(exposure, dtype=float)), 1.0 / c


class LogLogGP:
    """GP of ``ln(rate)`` versus ``log10(Q)`` with known Poisson noise.

    Parameters
    ----------
    q_range
        ``(q_min, q_max)`` of the instrument: the GP's input is normalised to it.
    config
        A :class:`GPConfig`.

    Examples
    --------
    >>> gp = LogLogGP((1e-3, 0.5))
    >>> q = np.geomspace(1e-3, 0.5, 10)
    >>> gp.update(q, counts=1e4 * q**-1, exposure=np.ones(10))
    >>> mean, var = gp.predict(np.array([0.01]))
    """

    def __init__(self, q_range: tuple[float, float], config: GPConfig | None = None) -> None:
        q_min, q_max = (float(v) for v in q_range)
        if not (0 < q_min < q_max and math.isfinite(q_max)):
            raise ValueError(f"q_range must satisfy 0 < q_min < q_max, got {q_range=}")
        self.q_range = (q_min, q_max)
        self.config = config or GPConfig()
        self._tkw: dict[str, Any] = {"device": default_device(), "dtype": default_dtype()}
        self._model: SingleTaskGP | None = None
        self._hyper: dict[str, torch.Tensor] | None = None
        self._n_at_fit = 0
        self.n_fits = 0

    # -- data ---------------------------------------------------------------------------------
    def _x(self, q: np.ndarray) -> torch.Tensor:
        return torch.as_tensor(np.log10(np.asarray(q, dtype=float)), **self._tkw).reshape(-1, 1)

    @property
    def model(self) -> SingleTaskGP:
        if self._model is None:
            raise ModelError("the GP has no data yet: call update() with at least min_points points")
        return self._model

    @property
    def n_points(self) -> int:
        return 0 if self._model is None else int(self._model.train_inputs[0].shape[-2])

    def update(self, q: np.ndarray, counts: np.ndarray, exposure: np.ndarray) -> None:
        """Rebuild the GP on all observations; refit hyper-parameters when the schedule says so.

        ``q``, ``counts`` and ``exposure`` are of shape `n` (merged internally).
        """
        q_u, c_u, t_u = merge_observations(q, counts, exposure)
        if q_u.size < self.config.min_points:
            raise ModelError(
                f"{q_u.size} distinct Q values; the GP needs at least {self.config.min_points}"
            )
        y, yvar = counts_to_log_rate(c_u, t_u)
        # gpytorch rounds a standardised noise below 1e-6 up (with a warning): stay above it
        yvar = np.maximum(yvar, max(self.config.min_log_variance, 2e-6 * np.var(y)))
        train_X = self._x(q_u)
        train_Y = torch.as_tensor(y, **self._tkw).reshape(-1, 1)
        train_Yvar = torch.as_tensor(yvar, **self._tkw).reshape(-1, 1)
        bounds = self._x(np.array(self.q_range)).reshape(2, 1)
        with warnings.catch_warnings():
            # Standardize is applied; botorch still warns when every y is equal (e.g. all-zero
            # counts at equal exposure), a case Standardize handles by keeping unit scale.
            warnings.simplefilter("ignore", InputDataWarning)
            model = SingleTaskGP(
                train_X,
                train_Y,
                train_Yvar,
                input_transform=Normalize(d=1, bounds=bounds),
                outcome_transform=Standardize(m=1),
            )
        if self._hyper is None or q_u.size >= self.config.refit_growth * self._n_at_fit:
            self._fit(model)
            self._n_at_fit = q_u.size
        else:
            model.load_state_dict(self._hyper, strict=False)
        model.eval()
        self._model = model

    def _fit(self, model: SingleTaskGP) -> None:
        if self._hyper is not None:
            model.load_state_dict(self._hyper, strict=False)  # warm start
        mll = ExactMarginalLogLikelihood(model.likelihood, model)
        try:
            fit_gpytorch_mll(mll)
        except Exception as err:  # botorch raises several kinds; keep the last good ones
            logger.warning("GP hyper-parameter fit failed (%s); keeping previous values", err)
        self._hyper = self.hyperparameters(model)
        self.n_fits += 1

    @staticmethod
    def hyperparameters(model: SingleTaskGP) -> dict[str, torch.Tensor]:
        """The learned kernel and mean parameters (no training data, priors or transforms)."""
        return {
            k: v.detach().clone()
            for k, v in model.named_parameters()
            if k.startswith(("covar_module.", "mean_module."))
        }

    def state(self) -> dict[str, Any]:
        """JSON-able model state: hyper-parameters and the refit schedule's position."""
        hyper = {k: v.cpu().tolist() for k, v in (self._hyper or {}).items()}
        return {"hyperparameters": hyper, "n_at_fit": self._n_at_fit, "n_fits": self.n_fits}

    def load_state(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`state` returned; the next :meth:`update` reuses it without a refit."""
        hyper = state.get("hyperparameters") or {}
        self._hyper = {k: torch.as_tensor(v, **self._tkw) for k, v in hyper.items()} or None
        self._n_at_fit = int(state.get("n_at_fit", 0))
        self.n_fits = int(state.get("n_fits", 0))

    # -- predictions --------------------------------------------------------------------------
    def predict(self, q: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Posterior mean and variance of ``ln(rate)`` at ``q`` (shape `c`), marginal, chunked."""
        X = self._x(q)
        means, variances = [], []
        with torch.no_grad():
            for chunk in torch.split(X, self.config.max_joint):
                # `b x 1 x 1` t-batches: marginals only, never the joint c x c covariance.
                post = self.model.posterior(chunk.unsqueeze(-2))
                means.append(post.mean.reshape(-1))
                variances.append(post.variance.reshape(-1))
        return torch.cat(means).cpu().numpy(), torch.cat(variances).cpu().numpy()

    def joint(self, q: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Posterior mean (shape `c`) and joint covariance (`c x c`) of ``ln(rate)`` at ``q``."""
        if len(q) > self.config.max_joint:
            raise ModelError(
                f"joint posterior over {len(q)} points exceeds max_joint={self.config.max_joint}; "
                "use a coarser candidate grid or raise GPConfig.max_joint"
            )
        with torch.no_grad():
            post = self.model.posterior(self._x(q))
            # Standardize untransforms a GPyTorchPosterior into one; only that has a distribution.
            if not isinstance(post, GPyTorchPosterior):
                raise ModelError(
                    f"joint posterior needs a GPyTorchPosterior, got {type(post).__name__}"
                )
            mean = post.mean.reshape(-1)
            cov = post.distribution.covariance_matrix
        return mean.cpu().numpy(), cov.cpu().numpy()

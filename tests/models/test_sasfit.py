"""Tests of models.sasfit: Poisson fits recover the truth with honest uncertainties."""

from __future__ import annotations

import numpy as np
import pytest

from models.errors import FitError
from models.sas import SAMPLE_KINDS, SASModel
from models.sasfit import (
    FitResult,
    covariance_from_fisher,
    fisher_information,
    fit_poisson,
    merge_observations,
)

FLUX, DARK = 100.0, 0.1
KIND = SAMPLE_KINDS["polydisperse_sphere"]
TRUTH = {"radius": 70.0, "radius_pd": 0.08, "scale": 0.01, "background": 0.02}
Q = np.geomspace(0.005, 0.35, 100)


@pytest.fixture(scope="module")
def model() -> SASModel:
    return KIND.model(dq_over_q=0.05)


def simulate(model: SASModel, exposure: float, seed: int, q: np.ndarray = Q) -> np.ndarray:
    mu = exposure * (FLUX * model.intensity(q, TRUTH) + DARK)
    return np.random.default_rng(seed).poisson(mu).astype(float)


def fit(model: SASModel, counts: np.ndarray, exposure: float, q: np.ndarray = Q,
        **kwargs: object) -> FitResult:
    kwargs = {"names": KIND.fit_params, "initial": KIND.initial(), "bounds": KIND.bounds,
              **kwargs}
    return fit_poisson(model, q, counts, exposure, flux=FLUX, dark_rate=DARK, **kwargs)


def test_merge_observations_sums_counts_and_exposure_exactly() -> None:
    q, c, t = merge_observations(
        [0.2, 0.1, 0.2, 0.3, 0.1], [1, 2, 3, 4, 5], [1.0, 2.0, 3.0, 4.0, 5.0]
    )
    np.testing.assert_array_equal(q, [0.1, 0.2, 0.3])
    np.testing.assert_array_equal(c, [7, 4, 4])
    np.testing.assert_array_equal(t, [7.0, 4.0, 4.0])
    q, c, t = merge_observations([0.1, 0.1], [3, 0], 2.5)
    assert (q.tolist(), c.tolist(), t.tolist()) == ([0.1], [3.0], [5.0])


@pytest.mark.parametrize(
    ("q", "counts", "exposure", "match"),
    [
        ([0.1, 0.2], [1], [1.0, 1.0], "one length"),
        ([0.1, 0.2], [1, -1], [1.0, 1.0], r"counts must be finite and >= 0.*\[-1.0\]"),
        ([0.1, 0.2], [1, np.nan], [1.0, 1.0], "counts must be finite"),
        ([0.1, 0.2], [1, 2], [1.0, 0.0], r"exposure must be finite and > 0.*\[0.0\]"),
        ([0.0, 0.2], [1, 2], [1.0, 1.0], r"q must be finite and > 0.*\[0.0\]"),
    ],
)
def test_bad_observations_raise(q: list, counts: list, exposure: list, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        merge_observations(q, counts, exposure)


def test_fit_recovers_truth_within_three_sigma(model: SASModel) -> None:
    result = fit(model, simulate(model, 10.0, seed=1), 10.0)
    assert result.success
    assert result.names == KIND.fit_params and result.dof == Q.size - 4
    for name in result.names:
        assert abs(result.values[name] - TRUTH[name]) < 3 * result.sigmas[name], name
    assert 0.7 < result.reduced_deviance < 1.4
    assert result.relative_sigma("radius") < 0.02


def test_deviance_is_the_poisson_deviance_at_the_optimum(model: SASModel) -> None:
    counts = simulate(model, 0.5, seed=2)  # low counts: many zeros at high q
    assert np.sum(counts == 0) > 5
    result = fit(model, counts, 0.5)
    mu = 0.5 * (FLUX * model.intensity(Q, result.values) + DARK)
    safe = np.where(counts > 0, counts, 1.0)
    deviance = 2 * np.sum(mu - counts + np.where(counts > 0, counts * np.log(safe / mu), 0.0))
    assert result.deviance == pytest.approx(deviance, rel=1e-6)
    truth_mu = 0.5 * (FLUX * model.intensity(Q, TRUTH) + DARK)
    log_ratio = np.where(counts > 0, counts * np.log(safe / truth_mu), 0.0)
    truth_dev = 2 * np.sum(truth_mu - counts + log_ratio)
    assert result.deviance <= truth_dev


def test_sigmas_shrink_as_one_over_root_exposure(model: SASModel) -> None:
    short = fit(model, simulate(model, 5.0, seed=3), 5.0)
    long = fit(model, simulate(model, 20.0, seed=4), 20.0)
    for name in KIND.fit_params:
        assert long.sigmas[name] / short.sigmas[name] == pytest.approx(0.5, rel=0.15), name


def test_fisher_sigmas_match_the_scatter_of_repeated_fits(model: SASModel) -> None:
    q = Q[::3]
    info = fisher_information(model, q, 10.0, TRUTH, KIND.fit_params, flux=FLUX, dark_rate=DARK)
    predicted = np.sqrt(np.diag(np.linalg.inv(info)))
    fits = [fit(model, simulate(model, 10.0, seed=s, q=q), 10.0, q=q) for s in range(30)]
    estimates = np.array([[f.values[n] for n in KIND.fit_params] for f in fits])
    np.testing.assert_allclose(estimates.std(axis=0, ddof=1), predicted, rtol=0.4)
    fitted = np.array([[f.sigmas[n] for n in KIND.fit_params] for f in fits])
    np.testing.assert_allclose(np.median(fitted, axis=0), predicted, rtol=0.1)
    np.testing.assert_allclose(fits[0].cov, np.linalg.inv(info), rtol=0.3,
                               atol=1e-3 * np.abs(np.linalg.inv(info)).max())


def test_fisher_information_is_the_sum_over_points(model: SASModel) -> None:
    q = np.array([0.01, 0.03, 0.1])
    t = np.array([1.0, 2.0, 4.0])
    names = ["radius", "scale"]
    total = fisher_information(model, q, t, TRUTH, names, flux=FLUX, dark_rate=DARK)
    parts = [fisher_information(model, q[i : i + 1], t[i], TRUTH, names, flux=FLUX,
                                dark_rate=DARK) for i in range(3)]
    np.testing.assert_allclose(total, sum(parts), rtol=1e-10)
    g = FLUX * model.jacobian(q[:1], TRUTH, names)[0]
    rate = FLUX * model.intensity(q[:1], TRUTH)[0] + DARK
    np.testing.assert_allclose(parts[0], np.outer(g, g) / rate, rtol=1e-12)
    doubled = fisher_information(model, q, 2 * t, TRUTH, names, flux=FLUX, dark_rate=DARK)
    np.testing.assert_allclose(doubled, 2 * total, rtol=1e-12)


def test_multistart_escapes_a_fringe_local_minimum(model: SASModel) -> None:
    # Without Guinier-region data the likelihood has one minimum per fringe in radius.
    q = np.geomspace(0.05, 0.3, 60)
    truth = {"radius": 100.0, "radius_pd": 0.05, "scale": 0.01, "background": 0.02}
    counts = np.random.default_rng(5).poisson(20 * (FLUX * model.intensity(q, truth) + DARK))
    initial = {"radius": 30.0, "radius_pd": 0.1, "scale": 0.005, "background": 0.01}
    single = fit(model, counts, 20.0, q=q, initial=initial)
    multi = fit(model, counts, 20.0, q=q, initial=initial, starts=6)
    assert single.reduced_deviance > 3
    assert multi.reduced_deviance < 1.5
    assert abs(multi.values["radius"] - 100.0) < 3 * multi.sigmas["radius"]
    assert multi.nfev > single.nfev


def test_fitted_values_are_inside_bounds_and_restartable(model: SASModel) -> None:
    bounds = {**KIND.bounds, "radius_pd": (0.1, 0.3)}  # truth 0.08 lies below: ends on the bound
    initial = {**KIND.initial(), "radius_pd": 0.2}
    result = fit(model, simulate(model, 10.0, seed=6), 10.0, bounds=bounds, initial=initial)
    for name, (lo, hi) in bounds.items():
        assert lo <= result.values[name] <= hi
    fit(model, simulate(model, 10.0, seed=6), 10.0, bounds=bounds, initial=dict(result.values))


def test_unidentified_parameters_get_infinite_sigma() -> None:
    # I ∝ scale * (sld - sld_solvent)^2: scale and sld cannot both be fitted.
    model = SASModel("sphere", fixed={"sld_solvent": 6.36, "radius": 50.0})
    q = np.geomspace(0.01, 0.2, 20)
    truth = {"sld": 3.47, "scale": 0.01, "background": 0.02}
    counts = np.random.default_rng(0).poisson(10 * (FLUX * model.intensity(q, truth) + DARK))
    result = fit_poisson(
        model, q, counts, 10.0, flux=FLUX, dark_rate=DARK, names=["scale", "sld", "background"],
        initial=truth, bounds={"scale": (1e-4, 1.0), "sld": (-1.0, 6.0), "background": (1e-4, 1.0)},
    )
    assert np.isinf(result.sigmas["scale"]) and np.isinf(result.sigmas["sld"])
    assert np.isfinite(result.sigmas["background"])


def test_covariance_from_fisher_inverts_and_flags_null_directions() -> None:
    info = np.array([[4.0, 1.0], [1.0, 3.0]])
    np.testing.assert_allclose(covariance_from_fisher(info), np.linalg.inv(info))
    singular = np.array([[1.0, 2.0, 0.0], [2.0, 4.0, 0.0], [0.0, 0.0, 2.0]])
    cov = covariance_from_fisher(singular)
    assert np.isinf(cov[0, 0]) and np.isinf(cov[1, 1]) and cov[2, 2] == pytest.approx(0.5)


def test_fit_argument_errors(model: SASModel) -> None:
    counts = simulate(model, 1.0, seed=0)
    with pytest.raises(ValueError, match=r"initial\['radius'\] = 500.0 is outside bounds"):
        fit(model, counts, 1.0, initial={**KIND.initial(), "radius": 500.0})
    with pytest.raises(ValueError, match="need an initial value and bounds"):
        fit(model, counts, 1.0, names=["radius", "length"])
    with pytest.raises(ValueError, match="starts"):
        fit(model, counts, 1.0, starts=0)
    with pytest.raises(ValueError, match="flux"):
        fit_poisson(model, Q, counts, 1.0, flux=0.0, dark_rate=DARK, names=["radius"],
                    initial=TRUTH, bounds=KIND.bounds)
    with pytest.raises(FitError, match="3 distinct q values cannot fix 4"):
        fit(model, [5, 6, 7, 8], 1.0, q=[0.01, 0.02, 0.02, 0.03])


def test_fit_result_helpers() -> None:
    result = FitResult(names=("a",), values={"a": -2.0}, sigmas={"a": 0.5}, cov=np.eye(1) * 0.25,
                       deviance=3.0, dof=0, nfev=1, success=True)
    assert result.relative_sigma("a") == 0.25
    assert np.isnan(result.reduced_deviance)
    with pytest.raises(KeyError, match="'b' was not fitted"):
        result.relative_sigma("b")


def test_sigmas_widen_when_the_data_scatter_more_than_counting_noise() -> None:
    def result(deviance: float) -> FitResult:
        return FitResult(names=("a",), values={"a": 10.0}, sigmas={"a": 0.1}, cov=np.eye(1) * 0.01,
                         deviance=deviance, dof=10, nfev=1, success=True)

    assert result(5.0).sigma_scale == 1.0  # better than Poisson: never narrowed
    assert result(40.0).sigma_scale == pytest.approx(2.0)
    assert result(40.0).relative_sigma("a") == pytest.approx(0.02)
    assert result(40.0).relative_sigma("a", scaled=False) == pytest.approx(0.01)


def test_extra_starts_spread_every_size_parameter_in_a_latin_hypercube() -> None:
    from models.sasfit import _make_space, _start_points

    space = _make_space(["radius", "length", "scale"], {"radius": (10, 100), "length": (100, 5000), "scale": (1e-3, 1)})
    x0 = space.to_x(np.array([30.0, 300.0, 0.01]))
    points = np.array(_start_points(space, x0, 9, np.random.default_rng(1), vary=2))
    assert points.shape == (9, 3) and np.array_equal(points[0], x0)
    for j in (0, 1):  # each of the 8 strata of each varied parameter is visited exactly once
        u = (points[1:, j] - space.lower[j]) / (space.upper[j] - space.lower[j])
        assert sorted(np.floor(u * 8).astype(int)) == list(range(8))
    assert np.all(points[1:, 2] == x0[2])  # the rest stay at the initial values

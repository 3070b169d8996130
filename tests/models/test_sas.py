"""Tests of models.sas: intensities against closed forms, smearing, Jacobian, sample kinds."""

from __future__ import annotations

import numpy as np
import pytest

from models.errors import ModelError
from models.sas import SAMPLE_KINDS, SampleKind, SASModel

SLD, SLD_SOLVENT = 3.47, 6.36


def sphere_formula(q: np.ndarray, radius: float, scale: float, background: float) -> np.ndarray:
    """Monodisperse sphere, absolute units: 1e-4 turns (1e-6/Å²)²·Å³ into 1/cm."""
    x = q * radius
    volume = 4.0 / 3.0 * np.pi * radius**3
    amplitude = 3.0 * (np.sin(x) - x * np.cos(x)) / x**3
    return scale * volume * (SLD - SLD_SOLVENT) ** 2 * 1e-4 * amplitude**2 + background


def sphere_formula_d_radius(q: np.ndarray, radius: float, scale: float) -> np.ndarray:
    x = q * radius
    g = np.sin(x) - x * np.cos(x)
    f = 3.0 * g / x**3
    df_dx = 3.0 * np.sin(x) / x**2 - 9.0 * g / x**4
    pref = scale * 4.0 / 3.0 * np.pi * (SLD - SLD_SOLVENT) ** 2 * 1e-4
    return pref * (3.0 * radius**2 * f**2 + radius**3 * 2.0 * f * df_dx * q)


@pytest.fixture(scope="module")
def sphere() -> SASModel:
    return SASModel("sphere", fixed={"sld": SLD, "sld_solvent": SLD_SOLVENT})


def test_monodisperse_sphere_matches_form_factor(sphere: SASModel) -> None:
    q = np.geomspace(0.002, 0.5, 200)
    got = sphere.intensity(q, {"radius": 50.0, "scale": 0.01, "background": 0.02})
    np.testing.assert_allclose(got, sphere_formula(q, 50.0, 0.01, 0.02), rtol=1e-10)
    # Forward scattering is scale * V * Δρ² (Guinier-reduced by (qR)²/5 at q R = 0.1): 4.4/cm
    # for 1% by volume of 50 Å silica spheres in D2O.
    i0 = 0.01 * 4 / 3 * np.pi * 50.0**3 * 2.89**2 * 1e-4
    assert got[0] == pytest.approx(i0 * (1 - 0.1**2 / 5) + 0.02, rel=1e-4)


def test_smearing_fills_the_first_minimum(sphere: SASModel) -> None:
    params = {"radius": 50.0, "scale": 0.01, "background": 1e-4}
    q_min = 4.4934 / 50.0  # first zero of the sphere amplitude
    q = np.array([0.01, q_min])
    sharp = sphere.intensity(q, params)
    smeared = SASModel("sphere", dq_over_q=0.05, fixed=sphere.fixed).intensity(q, params)
    assert smeared[1] > 10 * sharp[1]
    # Where I(q) is nearly flat (Guinier region) smearing changes little.
    assert smeared[0] == pytest.approx(sharp[0], rel=2e-3)


def test_smearing_matches_direct_gaussian_average(sphere: SASModel) -> None:
    params = {"radius": 60.0, "scale": 0.01, "background": 0.01}
    dq = 0.08
    q = np.array([0.02, 0.06, 0.11, 0.2])
    smeared = SASModel("sphere", dq_over_q=dq, fixed=sphere.fixed).intensity(q, params)
    for qi, got in zip(q, smeared, strict=True):
        sigma = dq * qi
        grid = np.linspace(qi - 2.5 * sigma, qi + 3.0 * sigma, 4001)
        weights = np.exp(-0.5 * ((grid - qi) / sigma) ** 2)
        expected = np.sum(weights * sphere_formula(grid, 60.0, 0.01, 0.01)) / np.sum(weights)
        assert got == pytest.approx(expected, rel=5e-3)


def test_sparse_q_is_smeared_like_dense_q(sphere: SASModel) -> None:
    model = SASModel("sphere", dq_over_q=0.05, fixed=sphere.fixed)
    params = {"radius": 80.0, "scale": 0.01, "background": 0.01}
    dense = np.geomspace(0.005, 0.3, 150)
    single = model.intensity(dense[[97]], params)
    assert single[0] == pytest.approx(model.intensity(dense, params)[97], rel=2e-3)


def test_unsorted_and_repeated_q_keep_their_order(sphere: SASModel) -> None:
    model = SASModel("sphere", dq_over_q=0.03, fixed=sphere.fixed)
    params = {"radius": 40.0}
    q = np.array([0.1, 0.01, 0.05, 0.01])
    got = model.intensity(q, params)
    np.testing.assert_allclose(got[[1, 3]], got[1])
    np.testing.assert_allclose(got[[0, 2]], model.intensity(np.array([0.05, 0.1]), params)[::-1],
                               rtol=2e-3)


def test_unknown_parameter_names_raise_listing_valid_ones(sphere: SASModel) -> None:
    with pytest.raises(ValueError, match=r"unknown parameter\(s\) \['radios'\].*'radius'"):
        sphere.intensity(np.array([0.1]), {"radios": 10.0})
    with pytest.raises(ValueError, match="sld_core"):
        SASModel("sphere", fixed={"sld_core": 1.0})
    assert {"radius", "radius_pd", "radius_pd_n", "scale"} <= set(sphere.parameter_names)


@pytest.mark.parametrize("q", [[0.1, -0.1], [0.1, np.nan], [[0.1]], []])
def test_bad_q_raises(sphere: SASModel, q: list) -> None:
    with pytest.raises(ValueError, match="q must"):
        sphere.intensity(np.array(q), {})


@pytest.mark.parametrize("dq", [-0.1, 1e-5, 0.5, np.nan])
def test_bad_resolution_raises(dq: float) -> None:
    with pytest.raises(ValueError, match="dq_over_q"):
        SASModel("sphere", dq_over_q=dq)


def test_unknown_model_raises() -> None:
    with pytest.raises(ValueError, match="unknown sasmodels model 'spehre'"):
        SASModel("spehre")


def test_non_finite_intensity_raises_model_error(sphere: SASModel) -> None:
    with pytest.raises(ModelError, match="non-finite"):
        sphere.intensity(np.array([0.1]), {"scale": np.inf})


def test_jacobian_matches_analytic_derivatives(sphere: SASModel) -> None:
    q = np.geomspace(0.005, 0.3, 40)
    params = {"radius": 45.0, "scale": 0.02, "background": 0.03}
    jac = sphere.jacobian(q, params, ["radius", "scale", "background"])
    assert jac.shape == (40, 3)
    np.testing.assert_allclose(jac[:, 0], sphere_formula_d_radius(q, 45.0, 0.02),
                               rtol=1e-5, atol=1e-9 * np.abs(jac[:, 0]).max())
    np.testing.assert_allclose(jac[:, 1], (sphere.intensity(q, params) - 0.03) / 0.02, rtol=1e-7)
    np.testing.assert_allclose(jac[:, 2], 1.0, rtol=1e-7)


def test_jacobian_of_polydispersity_matches_wide_difference() -> None:
    model = SAMPLE_KINDS["polydisperse_sphere"].model(dq_over_q=0.05)
    q = np.geomspace(0.01, 0.2, 25)
    params = {"radius": 60.0, "radius_pd": 0.1, "scale": 0.01, "background": 0.01}
    jac = model.jacobian(q, params, ["radius_pd"])[:, 0]
    h = 1e-3
    wide = (model.intensity(q, {**params, "radius_pd": 0.1 + h})
            - model.intensity(q, {**params, "radius_pd": 0.1 - h})) / (2 * h)
    np.testing.assert_allclose(jac, wide, rtol=1e-3, atol=1e-6 * np.abs(wide).max())


def test_jacobian_rejects_discrete_parameters(sphere: SASModel) -> None:
    with pytest.raises(ValueError, match="discrete"):
        sphere.jacobian(np.array([0.1]), {"radius_pd_n": 10}, ["radius_pd_n"])


def test_kernel_cache_is_bounded_and_consistent(sphere: SASModel) -> None:
    model = SASModel("sphere", dq_over_q=0.05, fixed=sphere.fixed)
    first = model.intensity(np.array([0.02, 0.05]), {"radius": 30.0})
    for k in range(12):
        model.intensity(np.array([0.01 + 0.001 * k]), {"radius": 30.0})
    assert len(model._cache) <= 8
    np.testing.assert_array_equal(model.intensity(np.array([0.02, 0.05]), {"radius": 30.0}), first)


def test_sample_kinds_registry() -> None:
    assert set(SAMPLE_KINDS) == {
        "polydisperse_sphere", "core_shell_sphere", "cylinder", "sphere_hardsphere"
    }
    assert SAMPLE_KINDS["polydisperse_sphere"].fit_params[:2] == ("radius", "radius_pd")
    assert "volfraction" in SAMPLE_KINDS["sphere_hardsphere"].fit_params
    assert SAMPLE_KINDS["cylinder"].size_params == ("radius", "length")
    assert SAMPLE_KINDS["core_shell_sphere"].size_params == ("radius", "thickness")


@pytest.mark.parametrize("name", sorted(SAMPLE_KINDS))
def test_sample_kind_truths_are_valid_and_background_dominates_at_high_q(name: str) -> None:
    kind = SAMPLE_KINDS[name]
    model = kind.model(dq_over_q=0.05)
    rng = np.random.default_rng(3)
    excess = []
    for _ in range(12):
        truth = kind.draw_truth(rng)
        assert set(truth) == set(kind.fit_params) and {"scale", "background"} <= set(truth)
        for param, value in truth.items():
            lo, hi = kind.truth_ranges[param]
            assert lo <= value <= hi
        low, high = model.intensity(np.array([0.005, 0.3]), truth)
        assert 0.3 < low < 1e3  # 1/cm: a measurable absolute intensity
        excess.append((high - truth["background"]) / truth["background"])
    assert np.median(excess) < 1.0


def test_draw_truth_is_reproducible() -> None:
    kind = SAMPLE_KINDS["cylinder"]
    assert kind.draw_truth(np.random.default_rng(7)) == kind.draw_truth(np.random.default_rng(7))


def test_hard_sphere_effective_radius_follows_radius() -> None:
    kind = SAMPLE_KINDS["sphere_hardsphere"]
    q = np.geomspace(0.005, 0.1, 30)
    params = {"radius": 70.0, "volfraction": 0.25, "scale": 1.0, "background": 0.01}
    tied = kind.model().intensity(q, params)
    explicit = kind.model().intensity(
        q, {**params, "radius_effective_mode": 0, "radius_effective": 70.0}
    )
    other = kind.model().intensity(
        q, {**params, "radius_effective_mode": 0, "radius_effective": 100.0}
    )
    np.testing.assert_allclose(tied, explicit, rtol=1e-3)
    assert np.max(np.abs(other / tied - 1)) > 0.1
    # S(q -> 0) of hard spheres at phi = 0.25 is (1 - phi)^4 / (1 + 2 phi)^2 = 0.141.
    no_s = SASModel("sphere", fixed={"sld": 3.47, "sld_solvent": 6.36, "radius_pd": 0.05,
                                     "radius_pd_n": 21})
    ratio = tied[0] / no_s.intensity(q[:1], {"radius": 70.0, "scale": 0.25, "background": 0.01})[0]
    assert ratio == pytest.approx(0.75**4 / 1.5**2, rel=0.05)


def test_sample_kind_rejects_truth_outside_bounds() -> None:
    with pytest.raises(ValueError, match="radius"):
        SampleKind(
            model_name="sphere", fixed={}, size_params=("radius",), fit_params=("radius",),
            bounds={"radius": (10.0, 100.0)}, truth_ranges={"radius": (5.0, 50.0)},
        )

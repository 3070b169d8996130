"""Tests of the classical baselines (models/classical.py) and the metrics (models/metrics.py)."""

from __future__ import annotations

import sys

import numpy as np
import pytest
from scipy import ndimage
from scipy.special import erf
from scipy.stats import poisson

from models.classical import (
    anscombe,
    anscombe_bm3d,
    anscombe_gaussian,
    bicubic_upsample,
    ellipsoid_integrate,
    generalized_anscombe,
    integrate_in_mask,
    inverse_anscombe_algebraic,
    inverse_anscombe_closed_form,
    inverse_anscombe_exact,
    neighbour_noise_rms,
    rebin,
    sphere_integrate,
    split_peaks,
    sure_gaussian_sigma,
    threshold_components,
)
from models.metrics import dice, iou, psnr, r_factor, ssim

LAMBDAS = np.geomspace(0.1, 100.0, 13)


def _expected_anscombe(lam: float) -> float:
    """E[A(x)] for x ~ Poisson(lam), by summing the pmf."""
    k = np.arange(int(lam + 20 * np.sqrt(lam) + 60))
    return float((2.0 * np.sqrt(k + 0.375) * poisson.pmf(k, lam)).sum())


def gaussian_peak(shape, centre, sigma, intensity):
    """Expected counts of an axis-aligned Gaussian peak, integrated over each pixel."""
    out = np.ones(shape)
    for axis, (n, c, s) in enumerate(zip(shape, centre, sigma)):
        edges = (np.arange(n + 1) - 0.5 - c) / (np.sqrt(2.0) * s)
        frac = 0.5 * np.diff(erf(edges))
        out = out * frac.reshape([-1 if a == axis else 1 for a in range(len(shape))])
    return intensity * out


# 2D: two anisotropic peaks on a flat background; 3D: one peak elongated along the first axis
PEAKS_2D = {"shape": (64, 64), "background": 5.0,
            "peaks": [((20.3, 20.7), (2.0, 1.5), 5000.0), ((44.1, 40.2), (1.5, 2.5), 3000.0)]}
PEAKS_3D = {"shape": (32, 32, 32), "background": 0.5,
            "peaks": [((15.6, 16.2, 15.1), (2.5, 1.5, 1.5), 4000.0)]}


def scene(spec):
    truth = np.full(spec["shape"], spec["background"])
    for centre, sigma, intensity in spec["peaks"]:
        truth = truth + gaussian_peak(spec["shape"], centre, sigma, intensity)
    centres = np.array([p[0] for p in spec["peaks"]])
    intensities = np.array([p[2] for p in spec["peaks"]])
    return truth, centres, intensities


def smooth_blobs(n=64):
    """A smooth frame with structure: a sloping background and three round blobs, mean 1."""
    yy, xx = np.mgrid[:n, :n] / n
    img = 0.3 + 0.2 * xx
    for a, b in [(0.3, 0.3), (0.7, 0.4), (0.5, 0.75)]:
        img = img + 3.0 * np.exp(-((xx - a) ** 2 + (yy - b) ** 2) / (2 * 0.04**2))
    return img / img.mean()


# ------------------------------------------------------------------------------------------
# Anscombe transform


def test_anscombe_values():
    np.testing.assert_allclose(anscombe([0.0, 1.0, 10.0]), 2 * np.sqrt(np.array([0, 1, 10]) + 0.375))
    np.testing.assert_allclose(inverse_anscombe_algebraic(anscombe([0.0, 3.0, 50.0])), [0, 3, 50],
                               atol=1e-12)


@pytest.mark.parametrize("bad, match", [([1.0, -1.0], "negative"), ([np.nan], "non-finite"),
                                        (["a"], "numeric")])
def test_anscombe_rejects_bad_counts(bad, match):
    with pytest.raises(ValueError, match=match):
        anscombe(np.array(bad))


@pytest.mark.parametrize("lam", LAMBDAS)
def test_exact_unbiased_inverse_recovers_lambda(lam):
    e = _expected_anscombe(lam)
    assert abs(float(inverse_anscombe_exact(e)) / lam - 1) < 1e-4
    # the closed form approximates it to a fraction of a percent
    assert abs(float(inverse_anscombe_closed_form(e)) / lam - 1) < 5e-3


def test_algebraic_inverse_is_biased_at_low_counts():
    errors = [abs(float(inverse_anscombe_algebraic(_expected_anscombe(lam))) / lam - 1)
              for lam in LAMBDAS]
    assert min(errors[:5]) > 0.1  # lam <= ~1: more than 10 % low
    assert errors[-1] < 0.01  # and fine at lam = 100


def test_exact_inverse_shapes_and_floor():
    d = np.array([[0.0, 1.0], [2 * np.sqrt(0.375), 30.0]])
    out = inverse_anscombe_exact(d)
    assert out.shape == d.shape
    assert out[0, 0] == 0 and out[0, 1] == 0 and out[1, 0] == 0  # at or below E[A | lam = 0]
    assert np.isclose(out[1, 1], inverse_anscombe_closed_form(30.0), rtol=1e-4)
    assert np.ndim(inverse_anscombe_exact(3.0)) == 0
    assert float(inverse_anscombe_exact(100.0)) == pytest.approx(  # above the table
        float(inverse_anscombe_closed_form(100.0)))


@pytest.mark.parametrize("read_noise", [0.5, 3.0])
@pytest.mark.parametrize("lam", [0.5, 5.0, 50.0, 1000.0])
def test_generalized_inverse_is_unbiased_for_poisson_gaussian_readings(lam, read_noise):
    rng = np.random.default_rng(3)
    z = rng.poisson(lam, 400_000) + rng.normal(0.0, read_noise, 400_000)  # negative readings too
    est = float(inverse_anscombe_exact(generalized_anscombe(z, read_noise).mean(), read_noise))
    # the inverse of the sample mean: unbiased up to its sampling error (< 1% of sqrt(var) here)
    assert est == pytest.approx(lam, abs=0.01 * np.sqrt(lam + read_noise**2) + 1e-3)
    # the plain inverse takes the read noise for counts
    assert float(inverse_anscombe_exact(generalized_anscombe(z, read_noise).mean())) > lam + 0.2 * read_noise**2


def test_generalized_anscombe_is_anscombe_without_read_noise():
    x = np.array([0.0, 1.0, 7.0, 300.0])
    assert np.allclose(generalized_anscombe(x, 0.0), anscombe(x))
    assert np.allclose(inverse_anscombe_exact(x + 1.0, 0.0), inverse_anscombe_exact(x + 1.0))


@pytest.mark.parametrize("bad", [-0.1, float("nan"), float("inf"), "x"])
def test_read_noise_is_checked(bad):
    with pytest.raises(ValueError, match="read_noise"):
        generalized_anscombe(np.ones(3), bad)
    with pytest.raises(ValueError, match="read_noise"):
        anscombe_bm3d(np.ones((16, 16)), read_noise=bad)
    with pytest.raises(ValueError, match="read_noise"):
        anscombe_gaussian(np.ones((16, 16)), read_noise=bad)


@pytest.mark.parametrize(("method", "margin", "bias"), [("bm3d", 1.0, 0.15), ("gaussian", 3.0, 0.05)])
def test_classical_denoisers_told_the_read_noise_beat_the_plain_transform(method, margin, bias):
    denoise = {"bm3d": anscombe_bm3d, "gaussian": anscombe_gaussian}[method]
    truth = smooth_blobs()
    rng = np.random.default_rng(4)
    readings = rng.poisson(truth) + rng.normal(0.0, 2.0, truth.shape)
    with pytest.raises(ValueError, match="negative"):  # the plain transform wants counts
        denoise(readings)
    told = denoise(readings, read_noise=2.0)
    plain = denoise(np.maximum(readings, 0.0))
    assert psnr(told, truth) > psnr(plain, truth) + margin
    # BM3D's residual fluctuation through the convex inverse, floored at 0, biases the total up
    # where read noise swamps the counts (measured +9% here; Anscombe + Gaussian +1%), the plain
    # transform more (clamped)
    assert abs(told.sum() / truth.sum() - 1) < bias
    assert abs(told.sum() - truth.sum()) < abs(plain.sum() - truth.sum())


@pytest.mark.parametrize("lam", [0.0, 0.3, 3.0, 30.0])
def test_generalized_anscombe_variance_matches_sampling(lam):
    """The variance SURE takes for Poisson-Gaussian readings (read noise 2), against a sample."""
    from models.classical import _anscombe_variance

    rng = np.random.default_rng(8)
    z = rng.poisson(lam, 400_000) + rng.normal(0.0, 2.0, 400_000)
    assert float(_anscombe_variance(np.array(lam), 2.0)) == pytest.approx(generalized_anscombe(z, 2.0).var(), rel=0.02)


def test_anscombe_gaussian_with_read_noise_is_unbiased_and_is_the_plain_method_without_it():
    rng = np.random.default_rng(4)
    # a flat field, read noise swamping the counts: the mean comes back
    flat = rng.poisson(1.0, (128, 128)) + rng.normal(0.0, 2.0, (128, 128))
    assert float(anscombe_gaussian(flat, read_noise=2.0).mean()) == pytest.approx(1.0, rel=0.05)
    counts = rng.poisson(smooth_blobs())
    assert np.array_equal(anscombe_gaussian(counts, read_noise=0.0), anscombe_gaussian(counts))


# ------------------------------------------------------------------------------------------
# denoising


@pytest.fixture(scope="module")
def low_count_frame():
    truth = smooth_blobs()
    counts = np.random.default_rng(0).poisson(truth).astype(float)
    return truth, counts


def test_sure_sigma_is_close_to_the_oracle(low_count_frame):
    truth, counts = low_count_frame
    chosen = sure_gaussian_sigma(counts)
    best = max(psnr(anscombe_gaussian(counts, s), truth) for s in np.geomspace(0.3, 12, 25))
    assert psnr(anscombe_gaussian(counts, chosen), truth) > best - 0.5


def test_denoisers_improve_psnr_and_bm3d_wins(low_count_frame):
    truth, counts = low_count_frame
    gauss = anscombe_gaussian(counts)
    b = anscombe_bm3d(counts)
    p_raw, p_gauss, p_bm3d = psnr(counts, truth), psnr(gauss, truth), psnr(b, truth)
    assert p_gauss > p_raw + 5
    assert p_bm3d > p_gauss + 1
    assert ssim(b, truth) > ssim(gauss, truth) > ssim(counts, truth)
    # the exact unbiased inverse keeps the total count after a linear filter; BM3D at 1 count/px
    # loses a few percent of it (measured -3 %; -10 % at 0.1 count/px)
    assert gauss.sum() == pytest.approx(counts.sum(), rel=0.02)
    assert b.sum() == pytest.approx(counts.sum(), rel=0.06)


@pytest.mark.parametrize("denoise", [lambda c, m: anscombe_gaussian(c, 2.0, mask=m),
                                     lambda c, m: anscombe_bm3d(c, mask=m)])
def test_denoisers_fill_masked_gaps(denoise):
    rng = np.random.default_rng(1)
    truth = np.full((64, 64), 4.0)
    counts = rng.poisson(truth).astype(float)
    gap = np.zeros(truth.shape, dtype=bool)
    gap[:, 30:34] = True
    counts[gap] = np.nan  # anything may sit in a masked pixel
    counts[0, 31] = -1.0
    out = denoise(counts, gap)
    assert (out[gap] == 0).all()
    # the gap does not drag its neighbours down
    assert out[:, 27:30].mean() == pytest.approx(4.0, rel=0.1)
    assert out[:, 34:37].mean() == pytest.approx(4.0, rel=0.1)


def test_denoisers_validate():
    with pytest.raises(ValueError, match="negative"):
        anscombe_gaussian(np.array([[1.0, -2.0]]), 1.0)
    with pytest.raises(ValueError, match="mask"):
        anscombe_gaussian(np.ones((4, 4)), 1.0, mask=np.zeros((3, 3), dtype=bool))
    with pytest.raises(ValueError, match="sigma"):
        anscombe_gaussian(np.ones((4, 4)), 0.0)
    with pytest.raises(ValueError, match="sigma"):
        anscombe_gaussian(np.ones((4, 4)), "auto")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="dimensions"):
        anscombe_bm3d(np.ones((4, 4, 4)))


def test_gaussian_denoiser_works_in_3d():
    rng = np.random.default_rng(2)
    truth = 1.0 + 0.5 * np.sin(np.linspace(0, 3, 24))[:, None, None] * np.ones((24, 24, 24))
    counts = rng.poisson(truth).astype(float)
    assert psnr(anscombe_gaussian(counts), truth) > psnr(counts, truth) + 10


def test_bm3d_missing_gives_install_hint(monkeypatch):
    monkeypatch.setitem(sys.modules, "bm3d", None)  # makes `import bm3d` raise ImportError
    with pytest.raises(ImportError, match=r"pip install '\.\[bench\]'"):
        anscombe_bm3d(np.ones((16, 16)))


# ------------------------------------------------------------------------------------------
# Bragg-peak integration


def _draws(spec, integrate, n_draws, seed):
    truth, centres, intensities = scene(spec)
    rng = np.random.default_rng(seed)
    results = [integrate(rng.poisson(truth), centres) for _ in range(n_draws)]
    values = np.array([r.intensity for r in results])
    sigmas = np.array([r.sigma for r in results])
    return values, sigmas, intensities


def _support(spec, level=1e-3):
    truth, _, _ = scene(spec)
    return truth - spec["background"] > level


INTEGRATORS = {
    "sphere": lambda c, centres: sphere_integrate(c, centres, 8.0, 9.0, 12.0),
    "ellipsoid": lambda c, centres: ellipsoid_integrate(c, centres, region_radius=10.0,
                                                        n_sigma=4.0),
}


@pytest.mark.parametrize("name", sorted(INTEGRATORS))
@pytest.mark.parametrize("spec", [PEAKS_2D, PEAKS_3D], ids=["2d", "3d"])
def test_summation_is_unbiased_and_sigma_matches_scatter(name, spec):
    values, sigmas, truth = _draws(spec, INTEGRATORS[name], 150, seed=3)
    # one draw is within a few sigma of the truth
    assert (np.abs(values[0] - truth) < 4 * sigmas[0]).all()
    # the mean of many is unbiased to within a few of its standard errors, or 1 %
    err = np.abs(values.mean(0) - truth)
    assert (err < np.maximum(4 * values.std(0) / np.sqrt(len(values)), 0.01 * truth)).all()
    # sigma(I) is the scatter of I over Poisson draws
    np.testing.assert_allclose(sigmas.mean(0), values.std(0), rtol=0.2)


@pytest.mark.parametrize("spec", [PEAKS_2D, PEAKS_3D], ids=["2d", "3d"])
def test_integrate_in_mask_with_the_true_support(spec):
    support = _support(spec)
    values, sigmas, truth = _draws(
        spec, lambda c, _: integrate_in_mask(c, support, background_shell_width=3.0), 150, seed=4)
    assert values.shape == (150, len(truth))
    err = np.abs(values.mean(0) - truth)
    assert (err < np.maximum(4 * values.std(0) / np.sqrt(len(values)), 0.01 * truth)).all()
    np.testing.assert_allclose(sigmas.mean(0), values.std(0), rtol=0.2)


def test_integrate_in_mask_exact_on_known_counts():
    counts = np.full((20, 30), 2.0)
    counts[5:8, 5:8] += 10.0  # a 3 x 3 peak of 90 counts above background
    counts[5:7, 20:22] += 4.0  # a 2 x 2 peak of 16
    peaks = np.zeros(counts.shape, dtype=bool)
    peaks[5:8, 5:8] = True
    peaks[5:7, 20:22] = True
    out = integrate_in_mask(counts, peaks, background_shell_width=2.0, grow_sigma=None)
    np.testing.assert_allclose(out.intensity, [90.0, 16.0])
    np.testing.assert_allclose(out.background, [2.0, 2.0])
    np.testing.assert_array_equal(out.n_peak, [9, 4])
    np.testing.assert_allclose(out.centroids, [[6.0, 6.0], [5.5, 20.5]])
    ratio = out.n_peak / out.n_shell
    np.testing.assert_allclose(out.sigma**2, [9 * 12 + ratio[0] ** 2 * 2 * out.n_shell[0],
                                              4 * 6 + ratio[1] ** 2 * 2 * out.n_shell[1]])
    assert out.labels is not None and out.labels.max() == 2
    # a masked pixel leaves both the peak and the shell
    bad = np.zeros(counts.shape, dtype=bool)
    bad[5, 5] = True
    masked = integrate_in_mask(counts, peaks, 2.0, mask=bad, grow_sigma=None)
    assert masked.n_peak[0] == 8 and masked.intensity[0] == pytest.approx(80.0)
    # the curve of growth adds the first ring (the 4-neighbours: 12 and 8 pixels) and stops where
    # the next holds nothing above the background: the same intensities
    grown = integrate_in_mask(counts, peaks, background_shell_width=2.0, grow_sigma=2.0)
    np.testing.assert_allclose(grown.intensity, [90.0, 16.0])
    np.testing.assert_array_equal(grown.n_peak, [21, 12])
    np.testing.assert_allclose(grown.centroids, out.centroids)


def _pseudo_voigt_scene(eta=0.5, sigma=1.5, intensity=20000.0, background=2.0):
    """One peak with Lorentzian wings (unit-sum parts, cut at 6 sigma) and its 5 %-of-maximum mask."""
    yy, xx = np.mgrid[:64, :64].astype(float)
    d2 = ((yy - 31.6) ** 2 + (xx - 32.3) ** 2) / sigma**2
    g = np.exp(-0.5 * d2)
    lorentz = np.where(d2 <= 36.0, 1.0 / (1.0 + d2 / (2.0 * np.log(2.0))), 0.0)
    peak = intensity * (eta * lorentz / lorentz.sum() + (1.0 - eta) * g / g.sum())
    return peak + background, peak > 0.05 * peak.max()


def test_aperture_growth_recovers_the_wings_a_mask_leaves_out():
    truth, mask = _pseudo_voigt_scene()
    rng = np.random.default_rng(21)
    draws = [rng.poisson(truth).astype(float) for _ in range(60)]
    alone = np.array([integrate_in_mask(c, mask, grow_sigma=None).intensity[0] for c in draws])
    grown = [integrate_in_mask(c, mask, grow_sigma=2.0) for c in draws]
    values = np.array([g.intensity[0] for g in grown])
    # the mask holds 83 % of the peak and its shell sits on the wings: a quarter is lost; the
    # aperture takes the wings out to three times the mask's pixels, all but the farthest few %
    assert alone.mean() / 20000.0 < 0.75
    assert 0.92 < values.mean() / 20000.0 < 1.01
    assert all(g.n_peak[0] > mask.sum() + 20 for g in grown)  # rings beyond the first were taken
    # sigma(I) is the Poisson sigma of the chosen aperture; which ring the growth stops at varies
    # from draw to draw, and that adds scatter sigma(I) does not hold (about 2x here)
    sigma = np.mean([g.sigma[0] for g in grown])
    assert 0.3 * values.std() < sigma < values.std()


def test_aperture_growth_adds_no_bias_on_background_alone():
    rng = np.random.default_rng(22)
    pm = np.zeros((40, 40), dtype=bool)
    pm[18:21, 18:21] = True
    out = [integrate_in_mask(rng.poisson(5.0, (40, 40)).astype(float), pm, grow_sigma=2.0) for _ in range(600)]
    values = np.array([o.intensity[0] for o in out])
    assert abs(values.mean()) < 4 * values.std() / np.sqrt(len(values))
    np.testing.assert_allclose(np.mean([o.sigma[0] for o in out]), values.std(), rtol=0.15)
    assert np.median([o.n_peak[0] for o in out]) == 9 + 12  # mostly the first ring only


# two peaks 7 px apart whose supports touch: one component of the mask
TOUCHING_2D = {"shape": (48, 48), "background": 3.0,
               "peaks": [((20.0, 20.0), (1.6, 1.6), 4000.0), ((20.5, 27.0), (1.6, 1.6), 1500.0)]}
TOUCHING_3D = {"shape": (24, 24, 24), "background": 0.5,
               "peaks": [((12.0, 8.0, 12.0), (1.5, 1.5, 1.5), 3000.0), ((12.0, 15.0, 12.5), (1.5, 1.5, 1.5), 2000.0)]}


@pytest.mark.parametrize("spec", [TOUCHING_2D, TOUCHING_3D], ids=["2d", "3d"])
def test_touching_peaks_are_split_by_the_score_and_integrated_apart(spec):
    truth, centres, intensities = scene(spec)
    support = _support(spec, level=0.5)
    assert int(ndimage.label(support, np.ones((3,) * support.ndim))[1]) == 1  # one component
    counts = np.random.default_rng(11).poisson(truth).astype(float)
    whole = integrate_in_mask(counts, support)
    assert len(whole.intensity) == 1  # both peaks' counts go to one
    score = truth - spec["background"]  # a segmentation's evidence: here, the peaks themselves
    labels, n = split_peaks(support, score)
    assert n == 2 and set(np.unique(labels)) == {0, 1, 2}
    for k in (1, 2):  # each part is connected and lies on the mask
        assert ndimage.label(labels == k, np.ones((3,) * support.ndim))[1] == 1
    np.testing.assert_array_equal(labels > 0, support)
    off = np.where(support, score, np.nan)  # what the score holds off the mask does not matter
    np.testing.assert_array_equal(split_peaks(support, off)[0], labels)
    split = integrate_in_mask(counts, support, score=score)
    # parts come in the order of their first pixel, as components do: pair each centre with the
    # nearest centroid (the counts-weighted centre of each part)
    order = np.array([np.linalg.norm(split.centroids - c, axis=1).argmin() for c in centres])
    assert sorted(order) == [0, 1]
    assert np.linalg.norm(split.centroids[order] - centres, axis=1).max() < 0.5
    # each part holds what the expected counts above the background put there (the weaker peak's
    # part also takes the stronger one's tail), to within a few sigma and the little tail in the shell
    expected = np.array([(truth - spec["background"])[labels == k].sum() for k in (1, 2)])
    assert (np.abs(split.intensity - expected) < 4 * split.sigma + 0.02 * expected).all()
    # ... which is each peak's intensity to within 10 %, where one intensity goes to one peak unsplit
    np.testing.assert_allclose(split.intensity[order], intensities, rtol=0.1)
    assert split.intensity.sum() == pytest.approx(whole.intensity[0], rel=0.02)


def test_split_keeps_a_single_peak_whole_and_a_flat_top_as_one():
    truth, _, _ = scene(PEAKS_2D)
    support = _support(PEAKS_2D, level=0.5)
    labels, n = split_peaks(support, truth)
    assert n == 2  # two separate peaks, each one seed
    ref = ndimage.label(support, np.ones((3, 3)))[0]
    np.testing.assert_array_equal(labels, ref)
    flat = np.zeros((16, 16), dtype=bool)
    flat[4:10, 4:12] = True
    labels, n = split_peaks(flat, flat.astype(float), smoothing=0.0)  # one flat top: one seed
    assert n == 1
    # equal maxima closer than min_separation merge, farther ones split the component
    score = np.zeros((16, 16))
    score[6, 5] = score[6, 7] = 1.0
    assert split_peaks(flat, score, min_separation=3.0, smoothing=0.0)[1] == 1
    score[6, 7], score[6, 10] = 0.0, 1.0
    assert split_peaks(flat, score, min_separation=3.0, smoothing=0.0)[1] == 2


@pytest.mark.parametrize("shape", [(40, 33), (9, 12, 10)])
def test_window_extreme_is_scipys_filter(shape):
    from models.classical import _window_extreme

    a = np.random.default_rng(0).normal(size=shape)
    for reach in (1, 3):
        np.testing.assert_array_equal(_window_extreme(a, reach, np.maximum),
                                      ndimage.maximum_filter(a, 2 * reach + 1, mode="nearest"))
        np.testing.assert_array_equal(_window_extreme(a, reach, np.minimum),
                                      ndimage.minimum_filter(a, 2 * reach + 1, mode="nearest"))


def test_split_validates():
    m = np.ones((8, 8), dtype=bool)
    with pytest.raises(ValueError, match="shape"):
        split_peaks(m, np.ones((4, 4)))
    with pytest.raises(ValueError, match="finite"):
        split_peaks(m, np.full((8, 8), np.nan))
    with pytest.raises(ValueError, match="min_separation"):
        split_peaks(m, np.ones((8, 8)), min_separation=0.0)
    with pytest.raises(ValueError, match="smoothing"):
        split_peaks(m, np.ones((8, 8)), smoothing=-1.0)
    with pytest.raises(ValueError, match="score"):
        integrate_in_mask(np.ones((8, 8)), m, score=np.ones((4, 4)))


def _plane(x, shell, where):
    """The least-squares plane through the shell's counts, summed over ``where`` (its mean where
    the shell has fewer than 4 (ndim + 1) pixels)."""
    if shell.sum() < 4 * (x.ndim + 1):
        return where.sum() * x[shell].mean()
    design = np.column_stack([np.ones(shell.sum()), np.argwhere(shell)])
    coef = np.linalg.lstsq(design, x[shell], rcond=None)[0]
    return float(np.column_stack([np.ones(where.sum()), np.argwhere(where)]) @ coef @ np.ones(where.sum()))


def _reference_integrals(x, pm, bad, width, grow=None, most=6):
    """integrate_in_mask written the plain way: one component at a time, its rings and shell by a
    distance transform of the whole frame."""
    pm = pm & ~bad
    labels, n = ndimage.label(pm, np.ones((3,) * x.ndim))
    out = []
    for i in range(1, n + 1):
        comp = labels == i
        dist = ndimage.distance_transform_edt(~comp)
        free = ~pm & ~bad
        if grow is not None:  # only where no other component is nearer
            free &= dist <= ndimage.distance_transform_edt(~(pm & ~comp))
        rings, last, last_var = 0, np.inf, 0.0
        while grow is not None and rings < most:
            ring = (dist > rings) & (dist <= rings + 1) & free
            beyond = (dist > rings + 1) & (dist <= rings + 1 + width) & free
            if not ring.any() or not beyond.any():
                break
            excess = x[ring].sum() - _plane(x, beyond, ring)
            variance = max(x[ring].sum() + (ring.sum() / beyond.sum()) ** 2 * x[beyond].sum(), 1.0)
            rise = excess / ring.sum() - last
            if excess <= grow * np.sqrt(variance) or rise > grow * np.sqrt(variance / ring.sum() ** 2 + last_var):
                break
            if ((dist > 0) & (dist <= rings + 1) & free).sum() > 3 * comp.sum():
                break
            last, last_var = excess / ring.sum(), variance / ring.sum() ** 2
            rings += 1
        rings = 0 if grow is None else max(rings, 1)
        aperture = comp | ((dist > 0) & (dist <= rings) & free)
        shell = (dist > rings) & (dist <= rings + width) & free
        b = x[shell].mean() if shell.any() else np.nan
        under = aperture.sum() * b if grow is None or not shell.any() else _plane(x, shell, aperture)
        at = np.array(np.nonzero(comp), dtype=float)
        w = np.maximum(x[comp] - b, 0.0) if shell.any() else np.zeros(comp.sum())
        cen = at @ w / w.sum() if w.sum() > 0 else at.mean(axis=1)
        out.append((x[aperture].sum() - under, x[aperture].sum(), x[shell].sum(), aperture.sum(), shell.sum(), cen))
    return out


@pytest.mark.parametrize("shape", [(48, 40), (14, 16, 12)])
def test_integrate_in_mask_equals_the_plain_per_component_sums(shape):
    rng = np.random.default_rng(12)
    x = rng.poisson(3.0, shape).astype(float)
    # blobs that touch the frame's edge, touch each other, and sit by masked pixels
    pm = ndimage.binary_dilation(rng.random(shape) > (0.985 if len(shape) == 2 else 0.997), iterations=2)
    bad = rng.random(shape) > 0.97
    x[bad] = np.nan  # masked pixels may hold anything
    # peaks on the blobs, with wings two pixels wide, so that apertures grow past their first ring
    wings = ndimage.binary_dilation(pm, iterations=2) & ~pm
    x = x + np.where(pm, rng.poisson(20.0, shape), 0) + np.where(wings, rng.poisson(8.0, shape), 0)
    for width, grow in ((1.0, None), (2.5, None), (3.0, None), (3.0, 2.0), (2.0, 0.5)):
        got = integrate_in_mask(x, pm, width, mask=bad, grow_sigma=grow)
        want = _reference_integrals(np.where(bad, 0.0, x), pm, bad, width, grow)
        assert len(got.intensity) == len(want) > 3
        np.testing.assert_allclose(got.intensity, [w[0] for w in want])
        np.testing.assert_array_equal(got.n_peak, [w[3] for w in want])
        np.testing.assert_array_equal(got.n_shell, [w[4] for w in want])
        np.testing.assert_allclose(got.centroids, np.array([w[5] for w in want]), atol=1e-9)


def test_no_peaks_gives_empty_integrals():
    out = integrate_in_mask(np.ones((8, 8)), np.zeros((8, 8), dtype=bool))
    assert out.intensity.shape == (0,) and out.centroids.shape == (0, 2)


@pytest.mark.parametrize("spec", [PEAKS_2D, PEAKS_3D], ids=["2d", "3d"])
def test_threshold_components_finds_and_integrates_peaks(spec):
    truth, _, intensities = scene(spec)
    counts = np.random.default_rng(5).poisson(truth)
    found, out = threshold_components(counts, threshold=5.0, size=9)
    assert len(out.intensity) == len(intensities)
    assert iou(found, _support(spec, level=0.5)) > 0.4
    # thresholding misses the tails: a known low bias of a few percent on strong peaks
    order = np.argsort(-out.intensity)
    np.testing.assert_allclose(out.intensity[order], np.sort(intensities)[::-1], rtol=0.1)


def test_ellipsoid_follows_the_peak_shape():
    truth, centres, _ = scene(PEAKS_2D)
    counts = np.random.default_rng(6).poisson(truth)
    ell = ellipsoid_integrate(counts, centres, region_radius=10.0, n_sigma=4.0)
    sph = sphere_integrate(counts, centres, 8.0, 9.0, 12.0)
    # a 4-sigma ellipse of a 2 x 1.5 px peak holds fewer pixels than the circle of radius 8
    assert (ell.n_peak < sph.n_peak).all()
    # close to the 4-sigma ellipse's area, 16 pi sigma_1 sigma_2
    np.testing.assert_allclose(ell.n_peak, 16 * np.pi * np.array([3.0, 3.75]), rtol=0.25)


def test_weak_peak_borrows_the_nearest_strong_shape():
    shape, sigma = (64, 64), (2.5, 1.2)
    truth = (2.0 + gaussian_peak(shape, (20.0, 20.0), sigma, 8000.0)
             + gaussian_peak(shape, (44.0, 44.0), sigma, 60.0))
    counts = np.random.default_rng(10).poisson(truth)
    centres = [[20.0, 20.0], [44.0, 44.0]]
    own = ellipsoid_integrate(counts, centres, region_radius=10.0, n_sigma=3.5)
    shared = ellipsoid_integrate(counts, centres, region_radius=10.0, n_sigma=3.5,
                                 weak_threshold=10.0)
    assert own.intensity[1] / own.sigma[1] < 10
    assert shared.n_peak[1] == shared.n_peak[0] != own.n_peak[1]
    assert shared.intensity[0] == own.intensity[0]


def test_integration_validates():
    frame = np.ones((16, 16))
    with pytest.raises(ValueError, match="bkg_inner"):
        sphere_integrate(frame, [[8, 8]], 4.0, 3.0, 6.0)
    with pytest.raises(ValueError, match="centers"):
        sphere_integrate(frame, [[8, 8, 8]], 3.0, 4.0, 6.0)
    with pytest.raises(ValueError, match="bkg_inner_scale"):
        ellipsoid_integrate(frame, [[8, 8]], 5.0, bkg_inner_scale=0.5)
    with pytest.raises(ValueError, match="peak_mask"):
        integrate_in_mask(frame, np.ones((4, 4), dtype=bool))
    blob = frame > 2
    blob[6:9, 6:9] = True
    for bad in (0.0, -1.0, float("nan")):
        with pytest.raises(ValueError, match="grow_sigma"):
            integrate_in_mask(frame, blob, grow_sigma=bad)
    for bad in (0, 1.5, True):
        with pytest.raises(ValueError, match="max_grow"):
            integrate_in_mask(frame, blob, max_grow=bad)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="background"):
        threshold_components(frame, background="mean")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="negative"):
        threshold_components(-frame)


def test_peak_off_the_frame_has_nan_background():
    out = sphere_integrate(np.ones((16, 16)), [[100.0, 100.0]], 2.0, 3.0, 4.0)
    assert out.n_peak[0] == 0 and np.isnan(out.intensity[0])
    # a peak mask that leaves no shell
    whole = integrate_in_mask(np.ones((8, 8)), np.ones((8, 8), dtype=bool))
    assert whole.n_shell[0] == 0 and np.isnan(whole.sigma[0])


def test_ellipsoid_without_a_peak_falls_back_to_the_region():
    frame = np.random.default_rng(8).poisson(0.2, size=(32, 32))
    out = ellipsoid_integrate(frame, [[16.0, 16.0], [0.0, 0.0]], region_radius=6.0)
    assert np.isfinite(out.intensity).all()
    assert (np.abs(out.intensity) < 4 * out.sigma).all()
    empty = ellipsoid_integrate(np.zeros((32, 32)), [[16.0, 16.0]], region_radius=6.0)
    assert empty.n_peak[0] == 113 and empty.intensity[0] == 0  # the pixels of a radius-6 disc


def test_sphere_leaves_masked_pixels_out():
    truth, centres, intensities = scene(PEAKS_2D)
    counts = np.random.default_rng(9).poisson(truth).astype(float)
    bad = np.zeros(counts.shape, dtype=bool)
    bad[30:34, :] = True  # a module gap between the peaks, with garbage in it
    counts[bad] = -1.0
    out = sphere_integrate(counts, centres, 8.0, 9.0, 12.0, mask=bad)
    assert (np.abs(out.intensity - intensities) < 4 * out.sigma).all()


# ------------------------------------------------------------------------------------------
# metrics


def test_psnr():
    assert psnr([0.0, 1.0], [0.0, 1.0]) == float("inf")
    assert psnr([0.0, 1.0, 0.5], [0.0, 1.0, 0.0]) == pytest.approx(10 * np.log10(1 / (0.25 / 3)))
    assert psnr([0.0, 9.0], [0.0, 1.0], mask=np.array([False, True]), data_range=1.0) == \
        float("inf")
    with pytest.raises(ValueError, match="shape"):
        psnr([0.0], [0.0, 1.0])
    with pytest.raises(ValueError, match="data_range"):
        psnr([1.0, 1.0], [1.0, 1.0])


def test_ssim():
    rng = np.random.default_rng(7)
    x = rng.random((32, 32))
    assert ssim(x, x) == pytest.approx(1.0)
    noisy = x + 0.2 * rng.standard_normal(x.shape)
    assert 0 < ssim(noisy, x) < 0.9
    assert ssim(noisy, x) == pytest.approx(ssim(x, noisy, data_range=1.0), abs=0.05)
    # constant images: only the luminance term is left
    a, b, L = 0.3, 0.5, 1.0
    c1 = (0.01 * L) ** 2
    expected = (2 * a * b + c1) / (a * a + b * b + c1)
    assert ssim(np.full((16, 16), a), np.full((16, 16), b), data_range=L) == \
        pytest.approx(expected)
    # a masked corruption does not count
    bad = np.zeros(x.shape, dtype=bool)
    bad[:8, :8] = True
    y = x.copy()
    y[bad] = 100.0
    assert ssim(y, x, data_range=1.0, mask=bad) == pytest.approx(1.0)
    with pytest.raises(ValueError, match="at least"):
        ssim(np.ones((5, 5)), np.ones((5, 5)), data_range=1.0)


def test_dice_iou_r_factor():
    a = np.array([True, True, False, False])
    b = np.array([True, False, True, False])
    assert dice(a, b) == pytest.approx(0.5)
    assert iou(a, b) == pytest.approx(1 / 3)
    assert dice(~np.ones(3, bool), ~np.ones(3, bool)) == 1.0
    with pytest.raises(ValueError, match="boolean"):
        iou([1, 0], [1, 0])
    # pixels a detector does not measure take no part: index 3, where only b_gap has a peak, drops out
    valid = np.array([True, True, True, False])
    b_gap = np.array([True, False, True, True])
    assert iou(a, b_gap) == pytest.approx(1 / 4) and iou(a, b_gap, valid) == pytest.approx(1 / 3)
    assert dice(a, b_gap, valid) == pytest.approx(0.5)
    with pytest.raises(ValueError, match="valid"):
        iou(a, b, valid[:3])
    assert r_factor([1.0, 3.0], [2.0, 2.0]) == pytest.approx(0.5)
    with pytest.raises(ValueError, match="I_true"):
        r_factor([1.0], [0.0])


# ------------------------------------------------------------------------------------------
# super-resolution


def smooth_pattern(n=128):
    yy, xx = (np.mgrid[:n, :n] + 0.5) / n
    return 100 * np.exp(-((xx - 0.5) ** 2 + (yy - 0.45) ** 2) / 0.05) + 5 * np.cos(6 * xx) + 6


@pytest.mark.parametrize("factor", [2, 4])
@pytest.mark.parametrize("space", ["linear", "log"])
def test_bicubic_upsample(factor, space):
    fine = smooth_pattern()
    coarse = rebin(fine, factor)
    up = bicubic_upsample(coarse, factor, space=space)
    assert up.shape == fine.shape
    # rebinning the upsampled image gives back the coarse one
    np.testing.assert_allclose(rebin(up, factor), coarse, rtol=0.01, atol=0.005 * coarse.max())
    assert up.sum() == pytest.approx(fine.sum(), rel=1e-3)
    nearest = np.kron(coarse, np.ones((factor, factor))) / factor**2
    assert np.abs(up - fine).mean() < 0.2 * np.abs(nearest - fine).mean()


def test_upsample_and_rebin_validate():
    with pytest.raises(ValueError, match="factor"):
        bicubic_upsample(np.ones((4, 4)), 0)
    with pytest.raises(ValueError, match="space"):
        bicubic_upsample(np.ones((4, 4)), 2, space="cubic")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="multiple"):
        rebin(np.ones((5, 4)), 2)
    assert (bicubic_upsample(np.zeros((4, 4)), 2, space="log") == 0).all()
    assert rebin(np.ones((4, 6, 2)), 2).shape == (2, 3, 1)


def test_neighbour_noise_rms_reads_gaussian_noise_and_leaves_masked_pixels_out():
    rng = np.random.default_rng(3)
    assert neighbour_noise_rms(rng.normal(0.0, 2.0, (128, 128))) == pytest.approx(2.0, rel=0.05)
    x = rng.normal(0.0, 1.0, (64, 64))
    bad = np.zeros(x.shape, dtype=bool)
    bad[:, ::3] = True
    x[bad] = np.nan  # masked pixels may hold anything
    assert neighbour_noise_rms(x, bad) == pytest.approx(1.0, rel=0.1)
    assert neighbour_noise_rms(np.ones((8, 8))) is None  # 56 pairs: too few to say
    with pytest.raises(ValueError, match="non-finite"):
        neighbour_noise_rms(x)


def test_neighbour_noise_rms_is_not_below_a_simulated_detectors_read_noise():
    """What the detector agent relies on to refuse a too-large read-noise setting: on simulated
    integrating detectors (read noise 0.5-3 counts, blur, gain variation, dead and hot pixels),
    every scene kind and 0.01-100 counts per pixel, the estimate is never much below the read
    noise; and a photon-counting detector's low-count frame reads as far less noisy."""
    from simulators.detector import denoise_frame, random_effects

    rng = np.random.default_rng(11)
    kinds = ("spots", "rings", "saxs", "smooth", "texture", "speckle")
    for i, mean_counts in enumerate((0.01, 0.1, 1.0, 10.0, 100.0, 0.03)):
        s = denoise_frame(rng, kinds[i], (128, 128), mean_counts, effects=random_effects(rng, integrating=True))
        assert s.read_noise >= 0.5
        assert s.read_noise <= 1.1 * neighbour_noise_rms(s.counts, s.mask)
    s = denoise_frame(rng, "smooth", (128, 128), 0.1, effects=random_effects(rng, integrating=False))
    assert neighbour_noise_rms(s.counts, s.mask) < 0.25

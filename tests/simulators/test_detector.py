"""Training-data generators of simulators.detector: truth kept, statistics right, inputs checked."""

import numpy as np
import pytest
from scipy.stats import skew

from simulators import detector as d
from simulators.detector import (
    Augmentation,
    BraggRecipe,
    DetectorEffects,
    augment,
    bragg_frame_2d,
    bragg_volume_tof,
    denoise_frame,
    rebin,
    sans_pair,
)


def _poisson_mean_matches(expected, draws):
    """Mean of n draws within 5 standard errors of expected, pixel by pixel (summed in z^2)."""
    n = len(draws)
    mean = np.mean(draws, axis=0)
    good = expected > 0
    z = (mean[good] - expected[good]) / np.sqrt(expected[good] / n)
    # chi^2 with one dof per pixel: its mean is 1, its sd sqrt(2 / n_pixels)
    return abs(np.mean(z**2) - 1.0) < 5 * np.sqrt(2.0 / good.sum())


# ----------------------------------------------------------------------------------- Bragg 2D
def test_bragg_2d_shapes_dtypes_and_truth():
    s = bragg_frame_2d(np.random.default_rng(0))
    n = len(s.centers)
    assert s.expected.shape == s.counts.shape == s.mask.shape == s.support.shape == (128, 128)
    assert s.expected.dtype == s.counts.dtype == np.float64 and s.mask.dtype == bool
    assert s.peak_expected.shape == (n, 128, 128) and len(s.profiles) == n >= 3
    assert set(s.profiles) <= {"gaussian", "pseudo_voigt"}
    np.testing.assert_allclose(s.true_intensity, s.peak_expected.sum(axis=(1, 2)))
    np.testing.assert_allclose(s.background + s.peak_expected.sum(axis=0), s.expected)
    assert (s.background > 0).all()
    assert not s.mask.any()  # IDEAL: no gaps, no bad pixels
    assert np.array_equal(s.counts, np.round(s.counts))


def test_bragg_support_follows_the_documented_rule_and_covers_each_peak():
    s = bragg_frame_2d(3, BraggRecipe(intensity=(500.0, 5000.0)))
    for i, pe in enumerate(s.peak_expected):
        rule = (pe > d.SUPPORT_FRACTION * pe.max()) & (pe > d.SUPPORT_MIN_COUNTS)
        assert (s.support[rule]).all()
        r, c = np.round(s.centers[i]).astype(int)
        assert s.support[r, c]  # the centre pixel is inside
        # a Gaussian keeps 1 - exp(-3) = 95% inside 5% of its max; Lorentzian tails lose more
        inside = {"gaussian": 0.9, "pseudo_voigt": 0.6}[s.profiles[i]]
        assert pe[rule].sum() > inside * s.true_intensity[i]
    assert np.array_equal(s.labels > 0, s.support)
    assert s.labels.max() <= len(s.centers)


def test_bragg_poisson_mean_matches_expected():
    rng = np.random.default_rng(1)
    s = bragg_frame_2d(rng, BraggRecipe(shape=(32, 32), sigma=(0.8, 2.0)))
    draws = [d.IDEAL.read(rng, s.expected) for _ in range(400)]
    assert _poisson_mean_matches(s.expected, draws)


def test_bragg_counts_span_weak_to_strong_peaks():
    ratios = np.concatenate([
        (s.true_intensity / s.sigma_intensity)
        for s in (bragg_frame_2d(seed) for seed in range(5))
    ])
    assert ratios.min() < 3 and ratios.max() > 50
    low = bragg_frame_2d(0, BraggRecipe(count_scale=0.01))
    high = bragg_frame_2d(0, BraggRecipe(count_scale=1.0))
    np.testing.assert_allclose(100 * low.expected, high.expected)


def test_pseudo_voigt_has_heavier_tails_than_gaussian():
    d2 = d._mahalanobis2((64, 64), np.array([32.0, 32.0]), np.array([2.0, 2.0]), 0.0)
    g = d._profile_2d(d2, "gaussian", 0.0)
    pv = d._profile_2d(d2, "pseudo_voigt", 0.5)
    far = d2 > 16  # beyond 4 sigma
    assert g.sum() == pytest.approx(1.0) and pv.sum() == pytest.approx(1.0)
    assert pv[far].sum() > 20 * g[far].sum()


# ------------------------------------------------------------------------------------ TOF 3D
def test_tof_volume_shapes_and_asymmetric_tail():
    v = bragg_volume_tof(np.random.default_rng(2))
    assert v.expected.shape == v.counts.shape == (32, 32, 32)
    assert v.centers.shape == (len(v.peak_expected), 3) and set(v.profiles) == {"tof"}
    t = np.arange(32.0)
    for pe in v.peak_expected:
        tof = pe.sum(axis=(1, 2))
        assert skew(np.repeat(t, np.round(tof / tof.sum() * 1e5).astype(int))) > 0.2
    np.testing.assert_allclose(v.true_intensity, v.peak_expected.sum(axis=(1, 2, 3)))


def test_emg_is_normalized_and_matches_its_mean_without_overflow():
    t = np.linspace(-50, 250, 30001)
    with np.errstate(all="raise"):
        f = d._emg(t, 10.0, 0.3, 0.05)  # long tail, narrow Gaussian: erfc form would overflow
    dt = t[1] - t[0]
    assert f.sum() * dt == pytest.approx(1.0, rel=1e-4)
    assert (f * t).sum() * dt == pytest.approx(10.0 + 1 / 0.05, rel=1e-3)


# ------------------------------------------------------------------------------------ denoise
@pytest.mark.parametrize("kind", d.DENOISE_KINDS)
@pytest.mark.parametrize("mean_counts", [0.01, 1.0, 100.0])
def test_denoise_mean_counts_honoured(kind, mean_counts):
    s = denoise_frame(7, kind, (64, 48), mean_counts, effects=d.PILATUS)
    assert s.expected.shape == (64, 48) and s.expected.dtype == np.float64
    assert s.expected.mean() == pytest.approx(mean_counts, rel=1e-2)
    assert (s.expected >= 0).all() and s.expected.std() > 0


def test_denoise_poisson_mean_and_noise2noise_pair_independent():
    rng = np.random.default_rng(5)
    s = denoise_frame(rng, "speckle", (64, 64), 2.0, pair=True)
    # standardized residuals: the speckle's few bright pixels would dominate raw ones
    r1, r2 = ((c - s.expected) / np.sqrt(s.expected) for c in (s.counts, s.counts2))
    assert abs(np.corrcoef(r1.ravel(), r2.ravel())[0, 1]) < 4 / 64  # ~ N(0, 1/64)
    assert not np.array_equal(s.counts, s.counts2)
    draws = [d.IDEAL.read(rng, s.expected) for _ in range(200)]
    assert _poisson_mean_matches(s.expected, draws)


def test_speckle_is_exponential_and_spatially_correlated():
    sp = d._speckle(np.random.default_rng(0), (256, 256), 1.5)
    assert sp.mean() == pytest.approx(1.0)
    assert sp.std() == pytest.approx(1.0, abs=0.1)  # exponential: std = mean
    assert np.mean(sp > 2.0) == pytest.approx(np.exp(-2.0), abs=0.03)
    lag1 = np.corrcoef(sp[:, :-1].ravel(), sp[:, 1:].ravel())[0, 1]
    lag20 = np.corrcoef(sp[:, :-20].ravel(), sp[:, 20:].ravel())[0, 1]
    assert lag1 > 0.5 and abs(lag20) < 0.1


def test_train_and_held_out_kinds_are_disjoint_and_complete():
    assert not set(d.DENOISE_TRAIN_KINDS) & set(d.DENOISE_HELD_OUT_KINDS)
    assert set(d.DENOISE_TRAIN_KINDS) | set(d.DENOISE_HELD_OUT_KINDS) == set(d.DENOISE_KINDS)
    assert not set(d.SANS_TRAIN_KINDS) & set(d.SANS_HELD_OUT_KINDS)
    assert set(d.SANS_TRAIN_KINDS) | set(d.SANS_HELD_OUT_KINDS) == set(d.SANS_KINDS)
    for kinds in (d.SANS_TRAIN_KINDS, d.SANS_HELD_OUT_KINDS):  # both hold both symmetries
        assert {d.SANS_KINDS[k].anisotropic for k in kinds} == {True, False}


# ----------------------------------------------------------------------------- detector effects
def test_module_gaps_are_pyfai_gaps():
    import pyFAI

    full = pyFAI.detector_factory("Pilatus1M").calc_mask().astype(bool)
    eff = DetectorEffects("Pilatus1M", seed=11)
    pattern = eff.pattern((600, 500))  # larger than one module: a gap must show
    assert pattern.gaps.any() and not pattern.gaps.all()
    assert pattern.gaps.mean() == pytest.approx(full.mean(), abs=0.05)
    s = denoise_frame(0, "smooth", (600, 500), 5.0, effects=eff)
    assert (s.counts[pattern.gaps] == 0).all() and s.mask[pattern.gaps].all()
    assert (s.counts[~s.mask] > 0).mean() > 0.9
    assert s.expected[pattern.gaps].min() > 0  # truth is defined under the gaps


def test_gap_window_is_a_periodic_window_of_the_pyfai_mask():
    import pyFAI

    full = pyFAI.detector_factory("Eiger1M").calc_mask().astype(bool)
    rng = np.random.default_rng([3, 0x5EED])  # the pattern's own stream
    r0, c0 = rng.integers(full.shape[0]), rng.integers(full.shape[1])
    gaps = DetectorEffects("Eiger1M", seed=3).pattern((100, 120)).gaps
    rows = (r0 + np.arange(100)) % full.shape[0]
    cols = (c0 + np.arange(120)) % full.shape[1]
    assert np.array_equal(gaps, full[np.ix_(rows, cols)])


def test_gain_dead_hot_and_read_noise():
    eff = DetectorEffects(gain_rms=0.03, dead_fraction=0.01, hot_fraction=0.005, hot_value=7e5,
                          read_noise=2.0, seed=4)
    p = eff.pattern((200, 200))
    assert (p.gain - 1).std() == pytest.approx(0.03, rel=0.05)
    assert p.dead.mean() == pytest.approx(0.01, rel=0.2) and p.hot.mean() == pytest.approx(
        0.005, rel=0.3)
    assert np.array_equal(p.gain, eff.pattern((200, 200)).gain)  # fixed per detector seed
    flat = np.full((200, 200), 50.0)
    np.testing.assert_allclose(eff.respond(flat), 50.0 * p.gain)
    counts = eff.read(np.random.default_rng(0), eff.respond(flat))
    assert (counts[p.dead] == 0).all() and (counts[p.hot] == 7e5).all()
    good = ~(p.dead | p.hot)
    resid = counts[good] - 50.0 * p.gain[good]
    assert resid.var() == pytest.approx(50.0 + 4.0, rel=0.05)  # Poisson + read noise
    assert not np.array_equal(counts[good], np.round(counts[good]))
    photon_counting = DetectorEffects(seed=4).read(np.random.default_rng(0), flat)
    assert np.array_equal(photon_counting, np.round(photon_counting))


def test_random_effects_span_both_detector_families():
    drawn = [d.random_effects(seed) for seed in range(20)]
    assert {e.detector for e in drawn} == {None, "Pilatus1M", "Eiger1M"}
    assert all((e.read_noise > 0) == (e.detector is None) for e in drawn)
    assert all(0.3 <= e.blur_sigma <= 0.7 and 0.01 <= e.gain_rms <= 0.05 for e in drawn)
    assert len({e.seed for e in drawn}) == 20


def test_expected_is_gain_times_blur_of_the_photons():
    eff = DetectorEffects("Pilatus1M", blur_sigma=0.6, gain_rms=0.04, dead_fraction=0.01, seed=9)
    ideal = bragg_frame_2d(8, BraggRecipe(shape=(64, 64), sigma=(0.8, 2.0)))
    real = bragg_frame_2d(8, BraggRecipe(shape=(64, 64), sigma=(0.8, 2.0)), effects=eff)
    np.testing.assert_allclose(real.expected, eff.respond(ideal.expected))
    np.testing.assert_allclose(real.true_intensity, [eff.respond(p).sum() for p in
                                                     ideal.peak_expected])
    assert real.mask.any() and not ideal.mask.any()


def test_charge_sharing_blur_spreads_a_point_and_conserves_counts():
    point = np.zeros((21, 21))
    point[10, 10] = 100.0
    out = DetectorEffects(blur_sigma=0.5).respond(point)
    assert out.sum() == pytest.approx(100.0)
    assert 40 < out[10, 10] < 80 and out[10, 11] > 5


def test_tof_effects_act_on_detector_axes_only():
    eff = DetectorEffects("Eiger1M", gain_rms=0.02, dead_fraction=0.01, seed=2)
    v = bragg_volume_tof(0, effects=eff)
    assert np.array_equal(v.mask, np.broadcast_to(v.mask[0], v.mask.shape))
    assert (v.counts[v.mask & ~np.broadcast_to(eff.pattern((32, 32)).hot, v.mask.shape)] == 0).all()


# ----------------------------------------------------------------------------------- augment
def test_rotation_keeps_arrays_consistent():
    s = bragg_frame_2d(4, BraggRecipe(shape=(64, 48), sigma=(0.8, 2.0)), effects=d.PILATUS,
                       pair=True)
    for seed in range(8):
        a = augment(seed, s, Augmentation(rebin_probability=0.0, max_shift=0.0, thin=(1, 1)))
        k = next(k for k in range(4) if np.array_equal(a.expected, np.rot90(s.expected, k)))
        for name in ("counts", "counts2", "mask", "support", "labels"):
            assert np.array_equal(getattr(a, name), np.rot90(getattr(s, name), k)), name
        np.testing.assert_allclose(a.true_intensity, s.true_intensity)
        for c, pe in zip(a.centers, a.peak_expected, strict=True):
            cy = (pe.sum(axis=1) * np.arange(pe.shape[0])).sum() / pe.sum()
            cx = (pe.sum(axis=0) * np.arange(pe.shape[1])).sum() / pe.sum()
            assert np.hypot(cy - c[0], cx - c[1]) < 1.0


def test_rebin_shift_thin_crop():
    s = bragg_frame_2d(5, BraggRecipe(shape=(64, 64), sigma=(0.8, 2.0),
                                      intensity=(200.0, 2000.0)), pair=True)
    a = augment(0, s, Augmentation(rebin_probability=1.0, rotate=False, max_shift=0.0,
                                   thin=(1, 1)))
    assert a.expected.shape == (32, 32)
    np.testing.assert_allclose(a.expected.sum(), s.expected.sum())
    np.testing.assert_allclose(a.true_intensity, s.true_intensity)
    assert np.array_equal(a.counts, rebin(s.counts, 2))

    b = augment(1, s, Augmentation(rebin_probability=0.0, rotate=False, max_shift=0.5,
                                   thin=(0.25, 0.25)))
    np.testing.assert_allclose(b.true_intensity, 0.25 * s.true_intensity)
    assert b.counts.sum() == pytest.approx(0.25 * s.counts.sum(), rel=0.05)
    shift = next((dy, dx) for dy in range(-32, 33) for dx in range(-32, 33)
                 if np.allclose(b.expected, 0.25 * np.roll(s.expected, (dy, dx), axis=(0, 1))))
    assert (b.counts <= np.roll(s.counts, shift, axis=(0, 1))).all()  # binomial thinning
    assert np.array_equal(b.support, np.roll(
        augment(0, s, Augmentation(0.0, False, 0.0, (1, 1))).support, shift, axis=(0, 1))
    ) or b.support.sum() <= s.support.sum()  # thinning can only shrink the 0.1-count floor

    c = augment(2, s, Augmentation(rebin_probability=0.0, rotate=False, max_shift=0.0,
                                   thin=(1, 1), crop=(40, 30)))
    assert c.expected.shape == c.support.shape == (40, 30)
    assert len(c.centers) == len(c.peak_expected) == len(c.profiles) <= len(s.centers)
    assert (c.support.any() == (len(c.centers) > 0))


def test_augment_tof_volume_rebins_all_axes_and_turns_the_detector_only():
    v = bragg_volume_tof(3, effects=d.EIGER)
    a = augment(1, v, Augmentation(rebin_probability=1.0, max_shift=0.3, thin=(1, 1),
                                   crop=(12, 10, 14)))
    assert a.expected.shape == a.mask.shape == a.support.shape == (12, 10, 14)
    assert a.peak_expected.shape[1:] == (12, 10, 14) and a.centers.shape[1] == 3
    # gaps and bad pixels stay the same in every TOF bin
    assert np.array_equal(a.mask, np.broadcast_to(a.mask[0], a.mask.shape))
    full = augment(1, v, Augmentation(rebin_probability=1.0, max_shift=0.3, thin=(1, 1)))
    np.testing.assert_allclose(full.true_intensity, v.true_intensity)
    assert full.expected.sum() == pytest.approx(v.expected.sum())


def test_thinning_with_read_noise_redraws():
    s = denoise_frame(0, "smooth", (64, 64), 20.0, effects=d.INTEGRATING)
    a = augment(0, s, Augmentation(rebin_probability=0, rotate=False, max_shift=0,
                                   thin=(0.5, 0.5)))
    good = ~a.mask
    assert a.expected.mean() == pytest.approx(10.0)
    resid = a.counts[good] - a.expected[good]
    assert resid.var() == pytest.approx(10.0 + 1.5**2, rel=0.1)
    assert np.array_equal(a.counts[a.mask], s.counts[s.mask])


def test_rotate_centers_matches_numpy():
    a = np.zeros((5, 7))
    a[1, 5] = 1
    for k in range(4):
        r = np.rot90(a, k)
        got = d._rotate_centers(np.array([[1.0, 5.0]]), a.shape, k)[0]
        assert tuple(np.argwhere(r)[0]) == tuple(got.astype(int))


# --------------------------------------------------------------------------------------- SANS
@pytest.mark.parametrize("factor", [2, 4])
def test_sans_pair_rebin_conserves_and_counts(factor):
    p = sans_pair(0, "sphere", factor=factor, coarse_shape=(16, 24), total_counts=2e5)
    assert p.fine_expected.shape == (16 * factor, 24 * factor)
    assert p.coarse_expected.shape == p.coarse_counts.shape == p.qx_coarse.shape == (16, 24)
    assert p.coarse_expected.sum() == pytest.approx(2e5)
    assert p.fine_expected.sum() == pytest.approx(2e5)
    np.testing.assert_allclose(p.coarse_expected, rebin(p.fine_expected, factor))
    assert p.coarse_counts.sum() == pytest.approx(2e5, abs=5 * np.sqrt(2e5))
    assert np.allclose(p.qx_coarse[0], p.qx_fine[0].reshape(-1, factor).mean(axis=1))


def test_sans_anisotropic_is_not_radially_symmetric_and_isotropic_is():
    iso = sans_pair(1, "sphere", coarse_shape=(16, 16))
    np.testing.assert_allclose(iso.fine_expected, np.rot90(iso.fine_expected), rtol=1e-9)
    ani = sans_pair(1, "cylinder_oriented", coarse_shape=(16, 16), params={"phi": 30.0})
    diff = np.abs(ani.fine_expected - np.rot90(ani.fine_expected)).max()
    assert diff > 0.2 * ani.fine_expected.max()


def test_monodisperse_spheres_have_the_sharp_minima_the_polydisperse_kind_smears():
    # first zero of a sphere's form factor at qR = 4.49, next maximum at qR = 5.76 (R = 50 A)
    def dip(kind, params):
        p = sans_pair(0, kind, params={"radius": 50.0, **params}, factor=4, coarse_shape=(32, 32))
        q, i = np.hypot(p.qx_fine, p.qy_fine), p.fine_expected
        return i[(q > 0.07) & (q < 0.105)].min() / i[(q > 0.105) & (q < 0.14)].max()

    assert dip("sphere_monodisperse", {}) < 1e-3
    assert dip("sphere", {"radius_pd": 0.05}) > 0.1  # the least polydisperse of the "sphere" kind


def test_sans_params_override_and_reproducible():
    a = sans_pair(2, "sphere", params={"radius": 50.0})
    b = sans_pair(2, "sphere", params={"radius": 50.0})
    assert a.params["radius"] == 50.0
    assert np.array_equal(a.coarse_counts, b.coarse_counts)


# ------------------------------------------------------------------------------------ bad input
@pytest.mark.parametrize(
    "call, word",
    [
        (lambda: denoise_frame(0, "snow", (32, 32), 1.0), "kind='snow'"),
        (lambda: denoise_frame(0, "smooth", (32, 32), 0.0), "mean_counts=0.0"),
        (lambda: denoise_frame(0, "smooth", (32,), 1.0), "shape=(32,)"),
        (lambda: BraggRecipe(n_peaks=(5, 2)), "n_peaks"),
        (lambda: BraggRecipe(intensity=(10.0, 1.0)), "intensity=(10.0, 1.0)"),
        (lambda: BraggRecipe(count_scale=-1.0), "count_scale=-1.0"),
        (lambda: bragg_frame_2d(0, BraggRecipe(shape=(16, 16, 16), sigma=(0.8, 2.0))), "3D"),
        (lambda: bragg_volume_tof(0, BraggRecipe(shape=(64, 64))), "shape"),
        (lambda: BraggRecipe(shape=(16, 32, 32), tof_sigma=(0.7, 2.0), tof_decay=(1.0, 3.5)),
         "tof_decay"),
        (lambda: DetectorEffects("NoSuchDetector"), "NoSuchDetector"),
        (lambda: DetectorEffects(gain_rms=2.0), "gain_rms=2.0"),
        (lambda: sans_pair(0, "sphere", factor=3), "factor=3"),
        (lambda: sans_pair(0, "teapot"), "teapot"),
        (lambda: sans_pair(0, "sphere", total_counts=0), "total_counts=0"),
        (lambda: sans_pair(0, "sphere", params={"radiu": 3.0}), "radiu"),
        (lambda: rebin(np.zeros((5, 4))), "length 5"),
        (lambda: Augmentation(thin=(0.0, 1.0)), "thin"),
        (lambda: augment(0, denoise_frame(0, "smooth", (32, 32)), Augmentation(crop=(64, 8))),
         "crop=(64, 8)"),
    ],
)
def test_bad_input_raises_value_error_naming_it(call, word):
    with pytest.raises(ValueError, match=None) as info:
        call()
    assert word in str(info.value)


def test_rng_must_be_generator_or_seed():
    with pytest.raises(TypeError, match="rng"):
        denoise_frame("seed", "smooth")

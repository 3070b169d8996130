import numpy as np
import pytest

from models.errors import ModelError
from models.gp import GPConfig, LogLogGP, counts_to_log_rate


def _curve(q):
    return 1e4 * (1 + (q * 50) ** 2) ** -2 + 5.0


def test_log_rate_variance_is_inverse_counts():
    y, var = counts_to_log_rate(np.array([99.5, 0.0]), np.array([2.0, 1.0]))
    np.testing.assert_allclose(y, [np.log(50.0), np.log(0.5)])
    np.testing.assert_allclose(var, [0.01, 2.0])


def test_gp_interpolates_a_smooth_curve_within_its_band():
    rng = np.random.default_rng(1)
    q = np.geomspace(0.003, 0.5, 30)
    counts = rng.poisson(_curve(q) * 10.0)
    gp = LogLogGP((0.003, 0.5))
    gp.update(q, counts, np.full(q.size, 10.0))
    q_test = np.geomspace(0.004, 0.4, 50)
    mean, var = gp.predict(q_test)
    z = (mean - np.log(_curve(q_test))) / np.sqrt(var)  # rate = counts / 10 s
    # the truth lies inside +-3 sigma nearly everywhere, and the band is informative
    assert np.mean(np.abs(z) < 3) > 0.9
    assert np.median(np.sqrt(var)) < 0.2


def test_hyperparameters_refit_only_on_schedule_and_survive_state_round_trip():
    rng = np.random.default_rng(2)
    gp = LogLogGP((0.003, 0.5), GPConfig(refit_growth=2.0))
    q = np.geomspace(0.003, 0.5, 20)
    gp.update(q, rng.poisson(_curve(q)), np.ones(20))
    assert gp.n_fits == 1
    q2 = np.concatenate([q, np.geomspace(0.004, 0.45, 10)])
    gp.update(q2, rng.poisson(_curve(q2)), np.ones(30))
    assert gp.n_fits == 1  # 30 < 2 x 20: kept
    q3 = np.concatenate([q2, np.geomspace(0.0035, 0.48, 15)])
    gp.update(q3, rng.poisson(_curve(q3)), np.ones(45))
    assert gp.n_fits == 2
    clone = LogLogGP((0.003, 0.5), GPConfig(refit_growth=2.0))
    clone.load_state(gp.state())
    clone.update(q3, rng.poisson(_curve(q3)), np.ones(45))
    assert clone.n_fits == 2  # restored schedule: no refit needed
    for k, v in gp.hyperparameters(gp.model).items():
        np.testing.assert_allclose(clone.hyperparameters(clone.model)[k].numpy(), v.numpy())


def test_joint_posterior_matches_marginals_and_is_guarded():
    q = np.geomspace(0.003, 0.5, 12)
    gp = LogLogGP((0.003, 0.5), GPConfig(max_joint=64))
    gp.update(q, 100.0 + 10 * np.arange(12), np.ones(12))
    grid = np.geomspace(0.003, 0.5, 64)
    mean, cov = gp.joint(grid)
    m2, v2 = gp.predict(grid)
    np.testing.assert_allclose(mean, m2, rtol=1e-8)
    np.testing.assert_allclose(np.diag(cov), v2, rtol=1e-5)
    with pytest.raises(ModelError, match="max_joint"):
        gp.joint(np.geomspace(0.003, 0.5, 65))


def test_bad_inputs_are_named():
    with pytest.raises(ValueError, match="q_range"):
        LogLogGP((0.5, 0.003))
    gp = LogLogGP((0.003, 0.5))
    with pytest.raises(ModelError, match="no data"):
        gp.predict(np.array([0.1]))
    with pytest.raises(ModelError, match="2 distinct Q"):
        gp.update(np.array([0.1, 0.2, 0.1]), np.ones(3), np.ones(3))


def test_constant_counts_build_a_gp_without_warnings():
    gp = LogLogGP((0.003, 0.5))
    gp.update(np.geomspace(0.003, 0.5, 5), np.zeros(5), np.ones(5))
    mean, _ = gp.predict(np.array([0.05]))
    assert mean[0] == pytest.approx(np.log(0.5), abs=1e-6)


def test_millions_of_counts_keep_the_gp_well_conditioned():
    # a bright point counted for hours: the noise floor stands in for calibration error
    q = np.geomspace(0.003, 0.5, 8)
    gp = LogLogGP((0.003, 0.5))
    gp.update(q, 1e9 * q**-2, np.ones(8))  # would warn (filterwarnings=error) without the floor
    _, var = gp.predict(q)
    assert np.all(var > 0) and np.all(np.sqrt(var) < 0.01)  # the bright data pin it to <1%

"""Maps drawn by domains: the positions split where the values jump, each domain drawn alone."""

import numpy as np
import pytest

from models.domains import DomainMap, segment
from models.triangulation import Interpolant


def _blob(x):
    """A gentle slope plus a jump of 0.8 inside a wavy blob and of -0.4 past a tilted line."""
    phi = np.arctan2(x[:, 1] - 5, x[:, 0] - 4.5)
    inside = np.hypot(x[:, 0] - 4.5, x[:, 1] - 5) < 2.0 * (1 + 0.2 * np.sin(3 * phi))
    beyond = 0.3 * x[:, 0] + x[:, 1] > 8.5
    return 1 + 0.02 * x[:, 0] + 0.8 * inside - 0.4 * beyond, inside.astype(int) + 2 * beyond


def _samples(seed, n=200, noise=0.01):
    """Half uniform, half near the boundaries (as the mapping agent leaves them), with noise."""
    rng = np.random.default_rng(seed)
    P = rng.uniform(0, 10, (4 * n, 2))
    _, dom = _blob(P)
    near = np.zeros(len(P), bool)
    for shift in ((0.3, 0), (-0.3, 0), (0, 0.3), (0, -0.3)):
        near |= _blob(P + shift)[1] != dom
    P = np.vstack([P[~near][: n // 2], P[near][: n - n // 2]])
    f, dom = _blob(P)
    return P, f + noise * rng.normal(size=len(P)), dom


def _grid():
    g = np.linspace(0, 10, 80)
    return np.stack(np.meshgrid(g, g), -1).reshape(-1, 2)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_segment_finds_the_domains_the_values_jump_between(seed):
    P, f, dom = _samples(seed)
    labels = segment(P, f)
    # one label per true domain, a different one for each; a position alone in a sliver of
    # its domain (no two neighbours there) joins a neighbouring domain, so not all, but nearly
    assert labels.max() + 1 == len(np.unique(dom))
    majority = [np.bincount(labels[dom == d]).argmax() for d in np.unique(dom)]
    assert len(set(majority)) == len(majority)
    assert np.mean(labels == np.asarray(majority)[dom]) >= 0.98


def test_a_smooth_map_is_one_domain():
    rng = np.random.default_rng(3)
    P = rng.uniform(0, 10, (200, 2))
    f = np.sin(P[:, 0] / 2) + 0.1 * P[:, 1] + 0.01 * rng.normal(size=200)
    assert segment(P, f).max() == 0
    assert DomainMap.build(P, f) is None


def test_a_lone_outlier_joins_a_neighbour_rather_than_making_a_domain():
    P, f, dom = _samples(4)
    f = f.copy()
    i = int(np.flatnonzero(dom == 0)[5])
    f[i] += 5.0  # a glitch: far above every neighbour
    labels = segment(P, f)
    assert labels.max() + 1 == len(np.unique(dom))
    assert np.sum(labels == labels[i]) >= 3


def test_drawn_by_domains_is_closer_to_the_truth_than_the_triangulation():
    T = _grid()
    truth, dom = _blob(T)
    far = np.ones(len(T), bool)  # 0.4 or more from a boundary
    for shift in ((0.4, 0), (-0.4, 0), (0, 0.4), (0, -0.4)):
        far &= _blob(T + shift)[1] == dom
    ratios = []
    for seed in (0, 1, 2):
        P, f, _ = _samples(seed)
        by_domains = DomainMap.build(P, f)
        assert by_domains is not None and by_domains.n_domains == 3
        drawn = by_domains(T)
        rmse_tri = np.sqrt(np.mean((Interpolant(P, f)(T) - truth) ** 2))
        ratios.append(np.sqrt(np.mean((drawn - truth) ** 2)) / rmse_tri)
        # away from the boundaries, each domain's own values: no jump leaks in (but for the
        # odd patch of a domain with no position in it)
        assert np.percentile(np.abs(drawn[far] - truth[far]), 99) < 0.1
    assert max(ratios) < 1.0 and np.mean(ratios) < 0.95, ratios


def test_a_position_measured_again_counts_once():
    P, f, dom = _samples(0)
    T = _grid()
    again = np.vstack([P, P[:10]])  # ten positions measured a second time, with new noise
    f_again = np.concatenate([f, f[:10] + 0.01 * np.random.default_rng(1).normal(size=10)])
    labels = segment(again, f_again)
    assert labels.max() + 1 == len(np.unique(dom))
    np.testing.assert_array_equal(labels[len(P):], labels[:10])  # the same position, the same domain
    by_domains = DomainMap.build(again, f_again)
    assert by_domains.n_domains == len(np.unique(dom))
    np.testing.assert_allclose(by_domains(T), DomainMap.build(P, f)(T), atol=0.02)


def test_units_do_not_change_the_map():
    P, f, _ = _samples(5)
    T = _grid()
    mm = DomainMap.build(P, f)(T)
    um = DomainMap.build(P * 1000.0, f)(T * 1000.0)
    np.testing.assert_allclose(um, mm, atol=1e-6)


def test_bad_input_is_named():
    with pytest.raises(ValueError, match="n x 2 positions and n values"):
        segment(np.zeros((5, 3)), np.zeros(5))
    with pytest.raises(ValueError, match="n x 2 positions and n values"):
        segment(np.zeros((5, 2)), np.zeros(4))
    P, f, _ = _samples(0)
    with pytest.raises(ValueError, match="at least two domains"):
        DomainMap(P, f, np.zeros(len(P), int))
    with pytest.raises(ValueError, match="n labels"):
        DomainMap(P, f, np.zeros(len(P) - 1, int))


def test_a_domain_of_a_few_positions_nearly_on_a_line_stays_within_its_values():
    # a thin-plate spline through three almost collinear positions has a huge slope across
    # them; away from them it would reach any value (1e10 once, on a film's orientation map)
    rng = np.random.default_rng(6)
    P = np.vstack([rng.uniform(0, 10, (60, 2)), [[8.0, 5.0], [8.5, 5.0 + 1e-7], [9.0, 5.0]]])
    f = np.concatenate([1.0 + 0.01 * rng.normal(size=60), [2.0, 2.3, 2.1]])
    labels = np.r_[np.zeros(60, int), np.ones(3, int)]
    drawn = DomainMap(P, f, labels)(_grid())
    assert np.all(np.isfinite(drawn))
    assert drawn.min() >= f.min() - 0.25 * np.ptp(f) and drawn.max() <= f.max() + 0.25 * np.ptp(f)

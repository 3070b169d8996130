"""The detector demos end to end: RunEngine -> SimFrameDetector -> DetectorAnalysisAgent -> report."""

from __future__ import annotations

import json
from types import SimpleNamespace

import numpy as np
import pytest
from typer.testing import CliRunner

from agents.cli import app
from agents.demo_detector import run_detector_demo
from agents.detector_eval import (
    matched_intensities,
    oracle_intensities,
    peak_rows,
    r_by_i_over_sigma,
)
from models.nets import PeakUNet, SuperResolver
from models.registry import WeightsRecord, save_weights


@pytest.fixture
def weights(tmp_path):
    b = save_weights(PeakUNet(dims=2, width=4, depth=2), tmp_path / "w",
                     WeightsRecord("bragg", "bragg-peak-unet", {"dims": 2, "width": 4, "depth": 2}))
    s = save_weights(SuperResolver(factor=2, width=4, depth=2), tmp_path / "w",
                     WeightsRecord("sans-sr-x2", "sans-super-resolver", {"factor": 2, "width": 4, "depth": 2}))
    return b.with_suffix(""), s.with_suffix("")


def test_bragg_demo_reports_masks_and_intensities(tmp_path, weights):
    summary = run_detector_demo(tmp_path / "out", analysis="bragg", frames=3, weights=str(weights[0]), progress=False)
    assert (tmp_path / "out" / "bragg.png").stat().st_size > 10_000
    saved = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert saved["frames"] == 3 and saved["agent"]["frames_out"] == 3
    assert 0 <= summary["iou_ml"] <= 1 and 0 <= summary["iou_threshold_components"] <= 1
    assert summary["r_threshold_components"] < 1.0  # the classical method finds the bright peaks
    # the same peaks by signal-to-noise, with a picture of it
    assert (tmp_path / "out" / "bragg_r.png").stat().st_size > 10_000
    bins = summary["r_by_i_over_sigma"]
    assert bins and set(bins) <= {"0-5", "5-10", "10-30", "30-inf"}
    assert all(r["n_peaks"] >= 1 and r["ml"] >= 0 and r["threshold"] >= 0 for r in bins.values())
    assert summary["ml_integration"] == "mask"


def test_bragg_demo_with_a_curve_of_growth_integrates_wider(tmp_path):
    # the shipped U-Net, so there are peaks to integrate; the same seeded frames either way
    mask_only = run_detector_demo(tmp_path / "a", analysis="bragg", frames=3, progress=False)
    grown = run_detector_demo(tmp_path / "b", analysis="bragg", frames=3, grow_sigma=2.0, progress=False)
    assert grown["ml_integration"] == "mask + curve of growth (2 sigma)"
    assert grown["iou_ml"] == mask_only["iou_ml"]  # the same masks,
    assert grown["r_ml"] != mask_only["r_ml"]  # summed over other apertures
    assert grown["r_threshold_components"] == mask_only["r_threshold_components"]


def test_r_by_i_over_sigma_bins_the_peaks():
    peaks = [{"i_true": 10.0, "i_over_sigma": 2.0, "a": 5.0}, {"i_true": 30.0, "i_over_sigma": 4.9, "a": 30.0},
             {"i_true": 100.0, "i_over_sigma": 40.0, "a": 90.0}]
    assert r_by_i_over_sigma(peaks, ("a",)) == {"0-5": {"a": 0.125, "n_peaks": 2},
                                                "30-inf": {"a": 0.1, "n_peaks": 1}}


def test_sans_demo_compares_with_bicubic(tmp_path, weights):
    summary = run_detector_demo(tmp_path / "out", analysis="sans-sr", frames=2, factor=2, weights=str(weights[1]),
                                progress=False)
    assert (tmp_path / "out" / "sans-sr.png").stat().st_size > 10_000
    assert summary["factor"] == 2 and summary["agent"]["frames_out"] == 2
    assert summary["log_psnr_bicubic"] > 5


def test_demo_cli_help_and_bad_factor():
    runner = CliRunner()
    assert runner.invoke(app, ["demo", "bragg", "--help"]).exit_code == 0
    result = runner.invoke(app, ["demo", "sans-sr", "--factor", "3"])
    assert result.exit_code != 0 and "2 or 4" in result.output


def test_found_peaks_stand_for_one_true_peak_each():
    found = SimpleNamespace(centroids=np.array([[10.0, 10.0], [30.0, 30.0], [50.0, 50.0]]),
                            intensity=np.array([100.0, 7.0, np.nan]))
    true = np.array([[11.0, 10.0], [10.0, 12.0], [31.0, 30.0], [50.0, 50.0], [80.0, 80.0]])
    # the strong peak goes to its nearer true centre only; the weak neighbour is a miss, as is a
    # centre whose found peak has no finite intensity, and one with nothing within 4 px
    np.testing.assert_array_equal(matched_intensities(found, true), [100.0, 0.0, 7.0, 0.0, 0.0])
    assert matched_intensities(SimpleNamespace(centroids=None, intensity=np.array([])), true).tolist() == [0.0] * 5


def test_peak_rows_leave_out_peaks_off_the_frame_and_count_nan_as_nothing_found():
    rows = peak_rows(np.array([50.0, 20.0, 80.0]), np.array([10.0, 0.0, 4.0]),
                     {"a": np.array([40.0, 5.0, np.nan])})
    assert rows == [{"i_true": 50.0, "i_over_sigma": 5.0, "a": 40.0}, {"i_true": 80.0, "i_over_sigma": 20.0, "a": 0.0}]


def test_the_oracle_fits_each_peaks_true_profile_without_bias_and_drops_what_is_under_3_sigma():
    """Two peaks on a flat background, 2,000 noise draws: the bright one's estimate is unbiased
    with the sigma the profile fit predicts (a fit without the Poisson weights is 9% wider); the
    faint one (about 1 of its sigmas) is reported only where the noise lifts it to 3 sigmas (a
    few percent of draws), its bright neighbour's counts not taken for its own."""
    yy, xx = np.mgrid[:32, :32]
    def peak(i, r, c, w):
        g = np.exp(-((yy - r) ** 2 + (xx - c) ** 2) / (2 * w**2))
        return i * g / g.sum()
    peaks = np.stack([peak(400.0, 12, 12, 1.5), peak(12.0, 16, 17, 2.0)])
    expected = 2.0 + peaks.sum(axis=0)
    mask = np.zeros(expected.shape, bool)
    mask[:, 30:] = True
    good = ~mask
    fisher = [np.sum((p[good] / p[good].sum()) ** 2 / expected[good]) for p in peaks]
    assert 0.8 < 12.0 * np.sqrt(fisher[1]) < 1.4  # the faint one is about 1 sigma
    rng = np.random.default_rng(5)
    est = np.array([oracle_intensities(rng.poisson(expected).astype(float), expected, peaks, mask)
                    for _ in range(2000)])
    sd = 1 / np.sqrt(fisher[0])
    assert abs(est[:, 0].mean() - 400.0) < 4 * sd / np.sqrt(2000)
    assert 0.95 < est[:, 0].std() / sd < 1.05
    assert 0.005 < np.mean(est[:, 1] != 0) < 0.06 and np.all(est[:, 1][est[:, 1] != 0] >= 3 / np.sqrt(fisher[1]))
    # a bright peak in the masked columns but for its tail: not found, however its tail's noise falls
    hidden = np.stack([*peaks, peak(400.0, 20, 31, 1.0)])
    expected = 2.0 + hidden.sum(axis=0)
    got = np.array([oracle_intensities(rng.poisson(expected).astype(float), expected, hidden, mask)
                    for _ in range(200)])
    assert np.all(got[:, 2] == 0) and abs(got[:, 0].mean() - 400.0) < 4 * sd / np.sqrt(200)

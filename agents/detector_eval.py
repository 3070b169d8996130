"""Held-out evaluation of the detector networks against the classical method each replaces.

Used at the end of ``beampilot train`` (small, quick) and by ``benchmarks/detector_ml.py``
(larger). Held-out means other seeds than training and, for denoising and super-resolution,
other sample kinds (``DENOISE_HELD_OUT_KINDS``, ``SANS_HELD_OUT_KINDS``).

* denoise: PSNR and SSIM of the expected counts, outside the detector mask, at mean 0.1, 1 and
  10 counts per pixel; the network against Anscombe + Gaussian (width by SURE).
* bragg, bragg-tof: IoU and Dice of the predicted peak mask (sigmoid > 0.5) against the true
  support over the pixels the detector measures (2D frames; 32^3 time-of-flight volumes), the
  network against threshold + connected components.
* sans-sr: PSNR of log-intensity and SSIM of the fine pattern, the network against bicubic
  interpolation (in log space).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from models import classical, metrics
from models.nets import denoiser_input, infer
from simulators import detector as det

__all__ = ["denoise", "evaluate", "log_psnr", "matched_intensities", "oracle_intensities", "predict"]

LEVELS = (0.1, 1.0, 10.0)


def predict(model: torch.nn.Module, x: np.ndarray) -> np.ndarray:
    """The network's output for one frame, on the CPU, as float64."""
    out, _ = infer(model, torch.as_tensor(x[None, None].astype(np.float32)), device=torch.device("cpu"))
    return out[0, 0].numpy().astype(np.float64)


def denoise(model: torch.nn.Module, readings: np.ndarray, mask: np.ndarray | None, read_noise: float) -> np.ndarray:
    """The denoised frame, for one frame of an integrating (``read_noise`` > 0) or photon-counting
    detector: a denoiser told the read noise gets the raw readings and it, as the detector agent
    gives them (:func:`models.nets.denoiser_input`); one that is not gets the readings floored at
    0 (read noise can make a reading negative; the agent passes them as they are, and such a
    network floors them inside, but its frame level is then taken over the unfloored readings)."""
    told = getattr(model, "read_noise", False)
    x = readings if told else np.maximum(readings, 0.0)
    x = x if mask is None else np.where(mask, 0.0, x)
    batch = denoiser_input(model, torch.as_tensor(x[None, None].astype(np.float32)), read_noise)
    out, _ = infer(model, batch, device=torch.device("cpu"))
    return out[0, 0].numpy().astype(np.float64)


def super_resolve(model: torch.nn.Module, coarse: np.ndarray) -> np.ndarray:
    """What the detector agent publishes for a SANS pattern (beam at the detector centre): the
    network's pattern scaled to the measured ring sums (:func:`models.nets.ring_consistent`)."""
    from models.nets import ring_consistent

    return ring_consistent(predict(model, coarse), coarse, int(model.factor))


def matched_intensities(found: Any, centers: np.ndarray, radius: float = 4.0) -> np.ndarray:
    """For each true peak centre, the intensity of the found peak assigned to it: found peaks and
    true centres are paired one to one (least total distance, pairs at most ``radius`` pixels
    apart), so a strong found peak cannot also stand for a weak true neighbour. 0 where a centre
    gets no found peak or its intensity is not finite."""
    from scipy.optimize import linear_sum_assignment

    out = np.zeros(len(centers))
    if found.centroids is None or len(found.intensity) == 0 or len(centers) == 0:
        return out
    cents = np.asarray(found.centroids, dtype=float)
    true = np.asarray(centers, dtype=float)
    d = np.linalg.norm(true[:, None, :] - cents[None, :, :], axis=2)
    rows, cols = linear_sum_assignment(np.where(d <= radius, d, 1e6))  # far pairs only if nothing else
    for i, j in zip(rows, cols, strict=True):
        if d[i, j] <= radius and np.isfinite(found.intensity[j]):
            out[i] = float(found.intensity[j])
    return out


def oracle_intensities(counts: np.ndarray, expected: np.ndarray, peak_expected: np.ndarray,
                       mask: np.ndarray | None = None, detect_sigma: float = 3.0,
                       min_visible: float = 0.5) -> np.ndarray:
    """A reference, not a method: each peak's intensity as an estimator told its true place,
    profile and everything under it would give it, and 0 where even that estimate is not
    ``detect_sigma`` times its own sigma.

    For peak ``j`` with expected image ``mu_j`` (``peak_expected[j]``), ``I_j = sum(mu_j)`` and
    profile ``p = mu_j / I_j``, the rest of the frame ``B = expected - mu_j`` is known; the
    estimate is the minimum-variance linear one (profile fitting with Poisson weights),
    ``I = sum(w (x - B)) / sum(w p)`` with ``w = p / expected``, whose sigma is
    ``1 / sqrt(sum(p^2 / expected))``, over the pixels not masked. A real peak finder must also
    find where the peaks are: a frame of 128 x 128 holds on the order of 10^3 places a peak could
    be, so about 3 sigma is where it would find one false peak a frame; the default
    ``detect_sigma`` is that. What this reference does not report counts its whole intensity
    into ``R``, as a finder's misses do. It is not a strict bound on a finder's ``R``: a finder's
    false peak within the pairing radius of a weak true one is paired with it
    (:func:`matched_intensities`) and can land nearer its intensity than 0.

    Parameters
    ----------
    counts : ndarray
        The frame's counts (any dimension).
    expected : ndarray
        Its expected counts (peaks and background), of ``counts``' shape.
    peak_expected : ndarray
        One expected image per peak, ``(n_peaks, *counts.shape)``.
    mask : ndarray of bool, optional
        ``True`` where a pixel is left out.
    detect_sigma : float
        Estimates below this many sigmas are reported as 0 (not found).
    min_visible : float
        Peaks with less of their intensity than this on unmasked pixels are reported as 0: no
        finder sees a peak in a module gap (and the fit would scale one pixel's noise up to it).

    Returns
    -------
    ndarray
        One intensity per peak (0: not found).
    """
    good = np.ones(counts.shape, bool) if mask is None else ~np.asarray(mask, bool)
    x, v = np.asarray(counts, float)[good], np.maximum(np.asarray(expected, float)[good], 1e-6)
    out = np.zeros(len(peak_expected))
    for j, mu in enumerate(peak_expected):
        total = float(mu.sum())
        if total <= 0:
            continue
        prof = np.asarray(mu, float)[good] / total
        fisher = float(np.sum(prof**2 / v))
        if fisher <= 0 or prof.sum() < min_visible:
            continue  # a peak mostly under the mask: one noisy pixel would stand for all of it
        estimate = float(np.sum(prof / v * (x - (v - prof * total)))) / fisher
        out[j] = estimate if estimate * np.sqrt(fisher) >= detect_sigma else 0.0
    return out


def peak_rows(true_intensity: np.ndarray, sigma_intensity: np.ndarray,
              estimates: dict[str, np.ndarray]) -> list[dict[str, float]]:
    """One row per true peak of a frame for :func:`r_by_i_over_sigma`: ``i_true``,
    ``i_over_sigma`` and each method's estimate (0 where it is not finite: nothing found).
    Peaks with no support on the frame (``sigma`` 0: cut off by the edge) have nothing to find
    and are left out."""
    rows = []
    for j, (it, sig) in enumerate(zip(true_intensity, sigma_intensity, strict=True)):
        if sig > 0:
            rows.append({"i_true": float(it), "i_over_sigma": float(it / sig)}
                        | {m: float(v[j]) if np.isfinite(v[j]) else 0.0 for m, v in estimates.items()})
    return rows


#: Bins of true ``I / sigma(I)`` in which integrated intensities are compared.
I_OVER_SIGMA_BINS: tuple[tuple[float, float], ...] = ((0.0, 5.0), (5.0, 10.0), (10.0, 30.0), (30.0, np.inf))


def r_by_i_over_sigma(peaks: list[dict[str, float]], methods: tuple[str, ...]) -> dict[str, dict[str, float]]:
    """``R = sum|I - I_true| / sum I_true`` of each method, by bin of true ``I / sigma``.

    ``peaks`` holds one dict per true peak: ``i_true``, ``i_over_sigma`` and each method's
    estimate (0 where the method found nothing there). Keys ``"0-5"``, ``"5-10"``, ... (empty
    bins left out), each with the methods' ``R`` and ``n_peaks``."""
    out: dict[str, dict[str, float]] = {}
    for lo, hi in I_OVER_SIGMA_BINS:
        sel = [p for p in peaks if lo <= p["i_over_sigma"] < hi]
        if not sel:
            continue
        truth = np.array([p["i_true"] for p in sel])
        out[f"{lo:g}-{hi:g}"] = {m: float(np.sum(np.abs(np.array([p[m] for p in sel]) - truth)) / truth.sum())
                                 for m in methods} | {"n_peaks": len(sel)}
    return out


def log_psnr(estimate: np.ndarray, truth: np.ndarray) -> float:
    """PSNR of log10 intensity (the dynamic range of a SANS pattern spans decades)."""
    floor = max(float(truth[truth > 0].min()) * 0.1, 1e-12)
    return metrics.psnr(np.log10(np.maximum(estimate, floor)), np.log10(np.maximum(truth, floor)))


def evaluate(task: str, model: torch.nn.Module, *, seed: int, n: int = 24, factor: int | None = None,
             shape: tuple[int, int] = (64, 64)) -> dict[str, Any]:
    """Mean figures over ``n`` held-out samples per condition (see the module docstring)."""
    rng = np.random.default_rng(seed)
    if task == "denoise":
        out: dict[str, Any] = {}
        for level in LEVELS:
            ml, gauss = [], []
            for _ in range(n):
                kind = det.DENOISE_HELD_OUT_KINDS[int(rng.integers(len(det.DENOISE_HELD_OUT_KINDS)))]
                s = det.denoise_frame(rng, kind, shape, level, effects=det.random_effects(rng))
                # both told an integrating detector's read noise (the classical method through
                # the generalized Anscombe transform), both given the readings, negative ones too
                raw = np.where(s.mask, 0.0, s.counts)
                ml.append(metrics.psnr(denoise(model, s.counts, s.mask, s.read_noise), s.expected, mask=s.mask))
                gauss.append(metrics.psnr(classical.anscombe_gaussian(raw, mask=s.mask, read_noise=s.read_noise),
                                          s.expected, mask=s.mask))
            out[f"{level:g}"] = {"psnr_ml": float(np.mean(ml)), "psnr_anscombe_gaussian": float(np.mean(gauss)),
                                 "gain_db": float(np.mean(ml) - np.mean(gauss))}
        return {"held_out_kinds": list(det.DENOISE_HELD_OUT_KINDS), "by_mean_counts": out, "n_per_level": n}
    if task in ("bragg", "bragg-tof"):
        ml_iou, th_iou, ml_dice = [], [], []
        for _ in range(n):
            scale = float(np.exp(rng.uniform(-3, 1.1)))
            effects = det.random_effects(rng, integrating=False)
            if task == "bragg":
                s = det.bragg_frame_2d(rng, det.BraggRecipe(shape=shape, n_peaks=(1, 6), count_scale=scale),
                                       effects=effects)
            else:
                s = det.bragg_volume_tof(rng, det.BraggRecipe(shape=(32, 32, 32), sigma=(0.8, 2.0), n_peaks=(1, 6),
                                                              count_scale=scale), effects=effects)
            x = np.where(s.mask, 0.0, s.counts)
            pred = predict(model, x) > 0.0
            th_mask, _ = classical.threshold_components(x, mask=s.mask)
            ml_iou.append(metrics.iou(pred, s.support, ~s.mask))
            ml_dice.append(metrics.dice(pred, s.support, ~s.mask))
            th_iou.append(metrics.iou(th_mask, s.support, ~s.mask))
        return {"iou_ml": float(np.mean(ml_iou)), "dice_ml": float(np.mean(ml_dice)),
                "iou_threshold_components": float(np.mean(th_iou)), "n": n}
    if task == "sans-sr":
        f = factor or 4
        ml, bic = [], []
        for _ in range(n):
            kind = det.SANS_HELD_OUT_KINDS[int(rng.integers(len(det.SANS_HELD_OUT_KINDS)))]
            p = det.sans_pair(rng, kind, factor=f, coarse_shape=(32, 32),
                              total_counts=float(np.exp(rng.uniform(np.log(1e5), np.log(1e6)))))
            truth = p.fine_expected
            ml.append(log_psnr(super_resolve(model, p.coarse_counts), truth))
            bic.append(log_psnr(classical.bicubic_upsample(p.coarse_counts, f, space="log"), truth))
        return {"held_out_kinds": list(det.SANS_HELD_OUT_KINDS), "factor": f, "log_psnr_ml": float(np.mean(ml)),
                "log_psnr_bicubic": float(np.mean(bic)), "gain_db": float(np.mean(ml) - np.mean(bic)), "n": n}
    raise ValueError(f"unknown task {task!r}; choose denoise, bragg, bragg-tof or sans-sr")

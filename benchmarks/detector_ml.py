"""Detector ML against the classical methods: denoising, Bragg-peak masks and integration, SANS SR, speed.

Every quality figure is measured on held-out simulated data: seeds the training never used
(``EVAL_SEED`` here; training used seeds 0-4 and evaluated on 10000-10004, each weights' ``.json``
says which) and, for denoising and super-resolution, sample kinds held out of training
(``DENOISE_HELD_OUT_KINDS``: speckle; ``SANS_HELD_OUT_KINDS``: core-shell sphere and oriented
core-shell cylinder). The networks are the weights shipped in ``models/weights`` (or
``--weights DIR``).

* **Denoising** at mean 0.1, 1 and 10 counts per pixel (``--n-denoise`` frames of 128 x 128 per
  level, random photon-counting or integrating detector effects, detector mask excluded): PSNR
  and SSIM against the expected counts for the network, Anscombe + Gaussian (width by SURE) and
  Anscombe + BM3D (exact unbiased inverse; on an integrating detector the generalized Anscombe
  transform with the detector's read noise: with the plain transform BM3D takes read noise for
  signal, and on probe frames of integrating speckle at 0.1 counts per pixel it measured 8.3 dB
  below the network, with the generalized one 1.0 dB above it). The network is told the read
  noise too when its weights take it (``read_noise`` in their architecture; the detector agent's
  ``read_noise`` setting), and then sees the raw readings as BM3D does; one that does not take
  it gets the readings floored at 0. ``denoise_psnr_gain_db`` is the network's gain over the best classical method at
  each level; ``by_detector`` splits each level's frames into photon-counting (module gaps, no
  read noise) and integrating (read noise) detectors, the network's and BM3D's PSNR side by
  side. Anscombe + Gaussian takes the generalized transform too (with the plain one on readings
  floored at 0, as before stop 29, it was 4-16 dB lower on integrating probe frames). The
  integrated-intensity bias after
  denoising:
  ``--n-bias`` Bragg frames are denoised and every peak is summed over its true support, against
  the same sum of the expected counts (``sum(est - truth) / sum(truth)`` over all peaks; the raw
  counts' figure shows the sampling noise of the estimate, as they are unbiased). Side by side,
  not in the headline: the network averaged over each frame's 8 mirror images (``ml_mirror``,
  ``denoise_psnr_gain_db_mirror_average``; ``models.nets.mirror_mean``, off by default for the
  denoiser because it costs 8 passes a frame).
* **Bragg peaks** (``--n-bragg`` frames of 128 x 128 across the whole signal-to-noise range):
  IoU and Dice of the U-Net's mask and of threshold + connected components against the true
  support, over the pixels the detector measures (its module gaps and dead pixels read 0 and
  are left out, as the intensity bias leaves them out; ``iou_all_pixels`` counts them too;
  ``iou.ml_mirror``: the U-Net averaged over each frame's mirror images, off by default);
  intensities from the U-Net's mask (``integrate_in_mask`` as the agent runs it by default:
  touching peaks cut apart along the U-Net's logits, ``models.classical.split_peaks``; and, as
  ``ml_aperture``, each also summed over a curve-of-growth aperture, ``grow_sigma=2``), sphere
  and ellipsoid summation (at the true centres: an advantage to them) and threshold +
  components, with ``R = sum|I_est - I_true| / sum I_true`` binned by the true I/sigma (peaks
  with no support on the frame left out). Found peaks of the mask methods are paired one to one with the true
  centres (within 4 px; :func:`agents.detector_eval.matched_intensities`); a peak a method does
  not find counts with I_est = 0. ``bragg_error_ratio_low_snr`` is the U-Net's R at I/sigma < 5
  divided by the best classical method's; ``bragg_error_ratio_low_snr_oracle`` the same for a
  reference, not a method (``oracle``: each peak integrated by profile fitting at its true place
  with its true profile and background, reported only at >= 3 of its sigmas, about where a peak
  finder meets one false peak a frame; :func:`agents.detector_eval.oracle_intensities`): what
  knowing every peak's place and shape would give. The same again in 3D (``bragg_tof``, ``--n-bragg-tof``
  time-of-flight volumes of 32 x 32 x 32 with the moderator tail, the ``bragg-tof`` weights):
  ``bragg_tof_iou``, ``bragg_tof_error_ratio_low_snr`` (the setting of Sullivan et al. 2019).
* **SANS super-resolution** at 2x and 4x (``--n-sr`` patterns, 32 x 32 coarse, 10^5-10^6 counts):
  PSNR of log10 intensity and SSIM against the fine expected pattern, network against bicubic
  (in log space); and the reduced chi-square of the azimuthally averaged I(Q) of each estimate
  against the truth, with the truth's Poisson variance at the fine pixel level.
* **Throughput** on this machine's CPU (torch threads = cores): frames per second and p99
  latency of denoising, of masking, and of the two in turn, one frame at a time, at 256 x 256
  and 512 x 512 (``cpu_fps_512_denoise_and_mask`` is the two at 512 x 512), in interleaved
  rounds of at least a second each (median of the rounds; p99 over all their frames). The
  agent's own path, side by side with one forward call per batch (what inference did before it
  split batches on the CPU): ``agent_batch8_512_denoise_and_mask`` (512 x 512 frames arriving in
  batches of the agent's default ``max_batch``) and ``agent_single_tof_32`` (one 32^3 volume at
  a time). And ``fused_512_denoise_and_mask``: one 512 x 512 frame at a time with the ReLU
  networks' fused oneDNN inference against the same networks unfused
  (``models.nets.fused_inference``). ``agents_end_to_end_512``: the same through the detector
  agents themselves (a denoising and a Bragg agent told every event of a run of 512 x 512 frames
  with 30-60 peaks, publishing their derived runs: network, peak integration and documents
  inside the timing), the same with the frames in an HDF5 file named by stream documents (as
  an ophyd-async detector writes them; read back by the agents, ``denoise_and_bragg_fps_hdf5``),
  and the Bragg agent alone with and without cutting touching peaks apart
  (:func:`agents_end_to_end`). ``peaks_to_zarr``: a frame's 45 peaks stored in a zarr store as
  one event page (as the Bragg agent publishes them) against one event per peak
  (:func:`peaks_to_zarr`). ``throughput.super_resolution``: super-resolved patterns per second
  and p99 latency at 256 x 256 and 512 x 512 output, 2x and 4x, with the shipped mirror average
  and with one pass (:func:`sr_throughput`). ``gpu_fps_1024``: denoising + masking of 1024 x 1024 frames in
  batches of 32 with bf16 autocast, when CUDA is present; ``null`` otherwise. (The frames travel
  host to device inside the timing.)

Prints one JSON object on stdout; progress on stderr.

    python benchmarks/detector_ml.py
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Any

import numpy as np
import torch

EVAL_SEED = 20_261_125
LEVELS = (0.1, 1.0, 10.0)


def _net(model: torch.nn.Module, x: np.ndarray, *, mirrored: bool | None = None, mask: np.ndarray | None = None,
         read_noise: float = 0.0) -> np.ndarray:
    """The network's output for one frame of readings ``x``, as the detector agent makes it
    (``agents.detector_eval.denoise`` for the denoiser: told ``read_noise`` if it takes it);
    ``mirrored`` True / False: with / without the mean over the frame's mirror images
    (``models.nets.mirror_mean``), None: the network's default."""
    from agents.detector_eval import denoise, predict
    from models.nets import PoissonDenoiser

    def run() -> np.ndarray:
        if isinstance(model, PoissonDenoiser):
            return denoise(model, x, mask, read_noise)
        return predict(model, x)

    if mirrored is None:
        return run()
    default = model.symmetric_average
    model.symmetric_average = mirrored
    try:
        return run()
    finally:
        model.symmetric_average = default


def denoising(models: dict[str, Any], n: int, n_bias: int, bar: Any) -> dict[str, Any]:
    from models import classical, metrics
    from simulators import detector as det

    rng = np.random.default_rng(EVAL_SEED)
    model = models["denoise"]
    out: dict[str, Any] = {}
    t_ml, t_bm3d = [], []
    for level in LEVELS:
        rows: dict[str, list[float]] = {f"{m}_{k}": [] for m in ("ml", "ml_mirror", "gaussian", "bm3d")
                                        for k in ("psnr", "ssim")}
        by_detector: dict[str, dict[str, list[float]]] = {}
        for _ in range(n):
            kind = det.DENOISE_HELD_OUT_KINDS[int(rng.integers(len(det.DENOISE_HELD_OUT_KINDS)))]
            effects = det.random_effects(rng)
            s = det.denoise_frame(rng, kind, (128, 128), level, effects=effects)
            raw = np.where(s.mask, 0.0, s.counts)
            # the network and both classical methods (the generalized Anscombe transform) are told
            # the detector's read noise and see the readings as they are, negative ones included
            t0 = time.perf_counter()
            est = {"ml": _net(model, raw, mask=s.mask, read_noise=effects.read_noise)}
            t_ml.append(time.perf_counter() - t0)
            est["ml_mirror"] = _net(model, raw, mirrored=True, mask=s.mask, read_noise=effects.read_noise)
            est["gaussian"] = classical.anscombe_gaussian(raw, mask=s.mask, read_noise=effects.read_noise)
            t0 = time.perf_counter()
            est["bm3d"] = classical.anscombe_bm3d(raw, mask=s.mask, read_noise=effects.read_noise)
            t_bm3d.append(time.perf_counter() - t0)
            split = by_detector.setdefault("photon_counting" if effects.detector else "integrating",
                                           {"ml_psnr": [], "bm3d_psnr": []})
            for m, e in est.items():
                rows[f"{m}_psnr"].append(metrics.psnr(e, s.expected, mask=s.mask))
                rows[f"{m}_ssim"].append(metrics.ssim(e, s.expected, mask=s.mask))
                if m in ("ml", "bm3d"):
                    split[f"{m}_psnr"].append(rows[f"{m}_psnr"][-1])
            bar.update()
        out[f"{level:g}"] = {k: float(np.mean(v)) for k, v in rows.items()}
        out[f"{level:g}"]["by_detector"] = {
            d: {"n_frames": len(v["ml_psnr"]), "ml_psnr": float(np.mean(v["ml_psnr"])),
                "bm3d_psnr": float(np.mean(v["bm3d_psnr"])),
                "gain_db": float(np.mean(v["ml_psnr"]) - np.mean(v["bm3d_psnr"]))}
            for d, v in sorted(by_detector.items())}
    gains = {k: v["ml_psnr"] - max(v["gaussian_psnr"], v["bm3d_psnr"]) for k, v in out.items()}
    mirror = {k: v["ml_mirror_psnr"] - max(v["gaussian_psnr"], v["bm3d_psnr"]) for k, v in out.items()}
    bias = _intensity_bias(model, n_bias, rng)
    return {"by_mean_counts": out, "denoise_psnr_gain_db": gains, "denoise_psnr_gain_db_mirror_average": mirror,
            "speedup_over_bm3d_128": float(np.median(t_bm3d) / np.median(t_ml)),
            "integrated_intensity_bias": bias}


def _intensity_bias(model: torch.nn.Module, n: int, rng: np.random.Generator) -> dict[str, float]:
    from models import classical
    from simulators import detector as det

    sums = {"ml": 0.0, "raw": 0.0, "bm3d": 0.0, "truth": 0.0}
    for _ in range(n):
        recipe = det.BraggRecipe(shape=(128, 128), n_peaks=(3, 10), count_scale=float(np.exp(rng.uniform(-2, 1))))
        s = det.bragg_frame_2d(rng, recipe, effects=det.random_effects(rng, integrating=False))
        x = np.where(s.mask, 0.0, s.counts)
        support = s.support & ~s.mask
        for name, est in (("ml", _net(model, x, mask=s.mask)), ("raw", x), ("bm3d", classical.anscombe_bm3d(x, mask=s.mask))):
            sums[name] += float(est[support].sum())
        sums["truth"] += float(s.expected[support].sum())
    out = {k: (sums[k] - sums["truth"]) / sums["truth"] for k in ("ml", "raw", "bm3d")}
    out["n_frames"] = n
    return out


def bragg(models: dict[str, Any], n: int, bar: Any, *, tof: bool = False) -> dict[str, Any]:
    """2D frames of 128 x 128 (``tof=False``, the ``bragg`` weights) or 3D time-of-flight volumes
    of 32 x 32 x 32 (``tof=True``, the ``bragg-tof`` weights)."""
    from agents.detector_eval import (
        matched_intensities,
        oracle_intensities,
        peak_rows,
        r_by_i_over_sigma,
    )
    from models import classical, metrics
    from simulators import detector as det

    rng = np.random.default_rng(EVAL_SEED + (3 if tof else 1))
    model = models["bragg-tof" if tof else "bragg"]
    iou = {"ml": [], "ml_mirror": [], "threshold": []}
    dice = {"ml": [], "threshold": []}
    iou_all = {"ml": [], "threshold": []}
    peaks: list[dict[str, float]] = []
    for _ in range(n):
        scale = float(np.exp(rng.uniform(-3, 1.1)))
        if tof:
            recipe = det.BraggRecipe(shape=(32, 32, 32), sigma=(0.8, 2.0), n_peaks=(2, 8), count_scale=scale)
            s = det.bragg_volume_tof(rng, recipe, effects=det.random_effects(rng, integrating=False))
        else:
            recipe = det.BraggRecipe(shape=(128, 128), n_peaks=(3, 12), count_scale=scale)
            s = det.bragg_frame_2d(rng, recipe, effects=det.random_effects(rng, integrating=False))
        x = np.where(s.mask, 0.0, s.counts)
        logits = _net(model, x)
        ml_mask = logits > 0.0
        th_mask, th = classical.threshold_components(x, mask=s.mask)
        iou["ml_mirror"].append(metrics.iou(_net(model, x, mirrored=True) > 0.0, s.support, ~s.mask))
        for name, m in (("ml", ml_mask), ("threshold", th_mask)):
            iou[name].append(metrics.iou(m, s.support, ~s.mask))
            dice[name].append(metrics.dice(m, s.support, ~s.mask))
            iou_all[name].append(metrics.iou(m, s.support))
        ml = matched_intensities(classical.integrate_in_mask(x, ml_mask, mask=s.mask, score=logits), s.centers)
        ml_ap = matched_intensities(classical.integrate_in_mask(x, ml_mask, mask=s.mask, score=logits, grow_sigma=2.0),
                                    s.centers)
        thr = matched_intensities(th, s.centers)
        sph = classical.sphere_integrate(x, s.centers, radius=6.0, bkg_inner=8.0, bkg_outer=11.0, mask=s.mask)
        ell = classical.ellipsoid_integrate(x, s.centers, region_radius=10.0, weak_threshold=10.0, mask=s.mask)
        peaks += peak_rows(s.true_intensity, s.sigma_intensity, {
            "ml": ml, "ml_aperture": ml_ap, "threshold": thr, "sphere": sph.intensity, "ellipsoid": ell.intensity,
            "oracle": oracle_intensities(x, s.expected, s.peak_expected, s.mask)})
        bar.update()
    r = r_by_i_over_sigma(peaks, ("ml", "ml_aperture", "threshold", "sphere", "ellipsoid", "oracle"))
    low = r.get("0-5", {})
    best_classical = min((low[m] for m in ("threshold", "sphere", "ellipsoid")), default=float("nan"))
    return {"iou": {k: float(np.mean(v)) for k, v in iou.items()}, "dice": {k: float(np.mean(v)) for k, v in dice.items()},
            "iou_all_pixels": {k: float(np.mean(v)) for k, v in iou_all.items()},
            "r_by_i_over_sigma": r, "bragg_iou": float(np.mean(iou["ml"])),
            "bragg_error_ratio_low_snr": float(low.get("ml", np.nan) / best_classical) if low else None,
            # the same ratio for profile fitting told the true places and profiles, reporting a
            # peak at >= 3 sigma (agents.detector_eval.oracle_intensities): a reference
            "bragg_error_ratio_low_snr_oracle": float(low.get("oracle", np.nan) / best_classical) if low else None}


def _radial(img: np.ndarray, qx: np.ndarray, qy: np.ndarray, nbins: int = 24) -> tuple[np.ndarray, np.ndarray]:
    q = np.hypot(qx, qy)  # pixel-centre grids, the image's shape
    edges = np.linspace(0, q.max(), nbins + 1)
    idx = np.clip(np.digitize(q.ravel(), edges) - 1, 0, nbins - 1)
    s = np.bincount(idx, img.ravel(), nbins)
    c = np.bincount(idx, minlength=nbins)
    return s, c


def super_resolution(models: dict[str, Any], n: int, bar: Any) -> dict[str, Any]:
    from agents.detector_eval import log_psnr, super_resolve
    from models import classical, metrics
    from simulators import detector as det

    out: dict[str, Any] = {}
    for factor in (2, 4):
        rng = np.random.default_rng(EVAL_SEED + factor)
        model = models[f"sans-sr-x{factor}"]
        rows: dict[str, list[float]] = {k: [] for k in ("ml_log_psnr", "bicubic_log_psnr", "ml_ssim", "bicubic_ssim",
                                                        "ml_chi2", "bicubic_chi2")}
        for _ in range(n):
            kind = det.SANS_HELD_OUT_KINDS[int(rng.integers(len(det.SANS_HELD_OUT_KINDS)))]
            p = det.sans_pair(rng, kind, factor=factor, coarse_shape=(32, 32),
                              total_counts=float(np.exp(rng.uniform(np.log(1e5), np.log(1e6)))))
            truth = p.fine_expected
            for name, est in (("ml", super_resolve(model, p.coarse_counts)),
                              ("bicubic", classical.bicubic_upsample(p.coarse_counts, factor, space="log"))):
                rows[f"{name}_log_psnr"].append(log_psnr(est, truth))
                rows[f"{name}_ssim"].append(metrics.ssim(np.log10(np.maximum(est, 1e-6)),
                                                         np.log10(np.maximum(truth, 1e-6))))
                se, c = _radial(est, p.qx_fine, p.qy_fine)
                st, _ = _radial(truth, p.qx_fine, p.qy_fine)
                ok = (c > 0) & (st > 0)
                # variance of the ring sum of a Poisson draw of the truth at this count level
                rows[f"{name}_chi2"].append(float(np.sum((se[ok] - st[ok]) ** 2 / st[ok]) / max(ok.sum() - 1, 1)))
            bar.update()
        m = {k: float(np.mean(v)) for k, v in rows.items()}
        m["gain_db"] = m["ml_log_psnr"] - m["bicubic_log_psnr"]
        out[f"x{factor}"] = m
    return out


def throughput(models: dict[str, Any], rounds: int = 4) -> dict[str, Any]:
    """Frames per second and p99 latency of denoising, of masking, and of the two in turn, one
    frame at a time through ``infer``, at 256 x 256 and 512 x 512: the three runs of a size in
    interleaved rounds of at least a second each (:func:`_interleaved_fps`; fps the median over
    the rounds, p99 over every frame of every round), so a machine whose speed drifts meanwhile
    weighs on all three alike. The first frames of a network at a new size build its oneDNN
    kernels and are left out (three calls each before the rounds)."""
    from models.nets import denoiser_input, infer

    torch.set_num_threads(max(1, torch.get_num_threads()))
    out: dict[str, Any] = {"torch_threads": torch.get_num_threads(), "rounds": rounds}
    rng = np.random.default_rng(1)

    def one(m: torch.nn.Module, b: torch.Tensor) -> None:
        infer(m, denoiser_input(m, b), device=torch.device("cpu"))

    for size in (256, 512):
        frame = torch.as_tensor(rng.poisson(1.0, (1, 1, size, size)).astype(np.float32))
        for name in ("denoise", "bragg"):
            for _ in range(3):
                one(models[name], frame)
        cases = {"denoise": ([models["denoise"]], one), "bragg": ([models["bragg"]], one),
                 "denoise_and_mask": ([models["denoise"], models["bragg"]], one)}
        lat: dict[str, list[float]] = {}
        fps = _interleaved_fps(cases, frame, rounds, latencies=lat)
        for name in cases:
            out[f"{name}_{size}"] = {"fps": fps[name], "p99_latency_s": float(np.percentile(lat[name], 99))}
    out["cpu_fps_512_denoise_and_mask"] = out["denoise_and_mask_512"]["fps"]
    out.update(_agent_path_throughput(models))
    out["fused_512_denoise_and_mask"] = _fusion_throughput(models)
    out["super_resolution"] = sr_throughput(models)
    return out


def agents_end_to_end(weights: dict[str, str], n_frames: int = 16, rounds: int = 3) -> dict[str, Any]:
    """Frames per second through the detector agents themselves, as the daemon runs them: every
    event of a raw run of ``n_frames`` 512 x 512 Bragg frames (30-60 peaks each) is told to a
    denoising agent and a Bragg agent in turn (the agents' default batching), and each publishes
    its derived run (documents composed, to a sink that keeps them): network, peak integration
    and documents all inside the timing, from the first event to the stop document. Side by side,
    in interleaved rounds (median): the two agents with the frames in an HDF5 file instead, named
    by stream_resource / stream_datum documents and left out of the events (as an ophyd-async
    detector writes them; each agent reads its frames from the file); the Bragg agent alone, with
    touching peaks cut apart (its default) and without (``peak_separation: None``)."""
    import tempfile
    from pathlib import Path

    import event_model
    import h5py

    from agents.detector_agent import DetectorAnalysisAgent
    from simulators import detector as det

    rng = np.random.default_rng(4)
    frames = [det.bragg_frame_2d(rng, det.BraggRecipe(shape=(512, 512), n_peaks=(30, 60), count_scale=1.0)).counts
              for _ in range(n_frames)]
    key = {"det_image": {"dtype": "array", "shape": [512, 512], "source": "sim"}}
    workdir = tempfile.TemporaryDirectory()
    path = Path(workdir.name) / "frames.h5"
    with h5py.File(path, "w", libver="latest") as f:  # the detector's file: one chunk a frame
        f.create_dataset("/entry/data/data", data=np.stack(frames)[:, None].astype(np.uint32), chunks=(1, 1, 512, 512))

    def raw_run(hdf5: bool) -> tuple[list[tuple[str, dict]], list[tuple[str, dict]]]:
        """(documents before the timing, documents timed) of one raw run."""
        run = event_model.compose_run()
        if not hdf5:
            desc = run.compose_descriptor(name="primary", data_keys=key)
            return [("start", run.start_doc), ("descriptor", desc.descriptor_doc)], [
                ("event", desc.compose_event(data={"det_image": f}, timestamps={"det_image": 0.0}, validate=False))
                for f in frames] + [("stop", run.compose_stop())]
        desc = run.compose_descriptor(name="primary", data_keys={
            "det_image": {"dtype": "array", "shape": [1, 512, 512], "source": "file", "external": "STREAM:"},
            "x": {"dtype": "number", "shape": [], "source": "sim"}})
        res = run.compose_stream_resource(mimetype="application/x-hdf5", uri=f"file://localhost{path}",
                                          data_key="det_image", parameters={"dataset": "/entry/data/data"})
        timed: list[tuple[str, dict]] = []
        for i in range(len(frames)):
            timed.append(("stream_datum", res.compose_stream_datum(
                indices={"start": i, "stop": i + 1}, seq_nums={"start": i + 1, "stop": i + 2},
                descriptor=desc.descriptor_doc)))
            timed.append(("event", desc.compose_event(data={"x": float(i)}, timestamps={"x": 0.0})))
        before = [("start", run.start_doc), ("descriptor", desc.descriptor_doc),
                  ("stream_resource", res.stream_resource_doc)]
        return before, timed + [("stop", run.compose_stop())]

    def fps(*settings: dict[str, Any], hdf5: bool = False) -> float:
        before, timed = raw_run(hdf5)
        kept: list[str] = []
        agents = [DetectorAnalysisAgent({"name": f"bench-{i}", "device": "cpu", **a},
                                        sinks=[lambda name, doc: kept.append(name)]) for i, a in enumerate(settings)]
        for name, doc in before:
            for agent in agents:
                agent.tell(name, doc)
        t0 = time.perf_counter()
        for name, doc in timed:
            for agent in agents:
                agent.tell(name, doc)
        wall = time.perf_counter() - t0
        assert all(a.report()["frames_out"] == n_frames for a in agents), [a.report() for a in agents]
        return n_frames / wall

    denoise = {"analysis": "denoise", "weights": weights["denoise"]}
    bragg = {"analysis": "bragg", "weights": weights["bragg"]}
    cases = {"denoise_and_bragg_fps": ((denoise, bragg), False), "denoise_and_bragg_fps_hdf5": ((denoise, bragg), True),
             "bragg_fps": ((bragg,), False), "bragg_fps_whole_components": (({**bragg, "peak_separation": None},), False)}
    with workdir:
        fps(denoise, bragg)  # warm-up: imports, weights, kernels
        fps(denoise, bragg, hdf5=True)
        got: dict[str, list[float]] = {k: [] for k in cases}
        for _ in range(rounds):
            for name, (settings, hdf5) in cases.items():
                got[name].append(fps(*settings, hdf5=hdf5))
    return {k: float(np.median(v)) for k, v in got.items()} | {"frames": n_frames, "rounds": rounds,
                                                                "peaks_per_frame": "30-60"}


def peaks_to_zarr(n_peaks: int = 45, frames: int = 6) -> dict[str, Any]:
    """Seconds per frame to store a frame's peaks (``n_peaks`` rows of the Bragg agent's
    ``peaks`` stream) in a zarr store through :class:`streams.zarr_writer.ZarrRunWriter`: as one
    event page (what the agent sends) against one event per row (what it sent before), the two
    alternating frame by frame."""
    import tempfile
    from pathlib import Path

    from streams.derived import DerivedRunWriter
    from streams.zarr_writer import ZarrRunWriter

    scalar = {"dtype": "number", "shape": [], "source": "bench"}
    keys = {k: scalar for k in ("intensity", "sigma", "background", "raw_time")}
    keys |= {k: {**scalar, "dtype": "integer"} for k in ("peak_index", "n_pixels", "raw_seq_num")}
    keys |= {"centroid": {**scalar, "dtype": "array", "shape": [2]}, "raw_uid": {**scalar, "dtype": "string"}}
    rows = [{"peak_index": i, "intensity": 100.0, "sigma": 10.0, "background": 1.0, "n_pixels": 20,
             "centroid": np.array([i, i], dtype=np.float64), "raw_seq_num": 1, "raw_uid": "u", "raw_time": 0.0}
            for i in range(n_peaks)]
    spent = {"event_page": [], "events": []}
    with tempfile.TemporaryDirectory() as tmp:
        store = ZarrRunWriter(Path(tmp) / "peaks.zarr")
        writers = {}
        for mode in spent:
            writers[mode] = DerivedRunWriter([store], raw_run_uid=None)
            writers[mode].add_stream("peaks", keys)
        for _ in range(frames):
            for mode, w in writers.items():
                t0 = time.perf_counter()
                if mode == "event_page":
                    w.emit_page("peaks", rows)
                else:
                    for row in rows:
                        w.emit("peaks", row)
                spent[mode].append(time.perf_counter() - t0)
        for w in writers.values():
            w.close()
        store.close()
    med = {k: float(np.median(v)) for k, v in spent.items()}
    return {"s_per_frame_event_page": med["event_page"], "s_per_frame_events": med["events"],
            "ratio": med["events"] / med["event_page"], "peaks_per_frame": n_peaks, "frames": frames}


def _one_call(model: torch.nn.Module, batch: torch.Tensor) -> torch.Tensor:
    """The whole batch in one forward call, channels-last: what ``infer`` did on the CPU before
    it split batches (``models.nets.cpu_sub_batch``); the baseline of the agent-path figures."""
    from models.device import channels_last

    layout = channels_last(batch.dim())
    model.to("cpu", memory_format=layout)
    with torch.inference_mode():
        return model(batch.to(memory_format=layout)).float()


def _agent_path_throughput(models: dict[str, Any], rounds: int = 4) -> dict[str, Any]:
    """Frames per second as the detector agent runs them, ``infer`` against one forward call per
    batch, in interleaved rounds (median): 512 x 512 frames arriving in batches of the agent's
    default ``max_batch`` (denoise + mask), and single 32^3 time-of-flight volumes (bragg-tof)."""
    from agents.detector_agent import DetectorSettings
    from models.nets import denoiser_input, infer

    rng = np.random.default_rng(2)
    nb = DetectorSettings.model_fields["max_batch"].default
    frames = torch.as_tensor(rng.poisson(1.0, (nb, 1, 512, 512)).astype(np.float32))
    volume = torch.as_tensor(rng.poisson(1.0, (1, 1, 32, 32, 32)).astype(np.float32))
    cases = {f"agent_batch{nb}_512_denoise_and_mask": ([models["denoise"], models["bragg"]], frames),
             "agent_single_tof_32": ([models["bragg-tof"]], volume)}
    runs = {"infer": lambda m, b: infer(m, denoiser_input(m, b), device=torch.device("cpu"), max_batch=nb),
            "one_call": lambda m, b: _one_call(m, denoiser_input(m, b))}
    out: dict[str, Any] = {}
    for key, (nets, batch) in cases.items():
        med = _interleaved_fps({k: (nets, run) for k, run in runs.items()}, batch, rounds)
        out[key] = {"fps": med["infer"], "fps_one_call_per_batch": med["one_call"],
                    "ratio": med["infer"] / med["one_call"]}
    return out


def sr_throughput(models: dict[str, Any], rounds: int = 3) -> dict[str, Any]:
    """Super-resolved patterns per second and p99 latency at 256 x 256 and 512 x 512 output (coarse
    input ``size / factor``), one pattern at a time, as the detector agent makes them: the network
    through ``infer``, then the ring scaling (:func:`agents.detector_eval.super_resolve`). Side by
    side in interleaved rounds (median): with the mirror average (the shipped default, 8 forward
    passes) and without it (``symmetric_average: false``, one pass). Rounds of at least a second
    and 2 patterns (a SANS pattern takes seconds to minutes to collect; the agent need not keep
    up with a fast pixel detector here)."""
    import copy

    from agents.detector_eval import super_resolve

    out: dict[str, Any] = {}
    rng = np.random.default_rng(5)
    for size in (256, 512):
        for factor in (2, 4):
            averaged = models[f"sans-sr-x{factor}"]
            single = copy.deepcopy(averaged)
            single.symmetric_average = False
            coarse = rng.poisson(20.0, (size // factor, size // factor)).astype(np.float64)
            batch = torch.as_tensor(coarse[None, None].astype(np.float32))  # one pattern: what the rounds count

            def run(m: torch.nn.Module, _: torch.Tensor, coarse: np.ndarray = coarse) -> None:
                super_resolve(m, coarse)

            for m in (averaged, single):
                for _ in range(2):
                    run(m, batch)
            lat: dict[str, list[float]] = {}
            fps = _interleaved_fps({"mirror_average": ([averaged], run), "single_pass": ([single], run)},
                                   batch, rounds, latencies=lat, min_frames=2)
            out[f"x{factor}_{size}"] = {"fps": fps["mirror_average"],
                                        "p99_latency_s": float(np.percentile(lat["mirror_average"], 99)),
                                        "fps_single_pass": fps["single_pass"],
                                        "p99_latency_s_single_pass": float(np.percentile(lat["single_pass"], 99))}
    return out


def _fusion_throughput(models: dict[str, Any], rounds: int = 4) -> dict[str, Any]:
    """Denoise + mask of one 512 x 512 frame at a time through ``infer``, with the ReLU networks'
    fused CPU inference (``models.nets.fused_inference``) against the same networks unfused, in
    interleaved rounds (median). Meaningful for networks with ``activation: relu``; for GELU ones
    both run the same path."""
    from models.nets import denoiser_input, fused_inference, infer

    frame = torch.as_tensor(np.random.default_rng(3).poisson(1.0, (1, 1, 512, 512)).astype(np.float32))

    def run(enabled: bool) -> Any:
        def one(m: torch.nn.Module, b: torch.Tensor) -> None:
            with fused_inference(enabled):
                infer(m, denoiser_input(m, b), device=torch.device("cpu"))
        return one

    both = [models["denoise"], models["bragg"]]
    med = _interleaved_fps({"fused": (both, run(True)), "unfused": (both, run(False))}, frame, rounds)
    return {"fps": med["fused"], "fps_unfused": med["unfused"], "ratio": med["fused"] / med["unfused"],
            "activations": {n: models[n].net.activation for n in ("denoise", "bragg")}}


def _interleaved_fps(cases: dict[str, tuple[list[torch.nn.Module], Any]], batch: torch.Tensor, rounds: int,
                     latencies: dict[str, list[float]] | None = None, min_frames: int = 8) -> dict[str, float]:
    """Median frames per second of each case ``(networks, run)`` (``run(model, batch)`` for
    every network in turn), timed for at least a second and ``min_frames`` a round, rounds interleaved
    so a machine that slows down or speeds up meanwhile weighs on every case alike.
    ``latencies``, when given, gets the seconds each batch took through all of its case's
    networks, per case."""
    fps: dict[str, list[float]] = {k: [] for k in cases}
    for _ in range(rounds):
        for name, (models_, run) in cases.items():
            t0, n = time.perf_counter(), 0
            while n < min_frames or time.perf_counter() - t0 < 1.0:
                t1 = time.perf_counter()
                for m in models_:
                    run(m, batch)
                if latencies is not None:
                    latencies.setdefault(name, []).append(time.perf_counter() - t1)
                n += len(batch)
            fps[name].append(n / (time.perf_counter() - t0))
    return {k: float(np.median(v)) for k, v in fps.items()}


def gpu_throughput(models: dict[str, Any], batch: int = 32, repeats: int = 10) -> float | None:
    """Frames per second of denoising + masking at 1024 x 1024 in bf16 on CUDA (None without one)."""
    from models.nets import denoiser_input, infer

    if not torch.cuda.is_available():
        return None
    device = torch.device("cuda")
    frames = torch.poisson(torch.ones(batch, 1, 1024, 1024))
    for name in ("denoise", "bragg"):
        infer(models[name], denoiser_input(models[name], frames), device=device, bf16=True)  # warm-up, cudnn autotune
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(repeats):
        for name in ("denoise", "bragg"):
            infer(models[name], denoiser_input(models[name], frames), device=device, bf16=True)
    torch.cuda.synchronize()
    return batch * repeats / (time.perf_counter() - t0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--weights", default=None, help="directory of NAME.pt/NAME.json (default: shipped)")
    parser.add_argument("--n-denoise", type=int, default=20)
    parser.add_argument("--n-bias", type=int, default=60, help="Bragg frames for the intensity bias after denoising")
    parser.add_argument("--n-bragg", type=int, default=200)
    parser.add_argument("--n-bragg-tof", type=int, default=60)
    parser.add_argument("--n-sr", type=int, default=100)
    args = parser.parse_args()
    from pathlib import Path

    from tqdm import tqdm

    from models.registry import load_weights

    t0 = time.perf_counter()
    names = ("denoise", "bragg", "bragg-tof", "sans-sr-x2", "sans-sr-x4")
    models = {n: load_weights(Path(args.weights) / n if args.weights else n)[0] for n in names}
    total = 3 * args.n_denoise + args.n_bragg + args.n_bragg_tof + 2 * args.n_sr
    with tqdm(total=total, desc="detector-ml benchmark", unit="frame", file=sys.stderr) as bar:
        den = denoising(models, args.n_denoise, args.n_bias, bar)
        bra = bragg(models, args.n_bragg, bar)
        tof = bragg(models, args.n_bragg_tof, bar, tof=True)
        sr = super_resolution(models, args.n_sr, bar)
    speed = throughput(models)
    speed["agents_end_to_end_512"] = agents_end_to_end(
        {n: str(Path(args.weights) / n) if args.weights else n for n in ("denoise", "bragg")})
    speed["peaks_to_zarr"] = peaks_to_zarr()
    gpu = gpu_throughput(models)
    out = {
        "benchmark": "detector_ml",
        "denoise_psnr_gain_db": den["denoise_psnr_gain_db"],
        "bragg_iou": bra["bragg_iou"],
        "bragg_error_ratio_low_snr": bra["bragg_error_ratio_low_snr"],
        "bragg_error_ratio_low_snr_oracle": bra["bragg_error_ratio_low_snr_oracle"],
        "sr_psnr_gain_db_4x": sr["x4"]["gain_db"],
        "sr_psnr_gain_db_2x": sr["x2"]["gain_db"],
        "cpu_fps_512_denoise_and_mask": speed["cpu_fps_512_denoise_and_mask"],
        "gpu_fps_1024": gpu,
        "gpu_note": None if gpu is not None else "no CUDA device on the machine that ran this",
        "denoising": den,
        "bragg": bra,
        "bragg_tof": tof,
        "bragg_tof_iou": tof["bragg_iou"],
        "bragg_tof_error_ratio_low_snr": tof["bragg_error_ratio_low_snr"],
        "super_resolution": sr,
        "throughput": speed,
        "eval_seed": EVAL_SEED,
        "wall_s": round(time.perf_counter() - t0, 1),
    }
    print(json.dumps(out, default=float))


if __name__ == "__main__":
    main()

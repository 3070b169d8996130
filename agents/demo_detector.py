"""``beampilot demo bragg`` and ``beampilot demo sans-sr``: a detector network on a simulated stream.

A bluesky ``RunEngine`` counts a :class:`simulators.frames.SimFrameDetector` (Bragg frames through a
Pilatus-like detector, or coarse SANS patterns of sample kinds held out of training); a
:class:`agents.detector_agent.DetectorAnalysisAgent` with the shipped weights reads the run's
documents as they are emitted, batches the frames and publishes a derived run (peak masks with
integrated intensities, or super-resolved patterns). The report puts raw, classical, ML and truth
side by side for a few frames and gives the metrics over all of them:

* bragg - IoU of the U-Net's mask and of threshold + components against the true support (over
  the pixels the detector measures), and
  ``R = sum|I - I_true| / sum I_true`` of the peaks integrated in each mask, over all peaks (where
  the strong ones weigh most) and by bin of true ``I / sigma`` (``bragg_r.png``): the U-Net finds
  the weak peaks that thresholding misses. ``grow_sigma`` has the agent sum each peak over a
  curve-of-growth aperture too (its ``aperture_grow_sigma``), which measures strong peaks' wings;
* sans-sr - PSNR of log-intensity of the network's pattern and of bicubic interpolation.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np

from agents.errors import ConfigError
from streams.sequence import events_of

__all__ = ["run_detector_demo"]


def run_detector_demo(out: Path, *, analysis: str, frames: int = 24, seed: int = 7,
                      weights: str | None = None, factor: int = 4, grow_sigma: float | None = None,
                      progress: bool = True) -> dict[str, Any]:
    import bluesky.plans as bp
    from bluesky import RunEngine
    from tqdm import tqdm

    from agents.detector_agent import DetectorAnalysisAgent, DetectorSettings
    from simulators.frames import SimFrameDetector

    if analysis not in ("bragg", "sans-sr"):
        raise ValueError(f"analysis must be 'bragg' or 'sans-sr', got {analysis!r}")
    out.mkdir(parents=True, exist_ok=True)
    det = SimFrameDetector("det", scene="bragg" if analysis == "bragg" else "sans", seed=seed,
                           shape=(128, 128) if analysis == "bragg" else (32, 32), factor=factor)
    derived: list[tuple[str, dict[str, Any]]] = []
    agent = DetectorAnalysisAgent(
        DetectorSettings(name=f"demo-{analysis}", analysis=analysis,
                         weights=weights or ("bragg" if analysis == "bragg" else f"sans-sr-x{factor}"),
                         frame_key="det_image", mask_key="det_mask", max_batch=8, max_latency_s=0.2,
                         aperture_grow_sigma=grow_sigma),
        sinks=[lambda name, doc: derived.append((name, doc))])
    net_factor = int(getattr(agent.model, "factor", factor))
    if analysis == "sans-sr" and net_factor != factor:
        raise ConfigError(f"--weights {weights} are a {net_factor}x network and the demo asks for {factor}x: "
                          f"pass --factor {net_factor}, or {factor}x weights")
    truths: list[Any] = []
    raws: list[np.ndarray] = []
    bar = tqdm(total=frames, desc=f"demo {analysis}", unit="frame", disable=not progress)

    def keep_truth(name: str, doc: dict[str, Any]) -> None:
        if name == "event":
            truths.append(det.truth)
            raws.append(np.asarray(doc["data"]["det_image"]))
            bar.update()

    RE = RunEngine({}, context_managers=[])
    RE.subscribe(agent.tell)
    RE.subscribe(keep_truth)
    t0 = time.perf_counter()
    RE(bp.count([det], num=frames), purpose=f"beampilot demo {analysis}")
    agent.flush()
    bar.close()
    wall = time.perf_counter() - t0
    # event pages (the Bragg agent's peaks) unpacked in place
    events = [event for name, doc in derived for event in events_of(name, doc)]
    if analysis == "bragg":
        summary = _bragg_report(out, raws, truths, events, grow_sigma)
    else:
        summary = _sr_report(out, raws, truths, events, factor)
    summary.update({"frames": frames, "wall_s": round(wall, 2), "agent": agent.report(),
                    "derived_documents": len(derived)})
    (out / "summary.json").write_text(json.dumps(summary, indent=2, default=_jsonable))
    return summary


def _jsonable(v: Any) -> Any:
    if isinstance(v, np.generic):
        return v.item()
    if isinstance(v, np.ndarray):
        return v.tolist()
    return str(v)


def _bragg_report(out: Path, raws: list[np.ndarray], truths: list[Any], events: list[dict[str, Any]],
                  grow_sigma: float | None) -> dict[str, Any]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from agents.detector_eval import matched_intensities, peak_rows, r_by_i_over_sigma
    from models import classical, metrics

    bragg = [e["data"] for e in events if "peak_mask" in e["data"]]
    masks = [np.asarray(d["peak_mask"], bool) for d in bragg]
    published: dict[int, list[dict[str, Any]]] = {}  # the agent's peaks stream, by raw frame
    for e in events:
        if "peak_index" in e["data"]:
            published.setdefault(int(e["data"]["raw_seq_num"]), []).append(e["data"])
    ml_iou, th_iou, err = [], [], {"ml": 0.0, "threshold": 0.0, "truth": 0.0}
    th_masks = []
    peaks: list[dict[str, float]] = []
    for raw, s, d, m in zip(raws, truths, bragg, masks, strict=True):
        th_mask, th_found = classical.threshold_components(raw, mask=s.mask)
        th_masks.append(th_mask)
        ml_iou.append(metrics.iou(m, s.support, ~s.mask))
        th_iou.append(metrics.iou(th_mask, s.support, ~s.mask))
        rows = published.get(int(d["raw_seq_num"]), [])
        ml_found = SimpleNamespace(intensity=np.array([r["intensity"] for r in rows], dtype=float),
                                   centroids=np.array([r["centroid"] for r in rows], dtype=float).reshape(-1, raw.ndim))
        matched = {name: matched_intensities(found, s.centers)
                   for name, found in (("ml", ml_found), ("threshold", th_found))}
        for name, estimate in matched.items():
            err[name] += float(np.sum(np.abs(estimate - s.true_intensity)))
        err["truth"] += float(np.sum(s.true_intensity))
        peaks += peak_rows(s.true_intensity, s.sigma_intensity, matched)
    r_bins = r_by_i_over_sigma(peaks, ("ml", "threshold"))
    fig, axes = plt.subplots(3, 4, figsize=(13, 9.5))
    for row, j in enumerate(range(min(3, len(raws)))):
        s = truths[j]
        panels = [("raw counts (log)", np.log1p(raws[j]), "magma"), ("threshold + components", th_masks[j], "gray"),
                  ("U-Net mask", masks[j], "gray"), ("true support", s.support, "gray")]
        for ax, (title, img, cmap) in zip(axes[row], panels, strict=True):
            ax.imshow(img, cmap=cmap, origin="lower")
            ax.set_title(f"frame {j}: {title}", fontsize=9)
            ax.axis("off")
    fig.suptitle(f"Bragg peaks: IoU U-Net {np.mean(ml_iou):.2f}, threshold {np.mean(th_iou):.2f} "
                 f"over {len(raws)} frames")
    fig.tight_layout()
    fig.savefig(out / "bragg.png", dpi=100)
    plt.close(fig)
    integration = "mask" if grow_sigma is None else f"mask + curve of growth ({grow_sigma:g} sigma)"
    _plot_r_bins(out / "bragg_r.png", r_bins, f"U-Net ({integration})")
    return {"analysis": "bragg", "iou_ml": float(np.mean(ml_iou)), "iou_threshold_components": float(np.mean(th_iou)),
            "ml_integration": integration,
            "r_ml": err["ml"] / err["truth"], "r_threshold_components": err["threshold"] / err["truth"],
            "r_by_i_over_sigma": r_bins, "figures": ["bragg.png", "bragg_r.png"]}


def _plot_r_bins(path: Path, r_bins: dict[str, dict[str, float]], ml_label: str) -> None:
    """Bars of each method's ``R`` per bin of true ``I / sigma``, with the bins' peak counts."""
    import matplotlib.pyplot as plt

    labels = list(r_bins)
    x = np.arange(len(labels))
    fig, ax = plt.subplots(figsize=(6.5, 3.8))
    for k, (key, name) in enumerate((("ml", ml_label), ("threshold", "threshold + components"))):
        ax.bar(x + (k - 0.5) * 0.38, [r_bins[b][key] for b in labels], 0.38, label=name)
    ax.set_xticks(x, [f"{b}\n({int(r_bins[b]['n_peaks'])} peaks)" for b in labels])
    ax.set(xlabel="true I / sigma(I)", ylabel="R = sum|I - I_true| / sum I_true",
           title="Integrated intensities: error by signal-to-noise (lower is better)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _sr_report(out: Path, raws: list[np.ndarray], truths: list[Any], events: list[dict[str, Any]],
               factor: int) -> dict[str, Any]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from agents.detector_eval import log_psnr
    from models import classical

    srs = [np.asarray(e["data"]["super_resolved"], float) for e in events if "super_resolved" in e["data"]]
    ml, bic, bics = [], [], []
    for raw, p, sr in zip(raws, truths, srs, strict=True):
        b = classical.bicubic_upsample(raw, factor, space="log")
        bics.append(b)
        ml.append(log_psnr(sr, p.fine_expected))
        bic.append(log_psnr(b, p.fine_expected))
    fig, axes = plt.subplots(3, 4, figsize=(13, 9.5))
    for row, j in enumerate(range(min(3, len(raws)))):
        p = truths[j]
        lo = np.log10(max(float(p.fine_expected[p.fine_expected > 0].min()), 1e-3))
        panels = [("coarse counts", raws[j] / factor**2), ("bicubic", bics[j]), ("network", srs[j]),
                  ("truth", p.fine_expected)]
        for ax, (title, img) in zip(axes[row], panels, strict=True):
            ax.imshow(np.log10(np.maximum(img, 10**lo)), cmap="viridis", origin="lower", vmin=lo)
            ax.set_title(f"pattern {j}: {title}", fontsize=9)
            ax.axis("off")
    fig.suptitle(f"SANS x{factor}: log-intensity PSNR network {np.mean(ml):.1f} dB, bicubic {np.mean(bic):.1f} dB")
    fig.tight_layout()
    fig.savefig(out / "sans-sr.png", dpi=100)
    plt.close(fig)
    return {"analysis": "sans-sr", "factor": factor, "log_psnr_ml": float(np.mean(ml)),
            "log_psnr_bicubic": float(np.mean(bic)), "gain_db": float(np.mean(ml) - np.mean(bic)),
            "figures": ["sans-sr.png"]}

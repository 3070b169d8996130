"""The weights that ship in the package load, match their checksums, and do their job's shape."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from models.nets import infer
from models.registry import load_weights, shipped

EXPECTED = {"denoise": "poisson-denoiser-unet", "bragg": "bragg-peak-unet", "bragg-tof": "bragg-peak-unet",
            "sans-sr-x2": "sans-super-resolver", "sans-sr-x4": "sans-super-resolver"}


def test_every_analysis_has_shipped_weights():
    assert set(EXPECTED) <= set(shipped())


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_shipped_weights_load_with_their_metadata(name):
    model, record = load_weights(name, architecture=EXPECTED[name])
    assert record.name == name and len(record.sha256) == 64
    assert record.training["steps"] >= 1000 and "train_seed" in record.data and "eval_seed" in record.data
    assert record.data["eval_seed"] != record.data["train_seed"]
    assert record.metrics  # the held-out evaluation printed at the end of training
    size = 32 if name.startswith("sans") or name == "bragg-tof" else 64
    dims = record.architecture_config.get("dims", 2)
    frame = torch.as_tensor(np.random.default_rng(0).poisson(2.0, (1, 1) + (size,) * dims).astype(np.float32))
    if getattr(model, "read_noise", False):  # a denoiser told the read noise: 0, a photon-counting frame
        frame = torch.cat([frame, torch.zeros_like(frame)], dim=1)
    out, note = infer(model, frame, device=torch.device("cpu"))
    factor = record.architecture_config.get("factor", 1)
    assert out.shape == (1, 1) + (size * factor,) * dims and note["fallback"] is None
    assert bool(torch.all(torch.isfinite(out)))


@pytest.mark.parametrize("name", ["bragg", "bragg-tof"])
def test_shipped_peak_networks_find_peaks_better_than_a_threshold(name):
    """On frames (2D) and time-of-flight volumes (3D) drawn with a seed neither training nor the
    benchmark uses, the shipped U-Net's mask overlaps the true peak support clearly better than
    threshold + connected components does."""
    from models.classical import threshold_components
    from models.metrics import iou
    from simulators import detector as det

    model, _ = load_weights(name)
    rng = np.random.default_rng(31337)
    ml, th = [], []
    for _ in range(6):
        scale = float(np.exp(rng.uniform(-2, 1)))
        effects = det.random_effects(rng, integrating=False)
        if name == "bragg":
            s = det.bragg_frame_2d(rng, det.BraggRecipe(shape=(64, 64), n_peaks=(2, 6), count_scale=scale),
                                   effects=effects)
        else:
            s = det.bragg_volume_tof(rng, det.BraggRecipe(shape=(32, 32, 32), sigma=(0.8, 2.0), n_peaks=(2, 6),
                                                          count_scale=scale), effects=effects)
        x = np.where(s.mask, 0.0, s.counts)
        logits, _ = infer(model, torch.as_tensor(x[None, None].astype(np.float32)), device=torch.device("cpu"))
        ml.append(iou(logits[0, 0].numpy() > 0.0, s.support))
        th.append(iou(threshold_components(x, mask=s.mask)[0], s.support))
    assert np.mean(ml) > np.mean(th) + 0.1, (ml, th)

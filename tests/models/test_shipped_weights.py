"""The weights that ship in the package load, match their checksums, and do their job's shape."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from models.nets import infer
from models.registry import load_weights, shipped

EXPECTED = {"denoise": "poisson-denoiser-unet", "bragg": "bragg-peak-unet",
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
    size = 32 if name.startswith("sans") else 64
    frame = torch.as_tensor(np.random.default_rng(0).poisson(2.0, (1, 1, size, size)).astype(np.float32))
    out, note = infer(model, frame, device=torch.device("cpu"))
    factor = record.architecture_config.get("factor", 1)
    assert out.shape == (1, 1, size * factor, size * factor) and note["fallback"] is None
    assert bool(torch.all(torch.isfinite(out)))

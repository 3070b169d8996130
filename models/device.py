"""The one place that chooses where tensors live.

CUDA when present, CPU otherwise. ``BEAMPILOT_DEVICE=cpu`` (or ``cuda``, ``cuda:1``) overrides it,
so a GPU machine can still run the CPU path that CI runs.
"""

from __future__ import annotations

import os
from functools import cache

import torch


@cache
def default_device() -> torch.device:
    """Return the device every model in beampilot uses unless told otherwise."""
    wanted = os.environ.get("BEAMPILOT_DEVICE")
    if wanted:
        device = torch.device(wanted)
        if device.type == "cuda" and not torch.cuda.is_available():
            raise RuntimeError(
                f"BEAMPILOT_DEVICE={wanted!r} but CUDA is not available here; unset it or use 'cpu'"
            )
        return device
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def default_dtype() -> torch.dtype:
    """Gaussian processes need float64: their Cholesky factors lose definiteness in float32."""
    return torch.float64

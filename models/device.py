"""The one place that chooses where tensors live, and in what layout.

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


def channels_last(ndim: int) -> torch.memory_format | None:
    """The memory format convolutional networks run in, for a batch of ``ndim`` dimensions
    (``N x C x`` spatial): channels-last for 2D frames (4) and 3D volumes (5), None otherwise.

    oneDNN's convolutions are faster in it on the CPU (on 2 cores: the denoiser's inference about
    2x, a 3D U-Net's training step 1.8x) and so are cuDNN's on recent GPUs.
    """
    return {4: torch.channels_last, 5: torch.channels_last_3d}.get(ndim)

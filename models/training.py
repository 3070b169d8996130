"""One training loop for every detector network: batches from a callable, a loss, Adam, seeds.

The data come from outside (``models`` does not import the simulators): a ``make_batch(rng,
size)`` callable returns ``(inputs, targets, mask)`` tensors. The loop is seeded (torch and the
batch generator), uses Adam with a cosine learning-rate decay, clips gradients, and reports
progress through a callback, so the same code trains on a laptop, in CI-sized smoke runs and on
a GPU.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

__all__ = ["TrainConfig", "train"]

Batch = tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]


@dataclass(frozen=True)
class TrainConfig:
    """Steps, batch size, learning rate and its decay, gradient clip, seed, torch threads."""

    steps: int = 2000
    batch: int = 16
    lr: float = 2e-3
    min_lr_fraction: float = 0.05
    clip: float = 1.0
    seed: int = 0
    threads: int | None = None

    def __post_init__(self) -> None:
        if self.steps < 1 or self.batch < 1 or not self.lr > 0 or not 0 <= self.min_lr_fraction <= 1:
            raise ValueError(f"bad TrainConfig: {self}")


def train(
    model: nn.Module,
    make_batch: Callable[[np.random.Generator, int], Batch],
    loss_fn: Callable[[torch.Tensor, torch.Tensor, torch.Tensor | None], torch.Tensor],
    config: TrainConfig,
    *,
    device: torch.device | None = None,
    progress: Callable[[int, float], None] | None = None,
) -> dict[str, float | list[float]]:
    """Train ``model`` in place; returns the loss history (every step) and the wall time.

    Weights and batches are channels-last (:func:`models.device.channels_last`), which the
    model's parameters keep afterwards.
    """
    from models.device import channels_last, default_device

    device = default_device() if device is None else device
    torch.manual_seed(config.seed)
    rng = np.random.default_rng(config.seed)
    before = torch.get_num_threads()
    if config.threads:
        torch.set_num_threads(config.threads)
    layout: torch.memory_format | None = None
    opt: torch.optim.Optimizer | None = None

    def lr_at(step: int) -> float:
        cos = 0.5 * (1 + math.cos(math.pi * step / config.steps))
        return config.lr * (config.min_lr_fraction + (1 - config.min_lr_fraction) * cos)

    losses: list[float] = []
    t0 = time.perf_counter()
    try:
        for step in range(config.steps):
            x, y, mask = make_batch(rng, config.batch)
            if opt is None:  # the layout follows the data: 2D frames or 3D volumes
                layout = channels_last(x.dim())
                model.to(device, memory_format=layout)  # None: as it is
                model.train()
                opt = torch.optim.Adam(model.parameters(), lr=config.lr)
            x, y = x.to(device, memory_format=layout), y.to(device, memory_format=layout)
            mask = None if mask is None else mask.to(device)
            for group in opt.param_groups:
                group["lr"] = lr_at(step)
            loss = loss_fn(model(x), y, mask)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            nn.utils.clip_grad_norm_(model.parameters(), config.clip)
            opt.step()
            losses.append(float(loss.detach()))
            if progress is not None:
                progress(step, losses[-1])
    finally:
        torch.set_num_threads(before)
        model.eval()
    return {"losses": losses, "wall_s": time.perf_counter() - t0}

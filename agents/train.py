"""``beampilot train denoise|bragg|bragg-tof|sans-sr``: train a detector network from the simulators.

Each task pairs a data recipe (:mod:`simulators.detector`: which generator, which sample kinds,
which count levels, which detector effects) with a network (:mod:`models.nets`), a loss and the
one training loop (:func:`models.training.train`). Training draws from the TRAIN kinds with the
training seed; the held-out evaluation printed at the end uses other seeds (``seed + 10_000``)
and the HELD-OUT kinds, and compares the network with the classical method it replaces
(:mod:`models.classical`). The weights are written with their metadata and checksum
(:func:`models.registry.save_weights`).

* **denoise** - :class:`models.nets.PoissonDenoiser` on 64 x 64 crops of every training kind,
  mean 0.01-100 counts per pixel (log-uniform), random photon-counting or integrating detector
  effects; Poisson NLL against the expected counts outside the detector mask (``--noise2noise``:
  against a second, independent draw instead, as for real data without clean targets).
  ``--arch '{"read_noise": true}'`` trains the network told each frame's read noise (a second input
  channel; :class:`models.nets.PoissonDenoiser`); with ``--init`` of weights without it, the
  network is widened from them (:meth:`models.nets.PoissonDenoiser.told_read_noise`) and fine-tuned.
* **bragg** - :class:`models.nets.PeakUNet` (2D) on 64 x 64 Bragg frames over the whole
  signal-to-noise range; BCE + Dice against the true peak support.
* **bragg-tof** - the same in 3D: :class:`models.nets.PeakUNet` (``dims=3``) on 32 x 32 x 32
  time-of-flight volumes (:func:`simulators.detector.bragg_volume_tof`: moderator tail along TOF,
  photon-counting effects on the detector axes), for neutron TOF instruments.
* **sans-sr** - :class:`models.nets.SuperResolver` (``--factor`` 2 or 4) on sasmodels patterns of
  the training kinds, 10^5-10^6 counts per coarse pattern; Poisson NLL of the fine expected
  counts plus ``IQ_WEIGHT`` times the chi-square of the pattern's ring sums (its azimuthally
  averaged I(Q), one-pixel rings about the beam centre) against theirs: per-pixel accuracy
  alone left the I(Q) that users fit biased by several sigma (reduced chi-square 4 at 2x).
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from models import nets
from models.registry import ARCHITECTURES, WeightsError, WeightsRecord, load_weights, save_weights
from models.training import TrainConfig, train
from simulators import detector as det

__all__ = ["TASKS", "Task", "run_training"]

EVAL_SEED_OFFSET = 10_000
PATCH = 64


def _log_uniform(rng: np.random.Generator, lo: float, hi: float) -> float:
    return float(np.exp(rng.uniform(np.log(lo), np.log(hi))))


# -- denoise ---------------------------------------------------------------------------------------

def denoise_sample(rng: np.random.Generator, kinds: tuple[str, ...], mean: float | None = None,
                   shape: tuple[int, int] = (PATCH, PATCH), pair: bool = False) -> det.FrameSample:
    kind = kinds[int(rng.integers(len(kinds)))]
    level = _log_uniform(rng, 0.01, 100.0) if mean is None else mean
    return det.denoise_frame(rng, kind, shape, level, effects=det.random_effects(rng), pair=pair)


def _denoise_batch(noise2noise: bool, read_noise: bool = False) -> Callable[[np.random.Generator, int], nets_batch]:
    """Batches of denoising crops; with ``read_noise`` the input has the read-noise channel
    (:func:`_denoise_input`), else it is the counts (a negative reading passed as it is: the
    network's transform floors it)."""
    def make(rng: np.random.Generator, size: int) -> nets_batch:
        xs, ys, ms = [], [], []
        for _ in range(size):
            s = denoise_sample(rng, det.DENOISE_TRAIN_KINDS, pair=noise2noise)
            good = ~s.mask
            xs.append(_denoise_input(s.counts, s.mask, s.read_noise if read_noise else None))
            ys.append(np.where(good, s.counts2 if noise2noise else s.expected, 0.0))
            ms.append(good)
        return torch.as_tensor(np.stack(xs).astype(np.float32)), _tensors(ys), _tensors(ms)
    return make


def _denoise_input(readings: np.ndarray, mask: np.ndarray, read_noise: float | None) -> np.ndarray:
    """One training crop, channels first: the readings with masked pixels set to 0, and with
    ``read_noise`` (not None) its second channel as :func:`models.nets.denoiser_input` adds it."""
    x = np.where(mask, 0.0, readings)
    return x[None] if read_noise is None else np.stack([x, np.full(x.shape, float(read_noise))])


def _denoise_loss(rate: torch.Tensor, target: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    return nets.poisson_nll(rate, target, mask)


# -- bragg -----------------------------------------------------------------------------------------

def bragg_sample(rng: np.random.Generator, shape: tuple[int, int] = (PATCH, PATCH)) -> det.FrameSample:
    recipe = det.BraggRecipe(shape=shape, n_peaks=(1, 6), count_scale=_log_uniform(rng, 0.05, 3.0))
    return det.bragg_frame_2d(rng, recipe, effects=det.random_effects(rng, integrating=False))


def _bragg_batch(rng: np.random.Generator, size: int) -> nets_batch:
    xs, ys = [], []
    for _ in range(size):
        s = bragg_sample(rng)
        xs.append(np.where(s.mask, 0.0, s.counts))
        ys.append(s.support.astype(np.float32))
    return _tensors(xs), _tensors(ys), None


TOF_PATCH = 32


def bragg_tof_sample(rng: np.random.Generator, shape: tuple[int, int, int] = (TOF_PATCH,) * 3) -> det.FrameSample:
    recipe = det.BraggRecipe(shape=shape, sigma=(0.8, 2.0), n_peaks=(1, 6), count_scale=_log_uniform(rng, 0.05, 3.0))
    return det.bragg_volume_tof(rng, recipe, effects=det.random_effects(rng, integrating=False))


def _bragg_tof_batch(rng: np.random.Generator, size: int) -> nets_batch:
    samples = [bragg_tof_sample(rng) for _ in range(size)]
    return (_tensors([np.where(s.mask, 0.0, s.counts) for s in samples]),
            _tensors([s.support.astype(np.float32) for s in samples]), None)


def _bragg_loss(logits: torch.Tensor, target: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    return nets.dice_bce(logits, target)


# -- sans-sr ---------------------------------------------------------------------------------------

def sans_sample(rng: np.random.Generator, kinds: tuple[str, ...], factor: int,
                total: float | None = None) -> det.SANSPair:
    kind = kinds[int(rng.integers(len(kinds)))]
    counts = _log_uniform(rng, 1e5, 1e6) if total is None else total
    return det.sans_pair(rng, kind, factor=factor, coarse_shape=(32, 32), total_counts=counts)


def _sans_batch(factor: int) -> Callable[[np.random.Generator, int], nets_batch]:
    def make(rng: np.random.Generator, size: int) -> nets_batch:
        pairs = [sans_sample(rng, det.SANS_TRAIN_KINDS, factor) for _ in range(size)]
        return _tensors([p.coarse_counts for p in pairs]), _tensors([p.fine_expected for p in pairs]), None
    return make


IQ_WEIGHT = 30.0  # set once, not tuned: large enough that ring bias of a few sigma dominates the loss


def ring_sums(image: torch.Tensor) -> torch.Tensor:
    """Sums of ``b x 1 x h x w`` images over one-pixel rings about the image centre: ``b x rings``."""
    b, _, h, w = image.shape
    yy, xx = torch.meshgrid(torch.arange(h, device=image.device) - (h - 1) / 2,
                            torch.arange(w, device=image.device) - (w - 1) / 2, indexing="ij")
    ring = torch.floor(torch.hypot(yy, xx)).long().reshape(-1)
    out = torch.zeros((b, int(ring.max()) + 1), dtype=image.dtype, device=image.device)
    return out.index_add_(1, ring, image.reshape(b, -1))


def _sans_loss(fine: torch.Tensor, target: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    # the ring sums' chi-square (Poisson variance of the true sums), per pixel like the NLL
    est, true = ring_sums(fine), ring_sums(target)
    chi2 = ((est - true) ** 2 / (2.0 * true.clamp(min=1.0))).sum() / fine[:, 0].numel()
    return nets.poisson_nll(fine, target) + IQ_WEIGHT * chi2


nets_batch = tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]


def _tensors(arrays: list[np.ndarray]) -> torch.Tensor:
    return torch.as_tensor(np.stack(arrays)[:, None].astype(np.float32))


@dataclass(frozen=True)
class Task:
    """What ``beampilot train NAME`` trains: the network, its data and loss."""

    name: str
    architecture: str
    architecture_config: dict[str, Any]
    data: dict[str, Any]
    steps: int
    batch: int


TASKS: dict[str, Task] = {
    "denoise": Task("denoise", "poisson-denoiser-unet", {"width": 16, "depth": 3},
                    {"generator": "simulators.detector.denoise_frame", "kinds": list(det.DENOISE_TRAIN_KINDS),
                     "held_out_kinds": list(det.DENOISE_HELD_OUT_KINDS), "mean_counts": [0.01, 100.0],
                     "shape": [PATCH, PATCH], "effects": "random_effects (photon-counting or integrating)"},
                    steps=1500, batch=12),
    "bragg": Task("bragg", "bragg-peak-unet", {"dims": 2, "width": 16, "depth": 3},
                  {"generator": "simulators.detector.bragg_frame_2d", "shape": [PATCH, PATCH], "n_peaks": [1, 6],
                   "count_scale": [0.05, 3.0], "effects": "random_effects (photon-counting)"},
                  steps=1500, batch=12),
    "bragg-tof": Task("bragg-tof", "bragg-peak-unet", {"dims": 3, "width": 8, "depth": 3},
                      {"generator": "simulators.detector.bragg_volume_tof", "shape": [TOF_PATCH] * 3,
                       "n_peaks": [1, 6], "sigma": [0.8, 2.0], "count_scale": [0.05, 3.0],
                       "effects": "random_effects (photon-counting, detector axes)"},
                      steps=1500, batch=8),
    "sans-sr": Task("sans-sr", "sans-super-resolver", {"factor": 4, "width": 24, "depth": 3},
                    {"generator": "simulators.detector.sans_pair", "kinds": list(det.SANS_TRAIN_KINDS),
                     "held_out_kinds": list(det.SANS_HELD_OUT_KINDS), "coarse_shape": [32, 32],
                     "total_counts": [1e5, 1e6],
                     "kind_recipes": {k: det.SANS_KINDS[k].recipe()
                                      for k in det.SANS_TRAIN_KINDS + det.SANS_HELD_OUT_KINDS}},
                    steps=1500, batch=8),
}


def _make_batch(task: Task, noise2noise: bool) -> Callable[[np.random.Generator, int], nets_batch]:
    if task.name == "denoise":
        return _denoise_batch(noise2noise, bool(task.architecture_config.get("read_noise", False)))
    if task.name == "bragg":
        return _bragg_batch
    if task.name == "bragg-tof":
        return _bragg_tof_batch
    return _sans_batch(task.architecture_config["factor"])


_LOSSES = {"denoise": _denoise_loss, "bragg": _bragg_loss, "bragg-tof": _bragg_loss, "sans-sr": _sans_loss}


def _with_architecture(task: Task, overrides: dict[str, Any]) -> Task:
    """``task`` with its network's keyword arguments updated by ``overrides``, checked by building it."""
    config = {**task.architecture_config, **overrides}
    try:
        ARCHITECTURES[task.architecture](**config)
    except (TypeError, ValueError) as err:
        raise ValueError(f"architecture config {overrides} does not fit {task.architecture!r} "
                         f"(defaults {task.architecture_config}): {err}") from None
    return replace(task, architecture_config=config)


def _provenance(record: WeightsRecord) -> dict[str, Any]:
    """What a fine-tune records of the weights it started from: their name, checksum, how they
    were trained (steps, seed, learning rate, loss) and on what data, and the same of theirs, so
    a chain of fine-tunes can be traced back to a random start with every link's recipe."""
    t = record.training
    return {"weights": record.name, "sha256": record.sha256, "steps": t.get("steps"), "seed": t.get("seed"),
            "lr": t.get("lr"), "loss": t.get("loss"), "data": record.data, "init": t.get("init")}


def run_training(task_name: str, out: Path, *, steps: int | None = None, batch: int | None = None,
                 seed: int = 0, factor: int | None = None, noise2noise: bool = False, n_eval: int = 24,
                 architecture_config: dict[str, Any] | None = None, threads: int | None = None,
                 init: str | Path | None = None, lr: float | None = None,
                 progress: Callable[[int, float], None] | None = None) -> dict[str, Any]:
    """Train, evaluate on held-out data, write the weights; return the record as a dict.

    ``architecture_config`` overrides keyword arguments of the task's network (for example
    ``{"unshuffle": 2}``); the weights' metadata records the full configuration. ``threads``:
    torch CPU threads while training (default: torch's). ``init``: start from these weights (a
    shipped name or a path; loaded through the registry, so checksum-verified) instead of a
    random initialisation, to fine-tune them; their network configuration is taken over, and the
    metadata records their name, checksum, training recipe and data (and theirs, down the chain).
    ``lr``: the peak learning rate (default :class:`TrainConfig`'s); a fine-tune usually wants a
    smaller one.
    """
    from agents.config import writable_dir
    from agents.detector_eval import evaluate

    try:
        writable_dir(out)  # before the training, not after it
    except ValueError as err:
        raise ValueError(f"{err} for the weights (NAME.pt and NAME.json)") from None
    task = TASKS[task_name]
    start: nn.Module | None = None
    start_record: WeightsRecord | None = None
    if init is not None:
        try:
            start, start_record = load_weights(init, architecture=task.architecture)
        except WeightsError as err:
            raise ValueError(f"--init {init}: {err}") from None
        dims = task.architecture_config.get("dims")
        if dims is not None and start.net.dims != dims:  # the network built, whatever its metadata names
            raise ValueError(f"--init {init} is a {start.net.dims}D network; "
                             f"{task_name} trains {dims}D ones: start from {task_name} weights")
        # exactly their configuration: the task's defaults may name keywords they predate
        task = replace(task, architecture_config=dict(start_record.architecture_config))
    if factor is not None:
        if task_name != "sans-sr":
            raise ValueError("--factor applies to sans-sr only")
        task = _with_architecture(task, {"factor": factor})
    if architecture_config:
        dims = task.architecture_config.get("dims")
        if "dims" in architecture_config and architecture_config["dims"] != dims:
            raise ValueError(f"--arch dims={architecture_config['dims']!r}: {task_name} trains "
                             f"{'a network without dims' if dims is None else f'{dims}D networks'}; "
                             "the task chooses it (bragg: 2D frames, bragg-tof: 3D volumes)")
        task = _with_architecture(task, architecture_config)
    config = TrainConfig(steps=steps or task.steps, batch=batch or task.batch, seed=seed, threads=threads,
                         **({"lr": lr} if lr is not None else {}))
    if start is None or start_record is None:
        torch.manual_seed(seed)  # the initial weights too
        model = ARCHITECTURES[task.architecture](**task.architecture_config)
    elif (isinstance(start, nets.PoissonDenoiser) and not start.read_noise
          and task.architecture_config == {**start_record.architecture_config, "read_noise": True}):
        model = nets.PoissonDenoiser.told_read_noise(start)  # widened: the new channel starts at zero
    elif start_record.architecture_config != task.architecture_config:
        raise ValueError(f"--init {init} holds a {start_record.architecture_config} network, but --factor/--arch "
                         f"ask for {task.architecture_config}: drop them, or start from matching weights")
    else:
        model = start  # the registry built it from that configuration and loaded the weights
    t0 = time.perf_counter()
    history = train(model, _make_batch(task, noise2noise), _LOSSES[task_name], config, progress=progress,
                    device=torch.device("cpu") if not torch.cuda.is_available() else None)
    metrics = evaluate(task_name, model, seed=seed + EVAL_SEED_OFFSET, n=n_eval,
                       factor=task.architecture_config.get("factor"))
    losses = history["losses"]
    name = task_name if task_name != "sans-sr" else f"sans-sr-x{task.architecture_config['factor']}"
    record = WeightsRecord(
        name=name, architecture=task.architecture, architecture_config=task.architecture_config,
        training={**asdict(config), "loss": {"denoise": "poisson_nll" + (" (noise2noise)" if noise2noise else ""),
                                             "bragg": "bce+dice", "bragg-tof": "bce+dice",
                                             "sans-sr": f"poisson_nll + {IQ_WEIGHT:g} x I(Q) ring chi2"}[task_name],
                  "optimizer": "adam, cosine decay", "final_loss": float(np.mean(losses[-50:])),
                  "wall_s": round(time.perf_counter() - t0, 1), "parameters": nets.n_parameters(model),
                  "init": None if start_record is None else _provenance(start_record)},
        data={**task.data, "train_seed": seed, "eval_seed": seed + EVAL_SEED_OFFSET},
        metrics=metrics,
    )
    pt = save_weights(model, out, record)
    return json.loads(pt.with_suffix(".json").read_text())

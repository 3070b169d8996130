"""Detector networks: a Poisson denoiser, a Bragg-peak U-Net (2D and 3D), a SANS super-resolver.

All three share one building block, a small U-Net (:class:`UNet`) in 2D or 3D: two convolutions
per level, max-pooling down, transposed convolutions up, skip connections by concatenation.
They run on :func:`models.device.default_device` (CUDA when present), in batches, channels-last,
and on CUDA may use bf16 autocast (:func:`infer`). The blocks' activation is an exact GELU or a
ReLU (``activation``, recorded in the weights' metadata); a ReLU network's inference on the CPU
runs each convolution and its ReLU, and each skip connection's sum, as one oneDNN call
(:func:`fused_inference`).

* :class:`PoissonDenoiser` - input: raw counts; the network sees the Anscombe transform of the
  counts (variance-stabilised, so one network serves 0.01 to 100 counts per pixel) and the
  log of the frame's mean level, and predicts the log of a correction to a start: the 3 x 3
  local mean, or with ``gate`` a per-pixel mix (the network's second output) of the local mean
  and the pixel's own counts; ``forward`` returns the expected counts (>= 0). Train it with
  :func:`poisson_nll` against the expected counts (simulated data) or against an independent
  second draw of the same frame (Noise2Noise: the loss is unbiased because
  ``E[second draw] = expected``).
* :class:`PeakUNet` - input: raw counts (log-scaled inside); output: per-pixel (voxel) logits
  of "inside a Bragg peak". Train with :func:`dice_bce`.
* :class:`SuperResolver` - input: a coarse SANS pattern (counts); output: the pattern on a grid
  ``factor`` times finer in each direction, as expected counts per fine pixel (the total kept
  by construction: each coarse pixel's counts are shared among its fine pixels by a softmax).
  :func:`ring_consistent` then scales it to the measured counts of each half-pixel ring about
  the beam, so the azimuthal average users fit keeps to the measurement.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

logger = logging.getLogger(__name__)

__all__ = ["ACTIVATIONS", "PeakUNet", "PoissonDenoiser", "SuperResolver", "UNet", "cpu_sub_batch", "denoiser_input",
           "dice_bce", "fused_inference", "infer", "n_parameters", "poisson_nll"]


def _conv(dims: int) -> type[nn.Module]:
    return nn.Conv2d if dims == 2 else nn.Conv3d


class _GELU(nn.Module):
    """GELU (exact, erf) that runs a channels-last tensor as the contiguous array it is in memory.

    PyTorch's GELU on a tensor in ``channels_last`` layout took 1.5-2x as long as on the same
    numbers in the default layout (2 CPU cores, torch 2.13; it was about 30% of the denoiser's
    time at 512 x 512). Applied to the channels-last view permuted to ``N x ... x C`` (contiguous,
    so the fast path) it gives the default layout's result exactly, and the output keeps the
    input's layout. No parameters: state dicts are those of ``nn.GELU``.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        to_last = (0, *range(2, x.dim()), 1)
        if x.dim() >= 4 and not x.is_contiguous() and x.permute(to_last).is_contiguous():
            back = (0, x.dim() - 1, *range(1, x.dim() - 1))
            return F.gelu(x.permute(to_last)).permute(back)
        return F.gelu(x)


#: The blocks' activations (:class:`UNet`'s ``activation``): neither has parameters, so a state
#: dict does not say which one a network was trained with; its weights' metadata does.
ACTIVATIONS = ("gelu", "relu")


def _activation(name: str) -> nn.Module:
    return _GELU() if name == "gelu" else nn.ReLU()


class _Block(nn.Sequential):
    def __init__(self, dims: int, c_in: int, c_out: int, activation: str = "gelu") -> None:
        conv = _conv(dims)
        super().__init__(conv(c_in, c_out, 3, padding=1), _activation(activation),
                         conv(c_out, c_out, 3, padding=1), _activation(activation))


class UNet(nn.Module):
    """A U-Net of ``depth`` levels with ``width * 2**level`` channels, 2D or 3D.

    ``unshuffle`` (2D only) runs the body on a space-to-depth view of the input: ``C x H x W``
    becomes ``C s^2 x H/s x W/s`` (:func:`torch.nn.functional.pixel_unshuffle`), the head
    predicts ``c_out s^2`` channels and :func:`torch.nn.functional.pixel_shuffle` puts them back
    at full resolution. The body then costs about ``1/s^2`` of the full-resolution one and sees
    ``s`` times further. ``unshuffle=1`` is the plain U-Net (and the same state dict keys).

    ``activation`` is the blocks' nonlinearity, ``"gelu"`` (exact) or ``"relu"``.

    Input sizes must be divisible by ``unshuffle * 2**(depth - 1)``.
    """

    def __init__(self, c_in: int, c_out: int, *, width: int = 16, depth: int = 3, dims: int = 2,
                 unshuffle: int = 1, activation: str = "gelu") -> None:
        super().__init__()
        if dims not in (2, 3) or depth < 1 or width < 1:
            raise ValueError(f"UNet needs dims 2 or 3, depth >= 1, width >= 1; got {dims=}, {depth=}, {width=}")
        if isinstance(unshuffle, bool) or not isinstance(unshuffle, int) or unshuffle < 1:
            raise ValueError(f"unshuffle must be an integer >= 1 (1: full resolution), got {unshuffle=}")
        if unshuffle > 1 and dims != 2:
            raise ValueError(f"unshuffle applies to 2D U-Nets only; got {unshuffle=} with {dims=}")
        if activation not in ACTIVATIONS:
            raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation=}")
        self.dims, self.depth, self.unshuffle, self.activation = dims, depth, unshuffle, activation
        self.width = width
        self.multiple = unshuffle * 2 ** (depth - 1)  # what every input size must be divisible by
        chans = [width * 2**i for i in range(depth)]
        self.down = nn.ModuleList()
        c = c_in * unshuffle**2
        for ch in chans:
            self.down.append(_Block(dims, c, ch, activation))
            c = ch
        up_conv = nn.ConvTranspose2d if dims == 2 else nn.ConvTranspose3d
        self.up = nn.ModuleList(up_conv(chans[i], chans[i - 1], 2, stride=2) for i in range(depth - 1, 0, -1))
        self.merge = nn.ModuleList(_Block(dims, 2 * chans[i - 1], chans[i - 1], activation)
                                   for i in range(depth - 1, 0, -1))
        self.head = _conv(dims)(chans[0], c_out * unshuffle**2, 1)
        self.pool = nn.MaxPool2d(2) if dims == 2 else nn.MaxPool3d(2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if any(s % self.multiple for s in x.shape[2:]):
            raise ValueError(f"input spatial shape {tuple(x.shape[2:])} must be divisible by {self.multiple} "
                             f"(unshuffle={self.unshuffle}, depth={self.depth})")
        if self.unshuffle > 1:
            x = F.pixel_unshuffle(x, self.unshuffle)
        if _fusable(self, x):
            try:
                x = self._body(x, fused=True)
            except RuntimeError as err:  # a oneDNN build without these post-operations
                _fusion["enabled"] = False
                logger.warning("fused CPU inference failed (%s); running unfused from now on", err)
                x = self._body(x, fused=False)
        else:
            x = self._body(x, fused=False)
        return F.pixel_shuffle(x, self.unshuffle) if self.unshuffle > 1 else x

    def _body(self, x: torch.Tensor, *, fused: bool) -> torch.Tensor:
        skips = []
        for i, block in enumerate(self.down):
            x = _fused_block(block, x) if fused else block(x)
            if i < self.depth - 1:
                skips.append(x)
                x = self.pool(x)
        for up, merge in zip(self.up, self.merge, strict=True):
            x = up(x)
            x = _fused_merge(merge, x, skips.pop()) if fused else merge(torch.cat([x, skips.pop()], dim=1))
        return self.head(x)


# -- fused CPU inference for ReLU U-Nets -----------------------------------------------------------
# oneDNN applies a ReLU, and a sum before it, as post-operations of a convolution, in the same pass
# over the output (``torch.ops.mkldnn._convolution_pointwise``, the kernels torch's own
# ``torch.compile`` emits for the CPU). A ReLU U-Net's blocks then need no pass of their own for
# the activation, and a merge block's first convolution needs no concatenation: the convolution
# of ``cat([up, skip])`` is the sum of one over ``up`` and one over ``skip`` with the two halves of
# its weight, so the second convolution adds the first's output before its ReLU. An exact GELU is
# compute-bound rather than memory-bound on the CPU: fusing it gained nothing measurable.
_MKLDNN_POINTWISE = getattr(getattr(torch.ops, "mkldnn", None), "_convolution_pointwise", None)
_fusion = {"enabled": True}


@contextmanager
def fused_inference(enabled: bool) -> Iterator[None]:
    """Allow (``True``) or forbid (``False``) fused CPU inference inside the block, then restore
    the previous setting; for side-by-side timing and for debugging."""
    before = _fusion["enabled"]
    _fusion["enabled"] = bool(enabled)
    try:
        yield
    finally:
        _fusion["enabled"] = before


def _fusable(net: UNet, x: torch.Tensor) -> bool:
    """Whether ``net`` runs fused on ``x``: a ReLU U-Net, in evaluation mode and without autograd,
    float32 on the CPU, with oneDNN there; and no earlier fused call failed in this process."""
    return (net.activation == "relu" and _fusion["enabled"] and _MKLDNN_POINTWISE is not None
            and not net.training and not torch.is_grad_enabled() and x.device.type == "cpu"
            and x.dtype == torch.float32 and torch.backends.mkldnn.is_available())


def _conv_args(conv: nn.Module) -> tuple[list[int], list[int], list[int], int]:
    return list(conv.padding), list(conv.stride), list(conv.dilation), conv.groups


def _conv_relu(conv: nn.Module, x: torch.Tensor, add: torch.Tensor | None = None,
               weight: torch.Tensor | None = None) -> torch.Tensor:
    """``relu(conv(x) [+ add])`` in one oneDNN call (``weight`` replaces ``conv.weight``)."""
    w = conv.weight if weight is None else weight
    if add is None:
        return _MKLDNN_POINTWISE(x, w, conv.bias, *_conv_args(conv), "relu", [], "")
    return _MKLDNN_POINTWISE.binary(x, add, w, conv.bias, *_conv_args(conv), "add", 1.0, "relu", [], "")


def _fused_block(block: _Block, x: torch.Tensor) -> torch.Tensor:
    return _conv_relu(block[2], _conv_relu(block[0], x))


def _fused_merge(block: _Block, up: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
    """``block(cat([up, skip]))`` without the concatenation."""
    from models.device import channels_last

    conv, c = block[0], up.shape[1]
    layout = channels_last(conv.weight.dim())
    w_up = conv.weight[:, :c].contiguous(memory_format=layout)
    w_skip = conv.weight[:, c:].contiguous(memory_format=layout)
    from_skip = _MKLDNN_POINTWISE(skip, w_skip, None, *_conv_args(conv), "none", [], "")
    return _conv_relu(block[2], _conv_relu(conv, up, add=from_skip, weight=w_up))


def _local_mean(x: torch.Tensor) -> torch.Tensor:
    """The 3 x 3 mean around each pixel, edges repeated (the start the networks correct)."""
    return F.avg_pool2d(F.pad(x, (1, 1, 1, 1), mode="replicate"), 3, stride=1)


def _anscombe(x: torch.Tensor) -> torch.Tensor:
    return 2.0 * torch.sqrt(torch.clamp(x, min=0.0) + 0.375)


def _generalized_anscombe(x: torch.Tensor, var: torch.Tensor) -> torch.Tensor:
    """``2 sqrt(max(x + 3/8 + var, 0))`` for readings ``x`` with Gaussian read-noise variance ``var``
    (as :func:`models.classical.generalized_anscombe`, in torch)."""
    return 2.0 * torch.sqrt(torch.clamp(x + 0.375 + var, min=0.0))


MirrorView = tuple[bool, tuple[int, ...]]  # (transposed, flipped axes) of a frame's last two axes


def mirror_mean(run: Callable[[torch.Tensor, MirrorView], torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """The mean of ``run`` over the mirror images of ``x`` in its last two axes, each result
    mirrored back.

    The images are ``x`` flipped along neither, one or both of its last two axes, and, when those
    two are equal in length, the same four of ``x`` transposed in them: 4 or 8 calls of
    ``run(image, (transposed, flipped_axes))`` (the image is transposed first, then flipped).
    ``run`` must return a tensor laid out like its input in the last two axes (each axis may be
    scaled by the same integer, as a super-resolver's is). Other axes (batch, channels, time of
    flight) are left as they are.
    """
    h, w = x.shape[-2:]
    total: torch.Tensor | None = None
    n = 0
    for swap in (False, True) if h == w else (False,):
        for flips in ((), (-2,), (-1,), (-2, -1)):
            image = x.transpose(-2, -1) if swap else x
            y = run(torch.flip(image, flips) if flips else image, (swap, flips))
            y = torch.flip(y, flips) if flips else y
            y = y.transpose(-2, -1) if swap else y
            total, n = (y if total is None else total + y), n + 1
    assert total is not None
    return total / n


class _MirrorAveraged(nn.Module):
    """A network whose output may be the mean over the input's mirror images (:func:`mirror_mean`)
    in evaluation mode, when :attr:`symmetric_average` is set. Training always takes one pass.
    Subclasses implement ``_forward(x, view)``; ``view`` says how ``x`` was mirrored."""

    symmetric_average = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training or not self.symmetric_average:
            return self._forward(x, (False, ()))
        return mirror_mean(self._forward, x)

    def _forward(self, x: torch.Tensor, view: MirrorView) -> torch.Tensor:
        raise NotImplementedError


class PoissonDenoiser(_MirrorAveraged):
    """Counts in, expected counts out (see the module docstring).

    ``unshuffle`` runs the U-Net body at ``1/unshuffle`` resolution (see :class:`UNet`); the
    input transform and the local-mean residual stay at full resolution.

    With ``read_noise`` the network is told the detector's Gaussian read noise: the input has two
    channels, the raw readings (an integrating detector's may be negative) and the read noise
    ``sigma`` (counts rms) of each pixel (0 on a photon-counting detector). The network then sees
    the generalized Anscombe transform ``2 sqrt(max(x + 3/8 + sigma^2, 0))`` of the readings
    (variance-stabilising for Poisson plus Gaussian noise, Makitalo & Foi 2013) and a third channel
    ``log(1 + sigma^2 / level)``, how far the read noise swamps the counts. Without it, read noise
    looks like Poisson signal, and the network smooths too little where it dominates (a frame of
    0.1 counts per pixel under 0.5-3 counts rms). :meth:`told_read_noise` turns a network trained
    without it into one with it that gives the same output where ``sigma`` is 0, to fine-tune.
    """

    def __init__(self, *, width: int = 16, depth: int = 3, unshuffle: int = 1, activation: str = "gelu",
                 gate: bool = False, read_noise: bool = False) -> None:
        super().__init__()
        for name, value in (("gate", gate), ("read_noise", read_noise)):
            if not isinstance(value, bool):
                raise ValueError(f"{name} must be true or false, got {name}={value!r}")
        self.gate = gate
        self.read_noise = read_noise
        self.net = UNet(3 if read_noise else 2, 2 if gate else 1, width=width, depth=depth, dims=2,
                        unshuffle=unshuffle, activation=activation)

    @property
    def in_channels(self) -> int:
        """Input channels: 1 (counts), or 2 (readings, read noise) with ``read_noise``."""
        return 2 if self.read_noise else 1

    @classmethod
    def told_read_noise(cls, blind: PoissonDenoiser) -> PoissonDenoiser:
        """A ``read_noise`` network made from ``blind`` (one without): its weights, and the first
        convolution widened by the read-noise channel with zero weights, so on frames with no read
        noise it gives ``blind``'s output exactly (the generalized transform is then the plain one)."""
        if blind.read_noise:
            raise ValueError("this network is told the read noise already")
        told = cls(width=blind.net.width, depth=blind.net.depth, unshuffle=blind.net.unshuffle,
                   activation=blind.net.activation, gate=blind.gate, read_noise=True)
        state = blind.state_dict()
        key = "net.down.0.0.weight"
        wide = torch.zeros_like(told.state_dict()[key])
        wide[:, : state[key].shape[1]] = state[key]
        told.load_state_dict({**state, key: wide})
        return told

    def _forward(self, x: torch.Tensor, view: MirrorView) -> torch.Tensor:
        if x.shape[1] != self.in_channels:
            raise ValueError(f"the denoiser takes {self.in_channels} input channel(s) "
                             f"({'readings, read noise' if self.read_noise else 'counts'}), got {x.shape[1]}")
        # one channel of a channels-last input is strided; the pooling of the local mean on it ran
        # 3x slower (5.3 against 1.6 ms at 512 x 512) than on a contiguous copy (0.3 ms)
        counts = x[:, :1].contiguous()
        level = counts.mean(dim=(-2, -1), keepdim=True).clamp(min=1e-3)
        if self.read_noise:
            var = x[:, 1:2] ** 2
            a = _generalized_anscombe(counts, var)
            a_level = _generalized_anscombe(level, var.mean(dim=(-2, -1), keepdim=True))
            extra = [torch.log1p(var / level)]
        else:
            a, a_level, extra = _anscombe(counts), _anscombe(level), []
        z = torch.cat([(a - a_level) / a_level.clamp(min=1.0), torch.log(level).expand_as(counts), *extra], dim=1)
        out = self.net(z)
        # residual on a local mean: at high counts the network only corrects it, at low counts
        # it replaces it (the mean is floored at a tenth of the frame's level)
        positive = torch.clamp(counts, min=0.0)
        base = _local_mean(positive) + 0.1 * level
        if self.gate:
            # with ``gate`` the network also says, per pixel, how far to start from the pixel's own
            # counts instead: where a pixel is far above or below its neighbours at many counts
            # (speckle, a sharp spot) the local mean is a poor start, and correcting it by a
            # factor of several is what overshot there (2.3x the truth at 2,000 counts)
            base = base + torch.sigmoid(out[:, 1:]) * (positive - base)
            out = out[:, :1]
        return base * torch.exp(torch.clamp(out, -20.0, 20.0))


def denoiser_input(model: nn.Module, counts: torch.Tensor, read_noise: float | torch.Tensor = 0.0) -> torch.Tensor:
    """A batch of counts (``N x 1 x H x W``) as ``model`` takes it: for a denoiser told the read
    noise (:class:`PoissonDenoiser` with ``read_noise``), with the second channel holding
    ``read_noise`` (counts rms: a number, or one per frame, ``N x 1 x 1 x 1``) at every pixel;
    for any other network, as it is."""
    if not getattr(model, "read_noise", False):
        return counts
    sigma = torch.as_tensor(read_noise, dtype=counts.dtype, device=counts.device).expand_as(counts)
    return torch.cat([counts, sigma], dim=1)


class PeakUNet(_MirrorAveraged):
    """Counts in, peak logits out, in 2D (``dims=2``) or 3D time-of-flight crops (``dims=3``).

    ``unshuffle`` (2D only) runs the U-Net body at ``1/unshuffle`` resolution (see :class:`UNet`);
    the log scaling and the logits stay at full resolution.
    """

    def __init__(self, *, dims: int = 2, width: int = 16, depth: int = 3, unshuffle: int = 1,
                 activation: str = "gelu") -> None:
        super().__init__()
        self.net = UNet(1, 1, width=width, depth=depth, dims=dims, unshuffle=unshuffle, activation=activation)

    def _forward(self, counts: torch.Tensor, view: MirrorView) -> torch.Tensor:
        spatial = tuple(range(2, counts.dim()))
        x = torch.log1p(torch.clamp(counts, min=0.0))
        x = x - x.mean(dim=spatial, keepdim=True)
        return self.net(x)


class SuperResolver(_MirrorAveraged):
    """Coarse counts in, fine expected counts out: a smoothed estimate of each coarse pixel's
    expected total, corrected by the network, split among its ``factor x factor`` fine pixels.

    With ``beam=True`` the network also sees where the beam is: three more input channels per
    coarse pixel, ``(dy, dx) / (1 + r)`` and ``1 / (1 + r)``, ``(dy, dx)`` its offset from the
    beam centre and ``r`` its distance, in coarse pixels (bounded, and the same on a detector of
    any size). A convolution alone cannot tell in which corner of the four brightest pixels the
    beam sits, which is where a pattern is steepest. The centre is :attr:`beam_center`
    ``(row, column)`` in coarse pixel coordinates, or the input's centre when it is None; a
    caller that pads its frames sets it to the centre of the unpadded frame. Measured, it did not
    help, and the shipped weights are without it: trained as the shipped ones (width 32, 16000 /
    12000 steps, seed 0), on probe seeds 555-559 (30 patterns of held-out kinds) the reduced
    chi-square of I(Q) was 1.82 / 2.08 at 2x / 4x against 1.74 / 1.87 without, and the inner
    four I(Q) bins' share of it did not fall (4x: 0.76 against 0.64).

    In evaluation mode the pattern is, by default (:attr:`symmetric_average`, which only the
    super-resolver has on by default), the mean of the network's patterns for the frame mirrored
    along its rows, its columns and both, and also transposed when the frame is square, each
    mirrored back (:func:`mirror_mean`; the beam centre is mirrored with the frame): the mirror
    images of a pattern are patterns too, and the network is not exactly equivariant, so its
    errors partly average out. It costs 4 or 8 forward passes. Training always uses one.
    """

    def __init__(self, *, factor: int = 4, width: int = 24, depth: int = 3, activation: str = "gelu",
                 beam: bool = False) -> None:
        super().__init__()
        if factor not in (2, 4):
            raise ValueError(f"factor must be 2 or 4, got {factor}")
        if not isinstance(beam, bool):
            raise ValueError(f"beam must be true or false, got {beam=}")
        self.factor, self.beam = factor, beam
        self.beam_center: tuple[float, float] | None = None
        self.symmetric_average = True
        self.net = UNet(4 if beam else 1, factor * factor + 1, width=width, depth=depth, dims=2, activation=activation)

    @staticmethod
    def _beam_channels(like: torch.Tensor, center: tuple[float, float]) -> torch.Tensor:
        b, _, h, w = like.shape
        cy, cx = center
        dy = (torch.arange(h, dtype=like.dtype, device=like.device) - cy).reshape(h, 1).expand(h, w)
        dx = (torch.arange(w, dtype=like.dtype, device=like.device) - cx).reshape(1, w).expand(h, w)
        near = 1.0 / (1.0 + torch.hypot(dy, dx))
        return torch.stack([dy * near, dx * near, near]).unsqueeze(0).expand(b, 3, h, w)

    def _forward(self, coarse: torch.Tensor, view: MirrorView) -> torch.Tensor:
        h, w = coarse.shape[-2:]  # a transposed view is of a square frame: the same shape
        cy, cx = ((h - 1) / 2, (w - 1) / 2) if self.beam_center is None else self.beam_center
        swap, flips = view  # where the beam is in this mirror image of the frame
        cy, cx = (cx, cy) if swap else (cy, cx)
        return self._pattern(coarse, (h - 1 - cy if -2 in flips else cy, w - 1 - cx if -1 in flips else cx))

    def _pattern(self, coarse: torch.Tensor, center: tuple[float, float]) -> torch.Tensor:
        f = self.factor
        x = torch.log1p(torch.clamp(coarse, min=0.0))
        x = x - x.mean(dim=(-2, -1), keepdim=True)
        if self.beam:
            x = torch.cat([x, self._beam_channels(x, center)], dim=1)
        out = self.net(x)
        share = torch.softmax(out[:, : f * f], dim=1)  # how a coarse pixel's counts split among its f*f
        # a smooth estimate of the coarse pixel's expected total, multiplicatively corrected
        smooth = _local_mean(torch.clamp(coarse, min=0.0))
        total = smooth * torch.exp(torch.clamp(out[:, f * f:], -5.0, 5.0))
        fine = F.pixel_shuffle(share * total, f)
        return fine


def ring_consistent(fine: np.ndarray, coarse: np.ndarray, factor: int, *,
                    center: tuple[float, float] | None = None, mask: np.ndarray | None = None,
                    alpha: float = 3.0, ring_width: float = 0.5) -> np.ndarray:
    """Scale a super-resolved SANS pattern so that each ring of the coarse detector (the coarse
    pixels whose centres lie within ``ring_width`` of each other in radius) holds the counts the
    detector measured in it.

    The azimuthal average ``I(Q)`` that users fit then follows the measurement on the scale of
    the rings (its noise is the measurement's own), while the network still decides how the
    counts spread inside each pixel. Each ring ``a`` gets the factor
    ``(measured_a + alpha) / (predicted_a + alpha)``: ``alpha`` counts of shrinkage keep a nearly
    empty outer ring from being zeroed by a Poisson draw of none. The pixels' centres sample the
    radius far more finely than one pixel, so rings narrower than a pixel still hold many
    pixels: on the probe patterns of seeds 555, 556 and 600 (30 of each factor, held-out sample
    kinds, ``benchmarks/detector_ml.py``'s reduced chi-square of I(Q)) half-pixel rings gave a
    lower mean chi-square than one-pixel rings in all six cases (2x: 2.27 / 1.37 / 1.50 against
    2.60 / 1.43 / 1.66; 4x: 1.66 / 1.91 / 1.57 against 1.75 / 2.08 / 1.59) and the same
    log-intensity PSNR (+0.01 to +0.03 dB); rings of 0.35 or 0.25 pixel did no better.

    Parameters
    ----------
    fine : np.ndarray
        The network's pattern, ``factor`` times finer than ``coarse`` in each direction.
    coarse : np.ndarray
        The measured counts, 2D.
    factor : int
        2 or 4.
    center : tuple[float, float] | None
        Beam centre ``(row, column)`` in coarse pixel coordinates (pixel centres at integers);
        None: the detector centre.
    mask : np.ndarray | None
        True where a coarse pixel is left out; those pixels take no part in either sum and are
        left as the network made them.
    alpha : float
        Shrinkage, in counts (>= 0).
    ring_width : float
        Width of a ring in coarse pixels (> 0); 1 gives one-pixel rings.

    Returns
    -------
    np.ndarray
        The scaled pattern, float64, ``fine``'s shape.
    """
    coarse = np.asarray(coarse, dtype=np.float64)
    fine = np.asarray(fine, dtype=np.float64)
    if coarse.ndim != 2 or fine.shape != (coarse.shape[0] * factor, coarse.shape[1] * factor):
        raise ValueError(f"fine must be {factor} times coarse's 2D shape; got fine {list(fine.shape)}, "
                         f"coarse {list(coarse.shape)}")
    if not alpha >= 0:
        raise ValueError(f"alpha must be >= 0 counts; got {alpha=}")
    if not (ring_width > 0 and np.isfinite(ring_width)):
        raise ValueError(f"ring_width must be > 0 coarse pixels; got {ring_width=}")
    h, w = coarse.shape
    cy, cx = ((h - 1) / 2, (w - 1) / 2) if center is None else (float(center[0]), float(center[1]))
    yy, xx = np.mgrid[0:h, 0:w]
    ring = np.floor(np.hypot(yy - cy, xx - cx) / ring_width).astype(np.intp)
    use = np.ones(coarse.shape, bool) if mask is None else ~np.asarray(mask, bool)
    predicted = fine.reshape(h, factor, w, factor).sum(axis=(1, 3))
    n = int(ring.max()) + 1
    p_sum = np.bincount(ring[use], predicted[use], n)
    m_sum = np.bincount(ring[use], coarse[use], n)
    scale = np.ones(n)
    ok = p_sum + alpha > 0
    scale[ok] = (m_sum[ok] + alpha) / (p_sum[ok] + alpha)
    per_pixel = np.where(use, scale[ring], 1.0)
    return fine * np.repeat(np.repeat(per_pixel, factor, axis=0), factor, axis=1)


def poisson_nll(rate: torch.Tensor, target: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Mean Poisson negative log-likelihood ``rate - target log rate`` (constant terms dropped).

    ``target`` may be the expected counts or an independent draw (Noise2Noise). ``mask``: 1 where
    the pixel counts.
    """
    loss = rate - target * torch.log(rate.clamp(min=1e-8))
    if mask is not None:
        return (loss * mask).sum() / mask.sum().clamp(min=1.0)
    return loss.mean()


def dice_bce(logits: torch.Tensor, target: torch.Tensor, *, dice_weight: float = 1.0) -> torch.Tensor:
    """Binary cross-entropy plus soft Dice loss (peaks are a small fraction of the pixels)."""
    bce = F.binary_cross_entropy_with_logits(logits, target)
    p = torch.sigmoid(logits)
    dims = tuple(range(1, logits.dim()))
    inter = (p * target).sum(dims)
    dice = 1.0 - (2.0 * inter + 1.0) / (p.sum(dims) + target.sum(dims) + 1.0)
    return bce + dice_weight * dice.mean()


@contextmanager
def _autocast(device: torch.device, bf16: bool) -> Iterator[None]:
    if bf16 and device.type == "cuda":
        with torch.autocast("cuda", dtype=torch.bfloat16):
            yield
    else:
        yield


#: Pixels (voxels) of one CPU forward call: larger batches are split into calls of about this
#: many. With the shipped networks on 2 cores (torch 2.13, channels-last, median of 4 rounds,
#: denoise + mask together), one call per batch of 8 frames ran 4.7 frames/s at 512 x 512 and
#: 0.66 at 1024 x 1024, one frame per call 8.9 and 1.5; at 256 x 256 two frames per call did
#: best (28.7 against 25.0 one at a time and 24.1 eight), at 128 x 128 two to eight (95-98
#: against 66). The activations of a larger call no longer stay in the cores' caches.
CPU_PIXELS_PER_CALL = 1 << 17


def cpu_sub_batch(shape: tuple[int, ...] | torch.Size, requested: int | None = None) -> int:
    """Frames per forward call on the CPU for a batch of ``shape`` (``N x C x ...``): about
    :data:`CPU_PIXELS_PER_CALL` pixels, at least 2 for 3D volumes (see :func:`infer`), at most
    ``requested`` (default: the whole batch) and at least 1."""
    n = int(shape[0])
    per_frame = max(1, int(np.prod(shape[2:])))
    sub = max(1, CPU_PIXELS_PER_CALL // per_frame)
    if len(shape) == 5:
        sub = max(sub, 2)
    return max(1, min(sub, requested or n, n))


def _pad_3d_single(x: torch.Tensor) -> torch.Tensor:
    """One 3D volume with a zero volume after it. torch 2.13's CPU Conv3d takes its slow
    reference kernel (``aten::slow_conv3d_forward``, 16.7 ms a convolution against 2.2 ms in
    oneDNN for the shipped TOF U-Net at 32^3) for a batch of one; a batch of two takes oneDNN,
    so even with the wasted second volume one 32^3 volume ran 5.9x and one 64^3 volume 1.8x
    faster through :func:`infer` (2 cores). Each output depends only on its own input (no
    batch statistics)."""
    return torch.cat([x, torch.zeros_like(x)]) if x.dim() == 5 and len(x) == 1 else x


def infer(model: nn.Module, batch: torch.Tensor, *, device: torch.device | None = None, bf16: bool = False,
          max_batch: int | None = None) -> tuple[torch.Tensor, dict[str, Any]]:
    """Run ``model`` on ``batch`` (N x C x ...) in evaluation mode; returns the output on the CPU
    and a note of what happened.

    Frames and weights go channels-last (``channels_last`` for 2D frames, ``channels_last_3d`` for
    3D volumes) on every device: on 2 CPU cores that ran the shipped denoiser about 2x and the 2D
    Bragg U-Net about 1.4x faster at 512 x 512 than the default layout, with the same results to
    float rounding. ``model``'s parameters are left in that layout.

    ``max_batch`` caps the frames of one forward call (default: the whole batch). On the CPU a
    call holds at most :func:`cpu_sub_batch` frames: about :data:`CPU_PIXELS_PER_CALL` pixels,
    so a batch of large frames runs a frame at a time (faster there than all at once), and 3D
    volumes at least two at a time (a single volume is padded with an empty one, see
    :func:`_pad_3d_single`).

    On CUDA, a ``torch.cuda.OutOfMemoryError`` halves the sub-batch and tries again, down to one
    frame, then falls back to the CPU; the note says so (``{"device": ..., "sub_batch": ...,
    "fallback": reason or None}``). ``bf16`` uses bfloat16 autocast on CUDA (ignored on CPU).
    """
    from models.device import channels_last, default_device

    device = default_device() if device is None else device
    model = model.eval()
    note: dict[str, Any] = {"device": str(device), "sub_batch": None, "fallback": None}
    sub = max_batch or len(batch)
    layout = channels_last(batch.dim())
    while True:
        if device.type == "cpu":
            sub = cpu_sub_batch(batch.shape, sub)
        try:
            model.to(device, memory_format=layout)  # None: as it is
            outs = []
            with torch.inference_mode(), _autocast(device, bf16):
                for i in range(0, len(batch), sub):
                    x = batch[i:i + sub]
                    if device.type == "cpu":
                        x = _pad_3d_single(x)
                    x = x.to(device, non_blocking=True, memory_format=layout)
                    outs.append(model(x)[: min(sub, len(batch) - i)].float().cpu())
            note["sub_batch"] = sub
            return torch.cat(outs), note
        except torch.cuda.OutOfMemoryError as err:
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            if sub > 1:
                sub = max(1, sub // 2)
                note["fallback"] = f"CUDA out of memory; sub-batch halved to {sub}"
                continue
            if device.type == "cpu":  # nothing smaller and nowhere else to go
                raise
            device = torch.device("cpu")
            note["fallback"] = f"CUDA out of memory at one frame ({err}); ran on the CPU"
            note["device"] = "cpu"


def n_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())

"""Tests of models.nets and models.registry: shapes, losses, batched inference, weights that load
only when they are what they claim to be."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from models.nets import (
    PeakUNet,
    PoissonDenoiser,
    SuperResolver,
    UNet,
    cpu_sub_batch,
    dice_bce,
    infer,
    mirror_mean,
    poisson_nll,
    ring_consistent,
)
from models.registry import WeightsError, WeightsRecord, load_weights, save_weights


def test_networks_keep_shapes_and_physical_ranges():
    torch.manual_seed(0)
    counts = torch.poisson(torch.full((2, 1, 32, 32), 0.5))
    rate = PoissonDenoiser(width=8, depth=2)(counts)
    assert rate.shape == counts.shape and bool(torch.all(rate >= 0))
    assert PeakUNet(dims=3, width=4, depth=2)(torch.poisson(torch.ones(1, 1, 8, 16, 16))).shape == (1, 1, 8, 16, 16)
    coarse = torch.poisson(torch.full((1, 1, 16, 16), 50.0))
    sr = SuperResolver(factor=4, width=8, depth=2)
    fine = sr(coarse)
    assert fine.shape == (1, 1, 64, 64) and bool(torch.all(fine >= 0))
    with pytest.raises(ValueError, match="divisible"):
        UNet(1, 1, depth=3)(torch.zeros(1, 1, 10, 10))
    with pytest.raises(ValueError, match="factor"):
        SuperResolver(factor=3)


def test_super_resolver_with_beam_channels_sees_where_the_beam_is():
    torch.manual_seed(0)
    sr = SuperResolver(factor=2, width=4, depth=2, beam=True).eval()
    coarse = torch.poisson(torch.full((2, 1, 8, 8), 30.0))
    near = sr._beam_channels(coarse, (3.5, 3.5))  # (dy, dx) / (1 + r), 1 / (1 + r) about the centre (3.5, 3.5)
    r = math.hypot(3.5, 2.5)
    np.testing.assert_allclose(near[1, :, 0, 6].numpy(), [-3.5 / (1 + r), 2.5 / (1 + r), 1 / (1 + r)], rtol=1e-6)
    at_centre = sr(coarse)
    assert at_centre.shape == (2, 1, 16, 16) and bool(torch.all(at_centre >= 0))
    sr.beam_center = (0.0, 0.0)
    assert not torch.allclose(sr(coarse), at_centre)  # the network is told the beam moved
    plain = SuperResolver(factor=2, width=4, depth=2).eval()
    before = plain(coarse)
    plain.beam_center = (0.0, 0.0)  # without beam channels the centre is not an input
    assert torch.equal(plain(coarse), before)
    with pytest.raises(ValueError, match="beam must be true or false"):
        SuperResolver(beam=1)


@pytest.mark.parametrize("beam", [False, True])
def test_super_resolver_averages_over_the_mirror_images_in_evaluation(beam):
    torch.manual_seed(1)
    sr = SuperResolver(factor=2, width=4, depth=2, beam=beam).eval()
    square = torch.poisson(torch.full((2, 1, 8, 8), 30.0))
    wide = torch.poisson(torch.full((1, 1, 8, 12), 30.0))
    sr.beam_center = (2.0, 5.0)
    one = [sr._pattern(square, (2.0, 5.0))]  # the reference: each mirror image by hand
    for dims in ((-2,), (-1,), (-2, -1)):
        cy, cx = (5.0 if -2 in dims else 2.0), (2.0 if -1 in dims else 5.0)
        one.append(torch.flip(sr._pattern(torch.flip(square, dims), (cy, cx)), dims))
    t = square.transpose(-2, -1)
    for dims in ((), (-2,), (-1,), (-2, -1)):
        cy, cx = (2.0 if -2 in dims else 5.0), (5.0 if -1 in dims else 2.0)
        y = sr._pattern(torch.flip(t, dims) if dims else t, (cy, cx))
        one.append((torch.flip(y, dims) if dims else y).transpose(-2, -1))
    torch.testing.assert_close(sr(square), torch.stack(one).mean(0))
    # so the pattern of a mirrored frame (beam mirrored too) is the mirrored pattern, exactly
    for frame in (square, wide):
        h, w = frame.shape[-2:]
        sr.beam_center = (2.0, 5.0)
        y = sr(frame)
        sr.beam_center = (2.0, w - 1 - 5.0)
        torch.testing.assert_close(sr(torch.flip(frame, (-1,))), torch.flip(y, (-1,)))
        assert y.shape == (frame.shape[0], 1, 2 * h, 2 * w) and bool(torch.all(y >= 0))
    sr.beam_center = (2.0, 5.0)
    assert not torch.allclose(sr(square), one[0])  # the network alone is not equivariant
    sr.symmetric_average = False
    torch.testing.assert_close(sr(square), one[0])
    sr.symmetric_average = True
    sr.train()  # training always takes the network's one pattern
    torch.testing.assert_close(sr(square), one[0])


def test_mirror_mean_mirrors_the_last_two_axes_only_and_maps_results_back():
    x = torch.arange(2 * 3 * 4 * 4, dtype=torch.float64).reshape(1, 2, 3, 4, 4)  # (batch, ch, tof, y, x)
    views = []

    def tilt(image, view):  # not mirror-symmetric: weights rising along the rows, and along time
        views.append(view)
        return image * torch.arange(1.0, 5.0, dtype=image.dtype).reshape(4, 1) * torch.tensor(
            [1.0, 2.0, 3.0], dtype=image.dtype).reshape(3, 1, 1)

    got = mirror_mean(tilt, x)
    assert len(views) == 8 and len(set(views)) == 8  # a square frame: 4 flips, each also transposed
    # the row weights average out over the mirror images (rows and columns alike, being transposed
    # too); the time weights, on an axis left alone, do not
    time = torch.tensor([1.0, 2.0, 3.0], dtype=x.dtype).reshape(3, 1, 1)
    torch.testing.assert_close(got, x * time * 2.5)
    assert torch.equal(mirror_mean(lambda image, view: image, x), x)
    views.clear()
    wide = torch.ones(1, 1, 4, 6, dtype=torch.float64)
    mirror_mean(lambda image, view: views.append(view) or image, wide)
    assert len(views) == 4 and set(views) == {(False, ()), (False, (-1,)), (False, (-2,)), (False, (-2, -1))}


@pytest.mark.parametrize("make", [lambda: PoissonDenoiser(width=4, depth=2), lambda: PeakUNet(width=4, depth=2),
                                  lambda: PeakUNet(dims=3, width=4, depth=2)])
def test_denoiser_and_peak_networks_average_over_mirror_images_only_when_asked(make):
    torch.manual_seed(3)
    net = make().eval()
    shape = (1, 1, 8, 16, 16) if getattr(net.net, "dims", 2) == 3 else (1, 1, 16, 16)
    x = torch.poisson(torch.full(shape, 3.0))
    one = net._forward(x, (False, ()))
    assert net.symmetric_average is False and torch.equal(net(x), one)  # off by default: CPU speed
    net.symmetric_average = True
    torch.testing.assert_close(net(x), mirror_mean(net._forward, x))
    assert not torch.allclose(net(x), one)
    torch.testing.assert_close(net(torch.flip(x, (-1,))), torch.flip(net(x), (-1,)))  # a detector axis
    net.train()
    torch.testing.assert_close(net(x), one)


def test_losses_are_minimised_by_the_truth():
    expected = torch.rand(1, 1, 16, 16) * 5 + 0.1
    draws = torch.poisson(expected.expand(200, 1, 16, 16))
    at_truth = poisson_nll(expected.expand_as(draws), draws)
    assert at_truth < poisson_nll(expected.expand_as(draws) * 1.3, draws)
    assert at_truth < poisson_nll(expected.expand_as(draws) * 0.7, draws)
    target = (torch.rand(2, 1, 16, 16) > 0.8).float()
    assert dice_bce(20 * (2 * target - 1), target) < dice_bce(torch.zeros_like(target), target)


def test_a_denoiser_learns_a_flat_rate_noise2noise_style():
    """A few optimiser steps against independent draws move the estimate to the true rate."""
    torch.manual_seed(1)
    model = PoissonDenoiser(width=8, depth=2)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(60):
        lam = torch.rand(8, 1, 1, 1) * 3 + 0.2
        a, b = torch.poisson(lam.expand(8, 1, 16, 16)), torch.poisson(lam.expand(8, 1, 16, 16))
        loss = poisson_nll(model(a), b)
        opt.zero_grad()
        loss.backward()
        opt.step()
    lam = torch.tensor(2.0)
    out, note = infer(model, torch.poisson(lam.expand(4, 1, 16, 16)), device=torch.device("cpu"), max_batch=2)
    assert note == {"device": "cpu", "sub_batch": 2, "fallback": None}
    assert float(out.mean()) == pytest.approx(2.0, rel=0.15)
    assert float(out.std()) < 0.5 * 2.0**0.5  # smoother than Poisson noise of the raw counts


def test_a_gated_denoiser_starts_from_the_counts_or_the_local_mean_as_its_gate_says():
    """``gate=True``: the head's second channel mixes the pixel's own counts into the start of the
    estimate; fully open the output is the counts, closed it is the ungated local mean."""
    torch.manual_seed(2)
    counts = torch.poisson(torch.full((1, 1, 16, 16), 30.0))
    counts[0, 0, 5, 5] = 2000.0  # a pixel far above its neighbours, as in speckle
    model = PoissonDenoiser(width=4, depth=2, activation="relu", gate=True).eval()
    head = model.net.head
    local = torch.nn.functional.avg_pool2d(torch.nn.functional.pad(counts, (1, 1, 1, 1), mode="replicate"),
                                           3, stride=1)
    with torch.no_grad():
        head.weight.zero_()
        head.bias.copy_(torch.tensor([0.0, 30.0]))  # gate open
        torch.testing.assert_close(model(counts), counts)
        head.bias.copy_(torch.tensor([0.0, -30.0]))  # gate closed
        torch.testing.assert_close(model(counts), local + 0.1 * counts.mean())
    assert PoissonDenoiser(width=4, depth=2).net.head.out_channels == 1  # ungated: as before
    with pytest.raises(ValueError, match="gate"):
        PoissonDenoiser(gate="yes")


@pytest.mark.parametrize("dims", [2, 3])
def test_channels_last_inference_gives_the_plain_forward_pass(dims):
    torch.manual_seed(0)
    model = PeakUNet(dims=dims, width=4, depth=2).eval()
    batch = torch.poisson(torch.full((3, 1) + (8,) * dims, 2.0))
    with torch.inference_mode():
        plain = model(batch)
    out, _ = infer(model, batch, device=torch.device("cpu"))
    fmt = torch.channels_last if dims == 2 else torch.channels_last_3d
    weight = model.net.down[0][2].weight  # a 4 -> 4 channel 3^dims convolution
    assert weight.is_contiguous(memory_format=fmt) and not weight.is_contiguous()  # the layout infer ran in
    torch.testing.assert_close(out, plain, rtol=1e-4, atol=1e-5)


def test_cpu_forward_calls_hold_about_a_fixed_number_of_pixels():
    assert cpu_sub_batch((8, 1, 512, 512)) == 1  # large frames one at a time
    assert cpu_sub_batch((8, 1, 256, 256)) == 2
    assert cpu_sub_batch((8, 1, 128, 128)) == 8
    assert cpu_sub_batch((8, 1, 128, 128), 3) == 3  # never more than asked for
    assert cpu_sub_batch((3, 1, 32, 32)) == 3  # never more than there are
    assert cpu_sub_batch((8, 1, 64, 64, 64)) == 2  # volumes at least two at a time
    assert cpu_sub_batch((1, 1, 64, 64, 64)) == 1


@pytest.mark.parametrize(("shape", "sub"), [((3, 1, 512, 512), 1), ((1, 1, 16, 16, 16), 1), ((3, 1, 80, 80, 80), 2)])
def test_split_and_padded_cpu_calls_give_the_plain_forward_pass(shape, sub):
    torch.manual_seed(0)
    model = PeakUNet(dims=len(shape) - 2, width=2, depth=2).eval()
    batch = torch.poisson(torch.full(shape, 2.0))
    with torch.inference_mode():
        plain = model(batch)
    out, note = infer(model, batch, device=torch.device("cpu"))
    assert note["sub_batch"] == sub and out.shape == plain.shape
    torch.testing.assert_close(out, plain, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize(("dims", "unshuffle", "n", "layout"), [(2, 1, 1, "last"), (2, 2, 3, "plain"), (3, 1, 1, "last"),
                                                           (3, 1, 2, "plain")])
def test_fused_relu_inference_gives_the_unfused_forward_pass(monkeypatch, dims, unshuffle, n, layout):
    from models import nets

    torch.manual_seed(0)
    model = PeakUNet(dims=dims, width=4, depth=3, unshuffle=unshuffle, activation="relu").eval()
    with torch.no_grad():
        for p in model.parameters():  # biases away from 0, so every ReLU cuts somewhere
            p.add_(0.1 * torch.randn_like(p))
    batch = torch.poisson(torch.full((n, 1) + (16,) * dims, 3.0))
    if layout == "last":
        batch = batch.contiguous(memory_format=torch.channels_last if dims == 2 else torch.channels_last_3d)
    calls = []
    pointwise = nets._MKLDNN_POINTWISE

    class Counting:
        def __call__(self, *args):
            calls.append("conv")
            return pointwise(*args)

        def binary(self, *args):
            calls.append("conv+add")
            return pointwise.binary(*args)

    monkeypatch.setitem(nets._fusion, "enabled", True)
    with torch.inference_mode():
        with nets.fused_inference(False):
            plain = model(batch)
        assert nets._fusion["enabled"] is True  # restored
        monkeypatch.setattr(nets, "_MKLDNN_POINTWISE", Counting())
        fused = model(batch)
    # 3 down blocks of 2 convolutions; 2 merge blocks, each the skip's half of its first convolution,
    # the up half with the skip's sum added, and its second convolution
    assert calls.count("conv") == 6 + 2 * 2 and calls.count("conv+add") == 2
    torch.testing.assert_close(fused, plain, rtol=1e-5, atol=1e-5)
    model.train()  # training (autograd) never takes the fused path
    calls.clear()
    model(batch).sum().backward()
    assert not calls


def test_a_failing_fused_call_falls_back_to_the_plain_pass_for_good(monkeypatch, caplog):
    from models import nets

    def broken(*args):
        raise RuntimeError("no such post-op in this oneDNN")

    model = PoissonDenoiser(width=4, depth=2, activation="relu").eval()
    batch = torch.poisson(torch.full((1, 1, 16, 16), 3.0))
    monkeypatch.setitem(nets._fusion, "enabled", True)
    monkeypatch.setattr(nets, "_MKLDNN_POINTWISE", broken)
    with torch.inference_mode():
        out = model(batch)
    assert "running unfused from now on" in caplog.text and nets._fusion["enabled"] is False
    with torch.inference_mode():
        torch.testing.assert_close(out, model(batch))


class _Limited(torch.nn.Module):
    """The identity, but like a device whose memory holds only ``room`` frames: more in one call
    raise CUDA's out-of-memory error (the only way to reach that path without a GPU)."""

    def __init__(self, room: int) -> None:
        super().__init__()
        self.room, self.calls = room, []

    def forward(self, x):
        self.calls.append(len(x))
        if len(x) > self.room:
            raise torch.cuda.OutOfMemoryError(f"{len(x)} frames do not fit")
        return x


def test_out_of_memory_halves_the_sub_batch_until_it_fits_and_says_so():
    from models.nets import infer

    batch = torch.arange(7 * 16, dtype=torch.float32).reshape(7, 1, 4, 4)
    model = _Limited(room=2)
    out, note = infer(model, batch, device=torch.device("cpu"), max_batch=7)
    assert torch.equal(out, batch)  # every frame, in order
    assert note["sub_batch"] == 1 and "sub-batch halved to 1" in note["fallback"]
    assert model.calls[:2] == [7, 3]  # 7 -> 3 -> 1
    with pytest.raises(torch.cuda.OutOfMemoryError):  # one frame does not fit, and this is the CPU
        infer(_Limited(room=0), batch, device=torch.device("cpu"))


def test_activation_must_be_known():
    with pytest.raises(ValueError, match="activation must be one of"):
        UNet(1, 1, activation="tanh")
    assert UNet(1, 1, activation="relu").state_dict().keys() == UNet(1, 1).state_dict().keys()


@pytest.mark.parametrize("dims", [2, 3])
def test_the_blocks_gelu_gives_the_default_layouts_numbers_and_keeps_the_layout(dims):
    from models.nets import _GELU

    fmt = torch.channels_last if dims == 2 else torch.channels_last_3d
    x = 3.0 * torch.randn((2, 5) + (6,) * dims, generator=torch.Generator().manual_seed(1))
    out = _GELU()(x.contiguous(memory_format=fmt))
    assert out.is_contiguous(memory_format=fmt) and out.shape == x.shape
    assert torch.equal(out.contiguous(), torch.nn.functional.gelu(x))  # exact, the erf GELU
    assert torch.equal(_GELU()(x), torch.nn.functional.gelu(x))  # the default layout as it was
    assert not dict(_GELU().state_dict())  # parameterless: shipped state dicts load unchanged


def test_weights_round_trip_and_refusals(tmp_path):
    model = PeakUNet(dims=2, width=4, depth=2)
    record = WeightsRecord(name="bragg-test", architecture="bragg-peak-unet",
                           architecture_config={"dims": 2, "width": 4, "depth": 2},
                           training={"steps": 1}, data={"recipe": "test"}, metrics={"iou": 0.0})
    pt = save_weights(model, tmp_path, record)
    loaded, rec = load_weights(pt, architecture="bragg-peak-unet")
    assert rec.sha256 and rec.training == {"steps": 1}
    x = torch.rand(1, 1, 8, 8)
    assert torch.equal(loaded(x), model.eval()(x))
    with pytest.raises(WeightsError, match="'poisson-denoiser-unet' network was asked for"):
        load_weights(pt, architecture="poisson-denoiser-unet")
    # a corrupted weights file
    data = bytearray(pt.read_bytes())
    data[-20] ^= 0xFF
    pt.write_bytes(bytes(data))
    with pytest.raises(WeightsError, match="checksum mismatch"):
        load_weights(pt)
    # metadata that names another configuration than the state dict has
    save_weights(model, tmp_path, record)
    meta = json.loads((tmp_path / "bragg-test.json").read_text())
    meta["architecture_config"]["width"] = 8
    (tmp_path / "bragg-test.json").write_text(json.dumps(meta))
    with pytest.raises(WeightsError, match="does not fit"):
        load_weights(tmp_path / "bragg-test")
    with pytest.raises(WeightsError, match="no weights"):
        load_weights(tmp_path / "nothing-here")
    with pytest.raises(WeightsError, match="is not a 'poisson-denoiser-unet'"):
        save_weights(model, tmp_path, WeightsRecord(name="x", architecture="poisson-denoiser-unet",
                                                    architecture_config={}))


def test_unshuffled_unet_keeps_full_resolution_and_costs_less():
    """Space-to-depth by 2: the body runs at half resolution, the output has the input's shape,
    and each output pixel has its own value (the head predicts all s*s sub-pixels)."""
    torch.manual_seed(0)
    plain, cheap = UNet(1, 1, width=8, depth=2), UNet(1, 1, width=8, depth=2, unshuffle=2)
    x = torch.rand(2, 1, 16, 24)
    out = cheap(x)
    assert out.shape == x.shape and plain(x).shape == x.shape
    assert len(torch.unique(out[0, 0, :2, :2])) == 4  # sub-pixels not copies of one value
    assert cheap.down[0][0].in_channels == 4 and cheap.head.out_channels == 4
    counts = torch.poisson(torch.full((1, 1, 32, 32), 2.0))
    assert PoissonDenoiser(width=8, depth=2, unshuffle=2)(counts).shape == counts.shape
    assert PeakUNet(width=8, depth=2, unshuffle=2)(counts).shape == counts.shape
    # the default builds the same state dict as before the option existed (shipped weights load)
    assert UNet(2, 1).state_dict().keys() == UNet(2, 1, unshuffle=1).state_dict().keys()
    assert UNet(2, 1).head.weight.shape == (1, 16, 1, 1)


@pytest.mark.parametrize("unshuffle", [0, -2, 1.5, True])
def test_unshuffle_must_be_a_positive_integer(unshuffle):
    with pytest.raises(ValueError, match="unshuffle must be an integer"):
        UNet(1, 1, unshuffle=unshuffle)


def test_unshuffle_refuses_3d_and_indivisible_frames():
    with pytest.raises(ValueError, match="2D U-Nets only"):
        PeakUNet(dims=3, unshuffle=2)
    net = UNet(1, 1, width=4, depth=3, unshuffle=2)
    net(torch.zeros(1, 1, 8, 16))
    with pytest.raises(ValueError, match=r"divisible by 8 \(unshuffle=2, depth=3\)"):
        net(torch.zeros(1, 1, 12, 16))  # divisible by the plain U-Net's 4, not by 2 * 4


def test_unshuffled_weights_round_trip(tmp_path):
    torch.manual_seed(3)
    model = PoissonDenoiser(width=4, depth=2, unshuffle=2)
    record = WeightsRecord(name="den-u2", architecture="poisson-denoiser-unet",
                           architecture_config={"width": 4, "depth": 2, "unshuffle": 2})
    pt = save_weights(model, tmp_path, record)
    assert json.loads(pt.with_suffix(".json").read_text())["architecture_config"]["unshuffle"] == 2
    loaded, rec = load_weights(pt, architecture="poisson-denoiser-unet")
    assert loaded.net.unshuffle == 2 and rec.architecture_config["unshuffle"] == 2
    x = torch.poisson(torch.full((2, 1, 16, 16), 3.0))
    with torch.no_grad():
        assert torch.equal(loaded(x), model.eval()(x))
    # metadata without the key means the full-resolution network: these weights do not fit it
    meta = json.loads(pt.with_suffix(".json").read_text())
    del meta["architecture_config"]["unshuffle"]
    pt.with_suffix(".json").write_text(json.dumps(meta))
    with pytest.raises(WeightsError, match="does not fit"):
        load_weights(pt)


def test_ring_consistency_puts_the_measured_counts_in_each_ring():
    rng = np.random.default_rng(0)
    coarse = rng.poisson(20.0, (10, 12)).astype(float)
    fine = rng.uniform(0.5, 2.0, (20, 24))
    mask = np.zeros(coarse.shape, bool)
    mask[0, 0] = True
    yy, xx = np.mgrid[0:10, 0:12]
    use = ~mask
    for width in (1.0, 0.5):
        out = ring_consistent(fine, coarse, 2, alpha=0.0, mask=mask, center=(4.0, 6.0), ring_width=width)
        ring = np.floor(np.hypot(yy - 4.0, xx - 6.0) / width).astype(int)
        blocks = out.reshape(10, 2, 12, 2).sum((1, 3))
        np.testing.assert_allclose(np.bincount(ring[use], blocks[use]), np.bincount(ring[use], coarse[use]))
    np.testing.assert_array_equal(out[:2, :2], fine[:2, :2])  # a masked pixel is left as it was
    ratio = out / fine  # one factor per coarse pixel: the split inside each pixel is the network's
    np.testing.assert_allclose(ratio.reshape(10, 2, 12, 2).std((1, 3)), 0.0, atol=1e-12)
    # shrinkage: an empty ring is pulled towards none by at most its prediction, never zeroed
    shrunk = ring_consistent(fine, np.zeros_like(coarse), 2, alpha=3.0)
    assert (shrunk > 0).all() and (shrunk < fine).all()
    with pytest.raises(ValueError, match="2 times coarse"):
        ring_consistent(fine[:, :-1], coarse, 2)
    with pytest.raises(ValueError, match="alpha"):
        ring_consistent(fine, coarse, 2, alpha=-1.0)
    with pytest.raises(ValueError, match="ring_width"):
        ring_consistent(fine, coarse, 2, ring_width=0.0)


def test_a_denoiser_told_the_read_noise_widened_from_one_that_is_not_gives_its_output_without_read_noise():
    """:meth:`PoissonDenoiser.told_read_noise`: the new input channel starts with zero weights, so
    on photon-counting frames (read noise 0) the told network is the blind one exactly; with read
    noise its transform differs (the generalized Anscombe transform), so the output does too."""
    torch.manual_seed(4)
    for unshuffle in (1, 2):
        blind = PoissonDenoiser(width=4, depth=2, unshuffle=unshuffle, activation="relu").eval()
        with torch.no_grad():  # a non-trivial network: every weight away from its initialisation
            for p in blind.parameters():
                p.add_(0.05 * torch.randn_like(p))
        told = PoissonDenoiser.told_read_noise(blind).eval()
        assert told.read_noise and told.in_channels == 2 and not blind.read_noise
        assert told.net.down[0][0].in_channels == 3 * unshuffle**2
        counts = torch.poisson(torch.full((2, 1, 16, 16), 3.0))
        with torch.no_grad():
            torch.testing.assert_close(told(torch.cat([counts, torch.zeros_like(counts)], 1)), blind(counts))
            noisy = counts + 2.0 * torch.randn_like(counts)
            with_noise = told(torch.cat([noisy, torch.full_like(noisy, 2.0)], 1))
        assert torch.isfinite(with_noise).all() and (with_noise >= 0).all()
        assert not torch.allclose(with_noise, blind(noisy.clamp(min=0)))
    with pytest.raises(ValueError, match="told the read noise already"):
        PoissonDenoiser.told_read_noise(told)
    with pytest.raises(ValueError, match="2 input channel"):
        told(counts)
    with pytest.raises(ValueError, match="1 input channel"):
        blind(torch.cat([counts, counts], 1))
    with pytest.raises(ValueError, match="read_noise"):
        PoissonDenoiser(read_noise=1.5)


def test_the_read_noise_channel_moves_a_denoiser_told_it_by_the_generalized_anscombe_transform():
    """What the told network's U-Net sees: ``(a - a_level) / a_level`` of ``a = 2 sqrt(x + 3/8 + s^2)``
    (0 for a reading at the frame's level, whatever the read noise ``s``), the log of the level,
    and ``log(1 + s^2 / level)``."""
    model = PoissonDenoiser(width=4, depth=2, read_noise=True).eval()
    seen = {}
    model.net.register_forward_pre_hook(lambda _m, args: seen.__setitem__("z", args[0]))
    flat = torch.full((1, 1, 8, 8), 2.0)
    for sigma in (0.0, 3.0):
        with torch.no_grad():
            model(torch.cat([flat, torch.full_like(flat, sigma)], 1))
        z = seen["z"]
        torch.testing.assert_close(z[:, 0], torch.zeros(1, 8, 8))
        torch.testing.assert_close(z[:, 1], torch.full((1, 8, 8), math.log(2.0)))
        torch.testing.assert_close(z[:, 2], torch.full((1, 8, 8), math.log1p(sigma**2 / 2.0)))


def test_denoiser_input_adds_the_read_noise_channel_only_for_a_network_that_takes_it():
    from models.nets import denoiser_input

    counts = torch.poisson(torch.full((3, 1, 8, 8), 2.0))
    assert denoiser_input(PoissonDenoiser(width=4, depth=2), counts, 1.5) is counts
    assert denoiser_input(PeakUNet(width=4, depth=2), counts, 1.5) is counts
    told = PoissonDenoiser(width=4, depth=2, read_noise=True)
    x = denoiser_input(told, counts, 1.5)
    assert x.shape == (3, 2, 8, 8) and torch.equal(x[:, :1], counts) and bool((x[:, 1] == 1.5).all())
    per_frame = torch.tensor([0.0, 0.5, 3.0]).reshape(3, 1, 1, 1)
    x = denoiser_input(told, counts, per_frame)
    assert [float(v) for v in x[:, 1].amin(dim=(-2, -1))] == [0.0, 0.5, 3.0]
    assert [float(v) for v in x[:, 1].amax(dim=(-2, -1))] == [0.0, 0.5, 3.0]

"""Tests of `beampilot train`: reproducible, evaluated on held-out data, weights that load."""

from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

from agents.cli import app
from agents.train import run_training
from models.registry import load_weights


@pytest.mark.parametrize("task", ["denoise", "bragg", "bragg-tof", "sans-sr"])
def test_train_writes_weights_with_metadata_and_held_out_metrics(tmp_path, task):
    record = run_training(task, tmp_path, steps=3, batch=2, seed=7, n_eval=1, factor=2 if task == "sans-sr" else None)
    name = record["name"]
    model, rec = load_weights(tmp_path / f"{name}.pt")
    assert rec.sha256 and rec.training["steps"] == 3 and rec.data["train_seed"] == 7
    assert rec.data["eval_seed"] == 7 + 10_000
    if task == "denoise":
        assert set(rec.metrics["by_mean_counts"]) == {"0.1", "1", "10"}
        assert rec.metrics["held_out_kinds"] == ["speckle"]
    elif task in ("bragg", "bragg-tof"):
        assert 0.0 <= rec.metrics["iou_ml"] <= 1.0
        assert rec.architecture_config["dims"] == (3 if task == "bragg-tof" else 2)
    else:
        assert name == "sans-sr-x2" and rec.metrics["factor"] == 2
        # the data recipe names each kind's model and the ranges its parameters were drawn from
        recipes = rec.data["kind_recipes"]
        assert set(recipes) == set(rec.data["kinds"]) | set(rec.data["held_out_kinds"])
        assert recipes["sphere_monodisperse"]["ranges"]["radius"] == [20.0, 100.0]
        assert recipes["core_shell_sphere"]["model"] == "core_shell_sphere"
    # the same seed gives the same weights and figures: training is reproducible (the files'
    # checksums differ: torch.save writes a random serialization id)
    again = run_training(task, tmp_path / "again", steps=3, batch=2, seed=7, n_eval=1,
                         factor=2 if task == "sans-sr" else None)
    model2, _ = load_weights(tmp_path / "again" / f"{name}.pt")
    for (k, a), (_, b) in zip(model.state_dict().items(), model2.state_dict().items(), strict=True):
        assert torch.equal(a, b), k
    assert again["metrics"] == record["metrics"]


def test_train_cli(tmp_path):
    runner = CliRunner()
    result = runner.invoke(app, ["train", "bragg", "--out", str(tmp_path), "--steps", "2", "--batch", "2",
                                 "--n-eval", "1", "--quiet"])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.output[result.output.index("{"):])
    assert summary["weights"].endswith("bragg.pt") and "iou_ml" in summary["metrics"]
    result = runner.invoke(app, ["train", "sans-sr", "--out", str(tmp_path), "--factor", "3"])
    assert result.exit_code != 0 and "2 or 4" in result.output
    result = runner.invoke(app, ["train", "denoise", "--out", str(tmp_path), "--factor", "2"])
    assert result.exit_code != 0 and "applies to sans-sr only" in result.output
    result = runner.invoke(app, ["train", "denoise", "--out", str(tmp_path / "bragg.pt"), "--steps", "1"])
    assert result.exit_code != 0 and "is a file" in result.output
    assert runner.invoke(app, ["train", "--help"]).exit_code == 0


def test_train_with_an_architecture_config(tmp_path):
    record = run_training("bragg", tmp_path, steps=2, batch=2, n_eval=1, threads=1,
                          architecture_config={"unshuffle": 2})
    assert record["architecture_config"] == {"dims": 2, "width": 16, "depth": 3, "unshuffle": 2}
    assert record["training"]["threads"] == 1
    model, _ = load_weights(tmp_path / "bragg.pt")
    assert model.net.unshuffle == 2
    with pytest.raises(ValueError, match="2D U-Nets only"):  # the 3D task's network refuses it
        run_training("bragg-tof", tmp_path, steps=1, architecture_config={"unshuffle": 2})
    with pytest.raises(ValueError, match="does not fit 'poisson-denoiser-unet'"):
        run_training("denoise", tmp_path, steps=1, architecture_config={"colour": 1})


def test_train_cli_arch_option(tmp_path):
    runner = CliRunner()
    result = runner.invoke(app, ["train", "denoise", "--out", str(tmp_path), "--steps", "2", "--batch", "2",
                                 "--n-eval", "1", "--quiet", "--arch", '{"unshuffle": 2, "width": 8}'])
    assert result.exit_code == 0, result.output
    meta = json.loads((tmp_path / "denoise.json").read_text())
    assert meta["architecture_config"] == {"width": 8, "depth": 3, "unshuffle": 2}
    for bad, message in (("[2]", "JSON object"), ("{unshuffle: 2}", "JSON object"),
                         ('{"unshuffle": 0}', "unshuffle must be an integer")):
        result = runner.invoke(app, ["train", "denoise", "--out", str(tmp_path), "--steps", "1", "--quiet",
                                     "--arch", bad])
        flat = " ".join(result.output.replace("│", " ").split())  # the error box wraps lines
        assert result.exit_code != 0 and message in flat, result.output


def test_ring_sums_follow_the_radius_and_the_sans_loss_sees_an_iq_bias():
    from agents.train import _sans_loss, ring_sums

    image = torch.rand(3, 1, 16, 16)
    rings = ring_sums(image)
    torch.testing.assert_close(rings.sum(1), image.sum((1, 2, 3)))
    centre = torch.zeros(1, 1, 16, 16)
    centre[0, 0, 7:9, 7:9] = 1.0  # the four pixels nearest the centre form ring 0
    assert ring_sums(centre)[0, 0] == 4.0 and ring_sums(centre)[0, 1:].sum() == 0.0
    truth = 100.0 * torch.ones(2, 1, 16, 16)
    # moving counts between the halves of every ring keeps I(Q); moving them outward does not
    within = truth.clone()
    within[:, :, :, :8] *= 1.1
    within[:, :, :, 8:] *= 0.9
    outward = truth * (1 + 0.1 * torch.linspace(-1, 1, 16).abs().reshape(1, 1, 1, 16).sub(0.5).sign())
    from models.nets import poisson_nll

    def iq_part(fine):
        return float(_sans_loss(fine, truth, None) - poisson_nll(fine, truth))

    assert iq_part(truth) == 0.0 and iq_part(within) < 1e-6 < iq_part(outward)


def test_train_from_init_weights_fine_tunes_them_and_records_them(tmp_path):
    first = run_training("bragg", tmp_path / "a", steps=2, batch=2, n_eval=1, architecture_config={"width": 8})
    start, _ = load_weights(tmp_path / "a" / "bragg.pt")
    # the network configuration comes from the init weights, not the task's defaults
    record = run_training("bragg", tmp_path / "b", steps=1, batch=2, seed=3, n_eval=1, lr=1e-12,
                          init=tmp_path / "a" / "bragg.pt")
    assert record["architecture_config"] == first["architecture_config"]
    assert record["training"]["init"] == {"weights": "bragg", "sha256": first["sha256"], "steps": 2, "seed": 0,
                                          "lr": first["training"]["lr"], "loss": "bce+dice",
                                          "data": first["data"], "init": None}
    assert record["training"]["lr"] == 1e-12
    tuned, _ = load_weights(tmp_path / "b" / "bragg.pt")
    for (k, a), (_, b) in zip(start.state_dict().items(), tuned.state_dict().items(), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-9, msg=k)  # one step at lr 1e-12 moves nothing
    # a random start at the same seed is far from them
    fresh = run_training("bragg", tmp_path / "c", steps=1, batch=2, seed=3, n_eval=1, lr=1e-12,
                         architecture_config={"width": 8})
    fresh_model, _ = load_weights(tmp_path / "c" / "bragg.pt")
    assert any(not torch.allclose(a, b) for a, b in zip(start.state_dict().values(),
                                                         fresh_model.state_dict().values(), strict=True))
    assert fresh["training"]["init"] is None
    with pytest.raises(ValueError, match="ask for"):
        run_training("bragg", tmp_path / "d", steps=1, init=tmp_path / "a" / "bragg.pt",
                     architecture_config={"width": 16})
    with pytest.raises(ValueError, match="--init .*not a path"):
        run_training("bragg", tmp_path / "d", steps=1, init=tmp_path / "nowhere.pt")
    with pytest.raises(ValueError, match="--init .*asked for"):
        run_training("bragg", tmp_path / "d", steps=1, init="denoise")  # a denoiser is not a peak U-Net
    result = CliRunner().invoke(app, ["train", "bragg", "--out", str(tmp_path), "--lr", "-1", "--quiet"])
    assert result.exit_code != 0 and "--lr must be positive" in result.output
    with pytest.raises(ValueError, match="is a 2D network; bragg-tof trains 3D"):
        run_training("bragg-tof", tmp_path / "d", steps=1, init="bragg")


def test_init_weights_keep_their_own_configuration_when_the_task_defaults_have_more_keywords(tmp_path):
    from models.nets import PeakUNet
    from models.registry import WeightsRecord, save_weights

    torch.manual_seed(0)
    old = PeakUNet(dims=2, width=8)  # weights whose metadata predates the task's "depth" keyword
    save_weights(old, tmp_path / "old", WeightsRecord("bragg", "bragg-peak-unet", {"dims": 2, "width": 8}))
    record = run_training("bragg", tmp_path / "new", steps=1, batch=2, n_eval=1, lr=1e-12,
                          init=tmp_path / "old" / "bragg.pt")
    assert record["architecture_config"] == {"dims": 2, "width": 8}
    # metadata without "dims" is a 2D network (the class default): refused for time-of-flight volumes
    save_weights(old, tmp_path / "nodims", WeightsRecord("bragg", "bragg-peak-unet", {"width": 8}))
    with pytest.raises(ValueError, match="is a 2D network; bragg-tof trains 3D"):
        run_training("bragg-tof", tmp_path / "x", steps=1, init=tmp_path / "nodims" / "bragg.pt")
    tuned, _ = load_weights(tmp_path / "new" / "bragg.pt")
    for (k, a), (_, b) in zip(old.state_dict().items(), tuned.state_dict().items(), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-9, msg=k)


def test_a_denoiser_is_widened_to_be_told_the_read_noise_and_its_batches_carry_it(tmp_path):
    """``--init`` weights without the read-noise input and ``--arch '{"read_noise": true}'``: the
    network is widened from them (same output at read noise 0) and trained on two-channel crops,
    the second channel each crop's read noise; the metadata records both."""
    import numpy as np

    from agents.train import TASKS, _make_batch
    from models.nets import PoissonDenoiser

    blind = run_training("denoise", tmp_path / "a", steps=1, batch=2, n_eval=1, architecture_config={"width": 4})
    record = run_training("denoise", tmp_path / "b", steps=1, batch=2, n_eval=1, lr=1e-12, seed=1,
                          init=tmp_path / "a" / "denoise.pt", architecture_config={"read_noise": True})
    assert record["architecture_config"] == {**blind["architecture_config"], "read_noise": True}
    assert record["training"]["init"]["sha256"] == blind["sha256"]
    start, _ = load_weights(tmp_path / "a" / "denoise.pt")
    told, _ = load_weights(tmp_path / "b" / "denoise.pt")
    assert isinstance(told, PoissonDenoiser) and told.read_noise
    counts = torch.poisson(torch.full((1, 1, 16, 16), 2.0))
    with torch.no_grad():
        torch.testing.assert_close(told.eval()(torch.cat([counts, torch.zeros_like(counts)], 1)),
                                   start.eval()(counts), rtol=1e-6, atol=1e-6)
    task = TASKS["denoise"]
    x, y, m = _make_batch(replace_config(task, read_noise=True), False)(np.random.default_rng(0), 16)
    assert x.shape == (16, 2, 64, 64) and y.shape == m.shape == (16, 1, 64, 64)
    sigma = x[:, 1].flatten(1)
    assert (sigma == sigma[:, :1]).all()  # one read noise per crop
    integrating = sigma[:, 0] > 0
    assert integrating.any() and (~integrating).any()  # both kinds of detector are drawn
    assert float(sigma[integrating, 0].min()) >= 0.5 and float(sigma[integrating, 0].max()) <= 3.0
    x1, _, _ = _make_batch(task, False)(np.random.default_rng(0), 2)
    assert x1.shape == (2, 1, 64, 64)
    with pytest.raises(ValueError, match="ask for"):  # a told network is not narrowed back
        run_training("denoise", tmp_path / "c", steps=1, init=tmp_path / "b" / "denoise.pt",
                     architecture_config={"read_noise": False})


def replace_config(task, **config):
    from dataclasses import replace

    return replace(task, architecture_config={**task.architecture_config, **config})


def test_an_out_that_cannot_hold_the_weights_is_refused_before_any_training(tmp_path):
    steps = []
    a_file = tmp_path / "weights.pt"
    a_file.write_text("")
    with pytest.raises(ValueError, match=r"--out .*weights.pt is a file: name a directory for the weights"):
        run_training("denoise", a_file, steps=1, batch=1, n_eval=1, progress=lambda s, loss: steps.append(s))
    with pytest.raises(ValueError, match=r"--out .*cannot be written"):
        run_training("denoise", a_file / "below", steps=1, batch=1, n_eval=1, progress=lambda s, loss: steps.append(s))
    assert steps == []


def test_arch_cannot_change_the_dimensions_the_task_trains(tmp_path):
    steps = []
    for task, dims, said in (("bragg-tof", 2, "bragg-tof trains 3D networks"), ("bragg", 3, "bragg trains 2D networks")):
        with pytest.raises(ValueError, match=f"--arch dims={dims}: {said}"):
            run_training(task, tmp_path, steps=1, batch=1, n_eval=1, architecture_config={"dims": dims},
                         progress=lambda s, loss: steps.append(s))
    assert steps == []  # refused before any training (dims=2 on bragg-tof failed in the first step)

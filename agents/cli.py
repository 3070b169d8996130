"""The ``beampilot`` command line. ``beampilot --help`` lists the commands; each has ``--help``."""

from __future__ import annotations

import errno
import functools
import json
import logging
import re
import time
from collections.abc import Callable
from enum import StrEnum
from pathlib import Path
from typing import Annotated, Any

import typer

app = typer.Typer(
    help="beampilot: streaming analysis and autonomous steering beside a Bluesky experiment.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_show_locals=False,
)
demo_app = typer.Typer(help="Closed-loop demos on simulated instruments, in one process, no servers.",
                       no_args_is_help=True)
app.add_typer(demo_app, name="demo")


class SampleKind(StrEnum):
    polydisperse_sphere = "polydisperse_sphere"
    core_shell_sphere = "core_shell_sphere"
    cylinder = "cylinder"
    sphere_hardsphere = "sphere_hardsphere"


def _out_dir(out: Path | None) -> Path | None:
    """``--out``: checked writable now, so a long run does not fail at its end; made by the
    command when it runs (not here: a command refused for another option leaves nothing)."""
    from agents.config import writable_dir

    if out is None:
        return out
    try:
        return writable_dir(out, option="", create=False)  # click names the option
    except ValueError as err:
        raise typer.BadParameter(str(err)) from None


#: errors of the disk a command writes to, which a user fixes there rather than in the code
_DISK_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS}


def disk_error(err: BaseException) -> OSError | None:
    """The full, over-quota or read-only disk behind ``err`` (itself or its cause), or None."""
    for _ in range(16):  # a chain, not a cycle a hand-set __cause__ could make
        if isinstance(err, OSError) and err.errno in _DISK_ERRNOS:
            return err
        if (nxt := err.__cause__ or err.__context__) is None:
            return None
        err = nxt
    return None


def _reported(command: Callable[..., Any]) -> Callable[..., Any]:
    """Run a command so that an error a user can act on (a setting, weights, a store, a server
    that is not there: the project's agent, stream and model errors; a full or read-only disk) is
    one red line and exit code 2, not a traceback."""

    @functools.wraps(command)
    def reported(*args: Any, **kwargs: Any) -> Any:
        from agents.errors import AgentError
        from models.errors import ModelError
        from streams.errors import StreamError

        try:
            return command(*args, **kwargs)
        except (AgentError, StreamError, ModelError) as err:
            typer.secho(f"error: {err}", fg=typer.colors.RED, err=True)
            raise typer.Exit(2) from None
        except Exception as err:  # a full disk, itself or as the cause of the error it raised
            disk = disk_error(err)
            if disk is None:
                raise
            where = f" writing {disk.filename}" if disk.filename else ""
            typer.secho(f"error: {disk.strerror}{where}: free space there, or write somewhere else (--out)",
                        fg=typer.colors.RED, err=True)
            raise typer.Exit(2) from None

    return reported


class RepeatsQuieted(logging.Filter):
    """Lets a message of the ``quiet`` libraries' loggers through once a ``window_s``, with how
    many like it were held back since (numbers in it do not make it new).

    kafka-python logs every failed reconnect, several lines a second while a broker is down (97 in
    the 10 s after the dev stack's broker stopped): an hour's outage at night would bury the
    daemon's own lines under tens of thousands of its. beampilot's own loggers are never held back.
    """

    def __init__(self, quiet: tuple[str, ...] = ("kafka",), window_s: float = 60.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        super().__init__()
        self.quiet, self.window_s, self._clock = quiet, window_s, clock
        self._seen: dict[tuple[str, str], tuple[float, int]] = {}  # (logger, pattern) -> (last let through, held since)

    def filter(self, record: logging.LogRecord) -> bool:
        if not any(record.name == q or record.name.startswith(q + ".") for q in self.quiet):
            return True
        key = (record.name, re.sub(r"\d+", "#", record.getMessage()))
        now = self._clock()
        last, held = self._seen.get(key, (None, 0))
        if last is not None and now - last < self.window_s:
            self._seen[key] = (last, held + 1)
            return False
        if len(self._seen) > 1000:  # patterns of the past: forget them
            self._seen = {k: v for k, v in self._seen.items() if now - v[0] < self.window_s}
        self._seen[key] = (now, 0)
        if held:
            record.msg, record.args = f"{record.getMessage()} ({held} more like it in the last {now - last:.0f} s)", None
        return True


@app.callback()
def main(verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Log at INFO level.")] = False) -> None:
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for handler in logging.getLogger().handlers:
        if not any(isinstance(f, RepeatsQuieted) for f in handler.filters):
            handler.addFilter(RepeatsQuieted())


@demo_app.command(
    "sas-qscan",
    short_help="A RunEngine measures I(Q) of a hidden sample; the agent picks Q and exposure until its size is known.",
)
@_reported
def sas_qscan(
    out: Annotated[Path, typer.Option(callback=_out_dir, help="Directory for the report and the store (store.zarr).")] = Path("demo-output"),
    sample: Annotated[SampleKind, typer.Option(help="The hidden sample's kind.")] = SampleKind.polydisperse_sphere,
    seed: Annotated[int, typer.Option(help="Seed of the hidden sample and the counting noise.")] = 0,
    resume: Annotated[Path | None, typer.Option(help="Continue a killed demo from its STORE (OUT/store.zarr).",
                                                metavar="STORE")] = None,
    speed: Annotated[float | None, typer.Option(
        help="Run exposures in real time divided by SPEED (e.g. 50); default: simulated time, no waiting.")] = None,
    batch_size: Annotated[int, typer.Option(min=1, help="Points the agent picks per round.")] = 4,
    config: Annotated[Path | None, typer.Option(
        help="YAML with QSamplingAgent settings overriding the demo's (e.g. target_rel_sigma: 0.05).")] = None,
    quiet: Annotated[bool, typer.Option(help="No progress bar.")] = False,
    stack: Annotated[bool, typer.Option("--stack", help=(
        "Run through the real servers of 'deploy/dev-stack up' (Kafka, queueserver, tiled) "
        "instead of in-process; the sample is the stack's (deploy/dev-stack.yaml)."))] = False,
) -> None:
    """A RunEngine measures I(Q) of a hidden sample; the agent picks Q and exposure until the
    sample's size is known to 2% (1 sigma); then a report: plots, summary.json, the zarr store."""
    from bluesky.utils import FailedStatus

    from agents.config import read_mapping
    from agents.demo_sas import run_demo
    from agents.errors import ConfigError
    from simulators.errors import SimulatorError

    overrides = None
    if config is not None:
        try:
            overrides = read_mapping(config, "file")
        except ConfigError as err:
            raise typer.BadParameter(str(err), param_hint="--config") from None
    if speed is not None and speed <= 0:
        raise typer.BadParameter(f"--speed must be > 0, got {speed}", param_hint="--speed")
    if stack:
        from agents.demo_stack import run_stack_demo

        summary = run_stack_demo(out, batch_size=batch_size, overrides=overrides, progress=not quiet)
        _print_summary(summary, out)
        return
    try:
        summary = run_demo(out, sample_kind=sample.value, seed=seed, resume=resume, speed=speed,
                           batch_size=batch_size, overrides=overrides, progress=not quiet)
    except (FailedStatus, SimulatorError) as err:
        cause = err.__cause__ or err
        store = resume or out / "store.zarr"
        typer.secho(f"error: the instrument failed: {cause}. Everything measured is in {store}; "
                    f"continue with: beampilot demo sas-qscan --resume {store}", fg=typer.colors.RED, err=True)
        raise typer.Exit(3) from None
    except Exception as err:  # a full disk, itself or as the cause of the error it raised
        disk = disk_error(err)
        if disk is None:
            raise
        store = resume or out / "store.zarr"
        typer.secho(f"error: {disk.strerror} writing {disk.filename or store}. Everything stored before it is in "
                    f"{store}; free space there, then continue with: beampilot demo sas-qscan --resume {store}",
                    fg=typer.colors.RED, err=True)
        raise typer.Exit(2) from None
    _print_summary(summary, out if resume is None else resume.parent)


@demo_app.command(
    "mapping",
    short_help="Map a simulated film by autonomous SAXS (kriging), then compare with a raster of the same length.",
)
@_reported
def mapping(
    out: Annotated[Path, typer.Option(callback=_out_dir, help="Directory for the report (maps.png, summary.json) and store.zarr.")] = Path("demo-mapping"),
    seed: Annotated[int, typer.Option(help="Seed of the hidden film and of the detector's noise.")] = 3,
    budget: Annotated[int, typer.Option(min=8, help="Positions the agent may measure.")] = 120,
    batch: Annotated[int, typer.Option(min=1, max=8, help="Positions per request.")] = 4,
    reproducible: Annotated[bool, typer.Option(
        help="Refit the kriging hyper-parameters inline, so the same seed gives the same run (by default "
             "they are refitted in a background thread, as in a live session, and runs differ a little).")] = False,
    quiet: Annotated[bool, typer.Option(help="No progress bar.")] = False,
) -> None:
    """Map a simulated block-copolymer film by autonomous SAXS (kriging, travel-aware batches),
    then measure a raster of the same length on the same stage, and compare them."""
    from agents.demo_mapping import run_mapping_demo

    summary = run_mapping_demo(out, seed=seed, budget=budget, batch=batch, progress=not quiet,
                               overrides={"background_refit": False} if reproducible else None)
    typer.echo(f"measured {summary['agent']['n_observations']} positions; stop: {summary['agent']['stop_reason']}")
    for q, e in summary["normalised_rmse"].items():
        typer.echo(f"  {q:>10}: error (RMSE / sd of truth) beampilot {e['agent']:.3f}, raster {e['raster']:.3f}")
    st = summary["stage"]
    typer.echo(f"  stage travel: beampilot {st['agent_travel_mm']:.1f} mm, raster ({st['raster_points']} points) "
               f"{st['raster_travel_mm']:.1f} mm")
    for failure in summary["failed_runs"]:
        typer.secho(f"  a run failed and the next continued: {failure}", fg=typer.colors.YELLOW)
    typer.echo(f"report: {out / 'maps.png'}, {out / 'summary.json'}")


@demo_app.command(
    "tune",
    short_help="Tune a simulated beamline's optics for the most flux at the required beam size (Bayesian optimization).",
)
@_reported
def tune(
    out: Annotated[Path, typer.Option(callback=_out_dir, help="Directory for the report (convergence.png, settings.png, summary.json).")] = Path("demo-tune"),
    seed: Annotated[int, typer.Option(help="Seed of the simulated beamline's noise and of the initial design.")] = 3,
    budget: Annotated[int, typer.Option(min=4, help="Evaluations (plans on the RunEngine) the agent may spend.")] = 30,
    quiet: Annotated[bool, typer.Option(help="No progress bar.")] = False,
) -> None:
    """Tune a simulated beamline's optics (mirror pitch and bender, slits, focus) for the most
    flux at the required beam size, by constrained Bayesian optimization on the RunEngine."""
    from agents.demo_tune import run_tune_demo

    summary = run_tune_demo(out, seed=seed, budget=budget, progress=not quiet)
    _print_tune_summary(summary, out)


@demo_app.command(
    "ring",
    short_help="Optimise a simulated storage ring's sextupoles (pyAT) with ML-MOGA, NSGA-II and MOBO on Dask.",
)
@_reported
def ring(
    out: Annotated[Path, typer.Option(callback=_out_dir, help="Directory for the report (fronts.png, hypervolume.png, aperture.png, "
                                           "summary.json) and the runs' stores (<optimizer>.zarr).")] = Path("demo-ring"),
    generations: Annotated[int, typer.Option(min=2, help="Generations of each genetic optimizer.")] = 12,
    pop_size: Annotated[int, typer.Option(min=4, help="Population (even); also MOBO's initial design.")] = 24,
    mobo_evaluations: Annotated[int, typer.Option(min=8, help="Tracked settings MOBO may spend.")] = 96,
    seed: Annotated[int, typer.Option(help="Seed of every optimizer.")] = 0,
    full: Annotated[bool, typer.Option(help="Track at full resolution (224 particles, 512 turns): seconds per setting.")] = False,
    dask: Annotated[str | None, typer.Option(help="Dask scheduler address (host:port); default: a LocalCluster.")] = None,
    workers: Annotated[int, typer.Option(min=1, help="Workers of the LocalCluster.")] = 2,
    quiet: Annotated[bool, typer.Option(help="No progress bars.")] = False,
) -> None:
    """Optimise the sextupoles of a simulated storage ring (pyAT tracking) for dynamic aperture
    and momentum acceptance with ML-MOGA, NSGA-II and MOBO, tracking on Dask; a killed run
    resumes from OUT."""
    from agents.demo_ring import run_ring_demo

    if pop_size % 2:
        raise typer.BadParameter(f"--pop-size must be even, got {pop_size}")
    summary = run_ring_demo(out, generations=generations, pop_size=pop_size, mobo_evaluations=mobo_evaluations,
                            seed=seed, full=full, dask=dask, n_workers=workers, progress=not quiet)
    for kind, hv in summary["final_hypervolume"].items():
        n = summary["hypervolume"][kind]["evaluations"][-1]
        typer.echo(f"  {kind:>8}: hypervolume {hv:8.0f} after {n} tracked settings")
    s, c = summary["start"], summary["chosen"]
    typer.echo(f"  chosen setting: dynamic aperture {s['da_area_mm2']:.0f} -> {c['da_area_mm2']:.0f} mm^2, "
               f"momentum acceptance {100 * s['momentum_acceptance']:.2f} -> {100 * c['momentum_acceptance']:.2f} %, "
               f"injection efficiency {100 * s['injection_efficiency']:.0f} -> {100 * c['injection_efficiency']:.0f} %")
    if summary["failed_evaluations"]:
        typer.secho(f"  {summary['failed_evaluations']} evaluations failed on the cluster (counted infeasible)",
                    fg=typer.colors.YELLOW)
    typer.echo(f"report: {out}")


@demo_app.command(
    "bragg",
    short_help="Bragg-peak masks and intensities, live: U-Net against threshold + components, with the truth.",
)
@_reported
def bragg_demo(
    out: Annotated[Path, typer.Option(callback=_out_dir, help="Directory for the report (bragg.png, summary.json).")] = Path("demo-bragg"),
    frames: Annotated[int, typer.Option(min=1, help="Frames the simulated detector records.")] = 24,
    seed: Annotated[int, typer.Option(help="Seed of the simulated frames (held out of training).")] = 7,
    weights: Annotated[str | None, typer.Option(help="Weights (shipped name or path); default: the shipped 'bragg'.")] = None,
    grow_sigma: Annotated[float | None, typer.Option(
        min=0.01, help="Also sum each U-Net peak over a curve-of-growth aperture, rings joining while "
                       "this many sigmas above the background (2 is a good choice; the agent's "
                       "aperture_grow_sigma): strong peaks' wings are measured, at about twice the "
                       "integration time. Default: the mask alone.")] = None,
    quiet: Annotated[bool, typer.Option(help="No progress bar.")] = False,
) -> None:
    """Bragg-peak masks and integrated intensities, live: a U-Net on every frame a simulated
    detector records, against threshold + connected components, with the truth."""
    from agents.demo_detector import run_detector_demo

    summary = run_detector_demo(out, analysis="bragg", frames=frames, seed=seed, weights=weights,
                                grow_sigma=grow_sigma, progress=not quiet)
    typer.echo(f"IoU with the true peaks: U-Net {summary['iou_ml']:.3f}, threshold + components "
               f"{summary['iou_threshold_components']:.3f}; intensity error R (all peaks): "
               f"U-Net {summary['r_ml']:.3f}, "
               f"threshold + components {summary['r_threshold_components']:.3f}")
    typer.echo(f"R by true I/sigma (U-Net, {summary['ml_integration']} / threshold + components): " + "; ".join(
        f"{b}: {r['ml']:.3f} / {r['threshold']:.3f} ({int(r['n_peaks'])} peaks)"
        for b, r in summary["r_by_i_over_sigma"].items()))
    typer.echo(f"report: {out / 'bragg.png'}, {out / 'bragg_r.png'}, {out / 'summary.json'}")


@demo_app.command(
    "sans-sr",
    short_help="SANS super-resolution, live: the network against bicubic upsampling, with the truth.",
)
@_reported
def sans_sr_demo(
    out: Annotated[Path, typer.Option(callback=_out_dir, help="Directory for the report (sans-sr.png, summary.json).")] = Path("demo-sans-sr"),
    frames: Annotated[int, typer.Option(min=1, help="Patterns the simulated SANS detector records.")] = 12,
    factor: Annotated[int, typer.Option(help="Super-resolution factor: 2 or 4.")] = 4,
    seed: Annotated[int, typer.Option(help="Seed of the simulated patterns (held-out sample kinds).")] = 7,
    weights: Annotated[str | None, typer.Option(help="Weights (shipped name or path); default: shipped sans-sr-xF.")] = None,
    quiet: Annotated[bool, typer.Option(help="No progress bar.")] = False,
) -> None:
    """SANS super-resolution, live: a CNN on every coarse pattern of sample kinds held out of
    training, against bicubic interpolation, with the truth."""
    from agents.demo_detector import run_detector_demo

    if factor not in (2, 4):
        raise typer.BadParameter(f"--factor must be 2 or 4, got {factor}")
    summary = run_detector_demo(out, analysis="sans-sr", frames=frames, seed=seed, weights=weights, factor=factor,
                                progress=not quiet)
    typer.echo(f"log-intensity PSNR: network {summary['log_psnr_ml']:.2f} dB, bicubic {summary['log_psnr_bicubic']:.2f} dB")
    typer.echo(f"report: {out / 'sans-sr.png'}, {out / 'summary.json'}")


class TrainTask(StrEnum):
    denoise = "denoise"
    bragg = "bragg"
    bragg_tof = "bragg-tof"
    sans_sr = "sans-sr"


@app.command(
    "train",
    short_help="Train a detector network from the project's simulators, evaluate it on held-out data, write weights.",
)
@_reported
def train_cmd(
    task: Annotated[TrainTask, typer.Argument(help="Which network: denoise, bragg (2D frames), bragg-tof "
                                                         "(3D time-of-flight volumes) or sans-sr.")],
    out: Annotated[Path, typer.Option(callback=_out_dir, help="Directory for NAME.pt and NAME.json (weights and metadata).")],
    steps: Annotated[int | None, typer.Option(min=1, help="Optimiser steps (default: the task's).")] = None,
    batch: Annotated[int | None, typer.Option(min=1, help="Frames per step (default: the task's).")] = None,
    seed: Annotated[int, typer.Option(help="Training seed; the held-out evaluation uses seed + 10000.")] = 0,
    factor: Annotated[int | None, typer.Option(help="sans-sr only: 2 or 4 (default 4).")] = None,
    noise2noise: Annotated[bool, typer.Option(help="denoise only: train against a second independent draw, "
                                                   "not the clean truth (as for real data).")] = False,
    n_eval: Annotated[int, typer.Option(min=1, help="Held-out samples per evaluated condition.")] = 24,
    arch: Annotated[str | None, typer.Option(
        help='Network keyword arguments over the task\'s, as a JSON object, e.g. \'{"unshuffle": 2}\' '
             "(run the U-Net body on a 2x space-to-depth view, about 4x cheaper) or "
             "'{\"width\": 24, \"depth\": 3}'; recorded in the weights' metadata.")] = None,
    threads: Annotated[int | None, typer.Option(min=1, help="Torch CPU threads while training "
                                                            "(default: torch's).")] = None,
    init: Annotated[str | None, typer.Option(
        help="Fine-tune: start from these weights (a shipped name such as sans-sr-x2, or a path to NAME.pt) "
             "instead of random ones; their network configuration is kept, and the new metadata records "
             "their name, checksum, training recipe and data. Use a --seed other than theirs, "
             "so the batches are new.")] = None,
    lr: Annotated[float | None, typer.Option(help="Peak learning rate of the cosine decay (default 2e-3; "
                                                  "a fine-tune from --init usually wants less).")] = None,
    quiet: Annotated[bool, typer.Option(help="No progress bar.")] = False,
) -> None:
    """Train a detector network from the project's simulators, reproducibly (fixed seeds), then
    evaluate it on held-out data against the classical method and write weights + metadata."""
    from tqdm import tqdm

    from agents.train import TASKS, run_training

    if factor is not None and task.value != "sans-sr":
        raise typer.BadParameter(f"--factor applies to sans-sr only, not {task.value}")
    if factor is not None and factor not in (2, 4):
        raise typer.BadParameter(f"--factor must be 2 or 4, got {factor}")
    if lr is not None and not lr > 0:
        raise typer.BadParameter(f"--lr must be positive, got {lr}")
    try:
        arch_config = json.loads(arch) if arch is not None else None
    except json.JSONDecodeError as err:
        raise typer.BadParameter(f"--arch must be a JSON object, got {arch!r} ({err})") from None
    if arch_config is not None and not isinstance(arch_config, dict):
        raise typer.BadParameter(f"--arch must be a JSON object, got {arch!r}")
    total = steps or TASKS[task.value].steps
    bar = tqdm(total=total, desc=f"train {task.value}", unit="step", disable=quiet)

    def tick(step: int, loss: float) -> None:
        bar.update(1)
        if step % 20 == 0:
            bar.set_postfix(loss=f"{loss:.4g}")

    try:
        record = run_training(task.value, out, steps=steps, batch=batch, seed=seed, factor=factor,
                              noise2noise=noise2noise, n_eval=n_eval, architecture_config=arch_config,
                              threads=threads, init=init, lr=lr, progress=tick)
    except ValueError as err:
        bar.close()
        raise typer.BadParameter(str(err)) from None
    bar.close()
    typer.echo(json.dumps({"weights": str(out / f"{record['name']}.pt"), "metrics": record["metrics"],
                           "training": {k: record["training"][k] for k in ("steps", "final_loss", "wall_s")}},
                          indent=2))


@app.command(
    "run",
    short_help="Run the configured agents as a daemon beside a live experiment (Kafka in, plans to the queueserver).",
)
@_reported
def run(
    config: Annotated[Path, typer.Option(help="The daemon's YAML config (see deploy/agent.example.yaml).")],
    kafka: Annotated[str | None, typer.Option(help="Broker host:port, overriding kafka.bootstrap_servers.")] = None,
    http_port: Annotated[int | None, typer.Option(help="Port of /healthz, /metrics and the status page.")] = None,
    check: Annotated[bool, typer.Option(
        "--check", help="Check the config and every server it names (agents built and asked for their first "
                        "plans, which are checked against their safety gate and the queue server's allowed "
                        "plans; topics; tiled; state_dir; the status port), print what is wrong and what to "
                        "do, and exit (1 if anything fails). Nothing is started, queued or written.")] = False,
) -> None:
    """Run the configured agents as a daemon beside a live experiment: read its Kafka document
    topic, publish derived documents, send plans to the queueserver, serve /healthz, /metrics
    and a status page. Stops cleanly on SIGTERM / Ctrl-C; a restart continues where it stopped."""
    from agents.daemon import serve
    from agents.daemon_config import load_daemon_config

    cfg = load_daemon_config(config)
    if kafka is not None or http_port is not None:
        cfg = cfg.model_copy(update={
            "kafka": cfg.kafka.model_copy(update={"bootstrap_servers": kafka}) if kafka else cfg.kafka,
            "http": cfg.http.model_copy(update={"port": http_port}) if http_port is not None else cfg.http})
    if check:
        from agents.preflight import preflight

        checks = preflight(cfg)
        marks = {"ok": ("ok  ", "green"), "warn": ("WARN", "yellow"), "fail": ("FAIL", "red")}
        for c in checks:
            mark, colour = marks[c.status]
            typer.echo(f"{typer.style(mark, fg=colour, bold=c.status != 'ok')} {c.what}: {c.detail}")
        failed = sum(c.status == "fail" for c in checks)
        warned = sum(c.status == "warn" for c in checks)
        typer.echo(f"{config}: {failed} failed, {warned} warning(s), {len(checks) - failed - warned} ok")
        raise typer.Exit(1 if failed else 0)

    def ready(daemon, server) -> None:
        typer.echo(f"beampilot daemon: {len(daemon.agents)} agent(s) reading {cfg.documents_topic} "
                   f"on {cfg.kafka.bootstrap_servers}; status page {server.address}/", err=True)

    serve(cfg, ready=ready)


@app.command(
    "status",
    short_help="Say how a running daemon is doing (its /status.json, in words): for a shell at 3 a.m.",
)
@_reported
def status_cmd(
    config: Annotated[Path | None, typer.Option(help="The daemon's YAML config: its http host and port are asked.")] = None,
    url: Annotated[str | None, typer.Option(help="The daemon's status server instead, e.g. http://127.0.0.1:8765.")] = None,
    errors: Annotated[int, typer.Option(min=0, help="How many of its latest errors to list.")] = 5,
    plans: Annotated[int, typer.Option(min=0, help="How many of its latest plans to list.")] = 5,
    as_json: Annotated[bool, typer.Option("--json", help="Print /status.json as it is.")] = False,
) -> None:
    """Ask a running daemon how it is: health, what it reads, whether its steering is held, paused
    or waiting (and what would let it go on), its frame disks, its latest errors and plans.
    Exit code 0 when it is healthy, 1 when it says it is not, 2 when it does not answer."""
    import json
    import urllib.error
    import urllib.request

    from agents.errors import AgentError

    if (config is None) == (url is None):
        raise typer.BadParameter("give exactly one: --config FILE or --url http://HOST:PORT", param_hint="--config")
    if config is not None:
        from agents.daemon_config import load_daemon_config

        http = load_daemon_config(config).http
        host = "127.0.0.1" if http.host in ("0.0.0.0", "::", "") else http.host  # bound to every address
        url = f"http://{host}:{http.port}"
    assert url is not None
    try:
        with urllib.request.urlopen(url.rstrip("/") + "/status.json", timeout=10) as reply:
            status = json.loads(reply.read())
    except (urllib.error.URLError, OSError, ValueError) as err:
        raise AgentError(f"no daemon answers at {url} ({getattr(err, 'reason', err)}): is it running "
                         "(systemctl status beampilot), and is this its http host and port?") from None
    if as_json:
        typer.echo(json.dumps(status, indent=1))
    else:
        from agents.daemon import describe_status

        typer.echo(describe_status(status, url, errors=errors, plans=plans))
    raise typer.Exit(0 if status.get("healthy") else 1)


@app.command(
    "replay",
    short_help="Stream stored runs as documents into Kafka or in-process agents, at recorded timing or fast.",
)
@_reported
def replay(
    source: Annotated[str, typer.Argument(help="A tiled server URI (http://host:port, or http://host:port/PATH) or a beampilot zarr store.")],
    run: Annotated[list[str] | None, typer.Option("--run", help="Uid of a run to replay (repeatable); default: all.")] = None,
    speed: Annotated[float, typer.Option(help="Recorded timing divided by SPEED (1: as recorded, 10: ten times faster).")] = 1.0,
    fast: Annotated[bool, typer.Option("--fast", help="As fast as possible, ignoring the recorded timing.")] = False,
    kafka: Annotated[str | None, typer.Option(help="Publish to the broker at host:port.")] = None,
    topic: Annotated[str | None, typer.Option(help="Kafka topic (default: BEAMLINE.bluesky.runengine.documents).")] = None,
    beamline: Annotated[str, typer.Option(help="Beamline name for the default topic.")] = "beampilot",
    agents: Annotated[Path | None, typer.Option(
        help="Feed the agents of this daemon config in-process instead of publishing to Kafka.")] = None,
    on_sim: Annotated[bool, typer.Option("--on-sim", help=(
        "Re-measure each recorded run's points on the simulated SAS instrument and stream the new documents."))] = False,
    sample: Annotated[SampleKind, typer.Option(help="With --on-sim: the simulated sample, when the run does not say.")]
    = SampleKind.polydisperse_sphere,
    seed: Annotated[int, typer.Option(help="With --on-sim: seed of the simulated sample and noise.")] = 0,
    quiet: Annotated[bool, typer.Option(help="No progress bar.")] = False,
) -> None:
    """Stream stored runs as documents, at recorded timing (scaled by --speed) or --fast, into
    Kafka or into in-process agents; --on-sim re-runs each recorded run on the simulated devices."""
    import json


    if speed <= 0:
        raise typer.BadParameter(f"--speed must be > 0, got {speed}", param_hint="--speed")
    if (kafka is None) == (agents is None):
        raise typer.BadParameter("give exactly one target: --kafka HOST:PORT or --agents CONFIG", param_hint="--kafka")
    sink, finish = _replay_target(kafka, topic or f"{beamline}.bluesky.runengine.documents", agents)
    stats = _replay(source, run, None if fast else speed, sink, on_sim, sample.value, seed, not quiet)
    stats["target"] = finish()
    typer.echo(json.dumps(stats, indent=1, default=str))


def _replay_target(kafka: str | None, topic: str, agents_config: Path | None):
    if kafka is not None:
        from streams.kafka import KafkaDocumentSink, KafkaSettings

        settings = KafkaSettings(bootstrap_servers=kafka)
        settings.check_reachable(timeout=5.0)
        sink = KafkaDocumentSink(topic, settings)

        def finish():
            sink.flush()
            sink.close()
            return {"kafka": kafka, "topic": topic}

        return sink, finish
    from agents.daemon import build_agent
    from agents.daemon_config import load_daemon_config
    from agents.safety import SafetyGate

    cfg = load_daemon_config(agents_config)
    outbox: list = []
    built = {e.name: (e, build_agent(e, cfg.state_dir, [lambda n, d: outbox.append((n, d))])) for e in cfg.agents}

    errors: dict[str, list[str]] = {}

    def sink(name, doc):
        for agent_name, (_, agent) in built.items():
            try:
                agent.tell(name, doc)
            except Exception as err:  # as in the daemon: named and counted, never fatal
                said = f"{name} {doc.get('uid')}: {type(err).__name__}: {err}"
                if not errors.get(agent_name):
                    typer.secho(f"agent {agent_name} failed on {said} (the replay goes on; counted in agent_errors)",
                                fg=typer.colors.YELLOW, err=True)
                errors.setdefault(agent_name, []).append(said)

    def finish():
        out = {"derived_documents": len(outbox), "agents": {},
               "agent_errors": {name: {"count": len(said), "first": said[:3]} for name, said in errors.items()}}
        for name, (entry, agent) in built.items():
            report = agent.report()
            if entry.safety is not None:  # what it would ask for next, judged by the gate, not sent
                gate = SafetyGate(entry.safety.to_config())
                report["next_requests"] = [
                    {"plan": r.plan, "points": len(r.kwargs.get("points", ())), "accepted": (v := gate.admit(r)).accepted,
                     "reason": v.reason} for r in agent.ask(entry.batch_size)]
            out["agents"][name] = report
        return out

    return sink, finish


def _replay(source: str, runs, speed, sink, on_sim: bool, sample: str, seed: int, progress: bool) -> dict:
    from streams.replay import open_store, replay_runs

    store = open_store(source)
    uids = list(runs) if runs else list(store.runs())
    if not uids:
        raise typer.BadParameter(f"{source} holds no runs", param_hint="SOURCE")
    missing = []
    for uid in runs or ():  # before anything is sent: every run asked for is there
        try:
            next(iter(store.documents(uid)))
        except KeyError:
            missing.append(uid)
    if missing:
        held = list(store.runs())
        raise typer.BadParameter(f"no run {', '.join(map(repr, missing))} in {source}; it holds {len(held)} run(s): "
                                 + ", ".join(held[:5]) + (", ..." if len(held) > 5 else ""), param_hint="--run")
    if not on_sim:
        stats = replay_runs(store, uids, sink, speed=speed, progress=progress)
        return {"source": source, "runs": len(uids), **vars(stats)}
    from agents.replay_sim import rerun_on_sim

    reruns = [rerun_on_sim(store.documents(uid), sink, sample_kind=sample, seed=seed) for uid in uids]
    return {"source": source, "runs": len(uids), "reruns": reruns}


def _print_tune_summary(summary: dict, out: Path) -> None:
    """What ``demo tune`` found, against the simulator's true optimum (known only to a demo)."""
    setup, opt, final = summary["setup"], summary["true_optimum"], summary.get("final")
    required = setup["required_beam_size"]
    typer.echo(f"stopped: {summary['stop_reason']}")
    if final is None:
        typer.echo(f"  no setting is known to meet beam size <= {required:g} µm yet: no recommendation")
    else:
        met = "meets" if final["meets_requirement"] else "MISSES"
        typer.echo(f"  recommended: flux {final['true_flux']:.3g} /s, {100 * final['fraction_of_optimum']:.1f}% of the "
                   f"optimum {opt['flux']:.3g} /s; beam size {final['true_beam_size']:.2f} µm ({met} <= {required:g} µm)")
        for axis, value in final["settings"].items():
            typer.echo(f"  {axis:>14} = {value:8.4g}   (optimum {opt['settings'][axis]:.4g})")
    within = summary["evals_to_within_5pct"]
    typer.echo(f"  within 5% of the optimum after {within} evaluations" if within is not None else
               f"  not within 5% of the optimum in {summary['n_evaluations']} evaluations")
    decisions = ", ".join(f"{n} {kind}" for kind, n in summary["decisions"].items())
    safety = summary["safety"]
    typer.echo(f"  evaluations: {summary['n_evaluations']} ({decisions}); safety gate: {safety['admitted']} "
               f"admitted, {safety['rejected']} rejected; errors: {len(summary['errors'])}; "
               f"wall time {summary['wall_time_s']:.1f} s")
    typer.echo(f"report: {out}/summary.json, {', '.join(summary.get('figures', []))}; store: {summary['store']}")


def _print_summary(summary: dict, out: Path) -> None:
    fit = summary.get("fit") or {}
    typer.echo(f"stopped: {summary['stop_reason']}")
    for p, v in (fit.get("values") or {}).items():
        truth = summary["truth"].get(p)
        sigma = fit["sigmas"][p]
        typer.echo(f"  {p:>14} = {v:10.4g} ± {sigma:.2g}" + (f"   (truth {truth:.4g})" if truth is not None else ""))
    typer.echo(f"beam time: {summary['beam_time']['exposure_s']:.1f} s exposure in {summary['n_measurements']} "
               f"measurements at {summary['n_distinct_q']} Q; wall time {summary['wall_time_s']:.1f} s")
    typer.echo(f"report: {out}/summary.json, {', '.join(summary.get('figures', []))}; store: {summary['store']}")


if __name__ == "__main__":  # pragma: no cover
    app()

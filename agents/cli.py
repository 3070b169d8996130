"""The ``beampilot`` command line. ``beampilot --help`` lists the commands; each has ``--help``."""

from __future__ import annotations

import logging
from enum import StrEnum
from pathlib import Path
from typing import Annotated

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


@app.callback()
def main(verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Log at INFO level.")] = False) -> None:
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")


@demo_app.command("sas-qscan")
def sas_qscan(
    out: Annotated[Path, typer.Option(help="Directory for the report and the store (store.zarr).")] = Path("demo-output"),
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
) -> None:
    """A RunEngine measures I(Q) of a hidden sample; the agent picks Q and exposure until the
    sample's size is known to 2% (1 sigma); then a report: plots, summary.json, the zarr store."""
    import yaml
    from bluesky.utils import FailedStatus

    from agents.demo_sas import run_demo
    from agents.errors import AgentError
    from simulators.errors import SimulatorError
    from streams.errors import StreamError

    overrides = None
    if config is not None:
        if not config.is_file():
            raise typer.BadParameter(f"{config} does not exist", param_hint="--config")
        overrides = yaml.safe_load(config.read_text()) or {}
        if not isinstance(overrides, dict):
            raise typer.BadParameter(f"{config} must hold a mapping of settings", param_hint="--config")
    if speed is not None and speed <= 0:
        raise typer.BadParameter(f"--speed must be > 0, got {speed}", param_hint="--speed")
    try:
        summary = run_demo(out, sample_kind=sample.value, seed=seed, resume=resume, speed=speed,
                           batch_size=batch_size, overrides=overrides, progress=not quiet)
    except (AgentError, StreamError) as err:
        typer.secho(f"error: {err}", fg=typer.colors.RED, err=True)
        raise typer.Exit(2) from None
    except (FailedStatus, SimulatorError) as err:
        cause = err.__cause__ or err
        store = resume or out / "store.zarr"
        typer.secho(f"error: the instrument failed: {cause}. Everything measured is in {store}; "
                    f"continue with: beampilot demo sas-qscan --resume {store}", fg=typer.colors.RED, err=True)
        raise typer.Exit(3) from None
    _print_summary(summary, out if resume is None else resume.parent)


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

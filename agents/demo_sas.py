"""``beampilot demo sas-qscan``: the closed loop on a simulated SAS instrument, in one process.

A Bluesky RunEngine drives :class:`simulators.sas.SimSASInstrument`, which counts I(Q) of a
hidden sample; :class:`agents.qsampling.QSamplingAgent` chooses each next batch of Q and
exposures through :func:`agents.plans.steered_scan`, every request passing the safety gate,
until the sample's size is known to the wanted precision. Raw and derived runs and the agent's
state go to ``OUT/store.zarr``; the report (PNG plots, ``summary.json``) to ``OUT``.

``--resume OUT/store.zarr`` continues a killed demo from its store: the hidden sample and the
instrument come back from the store's metadata, the agent from its own state, and points asked
for but never measured are measured first.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import zarr
from bluesky import RunEngine
from tqdm import tqdm

from agents.config import QSamplingSettings, SafetySettings, load_settings
from agents.errors import AgentStoreError
from agents.plans import steered_scan
from agents.qsampling import QSamplingAgent
from agents.report import write_report
from agents.safety import SafetyGate
from models.sas import SAMPLE_KINDS, SASModel
from simulators.sas import SimClock, SimSASInstrument, WallClock
from streams.zarr_reader import ZarrRunReader
from streams.zarr_writer import ZarrRunWriter

__all__ = ["DemoSetup", "agent_settings", "closed_loop", "run_demo", "safety_settings"]

logger = logging.getLogger(__name__)

DEMO_ATTR = "beampilot_demo"
Q_RANGE = (0.003, 0.5)  # 1/Angstrom: a pinhole SAXS camera's usual span
DQ_OVER_Q = 0.05
FLUX = 100.0  # counts/s per cm^-1 of I(Q)
DARK_RATE = 0.5  # counts/s


@dataclass(frozen=True)
class DemoSetup:
    """What the demo's hidden world is: kept in the store so a resume rebuilds the same one."""

    sample_kind: str
    truth: dict[str, float]
    seed: int
    q_range: tuple[float, float] = Q_RANGE
    dq_over_q: float = DQ_OVER_Q
    flux: float = FLUX
    dark_rate: float = DARK_RATE

    @classmethod
    def draw(cls, sample_kind: str, seed: int) -> DemoSetup:
        if sample_kind not in SAMPLE_KINDS:
            raise ValueError(f"unknown sample kind {sample_kind!r}; choose from {sorted(SAMPLE_KINDS)}")
        truth = SAMPLE_KINDS[sample_kind].draw_truth(np.random.default_rng(seed))
        return cls(sample_kind, {k: float(v) for k, v in truth.items()}, seed)

    def to_dict(self) -> dict[str, Any]:
        return {**self.__dict__, "q_range": list(self.q_range)}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> DemoSetup:
        return cls(**{**d, "q_range": tuple(d["q_range"])})


def agent_settings(setup: DemoSetup, overrides: dict[str, Any] | None = None) -> QSamplingSettings:
    """The agent's settings for this setup: it knows the model family and prior bounds, not the truth."""
    kind = SAMPLE_KINDS[setup.sample_kind]
    base = {
        "name": "qsampling",
        "fit": {
            "model_name": kind.model_name, "fixed": dict(kind.fixed), "fit_params": list(kind.fit_params),
            "size_params": list(kind.size_params), "bounds": {k: list(v) for k, v in kind.bounds.items()},
        },
        "q_range": list(setup.q_range), "dq_over_q": setup.dq_over_q,
    }
    base.update(overrides or {})
    return load_settings(QSamplingSettings, base, where="the demo's agent settings (with --config's overrides)")


def safety_settings(setup: DemoSetup) -> SafetySettings:
    return SafetySettings(
        allowed_plans=["measure"],
        limits={"q": {"low": setup.q_range[0], "high": setup.q_range[1]}, "exposure": {"low": 0.0, "high": 60.0}},
        max_requests_per_minute=120,  # on the instrument's clock
        max_points_per_request=32,
    )


def make_instrument(setup: DemoSetup, clock: Any, seed: int) -> SimSASInstrument:
    kind = SAMPLE_KINDS[setup.sample_kind]
    sample = SASModel(kind.model_name, dq_over_q=setup.dq_over_q, fixed=kind.fixed)
    return SimSASInstrument(
        name="sas", sample=sample, truth=setup.truth, q_range=setup.q_range,
        flux=setup.flux, dark_rate=setup.dark_rate, seed=seed, clock=clock,
    )


class _Progress:
    """A live line: measurements, beam time, and the size parameters' precision against the goal."""

    def __init__(self, agent: QSamplingAgent, enabled: bool) -> None:
        self.agent = agent
        self.bar = tqdm(desc="measuring", unit="pt", disable=not enabled, dynamic_ncols=True)

    def __call__(self, name: str, doc: dict) -> None:
        if name != "event":
            return
        self.bar.update(1)
        policy = self.agent.policy
        prec = policy.precision(policy.fit.result) if policy else {}
        shown = " ".join(f"σ{p}/{p}={v:.1%}" for p, v in prec.items())
        goal = self.agent.settings.target_rel_sigma
        self.bar.set_postfix_str(f"beam {self.agent.exposure_total:.0f}s {shown} (goal {goal:.0%})")


def closed_loop(
    setup: DemoSetup,
    agent: QSamplingAgent,
    *,
    clock: Any,
    batch_size: int = 4,
    subscribers: tuple[Any, ...] = (),
    md: dict[str, Any] | None = None,
    max_rounds: int | None = None,
) -> SafetyGate:
    """Run ``agent`` against the simulated instrument of ``setup`` until it stops; return the gate.

    The instrument's noise is seeded from the setup's seed and the observations already made,
    so a resumed loop does not draw the same noise again.
    """
    instrument = make_instrument(setup, clock, seed=setup.seed * 100_003 + agent.n_observations)
    gate = SafetyGate(safety_settings(setup).to_config(), clock=clock.time)
    RE = RunEngine({}, context_managers=[])
    for subscriber in subscribers:
        RE.subscribe(subscriber)
    axes = {"q": instrument.q, "exposure": instrument.exposure}
    RE(steered_scan(agent, [instrument], axes, gate=gate, batch_size=batch_size, max_rounds=max_rounds, sleep=clock.sleep,
                    md={"sample_kind": setup.sample_kind, **(md or {})}))
    return gate


def run_demo(
    out: Path,
    *,
    sample_kind: str = "polydisperse_sphere",
    seed: int = 0,
    resume: Path | None = None,
    speed: float | None = None,
    batch_size: int = 4,
    overrides: dict[str, Any] | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Run the closed loop; return the summary also written to ``OUT/summary.json``."""
    wall0 = time.perf_counter()
    if resume is not None:
        store = Path(resume)
        setup = _load_setup(store)
        out = store.parent
    else:
        out.mkdir(parents=True, exist_ok=True)
        store = out / "store.zarr"
        if store.exists():
            raise AgentStoreError(f"{store} exists; pass --resume {store} to continue it, or a new --out")
        setup = DemoSetup.draw(sample_kind, seed)
        settings = agent_settings(setup, overrides)  # a mistake in them leaves no store behind
    writer = ZarrRunWriter(store)  # creates the store, or checks it is one
    if resume is None:
        zarr.open_group(store, mode="a").attrs[DEMO_ATTR] = setup.to_dict()
        agent = QSamplingAgent(settings, store, sinks=[writer])
    else:
        agent = QSamplingAgent.resume(store)
        _catch_up(agent, store)
        agent.sinks = [writer]
    clock = SimClock() if speed is None else WallClock(speed=speed)
    bar = _Progress(agent, progress)
    try:
        gate = closed_loop(setup, agent, clock=clock, batch_size=batch_size, subscribers=(writer, bar),
                           md={"resumed": resume is not None})
    finally:
        bar.bar.close()
        writer.close()
    summary = _summary(agent, gate, setup, store, time.perf_counter() - wall0, clock.time())
    write_report(out, agent, setup, summary)
    return summary


def _catch_up(agent: QSamplingAgent, store: Path) -> None:
    """Replay the raw runs stored beside the agent into it before resuming.

    The run writer saves each event before the agent hears of it; a kill between the two
    leaves events the agent has not seen. Replaying them (the agent ignores events it already
    has, by point key and event uid) means no measurement is lost or made again.
    """
    reader = ZarrRunReader(store)
    before = agent.n_observations
    for uid in reader.runs():
        if "raw_run_uid" not in reader.start(uid):  # derived runs are the agent's own output
            for name, doc in reader.documents(uid):
                agent.tell(name, doc)
    if agent.n_observations > before:
        logger.warning("recovered %d observations from the stored runs", agent.n_observations - before)


def _load_setup(store: Path) -> DemoSetup:
    if not store.exists():
        raise AgentStoreError(f"no store at {store}; pass the store.zarr of an earlier demo")
    attrs = zarr.open_group(store, mode="r").attrs
    if DEMO_ATTR not in attrs:
        raise AgentStoreError(f"{store} was not written by 'beampilot demo sas-qscan'; nothing to resume")
    return DemoSetup.from_dict(dict(attrs[DEMO_ATTR]))


def _summary(agent: QSamplingAgent, gate: SafetyGate, setup: DemoSetup, store: Path, wall: float, clock_s: float) -> dict:
    report = agent.report()
    fit = report["fit"] or {}
    values = fit.get("values", {})
    rel_error = {p: (values[p] - setup.truth[p]) / setup.truth[p] for p in values if p in setup.truth}
    return {
        "sample_kind": setup.sample_kind, "truth": setup.truth, "fit": fit,
        "relative_error_vs_truth": rel_error,
        "beam_time": {"exposure_s": report["exposure_total_s"], "instrument_clock_s_this_session": clock_s},
        "n_measurements": report["n_observations"], "n_distinct_q": report["n_distinct_q"],
        "decisions": report["decisions"], "stop_reason": report["stop_reason"],
        "wall_time_s": wall, "errors": report["errors"], "safety": gate.report(), "store": str(store),
    }

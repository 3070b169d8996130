"""``beampilot run``: agents beside a live experiment, joined to it by Kafka and the queueserver.

The loop, one thread::

    poll documents ──► validate, de-duplicate, order-check ──► agent.tell ──► derived docs to the outbox
         │                                                                            │
         └── after each batch: checkpoint (offsets + open runs + outbox) ──► send outbox (Kafka)
    when caught up: agent.ask ──► safety gate ──► queueserver (idempotent by key)

    beside it, in its own thread: derived topic ──► tiled (streams.tiled_mirror, its own position)

Delivery. The broker delivers at least once; the daemon makes that effectively exactly once:

* the checkpoint (a JSON file, replaced atomically) holds the consumer positions, the start,
  descriptors and (stream) resources of every open run (and its datums no event has used yet), and
  names a binary file beside it with the derived documents of the batch (the *outbox*, packed as
  they go to Kafka: a derived frame is megabytes as JSON), both written **before** the outbox is sent. After a
  kill, the daemon re-sends only those outbox documents whose uids are not already on the derived
  topic, re-primes each agent with the open runs, and reads on from the saved positions;
* agents that batch (detector analysis: frames wait up to a latency budget for a full batch)
  hold the saved positions back: a checkpoint never passes the first frame an agent has been
  told but has not analysed yet, so a kill re-reads those frames instead of losing them. A clean
  shutdown runs the waiting batches first;
* documents read again after a kill are dropped by uid (steering agents keep the event uids they
  stored; the order check drops repeated starts, descriptors and stops);
* plan requests are checked against the queue and its history by idempotency key before they are
  sent, and an agent is asked for more only when none of its plans is queued, running, or
  waiting for its run's stop document.

Bad documents (not msgpack, not a document, out of order, too large) are counted, logged with
their offset and skipped; an agent that raises is logged and counted, never fatal.
"""

from __future__ import annotations

import html
import json
import logging
import math
import signal
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, ClassVar

import event_model
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from agents.daemon_config import AgentEntry, DaemonConfig
from agents.errors import AgentError, ConfigError
from agents.protocol import PlanRequest, PositionAware, RejectionAware
from agents.safety import SafetyGate, is_finite_number
from agents.state_lock import StateDirLock
from streams.derived import validate_document
from streams.errors import DocumentError, StreamError
from streams.files import replace_file
from streams.frame_files import time_left_text
from streams.queueserver import (
    AGENT_META_KEY,
    REQUEST_META_KEY,
    QueueItemRejectedError,
    QueueServerUnreachableError,
)
from streams.sequence import DocumentSequence, events_of

__all__ = ["Checkpoint", "Daemon", "DaemonMetrics", "StatusServer", "build_agent"]

logger = logging.getLogger(__name__)

CHECKPOINT_VERSION = 2  # 2: the outbox in a binary file beside the JSON
READABLE_CHECKPOINT_VERSIONS = (1, 2)  # 1 held the outbox in the JSON
#: a steering agent whose every request is rejected this many rounds in a row is paused, as in steered_scan
MAX_REJECTED_ROUNDS = 3
#: while the queue server does not answer, the first and the longest wait (s) between tries; each
#: try can block the loop for the API's timeout, so the documents are read on in between
QUEUE_RETRY_S = (2.0, 60.0)
#: a detector agent's frame files disk full in less than this (seconds) is shown at the top of the status page
LOW_SPACE_S = 3600.0


# -- metrics ---------------------------------------------------------------------------------------
class DaemonMetrics:
    """Prometheus metrics of one daemon, in a registry of its own (served at ``/metrics``)."""

    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        self.docs_in = Counter("beampilot_documents_in", "Documents read from the stream", ["name"], registry=r)
        self.docs_out = Counter("beampilot_documents_out", "Derived documents published", ["sink"], registry=r)
        self.bad = Counter("beampilot_documents_malformed", "Messages skipped as malformed", ["reason"], registry=r)
        self.dups = Counter("beampilot_documents_duplicate", "Documents dropped as already seen", registry=r)
        self.lag = Gauge("beampilot_consumer_lag", "Messages on the topic not yet read", registry=r)
        self.connected = Gauge("beampilot_broker_connected", "1 while the broker answers", registry=r)
        self.latency = Histogram(
            "beampilot_processing_latency_seconds", "Time from a message's arrival to the end of its processing",
            buckets=(0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 1.0, 5.0), registry=r)
        self.age = Histogram(
            "beampilot_document_age_seconds", "Time from a document's own timestamp to the end of its processing",
            buckets=(0.001, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 1.0, 5.0, 30.0), registry=r)
        self.plans_sent = Counter("beampilot_plans_sent", "Plans sent to the queueserver", ["agent"], registry=r)
        self.plans_rejected = Counter("beampilot_plans_rejected",
                                      "Plans the safety gate or the queue server refused", ["agent"], registry=r)
        self.tiled_connected = Gauge("beampilot_tiled_connected", "1 while tiled answers the mirror (NaN: no tiled)",
                                     registry=r)
        self.tiled_behind = Gauge("beampilot_tiled_behind", "Derived documents on the topic not yet mirrored to tiled",
                                  registry=r)
        self.queue_connected = Gauge("beampilot_queueserver_connected", "1 while the queue server answers (NaN: none)",
                                     registry=r)
        self.held = Gauge("beampilot_steering_held", "1 while the daemon leaves the queue stopped, as an operator "
                          "stopped it or one of its plans (NaN: no steering)", registry=r)
        self.plans_deduplicated = Counter("beampilot_plans_deduplicated",
                                          "Plans not sent because the queue already had their key", registry=r)
        self.plans_taken_back = Counter("beampilot_plans_taken_back",
                                        "Plans removed from the queue that the queue server had put back after "
                                        "their run was cut short (a manager restart, an abort, a plan that raised)", ["agent"],
                                        registry=r)
        self.rate_waits = Counter("beampilot_rate_limit_waits",
                                  "Times an agent was not asked for a plan until its safety gate's rate limit "
                                  "would admit one", ["agent"], registry=r)
        self.errors = Counter("beampilot_errors", "Errors caught and survived", ["where"], registry=r)
        self.checkpoints = Counter("beampilot_checkpoints", "Checkpoints written", registry=r)
        self.refused = Counter("beampilot_derived_refused",
                               "Derived documents the sink refused (too large), kept in state_dir/refused", registry=r)
        self.offset_resets = Counter("beampilot_kafka_offset_resets",
                                     "Partitions whose next offset was gone from the broker", ["cause"], registry=r)
        self.lost = Counter("beampilot_documents_lost",
                            "Messages the broker deleted (retention) before they were read", registry=r)

    def render(self) -> bytes:
        return generate_latest(self.registry)


class AgentMetrics:
    """The agents' own figures, read from them at each scrape (a Prometheus custom collector, so
    nothing has to be kept in step): a detector agent's frames in, out and failed (by cause) and
    its frame files' disk; whether a steering agent is paused."""

    #: each metric as Prometheus scrapes it -> (kind, help, label names)
    FAMILIES: ClassVar[dict[str, tuple[str, str, tuple[str, ...]]]] = {
        "beampilot_agent_frames_in": ("counter", "Frames an analysis agent was told", ("agent",)),
        "beampilot_agent_frames_out": ("counter", "Frames an analysis agent published results of", ("agent",)),
        "beampilot_agent_frames_failed": ("counter", "Frames an analysis agent could not analyse, by cause",
                                          ("agent", "cause")),
        "beampilot_agent_paused": ("gauge", "1 while a steering agent is paused (its plans refused round after round)",
                                   ("agent",)),
        "beampilot_frame_files_free_bytes": ("gauge", ("Free bytes on the disk a detector agent writes its derived "
                                                       "frames to (files)"), ("agent",)),
        "beampilot_frame_files_seconds_to_full": ("gauge", ("Seconds until that disk is full at the rate its free "
                                                            "space fell lately (NaN while it is not falling)"), ("agent",)),
    }

    def __init__(self, figures: Callable[[], dict[str, list[tuple[tuple[str, ...], float]]]]) -> None:
        self._figures = figures

    def describe(self) -> list[Any]:
        return list(self._families({}))

    def collect(self) -> Any:
        return self._families(self._figures())

    def _families(self, figures: dict[str, list[tuple[tuple[str, ...], float]]]) -> Any:
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        for name, (kind, doc, labels) in self.FAMILIES.items():
            family = (CounterMetricFamily if kind == "counter" else GaugeMetricFamily)(name, doc, labels=list(labels))
            for values, value in figures.get(name, []):
                family.add_metric(list(values), value)
            yield family


#: said when the RE Manager's own autostart mode is on (its status' ``queue_autostart_enabled``)
AUTOSTART_WARNING = (
    "the RE Manager's autostart mode is on: it starts the queue whenever the queue holds items, so a "
    "plan that raised, which the manager puts back at the head of its queue, can run again from its "
    "first point (moves no safety gate checked from where the failure left the axes) before the "
    "daemon takes it back; switch it off ('qserver queue autostart disable'): the daemon starts the "
    "queue after its own plans (queueserver.start_queue)")


# -- checkpoint ------------------------------------------------------------------------------------
@dataclass
class Checkpoint:
    """What the daemon needs to go on after a kill, written atomically after every batch."""

    offsets: dict[str, int] = field(default_factory=dict)
    open_runs: dict[str, dict[str, Any]] = field(default_factory=dict)  # uid -> {start, descriptors, resources, datums, partition}
    outbox: list[tuple[str, dict[str, Any]]] = field(default_factory=list)
    derived_offsets: dict[str, int] = field(default_factory=dict)  # derived topic before the outbox
    open_derived: dict[str, dict[str, int]] = field(default_factory=dict)  # derived start uid -> events per stream
    awaiting: dict[str, dict[str, float]] = field(default_factory=dict)  # agent -> {request key: sent at}
    gate_positions: dict[str, dict[str, float]] = field(default_factory=dict)  # agent -> {axis: value}
    # agent -> {axis: [low, high]}: where plans cut short may have left axes (SafetyGate.interrupted)
    gate_spans: dict[str, dict[str, list[float]]] = field(default_factory=dict)
    # agent -> {request key: {"before": positions, "points": [...]}}: awaited plans, to judge a cut
    gate_plans: dict[str, dict[str, dict[str, Any]]] = field(default_factory=dict)
    latest_start: float = 0.0  # wall time the newest run's start arrived
    # the people at the beamline stopped the queue or a plan (Daemon._hold): {"since", "why",
    # "stopped"}; the daemon then starts the queue no more until someone else has
    held: dict[str, Any] | None = None
    written_at: float = 0.0

    @classmethod
    def load(cls, path: Path) -> Checkpoint | None:
        if not path.exists():
            return None
        try:
            raw = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as err:
            raise AgentError(f"checkpoint {path} is unreadable ({err}); move it away to start fresh "
                             "(documents already processed would then be processed again)") from err
        if raw.get("version") not in READABLE_CHECKPOINT_VERSIONS:
            raise AgentError(f"checkpoint {path} has version {raw.get('version')!r}, this beampilot "
                             f"writes {CHECKPOINT_VERSION}; move it away to start fresh")
        raw.pop("version")
        outbox_file = raw.pop("outbox_file", None)
        if outbox_file is not None:
            raw["outbox"] = _read_outbox(path.parent / outbox_file, path)
        raw["outbox"] = [tuple(pair) for pair in raw.get("outbox", [])]  # version 1 kept it in the JSON
        return cls(**raw)

    def save(self, path: Path, *, fsync: bool) -> None:
        """Write the checkpoint: the outbox's documents (derived frames can be megabytes each) to
        a binary file beside it, packed as they go to Kafka; then the rest as JSON, naming that
        file, replacing the checkpoint atomically; then the outbox files it no longer names go."""
        self.written_at = time.time()
        state = {k: v for k, v in self.__dict__.items() if k != "outbox"}
        outbox_file = None
        if self.outbox:
            outbox_file = f"{OUTBOX_PREFIX}{time.time_ns()}.msgpack"
            replace_file(path.parent / outbox_file, _pack_outbox(self.outbox), fsync=fsync)
        data = json.dumps({"version": CHECKPOINT_VERSION, **state, "outbox_file": outbox_file}, default=_jsonable)
        replace_file(path, data.encode(), fsync=fsync)
        for old in path.parent.glob(f"{OUTBOX_PREFIX}*"):  # earlier ones, and a write a crash cut short
            if old.name != outbox_file:
                old.unlink(missing_ok=True)


#: checkpoint.json's sidecar files of derived documents not yet confirmed on the broker
OUTBOX_PREFIX = "outbox-"


def _pack_outbox(docs: list[tuple[str, dict[str, Any]]]) -> bytes:
    """The outbox as it will go to Kafka. A document that cannot be packed (an agent's value msgpack
    cannot serialize) is left out: it can never be sent either, and the send names it
    (:meth:`Daemon._refuse`); stopping here would meet it again at every restart."""
    import msgpack

    from streams.kafka import pack

    packed = []
    for name, doc in docs:
        try:
            packed.append(pack(name, doc))
        except DocumentError:
            continue
    return msgpack.packb(packed)


def _read_outbox(path: Path, checkpoint: Path) -> list[tuple[str, dict[str, Any]]]:
    import msgpack

    from streams.kafka import unpack

    try:
        return [unpack(value) for value in msgpack.unpackb(path.read_bytes())]
    except (OSError, TypeError, ValueError, DocumentError, msgpack.UnpackException) as err:
        raise AgentError(f"checkpoint {checkpoint} names the derived documents of its last batch in {path}, "
                         f"which cannot be read ({err}); move both away to start fresh (those documents "
                         "would then not be published, and documents already processed would be processed "
                         "again)") from err


def _jsonable(value: Any) -> Any:
    tolist = getattr(value, "tolist", None)
    if tolist is not None:
        return tolist()
    raise TypeError(f"{type(value).__name__} is not JSON serializable")


# -- agents ----------------------------------------------------------------------------------------
def build_agent(entry: AgentEntry, state_dir: Path, sinks: list[Any]) -> Any:
    """Make (or re-open from its store) the agent an entry of the config describes."""
    from agents.config import load_settings, read_mapping

    def settings(model: Any) -> Any:
        where = f"the settings of agent {entry.name!r} (kind {entry.kind}"
        where += ")" if isinstance(entry.settings, dict) else f", {entry.settings})"
        given = (entry.settings if isinstance(entry.settings, dict)
                 else read_mapping(entry.settings, "agent settings file"))
        return load_settings(model, {"name": entry.name, **given}, where=where)

    if entry.kind == "rate":
        from agents.reduce import RateAgent, RateSettings

        return RateAgent(settings(RateSettings), sinks=sinks)
    if entry.kind == "detector":
        from agents.detector_agent import DetectorAnalysisAgent, DetectorSettings

        return DetectorAnalysisAgent(settings(DetectorSettings), sinks=sinks)
    cls, settings_model = _steering_kinds()[entry.kind]
    store = state_dir / "agents" / entry.name / "store.zarr"
    if store.exists():  # its settings come back from the store
        agent = cls.resume(store, sinks=sinks)
        logger.info("agent %s resumed from %s with %d observations", entry.name, store, agent.n_observations)
        return agent
    return cls(settings(settings_model), store, sinks=sinks)


def _steering_kinds() -> dict[str, tuple[Any, Any]]:
    """Steering agent classes by config ``kind``, with their settings models."""
    from agents.config import QSamplingSettings
    from agents.mapping import MappingAgent, MappingSettings
    from agents.qsampling import QSamplingAgent
    from agents.sextupole import SextupoleAgent, SextupoleSettings
    from agents.tuning import TuningAgent, TuningSettings

    return {"qsampling": (QSamplingAgent, QSamplingSettings), "mapping": (MappingAgent, MappingSettings),
            "tuning": (TuningAgent, TuningSettings), "sextupole": (SextupoleAgent, SextupoleSettings)}


@dataclass
class _Steering:
    """A steering agent's connection to the plan sink."""

    entry: AgentEntry
    gate: SafetyGate
    rejected_rounds: int = 0
    paused: str | None = None  # why it is no longer asked for plans
    idle_since: float | None = None  # since when its queued plans wait in a queue that does not run
    stalled: str | None = None  # why they wait, once reported
    stall_checked: float = 0.0  # monotonic time of the last look at whether the queue runs
    queue_seen: tuple[Any, ...] = ()  # the queue's, the history's and the running item's uids then
    rate_until: float | None = None  # monotonic time its gate's rate limit admits a plan again


@dataclass
class _QueueServerLink:
    """Whether the queue server answers; while it does not, when to try it next."""

    down_since: float | None = None  # monotonic
    reason: str = ""
    next_try: float = 0.0
    wait: float = QUEUE_RETRY_S[0]
    last_said: float = 0.0


class _Outbox:
    """The agents' derived-document sink: documents wait here until the batch is checkpointed."""

    def __init__(self) -> None:
        self.docs: list[tuple[str, dict[str, Any]]] = []

    def __call__(self, name: str, doc: dict[str, Any]) -> None:
        self.docs.append((name, doc))

    def close(self) -> None:
        pass


# -- the daemon ------------------------------------------------------------------------------------
class Daemon:
    """Runs the agents of a :class:`DaemonConfig` against a document stream.

    Parameters
    ----------
    config
        The validated configuration.
    source, derived_sink, plan_sink
        Built from ``config`` when not given (tests and the benchmark pass their own; a plan sink
        has :class:`~streams.queueserver.QueueServerPlanSink`'s ``one_look``, ``find``,
        ``outstanding``, ``take_back_reruns``, ``submit``, ``start_queue`` and ``close``). Tiled, when configured,
        follows the derived topic on its own (:mod:`streams.tiled_mirror`).
    """

    def __init__(self, config: DaemonConfig, *, source: Any = None, derived_sink: Any = None,
                 plan_sink: Any = None) -> None:
        self.config = config
        self.state_dir = Path(config.state_dir)
        self.state_dir.mkdir(parents=True, exist_ok=True)
        self._state_lock = StateDirLock(self.state_dir).acquire()  # one daemon per state_dir
        try:
            self._start(source, derived_sink, plan_sink)
        except BaseException:
            self._state_lock.release()
            raise

    def _start(self, source: Any, derived_sink: Any, plan_sink: Any) -> None:
        config = self.config
        self.checkpoint_path = self.state_dir / "checkpoint.json"
        self.metrics = DaemonMetrics()
        self.metrics.registry.register(AgentMetrics(self._agent_figures))
        self.started_at = time.time()
        self.recent_errors: deque[str] = deque(maxlen=50)
        self._cut: deque[str] = deque(maxlen=1000)  # request keys of plans judged cut short
        self.recent_plans: deque[dict[str, Any]] = deque(maxlen=50)
        self.last_loop = time.monotonic()
        self.stopping = threading.Event()
        self._lock = threading.Lock()  # agents' reports are read by the HTTP thread
        self.sequence = DocumentSequence()
        self.outbox = _Outbox()
        self._derived_streams: dict[str, tuple[str, str]] = {}  # derived descriptor uid -> (start uid, stream)
        self._group_committed = 0.0
        # checkpoint saves failing in a row (a full or read-only state disk): since when, how many,
        # the last reason, and when it was last said (once a minute, not once a round)
        self._save_failing: dict[str, Any] | None = None
        self.state = Checkpoint.load(self.checkpoint_path) or Checkpoint()
        self._run_of_descriptor = {d["uid"]: uid for uid, run in self.state.open_runs.items()
                                   for d in run["descriptors"]}
        for run in self.state.open_runs.values():  # a checkpoint from before last_seen was kept
            run.setdefault("last_seen", time.time())
        self.kafka_settings = self.config.kafka.settings()
        # the agents first: a mistake in their settings or weights is reported before any server
        # (broker, tiled, queueserver) has to be up
        self.agents: dict[str, Any] = {}
        self.steering: dict[str, _Steering] = {}
        for entry in config.agents:
            self.agents[entry.name] = build_agent(entry, self.state_dir, [self.outbox])
            if entry.safety is not None:
                gate = SafetyGate(entry.safety.to_config())
                gate.restore_positions(self.state.gate_positions.get(entry.name, {}),
                                       {a: (lo, hi) for a, (lo, hi) in self.state.gate_spans.get(entry.name, {}).items()})
                for key, plan in self.state.gate_plans.get(entry.name, {}).items():
                    gate.keep_plan(key, plan["before"], plan["points"])
                self.steering[entry.name] = _Steering(entry, gate)
        self._queue = _QueueServerLink()
        self._broker_down: tuple[float, float] | None = None  # a broker outage: (since, last said), monotonic
        self._repeated: dict[str, tuple[float, int]] = {}  # error message -> (last said, times since)
        self._autostart_said = False  # the RE Manager's autostart mode seen on, and said so
        self._refused_bytes: int | None = None  # size of state_dir/refused, read at the first refusal
        self._refused_said: tuple[float, int] = (-1e9, 0)  # a refusal last said (monotonic), refusals since
        made: list[Any] = []  # what this constructor opened: closed again if a later part fails
        try:
            if source is None:
                source = self._make_source()
                made.append(source)
            if derived_sink is None:
                derived_sink = self._make_derived_sink()
                made.append(derived_sink)
            if plan_sink is None:
                plan_sink = self._make_plan_sink()
                made += [plan_sink] if plan_sink is not None else []
            self.tiled_mirror = self._make_tiled_mirror()  # last: it starts a thread
        except BaseException:
            for thing in reversed(made):
                try:
                    thing.close()
                except Exception as err:  # noqa: BLE001 — the first error is the one to report
                    logger.debug("closing %s after a failed start: %s", type(thing).__name__, err)
            raise
        self.source, self.derived_sink, self.plan_sink = source, derived_sink, plan_sink
        # NaN, not 0, for a server this daemon does not use: an alert on "== 0" fires only where it matters
        if plan_sink is None:
            self.metrics.queue_connected.set(math.nan)
        self.metrics.held.set(math.nan if plan_sink is None else 1 if self.state.held else 0)
        if self.tiled_mirror is None:
            self.metrics.tiled_connected.set(math.nan)
            self.metrics.tiled_behind.set(math.nan)
        if not self.state.offsets and self.config.start_at == "end":
            # where "from now on" began: a restart before the first document reads on from here
            self.state.offsets = dict(self.source.positions())
        # where each batching agent last had nothing waiting: the checkpoint goes no further
        self._consumed: dict[str, int] = dict(self.state.offsets)
        self._reading: tuple[str, int] = ("", -1)  # the record being processed (topic:partition, offset)
        self._settled: dict[str, dict[str, int]] = {n: dict(self._consumed) for n, a in self.agents.items()
                                                     if hasattr(a, "frames_waiting")}
        self._recover()
        if not self.checkpoint_path.exists():
            self._save()  # from now on a restart knows where this daemon stood
        self._last_poll_had_records = True
        self._last_check = 0.0
        self._history_seen: dict[str, float] = {}
        self._stopped_agents: set[str] = set()
        self._last_abandon_check = 0.0

    # -- construction from config ------------------------------------------------------------------
    def _make_source(self) -> Any:
        from streams.kafka import KafkaDocumentSource

        self.kafka_settings.check_reachable(timeout=5.0)
        # The checkpoint, not the group, says where to start: it moves with the agents' state.
        # The group only mirrors it, so a facility's lag monitor sees this consumer.
        if not self.state.offsets:  # a first start: say where it reads from, and what that means
            logger.warning("no checkpoint in %s: reading %s from %s%s", self.config.state_dir,
                           self.config.documents_topic,
                           "its first retained message (every run the topic holds reaches the agents; "
                           "start_at: end reads only what is published from now on)"
                           if self.config.start_at == "beginning" else "what is published from now on (start_at: end)",
                           f", unless consumer group {self.config.kafka.group_id!r} has a position"
                           if self.config.kafka.group_id else "")
        return KafkaDocumentSource([self.config.documents_topic], self.kafka_settings,
                                   group_id=self.config.kafka.group_id,
                                   offsets=self.state.offsets or None,
                                   from_beginning=self.config.start_at == "beginning",
                                   max_message_bytes=self.config.max_message_bytes)

    def _make_derived_sink(self) -> Any:
        from streams.kafka import KafkaDocumentSink

        # Each batch ends in a flush, so the producer need not wake its sender for every document:
        # a linger lets one request carry the batch (the user's extra settings still win).
        settings = self.kafka_settings.model_copy(update={"extra": {"linger_ms": 5, **self.kafka_settings.extra}})
        return KafkaDocumentSink(self.config.derived_topic, settings, key=f"beampilot.{self.config.beamline}",
                                 max_message_bytes=self.config.max_message_bytes, keep_refused=True)

    def _make_tiled_mirror(self) -> Any:
        """Derived runs reach tiled from the derived topic, by a mirror in its own thread: a tiled
        outage or a kill of the daemon costs tiled nothing (:mod:`streams.tiled_mirror`)."""
        if self.config.tiled is None:
            return None
        from streams.kafka import KafkaDocumentSource
        from streams.tiled_io import TiledUnreachableError, check_reachable
        from streams.tiled_mirror import TiledMirror

        uri, secret = self.config.tiled.uri, self.config.tiled.api_key
        key = secret.get_secret_value() if secret else None
        try:
            check_reachable(uri, api_key=key)  # a wrong key, or not tiled at that address, fails here
        except TiledUnreachableError as err:  # down now (a restart at 3 a.m.): not a reason to stop
            logger.warning("%s; the derived runs wait on the derived topic and reach tiled when it is back", err)
        return TiledMirror(lambda offsets: KafkaDocumentSource(self.config.derived_topic, self.kafka_settings,
                                                               offsets=offsets,
                                                               max_message_bytes=self.config.max_message_bytes),
                           uri, api_key=key, state_path=self.state_dir / "tiled_mirror.json").start()

    def _make_plan_sink(self) -> Any:
        if not any(a.safety for a in self.config.agents):
            return None
        q = self.config.queueserver
        assert q is not None  # the config's validator demands it for steering agents
        sink = q.plan_sink()
        try:
            sink.check_reachable()
        except QueueServerUnreachableError as err:  # down now (a restart at 3 a.m.): analysis goes on
            self._queue_server_lost(err)  # plans wait for it, as in an outage
        except BaseException:
            sink.close()
            raise
        return sink

    # -- recovery ----------------------------------------------------------------------------------
    def _recover(self) -> None:
        """After a restart: finish the outbox, close orphaned derived runs, re-prime the agents."""
        st = self.state
        if st.outbox:
            present = self._uids_on_derived_topic(st.derived_offsets)
            resend = [(n, d) for n, d in st.outbox if d.get("uid") not in present]
            logger.warning("recovering: %d derived documents of the last batch were already sent, %d are sent now",
                           len(st.outbox) - len(resend), len(resend))
            self._send(resend)
            st.outbox = []
        for uid, counts in list(st.open_derived.items()):
            stop = {"uid": str(uuid.uuid4()), "time": time.time(), "run_start": uid, "exit_status": "abort",
                    "reason": "beampilot daemon restarted; the analysis goes on in a new derived run",
                    "num_events": counts}
            validate_document("stop", stop)
            self.outbox("stop", stop)
        for run in st.open_runs.values():
            self.sequence.check("start", run["start"])
            for descriptor in run["descriptors"]:
                self.sequence.check("descriptor", descriptor)
            self._tell_all("start", run["start"])
            for descriptor in run["descriptors"]:
                self._tell_all("descriptor", descriptor)
            for kind in ("resource", "stream_resource"):
                for resource in run.get(f"{kind}s", []):
                    self._tell_all(kind, resource)
            for datum in run.get("datums", {}).values():
                self._tell_all("datum", datum)
        if st.open_runs:
            logger.warning("re-primed the agents with %d open runs", len(st.open_runs))
        if self.outbox.docs:
            self._commit()

    def _uids_on_derived_topic(self, offsets: dict[str, int]) -> set[str]:
        from streams.kafka import KafkaDocumentSource

        reader = KafkaDocumentSource([self.config.derived_topic], self.kafka_settings, offsets=offsets or None,
                                     from_beginning=True)
        uids: set[str] = set()
        try:
            idle = 0
            while idle < 3:
                records = reader.poll(0.2)
                idle = 0 if records else idle + 1
                uids.update(r.doc.get("uid") for r in records if r.error is None)
        finally:
            reader.close()
        return uids

    # -- the loop ----------------------------------------------------------------------------------
    def run(self, *, install_signals: bool = True) -> None:
        """Loop until SIGTERM / SIGINT (or :attr:`stopping` is set), then shut down cleanly."""
        if install_signals:
            for sig in (signal.SIGTERM, signal.SIGINT):
                signal.signal(sig, lambda *_: self.stopping.set())
        logger.info("beampilot daemon: %d agents on %s", len(self.agents), self.config.documents_topic)
        try:
            while not self.stopping.is_set():
                self.step()
        finally:
            self.close()

    def step(self) -> int:
        """One poll-process-checkpoint-send round, then plans if caught up. Returns documents read."""
        self.last_loop = time.monotonic()
        try:
            records = self.source.poll(self.config.poll_timeout_s)
        except Exception as err:  # the source reconnects by itself; never die on a poll
            self._error("poll", f"poll failed: {err}")
            records = []
        connected = getattr(self.source, "connected", True)
        self.metrics.connected.set(1 if connected else 0)
        self._say_broker(connected)
        self._report_resets()
        if self.tiled_mirror is not None:
            mirrored = self.tiled_mirror.status()
            self.metrics.tiled_connected.set(1 if mirrored["connected"] else 0)
            if mirrored["behind"] is not None:
                self.metrics.tiled_behind.set(mirrored["behind"])
        processed = 0
        for record in records:
            self._reading = (f"{record.topic}:{record.partition}", record.offset)
            processed += self._process(record)
            self._consumed[self._reading[0]] = record.offset + 1
            self._note_settled()
        if records:
            self._commit()
        else:
            self._poll_agents()
            self._abandon_stale_runs()
        lag = self.source.lag() if hasattr(self.source, "lag") else None
        if lag is not None:
            self.metrics.lag.set(lag)
        if not records and self.plan_sink is not None:
            self._plans()
        return len(records)

    def _report_resets(self) -> None:
        """Say each partition the source found out of range (retention, a recreated topic) once."""
        for reset in self.source.take_resets() if hasattr(self.source, "take_resets") else ():
            self.metrics.offset_resets.labels(cause=reset.cause).inc()
            if reset.lost:
                self.metrics.lost.inc(reset.lost)
            self._error("kafka", reset.message)
            if reset.cause == "recreated":  # the rest of the runs open in the old log is gone with it
                cut = [uid for uid, run in self.state.open_runs.items() if run.get("partition", reset.key) == reset.key]
                for uid in cut:
                    self._close_run(uid, f"the rest of this run went with the old log of {reset.key}",
                                    f"its other documents went with the old log of {reset.key}")
                if cut:
                    self._commit()

    def _process(self, record: Any) -> int:
        t0 = time.monotonic()
        if record.error is not None:
            self.metrics.bad.labels(reason=record.error.split(":")[0][:40]).inc()
            self._error("document", f"skipped message at {record.topic}:{record.partition}@{record.offset}: {record.error}")
            return 0
        name, doc = record.name, record.doc
        reason = self.sequence.check(name, doc)
        if reason is not None:
            if "duplicate" in reason or "already" in reason:
                self.metrics.dups.inc()
            else:
                self.metrics.bad.labels(reason="out of order").inc()
                self._error("document", f"skipped {name} at {record.topic}:{record.partition}@{record.offset}: {reason}")
            return 0
        self._track(name, doc)
        if name in ("event", "event_page"):
            self._take_up_positions(name, doc)
        self._tell_all(name, doc)
        self.metrics.docs_in.labels(name=name).inc()
        now = time.monotonic()
        self.metrics.latency.observe(now - t0)
        if "time" in doc:
            self.metrics.age.observe(max(0.0, time.time() - float(doc["time"])))
        return 1

    def _take_up_positions(self, name: str, doc: dict[str, Any]) -> None:
        """Where a steering agent's gate does not know an axis yet (a daemon that has admitted no
        plan for it), the stream's latest reading of that axis says where it is, so the first step
        is checked against ``max_step`` too, as :func:`~agents.plans.steered_scan` does in process.
        Known positions are left alone: they are where admitted plans will have left the axes, which
        readings of plans still running must not undo."""
        data = doc.get("data") or {}
        for agent_name, steering in self.steering.items():
            known = steering.gate.positions
            seen: dict[str, float] = {}
            for axis in steering.gate.config.limits:
                value = data.get(axis) if axis not in known else None
                if name == "event_page":
                    value = value[-1] if isinstance(value, list) and value else None
                if is_finite_number(value):
                    seen[axis] = float(value)
            if not seen:
                continue
            steering.gate.restore_positions(seen)
            logger.info("agent %s: took up %s from the stream as where the axes are", agent_name, seen)
            agent, here = self.agents[agent_name], steering.gate.positions
            if isinstance(agent, PositionAware):
                self._each_agent(f"positions {here}", lambda a: a.observe_positions(here), only=lambda a: a is agent)

    def _track(self, name: str, doc: dict[str, Any]) -> None:
        """Keep the start and descriptors of open runs (for re-priming) and clear awaited plans."""
        runs = self.state.open_runs
        if name == "start":
            runs[doc["uid"]] = {"start": doc, "descriptors": [], "resources": [], "datums": {},
                                "partition": self._reading[0]}
            self.state.latest_start = time.time()
        elif name == "descriptor" and doc.get("run_start") in runs:
            runs[doc["run_start"]]["descriptors"].append(doc)
            self._run_of_descriptor[doc["uid"]] = doc["run_start"]
        elif name in ("resource", "stream_resource") and doc.get("run_start") in runs:
            runs[doc["run_start"]].setdefault(f"{name}s", []).append(doc)
        elif name in ("datum", "datum_page"):
            # kept until the checkpoint passes the event that uses it (see _forget_used_datums)
            datums = [doc] if name == "datum" else list(event_model.unpack_datum_page(doc))
            for run in runs.values():
                if any(r["uid"] == doc.get("resource") for r in run.get("resources", [])):
                    run.setdefault("datums", {}).update((d["datum_id"], d) for d in datums)
        if name in ("event", "event_page"):
            for event in events_of(name, doc):
                self._note_point(event)
        if name in ("event", "event_page") and any(run.get("datums") for run in runs.values()):
            values = doc.get("data", {}).values()
            if name == "event_page":
                values = [v for column in values for v in column]
            used = {v for v in values if isinstance(v, str)}
            for run in runs.values():
                for datum_id in used & set(run.get("datums", {})):
                    run.setdefault("datums_used", {})[datum_id] = list(self._reading)
        elif name == "stop":
            run = runs.pop(doc.get("run_start"), None)
            for descriptor in (run or {}).get("descriptors", []):
                self._run_of_descriptor.pop(descriptor["uid"], None)
            key = _request_key(run["start"]) if run else None
            if run and key is not None and doc.get("exit_status") != "success":
                self._plan_cut(run, str(doc.get("exit_status")), str(doc.get("reason") or ""))
                ours = any(key in waiting for waiting in self.state.awaiting.values())  # not a replayed run's
                if doc.get("exit_status") == "abort" and ours:  # RE.abort / RE.halt: someone's hand, not a fault
                    self._hold(f"plan {key} of agent {run['start'].get(AGENT_META_KEY)} was aborted")
            if key is not None:
                for waiting in self.state.awaiting.values():
                    waiting.pop(key, None)
        # when the run last said anything (datums aside: events follow them), for _abandon_stale_runs
        uid = doc["uid"] if name == "start" else doc.get("run_start") or self._run_of_descriptor.get(
            doc.get("descriptor", ""), "")
        if uid in runs:
            runs[uid]["last_seen"] = time.time()

    def _note_point(self, event: dict[str, Any]) -> None:
        """For a run of one of our plans: how many points it has measured (its primary stream's
        ``seq_num``) and the axes' readings there, for :meth:`_plan_cut`."""
        run = self.state.open_runs.get(self._run_of_descriptor.get(event.get("descriptor", ""), ""))
        if run is None or _request_key(run["start"]) is None:
            return
        primary = {d["uid"] for d in run["descriptors"] if d.get("name", "primary") == "primary"}
        steering = self.steering.get(str(run["start"].get(AGENT_META_KEY)))
        if event.get("descriptor") not in primary or steering is None:
            return
        data = event.get("data") or {}
        run["last_point"] = {"measured": int(event.get("seq_num", 0)),
                             "readings": {axis: float(data[axis]) for axis in steering.gate.config.limits
                                          if is_finite_number(data.get(axis))}}

    def _run_of_request(self, name: str, key: str) -> dict[str, Any]:
        """The open run of agent ``name``'s request ``key``, or a stand-in with only its start's keys
        (no descriptors: how far it got is not known) when no run of it is open."""
        runs = [r for r in self.state.open_runs.values() if _request_key(r["start"]) == key]
        return runs[0] if runs else {"start": {REQUEST_META_KEY: key, AGENT_META_KEY: name}}

    def _plan_cut(self, run: dict[str, Any], status: str, why: str = "") -> None:
        """One of our plans ended before its last point (a stop, an abort, a plan that raised, a
        RunEngine or manager that died): its gate takes the axes to be anywhere between its last
        measured point and the next, and checks the next step from all of that
        (SafetyGate.interrupted). ``why``: the stop document's or the queue server's reason."""
        key, name = _request_key(run["start"]), str(run["start"].get(AGENT_META_KEY))
        steering = self.steering.get(name)
        if steering is None or key is None or key in self._cut:
            return  # judged once: from its stop, or from the queue server's history, whichever is first
        self._cut.append(key)
        point = run.get("last_point") or {}
        # a run never read (the daemon behind, or no start sent): how far it got is not known
        measured = int(point.get("measured", 0)) if run.get("descriptors") is not None else None
        spans = steering.gate.interrupted(key, measured, point.get("readings"))
        self._save_gate(name)
        where = ("; the gate did not know the plan, so it takes the axes to be where they were last read"
                 if spans is None else
                 f"; the axes may be anywhere in {({a: list(v) for a, v in spans.items()})}, and the next "
                 "step of each is checked from all of it" if spans else "")
        after = "an unknown number of points" if measured is None else f"{measured} point(s)"
        because = f": {why}" if why else ""
        self.recent_plans.append({"agent": name, "key": key, "status": "cut short", "time": time.time(),
                                  "reason": f"its run ended {status!r} after {after}{because}"})
        logger.warning("agent %s: plan %s ended %r after %s%s%s", name, key, status, after, because, where)

    def _save_gate(self, name: str) -> None:
        """The gate's state into the checkpoint: positions, spans, and the plans still awaited."""
        gate, st = self.steering[name].gate, self.state
        st.gate_positions[name] = gate.positions
        st.gate_spans[name] = {a: list(v) for a, v in gate.spans.items()}
        plans = {k: gate.admitted_plan(k) for k in st.awaiting.get(name, {})}
        st.gate_plans[name] = {k: {"before": p[0], "points": p[1]} for k, p in plans.items() if p is not None}

    def _each_agent(self, what: str, call: Callable[[Any], Any], only: Callable[[Any], Any] | None = None) -> None:
        """``call(agent)`` for every agent (that ``only`` accepts); an agent that raises is logged
        and counted, never fatal."""
        with self._lock:
            for agent_name, agent in self.agents.items():
                if only is not None and not only(agent):
                    continue
                try:
                    call(agent)
                except Exception as err:
                    self._error(f"agent:{agent_name}", f"agent {agent_name} failed on {what}: "
                                f"{type(err).__name__}: {err}")

    def _abandon_stale_runs(self) -> None:
        """Close, for the agents, runs whose RunEngine has most likely died: no document for
        ``abandon_runs_after_s`` while a later run has started. Without this their derived runs
        stayed open for ever (and their starts in every checkpoint). A RunEngine suspended for
        hours (a beam dump) starts no later run, so its run is left alone; two RunEngines on one
        topic can make a long-suspended run look abandoned: raise the limit or set it to null."""
        limit, now = self.config.abandon_runs_after_s, time.time()
        if limit is None or time.monotonic() - self._last_abandon_check < min(10.0, limit / 4):
            return
        self._last_abandon_check = time.monotonic()
        stale = [uid for uid, run in self.state.open_runs.items()
                 if run["last_seen"] < self.state.latest_start and now - run["last_seen"] > limit]
        for uid in stale:
            quiet = now - self.state.open_runs[uid]["last_seen"]
            self._close_run(uid, f"no stop document; nothing of this run for {quiet:.0f} s while a later run "
                                 "started, so its RunEngine most likely died (abandon_runs_after_s)",
                            f"no document for {quiet:.0f} s and no stop, while a later run started")
        if stale:
            self._commit()

    def _close_run(self, uid: str, reason: str, said: str) -> None:
        """Close an open run for the agents with a stop of ours (``fail``, ``reason``), and say so."""
        stop = {"uid": str(uuid.uuid4()), "time": time.time(), "run_start": uid, "exit_status": "fail",
                "reason": f"beampilot: {reason}"}
        validate_document("stop", stop)
        self.sequence.check("stop", stop)
        self._track("stop", stop)
        self._tell_all("stop", stop)
        self._error("run", f"run {uid} closed for the agents: {said}")

    def _tell_all(self, name: str, doc: dict[str, Any]) -> None:
        self._each_agent(f"{name} {doc.get('uid')}", lambda agent: agent.tell(name, doc))

    def _poll_agents(self) -> None:
        """While the stream is quiet, agents that batch (detector analysis) run a batch whose
        latency budget has passed; what they emit is checkpointed and sent."""
        self._each_agent("poll", lambda agent: agent.poll(), only=lambda agent: hasattr(agent, "poll"))
        self._note_settled()
        if self.outbox.docs:
            self._commit()

    def _flush_agents(self) -> None:
        """Run every waiting batch now (a clean shutdown)."""
        self._each_agent("flush", lambda agent: agent.flush(), only=lambda agent: getattr(agent, "frames_waiting", 0))
        self._note_settled()

    def _note_settled(self) -> None:
        for agent_name in self._settled:
            if not self.agents[agent_name].frames_waiting:
                self._settled[agent_name] = dict(self._consumed)

    def _forget_used_datums(self) -> None:
        """Drop the datums of events the saved positions have passed: they are never read again."""
        for run in self.state.open_runs.values():
            used = run.get("datums_used", {})
            for datum_id, (key, offset) in list(used.items()):
                if offset < self.state.offsets.get(key, 0):
                    run["datums"].pop(datum_id, None)
                    del used[datum_id]

    def _positions(self) -> dict[str, int]:
        """The source's positions, held back to where every batching agent had nothing waiting."""
        positions = self.source.positions()
        for agent_name, settled in self._settled.items():
            if self.agents[agent_name].frames_waiting:
                for key, offset in positions.items():
                    positions[key] = min(offset, settled.get(key, 0))
        return positions

    def _take_outbox(self) -> list[tuple[str, dict[str, Any]]]:
        docs, self.outbox.docs = self.outbox.docs, []
        return docs

    def _commit(self) -> None:
        """Checkpoint positions, open runs and the outbox; then send the outbox."""
        docs = self._take_outbox()
        st = self.state
        st.offsets = self._positions()
        self._forget_used_datums()
        st.outbox = docs
        st.derived_offsets = self.derived_sink.positions() if hasattr(self.derived_sink, "positions") else {}
        for name, doc in docs:
            if name == "start":
                st.open_derived[doc["uid"]] = {}
            elif name == "descriptor":
                st.open_derived.get(doc["run_start"], {}).setdefault(doc.get("name", "primary"), 0)
                self._derived_streams[doc["uid"]] = (doc["run_start"], doc.get("name", "primary"))
            elif name in ("event", "event_page"):  # counted for the stop that closes the run after a kill
                start, stream = self._derived_streams.get(doc["descriptor"], ("", ""))
                if start in st.open_derived:
                    counts = st.open_derived[start]
                    counts[stream] = counts.get(stream, 0) + (len(doc["seq_num"]) if name == "event_page" else 1)
            elif name == "stop":
                st.open_derived.pop(doc["run_start"], None)
                self._derived_streams = {k: v for k, v in self._derived_streams.items() if v[0] != doc["run_start"]}
        self._save()
        self._send(docs)
        st.outbox = []
        if self.config.kafka.group_id is not None and time.monotonic() - self._group_committed > 5.0:
            self._group_committed = time.monotonic()
            try:
                self.source.commit(st.offsets)
            except StreamError as err:
                self._error("kafka", f"group commit: {err}")

    def _save(self) -> None:
        try:
            self.state.save(self.checkpoint_path, fsync=self.config.fsync)
            self.metrics.checkpoints.inc()
        except OSError as err:
            # without a checkpoint a kill would repeat work: say so loudly (once a minute: a full disk
            # must not also fill the log), mark the daemon unhealthy, keep serving
            now, failing = time.monotonic(), self._save_failing
            if failing is None:
                failing = self._save_failing = {"since": now, "wall": time.strftime("%H:%M:%S"), "n": 0, "said": -1e9}
            failing["n"] += 1
            failing["reason"] = f"cannot write {self.checkpoint_path}: {err}"
            if now - failing["said"] >= 60.0:
                failing["said"] = now
                self._error("checkpoint", f"{failing['reason']} ({failing['n']} failed saves since {failing['wall']}; "
                                          "a kill now repeats the work since then: free space in state_dir)")
            else:
                self.metrics.errors.labels(where="checkpoint").inc()
            return
        if self._save_failing is not None:
            logger.warning("checkpoint written again, after %d failed saves since %s", self._save_failing["n"],
                           self._save_failing["wall"])
            self._save_failing = None

    def _send(self, docs: list[tuple[str, dict[str, Any]]]) -> None:
        if not docs:
            return
        from streams.kafka import pack

        sent = 0
        for name, doc in docs:
            try:
                self.derived_sink(name, doc)
                sent += 1
            except DocumentError as err:  # this document can never go (too large): the rest can
                try:
                    packed = pack(name, doc)
                except DocumentError:
                    packed = None
                self._refuse(name, doc.get("uid"), packed, err.reason)
        self.derived_sink.flush()
        # refused by the broker itself (its max.message.bytes), known once the sends are answered
        for refused in self.derived_sink.take_refused() if hasattr(self.derived_sink, "take_refused") else ():
            sent -= 1
            self._refuse(refused.name, refused.uid, refused.value, refused.reason)
        self.metrics.docs_out.labels(sink="kafka").inc(sent)

    def _refuse(self, name: str, uid: str | None, packed: bytes | None, reason: str) -> None:
        """A derived document refused for what it is (over ``max_message_bytes``, the producer's
        ``max_request_size`` or the broker's ``max.message.bytes``): kept in ``state_dir/refused/``
        (up to ``refused_max_bytes`` in all), named, counted. Raising instead stopped the daemon,
        and each restart sent the same checkpointed outbox again: a loop no restart could end.
        Said once a minute while it repeats (a detector's every frame can be refused)."""
        self.metrics.refused.inc()
        folder, limit = self.state_dir / "refused", self.config.refused_max_bytes
        if self._refused_bytes is None:  # what earlier runs left there counts too
            self._refused_bytes = sum(f.stat().st_size for f in folder.glob("*.msgpack")) if folder.exists() else 0
        if packed is None:
            kept = "it could not be kept either (not serializable)"
        elif self._refused_bytes + len(packed) > limit:
            kept = (f"not kept: {folder} holds {self._refused_bytes / 1e6:.0f} MB of refused documents already "
                    f"(refused_max_bytes={limit}); move them away to keep more")
        else:
            path = folder / f"{name}-{uid or uuid.uuid4()}.msgpack"
            try:
                folder.mkdir(exist_ok=True)
                path.write_bytes(packed)
                self._refused_bytes += len(packed)
                kept = f"kept in {path} (streams.kafka.unpack reads it)"
            except OSError as oserr:
                kept = f"it could not be kept either ({oserr})"
        message = (f"derived {name} {uid} was not published: {reason}; {kept} (the daemon's max_message_bytes "
                   "and the broker's message.max.bytes must both allow documents this large)")
        now, (said, since) = time.monotonic(), self._refused_said
        if now - said >= 60.0:
            more = f" (and {since} more refused in the last minute, counted in beampilot_derived_refused_total)" if since else ""
            self._error("derived", message + more)
            self._refused_said = (now, 0)
        else:
            self.metrics.errors.labels(where="derived").inc()
            self._refused_said = (said, since + 1)

    # -- plans -------------------------------------------------------------------------------------
    def _plans(self) -> None:
        now = time.monotonic()
        if now - self._last_check < 0.25 or now < self._queue.next_try:
            return
        self._last_check = now
        with self.plan_sink.one_look():  # one look at the manager for every agent, not one a read
            try:
                self._watch_operator()
            except QueueServerUnreachableError as err:
                self._queue_server_lost(err)
                return
            except StreamError as err:
                self._queue_server_error("the look at the queue server's status", err)
            for name, steering in self.steering.items():
                try:
                    self._plan_round(name, steering)
                except QueueServerUnreachableError as err:
                    self._queue_server_lost(err)
                    return
                except StreamError as err:
                    self._queue_server_error(f"agent {name}", err)
        self._queue_server_answers()

    def _queue_server_error(self, who: str, err: StreamError) -> None:
        """An answer that is an error (the manager's Redis gone, say), to ``who`` asked: logged
        once a minute while it repeats, counted every time."""
        self._error_once_a_minute("queueserver", f"{who}: {err}")

    def _error_once_a_minute(self, where: str, message: str) -> None:
        """:meth:`_error` for an error that repeats each round: logged once a minute while it
        repeats (with how often meanwhile), counted every time."""
        now = time.monotonic()
        said, count = self._repeated.get(message, (-1e9, 0))
        if now - said >= 60.0:
            again = f" (and {count} times more in the last minute)" if count else ""
            self._error(where, message + again)
            # messages not seen for a minute are forgotten, so ones naming a uid do not pile up
            self._repeated = {m: v for m, v in self._repeated.items() if now - v[0] < 60.0}
            self._repeated[message] = (now, 0)
        else:
            self.metrics.errors.labels(where=where.split(":")[0]).inc()
            self._repeated[message] = (said, count + 1)

    def _say_broker(self, connected: bool) -> None:
        """A broker outage in the daemon's own words: when it began, once a minute while it lasts
        (kafka-python's own lines about it are let through once a minute, see the CLI), and when
        the broker answers again."""
        now = time.monotonic()
        down = self._broker_down
        if connected:
            if down is not None:
                self._broker_down = None
                logger.warning("the broker at %s answers again, after %.0f s; reading on where the daemon stopped",
                               self.config.kafka.bootstrap_servers, now - down[0])
            return
        if down is None or now - down[1] >= 60.0:
            since = now if down is None else down[0]
            self._broker_down = (since, now)
            during = "" if down is None else f" for {now - since:.0f} s"
            self._error("kafka", f"the broker at {self.config.kafka.bootstrap_servers} does not answer{during} "
                                 f"({getattr(self.source, 'last_error', None) or 'no connection'}); the experiment's "
                                 "documents wait on its topic and are read when it is back")

    def _queue_server_lost(self, err: QueueServerUnreachableError) -> None:
        """Try again later, waiting longer each time; say so once, then once a minute."""
        q, now = self._queue, time.monotonic()
        first = q.down_since is None
        down_since = now if q.down_since is None else q.down_since
        q.wait = QUEUE_RETRY_S[0] if first else min(2 * q.wait, QUEUE_RETRY_S[1])
        q.down_since, q.reason, q.next_try = down_since, str(err), now + q.wait
        self.metrics.queue_connected.set(0)
        if first or now - q.last_said >= 60.0:
            q.last_said = now
            since = "" if first else f" for {now - down_since:.0f} s"
            self._error("queueserver", f"no plans go out{since}: {err}. The documents are still read and "
                        f"analysed; trying again every {q.wait:.0f}-{QUEUE_RETRY_S[1]:.0f} s")

    def _queue_server_answers(self) -> None:
        q = self._queue
        self.metrics.queue_connected.set(1)
        if q.down_since is not None:
            logger.warning("the queue server answers again, after %.0f s; plans go out again",
                           time.monotonic() - q.down_since)
            self._queue = _QueueServerLink()

    def _plan_round(self, name: str, steering: _Steering) -> None:
        waiting = self.state.awaiting.setdefault(name, {})
        self._take_back_reruns(name)
        for key in list(waiting):
            found = self.plan_sink.find(key)
            if found is None or found.get("where") == "history":
                # finished (or vanished) without its run's stop reaching us: give the stream time
                first = self._history_seen.setdefault(key, time.monotonic())
                if time.monotonic() - first > self.config.settle_s:
                    if found is not None and found.get("exit_status") != "completed":
                        # cut short, its stop never read (a RunEngine that died): judged from the
                        # events read by now, before the agent is asked for its next plan
                        self._plan_cut(self._run_of_request(name, key), str(found.get("exit_status")),
                                       _history_reason(found["item"]))
                        self._hold_if_stopped(name, key, found.get("exit_status"))
                    waiting.pop(key)
                    self._history_seen.pop(key, None)
        assert self.config.queueserver is not None  # a steering agent needs one (DaemonConfig)
        now = time.monotonic()
        if now - steering.stall_checked >= min(5.0, self.config.queueserver.stall_report_s / 2):
            steering.stall_checked = now  # two more requests: not every round while plans run
            self._check_stall(name, steering, self.plan_sink.outstanding(name))
        if steering.paused or waiting or self.plan_sink.outstanding(name) >= steering.entry.max_outstanding:
            return
        if self._rate_limited(name, steering):
            return
        agent = self.agents[name]
        try:
            with self._lock:
                requests = agent.ask(steering.entry.batch_size)
        except Exception as err:  # noqa: BLE001 -- its model failing stops neither the daemon nor the others
            self._error_once_a_minute(f"agent:{name}", f"agent {name} could not decide its next plan "
                                      f"({type(err).__name__}: {err}); its analysis goes on, it is asked again")
            return
        reason = getattr(agent, "stop_reason", None)
        if not requests and reason and name not in self._stopped_agents:
            self._stopped_agents.add(name)
            logger.warning("agent %s says stop: %s", name, reason)
        accepted = [self._submit(name, agent, steering, request) for request in requests]
        if requests and not any(accepted):
            steering.rejected_rounds += 1
            if steering.rejected_rounds >= MAX_REJECTED_ROUNDS:
                last = str(self.recent_plans[-1].get("reason", ""))
                check = ("the queue server's reason, in the log and on the status page"
                         if last.startswith("queue server:") else "the agent's limits against its safety config")
                steering.paused = (f"every request was rejected {steering.rejected_rounds} rounds in a row "
                                   f"(last: {last}); check {check}, then restart the daemon")
                self._error(f"agent:{name}", f"agent {name} paused: {steering.paused}")
        elif requests:
            steering.rejected_rounds = 0
        if self.outbox.docs:  # a decision may publish a fit
            self._commit()

    def _rate_limited(self, name: str, steering: _Steering) -> bool:
        """Whether the gate's rate limit would reject a plan now: then the agent is not asked until
        it would not. Asked anyway, its plan would be rejected and its points given up (a mapping
        agent closes those positions), and three such rounds would pause it: a fast instrument
        would end up stopped by the limit meant to pace it."""
        wait, now = steering.gate.rate_wait(), time.monotonic()
        if not 0 < wait < math.inf:  # an infinite wait (a limit under one a minute) is rejected, and says so
            steering.rate_until = None
            return False
        # a new wait once the last was seen to end (rate_until reset above) or ended a while ago: at
        # the end of one, the gate's clock may still give it a moment more, and that is the same wait
        if steering.rate_until is None or now - steering.rate_until > 1.0:
            self.metrics.rate_waits.labels(agent=name).inc()
            logger.info("agent %s: its next plan waits %.1f s for the rate limit (max_requests_per_minute=%g)",
                        name, wait, steering.gate.config.max_requests_per_minute)
        steering.rate_until = now + wait
        return True

    def _take_back_reruns(self, name: str) -> None:
        """Plans the manager put back in its queue after their run was cut short (a manager
        restart, an abort, a plan that raised) are removed, not run again from their first point
        (QueueServerPlanSink.take_back_reruns); the agent plans again from what it has measured."""
        for key, ran in self.plan_sink.take_back_reruns(name):
            status = (ran.get("result") or {}).get("exit_status")
            self._plan_cut(self._run_of_request(name, key), str(status), _history_reason(ran))
            self._hold_if_stopped(name, key, status)
            self.metrics.plans_taken_back.labels(agent=name).inc()
            self.recent_plans.append({"agent": name, "key": key, "status": "taken back", "time": time.time(),
                                      "reason": f"put back in the queue after its run ended {status!r}"})
            self._error(f"agent:{name}", f"agent {name}: plan {key} was put back in the queue after its run ended "
                        f"{status!r} (as a restarted RE Manager, an abort or a plan that raised does); removed it rather than repeat its moves "
                        "from wherever the interruption left the axes. The agent plans again from what it measured")

    def _submit(self, name: str, agent: Any, steering: _Steering, request: PlanRequest) -> bool:
        """Gate, de-duplicate, send. True unless the gate or the queue server refused it."""
        before, spans_before = steering.gate.positions, steering.gate.spans
        verdict = steering.gate.admit(request)
        if not verdict.accepted:
            return self._rejected(name, agent, request, verdict.reason)
        if self.plan_sink.find(request.key) is not None:
            self.metrics.plans_deduplicated.inc()
            return True
        self.state.awaiting[name][request.key] = time.time()
        self._save_gate(name)
        self._save()  # the key is on disk before it is on the queue
        try:
            self.plan_sink.submit(request)
        except QueueItemRejectedError as err:  # a refusal, as the gate's: reported, never retried as is
            reason = f"queue server: {err.reason}"
            steering.gate.retract(verdict, reason, before, spans_before)
            self.state.awaiting[name].pop(request.key, None)
            self._save_gate(name)
            self._save()
            self._error(f"agent:{name}", f"agent {name}: {err}")
            return self._rejected(name, agent, request, reason)
        self.metrics.plans_sent.labels(agent=name).inc()
        self.recent_plans.append({"agent": name, "key": request.key, "plan": request.plan, "status": "sent",
                                  "points": len(request.kwargs.get("points", ())), "time": time.time()})
        if self.config.queueserver is not None and self.config.queueserver.start_queue and self.state.held is None:
            try:
                self.plan_sink.start_queue()  # no-op when it is running already
            except QueueServerUnreachableError:
                raise
            except StreamError as err:  # queued all the same; _check_stall says what it waits for
                self._error(f"agent:{name}", f"agent {name}: plan {request.key} is queued, but the queue "
                            f"did not start: {err}")
        return True

    def _hold(self, why: str) -> None:
        """Leave the queue stopped: the people at the beamline stopped it, or stopped one of the
        agents' plans (bluesky-queueserver's own autostart mode is switched off by the same acts).
        The agents' next plans still go into the queue, where they can be seen and removed, but
        the daemon does not start it; whoever starts it again (``qserver queue start``) lets them
        run, and the daemon starts it after its plans again. Kept in the checkpoint: a daemon
        restarted at night does not undo an operator's stop."""
        q = self.config.queueserver
        if self.state.held is not None or self.plan_sink is None or q is None or not q.start_queue:
            return  # with start_queue off the daemon never starts the queue: nothing to hold
        self.state.held = {"since": time.time(), "why": why, "stopped": False}
        self.metrics.held.set(1)
        self._save()
        logger.warning("%s: the daemon leaves the queue stopped; the agents' next plans wait in it until "
                       "someone starts it ('qserver queue start')", why)

    def _hold_if_stopped(self, name: str, key: str, exit_status: Any) -> None:
        """A plan that ended stopped, aborted or halted (the queue server's words) was ended by
        someone: hold (a plan that raised ends 'failed' and does not)."""
        if exit_status in ("stopped", "aborted", "halted"):
            self._hold(f"plan {key} of agent {name} was {exit_status}")

    def _watch_operator(self) -> None:
        """From the manager's status of this round: a stop of the queue asked for
        (``queue_stop_pending``, as ``qserver queue stop`` asks it) holds; once held and the queue
        stopped, the queue seen running again (someone started it) ends the hold. The manager's
        own autostart mode seen on is said once (:data:`AUTOSTART_WARNING`), and seen off again."""
        if not hasattr(self.plan_sink, "current_status"):
            return
        status, held = self.plan_sink.current_status(), self.state.held
        autostart = bool(status.get("queue_autostart_enabled"))
        if autostart and not self._autostart_said:
            self._error("queueserver", AUTOSTART_WARNING)
        elif not autostart and self._autostart_said:
            logger.warning("the RE Manager's autostart mode is off again")
        self._autostart_said = autostart
        if held is None:
            if status.get("queue_stop_pending"):
                self._hold("the queue was asked to stop (as 'qserver queue stop' asks)")
            return
        state = status.get("manager_state")
        if state in ("idle", "paused") or not status.get("worker_environment_exists", True):
            if not held["stopped"]:
                held["stopped"] = True
                self._save()
        elif held["stopped"] and state in ("starting_queue", "executing_queue"):
            logger.warning("the queue runs again (started at the queue server): the daemon starts it after its "
                           "plans again; it was held since %s (%s)", time.strftime("%H:%M:%S", time.localtime(held["since"])),
                           held["why"])
            self.state.held = None
            self.metrics.held.set(0)
            self._save()

    def _rejected(self, name: str, agent: Any, request: PlanRequest, reason: str) -> bool:
        """Count, list and tell the agent of a request the gate or the queue server refused."""
        self.metrics.plans_rejected.labels(agent=name).inc()
        self.recent_plans.append({"agent": name, "key": request.key, "plan": request.plan,
                                  "status": "rejected", "reason": reason, "time": time.time()})
        if isinstance(agent, RejectionAware):
            with self._lock:
                agent.rejected(request, reason)
        return False

    def _check_stall(self, name: str, steering: _Steering, outstanding: int) -> None:
        """Report an agent's plans waiting in a queue the RE Manager does not run: once, and
        again when what it waits for changes.

        The daemon starts the queue when it adds to it (``queueserver.start_queue``), never
        otherwise: a queue stopped, a RunEngine paused or an environment closed (a restarted RE
        Manager comes up with none) may be someone's decision, so it says what it waits for and
        what would let the agent go on, and leaves the choice to the people at the beamline.
        """
        state = self.plan_sink.status() if outstanding else {}
        # the queue or the history changed since the last look: plans ran (a fast plan can start
        # and end between two looks, so the RunEngine's state alone would miss it)
        moved = (state.get("plan_queue_uid"), state.get("plan_history_uid"), state.get("running_item_uid"))
        progress, steering.queue_seen = moved != steering.queue_seen, moved
        waiting = state.get("re_state") in (None, "idle", "paused")  # the RunEngine runs nothing now
        if not outstanding or not waiting or progress:
            if steering.stalled is not None:
                logger.warning("agent %s: its plans run again", name)
            steering.idle_since = steering.stalled = None
            return
        now = time.monotonic()
        steering.idle_since = steering.idle_since or now
        assert self.config.queueserver is not None
        if now - steering.idle_since < self.config.queueserver.stall_report_s:
            return
        if state.get("manager_state") == "paused":
            todo = "the RunEngine is paused: resume it ('qserver re resume') or stop it ('qserver re stop')"
        elif not state.get("worker_environment_exists"):
            todo = ("the RE environment is closed (a restarted RE Manager starts without one): open it "
                    "('qserver environment open'), then start the queue ('qserver queue start')")
        elif state.get("manager_state") == "idle":
            todo = "the queue is stopped: start it ('qserver queue start')"
        else:  # seen after the manager's Redis went away mid-plan and came back; a queue stop and
            # start did not clear it there
            todo = (f"the RE Manager says {state.get('manager_state')!r} and runs no plan (did its Redis go "
                    "away?): restart the RE Manager, then open its environment and start the queue")
        if steering.stalled is not None and steering.stalled.endswith(todo):
            return
        address = getattr(self.plan_sink, "address", "the queue server")
        steering.stalled = (f"{outstanding} of its plans wait in the queue at {address} "
                            f"(for {now - steering.idle_since:.0f} s when this was written), but {todo}")
        self._error(f"agent:{name}", f"agent {name}: {steering.stalled}")

    # -- status ------------------------------------------------------------------------------------
    def _error(self, where: str, message: str) -> None:
        self.metrics.errors.labels(where=where.split(":")[0]).inc()
        self.recent_errors.append(f"{time.strftime('%H:%M:%S')} {message}")
        logger.warning("%s", message)

    def healthy(self) -> tuple[bool, str]:
        if time.monotonic() - self.last_loop > 30:
            return False, f"the loop has not turned for {time.monotonic() - self.last_loop:.0f} s"
        if not getattr(self.source, "connected", True):
            return False, f"broker unreachable: {getattr(self.source, 'last_error', '')}"
        if self._queue.down_since is not None:
            return False, (f"queue server unreachable for {time.monotonic() - self._queue.down_since:.0f} s, "
                           f"no plans go out: {self._queue.reason}")
        if self._save_failing is not None:
            return False, (f"no checkpoint for {time.monotonic() - self._save_failing['since']:.0f} s "
                           f"({self._save_failing['n']} failed saves): {self._save_failing['reason']}")
        return True, "ok"

    def files_space(self) -> dict[str, dict[str, Any]]:
        """Each detector agent's disk for its frame files (free, falling, time to full)."""
        with self._lock:
            spaces = {name: agent.files_space() for name, agent in self.agents.items() if hasattr(agent, "files_space")}
        return {name: f for name, f in spaces.items() if f is not None}

    def _agent_figures(self) -> dict[str, list[tuple[tuple[str, ...], float]]]:
        """What :class:`AgentMetrics` exports, read now."""
        out: dict[str, list[tuple[tuple[str, ...], float]]] = {name: [] for name in AgentMetrics.FAMILIES}
        with self._lock:
            for name, agent in self.agents.items():
                if hasattr(agent, "frames_in"):
                    out["beampilot_agent_frames_in"].append(((name,), float(agent.frames_in)))
                    out["beampilot_agent_frames_out"].append(((name,), float(agent.frames_out)))
                    out["beampilot_agent_frames_failed"] += [((name, cause), float(n))
                                                              for cause, n in sorted(agent.failed.items())]
            for name, steering in self.steering.items():
                out["beampilot_agent_paused"].append(((name,), 1.0 if steering.paused else 0.0))
        for name, f in self.files_space().items():
            out["beampilot_frame_files_free_bytes"].append(((name,), math.nan if f["free_bytes"] is None else f["free_bytes"]))
            left = f["seconds_to_full"]
            out["beampilot_frame_files_seconds_to_full"].append(((name,), math.nan if left is None else left))
        return out

    def status(self) -> dict[str, Any]:
        """Everything the status page shows, JSON-able."""
        with self._lock:
            reports = {name: agent.report() for name, agent in self.agents.items()}
        ok, why = self.healthy()
        spaces = {name: r["files"] for name, r in reports.items() if r.get("files")}  # detector agents' frame disks
        samples: dict[str, float] = {}
        for m in self.metrics.registry.collect():
            for s in m.samples:
                if s.name.endswith(("_total", "lag", "connected")) and not math.isnan(s.value):  # NaN: not used
                    samples[s.name] = samples.get(s.name, 0.0) + s.value  # summed over labels
        return {
            "healthy": ok, "health": why, "uptime_s": time.time() - self.started_at,
            "topic": self.config.documents_topic, "derived_topic": self.config.derived_topic,
            "offsets": dict(self.state.offsets), "open_runs": len(self.state.open_runs),
            "awaiting_plans": {k: list(v) for k, v in self.state.awaiting.items()},
            "last_checkpoint": self.state.written_at, "counters": samples,
            "documents_in": _labelled_sum(self.metrics.docs_in), "documents_out": _labelled_sum(self.metrics.docs_out),
            "plans": list(self.recent_plans), "errors": list(self.recent_errors), "agents": reports,
            "paused": {n: st.paused for n, st in self.steering.items() if st.paused},
            "stalled": {n: st.stalled for n, st in self.steering.items() if st.stalled},
            "held": self.state.held,
            "rate_limited_s": {n: st.rate_until - time.monotonic() for n, st in self.steering.items()
                               if st.rate_until is not None and st.rate_until > time.monotonic()},
            "tiled": self.tiled_mirror.status() if self.tiled_mirror is not None else None,
            "files_space": spaces,
        }

    def close(self) -> None:
        """Flush, checkpoint, close everything (idempotent)."""
        if getattr(self, "_closed", False):
            return
        self._closed = True
        try:
            self._flush_agents()
            if self.outbox.docs:
                self._commit()
            else:
                self.state.offsets = self._positions()
                self._save()
            if self.config.kafka.group_id is not None and self.state.offsets:
                self.source.commit(self.state.offsets)
        except Exception as err:  # closing must not hide the reason we are closing
            logger.error("final checkpoint failed: %s", err)
        mirror = self.tiled_mirror
        # caught up with what this daemon published (its sink knows the offsets the broker gave)
        until = self.derived_sink.delivered() if hasattr(self.derived_sink, "delivered") else None
        if mirror is not None and not mirror.drain(self.config.tiled.drain_s if self.config.tiled else 0, until):
            logger.warning("tiled is %s derived documents behind; the mirror writes them at the next start",
                           mirror.status().get("behind"))
        plans = [self.plan_sink] if self.plan_sink is not None else []  # its API's threads and sockets
        for thing in (self.source, self.derived_sink, *plans, *([mirror] if mirror else [])):
            try:
                thing.close()
            except Exception as err:
                logger.warning("closing %s: %s", type(thing).__name__, err)
        self._state_lock.release()  # last: another daemon may take state_dir over now


def _labelled_sum(counter: Counter) -> float:
    return sum(s.value for m in counter.collect() for s in m.samples if s.name.endswith("_total"))


def _history_reason(item: dict[str, Any]) -> str:
    """Why a queue item ended as it did, as the queue server's history says (its ``msg``)."""
    return str((item.get("result") or {}).get("msg") or "").strip()


def _request_key(start: dict[str, Any]) -> str | None:
    return start.get(REQUEST_META_KEY)


# -- HTTP ------------------------------------------------------------------------------------------
class StatusServer:
    """Serves ``/healthz``, ``/metrics`` (Prometheus), ``/status.json`` and ``/`` (a page for people)."""

    def __init__(self, daemon: Daemon, host: str = "127.0.0.1", port: int = 8765) -> None:
        self.daemon = daemon
        handler = _handler(daemon)
        try:
            self.httpd = ThreadingHTTPServer((host, port), handler)
        except OSError as err:
            raise ConfigError(f"cannot serve status on {host}:{port} ({err}); pick another http.port") from err
        self.thread = threading.Thread(target=self.httpd.serve_forever, name="beampilot-http", daemon=True)

    @property
    def address(self) -> str:
        host, port = self.httpd.server_address[:2]
        return f"http://{host}:{port}"

    def start(self) -> StatusServer:
        self.thread.start()
        return self

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


def _handler(daemon: Daemon) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, format: str, *args: Any) -> None:  # quiet: Prometheus scrapes often
            logger.debug("http: " + format, *args)

        def do_GET(self) -> None:  # noqa: N802 (the stdlib's name)
            path = self.path.split("?")[0]
            if path == "/healthz":
                ok, why = daemon.healthy()
                self._reply(200 if ok else 503, json.dumps({"status": "ok" if ok else "unhealthy", "reason": why}),
                            "application/json")
            elif path == "/metrics":
                self._reply(200, daemon.metrics.render(), CONTENT_TYPE_LATEST)
            elif path == "/status.json":
                self._reply(200, json.dumps(daemon.status(), default=str), "application/json")
            elif path in ("/", "/status"):
                self._reply(200, render_status_page(daemon.status()), "text/html; charset=utf-8")
            else:
                self._reply(404, "not found: try /, /healthz, /metrics, /status.json", "text/plain")

        def _reply(self, code: int, body: str | bytes, ctype: str) -> None:
            data = body.encode() if isinstance(body, str) else body
            self.send_response(code)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

    return Handler


def status_notices(s: dict[str, Any]) -> list[tuple[str, bool]]:
    """What :meth:`Daemon.status` ``s`` asks of the people at the beamline, in words, each with
    whether it is an alarm: paused, held or waiting steering, low frame disks, lost messages,
    tiled. The status page and ``beampilot status`` say the same."""
    counters = s["counters"]
    said = [(f"agent {n} paused: {why}", True) for n, why in s["paused"].items()]
    if s.get("held"):
        since = time.strftime("%H:%M:%S", time.localtime(s["held"]["since"]))
        said.append(((f"steering held since {since}: {s['held']['why']}. The daemon leaves the queue stopped; the "
                     "agents' next plans wait in it until someone starts it ('qserver queue start')"), True))
    said += [(f"agent {n} waits: {why}", True) for n, why in s.get("stalled", {}).items()]
    said += [(f"agent {n} waits {left:.0f} s for its safety gate's rate limit (max_requests_per_minute)", False)
             for n, left in s.get("rate_limited_s", {}).items()]
    resets = counters.get("beampilot_kafka_offset_resets_total", 0)
    if resets:
        lost = counters.get("beampilot_documents_lost_total", 0)
        said.append(((f"{resets:.0f} time(s) the broker no longer had the next message to read ({lost:.0f} deleted "
                     "by its retention before they were read; their runs are incomplete). Where and why: the "
                     "errors, and the log"), True))
    for n, f in (s.get("files_space") or {}).items():
        left = f.get("seconds_to_full")
        if left is not None and left < LOW_SPACE_S:
            said.append(((f"agent {n}: the disk under {f['directory']} is full in about {time_left_text(left)} at "
                         "the rate its free space has fallen lately; free space there or set files to a larger "
                         "disk (after that its derived frames are refused and counted failed)"), True))
    tiled = s.get("tiled")
    said += [(f"tiled mirror: {text}", True) for text in (tiled or {}).get("offset_resets", [])]
    if tiled and not tiled["connected"]:
        said.append(((f"tiled at {tiled['uri']} does not answer ({tiled['reason']}): {tiled['behind']} derived "
                     "documents wait on the topic"), True))
    elif tiled and tiled["age_s"] > 10:
        said.append(((f"the tiled mirror has waited {tiled['age_s']:.0f} s for tiled at {tiled['uri']} to answer "
                     "one write"), True))
    if tiled and tiled["failed_runs"]:
        said += [(f"derived run {uid} is not in tiled: {why}", True) for uid, why in tiled["failed_runs"].items()]
    return said


def describe_status(s: dict[str, Any], where: str, *, errors: int = 5, plans: int = 5) -> str:
    """:meth:`Daemon.status` ``s`` in a few lines of text (``beampilot status``): health, flow,
    what asks for the people at the beamline (``!``: an alarm), the latest errors and plans."""
    counters = s["counters"]
    lag = counters.get("beampilot_consumer_lag")
    lines = [
        (f"beampilot daemon at {where}: {'healthy' if s['healthy'] else 'UNHEALTHY'} ({s['health']}), "
        f"up {time_left_text(s['uptime_s'])}"),
        (f"reads {s['topic']} (lag {'-' if lag is None else f'{lag:,.0f}'}, broker "
        f"{'connected' if counters.get('beampilot_broker_connected', 1) else 'DOWN'}), publishes {s['derived_topic']}: "
        f"{s['documents_in']:,.0f} documents in, {s['documents_out']:,.0f} derived out, {s['open_runs']} run(s) open"),
        "agents: " + ", ".join(f"{name} ({r.get('kind', '?')})" for name, r in s["agents"].items())
        + f"; plans sent {counters.get('beampilot_plans_sent_total', 0):,.0f}, rejected "
          f"{counters.get('beampilot_plans_rejected_total', 0):,.0f}",
    ]
    lines += [("! " if alarm else "  ") + text for text, alarm in status_notices(s)]
    if errors and s["errors"]:
        lines.append(f"latest errors ({min(errors, len(s['errors']))} of the last {len(s['errors'])}):")
        lines += [f"  {text}" for text in s["errors"][-errors:]]
    if plans and s["plans"]:
        lines.append("latest plans:")
        for p in s["plans"][-plans:]:
            parts = (time.strftime("%H:%M:%S", time.localtime(p["time"])), p["agent"], p.get("plan", ""), p["status"],
                     p.get("reason", _points(p.get("points"))), f"[{p['key'][:18]}]")
            lines.append("  " + " ".join(str(part) for part in parts if part))
    return "\n".join(lines)


def render_status_page(s: dict[str, Any]) -> str:
    """The status page: health first, then flow, plans, agents, errors. Refreshes every 2 s."""
    e = html.escape
    colour = "#1a7f37" if s["healthy"] else "#cf222e"
    counters = s["counters"]

    def num(key: str) -> str:
        value = counters.get(key)
        return "–" if value is None else f"{value:,.0f}"

    plan_rows = "".join(
        f"<tr><td>{time.strftime('%H:%M:%S', time.localtime(p['time']))}</td><td>{e(p['agent'])}</td>"
        f"<td>{e(p.get('plan', ''))}</td><td class='{p['status']}'>{e(p['status'])}</td>"
        f"<td>{e(p.get('reason', _points(p.get('points'))))}</td><td><code>{e(p['key'][:18])}</code></td></tr>"
        for p in reversed(s["plans"][-15:])) or "<tr><td colspan=6>none yet</td></tr>"
    agent_blocks = "".join(
        f"<div class='agent'><h3>{e(name)} <small>{e(str(r.get('kind', '')))}</small></h3>"
        f"{_agent_summary(r)}<details><summary>full report</summary><pre>{e(json.dumps(r, indent=1, default=str))}</pre>"
        f"</details></div>" for name, r in s["agents"].items())
    errors = "".join(f"<li>{e(x)}</li>" for x in reversed(s["errors"][-15:])) or "<li>none</li>"
    paused = "".join(f"<p class='rejected'>{e(text, quote=False)}</p>" if alarm else f"<p>{e(text, quote=False)}</p>"
                     for text, alarm in status_notices(s))
    return f"""<!doctype html><html><head><meta charset="utf-8"><meta http-equiv="refresh" content="2">
<title>beampilot — {e(s['topic'])}</title><style>
body{{font-family:system-ui,sans-serif;margin:1.5em;max-width:1100px;color:#1f2328}}
.health{{display:inline-block;padding:.3em .8em;border-radius:1em;color:#fff;background:{colour}}}
.grid{{display:grid;grid-template-columns:repeat(4,1fr);gap:.6em;margin:1em 0}}
.card{{border:1px solid #d0d7de;border-radius:8px;padding:.6em}} .card b{{font-size:1.6em;display:block}}
table{{border-collapse:collapse;width:100%}} td,th{{border-bottom:1px solid #eee;padding:.25em .5em;text-align:left}}
.rejected{{color:#cf222e;font-weight:bold}} .sent{{color:#1a7f37}} .agent{{border-left:4px solid #0969da;padding-left:.8em;margin:1em 0}}
pre{{background:#f6f8fa;padding:.5em;overflow:auto;max-height:20em}}</style></head><body>
<h1>beampilot <span class="health">{'healthy' if s['healthy'] else 'UNHEALTHY'}</span></h1>
<p>{e(s['health'])} · reading <code>{e(s['topic'])}</code> → derived <code>{e(s['derived_topic'])}</code> ·
up {s['uptime_s']:.0f} s · last checkpoint {time.strftime('%H:%M:%S', time.localtime(s['last_checkpoint'])) if s['last_checkpoint'] else '–'}</p>
<div class="grid">
<div class="card">documents in<b>{s['documents_in']:,.0f}</b></div>
<div class="card">derived out<b>{s['documents_out']:,.0f}</b></div>
<div class="card">consumer lag<b>{num('beampilot_consumer_lag')}</b></div>
<div class="card">open runs<b>{s['open_runs']}</b></div>
<div class="card">malformed skipped<b>{num('beampilot_documents_malformed_total')}</b></div>
<div class="card">duplicates dropped<b>{num('beampilot_documents_duplicate_total')}</b></div>
<div class="card">plans sent / rejected<b>{num('beampilot_plans_sent_total')} / {num('beampilot_plans_rejected_total')}</b></div>
<div class="card">broker<b>{'connected' if counters.get('beampilot_broker_connected', 1) else 'DOWN'}</b></div>
</div>
{paused}<h2>Plans</h2><table><tr><th>time</th><th>agent</th><th>plan</th><th>status</th><th>detail</th><th>key</th></tr>{plan_rows}</table>
<h2>Agents</h2>{agent_blocks}
<h2>Recent errors</h2><ul>{errors}</ul>
<p><small><a href="/metrics">/metrics</a> · <a href="/healthz">/healthz</a> · <a href="/status.json">/status.json</a></small></p>
</body></html>"""


def _points(n: Any) -> str:
    return "" if n is None else f"{n} point" if n == 1 else f"{n} points"


def _agent_summary(r: dict[str, Any]) -> str:
    e = html.escape
    parts = []
    for key in ("n_observations", "budget", "exposure_total_s", "travel", "events_in", "events_out", "pending",
                "stop_reason", "skipped", "frames_in", "frames_out", "frames_waiting_for_data"):
        if r.get(key) is not None:
            value = r[key]
            parts.append(f"{e(key)}: <b>{value:.1f}</b>" if isinstance(value, float) else f"{e(key)}: <b>{e(str(value))}</b>")
    p95 = (r.get("decision_latency_ms") or {}).get("p95")
    if p95 is not None:
        parts.append(f"decision p95: <b>{p95:.0f} ms</b>")
    if "best_observed_feasible" in r:  # a tuning agent's best reading that met its requirement
        best = r["best_observed_feasible"] or {}
        parts += [f"best {e(k)} = <b>{v:.4g}</b>" for k, v in best.items() if isinstance(v, (int, float))] or [
            "best: <b>no setting has met the requirement yet</b>"]
    if r.get("runs_without_frame_key"):  # said, so a wrong frame_key is seen before frames_in 0 puzzles
        keys = ", ".join((r.get("last_run_without_frame_key") or {}).get("data_keys", []))
        parts.append(f"runs without its frame key: <b>{r['runs_without_frame_key']}</b> (the last had {e(keys)})")
    if r.get("failed_frames"):  # a detector agent's failures by cause
        failed = ", ".join(f"{e(cause)} {n}" for cause, n in sorted(r["failed_frames"].items()))
        parts.append(f"<span class='rejected'>failed frames: {failed}</span>")
    files = r.get("files")
    if files:  # a detector agent writing its frames to files: the disk is what runs out at night
        free, falling, left = files.get("free_bytes"), files.get("free_falling_bytes_per_s"), files.get("seconds_to_full")
        text = (f"frames to {e(files['directory'])}: <b>{files['bytes_written'] / 1e9:.2f} GB</b> written"
                + ("" if free is None else f", <b>{free / 1e9:.1f} GB</b> free"))
        if left is not None and falling is not None:
            text += f", falling {falling * 3600 / 1e9:.1f} GB/h: full in about <b>{time_left_text(left)}</b>"
        parts.append(f"<span class='rejected'>{text}</span>" if left is not None and left < LOW_SPACE_S else text)
    fit = r.get("fit") or {}
    for p, v in (fit.get("values") or {}).items():
        parts.append(f"{e(p)} = <b>{v:.4g}</b> ± {fit['sigmas'].get(p, float('nan')):.2g}")
    return "<p>" + " · ".join(parts) + "</p>"


def serve(config: DaemonConfig, *, ready: Callable[[Daemon, StatusServer], None] | None = None) -> None:
    """Build the daemon and its status server from ``config`` and run until signalled."""
    # signals first: a SIGTERM while the daemon connects and recovers still ends it cleanly
    stopping = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stopping.set())
    daemon = Daemon(config)
    daemon.stopping = stopping
    try:
        server = StatusServer(daemon, config.http.host, config.http.port).start()
    except BaseException:
        daemon.close()  # its consumer, producer and tiled mirror, and a final checkpoint
        raise
    logger.warning("beampilot daemon up: status %s, reading %s", server.address, config.documents_topic)
    if ready is not None:
        ready(daemon, server)
    try:
        daemon.run(install_signals=False)
    finally:
        server.stop()

"""The daemon's configuration file (``beampilot run --config agent.yaml``), validated at the edge.

A minimal file::

    beamline: sas1                      # documents topic: sas1.bluesky.runengine.documents
    kafka: {bootstrap_servers: "127.0.0.1:9092"}
    state_dir: /var/lib/beampilot
    agents:
      - {kind: rate, name: rate}

Everything else has a default. Unknown keys are errors that name the key.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from pydantic import Field, SecretStr, model_validator

from agents.config import SafetySettings, _Strict, load_settings
from streams.kafka import KafkaSettings

if TYPE_CHECKING:
    from streams.queueserver import QueueServerPlanSink

__all__ = ["AgentEntry", "DaemonConfig", "HttpSettings", "KafkaConfig", "QueueServerConfig",
           "TiledConfig", "load_daemon_config"]


class KafkaConfig(KafkaSettings):
    """How to reach the broker: :class:`streams.kafka.KafkaSettings` (security settings pass
    through to kafka-python), plus the consumer group the daemon mirrors its positions to."""

    group_id: str | None = None  # also commit positions to this consumer group (for lag monitors)

    def settings(self) -> KafkaSettings:
        """The broker settings alone (without the daemon's consumer group)."""
        return KafkaSettings(**self.model_dump(exclude={"group_id"}))


class TopicsConfig(_Strict):
    """Topic names; ``None`` means the bluesky-kafka convention from ``beamline``."""

    documents: str | None = None
    derived: str | None = None


class QueueServerConfig(_Strict):
    """Where plan requests go: a bluesky-queueserver RE Manager (0MQ control address or HTTP)."""

    zmq_control_addr: str | None = None
    http_server_uri: str | None = None
    api_key: SecretStr | None = None
    user_group: str = "primary"
    start_queue: bool = True
    #: an agent's plans may wait this long (s) in a queue the RE Manager does not run (stopped,
    #: paused, no RE environment) before the daemon says so, and what would let them run
    stall_report_s: float = Field(default=30.0, ge=0)

    @model_validator(mode="after")
    def _one_address(self) -> QueueServerConfig:
        if (self.zmq_control_addr is None) == (self.http_server_uri is None):
            raise ValueError("give exactly one of zmq_control_addr (e.g. tcp://127.0.0.1:60615) "
                             "or http_server_uri (e.g. http://127.0.0.1:60610)")
        return self

    def plan_sink(self) -> QueueServerPlanSink:
        """A plan sink to this RE Manager (nothing is sent until it is asked)."""
        from streams.queueserver import QueueServerPlanSink

        return QueueServerPlanSink(zmq_control_addr=self.zmq_control_addr, http_server_uri=self.http_server_uri,
                                   api_key=self.api_key.get_secret_value() if self.api_key else None,
                                   user_group=self.user_group)


class TiledConfig(_Strict):
    """A tiled server that also receives the derived runs (mirrored from the derived topic)."""

    uri: str
    api_key: SecretStr | None = None  # a key that may write, and delete a run cut off mid-way
    #: at a clean shutdown, wait this long (s) for the mirror to write what is on the topic
    drain_s: float = Field(default=10.0, ge=0)


class HttpSettings(_Strict):
    """The health / metrics / status server. Loopback by default: expose it on purpose."""

    host: str = "127.0.0.1"
    port: int = Field(default=8765, ge=0, le=65535)


#: agent kinds that only publish derived runs: they send no plans, so need no safety section
ANALYSIS_KINDS = frozenset({"rate", "detector"})


class AgentEntry(_Strict):
    """One agent the daemon runs.

    ``kind`` picks the class (``rate``: counts to rates, an analysis agent; ``detector``: a
    detector network on every frame - denoise, Bragg peaks, SANS super-resolution - also an
    analysis agent; ``qsampling``: the Q-scan steering agent of the spine; ``mapping``: where on
    the sample to measure next; ``tuning``: beamline settings by Bayesian optimization;
    ``sextupole``: storage-ring sextupoles by ML-MOGA). ``settings`` is that agent's settings
    mapping or a YAML path. Steering agents need ``safety``: no plan leaves without
    passing it.
    """

    kind: Literal["rate", "detector", "qsampling", "mapping", "tuning", "sextupole"]
    name: str = Field(pattern=r"^[A-Za-z0-9_.-]+$")
    settings: dict[str, Any] | str = Field(default_factory=dict)
    safety: SafetySettings | None = None
    batch_size: int = Field(default=4, ge=1)
    max_outstanding: int = Field(default=1, ge=1)


class DaemonConfig(_Strict):
    """Everything ``beampilot run`` needs. See ``deploy/agent.example.yaml``."""

    beamline: str = Field(default="beampilot", pattern=r"^[A-Za-z0-9_.-]+$")
    kafka: KafkaConfig = Field(default_factory=KafkaConfig)
    topics: TopicsConfig = Field(default_factory=TopicsConfig)
    queueserver: QueueServerConfig | None = None
    tiled: TiledConfig | None = None
    state_dir: Path = Path("beampilot-state")
    #: where a first start (no checkpoint in state_dir, no position of kafka.group_id) reads the
    #: documents topic from: its first retained message ('beginning': a run already under way is
    #: read whole, but so is every earlier run the topic still holds, which the analysis agents
    #: then analyse, and whose operator scans steering agents take as measurements of their
    #: sample), or what is published after the start ('end')
    start_at: Literal["beginning", "end"] = "beginning"
    http: HttpSettings = Field(default_factory=HttpSettings)
    agents: list[AgentEntry] = Field(min_length=1)
    poll_timeout_s: float = Field(default=0.02, gt=0, le=5)
    #: the largest document read from the documents topic or published to the derived topic (a
    #: derived frame is 4 bytes a pixel); the broker's message.max.bytes must allow it too. A
    #: derived document over it is kept in state_dir/refused/, named, and the daemon goes on
    max_message_bytes: int = Field(default=16 * 2**20, ge=1024)
    #: at most this much of refused derived documents is kept in state_dir/refused/ (a broker that
    #: refuses every derived frame of a 10 Hz detector would otherwise fill state_dir in an hour)
    refused_max_bytes: int = Field(default=2**30, ge=0)
    fsync: bool = True
    settle_s: float = Field(default=2.0, ge=0)
    #: a run with no document for this long (s), while a later run has started, is taken to have
    #: lost its RunEngine: the agents get a stop for it (exit_status 'fail') and close their derived
    #: runs; None: runs stay open until their own stop comes
    abandon_runs_after_s: float | None = Field(default=3600.0, gt=0)

    @model_validator(mode="after")
    def _consistent(self) -> DaemonConfig:
        names = [a.name for a in self.agents]
        if len(set(names)) != len(names):
            raise ValueError(f"agent names must be unique, got {names}")
        for entry in self.agents:
            if entry.kind not in ANALYSIS_KINDS:
                if entry.safety is None:
                    raise ValueError(f"agent {entry.name!r} steers the beamline: give it a 'safety' section")
                if self.queueserver is None:
                    raise ValueError(f"agent {entry.name!r} sends plans: give a 'queueserver' section")
        return self

    @property
    def documents_topic(self) -> str:
        return self.topics.documents or f"{self.beamline}.bluesky.runengine.documents"

    @property
    def derived_topic(self) -> str:
        return self.topics.derived or f"{self.beamline}.beampilot.derived.documents"


def load_daemon_config(source: str | Path | dict[str, Any]) -> DaemonConfig:
    """Load and validate a daemon config from a YAML/JSON path or a mapping."""
    return load_settings(DaemonConfig, source)

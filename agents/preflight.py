"""``beampilot run --check``: everything a daemon's config names, checked before a beamtime.

A daemon started at 8 p.m. with a queue server that does not allow its plans, or a document
topic that does not exist yet, runs happily until the first plan is refused or the first run is
missed at 3 a.m. :func:`preflight` looks at each thing the config names, the way the daemon will
use it, and changes nothing: the agents are built (weights loaded, settings checked) in a
temporary directory and asked for their first plans, which go through their own safety gate and
are then checked against the queue server's allowed plans for the configured user group (nothing
is queued); the broker is asked which topics exist without creating any; tiled is asked with the
configured key; the state directory and the status port are checked free to use.

Each :class:`Check` is ``ok``, ``warn`` (the daemon runs, but something will not work as
expected) or ``fail`` (it will not start, or a part of it cannot work), with what to do.
"""

from __future__ import annotations

import shutil
import socket
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from agents.config import existing_ancestor, writable_dir
from agents.daemon_config import DaemonConfig
from agents.state_lock import StateDirLock

__all__ = ["Check", "preflight"]

#: a first start from the beginning of a topic holding more documents than this is a warning
FIRST_START_MANY = 10_000
#: less free space than this in state_dir is a warning (checkpoints, agents' zarr stores)
STATE_MIN_FREE_BYTES = 1 << 30


@dataclass(frozen=True)
class Check:
    """One thing checked: ``what`` (e.g. ``"queue server"``), ``status`` and ``detail``."""

    what: str
    status: Literal["ok", "warn", "fail"]
    detail: str


def preflight(config: DaemonConfig, *, timeout: float = 5.0) -> list[Check]:
    """Check what ``config`` names; nothing is started, sent, created or written."""
    checks = [_state_dir(config), _http_port(config)]
    agent_checks, requests = _agents(config)
    checks += agent_checks
    checks += _broker(config, timeout)
    if config.tiled is not None:
        checks.append(_tiled(config))
    if config.queueserver is not None:
        checks += _queue_server(config, requests)
    return checks


def _state_dir(config: DaemonConfig) -> Check:
    where = Path(config.state_dir).expanduser()
    try:
        writable_dir(where, "state_dir", create=False)
    except ValueError as err:
        return Check("state_dir", "fail", str(err))
    free = shutil.disk_usage(existing_ancestor(where)).free
    said = f"{where} ({'exists' if where.exists() else 'made at start'}); {free / 1e9:.1f} GB free"
    warnings = []
    if (where / "checkpoint.json").exists():
        said += "; a checkpoint is there: the daemon continues from it"
        held = _held_in(where / "checkpoint.json")
        if held is not None:
            warnings.append(f"its steering was held ({held}): the daemon leaves the queue stopped until someone "
                            "starts it ('qserver queue start')")
    holder = StateDirLock.holder(where)
    if holder is not None:
        warnings.append(f"a daemon runs on it now ({holder}): another would be refused at start; stop that one "
                        "first, or give this config its own state_dir")
    if free < STATE_MIN_FREE_BYTES:
        warnings.append(f"under {STATE_MIN_FREE_BYTES / 1e9:.0f} GB free, the agents' stores and checkpoints may "
                        "fill it; free space or move state_dir")
    return Check("state_dir", "warn", "; ".join([said, *warnings])) if warnings else Check("state_dir", "ok", said)


def _held_in(checkpoint: Path) -> str | None:
    """Since when and why the checkpoint's steering is held (``None``: it is not, or unreadable).
    Only the JSON is read: the outbox file beside it (derived frames, megabytes) is not needed."""
    import json
    import time

    try:
        held = json.loads(checkpoint.read_text()).get("held")  # Checkpoint.held
    except (OSError, ValueError, AttributeError):  # the daemon's start says what is wrong with it
        return None
    if not isinstance(held, dict) or "since" not in held:
        return None
    return f"since {time.strftime('%Y-%m-%d %H:%M', time.localtime(held['since']))}: {held.get('why', '')}"


def _http_port(config: DaemonConfig) -> Check:
    host, port = config.http.host, config.http.port
    if port == 0:
        return Check("status port", "ok", f"{host}: any free port (http.port 0)")
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM) as s:
        # as the daemon's HTTP server binds: a port left in TIME_WAIT by a daemon just stopped is free
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError as err:
            return Check("status port", "fail", f"{host}:{port} cannot be served ({err.strerror}): another "
                                                "daemon (or program) has it? set http.port or --http-port")
    return Check("status port", "ok", f"http://{host}:{port}/ is free")


def _agents(config: DaemonConfig) -> tuple[list[Check], dict[str, list[Any]]]:
    """Build each agent in a scratch directory, ask a steering agent for its first plans and put
    them through its own gate."""
    from agents.daemon import build_agent
    from agents.safety import SafetyGate

    checks, requests = [], {}
    with tempfile.TemporaryDirectory(prefix="beampilot-check-") as scratch:
        for entry in config.agents:
            what = f"agent {entry.name}"
            try:
                agent = build_agent(entry, Path(scratch), [])
            except Exception as err:  # noqa: BLE001 -- any failure to build is what the check reports
                checks.append(Check(what, "fail", f"{type(err).__name__}: {err}"))
                continue
            try:
                if entry.safety is None:
                    checks.append(Check(what, "ok", _analysis_summary(entry, agent)))
                    continue
                asked = agent.ask(entry.batch_size)
                gate = SafetyGate(entry.safety.to_config())
                refused = [v.reason for v in (gate.admit(r) for r in asked) if not v.accepted]
                requests[entry.name] = asked
                if not asked:
                    checks.append(Check(what, "warn", f"{entry.kind}: asked for no plan at start "
                                                      f"({getattr(agent, 'stop_reason', None) or 'no reason given'})"))
                elif refused:
                    checks.append(Check(what, "fail", f"{entry.kind}: its first plan is refused by its own safety gate: "
                                                      f"{refused[0]}; widen the limits or change the settings"))
                else:
                    plans = sorted({r.plan for r in asked})
                    checks.append(Check(what, "ok", f"{entry.kind}: first plan(s) {plans} pass its safety gate"))
            except Exception as err:  # noqa: BLE001
                checks.append(Check(what, "fail", f"{entry.kind}: asking for its first plans failed: "
                                                  f"{type(err).__name__}: {err}"))
            finally:
                if hasattr(agent, "close"):
                    agent.close()
    return checks, requests


def _analysis_summary(entry: Any, agent: Any) -> str:
    record = getattr(agent, "record", None)
    said = entry.kind
    if record is not None:
        said += f": weights {record.name} ({record.architecture}, sha256 {record.sha256[:12]})"
    files = getattr(getattr(agent, "settings", None), "files", None)
    if files:
        try:
            said += f"; frames to {files} ({shutil.disk_usage(existing_ancestor(Path(files).expanduser())).free / 1e9:.1f} GB free)"
        except OSError as err:
            said += f"; frames to {files} (its free space unknown: {err})"
    return said


def _broker(config: DaemonConfig, timeout: float) -> list[Check]:
    from streams.errors import StreamError

    settings = config.kafka.settings()
    try:
        found = settings.topic_partitions([config.documents_topic, config.derived_topic], timeout)
    except StreamError as err:
        return [Check("broker", "fail", str(err))]
    checks = [Check("broker", "ok", f"{config.kafka.bootstrap_servers} answers")]
    for role, topic in (("documents topic", config.documents_topic), ("derived topic", config.derived_topic)):
        n = found[topic]
        if n is None and topic == config.derived_topic:
            checks.append(Check(role, "ok", f"{topic} does not exist yet: the daemon makes it at start (1 partition)"))
        elif n is None:
            checks.append(Check(role, "warn", f"{topic} does not exist: a broker that creates topics on first use "
                                              "makes it with its default partitions (tansu: 4) when the RunEngine "
                                              "first publishes, which splits runs; create it first with one partition"))
        elif n != 1:
            checks.append(Check(role, "warn", f"{topic} has {n} partitions: a run's documents stay in order only "
                                              "within one; use a topic of one partition"))
        else:
            checks.append(Check(role, "ok", f"{topic} (1 partition)"))
    if found[config.derived_topic] is not None:
        try:
            size_check = _message_size_check(settings.message_size_limit(config.derived_topic, timeout), config)
        except StreamError as err:
            size_check = Check("derived message size", "warn", f"the broker would not say: {err}")
        checks += [size_check] if size_check is not None else []
    if found[config.documents_topic] is not None and not (Path(config.state_dir).expanduser() / "checkpoint.json").exists():
        checks.append(_first_start(config, settings, timeout))
    return checks


def _message_size_check(limit: int | None, config: DaemonConfig) -> Check | None:
    """The derived topic's ``max.message.bytes`` (``limit``; ``None``: the broker does not say)
    against the daemon's ``max_message_bytes``: documents between the two are refused by the
    broker (and kept in state_dir/refused). Kafka's default is about 1 MB, under one derived
    512 x 512 frame."""
    if limit is None:
        return None
    topic = config.derived_topic
    if limit >= config.max_message_bytes:
        return Check("derived message size", "ok", f"{topic} takes messages up to {limit / 2**20:.1f} MiB "
                                                   f"(max.message.bytes), max_message_bytes is {config.max_message_bytes / 2**20:.1f} MiB")
    return Check("derived message size", "warn", (
        f"{topic} takes messages up to {limit / 2**20:.1f} MiB (max.message.bytes) but the daemon's max_message_bytes "
        f"is {config.max_message_bytes / 2**20:.1f} MiB: derived documents between the two (a 512 x 512 derived frame "
        "is over 1 MiB) are refused by the broker and kept in state_dir/refused. Raise the topic's "
        "max.message.bytes, lower max_message_bytes to match, or send a detector agent's frames to files (files:)"))


def _first_start(config: DaemonConfig, settings: Any, timeout: float) -> Check:
    """Where a first start (no checkpoint) reads from, and how much that is."""
    from streams.errors import StreamError

    topic = config.documents_topic
    try:
        held = settings.retained_messages(topic, timeout)
    except StreamError as err:
        return Check("first start", "warn", f"cannot say how much {topic} holds: {err}")
    group = f" (unless consumer group {config.kafka.group_id!r} has a position)" if config.kafka.group_id else ""
    if config.start_at == "end":
        return Check("first start", "ok", f"no checkpoint: reads what is published from now on{group}; the "
                                          f"{held} document(s) {topic} holds are not read")
    said = (f"no checkpoint: reads all {held} document(s) {topic} holds, from its first{group}: the agents "
            "analyse and steer on every run in it")
    if held > FIRST_START_MANY:
        return Check("first start", "warn", f"{said}; set start_at: end to begin with what is published from now on")
    return Check("first start", "ok", said)


def _tiled(config: DaemonConfig) -> Check:
    from streams.tiled_io import check_reachable

    assert config.tiled is not None
    key = config.tiled.api_key.get_secret_value() if config.tiled.api_key else None
    try:
        check_reachable(config.tiled.uri, api_key=key)
    except Exception as err:  # noqa: BLE001 -- unreachable, refused key, not tiled: each said as it is
        return Check("tiled", "fail", str(err))
    return Check("tiled", "ok", f"{config.tiled.uri} answers{' and takes the key' if key else ''}")


def _queue_server(config: DaemonConfig, requests: dict[str, list[Any]]) -> list[Check]:
    from agents.daemon import AUTOSTART_WARNING
    from streams.queueserver import QueueServerUnreachableError

    q = config.queueserver
    assert q is not None
    try:
        sink = q.plan_sink()
    except ValueError as err:
        return [Check("queue server", "fail", str(err))]
    with sink:
        try:
            status = sink.check_reachable()
        except QueueServerUnreachableError as err:
            return [Check("queue server", "fail", str(err))]
        env = status.get("worker_environment_exists")
        checks = [Check("queue server", "ok" if env else "warn",
                        f"{sink.address} answers: manager {status.get('manager_state')}, "
                        + ("RE environment open" if env else "no RE environment open: plans wait in the queue until "
                           "one is ('qserver environment open')"))]
        if status.get("queue_autostart_enabled"):
            checks.append(Check("queue autostart", "warn", AUTOSTART_WARNING))
        for name, asked in requests.items():
            reasons = {r for r in (sink.check_request(req) for req in asked) if r is not None}
            what = f"plans of {name}"
            if reasons:
                checks.append(Check(what, "fail", f"the queue server would refuse them: {min(reasons)}"))
            else:
                checks.append(Check(what, "ok", f"allowed for user group {q.user_group!r}"))
    return checks

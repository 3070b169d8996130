"""The real components on one machine: ``deploy/dev-stack up|down|status``.

``up`` starts, on loopback, with the ports of one config file (``deploy/dev-stack.yaml``):

* a Kafka-compatible broker (tansu, durable through a local S3 endpoint);
* Redis and a bluesky-queueserver RE Manager, whose startup profile (``deploy/qserver/startup``)
  holds the simulated SAS instrument and the allowed plans, and whose RunEngine publishes its
  documents to the broker; plus the queueserver's HTTP server;
* a tiled server.

It runs them under one supervisor process that writes ``<state>/stack.json`` (addresses, pid) and
stops them all on SIGTERM (``down``). ``status`` probes each. ``beampilot demo sas-qscan --stack``
and ``beampilot run`` use the addresses in ``stack.json``.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from pydantic import Field

from agents.config import _Strict, load_settings
from agents.errors import AgentError

__all__ = ["StackConfig", "down", "run_stack", "status", "up"]

logger = logging.getLogger(__name__)

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_CONFIG = ROOT / "deploy" / "dev-stack.yaml"


class StackConfig(_Strict):
    """Ports and places of the development stack; 0 picks a free port."""

    state_dir: Path = Path(".dev-stack")
    beamline: str = "sim"
    kafka_port: int = Field(default=9092, ge=0, le=65535)
    durable_broker: bool = False
    redis_port: int = Field(default=6380, ge=0, le=65535)
    zmq_control_port: int = Field(default=60615, ge=0, le=65535)
    zmq_info_port: int = Field(default=60625, ge=0, le=65535)
    http_port: int = Field(default=60610, ge=0, le=65535)
    tiled_port: int = Field(default=8000, ge=0, le=65535)
    tiled_readable: list[Path] = Field(default_factory=list)  # detector file directories tiled may serve
    api_key: str = "beampilotdev"
    sim_sample: str = "polydisperse_sphere"
    sim_seed: int = 0
    sim_speed: float = Field(default=100.0, gt=0)
    sim_ring: bool = False  # also the simulated storage ring (pyAT: seconds more to open the environment)
    startup_dir: Path = ROOT / "deploy" / "qserver" / "startup"

    @property
    def documents_topic(self) -> str:
        return f"{self.beamline}.bluesky.runengine.documents"


def load_stack_config(path: str | Path | None) -> StackConfig:
    return load_settings(StackConfig, Path(path) if path is not None else DEFAULT_CONFIG)


@dataclass
class Stack:
    """The running components (in the supervisor process)."""

    broker: Any
    redis: Any
    manager: Any
    tiled: Any

    def addresses(self, cfg: StackConfig) -> dict[str, Any]:
        return {
            "pid": os.getpid(), "started": time.time(), "kafka": self.broker.bootstrap,
            "documents_topic": cfg.documents_topic, "redis": f"127.0.0.1:{self.redis.port}",
            "zmq_control_addr": self.manager.zmq_control_addr, "http_server_uri": self.manager.http_server_uri,
            "tiled": self.tiled.uri if self.tiled else None, "api_key": cfg.api_key, "beamline": cfg.beamline,
        }

    def stop(self) -> None:
        for part in (self.manager, self.redis, self.tiled, self.broker):
            if part is not None:
                try:
                    part.stop()
                except Exception as err:  # stop the rest regardless
                    logger.warning("stopping %s: %s", type(part).__name__, err)


def start_stack(cfg: StackConfig, *, tiled: bool = True, http: bool = True) -> Stack:
    """Start every component (in this process's children); stop what started if one fails."""
    from streams.broker import LocalBroker, create_topic
    from streams.qserver_launch import REManager, RedisServer

    state = Path(cfg.state_dir).resolve()
    state.mkdir(parents=True, exist_ok=True)
    started: list[Any] = []
    try:
        broker = LocalBroker(cfg.kafka_port or None, durable=cfg.durable_broker, workdir=state / "broker").start()
        started.append(broker)
        # one partition, made before anyone publishes: tansu would auto-create four, and a run's
        # documents must stay in order in one partition
        create_topic(broker.bootstrap, cfg.documents_topic)
        redis = RedisServer(cfg.redis_port or None, workdir=state / "redis").start()
        started.append(redis)
        env = {"BEAMPILOT_SIM_SAMPLE": cfg.sim_sample, "BEAMPILOT_SIM_SEED": str(cfg.sim_seed),
               "BEAMPILOT_SIM_SPEED": str(cfg.sim_speed), "BEAMPILOT_SIM_RING": "1" if cfg.sim_ring else ""}
        manager = REManager(redis.port, startup_dir=cfg.startup_dir, zmq_port=cfg.zmq_control_port or None,
                            info_port=cfg.zmq_info_port or None, kafka_server=broker.bootstrap,
                            kafka_topic=cfg.documents_topic, workdir=state / "manager",
                            http_port=(cfg.http_port or None) if http else None,
                            api_key=cfg.api_key, env=env).start()
        started.append(manager)
        server = None
        if tiled:
            from streams.tiled_launch import TiledServer

            server = TiledServer(cfg.tiled_port or None, workdir=state / "tiled", api_key=cfg.api_key,
                                 readable=cfg.tiled_readable).start()
            started.append(server)
    except Exception:
        for part in reversed(started):
            part.stop()
        raise
    return Stack(broker, redis, manager, server)


def run_stack(config: str | Path | None) -> None:
    """The supervisor: start everything, write stack.json, wait for SIGTERM, stop everything."""
    cfg = load_stack_config(config)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    stack = start_stack(cfg)
    info = Path(cfg.state_dir) / "stack.json"
    try:
        info.write_text(json.dumps(stack.addresses(cfg), indent=1))
        stop.wait()
    finally:
        info.unlink(missing_ok=True)
        stack.stop()


def up(config: str | Path | None, *, timeout: float = 120.0) -> dict[str, Any]:
    """Start the supervisor in the background; return the addresses once everything answers."""
    cfg = load_stack_config(config)
    info = Path(cfg.state_dir) / "stack.json"
    current = _read(info)
    if current and _alive(current["pid"]):
        return current
    Path(cfg.state_dir).mkdir(parents=True, exist_ok=True)
    log = open(Path(cfg.state_dir) / "supervisor.log", "ab")
    cmd = [sys.executable, "-m", "agents.devstack", "_serve"] + ([str(config)] if config else [])
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True, cwd=ROOT)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        current = _read(info)
        if current and current["pid"] == proc.pid:
            return current
        if proc.poll() is not None:
            tail = (Path(cfg.state_dir) / "supervisor.log").read_text()[-3000:]
            raise AgentError(f"the dev stack failed to start (exit {proc.returncode}):\n{tail}")
        time.sleep(0.3)
    proc.terminate()
    raise AgentError(f"the dev stack did not come up within {timeout:.0f} s; see {cfg.state_dir}/supervisor.log")


def down(config: str | Path | None, *, timeout: float = 60.0) -> bool:
    """Stop the supervisor (and so every component). False if nothing was running."""
    cfg = load_stack_config(config)
    current = _read(Path(cfg.state_dir) / "stack.json")
    if not current or not _alive(current["pid"]):
        return False
    os.kill(current["pid"], signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while _alive(current["pid"]) and time.monotonic() < deadline:
        time.sleep(0.2)
    return True


def status(config: str | Path | None) -> dict[str, Any]:
    """Each component's address and whether it answers now."""
    cfg = load_stack_config(config)
    current = _read(Path(cfg.state_dir) / "stack.json")
    if not current or not _alive(current["pid"]):
        return {"running": False}
    from streams.broker import kafka_metadata_ok
    from streams.queueserver import QueueServerPlanSink
    from streams.tiled_io import check_reachable

    host, port = current["kafka"].rsplit(":", 1)
    checks: dict[str, Any] = {"kafka": kafka_metadata_ok(host, int(port))}
    try:
        with QueueServerPlanSink(zmq_control_addr=current["zmq_control_addr"]) as sink:
            st = sink.status()
            checks["queueserver"] = {"manager_state": st.get("manager_state"),
                                     "environment": st.get("worker_environment_exists"),
                                     "items_in_queue": st.get("items_in_queue")}
    except Exception as err:
        checks["queueserver"] = f"down: {err}"
    if current.get("tiled"):
        try:
            check_reachable(current["tiled"], api_key=current["api_key"], timeout=3)
            checks["tiled"] = True
        except Exception as err:
            checks["tiled"] = f"down: {err}"
    return {"running": True, **current, "checks": checks}


def _read(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def main(argv: list[str]) -> int:
    if len(argv) < 1 or argv[0] not in ("up", "down", "status", "_serve"):
        print("usage: dev-stack up|down|status [CONFIG]\n  CONFIG: ports and places "
              f"(default {DEFAULT_CONFIG.relative_to(ROOT)})", file=sys.stderr)
        return 2
    config = argv[1] if len(argv) > 1 else None
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        if argv[0] == "_serve":
            run_stack(config)
        elif argv[0] == "up":
            print(yaml.safe_dump(up(config), sort_keys=False))
        elif argv[0] == "down":
            print("stopped" if down(config) else "not running")
        else:
            print(yaml.safe_dump(status(config), sort_keys=False))
    except AgentError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

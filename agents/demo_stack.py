"""``beampilot demo sas-qscan --stack``: the spine's closed loop through the real servers.

The RunEngine runs in bluesky-queueserver's RE Manager (started by ``deploy/dev-stack up``, with
the simulated SAS instrument in its startup profile) and publishes its documents to the Kafka
broker; the beampilot daemon reads them, the Q-sampling agent decides, and each decision goes
through the safety gate into the manager's queue, where it runs as the ``measure`` plan. Derived
runs (the fits) go to the derived Kafka topic and to tiled. Nothing is in-process but the daemon.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

from tqdm import tqdm

from agents.daemon import Daemon, StatusServer
from agents.daemon_config import load_daemon_config
from agents.demo_sas import DemoSetup, _summary, agent_settings, safety_settings
from agents.devstack import load_stack_config, status
from agents.errors import AgentError
from agents.report import write_report

__all__ = ["run_stack_demo", "stack_daemon_config"]

logger = logging.getLogger(__name__)


def stack_daemon_config(stack: dict[str, Any], setup: DemoSetup, state_dir: Path, *, batch_size: int = 4,
                        overrides: dict[str, Any] | None = None, http_port: int = 0) -> dict[str, Any]:
    """The daemon config that joins a Q-sampling agent to a running dev stack."""
    return {
        "beamline": stack["beamline"],
        "kafka": {"bootstrap_servers": stack["kafka"]},
        "queueserver": {"zmq_control_addr": stack["zmq_control_addr"]},
        "tiled": {"uri": stack["tiled"], "api_key": stack["api_key"]} if stack.get("tiled") else None,
        "state_dir": str(state_dir),
        "http": {"port": http_port},
        "agents": [{
            "kind": "qsampling", "name": "qsampling", "batch_size": batch_size,
            "settings": agent_settings(setup, overrides).model_dump(mode="json", exclude={"name"}),
            "safety": safety_settings(setup).model_dump(mode="json"),
        }],
    }


def run_stack_demo(out: Path, *, stack_config: str | Path | None = None, batch_size: int = 4,
                   overrides: dict[str, Any] | None = None, progress: bool = True,
                   timeout: float = 900.0) -> dict[str, Any]:
    """Run the closed loop through the dev stack until the agent stops; write the report."""
    stack = status(stack_config)
    if not stack.get("running"):
        raise AgentError("the dev stack is not running: start it with 'deploy/dev-stack up'")
    cfg_stack = load_stack_config(stack_config)
    setup = DemoSetup.draw(cfg_stack.sim_sample, cfg_stack.sim_seed)  # the manager's hidden sample
    out.mkdir(parents=True, exist_ok=True)
    config = load_daemon_config(stack_daemon_config(stack, setup, out / "state", batch_size=batch_size,
                                                    overrides=overrides))
    daemon = Daemon(config)
    daemon.plan_sink.ensure_environment()
    server = StatusServer(daemon, config.http.host, config.http.port).start()
    agent = daemon.agents["qsampling"]
    wall0 = time.perf_counter()
    bar = tqdm(desc="measuring (via queueserver)", unit="pt", disable=not progress, dynamic_ncols=True)
    logger.warning("status page: %s/", server.address)
    try:
        while agent.stop_reason is None or daemon.state.awaiting.get("qsampling"):
            if time.perf_counter() - wall0 > timeout:
                raise AgentError(f"the loop did not finish within {timeout:.0f} s; see {server.address}/")
            daemon.step()
            if agent.n_observations != bar.n:
                bar.update(agent.n_observations - bar.n)
                bar.set_postfix_str(f"beam {agent.exposure_total:.0f}s")
    finally:
        bar.close()
        server.stop()
        daemon.close()
    gate = daemon.steering["qsampling"].gate
    summary = _summary(agent, gate, setup, agent.store.path, time.perf_counter() - wall0, 0.0)
    summary["mode"] = "stack"
    summary["plans"] = list(daemon.recent_plans)
    write_report(out, agent, setup, summary)
    return summary

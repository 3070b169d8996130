"""The daemon against a real broker: flow, bad input, kills and restarts, the status server."""

from __future__ import annotations

import gc
import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
import uuid
from collections import Counter
from pathlib import Path

import msgpack
import numpy as np
import pytest
import yaml
from typer.testing import CliRunner

from agents.cli import app
from agents.daemon import Checkpoint, Daemon, StatusServer, describe_status, render_status_page
from agents.daemon_config import load_daemon_config
from agents.errors import AgentError, ConfigError
from simulators.sas_documents import sas_run_documents
from streams.broker import LocalBroker, create_topic
from streams.derived import validate_document
from streams.errors import StreamError
from streams.kafka import KafkaDocumentSink, KafkaDocumentSource, KafkaSettings, pack
from tests.ophyd_async_run import blob_scan

pytestmark = [
    pytest.mark.integration,
    # kafka-python 3.0.12 leaves sockets of refused or cancelled connects unclosed (its bug); the
    # fixture below collects them inside each test, where this filter applies.
    pytest.mark.filterwarnings("ignore:unclosed <socket.socket:ResourceWarning"),
    pytest.mark.filterwarnings("ignore:Exception ignored in. <socket.socket:pytest.PytestUnraisableExceptionWarning"),
]
BIN = Path(sys.executable).parent


@pytest.fixture(scope="module")
def broker(tmp_path_factory):
    with LocalBroker(workdir=tmp_path_factory.mktemp("broker")) as running:
        yield running


@pytest.fixture
def durable_broker(tmp_path):
    """A broker whose log survives a kill (tansu on a local S3 endpoint)."""
    with LocalBroker(workdir=tmp_path / "durable", durable=True) as running:
        yield running


@pytest.fixture(autouse=True)
def _quiet_kafka():
    """kafka-python logs every refused reconnect while a broker is down; keep the records out,
    and finalize the sockets it leaves behind before the test's warning filters go away."""
    kafka_logger = logging.getLogger("kafka")
    level = kafka_logger.level
    kafka_logger.setLevel(logging.CRITICAL + 1)
    before = set(threading.enumerate())
    yield
    for thread in set(threading.enumerate()) - before:
        if thread.name.startswith("kafka-io-") or thread.name.endswith("-network-thread"):
            thread.join(timeout=5)
    gc.collect()
    kafka_logger.setLevel(level)


def _config(broker: LocalBroker, state: Path, **extra) -> dict:
    beamline = f"b{uuid.uuid4().hex[:8]}"
    create_topic(broker.bootstrap, f"{beamline}.bluesky.runengine.documents")
    return {"beamline": beamline, "kafka": {"bootstrap_servers": broker.bootstrap}, "state_dir": str(state),
            "agents": [{"kind": "rate", "name": "rate"}], "fsync": False, "http": {"port": 0}, **extra}


def _publish(broker: LocalBroker, topic: str, docs, *, rate_hz: float | None = None) -> int:
    sink = KafkaDocumentSink(topic, KafkaSettings(bootstrap_servers=broker.bootstrap), key="raw")
    n = 0
    for name, doc in docs:
        sink(name, doc)
        n += name == "event"
        if rate_hz:
            time.sleep(1.0 / rate_hz)
    sink.flush()
    sink.close()
    return n


def _read_all(broker: LocalBroker, topic: str, *, quiet_s: float = 1.5) -> list:
    source = KafkaDocumentSource([topic], KafkaSettings(bootstrap_servers=broker.bootstrap),
                                 fetch_max_wait_ms=200 if broker.durable else 10)
    out, last = [], time.monotonic()
    try:
        while time.monotonic() - last < quiet_s:
            batch = source.poll(0.1)
            if batch:
                out += batch
                last = time.monotonic()
    finally:
        source.close()
    return out


def _run_until(daemon: Daemon, done, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not done():
        assert time.monotonic() < deadline, f"daemon did not get there in {timeout} s: {daemon.status()['counters']}"
        daemon.step()


def _derived_per_raw(records) -> Counter:
    """(raw run uid, raw seq_num) -> number of derived rate events for it."""
    starts = {r.doc["uid"]: r.doc["raw_run_uid"] for r in records if r.name == "start"}
    descriptors = {r.doc["uid"]: starts[r.doc["run_start"]] for r in records if r.name == "descriptor"}
    return Counter((descriptors[r.doc["descriptor"]], r.doc["data"]["raw_seq_num"])
                   for r in records if r.name == "event")


def _raw_events(docs) -> set:
    start = next(d["uid"] for n, d in docs if n == "start")
    return {(start, d["seq_num"]) for n, d in docs if n == "event"}


def test_every_raw_event_becomes_one_valid_derived_event(broker, tmp_path):
    cfg = load_daemon_config(_config(broker, tmp_path / "state"))
    runs = [list(sas_run_documents(40, seed=s)) for s in range(2)]
    for docs in runs:
        _publish(broker, cfg.documents_topic, docs)
    daemon = Daemon(cfg)
    _run_until(daemon, lambda: daemon.agents["rate"].events_out == 80)
    daemon.close()

    out = _read_all(broker, cfg.derived_topic)
    assert all(r.error is None for r in out)
    for r in out:
        validate_document(r.name, r.doc)
    assert set(_derived_per_raw(out).values()) == {1}
    assert set(_derived_per_raw(out)) == _raw_events(runs[0]) | _raw_events(runs[1])
    assert [r.name for r in out].count("stop") == 2  # each derived run closes with its raw run
    raw_event = next(d for n, d in runs[0] if n == "event")
    derived = next(r.doc for r in out if r.name == "event" and r.doc["data"]["raw_seq_num"] == raw_event["seq_num"]
                   and r.doc["descriptor"] in {x.doc["uid"] for x in out if x.name == "descriptor"})
    expected = raw_event["data"]["sas_counts"] / raw_event["data"]["sas_exposure"]
    rates = {r.doc["data"]["rate"] for r in out if r.name == "event" and r.doc["data"]["raw_seq_num"] == raw_event["seq_num"]}
    assert expected in rates and derived["data"]["rate_sigma"] > 0


def test_an_ophyd_async_detectors_frames_cross_kafka_and_are_analysed_from_its_file(broker, tmp_path):
    """A real RunEngine, ophyd-async's simulated detector writing HDF5, bluesky-kafka's Publisher
    (what a beamline runs) -> the daemon's detector agent: every frame read from the file."""
    import numpy as np
    import torch
    from bluesky_kafka import Publisher

    from agents.detector_agent import DetectorAnalysisAgent
    from models.nets import PoissonDenoiser
    from models.registry import WeightsRecord, save_weights

    torch.manual_seed(1)
    weights = save_weights(PoissonDenoiser(width=4, depth=2), tmp_path, WeightsRecord(
        name="tiny-den", architecture="poisson-denoiser-unet", architecture_config={"width": 4, "depth": 2}))
    settings = {"analysis": "denoise", "weights": str(weights), "device": "cpu", "frame_key": "det", "max_batch": 2}
    cfg = load_daemon_config(_config(broker, tmp_path / "state", agents=[
        {"kind": "detector", "name": "den", "settings": settings}]))
    _, sent = blob_scan(tmp_path, 5, [Publisher(
        topic=cfg.documents_topic, bootstrap_servers=broker.bootstrap, key="raw",
        producer_config={"acks": 1, "request.timeout.ms": 5000}, flush_on_stop_doc=True)])

    daemon = Daemon(cfg)
    _run_until(daemon, lambda: daemon.agents["den"].report()["frames_out"] == 5)
    assert daemon.agents["den"].report()["failed_frames"] == {}
    status = daemon.status()
    page = render_status_page(status)  # what an operator sees of a detector agent
    assert "frames_in: <b>5</b>" in page and "frames_out: <b>5</b>" in page and "frames_waiting_for_data: <b>0</b>" in page
    status["agents"]["den"] = status["agents"]["den"] | {"failed_frames": {"not_ready": 3, "shape": 1}}
    assert "failed frames: not_ready 3, shape 1" in render_status_page(status)
    daemon.close()
    out = _read_all(broker, cfg.derived_topic)
    for r in out:
        validate_document(r.name, r.doc)
    got = {r.doc["data"]["raw_seq_num"]: r.doc["data"]["denoised"] for r in out if r.name == "event"}
    reference = DetectorAnalysisAgent(settings, sinks=[(ref := _Collect())])
    for name, doc in sent:  # the same documents in process, never through Kafka
        reference.tell(name, doc)
    want = {d["data"]["raw_seq_num"]: d["data"]["denoised"] for n, d in ref.docs if n == "event"}
    assert sorted(got) == sorted(want) == [1, 2, 3, 4, 5]
    for k, frame in want.items():
        np.testing.assert_array_equal(got[k], frame)


class _Collect:
    def __init__(self) -> None:
        self.docs: list = []

    def __call__(self, name, doc) -> None:
        self.docs.append((name, doc))


def test_bad_messages_are_counted_logged_with_offset_and_skipped(broker, tmp_path):
    cfg = load_daemon_config(_config(broker, tmp_path / "state", max_message_bytes=4096))
    producer = KafkaDocumentSink(cfg.documents_topic, KafkaSettings(bootstrap_servers=broker.bootstrap), key="raw")
    raw = producer._producer  # the bytes below are not documents; the sink would refuse them
    raw.send(cfg.documents_topic, key=b"raw", value=b"\xc1 not msgpack")
    raw.send(cfg.documents_topic, key=b"raw", value=msgpack.packb({"not": "a document"}))
    raw.send(cfg.documents_topic, key=b"raw", value=pack("event", {"uid": "e1", "descriptor": "nowhere",
                                                                   "seq_num": 1, "time": 0.0, "data": {},
                                                                   "timestamps": {}}))
    raw.send(cfg.documents_topic, key=b"raw", value=pack("start", {"uid": "big", "time": 0.0, "pad": "x" * 10_000}))
    raw.flush()
    producer.close()
    good = list(sas_run_documents(5, seed=3))
    _publish(broker, cfg.documents_topic, good)

    daemon = Daemon(cfg)
    _run_until(daemon, lambda: daemon.agents["rate"].events_out == 5)
    status = daemon.status()
    daemon.close()
    skipped = [e for e in status["errors"] if "skipped" in e]
    assert len(skipped) == 4
    assert all(f"{cfg.documents_topic}:0@" in e for e in skipped)  # each names its offset
    assert status["counters"]["beampilot_documents_malformed_total"] == 4
    text = daemon.metrics.render().decode()
    total = sum(float(line.split()[-1]) for line in text.splitlines()
                if line.startswith("beampilot_documents_malformed_total"))
    assert total == 4


def test_a_first_start_at_the_end_reads_what_comes_after_it_even_across_a_restart(broker, tmp_path, caplog):
    """``start_at: end``: last night's runs still on the topic are not read; documents published
    after the first start are, although the daemon was killed before it read any."""
    cfg = load_daemon_config(_config(broker, tmp_path / "state", start_at="end"))
    old, new = (list(sas_run_documents(12, seed=s)) for s in (7, 8))
    _publish(broker, cfg.documents_topic, old)
    with caplog.at_level(logging.WARNING, logger="agents.daemon"):
        first = Daemon(cfg)
    first.source.close()  # killed (no close: no final checkpoint) before anything was published
    first.derived_sink.close()
    first._state_lock.release()  # as the kernel does for a killed process
    assert f"reading {cfg.documents_topic} from what is published from now on (start_at: end)" in caplog.text
    _publish(broker, cfg.documents_topic, new)  # while it was down
    again = Daemon(cfg)
    _run_until(again, lambda: again.agents["rate"].events_out == 12)
    again.close()
    per_raw = _derived_per_raw(_read_all(broker, cfg.derived_topic))
    assert set(per_raw) == _raw_events(new) and set(per_raw.values()) == {1}  # none of the old run


def _frame_event(seed: int) -> dict:
    rng = np.random.default_rng(seed)
    return {"uid": str(uuid.uuid4()), "time": 1.0, "descriptor": "d", "seq_num": seed, "filled": {},
            "data": {"frame": rng.random((256, 256), dtype=np.float32)}, "timestamps": {"frame": 1.0}}


def test_a_checkpoint_keeps_its_outbox_of_frames_beside_it_in_binary(tmp_path):
    """Derived frames wait in the outbox until they are on the broker. As JSON a 256 x 256 frame
    was ~1.3 MB to write at every batch (the daemon spent a third of its time there); they are
    kept packed as for Kafka, in a file the JSON names, and come back as the arrays they were."""
    path = tmp_path / "checkpoint.json"
    events = [_frame_event(i) for i in range(4)]
    Checkpoint(offsets={"t:0": 7}, outbox=[("event", e) for e in events]).save(path, fsync=True)
    first = sorted(p.name for p in tmp_path.iterdir())
    assert path.stat().st_size < 2_000 and len(first) == 2 and first[1].startswith("outbox-"), first
    assert (tmp_path / first[1]).stat().st_size < 1.01 * 4 * 256 * 256 * 4
    loaded = Checkpoint.load(path)
    assert loaded.offsets == {"t:0": 7} and [n for n, _ in loaded.outbox] == ["event"] * 4
    for (_, got), sent in zip(loaded.outbox, events, strict=True):
        frame = got["data"]["frame"]
        assert frame.dtype == np.float32 and np.array_equal(frame, sent["data"]["frame"]) and got["uid"] == sent["uid"]
    (tmp_path / "outbox-1.msgpack.tmp").write_bytes(b"cut short")  # a write a crash cut short
    Checkpoint(offsets={"t:0": 9}).save(path, fsync=False)  # sent: the outbox is empty, its file goes
    assert [p.name for p in tmp_path.iterdir()] == ["checkpoint.json"] and Checkpoint.load(path).outbox == []


def test_a_derived_document_that_cannot_be_packed_is_named_and_neither_stops_the_daemon_nor_its_checkpoint(broker, tmp_path):
    cfg = load_daemon_config(_config(broker, tmp_path / "state"))
    daemon = Daemon(cfg)
    good = {"uid": "g1", "time": 1.0, "run_start": "r1", "exit_status": "success", "num_events": {}}
    bad = {**good, "uid": "b1", "reason": object()}  # an agent's bug: a value msgpack cannot write
    daemon.outbox("stop", bad)
    daemon.outbox("stop", good)
    daemon._commit()  # checkpoint, then send: neither raises
    status = daemon.status()
    daemon.close()
    (said,) = [e for e in status["errors"] if "b1 was not published" in e]
    assert "cannot serialize with msgpack" in said and "could not be kept either (not serializable)" in said
    assert [r.doc["uid"] for r in _read_all(broker, cfg.derived_topic)] == ["g1"]


def test_a_version_1_checkpoint_with_its_outbox_in_the_json_still_loads(tmp_path):
    path = tmp_path / "checkpoint.json"
    doc = {"uid": "u1", "time": 1.0, "descriptor": "d", "seq_num": 1, "data": {"rate": 2.5}, "timestamps": {"rate": 1.0}}
    path.write_text(json.dumps({"version": 1, "offsets": {"t:0": 3}, "outbox": [["event", doc]]}))
    loaded = Checkpoint.load(path)
    assert loaded.offsets == {"t:0": 3} and loaded.outbox == [("event", doc)]


def test_an_unreadable_outbox_file_is_named_with_what_to_do(tmp_path):
    path = tmp_path / "checkpoint.json"
    Checkpoint(outbox=[("event", _frame_event(1))]).save(path, fsync=False)
    (sidecar,) = tmp_path.glob("outbox-*")
    sidecar.write_bytes(sidecar.read_bytes()[:1000])  # cut short
    with pytest.raises(AgentError, match=rf"{sidecar.name}, which cannot be read .*move both away to start fresh"):
        Checkpoint.load(path)
    sidecar.unlink()
    with pytest.raises(AgentError, match=r"cannot be read \(\[Errno 2\]"):
        Checkpoint.load(path)


def test_derived_documents_checkpointed_but_not_sent_before_a_kill_are_sent_once_at_restart(broker, tmp_path):
    cfg = load_daemon_config(_config(broker, tmp_path / "state"))
    docs = list(sas_run_documents(12, seed=6))
    _publish(broker, cfg.documents_topic, docs)
    first = Daemon(cfg)
    sent: list = []

    def killed(batch):  # the process dies after the checkpoint, before the outbox reaches the broker
        sent.append(batch)
        raise KeyboardInterrupt

    first._send = killed
    with pytest.raises(KeyboardInterrupt):
        _run_until(first, lambda: False)
    first.source.close()
    first.derived_sink.close()
    first._state_lock.release()  # as the kernel does for a killed process
    assert sent and any(name == "event" for name, _ in sent[0])
    assert list((tmp_path / "state").glob("outbox-*.msgpack"))  # the batch waits beside the checkpoint
    again = Daemon(cfg)
    _run_until(again, lambda: again.agents["rate"].events_out + sum(n == "event" for n, _ in sent[0]) >= 12)
    again.close()
    per_raw = _derived_per_raw(_read_all(broker, cfg.derived_topic))
    assert set(per_raw) == _raw_events(docs) and set(per_raw.values()) == {1}
    assert not list((tmp_path / "state").glob("outbox-*"))


class _BrokerLimit:
    """kafka-python's producer, with the answer a broker whose topic has ``max.message.bytes`` =
    ``limit`` gives a larger message (MESSAGE_TOO_LARGE, to the send's future): tansu enforces no
    such limit. Everything else goes to the real producer and broker."""

    def __init__(self, producer, limit: int) -> None:
        self._producer, self._limit = producer, limit

    def send(self, topic, value, **kwargs):
        from kafka.errors import MessageSizeTooLargeError
        from kafka.future import Future

        if len(value) > self._limit:
            return Future().failure(MessageSizeTooLargeError("The request included a message larger than the max message size"))
        return self._producer.send(topic, value=value, **kwargs)

    def __getattr__(self, name):
        return getattr(self._producer, name)


def _daemon_refusing_over_4096(how: str, cfg) -> tuple[Daemon, str]:
    """A daemon whose derived sink refuses documents over 4 kB the way ``how`` names, and what
    it then says."""
    if how == "max_message_bytes":
        settings = KafkaSettings(bootstrap_servers=cfg.kafka.bootstrap_servers)
        sink = KafkaDocumentSink(cfg.derived_topic, settings, max_message_bytes=4096, keep_refused=True)
        return Daemon(cfg, derived_sink=sink), "over max_message_bytes=4096"
    if how == "max_request_size":  # kafka.extra, below the daemon's max_message_bytes
        limited = cfg.model_copy(update={"kafka": cfg.kafka.model_copy(update={"extra": {"max_request_size": 4096}})})
        return Daemon(limited), "max_request_size"
    daemon = Daemon(cfg)  # the broker's limit, met by the sink the daemon makes itself
    daemon.derived_sink._producer = _BrokerLimit(daemon.derived_sink._producer, 4096)
    return daemon, "raise topic"


@pytest.mark.parametrize(("how", "keep"), [("max_message_bytes", None), ("max_request_size", None), ("broker", None),
                                          ("broker", 10_000)])
def test_a_derived_document_too_large_to_publish_is_kept_named_and_the_daemon_goes_on(broker, tmp_path, how, keep):
    """Before, the sink's DocumentError stopped the daemon after the outbox was checkpointed, and
    every restart sent the same outbox again: a crash loop no restart could end. Too large for
    the producer's max_request_size, or for the broker (Kafka's default message.max.bytes is
    about 1 MB, under one derived 512 x 512 frame), it stopped the daemon the same way."""
    from event_model import compose_run

    from streams.kafka import unpack

    kept_at_most = {} if keep is None else {"refused_max_bytes": keep}  # under one document: none kept
    cfg = load_daemon_config(_config(broker, tmp_path / "state", agents=[{"kind": "detector", "name": "denoise", "settings": {
        "analysis": "denoise", "weights": "denoise", "frame_key": "det_image"}}], **kept_at_most))
    run = compose_run()
    desc = run.compose_descriptor(name="primary", data_keys={"det_image": {"dtype": "array", "shape": [64, 64], "source": "sim"}})
    frames = [np.full((64, 64), i + 1, np.uint32) for i in range(3)]
    _publish(broker, cfg.documents_topic, [("start", run.start_doc), ("descriptor", desc.descriptor_doc)]
             + [("event", desc.compose_event(data={"det_image": f}, timestamps={"det_image": 1.0})) for f in frames]
             + [("stop", run.compose_stop())])
    # a 64 x 64 float32 frame packs to ~16 kB: over this sink's limit, as a 2k x 2k one is over the default's
    daemon, says = _daemon_refusing_over_4096(how, cfg)
    _run_until(daemon, lambda: daemon.agents["denoise"].frames_out == 3)
    for _ in range(5):
        daemon.step()
    status = daemon.status()
    daemon.close()
    folder = tmp_path / "state" / "refused"
    kept = sorted(folder.iterdir()) if folder.exists() else []
    events = [unpack(path.read_bytes()) for path in kept]
    assert [name for name, _ in events] == ([] if keep else ["event"] * 3)
    assert sorted(float(doc["data"]["denoised"].mean()) > 0 for _, doc in events) == [True] * len(events)
    refused = [e for e in status["errors"] if "was not published" in e]
    assert len(refused) == 1 and says in refused[0], refused  # said once a minute while it repeats
    if keep:
        assert f"not kept: {folder} holds 0 MB of refused documents already (refused_max_bytes={keep})" in refused[0]
    else:
        assert "kept in" in refused[0]
    assert status["counters"]["beampilot_derived_refused_total"] == 3
    on_topic = Counter(r.name for r in _read_all(broker, cfg.derived_topic))
    assert on_topic == Counter({"start": 1, "descriptor": 1, "stop": 1}), on_topic  # the run itself went out
    again = Daemon(cfg)  # a restart runs too (it once met the same outbox again, and stopped)
    again.step()
    again.close()


def test_a_second_daemon_on_the_same_state_dir_is_refused_at_start_naming_the_first(broker, tmp_path):
    """The systemd unit's daemon and one started by hand would both read the topic, overwrite each
    other's checkpoint and both send plans: the second is refused before it touches anything."""
    cfg = load_daemon_config(_config(broker, tmp_path / "state"))
    first = Daemon(cfg)
    try:
        written = (tmp_path / "state" / "checkpoint.json").read_bytes()
        with pytest.raises(AgentError, match=f"in use by another beampilot daemon \\(pid {os.getpid()} on "):
            Daemon(cfg)
        assert (tmp_path / "state" / "checkpoint.json").read_bytes() == written
    finally:
        first.close()
    again = Daemon(cfg)  # the first closed: its state_dir is free
    again.close()


def test_restart_from_checkpoint_reads_on_without_repeats(broker, tmp_path):
    group = f"g-{uuid.uuid4().hex[:8]}"  # positions are mirrored to a consumer group too
    cfg = load_daemon_config(_config(broker, tmp_path / "state",
                                     kafka={"bootstrap_servers": broker.bootstrap, "group_id": group}))
    docs = list(sas_run_documents(60, seed=4))
    _publish(broker, cfg.documents_topic, docs[:32])  # start, descriptor, 30 events: the run is open
    first = Daemon(cfg)
    _run_until(first, lambda: first.agents["rate"].events_out == 30)
    first.close()
    saved = Checkpoint.load(cfg.state_dir / "checkpoint.json")
    assert len(saved.open_runs) == 1 and saved.outbox == []

    _publish(broker, cfg.documents_topic, docs[32:])
    second = Daemon(cfg)  # a new process would do the same: everything comes from the checkpoint
    _run_until(second, lambda: second.agents["rate"].events_out == 30)
    second.close()
    with KafkaDocumentSource([cfg.documents_topic], KafkaSettings(bootstrap_servers=broker.bootstrap),
                             group_id=group) as mirror:  # starts where the group says
        assert mirror.positions() == {f"{cfg.documents_topic}:0": len(docs)}
    out = _read_all(broker, cfg.derived_topic)
    per_raw = _derived_per_raw(out)
    assert set(per_raw) == _raw_events(docs) and set(per_raw.values()) == {1}
    stops = [r.doc for r in out if r.name == "stop"]
    assert [s["exit_status"] for s in stops].count("abort") == 1  # the first derived run, closed on restart
    assert [s["exit_status"] for s in stops].count("success") == 1
    # each stop counts the events its run sent, per stream, the abort written after the restart too
    streams = {r.doc["uid"]: (r.doc["run_start"], r.doc["name"]) for r in out if r.name == "descriptor"}
    for stop in stops:
        sent = Counter(streams[r.doc["descriptor"]][1] for r in out
                       if r.name == "event" and streams[r.doc["descriptor"]][0] == stop["run_start"])
        assert stop["num_events"] == dict(sent) and sum(sent.values()) > 0


def test_a_checkpoint_past_the_end_of_a_rebuilt_brokers_log_reads_the_new_log_and_says_so(tmp_path):
    # 3 a.m.: the Kafka broker lost its data (here: tansu in memory, restarted) while the daemon
    # was stopped. Its checkpoint points past the end of the new, shorter log; before, it waited
    # silently for offsets that would come only after as many new messages, and dropped those.
    with LocalBroker(workdir=tmp_path / "wiped") as broker:
        cfg = load_daemon_config(_config(broker, tmp_path / "state"))
        first_run, second_run = (list(sas_run_documents(30, seed=s)) for s in (5, 6))
        _publish(broker, cfg.documents_topic, first_run[:-1])  # its stop never comes: it is cut by the rebuild
        first = Daemon(cfg)
        _run_until(first, lambda: first.agents["rate"].events_out == 30)
        first.close()
        key = f"{cfg.documents_topic}:0"
        saved = Checkpoint.load(cfg.state_dir / "checkpoint.json")
        assert saved.offsets == {key: len(first_run) - 1} and list(saved.open_runs) == [first_run[0][1]["uid"]]

        broker.restart()  # memory storage: every topic and message is gone
        create_topic(broker.bootstrap, cfg.documents_topic)
        create_topic(broker.bootstrap, cfg.derived_topic)
        _publish(broker, cfg.documents_topic, second_run[:20])  # fewer messages than the checkpoint's offset
        second = Daemon(cfg)
        _run_until(second, lambda: second.agents["rate"].events_out == 18)  # a new process: counts from 0
        status = second.status()
        second.close()
        assert list(Checkpoint.load(cfg.state_dir / "checkpoint.json").open_runs) == [second_run[0][1]["uid"]]
        out = _read_all(broker, cfg.derived_topic)
    said = [e for e in status["errors"] if key in e]
    assert len(said) == 2 and f"the next offset to read, {len(first_run) - 1}, is past the end" in said[0]
    assert "deleted and created again" in said[0]
    assert f"run {first_run[0][1]['uid']} closed for the agents: its other documents went with the old log" in said[1]
    # the cut run's derived run (opened again at the restart) ends, failed, with the reason
    cut_derived = {r.doc["uid"] for r in out if r.name == "start" and r.doc["raw_run_uid"] == first_run[0][1]["uid"]}
    stops = [r.doc for r in out if r.name == "stop" and r.doc["run_start"] in cut_derived]
    assert "fail" in [s["exit_status"] for s in stops]
    assert status["counters"]["beampilot_kafka_offset_resets_total"] == 1
    assert status["counters"].get("beampilot_documents_lost_total", 0) == 0
    assert "1 time(s) the broker no longer had the next message to read (0 deleted" in render_status_page(status)


def _daemon_process(config_path: Path, log: Path) -> subprocess.Popen:
    with open(log, "ab") as out:
        return subprocess.Popen([str(BIN / "beampilot"), "run", "--config", str(config_path)],
                                stdout=out, stderr=subprocess.STDOUT, start_new_session=True)


def _read_offsets(checkpoint: Path) -> int:
    try:
        return sum(json.loads(checkpoint.read_text())["offsets"].values())
    except (OSError, ValueError):
        return 0


def _wait_for(predicate, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)


def test_sigkill_mid_stream_loses_nothing_and_repeats_nothing(broker, tmp_path):
    cfg = _config(broker, tmp_path / "state")
    path = tmp_path / "agent.yaml"
    path.write_text(yaml.safe_dump(cfg))
    config = load_daemon_config(path)
    runs = [list(sas_run_documents(150, seed=10 + s)) for s in range(3)]
    publisher = threading.Thread(target=lambda: [_publish(broker, config.documents_topic, d, rate_hz=400) for d in runs])
    log = tmp_path / "daemon.log"
    proc = _daemon_process(path, log)
    try:
        _kill_and_restart(proc, path, log, publisher, config, runs, broker)
    finally:
        for p in _procs(proc):
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()


def _procs(first):
    return [first, *getattr(first, "successors", [])]


def _kill_and_restart(proc, path, log, publisher, config, runs, broker):
    first = proc
    publisher.start()
    checkpoint = config.state_dir / "checkpoint.json"
    _wait_for(lambda: _read_offsets(checkpoint) > 150, 60, f"the daemon to get a third of the way; log: {log}")
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    proc = _daemon_process(path, log)
    first.successors = [proc]
    _wait_for(lambda: log.read_text().count("beampilot daemon up") >= 2, 60, f"the restarted daemon; log: {log}")
    publisher.join()
    total = sum(len(d) for d in runs)
    _wait_for(lambda: _read_offsets(checkpoint) >= total, 60,
              f"the restarted daemon to read all {total} documents; log: {log}")
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(20) == 0, log.read_text()[-2000:]
    per_raw = _derived_per_raw(_read_all(broker, config.derived_topic))
    expected = set().union(*(_raw_events(d) for d in runs))
    assert set(per_raw) == expected, f"lost {len(expected - set(per_raw))}"
    assert max(per_raw.values()) == 1, f"duplicated {sum(v - 1 for v in per_raw.values())}"


def test_broker_restart_mid_stream_loses_nothing_and_repeats_nothing(durable_broker, tmp_path, caplog):
    _broker_restart(durable_broker, tmp_path, caplog)


def _broker_restart(broker, tmp_path, caplog):
    # tansu on S3 answers fetches with nothing when its storage read outlasts the fetch's max wait
    cfg = load_daemon_config(_config(broker, tmp_path / "state", kafka={
        "bootstrap_servers": broker.bootstrap, "extra": {"fetch_max_wait_ms": 200}}))
    docs = list(sas_run_documents(200, seed=20))
    _publish(broker, cfg.documents_topic, docs[:100])
    daemon = Daemon(cfg)
    _run_until(daemon, lambda: daemon.agents["rate"].events_out >= 98)
    broker.kill()
    with caplog.at_level(logging.WARNING, logger="agents.daemon"):
        for _ in range(10):  # polls while the broker is away must not raise
            daemon.step()
        assert daemon.healthy()[0] is False and "broker" in daemon.healthy()[1]
        broker.restart()
        _publish(broker, cfg.documents_topic, docs[100:])
        _run_until(daemon, lambda: daemon.agents["rate"].events_out == 200, timeout=60)
    assert daemon.healthy()[0]
    said = [r.getMessage() for r in caplog.records if r.name == "agents.daemon"]
    # the outage in the daemon's own words: said once as it began, and when it ended
    (down,) = [m for m in said if "does not answer" in m]
    (back,) = [m for m in said if "answers again, after" in m]
    assert down.startswith(f"the broker at {broker.bootstrap} does not answer (") and "read when it is back" in down
    assert back.startswith(f"the broker at {broker.bootstrap} answers again, after ")
    daemon.close()
    per_raw = _derived_per_raw(_read_all(broker, cfg.derived_topic))
    assert set(per_raw) == _raw_events(docs) and set(per_raw.values()) == {1}


def test_status_server_serves_health_metrics_and_a_page(broker, tmp_path):
    cfg = load_daemon_config(_config(broker, tmp_path / "state"))
    _publish(broker, cfg.documents_topic, sas_run_documents(10, seed=5))
    daemon = Daemon(cfg)
    _run_until(daemon, lambda: daemon.agents["rate"].events_out == 10)
    server = StatusServer(daemon, port=0).start()
    try:
        health = json.loads(urllib.request.urlopen(server.address + "/healthz").read())
        assert health["status"] == "ok"
        metrics = urllib.request.urlopen(server.address + "/metrics").read().decode()
        assert 'beampilot_documents_in_total{name="event"} 10.0' in metrics
        assert "beampilot_processing_latency_seconds_bucket" in metrics
        page = urllib.request.urlopen(server.address + "/").read().decode()
        assert "rate" in page and "documents in" in page and cfg.documents_topic in page
        with pytest.raises(urllib.error.HTTPError) as err:
            urllib.request.urlopen(server.address + "/nope")
        assert err.value.code == 404
        # what the page says of a stalled agent and of tiled (their own tests make them for real)
        s = daemon.status() | {"stalled": {"map1": "2 of its plans wait in the queue, but the queue is stopped"}}
        s["tiled"] = {"uri": "http://127.0.0.1:8000", "connected": False, "reason": "Connection refused",
                      "behind": 12, "age_s": 0.5, "failed_runs": {"u1": "tiled refused its event document"},
                      "offset_resets": ["t:0: the next offset to read, 9, is past the end"]}
        page = render_status_page(s)
        assert "tiled mirror: t:0: the next offset to read, 9, is past the end" in page
        assert "agent map1 waits: 2 of its plans wait in the queue, but the queue is stopped" in page
        assert "(Connection refused): 12 derived documents wait on the topic" in page
        assert "derived run u1 is not in tiled: tiled refused its event document" in page
        s["tiled"] |= {"connected": True, "age_s": 42.0, "failed_runs": {}}
        assert "waited 42 s for tiled" in render_status_page(s)
        # a plan cut short and taken back (entries the daemon makes without the plan's name)
        s["plans"] = [{"agent": "map1", "key": "k1", "plan": "measure", "status": "sent", "points": 4, "time": 0.0},
                      {"agent": "map1", "key": "k1", "status": "cut short", "time": 1.0,
                       "reason": "its run ended 'abort' after 1 point(s)"},
                      {"agent": "map1", "key": "k1", "status": "taken back", "time": 2.0,
                       "reason": "put back in the queue after its run ended 'aborted'"}]
        page = render_status_page(s)
        assert "its run ended &#x27;abort&#x27; after 1 point(s)" in page and "taken back" in page
        # the same in words, for a shell: what the page says, alarms marked
        text = describe_status(s, server.address)
        assert text.startswith(f"beampilot daemon at {server.address}: healthy (ok), up ")
        assert "\n! agent map1 waits: 2 of its plans wait in the queue, but the queue is stopped\n" in text
        assert "\n! derived run u1 is not in tiled" not in text and "  00:00:01 map1 cut short its run ended 'abort'" in text
        # and asked of the running daemon: its config's port, or its address
        config = tmp_path / "daemon.yaml"
        config.write_text(yaml.safe_dump({**yaml.safe_load(yaml.safe_dump(_config(broker, tmp_path / "state"))),
                                          "http": {"port": int(server.address.rsplit(":", 1)[1])}}))
        asked = CliRunner().invoke(app, ["status", "--config", str(config)])
        assert asked.exit_code == 0, asked.output
        assert "healthy (ok)" in asked.output and "agents: rate (RateAgent)" in asked.output
        assert json.loads(CliRunner().invoke(app, ["status", "--url", server.address, "--json"]).output)["healthy"]
    finally:
        server.stop()
        daemon.close()
    gone = CliRunner().invoke(app, ["status", "--url", server.address])
    assert gone.exit_code == 2 and f"no daemon answers at {server.address}" in gone.output


def test_a_run_whose_runengine_died_is_closed_for_the_agents_once_a_later_run_starts(tmp_path):
    """Run A never gets its stop (its RunEngine was killed). While nothing later starts, A stays
    open however quiet (a suspended RunEngine); once run B has started and A has been quiet for
    abandon_runs_after_s, the agents get a stop for A and its derived run ends with 'fail'."""
    from streams.kafka import Record
    from tests.agents.test_detector_agent import _ListSink, _ListSource

    a = [(n, d) for n, d in sas_run_documents(3, seed=1) if n != "stop"]
    b = list(sas_run_documents(2, seed=2))
    config = load_daemon_config({"agents": [{"kind": "rate", "name": "rate"}], "state_dir": str(tmp_path / "state"),
                                 "fsync": False, "abandon_runs_after_s": 0.4})
    source, sink = _ListSource(a), _ListSink()
    daemon = Daemon(config, source=source, derived_sink=sink)
    try:
        while daemon.step():
            pass
        time.sleep(0.5)
        for _ in range(5):  # quiet, but nothing later has started: a suspended run looks like this
            daemon.step()
            time.sleep(0.1)
        assert list(daemon.state.open_runs) == [a[0][1]["uid"]]
        source.records = [Record("raw", 0, len(a) + i, 0, 0, n, d) for i, (n, d) in enumerate(b)]
        while daemon.step():
            pass
        time.sleep(0.5)
        for _ in range(5):
            daemon.step()
            time.sleep(0.1)
        assert daemon.state.open_runs == {}
        errors = list(daemon.recent_errors)
    finally:
        daemon.close()
    stops = {d["run_start"]: d for n, d in sink.docs if n == "stop"}
    starts = {d["raw_run_uid"]: d["uid"] for n, d in sink.docs if n == "start"}
    assert stops[starts[a[0][1]["uid"]]]["exit_status"] == "fail"
    assert stops[starts[b[0][1]["uid"]]]["exit_status"] == "success"
    assert any(a[0][1]["uid"] in e and "no stop" in e for e in errors)
    for name, doc in sink.docs:
        validate_document(name, doc)


@pytest.mark.timeout(180)
def test_a_daemon_started_while_tiled_is_down_runs_and_fills_tiled_when_it_comes(broker, tmp_path):
    """A restart at 3 a.m. with tiled down: the daemon starts and analyses (only a wrong key or
    something else at the address stops it); the derived run waits on the topic and reaches tiled
    once tiled answers."""
    from streams.localhost import free_port
    from streams.tiled_io import TiledRunSource
    from streams.tiled_launch import TiledServer

    port, key = free_port(), "mirrorkey"
    cfg = load_daemon_config(_config(broker, tmp_path / "state",
                                     tiled={"uri": f"http://127.0.0.1:{port}", "api_key": key}))
    _publish(broker, cfg.documents_topic, sas_run_documents(5, seed=3))
    daemon = Daemon(cfg)
    try:
        _run_until(daemon, lambda: daemon.agents["rate"].events_out == 5)
        mirrored = daemon.status()["tiled"]
        assert not mirrored["connected"] and "not reachable" in mirrored["reason"]
        with TiledServer(port, workdir=tmp_path / "tiled", api_key=key) as tiled:
            assert daemon.tiled_mirror.drain(60), daemon.status()["tiled"]
            with TiledRunSource(tiled.uri, api_key=key) as runs:
                derived = [list(runs.documents(uid)) for uid in runs.runs()]
    finally:
        daemon.close()
    assert len(derived) == 1 and derived[0][-1][0] == "stop"
    assert sum(name == "event" for name, _ in derived[0]) == 5


def test_unreachable_broker_fails_at_start_naming_the_address(tmp_path):
    path = tmp_path / "agent.yaml"
    path.write_text(yaml.safe_dump({"kafka": {"bootstrap_servers": "127.0.0.1:1"}, "state_dir": str(tmp_path),
                                    "agents": [{"kind": "rate", "name": "rate"}]}))
    t0 = time.monotonic()
    result = subprocess.run([str(BIN / "beampilot"), "run", "--config", str(path)], capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 2
    assert "127.0.0.1:1" in result.stderr and "refused" in result.stderr.lower()
    assert time.monotonic() - t0 < 30


def _kafka_threads():
    return {t for t in threading.enumerate()
            if t.is_alive() and (t.name.startswith("kafka-io-") or t.name.endswith("-network-thread"))}


def test_a_start_that_fails_at_tiled_closes_the_kafka_clients_it_opened(broker, tmp_path):
    """The broker answers, tiled refuses the key (a mistake, not an outage): the error names
    tiled, and the consumer and producer opened before it are closed again, not left running."""
    from streams.tiled_launch import TiledServer

    before = _kafka_threads()
    with TiledServer(workdir=tmp_path / "tiled", api_key="right") as tiled:
        cfg = load_daemon_config(_config(broker, tmp_path / "state", tiled={"uri": tiled.uri, "api_key": "wrong"}))
        with pytest.raises(StreamError, match="refused the API key"):
            Daemon(cfg)
    deadline = time.monotonic() + 10
    while (left := _kafka_threads() - before) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not left


def test_a_daemon_started_while_the_queueserver_is_down_analyses_and_says_no_plans_go_out(broker, tmp_path):
    """A restart at night with the RE Manager down: the daemon starts (its analysis needs no
    queue server), /healthz names the queue server, and it says once that no plans go out."""
    limits = {axis: {"low": 0, "high": 10, "max_step": 2.0} for axis in ("stage_x", "stage_y")}
    cfg = load_daemon_config(_config(broker, tmp_path / "state", queueserver={"zmq_control_addr": "tcp://127.0.0.1:1"},
                                     agents=[{"kind": "rate", "name": "rate"},
                                             {"kind": "mapping", "name": "map1", "settings": {
                                                 "extent": [0, 10, 0, 10], "reduction": "none", "quantities": ["value"]},
                                              "safety": {"allowed_plans": ["measure"], "limits": limits}}]))
    _publish(broker, cfg.documents_topic, sas_run_documents(4, seed=4))
    daemon = Daemon(cfg)
    try:
        _run_until(daemon, lambda: daemon.agents["rate"].events_out == 4)
        ok, why = daemon.healthy()
        errors = [e for e in daemon.recent_errors if "no plans go out" in e]
    finally:
        daemon.close()
    assert not ok and why.startswith("queue server unreachable") and "127.0.0.1:1" in why
    assert len(errors) == 1


def test_an_agents_bad_settings_are_reported_before_any_server_is_needed(tmp_path):
    """A mistake in an agent's settings is named, with the agent, before the daemon reaches for
    the broker (here unreachable): the user fixes the config without starting the servers."""
    path = tmp_path / "agent.yaml"
    path.write_text(yaml.safe_dump({
        "kafka": {"bootstrap_servers": "127.0.0.1:1"}, "state_dir": str(tmp_path),
        "agents": [{"kind": "rate", "name": "rate"},
                   {"kind": "detector", "name": "dn", "settings": {"analysis": "denoise", "weights": "denoise",
                                                                  "read_noise": -1}}]}))
    result = subprocess.run([str(BIN / "beampilot"), "run", "--config", str(path)], capture_output=True, text=True,
                            timeout=60, check=False)
    assert result.returncode == 2
    assert "agent 'dn' (kind detector)" in result.stderr and "read_noise" in result.stderr
    assert "Kafka" not in result.stderr


def test_config_errors_name_the_key(tmp_path):
    with pytest.raises(ConfigError, match="unknown key 'agents.0.colour'"):
        load_daemon_config({"agents": [{"kind": "rate", "name": "r", "colour": "blue"}]})
    with pytest.raises(ConfigError, match="safety"):
        load_daemon_config({"agents": [{"kind": "qsampling", "name": "q"}],
                            "queueserver": {"zmq_control_addr": "tcp://127.0.0.1:1"}})

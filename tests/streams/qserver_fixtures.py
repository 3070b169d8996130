"""Module-scoped real servers for the queueserver tests: Redis and an RE Manager on loopback.

Imported by the test modules that use them (not a conftest: the servers cost seconds, so only
the modules that need them start them). The RE environment is opened once, here.
"""

from collections.abc import Iterator
from pathlib import Path

import pytest
from bluesky_queueserver_api.zmq import REManagerAPI

from streams.broker import LocalBroker
from streams.qserver_launch import RedisServer, REManager, free_port
from streams.queueserver import QueueServerPlanSink, close_api

REPO = Path(__file__).resolve().parents[2]
STARTUP_DIR = REPO / "deploy" / "qserver" / "startup"
#: where the RE Manager's RunEngine publishes its documents
DOCUMENT_TOPIC = "beampilot.qserver.test.documents"


@pytest.fixture(scope="module")
def kafka_broker() -> Iterator[LocalBroker]:
    # The topic is not created first: tansu makes it with 4 partitions on first produce, but the
    # RunEngine's bluesky-kafka Publisher sends every message with one key, so one partition.
    with LocalBroker() as broker:
        yield broker


@pytest.fixture(scope="module")
def redis_server(tmp_path_factory) -> Iterator[RedisServer]:
    with RedisServer(workdir=tmp_path_factory.mktemp("redis")) as server:
        yield server


@pytest.fixture(scope="module")
def re_manager(redis_server, kafka_broker, tmp_path_factory) -> Iterator[REManager]:
    """The manager, its HTTP server, and an open RE environment running deploy/qserver/startup,
    whose RunEngine publishes to Kafka."""
    manager = REManager(redis_server.port, startup_dir=STARTUP_DIR, http_port=free_port(),
                        kafka_server=kafka_broker.bootstrap, kafka_topic=DOCUMENT_TOPIC,
                        workdir=tmp_path_factory.mktemp("re-manager"))
    with manager:
        with QueueServerPlanSink(zmq_control_addr=manager.zmq_control_addr) as sink:
            sink.ensure_environment(timeout=60)
        yield manager


@pytest.fixture
def operator(re_manager) -> Iterator[REManagerAPI]:
    """A plain bluesky-queueserver-api client, as an operator would hold; the queue starts empty."""
    api = REManagerAPI(zmq_control_addr=re_manager.zmq_control_addr, status_polling_period=0.05)
    api.user_group = "admin"
    api.wait_for_idle(timeout=30)
    api.queue_clear()
    yield api
    close_api(api)


@pytest.fixture
def sink(re_manager) -> Iterator[QueueServerPlanSink]:
    with QueueServerPlanSink(zmq_control_addr=re_manager.zmq_control_addr) as sink:
        yield sink

"""QueueServerPlanSink against a real RE Manager (bluesky-queueserver) and Redis on loopback."""

import gc
import time
import uuid

import msgpack
import msgpack_numpy
import pytest
import zmq
from confluent_kafka import OFFSET_BEGINNING, Consumer, TopicPartition

from streams.errors import StreamError
from streams.qserver_launch import RedisServer, REManager, free_port
from streams.queueserver import (
    AGENT_META_KEY,
    REQUEST_META_KEY,
    QueueItemRejectedError,
    QueueServerPlanSink,
    QueueServerUnreachableError,
)
from streams.requests import PlanRequest
from tests.streams import qserver_fixtures
from tests.streams.qserver_fixtures import DOCUMENT_TOPIC

# the module-scoped servers, and per-test clients of them
redis_server = qserver_fixtures.redis_server
kafka_broker = qserver_fixtures.kafka_broker
re_manager = qserver_fixtures.re_manager
operator = qserver_fixtures.operator
sink = qserver_fixtures.sink

pytestmark = pytest.mark.integration


def _measure(key, *qs, agent="qsampling"):
    points = [{"q": q, "exposure": 1.0} for q in qs]
    return PlanRequest("measure", kwargs={"points": points, "point_keys": [f"{key}:{i}" for i in range(len(qs))]},
                       key=key, agent=agent)


def _keys_in_queue(api):
    return [item["meta"].get(REQUEST_META_KEY) for item in api.queue_get()["items"]]


def test_a_request_lands_in_the_real_queue_with_its_key_and_agent(sink, operator):
    uid = sink.submit(_measure("req-1", 0.01, 0.02))
    items = operator.queue_get()["items"]
    assert [item["item_uid"] for item in items] == [uid]
    item = items[0]
    assert item["name"] == "measure" and item["user_group"] == "primary"
    assert item["meta"] == {REQUEST_META_KEY: "req-1", AGENT_META_KEY: "qsampling"}
    assert item["kwargs"]["points"] == [{"q": 0.01, "exposure": 1.0}, {"q": 0.02, "exposure": 1.0}]
    found = sink.find("req-1")
    assert found is not None and found["where"] == "queue" and found["item_uid"] == uid
    assert sink.find("never-sent") is None


def test_the_same_request_is_queued_once_even_from_a_new_sink(sink, operator, re_manager):
    request = _measure("req-twice", 0.05)
    first = sink.submit(request)
    assert sink.submit(request) == first
    # a new sink knows nothing locally, as after a restart: the server's queue decides
    with QueueServerPlanSink(zmq_control_addr=re_manager.zmq_control_addr) as restarted:
        assert restarted.submit(request) == first
    assert _keys_in_queue(operator) == ["req-twice"]


def test_a_started_queue_runs_the_plan_and_history_says_completed(sink, operator, re_manager):
    uids = [sink.submit(_measure("run-a", 0.01, 0.1)), sink.submit(_measure("run-b", 0.2))]
    assert sink.outstanding("qsampling") == 2
    assert sink.start_queue() is True
    sink.wait_for_idle(timeout=30)
    assert sink.outstanding("qsampling") == 0
    history = {item["item_uid"]: item for item in operator.history_get()["items"]}
    for key, uid in zip(["run-a", "run-b"], uids, strict=True):
        found = sink.find(key)
        assert found is not None
        assert (found["where"], found["item_uid"], found["exit_status"]) == ("history", uid, "completed")
        assert len(history[uid]["result"]["run_uids"]) == 1  # the RunEngine opened one run
    # a request that already ran is not queued again, by this sink or a restarted one
    with QueueServerPlanSink(zmq_control_addr=re_manager.zmq_control_addr) as restarted:
        assert restarted.submit(_measure("run-a", 0.01, 0.1)) == uids[0]
    assert _keys_in_queue(operator) == []
    assert sink.start_queue() is False  # nothing queued


def test_an_item_that_ran_and_is_queued_again_is_taken_back_and_never_queued_again(sink, operator):
    """What a restarted RE Manager does with the item it was running (back in the queue, its cut
    run in the history), done here by hand: the sink removes that agent's item, leaves another
    agent's and a new one alone, and does not queue the request again."""
    first = _measure("ran-once", 0.03)
    sink.submit(first)
    assert sink.start_queue() is True
    sink.wait_for_idle(timeout=30)
    again = {"item_type": "plan", "name": "measure", "args": [], "kwargs": first.to_dict()["kwargs"],
             "meta": {REQUEST_META_KEY: "ran-once", AGENT_META_KEY: "qsampling"}}
    operator.item_add(again)
    operator.item_add({**again, "meta": {REQUEST_META_KEY: "ran-once", AGENT_META_KEY: "other"}})
    sink.submit(_measure("not-run-yet", 0.04))
    assert sink.take_back_reruns("qsampling") == [("ran-once", operator.history_get()["items"][-1])]
    assert _keys_in_queue(operator) == ["ran-once", "not-run-yet"]  # the other agent's item stays
    assert [i["meta"][AGENT_META_KEY] for i in operator.queue_get()["items"]] == ["other", "qsampling"]
    assert sink.take_back_reruns("qsampling") == []
    sink.submit(first)  # found in the history: not queued again
    assert _keys_in_queue(operator) == ["ran-once", "not-run-yet"]
    operator.queue_clear()


def _documents_of_run(bootstrap, run_uid, timeout_s=10.0):
    """The run's documents from the manager's Kafka topic, in order, through its stop document.

    Read with confluent-kafka, the client bluesky-kafka's Publisher itself uses.
    """
    consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": f"test-{uuid.uuid4().hex}",
                         "enable.auto.commit": False})
    # assigned, not subscribed: no consumer-group round trips, read every partition from offset 0
    partitions = consumer.list_topics(DOCUMENT_TOPIC, timeout=timeout_s).topics[DOCUMENT_TOPIC].partitions
    consumer.assign([TopicPartition(DOCUMENT_TOPIC, p, OFFSET_BEGINNING) for p in partitions])
    docs: list = []
    deadline = time.monotonic() + timeout_s
    try:
        # one RunEngine runs one item at a time, so a run's documents follow its start unmixed
        while time.monotonic() < deadline and not (docs and docs[-1][0] == "stop"):
            message = consumer.poll(0.2)
            if message is None:
                continue
            assert message.error() is None, message.error()
            name, doc = msgpack.unpackb(message.value(), object_hook=msgpack_numpy.decode)
            if name == "start" and doc["uid"] == run_uid or docs:
                docs.append((name, doc))
    finally:
        consumer.close()
    return docs


def test_the_remote_run_streams_its_documents_with_the_request_and_point_keys(sink, kafka_broker):
    sink.submit(_measure("streamed", 0.01, 0.04))
    sink.start_queue()
    sink.wait_for_idle(timeout=30)
    found = sink.find("streamed")
    assert found is not None and found["exit_status"] == "completed"
    (run_uid,) = found["item"]["result"]["run_uids"]
    docs = _documents_of_run(kafka_broker.bootstrap, run_uid)
    assert [name for name, _ in docs] == ["start", "descriptor", "event", "event", "stop"]
    start = docs[0][1]
    assert start[REQUEST_META_KEY] == "streamed" and start[AGENT_META_KEY] == "qsampling"
    events = [doc for name, doc in docs if name == "event"]
    assert [e["data"]["beampilot_point_key"] for e in events] == ["streamed:0", "streamed:1"]
    assert [e["data"]["sas_q"] for e in events] == [0.01, 0.04]
    assert all(e["data"]["sas_counts"] >= 0 for e in events)  # real Poisson counts
    assert docs[-1][1]["exit_status"] == "success"


def test_outstanding_counts_queued_items_of_that_agent_only(sink):
    sink.submit(_measure("o-1", 0.01, agent="a1"))
    sink.submit(_measure("o-2", 0.02, agent="a1"))
    sink.submit(_measure("o-3", 0.03, agent="a2"))
    assert (sink.outstanding("a1"), sink.outstanding("a2"), sink.outstanding("nobody")) == (2, 1, 0)


def _counting(sink):
    """The requests ``sink`` sends its manager, by method, from now on."""
    sent, send = [], sink._api.send_request

    def counted(*args, **kwargs):
        sent.append(kwargs.get("method", args[0] if args else None))
        return send(*args, **kwargs)

    sink._api.send_request = counted
    return sent


def test_reads_in_one_look_ask_the_manager_once_and_see_what_changed_since(sink, operator):
    """The daemon reads the queue several times a round for each agent; inside ``one_look`` the
    reads share one status request, and the queue and history are fetched only when the status
    says they changed. Nothing read is older than the look: another client's item shows in the
    next look, and the sink's own change ends the look."""
    sink.submit(_measure("look-1", 0.01))
    sent = _counting(sink)
    with sink.one_look():
        assert sink.find("look-1")["where"] == "queue"
        assert sink.outstanding("qsampling") == 1 and sink.take_back_reruns("qsampling") == []
        assert sink.find("never-sent") is None
    # the queue was fetched after the submit; the history not since before this test's item
    assert sent.count("status") == 1 and sent.count("queue_get") == 1 and set(sent) <= {"status", "queue_get", "history_get"}
    operator.item_add({"item_type": "plan", "name": "measure", "args": [], "meta": {REQUEST_META_KEY: "by-hand",
                       AGENT_META_KEY: "qsampling"}, "kwargs": _measure("by-hand", 0.02).to_dict()["kwargs"]})
    sent.clear()
    with sink.one_look():
        assert sink.outstanding("qsampling") == 2  # the operator's item, seen in the next look
        assert sink.find("by-hand")["where"] == "queue"
        sink.submit(_measure("look-2", 0.03))  # the sink's own change: the next read looks again
        assert sink.outstanding("qsampling") == 3
    assert sent.count("status") == 2 and sent.count("queue_get") == 2 and sent.count("queue_item_add") == 1
    sent.clear()
    with sink.one_look():  # nothing changed: one status request, nothing else
        assert sink.outstanding("qsampling") == 3 and sink.find("look-2")["where"] == "queue"
    assert sent == ["status"]
    assert sink.outstanding("qsampling") == 3 and sent == ["status", "status"]  # outside: a look a read
    operator.queue_clear()


def test_a_plan_the_profile_does_not_allow_is_refused_clearly(sink, operator):
    with pytest.raises(QueueItemRejectedError, match=r"'scan' is not in the list of allowed plans") as err:
        sink.submit(PlanRequest("scan", args=(["sas"], "sas_q", 0.0, 1.0, 5), key="bad-plan"))
    assert "['count', 'measure']" in str(err.value) and err.value.key == "bad-plan"
    # an allowed plan with arguments that do not fit its signature is refused, saying where
    bad = PlanRequest("measure", kwargs={"points": [{"q": "far"}], "point_keys": ["k"]}, key="bad-arg")
    with pytest.raises(QueueItemRejectedError, match=r"points\.0\.q; Input should be a valid number"):
        sink.submit(bad)
    assert _keys_in_queue(operator) == []


def test_the_http_api_with_an_api_key_queues_the_same_way(re_manager, operator):
    with QueueServerPlanSink(http_server_uri=re_manager.http_server_uri, api_key=re_manager.api_key) as http:
        uid = http.submit(_measure("via-http", 0.03))
        assert http.submit(_measure("via-http", 0.03)) == uid
        assert http.outstanding("qsampling") == 1
    assert _keys_in_queue(operator) == ["via-http"]
    with (QueueServerPlanSink(http_server_uri=re_manager.http_server_uri, api_key="wrongkey") as bad,
          pytest.raises(StreamError, match="Invalid API key")):
        bad.check_reachable()


def test_an_unreachable_address_fails_fast_and_names_it():
    address = f"tcp://127.0.0.1:{free_port()}"
    with QueueServerPlanSink(zmq_control_addr=address, timeout=0.5) as nowhere:
        t0 = time.monotonic()
        with pytest.raises(QueueServerUnreachableError, match=address):
            nowhere.check_reachable()
        assert time.monotonic() - t0 < 3
        with pytest.raises(QueueServerUnreachableError):
            nowhere.submit(_measure("lost", 0.01))


@pytest.mark.parametrize("address", [{"zmq_control_addr": "localhost:60615"},
                                     {"zmq_control_addr": "tcp://127.0.0.1:port"},
                                     {"http_server_uri": "127.0.0.1:60610"}])
def test_a_malformed_address_is_refused_before_anything_is_sent(address):
    (name, value), = address.items()
    with pytest.raises(ValueError, match=f"{name}={value!r} is not"):
        QueueServerPlanSink(**address)


def _open_zmq_contexts():
    # type(), not isinstance(): isinstance reads __class__, which some objects (torch's) warn on
    return {id(obj) for obj in gc.get_objects() if issubclass(type(obj), zmq.Context) and not obj.closed}


def test_closing_a_sink_leaves_no_zmq_context_open(re_manager):
    # the API leaves three contexts open on close(); close_api ends them, or they warn when
    # collected later, in whatever test runs then
    before = _open_zmq_contexts()
    with QueueServerPlanSink(zmq_control_addr=re_manager.zmq_control_addr) as fresh:
        fresh.check_reachable()
        assert len(_open_zmq_contexts() - before) == 3
    assert _open_zmq_contexts() - before == set()


def test_a_manager_without_redis_fails_at_once_naming_the_port(tmp_path):
    port = free_port()
    manager = REManager(port, startup_dir=qserver_fixtures.STARTUP_DIR, workdir=tmp_path)
    t0 = time.monotonic()
    with pytest.raises(StreamError, match=f"no Redis answers on 127.0.0.1:{port}"), manager:
        pass
    assert time.monotonic() - t0 < 2 and not manager.running


def test_missing_redis_binary_says_how_to_install_it(monkeypatch, tmp_path):
    monkeypatch.setattr("streams.qserver_launch.shutil.which", lambda name: None)
    with pytest.raises(StreamError, match="apt-get install -y redis-server"):
        RedisServer(workdir=tmp_path).start()


def test_a_startup_profile_that_raises_fails_to_open_clearly(tmp_path):
    startup = tmp_path / "startup"
    startup.mkdir()
    (startup / "00-broken.py").write_text("raise RuntimeError('broken beamline profile')\n")
    permissions = qserver_fixtures.STARTUP_DIR.parent / "user_group_permissions.yaml"
    with (RedisServer(workdir=tmp_path / "redis") as redis,
          REManager(redis.port, startup_dir=startup, user_group_permissions=permissions,
                    workdir=tmp_path / "manager") as manager,
          QueueServerPlanSink(zmq_control_addr=manager.zmq_control_addr) as broken):
        with pytest.raises(StreamError, match="failed to open the RE environment"):
            broken.ensure_environment(timeout=30)
        assert "broken beamline profile" in manager.log_path.read_text()

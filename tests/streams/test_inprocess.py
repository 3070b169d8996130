"""RunEngineSource: order, back-pressure and end of iteration, with a real RunEngine."""

from __future__ import annotations

import threading

import bluesky.plans as bp
import pytest
from bluesky import RunEngine
from ophyd.sim import det, motor

from streams import DocumentSource
from streams.errors import BackpressureError, StreamError
from streams.inprocess import RunEngineSource


@pytest.fixture
def RE() -> RunEngine:
    return RunEngine({}, context_managers=[])


def _record(RE: RunEngine) -> list[tuple[str, dict]]:
    seen: list[tuple[str, dict]] = []
    RE.subscribe(lambda name, doc: seen.append((name, doc)))
    return seen


def test_is_a_document_source() -> None:
    assert isinstance(RunEngineSource(4), DocumentSource)


def test_drain_returns_every_document_in_order(RE: RunEngine) -> None:
    source = RunEngineSource(maxsize=64)
    source.subscribe(RE)
    seen = _record(RE)
    RE(bp.scan([det], motor, -1, 1, 3))
    assert len(source) == source.qsize() == 6
    drained = source.drain()
    assert [name for name, _ in drained] == ["start", "descriptor", "event", "event", "event", "stop"]
    # The same objects the RunEngine emitted, in the same order (queued by reference).
    assert all(a is b for (_, a), (_, b) in zip(drained, seen, strict=True))
    assert [doc["seq_num"] for name, doc in drained if name == "event"] == [1, 2, 3]
    assert source.drain() == []


def test_full_queue_raises_backpressure_error(RE: RunEngine) -> None:
    source = RunEngineSource(maxsize=2, put_timeout=0.01)
    source.subscribe(RE)
    with pytest.raises(BackpressureError) as info:
        RE(bp.count([det], num=3))
    assert (info.value.maxsize, info.value.timeout) == (2, 0.01)
    # The documents that fitted are kept, oldest first; none was dropped silently.
    assert [name for name, _ in source.drain()] == ["start", "descriptor"]


def test_consumer_thread_relieves_backpressure(RE: RunEngine) -> None:
    source = RunEngineSource(maxsize=1, put_timeout=5.0)
    source.subscribe(RE)
    seen = _record(RE)
    received: list[tuple[str, dict]] = []
    consumer = threading.Thread(target=lambda: received.extend(source))
    consumer.start()
    RE(bp.count([det], num=5))
    source.close()
    consumer.join(timeout=2)
    assert not consumer.is_alive()
    assert received == seen
    assert len(received) == 8


def test_iteration_ends_after_close_once_drained() -> None:
    source = RunEngineSource(maxsize=4)
    source("start", {"uid": "a"})
    source("stop", {"uid": "b"})
    source.close()
    assert source.closed
    assert list(source) == [("start", {"uid": "a"}), ("stop", {"uid": "b"})]
    assert list(source) == []


def test_blocked_iterator_wakes_on_close() -> None:
    source = RunEngineSource(maxsize=4)
    done = threading.Event()

    def consume() -> None:
        assert list(source) == []
        done.set()

    thread = threading.Thread(target=consume)
    thread.start()
    assert not done.wait(0.1)  # blocks while the source is open and empty
    source.close()
    thread.join(timeout=2)
    assert done.is_set()


def test_closed_source_refuses_documents_and_unsubscribes(RE: RunEngine) -> None:
    source = RunEngineSource(maxsize=8)
    source.subscribe(RE)
    source.close()
    source.close()  # idempotent
    RE(bp.count([det], num=1))  # no longer subscribed: nothing is queued, nothing raises
    assert source.drain() == []
    with pytest.raises(StreamError, match="closed"):
        source("start", {"uid": "x"})


def test_unsubscribe_stops_delivery(RE: RunEngine) -> None:
    source = RunEngineSource(maxsize=64)
    token = source.subscribe(RE)
    assert isinstance(token, int)
    with pytest.raises(RuntimeError, match="already subscribed"):
        source.subscribe(RE)
    RE(bp.count([det], num=1))
    source.unsubscribe()
    RE(bp.count([det], num=1))
    assert [name for name, _ in source.drain()] == ["start", "descriptor", "event", "stop"]


@pytest.mark.parametrize("maxsize", [0, -3, 2.5, True, None])
def test_maxsize_must_be_a_positive_int(maxsize: object) -> None:
    with pytest.raises(ValueError, match=f"maxsize={maxsize!r}"):
        RunEngineSource(maxsize)  # type: ignore[arg-type]


@pytest.mark.parametrize("put_timeout", [-1.0, float("inf"), float("nan")])
def test_put_timeout_must_be_finite_and_non_negative(put_timeout: float) -> None:
    with pytest.raises(ValueError, match="put_timeout="):
        RunEngineSource(4, put_timeout=put_timeout)

"""replay / replay_runs / open_store: pacing on a fake clock, and zarr stores replayed."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import bluesky.plans as bp
import event_model
import numpy as np
import pytest
from bluesky import RunEngine
from ophyd.sim import det, motor

from streams.derived import validate_document
from streams.errors import StoreError, StreamError
from streams.replay import RunStore, open_store, replay, replay_runs
from streams.zarr_reader import ZarrRunReader
from streams.zarr_writer import ZarrRunWriter

Docs = list[tuple[str, dict[str, Any]]]


class FakeClock:
    """A monotonic clock that only ``sleep`` (and the test) moves."""

    def __init__(self) -> None:
        self.now = 1000.0
        self.sleeps: list[float] = []

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        assert seconds > 0
        self.sleeps.append(seconds)
        self.now += seconds


class Recorder:
    """A sink that notes each document and the fake time it arrived."""

    def __init__(self, clock: FakeClock) -> None:
        self.clock = clock
        self.got: Docs = []
        self.at: list[float] = []

    def __call__(self, name: str, doc: dict[str, Any]) -> None:
        self.got.append((name, doc))
        self.at.append(self.clock.now)


def _run(t0: float, offsets: list[float]) -> Docs:
    """start at ``t0``, a descriptor and events at ``t0 + offsets``, stop 1 s after the last."""
    run = event_model.compose_run(time=t0)
    desc = run.compose_descriptor(
        name="primary", data_keys={"x": {"dtype": "number", "shape": [], "source": "s"}},
        time=t0 + 0.5,
    )
    docs: Docs = [("start", run.start_doc), ("descriptor", desc.descriptor_doc)]
    for i, dt in enumerate(offsets):
        docs.append(("event", desc.compose_event(
            data={"x": float(i)}, timestamps={"x": t0 + dt}, time=t0 + dt,
        )))
    docs.append(("stop", run.compose_stop(time=t0 + offsets[-1] + 1.0)))
    return docs


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.mark.parametrize(("speed", "total_sleep"), [(1.0, 5.0), (10.0, 0.5), (None, 0.0)])
def test_speed_scales_the_recorded_timing(
    clock: FakeClock, speed: float | None, total_sleep: float
) -> None:
    docs = _run(100.0, [1.0, 2.0, 4.0])  # recorded span: 0 .. 5 s
    sink = Recorder(clock)
    stats = replay(docs, sink, speed=speed, clock=clock, sleep=clock.sleep)
    assert sink.got == docs
    assert math.isclose(sum(clock.sleeps), total_sleep)
    assert math.isclose(stats.slept, total_sleep)
    assert math.isclose(stats.wall_time, total_sleep)
    if speed is not None:
        recorded = [doc["time"] - 100.0 for _, doc in docs]
        np.testing.assert_allclose(np.subtract(sink.at, 1000.0), np.divide(recorded, speed))
    else:
        assert clock.sleeps == []
    assert stats.counts == {"start": 1, "descriptor": 1, "event": 3, "stop": 1}
    assert stats.n_documents == 6
    assert stats.max_lateness == 0.0


def test_time_between_runs_is_not_replayed(clock: FakeClock) -> None:
    docs = _run(100.0, [1.0, 2.0]) + _run(5000.0, [1.0, 2.0])  # 80 minutes apart
    stats = replay(docs, Recorder(clock), speed=1.0, clock=clock, sleep=clock.sleep)
    assert math.isclose(stats.slept, 2 * 3.0)
    assert stats.counts["start"] == 2


def test_a_slow_sink_makes_documents_late_not_lost(clock: FakeClock) -> None:
    docs = _run(100.0, [1.0, 2.0, 4.0])

    def slow(name: str, doc: dict[str, Any]) -> None:
        if name == "descriptor":
            clock.now += 2.5  # the sink itself takes 2.5 s

    stats = replay(docs, slow, speed=1.0, clock=clock, sleep=clock.sleep)
    # the descriptor is due at 0.5 s and done at 3 s: events due at 1 s and 2 s are 2 s
    # and 1 s late; the event due at 4 s and the stop at 5 s are on time again.
    assert math.isclose(stats.max_lateness, 2.0)
    assert math.isclose(stats.slept, 0.5 + 1.0 + 1.0)
    assert stats.n_documents == 6


def test_untimed_documents_go_at_once_and_event_pages_by_first_time(clock: FakeClock) -> None:
    docs = _run(100.0, [1.0, 3.0])
    events = [doc for name, doc in docs if name == "event"]
    resource = {"uid": "r", "spec": "NPY", "root": "/", "resource_path": "x",
                "resource_kwargs": {}, "path_semantics": "posix", "run_start": docs[0][1]["uid"]}
    paged: Docs = [docs[0], ("resource", resource), docs[1],
                   ("event_page", dict(event_model.pack_event_page(*events))), docs[-1]]
    sink = Recorder(clock)
    stats = replay(paged, sink, speed=2.0, clock=clock, sleep=clock.sleep)
    np.testing.assert_allclose(np.subtract(sink.at, 1000.0), [0.0, 0.0, 0.25, 0.5, 2.0])
    assert stats.counts == {"start": 1, "resource": 1, "descriptor": 1, "event_page": 1,
                            "stop": 1}


@pytest.mark.parametrize("speed", [0, -1.0, math.nan, math.inf])
def test_speed_must_be_positive_and_finite(speed: float) -> None:
    with pytest.raises(ValueError, match="speed="):
        replay([], print, speed=speed)


def test_real_clock_waits_for_the_recorded_time() -> None:
    docs = _run(100.0, [0.1, 0.2])  # 1.2 s recorded
    stats = replay(docs, lambda name, doc: None, speed=12.0)
    assert stats.wall_time >= 0.1 - 1e-3
    assert stats.slept > 0


def test_progress_bar_counts_documents(
    clock: FakeClock, capsys: pytest.CaptureFixture[str]
) -> None:
    replay(_run(100.0, [1.0]), Recorder(clock), speed=None, progress=True)
    assert "4/4" in capsys.readouterr().err
    replay(_run(100.0, [1.0]), Recorder(clock), speed=None, progress=False)
    assert capsys.readouterr().err == ""


def test_sink_errors_propagate(clock: FakeClock) -> None:
    def broken(name: str, doc: dict[str, Any]) -> None:
        raise RuntimeError(f"cannot take {name}")

    with pytest.raises(RuntimeError, match="cannot take start"):
        replay(_run(100.0, [1.0]), broken, speed=None)


# -- stores ---------------------------------------------------------------------------------


@pytest.fixture
def zarr_store(tmp_path: Path) -> tuple[Path, dict[str, Docs]]:
    """A beampilot zarr store with a count and a scan from a real RunEngine."""
    path = tmp_path / "store.zarr"
    writer = ZarrRunWriter(path)
    RE = RunEngine({}, context_managers=[])
    recorded: dict[str, Docs] = {}
    plans = (("count", bp.count([det], num=5)), ("scan", bp.scan([det], motor, -1, 1, 5)))
    for name, plan in plans:
        docs: Docs = []
        tokens = [RE.subscribe(lambda n, d, out=docs: out.append((n, d))), RE.subscribe(writer)]
        RE(plan)
        for token in tokens:
            RE.unsubscribe(token)
        recorded[name] = docs
    writer.close()
    return path, recorded


def test_zarr_runs_replay_as_recorded(
    zarr_store: tuple[Path, dict[str, Docs]], clock: FakeClock
) -> None:
    path, recorded = zarr_store
    store = open_store(str(path))
    assert isinstance(store, ZarrRunReader) and isinstance(store, RunStore)
    uids = [recorded[p][0][1]["uid"] for p in ("count", "scan")]
    assert store.runs() == uids
    sink = Recorder(clock)
    stats = replay_runs(store, uids, sink, speed=1.0, progress=False,
                        clock=clock, sleep=clock.sleep)
    want = recorded["count"] + recorded["scan"]
    assert [name for name, _ in sink.got] == [name for name, _ in want]
    for (name, g), (_, w) in zip(sink.got, want, strict=True):
        validate_document(name, g)
        assert g["uid"] == w["uid"] and g["time"] == w["time"]
        if name == "event":
            assert g["data"] == w["data"] and g["seq_num"] == w["seq_num"]
    spans = [docs[-1][1]["time"] - docs[0][1]["time"] for docs in recorded.values()]
    assert math.isclose(stats.slept, sum(spans))
    assert stats.counts == {"start": 2, "descriptor": 2, "event": 10, "stop": 2}


def test_replay_runs_takes_a_list_of_uids(zarr_store: tuple[Path, dict[str, Docs]]) -> None:
    store = open_store(str(zarr_store[0]))
    with pytest.raises(TypeError, match="sequence of uids"):
        replay_runs(store, store.runs()[0], print, speed=None)
    with pytest.raises(KeyError, match="no run 'missing'"):
        replay_runs(store, ["missing"], print, speed=None, progress=False)


def test_open_store_rejects_what_is_not_a_store(tmp_path: Path) -> None:
    with pytest.raises(StreamError, match="neither an http"):
        open_store(str(tmp_path / "absent"))
    with pytest.raises(StoreError, match="beampilot run store"):
        open_store(str(tmp_path))


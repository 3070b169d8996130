"""TiledServer, TiledDocumentSink and TiledRunSource against a real ``tiled serve catalog``."""

from __future__ import annotations

import json
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import bluesky.plans as bp
import event_model
import numpy as np
import pytest
from bluesky import RunEngine
from ophyd.sim import SynSignal, det, motor

from streams.derived import validate_document
from streams.errors import DocumentError, StreamError
from streams.replay import open_store, replay_runs
from streams.tiled_io import TiledDocumentSink, TiledRunSource, check_reachable
from streams.tiled_launch import TiledServer
from tests.ophyd_async_run import blob_scan, fly_scan

pytestmark = pytest.mark.integration

Docs = list[tuple[str, dict[str, Any]]]


@pytest.fixture(scope="module")
def detector_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Where detectors write their files; the server may read it."""
    return tmp_path_factory.mktemp("detector")


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, detector_dir: Path) -> Iterator[TiledServer]:
    with TiledServer(workdir=tmp_path_factory.mktemp("tiled"), readable=[detector_dir]) as tiled:
        yield tiled


@pytest.fixture(scope="module")
def recorded(server: TiledServer) -> dict[str, Docs]:
    """Two RunEngine runs written through TiledDocumentSink: every document, by plan name."""
    frames = iter(np.arange(60, dtype=np.float64).reshape(10, 2, 3))
    img = SynSignal(func=lambda: next(frames), name="img")
    RE = RunEngine({}, context_managers=[])
    out: dict[str, Docs] = {}
    with TiledDocumentSink(server.uri, api_key=server.api_key) as sink:
        for name, plan in (
            ("count", bp.count([det], num=5)),
            ("scan", bp.scan([det, img], motor, -1, 1, 5)),
        ):
            docs: Docs = []
            tokens = [RE.subscribe(lambda n, d, out=docs: out.append((n, d))), RE.subscribe(sink)]
            RE(plan)
            for token in tokens:
                RE.unsubscribe(token)
            out[name] = docs
    return out


@pytest.fixture
def source(server: TiledServer) -> Iterator[TiledRunSource]:
    with TiledRunSource(server.uri, api_key=server.api_key) as src:
        yield src


def _json(doc: dict[str, Any]) -> Any:
    """A document as it looks after a trip through JSON (tuples become lists, ...)."""
    return json.loads(json.dumps(event_model.sanitize_doc(doc)))


def _assert_same_run(got: Docs, want: Docs) -> None:
    """Same documents in the same order, with what Bluesky's tiled layout keeps."""
    assert [name for name, _ in got] == [name for name, _ in want]
    for (name, g), (_, w) in zip(got, want, strict=True):
        validate_document(name, g)
        if name in ("start", "stop"):
            assert g == _json(w)
        elif name == "descriptor":
            for field in ("uid", "time", "name", "run_start", "hints", "object_keys"):
                assert g[field] == _json(w)[field], field
            for key, data_key in _json(w)["data_keys"].items():
                assert data_key.items() <= g["data_keys"][key].items(), key
        else:
            # Event uids are not kept by the layout; the reader names events by seq_num.
            assert g["uid"] == f"event-{w['descriptor']}-{w['seq_num']}"
            for field in ("time", "seq_num", "descriptor", "timestamps"):
                assert g[field] == w[field], field
            assert g["data"].keys() == w["data"].keys()
            for key, value in w["data"].items():
                np.testing.assert_array_equal(g["data"][key], value)
                assert np.shape(g["data"][key]) == np.shape(value)


def test_server_answers_and_check_reachable_describes_it(server: TiledServer) -> None:
    assert server.running
    assert server.startup_seconds is not None and server.startup_seconds < 60
    assert check_reachable(server.uri, api_key=server.api_key)["library_version"]


@pytest.mark.parametrize("plan", ["count", "scan"])
def test_runengine_runs_round_trip(
    recorded: dict[str, Docs], source: TiledRunSource, plan: str
) -> None:
    want = recorded[plan]
    uid = want[0][1]["uid"]
    _assert_same_run(list(source.documents(uid)), want)


def test_scan_data_come_back_as_recorded(
    recorded: dict[str, Docs], source: TiledRunSource
) -> None:
    got = list(source.documents(recorded["scan"][0][1]["uid"]))
    events = [doc for name, doc in got if name == "event"]
    np.testing.assert_allclose([e["data"]["motor"] for e in events], np.linspace(-1, 1, 5))
    images = np.stack([e["data"]["img"] for e in events])
    assert images.shape == (5, 2, 3)
    # consecutive frames of the SynSignal (which reads one frame itself before the scan)
    np.testing.assert_array_equal(np.diff(images, axis=0), np.full((4, 2, 3), 6.0))
    assert all(type(e["data"]["det"]) is float for e in events)
    times = [doc["time"] for _, doc in got]
    assert times == sorted(times)


def test_runs_lists_in_start_time_order_and_filters(
    recorded: dict[str, Docs], source: TiledRunSource
) -> None:
    count, scan = (recorded[p][0][1] for p in ("count", "scan"))
    assert [u for u in source.runs() if u in (count["uid"], scan["uid"])] == [
        count["uid"], scan["uid"]
    ]
    assert source.runs(scan_id=scan["scan_id"]) == [scan["uid"]]
    assert source.runs(uid=count["uid"]) == [count["uid"]]
    assert source.runs(plan_name="scan", scan_id=count["scan_id"]) == []


def test_event_page_is_written_as_events(server: TiledServer, source: TiledRunSource) -> None:
    run = event_model.compose_run()
    desc = run.compose_descriptor(
        name="primary", data_keys={"x": {"dtype": "number", "shape": [], "source": "s"}}
    )
    events = [
        desc.compose_event(data={"x": float(i)}, timestamps={"x": 1.0 + i}) for i in range(3)
    ]
    stop = run.compose_stop()
    with TiledDocumentSink(server.uri, api_key=server.api_key) as sink:
        for name, doc in [("start", run.start_doc), ("descriptor", desc.descriptor_doc),
                          ("event_page", event_model.pack_event_page(*events)), ("stop", stop)]:
            sink(name, doc)
    want: Docs = [("start", run.start_doc), ("descriptor", desc.descriptor_doc),
                  *(("event", e) for e in events), ("stop", stop)]
    _assert_same_run(list(source.documents(run.start_doc["uid"])), want)


def test_replay_from_a_tiled_url(recorded: dict[str, Docs], server: TiledServer) -> None:
    store = open_store(server.uri, api_key=server.api_key)
    assert isinstance(store, TiledRunSource)
    got: Docs = []
    with store:
        stats = replay_runs(store, [recorded["count"][0][1]["uid"]],
                            lambda n, d: got.append((n, d)), speed=None, progress=False)
    assert stats.counts == {"start": 1, "descriptor": 1, "event": 5, "stop": 1}
    _assert_same_run(got, recorded["count"])


def _through_tiled(server: TiledServer, scan: Any, directory: Path, n: int, filename: str
                   ) -> tuple[Docs, Docs, np.ndarray]:
    """Run ``scan`` (an ophyd-async run of ``tests.ophyd_async_run``) of ``n`` frames into tiled and
    read it back: the documents sent, those read back (each validated) and the file's frames."""
    import h5py

    with TiledDocumentSink(server.uri, api_key=server.api_key) as sink:
        uid, sent = scan(directory, n, [sink])
    with TiledRunSource(server.uri, api_key=server.api_key) as src:
        docs = list(src.documents(uid))
    for name, doc in docs:
        validate_document(name, doc)
    with h5py.File(directory / filename, "r") as f:
        return sent, docs, np.asarray(f["/entry/data/data"])


def test_an_ophyd_async_detectors_frames_come_back_filled_from_its_file(
    server: TiledServer, detector_dir: Path
) -> None:
    """ophyd-async's simulated detector writes HDF5 and stream documents; tiled registers the
    file; the run read back holds every frame in its events, as the file has them."""
    sent, docs, written = _through_tiled(server, blob_scan, detector_dir, 3, "blobs.h5")
    assert [n for n, _ in docs] == ["start", "descriptor", "event", "event", "event", "stop"]
    keys = docs[1][1]["data_keys"]
    assert "external" not in keys["det"] and "external" not in keys["det-sum"]
    events = [d for n, d in docs if n == "event"]
    assert len({int(w.sum()) for w in written}) == 3  # the stage moved the blob: three different frames
    for event, frame in zip(events, written, strict=True):
        np.testing.assert_array_equal(event["data"]["det"], frame[None])
        assert event["data"]["stage-x"] == next(
            d["data"]["stage-x"] for n, d in sent if n == "event" and d["seq_num"] == event["seq_num"])


def test_a_fly_scans_frames_come_back_as_events(server: TiledServer, detector_dir: Path) -> None:
    """A fly scan sends no events, only stream datums: tiled keeps its frames as array nodes with
    no event table, and each frame comes back as an event (the descriptor's time, seq_num 1..n)
    rather than not at all."""
    _, docs, written = _through_tiled(server, fly_scan, detector_dir, 4, "fly.h5")
    assert [n for n, _ in docs] == ["start", "descriptor", "event", "event", "event", "event", "stop"]
    descriptor, events = docs[1][1], [d for n, d in docs if n == "event"]
    assert len(written) == 4 and written.any()  # the stage stands still: four frames of one blob
    assert [e["seq_num"] for e in events] == [1, 2, 3, 4]
    for event, frame in zip(events, written, strict=True):
        assert event["descriptor"] == descriptor["uid"] and event["time"] == descriptor["time"]
        np.testing.assert_array_equal(event["data"]["det"], frame[None])
        assert set(event["data"]) == set(event["timestamps"]) == {"det", "det-sum"}


def test_sink_rejects_invalid_and_late_documents(server: TiledServer) -> None:
    sink = TiledDocumentSink(server.uri, api_key=server.api_key)
    with pytest.raises(DocumentError, match="'time'"):
        sink("start", {"uid": "no-time"})
    sink.close()
    with pytest.raises(StreamError, match="closed"):
        sink("start", event_model.compose_run().start_doc)


def test_unknown_run_is_a_key_error_and_a_closed_source_says_so(
    source: TiledRunSource,
) -> None:
    with pytest.raises(KeyError, match="no run 'not-a-uid'"):
        list(source.documents("not-a-uid"))
    source.close()
    with pytest.raises(StreamError, match="closed"):
        source.runs()


def test_wrong_api_key_is_refused_clearly(server: TiledServer) -> None:
    with pytest.raises(StreamError, match="refused the API key"):
        TiledRunSource(server.uri, api_key="wrong")


def _unused_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def test_unreachable_server_fails_fast_and_names_the_uri() -> None:
    uri = f"http://127.0.0.1:{_unused_port()}"
    began = time.monotonic()
    for attempt in (
        lambda: check_reachable(uri),
        lambda: TiledRunSource(uri, api_key="k"),
        lambda: TiledDocumentSink(uri, api_key="k"),
        lambda: open_store(uri),
    ):
        with pytest.raises(StreamError, match=f"{uri}.*not reachable.*ConnectError"):
            attempt()
    assert time.monotonic() - began < 5
    with pytest.raises(ValueError, match="not a tiled server URL"):
        check_reachable("ftp://example.org")


def test_server_that_cannot_start_reports_its_log(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        server = TiledServer(taken.getsockname()[1], workdir=tmp_path, api_key="k")
        with pytest.raises(StreamError, match=r"exited with status \d+(.|\n)*address already"):
            server.start()
    assert not server.running


def test_derived_frames_in_files_are_registered_and_come_back_filled(server: TiledServer, detector_dir: Path) -> None:
    """A derived run whose frames went to files (DerivedRunWriter(files=...)): tiled registers the
    file named by its stream_resource and gives the frames back in the events, as written."""
    from streams.derived import DerivedRunWriter

    frames = [np.arange(12, dtype=np.float32).reshape(3, 4) * (i + 1) for i in range(3)]
    with TiledDocumentSink(server.uri, api_key=server.api_key) as sink:
        run = DerivedRunWriter([sink], raw_run_uid="raw-uid", files=detector_dir / "derived")
        run.add_stream("denoise", {"denoised": {"dtype": "array", "shape": [3, 4], "dtype_numpy": "<f4", "source": "t"},
                                   "raw_seq_num": {"dtype": "integer", "shape": [], "source": "t"}},
                       external=["denoised"])
        for i, frame in enumerate(frames):
            run.emit("denoise", {"denoised": frame, "raw_seq_num": i + 1})
        run.close()
    with TiledRunSource(server.uri, api_key=server.api_key) as src:
        docs = list(src.documents(run.start_uid))
    events = [d for n, d in docs if n == "event"]
    assert [e["data"]["raw_seq_num"] for e in events] == [1, 2, 3]
    for event, frame in zip(events, frames, strict=True):
        np.testing.assert_array_equal(event["data"]["denoised"], frame)


def test_frames_in_a_directory_tiled_may_not_read_are_refused_when_written(server: TiledServer,
                                                                          tmp_path: Path) -> None:
    """tiled registers a file outside its readable storage without a word and fails only when
    the frames are read; the sink reads the first row back, so the write itself says so."""
    from streams.derived import DerivedRunWriter

    with TiledDocumentSink(server.uri, api_key=server.api_key) as sink:
        run = DerivedRunWriter([sink], raw_run_uid="raw-uid", files=tmp_path / "not-served")
        run.add_stream("denoise", {"denoised": {"dtype": "array", "shape": [3, 4], "dtype_numpy": "<f4", "source": "t"}},
                       external=["denoised"])
        with pytest.raises(StreamError, match=r"registered file://localhost/.*not-served/.*denoise\.h5 \('denoise' "
                                              r"'denoised' of run .*\) but cannot read it back .*readable storage"):
            run.emit("denoise", {"denoised": np.ones((3, 4), np.float32)})

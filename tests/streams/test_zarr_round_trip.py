"""ZarrRunWriter / ZarrRunReader: round trips, crash safety, resume and bad stores."""

from __future__ import annotations

from pathlib import Path

import bluesky.plans as bp
import event_model
import numpy as np
import pytest
import zarr
from bluesky import RunEngine
from ophyd.sim import SynSignal, det, motor

from streams.errors import DocumentError, StoreError
from streams.zarr_layout import FORMAT_ATTR
from streams.zarr_reader import ZarrRunReader
from streams.zarr_writer import ZarrRunWriter

Docs = list[tuple[str, dict]]


@pytest.fixture
def RE() -> RunEngine:
    return RunEngine({}, context_managers=[])


@pytest.fixture
def store(tmp_path: Path) -> Path:
    return tmp_path / "store.zarr"


def _run(RE: RunEngine, plan, *sinks) -> Docs:
    """Run ``plan`` with ``sinks`` subscribed; return every document emitted."""
    docs: Docs = []
    tokens = [RE.subscribe(lambda name, doc: docs.append((name, doc)))]
    tokens += [RE.subscribe(sink) for sink in sinks]
    RE(plan)
    for token in tokens:
        RE.unsubscribe(token)
    return docs


def _image_signal() -> SynSignal:
    frames = iter(np.arange(60, dtype=np.float64).reshape(10, 2, 3))
    return SynSignal(func=lambda: next(frames), name="img")


def _assert_same_documents(got: Docs, want: Docs) -> None:
    assert [name for name, _ in got] == [name for name, _ in want]
    for (name, g), (_, w) in zip(got, want, strict=True):
        event_model.schema_validators[event_model.DocumentNames[name]].validate(g)
        if name != "event":
            assert g == event_model.sanitize_doc(w)
            continue
        for field in ("uid", "seq_num", "time", "descriptor", "timestamps", "filled"):
            assert g[field] == w[field], field
        assert g["data"].keys() == w["data"].keys()
        for key, value in w["data"].items():
            np.testing.assert_array_equal(g["data"][key], value)
            assert np.shape(g["data"][key]) == np.shape(value)


def _composed_run(data_keys: dict, rows: list[dict], *, stop: bool = True) -> Docs:
    """A run made with event-model's compose tools: start, descriptor, events[, stop]."""
    run = event_model.compose_run()
    desc = run.compose_descriptor(name="primary", data_keys=data_keys)
    docs: Docs = [("start", run.start_doc), ("descriptor", desc.descriptor_doc)]
    for row in rows:
        event = desc.compose_event(data=row, timestamps=dict.fromkeys(row, 1.0), validate=False)
        docs.append(("event", event))
    if stop:
        docs.append(("stop", run.compose_stop()))
    return docs


def _feed(writer: ZarrRunWriter, docs: Docs) -> None:
    for name, doc in docs:
        writer(name, doc)


def test_scan_and_array_count_round_trip(RE: RunEngine, store: Path) -> None:
    writer = ZarrRunWriter(store)
    scan = _run(RE, bp.scan([det], motor, -1, 1, 5), writer)
    count = _run(RE, bp.count([_image_signal()], num=3), writer)
    reader = ZarrRunReader(store)
    scan_uid, count_uid = scan[0][1]["uid"], count[0][1]["uid"]
    assert reader.runs() == [scan_uid, count_uid]
    _assert_same_documents(list(reader.documents(scan_uid)), scan)
    _assert_same_documents(list(reader.documents(count_uid)), count)
    assert reader.stop(scan_uid)["num_events"] == {"primary": 5}

    table = reader.table(scan_uid)
    np.testing.assert_allclose(table["motor"], np.linspace(-1, 1, 5))
    np.testing.assert_array_equal(table["seq_num"], [1, 2, 3, 4, 5])
    expected_det = [doc["data"]["det"] for name, doc in scan if name == "event"]
    np.testing.assert_array_equal(table["det"], expected_det)
    images = reader.table(count_uid)["img"]
    assert images.shape == (3, 2, 3)
    frames = [doc["data"]["img"] for name, doc in count if name == "event"]
    np.testing.assert_array_equal(images, np.stack(frames))
    assert len({float(frame.sum()) for frame in frames}) == 3  # three distinct frames


def test_event_page_is_stored_as_rows(store: Path) -> None:
    keys = {"x": {"dtype": "number", "shape": [], "source": "s"}}
    docs = _composed_run(keys, [{"x": float(i)} for i in range(4)])
    events = [doc for name, doc in docs if name == "event"]
    paged = [*docs[:2], ("event_page", event_model.pack_event_page(*events)), docs[-1]]
    _feed(ZarrRunWriter(store), paged)
    _assert_same_documents(list(ZarrRunReader(store).documents(docs[0][1]["uid"])), docs)


def test_open_run_reads_committed_rows_and_stop_trims_the_arrays(store: Path) -> None:
    keys = {"x": {"dtype": "number", "shape": [], "source": "s"},
            "img": {"dtype": "array", "shape": [2, 3], "source": "s"}}
    rows = [{"x": float(i), "img": np.full((2, 3), float(i))} for i in range(5)]
    docs = _composed_run(keys, rows)
    uid, (desc_uid,) = docs[0][1]["uid"], [d["uid"] for n, d in docs if n == "descriptor"]
    writer = ZarrRunWriter(store)
    _feed(writer, docs[:-1])
    group = zarr.open_group(store, mode="r")["runs"][uid]["descriptors"][desc_uid]
    paths = ["time", "seq_num", "uid", "data/x", "data/img", "timestamps/x", "timestamps/img"]
    assert all(group[p].shape[0] >= 5 for p in paths)  # spare rows while the run is open
    np.testing.assert_array_equal(ZarrRunReader(store).table(uid)["x"], np.arange(5.0))
    writer("stop", docs[-1][1])
    assert {p: group[p].shape[0] for p in paths} == dict.fromkeys(paths, 5)
    _assert_same_documents(list(ZarrRunReader(store).documents(uid)), docs)


def test_strings_integers_and_variable_length_arrays(store: Path) -> None:
    keys = {
        "label": {"dtype": "string", "shape": [], "source": "s"},
        "count": {"dtype": "integer", "shape": [], "source": "s"},
        "trace": {"dtype": "array", "shape": [None], "source": "s"},
    }
    rows = [{"label": f"pt{i}", "count": i, "trace": np.arange(3) * i} for i in range(3)]
    docs = _composed_run(keys, rows)
    _feed(ZarrRunWriter(store), docs)
    got = list(ZarrRunReader(store).documents(docs[0][1]["uid"]))
    _assert_same_documents(got, docs)
    assert type(got[2][1]["data"]["label"]) is str
    assert type(got[2][1]["data"]["count"]) is int


def test_reader_ignores_uncommitted_rows_and_reopened_writer_truncates(
    RE: RunEngine, store: Path
) -> None:
    docs = _run(RE, bp.scan([det], motor, -1, 1, 5))
    _feed(ZarrRunWriter(store), docs[:-1])  # the process dies before the stop document
    start_uid = docs[0][1]["uid"]
    (desc_uid,) = [doc["uid"] for name, doc in docs if name == "descriptor"]
    # ... and half-way through a sixth event: rows appended to two arrays, never committed.
    desc_group = zarr.open_group(store, mode="r+")["runs"][start_uid]["descriptors"][desc_uid]
    for path, value in (("data/det", 99.0), ("time", 1.0)):
        arr = desc_group[path]
        arr.resize((6,))
        arr[5] = value
    assert desc_group.attrs["n_committed"] == 5

    reader = ZarrRunReader(store)
    assert len(reader.table(start_uid)["det"]) == 5
    assert 99.0 not in reader.table(start_uid)["det"]
    _assert_same_documents(list(reader.documents(start_uid)), docs[:-1])

    writer = ZarrRunWriter(store)  # reopening repairs the store
    repaired = zarr.open_group(store, mode="r")["runs"][start_uid]["descriptors"][desc_uid]
    assert repaired["data/det"].shape == (5,)
    assert repaired["time"].shape == (5,)
    writer("stop", docs[-1][1])
    _assert_same_documents(list(reader.documents(start_uid)), docs)


def test_leftover_partial_files_are_ignored(RE: RunEngine, store: Path) -> None:
    docs = _run(RE, bp.count([det], num=2), ZarrRunWriter(store))
    start_uid = docs[0][1]["uid"]
    # What zarr's atomic write leaves behind when the process dies mid-write.
    (store / "runs" / "zarr.0123abcd.partial").write_bytes(b"{")
    (store / "runs" / start_uid / "descriptors" / "zarr.4567ef.partial").write_bytes(b"{")
    ZarrRunWriter(store)  # pytest turns zarr's "not recognized" warning into an error
    assert ZarrRunReader(store).runs() == [start_uid]
    _assert_same_documents(list(ZarrRunReader(store).documents(start_uid)), docs)


def test_run_resumes_across_writers_without_duplicates(RE: RunEngine, store: Path) -> None:
    docs = _run(RE, bp.scan([det], motor, -1, 1, 5))
    _feed(ZarrRunWriter(store), docs[:4])  # start, descriptor and two events
    start_uid = docs[0][1]["uid"]
    assert ZarrRunReader(store).stop(start_uid) is None
    assert len(ZarrRunReader(store).table(start_uid)["det"]) == 2

    # A restarted process receives the run again from its beginning (at-least-once delivery).
    _feed(ZarrRunWriter(store), docs)
    _assert_same_documents(list(ZarrRunReader(store).documents(start_uid)), docs)
    # Or only the rest, without the start and descriptor.
    other = _run(RE, bp.count([det], num=3))
    _feed(ZarrRunWriter(store), other[:3])
    _feed(ZarrRunWriter(store), other[3:])
    _assert_same_documents(list(ZarrRunReader(store).documents(other[0][1]["uid"])), other)


def test_second_start_for_a_stopped_run_is_refused(RE: RunEngine, store: Path) -> None:
    docs = _run(RE, bp.count([det], num=1), ZarrRunWriter(store))
    with pytest.raises(StoreError, match="already stopped"):
        ZarrRunWriter(store)("start", docs[0][1])


def test_conflicting_start_for_an_open_run_is_refused(store: Path) -> None:
    keys = {"x": {"dtype": "number", "shape": [], "source": "s"}}
    docs = _composed_run(keys, [{"x": 1.0}], stop=False)
    writer = ZarrRunWriter(store)
    _feed(writer, docs)
    changed = {**docs[0][1], "sample": "other"}
    with pytest.raises(StoreError, match="different start document"):
        writer("start", changed)


def test_wrong_shape_is_rejected_and_nothing_is_committed(store: Path) -> None:
    keys = {"img": {"dtype": "array", "shape": [2, 3], "source": "s"}}
    docs = _composed_run(keys, [{"img": np.zeros((2, 3))}], stop=False)
    writer = ZarrRunWriter(store)
    _feed(writer, docs)
    bad = {**docs[-1][1], "uid": "bad-event", "seq_num": 2, "data": {"img": np.zeros((3, 2))}}
    with pytest.raises(DocumentError, match=r"'img' is declared shape=\[2, 3\].*shape=\[3, 2\]"):
        writer("event", bad)
    assert ZarrRunReader(store).table(docs[0][1]["uid"])["img"].shape == (1, 2, 3)


def test_variable_length_is_fixed_by_first_event(store: Path) -> None:
    keys = {"trace": {"dtype": "array", "shape": [None], "source": "s"}}
    docs = _composed_run(keys, [{"trace": np.zeros(4)}], stop=False)
    writer = ZarrRunWriter(store)
    _feed(writer, docs)
    bad = {**docs[-1][1], "uid": "e2", "seq_num": 2, "data": {"trace": np.zeros(5)}}
    with pytest.raises(DocumentError, match=r"'trace': declared shape \[None\] is stored as \[4\]"):
        writer("event", bad)


def test_lossy_dtype_is_rejected(store: Path) -> None:
    keys = {"mask": {"dtype": "array", "shape": [2], "source": "s"}}
    docs = _composed_run(keys, [{"mask": np.array([1, 0])}], stop=False)
    writer = ZarrRunWriter(store)
    _feed(writer, docs)
    bad = {**docs[-1][1], "uid": "e2", "seq_num": 2, "data": {"mask": np.array([0.5, 1.5])}}
    with pytest.raises(DocumentError, match="float64 cannot be stored without loss in its int64"):
        writer("event", bad)


def test_unknown_descriptor_and_unknown_run_are_document_errors(store: Path) -> None:
    keys = {"x": {"dtype": "number", "shape": [], "source": "s"}}
    docs = _composed_run(keys, [{"x": 1.0}])
    writer = ZarrRunWriter(store)
    with pytest.raises(DocumentError, match="unknown descriptor"):
        writer("event", docs[2][1])
    with pytest.raises(DocumentError, match="no open run"):
        writer("descriptor", docs[1][1])
    with pytest.raises(DocumentError, match="cannot store 'bulk_events'"):
        writer("bulk_events", {})


def test_resources_and_datums_are_kept(store: Path) -> None:
    run = event_model.compose_run()
    resource = run.compose_resource(
        spec="AD_HDF5", root="/data", resource_path="a.h5", resource_kwargs={}
    )
    datum = resource.compose_datum(datum_kwargs={"point_number": 0})
    keys = {"img": {"dtype": "array", "shape": [8, 8], "source": "s", "external": "FILESTORE:"}}
    desc = run.compose_descriptor(name="primary", data_keys=keys)
    event = desc.compose_event(
        data={"img": datum["datum_id"]}, timestamps={"img": 1.0}, filled={"img": False}
    )
    docs: Docs = [
        ("start", run.start_doc),
        ("resource", resource.resource_doc),
        ("datum", datum),
        ("descriptor", desc.descriptor_doc),
        ("event", event),
        ("stop", run.compose_stop()),
    ]
    _feed(ZarrRunWriter(store), docs)
    _assert_same_documents(list(ZarrRunReader(store).documents(run.start_doc["uid"])), docs)


def test_in_memory_group_root(RE: RunEngine) -> None:
    group = zarr.group()
    docs = _run(RE, bp.count([det], num=2), ZarrRunWriter(group))
    assert group.attrs[FORMAT_ATTR] == 1
    _assert_same_documents(list(ZarrRunReader(group).documents(docs[0][1]["uid"])), docs)


def test_wrong_store_paths_raise_store_error(tmp_path: Path) -> None:
    with pytest.raises(StoreError, match="expected a beampilot run store"):
        ZarrRunReader(tmp_path / "missing")
    foreign = tmp_path / "foreign.zarr"
    zarr.open_group(foreign, mode="w").create_group("images")
    with pytest.raises(StoreError, match=f"lacks the '{FORMAT_ATTR}' attribute"):
        ZarrRunReader(foreign)
    with pytest.raises(StoreError, match="not a beampilot run store"):
        ZarrRunWriter(foreign)
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "readme.txt").write_text("not zarr")
    with pytest.raises(StoreError, match="exists but is not a zarr store"):
        ZarrRunWriter(tmp_path / "notes")
    with pytest.raises(StoreError):
        ZarrRunReader(tmp_path / "notes" / "readme.txt")
    future = tmp_path / "future.zarr"
    zarr.open_group(future, mode="w").attrs[FORMAT_ATTR] = 99
    with pytest.raises(StoreError, match="99"):
        ZarrRunReader(future)
    ZarrRunWriter(tmp_path / "new.zarr")
    with pytest.raises(KeyError, match="no run 'nope'"):
        ZarrRunReader(tmp_path / "new.zarr").start("nope")

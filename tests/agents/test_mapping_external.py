"""MappingAgent with the SAXS frames in files, as beamline detectors write them: the same
observations as with the frames in the events, from areaDetector HDF5 and TIFF (resource /
datum) and from ophyd-async HDF5 streams (stream_resource / stream_datum, frames left out of the
events)."""

from __future__ import annotations

import copy

import bluesky.plans as bp
import event_model
import h5py
import numpy as np
import pytest
from bluesky import RunEngine

from agents.mapping import MappingAgent
from simulators.maps import FilmMap
from simulators.sas import SimClock
from simulators.stage import SimSampleStage

FRAME, EXPOSURE = "stage_saxs_counts", "stage_saxs_exposure"


@pytest.fixture(scope="module")
def measured():
    """A real RunEngine's documents of 6 positions, the frames inline."""
    film = FilmMap(seed=3)
    stage = SimSampleStage("stage", truth=film, speed=2.0, seed=1, clock=SimClock(start=0.0))
    stage.saxs.exposure.set(0.5).wait()
    docs: list[tuple[str, dict]] = []
    RE = RunEngine({}, context_managers=[])
    RE(bp.list_scan([stage.saxs], stage.x, [1.0, 3.0, 5.0, 7.0, 2.0, 8.0], stage.y, [1.0, 2.0, 6.0, 8.0, 9.0, 4.0]),
       lambda name, doc: docs.append((name, copy.deepcopy(doc))))
    return film, docs


def _observations(film, docs, tmp_path, **settings):
    agent = MappingAgent({"extent": list(film.extent), "max_points": 16, "grid": [20, 20], **settings},
                         tmp_path / f"s{len(list(tmp_path.iterdir()))}.zarr")
    for name, doc in docs:
        agent.tell(name, doc)
    table = agent.store.read("observations")
    return agent, {k: np.asarray(v) for k, v in table.items() if k not in ("time", "point_key", "event_uid")}


def _frames(docs) -> list[np.ndarray]:
    return [np.asarray(d["data"][FRAME]) for n, d in docs if n == "event"]


def _with_resource(docs, spec, root, resource_path, resource_kwargs):
    """The run's frames replaced by datums of one resource (point ``n``: the ``n``-th event), as
    ophyd writes an area detector's file plugin's."""
    out, start, resource = [], None, None
    for name, doc in docs:
        doc = copy.deepcopy(doc)
        if name == "start":
            start = doc
        elif name == "descriptor":
            doc["data_keys"][FRAME]["external"] = "FILESTORE:"
            resource = event_model.compose_resource(spec=spec, root=root, resource_path=resource_path,
                                                    resource_kwargs=resource_kwargs, start=start)
            out += [(name, doc), ("resource", resource.resource_doc)]
            continue
        elif name == "event":
            datum = resource.compose_datum(datum_kwargs={"point_number": doc["seq_num"] - 1})
            out.append(("datum", datum))
            doc["data"][FRAME], doc["filled"] = datum["datum_id"], {FRAME: False}
        out.append((name, doc))
    return out


def _as_ad_hdf5(docs, path, root):
    """The run as ophyd writes an areaDetector HDF5 plugin's: one file, a datum per point."""
    with h5py.File(path, "w") as f:
        f.create_dataset("/entry/data/data", data=np.stack(_frames(docs)))
    return _with_resource(docs, "AD_HDF5", root, path.name, {"frame_per_point": 1})


def _as_ad_tiff(docs, directory):
    """The run as ophyd writes an areaDetector TIFF plugin's: one file a frame, a datum per point."""
    from PIL import Image

    frames = _frames(docs)
    assert all(np.array_equal(f, np.rint(f)) for f in frames)  # counts: exact in a 32-bit integer TIFF
    directory.mkdir()
    for j, frame in enumerate(frames):
        Image.fromarray(frame.astype(np.int32)).save(directory / f"saxs_{j:06d}.tiff")
    return _with_resource(docs, "AD_TIFF", str(directory.parent), directory.name,
                          {"template": "%s%s_%6.6d.tiff", "filename": "saxs", "frame_per_point": 1})


def _as_stream(docs, path, *, exposure_in_configuration=False):
    """The run as an ophyd-async detector writes it: the frames in an HDF5 stream, out of the events."""
    frames = _frames(docs)
    with h5py.File(path, "w") as f:
        f.create_dataset("/entry/data/data", data=np.stack(frames)[:, None])
    out, start, resource, descriptor = [], None, None, None
    for name, doc in docs:
        doc = copy.deepcopy(doc)
        if name == "start":
            start = doc
        elif name == "descriptor":
            descriptor = doc
            key = doc["data_keys"][FRAME]
            key.update(external="STREAM:", shape=[1, *key["shape"]])
            if exposure_in_configuration:  # ophyd-async detectors report acquire time as configuration
                doc["configuration"].setdefault("stage_saxs", {"data": {}, "timestamps": {}, "data_keys": {}})
                doc["configuration"]["stage_saxs"]["data"][EXPOSURE] = 0.5
                del doc["data_keys"][EXPOSURE]
            resource = event_model.compose_stream_resource(
                mimetype="application/x-hdf5", uri=f"file://localhost{path}", data_key=FRAME,
                parameters={"dataset": "/entry/data/data"}, start=start)
            out += [(name, doc), ("stream_resource", resource.stream_resource_doc)]
            continue
        elif name == "event":
            i = doc["seq_num"] - 1
            out.append(("stream_datum", resource.compose_stream_datum(
                indices={"start": i, "stop": i + 1}, seq_nums={"start": i + 1, "stop": i + 2}, descriptor=descriptor)))
            for table in ("data", "timestamps", "filled"):
                doc.get(table, {}).pop(FRAME, None)
                if exposure_in_configuration:
                    doc.get(table, {}).pop(EXPOSURE, None)
        out.append((name, doc))
    return out


def test_frames_in_files_give_the_same_map_as_frames_in_events(measured, tmp_path):
    film, docs = measured
    _, inline = _observations(film, docs, tmp_path)
    assert len(inline["x"]) == 6 and np.all(np.isfinite(inline["peak_q"]))
    (tmp_path / "data").mkdir()
    layouts = {
        "AD_HDF5": _as_ad_hdf5(docs, tmp_path / "data" / "ad.h5", str(tmp_path / "data")),
        "AD_TIFF": _as_ad_tiff(docs, tmp_path / "data" / "pilatus"),
        "stream": _as_stream(docs, tmp_path / "data" / "s.h5"),
        "stream, exposure in configuration": _as_stream(docs, tmp_path / "data" / "c.h5", exposure_in_configuration=True),
    }
    for layout, rewritten in layouts.items():
        assert not any(isinstance(d.get("data", {}).get(FRAME), list) for n, d in rewritten if n == "event")
        agent, got = _observations(film, rewritten, tmp_path)
        assert agent.report()["errors"] == [], layout
        for column, values in inline.items():
            np.testing.assert_array_equal(got[column], values, err_msg=f"{layout}: {column}")


def test_a_frame_file_elsewhere_is_found_through_root_map_or_named(measured, tmp_path):
    film, docs = measured
    (tmp_path / "mnt").mkdir()
    rewritten = _as_ad_hdf5(docs, tmp_path / "mnt" / "ad.h5", "/nsls2/data/cms")  # where the IOC wrote it
    _, inline = _observations(film, docs, tmp_path)
    _, mapped = _observations(film, rewritten, tmp_path, root_map={"/nsls2/data/cms": str(tmp_path / "mnt")})
    np.testing.assert_array_equal(mapped["peak_q"], inline["peak_q"])

    agent, unmapped = _observations(film, rewritten, tmp_path, max_retries=0)
    assert len(unmapped["x"]) == 0 and len(agent.report()["errors"]) >= 6
    first = agent.report()["errors"][0]
    assert "seq_num 1" in first and "/nsls2/data/cms/ad.h5 does not exist here" in first and "root_map" in first


def test_several_images_a_point_are_counted_together(measured, tmp_path):
    """An area detector taking 2 images a point: the point's frame is their sum, over twice the exposure."""
    from models.saxs2d import DetectorGeometry, reduce_frame

    film, docs = measured
    events = [d for n, d in docs if n == "event"]
    doubled = []
    for name, doc in docs:  # each point's frame given as a stack of two images: itself and its neighbour's
        if name == "event":
            doc = copy.deepcopy(doc)
            k = doc["seq_num"] - 1
            doc["data"][FRAME] = np.stack([events[k]["data"][FRAME], events[(k + 1) % len(events)]["data"][FRAME]])
        elif name == "descriptor":
            doc = copy.deepcopy(doc)
            doc["data_keys"][FRAME]["shape"] = [2, *doc["data_keys"][FRAME]["shape"]]
        doubled.append((name, doc))
    agent, got = _observations(film, doubled, tmp_path)
    assert agent.report()["errors"] == [] and len(got["x"]) == 6
    for k, event in enumerate(events):
        total = np.asarray(event["data"][FRAME]) + np.asarray(events[(k + 1) % 6]["data"][FRAME])
        want = reduce_frame(total, 2 * event["data"][EXPOSURE], DetectorGeometry())
        assert got["peak_q"][k] == want.values["peak_q"] and got["intensity"][k] == want.values["intensity"]


def test_a_frame_written_after_its_event_is_waited_for_not_measured_again(measured, tmp_path):
    film, docs = measured
    _, inline = _observations(film, docs, tmp_path)
    (tmp_path / "data").mkdir()
    path = tmp_path / "data" / "late.h5"
    rewritten = _as_ad_hdf5(docs, path, str(tmp_path / "data"))
    frames = _frames(docs)
    with h5py.File(path, "a") as f:  # the writer is two frames behind when the events arrive
        del f["/entry/data/data"]
        f.create_dataset("/entry/data/data", data=np.stack(frames[:4]), maxshape=(None, *frames[0].shape))
    agent = MappingAgent({"extent": list(film.extent), "max_points": 16, "grid": [20, 20]}, tmp_path / "late.zarr")
    events = [i for i, (n, _) in enumerate(rewritten) if n == "event"]
    for name, doc in rewritten[: events[-1] + 1]:  # every event; not yet the stop
        agent.tell(name, doc)
    assert agent.n_observations == 4 and agent.report()["frames_waiting_for_data"] == 2
    assert agent.report()["errors"] == []  # waiting is not a failed reading
    with h5py.File(path, "a") as f:  # the writer catches up
        ds = f["/entry/data/data"]
        ds.resize(6, axis=0)
        ds[4:] = np.stack(frames[4:])
    agent.tell(*rewritten[-1])  # the stop: the waiting frames are read
    table = agent.store.read("observations")
    assert agent.n_observations == 6 and agent.report()["frames_waiting_for_data"] == 0
    np.testing.assert_array_equal(np.asarray(table["peak_q"]), inline["peak_q"])

    never = MappingAgent({"extent": list(film.extent), "max_points": 16, "grid": [20, 20]}, tmp_path / "never.zarr")
    with h5py.File(path, "a") as f:
        f["/entry/data/data"].resize(5, axis=0)  # the last frame never comes
    for name, doc in rewritten:
        never.tell(name, doc)
    assert never.n_observations == 5 and len(never.report()["errors"]) == 1
    assert "not written yet" in never.report()["errors"][0] and "measured again" in never.report()["errors"][0]

"""ExternalData: event values from the files their documents name; a run's documents forgotten at its stop."""

from __future__ import annotations

import event_model
import h5py
import numpy as np
import pytest

from streams.external import ExternalData, ExternalDataError


def _run(tmp_path):
    frames = np.arange(3 * 4 * 5, dtype=np.uint16).reshape(3, 4, 5)
    with h5py.File(tmp_path / "d.h5", "w") as f:
        f.create_dataset("/entry/data/data", data=frames)
    run = event_model.compose_run()
    desc = run.compose_descriptor(name="primary", data_keys={
        "img": {"dtype": "array", "shape": [4, 5], "source": "f", "external": "STREAM:"},
        "x": {"dtype": "number", "shape": [], "source": "s"}},
        configuration={"det": {"data": {"det_acquire_time": 0.25}, "timestamps": {"det_acquire_time": 0.0},
                               "data_keys": {"det_acquire_time": {"dtype": "number", "shape": [], "source": "s"}}}})
    res = run.compose_stream_resource(mimetype="application/x-hdf5", uri=f"file://localhost{tmp_path}/d.h5",
                                      data_key="img", parameters={"dataset": "/entry/data/data"})
    return frames, run, desc, res


def test_stream_values_are_located_by_seq_num_and_forgotten_at_stop(tmp_path):
    frames, run, desc, res = _run(tmp_path)
    ext = ExternalData()
    for name, doc in (("start", run.start_doc), ("descriptor", desc.descriptor_doc),
                      ("stream_resource", res.stream_resource_doc)):
        assert ext.tell(name, doc) == []
    uid = desc.descriptor_doc["uid"]
    assert ext.streamed(uid) == {"img"} and ext.configuration(uid, "det_acquire_time") == 0.25
    datum = res.compose_stream_datum(indices={"start": 1, "stop": 3}, seq_nums={"start": 5, "stop": 7},
                                     descriptor=desc.descriptor_doc)
    assert ext.tell("stream_datum", datum) == [(uid, "img", range(5, 7))]
    assert ext.locate(uid, "img", 6) == datum["uid"] and ext.locate(uid, "img", 7) is None
    event = desc.compose_event(data={"x": 1.0}, timestamps={"x": 0.0}, seq_num=6)
    np.testing.assert_array_equal(ext.value(event, "img"), frames[2])
    assert ext.value(event, "x") == 1.0
    with pytest.raises(ExternalDataError, match="no stream_datum has located 'img' of seq_num 4") as err:
        ext.value(desc.compose_event(data={"x": 1.0}, timestamps={"x": 0.0}, seq_num=4), "img")
    assert err.value.retry
    with pytest.raises(ExternalDataError, match="ranges of different lengths"):
        ext.tell("stream_datum", res.compose_stream_datum(indices={"start": 0, "stop": 1},
                                                          seq_nums={"start": 1, "stop": 3}, descriptor=desc.descriptor_doc))
    ext.tell("stop", run.compose_stop())
    assert ext.streamed(uid) == set() and ext.locate(uid, "img", 6) is None
    assert ext.stream_resource(res.stream_resource_doc["uid"]) is None


def test_root_map_takes_the_longest_prefix(tmp_path):
    ext = ExternalData({"/data": "/wrong", "/data/cms/": str(tmp_path)})
    assert ext._map_path("/data/cms/2026/a.h5") == f"{tmp_path}/2026/a.h5"
    assert ext._map_path("/data/other/a.h5") == "/wrong/other/a.h5"
    assert ext._map_path("/database/a.h5") == "/database/a.h5"  # a prefix is whole path components


def test_a_file_held_by_a_writer_without_swmr_is_not_ready_until_it_is_closed(tmp_path):
    """An HDF5 writer without SWMR (another process, as a detector IOC is) locks its file."""
    import subprocess
    import sys

    from streams.external import read_hdf5_rows

    path = tmp_path / "locked.h5"
    script = (f"import h5py, sys; f = h5py.File({str(path)!r}, 'w'); "
              "f.create_dataset('/entry/data/data', data=[[[7, 8]]]); f.flush(); print('open', flush=True); "
              "sys.stdin.readline(); f.close()")
    writer = subprocess.Popen([sys.executable, "-c", script], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert writer.stdout.readline().strip() == "open"
        with pytest.raises(ExternalDataError, match="turn SWMR on") as err:
            read_hdf5_rows(path, "/entry/data/data", 0, "probe")
        assert err.value.cause == "not_ready" and err.value.retry
    finally:
        writer.communicate("\n", timeout=30)
    np.testing.assert_array_equal(read_hdf5_rows(path, "/entry/data/data", 0, "probe"), [[7, 8]])


def test_ad_tiff_frames_are_read_per_point_and_wait_for_their_files(tmp_path):
    """ophyd's AD_TIFF resource: one file a frame, template % (path, filename, n), 2 frames a point."""
    from PIL import Image

    frames = [np.full((4, 5), 1000 * k, dtype=np.int32) + np.arange(20, dtype=np.int32).reshape(4, 5) for k in range(4)]
    run = event_model.compose_run()
    desc = run.compose_descriptor(name="primary", data_keys={
        "img": {"dtype": "array", "shape": [2, 4, 5], "source": "PV:TIFF", "external": "FILESTORE:"}})
    res = run.compose_resource(spec="AD_TIFF", root=str(tmp_path), resource_path="pilatus", resource_kwargs={
        "template": "%s%s_%6.6d.tiff", "filename": "scan7", "frame_per_point": 2})
    (tmp_path / "pilatus").mkdir()
    for j in range(3):  # the fourth frame is not written yet
        Image.fromarray(frames[j]).save(tmp_path / "pilatus" / f"scan7_{j:06d}.tiff")
    ext = ExternalData()
    for name, doc in (("start", run.start_doc), ("descriptor", desc.descriptor_doc), ("resource", res.resource_doc)):
        ext.tell(name, doc)
    events = []
    for point in range(2):
        datum = res.compose_datum(datum_kwargs={"point_number": point})
        ext.tell("datum", datum)
        events.append(desc.compose_event(data={"img": datum["datum_id"]}, timestamps={"img": 0.0},
                                         filled={"img": False}))
    np.testing.assert_array_equal(ext.value(events[0], "img"), np.stack(frames[:2]))
    with pytest.raises(ExternalDataError, match="scan7_000003.tiff is not there yet") as err:
        ext.value(events[1], "img")
    assert err.value.retry
    Image.fromarray(frames[3]).save(tmp_path / "pilatus" / "scan7_000003.tiff")
    np.testing.assert_array_equal(ext.value(events[1], "img"), np.stack(frames[2:]))
    bad = res.compose_datum(datum_kwargs={"point_number": -1})  # the same check as AD_HDF5's
    ext.tell("datum", bad)
    with pytest.raises(ExternalDataError, match="point_number=-1 must be >= 1 and >= 0"):
        ext.value(desc.compose_event(data={"img": bad["datum_id"]}, timestamps={"img": 0.0}, filled={"img": False}), "img")

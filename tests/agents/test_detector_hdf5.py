"""Frames in HDF5 files, as beamline detectors write them: an ophyd-async detector's stream
resources (a real RunEngine and ophyd-async's simulated detector writing its file), and ophyd's
areaDetector ``AD_HDF5`` resources; frames still being written are waited for, in raw order."""

from __future__ import annotations

import event_model
import h5py
import numpy as np
import pytest
import torch

from agents.detector_agent import DetectorAnalysisAgent
from models.nets import PoissonDenoiser
from models.registry import WeightsRecord, save_weights
from simulators.detector import BraggRecipe, bragg_frame_2d
from streams.derived import validate_document
from tests.agents.test_detector_agent import FakeClock
from tests.ophyd_async_run import blob_scan, fly_scan

SHAPE = (32, 32)


class Recorder:
    def __init__(self) -> None:
        self.docs: list[tuple[str, dict]] = []

    def __call__(self, name, doc) -> None:
        self.docs.append((name, doc))

    def frames(self) -> dict[int, np.ndarray]:
        """raw_seq_num -> the published denoised frame."""
        return _outputs(self, "denoise", "denoised")


def _agent(weights, sinks, clock=None, **settings):
    base = {"analysis": "denoise", "weights": str(weights), "device": "cpu", "max_batch": 4, "max_latency_s": 0.0}
    return DetectorAnalysisAgent({**base, **settings}, sinks=sinks, clock=clock or FakeClock())


def _inline(weights, frames, **settings) -> Recorder:
    """What the agent publishes for these frames given inline (the reference)."""
    sink = Recorder()
    agent = _agent(weights, [sink], **settings)
    run = event_model.compose_run()
    desc = run.compose_descriptor(name="primary", data_keys={
        "det_image": {"dtype": "array", "shape": list(frames[0].shape), "source": "sim"}})
    for name, doc in (("start", run.start_doc), ("descriptor", desc.descriptor_doc)):
        agent.tell(name, doc)
    for f in frames:
        agent.tell("event", desc.compose_event(data={"det_image": f}, timestamps={"det_image": 0.0}, validate=False))
    agent.tell("stop", run.compose_stop())
    return sink


def _outputs(sink: Recorder, stream: str, key: str) -> dict[int, np.ndarray]:
    """raw_seq_num -> the derived ``key`` of ``stream``."""
    desc = {d["uid"] for n, d in sink.docs if n == "descriptor" and d["name"] == stream}
    return {d["data"]["raw_seq_num"]: d["data"][key] for n, d in sink.docs if n == "event" and d["descriptor"] in desc}


@pytest.fixture(scope="module")
def denoiser(tmp_path_factory):
    torch.manual_seed(1)
    record = WeightsRecord(name="tiny-den", architecture="poisson-denoiser-unet",
                           architecture_config={"width": 4, "depth": 2})
    return save_weights(PoissonDenoiser(width=4, depth=2), tmp_path_factory.mktemp("d"), record)


def test_an_ophyd_async_detector_is_analysed_from_the_file_it_writes(denoiser, tmp_path):
    sink = Recorder()
    agent = _agent(denoiser, [sink], frame_key="det", max_batch=2)
    _, raw = blob_scan(tmp_path, 5, [agent.tell])

    assert all("det" not in d["data"] for n, d in raw if n == "event")
    for name, doc in sink.docs:
        validate_document(name, doc)
    report = agent.report()
    assert report["frames_in"] == report["frames_out"] == 5 and report["failed_frames"] == {}
    assert agent.frames_waiting == 0
    with h5py.File(tmp_path / "blobs.h5", "r") as f:
        written = np.asarray(f["/entry/data/data"])
    assert written.shape[0] == 5 and len({float(w.sum()) for w in written}) == 5
    got, want = sink.frames(), _inline(denoiser, list(written)).frames()
    assert sorted(got) == sorted(want) == [1, 2, 3, 4, 5]
    for k in got:  # the right rows of the file, in order
        np.testing.assert_array_equal(got[k], want[k])
    start = next(d for n, d in sink.docs if n == "start")
    assert start["raw_run_uid"] == raw[0][1]["uid"]


def test_an_ophyd_async_fly_scan_is_analysed_from_its_stream_datums_alone(denoiser, tmp_path):
    """A real fly scan sends no events: each frame is analysed once its stream_datum has come."""
    sink = Recorder()
    agent = _agent(denoiser, [sink], frame_key="det", max_batch=3)
    fly_scan(tmp_path, 4, [agent.tell])
    report = agent.report()
    assert report["frames_in"] == report["frames_out"] == 4 and report["failed_frames"] == {}
    with h5py.File(tmp_path / "fly.h5", "r") as f:
        written = np.asarray(f["/entry/data/data"])
    got, want = sink.frames(), _inline(denoiser, list(written)).frames()
    assert sorted(got) == sorted(want) == [1, 2, 3, 4]
    for k in got:
        np.testing.assert_array_equal(got[k], want[k])


def _ad_run(tmp_path, frames_written: np.ndarray, *, root: str | None = None, fpp: int = 1):
    """A run whose det_image frames are in an areaDetector HDF5 file (ophyd's AD_HDF5 layout)."""
    path = tmp_path / "ad.h5"
    with h5py.File(path, "w") as f:
        f.create_dataset("/entry/data/data", data=frames_written, maxshape=(None, *frames_written.shape[1:]))
    run = event_model.compose_run()
    desc = run.compose_descriptor(name="primary", data_keys={
        "det_image": {"dtype": "array", "shape": [fpp, *SHAPE], "source": "PV:XF:DET", "external": "FILESTORE:"}})
    res = run.compose_resource(spec="AD_HDF5", root=root or str(tmp_path), resource_path="ad.h5",
                               resource_kwargs={"frame_per_point": fpp})
    return path, run, desc, res


def _tell_point(agent, desc, res, point: int) -> None:
    datum = res.compose_datum(datum_kwargs={"point_number": point})
    agent.tell("datum", datum)
    agent.tell("event", desc.compose_event(data={"det_image": datum["datum_id"]}, timestamps={"det_image": 0.0},
                                           filled={"det_image": False}, validate=False))


def _append(path, frame) -> None:
    """What the detector's file writer does after the event was sent: one more row."""
    with h5py.File(path, "a") as f:
        ds = f["/entry/data/data"]
        ds.resize(ds.shape[0] + 1, axis=0)
        ds[-1] = frame


def test_ad_hdf5_frames_written_late_are_waited_for_in_order(denoiser, tmp_path, caplog):
    frames = [bragg_frame_2d(seed, BraggRecipe(shape=SHAPE)).counts.astype(np.uint32) for seed in range(4)]
    path, run, desc, res = _ad_run(tmp_path, np.stack(frames[:1])[:, None].reshape(1, *SHAPE))
    clock, sink = FakeClock(), Recorder()
    agent = _agent(denoiser, [sink], clock=clock, max_batch=1, external_wait_s=10.0)
    for name, doc in (("start", run.start_doc), ("descriptor", desc.descriptor_doc), ("resource", res.resource_doc)):
        agent.tell(name, doc)
    _tell_point(agent, desc, res, 0)
    assert sorted(sink.frames()) == [1]
    _tell_point(agent, desc, res, 1)  # not in the file yet
    _tell_point(agent, desc, res, 2)  # behind it: waits with it, so the derived run stays in raw order
    assert sorted(sink.frames()) == [1] and agent.frames_waiting == 2
    assert agent.report()["frames_waiting_for_data"] == 2
    assert caplog.text.count("waits for its data") == 1 and "row 1 is not written yet" in caplog.text
    clock.t += 5.0
    _append(path, frames[1])
    _append(path, frames[2])
    agent.poll()
    assert sorted(sink.frames()) == [1, 2, 3] and agent.frames_waiting == 0

    _tell_point(agent, desc, res, 3)  # never written
    clock.t += 10.5
    agent.poll()
    report = agent.report()
    assert report["failed_frames"] == {"not_ready": 1} and agent.frames_waiting == 0
    agent.tell("stop", run.compose_stop())
    assert list(sink.frames()) == [1, 2, 3]
    want = _inline(denoiser, frames[:3]).frames()
    for k in (1, 2, 3):  # the right rows of the file
        np.testing.assert_array_equal(sink.frames()[k], want[k])
    assert sink.docs[-1][1]["exit_status"] == "success"


def test_a_stop_gives_waiting_frames_one_last_read(denoiser, tmp_path, caplog):
    frames = [bragg_frame_2d(seed, BraggRecipe(shape=SHAPE)).counts for seed in range(2)]
    path, run, desc, res = _ad_run(tmp_path, np.zeros((0, *SHAPE)))
    sink = Recorder()
    agent = _agent(denoiser, [sink], max_batch=1, external_wait_s=1e9)
    for name, doc in (("start", run.start_doc), ("descriptor", desc.descriptor_doc), ("resource", res.resource_doc)):
        agent.tell(name, doc)
    _tell_point(agent, desc, res, 0)
    _tell_point(agent, desc, res, 1)
    _append(path, frames[0])  # the writer closes the file before the RunEngine sends the stop
    agent.tell("stop", run.compose_stop())
    assert sorted(sink.frames()) == [1] and agent.report()["failed_frames"] == {"not_ready": 1}
    assert "row 1 is not written yet" in caplog.text and "seq_num 2" in caplog.text


def test_root_map_and_clear_errors_for_hdf5_files(denoiser, tmp_path, caplog):
    frames = np.stack([bragg_frame_2d(seed, BraggRecipe(shape=SHAPE)).counts for seed in range(2)])
    # the detector wrote to /detector/data/ad.h5; here it is mounted under tmp_path
    _, run, desc, res = _ad_run(tmp_path, frames, root="/detector/data")
    sink = Recorder()
    agent = _agent(denoiser, [sink], max_batch=1, root_map={"/detector/data/": str(tmp_path)})
    for name, doc in (("start", run.start_doc), ("descriptor", desc.descriptor_doc), ("resource", res.resource_doc)):
        agent.tell(name, doc)
    _tell_point(agent, desc, res, 1)
    assert sorted(sink.frames()) == [1] and agent.report()["failed_frames"] == {}

    unmapped = _agent(denoiser, [Recorder()], max_batch=1)
    bad = {"group": run.compose_resource(spec="AD_HDF5", root=str(tmp_path), resource_path="group.h5",
                                         resource_kwargs={"frame_per_point": 1}),
           "text": run.compose_resource(spec="AD_HDF5", root=str(tmp_path), resource_path="notes.h5",
                                        resource_kwargs={"frame_per_point": 1})}
    with h5py.File(tmp_path / "group.h5", "w") as f:
        f.create_group("/entry/data/data")
    (tmp_path / "notes.h5").write_text("not an HDF5 file, but long enough to have a signature")
    for name, doc in (("start", run.start_doc), ("descriptor", desc.descriptor_doc), ("resource", res.resource_doc),
                      ("resource", bad["group"].resource_doc), ("resource", bad["text"].resource_doc)):
        unmapped.tell(name, doc)
    _tell_point(unmapped, desc, res, 0)
    _tell_point(unmapped, desc, bad["group"], 0)
    _tell_point(unmapped, desc, bad["text"], 0)
    assert unmapped.report()["failed_frames"] == {"missing_file": 1, "external_read": 2}
    assert "/detector/data/ad.h5 does not exist here" in caplog.text and "root_map" in caplog.text
    assert "is a group, not a dataset" in caplog.text and "notes.h5 is not an HDF5 file" in caplog.text


def _stream_run(tmp_path, frames: np.ndarray, *, mimetype: str = "application/x-hdf5"):
    """A run written as ophyd-async writes one: frames in an HDF5 dataset, stream documents."""
    with h5py.File(tmp_path / "s.h5", "w") as f:
        f.create_dataset("/entry/data/data", data=frames)
    run = event_model.compose_run()
    desc = run.compose_descriptor(name="primary", data_keys={
        "det": {"dtype": "array", "shape": [1, *SHAPE], "source": "file", "external": "STREAM:"},
        "mask": {"dtype": "array", "shape": list(SHAPE), "source": "sim"}})
    res = run.compose_stream_resource(mimetype=mimetype, uri=f"file://localhost{tmp_path}/s.h5", data_key="det",
                                      parameters={"dataset": "/entry/data/data", "chunk_shape": [1, *SHAPE]})
    return run, desc, res


def test_a_frame_in_a_stream_with_its_mask_in_the_event_waits_for_both(denoiser, tmp_path, caplog):
    frames = np.stack([bragg_frame_2d(seed, BraggRecipe(shape=SHAPE)).counts for seed in range(3)])
    run, desc, res = _stream_run(tmp_path, frames)
    sink = Recorder()
    agent = _agent(denoiser, [sink], frame_key="det", mask_key="mask", max_batch=1)
    for name, doc in (("start", run.start_doc), ("descriptor", desc.descriptor_doc),
                      ("stream_resource", res.stream_resource_doc)):
        agent.tell(name, doc)
    empty = np.zeros(SHAPE, bool)
    # a fly scan's page: one stream_datum for the first two frames; their events come after it
    agent.tell("stream_datum", res.compose_stream_datum(indices={"start": 0, "stop": 2}, seq_nums={"start": 1, "stop": 3},
                                                        descriptor=desc.descriptor_doc))
    assert agent.frames_waiting == 2 and sink.frames() == {}
    for _ in range(2):
        agent.tell("event", desc.compose_event(data={"mask": empty}, timestamps={"mask": 0.0}, validate=False))
    assert sorted(sink.frames()) == [1, 2]
    agent.tell("event", desc.compose_event(data={"mask": empty}, timestamps={"mask": 0.0}, validate=False))
    agent.tell("stop", run.compose_stop())  # the third frame's stream_datum never came
    assert agent.report()["failed_frames"] == {"incomplete": 1} and agent.frames_waiting == 0
    assert "its run stopped before this frame's det arrived" in caplog.text

    other, desc2, res2 = _stream_run(tmp_path, frames, mimetype="application/x-tiff")
    for name, doc in (("start", other.start_doc), ("descriptor", desc2.descriptor_doc),
                      ("stream_resource", res2.stream_resource_doc)):
        agent.tell(name, doc)
    agent.tell("stream_datum", res2.compose_stream_datum(indices={"start": 0, "stop": 1}, seq_nums={"start": 1, "stop": 2},
                                                         descriptor=desc2.descriptor_doc))
    agent.tell("event", desc2.compose_event(data={"mask": empty}, timestamps={"mask": 0.0}, validate=False))
    assert agent.report()["failed_frames"]["unsupported_spec"] == 1
    assert "'application/x-tiff', which has no handler" in caplog.text


def _fly(agent, run, desc, res, ranges, total):
    """Tell ``agent`` a fly scan: stream datums for ``ranges`` of seq_nums (no events), then a
    stop document that counts ``total`` events in the stream, as the RunEngine's does."""
    for name, doc in (("start", run.start_doc), ("descriptor", desc.descriptor_doc),
                      ("stream_resource", res.stream_resource_doc)):
        agent.tell(name, doc)
    for a, b in ranges:
        agent.tell("stream_datum", res.compose_stream_datum(indices={"start": a - 1, "stop": b - 1},
                                                            seq_nums={"start": a, "stop": b}, descriptor=desc.descriptor_doc))
    agent.tell("stop", {**run.compose_stop(), "num_events": {"primary": total}})


def test_frames_the_stop_document_counts_that_never_came_are_counted_missing(denoiser, tmp_path, caplog):
    """A fly scan's frames come by stream datums alone: one lost upstream, and the stop document's
    num_events is what says its frames existed."""
    frames = np.stack([bragg_frame_2d(seed, BraggRecipe(shape=SHAPE)).counts for seed in range(6)])
    agent = _agent(denoiser, [Recorder()], frame_key="det", max_batch=2)
    _fly(agent, *_stream_run(tmp_path, frames), [(1, 3), (5, 6)], 6)  # the datum of 3-4 is lost, and 6's
    report = agent.report()
    assert report["frames_out"] == 3 and report["failed_frames"] == {"missing": 3}
    assert report["frames_in"] == report["frames_out"] + 3
    assert "frames seq_num 3-4, 6 (3) never arrived" in caplog.text


def test_after_a_restart_the_frames_before_the_first_told_are_not_counted_missing(denoiser, tmp_path, caplog):
    """Re-primed after a restart, the agent is told the run from where the checkpoint stood:
    the frames before it were analysed before the restart, not lost."""
    frames = np.stack([bragg_frame_2d(seed, BraggRecipe(shape=SHAPE)).counts for seed in range(6)])
    agent = _agent(denoiser, [Recorder()], frame_key="det", max_batch=2)
    _fly(agent, *_stream_run(tmp_path, frames), [(4, 7)], 6)
    report = agent.report()
    assert report["frames_in"] == report["frames_out"] == 3 and report["failed_frames"] == {}
    assert "never arrived" not in caplog.text


def test_several_images_a_point_are_each_analysed_and_named(denoiser, tmp_path, caplog):
    """An area detector taking 2 images a point (frame_per_point 2): 2 derived frames an event."""
    frames = [bragg_frame_2d(seed, BraggRecipe(shape=SHAPE)).counts for seed in range(6)]
    _, run, desc, res = _ad_run(tmp_path, np.stack(frames), fpp=2)
    sink = Recorder()
    agent = _agent(denoiser, [sink], max_batch=4)
    for name, doc in (("start", run.start_doc), ("descriptor", desc.descriptor_doc), ("resource", res.resource_doc)):
        agent.tell(name, doc)
    for point in range(3):
        _tell_point(agent, desc, res, point)
    agent.tell("stop", run.compose_stop())
    report = agent.report()
    assert report["frames_in"] == report["frames_out"] == 6 and report["failed_frames"] == {}
    desc_uid = next(d["uid"] for n, d in sink.docs if n == "descriptor" and d["name"] == "denoise")
    events = [d for n, d in sink.docs if n == "event" and d["descriptor"] == desc_uid]
    assert [(e["data"]["raw_seq_num"], e["data"]["raw_image"]) for e in events] == [
        (1, 0), (1, 1), (2, 0), (2, 1), (3, 0), (3, 1)]
    want = _inline(denoiser, frames).frames()  # the same six images, one an event
    for i, e in enumerate(events):  # batches of other sizes: float32 rounding may differ
        np.testing.assert_allclose(e["data"]["denoised"], want[i + 1], rtol=1e-5)
    for name, doc in sink.docs:
        validate_document(name, doc)


def test_a_writer_without_swmr_is_read_at_the_runs_stop_with_a_long_wait(denoiser, tmp_path):
    """A detector writing HDF5 without SWMR (here another process) locks its file until the run
    ends; with external_wait_s longer than the run, the frames are read at the stop, in order."""
    import subprocess
    import sys

    frames = np.stack([bragg_frame_2d(seed, BraggRecipe(shape=SHAPE)).counts for seed in range(3)])
    path, run, desc, res = _ad_run(tmp_path, frames)  # the documents; the file is written again below
    np.save(tmp_path / "frames.npy", frames)
    script = (f"import h5py, numpy, sys; f = h5py.File({str(path)!r}, 'w'); "
              f"f.create_dataset('/entry/data/data', data=numpy.load({str(tmp_path / 'frames.npy')!r})); "
              "f.flush(); print('open', flush=True); sys.stdin.readline(); f.close()")
    writer = subprocess.Popen([sys.executable, "-c", script], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    sink = Recorder()
    agent = _agent(denoiser, [sink], max_batch=1, external_wait_s=1e9)
    try:
        assert writer.stdout.readline().strip() == "open"
        for name, doc in (("start", run.start_doc), ("descriptor", desc.descriptor_doc),
                          ("resource", res.resource_doc)):
            agent.tell(name, doc)
        for point in range(3):
            _tell_point(agent, desc, res, point)
        agent.poll()
        assert sink.frames() == {} and agent.report()["frames_waiting_for_data"] == 3  # locked
    finally:
        writer.communicate("\n", timeout=30)  # the run ends: the detector closes its file
    agent.tell("stop", run.compose_stop())
    assert sorted(sink.frames()) == [1, 2, 3] and agent.report()["failed_frames"] == {}
    want = _inline(denoiser, list(frames)).frames()
    for k in (1, 2, 3):
        np.testing.assert_array_equal(sink.frames()[k], want[k])

"""DetectorAnalysisAgent: frames in (inline and external), derived runs out, bad frames counted."""

from __future__ import annotations

import logging
import os
import re
import types

import event_model
import numpy as np
import pytest
import torch
from scipy import ndimage

from agents.daemon import build_agent
from agents.daemon_config import AgentEntry, load_daemon_config
from agents.errors import ConfigError
from agents.detector_agent import DetectorAnalysisAgent, DetectorSettings
from models.classical import integrate_in_mask
from models.nets import PeakUNet, PoissonDenoiser, SuperResolver, ring_consistent
from models.registry import WeightsError, WeightsRecord, save_weights
from simulators.detector import BraggRecipe, bragg_frame_2d, denoise_frame
from streams.derived import validate_document
from streams.zarr_reader import ZarrRunReader
from streams.zarr_writer import ZarrRunWriter

SHAPE = (32, 32)


class FakeClock:
    def __init__(self) -> None:
        self.t = 100.0

    def __call__(self) -> float:
        return self.t


def _save(tmp_path, model, architecture, name, config):
    record = WeightsRecord(name=name, architecture=architecture, architecture_config=config)
    return save_weights(model, tmp_path, record)


@pytest.fixture(scope="module")
def bragg_weights(tmp_path_factory):
    torch.manual_seed(0)
    model = PeakUNet(dims=2, width=4, depth=2)
    return model, _save(tmp_path_factory.mktemp("w"), model, "bragg-peak-unet", "tiny-bragg",
                        {"dims": 2, "width": 4, "depth": 2})


@pytest.fixture(scope="module")
def frames():
    return [bragg_frame_2d(seed, BraggRecipe(shape=SHAPE)).counts for seed in range(8)]


class Recorder:
    def __init__(self) -> None:
        self.docs: list[tuple[str, dict]] = []

    def __call__(self, name, doc) -> None:
        self.docs.append((name, doc))

    def events(self, stream: str) -> list[dict]:
        """The stream's events, event pages unpacked in place."""
        descriptors = {d["uid"] for n, d in self.docs if n == "descriptor" and d["name"] == stream}
        out = []
        for n, d in self.docs:
            if n in ("event", "event_page") and d["descriptor"] in descriptors:
                out.extend([d] if n == "event" else event_model.unpack_event_page(d))
        return out


def _raw_run(*, external: bool = False, key_shape=SHAPE):
    run = event_model.compose_run(metadata={"plan_name": "count"})
    data_key = {"dtype": "array", "shape": list(key_shape), "source": "sim"}
    if external:
        data_key["external"] = "FILESTORE:"
    desc = run.compose_descriptor(name="primary", data_keys={"det_image": data_key})
    return run, desc


def _event(desc, value, *, external: bool = False):
    kwargs = {"filled": {"det_image": False}} if external else {}
    return desc.compose_event(data={"det_image": value}, timestamps={"det_image": 1.0}, validate=False, **kwargs)


def _opened_run(agent):
    """Tell ``agent`` a raw run's start and descriptor; return them for its events and stop."""
    run, desc = _raw_run()
    agent.tell("start", run.start_doc)
    agent.tell("descriptor", desc.descriptor_doc)
    return run, desc


def _agent(weights, sinks, clock=None, **settings):
    base = {"analysis": "bragg", "weights": str(weights), "device": "cpu", "max_batch": 4, "max_latency_s": 0.0}
    return DetectorAnalysisAgent({**base, **settings}, sinks=sinks, clock=clock or FakeClock())


def test_inline_bragg_frames_make_a_valid_linked_derived_run(bragg_weights, frames):
    model, weights = bragg_weights
    with torch.inference_mode():  # a threshold that leaves a few peak components with background around
        p = torch.sigmoid(model(torch.from_numpy(frames[0].astype(np.float32))[None, None]))
    threshold = float(torch.quantile(p, 0.97))
    sink = Recorder()
    agent = _agent(weights, [sink], max_batch=3, max_latency_s=1e9, peak_threshold=threshold)
    run, desc = _opened_run(agent)
    raw = [_event(desc, f) for f in frames[:5]]
    for event in raw[:2]:
        agent.tell("event", event)
    page = event_model.pack_event_page(*raw[2:])
    agent.tell("event_page", page)
    agent.tell("stop", run.compose_stop())

    for name, doc in sink.docs:
        validate_document(name, doc)
    names = [n for n, _ in sink.docs]
    assert names[0] == "start" and names[-1] == "stop" and sink.docs[-1][1]["exit_status"] == "success"
    start = sink.docs[0][1]
    assert start["raw_run_uid"] == run.start_doc["uid"] and start["weights"]["name"] == "tiny-bragg"
    bragg = sink.events("bragg")
    assert [e["data"]["raw_seq_num"] for e in bragg] == [1, 2, 3, 4, 5]
    assert [e["data"]["raw_uid"] for e in bragg] == [e["uid"] for e in raw]
    assert all(e["data"]["peak_mask"].shape == SHAPE and e["data"]["peak_mask"].dtype == np.uint8 for e in bragg)
    # the peaks stream holds integrate_in_mask of the raw counts in the published mask, with touching
    # peaks cut apart along the network's logits
    peaks = sink.events("peaks")
    assert sum(e["data"]["n_peaks"] for e in bragg) == len(peaks) > 0
    # a frame's peaks travel as one event page, none for a frame without peaks; seq_num runs on
    pages = [d for n, d in sink.docs if n == "event_page"]
    assert len(pages) == sum(e["data"]["n_peaks"] > 0 for e in bragg)
    assert [p["seq_num"] for p in peaks] == list(range(1, len(peaks) + 1))
    for e, counts in zip(bragg, frames, strict=False):
        with torch.inference_mode():
            logits = model(torch.from_numpy(counts.astype(np.float32))[None, None])[0, 0].numpy()
        want = integrate_in_mask(counts, e["data"]["peak_mask"].astype(bool), score=logits)
        got = [p["data"] for p in peaks if p["data"]["raw_seq_num"] == e["data"]["raw_seq_num"]]
        assert [g["peak_index"] for g in got] == list(range(len(want.intensity)))
        np.testing.assert_allclose([g["intensity"] for g in got], want.intensity)
        np.testing.assert_allclose([g["sigma"] for g in got], want.sigma)
        np.testing.assert_allclose([g["centroid"] for g in got], want.centroids.reshape(-1, 2))
        np.testing.assert_array_equal([g["n_pixels"] for g in got], want.n_peak)
    report = agent.report()
    assert report["frames_in"] == report["frames_out"] == 5 and report["failed_frames"] == {}
    assert report["batch_sizes"] == {"3": 1, "2": 1}
    assert report["weights"]["architecture"] == "bragg-peak-unet" and len(report["weights"]["sha256"]) == 64
    assert report["inference"]["device"] == "cpu"


def test_runs_of_other_instruments_on_the_topic_are_neither_analysed_nor_failed(bragg_weights, frames, caplog):
    """One RunEngine's topic also carries its motor and diode scans. A run whose analysed stream
    declares no frame key is not this detector's: no derived run, no failed frames, no error
    line; the report counts it and names its keys, in case ``frame_key`` is what is wrong."""
    _, weights = bragg_weights
    sink = Recorder()
    agent = _agent(weights, [sink])
    diode = event_model.compose_run(metadata={"plan_name": "scan"})
    diode_desc = diode.compose_descriptor(name="primary", data_keys={
        "diode": {"dtype": "number", "shape": [], "source": "sim"}, "mtr": {"dtype": "number", "shape": [], "source": "sim"}})
    agent.tell("start", diode.start_doc)
    agent.tell("descriptor", diode_desc.descriptor_doc)
    run, desc = _opened_run(agent)  # a detector run, interleaved with the scan
    with caplog.at_level(logging.WARNING):
        for i, counts in enumerate(frames[:2]):
            agent.tell("event", diode_desc.compose_event(data={"diode": 1.0, "mtr": float(i)},
                                                         timestamps={"diode": 1.0, "mtr": 1.0}, seq_num=i + 1))
            agent.tell("event", _event(desc, counts))
        agent.tell("stop", diode.compose_stop())
        agent.tell("stop", run.compose_stop())
    report = agent.report()
    assert report["frames_in"] == report["frames_out"] == 2 and report["failed_frames"] == {}
    assert report["runs_without_frame_key"] == 1
    assert report["last_run_without_frame_key"] == {"run": diode.start_doc["uid"], "data_keys": ["diode", "mtr"]}
    starts = [d for n, d in sink.docs if n == "start"]
    assert [d["raw_run_uid"] for d in starts] == [run.start_doc["uid"]]  # no derived run of the scan
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]


def test_the_peaks_stream_lands_in_a_zarr_store_as_one_row_per_peak(bragg_weights, frames, tmp_path):
    model, weights = bragg_weights
    with torch.inference_mode():
        p = torch.sigmoid(model(torch.from_numpy(frames[0].astype(np.float32))[None, None]))
    sink, store = Recorder(), ZarrRunWriter(tmp_path / "derived.zarr")
    agent = _agent(weights, [sink, store], peak_threshold=float(torch.quantile(p, 0.97)))
    run, desc = _opened_run(agent)
    for f in frames[:4]:
        agent.tell("event", _event(desc, f))
    agent.tell("stop", run.compose_stop())
    store.close()
    published = [e["data"] for e in sink.events("peaks")]
    reader = ZarrRunReader(tmp_path / "derived.zarr")
    uid = sink.docs[0][1]["uid"]
    table = reader.table(uid, stream="peaks")
    assert len(published) > 0 and list(table["seq_num"]) == list(range(1, len(published) + 1))
    np.testing.assert_allclose(table["intensity"], [d["intensity"] for d in published])
    np.testing.assert_allclose(table["centroid"], [d["centroid"] for d in published])
    assert list(table["raw_seq_num"]) == [d["raw_seq_num"] for d in published]
    assert reader.stop(uid)["num_events"] == {"bragg": 4, "peaks": len(published)}


def test_external_npy_frames_through_resource_and_datum(bragg_weights, frames, tmp_path):
    _, weights = bragg_weights
    np.save(tmp_path / "stack.npy", np.stack(frames[:3]))  # one stacked file, a frame index per datum
    np.save(tmp_path / "single.npy", frames[3])  # one file per resource
    sink = Recorder()
    agent = _agent(weights, [sink], max_batch=8, max_latency_s=1e9)
    run, desc = _raw_run(external=True)
    stacked = run.compose_resource(spec="NPY", root=str(tmp_path), resource_path="stack.npy", resource_kwargs={})
    single = run.compose_resource(spec="NPY", root=str(tmp_path), resource_path="single.npy", resource_kwargs={})
    agent.tell("start", run.start_doc)
    agent.tell("descriptor", desc.descriptor_doc)
    agent.tell("resource", stacked.resource_doc)
    agent.tell("resource", single.resource_doc)
    datums = [stacked.compose_datum(datum_kwargs={"frame": i}) for i in range(3)]
    agent.tell("datum_page", event_model.pack_datum_page(*datums[1:]))
    agent.tell("datum", datums[0])
    last = single.compose_datum(datum_kwargs={})
    agent.tell("datum", last)
    for datum in [*datums, last]:
        agent.tell("event", _event(desc, datum["datum_id"], external=True))
    agent.tell("stop", run.compose_stop())
    for name, doc in sink.docs:
        validate_document(name, doc)
    assert [e["data"]["raw_seq_num"] for e in sink.events("bragg")] == [1, 2, 3, 4]
    assert agent.report()["failed_frames"] == {} and agent.report()["frames_out"] == 4


def test_frames_are_padded_to_what_an_unshuffled_u_net_needs(tmp_path):
    torch.manual_seed(0)
    model = PeakUNet(dims=2, width=4, depth=2, unshuffle=2)  # sizes must be multiples of 4, not 2
    weights = _save(tmp_path, model, "bragg-peak-unet", "tiny-unshuffled", {"dims": 2, "width": 4, "depth": 2,
                                                                         "unshuffle": 2})
    sink = Recorder()
    agent = _agent(weights, [sink])
    run, desc = _raw_run(key_shape=(34, 30))
    agent.tell("start", run.start_doc)
    agent.tell("descriptor", desc.descriptor_doc)
    agent.tell("event", _event(desc, bragg_frame_2d(0, BraggRecipe(shape=(34, 30))).counts))
    agent.tell("stop", run.compose_stop())
    assert agent.report()["failed_frames"] == {} and agent.report()["frames_out"] == 1
    assert np.asarray(sink.events("bragg")[0]["data"]["peak_mask"]).shape == (34, 30)


def test_batches_wait_for_max_batch_or_max_latency(bragg_weights, frames):
    _, weights = bragg_weights
    clock, sink = FakeClock(), Recorder()
    agent = _agent(weights, [sink], max_batch=4, max_latency_s=5.0, clock=clock)
    run, desc = _opened_run(agent)
    for i in range(3):
        agent.tell("event", _event(desc, frames[i]))
        clock.t += 1.0
    assert sink.events("bragg") == [] and agent.report()["frames_pending"] == 3
    agent.tell("event", _event(desc, frames[3]))  # the batch is full: all four run at once
    assert len(sink.events("bragg")) == 4 and agent.report()["batch_sizes"] == {"4": 1}
    agent.tell("event", _event(desc, frames[4]))
    clock.t += 4.9
    agent.tell("event", _event(desc, frames[5]))
    assert len(sink.events("bragg")) == 4  # the oldest waited 4.9 s < 5 s
    clock.t += 0.1
    assert agent.poll() == 2  # what a daemon calls when idle; every tell checks the same clock
    assert len(sink.events("bragg")) == 6
    agent.tell("event", _event(desc, frames[6]))
    agent.tell("stop", run.compose_stop())  # a stop runs what is pending
    report = agent.report()
    assert report["batch_sizes"] == {"1": 1, "2": 1, "4": 1} and report["frames_out"] == 7
    # waits on the fake clock: 3, 2, 1, 0 (full batch), 5, 0.1 (latency budget), 0 (stop)
    assert report["latency_s"]["p50"] == pytest.approx(1.0) and 4.8 < report["latency_s"]["p99"] <= 5.0


def test_bad_frames_are_counted_by_cause_and_the_stream_goes_on(bragg_weights, frames, tmp_path, caplog):
    _, weights = bragg_weights
    sink = Recorder()
    agent = _agent(weights, [sink], max_batch=2, max_latency_s=1e9)
    run, desc = _raw_run(key_shape=[None, None])  # shape fixed by the first frame
    agent.tell("start", run.start_doc)
    agent.tell("descriptor", desc.descriptor_doc)
    nan, negative = frames[2].copy(), frames[3].copy()
    nan[3, 4], negative[5, 6] = np.nan, -2.0
    values = [frames[0], frames[1][:16, :16], nan, negative, np.full(SHAPE, "x"), frames[4], [[1, 2], [3]],
              frames[5]]
    for value in values:
        agent.tell("event", _event(desc, value))
    agent.tell("stop", run.compose_stop())
    assert [e["data"]["raw_seq_num"] for e in sink.events("bragg")] == [1, 6, 8]
    assert agent.report()["failed_frames"] == {"shape": 2, "non_finite": 1, "negative": 1, "dtype": 1}
    assert f"run {run.start_doc['uid']} seq_num 3" in caplog.text and "non_finite" in caplog.text

    # external data: a missing file, an unsupported spec; the good frame after them comes out
    run, desc = _raw_run(external=True)
    missing = run.compose_resource(spec="NPY", root=str(tmp_path), resource_path="gone.npy", resource_kwargs={})
    cbf = run.compose_resource(spec="AD_CBF", root=str(tmp_path), resource_path="f", resource_kwargs={})
    np.save(tmp_path / "ok.npy", frames[6])
    ok = run.compose_resource(spec="NPY", root=str(tmp_path), resource_path="ok.npy", resource_kwargs={})
    agent.tell("start", run.start_doc)
    agent.tell("descriptor", desc.descriptor_doc)
    for res in (missing, cbf, ok):
        agent.tell("resource", res.resource_doc)
        datum = res.compose_datum(datum_kwargs={})
        agent.tell("datum", datum)
        agent.tell("event", _event(desc, datum["datum_id"], external=True))
    agent.tell("event", _event(desc, "never-sent-datum", external=True))
    agent.tell("stop", run.compose_stop())
    failed = agent.report()["failed_frames"]
    assert failed["missing_file"] == 1 and failed["unsupported_spec"] == 1 and failed["unknown_datum"] == 1
    assert "gone.npy" in caplog.text and "'AD_CBF' has no handler" in caplog.text
    assert sink.events("bragg")[-1]["data"]["raw_seq_num"] == 3
    for name, doc in sink.docs:
        validate_document(name, doc)


def test_read_noise_allows_slightly_negative_counts(bragg_weights, frames):
    _, weights = bragg_weights
    sink = Recorder()
    agent = _agent(weights, [sink], max_batch=1, read_noise=1.0)
    run, desc = _opened_run(agent)
    for shift in (-0.5, -6.0):  # -0.5 > -5 sigma passes; -6 does not
        frame = frames[0].copy()
        frame[0, 0] = shift
        agent.tell("event", _event(desc, frame))
    agent.tell("stop", run.compose_stop())
    assert len(sink.events("bragg")) == 1 and agent.report()["failed_frames"] == {"negative": 1}


def _masked_run(agent):
    """Open a raw run whose events carry the frame and a per-frame mask ("det_mask")."""
    run = event_model.compose_run()
    keys = {"det_image": {"dtype": "array", "shape": list(SHAPE), "source": "sim"},
            "det_mask": {"dtype": "array", "shape": list(SHAPE), "source": "sim"}}
    desc = run.compose_descriptor(name="primary", data_keys=keys)
    agent.tell("start", run.start_doc)
    agent.tell("descriptor", desc.descriptor_doc)
    return run, desc


def test_a_detector_mask_excuses_its_pixels(bragg_weights, frames):
    _, weights = bragg_weights
    sink = Recorder()
    agent = _agent(weights, [sink], max_batch=1, mask_key="det_mask", peak_threshold=0.01)
    run, desc = _masked_run(agent)
    mask = np.zeros(SHAPE, bool)
    mask[:, :4] = True  # a module gap
    frame = frames[0].copy()
    frame[:, :4] = np.nan  # what the gap reads: ignored
    for m in (mask, mask[:8]):  # the second mask has the wrong shape
        agent.tell("event", desc.compose_event(data={"det_image": frame, "det_mask": m},
                                               timestamps={"det_image": 1.0, "det_mask": 1.0}, validate=False))
    agent.tell("stop", run.compose_stop())
    (event,) = sink.events("bragg")
    assert not event["data"]["peak_mask"][:, :4].any() and event["data"]["peak_mask"][:, 4:].all()
    assert agent.report()["failed_frames"] == {"mask": 1}


def test_a_static_detector_mask_from_a_file_joins_the_per_frame_one(bragg_weights, frames, tmp_path, caplog):
    _, weights = bragg_weights
    static = np.zeros(SHAPE, np.uint8)
    static[:, -3:] = 1  # a module gap, non-zero as pyFAI writes masks
    np.save(tmp_path / "mask.npy", static)
    np.save(tmp_path / "small.npy", static[:8])
    sink = Recorder()
    agent = _agent(weights, [sink], max_batch=1, mask_key="det_mask", peak_threshold=0.01,
                   detector_mask=str(tmp_path / "mask.npy"))
    run, desc = _masked_run(agent)
    per_frame = np.zeros(SHAPE, bool)
    per_frame[:, :4] = True
    frame = frames[0].copy()
    frame[:, :4] = np.nan  # what either gap reads: ignored
    frame[:, -3:] = -7.0
    agent.tell("event", desc.compose_event(data={"det_image": frame, "det_mask": per_frame},
                                           timestamps={"det_image": 1.0, "det_mask": 1.0}, validate=False))
    agent.tell("stop", run.compose_stop())
    (event,) = sink.events("bragg")
    peaks = event["data"]["peak_mask"].astype(bool)
    assert not peaks[:, :4].any() and not peaks[:, -3:].any() and peaks[:, 4:-3].all()
    assert agent.report()["failed_frames"] == {}
    # a static mask of another shape fails each frame, named, and the stream goes on
    sink = Recorder()
    agent = _agent(weights, [sink], max_batch=1, detector_mask=str(tmp_path / "small.npy"))
    run, desc = _opened_run(agent)
    agent.tell("event", _event(desc, frames[0]))
    agent.tell("stop", run.compose_stop())
    assert agent.report()["failed_frames"] == {"mask": 1}
    assert "detector_mask" in caplog.text and "has shape [8, 32], the frame [32, 32]" in caplog.text


def test_a_detector_mask_that_cannot_be_read_is_a_config_error(bragg_weights, tmp_path, caplog):
    _, weights = bragg_weights
    np.save(tmp_path / "floats.npy", np.zeros(SHAPE))
    level = logging.getLogger("pyFAI.detectors._common").level
    for spec, match in ((str(tmp_path / "absent.npy"), "does not exist"), (str(tmp_path / "floats.npy"), "float64"),
                        ("pyfai:NoSuchDetector", "unknown pyFAI detector")):
        with pytest.raises(ConfigError, match=match), caplog.at_level(logging.DEBUG):
            _agent(weights, [], detector_mask=spec)
    # pyFAI's own error (every detector name it knows, ~400) is kept out of the log; its level is restored
    assert "please check" not in caplog.text and "pilatus1m" not in caplog.text.lower()
    assert logging.getLogger("pyFAI.detectors._common").level == level
    agent = _agent(weights, [], detector_mask="pyfai:Pilatus1M")  # a full Pilatus 1M: its module gaps
    assert agent.static_mask.shape == (1043, 981) and 0 < agent.static_mask.mean() < 0.2


def test_bragg_on_3d_time_of_flight_volumes(tmp_path):
    torch.manual_seed(0)
    weights = _save(tmp_path, PeakUNet(dims=3, width=2, depth=2), "bragg-peak-unet", "tof",
                    {"dims": 3, "width": 2, "depth": 2})
    counts = np.random.default_rng(0).poisson(2.0, (6, 16, 16)).astype(float)
    sink = Recorder()
    agent = _agent(weights, [sink], max_batch=1, peak_threshold=0.5)
    run, desc = _raw_run(key_shape=counts.shape)
    agent.tell("start", run.start_doc)
    agent.tell("descriptor", desc.descriptor_doc)
    agent.tell("event", _event(desc, counts))
    agent.tell("stop", run.compose_stop())
    for name, doc in sink.docs:
        validate_document(name, doc)
    (event,) = sink.events("bragg")
    assert event["data"]["peak_mask"].shape == counts.shape
    assert all(p["data"]["centroid"].shape == (3,) for p in sink.events("peaks"))


def test_denoise_and_super_resolution_streams(tmp_path):
    torch.manual_seed(0)
    den = _save(tmp_path, PoissonDenoiser(width=4, depth=2), "poisson-denoiser-unet", "tiny-den",
                {"width": 4, "depth": 2})
    sr = _save(tmp_path, SuperResolver(factor=2, width=4, depth=2), "sans-super-resolver", "tiny-sr",
               {"factor": 2, "width": 4, "depth": 2})
    frame = denoise_frame(0, "rings", (31, 33), mean_counts=2.0).counts  # odd sizes: padded inside
    for analysis, weights, key, shape in (("denoise", den, "denoised", (31, 33)),
                                          ("sans-sr", sr, "super_resolved", (62, 66))):
        sink = Recorder()
        agent = _agent(weights, [sink], analysis=analysis, max_batch=2)
        run, desc = _raw_run(key_shape=(1, 31, 33))  # an area detector's leading axis of 1
        agent.tell("start", run.start_doc)
        agent.tell("descriptor", desc.descriptor_doc)
        agent.tell("event", _event(desc, frame[None]))
        agent.tell("stop", run.compose_stop())
        for name, doc in sink.docs:
            validate_document(name, doc)
        (event,) = sink.events(analysis)
        assert event["data"][key].shape == shape and np.isfinite(event["data"][key]).all()
        if analysis == "sans-sr":  # the super-resolver keeps each coarse pixel's total (up to padding)
            np.testing.assert_allclose(event["data"][key].sum(), frame.sum(), rtol=0.2)


def _super_resolved(weights, frame, **settings):
    """What a sans-sr agent publishes for one frame, as float64."""
    sink = Recorder()
    agent = _agent(weights, [sink], analysis="sans-sr", max_batch=1, **settings)
    run, desc = _raw_run(key_shape=frame.shape)
    for name, doc in (("start", run.start_doc), ("descriptor", desc.descriptor_doc),
                      ("event", _event(desc, frame)), ("stop", run.compose_stop())):
        agent.tell(name, doc)
    (event,) = sink.events("sans-sr")
    return event["data"]["super_resolved"].astype(float)


def test_super_resolved_patterns_keep_the_measured_ring_sums(tmp_path):
    torch.manual_seed(1)
    sr = _save(tmp_path, SuperResolver(factor=2, width=4, depth=2), "sans-super-resolver", "tiny-sr",
               {"factor": 2, "width": 4, "depth": 2})
    frame = np.random.default_rng(3).poisson(40.0, (24, 28)).astype(float)
    raw, kept, offset = (_super_resolved(sr, frame, ring_consistency=False), _super_resolved(sr, frame),
                         _super_resolved(sr, frame, beam_center=(5.0, 20.0)))
    np.testing.assert_allclose(kept, ring_consistent(raw, frame, 2), rtol=1e-5)
    yy, xx = np.mgrid[0:24, 0:28]
    ring = np.floor(np.hypot(yy - 11.5, xx - 13.5) / 0.5).astype(int)

    def ring_error(fine):  # measured minus published counts, per half-pixel ring of the detector
        return np.abs(np.bincount(ring.ravel(), (frame - fine.reshape(24, 2, 28, 2).sum((1, 3))).ravel()))

    assert ring_error(kept).max() <= 3.0 + 1e-3  # the shrinkage of alpha = 3 counts, no more
    assert ring_error(raw).max() > 10.0  # an untrained network does not get there by itself
    assert not np.allclose(offset, kept)  # the rings follow the beam centre
    with pytest.raises(ValueError, match="beam_center"):
        DetectorSettings(analysis="sans-sr", weights=str(sr), beam_center=(float("nan"), 3.0))


def test_the_super_resolver_agent_averages_over_mirror_images_unless_told_not_to(tmp_path):
    torch.manual_seed(5)
    net = SuperResolver(factor=2, width=4, depth=2).eval()
    sr = _save(tmp_path, net, "sans-super-resolver", "sym-sr", {"factor": 2, "width": 4, "depth": 2})
    frame = np.random.default_rng(6).poisson(40.0, (24, 24)).astype(float)
    x = torch.from_numpy(frame.astype(np.float32))[None, None]
    for setting in (True, False):
        net.symmetric_average = setting
        with torch.inference_mode():
            want = net(x)[0, 0].numpy()
        got = _super_resolved(sr, frame, ring_consistency=False, symmetric_average=setting)
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-6)
    assert not np.allclose(_super_resolved(sr, frame, ring_consistency=False),  # default: on
                           _super_resolved(sr, frame, ring_consistency=False, symmetric_average=False))


def test_the_denoising_agent_averages_over_mirror_images_only_when_told_to(tmp_path):
    torch.manual_seed(6)
    net = PoissonDenoiser(width=4, depth=2).eval()
    den = _save(tmp_path, net, "poisson-denoiser-unet", "sym-den", {"width": 4, "depth": 2})
    frame = np.random.default_rng(7).poisson(3.0, (32, 32)).astype(float)
    x = torch.from_numpy(frame.astype(np.float32))[None, None]
    published = {}
    for setting in (None, True, False):
        sink = Recorder()
        agent = _agent(den, [sink], analysis="denoise", max_batch=1, symmetric_average=setting)
        run, desc = _raw_run(key_shape=frame.shape)
        for name, doc in (("start", run.start_doc), ("descriptor", desc.descriptor_doc),
                          ("event", _event(desc, frame)), ("stop", run.compose_stop())):
            agent.tell(name, doc)
        (event,) = sink.events("denoise")
        published[setting] = event["data"]["denoised"].astype(float)
    for setting in (True, False):
        net.symmetric_average = setting
        with torch.inference_mode():
            np.testing.assert_allclose(published[setting], net(x)[0, 0].numpy(), rtol=1e-4, atol=1e-6)
    np.testing.assert_array_equal(published[None], published[False])  # default: one pass
    assert not np.allclose(published[True], published[False])


def test_a_beam_aware_super_resolver_is_told_the_beam_centre_of_the_unpadded_frame(tmp_path):
    torch.manual_seed(2)
    net = SuperResolver(factor=2, width=4, depth=2, beam=True).eval()
    sr = _save(tmp_path, net, "sans-super-resolver", "beam-sr", {"factor": 2, "width": 4, "depth": 2, "beam": True})
    frame = np.random.default_rng(4).poisson(40.0, (23, 27)).astype(float)  # padded to 24 x 28 for the U-Net
    padded = torch.nn.functional.pad(torch.from_numpy(frame.astype(np.float32))[None, None], (0, 1, 0, 1),
                                     mode="replicate")
    for setting, centre in ((None, (11.0, 13.0)), ((5.0, 20.0), (5.0, 20.0))):
        net.beam_center = centre
        with torch.inference_mode():
            want = net(padded)[0, 0, :46, :54].numpy()
        got = _super_resolved(sr, frame, ring_consistency=False, beam_center=setting)
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-6)


def test_wrong_weights_are_refused_at_construction(tmp_path, bragg_weights):
    den = _save(tmp_path, PoissonDenoiser(width=4, depth=2), "poisson-denoiser-unet", "den",
                {"width": 4, "depth": 2})
    with pytest.raises(WeightsError, match="'poisson-denoiser-unet' weights, but a 'bragg-peak-unet'"):
        _agent(den, [])
    _, good = bragg_weights
    broken = tmp_path / "broken"
    broken.mkdir()
    for suffix in (".pt", ".json"):
        (broken / f"tiny-bragg{suffix}").write_bytes(good.with_suffix(suffix).read_bytes())
    with (broken / "tiny-bragg.pt").open("ab") as f:
        f.write(b"\0")
    with pytest.raises(WeightsError, match="detector agent 'detector' .*checksum mismatch"):
        _agent(broken / "tiny-bragg.pt", [])


def test_daemon_builds_a_detector_agent(tmp_path, bragg_weights):
    _, weights = bragg_weights
    settings = {"analysis": "bragg", "weights": str(weights), "frame_key": "pilatus_image", "device": "cpu"}
    config = load_daemon_config({"agents": [{"kind": "detector", "name": "peaks", "settings": settings}],
                                 "state_dir": str(tmp_path)})  # an analysis agent needs no safety section
    sink = Recorder()
    agent = build_agent(config.agents[0], tmp_path, [sink])
    assert isinstance(agent, DetectorAnalysisAgent) and agent.name == "peaks" and agent.ask(4) == []
    assert agent.settings.frame_key == "pilatus_image"
    with pytest.raises(Exception, match="analysis"):
        build_agent(AgentEntry(kind="detector", name="x", settings={"weights": str(weights)}), tmp_path, [])


class _ListSource:
    """A document source of records held in memory (the daemon's poll / positions interface)."""

    def __init__(self, docs, start: int = 0) -> None:
        from streams.kafka import Record

        self.records = [Record("raw", 0, i, 0, 0, name, doc) for i, (name, doc) in enumerate(docs)][start:]
        self.position = start

    def poll(self, timeout_s):
        out, self.records = self.records[:3], self.records[3:]
        self.position += len(out)
        return out

    def positions(self):
        return {"raw:0": self.position}

    def close(self) -> None:
        pass


class _ListSink(Recorder):
    def flush(self) -> None:
        pass

    def close(self) -> None:
        pass


def _daemon(tmp_path, weights, frames, *, stop, **batching):
    """A daemon with one Bragg detector agent, reading one raw run of ``frames`` from memory."""
    from agents.daemon import Daemon

    settings = {"analysis": "bragg", "weights": str(weights), "device": "cpu", **batching}
    config = load_daemon_config({"agents": [{"kind": "detector", "name": "peaks", "settings": settings}],
                                 "state_dir": str(tmp_path / "state"), "fsync": False})
    run, desc = _raw_run()
    docs = [("start", run.start_doc), ("descriptor", desc.descriptor_doc), *[("event", _event(desc, f)) for f in frames]]
    if stop:
        docs.append(("stop", run.compose_stop()))
    sink = _ListSink()
    return Daemon(config, source=_ListSource(docs), derived_sink=sink), sink, run


def test_daemon_runs_a_detector_agent_on_a_stream(tmp_path, bragg_weights, frames):
    daemon, sink, run = _daemon(tmp_path, bragg_weights[1], frames[:5], stop=True, max_batch=2, max_latency_s=1e9)
    try:
        while daemon.step():
            pass
    finally:
        daemon.close()
    assert [e["data"]["raw_seq_num"] for e in sink.events("bragg")] == [1, 2, 3, 4, 5]
    assert sink.docs[-1][0] == "stop" and sink.docs[0][1]["raw_run_uid"] == run.start_doc["uid"]
    assert daemon.agents["peaks"].report()["batch_sizes"] == {"1": 1, "2": 2}


def test_a_daemons_detector_agent_writes_its_frames_to_files_when_told(tmp_path, bragg_weights, frames):
    from agents.daemon import render_status_page
    from streams.external import ExternalData

    model, weights = bragg_weights
    with torch.inference_mode():  # a threshold that leaves a few peaks with background around them
        p = torch.sigmoid(model(torch.from_numpy(frames[0].astype(np.float32))[None, None]))
    threshold = float(torch.quantile(p, 0.97))
    daemon, sink, _ = _daemon(tmp_path, weights, frames[:3], stop=True, max_batch=2, peak_threshold=threshold,
                              files=str(tmp_path / "derived"))
    try:
        while daemon.step():
            pass
        status = daemon.status()
        page = render_status_page(status)  # what an operator sees: where, how much, the space left
        metrics = daemon.metrics.render().decode()
    finally:
        daemon.close()
    assert re.search(rf"frames to {tmp_path}/derived: <b>0\.00 GB</b> written, <b>[0-9.]+ GB</b> free", page)
    assert "is full in about" not in page  # no forecast from a moment's samples
    free = status["files_space"]["peaks"]["free_bytes"]
    assert re.search(r'beampilot_frame_files_free_bytes\{agent="peaks"\} ([0-9.e+]+)', metrics)
    assert 'beampilot_frame_files_seconds_to_full{agent="peaks"} NaN' in metrics
    assert 'beampilot_agent_frames_in_total{agent="peaks"} 3.0' in metrics
    assert 'beampilot_agent_frames_out_total{agent="peaks"} 3.0' in metrics
    # no queue server, no tiled: their gauges NaN (an alert on "== 0" does not fire), kept out of /status.json
    assert "beampilot_queueserver_connected NaN" in metrics and "beampilot_tiled_connected NaN" in metrics
    assert "beampilot_queueserver_connected" not in status["counters"] and "beampilot_broker_connected" in status["counters"]
    # a disk an hour from full: said at the top of the page and on the agent's line
    status["files_space"]["peaks"] |= {"seconds_to_full": 1800.0, "free_falling_bytes_per_s": free / 1800}
    status["agents"]["peaks"]["files"] = status["files_space"]["peaks"]
    page = render_status_page(status)
    assert f"agent peaks: the disk under {tmp_path}/derived is full in about 30 min" in page
    assert "full in about <b>30 min</b></span>" in page
    names = [n for n, _ in sink.docs]
    assert names.count("stream_resource") == 1 and names.count("stream_datum") == 3
    external = ExternalData()
    for name, doc in sink.docs:
        validate_document(name, doc)
        if name not in ("event", "event_page", "stop"):
            external.tell(name, doc)
    events = sink.events("bragg")
    assert [e["data"]["raw_seq_num"] for e in events] == [1, 2, 3]
    masks = [external.value(e, "peak_mask") for e in events]
    assert all(m.shape == SHAPE and m.dtype == np.uint8 for m in masks)
    inline = Recorder()  # the same agent in process, frames inline: the same masks
    agent = _agent(weights, [inline], max_batch=2, peak_threshold=threshold)
    raw, desc = _opened_run(agent)
    for f in frames[:3]:
        agent.tell("event", _event(desc, f))
    agent.tell("stop", raw.compose_stop())
    want = [e["data"]["peak_mask"] for e in inline.events("bragg")]
    assert 0 < sum(int(m.sum()) for m in want) < 0.5 * 3 * SHAPE[0] * SHAPE[1]
    for got, w in zip(masks, want, strict=True):
        np.testing.assert_array_equal(got, w)
    assert list((tmp_path / "derived").glob("*/bragg.h5"))


def test_a_daemon_that_cannot_checkpoint_says_so_once_a_minute_and_is_unhealthy(tmp_path, bragg_weights, frames,
                                                                              monkeypatch, caplog):
    """A full state disk: every save fails. The daemon goes on (availability), says so once a
    minute rather than every round (the log is on a disk too), and /healthz says why until a save
    succeeds again; no part-written temporary file is left to hold the space."""
    from agents.daemon import Checkpoint
    from streams import files

    daemon, sink, _ = _daemon(tmp_path, bragg_weights[1], frames[:6], stop=True, max_batch=1)

    def full(src, dst):
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(files, "os", types.SimpleNamespace(replace=full, fsync=os.fsync))  # this module's only
    try:
        with caplog.at_level("WARNING", logger="agents.daemon"):
            for _ in range(2):  # two rounds of three documents each, each round a failed save
                daemon.step()
        said = [r.getMessage() for r in caplog.records if "cannot write" in r.getMessage()]
        assert len(said) == 1 and "No space left on device" in said[0] and "free space in state_dir" in said[0]
        ok, why = daemon.healthy()
        assert not ok and "no checkpoint for" in why and "failed saves" in why
        assert not list((tmp_path / "state").glob("*.tmp"))
        monkeypatch.setattr(files, "os", os)
        caplog.clear()
        with caplog.at_level("WARNING", logger="agents.daemon"):
            while daemon.step():
                pass
        assert daemon.healthy()[0], daemon.healthy()
        assert any("checkpoint written again" in r.getMessage() for r in caplog.records)
        assert Checkpoint.load(tmp_path / "state" / "checkpoint.json").offsets == daemon.state.offsets
    finally:
        daemon.close()
    assert [e["data"]["raw_seq_num"] for e in sink.events("bragg")] == [1, 2, 3, 4, 5, 6]


def test_a_quiet_stream_still_gets_its_part_filled_batch_within_the_latency_budget(tmp_path, bragg_weights, frames):
    import time

    # the run stays open: no stop, no more documents
    daemon, sink, _ = _daemon(tmp_path, bragg_weights[1], frames[:1], stop=False, max_batch=8, max_latency_s=0.05)
    try:
        while daemon.step():
            pass
        assert sink.events("bragg") == []  # one frame waits for its batch
        time.sleep(0.1)
        daemon.step()  # nothing to read: the budget has passed, the batch runs anyway
    finally:
        daemon.close()
    assert [e["data"]["raw_seq_num"] for e in sink.events("bragg")] == [1]


def _stream_docs(tmp_path, frames):
    """One raw run written as an ophyd-async detector writes it: the frames in one HDF5 file, a
    stream_resource, then a stream_datum and an event (without the frame) per frame."""
    import h5py

    with h5py.File(tmp_path / "frames.h5", "w") as f:
        f.create_dataset("/entry/data/data", data=np.stack(frames)[:, None])
    run = event_model.compose_run(metadata={"plan_name": "count"})
    desc = run.compose_descriptor(name="primary", data_keys={
        "det_image": {"dtype": "array", "shape": [1, *SHAPE], "source": "file", "external": "STREAM:"},
        "stage_x": {"dtype": "number", "shape": [], "source": "sim"}})
    res = run.compose_stream_resource(mimetype="application/x-hdf5", uri=f"file://localhost{tmp_path}/frames.h5",
                                      data_key="det_image", parameters={"dataset": "/entry/data/data"})
    docs = [("start", run.start_doc), ("descriptor", desc.descriptor_doc), ("stream_resource", res.stream_resource_doc)]
    for i in range(len(frames)):
        docs.append(("stream_datum", res.compose_stream_datum(indices={"start": i, "stop": i + 1},
                                                              seq_nums={"start": i + 1, "stop": i + 2},
                                                              descriptor=desc.descriptor_doc)))
        docs.append(("event", desc.compose_event(data={"stage_x": float(i)}, timestamps={"stage_x": 0.0})))
    return run, docs + [("stop", run.compose_stop())]


def _external_docs(tmp_path, frames, *, pages=False):
    """One raw run whose frames are .npy files referenced by a resource and a datum per frame
    (``pages``: each datum sent as a datum page of one)."""
    run, desc = _raw_run(external=True)
    docs = [("start", run.start_doc), ("descriptor", desc.descriptor_doc)]
    for i, frame in enumerate(frames):
        np.save(tmp_path / f"f{i}.npy", frame)
        resource = run.compose_resource(spec="NPY", root=str(tmp_path), resource_path=f"f{i}.npy", resource_kwargs={})
        if i == 0:
            docs.append(("resource", resource.resource_doc))
            first = resource
        datum = (first if i == 0 else resource).compose_datum(datum_kwargs={})
        if i:
            docs.append(("resource", resource.resource_doc))
        sent = ("datum_page", event_model.pack_datum_page(datum)) if pages else ("datum", datum)
        docs += [sent, ("event", _event(desc, datum["datum_id"], external=True))]
    return run, docs + [("stop", run.compose_stop())]


def _detector_daemon(tmp_path, weights, docs, start=0, **batching):
    from agents.daemon import Daemon

    settings = {"analysis": "bragg", "weights": str(weights), "device": "cpu", **batching}
    config = load_daemon_config({"agents": [{"kind": "detector", "name": "peaks", "settings": settings}],
                                 "state_dir": str(tmp_path / "state"), "fsync": False})
    return Daemon(config, source=_ListSource(docs, start), derived_sink=(sink := _ListSink())), sink


@pytest.mark.parametrize("layout", ["datum", "datum_page", "stream"])
def test_a_killed_daemon_reads_waiting_frames_again_and_loses_none(tmp_path, bragg_weights, frames, layout):
    if layout == "stream":
        run, docs = _stream_docs(tmp_path, frames[:6])
    else:
        run, docs = _external_docs(tmp_path, frames[:6], pages=layout == "datum_page")
    daemon, sink = _detector_daemon(tmp_path, bragg_weights[1], docs, max_batch=2, max_latency_s=1e9)
    # read until a frame is waiting for its batch, with a checkpoint written after it
    while daemon.step() and not daemon.agents["peaks"].frames_waiting:
        pass
    assert daemon.agents["peaks"].frames_waiting == 1
    before = [e["data"]["raw_seq_num"] for e in sink.events("bragg")]
    saved = daemon.state.offsets["raw:0"]
    assert saved < daemon.source.position, "the checkpoint went past a frame not analysed yet"
    kept = daemon.state.open_runs[run.start_doc["uid"]]
    if layout == "stream":  # one stream resource for the whole run
        assert [r["uid"] for r in kept["stream_resources"]] == [docs[2][1]["uid"]]
    else:
        assert len(kept["resources"]) >= 2 and len(kept["datums"]) <= 2  # datums of passed events are dropped
    # SIGKILL: no close(), the checkpoint on disk is all that is left; the broker re-delivers from it
    daemon._state_lock.release()  # as the kernel does for a killed process
    again, sink2 = _detector_daemon(tmp_path, bragg_weights[1], docs, start=saved, max_batch=2, max_latency_s=1e9)
    try:
        while again.step():
            pass
    finally:
        again.close()
    after = [e["data"]["raw_seq_num"] for e in sink2.events("bragg")]
    assert sorted(before + after) == [1, 2, 3, 4, 5, 6], (before, after)
    # the frames after the restart needed resources sent before the saved position: re-primed
    assert again.agents["peaks"].report()["failed_frames"] == {}
    stops = [d for n, d in sink2.docs if n == "stop"]
    assert {d["exit_status"] for d in stops} == {"abort", "success"}  # the killed derived run, the new one
    for name, doc in sink2.docs:
        validate_document(name, doc)


def test_a_clean_shutdown_runs_the_waiting_batch_first(tmp_path, bragg_weights, frames):
    run, docs = _external_docs(tmp_path, frames[:1])
    daemon, sink = _detector_daemon(tmp_path, bragg_weights[1], docs[:-1], max_batch=8, max_latency_s=1e9)
    while daemon.step():
        pass
    assert daemon.agents["peaks"].frames_waiting == 1 and sink.events("bragg") == []
    daemon.close()
    assert [e["data"]["raw_seq_num"] for e in sink.events("bragg")] == [1]
    assert daemon.state.offsets["raw:0"] == len(docs) - 1  # nothing left to read again


def _gaussian(shape, centre, sigma, intensity):
    yy, xx = np.indices(shape, dtype=float)
    g = np.exp(-0.5 * (((yy - centre[0]) / sigma) ** 2 + ((xx - centre[1]) / sigma) ** 2))
    return intensity * g / g.sum()


@pytest.mark.parametrize("separation", [3.0, None])
def test_touching_peaks_are_published_apart(separation):
    """With the shipped Bragg U-Net, two peaks whose masks touch are two peaks in the ``peaks``
    stream (cut along the network's logits), or one with ``peak_separation: None``."""
    shape, centres, intensities = (64, 64), [(30.0, 26.0), (31.0, 33.0)], [3000.0, 1500.0]
    truth = 2.0 + sum(_gaussian(shape, c, 1.6, i) for c, i in zip(centres, intensities, strict=True))
    counts = np.random.default_rng(3).poisson(truth).astype(np.float64)
    sink = Recorder()
    agent = _agent("bragg", [sink], peak_separation=separation)
    run, desc = _raw_run(key_shape=shape)
    agent.tell("start", run.start_doc)
    agent.tell("descriptor", desc.descriptor_doc)
    agent.tell("event", _event(desc, counts))
    agent.tell("stop", run.compose_stop())
    (bragg,) = sink.events("bragg")
    mask = bragg["data"]["peak_mask"].astype(bool)
    assert ndimage.label(mask, np.ones((3, 3)))[1] == 1  # the two peaks make one component
    peaks = [e["data"] for e in sink.events("peaks")]
    if separation is None:
        # both peaks' counts in one (less the tails in its background shell: a few percent)
        assert len(peaks) == 1 and peaks[0]["intensity"] == pytest.approx(sum(intensities), rel=0.1)
        return
    assert len(peaks) == 2
    cents = np.array([p["centroid"] for p in peaks])
    nearest = [int(np.linalg.norm(cents - c, axis=1).argmin()) for c in centres]
    assert sorted(nearest) == [0, 1] and np.linalg.norm(cents[nearest] - centres, axis=1).max() < 1.0
    # each peak's intensity, give or take the tail the cut hands to the other
    np.testing.assert_allclose([peaks[k]["intensity"] for k in nearest], intensities, rtol=0.12)


@pytest.mark.parametrize("grow", [2.0, None])
def test_peaks_are_summed_over_the_aperture_the_settings_ask_for(grow):
    """``aperture_grow_sigma`` reaches the integrator: the mask and the rings a curve of growth
    takes (the default), or the mask alone (``None``)."""
    shape = (64, 64)
    truth = 2.0 + _gaussian(shape, (30.0, 26.0), 1.6, 3000.0) + _gaussian(shape, (20.0, 45.0), 2.2, 2000.0)
    counts = np.random.default_rng(4).poisson(truth).astype(np.float64)
    sink = Recorder()
    agent = _agent("bragg", [sink], aperture_grow_sigma=grow)
    run, desc = _raw_run(key_shape=shape)
    for name, doc in (("start", run.start_doc), ("descriptor", desc.descriptor_doc),
                      ("event", _event(desc, counts)), ("stop", run.compose_stop())):
        agent.tell(name, doc)
    (bragg,) = sink.events("bragg")
    mask = bragg["data"]["peak_mask"].astype(bool)
    with torch.inference_mode():
        logits = agent.model(torch.from_numpy(counts.astype(np.float32))[None, None])[0, 0].numpy()
    want = integrate_in_mask(counts, mask, score=logits, grow_sigma=grow)
    peaks = [e["data"] for e in sink.events("peaks")]
    assert len(peaks) == len(want.intensity) == 2
    np.testing.assert_array_equal([p["n_pixels"] for p in peaks], want.n_peak)
    np.testing.assert_allclose([p["intensity"] for p in peaks], want.intensity, rtol=1e-6)
    if grow is None:
        np.testing.assert_array_equal(want.n_peak, [(want.labels == k).sum() for k in (1, 2)])
    else:
        assert all(want.n_peak > [(want.labels == k).sum() for k in (1, 2)])


def test_a_denoiser_told_the_read_noise_gets_the_agents_read_noise_setting(tmp_path):
    """An integrating detector's frames (negative readings accepted down to -5 sigma) go to a
    denoiser that takes the read noise with the setting's value as its second channel: what the
    agent publishes is the network's output for exactly that input."""
    torch.manual_seed(0)
    model = PoissonDenoiser(width=4, depth=2, read_noise=True)
    weights = _save(tmp_path, model, "poisson-denoiser-unet", "tiny-told", {"width": 4, "depth": 2, "read_noise": True})
    rng = np.random.default_rng(5)
    frame = rng.poisson(0.5, SHAPE) + rng.normal(0.0, 1.0, SHAPE)
    assert frame.min() < 0
    published = {}
    for sigma in (2.0, 1.0):
        sink = Recorder()
        agent = _agent(weights, [sink], analysis="denoise", max_batch=1, read_noise=sigma)
        run, desc = _opened_run(agent)
        agent.tell("event", _event(desc, frame))
        agent.tell("stop", run.compose_stop())
        (event,) = sink.events("denoise")
        published[sigma] = event["data"]["denoised"]
        x = torch.as_tensor(np.stack([frame, np.full(SHAPE, sigma)])[None].astype(np.float32))
        with torch.no_grad():
            expected = model.eval()(x)[0, 0].numpy()
        np.testing.assert_allclose(published[sigma], expected, rtol=1e-5, atol=1e-6)
    assert not np.allclose(published[2.0], published[1.0])


def test_a_read_noise_setting_larger_than_the_frames_whole_noise_is_refused_by_name(tmp_path, caplog, bragg_weights):
    """A setting in ADU instead of counts, or on a photon-counting detector, would have a told
    denoiser smooth the frame as if it were that noisy: such a frame is refused (cause
    ``read_noise``) with the setting and the frame's noise named, and the next frame, whose
    noise allows the setting, is denoised. A network not told the read noise only uses the
    setting as the floor of negative readings, so it is not refused there."""
    torch.manual_seed(0)
    model = PoissonDenoiser(width=4, depth=2, read_noise=True)
    weights = _save(tmp_path, model, "poisson-denoiser-unet", "tiny-told", {"width": 4, "depth": 2, "read_noise": True})
    rng = np.random.default_rng(7)
    photon_counting = rng.poisson(0.2, SHAPE).astype(float)  # whole noise about 0.45 counts rms
    integrating = rng.poisson(0.5, SHAPE) + rng.normal(0.0, 1.5, SHAPE)  # about 1.7
    sink = Recorder()
    agent = _agent(weights, [sink], analysis="denoise", max_batch=1, read_noise=2.0)
    run, desc = _opened_run(agent)
    with caplog.at_level(logging.WARNING):
        agent.tell("event", _event(desc, photon_counting))
        agent.tell("event", _event(desc, integrating))
    agent.tell("stop", run.compose_stop())
    assert agent.report()["failed_frames"] == {"read_noise": 1}
    assert "read_noise=2 counts rms" in caplog.text and "ADU" in caplog.text
    (event,) = sink.events("denoise")
    assert event["data"]["raw_seq_num"] == 2
    # the same setting with a network not told the read noise: both frames analysed
    _, blind = bragg_weights
    sink = Recorder()
    agent = _agent(blind, [sink], max_batch=1, read_noise=2.0)
    run, desc = _opened_run(agent)
    agent.tell("event", _event(desc, photon_counting))
    agent.tell("stop", run.compose_stop())
    assert len(sink.events("bragg")) == 1 and not agent.report()["failed_frames"]


def test_a_disk_filling_under_the_frame_files_is_said_before_it_is_full(tmp_path, bragg_weights, frames, caplog):
    """The agent forecasts when the disk under ``files`` is full and warns an hour, then ten
    minutes, ahead; the report carries the forecast. (The disk is made to fall 1 GB for every 10 s
    of a clock the test moves: a real one fills too slowly for a test.)"""
    from streams.frame_files import SpaceForecast

    agent = _agent(bragg_weights[1], [Recorder()], max_batch=1, files=str(tmp_path / "frames"))
    disk = {"now": 0.0, "free": 30e9}

    def clock():
        disk["now"] += 10.0
        disk["free"] -= 1e9
        return disk["now"]

    agent._space = SpaceForecast(lambda: int(disk["free"]), clock=clock, every_s=5.0)
    run, desc = _opened_run(agent)
    with caplog.at_level(logging.WARNING, logger="agents.detector_agent"):
        for f in frames[:8]:
            agent.tell("event", _event(desc, f))
    said = [r.getMessage() for r in caplog.records if "is full in about" in r.getMessage()]
    assert len(said) == 1 and str(tmp_path / "frames") in said[0] and "360.0 GB/h" in said[0]
    report = agent.report()["files"]
    assert report["free_falling_bytes_per_s"] == pytest.approx(1e8)
    assert report["seconds_to_full"] == pytest.approx((report["free_bytes"] - 64 * 2**20) / 1e8)
    agent.tell("stop", run.compose_stop())


def test_derived_frames_go_to_files_when_the_agent_has_a_directory(tmp_path, bragg_weights, frames):
    """With ``files`` the frames leave the events for HDF5 files that stream documents name; read
    back, they are what the same agent publishes inline. Vectors (the peaks' centroids) stay."""
    from streams.external import ExternalData

    torch.manual_seed(0)
    den = _save(tmp_path, PoissonDenoiser(width=4, depth=2), "poisson-denoiser-unet", "tiny-den",
                {"width": 4, "depth": 2})
    with torch.inference_mode():  # a threshold that leaves a few peaks with background around them
        p = torch.sigmoid(bragg_weights[0](torch.from_numpy(frames[0].astype(np.float32))[None, None]))
    threshold = float(torch.quantile(p, 0.97))
    for analysis, weights, key, extra in (("denoise", den, "denoised", {}),
                                          ("bragg", bragg_weights[1], "peak_mask", {"peak_threshold": threshold})):
        published = {}
        for files in (None, tmp_path / analysis):
            sink = Recorder()
            agent = _agent(weights, [sink], analysis=analysis, max_batch=2, files=files and str(files), **extra)
            run, desc = _opened_run(agent)
            for f in frames[:3]:
                agent.tell("event", _event(desc, f))
            agent.tell("stop", run.compose_stop())
            for name, doc in sink.docs:
                validate_document(name, doc)
            published[files is not None] = sink
            report = agent.report()["files"]
            if files is None:
                assert report is None
            else:  # three frames of 32 x 32, float32 (denoised) or uint8 (peak_mask)
                assert report["bytes_written"] == 3 * 32 * 32 * (4 if analysis == "denoise" else 1)
                assert report["directory"] == str(files) and report["free_bytes"] > 0
        inline, filed = published[False], published[True]
        (descriptor,) = [d for n, d in filed.docs if n == "descriptor" and d["name"] == analysis]
        assert descriptor["data_keys"][key]["external"] == "STREAM:"
        assert all(key not in e["data"] for e in filed.events(analysis))
        assert filed.docs[0][1]["raw_run_uid"] == run.start_doc["uid"] and filed.docs[-1][0] == "stop"
        external = ExternalData()
        for name, doc in filed.docs:
            if name not in ("event", "event_page", "stop"):  # at a stop it forgets the run's files
                external.tell(name, doc)
        for event, want in zip(filed.events(analysis), inline.events(analysis), strict=True):
            got = external.value(event, key)
            assert got.dtype == want["data"][key].dtype
            np.testing.assert_array_equal(got, want["data"][key])
        if analysis == "bragg":
            peaks = filed.events("peaks")
            assert peaks and all(e["data"]["centroid"].shape == (2,) for e in peaks)
            intensities = [e["data"]["intensity"] for e in peaks]
            assert np.isfinite(intensities).all()
            assert intensities == [e["data"]["intensity"] for e in inline.events("peaks")]
    # the directory is checked with the other settings, before any frame comes
    (tmp_path / "a-file").write_text("")
    with pytest.raises(ValueError, match="files .*a-file.* is a file: name a directory"):
        DetectorSettings(analysis="bragg", weights="x", files=str(tmp_path / "a-file"))

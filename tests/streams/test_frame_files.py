"""Derived arrays in HDF5 files named by stream_resource / stream_datum (DerivedRunWriter(files=...))."""

from __future__ import annotations

import h5py
import numpy as np
import pytest

from streams.derived import DerivedRunWriter, validate_document
from streams.errors import DocumentError, StreamError
from streams.external import ExternalData

FRAME = {"dtype": "array", "shape": [4, 5], "dtype_numpy": "<f4", "source": "test"}
SEQ = {"dtype": "integer", "shape": [], "source": "test"}


def _writer(tmp_path, docs):
    run = DerivedRunWriter([lambda n, d: docs.append((n, d))], raw_run_uid="raw", files=tmp_path / "frames")
    run.add_stream("denoise", {"denoised": FRAME, "raw_seq_num": SEQ}, external=["denoised"])
    return run


def _frame(i):
    return np.arange(20, dtype=np.float32).reshape(4, 5) + 100 * i


def test_frames_go_to_a_file_and_the_documents_name_their_rows(tmp_path):
    docs = []
    run = _writer(tmp_path, docs)
    for i in range(3):
        run.emit("denoise", {"denoised": _frame(i), "raw_seq_num": i})
    run.emit_page("denoise", [{"denoised": _frame(i), "raw_seq_num": i} for i in (3, 4)])
    # the reader reads each row while the writer still holds the file open (SWMR)
    external = ExternalData()
    for name, doc in docs:
        validate_document(name, doc)
        if name not in ("event", "event_page"):
            external.tell(name, doc)
    descriptor = next(d for n, d in docs if n == "descriptor")
    assert descriptor["data_keys"]["denoised"]["external"] == "STREAM:"
    assert "external" not in descriptor["data_keys"]["raw_seq_num"]
    for seq_num in range(1, 6):
        got = external.value({"descriptor": descriptor["uid"], "seq_num": seq_num, "data": {}}, "denoised")
        np.testing.assert_array_equal(got, _frame(seq_num - 1))
    # the events are light; each stream_datum comes before the event(s) it names
    names = [n for n, _ in docs]
    assert names == ["start", "descriptor", "stream_resource"] + ["stream_datum", "event"] * 3 + \
        ["stream_datum", "event_page"]
    assert all("denoised" not in d["data"] for n, d in docs if n in ("event", "event_page"))
    assert docs[-2][1]["seq_nums"] == {"start": 4, "stop": 6} and docs[-2][1]["indices"] == {"start": 3, "stop": 5}
    run.close()
    resource = next(d for n, d in docs if n == "stream_resource")
    path = tmp_path / "frames" / run.start_uid / "denoise.h5"
    assert resource["uri"] == f"file://localhost{path}" and resource["run_start"] == run.start_uid
    with h5py.File(path, "r") as f:  # closed at the stop: an ordinary reader opens it
        assert f["/entry/denoised"].shape == (5, 4, 5) and f["/entry/denoised"].dtype == np.float32


def test_a_frame_of_the_wrong_shape_sends_nothing_and_keeps_the_seq_num(tmp_path):
    docs = []
    run = _writer(tmp_path, docs)
    sent = len(docs)
    with pytest.raises(DocumentError, match=r"'denoised' is declared shape=\[4, 5\] but received shape=\[5, 4\]"):
        run.emit("denoise", {"denoised": np.zeros((5, 4), np.float32), "raw_seq_num": 0})
    with pytest.raises(DocumentError, match="row 1 of 2: data key 'denoised' .* is missing"):
        run.emit_page("denoise", [{"denoised": _frame(0), "raw_seq_num": 0}, {"raw_seq_num": 1}])
    assert len(docs) == sent
    event = run.emit("denoise", {"denoised": _frame(7), "raw_seq_num": 0})
    assert event["seq_num"] == 1 and docs[-2][1]["indices"] == {"start": 0, "stop": 1}


def test_a_failed_write_is_an_error_naming_the_file_and_gives_the_seq_num_back(tmp_path):
    docs = []
    run = _writer(tmp_path, docs)
    run._files._streams["denoise"].close()  # as a full disk or a vanished mount would fail it
    sent = len(docs)
    with pytest.raises(StreamError, match=r"cannot append to .*denoise\.h5 \(stream 'denoise'\)"):
        run.emit("denoise", {"denoised": _frame(0), "raw_seq_num": 0})
    assert len(docs) == sent and run._bundle.compose_descriptor.event_counters["denoise"] == 1


def test_external_keys_need_a_directory_and_a_numeric_fixed_shape(tmp_path):
    inline = DerivedRunWriter([lambda n, d: None], raw_run_uid="raw")
    with pytest.raises(ValueError, match="no files directory; pass files=DIR"):
        inline.add_stream("denoise", {"denoised": FRAME}, external=["denoised"])
    run = DerivedRunWriter([lambda n, d: None], raw_run_uid="raw", files=tmp_path)
    with pytest.raises(ValueError, match=r"external keys \['frame'\] .* not among its data keys"):
        run.add_stream("a", {"denoised": FRAME}, external=["frame"])
    with pytest.raises(StreamError, match="'denoised' of stream 'b': a file needs a numeric dtype_numpy"):
        run.add_stream("b", {"denoised": {**FRAME, "dtype_numpy": "<U4"}}, external=["denoised"])
    with pytest.raises(StreamError, match=r"'denoised' of stream 'c': a file needs a fixed shape, got \[4, None\]"):
        run.add_stream("c", {"denoised": {**FRAME, "shape": [4, None]}}, external=["denoised"])
    run.add_stream("b", {"denoised": FRAME}, external=["denoised"])  # a refused stream can be declared again


def test_a_directory_that_cannot_be_written_is_named(tmp_path):
    (tmp_path / "file").write_text("")
    run = DerivedRunWriter([lambda n, d: None], raw_run_uid="raw", files=tmp_path / "file")
    with pytest.raises(StreamError, match=r"cannot write the HDF5 file .*file/.*/denoise\.h5 of derived stream"):
        run.add_stream("denoise", {"denoised": FRAME}, external=["denoised"])


def test_a_disk_too_full_refuses_the_write_before_hdf5_meets_it(tmp_path, monkeypatch, caplog):
    """HDF5 must not meet a full disk: a failed write, then a failed close, then freeing the file's
    objects crashed the process (a segmentation fault, on a 3 MB tmpfs). Space is checked first:
    a clear error, nothing sent, and the frames go on as soon as there is room."""
    import streams.frame_files as frame_files

    docs = []
    monkeypatch.setattr(frame_files, "MIN_FREE_BYTES", 2**62)
    run = DerivedRunWriter([lambda n, d: docs.append((n, d))], raw_run_uid="raw", files=tmp_path)
    with pytest.raises(StreamError, match=r"cannot create .*denoise\.h5: \d+ MiB free on the file system of .* kept "
                                          r"free; free space there"):
        run.add_stream("denoise", {"denoised": FRAME, "raw_seq_num": SEQ}, external=["denoised"])
    monkeypatch.setattr(frame_files, "MIN_FREE_BYTES", 0)
    run.add_stream("denoise", {"denoised": FRAME, "raw_seq_num": SEQ}, external=["denoised"])
    monkeypatch.setattr(frame_files, "MIN_FREE_BYTES", 2**62)
    sent = len(docs)
    with pytest.raises(StreamError, match=r"cannot append to .*denoise\.h5: .* MiB free .* 0\.0 MiB needed"):
        run.emit("denoise", {"denoised": _frame(0), "raw_seq_num": 0})
    assert len(docs) == sent
    monkeypatch.setattr(frame_files, "MIN_FREE_BYTES", 0)
    run.emit("denoise", {"denoised": _frame(1), "raw_seq_num": 1})
    assert docs[-1][1]["seq_num"] == 1 and docs[-2][1]["indices"] == {"start": 0, "stop": 1}
    monkeypatch.setattr(frame_files, "MIN_FREE_BYTES", 2**62)  # full at the stop: the file is left open
    with caplog.at_level("ERROR", logger="streams.frame_files"):
        run.close()
    assert docs[-1][0] == "stop" and "left open, its flushed rows readable by SWMR readers" in caplog.text
    external = ExternalData()
    for name, doc in docs[:-1]:
        if name not in ("event", "event_page"):
            external.tell(name, doc)
    descriptor = next(d for n, d in docs if n == "descriptor")
    np.testing.assert_array_equal(external.value({"descriptor": descriptor["uid"], "seq_num": 1, "data": {}},
                                                 "denoised"), _frame(1))


def test_a_write_that_fails_anyway_leaves_the_file_alone(tmp_path, caplog):
    """A write HDF5 fails (the disk filled between the check and the write) is an error for that
    frame and those after it in the file; the file is neither written nor closed again (closing
    it is what crashed), and the run's stop still goes out."""
    docs = []
    run = _writer(tmp_path, docs)
    run.emit("denoise", {"denoised": _frame(0), "raw_seq_num": 0})
    dataset = run._files._streams["denoise"].datasets["denoised"]

    def no_space():
        raise RuntimeError("Unable to flush dataset (file write failed: errno = 28, 'No space left on device')")
    dataset.flush = no_space
    with pytest.raises(StreamError, match=r"cannot append to .*denoise\.h5: Unable to flush dataset .*No space"):
        run.emit("denoise", {"denoised": _frame(1), "raw_seq_num": 1})
    with pytest.raises(StreamError, match=r"is not written any more: an earlier write failed \(Unable to flush"):
        run.emit("denoise", {"denoised": _frame(2), "raw_seq_num": 2})
    with caplog.at_level("ERROR", logger="streams.frame_files"):
        run.close()
    assert docs[-1][0] == "stop" and caplog.text == ""
    assert run._files._streams["denoise"]._file.id.valid  # left open, not closed


class _Disk:
    """A file system's free bytes on a clock the test moves (the real one fills too slowly)."""

    def __init__(self, free):
        self.free, self.now = free, 0.0

    def __call__(self):
        if self.free is None:
            raise OSError("Stale file handle")
        return self.free


def test_the_time_to_a_full_disk_is_forecast_from_how_fast_its_free_space_falls():
    from streams.frame_files import MIN_FREE_BYTES, SpaceForecast

    disk = _Disk(10 * 2**30)
    space = SpaceForecast(disk, clock=lambda: disk.now)
    said = []
    for _ in range(6):  # 25 s seen: too little to say how fast it falls
        said.append(space.poll())
        disk.now += 5.0
        disk.free -= 50 * 2**20
    f = space.forecast()
    assert f["free_bytes"] == 10 * 2**30 - 5 * 50 * 2**20 and f["seconds_left"] is None
    assert said == [None] * 6
    # 10 MiB/s: the 10 GiB left last about a quarter of an hour, less what is kept free
    assert space.poll() == 3600.0  # under the hour as soon as it can be said
    f = space.forecast()
    assert f["falling_bytes_per_s"] == pytest.approx(10 * 2**20)
    assert f["seconds_left"] == pytest.approx((disk.free - MIN_FREE_BYTES) / (10 * 2**20))
    assert space.poll() is None  # within every_s: no new sample
    levels = []
    while disk.free > MIN_FREE_BYTES:
        disk.now += 5.0
        disk.free -= 50 * 2**20
        levels.append(space.poll())
    # the hour had passed before a forecast could be made: said once at once; ten minutes once
    assert [x for x in levels if x is not None] == [600.0]
    assert space.forecast()["seconds_left"] == 0.0
    # someone frees space: the forecast follows within the window, and no longer falls
    disk.free = 500 * 2**30
    for _ in range(70):
        disk.now += 5.0
        space.poll()
    assert space.forecast()["seconds_left"] is None


def test_a_disk_warning_is_said_once_per_level_and_again_after_space_was_freed():
    from streams.frame_files import SpaceForecast

    disk = _Disk(100 * 2**30)
    space = SpaceForecast(disk, clock=lambda: disk.now, window_s=60, min_span_s=30)

    def run(seconds, falling):
        out = []
        for _ in range(int(seconds / 5)):
            disk.now += 5.0
            if disk.free is not None:
                disk.free -= int(falling * 5)
            out.append(space.poll())
        return [x for x in out if x is not None]

    assert run(120, 10 * 2**20) == []  # 100 GiB at 10 MiB/s: about 2.8 h
    assert run(60, 40 * 2**20) == [3600.0]  # four times faster: under the hour, said once
    assert run(60, 40 * 2**20) == []
    assert run(120, 5 * 2**20) == []  # slower: more than two hours left again, so the levels are said anew
    assert run(60, 40 * 2**20) == [3600.0]
    disk.free += 90 * 2**30  # freed: the forecast rises with it
    assert run(120, 10 * 2**20) == []
    assert run(4400, 40 * 2**20) == [3600.0, 600.0]  # the hour, then ten minutes, each once
    disk.free += 500 * 2**30
    assert run(120, 0) == []
    disk.free = 2 * 2**30  # a sudden loss past both levels says the nearer one
    assert run(30, 0) == [600.0]
    disk.free = None  # the mount is gone: not sampled, nothing said, the last forecast stands
    assert run(30, 0) == [] and space.forecast()["free_bytes"] is not None
    with pytest.raises(ValueError, match="min_span_s"):
        SpaceForecast(disk, window_s=10, min_span_s=30)

"""Derived arrays written to HDF5 files beside the documents, as ophyd-async detectors write frames.

A derived frame inline in its event (a denoised 512 x 512 frame is 1 MiB of float32) makes every
Kafka message as large as the frame, over a default broker's ``message.max.bytes`` (about 1 MB),
and makes tiled ingest every frame into its own store. :class:`FrameFiles` keeps such arrays in
files instead: one HDF5 file per derived stream of a run, one dataset per data key growing by one
row per event, written in SWMR mode (readers see each row as soon as it is flushed, while the
file is still open). The documents then name the rows as detectors' do: the descriptor marks the
key ``external: "STREAM:"``, a ``stream_resource`` names the file and dataset, and a
``stream_datum`` maps each event's ``seq_num`` to its row (:class:`streams.derived.DerivedRunWriter`
composes them). :class:`streams.external.ExternalData` reads them back, and tiled's HDF5 adapter
registers the files rather than copying them (the tiled server must be allowed to read the
directory: ``tiled serve ... -r DIR``).

Files go to ``<directory>/<derived run uid>/<stream>.h5``, the datasets to ``/entry/<key>``. A row
is flushed to the file before any document naming it is sent, so a reader never meets a
``stream_datum`` whose row is not there.
"""

from __future__ import annotations

import logging
import math
import os
import shutil
import time
from collections import deque
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any
from urllib.parse import quote

import numpy as np

from streams.errors import StreamError

__all__ = ["MIMETYPE", "MIN_FREE_BYTES", "FrameFiles", "SpaceForecast", "time_left_text"]

logger = logging.getLogger(__name__)

#: the stream_resource mimetype of the files (tiled's and ophyd-async's name for HDF5)
MIMETYPE = "application/x-hdf5"


def file_uri(path: Path) -> str:
    """``file://localhost/...`` for an absolute ``path``, as ophyd-async writes stream resources' uris."""
    return "file://localhost" + quote(str(path.resolve()))


#: Space a file system must keep free after a write: a write is refused, as a clear error, before
#: the disk fills. HDF5 must not meet a full disk: a write that fails there leaves the file in a
#: state its close cannot leave, and a failed close followed by freeing the file's objects crashes
#: the process (segmentation fault; h5py 3.16, measured on a 3 MB tmpfs).
MIN_FREE_BYTES = 64 * 2**20

#: (file, datasets) of files whose write failed anyway (another writer filled the disk between the
#: check and the write): never closed and never freed while the process runs, which is what keeps
#: it alive (at its exit h5py reports them and it ends normally).
_FAILED: list[tuple[Any, Any]] = []


def _check_space(directory: Path, needed: int, what: str) -> None:
    """Refuse a write of ``needed`` bytes that would leave less than :data:`MIN_FREE_BYTES` free."""
    try:
        free = shutil.disk_usage(directory).free
    except OSError as err:
        raise StreamError(f"cannot {what}: {directory} is not reachable ({err})") from None
    if free - needed < MIN_FREE_BYTES:
        raise StreamError(f"cannot {what}: {free / 2**20:.0f} MiB free on the file system of {directory}, "
                          f"{needed / 2**20:.1f} MiB needed and {MIN_FREE_BYTES / 2**20:.0f} MiB kept free; "
                          "free space there (or set files to a larger disk): the frames after it are written "
                          "again as soon as there is room")


def time_left_text(seconds: float | None) -> str:
    """``"2.5 h"``, ``"42 min"``, ``"30 s"``; ``"-"`` for ``None``."""
    if seconds is None:
        return "-"
    if seconds >= 5400:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 60:.0f} min" if seconds >= 60 else f"{seconds:.0f} s"


class SpaceForecast:
    """When the free space of a file system runs out, at the rate it has fallen lately.

    A denoising agent at 10 frames/s of 512 x 512 writes about 38 GB an hour, so a disk that is
    fine at midnight can be full at 3 a.m.; once only :data:`MIN_FREE_BYTES` are left every frame
    is refused. :meth:`poll` samples the free space (at most every ``every_s``), and
    :meth:`forecast` fits a straight line to the samples of the last ``window_s``: whatever writes
    to that file system counts (the detector's own raw files too), and a clean-up shows at once.

    Parameters
    ----------
    free_bytes
        Returns the free bytes now (``shutil.disk_usage(...).free``); an ``OSError`` counts as
        "unknown" and is not sampled.
    window_s, every_s
        The span fitted, and the least time between two samples.
    min_span_s
        Less time than this between the first and the last sample, and there is no forecast.
    warn_at_s
        Seconds left at which :meth:`poll` says so, each once as the time left falls below it
        (said again after the time left has risen above twice the largest).
    clock
        Monotonic seconds (``time.monotonic``).
    """

    def __init__(self, free_bytes: Callable[[], int], *, window_s: float = 300.0, every_s: float = 5.0,
                 min_span_s: float = 30.0, warn_at_s: tuple[float, ...] = (3600.0, 600.0),
                 clock: Callable[[], float] = time.monotonic) -> None:
        if not 0 < min_span_s <= window_s or every_s < 0:
            raise ValueError(f"need 0 < min_span_s <= window_s and every_s >= 0, got {min_span_s=}, {window_s=}, {every_s=}")
        self._free_bytes, self._clock = free_bytes, clock
        self.window_s, self.every_s, self.min_span_s = window_s, every_s, min_span_s
        self.warn_at_s = tuple(sorted(warn_at_s, reverse=True))
        self._samples: deque[tuple[float, int]] = deque()
        self._said: float | None = None  # the smallest warn_at_s said since the time left last rose

    def poll(self) -> float | None:
        """Sample the free space if one is due; the ``warn_at_s`` level the time left has just
        fallen below (``None``: nothing new to say)."""
        now = self._clock()
        if self._samples and now - self._samples[-1][0] < self.every_s:
            return None
        try:
            free = int(self._free_bytes())
        except OSError:
            return None
        self._samples.append((now, free))
        while len(self._samples) > 2 and now - self._samples[1][0] >= self.window_s:
            self._samples.popleft()  # keeps one sample at or past the window's start
        left = self.forecast()["seconds_left"]
        if left is None or (self.warn_at_s and left > 2 * self.warn_at_s[0]):
            self._said = None
            return None
        below = [w for w in self.warn_at_s if left < w and (self._said is None or w < self._said)]
        if not below:
            return None
        self._said = below[-1]
        return self._said

    def forecast(self) -> dict[str, float | int | None]:
        """``free_bytes`` (last sample), ``falling_bytes_per_s`` (least-squares slope over the
        samples; ``None`` while they span less than ``min_span_s``), ``seconds_left`` until only
        :data:`MIN_FREE_BYTES` remain (``None`` while the free space is not falling) and
        ``span_s``, the time the samples span (up to about ``window_s``)."""
        if not self._samples:
            return {"free_bytes": None, "falling_bytes_per_s": None, "seconds_left": None, "span_s": 0.0}
        t = np.array([s[0] for s in self._samples])
        f = np.array([s[1] for s in self._samples], dtype=float)
        free = int(f[-1])
        span = float(t[-1] - t[0])
        if span < self.min_span_s:
            return {"free_bytes": free, "falling_bytes_per_s": None, "seconds_left": None, "span_s": span}
        dt = t - t.mean()
        falling = -float(dt @ (f - f.mean()) / (dt @ dt))
        left = max(free - MIN_FREE_BYTES, 0) / falling if falling > 0 else None
        return {"free_bytes": free, "falling_bytes_per_s": falling,
                "seconds_left": None if left is None or not math.isfinite(left) else float(left), "span_s": span}


class _StreamFile:
    """One stream's HDF5 file: a dataset per key, rows appended and flushed."""

    def __init__(self, path: Path, keys: Mapping[str, tuple[tuple[int, ...], np.dtype[Any]]]) -> None:
        import h5py

        path.parent.mkdir(parents=True, exist_ok=True)
        _check_space(path.parent, 0, f"create {path}")
        self.path = path
        self.failed: str | None = None  # why a write failed: the file is then left alone
        # libver "latest" is what SWMR needs; every dataset must exist before swmr_mode is turned on
        # locking "best-effort": file systems without locks (Lustre mounted without flock, some NFS)
        # would otherwise refuse every file (HDF5: "unable to lock file ... Function not implemented")
        self._file = h5py.File(path, "w", libver="latest", locking="best-effort")
        self.datasets = {}
        try:
            for key, (shape, dtype) in keys.items():
                self.datasets[key] = self._file.create_dataset(
                    f"/entry/{key}", shape=(0, *shape), maxshape=(None, *shape), dtype=dtype, chunks=(1, *shape))
            self._file.swmr_mode = True
        except (OSError, RuntimeError) as err:
            self._leave_alone(err)  # half made: as after a failed write
            raise
        self.rows = 0

    def append(self, values: Mapping[str, np.ndarray]) -> tuple[int, int]:
        """Append one row per value's first axis to every dataset; flushed; the rows' range."""
        if self.failed is not None:
            raise StreamError(f"{self.path} is not written any more: an earlier write failed ({self.failed}); "
                              "the next run's frames go to a new file")
        _check_space(self.path.parent, sum(int(np.asarray(v).nbytes) for v in values.values()),
                     f"append to {self.path}")
        n = len(next(iter(values.values())))
        start, stop = self.rows, self.rows + n
        try:
            for key, ds in self.datasets.items():
                ds.resize(stop, axis=0)
                ds[start:stop] = values[key]
                ds.flush()
        except (OSError, RuntimeError) as err:  # HDF5's I/O errors come as either
            raise StreamError(f"cannot append to {self.path}: {self._leave_alone(err)}") from None
        self.rows = stop
        return start, stop

    def _leave_alone(self, err: BaseException) -> str:
        """Mark the file failed (never written or closed again) and keep its objects for the rest
        of the process (:data:`_FAILED`); the reason, on one line."""
        self.failed = " ".join(str(err).split())
        _FAILED.append((self._file, self.datasets))
        return self.failed

    def close(self) -> None:
        """Close the file, unless a write failed or the disk is full: then it is left open (and
        kept; see :data:`_FAILED`), its flushed rows readable by SWMR readers."""
        if self.failed is not None or not self._file.id.valid:
            return
        try:
            _check_space(self.path.parent, 0, f"close {self.path}")  # a close that fails cannot be undone
            self._file.close()
        except (OSError, RuntimeError, StreamError) as err:
            raise StreamError(f"{self._leave_alone(err)}; the file is left open, its flushed rows readable by SWMR readers "
                              "(h5clear -s clears its mark for others)") from None


class FrameFiles:
    """The HDF5 files of one derived run's array data (see the module docs).

    Parameters
    ----------
    directory
        Where the run's directory of files is made (created if missing).
    run_uid
        The derived run's start uid: its files go to ``directory / run_uid``.
    """

    def __init__(self, directory: str | os.PathLike[str], run_uid: str) -> None:
        self.directory = Path(directory).expanduser().resolve() / run_uid
        self._streams: dict[str, _StreamFile] = {}

    def open_stream(self, stream: str, keys: Mapping[str, Mapping[str, Any]]) -> dict[str, dict[str, Any]]:
        """Create ``stream``'s file with a dataset for each data key in ``keys`` (event-model data
        keys: ``shape`` and ``dtype_numpy`` are needed); return, per key, the ``mimetype``, ``uri``
        and ``parameters`` of its ``stream_resource``.

        Raises
        ------
        StreamError
            A data key without a fixed ``shape`` or a numeric ``dtype_numpy``; the file cannot be
            made (the path and the operating system's reason are named).
        """
        if stream in self._streams:
            raise ValueError(f"stream {stream!r} already has a file, {self._streams[stream].path}")
        layout = {}
        for key, dk in keys.items():
            shape, dtype = dk.get("shape"), dk.get("dtype_numpy")
            if not isinstance(shape, list) or any(not isinstance(n, int) or n < 1 for n in shape):
                raise StreamError(f"data key {key!r} of stream {stream!r}: a file needs a fixed shape, got {shape!r}")
            try:
                np_dtype = np.dtype(dtype) if isinstance(dtype, str) else None
            except TypeError:
                np_dtype = None
            if np_dtype is None or np_dtype.kind not in "biuf":
                raise StreamError(f"data key {key!r} of stream {stream!r}: a file needs a numeric dtype_numpy "
                                  f"(such as '<f4'), got {dtype!r}")
            layout[key] = (tuple(shape), np_dtype)
        path = self.directory / f"{stream}.h5"
        try:
            self._streams[stream] = _StreamFile(path, layout)
        except (OSError, RuntimeError) as err:
            raise StreamError(f"cannot write the HDF5 file {path} of derived stream {stream!r}: {err}; "
                              "check that the directory is writable and has space") from None
        shape_of = {key: shape for key, (shape, _) in layout.items()}
        return {key: {"mimetype": MIMETYPE, "uri": file_uri(path),
                      "parameters": {"dataset": f"/entry/{key}", "chunk_shape": [1, *shape_of[key]], "swmr": True}}
                for key in layout}

    def append(self, stream: str, values: Mapping[str, np.ndarray]) -> tuple[int, int]:
        """Append rows (each value's first axis) to ``stream``'s datasets; the rows' ``(start, stop)``.

        Raises
        ------
        StreamError
            The keys differ from the file's datasets, or the write fails (disk full, ...).
        """
        f = self._streams[stream]
        if set(values) != set(f.datasets):
            raise StreamError(f"stream {stream!r} writes keys {sorted(f.datasets)} to {f.path}, "
                              f"got {sorted(values)}")
        try:
            return f.append(values)
        except (ValueError, TypeError) as err:  # values the datasets cannot take (nothing written)
            raise StreamError(f"cannot append to {f.path} (stream {stream!r}): {err}") from None

    def path(self, stream: str) -> Path:
        """The file of ``stream``."""
        return self._streams[stream].path

    def close(self) -> None:
        """Close every file (a closed run's files are complete). A file that cannot be closed
        (its disk full or gone) is logged, and the others are closed all the same."""
        for stream, f in self._streams.items():
            try:
                f.close()
            except StreamError as err:
                logger.error("derived stream %r: %s", stream, err)

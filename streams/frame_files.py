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
import os
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any
from urllib.parse import quote

import numpy as np

from streams.errors import StreamError

__all__ = ["MIMETYPE", "FrameFiles"]

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


class _StreamFile:
    """One stream's HDF5 file: a dataset per key, rows appended and flushed."""

    def __init__(self, path: Path, keys: Mapping[str, tuple[tuple[int, ...], np.dtype[Any]]]) -> None:
        import h5py

        path.parent.mkdir(parents=True, exist_ok=True)
        _check_space(path.parent, 0, f"create {path}")
        self.path = path
        self.failed: str | None = None  # why a write failed: the file is then left alone
        # libver "latest" is what SWMR needs; every dataset must exist before swmr_mode is turned on
        self._file = h5py.File(path, "w", libver="latest")
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

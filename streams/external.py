"""Data that live outside the events: detector frames in files, named by documents.

Beamline detectors rarely put their frames in the events. Two conventions name them instead:

* **resource / datum** (ophyd's area detectors): a ``resource`` document names a file by ``spec``
  and the event holds a ``datum_id`` per frame; the ``datum`` says where in the file
  (:data:`FRAME_HANDLERS`: ``NPY``; ``AD_HDF5`` and ``AD_HDF5_SWMR``, the areaDetector HDF5
  plugin's files, frames in ``/entry/data/data``, ``frame_per_point`` per ``point_number``;
  ``AD_TIFF``, the TIFF plugin's one file a frame, named by ``template % (path, filename, n)``);
* **stream_resource / stream_datum** (ophyd-async detectors): the descriptor marks the key
  ``external: "STREAM:"``, the events leave it out, a ``stream_resource`` names a file by
  ``mimetype`` and ``uri``, and each ``stream_datum`` maps a range of the events' ``seq_num`` to a
  range of rows (:data:`STREAM_HANDLERS`: ``application/x-hdf5``, ``parameters["dataset"]``).

:class:`ExternalData` is told a stream's documents and gives each event's value of a key,
read from its file when it is external. HDF5 files are opened read-only in SWMR mode beside
their writer (:func:`read_hdf5_rows`); data that may simply not be written yet raise an
:class:`ExternalDataError` with ``retry=True``. ``root_map`` (as databroker's) maps the paths in
the documents to where the files are mounted on this machine.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, cast
from urllib.parse import quote, unquote, urlparse, urlunparse

import event_model
import numpy as np

from streams.errors import StreamError

__all__ = ["FRAME_HANDLERS", "STREAM_HANDLERS", "ExternalData", "ExternalDataError", "read_hdf5_rows",
           "register_frame_handler", "register_stream_handler"]


class ExternalDataError(StreamError):
    """An event's external value that cannot be read; ``cause`` names the kind of failure.
    ``retry``: the data may not be there yet (a file still being written); read it again later."""

    def __init__(self, cause: str, message: str, *, retry: bool = False) -> None:
        super().__init__(message)
        self.cause = cause
        self.retry = retry


#: ``handler(resource, datum_kwargs) -> value`` by resource ``spec``
FrameHandler = Callable[[Mapping[str, Any], Mapping[str, Any]], np.ndarray]
FRAME_HANDLERS: dict[str, FrameHandler] = {}
#: ``handler(stream_resource, index, declared_shape) -> value`` by stream resource ``mimetype``
StreamHandler = Callable[[Mapping[str, Any], int, Sequence[int | None]], np.ndarray]
STREAM_HANDLERS: dict[str, StreamHandler] = {}


def register_frame_handler(spec: str, handler: FrameHandler) -> None:
    """Read external data of resource ``spec`` with ``handler(resource, datum_kwargs)``."""
    FRAME_HANDLERS[spec] = handler


def register_stream_handler(mimetype: str, handler: StreamHandler) -> None:
    """Read stream data of ``mimetype`` with ``handler(stream_resource, index, declared_shape)``:
    the value of the index-th event of the resource (``declared_shape``: its data key's shape)."""
    STREAM_HANDLERS[mimetype] = handler


def _located_file(resource: Mapping[str, Any], datum_kwargs: Mapping[str, Any]) -> tuple[Path, dict[str, Any]]:
    """A resource's path (``root`` / ``resource_path``) and its kwargs merged with the datum's."""
    return (Path(resource.get("root") or "") / resource["resource_path"],
            {**(resource.get("resource_kwargs") or {}), **datum_kwargs})


def _point_frames(resource: Mapping[str, Any], kwargs: Mapping[str, Any]) -> tuple[int, range]:
    """An area detector's ``point_number`` and the indices of its ``frame_per_point`` frames."""
    try:
        per_point, point = int(kwargs.get("frame_per_point", 1)), int(kwargs["point_number"])
    except (KeyError, TypeError, ValueError):
        raise ExternalDataError("external_read", f"resource {resource.get('uid')} ({resource.get('spec')}): its datum "
                                f"needs an integer point_number (and frame_per_point); got {dict(kwargs)}") from None
    if per_point < 1 or point < 0:
        raise ExternalDataError("external_read", f"resource {resource.get('uid')}: frame_per_point={per_point} and "
                                f"point_number={point} must be >= 1 and >= 0")
    return point, range(point * per_point, (point + 1) * per_point)


def _npy_handler(resource: Mapping[str, Any], datum_kwargs: Mapping[str, Any]) -> np.ndarray:
    """One ``.npy`` per resource: the whole array, or ``array[frame]`` when a ``frame`` kwarg is given."""
    path, kwargs = _located_file(resource, datum_kwargs)
    if not path.is_file():
        raise ExternalDataError("missing_file", f"external file {path} (resource {resource.get('uid')}) does not "
                                "exist; if the detector writes it elsewhere, map the path with root_map")
    try:
        stored = np.load(path, mmap_mode="r", allow_pickle=False)
        return np.array(stored[int(kwargs["frame"])] if "frame" in kwargs else stored)
    except (OSError, ValueError, IndexError) as err:
        raise ExternalDataError("external_read", f"cannot read {path} with {dict(kwargs)}: {err}") from None


def read_hdf5_rows(path: Path, dataset: str, rows: slice | int, what: str, *,
                   declared: Sequence[int | None] | None = None) -> np.ndarray:
    """``dataset[rows]`` of the HDF5 file at ``path``, read as a reader beside a live writer.

    With ``declared`` (an event's data-key shape) and an integer ``rows`` (the event's index),
    the rows of that event are decided by the dataset: row ``rows`` when the dataset has one axis
    more than ``declared`` (one frame per row), rows ``rows * m`` to ``(rows + 1) * m`` when it has
    as many (``m = declared[0]`` frames an event, as a detector declares ``[m, ny, nx]``).

    The file is opened read-only in SWMR mode, so frames a SWMR writer (the areaDetector HDF5
    plugin in SWMR mode, ophyd-async's writers) has flushed can be read while it writes. Data that
    may simply not be there yet (the file locked by a writer without SWMR, the dataset not created
    or not yet as long as ``rows`` needs) raise an :class:`ExternalDataError` with ``retry=True``;
    a file that does not exist, is not HDF5, or whose ``dataset`` is a group, one without.
    """
    import h5py

    if not path.is_file():
        raise ExternalDataError("missing_file", f"{what}: HDF5 file {path} does not exist here; if the detector "
                                "writes it on another mount, map its path with root_map")
    try:
        f = h5py.File(path, "r", swmr=True, locking="best-effort")  # locks where the file system has them
    except OSError as err:
        if path.stat().st_size >= 8 and not h5py.is_hdf5(path):
            raise ExternalDataError("external_read", f"{what}: {path} is not an HDF5 file") from None
        raise ExternalDataError("not_ready", f"{what}: cannot open {path} yet ({err}); a writer without SWMR keeps "
                                "its file locked until it closes it (at the run's end): for live analysis, turn "
                                "SWMR on in the detector's HDF5 writer (or wait for the run's end: a longer "
                                "external_wait_s)", retry=True) from None
    with f:
        ds = f.get(dataset)
        if ds is None:
            raise ExternalDataError("not_ready", f"{what}: {path} has no dataset {dataset!r} yet", retry=True)
        if not isinstance(ds, h5py.Dataset):
            raise ExternalDataError("external_read", f"{what}: {path}:{dataset} is a group, not a dataset")
        if declared is not None and isinstance(rows, int) and len(declared) == ds.ndim and declared[0]:
            rows = slice(rows * int(declared[0]), (rows + 1) * int(declared[0]))
        stop = rows.stop if isinstance(rows, slice) else rows + 1
        if not ds.shape or ds.shape[0] < stop:
            length = ds.shape[0] if ds.shape else 0
            raise ExternalDataError("not_ready", f"{what}: {path}:{dataset} holds {length} rows, row {stop - 1} is "
                                    "not written yet", retry=True)
        try:
            return np.asarray(ds[rows])
        except (OSError, ValueError) as err:  # a chunk being written, a filter not available here
            raise ExternalDataError("external_read", f"{what}: cannot read {path}:{dataset}[{rows}]: {err}") from None


def _ad_hdf5_handler(resource: Mapping[str, Any], datum_kwargs: Mapping[str, Any]) -> np.ndarray:
    """An areaDetector HDF5 plugin's file (ophyd's ``AD_HDF5`` / ``AD_HDF5_SWMR`` resources):
    frames in ``/entry/data/data``, ``frame_per_point`` of them per ``point_number``."""
    path, kwargs = _located_file(resource, datum_kwargs)
    point, frames = _point_frames(resource, kwargs)
    return read_hdf5_rows(path, "/entry/data/data", slice(frames.start, frames.stop),
                          f"resource {resource.get('uid')} point {point}")


def _stream_hdf5_handler(resource: Mapping[str, Any], index: int, declared: Sequence[int | None]) -> np.ndarray:
    """An ophyd-async HDF5 stream resource: event ``index`` of ``parameters["dataset"]`` in the
    file at ``uri`` (its rows: :func:`read_hdf5_rows` with the data key's shape)."""
    uri = str(resource.get("uri", ""))
    parsed = urlparse(uri)
    if parsed.scheme != "file":
        raise ExternalDataError("external_read", f"stream resource {resource.get('uid')}: uri {uri!r} is not a "
                                "file:// uri")
    dataset = (resource.get("parameters") or {}).get("dataset")
    if not isinstance(dataset, str):
        raise ExternalDataError("external_read", f"stream resource {resource.get('uid')}: parameters has no 'dataset'")
    what = f"stream resource {resource.get('uid')} ({resource.get('data_key')}) index {index}"
    return read_hdf5_rows(Path(unquote(parsed.path)), dataset, index, what, declared=declared)


def _ad_tiff_handler(resource: Mapping[str, Any], datum_kwargs: Mapping[str, Any]) -> np.ndarray:
    """An areaDetector TIFF plugin's files (ophyd's ``AD_TIFF`` resources): one file a frame, frame
    ``j`` named ``template % (directory + "/", filename, j)``, ``frame_per_point`` frames per
    ``point_number``. The plugin writes each file after its frame is taken, so a file not there
    yet (or not readable yet) is not ready; the message says to check ``root_map`` too."""
    from PIL import Image, UnidentifiedImageError

    directory, kwargs = _located_file(resource, datum_kwargs)
    point, indices = _point_frames(resource, kwargs)
    try:
        template, filename = str(kwargs["template"]), str(kwargs["filename"])
        names = [template % (str(directory).rstrip("/") + "/", filename, j) for j in indices]
    except (KeyError, TypeError, ValueError) as err:
        raise ExternalDataError("external_read", f"resource {resource.get('uid')} (AD_TIFF): needs a template and a "
                                f"filename that name its files; got {dict(kwargs)} ({err})") from None
    frames = []
    for name in names:
        if not Path(name).is_file():
            raise ExternalDataError("not_ready", f"resource {resource.get('uid')} point {point}: TIFF {name} is not "
                                    "there yet (if it never comes, check the path, and root_map)", retry=True)
        try:
            with Image.open(name) as image:
                frames.append(np.asarray(image))
        except (OSError, UnidentifiedImageError) as err:  # a file still being written
            raise ExternalDataError("not_ready", f"resource {resource.get('uid')} point {point}: cannot read TIFF "
                                    f"{name} yet ({err})", retry=True) from None
    return np.stack(frames)


register_frame_handler("NPY", _npy_handler)
register_frame_handler("AD_HDF5", _ad_hdf5_handler)
register_frame_handler("AD_HDF5_SWMR", _ad_hdf5_handler)
register_frame_handler("AD_TIFF", _ad_tiff_handler)
register_stream_handler("application/x-hdf5", _stream_hdf5_handler)


class ExternalData:
    """The values of events whose data live in files, from the documents that name them.

    Told every document of the runs (others are ignored); :meth:`value` gives an event's value of
    a key: as it is in the event, or read through the handler of its resource's ``spec`` (a
    ``datum_id`` in the event) or of its stream resource's ``mimetype`` (a key the descriptor marks
    ``external: "STREAM:"``, located by the event's ``seq_num``). A run's documents are forgotten
    at its stop.

    Parameters
    ----------
    root_map
        ``{prefix in the documents: where it is mounted here}``; the longest matching prefix of a
        resource's ``root`` (or its ``resource_path`` without a root), or of a stream resource's
        uri path, is replaced.

    Examples
    --------
    >>> from event_model import compose_run
    >>> run = compose_run()
    >>> desc = run.compose_descriptor(name="primary", data_keys={"x": {"dtype": "number", "shape": [], "source": "s"}})
    >>> ext = ExternalData()
    >>> for name, doc in (("start", run.start_doc), ("descriptor", desc.descriptor_doc)):
    ...     _ = ext.tell(name, doc)
    >>> ext.value(desc.compose_event(data={"x": 1.5}, timestamps={"x": 0.0}), "x")
    1.5
    """

    def __init__(self, root_map: Mapping[str, str] | None = None) -> None:
        self.root_map = dict(root_map or {})
        self._descriptors: dict[str, dict[str, Any]] = {}
        self._resources: dict[str, dict[str, Any]] = {}
        self._datums: dict[str, dict[str, Any]] = {}
        self._stream_resources: dict[str, dict[str, Any]] = {}
        # (descriptor, data key) -> [(seq_num start, stop, index start, stream resource uid, stream_datum uid)]
        self._rows: dict[tuple[str, str], list[tuple[int, int, int, str, str]]] = {}

    def tell(self, name: str, doc: Mapping[str, Any]) -> list[tuple[str, str, range]]:
        """Take in one document; for a ``stream_datum``, returns ``[(descriptor, data key, seq_nums)]``
        it located (none when its stream resource was never received)."""
        if name == "descriptor":
            self._descriptors[doc["uid"]] = dict(doc)
        elif name == "resource":
            self._resources[doc["uid"]] = dict(doc)
        elif name == "datum":
            self._datums[doc["datum_id"]] = dict(doc)
        elif name == "datum_page":
            for datum in event_model.unpack_datum_page(cast(Any, doc)):
                self._datums[datum["datum_id"]] = dict(datum)
        elif name == "stream_resource":
            self._stream_resources[doc["uid"]] = dict(doc)
        elif name == "stream_datum":
            return self._stream_datum(doc)
        elif name == "stop":
            self._forget(doc["run_start"])
        return []

    def streamed(self, descriptor: str) -> set[str]:
        """The data keys of ``descriptor`` written as streams (left out of its events)."""
        keys = self._descriptors.get(descriptor, {}).get("data_keys", {})
        return {k for k, dk in keys.items() if str(dk.get("external", "")).startswith("STREAM")}

    def locate(self, descriptor: str, key: str, seq_num: int) -> str | None:
        """The uid of the stream_datum that says where event ``seq_num``'s ``key`` is, or None."""
        row = self._row(descriptor, key, seq_num)
        return None if row is None else row[2]

    def stream_resource(self, uid: str) -> dict[str, Any] | None:
        """The stream resource ``uid``, if it was received (and its run has not stopped)."""
        return self._stream_resources.get(uid)

    def configuration(self, descriptor: str, key: str) -> Any:
        """``key``'s value in the descriptor's configuration (an exposure time, say), or None."""
        for device in self._descriptors.get(descriptor, {}).get("configuration", {}).values():
            if key in (device.get("data") or {}):
                return device["data"][key]
        return None

    def value(self, event: Mapping[str, Any], key: str) -> Any:
        """The event's value of ``key``, read from its file when it is external.

        Raises
        ------
        ExternalDataError
            ``missing_key``, ``unknown_datum`` (a datum or resource never received; a stream key no
            stream_datum has located yet, with ``retry``), ``unsupported_spec``, or the handler's
            (``missing_file``, ``external_read``, ``not_ready`` with ``retry``).
        """
        descriptor = event.get("descriptor", "")
        if key in self.streamed(descriptor):
            row = self._row(descriptor, key, int(event["seq_num"]))
            if row is None:
                raise ExternalDataError("unknown_datum", f"no stream_datum has located {key!r} of seq_num "
                                        f"{event['seq_num']} yet", retry=True)
            resource_uid, index, _ = row
            stream = self._stream_resources[resource_uid]
            reader = STREAM_HANDLERS.get(stream.get("mimetype", ""))
            if reader is None:
                raise ExternalDataError("unsupported_spec", f"stream resource {resource_uid} has mimetype "
                                        f"{stream.get('mimetype')!r}, which has no handler (known: "
                                        f"{sorted(STREAM_HANDLERS)})")
            shape = self._descriptors[descriptor]["data_keys"][key].get("shape") or []
            return reader(self._mapped(stream), index, shape)
        data = event.get("data") or {}
        if key not in data:
            raise ExternalDataError("missing_key", f"event has no data key {key!r} (has {sorted(data)})")
        value = data[key]
        external = self._descriptors.get(descriptor, {}).get("data_keys", {}).get(key, {}).get("external")
        if not external or not isinstance(value, str):
            return value
        datum = self._datums.get(value)
        if datum is None:
            raise ExternalDataError("unknown_datum", f"datum {value!r} of {key!r} was never received")
        resource = self._resources.get(datum["resource"])
        if resource is None:
            raise ExternalDataError("unknown_datum", f"resource {datum['resource']!r} of datum {value!r} was never "
                                    "received")
        handler = FRAME_HANDLERS.get(resource.get("spec", ""))
        if handler is None:
            raise ExternalDataError("unsupported_spec", f"resource spec {resource.get('spec')!r} has no handler "
                                    f"(known: {sorted(FRAME_HANDLERS)})")
        return handler(self._mapped(resource), datum.get("datum_kwargs") or {})

    # -- internals -----------------------------------------------------------------------------
    def _stream_datum(self, doc: Mapping[str, Any]) -> list[tuple[str, str, range]]:
        resource = self._stream_resources.get(doc.get("stream_resource", ""))
        if resource is None:
            return []
        seq, idx = doc["seq_nums"], doc["indices"]
        n = int(seq["stop"]) - int(seq["start"])
        if n != int(idx["stop"]) - int(idx["start"]):
            raise ExternalDataError("external_read", f"stream_datum {doc.get('uid')} pairs seq_nums {dict(seq)} with "
                                    f"indices {dict(idx)}: ranges of different lengths")
        key = (doc["descriptor"], resource["data_key"])
        self._rows.setdefault(key, []).append((int(seq["start"]), int(seq["stop"]), int(idx["start"]),
                                               resource["uid"], str(doc.get("uid"))))
        return [(doc["descriptor"], resource["data_key"], range(int(seq["start"]), int(seq["stop"])))]

    def _row(self, descriptor: str, key: str, seq_num: int) -> tuple[str, int, str] | None:
        """(stream resource uid, row index, stream_datum uid) of event ``seq_num``'s ``key``, or None."""
        for start, stop, index, resource, uid in reversed(self._rows.get((descriptor, key), [])):
            if start <= seq_num < stop:
                return resource, index + seq_num - start, uid
        return None

    def _forget(self, run_uid: str) -> None:
        gone = {uid for uid, d in self._descriptors.items() if d.get("run_start") == run_uid}
        for uid in gone:
            del self._descriptors[uid]
        self._rows = {k: v for k, v in self._rows.items() if k[0] not in gone}
        resources = {uid for uid, r in self._resources.items() if r.get("run_start") == run_uid}
        self._datums = {k: d for k, d in self._datums.items() if d.get("resource") not in resources}
        for uid in resources:
            del self._resources[uid]
        self._stream_resources = {k: r for k, r in self._stream_resources.items() if r.get("run_start") != run_uid}

    def _mapped(self, resource: Mapping[str, Any]) -> Mapping[str, Any]:
        """``resource`` with its file path moved by ``root_map``."""
        if not self.root_map:
            return resource
        if "uri" in resource:
            parsed = urlparse(str(resource["uri"]))
            return {**resource, "uri": urlunparse(parsed._replace(path=quote(self._map_path(unquote(parsed.path)))))}
        if resource.get("root"):
            return {**resource, "root": self._map_path(str(resource["root"]))}
        return {**resource, "resource_path": self._map_path(str(resource.get("resource_path", "")))}

    def _map_path(self, path: str) -> str:
        for old in sorted(self.root_map, key=len, reverse=True):
            base = old.rstrip("/")
            if path == base or path.startswith(base + "/"):
                return self.root_map[old].rstrip("/") + path[len(base):]
        return path

"""A zarr-backed store of event-model runs: :class:`ZarrRunWriter` and :class:`ZarrRunReader`.

Layout (``<root>`` carries the attribute ``beampilot_store_format = 1``)::

    <root>/runs/<start uid>/                     attrs: start, stop (once stopped),
                                                        resources, datums, stream_resources,
                                                        stream_datums (lists, when received)
    <root>/runs/<start uid>/descriptors/<uid>/   attrs: descriptor, n_committed
        time, seq_num, uid                       `n_events` arrays, one row per event
        data/<key>                               `n_events x *shape`, appended along axis 0
        timestamps/<key>                         `n_events`

Event data live under ``data/`` (not beside ``time``) so that a data key named ``time`` or
``uid`` cannot collide with the event's own fields.

Crash safety: the rows of one event (or event page) are appended to every array first and
``n_committed`` is updated last, so a reader sees only whole events; a writer that reopens the
store truncates every array back to ``n_committed``.
"""

from __future__ import annotations

import logging
import os
import warnings
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import event_model
import numpy as np
import zarr
import zarr.errors

from streams.derived import check_event_data, validate_document
from streams.errors import DocumentError, StoreError, StreamError

__all__ = ["FORMAT_ATTR", "STORE_FORMAT", "ZarrRunReader", "ZarrRunWriter"]

STORE_FORMAT = 1
FORMAT_ATTR = "beampilot_store_format"
_CHUNK_BYTES = 1 << 20
_MAX_CHUNK_ROWS = 1024
_STR_ITEM_BYTES = 64  # a guess at a variable-length string's size, for chunk sizing only
# Documents kept as attribute lists on the run group, and the field that identifies each.
_LISTED = {
    "resource": ("resources", "uid"),
    "datum": ("datums", "datum_id"),
    "stream_resource": ("stream_resources", "uid"),
    "stream_datum": ("stream_datums", "uid"),
}
_log = logging.getLogger(__name__)


def _open_root(root: str | os.PathLike[str] | zarr.Group, *, create: bool) -> zarr.Group:
    """Open (or, for a writer, create) the root group and check its format marker."""
    if isinstance(root, zarr.Group):
        group = root
    elif isinstance(root, str | os.PathLike):
        group = _open_path(Path(root), create=create)
    else:
        raise TypeError(f"root must be a path or a zarr.Group, not {type(root).__name__}")
    marker = group.attrs.get(FORMAT_ATTR)
    if marker is None and create and not group.attrs and not _children(group):
        group.attrs[FORMAT_ATTR] = STORE_FORMAT
        group.create_group("runs")
        return group
    if marker is None:
        raise StoreError(
            f"{root!r} is a zarr group but not a beampilot run store: it lacks the "
            f"{FORMAT_ATTR!r} attribute (expected {STORE_FORMAT}). Point at a store written by "
            "ZarrRunWriter, or at a new or empty directory to create one."
        )
    if marker != STORE_FORMAT:
        raise StoreError(
            f"{root!r} has {FORMAT_ATTR}={marker!r}; this version reads format {STORE_FORMAT}"
        )
    if not isinstance(group.get("runs"), zarr.Group):
        raise StoreError(f"{root!r} is marked as a beampilot store but has no 'runs' group")
    return group


def _open_path(path: Path, *, create: bool) -> zarr.Group:
    try:
        return zarr.open_group(path, mode="r+" if create else "r")
    except FileNotFoundError:  # also zarr's GroupNotFoundError
        if not create:
            raise StoreError(
                f"no zarr group at {str(path)!r}: expected a beampilot run store "
                "(a zarr group with a 'runs' group) written by ZarrRunWriter"
            ) from None
        if path.exists() and (not path.is_dir() or any(path.iterdir())):
            raise StoreError(
                f"{str(path)!r} exists but is not a zarr store; choose a new or empty directory"
            ) from None
        return zarr.open_group(path, mode="w-")
    except (OSError, zarr.errors.BaseZarrError) as err:
        raise StoreError(f"cannot open {str(path)!r} as a beampilot run store: {err}") from None


def _children(group: zarr.Group) -> list[str]:
    """Names of the child groups of ``group``."""
    with warnings.catch_warnings():
        # Leftover '*.partial' files of an interrupted atomic write are not zarr nodes.
        warnings.filterwarnings(
            "ignore",
            message=".*not recognized as a component",
            category=zarr.errors.ZarrUserWarning,
        )
        return sorted(group.group_keys())


def _arrays(group: zarr.Group) -> dict[str, zarr.Array]:
    """The event arrays under a descriptor group, keyed by their path relative to it."""
    out = {name: arr for name, arr in group.arrays()}
    for sub in ("data", "timestamps"):
        if isinstance(group.get(sub), zarr.Group):
            out.update({f"{sub}/{name}": arr for name, arr in group[sub].arrays()})
    return out


def _node_name(value: Any, what: str, name: str, uid: str | None) -> str:
    if not isinstance(value, str) or not value or "/" in value or value in {".", ".."} or (
        value.startswith("__")
    ):
        raise DocumentError(
            name, uid, f"{what} {value!r} cannot name a zarr node: use a non-empty string "
            "without '/' that is not '.', '..' and does not start with '__'"
        )
    return value


def _event_keys(descriptor: Mapping[str, Any]) -> list[str]:
    """Data keys whose values travel inside events (all but external ``STREAM:`` keys)."""
    return [k for k, dk in descriptor["data_keys"].items() if dk.get("external") != "STREAM:"]


def _array_paths(descriptor: Mapping[str, Any]) -> list[str]:
    """Paths, relative to a descriptor group, of every array its events are stored in."""
    keys = _event_keys(descriptor)
    return ["time", "seq_num", "uid", *(f"{s}/{k}" for k in keys for s in ("data", "timestamps"))]


def _store_dtype(data_key: Mapping[str, Any], value: Any) -> Any:
    """The zarr dtype for a data key: declared where possible, else from the first value."""
    if data_key.get("external"):
        return str  # a datum id
    declared = data_key.get("dtype_numpy")
    if isinstance(declared, str) and declared:
        dtype = np.dtype(declared)
        return str if dtype.kind in "USOT" else dtype
    fixed = {"string": str, "number": np.float64, "integer": np.int64, "boolean": np.bool_}
    if data_key["dtype"] in fixed:
        return fixed[data_key["dtype"]]
    dtype = np.asarray(value).dtype
    return str if dtype.kind in "UT" else dtype


def _store_shape(data_key: Mapping[str, Any], value: Any) -> tuple[int, ...]:
    """Declared shape, with unknown (``None``) lengths taken from the first value."""
    if data_key.get("external"):
        return ()
    return tuple(int(n if d is None else d) for d, n in zip(data_key["shape"], np.shape(value)))


def _create_array(group: zarr.Group, path: str, dtype: Any, shape: tuple[int, ...]) -> zarr.Array:
    itemsize = _STR_ITEM_BYTES if dtype is str else np.dtype(dtype).itemsize
    row_bytes = max(1, itemsize * int(np.prod(shape)))
    rows = max(1, min(_MAX_CHUNK_ROWS, _CHUNK_BYTES // row_bytes))
    parent, _, leaf = path.rpartition("/")
    where = group.require_group(parent) if parent else group
    chunks = (rows, *(max(1, n) for n in shape))
    return where.create_array(leaf, shape=(0, *shape), dtype=dtype, chunks=chunks)


@dataclass
class _Run:
    group: zarr.Group
    descriptors: zarr.Group
    lists: dict[str, list[dict[str, Any]]]
    ids: set[str]


@dataclass
class _Stream:
    run_uid: str
    group: zarr.Group
    descriptor: dict[str, Any]
    n: int
    arrays: dict[str, zarr.Array] = field(default_factory=dict)
    uids: set[str] = field(default_factory=set)
    ready: bool = False  # every array exists


class ZarrRunWriter:
    """A :class:`~streams.protocols.DocumentSink` that stores runs in a zarr hierarchy.

    Subscribe it to a RunEngine (``RE.subscribe(writer)``) or call it with ``(name, doc)``.
    Every document is validated against event-model's schema; events also against their
    descriptor (keys, dtype, shape). Anything invalid raises before a row is committed.

    Parameters
    ----------
    root : str, os.PathLike or zarr.Group
        The store. A new or empty location is initialised; an existing store is reopened,
        and every array of an unstopped run is truncated to its committed length.

    Notes
    -----
    Reopening resumes unstopped runs: a repeated start or descriptor document equal to the
    stored one is accepted, and an event whose uid is already stored is skipped, so documents
    delivered again after a restart are not stored twice. A start document whose run already
    has a stop document raises :class:`~streams.errors.StoreError`.
    Resources and datums are kept as attribute lists (rewritten on each append); files they
    point to are not touched.
    """

    def __init__(self, root: str | os.PathLike[str] | zarr.Group) -> None:
        self._runs: zarr.Group = _open_root(root, create=True)["runs"]
        self._open: dict[str, _Run] = {}
        self._streams: dict[str, _Stream] = {}
        self._owners: dict[str, str] = {}  # resource uid -> start uid
        self._closed = False
        self._handlers = {
            "start": self._on_start, "descriptor": self._on_descriptor, "stop": self._on_stop,
            "event": self._on_event, "event_page": self._on_event_page,
            "datum_page": self._on_datum_page,
        }
        for uid in _children(self._runs):
            if "stop" not in self._runs[uid].attrs:
                self._resume_run(uid)

    def __call__(self, name: str, doc: dict[str, Any]) -> None:
        """Store one document.

        Raises
        ------
        DocumentError
            If the document is invalid, of an unsupported kind, or refers to an unknown run
            or descriptor; or an event's values do not fit its descriptor's declaration.
        StoreError
            If the document contradicts what the store already holds.
        """
        if self._closed:
            raise StreamError(f"ZarrRunWriter is closed; cannot store a {name!r} document")
        if name not in self._handlers and name not in _LISTED:
            supported = sorted([*self._handlers, *_LISTED])
            raise DocumentError(name, doc.get("uid"), f"ZarrRunWriter cannot store {name!r} "
                                f"documents; supported: {supported}")
        validate_document(name, doc)
        if name in _LISTED:
            self._on_listed(name, doc)
        else:
            self._handlers[name](doc)

    def close(self) -> None:
        """Refuse further documents. Everything received is already stored; no stop is added."""
        self._closed = True

    def __enter__(self) -> ZarrRunWriter:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def _on_start(self, doc: dict[str, Any]) -> None:
        uid = _node_name(doc["uid"], "start uid", "start", doc["uid"])
        plain = event_model.sanitize_doc(doc)
        if uid not in self._open:
            if uid not in self._runs:
                group = self._runs.create_group(uid, attributes={"start": plain})
                self._open[uid] = _Run(group, group.create_group("descriptors"), {}, set())
                return
            self._resume_run(uid)
        if self._open[uid].group.attrs["start"] != plain:
            raise StoreError(f"run {uid!r} is already stored with a different start document")

    def _resume_run(self, uid: str) -> None:
        group = self._runs[uid]
        attrs = group.attrs.asdict()
        if "start" not in attrs:
            raise StoreError(f"run group {uid!r} has no 'start' attribute; the store is damaged")
        if "stop" in attrs:
            raise StoreError(
                f"run {uid!r} is already stopped (exit_status="
                f"{attrs['stop'].get('exit_status')!r}); a second start with that uid is refused"
            )
        lists = {key: list(attrs.get(key, [])) for key, _ in _LISTED.values()}
        ids = {d[idf] for key, idf in _LISTED.values() for d in lists[key]}
        run = _Run(group, group.require_group("descriptors"), lists, ids)
        self._open[uid] = run
        for key in ("resources", "stream_resources"):
            self._owners.update({d["uid"]: uid for d in lists[key]})
        for desc_uid in _children(run.descriptors):
            self._streams[desc_uid] = self._resume_stream(uid, run.descriptors[desc_uid])

    @staticmethod
    def _resume_stream(run_uid: str, group: zarr.Group) -> _Stream:
        attrs = group.attrs.asdict()
        if "descriptor" not in attrs or "n_committed" not in attrs:
            raise StoreError(f"descriptor group {group.path!r} lacks 'descriptor'/'n_committed'")
        stream = _Stream(run_uid, group, attrs["descriptor"], int(attrs["n_committed"]))
        stream.arrays = _arrays(group)
        for path, arr in stream.arrays.items():
            if arr.shape[0] < stream.n:
                raise StoreError(f"array {arr.path!r} has {arr.shape[0]} rows but "
                                 f"n_committed={stream.n}; the store is damaged")
            if arr.shape[0] > stream.n:  # rows of an event that was never committed
                _log.info("truncating %s from %d to %d rows", arr.path, arr.shape[0], stream.n)
                arr.resize((stream.n, *arr.shape[1:]))
        if stream.n:
            if missing := sorted(set(_array_paths(stream.descriptor)) - set(stream.arrays)):
                raise StoreError(f"descriptor group {group.path!r} lacks arrays {missing}")
            stream.ready = True
            stream.uids = {str(u) for u in stream.arrays["uid"][: stream.n]}
        return stream

    def _run_of(self, run_uid: Any, name: str, uid: str | None) -> _Run:
        if run_uid not in self._open:
            raise DocumentError(name, uid, f"refers to run {run_uid!r}, which this store has "
                                "no open run for: its start was not received or it is stopped")
        return self._open[run_uid]

    def _on_descriptor(self, doc: dict[str, Any]) -> None:
        uid = _node_name(doc["uid"], "descriptor uid", "descriptor", doc["uid"])
        run = self._run_of(doc["run_start"], "descriptor", uid)
        for key in doc["data_keys"]:
            _node_name(key, "data key", "descriptor", uid)
        plain = event_model.sanitize_doc(doc)
        if uid in self._streams:
            if self._streams[uid].descriptor != plain:
                raise StoreError(f"descriptor {uid!r} is already stored with different content")
            return
        group = run.descriptors.create_group(
            uid, attributes={"descriptor": plain, "n_committed": 0}
        )
        self._streams[uid] = _Stream(doc["run_start"], group, plain, 0)

    def _on_stop(self, doc: dict[str, Any]) -> None:
        run_uid = doc["run_start"]
        if run_uid not in self._open and run_uid in self._runs and (
            "stop" in self._runs[run_uid].attrs
        ):
            raise StoreError(f"run {run_uid!r} already has a stop document")
        run = self._run_of(run_uid, "stop", doc["uid"])
        run.group.attrs["stop"] = event_model.sanitize_doc(doc)
        del self._open[run_uid]
        self._streams = {k: s for k, s in self._streams.items() if s.run_uid != run_uid}
        self._owners = {k: r for k, r in self._owners.items() if r != run_uid}

    def _on_event(self, doc: dict[str, Any]) -> None:
        self._append(doc["descriptor"], [doc], "event", doc["uid"])

    def _on_event_page(self, doc: dict[str, Any]) -> None:
        events = list(event_model.unpack_event_page(doc))
        self._append(doc["descriptor"], events, "event_page", None)

    def _on_datum_page(self, doc: dict[str, Any]) -> None:
        for datum in event_model.unpack_datum_page(doc):
            self._on_listed("datum", datum)

    def _on_listed(self, name: str, doc: dict[str, Any]) -> None:
        key, id_field = _LISTED[name]
        if name == "datum":
            run_uid = self._owners.get(doc["resource"])
        elif name == "stream_datum":
            stream = self._streams.get(doc["descriptor"])
            run_uid = stream.run_uid if stream else None
        else:
            run_uid = doc.get("run_start")
        run = self._run_of(run_uid, name, doc[id_field])
        if doc[id_field] in run.ids:
            return  # delivered again after a restart
        run.lists.setdefault(key, []).append(event_model.sanitize_doc(doc))
        run.group.attrs[key] = run.lists[key]
        run.ids.add(doc[id_field])
        if name in ("resource", "stream_resource"):
            self._owners[doc["uid"]] = run_uid

    def _append(
        self, desc_uid: str, events: list[dict[str, Any]], name: str, uid: str | None
    ) -> None:
        if desc_uid not in self._streams:
            raise DocumentError(name, uid, f"unknown descriptor {desc_uid!r}: its descriptor "
                                "was not received, or its run is stopped")
        stream = self._streams[desc_uid]
        events = [e for e in events if e["uid"] not in stream.uids]
        if not events:
            return
        for event in events:
            check_event_data(stream.descriptor, event["data"], event["timestamps"],
                             name=name, uid=event["uid"])
        if not stream.ready:
            self._create_arrays(stream, events[0])
        columns = _event_columns(stream.descriptor, events, name)
        for key in _event_keys(stream.descriptor):
            columns[f"data/{key}"] = _data_column(stream, key, events, name)
        n, k = stream.n, len(events)
        for path, values in columns.items():
            arr = stream.arrays[path]
            arr.resize((n + k, *arr.shape[1:]))
            arr[n : n + k] = values
        stream.group.attrs["n_committed"] = n + k  # the commit: always written last
        stream.n = n + k
        stream.uids.update(e["uid"] for e in events)

    @staticmethod
    def _create_arrays(stream: _Stream, first: dict[str, Any]) -> None:
        specs: dict[str, tuple[Any, tuple[int, ...]]] = {
            "time": (np.float64, ()), "seq_num": (np.int64, ()), "uid": (str, ())
        }
        for key in _event_keys(stream.descriptor):
            data_key, value = stream.descriptor["data_keys"][key], first["data"][key]
            specs[f"data/{key}"] = (_store_dtype(data_key, value), _store_shape(data_key, value))
            specs[f"timestamps/{key}"] = (np.float64, ())
        for path, (dtype, shape) in specs.items():
            if path not in stream.arrays:
                stream.arrays[path] = _create_array(stream.group, path, dtype, shape)
        stream.ready = True


class ZarrRunReader:
    """Read runs stored by :class:`ZarrRunWriter`; only committed events are ever returned.

    Parameters
    ----------
    root : str, os.PathLike or zarr.Group
        The store. It is re-read on every call, so a reader sees events committed after it
        was opened.

    Raises
    ------
    StoreError
        If ``root`` is not a beampilot run store, or a run in it is damaged.
    KeyError
        From the per-run methods, for a start uid that is not in the store.
    """

    def __init__(self, root: str | os.PathLike[str] | zarr.Group) -> None:
        self._root = root
        self._runs: zarr.Group = _open_root(root, create=False)["runs"]

    def runs(self) -> list[str]:
        """Start uids of every stored run, in start-time order."""
        uids = _children(self._runs)
        return sorted(uids, key=lambda uid: (self.start(uid)["time"], uid))

    def start(self, uid: str) -> dict[str, Any]:
        """The start document of run ``uid``."""
        return self._attrs(uid)["start"]

    def stop(self, uid: str) -> dict[str, Any] | None:
        """The stop document of run ``uid``, or ``None`` if it has none (yet)."""
        return self._attrs(uid).get("stop")

    def descriptors(self, uid: str) -> list[dict[str, Any]]:
        """The descriptor documents of run ``uid``, in time order."""
        return [desc for desc, _, _ in self._streams(uid)]

    def documents(self, uid: str) -> Iterator[tuple[str, dict[str, Any]]]:
        """Yield the run's documents: start, resources, datums, descriptors, stream resources
        and datums, events (one ``event`` per stored row, in time order) and stop, if any.

        All of a run's committed events are read into memory at the first event.
        """
        attrs = self._attrs(uid)
        yield "start", attrs["start"]
        for name in ("resource", "datum"):
            yield from ((name, doc) for doc in attrs.get(_LISTED[name][0], []))
        streams = self._streams(uid)
        yield from (("descriptor", desc) for desc, _, _ in streams)
        for name in ("stream_resource", "stream_datum"):
            yield from ((name, doc) for doc in attrs.get(_LISTED[name][0], []))
        columns = [_read_columns(group, desc, n) for desc, group, n in streams]
        order = sorted(
            (float(cols["time"][row]), i, row)
            for i, cols in enumerate(columns) for row in range(streams[i][2])
        )
        for _, i, row in order:
            yield "event", _event_doc(streams[i][0], columns[i], row)
        if "stop" in attrs:
            yield "stop", attrs["stop"]

    def table(self, uid: str, stream: str = "primary") -> dict[str, np.ndarray]:
        """Committed data of one stream as arrays of `n_events x *shape`, plus ``time`` and
        ``seq_num`` columns (a data key of the same name takes precedence over them)."""
        streams = [s for s in self._streams(uid) if s[0]["name"] == stream]
        if not streams:
            names = sorted({desc["name"] for desc, _, _ in self._streams(uid)})
            raise KeyError(f"run {uid!r} has no stream {stream!r}; it has {names}")
        columns = [_read_columns(group, desc, n) for desc, group, n in streams]
        columns = [cols for cols in columns if cols] or [{}]
        out: dict[str, np.ndarray] = {}
        for key in ("time", "seq_num", *(f"data/{k}" for k in _event_keys(streams[0][0]))):
            parts = [cols[key] for cols in columns if key in cols]
            out[key.removeprefix("data/")] = np.concatenate(parts) if parts else np.empty(0)
        return out

    def _attrs(self, uid: str) -> dict[str, Any]:
        if not isinstance(uid, str) or uid not in self._runs:
            raise KeyError(f"no run {uid!r} in store {self._root!r}")
        attrs = self._runs[uid].attrs.asdict()
        if "start" not in attrs:
            raise StoreError(f"run group {uid!r} has no 'start' attribute; the store is damaged")
        return attrs

    def _streams(self, uid: str) -> list[tuple[dict[str, Any], zarr.Group, int]]:
        self._attrs(uid)
        run = self._runs[uid]
        if not isinstance(run.get("descriptors"), zarr.Group):
            return []
        out = []
        for desc_uid in _children(run["descriptors"]):
            group = run["descriptors"][desc_uid]
            attrs = group.attrs.asdict()
            if "descriptor" not in attrs or "n_committed" not in attrs:
                raise StoreError(
                    f"descriptor group {group.path!r} lacks 'descriptor'/'n_committed'; "
                    "expected a group written by ZarrRunWriter"
                )
            out.append((attrs["descriptor"], group, int(attrs["n_committed"])))
        return sorted(out, key=lambda s: s[0]["time"])


def _event_columns(
    descriptor: Mapping[str, Any], events: list[dict[str, Any]], name: str
) -> dict[str, np.ndarray]:
    """The ``time``, ``seq_num``, ``uid`` and ``timestamps/<key>`` rows of ``events``."""
    try:
        columns = {
            "time": np.array([e["time"] for e in events], dtype=np.float64),
            "seq_num": np.array([e["seq_num"] for e in events], dtype=np.int64),
            "uid": np.array([e["uid"] for e in events], dtype=np.dtypes.StringDType()),
        }
        for key in _event_keys(descriptor):
            stamps = [e["timestamps"][key] for e in events]
            columns[f"timestamps/{key}"] = np.array(stamps, dtype=np.float64)
    except (TypeError, ValueError) as err:
        reason = f"time, seq_num or a timestamp is not a number: {err}"
        raise DocumentError(name, events[0]["uid"], reason) from None
    return columns


def _data_column(stream: _Stream, key: str, events: list[dict[str, Any]], name: str) -> Any:
    """The rows of data key ``key``, checked against the shape and dtype of its array."""
    arr = stream.arrays[f"data/{key}"]
    values = [np.asarray(e["data"][key]) for e in events]
    if any(v.shape != arr.shape[1:] for v in values):
        declared = stream.descriptor["data_keys"][key]["shape"]
        received = sorted({tuple(v.shape) for v in values})
        raise DocumentError(name, events[0]["uid"], (
            f"data key {key!r}: declared shape {declared} is stored as {list(arr.shape[1:])} "
            f"(fixed by the first event) but received shapes {received}"
        ))
    column = np.stack(values)
    if arr.dtype.kind in "TU":
        fits = column.dtype.kind in "UT"
    else:
        fits = np.can_cast(column.dtype, arr.dtype, "same_kind")
    if not fits:
        raise DocumentError(name, events[0]["uid"], (
            f"data key {key!r}: values of dtype {column.dtype} cannot be stored without loss "
            f"in its {arr.dtype} array"
        ))
    return column


def _read_columns(group: zarr.Group, descriptor: Mapping[str, Any], n: int) -> dict[str, Any]:
    """The first ``n`` rows of every event array of one descriptor."""
    if n == 0:
        return {}
    arrays = _arrays(group)
    out = {}
    for path in _array_paths(descriptor):
        if path not in arrays or arrays[path].shape[0] < n:
            raise StoreError(f"{group.path}/{path} is missing or shorter than n_committed={n}")
        out[path] = arrays[path][:n]
    return out


def _event_doc(descriptor: Mapping[str, Any], columns: Mapping[str, Any], row: int) -> dict:
    keys = _event_keys(descriptor)
    data_keys = descriptor["data_keys"]
    return {
        "uid": str(columns["uid"][row]),
        "time": float(columns["time"][row]),
        "seq_num": int(columns["seq_num"][row]),
        "descriptor": descriptor["uid"],
        "data": {k: _python_value(columns[f"data/{k}"][row]) for k in keys},
        "timestamps": {k: float(columns[f"timestamps/{k}"][row]) for k in keys},
        "filled": {k: False for k in keys if data_keys[k].get("external")},
    }


def _python_value(value: Any) -> Any:
    """Scalars become Python scalars (as the RunEngine emits them); arrays stay arrays."""
    if isinstance(value, np.ndarray):
        return value.copy() if value.ndim else value.item()
    return value.item() if isinstance(value, np.generic) else value

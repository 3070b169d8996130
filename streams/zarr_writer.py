"""``ZarrRunWriter``: a DocumentSink that stores event-model runs in zarr (layout: :mod:`streams.zarr_layout`)."""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from typing import Any, cast

import event_model
import numpy as np
import zarr

from streams.derived import check_event_data, validate_document
from streams.errors import DocumentError, StoreError, StreamError
from streams.lifecycle import ClosesOnExit
from streams.sequence import events_of
from streams.zarr_layout import (
    _LISTED,
    _array_paths,
    _arrays,
    _child_group,
    _children,
    _create_array,
    _event_keys,
    _node_name,
    _open_root,
    _Run,
    _store_dtype,
    _store_shape,
    _Stream,
)

__all__ = ["ZarrRunWriter"]

logger = logging.getLogger(__name__)


class ZarrRunWriter(ClosesOnExit):
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
        self._runs: zarr.Group = _child_group(_open_root(root, create=True), "runs")
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
        attrs: dict[str, Any] = group.attrs.asdict()  # JSON as stored
        if "start" not in attrs:
            raise StoreError(f"run group {uid!r} has no 'start' attribute; the store is damaged")
        if "stop" in attrs:
            raise StoreError(
                f"run {uid!r} is already stopped (exit_status="
                f"{attrs['stop'].get('exit_status')!r}); a second start with that uid is refused"
            )
        if not isinstance(group, zarr.Group):
            raise StoreError(f"run {uid!r} is stored as a zarr array, not a group; "
                             "the store is damaged")
        lists = {key: list(attrs.get(key, [])) for key, _ in _LISTED.values()}
        ids = {d[idf] for key, idf in _LISTED.values() for d in lists[key]}
        run = _Run(group, group.require_group("descriptors"), lists, ids)
        self._open[uid] = run
        for key in ("resources", "stream_resources"):
            self._owners.update({d["uid"]: uid for d in lists[key]})
        for desc_uid in _children(run.descriptors):
            self._streams[desc_uid] = self._resume_stream(
                uid, _child_group(run.descriptors, desc_uid)
            )

    @staticmethod
    def _resume_stream(run_uid: str, group: zarr.Group) -> _Stream:
        attrs: dict[str, Any] = group.attrs.asdict()  # JSON as stored
        if "descriptor" not in attrs or "n_committed" not in attrs:
            raise StoreError(f"descriptor group {group.path!r} lacks 'descriptor'/'n_committed'")
        stream = _Stream(run_uid, group, attrs["descriptor"], int(attrs["n_committed"]))
        stream.arrays = _arrays(group)
        for arr in stream.arrays.values():
            if arr.shape[0] < stream.n:
                raise StoreError(f"array {arr.path!r} has {arr.shape[0]} rows but "
                                 f"n_committed={stream.n}; the store is damaged")
        _trim(stream)  # spare rows, or those of an event never committed
        if stream.n:
            if missing := sorted(set(_array_paths(stream.descriptor)) - set(stream.arrays)):
                raise StoreError(f"descriptor group {group.path!r} lacks arrays {missing}")
            stream.ready = True
            stream.uids = {str(u) for u in np.asarray(stream.arrays["uid"][: stream.n])}
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
        for stream in self._streams.values():
            if stream.run_uid == run_uid:
                _trim(stream)
        run.group.attrs["stop"] = event_model.sanitize_doc(doc)
        del self._open[run_uid]
        self._streams = {k: s for k, s in self._streams.items() if s.run_uid != run_uid}
        self._owners = {k: r for k, r in self._owners.items() if r != run_uid}

    def _on_event(self, doc: dict[str, Any]) -> None:
        self._append(doc["descriptor"], [doc], "event", doc["uid"])

    def _on_event_page(self, doc: dict[str, Any]) -> None:
        # __call__ validated doc against event-model's event_page schema.
        events = list(events_of("event_page", doc))
        self._append(doc["descriptor"], events, "event_page", None)

    def _on_datum_page(self, doc: dict[str, Any]) -> None:
        # __call__ validated doc against event-model's datum_page schema.
        for datum in event_model.unpack_datum_page(cast(event_model.DatumPage, doc)):
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
            # doc["run_start"] is run_uid, and _run_of found that run open
            self._owners[doc["uid"]] = doc["run_start"]

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
            if arr.shape[0] < n + k:
                arr.resize((_capacity(arr, n + k), *arr.shape[1:]))
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


def _capacity(arr: zarr.Array, rows: int) -> int:
    """Rows to give ``arr`` so that it holds ``rows``: at least a chunk, and doubling as it grows.

    Resizing rewrites an array's metadata (about a millisecond an array, every event when
    grown one row at a time); rows past ``n_committed`` are never read and unwritten chunks
    take no space, and :func:`_trim` cuts them off at the stop document.
    """
    return max(rows, 2 * arr.shape[0], arr.chunks[0])


def _trim(stream: _Stream) -> None:
    """Cut every array of ``stream`` back to its committed rows: at the stop (a stopped run has
    no spare rows) and on reopening (spare rows, or those of an event never committed)."""
    for arr in stream.arrays.values():
        if arr.shape[0] != stream.n:
            logger.info("truncating %s from %d to %d rows", arr.path, arr.shape[0], stream.n)
            arr.resize((stream.n, *arr.shape[1:]))


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

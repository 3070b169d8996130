"""Derived data published as an ordinary event-model run, linked to the raw run by uid.

:class:`DerivedRunWriter` composes the documents with event-model's own tools
(:func:`event_model.compose_run`) and checks every one before any sink sees it:

* against event-model's JSON schema (on a JSON-plain copy: numpy arrays and scalars become
  lists and Python scalars for the check, while sinks receive the document unchanged);
* for events, against their descriptor: the data keys and timestamp keys must equal the
  declared ones, and each value must match its declared ``dtype`` and ``shape``.

The helpers :func:`validate_document` and :func:`check_event_data` are public so that other
writers in ``streams`` apply the same rules.
"""

from __future__ import annotations

import os
import time as ttime
from collections.abc import Mapping, Sequence
from types import TracebackType
from typing import Any, Literal, TypeGuard, cast

import event_model
import numpy as np

from streams.errors import DocumentError, StreamError
from streams.frame_files import FrameFiles
from streams.protocols import DocumentSink

__all__ = ["DerivedRunWriter", "check_event_data", "validate_document"]

# numpy dtype kinds accepted for each event-model JSON dtype.
_KINDS = {
    "number": "iuf",
    "integer": "iu",
    "boolean": "b",
    "string": "UT",
    "array": "biufUT",
}
_ExitStatus = Literal["success", "abort", "fail"]
_EXIT_STATUSES: tuple[_ExitStatus, ...] = ("success", "abort", "fail")


def _numeric_array(value: Any) -> bool:
    return isinstance(value, np.ndarray) and value.dtype.kind in "biuf"


def _is_exit_status(value: str) -> TypeGuard[_ExitStatus]:
    return value in _EXIT_STATUSES


def validate_document(name: str, doc: Mapping[str, Any]) -> None:
    """Validate ``doc`` against event-model's JSON schema for document type ``name``.

    Numpy arrays and scalars are converted to lists and Python scalars for the check only.

    Raises
    ------
    DocumentError
        If ``name`` is not an event-model document name, ``doc`` is not JSON-serializable, or
        the schema rejects it; the reason names the offending field.
    """
    uid = doc.get("uid") if isinstance(doc, Mapping) else None
    uid = uid if isinstance(uid, str) else None
    try:
        validator = event_model.schema_validators[event_model.DocumentNames[name]]
    except KeyError:
        known = sorted(event_model.DocumentNames.__members__)
        raise DocumentError(name, uid, f"unknown document name; expected one of {known}") from None
    try:
        plain = event_model.sanitize_doc(dict(doc))
    except (TypeError, ValueError) as err:
        raise DocumentError(name, uid, f"not JSON-serializable: {err}") from None
    errors = sorted(validator.iter_errors(plain), key=lambda e: list(map(str, e.absolute_path)))
    if errors:
        reasons = [f"{'/'.join(map(str, e.absolute_path)) or '<doc>'}: {e.message}" for e in errors]
        raise DocumentError(name, uid, "; ".join(reasons[:5]))


def check_event_data(
    descriptor: Mapping[str, Any],
    data: Mapping[str, Any],
    timestamps: Mapping[str, Any],
    *,
    name: str = "event",
    uid: str | None = None,
) -> None:
    """Check one event's ``data`` and ``timestamps`` against ``descriptor['data_keys']``.

    Non-finite numbers (NaN, inf) are accepted: they are legitimate measured values.
    Keys of external ``"STREAM:"`` data are left out of the comparison, as event-model does;
    values of other external keys (datum ids) are not checked against ``dtype``/``shape``.

    Raises
    ------
    DocumentError
        If keys are missing or extra (both are named), or a value's kind or shape differs from
        the declared ``dtype``/``shape`` (the key, the declared and received values are named).
    """
    data_keys = descriptor["data_keys"]
    expected = {k for k, dk in data_keys.items() if dk.get("external") != "STREAM:"}
    for label, given in (("data", data), ("timestamps", timestamps)):
        missing, extra = sorted(expected - set(given)), sorted(set(given) - expected)
        if missing or extra:
            raise DocumentError(
                name,
                uid,
                f"{label} keys differ from descriptor {descriptor.get('uid')!r} data_keys: "
                f"missing {missing}, extra {extra}",
            )
    for key in sorted(expected):
        if not data_keys[key].get("external"):
            _check_value(key, data_keys[key], data[key], name=name, uid=uid)


def _check_value(
    key: str, data_key: Mapping[str, Any], value: Any, *, name: str, uid: str | None
) -> None:
    dtype: Any = data_key.get("dtype")  # whatever was declared: a wrong one matches no kind
    declared = list(data_key.get("shape", []))
    try:
        arr = np.asarray(value)
    except ValueError as err:  # ragged nested sequences
        raise DocumentError(name, uid, f"data key {key!r}: {err}") from None
    if arr.dtype.kind not in _KINDS.get(dtype, ""):
        raise DocumentError(
            name,
            uid,
            f"data key {key!r} is declared dtype={dtype!r} but received "
            f"{type(value).__name__} of numpy dtype {arr.dtype} (value {value!r:.80})",
        )
    if arr.ndim != len(declared) or any(
        d is not None and d != n for d, n in zip(declared, arr.shape, strict=True)
    ):
        raise DocumentError(
            name,
            uid,
            f"data key {key!r} is declared shape={declared} but received shape={list(arr.shape)}",
        )


class DerivedRunWriter:
    """Publish derived data as a run of valid event-model documents.

    The start document is composed and sent to every sink at construction; it carries
    ``raw_run_uid`` (when given) and ``metadata``. Nothing invalid is ever sent: a document
    that fails a check raises :class:`~streams.errors.DocumentError` before any sink sees it.

    Parameters
    ----------
    sinks : Sequence[DocumentSink]
        Receive every ``(name, doc)`` in order. They are not closed by this writer. A sink
        that raises stops the publication of that document to later sinks (writers fail
        loudly).
    raw_run_uid : str or None
        Uid of the raw run the derived data came from; ``None`` for a run with no raw parent.
    metadata : Mapping, optional
        Extra start-document fields. Must not contain ``uid`` or ``time``.
    files : path, optional
        Directory for the arrays of data keys a stream declares ``external``
        (:meth:`add_stream`): they go to HDF5 files there (:class:`streams.frame_files.FrameFiles`),
        named by ``stream_resource`` and ``stream_datum`` documents, and leave the events light.

    Examples
    --------
    >>> docs = []
    >>> sink = lambda name, doc: docs.append((name, doc))
    >>> with DerivedRunWriter([sink], raw_run_uid="raw-uid") as run:
    ...     peak = {"dtype": "number", "shape": [], "source": "fit"}
    ...     _ = run.add_stream("primary", {"peak": peak})
    ...     _ = run.emit("primary", {"peak": 0.5})
    >>> [name for name, _ in docs]
    ['start', 'descriptor', 'event', 'stop']
    """

    def __init__(
        self,
        sinks: Sequence[DocumentSink],
        *,
        raw_run_uid: str | None,
        metadata: Mapping[str, Any] | None = None,
        files: str | os.PathLike[str] | None = None,
    ) -> None:
        self._sinks = tuple(sinks)
        for sink in self._sinks:
            if not callable(sink):
                raise TypeError(f"sink {sink!r} is not callable as sink(name, doc)")
        md = dict(metadata or {})
        for reserved in ("uid", "time"):
            if reserved in md:
                raise ValueError(f"metadata must not set {reserved!r} ({md[reserved]!r}); "
                                 "the writer composes it")
        if raw_run_uid is not None:
            if not isinstance(raw_run_uid, str) or not raw_run_uid:
                raise ValueError(f"{raw_run_uid=} must be a non-empty string or None")
            if md.setdefault("raw_run_uid", raw_run_uid) != raw_run_uid:
                raise ValueError(
                    f"metadata['raw_run_uid']={md['raw_run_uid']!r} contradicts {raw_run_uid=}"
                )
        # validate=False: we validate ourselves so every failure is a DocumentError.
        self._bundle = event_model.compose_run(metadata=md, validate=False)
        self._descriptors: dict[str, Any] = {}
        self._schema_checked: set[tuple[str, str]] = set()  # (document name, stream)
        self._stopped = False
        self._files = None if files is None else FrameFiles(files, self._bundle.start_doc["uid"])
        # stream -> data key -> the compose_stream_datum of its stream resource
        self._resources: dict[str, dict[str, Any]] = {}
        # event-model types its documents as TypedDicts, which mypy will not widen to
        # dict[str, Any]; at runtime they are plain dicts, and sinks get the very object.
        start_doc = cast(dict[str, Any], self._bundle.start_doc)
        validate_document("start", start_doc)
        self._publish("start", start_doc)

    @property
    def start_uid(self) -> str:
        """Uid of this derived run's start document."""
        return self._bundle.start_doc["uid"]

    @property
    def closed(self) -> bool:
        """Whether the stop document has been composed."""
        return self._stopped

    def add_stream(
        self,
        name: str,
        data_keys: dict[str, dict[str, Any]],
        configuration: dict[str, Any] | None = None,
        hints: dict[str, Any] | None = None,
        external: Sequence[str] = (),
    ) -> dict[str, Any]:
        """Declare stream ``name`` with its ``data_keys``; send and return its descriptor.

        Each stream has one descriptor; declaring the same name twice raises ``ValueError``.
        The ``external`` data keys (arrays of fixed ``shape`` with a numeric ``dtype_numpy``) are
        written to the run's files, not put in the events: the descriptor marks them
        ``external: "STREAM:"`` and a ``stream_resource`` for each follows it.
        """
        self._require_open("descriptor")
        if not isinstance(name, str) or not name:
            raise ValueError(f"stream {name=} must be a non-empty string")
        if name in self._descriptors:
            raise ValueError(f"stream {name!r} was already added to run {self.start_uid!r}")
        if external and self._files is None:
            raise ValueError(f"stream {name!r} declares external keys {list(external)} but the writer has no "
                             "files directory; pass files=DIR")
        unknown = sorted(set(external) - set(data_keys))
        if unknown:
            raise ValueError(f"external keys {unknown} of stream {name!r} are not among its data keys {sorted(data_keys)}")
        data_keys = {k: ({**dk, "external": "STREAM:"} if k in external else dk) for k, dk in data_keys.items()}
        compose = self._bundle.compose_descriptor
        bundle = compose(name=name, data_keys=data_keys, configuration=configuration,
                         hints=hints, validate=False)
        try:
            validate_document("descriptor", bundle.descriptor_doc)
            where = {} if self._files is None or not external else \
                self._files.open_stream(name, {k: data_keys[k] for k in external})
        except (DocumentError, StreamError):
            # compose_descriptor registered the stream even though it is refused: undo that.
            compose.streams.pop(name, None)
            compose.event_counters.pop(name, None)
            raise
        resources = {k: self._bundle.compose_stream_resource(data_key=k, validate=False, **where[k]) for k in external}
        self._descriptors[name] = bundle
        descriptor_doc = cast(dict[str, Any], bundle.descriptor_doc)  # a TypedDict: see __init__
        self._publish("descriptor", descriptor_doc)
        for res in resources.values():
            doc = cast(dict[str, Any], res.stream_resource_doc)
            validate_document("stream_resource", doc)
            self._publish("stream_resource", doc)
        self._resources[name] = {k: res.compose_stream_datum for k, res in resources.items()}
        return descriptor_doc

    def emit(
        self,
        stream: str,
        data: Mapping[str, Any],
        timestamps: Mapping[str, Any] | None = None,
    ) -> dict[str, Any]:
        """Send one event of ``stream`` and return it; ``timestamps`` default to now.

        The document sent keeps the values of ``data`` as given (numpy arrays stay arrays).

        Raises
        ------
        DocumentError
            If keys or values do not match the stream's descriptor, or the schema rejects it.
        """
        bundle = self._open_stream("event", stream)
        data = dict(data)
        rows = self._take_external(stream, bundle.descriptor_doc, [data], "event")
        if timestamps is None:
            now = ttime.time()
            timestamps = {key: now for key in data}
        timestamps = {k: v for k, v in timestamps.items() if k not in rows}
        check_event_data(bundle.descriptor_doc, data, timestamps)
        seq_num = self._bundle.compose_descriptor.event_counters[stream]
        doc = cast(dict[str, Any], bundle.compose_event(data=data, timestamps=timestamps, validate=False))
        self._schema_check_once("event", stream, doc, seq_num)
        self._write_external(stream, bundle.descriptor_doc, rows, seq_num)
        self._publish("event", doc)
        return doc

    def _take_external(self, stream: str, descriptor: Mapping[str, Any], rows: Sequence[dict[str, Any]],
                       name: str) -> dict[str, np.ndarray]:
        """Remove the stream's external values from ``rows`` (each checked against its data key)
        and return them stacked, one array per key; empty for a stream with none."""
        keys = self._resources.get(stream) or {}
        out = {}
        for key in keys:
            values = []
            for i, row in enumerate(rows):
                if key not in row:
                    where = f"row {i} of {len(rows)}: " if name == "event_page" else ""
                    raise DocumentError(name, None, f"{where}data key {key!r} (written to a file) is missing")
                value = row.pop(key)
                _check_value(key, {**descriptor["data_keys"][key], "dtype": "array"}, value, name=name, uid=None)
                values.append(np.asarray(value))
            out[key] = np.stack(values)
        return out

    def _write_external(self, stream: str, descriptor: Mapping[str, Any], rows: Mapping[str, np.ndarray],
                        seq_num: int) -> None:
        """Append the external rows to the files and send a ``stream_datum`` per key naming them
        (events ``seq_num`` on); a failed write gives the seq_nums back to the stream."""
        if not rows:
            return
        assert self._files is not None
        n = len(next(iter(rows.values())))
        try:
            start, stop = self._files.append(stream, rows)
        except StreamError:
            self._bundle.compose_descriptor.event_counters[stream] = seq_num
            raise
        for compose_datum in self._resources[stream].values():
            datum = compose_datum(indices={"start": start, "stop": stop},
                                  seq_nums={"start": seq_num, "stop": seq_num + n},
                                  descriptor=descriptor, validate=False)
            self._publish("stream_datum", cast(dict[str, Any], datum))

    def emit_page(
        self,
        stream: str,
        rows: Sequence[Mapping[str, Any]],
        timestamps: Sequence[Mapping[str, Any]] | None = None,
    ) -> dict[str, Any] | None:
        """Send ``rows`` of ``stream`` (one data mapping per event) as one ``event_page``
        document and return it; ``None``, and nothing sent, for no rows. ``timestamps`` (one
        mapping per row) default to now.

        A page is what a stream of many small rows per raw frame should send (the Bragg
        agent's peaks, tens per frame): one document to every sink, one Kafka message, one
        append to the zarr and tiled stores, instead of one per row. Each row is checked
        against the descriptor as :meth:`emit` checks an event, and the rows take consecutive
        ``seq_num``.

        Raises
        ------
        DocumentError
            If a row's keys or values do not match the stream's descriptor (the row is named),
            or the schema rejects the page; nothing is sent then.
        """
        bundle = self._open_stream("event_page", stream)
        if not rows:
            return None
        if timestamps is not None and len(timestamps) != len(rows):
            raise ValueError(f"{len(timestamps)} timestamps for {len(rows)} rows; give one mapping per row")
        now = ttime.time()
        plain = [dict(r) for r in rows]
        external = self._take_external(stream, bundle.descriptor_doc, plain, "event_page")
        stamps = [{k: v for k, v in t.items() if k not in external} for t in timestamps] if timestamps is not None \
            else [{k: now for k in r} for r in plain]
        for i, (row, stamp) in enumerate(zip(plain, stamps, strict=True)):
            try:
                check_event_data(bundle.descriptor_doc, row, stamp, name="event_page")
            except DocumentError as err:
                raise DocumentError("event_page", None, f"row {i} of {len(rows)}: {err.reason}") from None
        keys = list(plain[0])
        seq_num = self._bundle.compose_descriptor.event_counters[stream]
        doc = bundle.compose_event_page(data={k: [r[k] for r in plain] for k in keys},
                                        timestamps={k: [t[k] for t in stamps] for k in keys}, validate=False)
        page = cast(dict[str, Any], doc)  # a TypedDict: see __init__
        self._schema_check_once("event_page", stream, page, seq_num)
        self._write_external(stream, bundle.descriptor_doc, external, seq_num)
        self._publish("event_page", page)
        return page

    def _open_stream(self, name: str, stream: str) -> Any:
        """The descriptor bundle of ``stream``, for sending a ``name`` document on it; raises
        if the run is stopped or the stream was never added."""
        self._require_open(name)
        if stream not in self._descriptors:
            known = sorted(self._descriptors)
            raise ValueError(f"unknown {stream=}; call add_stream first (known: {known})")
        return self._descriptors[stream]

    def _schema_check_once(self, name: str, stream: str, doc: dict[str, Any], seq_num: int) -> None:
        """The full JSON-schema check of the first event (or event page) of a stream.

        Later ones are composed by the same code from data that passed check_event_data (keys,
        dtypes, shapes), so the schema cannot tell them apart; skipping it is what lets a daemon
        publish thousands of derived events per second (the schema check costs ~1 ms). The
        schema leaves the values of ``data`` free, so a numeric array is checked as an empty
        list: its contents cannot change the verdict, and turning a 512 x 512 frame into JSON
        and back cost ~150 ms, on the first event of every stream of every run. A rejected
        document gives its ``seq_num`` back to the stream.
        """
        if (name, stream) in self._schema_checked:
            return

        def light(v: Any) -> Any:
            return [] if _numeric_array(v) else v
        data = doc["data"]
        light_data = ({k: [light(v) for v in vs] for k, vs in data.items()} if name == "event_page"
                      else {k: light(v) for k, v in data.items()})
        try:
            validate_document(name, {**doc, "data": light_data})
        except DocumentError:
            self._bundle.compose_descriptor.event_counters[stream] = seq_num
            raise
        self._schema_checked.add((name, stream))

    def close(self, exit_status: str = "success", reason: str = "") -> dict[str, Any] | None:
        """Send the stop document and return it; later calls do nothing and return ``None``."""
        if self._stopped:
            return None
        if not _is_exit_status(exit_status):
            raise ValueError(f"{exit_status=} must be one of {_EXIT_STATUSES}")
        self._stopped = True
        if self._files is not None:
            self._files.close()  # complete before the stop says so
        stop = self._bundle.compose_stop(exit_status=exit_status, reason=reason, validate=False)
        doc = cast(dict[str, Any], stop)  # a TypedDict: see __init__
        validate_document("stop", doc)
        self._publish("stop", doc)
        return doc

    def __enter__(self) -> DerivedRunWriter:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if exc is None:
            self.close()
        else:
            self.close("fail", reason=f"{type(exc).__name__}: {exc}")

    def _require_open(self, name: str) -> None:
        if self._stopped:
            raise StreamError(
                f"derived run {self.start_uid!r} is already stopped; cannot send a {name!r} "
                "document. Start a new DerivedRunWriter."
            )

    def _publish(self, name: str, doc: dict[str, Any]) -> None:
        # Every caller has validated ``doc`` already.
        for sink in self._sinks:
            sink(name, doc)

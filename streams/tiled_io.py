"""Bluesky runs in and out of a tiled server.

:class:`TiledDocumentSink` writes runs with Bluesky's own tiled writer
(:class:`bluesky_tiled_plugins.TiledWriter`, the "BlueskyRun v3" layout: the start and stop
documents as node metadata, one container per stream holding the descriptor as metadata, the
event rows in a table and large arrays as separate array nodes).

:class:`TiledRunSource` reads such runs back as event-model documents. It rebuilds them on
the client from the stored metadata and tables, so it works with any tiled server holding
that layout; ``BlueskyRun.documents()`` would need the server to be configured with
bluesky-tiled-plugins' JSON-seq exporter, which ``tiled serve catalog`` cannot be.

What the layout keeps, and so what comes back: start, descriptor and stop documents (with
the writer's normalisations: tuples become lists, data keys gain ``dtype_numpy`` and
``object_name``, a data key named ``time`` or ``seq_num`` gets a trailing ``_``), and for each
event its ``time``, ``seq_num``, ``data`` and ``timestamps``. Event uids are *not* stored;
an event read back has the uid ``"event-<descriptor uid>-<seq_num>"``.

Detector frames written to files (stream resources, as ophyd-async detectors write them, or
resource / datum that the writer turns into stream resources) are registered by the writer as
external array nodes, which the server reads from the files when it may (``tiled serve -r DIR``,
:class:`~streams.tiled_launch.TiledServer` ``readable``). They come back *filled*: each event
holds its frame inline, and the descriptor's data key no longer says ``external``, so agents read
a replayed run as one whose frames were in its events. A fly scan's stream has no events at all
(its frames are named by stream datums alone) and so no event table: each of its frames comes
back as an event with ``seq_num`` 1, 2, ... and the descriptor's time (tiled keeps none per frame).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Mapping, Sequence
from typing import Any
from urllib.parse import urlsplit

import httpx
import numpy as np
from bluesky_tiled_plugins import TiledWriter
from tiled.client import from_uri
from tiled.queries import Eq, SpecsQuery

from streams.derived import validate_document
from streams.errors import StreamError
from streams.lifecycle import ClosesOnExit

__all__ = ["TiledDocumentSink", "TiledRunSource", "TiledUnreachableError", "check_reachable"]

logger = logging.getLogger(__name__)

_TABLE = "internal"  # TiledWriter's name for a stream's event table
_RANK = {"descriptor": 0, "event": 1}  # order of documents recorded at the same time


class TiledUnreachableError(StreamError):
    """Nothing answers at the tiled URI (it may come back), as against an answer that is wrong."""


def check_reachable(
    uri: str, *, api_key: str | None = None, timeout: float = 5.0
) -> dict[str, Any]:
    """Check that a tiled server answers at ``uri`` (and accepts ``api_key``), within seconds.

    The tiled client itself retries a refused connection for tens of seconds; this check
    fails at once instead.

    Parameters
    ----------
    uri : str
        The server, ``http(s)://host:port``, or a node on it (``.../api/v1/metadata/<path>``).
    api_key : str, optional
        When given, the node at ``uri`` is read with it, so a wrong key fails here too.
    timeout : float
        Seconds for each request.

    Returns
    -------
    dict
        The server's ``/api/v1/`` description (``library_version``, ``formats``, ...).

    Raises
    ------
    ValueError
        If ``uri`` is not an ``http://`` or ``https://`` URL.
    StreamError
        If nothing answers (:class:`TiledUnreachableError`), the answer is not tiled's, or the
        key is refused; the message names the URI and the reason.
    """
    parts = urlsplit(uri)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise ValueError(f"{uri=} is not a tiled server URL; expected http(s)://host:port")
    base = f"{parts.scheme}://{parts.netloc}"
    prefix = parts.path.split("/api/")[0].rstrip("/")
    node_path = parts.path.partition("/api/v1/metadata")[2].strip("/")
    headers = {"Authorization": f"Apikey {api_key}"} if api_key else {}
    try:
        with httpx.Client(timeout=timeout, headers=headers) as http:
            about = http.get(f"{base}{prefix}/api/v1/")
            if about.status_code != 200 or "api_version" not in _json(about):
                raise StreamError(
                    f"{uri!r} answered {about.request.url} with HTTP {about.status_code}, "
                    "not a tiled server description; check the URI (host, port and path)"
                )
            if api_key is not None:
                node = http.get(f"{base}{prefix}/api/v1/metadata/{node_path}")
                if node.status_code in (401, 403):
                    raise StreamError(
                        f"tiled server at {uri!r} refused the API key (HTTP {node.status_code}: "
                        f"{_json(node).get('detail', node.text)}); pass the key it was started "
                        "with (tiled serve ... --api-key)"
                    )
                if node.status_code != 200:
                    raise StreamError(
                        f"tiled server at {uri!r} has no readable node {node_path!r} "
                        f"(HTTP {node.status_code}); check the path in the URI"
                    )
            info: dict[str, Any] = _json(about)
            return info
    except httpx.TransportError as err:
        raise TiledUnreachableError(
            f"tiled server at {uri!r} is not reachable: {type(err).__name__}: {err}; start one "
            "(streams.tiled_launch.TiledServer, or `tiled serve catalog ...`) or fix the URI"
        ) from None


def _json(response: httpx.Response) -> dict[str, Any]:
    try:
        body = response.json()
    except ValueError:
        return {}
    return body if isinstance(body, dict) else {}


class TiledDocumentSink(ClosesOnExit):
    """A :class:`~streams.protocols.DocumentSink` that writes runs into a tiled server.

    Each document is validated against event-model's schema and handed to Bluesky's
    :class:`~bluesky_tiled_plugins.TiledWriter`, which files each run under its start uid.
    ``event_page`` documents are accepted (the writer unpacks them).

    Parameters
    ----------
    uri : str
        The tiled server (or a writable container on it).
    api_key : str, optional
        An API key with write access. ``None`` lets the tiled client use ``TILED_API_KEY``
        or a stored login.
    batch_size : int
        Events buffered per stream before they are written. The default, 1, writes every
        event as it arrives, so a run being written can be read while it runs and nothing
        is lost if the writer stops before the stop document, but each event costs HTTP
        round trips (about 30 ms for a scalar event, 80 ms with an array, on loopback) and
        blocks the caller, a RunEngine included. Raise it to ingest stored runs or fast
        scans (buffered events are written when the batch fills and at the stop document).

    Raises
    ------
    StreamError
        From the constructor, if the server is not reachable or refuses the key.
    """

    def __init__(self, uri: str, *, api_key: str | None = None, batch_size: int = 1) -> None:
        if not (isinstance(batch_size, int) and batch_size >= 1):
            raise ValueError(f"{batch_size=} must be an int >= 1")
        check_reachable(uri, api_key=api_key)
        self.uri = uri
        self._client = from_uri(uri, api_key=api_key, show_progress=False)
        # max_array_size=0: every internal array goes to its own array node. In the event
        # table (the writer's default for arrays of <= 16 elements) a multi-dimensional numpy
        # value fails pyarrow's conversion (bluesky-tiled-plugins 2.0.12).
        self._writer = TiledWriter(self._client, batch_size=batch_size, max_array_size=0)
        self._open: set[str] = set()
        self._closed = False
        self._batch_size = batch_size
        self._streams: dict[str, tuple[str, str]] = {}  # descriptor uid -> (run uid, stream name)
        self._unread: dict[str, dict[str, Any]] = {}  # stream resources tiled has not served a row of yet

    def __call__(self, name: str, doc: dict[str, Any]) -> None:
        """Write one document.

        Raises
        ------
        DocumentError
            If the document fails event-model's schema.
        StreamError
            If the sink is closed or the server rejects or fails the write (with the reason).
        """
        if self._closed:
            raise StreamError(f"TiledDocumentSink for {self.uri} is closed; "
                              f"cannot write a {name!r} document")
        validate_document(name, doc)
        try:
            self._writer(name, doc)
        except Exception as err:  # re-raised with the document and server named
            detail = getattr(getattr(err, "response", None), "text", "")
            raise StreamError(
                f"writing {name!r} document {doc.get('uid')!r} to tiled at {self.uri} failed: "
                f"{type(err).__name__}: {err} {detail}".rstrip()
            ) from err
        if name == "start":
            self._open.add(doc["uid"])
        elif name == "stop":
            self._open.discard(doc["run_start"])
            self._streams = {k: v for k, v in self._streams.items() if v[0] != doc["run_start"]}
            self._unread = {k: v for k, v in self._unread.items() if v.get("run_start") != doc["run_start"]}
        elif name == "descriptor":
            self._streams[doc["uid"]] = (doc["run_start"], doc.get("name", "primary"))
        elif name == "stream_resource":
            self._unread[doc["uid"]] = doc
        elif name == "stream_datum" and self._batch_size == 1 and doc["stream_resource"] in self._unread:
            self._check_served(doc)

    def _check_served(self, datum: dict[str, Any]) -> None:
        """Read back the first row a stream resource registered: tiled registers a file it is not
        allowed to read without a word, and refuses only when the data are asked for, later."""
        resource = self._unread[datum["stream_resource"]]
        run, stream = self._streams.get(datum["descriptor"], (resource.get("run_start", ""), ""))
        try:
            node = self._client[run][stream][resource["data_key"]]
        except KeyError:  # a layout this check does not know: nothing to read back
            del self._unread[datum["stream_resource"]]
            return
        try:
            node[int(datum["indices"]["start"])]
        except Exception as err:  # the server's reason is in its log; the likely one is said here
            raise StreamError(
                f"tiled at {self.uri} registered {resource.get('uri')} ({stream!r} {resource['data_key']!r} of run "
                f"{run}) but cannot read it back ({type(err).__name__}: {' '.join(str(err).split())}). A file outside the server's "
                "readable storage is refused only when read: serve its directory (tiled serve ... -r DIR; the dev "
                "stack's tiled_readable), or write the files where it may read them") from err
        del self._unread[datum["stream_resource"]]

    def close(self) -> None:
        """Close the connection. Runs without a stop document stay open on the server."""
        if self._closed:
            return
        self._closed = True
        if self._open:
            logger.warning("closing TiledDocumentSink with runs that have no stop document: %s",
                           sorted(self._open))
        self._client.context.close()


class TiledRunSource(ClosesOnExit):
    """Read runs written by Bluesky's tiled writer back as event-model documents.

    Parameters
    ----------
    uri : str
        The tiled server, or the container on it that holds the runs.
    api_key : str, optional
        An API key with read access (``None``: ``TILED_API_KEY`` or a stored login).

    Raises
    ------
    StreamError
        From the constructor, if the server is not reachable or refuses the key.
    """

    def __init__(self, uri: str, *, api_key: str | None = None) -> None:
        check_reachable(uri, api_key=api_key)
        self.uri = uri
        self._client = from_uri(uri, api_key=api_key, show_progress=False)
        self._closed = False

    def runs(self, **filters: Any) -> list[str]:
        """Start uids of the stored runs, in start-time order.

        Parameters
        ----------
        **filters
            Equality on fields of the start document, e.g. ``scan_id=3``, ``uid="..."``,
            ``plan_name="count"``. A field no run has matches nothing.
        """
        self._check_open()
        node = self._client.search(SpecsQuery(["BlueskyRun"]))
        for key, value in filters.items():
            node = node.search(Eq(f"start.{key}", value))
        return list(node.sort(("start.time", 1)).keys())

    def documents(self, uid: str) -> Iterator[tuple[str, dict[str, Any]]]:
        """Yield run ``uid``'s documents: start, then descriptors and events (one ``event``
        per stored row) in recorded-time order, then stop if the run has one.

        All of the run's event data are read when the first document is requested.

        Raises
        ------
        KeyError
            If there is no run ``uid``.
        StreamError
            If the node is not a BlueskyRun in the v3 (SQL) layout, or a stream holds data
            this reader cannot rebuild events from (an external key without its array node,
            unexpected nodes).
        """
        run = self._run(uid)
        metadata = _plain(run.metadata)
        body: list[tuple[tuple[float, int, int, int], str, dict[str, Any]]] = []
        for i, stream_name in enumerate(sorted(run)):
            for name, doc in _stream_documents(run[stream_name], uid, stream_name):
                key = (float(doc["time"]), _RANK[name], i, int(doc.get("seq_num", 0)))
                body.append((key, name, doc))
        body.sort(key=lambda item: item[0])
        yield "start", metadata["start"]
        yield from ((name, doc) for _, name, doc in body)
        if metadata.get("stop"):
            yield "stop", metadata["stop"]

    def close(self) -> None:
        """Close the connection. Idempotent."""
        self._closed = True
        self._client.context.close()

    def _check_open(self) -> None:
        if self._closed:
            raise StreamError(f"TiledRunSource for {self.uri} is closed; open a new one")

    def _run(self, uid: str) -> Any:
        self._check_open()
        if not isinstance(uid, str) or not uid:
            raise KeyError(f"run uid must be a non-empty string, not {uid!r}")
        try:
            run = self._client[uid]
        except KeyError:
            raise KeyError(f"no run {uid!r} at {self.uri}") from None
        specs = {spec.name: spec.version for spec in run.specs}
        if not str(specs.get("BlueskyRun") or "").startswith("3."):
            raise StreamError(
                f"node {uid!r} at {self.uri} has specs {specs}, not a BlueskyRun v3 (the "
                "layout bluesky_tiled_plugins.TiledWriter writes); TiledRunSource reads only that"
            )
        return run


def _stream_documents(
    stream: Any, run_uid: str, stream_name: str
) -> list[tuple[str, dict[str, Any]]]:
    """Descriptors and events of one stream node of a BlueskyRun v3."""
    descriptors = sorted((_plain(d) for d in stream.descriptors), key=lambda d: d["time"])
    docs: list[tuple[str, dict[str, Any]]] = [("descriptor", d) for d in descriptors]
    data_keys: dict[str, Any] = descriptors[0]["data_keys"]
    where = f"stream {stream_name!r} of run {run_uid!r}"
    parts = stream.base
    names = set(parts)
    external = {k for k, dk in data_keys.items() if "external" in dk}
    if missing_nodes := sorted(external - names):
        raise StreamError(f"{where} has external data keys {missing_nodes} with no array node: the writer could "
                          "not register their files (can the tiled server read the detector's directory? "
                          "`tiled serve ... -r DIR`)")
    for d in descriptors:  # the frames come back filled, in the events
        for key in external:
            d["data_keys"][key].pop("external", None)
    if unexpected := sorted(names - set(data_keys) - {_TABLE}):
        raise StreamError(f"{where} has nodes {unexpected} that are neither data keys nor "
                          f"the {_TABLE!r} event table; it was not written by TiledWriter")
    arrays = {key: parts[key].read() for key in names - {_TABLE}}
    if _TABLE in names:
        rows = parts[_TABLE].read().to_dict(orient="records")
        table = "the event table has"
    else:
        # No event was written. A fly scan (ophyd-async detectors collected while they fly) sends
        # no events at all: its frames are named by stream_datum documents alone, and the writer
        # keeps them as array nodes with no table. Each row is then an event; tiled keeps no
        # time of it, so the descriptor's stands in (replayed, a fly scan's frames come at once).
        lengths = {len(values) for values in arrays.values()}
        rows = [{"time": descriptors[0]["time"], "seq_num": i + 1} for i in range(max(lengths, default=0))]
        data_keys = {k: data_keys[k] for k in arrays}
        table = "another array node has"
    for key, values in arrays.items():
        if len(values) != len(rows):
            raise StreamError(f"{where}: array node {key!r} has {len(values)} rows but "
                              f"{table} {len(rows)}; the run is damaged")
    columns = set(rows[0]) if rows else set()
    if _TABLE in names and rows and (missing := sorted(
        k for k in data_keys
        if (k not in arrays and k not in columns) or (f"ts_{k}" not in columns and k not in external)
    )):
        raise StreamError(f"{where}: data keys {missing} lack a data column or array node, "
                          "or a 'ts_' timestamp column; the run is damaged")
    times = [d["time"] for d in descriptors]
    for i, row in enumerate(rows):
        t = float(row["time"])
        desc = descriptors[max(0, sum(1 for dt in times[1:] if dt <= t))]
        docs.append(("event", {
            "uid": f"event-{desc['uid']}-{int(row['seq_num'])}",
            "time": t,
            "seq_num": int(row["seq_num"]),
            "descriptor": desc["uid"],
            "data": {
                key: _value(arrays[key][i] if key in arrays else row[key], dk["shape"])
                for key, dk in data_keys.items()
            },
            # the writer keeps no timestamp of a key written to a file: the event's time stands in
            "timestamps": {key: float(row.get(f"ts_{key}", t)) for key in data_keys},
            "filled": {},
        }))
    return docs


def _value(value: Any, shape: Sequence[int | None]) -> Any:
    """A stored cell as the RunEngine emits it: a Python scalar, or an array of ``shape``."""
    if not shape:
        return value.item() if isinstance(value, np.generic | np.ndarray) else value
    return _stack(value)


def _stack(value: Any) -> np.ndarray:
    # A list cell of the event table comes back as a numpy object array of rows.
    arr = np.asarray(value)
    if arr.dtype == object and arr.size:
        return np.stack([_stack(v) for v in arr])
    return arr


def _plain(value: Any) -> Any:
    """Tiled's read-only ``DictView``/``ListView`` (and nested ones) as dicts and lists."""
    if isinstance(value, Mapping):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, Sequence) and not isinstance(value, str | bytes):
        return [_plain(v) for v in value]
    return value

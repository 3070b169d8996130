"""Order checks on a stream of event-model documents, in bounded memory.

:class:`DocumentSequence` follows a stream of ``(name, doc)`` pairs and says, for each one,
whether it fits what came before: an event needs a known descriptor, a descriptor and a stop an
open run, a start a uid never seen. Documents from Kafka can arrive duplicated (a producer that
re-sent), out of order (a consumer that started mid-run) or from a run whose start was lost; this
is where that is noticed, so the caller can count, log and skip the document.

Memory stays bounded however long the stream: at most ``max_open_runs`` runs are tracked as
open (the oldest is forgotten beyond that), closed runs are remembered in an LRU of
``max_closed_runs`` uids, and :meth:`DocumentSequence.seen` remembers the last ``window`` uids.
"""

from __future__ import annotations

from collections import OrderedDict, deque
from collections.abc import Iterator, Mapping
from typing import Any, cast

import event_model

__all__ = ["DocumentSequence", "document_uid", "events_of"]

# The field that identifies each kind of document (a list of ids in the page kinds).
_ID_FIELD = {
    "start": "uid",
    "descriptor": "uid",
    "event": "uid",
    "event_page": "uid",
    "stop": "uid",
    "resource": "uid",
    "datum": "datum_id",
    "datum_page": "datum_id",
    "stream_resource": "uid",
    "stream_datum": "uid",
}


def document_uid(name: str, doc: Mapping[str, Any]) -> str | None:
    """The id of a document: its ``uid`` (``datum_id`` for datum), the first one for a page.

    None if the document has no usable id.
    """
    value = doc.get(_ID_FIELD.get(name, "uid"))
    if isinstance(value, list):
        value = value[0] if value else None
    return value if isinstance(value, str) and value else None


def events_of(name: str, doc: Mapping[str, Any]) -> Iterator[dict[str, Any]]:
    """The events a document carries: an ``event`` itself, an ``event_page``'s rows unpacked in
    order, nothing for any other kind. Every consumer of events reads both kinds through this."""
    if name == "event":
        yield cast(dict[str, Any], doc)
    elif name == "event_page":
        yield from event_model.unpack_event_page(cast(Any, doc))


class _BoundedSet:
    """The last ``size`` distinct items added, with O(1) membership and eviction."""

    def __init__(self, size: int) -> None:
        self._order: deque[str] = deque()
        self._items: set[str] = set()
        self._size = size

    def __contains__(self, item: str) -> bool:
        return item in self._items

    def __len__(self) -> int:
        return len(self._items)

    def add(self, item: str) -> None:
        if item in self._items:
            return
        if len(self._order) >= self._size:
            self._items.discard(self._order.popleft())
        self._order.append(item)
        self._items.add(item)


class DocumentSequence:
    """Checks that each document of a stream fits the documents before it.

    Parameters
    ----------
    max_open_runs : int
        Runs tracked as open at once. Beyond that the oldest open run is forgotten (a run
        whose stop never came), and its later documents are reported as unknown.
    max_closed_runs : int
        Stopped runs remembered, so that a repeated start or a late document is recognized.
    window : int
        Document uids remembered for duplicate detection: a document whose uid (``datum_id``
        for datum, the first uid of a page) is within the window is reported as a duplicate.

    Examples
    --------
    >>> seq = DocumentSequence()
    >>> seq.check("start", {"uid": "r1"}) is None
    True
    >>> seq.check("event", {"uid": "e1", "descriptor": "d1"})
    "event e1 references descriptor 'd1', which no open run declared"
    """

    def __init__(
        self, *, max_open_runs: int = 1_000, max_closed_runs: int = 10_000, window: int = 100_000
    ) -> None:
        for label, value in (
            ("max_open_runs", max_open_runs),
            ("max_closed_runs", max_closed_runs),
            ("window", window),
        ):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{label}={value!r} must be an integer >= 1")
        self._max_open = max_open_runs
        self._open: OrderedDict[str, set[str]] = OrderedDict()  # run uid -> its descriptors
        self._closed = _BoundedSet(max_closed_runs)
        # descriptors of open runs
        self._descriptors: set[str] = set()
        # descriptors of stopped runs, to tell "after its stop" from "never declared"
        self._closed_descriptors = _BoundedSet(max_closed_runs)
        self._recent = _BoundedSet(window)
        self.checked = 0
        self.rejected = 0

    @property
    def open_runs(self) -> tuple[str, ...]:
        """uids of the runs started and not yet stopped, oldest first."""
        return tuple(self._open)

    def seen(self, uid: str) -> bool:
        """Whether a document with ``uid`` was accepted by :meth:`check` within the window."""
        return uid in self._recent

    def check(self, name: str, doc: Mapping[str, Any]) -> str | None:
        """None if ``(name, doc)`` fits the stream so far, else the reason, naming the uid.

        A document that fits updates the state (a start opens a run, a stop closes it); one
        that does not leaves the state unchanged.
        """
        self.checked += 1
        reason = self._check(name, doc)
        if reason is not None:
            self.rejected += 1
        return reason

    def _check(self, name: str, doc: Mapping[str, Any]) -> str | None:
        if name not in _ID_FIELD:
            return f"unknown document name {name!r}; expected one of {sorted(_ID_FIELD)}"
        if not isinstance(doc, Mapping):
            return f"{name} document is a {type(doc).__name__}, not a mapping"
        uid = document_uid(name, doc)
        if uid is None:
            return f"{name} document has no {_ID_FIELD[name]}"
        if name == "start":
            return self._start(uid)
        if uid in self._recent:
            return f"duplicate {name} {uid}"
        reason = self._link(name, uid, doc)
        if reason is None:
            self._recent.add(uid)
        return reason

    def _start(self, uid: str) -> str | None:
        if uid in self._open or uid in self._closed or uid in self._recent:
            return f"duplicate start {uid}: a run with this uid was seen already"
        if len(self._open) >= self._max_open:
            self._forget(*self._open.popitem(last=False))
        self._open[uid] = set()
        self._recent.add(uid)
        return None

    def _link(self, name: str, uid: str, doc: Mapping[str, Any]) -> str | None:
        """Check a non-start document's references; record it if they hold."""
        if name in ("event", "event_page", "stream_datum"):
            return self._needs_descriptor(name, uid, doc.get("descriptor"))
        if name in ("datum", "datum_page"):
            return None  # its resource may live outside any run (run_start is optional there)
        run_uid = doc.get("run_start")
        if run_uid is None and name in ("resource", "stream_resource"):
            return None  # not tied to a run
        if not isinstance(run_uid, str):
            return f"{name} {uid} has no run_start"
        run = self._open.get(run_uid)
        if run is None:
            if run_uid in self._closed:
                return f"{name} {uid} arrived after the stop of its run {run_uid}"
            return f"{name} {uid} references run_start {run_uid!r}, which is not an open run"
        if name == "stop":
            self._forget(run_uid, self._open.pop(run_uid), closed=True)
            return None
        if name == "descriptor":
            run.add(uid)
            self._descriptors.add(uid)
        return None

    def _needs_descriptor(self, name: str, uid: str, descriptor: object) -> str | None:
        if not isinstance(descriptor, str):
            return f"{name} {uid} has no descriptor"
        if descriptor in self._descriptors:
            return None
        if descriptor in self._closed_descriptors:
            return f"{name} {uid} arrived after the stop of the run of descriptor {descriptor}"
        return f"{name} {uid} references descriptor {descriptor!r}, which no open run declared"

    def _forget(self, run_uid: str, descriptors: set[str], *, closed: bool = False) -> None:
        """Drop an open run's state; remember a stopped (``closed``) one, not an evicted one."""
        self._descriptors -= descriptors
        if closed:
            self._closed.add(run_uid)
            for uid in descriptors:
                self._closed_descriptors.add(uid)

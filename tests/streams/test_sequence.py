"""DocumentSequence: order, duplicates and bounded memory, on real and hand-made streams."""

from __future__ import annotations

import pytest
from event_model import compose_run, pack_event_page

from streams.sequence import DocumentSequence, document_uid, events_of
from tests.streams.conftest import Document, run_documents


def _run(uid: str, events: int = 2) -> list[Document]:
    """A small composed run: start, descriptor, ``events`` events, stop."""
    bundle = compose_run(uid=uid)
    desc = bundle.compose_descriptor(
        name="primary", data_keys={"x": {"source": "sim", "dtype": "number", "shape": []}}
    )
    docs: list[Document] = [("start", dict(bundle.start_doc))]
    docs.append(("descriptor", dict(desc.descriptor_doc)))
    for i in range(events):
        docs.append(("event", dict(desc.compose_event(data={"x": i}, timestamps={"x": 0.0}))))
    docs.append(("stop", dict(bundle.compose_stop())))
    return docs


def test_a_real_run_and_its_resources_pass(documents: list[Document]) -> None:
    seq = DocumentSequence()
    assert [seq.check(name, doc) for name, doc in documents] == [None] * len(documents)
    assert seq.open_runs == ()
    assert (seq.checked, seq.rejected) == (len(documents), 0)


def test_interleaved_runs_pass_and_close_independently() -> None:
    a, b = _run("run-a"), _run("run-b")
    seq = DocumentSequence()
    stream = [a[0], b[0], a[1], b[1], a[2], b[2], b[3], a[3], a[4], b[4]]
    assert [seq.check(*doc) for doc in stream] == [None] * 10
    assert seq.open_runs == ()


def test_event_without_a_known_descriptor_names_both_uids() -> None:
    start, desc, event, *_ = _run("r")
    seq = DocumentSequence()
    assert seq.check(*start) is None
    reason = seq.check(*event)
    assert reason == (
        f"event {event[1]['uid']} references descriptor {desc[1]['uid']!r}, which no open run "
        "declared"
    )
    assert seq.rejected == 1


def test_descriptor_and_stop_need_an_open_start() -> None:
    _, desc, *_, stop = _run("lost-start")
    seq = DocumentSequence()
    assert seq.check(*desc) == (
        f"descriptor {desc[1]['uid']} references run_start 'lost-start', which is not an open run"
    )
    assert seq.check(*stop) == (
        f"stop {stop[1]['uid']} references run_start 'lost-start', which is not an open run"
    )


def test_second_start_with_a_seen_uid_is_a_duplicate_even_after_stop() -> None:
    docs = _run("again")
    seq = DocumentSequence()
    for doc in docs:
        assert seq.check(*doc) is None
    assert seq.check(*docs[0]) == "duplicate start again: a run with this uid was seen already"
    # a document of the stopped run arrives late
    assert seq.check(*docs[2]) == f"duplicate event {docs[2][1]['uid']}"
    late = ("event", {**docs[2][1], "uid": "late-event"})
    assert seq.check(*late) == (
        f"event late-event arrived after the stop of the run of descriptor {docs[1][1]['uid']}"
    )


def test_a_repeated_event_is_a_duplicate_and_changes_nothing() -> None:
    start, desc, event, *_ = _run("r")
    seq = DocumentSequence()
    for doc in (start, desc, event):
        assert seq.check(*doc) is None
    assert seq.seen(event[1]["uid"])
    assert seq.check(*event) == f"duplicate event {event[1]['uid']}"


def test_malformed_documents_are_named() -> None:
    seq = DocumentSequence()
    assert seq.check("bogus", {"uid": "x"}) is not None
    assert seq.check("event", {"descriptor": "d"}) == "event document has no uid"
    assert seq.check("datum", {"resource": "r"}) == "datum document has no datum_id"
    reason = seq.check("start", ["not", "a", "dict"])  # type: ignore[arg-type]
    assert reason == "start document is a list, not a mapping"
    assert seq.check("event", {"uid": "e"}) == "event e has no descriptor"


def test_pages_and_stream_documents_use_their_ids() -> None:
    start, desc, *_ = _run("paged")
    desc_uid = desc[1]["uid"]
    page = ("event_page", {"uid": ["p1", "p2"], "descriptor": desc_uid, "seq_num": [1, 2]})
    assert document_uid(*page) == "p1"
    assert document_uid("datum_page", {"datum_id": ["d/0", "d/1"]}) == "d/0"
    seq = DocumentSequence()
    for doc in (start, desc, page):
        assert seq.check(*doc) is None
    assert seq.check("stream_resource", {"uid": "sr", "run_start": "paged"}) is None
    assert seq.check("stream_datum", {"uid": "sd", "descriptor": desc_uid}) is None
    assert seq.check("stream_datum", {"uid": "sd2", "descriptor": "nope"}) is not None
    assert seq.check("resource", {"uid": "res", "run_start": "gone"}) == (
        "resource res references run_start 'gone', which is not an open run"
    )
    assert seq.check("resource", {"uid": "free"}) is None  # not tied to a run


def test_memory_stays_bounded() -> None:
    seq = DocumentSequence(max_open_runs=2, max_closed_runs=3, window=5)
    for i in range(10):
        assert seq.check("start", {"uid": f"open-{i}"}) is None
    assert seq.open_runs == ("open-8", "open-9")  # the oldest unfinished runs were forgotten
    for i in range(10):
        for doc in _run(f"closed-{i}", events=1):
            assert seq.check(*doc) is None
    assert len(seq._closed) == 3 and len(seq._recent) == 5
    assert len(seq._descriptors) == 0
    # a run stopped long ago fell out of every window: its start is no longer recognized
    assert seq.check("start", {"uid": "closed-0"}) is None
    assert seq.check("start", {"uid": "closed-9"}) is not None


def test_many_real_runs_in_a_row(documents: list[Document]) -> None:
    seq = DocumentSequence(max_closed_runs=4, window=50)
    runs = [documents, *(run_documents(num=2) for _ in range(5))]
    reasons = [seq.check(name, doc) for run in runs for name, doc in run]
    assert reasons == [None] * len(reasons)


@pytest.mark.parametrize("bad", [0, -1, True, 1.5])
def test_sizes_must_be_positive_integers(bad: object) -> None:
    with pytest.raises(ValueError, match="must be an integer >= 1"):
        DocumentSequence(window=bad)  # type: ignore[arg-type]


def test_events_of_reads_events_and_event_pages_alike() -> None:
    docs = _run("r-page", events=3)
    events = [doc for name, doc in docs if name == "event"]
    assert list(events_of("event", events[0])) == [events[0]]
    unpacked = list(events_of("event_page", pack_event_page(*events)))
    assert [e["uid"] for e in unpacked] == [e["uid"] for e in events]
    assert [e["data"]["x"] for e in unpacked] == [0, 1, 2]
    assert [list(events_of(name, doc)) for name, doc in docs if name not in ("event", "event_page")] == [[]] * 3

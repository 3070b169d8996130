"""DerivedRunWriter: valid derived runs linked to the raw run; invalid documents never leave."""

from __future__ import annotations

import bluesky.plans as bp
import event_model
import numpy as np
import pytest
from bluesky import RunEngine
from ophyd.sim import det, motor

from streams.derived import DerivedRunWriter, check_event_data, validate_document
from streams.errors import DocumentError, StreamError

KEYS = {
    "peak": {"dtype": "number", "shape": [], "source": "fit"},
    "profile": {"dtype": "array", "shape": [4], "source": "denoiser", "dtype_numpy": "<f4"},
    "label": {"dtype": "string", "shape": [], "source": "classifier"},
}


class ListSink:
    """A DocumentSink that remembers what it received."""

    def __init__(self) -> None:
        self.docs: list[tuple[str, dict]] = []

    def __call__(self, name: str, doc: dict) -> None:
        self.docs.append((name, doc))

    def close(self) -> None:
        pass

    @property
    def names(self) -> list[str]:
        return [name for name, _ in self.docs]


def _valid(name: str, doc: dict) -> bool:
    event_model.schema_validators[event_model.DocumentNames[name]].validate(
        event_model.sanitize_doc(doc)
    )
    return True


def _good_data() -> dict:
    return {"peak": 0.25, "profile": np.arange(4, dtype=np.float32), "label": "lamellar"}


@pytest.fixture
def raw_uid() -> str:
    RE = RunEngine({}, context_managers=[])
    (uid,) = RE(bp.scan([det], motor, -1, 1, 3))
    return uid


def test_derived_run_is_valid_and_linked_to_raw_run(raw_uid: str) -> None:
    sinks = [ListSink(), ListSink()]
    with DerivedRunWriter(sinks, raw_run_uid=raw_uid, metadata={"analysis": "peak-fit"}) as run:
        run.add_stream("primary", KEYS, hints={"peak": {"fields": ["peak"]}})
        run.emit("primary", _good_data())
        run.emit("primary", {**_good_data(), "peak": np.float64(0.5)})
    names = sinks[0].names
    assert names == ["start", "descriptor", "event", "event", "stop"]
    assert sinks[1].docs == sinks[0].docs
    docs = dict(sinks[0].docs)  # one of each, except events
    assert docs["start"]["raw_run_uid"] == raw_uid
    assert docs["start"]["analysis"] == "peak-fit"
    assert docs["start"]["uid"] == run.start_uid
    assert docs["descriptor"]["run_start"] == run.start_uid
    events = [doc for name, doc in sinks[0].docs if name == "event"]
    assert [e["seq_num"] for e in events] == [1, 2]
    assert all(e["descriptor"] == docs["descriptor"]["uid"] for e in events)
    assert docs["stop"]["exit_status"] == "success"
    assert docs["stop"]["num_events"] == {"primary": 2}
    assert all(_valid(name, doc) for name, doc in sinks[0].docs)


def test_sent_event_keeps_numpy_values() -> None:
    sink = ListSink()
    run = DerivedRunWriter([sink], raw_run_uid=None)
    run.add_stream("primary", KEYS)
    profile = np.linspace(0, 1, 4, dtype=np.float32)
    run.emit("primary", {**_good_data(), "profile": profile}, timestamps=dict.fromkeys(KEYS, 1.0))
    event = sink.docs[-1][1]
    assert event["data"]["profile"] is profile
    assert event["timestamps"] == dict.fromkeys(KEYS, 1.0)
    assert "raw_run_uid" not in sink.docs[0][1]


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"label": None}, "missing \\['label'\\]"),
        ({"extra": 1.0}, "extra \\['extra'\\]"),
        ({"peak": "high"}, "'peak' is declared dtype='number'"),
        ({"peak": True}, "'peak' is declared dtype='number'"),
        ({"profile": np.zeros(5)}, "'profile' is declared shape=\\[4\\] but received shape=\\[5\\]"),
        ({"profile": [[1.0], [1.0, 2.0]]}, "'profile'"),
        ({"label": 3}, "'label' is declared dtype='string'"),
        ({"peak": object()}, "'peak'"),
    ],
)
def test_bad_event_raises_and_reaches_no_sink(change: dict, message: str) -> None:
    sink = ListSink()
    run = DerivedRunWriter([sink], raw_run_uid="raw")
    run.add_stream("primary", KEYS)
    data = {**_good_data(), **change}
    data = {k: v for k, v in data.items() if v is not None}
    with pytest.raises(DocumentError, match=message):
        run.emit("primary", data)
    assert sink.names == ["start", "descriptor"]
    # The rejected event did not use up a sequence number.
    assert run.emit("primary", _good_data())["seq_num"] == 1


def test_event_page_carries_its_rows_in_order_after_earlier_events() -> None:
    sink = ListSink()
    with DerivedRunWriter([sink], raw_run_uid="raw") as run:
        run.add_stream("primary", KEYS)
        run.emit("primary", _good_data())
        rows = [{**_good_data(), "peak": float(i), "profile": np.full(4, i, np.float32)} for i in range(3)]
        page = run.emit_page("primary", rows)
        assert run.emit_page("primary", []) is None  # nothing to send: nothing sent
        run.emit("primary", _good_data())
    assert sink.names == ["start", "descriptor", "event", "event_page", "event", "stop"]
    assert all(_valid(name, doc) for name, doc in sink.docs)
    assert page is sink.docs[3][1] and page["seq_num"] == [2, 3, 4] and len(set(page["uid"])) == 3
    events = list(event_model.unpack_event_page(page))
    assert [e["data"]["peak"] for e in events] == [0.0, 1.0, 2.0]
    assert all(e["data"]["profile"] is r["profile"] for e, r in zip(events, rows, strict=True))
    assert sink.docs[4][1]["seq_num"] == 5


def test_bad_row_of_a_page_is_named_and_nothing_is_sent() -> None:
    sink = ListSink()
    run = DerivedRunWriter([sink], raw_run_uid="raw")
    run.add_stream("primary", KEYS)
    rows = [_good_data(), {**_good_data(), "peak": "high"}, _good_data()]
    with pytest.raises(DocumentError, match="row 1 of 3: .*'peak' is declared dtype='number'"):
        run.emit_page("primary", rows)
    with pytest.raises(ValueError, match="2 timestamps for 3 rows"):
        run.emit_page("primary", [_good_data()] * 3, timestamps=[dict.fromkeys(KEYS, 1.0)] * 2)
    with pytest.raises(ValueError, match="unknown stream='other'"):
        run.emit_page("other", [_good_data()])
    assert sink.names == ["start", "descriptor"]
    assert run.emit_page("primary", [_good_data()])["seq_num"] == [1]  # no seq_num used up
    run.close()
    with pytest.raises(StreamError, match="already stopped"):
        run.emit_page("primary", [_good_data()])


def test_timestamps_must_match_data_keys() -> None:
    sink = ListSink()
    run = DerivedRunWriter([sink], raw_run_uid="raw")
    run.add_stream("primary", KEYS)
    with pytest.raises(DocumentError, match="timestamps keys .* missing \\['label'\\]"):
        run.emit("primary", _good_data(), timestamps={"peak": 1.0, "profile": 1.0})
    assert sink.names == ["start", "descriptor"]


def test_first_event_schema_check_skips_only_array_contents(monkeypatch: pytest.MonkeyPatch) -> None:
    """The schema check of a stream's first event sees every field, numeric arrays as empty lists
    (their contents are free in the schema and costly to turn into JSON); the document sent keeps
    the array, and later events are not checked again."""
    checked: list[dict] = []
    sanitize = event_model.sanitize_doc
    monkeypatch.setattr(event_model, "sanitize_doc", lambda doc: checked.append(doc) or sanitize(doc))
    sink = ListSink()
    run = DerivedRunWriter([sink], raw_run_uid="raw")
    run.add_stream("primary", KEYS)
    checked.clear()
    first = run.emit("primary", _good_data())
    run.emit("primary", _good_data())
    (doc,) = checked
    assert doc["data"] == {"peak": 0.25, "profile": [], "label": "lamellar"}
    assert {k: v for k, v in doc.items() if k != "data"} == {k: v for k, v in first.items() if k != "data"}
    assert isinstance(first["data"]["profile"], np.ndarray) and _valid("event", first)
    # a stream's first event page likewise, once, whatever events came before it
    checked.clear()
    page = run.emit_page("primary", [_good_data(), _good_data()])
    run.emit_page("primary", [_good_data()])
    (doc,) = checked
    assert doc["data"] == {"peak": [0.25, 0.25], "profile": [[], []], "label": ["lamellar", "lamellar"]}
    assert isinstance(page["data"]["profile"][0], np.ndarray) and _valid("event_page", page)


def test_invalid_start_metadata_is_rejected_before_sending() -> None:
    sink = ListSink()
    with pytest.raises(DocumentError, match="'a.b' does not match"):
        DerivedRunWriter([sink], raw_run_uid="raw", metadata={"a.b": 1})
    assert sink.docs == []


def test_invalid_descriptor_is_rejected_and_stream_can_be_added_again() -> None:
    sink = ListSink()
    run = DerivedRunWriter([sink], raw_run_uid="raw")
    bad = {"peak": {"dtype": "float", "shape": [], "source": "fit"}}
    with pytest.raises(DocumentError, match="data_keys/peak/dtype"):
        run.add_stream("primary", bad)
    assert sink.names == ["start"]
    run.add_stream("primary", KEYS)
    assert sink.names == ["start", "descriptor"]
    with pytest.raises(ValueError, match="'primary' was already added"):
        run.add_stream("primary", KEYS)


def test_emit_to_unknown_stream_names_it() -> None:
    run = DerivedRunWriter([ListSink()], raw_run_uid="raw")
    with pytest.raises(ValueError, match="stream='nope'"):
        run.emit("nope", {})


def test_context_manager_stops_with_fail_on_error_and_close_is_idempotent() -> None:
    sink = ListSink()
    with pytest.raises(ZeroDivisionError):
        with DerivedRunWriter([sink], raw_run_uid="raw") as run:
            run.add_stream("primary", KEYS)
            1 / 0  # noqa: B018
    stop = sink.docs[-1][1]
    assert sink.names == ["start", "descriptor", "stop"]
    assert stop["exit_status"] == "fail"
    assert "ZeroDivisionError" in stop["reason"]
    assert run.close() is None
    assert sink.names.count("stop") == 1
    with pytest.raises(StreamError, match="already stopped"):
        run.emit("primary", _good_data())


def test_metadata_cannot_override_uid_or_contradict_raw_uid() -> None:
    with pytest.raises(ValueError, match="'uid'"):
        DerivedRunWriter([], raw_run_uid="raw", metadata={"uid": "mine"})
    with pytest.raises(ValueError, match="contradicts"):
        DerivedRunWriter([], raw_run_uid="raw", metadata={"raw_run_uid": "other"})


def test_bad_exit_status_is_a_value_error() -> None:
    run = DerivedRunWriter([ListSink()], raw_run_uid="raw")
    with pytest.raises(ValueError, match="exit_status='ok'"):
        run.close("ok")
    assert run.close("abort", "operator")["exit_status"] == "abort"


def test_validate_document_rejects_unknown_names_and_schema_violations() -> None:
    with pytest.raises(DocumentError, match="unknown document name"):
        validate_document("frame", {"uid": "x"})
    with pytest.raises(DocumentError, match="'time' is a required property"):
        validate_document("start", {"uid": "x"})
    validate_document("start", {"uid": "x", "time": np.float64(1.0), "arr": np.ones(2)})


def test_check_event_data_ignores_stream_keys_and_external_values() -> None:
    descriptor = {
        "uid": "d",
        "data_keys": {
            "img": {"dtype": "array", "shape": [8, 8], "source": "x", "external": "FILESTORE:"},
            "tof": {"dtype": "array", "shape": [100], "source": "x", "external": "STREAM:"},
        },
    }
    check_event_data(descriptor, {"img": "datum-id/0"}, {"img": 1.0})
    with pytest.raises(DocumentError, match="extra \\['tof'\\]"):
        check_event_data(descriptor, {"img": "d", "tof": 1}, {"img": 1.0})

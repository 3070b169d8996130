import numpy as np
import pytest
import zarr

from agents.errors import AgentStoreError
from agents.store import AgentStore

TABLES = {"obs": {"q": "f8", "key": str}}


def test_rows_round_trip_and_survive_reopening(tmp_path):
    store = AgentStore(tmp_path / "s.zarr", "Kind", TABLES)
    store.append("obs", {"q": [0.1, 0.2], "key": ["a", "b"]})
    store.set_attr("model_state", {"x": 1.5})
    again = AgentStore(tmp_path / "s.zarr", "Kind", TABLES, create=False)
    rows = again.read("obs")
    np.testing.assert_array_equal(rows["q"], [0.1, 0.2])
    assert list(rows["key"]) == ["a", "b"] and again.get_attr("model_state") == {"x": 1.5}


def test_uncommitted_rows_of_a_killed_writer_are_never_read(tmp_path):
    store = AgentStore(tmp_path / "s.zarr", "Kind", TABLES)
    store.append("obs", {"q": [0.1], "key": ["a"]})
    # a process dies after writing the next row's numbers, before committing it
    store.group["obs"]["numbers"][1:2] = np.array([[0.9]])
    assert list(store.read("obs")["q"]) == [0.1]
    again = AgentStore(tmp_path / "s.zarr", "Kind", TABLES)
    assert list(again.read("obs")["q"]) == [0.1]
    again.append("obs", {"q": [0.3], "key": ["c"]})  # overwrites the dead row
    np.testing.assert_array_equal(again.read("obs")["q"], [0.1, 0.3])
    assert list(again.read("obs")["key"]) == ["a", "c"]


def test_tables_grow_past_their_first_allocation(tmp_path):
    store = AgentStore(tmp_path / "s.zarr", "Kind", TABLES)
    n = 1500
    store.append("obs", {"q": np.arange(n) * 1.0, "key": [f"k{i}" for i in range(n)]})
    store.append("obs", {"q": [-1.0], "key": ["last"]})
    rows = AgentStore(tmp_path / "s.zarr", "Kind", TABLES, create=False).read("obs")
    assert rows["q"].shape == (n + 1,) and rows["q"][-1] == -1.0 and rows["key"][n - 1] == f"k{n - 1}"


def test_a_table_with_other_columns_is_refused(tmp_path):
    AgentStore(tmp_path / "s.zarr", "Kind", TABLES)
    with pytest.raises(AgentStoreError, match="another version of the agent"):
        AgentStore(tmp_path / "s.zarr", "Kind", {"obs": {"q": "f8", "key": str, "extra": "f8"}})


def test_a_store_of_another_agent_is_refused(tmp_path):
    AgentStore(tmp_path / "s.zarr", "MappingAgent", TABLES)
    with pytest.raises(AgentStoreError, match="written by a 'MappingAgent' agent, not a 'QSamplingAgent'"):
        AgentStore(tmp_path / "s.zarr", "QSamplingAgent", TABLES)


def test_missing_and_foreign_stores_are_named(tmp_path):
    with pytest.raises(AgentStoreError, match="no store at"):
        AgentStore(tmp_path / "none.zarr", "Kind", TABLES, create=False)
    zarr.open_group(tmp_path / "plain.zarr", mode="w")
    with pytest.raises(AgentStoreError, match="no agent state"):
        AgentStore(tmp_path / "plain.zarr", "Kind", TABLES, create=False)


def test_bad_rows_are_refused_before_anything_is_written(tmp_path):
    store = AgentStore(tmp_path / "s.zarr", "Kind", TABLES)
    with pytest.raises(ValueError, match="need columns"):
        store.append("obs", {"q": [0.1]})
    with pytest.raises(ValueError, match="unequal lengths"):
        store.append("obs", {"q": [0.1, 0.2], "key": ["a"]})
    with pytest.raises(ValueError, match="allow_nan|Out of range"):
        store.set_attr("x", float("nan"))
    assert store.n_rows("obs") == 0


def test_a_read_only_reader_writes_nothing_and_waits_for_half_created_tables(tmp_path):
    path = tmp_path / "s.zarr"
    writer = AgentStore(path, "Kind", {})
    before = sorted(p.relative_to(path) for p in path.rglob("*"))
    with pytest.raises(AgentStoreError, match="not written"):
        AgentStore(path, "Kind", TABLES, read_only=True)
    assert sorted(p.relative_to(path) for p in path.rglob("*")) == before, "a reader created files"
    # a writer killed after the table's group, before its arrays
    writer.group.create_group("obs", attributes={"numbers": ["q"], "strings": ["key"], "n_committed": 0})
    with pytest.raises(AgentStoreError, match="still being created"):
        AgentStore(path, "Kind", TABLES, read_only=True)
    # the writer's next start completes the table, and readers see its rows
    AgentStore(path, "Kind", TABLES).append("obs", {"q": [0.5], "key": ["a"]})
    reader = AgentStore(path, "Kind", TABLES, read_only=True)
    assert list(reader.read("obs")["key"]) == ["a"]
    with pytest.raises(ValueError, match="read-only"):
        reader.append("obs", {"q": [0.6], "key": ["b"]})
    assert list(AgentStore(path, "Kind", TABLES).read("obs")["q"]) == [0.5]

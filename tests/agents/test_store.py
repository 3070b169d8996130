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


def test_uncommitted_rows_of_a_killed_writer_are_dropped(tmp_path):
    store = AgentStore(tmp_path / "s.zarr", "Kind", TABLES)
    store.append("obs", {"q": [0.1], "key": ["a"]})
    # a process dies after appending one column and before committing
    store.group["obs"]["q"].append(np.array([0.9]))
    assert len(store.read("obs")["q"]) == 1
    again = AgentStore(tmp_path / "s.zarr", "Kind", TABLES)
    assert again.group["obs"]["q"].shape == (1,)  # truncated back
    again.append("obs", {"q": [0.3], "key": ["c"]})
    np.testing.assert_array_equal(again.read("obs")["q"], [0.1, 0.3])


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

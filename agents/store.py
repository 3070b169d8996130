"""An agent's memory on disk: observations, decisions and model state in a zarr group.

Layout (under ``<store>/agent``)::

    attrs: beampilot_agent_format, agent_kind, config, model_state, ...
    <table>/numbers    `capacity x k` float64, one column per numeric column
    <table>/strings    `capacity x m` variable-length strings, one column per text column
    <table>.attrs:     columns (names in order), n_committed (rows that are whole)

Arrays are preallocated and grow by doubling, so appending a row writes two chunks and one
attribute, not a resize per column: an agent persists every observation within its decision
latency budget. A table's rows count only up to ``n_committed``, written last; a process killed
before that leaves rows no reader sees and the next writer overwrites, so the store is never
read half-written.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import zarr

from agents.errors import AgentStoreError

__all__ = ["AgentStore"]

FORMAT = 1
_CHUNK = 1024


class AgentStore:
    """Open (or create) the agent group of a zarr store.

    Parameters
    ----------
    path
        Directory of the zarr store (shared with the run documents under ``runs/``).
    agent_kind
        The agent class's name; opening a store written by another kind raises
        :class:`~agents.errors.AgentStoreError`.
    tables
        ``{table: {column: numpy dtype or str}}`` the agent keeps.
    create
        Create the group if absent (``False``: it must exist, as when resuming).
    read_only
        Open an existing store without writing anything (implies ``create=False``): for readers
        that watch a store another process is writing. A table the writer has not finished
        creating raises :class:`~agents.errors.AgentStoreError`; try again a moment later.
    """

    def __init__(
        self,
        path: str | Path,
        agent_kind: str,
        tables: Mapping[str, Mapping[str, Any]],
        *,
        create: bool = True,
        read_only: bool = False,
    ) -> None:
        self.path = Path(path)
        self.read_only = read_only
        create = create and not read_only
        self.agent_kind = agent_kind
        self._tables = {t: dict(cols) for t, cols in tables.items()}
        self._layout: dict[str, tuple[zarr.Group, list[str], list[str]]] = {}
        root = self._open_root(create)
        if "agent" in root:
            self.group = root["agent"]
            self._check_kind()
        elif create:
            self.group = root.create_group("agent")
            self.group.attrs.update({"beampilot_agent_format": FORMAT, "agent_kind": agent_kind})
        else:
            raise AgentStoreError(
                f"{self.path} has no agent state (no 'agent' group): it is not a store an agent "
                "wrote; pass the --out directory of an earlier run, or start a new one"
            )
        for table, columns in self._tables.items():
            self._ensure_table(table, columns)

    @classmethod
    def for_agent(cls, path: str | Path, agent_kind: str, tables: Mapping[str, Mapping[str, Any]], settings: Any,
                  *, create: bool) -> AgentStore:
        """Open an agent's store; a store it creates records the agent's settings (attr ``config``,
        what :meth:`stored_config` gives back when the agent resumes)."""
        store = cls(path, agent_kind, tables, create=create)
        if create and store.get_attr("config") is None:
            store.set_attr("config", settings.model_dump(mode="json"))
        return store

    @classmethod
    def stored_config(cls, path: str | Path, agent_kind: str) -> dict[str, Any]:
        """The settings an agent recorded in its existing store (what ``resume`` starts from)."""
        config = cls(path, agent_kind, {}, create=False).get_attr("config")
        if config is None:
            raise AgentStoreError(f"{path} holds no {agent_kind} config; it was not written by one")
        return config

    def _open_root(self, create: bool) -> zarr.Group:
        if not create and not self.path.exists():
            raise AgentStoreError(f"no store at {self.path}: check the path")
        try:
            return zarr.open_group(self.path, mode="r" if self.read_only else "a" if create else "r+")
        except Exception as err:  # zarr raises several kinds for a non-store directory
            raise AgentStoreError(f"{self.path} is not a zarr store ({err}); pass a store directory") from err

    def _check_kind(self) -> None:
        attrs = self.group.attrs
        if attrs.get("beampilot_agent_format") != FORMAT:
            raise AgentStoreError(
                f"{self.path}: agent store format {attrs.get('beampilot_agent_format')!r}, "
                f"this beampilot reads format {FORMAT}"
            )
        if attrs.get("agent_kind") != self.agent_kind:
            raise AgentStoreError(
                f"{self.path} was written by a {attrs.get('agent_kind')!r} agent, not a "
                f"{self.agent_kind!r}; resume it with the matching agent or start a new store"
            )

    def _ensure_table(self, table: str, columns: Mapping[str, Any]) -> None:
        numbers = [c for c, d in columns.items() if d is not str]
        strings = [c for c, d in columns.items() if d is str]
        group = self.group.get(table)
        if group is None and not self.read_only:
            # the layout goes in with the group, so no reader ever sees a table without columns
            group = self.group.create_group(table, attributes={"numbers": numbers, "strings": strings,
                                                               "n_committed": 0})
        if group is None:
            raise AgentStoreError(f"{self.path}: table {table!r} is not written (yet); "
                                  "if an agent is creating this store, try again in a moment")
        if (group.attrs.get("numbers"), group.attrs.get("strings")) != (numbers, strings):
            raise AgentStoreError(
                f"{self.path}: table {table!r} has columns {group.attrs.get('numbers')} + "
                f"{group.attrs.get('strings')}, this agent expects {numbers} + {strings}; "
                "it was written by another version of the agent"
            )
        for name, cols, dtype, fill in (("numbers", numbers, "f8", np.nan), ("strings", strings, str, "")):
            if name in group:
                continue
            if self.read_only:
                raise AgentStoreError(f"{self.path}: table {table!r} is still being created; "
                                      "try again in a moment")
            group.create_array(name, shape=(_CHUNK, len(cols)), chunks=(_CHUNK, max(len(cols), 1)),
                               dtype=dtype, fill_value=fill)
        self._layout[table] = (group, numbers, strings)

    # -- rows ---------------------------------------------------------------------------------
    def append(self, table: str, rows: Mapping[str, Sequence[Any]]) -> None:
        """Append rows (``{column: values}``, all columns, equal lengths), then commit them."""
        group, numbers, strings = self._layout[table]
        if set(rows) != set(numbers) | set(strings):
            raise ValueError(f"{table}: need columns {sorted([*numbers, *strings])}, got {sorted(rows)}")
        lengths = {len(v) for v in rows.values()}
        if len(lengths) != 1:
            raise ValueError(f"{table}: columns of unequal lengths {sorted(lengths)}")
        m = lengths.pop()
        n = int(group.attrs["n_committed"])
        for name, cols, dtype in (("numbers", numbers, float), ("strings", strings, object)):
            if not cols:
                continue
            array = group[name]
            if n + m > array.shape[0]:
                array.resize((max(2 * array.shape[0], n + m), len(cols)))
            array[n : n + m] = np.array([[rows[c][i] for c in cols] for i in range(m)], dtype=dtype)
        group.attrs["n_committed"] = n + m

    def read(self, table: str) -> dict[str, np.ndarray]:
        """All committed rows of ``table`` as ``{column: array}`` (a 1D array per column)."""
        group, numbers, strings = self._layout[table]
        n = int(group.attrs["n_committed"])
        out: dict[str, np.ndarray] = {}
        for name, cols in (("numbers", numbers), ("strings", strings)):
            block = group[name][:n] if cols else None
            for j, c in enumerate(cols):
                out[c] = np.asarray(block[:, j], dtype=float if name == "numbers" else object)
        return out

    def n_rows(self, table: str) -> int:
        return int(self._layout[table][0].attrs["n_committed"])

    # -- attributes ---------------------------------------------------------------------------
    def set_attr(self, name: str, value: Any) -> None:
        """Store a JSON-able value (round-tripped through ``json`` so errors show here); numpy
        arrays and scalars inside it are stored as lists and numbers."""
        self.group.attrs[name] = json.loads(json.dumps(value, allow_nan=False, default=_numpy_to_json))

    def get_attr(self, name: str, default: Any = None) -> Any:
        return self.group.attrs.get(name, default)


def _numpy_to_json(value: Any) -> Any:
    if isinstance(value, (np.ndarray, np.generic)):
        return value.tolist()
    raise TypeError(f"{type(value).__name__} is not JSON serializable")

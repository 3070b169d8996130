"""An agent's memory on disk: observations, decisions and model state in a zarr group.

Layout (under ``<store>/agent``)::

    attrs: beampilot_agent_format, agent_kind, agent_name, config, model_state, extra
    <table>/<column>     one 1D array per column, appended row by row
    <table>.attrs["n_committed"]   rows that are whole; written after every column

A table's rows count only up to ``n_committed``, which is written last, after all columns have
their new rows. A process killed between the two leaves extra rows that no reader sees and that
the next writer truncates, so the store is never read half-written.
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
    """

    def __init__(
        self,
        path: str | Path,
        agent_kind: str,
        tables: Mapping[str, Mapping[str, Any]],
        *,
        create: bool = True,
    ) -> None:
        self.path = Path(path)
        self.agent_kind = agent_kind
        self._tables = {t: dict(cols) for t, cols in tables.items()}
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

    def _open_root(self, create: bool) -> zarr.Group:
        if not create and not self.path.exists():
            raise AgentStoreError(f"no store at {self.path}: check the path")
        try:
            return zarr.open_group(self.path, mode="a" if create else "r+")
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
        group = self.group.require_group(table)
        n = int(group.attrs.get("n_committed", 0))
        for column, dtype in columns.items():
            if column not in group:
                group.create_array(column, shape=(0,), chunks=(_CHUNK,), dtype=dtype)
            array = group[column]
            if array.shape[0] > n:  # rows written by a process that died before committing
                array.resize((n,))
            elif array.shape[0] < n:
                raise AgentStoreError(
                    f"{self.path}: column {table}/{column} has {array.shape[0]} rows but "
                    f"{n} are committed; the store is damaged"
                )
        group.attrs["n_committed"] = n

    # -- rows ---------------------------------------------------------------------------------
    def append(self, table: str, rows: Mapping[str, Sequence[Any]]) -> None:
        """Append rows (``{column: values}``, all columns, equal lengths), then commit them."""
        columns = self._tables[table]
        if set(rows) != set(columns):
            raise ValueError(f"{table}: need columns {sorted(columns)}, got {sorted(rows)}")
        lengths = {len(v) for v in rows.values()}
        if len(lengths) != 1:
            raise ValueError(f"{table}: columns of unequal lengths {sorted(lengths)}")
        group = self.group[table]
        for column, values in rows.items():
            group[column].append(np.asarray(values, dtype=columns[column] if columns[column] is not str else object))
        group.attrs["n_committed"] = int(group.attrs["n_committed"]) + lengths.pop()

    def read(self, table: str) -> dict[str, np.ndarray]:
        """All committed rows of ``table`` as ``{column: array}``."""
        group = self.group[table]
        n = int(group.attrs["n_committed"])
        return {column: group[column][:n] for column in self._tables[table]}

    def n_rows(self, table: str) -> int:
        return int(self.group[table].attrs["n_committed"])

    # -- attributes ---------------------------------------------------------------------------
    def set_attr(self, name: str, value: Any) -> None:
        """Store a JSON-able value (round-tripped through ``json`` so errors show here)."""
        self.group.attrs[name] = json.loads(json.dumps(value, allow_nan=False))

    def get_attr(self, name: str, default: Any = None) -> Any:
        return self.group.attrs.get(name, default)

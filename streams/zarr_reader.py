"""``ZarrRunReader``: reads runs stored by :class:`~streams.zarr_writer.ZarrRunWriter` back as documents."""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping
from typing import Any

import numpy as np
import zarr

from streams.errors import StoreError
from streams.zarr_layout import (
    _LISTED,
    _array_paths,
    _arrays,
    _child_group,
    _children,
    _event_keys,
    _open_root,
)

__all__ = ["ZarrRunReader"]


class ZarrRunReader:
    """Read runs stored by :class:`ZarrRunWriter`; only committed events are ever returned.

    Parameters
    ----------
    root : str, os.PathLike or zarr.Group
        The store. It is re-read on every call, so a reader sees events committed after it
        was opened.

    Raises
    ------
    StoreError
        If ``root`` is not a beampilot run store, or a run in it is damaged.
    KeyError
        From the per-run methods, for a start uid that is not in the store.
    """

    def __init__(self, root: str | os.PathLike[str] | zarr.Group) -> None:
        self._root = root
        self._runs: zarr.Group = _child_group(_open_root(root, create=False), "runs")

    def runs(self) -> list[str]:
        """Start uids of every stored run, in start-time order."""
        uids = _children(self._runs)
        return sorted(uids, key=lambda uid: (self.start(uid)["time"], uid))

    def start(self, uid: str) -> dict[str, Any]:
        """The start document of run ``uid``."""
        return self._attrs(uid)["start"]

    def stop(self, uid: str) -> dict[str, Any] | None:
        """The stop document of run ``uid``, or ``None`` if it has none (yet)."""
        return self._attrs(uid).get("stop")

    def descriptors(self, uid: str) -> list[dict[str, Any]]:
        """The descriptor documents of run ``uid``, in time order."""
        return [desc for desc, _, _ in self._streams(uid)]

    def documents(self, uid: str) -> Iterator[tuple[str, dict[str, Any]]]:
        """Yield the run's documents: start, resources, datums, descriptors, stream resources
        and datums, events (one ``event`` per stored row, in time order) and stop, if any.

        All of a run's committed events are read into memory at the first event.
        """
        attrs = self._attrs(uid)
        yield "start", attrs["start"]
        for name in ("resource", "datum"):
            yield from ((name, doc) for doc in attrs.get(_LISTED[name][0], []))
        streams = self._streams(uid)
        yield from (("descriptor", desc) for desc, _, _ in streams)
        for name in ("stream_resource", "stream_datum"):
            yield from ((name, doc) for doc in attrs.get(_LISTED[name][0], []))
        columns = [_read_columns(group, desc, n) for desc, group, n in streams]
        order = sorted(
            (float(cols["time"][row]), i, row)
            for i, cols in enumerate(columns) for row in range(streams[i][2])
        )
        for _, i, row in order:
            yield "event", _event_doc(streams[i][0], columns[i], row)
        if "stop" in attrs:
            yield "stop", attrs["stop"]

    def table(self, uid: str, stream: str = "primary") -> dict[str, np.ndarray]:
        """Committed data of one stream as arrays of `n_events x *shape`, plus ``time`` and
        ``seq_num`` columns (a data key of the same name takes precedence over them)."""
        streams = [s for s in self._streams(uid) if s[0]["name"] == stream]
        if not streams:
            names = sorted({desc["name"] for desc, _, _ in self._streams(uid)})
            raise KeyError(f"run {uid!r} has no stream {stream!r}; it has {names}")
        columns = [_read_columns(group, desc, n) for desc, group, n in streams]
        columns = [cols for cols in columns if cols] or [{}]
        out: dict[str, np.ndarray] = {}
        for key in ("time", "seq_num", *(f"data/{k}" for k in _event_keys(streams[0][0]))):
            parts = [cols[key] for cols in columns if key in cols]
            out[key.removeprefix("data/")] = np.concatenate(parts) if parts else np.empty(0)
        return out

    def _attrs(self, uid: str) -> dict[str, Any]:
        if not isinstance(uid, str) or uid not in self._runs:
            raise KeyError(f"no run {uid!r} in store {self._root!r}")
        attrs = self._runs[uid].attrs.asdict()
        if "start" not in attrs:
            raise StoreError(f"run group {uid!r} has no 'start' attribute; the store is damaged")
        return attrs

    def _streams(self, uid: str) -> list[tuple[dict[str, Any], zarr.Group, int]]:
        self._attrs(uid)
        descriptors = _child_group(self._runs, uid).get("descriptors")
        if not isinstance(descriptors, zarr.Group):
            return []
        out: list[tuple[dict[str, Any], zarr.Group, int]] = []
        for desc_uid in _children(descriptors):
            group = _child_group(descriptors, desc_uid)
            attrs: dict[str, Any] = group.attrs.asdict()  # JSON as stored
            if "descriptor" not in attrs or "n_committed" not in attrs:
                raise StoreError(
                    f"descriptor group {group.path!r} lacks 'descriptor'/'n_committed'; "
                    "expected a group written by ZarrRunWriter"
                )
            out.append((attrs["descriptor"], group, int(attrs["n_committed"])))
        return sorted(out, key=lambda s: s[0]["time"])




def _read_columns(group: zarr.Group, descriptor: Mapping[str, Any], n: int) -> dict[str, Any]:
    """The first ``n`` rows of every event array of one descriptor."""
    if n == 0:
        return {}
    arrays = _arrays(group)
    out = {}
    for path in _array_paths(descriptor):
        if path not in arrays or arrays[path].shape[0] < n:
            raise StoreError(f"{group.path}/{path} is missing or shorter than n_committed={n}")
        out[path] = arrays[path][:n]
    return out


def _event_doc(descriptor: Mapping[str, Any], columns: Mapping[str, Any], row: int) -> dict:
    keys = _event_keys(descriptor)
    data_keys = descriptor["data_keys"]
    return {
        "uid": str(columns["uid"][row]),
        "time": float(columns["time"][row]),
        "seq_num": int(columns["seq_num"][row]),
        "descriptor": descriptor["uid"],
        "data": {k: _python_value(columns[f"data/{k}"][row]) for k in keys},
        "timestamps": {k: float(columns[f"timestamps/{k}"][row]) for k in keys},
        "filled": {k: False for k in keys if data_keys[k].get("external")},
    }


def _python_value(value: Any) -> Any:
    """Scalars become Python scalars (as the RunEngine emits them); arrays stay arrays."""
    if isinstance(value, np.ndarray):
        return value.copy() if value.ndim else value.item()
    return value.item() if isinstance(value, np.generic) else value

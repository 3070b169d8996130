"""The on-disk layout of beampilot's zarr run store, shared by its writer and reader.

Layout (``<root>`` carries the attribute ``beampilot_store_format = 1``)::

    <root>/runs/<start uid>/                     attrs: start, stop (once stopped),
                                                        resources, datums, stream_resources,
                                                        stream_datums (lists, when received)
    <root>/runs/<start uid>/descriptors/<uid>/   attrs: descriptor, n_committed
        time, seq_num, uid                       `n_events` arrays, one row per event
        data/<key>                               `n_events x *shape`, appended along axis 0
        timestamps/<key>                         `n_events`

Event data live under ``data/`` (not beside ``time``) so that a data key named ``time`` or
``uid`` cannot collide with the event's own fields.

Crash safety: the rows of one event (or event page) are appended to every array first and
``n_committed`` is updated last, so a reader sees only whole events; a writer that reopens the
store truncates every array back to ``n_committed``. While a run is open its arrays may hold
more rows than ``n_committed`` (they grow by doubling, not a row at a time); rows past it are
never read, and the stop document cuts every array back to ``n_committed``.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import zarr
import zarr.errors

from streams.errors import DocumentError, StoreError

__all__ = ["FORMAT_ATTR", "STORE_FORMAT"]


STORE_FORMAT = 1
FORMAT_ATTR = "beampilot_store_format"
_CHUNK_BYTES = 1 << 20
_MAX_CHUNK_ROWS = 1024
_STR_ITEM_BYTES = 64  # a guess at a variable-length string's size, for chunk sizing only
# Documents kept as attribute lists on the run group, and the field that identifies each.
_LISTED = {
    "resource": ("resources", "uid"),
    "datum": ("datums", "datum_id"),
    "stream_resource": ("stream_resources", "uid"),
    "stream_datum": ("stream_datums", "uid"),
}


def _open_root(root: str | os.PathLike[str] | zarr.Group, *, create: bool) -> zarr.Group:
    """Open (or, for a writer, create) the root group and check its format marker."""
    if isinstance(root, zarr.Group):
        group = root
    elif isinstance(root, str | os.PathLike):
        group = _open_path(Path(root), create=create)
    else:
        raise TypeError(f"root must be a path or a zarr.Group, not {type(root).__name__}")
    marker = group.attrs.get(FORMAT_ATTR)
    if marker is None and create and not group.attrs and not _children(group):
        group.attrs[FORMAT_ATTR] = STORE_FORMAT
        group.create_group("runs")
        return group
    if marker is None:
        raise StoreError(
            f"{root!r} is a zarr group but not a beampilot run store: it lacks the "
            f"{FORMAT_ATTR!r} attribute (expected {STORE_FORMAT}). Point at a store written by "
            "ZarrRunWriter, or at a new or empty directory to create one."
        )
    if marker != STORE_FORMAT:
        raise StoreError(
            f"{root!r} has {FORMAT_ATTR}={marker!r}; this version reads format {STORE_FORMAT}"
        )
    if not isinstance(group.get("runs"), zarr.Group):
        raise StoreError(f"{root!r} is marked as a beampilot store but has no 'runs' group")
    return group


def _open_path(path: Path, *, create: bool) -> zarr.Group:
    try:
        return zarr.open_group(path, mode="r+" if create else "r")
    except FileNotFoundError:  # also zarr's GroupNotFoundError
        if not create:
            raise StoreError(
                f"no zarr group at {str(path)!r}: expected a beampilot run store "
                "(a zarr group with a 'runs' group) written by ZarrRunWriter"
            ) from None
        if path.exists() and (not path.is_dir() or any(path.iterdir())):
            raise StoreError(
                f"{str(path)!r} exists but is not a zarr store; choose a new or empty directory"
            ) from None
        return zarr.open_group(path, mode="w-")
    except (OSError, zarr.errors.BaseZarrError) as err:
        raise StoreError(f"cannot open {str(path)!r} as a beampilot run store: {err}") from None


def _children(group: zarr.Group) -> list[str]:
    """Names of the child groups of ``group``."""
    with warnings.catch_warnings():
        # Leftover '*.partial' files of an interrupted atomic write are not zarr nodes.
        warnings.filterwarnings(
            "ignore",
            message=".*not recognized as a component",
            category=zarr.errors.ZarrUserWarning,
        )
        return sorted(group.group_keys())


def _child_group(parent: zarr.Group, name: str) -> zarr.Group:
    """``parent[name]`` where the layout has a group; ``KeyError`` if it is absent."""
    node = parent[name]
    if not isinstance(node, zarr.Group):
        raise StoreError(
            f"zarr node {node.path!r} is an array where the layout has a group; "
            "the store is damaged"
        )
    return node


def _arrays(group: zarr.Group) -> dict[str, zarr.Array]:
    """The event arrays under a descriptor group, keyed by their path relative to it."""
    out = {name: arr for name, arr in group.arrays()}
    for sub in ("data", "timestamps"):
        sub_group = group.get(sub)
        if isinstance(sub_group, zarr.Group):
            out.update({f"{sub}/{name}": arr for name, arr in sub_group.arrays()})
    return out


def _node_name(value: Any, what: str, name: str, uid: str | None) -> str:
    if not isinstance(value, str) or not value or "/" in value or value in {".", ".."} or (
        value.startswith("__")
    ):
        raise DocumentError(
            name, uid, f"{what} {value!r} cannot name a zarr node: use a non-empty string "
            "without '/' that is not '.', '..' and does not start with '__'"
        )
    return value


def _event_keys(descriptor: Mapping[str, Any]) -> list[str]:
    """Data keys whose values travel inside events (all but external ``STREAM:`` keys)."""
    return [k for k, dk in descriptor["data_keys"].items() if dk.get("external") != "STREAM:"]


def _array_paths(descriptor: Mapping[str, Any]) -> list[str]:
    """Paths, relative to a descriptor group, of every array its events are stored in."""
    keys = _event_keys(descriptor)
    return ["time", "seq_num", "uid", *(f"{s}/{k}" for k in keys for s in ("data", "timestamps"))]


def _store_dtype(data_key: Mapping[str, Any], value: Any) -> Any:
    """The zarr dtype for a data key: declared where possible, else from the first value."""
    if data_key.get("external"):
        return str  # a datum id
    declared = data_key.get("dtype_numpy")
    if isinstance(declared, str) and declared:
        dtype = np.dtype(declared)
        return str if dtype.kind in "USOT" else dtype
    fixed = {"string": str, "number": np.float64, "integer": np.int64, "boolean": np.bool_}
    if data_key["dtype"] in fixed:
        return fixed[data_key["dtype"]]
    dtype = np.asarray(value).dtype
    return str if dtype.kind in "UT" else dtype


def _store_shape(data_key: Mapping[str, Any], value: Any) -> tuple[int, ...]:
    """Declared shape, with unknown (``None``) lengths taken from the first value."""
    if data_key.get("external"):
        return ()
    return tuple(int(n if d is None else d) for d, n in zip(data_key["shape"], np.shape(value)))


def _create_array(group: zarr.Group, path: str, dtype: Any, shape: tuple[int, ...]) -> zarr.Array:
    itemsize = _STR_ITEM_BYTES if dtype is str else np.dtype(dtype).itemsize
    row_bytes = max(1, itemsize * int(np.prod(shape)))
    rows = max(1, min(_MAX_CHUNK_ROWS, _CHUNK_BYTES // row_bytes))
    parent, _, leaf = path.rpartition("/")
    where = group.require_group(parent) if parent else group
    chunks = (rows, *(max(1, n) for n in shape))
    return where.create_array(leaf, shape=(0, *shape), dtype=dtype, chunks=chunks)


@dataclass
class _Run:
    group: zarr.Group
    descriptors: zarr.Group
    lists: dict[str, list[dict[str, Any]]]
    ids: set[str]


@dataclass
class _Stream:
    run_uid: str
    group: zarr.Group
    descriptor: dict[str, Any]
    n: int
    arrays: dict[str, zarr.Array] = field(default_factory=dict)
    uids: set[str] = field(default_factory=set)
    ready: bool = False  # every array exists

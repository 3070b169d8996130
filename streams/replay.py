"""Replay stored runs as documents, at recorded, accelerated or unpaced speed.

Where the runs come from is chosen by :func:`open_store`: a tiled server
(:class:`~streams.tiled_io.TiledRunSource`) or beampilot's zarr store
(:class:`~streams.zarr_reader.ZarrRunReader`). :func:`replay` paces any ``(name, doc)``
iterable by the documents' recorded ``time`` and hands them to a sink.
"""

from __future__ import annotations

import math
import numbers
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence, Sized
from dataclasses import dataclass, field
from itertools import chain
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

from tqdm import tqdm

from streams.errors import StreamError
from streams.zarr_reader import ZarrRunReader

__all__ = ["ReplayStats", "RunStore", "open_store", "replay", "replay_runs"]

Document = tuple[str, dict[str, Any]]


@runtime_checkable
class RunStore(Protocol):
    """Stored runs: their start uids, and each run's documents in recorded order."""

    def runs(self) -> list[str]: ...

    def documents(self, uid: str) -> Iterator[Document]: ...


@dataclass(frozen=True)
class ReplayStats:
    """What a replay did.

    Attributes
    ----------
    counts : Mapping[str, int]
        Documents delivered, by document name.
    wall_time : float
        Seconds from the first document to the end, on the replay's clock.
    slept : float
        Seconds spent waiting for documents' scheduled times.
    max_lateness : float
        Largest delay of a document past its scheduled time, in seconds (0 when unpaced).
    """

    counts: Mapping[str, int] = field(default_factory=dict)
    wall_time: float = 0.0
    slept: float = 0.0
    max_lateness: float = 0.0

    @property
    def n_documents(self) -> int:
        """Documents delivered in all."""
        return sum(self.counts.values())


def open_store(source: str, *, api_key: str | None = None) -> RunStore:
    """Open stored runs by where they are.

    Parameters
    ----------
    source : str
        ``http://`` or ``https://`` URL: a tiled server; an existing directory: a beampilot
        zarr store written by :class:`~streams.zarr_writer.ZarrRunWriter`.
    api_key : str, optional
        The tiled API key (ignored for a zarr store).

    Raises
    ------
    StreamError
        If ``source`` is neither, or the tiled server is not reachable.
    StoreError
        If the directory is not a beampilot zarr store.
    """
    if source.startswith(("http://", "https://")):
        # Imported here: the tiled client and bluesky-tiled-plugins take ~2 s to import,
        # which replaying a zarr store should not pay.
        from streams.tiled_io import TiledRunSource

        return TiledRunSource(source, api_key=api_key)
    if Path(source).is_dir():
        return ZarrRunReader(source)
    raise StreamError(
        f"source {source!r} is neither an http(s):// tiled URL nor an existing directory; "
        "pass a tiled server URL or the path of a beampilot zarr store"
    )


def replay(
    documents: Iterable[Document],
    sink: Callable[[str, dict[str, Any]], None],
    *,
    speed: float | None = 1.0,
    clock: Callable[[], float] = time.monotonic,
    sleep: Callable[[float], None] = time.sleep,
    progress: bool | None = None,
) -> ReplayStats:
    """Deliver ``documents`` to ``sink``, paced by their recorded ``time``.

    A document with a ``time`` (start, descriptor, event, stop; an ``event_page`` by its first
    time) is delivered at ``t0 + (time - time0) / speed`` on ``clock``, where ``t0`` and
    ``time0`` are the clock and recorded time of the run's start document (or of the first
    timed document). The schedule restarts at every start document, so the time between
    stored runs is not replayed. Documents without a time go at once, in order.

    Parameters
    ----------
    documents : iterable of (name, doc)
        The documents, in the order to deliver them.
    sink : callable
        Called with each ``(name, doc)``; its exceptions propagate.
    speed : float or None
        ``1`` replays at recorded speed, ``10`` ten times faster; ``None`` does not wait.
    clock, sleep : callable
        Monotonic seconds and the way to wait them (inject fakes for tests).
    progress : bool, optional
        Show a tqdm bar (total = number of documents when ``documents`` has a length).

    Returns
    -------
    ReplayStats

    Raises
    ------
    ValueError
        If ``speed`` is not a positive finite number or ``None``.
    """
    if speed is not None and not (
        isinstance(speed, int | float) and math.isfinite(speed) and speed > 0
    ):
        raise ValueError(f"{speed=} must be a positive finite number, or None for no pacing")
    counts: Counter[str] = Counter()
    slept = lateness = 0.0
    anchor: tuple[float, float] | None = None  # (clock, recorded time) of the schedule's origin
    total = len(documents) if isinstance(documents, Sized) else None
    began = clock()
    with tqdm(total=total, unit="doc", disable=not progress, desc="replay") as bar:
        for name, doc in documents:
            recorded = _recorded_time(name, doc)
            if speed is not None and recorded is not None:
                if anchor is None or name == "start":
                    anchor = (clock(), recorded)
                due = anchor[0] + (recorded - anchor[1]) / speed
                if (wait := due - clock()) > 0:
                    sleep(wait)
                    slept += wait
                lateness = max(lateness, clock() - due)
            sink(name, doc)
            counts[name] += 1
            bar.update()
    return ReplayStats(dict(counts), clock() - began, slept, lateness)


def replay_runs(
    store: RunStore,
    uids: Sequence[str],
    sink: Callable[[str, dict[str, Any]], None],
    *,
    speed: float | None = 1.0,
    progress: bool = True,
    clock: Callable[[], float] = time.monotonic,
    sleep: Callable[[float], None] = time.sleep,
) -> ReplayStats:
    """Replay the runs ``uids`` of ``store``, one after another, into ``sink``.

    Each run is paced from its own start document (see :func:`replay`, which also describes
    ``speed``, ``clock``, ``sleep`` and ``progress``); runs are read lazily, one at a time.

    Raises
    ------
    KeyError
        If a uid is not in the store (raised when that run is reached).
    """
    if isinstance(uids, str):
        raise TypeError(f"uids must be a sequence of uids, not the string {uids!r}")
    documents = chain.from_iterable(store.documents(uid) for uid in uids)
    return replay(documents, sink, speed=speed, clock=clock, sleep=sleep, progress=progress)


def _recorded_time(name: str, doc: Mapping[str, Any]) -> float | None:
    value = doc.get("time")
    if name == "event_page" and isinstance(value, list | tuple):
        value = value[0] if value else None
    if isinstance(value, numbers.Real) and not isinstance(value, bool):
        return float(value)
    return None

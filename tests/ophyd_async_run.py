"""A real RunEngine run of ophyd-async's simulated detector, which writes its frames to an HDF5
file and sends stream_resource / stream_datum documents, as ophyd-async detectors do."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import pytest


async def _no_wait(_seconds: float) -> None:
    """The simulated detector's frame period, skipped."""
    await asyncio.sleep(0)


def blob_scan(directory: Path, n: int, subscribers: Sequence[Callable[[str, dict], Any]] = ()
              ) -> tuple[str, list[tuple[str, dict]]]:
    """Scan a ``SimStage`` over ``n`` points with a ``SimBlobDetector`` writing
    ``directory / "blobs.h5"`` (the blob's brightness follows the stage, so each frame differs);
    ``subscribers`` get every document. Returns the run's uid and its documents."""
    pytest.importorskip("ophyd_async")
    import bluesky.plan_stubs as bps
    import bluesky.plans as bp
    from bluesky import RunEngine
    from ophyd_async.core import StaticFilenameProvider, StaticPathProvider, init_devices
    from ophyd_async.sim import PatternGenerator, SimBlobDetector, SimStage

    RE = RunEngine({}, context_managers=[])
    pattern = PatternGenerator(sleep=_no_wait)  # the frame period is not what these tests are about
    with init_devices():
        det = SimBlobDetector(StaticPathProvider(StaticFilenameProvider("blobs"), directory), pattern)
        stage = SimStage(pattern)
    RE(bps.mv(stage.x.velocity, 100.0, stage.x.acceleration_time, 0.01))  # a fast stage: no run, no documents
    docs: list[tuple[str, dict]] = []
    RE.subscribe(lambda name, doc: docs.append((name, doc)))
    for subscriber in subscribers:
        RE.subscribe(subscriber)
    (uid,) = RE(bp.scan([det], stage.x, -2, 2, n))
    assert "stream_datum" in [name for name, _ in docs]  # the frames are in the file, not the events
    return uid, docs

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


def _engine(directory: Path, filename: str, subscribers: Sequence[Callable[[str, dict], Any]]
            ) -> tuple[Any, Any, Any, list[tuple[str, dict]]]:
    """A RunEngine recording its documents (also sent to ``subscribers``), a ``SimBlobDetector``
    writing ``directory / f"{filename}.h5"`` and a fast ``SimStage`` on the same pattern."""
    pytest.importorskip("ophyd_async")
    import bluesky.plan_stubs as bps
    from bluesky import RunEngine
    from ophyd_async.core import StaticFilenameProvider, StaticPathProvider, init_devices
    from ophyd_async.sim import PatternGenerator, SimBlobDetector, SimStage

    RE = RunEngine({}, context_managers=[])
    pattern = PatternGenerator(sleep=_no_wait)  # the frame period is not what these tests are about
    with init_devices():
        det = SimBlobDetector(StaticPathProvider(StaticFilenameProvider(filename), directory), pattern)
        stage = SimStage(pattern)
    RE(bps.mv(stage.x.velocity, 100.0, stage.x.acceleration_time, 0.01))  # a fast stage: no run, no documents
    docs: list[tuple[str, dict]] = []
    RE.subscribe(lambda name, doc: docs.append((name, doc)))
    for subscriber in subscribers:
        RE.subscribe(subscriber)
    return RE, det, stage, docs


def blob_scan(directory: Path, n: int, subscribers: Sequence[Callable[[str, dict], Any]] = ()
              ) -> tuple[str, list[tuple[str, dict]]]:
    """Scan a ``SimStage`` over ``n`` points with a ``SimBlobDetector`` writing
    ``directory / "blobs.h5"`` (the blob's brightness follows the stage, so each frame differs);
    ``subscribers`` get every document. Returns the run's uid and its documents."""
    import bluesky.plans as bp

    RE, det, stage, docs = _engine(directory, "blobs", subscribers)
    (uid,) = RE(bp.scan([det], stage.x, -2, 2, n))
    assert "stream_datum" in [name for name, _ in docs]  # the frames are in the file, not the events
    return uid, docs


def fly_scan(directory: Path, n: int, subscribers: Sequence[Callable[[str, dict], Any]] = ()
             ) -> tuple[str, list[tuple[str, dict]]]:
    """A fly scan: a ``SimBlobDetector`` takes ``n`` frames into ``directory / "fly.h5"`` while
    it flies (prepare, kickoff, collect while completing), as ophyd-async detectors do; the run
    has stream_resource / stream_datum documents and no events. Returns its uid and documents."""
    import bluesky.plan_stubs as bps
    import bluesky.preprocessors as bpp
    from ophyd_async.core import TriggerInfo

    RE, det, _, docs = _engine(directory, "fly", subscribers)

    @bpp.stage_decorator([det])
    @bpp.run_decorator()
    def fly() -> Any:
        yield from bps.prepare(det, TriggerInfo(number_of_events=n), wait=True)
        yield from bps.declare_stream(det, name="primary", collect=True)
        yield from bps.kickoff(det, wait=True)
        yield from bps.collect_while_completing(flyers=[det], dets=[det], flush_period=0.1)

    (uid,) = RE(fly())
    names = [name for name, _ in docs]
    assert "stream_datum" in names and "event" not in names  # a fly scan's frames have no events
    return uid, docs

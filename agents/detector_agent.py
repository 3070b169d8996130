"""An analysis agent that runs a detector network on every frame of a stream.

:class:`DetectorAnalysisAgent` reads detector frames from the events of one stream (inline arrays,
or external data referenced by resource / datum documents), checks each frame at the edge, batches
good frames within a latency budget, runs the network (:func:`models.nets.infer`: CUDA when present,
smaller batches then the CPU on out-of-memory) and publishes one derived run per raw run, linked to
it by ``raw_run_uid`` (:class:`streams.derived.DerivedRunWriter`). Only raw runs with frames count:
a run whose analysed stream declares no ``frame_key`` (a motor or diode scan of the same
RunEngine, on the same topic) gets no derived run and no failed frames; ``report()`` counts such
runs (``runs_without_frame_key``) and names the last one's data keys, for a ``frame_key`` that is
set wrong.

Derived streams, one event per good raw frame, in raw order; every event of every stream carries
``raw_seq_num``, ``raw_uid`` and ``raw_time`` of the raw event, and ``raw_image`` (0, 1, ...) where
each raw event holds a stack of images (an area detector taking several a point: a frame key of
shape ``[n, ny, nx]``, each image analysed as a frame):

* ``denoise`` - ``denoised``: expected counts, float32 array of the frame's shape;
* ``bragg`` - ``peak_mask``: uint8 array of the frame's shape, ``n_peaks``: integer; and a second
  stream ``peaks`` with one event per peak (``peak_index``, ``intensity``, ``sigma``, ``background``,
  ``n_pixels``, ``centroid``: float array of length ``ndim``), from
  :func:`models.classical.integrate_in_mask` on the raw counts (touching peaks cut apart along the
  network's logits: ``peak_separation``; each summed over its mask, and with
  ``aperture_grow_sigma`` also over the rings of wings a curve of growth finds around it;
  ``n_pixels`` counts what was summed). One event per peak keeps every data
  key of fixed shape, which every sink (zarr, tiled) stores as a plain column; a frame's peaks
  are sent together as one ``event_page`` (tens of peaks a frame: one document, one Kafka
  message, one store append per frame rather than one per peak; none for a frame without peaks);
* ``sans-sr`` - ``super_resolved``: float32 array ``factor`` times finer in each direction, scaled
  to the measured counts of each ring about ``beam_center`` (``ring_consistency``); a network
  trained with the beam's position as input (``SuperResolver(beam=True)``) is told the same
  centre (the frame's centre when ``beam_center`` is None). The network's pattern is the mean
  over the frame's mirror images (``symmetric_average``; for the other analyses it is off by
  default: 4-8 forward passes a frame).

With ``files`` (a directory) the derived frames (``denoised``, ``peak_mask``, ``super_resolved``)
leave the events: each derived stream's go to an HDF5 file there, named by stream_resource /
stream_datum documents as ophyd-async detectors name theirs (:mod:`streams.frame_files`), which
keeps Kafka messages small and lets tiled register the files rather than copy every frame.

External frames (resource / datum documents, as ophyd's area detectors write them; stream_resource
/ stream_datum documents, as ophyd-async detectors do, their frames left out of the events) are
read by :class:`streams.external.ExternalData` (NPY, areaDetector HDF5 and TIFF, HDF5 streams; ``root_map``
maps the paths in the documents to where the files are mounted here). A frame is read once every
document it needs has arrived (its stream_datum; its event too when ``mask_key`` is an ordinary
event key), so step scans and fly scans (stream_datum documents only) go the same way. A frame
whose file is still being written waits, with the frames of its run behind it, for up to
``external_wait_s``, and has one last try at its run's stop.

A bad frame (wrong shape or dtype, NaN/inf, negative counts, a missing external file, ...) raises
nothing out of :meth:`~DetectorAnalysisAgent.tell`: it is logged with the run uid, seq_num and
cause, counted in ``report()["failed_frames"]`` by cause, and the stream goes on. Frames that never
arrive are counted too: at a run's stop, those its ``num_events`` counts in the analysed stream
(a fly scan's included) that no event or stream_datum ever named, from the first one that did
(``"missing"``; a missing event counts as one frame).
"""

from __future__ import annotations

import logging
import math
import shutil
import time
from collections import Counter, deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from pydantic import Field, field_validator
from torch.nn import functional as F

from agents.config import _Strict, existing_ancestor, writable_dir
from agents.errors import AgentError, ConfigError
from agents.protocol import PlanRequest
from models.classical import integrate_in_mask, neighbour_noise_rms
from models.nets import UNet, denoiser_input, infer, ring_consistent
from models.registry import WeightsError, load_weights
from streams.derived import DerivedRunWriter
from streams.external import ExternalData, ExternalDataError
from streams.frame_files import MIN_FREE_BYTES, SpaceForecast, time_left_text
from streams.protocols import DocumentSink
from streams.sequence import events_of

__all__ = ["ANALYSES", "READ_NOISE_LIMIT", "DetectorAnalysisAgent", "DetectorSettings", "FrameError"]

logger = logging.getLogger(__name__)

#: the network architecture each analysis needs
ANALYSES: dict[str, str] = {"denoise": "poisson-denoiser-unet", "bragg": "bragg-peak-unet",
                            "sans-sr": "sans-super-resolver"}


#: A denoiser told the read noise refuses a frame whose whole noise (estimated from neighbouring
#: pixels, :func:`models.classical.neighbour_noise_rms`) is less than ``1 / READ_NOISE_LIMIT`` of
#: the ``read_noise`` setting: read noise alone cannot exceed the whole noise, so the setting is
#: wrong (often given in ADU), and the network would smooth the frame as if it were that noisy.
#: At the right setting the ratio is at most 1.02 on 300 simulated integrating frames (0.01-100
#: counts per pixel, every scene kind, 128 x 128).
READ_NOISE_LIMIT = 2.0


class FrameError(AgentError):
    """A frame that cannot be analysed; ``cause`` is the key it is counted under in the report.
    ``retry``: its data may not be there yet (a detector file still being written); the agent
    tries again until ``external_wait_s`` has passed."""

    def __init__(self, cause: str, message: str, *, retry: bool = False) -> None:
        super().__init__(message)
        self.cause = cause
        self.retry = retry


def _load_detector_mask(spec: str | None, agent: str) -> np.ndarray | None:
    """The static mask named by ``detector_mask`` (True: left out), read once; a clear error if not."""
    if spec is None:
        return None
    if spec.startswith("pyfai:"):
        from models.masks import pyfai_mask

        try:
            return np.array(pyfai_mask(spec.removeprefix("pyfai:")), dtype=bool)
        except ValueError as err:
            raise ConfigError(f"agent {agent!r}: detector_mask={spec!r}: {err}") from None
    path = Path(spec).expanduser()
    if not path.is_file():
        raise ConfigError(f"agent {agent!r}: detector_mask file {str(path)!r} does not exist; give a .npy mask "
                          "(non-zero where a pixel is left out) or 'pyfai:NAME'")
    try:
        m = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as err:
        raise ConfigError(f"agent {agent!r}: cannot read detector_mask {str(path)!r} as .npy: {err}") from None
    if m.dtype.kind not in "biu" or m.ndim < 2:
        raise ConfigError(f"agent {agent!r}: detector_mask {str(path)!r} holds a {m.ndim}-D {m.dtype} array; "
                          "a 2-D (or 3-D) boolean or integer array is needed, non-zero where a pixel is left out")
    return m.astype(bool)


# -- settings and per-run state --------------------------------------------------------------------
class DetectorSettings(_Strict):
    """Settings of :class:`DetectorAnalysisAgent`.

    ``max_batch`` frames go to the network together (on the CPU in forward calls of about
    :data:`models.nets.CPU_PIXELS_PER_CALL` pixels each, which is faster there than one call for
    large frames: :func:`models.nets.infer`); a smaller batch runs when its oldest frame
    has waited ``max_latency_s`` (checked on every ``tell`` and :meth:`~DetectorAnalysisAgent.poll`)
    and at every stop document. ``read_noise``: rms of an integrating detector's read noise;
    values down to ``-5 * read_noise`` are then accepted (0: counts must be >= 0), and a denoiser
    trained to be told it (``read_noise`` in its architecture, as the shipped one is) is given it:
    set it to the detector's for an integrating detector, leave it 0 for a photon-counting one.
    Such a denoiser refuses (cause ``read_noise``) a frame whose whole noise is less than half the
    setting, which no detector with that read noise can give (:data:`READ_NOISE_LIMIT`).
    """

    name: str = "detector"
    analysis: Literal["denoise", "bragg", "sans-sr"]
    weights: str
    stream: str = "primary"
    frame_key: str = "det_image"
    mask_key: str | None = None  # per-frame bad-pixel mask, True (non-zero) where a pixel is left out
    # the detector's static mask, OR-ed with any per-frame one: a .npy file of a boolean or integer
    # array of the frames' shape (non-zero: left out, as pyFAI writes masks), or "pyfai:NAME" for the
    # module gaps of a detector pyFAI knows (e.g. "pyfai:Pilatus1M", frames of its full shape)
    detector_mask: str | None = None
    max_batch: int = Field(default=8, ge=1)
    max_latency_s: float = Field(default=0.5, ge=0)
    device: Literal["auto", "cpu", "cuda"] = "auto"
    bf16: bool = False
    read_noise: float = Field(default=0.0, ge=0)
    peak_threshold: float = Field(default=0.5, gt=0, lt=1)
    background_shell_width: float = Field(default=3.0, gt=0)
    # bragg: a component of the mask holding several tops of the network's logits at least this far
    # apart (pixels) is cut along the logits' watershed, so touching peaks are integrated apart
    # (models.classical.split_peaks); None integrates every component whole
    peak_separation: float | None = Field(default=3.0, gt=0)
    # bragg: None sums each peak over its mask; a number (2 is a good choice) also over the
    # one-pixel rings around it that stand, one after the other, that many sigmas above the
    # background (a curve of growth; models.classical.integrate_in_mask): strong peaks' intensities
    # about twice as accurate, at about twice the integration time
    aperture_grow_sigma: float | None = Field(default=None, gt=0)
    # sans-sr: scale the network's pattern to the measured counts of each half-pixel ring about the
    # beam centre (row, column in detector pixels; None: the detector centre), so I(Q) keeps to
    # the measurement (models.nets.ring_consistent); False publishes the network's pattern as is
    ring_consistency: bool = True
    beam_center: tuple[float, float] | None = None
    # the mean of the network's outputs for the frame's mirror images (in its last two axes), each
    # mirrored back (models.nets.mirror_mean): 4 or 8 forward passes a frame. None: the network's
    # own default, on for sans-sr, off for denoise and bragg (their CPU frame rate cannot spare it)
    symmetric_average: bool | None = None
    # external data: how long a frame whose file is still being written (locked by a writer without
    # SWMR, or not yet as long as the frame needs) is waited for before it is counted failed
    # ("not_ready"); the frames of its run behind it wait with it, so they stay in raw order. For a
    # writer without SWMR, whose file stays locked until the run ends, set it longer than a run:
    # the frames are then read at the run's stop, when the file is closed
    external_wait_s: float = Field(default=30.0, ge=0)
    # where the detector's files are mounted here, as databroker's root_map: {"/nsls2/data":
    # "/mnt/data"} replaces that leading part of a resource's root (or a stream resource's uri path)
    root_map: dict[str, str] = Field(default_factory=dict)
    # a directory: the derived frames (denoised, peak_mask, super_resolved) go to HDF5 files there,
    # one a derived stream, named by stream_resource / stream_datum documents as ophyd-async
    # detectors name theirs (streams.frame_files), so the documents stay small (a Kafka broker's
    # default message.max.bytes, about 1 MB, is under one denoised 512 x 512 frame) and tiled
    # registers the files rather than copying each frame. None: the frames are inline in the events
    files: str | None = None

    @field_validator("files")
    @classmethod
    def _writable_files(cls, value: str | None) -> str | None:
        if value is not None:
            writable_dir(Path(value).expanduser(), "files", create=False)
        return value

    @field_validator("beam_center")
    @classmethod
    def _finite_center(cls, value: tuple[float, float] | None) -> tuple[float, float] | None:
        if value is not None and not all(math.isfinite(v) for v in value):
            raise ValueError(f"beam_center must be two finite pixel coordinates (row, column); got {value}")
        return value


@dataclass
class _Run:
    writer: DerivedRunWriter
    frame_shape: tuple[int, ...] | None = None  # fixed by the first good frame
    stacked: bool | None = None  # events hold several images each (fixed by the first good event)
    streams: dict[str, list[str]] = field(default_factory=dict)  # derived streams declared: their keys in files
    waited: bool = False  # a frame of this run has waited for its data (said once in the log)
    seen: set[int] = field(default_factory=set)  # seq_nums of the analysed stream told so far


@dataclass
class _Frame:
    run_uid: str
    seq_num: int
    uid: str
    time: float
    counts: np.ndarray  # as read, float64, squeezed to the network's ndim
    mask: np.ndarray | None  # bool, True = left out
    arrived: float  # agent clock
    index: int | None = None  # which image of the event, when it holds several


def _spans(numbers: Sequence[int]) -> str:
    """Sorted integers as runs, for a log line: ``[1, 2, 3, 7]`` -> ``"1-3, 7"``."""
    spans: list[list[int]] = []
    for n in numbers:
        if spans and n == spans[-1][1] + 1:
            spans[-1][1] = n
        else:
            spans.append([n, n])
    return ", ".join(f"{a}-{b}" if b > a else f"{a}" for a, b in spans)


def _percentile(values: Sequence[float], q: float) -> float | None:
    return float(np.percentile(np.asarray(values), q)) if values else None


class DetectorAnalysisAgent:
    """Run a detector network (denoiser, Bragg-peak U-Net, SANS super-resolver) on every frame.

    Parameters
    ----------
    settings
        A :class:`DetectorSettings` (or a mapping validated into one).
    sinks
        Where derived runs go.
    clock
        Seconds, monotonic; the latency budget and the reported latencies use it (tests pass a fake).

    Raises
    ------
    WeightsError
        The weights are missing, corrupted (checksum) or not for this analysis (architecture).
    ConfigError
        ``device="cuda"`` where CUDA is not available.
    """

    def __init__(self, settings: DetectorSettings | dict[str, Any], *, sinks: Sequence[DocumentSink] = (),
                 clock: Callable[[], float] = time.monotonic) -> None:
        if not isinstance(settings, DetectorSettings):
            settings = DetectorSettings.model_validate(settings)
        self.settings, self.name, self.sinks, self.clock = settings, settings.name, list(sinks), clock
        if settings.device == "cuda" and not torch.cuda.is_available():
            raise ConfigError(f"agent {self.name!r}: device='cuda' but CUDA is not available; use 'auto' or 'cpu'")
        self.device = None if settings.device == "auto" else torch.device(settings.device)
        try:
            self.model, self.record = load_weights(settings.weights, architecture=ANALYSES[settings.analysis])
        except WeightsError as err:
            raise WeightsError(f"detector agent {self.name!r} ({settings.analysis}): {err}") from None
        self.static_mask = _load_detector_mask(settings.detector_mask, self.name)
        unet = next(m for m in self.model.modules() if isinstance(m, UNet))
        self.ndim, self._multiple = unet.dims, unet.multiple
        self._factor = int(getattr(self.model, "factor", 1))
        if settings.symmetric_average is not None:
            self.model.symmetric_average = settings.symmetric_average
        self._runs: dict[str, _Run] = {}
        # runs started whose analysed stream has not (yet) declared the frame key: run uid -> the
        # data keys its descriptors of that stream declared instead
        self._keyless: dict[str, list[str]] = {}
        self.runs_without_frame_key = 0
        self._last_keyless: dict[str, Any] | None = None
        self._descriptors: dict[str, tuple[str, list[int | None]]] = {}  # uid -> (run uid, declared shape)
        self.external = ExternalData(settings.root_map)
        # frames written as streams, waiting for their other documents: (descriptor, seq_num) -> its
        # event (None until it arrives, or when the frame needs none)
        self._assembling: dict[tuple[str, int], dict[str, Any] | None] = {}
        # frames told, not yet read (external data may still be being written), by run, in raw order
        self._incoming: dict[str, deque[tuple[list[int | None], dict[str, Any], float]]] = {}
        self._pending: list[_Frame] = []
        self.frames_in = self.frames_out = self.batches = 0
        self.batch_sizes: Counter[int] = Counter()
        self.failed: Counter[str] = Counter()
        self.zeroed_pixels = 0
        self.file_bytes = 0  # derived frames written to files (``files``)
        self._space: SpaceForecast | None = None  # when the disk under ``files`` fills, at its recent rate
        if settings.files is not None:
            where = Path(settings.files).expanduser()
            self._space = SpaceForecast(lambda: shutil.disk_usage(existing_ancestor(where)).free)
        self._latencies: deque[float] = deque(maxlen=100_000)
        self._note: dict[str, Any] | None = None
        self._fallbacks = 0

    # -- the agent protocol ------------------------------------------------------------------------
    def tell(self, name: str, doc: dict[str, Any]) -> None:
        if name == "start":
            self._start(doc)
        elif name in ("event", "event_page"):
            for event in events_of(name, doc):
                self._event(event)
        elif name == "stream_datum":
            self._stream_datum(doc)
        elif name == "stop":
            self._stop(doc)
        else:  # descriptors and (stream) resources and datums
            self.external.tell(name, doc)
            if name == "descriptor":
                self._descriptor(doc)
        self.poll()

    def ask(self, n: int) -> list[PlanRequest]:
        return []

    @property
    def frames_waiting(self) -> int:
        """Frames told and not analysed yet (a daemon does not checkpoint past them): waiting for
        a batch, for their external data to be written, or for their other documents."""
        return len(self._pending) + self._waiting_for_data()

    def _waiting_for_data(self) -> int:
        """Frames told whose file is not written yet, or whose other documents are not all here."""
        return sum(len(q) for q in self._incoming.values()) + len(self._assembling)

    def poll(self) -> int:
        """Read frames whose external data has been written since; run the pending batch if its
        oldest frame has waited ``max_latency_s``; returns frames run."""
        for run_uid in list(self._incoming):
            self._drain(run_uid)
        if self._pending and self.clock() - self._pending[0].arrived >= self.settings.max_latency_s:
            return self.flush()
        return 0

    def flush(self) -> int:
        """Run every pending frame now; returns how many."""
        pending, self._pending = self._pending, []
        groups: dict[tuple[int, ...], list[_Frame]] = {}
        for frame in pending:  # one model call per frame shape; a run's frames share one shape
            groups.setdefault(frame.counts.shape, []).append(frame)
        for group in groups.values():
            self._run_batch(group)
        return len(pending)

    def report(self) -> dict[str, Any]:
        lat = list(self._latencies)
        return {"agent": self.name, "kind": type(self).__name__, "analysis": self.settings.analysis,
                "open_runs": len(self._runs), "runs_without_frame_key": self.runs_without_frame_key,
                "last_run_without_frame_key": self._last_keyless,
                "frames_in": self.frames_in, "frames_out": self.frames_out,
                "frames_pending": len(self._pending), "failed_frames": dict(self.failed),
                "frames_waiting_for_data": self._waiting_for_data(),
                "batches": self.batches, "batch_sizes": {str(k): v for k, v in sorted(self.batch_sizes.items())},
                "latency_s": {"p50": _percentile(lat, 50), "p99": _percentile(lat, 99)},
                "inference": self._note, "fallbacks": self._fallbacks,
                "negative_pixels_zeroed_for_integration": self.zeroed_pixels,
                "weights": {"name": self.record.name, "architecture": self.record.architecture,
                            "sha256": self.record.sha256},
                "files": self.files_space()}

    def files_space(self) -> dict[str, Any] | None:
        """Where the derived frames go (``files``), how much was written, and the space left
        there: a denoising agent at 10 frames/s of 512 x 512 writes about 38 GB an hour."""
        if self.settings.files is None:
            return None
        assert self._space is not None
        self._say_space(self._space.poll())
        f = self._space.forecast()
        return {"directory": str(Path(self.settings.files).expanduser()), "bytes_written": self.file_bytes,
                "free_bytes": f["free_bytes"], "free_falling_bytes_per_s": f["falling_bytes_per_s"],
                "seconds_to_full": f["seconds_left"]}

    def close(self) -> None:
        """Read what is readable (once more), run what is pending, then end open derived runs with
        ``exit_status="abort"``; frames still unreadable or incomplete are counted failed."""
        for run_uid in list(self._runs):
            self._give_up(run_uid, "the agent was closed")
        self.flush()
        for run in self._runs.values():
            run.writer.close(exit_status="abort", reason="agent closed before the raw run stopped")
        self._runs.clear()
        self._keyless.clear()

    # -- documents ---------------------------------------------------------------------------------
    def _start(self, doc: dict[str, Any]) -> None:
        if doc["uid"] in self._runs or doc.get("raw_run_uid"):  # a repeat, or a derived run
            return
        self._keyless[doc["uid"]] = []  # its derived run starts with its first descriptor of frames

    def _descriptor(self, doc: dict[str, Any]) -> None:
        """A descriptor of the analysed stream that declares the frame key is this detector's;
        one that does not is another instrument's (a diode scan, a motor alignment on the same
        RunEngine and topic): its events are not frames to analyse, nor failures."""
        run_uid = doc["run_start"]
        if doc.get("name", "primary") != self.settings.stream or not (run_uid in self._runs or run_uid in self._keyless):
            return
        keys = doc.get("data_keys", {})
        if self.settings.frame_key not in keys:
            if run_uid in self._keyless:
                self._keyless[run_uid] = sorted(set(self._keyless[run_uid]) | set(keys))
            return
        if run_uid in self._keyless:
            del self._keyless[run_uid]
            md = {"agent": self.name, "analysis": self.settings.analysis, "frame_key": self.settings.frame_key,
                  "weights": {"name": self.record.name, "architecture": self.record.architecture,
                              "sha256": self.record.sha256}}
            self._runs[run_uid] = _Run(DerivedRunWriter(self.sinks, raw_run_uid=run_uid, metadata=md,
                                                        files=self.settings.files))
        declared = list(keys[self.settings.frame_key].get("shape") or [])
        self._descriptors[doc["uid"]] = (run_uid, declared)

    def _stop(self, doc: dict[str, Any]) -> None:
        run = self._runs.get(doc["run_start"])
        if run is None:
            keys = self._keyless.pop(doc["run_start"], None)
            if keys:  # its analysed stream had events, none with frames: said once, in case frame_key is wrong
                self.runs_without_frame_key += 1
                self._last_keyless = {"run": doc["run_start"], "data_keys": keys}
                logger.info("agent %s: run %s has no data key %r in its %r stream (it has %s); not analysed",
                            self.name, doc["run_start"], self.settings.frame_key, self.settings.stream, keys)
            self.external.tell("stop", doc)
            return
        self._count_missing(doc["run_start"], run, doc)
        self._give_up(doc["run_start"], "its run stopped")
        self.flush()
        del self._runs[doc["run_start"]]
        self.external.tell("stop", doc)
        self._descriptors = {uid: d for uid, d in self._descriptors.items() if d[0] != doc["run_start"]}
        run.writer.close(exit_status=doc.get("exit_status", "success"))

    def _count_missing(self, run_uid: str, run: _Run, stop: dict[str, Any]) -> None:
        """Frames the stop document counts that were never told: failed ``"missing"``.

        ``num_events`` counts the stream's events, a fly scan's too (its frames come by stream
        datums alone, so a lost stream_datum would otherwise lose its frames without a word). Only
        seq_nums from the first one told are counted: after a daemon restart the agent is told a
        run's frames from where its checkpoint stood, and the earlier ones were analysed before."""
        total = (stop.get("num_events") or {}).get(self.settings.stream)
        if not run.seen or not isinstance(total, int) or isinstance(total, bool):
            return
        missing = sorted(set(range(min(run.seen), total + 1)) - run.seen)
        if not missing:
            return
        self.frames_in += len(missing)
        self.failed["missing"] += len(missing)
        logger.error("agent %s: run %s stopped with %d events in stream %r, but frames seq_num %s (%d) never "
                     "arrived: their event or stream_datum documents were lost upstream", self.name, run_uid, total,
                     self.settings.stream, _spans(missing), len(missing))

    def _run_of(self, descriptor: str) -> _Run:
        """The open run of one of the analysed stream's descriptors."""
        return self._runs[self._descriptors[descriptor][0]]

    def _needed(self, descriptor: str) -> tuple[set[str], set[str]]:
        """The data keys a frame of ``descriptor`` needs: (written as streams, carried by its event)."""
        keys = {self.settings.frame_key} | ({self.settings.mask_key} if self.settings.mask_key else set())
        streamed = keys & self.external.streamed(descriptor)
        return streamed, keys - streamed

    def _event(self, event: dict[str, Any]) -> None:
        descriptor = event["descriptor"]
        if descriptor not in self._descriptors:
            return
        self._run_of(descriptor).seen.add(int(event["seq_num"]))
        streamed, in_event = self._needed(descriptor)
        if not streamed:
            self._admit(event)
        elif in_event:  # e.g. a frame written as a stream with its mask in the event
            self._assembling[(descriptor, int(event["seq_num"]))] = event
            self._assemble(descriptor, int(event["seq_num"]))
        # else: the frame comes whole from its stream_datum documents; the event adds nothing

    def _stream_datum(self, doc: dict[str, Any]) -> None:
        """Rows of a stream resource for a range of events: parts of those events' frames."""
        descriptor = doc.get("descriptor", "")
        try:
            located = self.external.tell("stream_datum", doc)
        except ExternalDataError as err:
            resource = self.external.stream_resource(doc.get("stream_resource", "")) or {}
            if descriptor in self._descriptors and resource.get("data_key") in self._needed(descriptor)[0]:
                for seq_num in range(int(doc["seq_nums"]["start"]), int(doc["seq_nums"]["stop"])):
                    self._run_of(descriptor).seen.add(seq_num)
                    self.frames_in += 1
                    self._fail(self._descriptors[descriptor][0], {"seq_num": seq_num, "uid": doc.get("uid")},
                               err.cause, str(err))
            return
        if descriptor not in self._descriptors:
            return
        if not located:  # its data key is unknown, so whether it holds frames is too
            logger.error("agent %s: stream_datum %s names stream resource %r, which was never received; its frames "
                         "stay incomplete", self.name, doc.get("uid"), doc.get("stream_resource"))
        for _, key, seq_nums in located:
            if key in self._needed(descriptor)[0]:
                self._run_of(descriptor).seen.update(seq_nums)
                for seq_num in seq_nums:
                    self._assembling.setdefault((descriptor, seq_num), None)
                    self._assemble(descriptor, seq_num)

    def _assemble(self, descriptor: str, seq_num: int) -> None:
        """Admit the frame once every document it needs has arrived."""
        event = self._assembling[(descriptor, seq_num)]
        streamed, in_event = self._needed(descriptor)
        if any(self.external.locate(descriptor, k, seq_num) is None for k in streamed) or (in_event and event is None):
            return
        del self._assembling[(descriptor, seq_num)]
        event = event or {}
        self._admit({"descriptor": descriptor, "seq_num": seq_num, "time": event.get("time", time.time()),
                     "uid": event.get("uid", self.external.locate(descriptor, self.settings.frame_key, seq_num)),
                     "data": event.get("data", {})})

    def _admit(self, event: dict[str, Any]) -> None:
        """A whole frame: read it (now, or when its external data has been written), in raw order."""
        run_uid, declared = self._descriptors[event["descriptor"]]
        self.frames_in += 1
        self._incoming.setdefault(run_uid, deque()).append((declared, event, self.clock()))
        self._drain(run_uid)

    def _drain(self, run_uid: str, *, final: bool = False) -> None:
        """Read the run's told frames in order, up to the first whose data is not written yet
        (``final``: one last try each, then count it failed)."""
        queue = self._incoming.get(run_uid)
        while queue:
            declared, event, since = queue[0]
            try:
                images = self._read_frame(event, self._runs[run_uid], declared)
            except FrameError as err:
                waited = self.clock() - since
                if err.retry and not final and waited < self.settings.external_wait_s:
                    run = self._runs[run_uid]
                    if not run.waited:  # once a run, so an operator sees why nothing comes out
                        run.waited = True
                        logger.warning("agent %s: frame of run %s seq_num %s waits for its data (up to "
                                       "external_wait_s=%g s): %s", self.name, run_uid, event.get("seq_num"),
                                       self.settings.external_wait_s, err)
                    return
                queue.popleft()
                self._fail(run_uid, event, err.cause, f"{err} (waited {waited:.1f} s; external_wait_s="
                           f"{self.settings.external_wait_s:g})" if err.retry else str(err))
                continue
            queue.popleft()
            self.frames_in += len(images) - 1  # frames count images
            for i, (counts, mask) in enumerate(images):
                self._pending.append(_Frame(run_uid, int(event["seq_num"]), str(event["uid"]), float(event["time"]),
                                            counts, mask, self.clock(), i if self._runs[run_uid].stacked else None))
                if len(self._pending) >= self.settings.max_batch:
                    self.flush()
        self._incoming.pop(run_uid, None)

    def _give_up(self, run_uid: str, why: str) -> None:
        """The run's frames still waiting for data: one last read each; incomplete ones failed."""
        self._drain(run_uid, final=True)
        for descriptor, seq_num in [k for k in self._assembling if self._descriptors.get(k[0], ("",))[0] == run_uid]:
            event = self._assembling.pop((descriptor, seq_num))
            streamed, in_event = self._needed(descriptor)
            missing = [k for k in sorted(streamed) if self.external.locate(descriptor, k, seq_num) is None]
            missing += ["the event"] if in_event and event is None else []
            self.frames_in += 1
            self._fail(run_uid, {"seq_num": seq_num, "uid": (event or {}).get("uid")}, "incomplete",
                       f"{why} before this frame's {', '.join(missing)} arrived")

    def _fail(self, run_uid: str, event: Mapping[str, Any], cause: str, message: str) -> None:
        self.failed[cause] += 1
        logger.error("agent %s: frame of run %s seq_num %s (event %s) failed [%s]: %s", self.name, run_uid,
                     event.get("seq_num"), event.get("uid"), cause, message)

    # -- reading and checking frames -------------------------------------------------------------------
    def _value(self, event: Mapping[str, Any], key: str) -> Any:
        try:
            return self.external.value(event, key)
        except ExternalDataError as err:
            raise FrameError(err.cause, str(err), retry=err.retry) from None

    def _read_frame(self, event: Mapping[str, Any], run: _Run,
                    declared: list[int | None]) -> list[tuple[np.ndarray, np.ndarray | None]]:
        """The event's frame, checked: ``[(counts, mask)]``; one pair per image when the event
        holds a stack of them (an area detector taking several images a point)."""
        key = self.settings.frame_key
        try:
            arr = np.asarray(self._value(event, key))
        except ValueError as err:  # a ragged nested list
            raise FrameError("shape", f"{key!r} is not a rectangular array: {err}") from None
        if arr.dtype.kind not in "iuf":
            raise FrameError("dtype", f"{key!r} has dtype {arr.dtype}; a numeric (integer or float) array is needed")
        if declared and (arr.ndim != len(declared)
                         or any(d is not None and d != n for d, n in zip(declared, arr.shape, strict=True))):
            raise FrameError("shape", f"{key!r} has shape {list(arr.shape)}, its descriptor declares {declared}")
        while arr.ndim > self.ndim and arr.shape[0] == 1:  # area detectors often add a leading axis of 1
            arr = arr[0]
        stacked = arr.ndim == self.ndim + 1
        shape = arr.shape[1:] if stacked else arr.shape
        if arr.ndim not in (self.ndim, self.ndim + 1) or 0 in arr.shape:
            raise FrameError("shape", f"{key!r} has shape {list(arr.shape)}; the {self.settings.analysis} "
                             f"network needs a non-empty {self.ndim}D frame (or a stack of them)")
        if run.frame_shape is not None and (shape != run.frame_shape or stacked != run.stacked):
            raise FrameError("shape", f"{key!r} has shape {list(arr.shape)}, the run's frames have "
                             f"{list(run.frame_shape)}" + (" in stacks" if run.stacked else ""))
        images = list(arr) if stacked else [arr]
        masks = self._read_mask(event, shape, len(images) if stacked else None)
        out = [(image.astype(np.float64), m) for image, m in zip(images, masks, strict=True)]
        for i, (counts, mask) in enumerate(out):
            where = f"{key!r} (image {i} of {len(out)})" if stacked else repr(key)
            self._check_counts(counts, mask, where)
        run.frame_shape, run.stacked = shape, stacked
        return out

    def _check_counts(self, counts: np.ndarray, mask: np.ndarray | None, where: str) -> None:
        good = counts if mask is None else counts[~mask]
        if not np.isfinite(good).all():
            raise FrameError("non_finite", f"{where} has {int((~np.isfinite(good)).sum())} NaN/inf unmasked pixels")
        floor = -5.0 * self.settings.read_noise
        if good.size and good.min() < floor:
            raise FrameError("negative", f"{where} has counts down to {good.min():g} (< {floor:g}; "
                             f"read_noise={self.settings.read_noise})")
        sigma = self.settings.read_noise
        if sigma > 0 and getattr(self.model, "read_noise", False):
            total = neighbour_noise_rms(counts, mask)
            if total is not None and sigma > READ_NOISE_LIMIT * total:
                raise FrameError("read_noise", f"read_noise={sigma:g} counts rms is more than {READ_NOISE_LIMIT:g}x the whole "
                                 f"noise of {where} ({total:.3g} counts rms, from neighbouring pixels), which read "
                                 f"noise alone cannot exceed: set read_noise to the detector's read noise in "
                                 f"counts, not ADU (0 for a photon-counting detector)")

    def _read_mask(self, event: Mapping[str, Any], shape: tuple[int, ...],
                   n: int | None) -> list[np.ndarray | None]:
        """The mask of each of the event's images (``n`` of them in a stack, else one): the static
        mask OR-ed with the event's (one for every image, or one per image of the stack)."""
        count = 1 if n is None else n
        static = self.static_mask
        if static is not None and static.shape != shape:
            raise FrameError("mask", f"detector_mask {self.settings.detector_mask!r} has shape {list(static.shape)}, "
                             f"the frame {list(shape)}; give the mask of this detector (or of its region of interest)")
        key = self.settings.mask_key
        if key is None:
            return [static] * count
        try:
            m = np.asarray(self._value(event, key))
        except ValueError as err:
            raise FrameError("mask", f"mask {key!r} is not a rectangular array: {err}") from None
        while m.ndim > len(shape) and m.shape[0] == 1:
            m = m[0]
        per_image = n is not None and m.shape == (n, *shape)
        if (m.shape != shape and not per_image) or m.dtype.kind not in "biu":
            raise FrameError("mask", f"mask {key!r} has shape {list(m.shape)} and dtype {m.dtype}; "
                             f"a boolean or integer array of shape {list(shape)} is needed"
                             + (f" (or {[n, *shape]}, one per image)" if n is not None else ""))
        masks = list(m.astype(bool)) if per_image else [m.astype(bool)] * count
        return masks if static is None else [mm | static for mm in masks]

    # -- inference and output --------------------------------------------------------------------------
    def _run_batch(self, frames: list[_Frame]) -> None:
        x = np.stack([f.counts if f.mask is None else np.where(f.mask, 0.0, f.counts) for f in frames])
        batch = torch.from_numpy(x.astype(np.float32)).unsqueeze(1)
        batch = denoiser_input(self.model, batch, self.settings.read_noise)  # a told denoiser's channel
        shape = batch.shape[2:]
        pad = [(-n) % self._multiple for n in shape]  # the U-Net's input sizes (UNet.multiple)
        if any(pad):
            flat = [p for extra in reversed(pad) for p in (0, extra)]
            batch = F.pad(batch, flat, mode="replicate")
        if getattr(self.model, "beam", False):  # a super-resolver that sees where the beam is
            self.model.beam_center = self.settings.beam_center or ((shape[0] - 1) / 2, (shape[1] - 1) / 2)
        try:
            out, note = infer(self.model, batch, device=self.device, bf16=self.settings.bf16,
                              max_batch=self.settings.max_batch)
        except (RuntimeError, ValueError) as err:
            for f in frames:
                self._fail(f.run_uid, {"seq_num": f.seq_num, "uid": f.uid}, "inference",
                           f"{type(err).__name__}: {err}")
            return
        self.batches += 1
        self.batch_sizes[len(frames)] += 1
        self._note = note
        if note.get("fallback") is not None:
            self._fallbacks += 1
            logger.warning("agent %s: %s (batch of %d frames)", self.name, note["fallback"], len(frames))
        crop = tuple(slice(0, n * self._factor) for n in shape)  # drop the padding (scaled for SR)
        result = out[:, 0].numpy()[(slice(None), *crop)]
        for frame, y in zip(frames, result, strict=True):
            try:
                self._emit(frame, y)
            except Exception as err:  # noqa: BLE001 -- one failed publish must not lose the rest of the batch
                self._fail(frame.run_uid, {"seq_num": frame.seq_num, "uid": frame.uid}, "publish",
                           f"{type(err).__name__}: {err}")

    def _emit(self, frame: _Frame, y: np.ndarray) -> None:
        run = self._runs.get(frame.run_uid)
        if run is None:  # pragma: no cover - stop flushes first
            raise FrameError("publish", "the raw run was already stopped")
        raw = {"raw_seq_num": frame.seq_num, "raw_uid": frame.uid, "raw_time": frame.time}
        if frame.index is not None:  # one of several images of the raw event
            raw["raw_image"] = frame.index
        analysis = self.settings.analysis
        if analysis == "denoise":
            self._send(run, "denoise", {"denoised": y.astype(np.float32), **raw})
        elif analysis == "sans-sr":
            if self.settings.ring_consistency:
                y = ring_consistent(y, frame.counts, self._factor, center=self.settings.beam_center, mask=frame.mask)
            self._send(run, "sans-sr", {"super_resolved": y.astype(np.float32), **raw})
        else:
            self._emit_peaks(run, frame, y, raw)
        self.frames_out += 1
        self._latencies.append(self.clock() - frame.arrived)

    def _emit_peaks(self, run: _Run, frame: _Frame, logits: np.ndarray, raw: dict[str, Any]) -> None:
        p = self.settings.peak_threshold  # sigmoid(logit) > p, without the exponential of every pixel
        peaks = logits > math.log(p / (1.0 - p))
        counts = frame.counts
        bad = np.zeros(counts.shape, bool) if frame.mask is None else frame.mask
        peaks &= ~bad
        negative = (counts < 0) & ~bad
        if negative.any():  # read noise (accepted above); integrate_in_mask takes counts >= 0 only
            self.zeroed_pixels += int(negative.sum())
            counts = np.where(negative, 0.0, counts)
        sep = self.settings.peak_separation
        integ = integrate_in_mask(counts, peaks, self.settings.background_shell_width, mask=frame.mask,
                                  score=None if sep is None else logits, min_separation=sep or 3.0,
                                  grow_sigma=self.settings.aperture_grow_sigma)
        n = len(integ.intensity)
        self._send(run, "bragg", {"peak_mask": peaks.astype(np.uint8), "n_peaks": n, **raw})
        rows = [{"peak_index": i, "intensity": float(integ.intensity[i]), "sigma": float(integ.sigma[i]),
                 "background": float(integ.background[i]), "n_pixels": int(integ.n_peak[i]),
                 "centroid": np.asarray(integ.centroids[i], dtype=np.float64), **raw} for i in range(n)]
        if rows:
            self._send(run, "peaks", rows)

    def _send(self, run: _Run, stream: str, data: dict[str, Any] | list[dict[str, Any]]) -> None:
        """One event of ``stream``, or one event page of a list of rows."""
        first = data[0] if isinstance(data, list) else data
        if stream not in run.streams:  # declared at its first event, when the output shapes are known
            # frames (2D or 3D arrays) go to files when there is a directory; vectors (centroids) stay
            external = [k for k, v in first.items() if isinstance(v, np.ndarray) and v.ndim >= 2] \
                if self.settings.files else []
            run.writer.add_stream(stream, {k: self._data_key(v) for k, v in first.items()}, external=external)
            run.streams[stream] = external
        if isinstance(data, list):
            run.writer.emit_page(stream, data)
        else:
            run.writer.emit(stream, data)
        self.file_bytes += sum(row[k].nbytes for row in (data if isinstance(data, list) else [data])
                               for k in run.streams[stream])
        if self._space is not None:
            self._say_space(self._space.poll())

    def _say_space(self, level: float | None) -> None:
        """Warn, once per level, as the disk under ``files`` nears full (see :class:`SpaceForecast`)."""
        if level is None or self._space is None:
            return
        f = self._space.forecast()
        logger.warning("agent %s: the disk under files (%s) is full in about %s at the rate its free space fell "
                       "over the last %s (%.1f GB/h; %.1f GB free): free space there, or set files to a "
                       "larger disk and restart; once %d MiB are left every derived frame is refused and counted "
                       "failed 'publish' (the raw frames are the detector's, not touched)", self.name,
                       self.settings.files, time_left_text(f["seconds_left"]), time_left_text(f["span_s"]),
                       (f["falling_bytes_per_s"] or 0) * 3600 / 1e9, (f["free_bytes"] or 0) / 1e9,
                       MIN_FREE_BYTES // 2**20)

    def _data_key(self, value: Any) -> dict[str, Any]:
        source = f"{self.name}:{self.record.name}"
        if isinstance(value, np.ndarray):
            return {"dtype": "array", "shape": list(value.shape), "dtype_numpy": value.dtype.str, "source": source}
        if isinstance(value, str):
            return {"dtype": "string", "shape": [], "source": source}
        kind = "integer" if isinstance(value, int) else "number"
        return {"dtype": kind, "shape": [], "source": source}

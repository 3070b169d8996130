"""``MappingAgent``: autonomous mapping of a sample by kriging — where to put the beam next.

The agent is told a run's documents. Each event of the configured stream carries the stage's
position and either a detector frame (reduced here to the mapped quantities: SAXS peak
position, intensity, orientation components, by :func:`models.saxs2d.reduce_frame`) or the
quantities themselves (``reduction: none``). The frame may be in the event, or in a file the
run's documents name (:class:`streams.external.ExternalData`: resource / datum as ophyd's area
detectors write them, NPY or areaDetector HDF5 and TIFF; stream_resource / stream_datum as
ophyd-async detectors do, HDF5; ``root_map`` maps the paths to where the files are mounted here);
the exposure is read from the event or, failing that, from the descriptor's configuration.
Several images a point (a frame of shape ``[n, ny, nx]``) are summed, with ``n`` times the
exposure. Asked for ``n`` points it returns one ``measure`` request that moves the stage's axes to ``n`` positions chosen by :mod:`models.mapping` on the
posterior of a :class:`models.kriging.MappingGP`, ordered along a short path; the safety gate
checks them against the stage limits and maximum step like any other request.

Each quantity's map (the report, the demo's pictures, :meth:`MappingGP.predict`) is drawn by
kriging or, where leave-one-out cross-validation finds it closer to the data (maps with sharp
domain boundaries), by triangulating the measured positions; such a quantity is then sampled by
its own error estimate, which keeps refining its boundaries (``reconstruction``,
``interpolation_weight``; see :mod:`models.kriging` and :mod:`models.mapping`). A triangulated
quantity whose values split into domains is drawn domain by domain (``domains``, on by default;
:mod:`models.domains`): each boundary a smooth curve through all the points that straddle it,
each domain's values from its own points.

A long session (``max_points`` in the thousands, a large sample or a fine map) stays fast:
past ``exact_limit`` measurements (4,000) the kriging keeps an inducing-point posterior on
``inducing_points`` inputs (1,024) instead of the exact one, so memory and decision time no
longer grow with the points, and the drawn maps come from exact solves on each position's
nearest measurements (:mod:`models.kriging`, "Scale"; ``benchmarks/kriging_scale.py``).

``grid`` is the lattice of positions the agent may choose (the maps are drawn anywhere). It also
sets how finely a boundary can be refined. Until stop 28 the error estimate of a triangulated
map did not fall as a boundary's straddling points closed in, so refinement stopped only at the
grid's spacing (it now falls with the gap, :mod:`models.mapping`); the figures in this paragraph
were measured then. On the probe seeds 101-108 of ``benchmarks/mapping.py`` (10 x 10 mm; median points to reach the
raster's final error) a grid of 25 / 30 / 35 / 40 / 50 / 100 positions a side needed
132 / 136 / 144 / 148 / 160 / 192 on the discontinuous maps, and 30 / 50 positions 120 / 112 on
the smooth ones (25: 120): a coarser grid helps maps with boundaries and costs kriged maps. The
default stays at 50. A refinement floor on the error estimate instead, ``min(1, (h / h0)^2)``
with ``h0`` 0.15 / 0.25 mm, gave 160 / 156; a hard floor lost boundaries altogether. Nor did
choosing only every 2nd position of the grid in each direction once every quantity is drawn by
triangulation (the coarser grid where it helps, the fine one for kriged maps; measured
2026-12-04): on seeds 101-116, 152 against 160 (median of 16) but with a wider spread (96-280
against 136-192); every 3rd position never reached the raster's error on 7 of 8 seeds. A larger
initial design (seeds 101-108, discontinuous / smooth): ``n_initial`` 24 160 / 124, 48 188 / 116,
against the default 8's 160 / 112.

The kernel (measured 2026-12-05, sums of the points to the raster's error over 16 seeds,
smooth / discontinuous): without the short-range part (``multiscale: false``) 1672 / 2688
against 1904 / 2408 on seeds 117-132, but 2176 / - and 1824 / - against 2056 and 1832 on seeds
101-116 and 133-148: the smooth maps' gain did not hold. Choosing the kernel at each refit by the
smaller mean square leave-one-out residual gave 1704 / 2472 on 117-132, then 2008 / 2392 and
1832 / 2496 against 2056 / 2296 and 1832 / 2440: not adopted (median or area-weighted residuals,
or the single-scale kernel before 20 points, did no better).

What holds the smooth maps back (measured 2026-12-05, seeds 117-132, ratios to the raster's
final error, geometric means over the 16 seeds): not the model, and little the choice of
points. Refitted on the agent's own points at 96 / 112 / 128 measurements, the error was the
same within 2% with the single-scale kernel or an RBF kernel with the short-range part, and
worse without it (RBF alone 1.09 against 1.00 at 112), with the quantity kriged in log
(0.998 at 112, 0.905 against 0.897 at 128) or with the noise variance given to the model
inflated 2 / 4 / 9 times (1.01 / 1.07 / 1.26 at 112). A plain square grid of 100 / 121 / 144
positions, kriged the same way, gave 1.19 / 0.99 / 0.85 against the agent's 1.41 / 1.00 / 0.89 at
96 / 112 / 128: on these maps the acquisition does about as well as a grid of the same
size. The measurement noise (2% of the map's spread) is most of what is left. With the same
hyper-parameters fitted to noise-free readings the error at 112 points was 0.21-0.98 (seeds
117-122) against 0.90-1.31 with the noise; the posterior mean passes 0.77-0.99 of the noise's
rms through (the raster's bilinear interpolation passes sqrt(4/9) = 0.67 of it, from 4 times
the points). So reaching the raster's error with 25% of its points is close to what kriging
these maps at this noise allows. A fill-distance term ``lam (h / a)**2`` added to the kriged
outputs' score (``h``, ``a`` as in :mod:`models.mapping`) gave sums of 1848 / 1776 / 1912 / 1928
with ``lam`` 0.1 / 0.25 / 0.5 / 1 against 1904 on seeds 117-132, and 1792 against 1832 with 0.25
on 133-148, with per-seed differences of up to 48 points either way: not adopted. Refitting more often
(``refit_growth`` 1.2) gave sums of 1744 / 1848 / 2072 against 1904 / 1832 / 2056 on seeds 117-132 / 133-148 / 101-116: no gain.
Nor did choosing by integrated variance reduction (``acquisition: ivr``; measured 2026-12-06):
on seeds 117-132 1824 (shortlist 24) and 1792 (96) against 1904 on the smooth maps, but
1800 / 1808 against 1808 on 133-148 and 2048 / 2064 against 2008 on 101-116; on the
discontinuous maps (117-132) 2408 / 2784 against 2408, since its variance reduction is the
kriging posterior's, not the triangulated map's error (without the gradient factor: 1896 / 2424).

It stops when the map is known well enough (the weighted mean of ``sd / prior sd`` over the
grid falls below ``target_sd``) or after ``max_points`` measurements. Everything it learns goes
to its zarr store as it happens, so :meth:`MappingAgent.resume` continues a killed session:
observations, decisions, failures and the kriging hyper-parameters come back, and positions
asked for but never measured are asked for again, with the same keys, first.

Failures are named and survived: a frame that fails reduction (NaN, negative, no peak), or whose
file is missing, is reported by run uid and seq_num and re-measured up to ``max_retries``; a frame
not yet written to its file is read again on every document told and every ``ask`` (its position
is not asked again meanwhile) for up to ``external_wait_s``, and once more at its run's stop,
before it counts as a failed reading; a position the stage
never reaches (a refused move ends the run) is asked again up to ``max_retries`` times, then
given up; a position the gate rejects is closed at once. Each leaves a row in ``outcomes``.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
from pydantic import Field, model_validator
from scipy.stats import qmc

from agents.config import _Strict, load_settings
from agents.errors import ObservationError
from agents.plans import POINT_KEY
from agents.protocol import PlanRequest
from agents.runs import stream_router
from agents.steering import StoredAgent
from agents.store import AgentStore
from models.errors import ModelError
from models.kriging import KrigingConfig, MappingGP
from models.mapping import MapAcquisitionConfig, order_path, path_length, select_batch
from models.saxs2d import DetectorGeometry, ReductionError, reduce_frame
from streams.derived import DerivedRunWriter
from streams.external import ExternalData, ExternalDataError
from streams.protocols import DocumentSink

__all__ = ["MappingAgent", "MappingSettings"]

logger = logging.getLogger(__name__)


class _NotWritten(ObservationError):
    """The event's frame is in a file that does not hold it yet."""


class GeometrySettings(_Strict):
    """The SAXS detector's geometry, for frame reduction."""

    n_pixels: int = Field(default=64, ge=8)
    q_max: float = Field(default=0.08, gt=0)


class MappingSettings(_Strict):
    """Settings of :class:`MappingAgent` (see its module docs for each)."""

    name: str = "mapping"
    axes: tuple[str, str] = ("stage_x", "stage_y")
    extent: tuple[float, float, float, float]
    grid: tuple[int, int] = (50, 50)
    reduction: Literal["saxs_ring", "none"] = "saxs_ring"
    quantities: list[str] = Field(default_factory=lambda: ["peak_q", "intensity", "order_x", "order_y"], min_length=1)
    sigma_keys: dict[str, str] = Field(default_factory=dict)
    weights: list[float] | None = None
    frame_key: str = "stage_saxs_counts"
    exposure_key: str = "stage_saxs_exposure"  # in the events, or in the descriptor's configuration
    # where the detector's files are mounted here ({"/nsls2/data": "/mnt/data"}), for frames in files
    root_map: dict[str, str] = Field(default_factory=dict)
    # a frame whose file is not written yet is waited for this long (then its position is measured again)
    external_wait_s: float = Field(default=30.0, ge=0)
    stream: str = "primary"
    geometry: GeometrySettings = Field(default_factory=GeometrySettings)
    n_initial: int = Field(default=8, ge=4)
    acquisition: Literal["variance", "gradient_variance", "ucb", "ivr"] = "gradient_variance"
    gradient_weight: float = Field(default=2.0, ge=0)
    travel_weight: float = Field(default=2.0, ge=0)
    ucb_beta: float = Field(default=2.0, ge=0)
    ucb_output: int = Field(default=0, ge=0)
    kernel: Literal["matern52", "matern32", "rbf"] = "matern52"
    anisotropic: bool = True
    nonstationary: bool = False
    multiscale: bool = True
    refit_growth: float = Field(default=1.5, gt=1)
    calibration_level: float | None = Field(default=0.9, ge=0.5, lt=1)
    reconstruction: Literal["auto", "kriging", "triangulation"] = "auto"
    domains: bool = True
    interpolation_weight: float = Field(default=4.8, ge=0)
    background_refit: bool = True
    exact_limit: int | None = Field(default=4000, ge=4)
    inducing_points: int = Field(default=1024, ge=16)
    max_points: int = Field(default=400, ge=1)
    target_sd: float | None = Field(default=None, gt=0, lt=1)
    max_retries: int = Field(default=3, ge=0)
    max_step: float | None = Field(default=None, gt=0)
    seed: int = 0

    @model_validator(mode="after")
    def _consistent(self) -> MappingSettings:
        x0, x1, y0, y1 = self.extent
        if not (x0 < x1 and y0 < y1):
            raise ValueError(f"extent must be (x0, x1, y0, y1) with x0 < x1 and y0 < y1, got {self.extent}")
        if min(self.grid) < 2:
            raise ValueError(f"grid must be at least 2 x 2 positions, got {self.grid}")
        if self.weights is not None and len(self.weights) != len(self.quantities):
            raise ValueError(f"weights {self.weights} need one number per quantity {self.quantities}")
        if self.acquisition == "ucb" and self.ucb_output >= len(self.quantities):
            raise ValueError(f"ucb_output={self.ucb_output} but there are {len(self.quantities)} quantities")
        if len(set(self.axes)) != 2:
            raise ValueError(f"axes must name two different axes, got {self.axes}")
        return self

    def kriging(self) -> KrigingConfig:
        return KrigingConfig(kernel=self.kernel, anisotropic=self.anisotropic, nonstationary=self.nonstationary,
                             multiscale=self.multiscale, refit_growth=self.refit_growth,
                             calibration_level=self.calibration_level, background=self.background_refit,
                             reconstruction=self.reconstruction, domains=self.domains,
                             exact_limit=self.exact_limit,
                             inducing_points=self.inducing_points)

    def acquisition_config(self) -> MapAcquisitionConfig:
        return MapAcquisitionConfig(
            kind=self.acquisition, weights=None if self.weights is None else tuple(self.weights),
            gradient_weight=self.gradient_weight, travel_weight=self.travel_weight,
            ucb_beta=self.ucb_beta, ucb_output=self.ucb_output,
            interpolation_weight=self.interpolation_weight)


def _tables(settings: MappingSettings) -> dict[str, dict[str, Any]]:
    obs: dict[str, Any] = {"x": "f8", "y": "f8"}
    for q in settings.quantities:
        obs[q] = "f8"
        obs[f"{q}_sigma"] = "f8"
    obs.update({"time": "f8", "point_key": str, "event_uid": str})
    return {
        "observations": obs,
        "decisions": {"point_key": str, "request_key": str, "x": "f8", "y": "f8", "why": str, "time": "f8"},
        "outcomes": {"point_key": str, "outcome": str, "reason": str},  # error / retry / rejected / failed
    }


class MappingAgent(StoredAgent):
    """Maps quantities over a sample by kriging, choosing batches of stage positions.

    Parameters
    ----------
    settings
        A :class:`MappingSettings` (or a dict / YAML path validated into one).
    store
        Directory of its zarr store (created if absent).
    sinks
        Where derived runs go: one event per reduced frame (position, quantities, sigmas).
    """

    settings_class = MappingSettings

    def __init__(
        self,
        settings: MappingSettings | dict | str | Path,
        store: str | Path,
        *,
        sinks: Sequence[DocumentSink] = (),
        _create: bool = True,
    ) -> None:
        self.settings = s = load_settings(MappingSettings, settings)
        self.name = s.name
        self.sinks = list(sinks)
        self.store = AgentStore.for_agent(store, type(self).__name__, _tables(s), s, create=_create)
        x0, x1, y0, y1 = s.extent
        nx, ny = s.grid
        gx, gy = np.linspace(x0, x1, nx), np.linspace(y0, y1, ny)
        self.candidates = np.stack(np.meshgrid(gx, gy), -1).reshape(-1, 2)  # row-major (iy, ix)
        self.grid_shape = (ny, nx)
        self.geometry = DetectorGeometry(n_pixels=s.geometry.n_pixels, q_max=s.geometry.q_max)
        self.acq = s.acquisition_config()
        self.errors: list[str] = []
        self.duplicates = 0
        self.stop_reason: str | None = None
        self.latencies: list[float] = []
        self._gp: MappingGP | None = None
        self.external = ExternalData(s.root_map)  # frames in files: resource / datum, stream documents
        # positions measured whose frame is not in its file yet: key -> (run uid, event, since)
        self._waiting: dict[str, tuple[str, dict, float]] = {}
        self._last_retry = 0.0
        self._router = stream_router(s.stream, self._observe_event,
                                     lambda _uid, stop: self._close_derived(stop.get("exit_status", "success")),
                                     on_start=self._open_derived, agent=self.name,
                                     asked=lambda key: key in self._decisions["request_key"])
        self._derived: DerivedRunWriter | None = None
        self._stage_at: np.ndarray | None = None  # where the stage was read to be, before any measurement
        self._load()

    # -- state --------------------------------------------------------------------------------
    def _load(self) -> None:
        self._obs = {k: list(v) for k, v in self.store.read("observations").items()}
        self._done = set(self._obs["point_key"])
        self._event_uids = set(self._obs["event_uid"])
        self._decisions = {k: list(v) for k, v in self.store.read("decisions").items()}
        out = self.store.read("outcomes")
        self._closed: set[str] = set()
        self._tries: dict[str, int] = {}  # failed readings per position
        self._reasks: dict[str, int] = {}  # requests repeated per position
        for key, outcome in zip(out["point_key"], out["outcome"], strict=True):
            if outcome == "error":
                self._tries[key] = self._tries.get(key, 0) + 1
            elif outcome == "retry":
                self._reasks[key] = self._reasks.get(key, 0) + 1
            else:
                self._closed.add(key)
        self._fed = 0  # observations already in the GP

    @property
    def n_observations(self) -> int:
        return len(self._obs["x"])

    def pending(self) -> list[int]:
        """Indices (into decisions) of positions asked for, not yet measured, not given up (a
        position measured whose frame is not yet written to its file is not pending)."""
        return [i for i, k in enumerate(self._decisions["point_key"])
                if k not in self._done and k not in self._closed and k not in self._waiting]

    @property
    def gp(self) -> MappingGP:
        """The kriging model, built on first use and fed every observation so far."""
        if self._gp is None:
            s = self.settings
            x0, x1, y0, y1 = s.extent
            self._gp = MappingGP([[x0, y0], [x1, y1]], self.candidates, len(s.quantities), s.kriging(), seed=s.seed)
            state = self.store.get_attr("model_state")
            if state:
                self._gp.load_state(state)
        n = self.n_observations
        if self._fed < n:
            sl = slice(self._fed, n)
            X = np.column_stack([self._obs["x"][sl], self._obs["y"][sl]])
            Y = np.column_stack([self._obs[q][sl] for q in self.settings.quantities])
            V = np.column_stack([np.square(self._obs[f"{q}_sigma"][sl]) for q in self.settings.quantities])
            self._gp.add(X, Y, V if np.all(np.isfinite(V)) else None)
            self._fed = n
        return self._gp

    # -- tell ---------------------------------------------------------------------------------
    def tell(self, name: str, doc: dict[str, Any]) -> None:
        if name != "stop":  # a stopped run's documents are forgotten after its last event
            self._tell_external(name, doc)
        self._retry_waiting()
        if name == "stop":  # its files are complete now: a last read of what still waits
            self._retry_waiting(doc.get("run_start"), final=True)
        self._router(name, doc)
        if name == "stop":
            self._tell_external(name, doc)

    def _retry_waiting(self, run_uid: str | None = None, *, final: bool = False) -> None:
        """Read again the frames that were not yet written to their files (those of ``run_uid``;
        at most every 0.2 s unless ``final``, so a long wait does not slow every document)."""
        if not self._waiting or (not final and time.monotonic() - self._last_retry < 0.2):
            return
        self._last_retry = time.monotonic()
        for run, event, _ in [w for w in self._waiting.values() if run_uid is None or w[0] == run_uid]:
            self._observe_event(run, event, final=final)

    def _tell_external(self, name: str, doc: dict[str, Any]) -> None:
        try:
            self.external.tell(name, doc)
        except ExternalDataError as err:  # a malformed stream_datum: its frames are reported when read
            self.errors.append(f"{name} {doc.get('uid')}: {err}")
            logger.warning("%s %s: %s", name, doc.get("uid"), err)

    def _observe_event(self, run_uid: str, event: dict, *, final: bool = False) -> None:
        key = str(event["data"].get(POINT_KEY, "")) or f"event:{event['uid']}"
        if key in self._done or event["uid"] in self._event_uids:
            self.duplicates += 1
            return
        try:
            row = self._parse(run_uid, event, key)
        except _NotWritten as err:
            since = self._waiting[key][2] if key in self._waiting else time.monotonic()
            waited = time.monotonic() - since
            if not final and waited < self.settings.external_wait_s:
                if key not in self._waiting:
                    logger.warning("%s; waiting up to external_wait_s=%g s", err, self.settings.external_wait_s)
                self._waiting[key] = (run_uid, event, since)
                return
            self._waiting.pop(key, None)
            self._failed_reading(key, ObservationError(f"{err} (waited {waited:.1f} s); the position will be "
                                                       "measured again"))
            return
        except ObservationError as err:
            self._waiting.pop(key, None)
            self._failed_reading(key, err)
            return
        self._waiting.pop(key, None)
        self.store.append("observations", row)  # persisted first, then mirrored in memory
        for column, values in row.items():
            self._obs[column].extend(values)
        self._done.add(key)
        self._event_uids.add(event["uid"])
        self._publish(row, event)

    def _parse(self, run_uid: str, event: dict, key: str) -> dict[str, list]:
        s, data = self.settings, event["data"]
        where = f"run {run_uid}, event seq_num {event.get('seq_num')}"
        missing = [a for a in s.axes if a not in data]
        if missing:
            raise ObservationError(f"{where}: no position keys {missing}; set axes in the settings to the stage's names")
        x, y = (float(data[a]) for a in s.axes)
        if not (np.isfinite(x) and np.isfinite(y)):
            raise ObservationError(f"{where}: stage position ({x}, {y}) is not finite")
        if s.reduction == "saxs_ring":
            exposure = data.get(s.exposure_key, self.external.configuration(event["descriptor"], s.exposure_key))
            if exposure is None:
                raise ObservationError(f"{where}: no exposure {s.exposure_key!r} in the event or its descriptor's "
                                       "configuration; set exposure_key to the detector's data key")
            try:
                frame = self.external.value(event, s.frame_key)
            except ExternalDataError as err:
                if err.retry:
                    raise _NotWritten(f"{where}: frame {s.frame_key!r}: {err}") from None
                hint = ("set frame_key to the detector's data key" if err.cause == "missing_key"
                        else "the position will be measured again")
                raise ObservationError(f"{where}: frame {s.frame_key!r}: {err}; {hint}") from None
            frame, exposure = np.asarray(frame), float(exposure)
            while frame.ndim > 2 and frame.shape[0] == 1:  # area detectors often add a leading axis of 1
                frame = frame[0]
            if frame.ndim == 3:  # several images a point (each of the exposure): counted together
                frame, exposure = frame.sum(axis=0), exposure * frame.shape[0]
            try:
                reduced = reduce_frame(frame, exposure, self.geometry)
            except ReductionError as err:
                raise ObservationError(f"{where}: frame at ({x:g}, {y:g}) failed reduction: {err}; "
                                       "the position will be measured again") from None
            values, sigmas = reduced.values, reduced.sigmas
        else:
            values = {q: data.get(q) for q in s.quantities}
            sigmas = {q: data.get(s.sigma_keys[q], np.nan) if q in s.sigma_keys else np.nan for q in s.quantities}
        row: dict[str, list] = {"x": [x], "y": [y]}
        for q in s.quantities:
            v, sg = values.get(q), sigmas.get(q, np.nan)
            if v is None:
                raise ObservationError(f"{where}: no quantity {q!r} (known: {sorted(values)}); check quantities")
            v, sg = float(v), float(sg)
            if not np.isfinite(v) or (np.isfinite(sg) and sg < 0):
                raise ObservationError(f"{where}: {q} = {v!r} (sigma {sg!r}) is not a finite reading; "
                                       "the position will be measured again")
            row[q], row[f"{q}_sigma"] = [v], [sg]
        row.update({"time": [float(event["time"])], "point_key": [key], "event_uid": [event["uid"]]})
        return row

    def _close(self, key: str, outcome: str, reason: str) -> None:
        self._closed.add(key)
        self.store.append("outcomes", {"point_key": [key], "outcome": [outcome], "reason": [reason]})
        self.errors.append(f"position {key}: {reason}")
        logger.warning("position %s %s: %s", key, outcome, reason)

    def rejected(self, request: PlanRequest, reason: str) -> None:
        """The safety gate refused ``request``: its positions are closed, not retried."""
        for key in request.kwargs.get("point_keys", ()):
            self._close(key, "rejected", reason)

    # -- ask ----------------------------------------------------------------------------------
    def ask(self, n: int) -> list[PlanRequest]:
        if n < 1:
            raise ValueError(f"ask(n) needs n >= 1, got {n=}")
        t0 = time.perf_counter()
        self._retry_waiting()
        pending = self.pending()
        if pending:
            keys = [self._decisions["point_key"][i] for i in self._reachable(pending)[:n]]
            for key in keys:  # asked again; a failed reading explains one repeat, else count it
                self._reasks[key] = self._reasks.get(key, 0) + 1
                unexplained = self._reasks[key] - self._tries.get(key, 0)
                if unexplained > self.settings.max_retries:
                    self._close(key, "failed", f"never measured after {unexplained} requests "
                                "(did the stage refuse the move, or the run end before it?)")
                else:
                    self.store.append("outcomes", {"point_key": [key], "outcome": ["retry"],
                                                   "reason": ["asked again: not measured after its request"]})
            keys = [k for k in keys if k not in self._closed]
            if keys:
                return [self._request(keys)]
        chosen, why = self._decide(n)
        if not chosen:
            return []
        request_key = uuid.uuid4().hex
        keys = [f"{request_key}:{i}" for i in range(len(chosen))]
        pts = self.candidates[chosen]
        rows = {"point_key": keys, "request_key": [request_key] * len(keys), "x": pts[:, 0].tolist(),
                "y": pts[:, 1].tolist(), "why": [why] * len(keys), "time": [time.time()] * len(keys)}
        self.store.append("decisions", rows)
        for column, values in rows.items():
            self._decisions[column].extend(values)
        if self._gp is not None and self._gp.ready:
            self.store.set_attr("model_state", self._gp.state())
        self.latencies.append(time.perf_counter() - t0)
        return [self._request(keys, request_key=request_key)]

    def _reachable(self, pending: list[int]) -> list[int]:
        """The pending positions in the order the stage can visit them, each within ``max_step`` of
        the one before (nearest first, from where the stage is); the others wait until it is nearer."""
        xy = {i: np.array([self._decisions["x"][i], self._decisions["y"][i]]) for i in pending}
        here, left, path = self._position(), list(pending), []
        while left:
            if here is None:
                j = left[0]
            else:
                dist = [float(np.abs(xy[i] - here).max()) for i in left]
                j = left[int(np.argmin(dist))]
                if self.settings.max_step is not None and min(dist) > self.settings.max_step:
                    break
            path.append(j)
            left.remove(j)
            here = xy[j]
        return path

    def _decide(self, n: int) -> tuple[list[int], str]:
        s = self.settings
        asked = len(self._decisions["point_key"]) - len(self._closed - self._done)
        room = s.max_points - asked
        if room <= 0:
            self.stop_reason = f"measured {self.n_observations} positions: max_points={s.max_points} reached"
            return [], ""
        n = min(n, room)
        taken = self._taken()
        if self.n_observations < s.n_initial or not self._model_ready():
            # the initial design: a scrambled Halton set, snapped to the grid; more of it when
            # some of its positions failed, until enough are measured to build the model
            need = min(n, max(s.n_initial - self.n_observations, 1))
            # a long stretch of the sequence, so that enough of it lies within max_step of the stage
            halton = qmc.Halton(2, seed=s.seed).random(len(self._decisions["point_key"]) + need + s.n_initial + 256)
            x0, x1, y0, y1 = s.extent
            pts = np.column_stack([x0 + halton[:, 0] * (x1 - x0), y0 + halton[:, 1] * (y1 - y0)])
            idx = [int(np.argmin(np.linalg.norm(self.candidates - p, axis=1))) for p in pts]
            idx = [i for i in dict.fromkeys(idx) if i not in taken]
            here = self._position()
            chosen: list[int] = []
            for i in idx:  # in Halton order, each within max_step of the one before
                p = self.candidates[i]
                if s.max_step is None or here is None or np.abs(p - here).max() <= s.max_step:
                    chosen.append(i)
                    here = p
                if len(chosen) == need:
                    break
            if not chosen:
                self.stop_reason = (f"no position of the initial design is within max_step={s.max_step} of the "
                                    f"stage at {self._position()}; widen max_step or move the stage into the extent")
                return [], ""
            if s.max_step is None:
                order = order_path(self.candidates[chosen], self._position())
                chosen = [chosen[i] for i in order]
            return chosen, "initial"
        gp = self.gp
        if s.target_sd is not None:
            _, var = gp.posterior()
            w = np.ones(var.shape[1]) if s.weights is None else np.asarray(s.weights)
            score = float((np.sqrt(var / gp.prior_variance()).mean(0) @ w) / w.sum())
            if score < s.target_sd:
                self.stop_reason = (f"converged: mean posterior sd / prior sd = {score:.3f} < "
                                    f"target_sd={s.target_sd} after {self.n_observations} positions")
                return [], ""
        position = self._position()
        chosen = select_batch(gp, self.acq, n, position=position, grid_shape=self.grid_shape,
                              exclude=sorted(taken), max_step=s.max_step)
        if not chosen:
            self.stop_reason = "every candidate position has been measured or given up"
        return chosen, s.acquisition

    def _model_ready(self) -> bool:
        try:
            return self.gp.ready
        except ModelError:
            return False

    def _taken(self) -> set[int]:
        """Candidate indices measured, pending or given up (never chosen twice)."""
        d = self._decisions
        if not d["x"]:
            return set()
        pts = np.column_stack([d["x"], d["y"]])
        nx, ny = self.settings.grid[0], self.settings.grid[1]
        x0, x1, y0, y1 = self.settings.extent
        ix = np.rint((pts[:, 0] - x0) / (x1 - x0) * (nx - 1)).astype(int)
        iy = np.rint((pts[:, 1] - y0) / (y1 - y0) * (ny - 1)).astype(int)
        return set((iy * nx + ix).tolist())

    def observe_positions(self, positions: Mapping[str, float]) -> None:
        """Where the stage is now (read by :func:`~agents.plans.steered_scan` before the first
        request): the initial design starts from here, within ``max_step``."""
        ax, ay = self.settings.axes
        if ax in positions and ay in positions:
            self._stage_at = np.array([float(positions[ax]), float(positions[ay])])

    def _position(self) -> np.ndarray | None:
        """Where the stage is: the last measured position, else where it was read to be."""
        if not self._obs["x"]:
            return self._stage_at
        return np.array([self._obs["x"][-1], self._obs["y"][-1]])

    def _request(self, point_keys: list[str], *, request_key: str | None = None) -> PlanRequest:
        index = {k: i for i, k in enumerate(self._decisions["point_key"])}
        ax, ay = self.settings.axes
        points = [{ax: float(self._decisions["x"][index[k]]), ay: float(self._decisions["y"][index[k]])}
                  for k in point_keys]
        key = request_key or f"{self._decisions['request_key'][index[point_keys[0]]]}:retry{self.n_observations}"
        return PlanRequest("measure", kwargs={"points": points, "point_keys": point_keys}, key=key, agent=self.name)

    # -- derived documents --------------------------------------------------------------------
    def _open_derived(self, start: dict) -> None:
        if not self.sinks:
            return
        self._close_derived("success")
        writer = DerivedRunWriter(self.sinks, raw_run_uid=start["uid"],
                                  metadata={"agent": self.name, "analysis": "mapping-reduction"})
        number = {"dtype": "number", "shape": [], "source": self.name}
        keys = {"x": number, "y": number, "raw_seq_num": {"dtype": "integer", "shape": [], "source": self.name}}
        for q in self.settings.quantities:
            keys[q] = number
            keys[f"{q}_sigma"] = number
        writer.add_stream("map", keys)
        self._derived = writer

    def _publish(self, row: dict[str, list], event: dict) -> None:
        if self._derived is None:
            return
        data: dict[str, Any] = {"x": row["x"][0], "y": row["y"][0], "raw_seq_num": int(event.get("seq_num", 0))}
        for q in self.settings.quantities:
            sg = row[f"{q}_sigma"][0]
            data[q], data[f"{q}_sigma"] = row[q][0], sg if np.isfinite(sg) else -1.0
        self._derived.emit("map", data)

    # -- report -------------------------------------------------------------------------------
    def path(self) -> np.ndarray:
        """Measured positions in the order measured, ``n x 2``."""
        return np.column_stack([self._obs["x"], self._obs["y"]]) if self._obs["x"] else np.empty((0, 2))

    def report(self) -> dict[str, Any]:
        why = self._decisions["why"]
        lat = np.asarray(self.latencies)
        gp = self._gp
        return {
            "agent": self.name, "kind": type(self).__name__, "n_observations": self.n_observations,
            "decisions": {w: why.count(w) for w in sorted(set(why))}, "pending": len(self.pending()),
            "travel": path_length(self.path()), "stop_reason": self.stop_reason,
            "errors": list(self.errors), "duplicates_ignored": self.duplicates,
            "frames_waiting_for_data": len(self._waiting),
            "decision_latency_ms": None if lat.size == 0 else {
                "p50": float(1e3 * np.median(lat)), "p95": float(1e3 * np.percentile(lat, 95))},
            "kriging": None if gp is None or not gp.ready else {
                "n_fits": gp.n_fits, "posterior": gp.posterior_model,
                # numerical failures the model recovered from (logged as warnings when they happened)
                "failed_refits": gp.n_failed_refits, "failed_updates": gp.n_failed_updates,
                "reconstruction": dict(zip(self.settings.quantities, gp.reconstruction, strict=True)),
                # how the last drawn map (a report's, a demo's) drew each quantity
                "drawn": None if gp.drawn is None else dict(zip(self.settings.quantities, gp.drawn, strict=True)),
                "hyperparameters": gp.hyperparameters()},
        }

    def close(self) -> None:
        """Stop the kriging model's background worker."""
        if self._gp is not None:
            self._gp.close()

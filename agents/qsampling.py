"""``QSamplingAgent``: decides which Q to measure next, and for how long, to characterise a sample.

The agent is told the run's documents; each event of the configured stream that carries Q,
counts and exposure becomes an observation. Asked for ``n`` points, it returns one ``measure``
request with up to ``n`` points chosen by :class:`agents.qpolicy.QPolicy`, or nothing once the
fit reaches its target precision or a budget is spent.

Everything it learns goes to its zarr store as it happens: each observation on ``tell``, each
decision before ``ask`` returns it, the fit and GP state after each decision. A point asked for
but never seen measured (an aborted or killed run, a dropped reading) stays pending and is asked
for again, with the same key, before anything new; a point that keeps failing is given up after
``max_retries`` tries and reported. Observations are de-duplicated by point key and event uid,
so replaying a run into the agent does not count a measurement twice.
"""

from __future__ import annotations

import json
import logging
import time
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from agents.config import QSamplingSettings, load_settings
from agents.errors import AgentError, ObservationError
from agents.plans import POINT_KEY
from agents.protocol import PlanRequest
from agents.qpolicy import QPolicy
from agents.runs import stream_router
from agents.steering import StoredAgent
from agents.store import AgentStore
from models.sasfit import FitResult
from streams.derived import DerivedRunWriter
from streams.protocols import DocumentSink

__all__ = ["ObservationError", "QSamplingAgent"]

logger = logging.getLogger(__name__)

OBSERVATIONS = {"q": "f8", "counts": "f8", "exposure": "f8", "time": "f8", "point_key": str, "event_uid": str}
DECISIONS = {"point_key": str, "request_key": str, "q": "f8", "exposure": "f8", "why": str, "time": "f8"}
OUTCOMES = {"point_key": str, "outcome": str, "reason": str}  # rejected / failed / error
FITS = {"n_observations": "f8", "exposure": "f8", "reduced_deviance": "f8",
        "values": str, "sigmas": str, "relative_sigma": str}  # JSON objects keyed by parameter
TABLES = {"observations": OBSERVATIONS, "decisions": DECISIONS, "outcomes": OUTCOMES, "fits": FITS}


class QSamplingAgent(StoredAgent):
    """Steers a Q-scan until the sample's size parameters are known to the wanted precision.

    Parameters
    ----------
    settings
        A :class:`~agents.config.QSamplingSettings` (or a dict / YAML path validated into one).
    store
        Directory of its zarr store (created if absent).
    sinks
        Where derived runs (fit results, posterior) go, e.g. a :class:`streams.zarr_writer.ZarrRunWriter`.
    """

    settings_class = QSamplingSettings

    def __init__(
        self,
        settings: QSamplingSettings | dict | str | Path,
        store: str | Path,
        *,
        sinks: Sequence[DocumentSink] = (),
        _create: bool = True,
    ) -> None:
        self.settings = settings = load_settings(QSamplingSettings, settings)
        self.name = settings.name
        self.sinks = list(sinks)
        self.store = AgentStore.for_agent(store, type(self).__name__, TABLES, settings, create=_create)
        self.flux, self.dark_rate = settings.flux, settings.dark_rate
        self.policy: QPolicy | None = None
        self.errors: list[str] = []
        self.duplicates = 0
        self.stop_reason: str | None = None
        self._router = stream_router(settings.keys.stream, self._observe_event, self._run_stopped,
                                     on_descriptor=self._configure_from, on_start=self._open_derived,
                                     agent=self.name,
                                     asked=lambda key: key in self._decisions["request_key"])
        self._derived: DerivedRunWriter | None = None
        self._load()

    # -- state --------------------------------------------------------------------------------
    def _load(self) -> None:
        obs = self.store.read("observations")
        self._obs = {k: list(v) for k, v in obs.items()}
        self._done = set(self._obs["point_key"])
        self._event_uids = set(self._obs["event_uid"])
        dec = self.store.read("decisions")
        self._decisions = {k: list(v) for k, v in dec.items()}
        out = self.store.read("outcomes")
        self._closed = {k for k, o in zip(out["point_key"], out["outcome"], strict=True) if o != "error"}
        self._tries: dict[str, int] = {}
        for k, o in zip(out["point_key"], out["outcome"], strict=True):
            if o == "error":
                self._tries[k] = self._tries.get(k, 0) + 1
        state = self.store.get_attr("model_state") or {}
        if state.get("flux") is not None:
            self.flux, self.dark_rate = state["flux"], state["dark_rate"]
        self._saved_gp = state.get("gp")
        fits = self.store.read("fits")["n_observations"]
        self._recorded_fit = int(fits[-1]) if len(fits) else -1

    @property
    def n_observations(self) -> int:
        return len(self._obs["q"])

    @property
    def exposure_total(self) -> float:
        """Seconds of exposure in all observations (the beam time the sample took)."""
        return float(np.sum(self._obs["exposure"]))

    def pending(self) -> list[int]:
        """Indices (into decisions) of points asked for, not yet measured, not given up."""
        return [
            i for i, k in enumerate(self._decisions["point_key"]) if k not in self._done and k not in self._closed
        ]

    # -- tell ---------------------------------------------------------------------------------
    def tell(self, name: str, doc: dict[str, Any]) -> None:
        self._router(name, doc)

    def _configure_from(self, descriptor: dict) -> None:
        keys = self.settings.keys
        found = {}
        for device in descriptor.get("configuration", {}).values():
            for key in (keys.flux, keys.dark_rate):
                if key in device.get("data", {}):
                    found[key] = float(device["data"][key])
        flux = self.settings.flux if self.settings.flux is not None else found.get(keys.flux)
        dark = self.settings.dark_rate if self.settings.dark_rate is not None else found.get(keys.dark_rate)
        if flux is None or dark is None:
            raise AgentError(
                f"descriptor {descriptor['uid']} has no configuration keys {keys.flux!r}/{keys.dark_rate!r} "
                "and the agent's settings give no flux/dark_rate; set them in the settings"
            )
        if self.flux is None:
            self.flux, self.dark_rate = flux, dark
        elif (flux, dark) != (self.flux, self.dark_rate):
            # the fit assumes one flux for all counts; mixing would bias every parameter
            raise AgentError(
                f"descriptor {descriptor['uid']}: flux/dark rate {flux:g}/{dark:g} differ from "
                f"{self.flux:g}/{self.dark_rate:g} of the observations so far; this agent needs them "
                "constant: start a new store for the new conditions"
            )

    def _observe_event(self, run_uid: str, event: dict) -> None:
        try:
            rows = self._parse(run_uid, event)
        except ObservationError as err:
            self._failed_reading(event["data"].get(POINT_KEY, ""), err)
            return
        if rows is not None:
            self._append("observations", rows)
            self._done.update(rows["point_key"])
            self._event_uids.update(rows["event_uid"])

    def _parse(self, run_uid: str, event: dict) -> dict[str, list] | None:
        data, keys = event["data"], self.settings.keys
        where = f"run {run_uid}, event seq_num {event.get('seq_num')}"
        missing = [k for k in (keys.q, keys.counts, keys.exposure) if k not in data]
        if missing:
            raise ObservationError(f"{where}: no data keys {missing}; set keys.* in the settings to this detector's names")
        point_key = str(data.get(POINT_KEY, "")) or f"event:{event['uid']}"
        if point_key in self._done or event["uid"] in self._event_uids:
            self.duplicates += 1
            return None
        q = np.atleast_1d(np.asarray(data[keys.q], dtype=float))
        counts = np.atleast_1d(np.asarray(data[keys.counts], dtype=float))
        t = float(data[keys.exposure])
        if q.shape != counts.shape:
            raise ObservationError(f"{where}: Q shape {q.shape} differs from counts shape {counts.shape}")
        if not np.all(np.isfinite(counts)) or np.any(counts < 0):
            raise ObservationError(f"{where}: counts {counts.tolist()} are NaN or negative (a dropped reading?); the point will be measured again")
        if not (np.isfinite(t) and t > 0):
            raise ObservationError(f"{where}: exposure {t!r} s is not > 0")
        q0, q1 = self.settings.q_range
        if np.any((q < q0) | (q > q1)):
            raise ObservationError(f"{where}: Q {q.tolist()} outside the agent's q_range {self.settings.q_range}")
        n = q.size
        return {
            "q": q.tolist(), "counts": counts.tolist(), "exposure": [t] * n,
            "time": [float(event["time"])] * n, "point_key": [point_key] * n, "event_uid": [event["uid"]] * n,
        }

    def _append(self, table: str, rows: dict[str, list]) -> None:
        """Persist rows first, then mirror them in memory: memory never holds what the store lacks."""
        self.store.append(table, rows)
        mirror = self._obs if table == "observations" else self._decisions
        for column, values in rows.items():
            mirror[column].extend(values)

    def _close(self, key: str, outcome: str, reason: str) -> None:
        self._closed.add(key)
        self.store.append("outcomes", {"point_key": [key], "outcome": [outcome], "reason": [reason]})
        self.errors.append(f"point {key}: {reason}")

    def rejected(self, request: PlanRequest, reason: str) -> None:
        """The safety gate refused ``request``: its points are closed, not retried."""
        for key in request.kwargs.get("point_keys", ()):
            self._close(key, "rejected", reason)

    # -- ask ----------------------------------------------------------------------------------
    def ask(self, n: int) -> list[PlanRequest]:
        if n < 1:
            raise ValueError(f"ask(n) needs n >= 1, got {n=}")
        pending = self.pending()
        if pending:
            return [self._request([self._decisions["point_key"][i] for i in pending[:n]])]
        why = self._decisions["why"]
        decision = QPolicy.survey(self.settings, why.count("survey"), n)
        if not decision.q:
            if self.flux is None:
                raise AgentError(
                    "the survey is measured but no descriptor carried the instrument's flux and dark rate; "
                    f"check that the detector's configuration has {self.settings.keys.flux!r} or set flux/dark_rate"
                )
            decision = self.decision_policy().decide(
                np.asarray(self._obs["q"]), np.asarray(self._obs["counts"]), np.asarray(self._obs["exposure"]),
                n, sum(w not in ("design", "survey", "discriminate") for w in why),
            )
            self._record_fit()
        if decision.stop_reason is not None:
            self.stop_reason = decision.stop_reason
            return []
        request_key = uuid.uuid4().hex
        keys = [f"{request_key}:{i}" for i in range(len(decision.q))]
        self._append("decisions", {
            "point_key": keys, "request_key": [request_key] * len(keys), "q": list(decision.q),
            "exposure": list(decision.exposure), "why": list(decision.why), "time": [time.time()] * len(keys),
        })
        return [self._request(keys, request_key=request_key)]

    def _request(self, point_keys: list[str], *, request_key: str | None = None) -> PlanRequest:
        index = {k: i for i, k in enumerate(self._decisions["point_key"])}
        rows = [index[k] for k in point_keys]
        points = [{"q": float(self._decisions["q"][i]), "exposure": float(self._decisions["exposure"][i])} for i in rows]
        key = request_key or f"{self._decisions['request_key'][rows[0]]}:retry{len(self._obs['q'])}"
        return PlanRequest("measure", kwargs={"points": points, "point_keys": point_keys}, key=key, agent=self.name)

    def decision_policy(self) -> QPolicy:
        """The numerics behind decisions (built on first use with the instrument's constants)."""
        if self.policy is None:
            self.policy = QPolicy(self.settings, self.flux, self.dark_rate)
            if self._saved_gp:
                self.policy.gp.load_state(self._saved_gp)
        return self.policy

    def _record_fit(self) -> None:
        """After a decision: if a new fit was made, add it to the ``fits`` table, store the
        model state (fit, GP hyper-parameters) and publish it as a derived event."""
        policy = self.decision_policy()
        result = policy.fit.result
        if result is None or policy.fit.n_obs == self._recorded_fit:
            return
        self._recorded_fit = policy.fit.n_obs
        rel = policy.precision(result)
        self.store.append("fits", {
            "n_observations": [policy.fit.n_obs], "exposure": [policy.fit.exposure],
            "reduced_deviance": [result.reduced_deviance],
            "values": [json.dumps(dict(result.values))], "sigmas": [json.dumps(dict(result.sigmas))],
            "relative_sigma": [json.dumps(rel)],
        })
        self.store.set_attr("model_state", {"flux": self.flux, "dark_rate": self.dark_rate, "gp": policy.gp.state()})
        self._publish_fit(result)

    def fit_history(self) -> list[dict[str, Any]]:
        """Every fit made so far: observations, exposure, values, sigmas, relative sigmas."""
        rows = self.store.read("fits")
        return [
            {"n_observations": int(n), "exposure": float(t), "reduced_deviance": float(d),
             "values": json.loads(v), "sigmas": json.loads(sg), "relative_sigma": json.loads(r)}
            for n, t, d, v, sg, r in zip(rows["n_observations"], rows["exposure"], rows["reduced_deviance"],
                                         rows["values"], rows["sigmas"], rows["relative_sigma"], strict=True)
        ]

    # -- derived documents --------------------------------------------------------------------
    def _open_derived(self, start: dict) -> None:
        if not self.sinks:
            return
        self._close_derived("success")
        writer = DerivedRunWriter(self.sinks, raw_run_uid=start["uid"], metadata={"agent": self.name, "analysis": "qsampling-fit"})
        names = list(self.settings.fit.fit_params)
        keys = {f"{p}{suffix}": {"dtype": "number", "shape": [], "source": self.name} for p in names for suffix in ("", "_sigma")}
        keys.update({k: {"dtype": "number", "shape": [], "source": self.name}
                     for k in ("n_observations", "exposure_total", "reduced_deviance")})
        writer.add_stream("fit", keys)
        self._derived = writer

    def _publish_fit(self, result: FitResult) -> None:
        if self._derived is None:
            return
        data = {k: float(v) for k, v in result.values.items()}
        data.update({f"{k}_sigma": float(v) if np.isfinite(v) else -1.0 for k, v in result.sigmas.items()})
        data.update({"n_observations": self.n_observations, "exposure_total": self.exposure_total,
                     "reduced_deviance": float(result.reduced_deviance)})
        self._derived.emit("fit", data)

    def _run_stopped(self, run_uid: str, stop: dict) -> None:
        self._close_derived(stop.get("exit_status", "success"))

    # -- report -------------------------------------------------------------------------------
    def report(self) -> dict[str, Any]:
        result = self.policy.fit.result if self.policy else None
        fit = None
        if result is not None:
            fit = {
                "values": dict(result.values), "sigmas": {k: float(v) for k, v in result.sigmas.items()},
                "relative_sigma": self.policy.precision(result), "reduced_deviance": result.reduced_deviance,
            }
        why = self._decisions["why"]
        return {
            "agent": self.name, "kind": type(self).__name__, "n_observations": self.n_observations,
            "n_distinct_q": len(set(self._obs["q"])), "exposure_total_s": self.exposure_total,
            "decisions": {w: why.count(w) for w in sorted(set(why))}, "pending": len(self.pending()),
            "fit": fit, "stop_reason": self.stop_reason, "errors": list(self.errors),
            "duplicates_ignored": self.duplicates,
        }

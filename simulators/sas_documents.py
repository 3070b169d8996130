"""Raw SAS runs as event-model documents, fast: for stream tests, fault drills and the benchmark.

The documents are what :class:`~simulators.sas.SimSASInstrument` measured through a RunEngine
would produce (same data keys: ``sas_q``, ``sas_counts``, ``sas_exposure``; flux and dark rate in
the descriptor's configuration), composed directly with event-model so that thousands per second
can be made without a RunEngine in the way. Each document's ``time`` is the moment it is made,
so a consumer can measure end-to-end latency from it.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import event_model
import numpy as np

__all__ = ["sas_run_documents"]

_KEYS = {
    "sas_q": {"dtype": "number", "shape": [], "source": "SIM:sas_q", "units": "1/angstrom"},
    "sas_counts": {"dtype": "number", "shape": [], "source": "SIM:sas_counts"},
    "sas_exposure": {"dtype": "number", "shape": [], "source": "SIM:sas_exposure", "units": "s"},
}


def sas_run_documents(
    n_events: int,
    *,
    seed: int = 0,
    q_range: tuple[float, float] = (0.003, 0.5),
    flux: float = 100.0,
    dark_rate: float = 0.5,
    md: dict[str, Any] | None = None,
) -> Iterator[tuple[str, dict[str, Any]]]:
    """Yield start, descriptor, ``n_events`` events and stop of one run; validated by event-model.

    Counts are Poisson draws of a Guinier-like I(Q) so rates are plausible; the exposure cycles
    through 0.1–1 s. ``md`` goes into the start document.
    """
    if n_events < 0:
        raise ValueError(f"n_events={n_events} must be >= 0")
    rng = np.random.default_rng(seed)
    run = event_model.compose_run(metadata={"plan_name": "measure", "sample_kind": "synthetic", **(md or {})})
    yield "start", dict(run.start_doc)
    config = {"sas": {"data": {"sas_flux": flux, "sas_dark_rate": dark_rate},
                      "timestamps": {"sas_flux": time.time(), "sas_dark_rate": time.time()},
                      "data_keys": {"sas_flux": {"dtype": "number", "shape": [], "source": "SIM:flux"},
                                    "sas_dark_rate": {"dtype": "number", "shape": [], "source": "SIM:dark"}}}}
    desc = run.compose_descriptor(name="primary", data_keys=_KEYS, configuration=config,
                                  object_keys={"sas": list(_KEYS)})
    yield "descriptor", dict(desc.descriptor_doc)
    lq0, lq1 = np.log10(q_range)
    for i in range(n_events):
        q = float(10 ** rng.uniform(lq0, lq1))
        exposure = 0.1 + 0.1 * (i % 10)
        intensity = 50.0 * np.exp(-(q * 60.0) ** 2 / 3.0) + 0.05
        counts = float(rng.poisson(flux * intensity * exposure + dark_rate * exposure))
        now = time.time()
        yield "event", dict(desc.compose_event(data={"sas_q": q, "sas_counts": counts, "sas_exposure": exposure},
                                               timestamps={k: now for k in _KEYS}))
    yield "stop", dict(run.compose_stop())

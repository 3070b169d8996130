"""Detector masks: which pixels of a detector hold no data (module gaps), from pyFAI's geometries.

The one place that asks pyFAI for a detector's mask, for the simulators (the gaps of simulated
frames) and for the detector agent (``detector_mask: "pyfai:NAME"``) alike. ``True`` marks a pixel
to leave out, numpy's masked-array convention.
"""

from __future__ import annotations

import functools
import logging

import numpy as np

__all__ = ["pyfai_mask"]


@functools.cache
def pyfai_mask(detector: str) -> np.ndarray:
    """pyFAI's mask of ``detector`` (True: no pixel there), of the detector's full shape; read-only,
    cached.

    Raises
    ------
    ValueError
        pyFAI knows no detector of that name.
    """
    # silx (under pyFAI) logs a warning that pyopencl is absent; nothing here uses OpenCL
    logging.getLogger("silx").setLevel(logging.ERROR)
    import pyFAI  # deferred: pyFAI's import costs ~0.2 s and only detector gaps need it

    factory_log = logging.getLogger("pyFAI.detectors._common")
    level = factory_log.level
    factory_log.setLevel(logging.CRITICAL)  # an unknown name logs every name pyFAI knows (~400); the error below says it
    try:
        det = pyFAI.detector_factory(detector)
    except (RuntimeError, KeyError, ValueError) as exc:
        raise ValueError(
            f"unknown pyFAI detector {detector=}; use a name pyFAI knows, e.g. 'Pilatus1M', "
            "'Eiger1M', 'Pilatus300k'"
        ) from exc
    finally:
        factory_log.setLevel(level)
    raw = det.calc_mask()
    mask = np.zeros(det.shape, bool) if raw is None else np.asarray(raw, bool)
    mask.setflags(write=False)
    return mask

"""The numerical core of beampilot: surrogates, acquisition, fits, networks.

``models`` is free of I/O and of experiment control. It imports numpy, scipy, torch, gpytorch,
botorch, scikit-learn and sasmodels (a pure scattering-physics library) only: never bluesky,
ophyd, Kafka, tiled, zarr, ``streams`` or ``agents``.
"""

from models.device import default_device, default_dtype
from models.errors import FitError, ModelError

__all__ = ["FitError", "ModelError", "default_device", "default_dtype"]

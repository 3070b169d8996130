"""RE Manager startup, step 2: the simulated instruments and the point-key signal.

* ``sas``: the SAS instrument of ``beampilot demo sas-qscan``, whose hidden sample
  (:class:`agents.demo_sas.DemoSetup`) is drawn from a sample kind and a seed; axes ``q`` and
  ``exposure``.
* ``stage``: the sample stage of ``beampilot demo mapping`` over a hidden film
  (:class:`simulators.maps.FilmMap` of the seed, 10 x 10 mm), moving at 2 mm/s, with its SAXS
  detector ``stage.saxs`` (0.5 s a frame); axes ``stage_x`` and ``stage_y``.
* ``optics``: the beamline optics of ``beampilot demo tune``, with its beam monitor (2% flux, 1%
  beam-size noise); axes ``mirror_pitch``, ``mirror_bender``, ``slit_h``, ``slit_v``, ``focus``.
* ``ring`` (only with ``BEAMPILOT_SIM_RING`` set: pyAT takes seconds to load): the storage ring
  of ``beampilot demo ring`` (cheap tracking), lifetime and injection efficiency read each point;
  axes ``ring_SH1`` ... ``ring_SD``, its sextupole families.

Moves and exposures take real time, sped up by the same factor.

Environment
-----------
BEAMPILOT_SIM_SAMPLE
    Sample kind (default ``polydisperse_sphere``; see ``models.sas.SAMPLE_KINDS``).
BEAMPILOT_SIM_SEED
    Seed of the sample's hidden parameters and of the counting noise (default 0).
BEAMPILOT_SIM_SPEED
    Instrument seconds per wall second (default 100: a 1 s exposure takes 10 ms).
BEAMPILOT_SIM_RING
    Non-empty: also the simulated storage ring ``ring``.
"""

import os as _os

from ophyd import Signal as _Signal

from agents.demo_sas import DemoSetup as _DemoSetup
from agents.demo_sas import make_instrument as _make_instrument
from agents.plans import POINT_KEY as _POINT_KEY
from simulators.maps import FilmMap as _FilmMap
from simulators.optics import SimBeamlineOptics as _SimBeamlineOptics
from simulators.sas import WallClock as _WallClock
from simulators.stage import SimSampleStage as _SimSampleStage


def _env(name, default, convert):
    raw = _os.environ.get(name, default)
    try:
        return convert(raw)
    except ValueError as ex:
        raise ValueError(f"{name}={raw!r} is not a valid {convert.__name__}: {ex}; unset it or fix it") from ex


_setup = _DemoSetup.draw(
    _env("BEAMPILOT_SIM_SAMPLE", "polydisperse_sphere", str), _env("BEAMPILOT_SIM_SEED", "0", int)
)
_clock = _WallClock(speed=_env("BEAMPILOT_SIM_SPEED", "100", float))
sas = _make_instrument(_setup, _clock, seed=_setup.seed)
stage = _SimSampleStage("stage", truth=_FilmMap(seed=_setup.seed), speed=2.0, seed=_setup.seed, clock=_clock)
stage.saxs.exposure.put(0.5)
optics = _SimBeamlineOptics("optics", seed=_setup.seed, clock=_clock, flux_noise=0.02, size_noise=0.01)
if _os.environ.get("BEAMPILOT_SIM_RING"):
    from simulators.ring import SimStorageRing as _SimStorageRing

    ring = _SimStorageRing("ring", seed=_setup.seed, clock=_clock)
# Each measurement's idempotency key, read into its event. Only ``measure`` uses it, so it is
# private: no queued plan may take it as an argument.
_point_key = _Signal(name=_POINT_KEY, value="")

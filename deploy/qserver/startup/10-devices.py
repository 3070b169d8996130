"""RE Manager startup, step 2: the simulated SAS instrument ``sas`` and the point-key signal.

The hidden sample is that of ``beampilot demo sas-qscan`` (:class:`agents.demo_sas.DemoSetup`),
drawn from a sample kind and a seed; exposures take real time, sped up.

Environment
-----------
BEAMPILOT_SIM_SAMPLE
    Sample kind (default ``polydisperse_sphere``; see ``models.sas.SAMPLE_KINDS``).
BEAMPILOT_SIM_SEED
    Seed of the sample's hidden parameters and of the counting noise (default 0).
BEAMPILOT_SIM_SPEED
    Instrument seconds per wall second (default 100: a 1 s exposure takes 10 ms).
"""

import os as _os

from ophyd import Signal as _Signal

from agents.demo_sas import DemoSetup as _DemoSetup
from agents.demo_sas import make_instrument as _make_instrument
from agents.plans import POINT_KEY as _POINT_KEY
from simulators.sas import WallClock as _WallClock


def _env(name, default, convert):
    raw = _os.environ.get(name, default)
    try:
        return convert(raw)
    except ValueError as ex:
        raise ValueError(f"{name}={raw!r} is not a valid {convert.__name__}: {ex}; unset it or fix it") from ex


_setup = _DemoSetup.draw(
    _env("BEAMPILOT_SIM_SAMPLE", "polydisperse_sphere", str), _env("BEAMPILOT_SIM_SEED", "0", int)
)
sas = _make_instrument(_setup, _WallClock(speed=_env("BEAMPILOT_SIM_SPEED", "100", float)), seed=_setup.seed)
# Each measurement's idempotency key, read into its event. Only ``measure`` uses it, so it is
# private: no queued plan may take it as an argument.
_point_key = _Signal(name=_POINT_KEY, value="")

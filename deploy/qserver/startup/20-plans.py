"""RE Manager startup, step 3: the plans a remote agent may queue (see user_group_permissions.yaml).

Only generator functions defined or imported here under public names become plans, so helpers
are imported as modules or under ``_`` names.
"""

from bluesky.plans import count  # noqa: F401  (a plan the permissions allow)

import agents.plans as _plans
from simulators.optics import AXES as _OPTICS_AXES


def _instruments():
    """Each instrument's detectors and settable axes, by name (defined by 10-devices.py)."""
    instruments = {
        "sas": ([sas], {"q": sas.q, "exposure": sas.exposure}),  # noqa: F821
        "stage": ([stage.saxs], {"stage_x": stage.x, "stage_y": stage.y}),  # noqa: F821
        "optics": ([optics], {a: getattr(optics, a) for a in _OPTICS_AXES}),  # noqa: F821
    }
    if "ring" in globals():  # BEAMPILOT_SIM_RING (its module, with pyAT, is loaded then only)
        from simulators.ring import FAMILIES

        instruments["ring"] = ([ring], {f"ring_{f}": getattr(ring, f) for f in FAMILIES})  # noqa: F821
    return instruments


def measure(points: list[dict[str, float]], point_keys: list[str], *, md: dict | None = None):
    """Measure at each point, in one run, on the instrument whose axes the points move.

    ``sas`` (I(Q)): ``{"q": 1/Å, "exposure": s}``; ``stage`` (a SAXS frame of the film):
    ``{"stage_x": mm, "stage_y": mm}``; ``optics`` (flux and beam size): any of
    ``mirror_pitch``, ``mirror_bender``, ``slit_h``, ``slit_v``, ``focus``; ``ring`` (lifetime and
    injection efficiency, when the stack has it): any of ``ring_SH1`` ... ``ring_SD``. Each event records
    ``point_keys[i]`` under ``beampilot_point_key``, so the agent that asked knows which request
    it answers; ``md`` goes to the start document.

    Parameters
    ----------
    points
        One dict of axis values per point; an axis left out keeps its current value. Points
        that name no axis at all measure ``sas``.
    point_keys
        One idempotency key per point.
    md
        Extra start-document metadata.
    """
    named = {axis for point in points for axis in point}
    instruments = _instruments()
    fits = [name for name, (_, axes) in instruments.items() if named <= set(axes)]
    if not fits:
        known = {name: sorted(axes) for name, (_, axes) in instruments.items()}
        raise ValueError(f"points move axes {sorted(named)}, which no one instrument has; measure moves the "
                         f"axes of one of {known}")
    detectors, axes = instruments[fits[0]]
    yield from _plans.measure_run(detectors, axes, points, point_keys, _point_key, md=md)  # noqa: F821

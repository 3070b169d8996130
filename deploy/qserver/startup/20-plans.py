"""RE Manager startup, step 3: the plans a remote agent may queue (see user_group_permissions.yaml).

Only generator functions defined or imported here under public names become plans, so helpers
are imported as modules or under ``_`` names.
"""

from bluesky.plans import count  # noqa: F401  (a plan the permissions allow)

import agents.plans as _plans


def measure(points: list[dict[str, float]], point_keys: list[str], *, md: dict | None = None):
    """Measure I(Q) on ``sas`` at each point ``{"q": 1/Å, "exposure": s}``, in one run.

    Each event records ``point_keys[i]`` under ``beampilot_point_key``, so the agent that asked
    knows which request it answers; ``md`` goes to the start document.

    Parameters
    ----------
    points
        ``[{"q": ..., "exposure": ...}, ...]``; an axis left out keeps its current value.
    point_keys
        One idempotency key per point.
    md
        Extra start-document metadata.
    """
    axes = {"q": sas.q, "exposure": sas.exposure}  # noqa: F821  (defined by 10-devices.py)
    unknown = sorted({axis for point in points for axis in point} - set(axes))
    if unknown:
        raise ValueError(f"points move axes {unknown}; measure moves only {sorted(axes)}")
    yield from _plans.measure_run(
        [sas], axes, points, point_keys, _point_key, md=md  # noqa: F821
    )

"""What every simulated readout device shares: injected faults, seeded random streams, and a
reading that completes after its (clock) duration.

:class:`ReadoutFaults` says what to inject; :func:`noise_and_fault_rngs` splits a device seed into
independent noise and fault streams (so switching faults on does not change the noise);
:func:`complete_after` finishes a trigger's status after the reading's duration: at once on a
virtual clock (the clock advances), in a thread on a wall clock, and a failure while waiting fails
the status instead of vanishing.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:  # simulators.sas uses this module: only the type comes from there
    from ophyd import DeviceStatus

    from simulators.sas import Clock

__all__ = ["ReadoutFaults", "complete_after", "noise_and_fault_rngs"]


@dataclass(frozen=True)
class ReadoutFaults:
    """Faults to inject, drawn from an rng seeded from the device's seed.

    Attributes
    ----------
    nan_probability : float
        Probability that a reading is lost: the device's readings read NaN.
    error_probability : float
        Probability that a trigger fails with :class:`~simulators.errors.SimulatedFaultError`.
    read_latency : float
        Clock seconds added to every reading, on top of its own duration.
    """

    nan_probability: float = 0.0
    error_probability: float = 0.0
    read_latency: float = 0.0

    def __post_init__(self) -> None:
        for name in ("nan_probability", "error_probability"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"{name} must be in [0, 1]; got {value}")
        if not (math.isfinite(self.read_latency) and self.read_latency >= 0):
            raise ValueError(f"read_latency must be finite and >= 0 s; got {self.read_latency=}")


def noise_and_fault_rngs(seed: int) -> tuple[np.random.Generator, np.random.Generator]:
    """Independent noise and fault generators from one device seed."""
    noise_seq, fault_seq = np.random.SeedSequence(seed).spawn(2)
    return np.random.default_rng(noise_seq), np.random.default_rng(fault_seq)


def complete_after(status: DeviceStatus, clock: Clock, duration: float, publish: Callable[[], None]) -> None:
    """Wait ``duration`` clock seconds, ``publish()`` the reading, then finish ``status``."""

    def run() -> None:
        try:
            clock.sleep(duration)
            publish()
        except Exception as exc:  # noqa: BLE001 -- a failed reading must fail the status, not vanish
            status.set_exception(exc)
            return
        status.set_finished()

    if clock.virtual:
        run()
    else:
        threading.Thread(target=run, daemon=True).start()

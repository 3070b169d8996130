"""Errors raised by ``simulators``."""

from __future__ import annotations


class SimulatorError(Exception):
    """Base class of every error raised by ``simulators``."""


class SimulatedFaultError(SimulatorError):
    """A fault injected on purpose (fault settings of a simulated device)."""


class OutOfRangeError(SimulatorError, ValueError):
    """A setting outside what the simulated instrument can do."""

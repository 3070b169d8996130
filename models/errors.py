"""Errors raised by ``models``."""

from __future__ import annotations


class ModelError(Exception):
    """Base class of every error raised by ``models``."""


class FitError(ModelError):
    """A fit could not be made: too few points, no finite likelihood, or no convergence."""

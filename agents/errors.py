"""Errors raised by ``agents``."""

from __future__ import annotations


class AgentError(Exception):
    """Base class of every error raised by ``agents``."""


class ConfigError(AgentError, ValueError):
    """A configuration that cannot be used; the message says which key and what to change."""


class SafetyRejectedError(AgentError):
    """Plan requests kept being rejected by the safety gate, so steering stopped."""


class AgentStoreError(AgentError):
    """An agent's zarr store is missing, belongs to another agent, or is inconsistent."""


class ObservationError(AgentError):
    """An event a steering agent cannot use as an observation (named by run, seq_num and cause)."""

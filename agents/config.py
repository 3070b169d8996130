"""Configuration at the edge: YAML/JSON files and stored configs, validated with pydantic.

Every model forbids unknown keys, so a typo fails at load with the key's name and the allowed
ones, instead of being ignored. Validated settings turn into the frozen dataclasses the agents
use (``to_config()``); fitted state never lives here.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from agents.errors import ConfigError
from agents.safety import AxisLimits, SafetyConfig

__all__ = ["AxisSettings", "FitSettings", "QSamplingSettings", "SafetySettings", "existing_ancestor", "load_settings",
           "read_mapping", "writable_dir"]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class AxisSettings(_Strict):
    low: float
    high: float
    max_step: float | None = Field(default=None, gt=0)

    @model_validator(mode="after")
    def _ordered(self) -> AxisSettings:
        if not self.low <= self.high:
            raise ValueError(f"low={self.low} must be <= high={self.high}")
        return self


class SafetySettings(_Strict):
    """The operator's limits. Every axis an agent moves needs an entry in ``limits``."""

    allowed_plans: list[str] = Field(default_factory=lambda: ["measure"], min_length=1)
    limits: dict[str, AxisSettings]
    max_requests_per_minute: float | None = Field(default=None, gt=0)
    max_points_per_request: int | None = Field(default=None, gt=0)

    def to_config(self) -> SafetyConfig:
        return SafetyConfig(
            allowed_plans=frozenset(self.allowed_plans),
            limits={k: AxisLimits(v.low, v.high, v.max_step) for k, v in self.limits.items()},
            max_requests_per_minute=self.max_requests_per_minute,
            max_points_per_request=self.max_points_per_request,
        )


class FitSettings(_Strict):
    """The sasmodels model the experiment is meant to characterise, and what to fit."""

    model_name: str
    fixed: dict[str, float | str] = Field(default_factory=dict)  # e.g. radius_pd_type: gaussian
    fit_params: list[str] = Field(min_length=1)
    size_params: list[str] = Field(min_length=1)
    bounds: dict[str, tuple[float, float]]
    initial: dict[str, float] | None = None

    @model_validator(mode="after")
    def _consistent(self) -> FitSettings:
        missing = [p for p in self.fit_params if p not in self.bounds]
        if missing:
            raise ValueError(f"fit_params {missing} have no bounds; add bounds for every fitted parameter")
        extra = [p for p in self.size_params if p not in self.fit_params]
        if extra:
            raise ValueError(f"size_params {extra} are not in fit_params {self.fit_params}")
        bad = {k: v for k, v in self.bounds.items() if not 0 < v[0] < v[1]}
        if bad:
            raise ValueError(f"bounds must satisfy 0 < low < high (fits work in log space), got {bad}")
        return self


class DataKeySettings(_Strict):
    """Which event data keys hold Q, counts and exposure; flux and dark rate come from the
    descriptor's configuration under these keys unless ``flux``/``dark_rate`` are given."""

    q: str = "sas_q"
    counts: str = "sas_counts"
    exposure: str = "sas_exposure"
    flux: str = "sas_flux"
    dark_rate: str = "sas_dark_rate"
    stream: str = "primary"


class QSamplingSettings(_Strict):
    """Settings of :class:`agents.qsampling.QSamplingAgent` (see its docs for each)."""

    name: str = "qsampling"
    fit: FitSettings
    q_range: tuple[float, float]
    dq_over_q: float = Field(default=0.0, ge=0, lt=1)
    n_candidates: int = Field(default=160, ge=8, le=2048)
    n_initial: int = Field(default=12, ge=3)
    initial_exposure: float = Field(default=0.1, gt=0)
    exposure_bounds: tuple[float, float] = (0.1, 60.0)
    target_counts: float = Field(default=2000.0, gt=0)
    target_rel_sigma: float = Field(default=0.02, gt=0, lt=1)
    max_reduced_deviance: float = Field(default=2.0, gt=0)
    explore_fraction: float = Field(default=0.25, ge=0, le=1)
    explore_time_fraction: float = Field(default=0.1, ge=0, lt=1)
    acquisition: Literal["ivr", "variance", "ucb"] = "ivr"
    budget_exposure: float = Field(default=1e6, gt=0)
    max_measurements: int = Field(default=5000, gt=0)
    max_retries: int = Field(default=3, ge=0)
    fit_starts: int = Field(default=8, ge=1)
    refit_growth: float = Field(default=1.1, gt=1)
    rival_deviance: float = Field(default=9.0, gt=0)
    max_batch_growth: float = Field(default=0.5, gt=0)
    overhead: float = Field(default=0.0, ge=0)
    flux: float | None = Field(default=None, gt=0)
    dark_rate: float | None = Field(default=None, ge=0)
    keys: DataKeySettings = Field(default_factory=DataKeySettings)

    @model_validator(mode="after")
    def _ranges(self) -> QSamplingSettings:
        q0, q1 = self.q_range
        if not 0 < q0 < q1:
            raise ValueError(f"q_range must satisfy 0 < q_min < q_max, got {self.q_range}")
        t0, t1 = self.exposure_bounds
        if not 0 < t0 <= t1:
            raise ValueError(f"exposure_bounds must satisfy 0 < t_min <= t_max, got {self.exposure_bounds}")
        if not t0 <= self.initial_exposure <= t1:
            raise ValueError(f"initial_exposure={self.initial_exposure} is outside exposure_bounds {self.exposure_bounds}")
        return self


def _explain(err: ValidationError, where: str) -> str:
    lines = []
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"]) or "(top level)"
        if e["type"] == "extra_forbidden":
            lines.append(f"unknown key {loc!r}: remove it or check its spelling")
        else:
            lines.append(f"{loc}: {e['msg']}")
    return f"invalid configuration in {where}:\n  " + "\n  ".join(lines)


def read_mapping(path: str | Path, what: str = "config file") -> dict[str, Any]:
    """The mapping a YAML (or, by its suffix, JSON) file holds; :class:`ConfigError` naming the
    file (as ``what``) when it is missing, a directory, not valid YAML/JSON or not a mapping.
    An empty file is an empty mapping."""
    path = Path(path)
    if path.is_dir():
        raise ConfigError(f"{what} {path} is a directory: name the YAML file")
    if not path.is_file():
        raise ConfigError(f"{what} {path} does not exist")
    text = path.read_text()
    try:
        data = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
    except json.JSONDecodeError as err:
        raise ConfigError(f"{what} {path} is not valid JSON: line {err.lineno}, column {err.colno}: {err.msg}") from None
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        at = f"line {mark.line + 1}, column {mark.column + 1}: " if mark is not None else ""
        problem = getattr(err, "problem", None) or str(err)
        raise ConfigError(f"{what} {path} is not valid YAML: {at}{problem}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{what} {path} must hold a mapping at the top level, got {type(data).__name__}")
    return data


def load_settings(model: type[_Strict], source: _Strict | str | Path | dict[str, Any], *,
                  where: str | None = None) -> Any:
    """Validate ``source`` (a YAML/JSON file or a dict) as ``model``; errors name each bad key,
    and where it came from (``where``; default: the file, or "dict"). An instance of ``model``
    is returned as it is (it was validated when it was made)."""
    if isinstance(source, model):
        return source
    label = where or "dict"
    if not isinstance(source, dict):
        label = where or str(source)
        source = read_mapping(source)
    try:
        return model.model_validate(source)
    except ValidationError as err:
        raise ConfigError(_explain(err, label)) from None


def existing_ancestor(path: Path) -> Path:
    """``path`` itself if it exists, else its nearest parent that does (where it would be made)."""
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def writable_dir(path: Path, option: str = "--out", *, create: bool = True) -> Path:
    """Make the output directory ``path`` and check that files can be written in it, so a long
    job does not fail at its end; raises :class:`ValueError` naming ``option`` (when given),
    the path and the cause.

    ``create=False`` checks the same without making anything: ``path`` must be a writable
    directory, or not exist below a writable one (the command makes it when it runs). A command
    line's check uses it, so a command refused for another of its options leaves nothing behind.
    """
    import tempfile

    path = Path(path)
    name = f"{option} {path}".strip()
    if path.exists() and not path.is_dir():
        raise ValueError(f"{name} is a file: name a directory")
    probe = path
    if not create:
        probe = existing_ancestor(path)
        if not probe.is_dir():
            raise ValueError(f"{name} cannot be made: {probe} is a file; name a directory")
    try:
        if create:
            path.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=probe, prefix=".write-check-"):
            pass
    except OSError as err:
        raise ValueError(f"{name} cannot be written ({err.strerror or err}): "
                         "name a directory you can write to") from None
    return path

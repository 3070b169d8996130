"""Trained weights with their metadata, and the one way to load them.

A set of weights is two files side by side: ``NAME.pt`` (a torch ``state_dict``) and
``NAME.json``, its metadata:

* ``architecture`` - a key of :data:`ARCHITECTURES` and ``architecture_config`` - the keyword
  arguments that build it (a key left out takes the class default, so metadata written before an
  option existed still builds the same network: no ``unshuffle`` means the full-resolution U-Net);
* ``training`` - the training configuration (steps, batch, learning rate, seeds, loss ...);
* ``data`` - the recipe of the simulated data it was trained on (generator, kinds, count
  levels, seeds) and what was held out;
* ``metrics`` - the held-out evaluation printed at the end of training;
* ``sha256`` - the checksum of ``NAME.pt``.

:func:`load_weights` refuses a checksum mismatch (a corrupted or swapped file) and an
architecture mismatch (weights of another network, or a state dict that does not fit the
architecture the metadata names), each with an error that says what to do. Small weights ship
in the package (``models/weights/``) so the daemon and the demos work offline from the first run;
:func:`shipped` lists them.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from models.errors import ModelError
from models.nets import PeakUNet, PoissonDenoiser, SuperResolver

__all__ = ["ARCHITECTURES", "SHIPPED_DIR", "WeightsError", "WeightsRecord", "load_weights", "save_weights", "shipped"]

#: network classes by the architecture name written in the metadata
ARCHITECTURES: dict[str, type[nn.Module]] = {
    "poisson-denoiser-unet": PoissonDenoiser,
    "bragg-peak-unet": PeakUNet,
    "sans-super-resolver": SuperResolver,
}

SHIPPED_DIR = Path(__file__).parent / "weights"
FORMAT = 1


class WeightsError(ModelError):
    """Weights that cannot be used: missing, corrupted, or not for this network."""


@dataclass(frozen=True)
class WeightsRecord:
    """The metadata of one set of weights (see the module docstring)."""

    name: str
    architecture: str
    architecture_config: dict[str, Any]
    training: dict[str, Any] = field(default_factory=dict)
    data: dict[str, Any] = field(default_factory=dict)
    metrics: dict[str, Any] = field(default_factory=dict)
    sha256: str = ""
    format: int = FORMAT


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def save_weights(model: nn.Module, directory: str | Path, record: WeightsRecord) -> Path:
    """Write ``NAME.pt`` and ``NAME.json`` into ``directory``; returns the ``.pt`` path."""
    if record.architecture not in ARCHITECTURES:
        raise WeightsError(f"unknown architecture {record.architecture!r}; known: {sorted(ARCHITECTURES)}")
    if not isinstance(model, ARCHITECTURES[record.architecture]):
        raise WeightsError(f"a {type(model).__name__} is not a {record.architecture!r} network")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    pt = directory / f"{record.name}.pt"
    torch.save({k: v.detach().cpu() for k, v in model.state_dict().items()}, pt)
    meta = asdict(record)
    meta["sha256"] = _sha256(pt)
    (directory / f"{record.name}.json").write_text(json.dumps(meta, indent=2, default=float))
    return pt


def _resolve(name_or_path: str | Path) -> Path:
    p = Path(name_or_path)
    if p.suffix in (".pt", ".json"):
        p = p.with_suffix("")
    candidates = [p] if p.parent != Path(".") or p.exists() or p.with_suffix(".pt").exists() else []
    candidates.append(SHIPPED_DIR / p.name)
    for c in candidates:
        if c.with_suffix(".pt").exists() or c.with_suffix(".json").exists():
            return c
    raise WeightsError(f"no weights {name_or_path!r}: not a path to NAME.pt/NAME.json and not shipped "
                       f"(shipped: {shipped() or 'none'}); train them with `beampilot train ... --out DIR`")


def load_weights(name_or_path: str | Path, *, architecture: str | None = None,
                 device: torch.device | str = "cpu") -> tuple[nn.Module, WeightsRecord]:
    """Build the network the metadata names, load its weights, verify them; return both.

    Parameters
    ----------
    name_or_path
        A shipped name (``"denoise"``), or a path to ``NAME.pt`` / ``NAME.json`` / ``NAME``.
    architecture
        The architecture the caller needs; other weights are refused.
    device
        Where the parameters go.

    Raises
    ------
    WeightsError
        Missing files, a checksum mismatch, an architecture mismatch, a state dict that does not
        fit the architecture.
    """
    base = _resolve(name_or_path)
    pt, js = base.with_suffix(".pt"), base.with_suffix(".json")
    for f in (pt, js):
        if not f.exists():
            raise WeightsError(f"{f} is missing: weights need both {pt.name} and {js.name}")
    try:
        meta = json.loads(js.read_text())
        record = WeightsRecord(**meta)
    except (json.JSONDecodeError, TypeError) as err:
        raise WeightsError(f"{js} is not a beampilot weights record ({err}); re-train or re-download it") from None
    digest = _sha256(pt)
    if digest != record.sha256:
        raise WeightsError(f"checksum mismatch for {pt}: the file has sha256 {digest[:16]}..., its metadata "
                           f"{js.name} says {record.sha256[:16]}...; the file is corrupted or belongs to other "
                           "weights: use the pair written together by `beampilot train`")
    if architecture is not None and record.architecture != architecture:
        raise WeightsError(f"{pt} holds {record.architecture!r} weights, but a {architecture!r} network was "
                           "asked for: pass weights trained for this analysis")
    cls = ARCHITECTURES.get(record.architecture)
    if cls is None:
        raise WeightsError(f"{js} names an unknown architecture {record.architecture!r}; "
                           f"known: {sorted(ARCHITECTURES)}")
    try:
        model = cls(**record.architecture_config)
        state = torch.load(pt, map_location="cpu", weights_only=True)
        model.load_state_dict(state, strict=True)
    except (TypeError, ValueError, RuntimeError) as err:
        raise WeightsError(f"{pt} does not fit {record.architecture!r} with config "
                           f"{record.architecture_config}: {err}") from None
    return model.to(device).eval(), record


def shipped() -> list[str]:
    """Names of the weights that ship with beampilot."""
    if not SHIPPED_DIR.is_dir():
        return []
    return sorted(p.stem for p in SHIPPED_DIR.glob("*.json"))

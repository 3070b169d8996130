"""The import layers of DESIGN.md, checked on the source: imports point down only."""

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("agents", "streams", "models", "simulators")
# what each package may NOT import (third-party and first-party)
FORBIDDEN = {
    "models": {"agents", "streams", "simulators", "bluesky", "ophyd", "event_model", "zarr", "kafka", "tiled"},
    "simulators": {"agents", "streams", "kafka", "tiled"},
    "streams": {"agents", "models", "simulators", "torch", "gpytorch", "botorch", "sklearn"},
    "agents": set(),
}


def _imports(path: Path):
    tree = ast.parse(path.read_text(), filename=str(path))
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name.split(".")[0]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            yield node.lineno, node.module.split(".")[0]


@pytest.mark.parametrize("package", PACKAGES)
def test_imports_point_down_only(package):
    bad = [
        f"{path.relative_to(ROOT)}:{line} imports {name}"
        for path in sorted((ROOT / package).rglob("*.py"))
        for line, name in _imports(path)
        if name in FORBIDDEN[package]
    ]
    assert not bad, "layering broken:\n" + "\n".join(bad)


@pytest.mark.parametrize("package", PACKAGES)
def test_generic_top_level_names_resolve_to_this_repository(package):
    module = __import__(package)
    assert Path(module.__file__).resolve().parent == ROOT / package

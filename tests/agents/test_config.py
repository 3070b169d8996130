import pytest

from agents.config import QSamplingSettings, SafetySettings, load_settings, read_mapping
from agents.errors import ConfigError

FIT = {"model_name": "sphere", "fit_params": ["radius", "scale"], "size_params": ["radius"],
       "bounds": {"radius": [10, 500], "scale": [1e-4, 0.1]}}


def test_valid_settings_load_from_yaml(tmp_path):
    path = tmp_path / "agent.yaml"
    path.write_text("q_range: [0.003, 0.5]\ntarget_rel_sigma: 0.05\nfit:\n  model_name: sphere\n"
                    "  fit_params: [radius, scale]\n  size_params: [radius]\n"
                    "  bounds: {radius: [10, 500], scale: [0.0001, 0.1]}\n")
    s = load_settings(QSamplingSettings, path)
    assert s.target_rel_sigma == 0.05 and s.fit.bounds["radius"] == (10, 500)


def test_unknown_key_is_named_with_what_to_do():
    with pytest.raises(ConfigError, match=r"unknown key 'target_precision': remove it or check its spelling"):
        load_settings(QSamplingSettings, {"q_range": [0.003, 0.5], "fit": FIT, "target_precision": 0.1})
    with pytest.raises(ConfigError, match=r"unknown key 'fit.bound'"):
        load_settings(QSamplingSettings, {"q_range": [0.003, 0.5], "fit": {**FIT, "bound": {}}})


@pytest.mark.parametrize(
    ("change", "fragment"),
    [
        ({"q_range": [0.5, 0.003]}, "q_range must satisfy"),
        ({"initial_exposure": 100.0}, "initial_exposure=100.0 is outside exposure_bounds"),
        ({"fit": {**FIT, "size_params": ["length"]}}, "size_params ['length'] are not in fit_params"),
        ({"fit": {**FIT, "fit_params": ["radius", "scale", "background"]}}, "fit_params ['background'] have no bounds"),
        ({"fit": {**FIT, "bounds": {"radius": [0, 500], "scale": [1e-4, 0.1]}}}, "0 < low < high"),
    ],
)
def test_inconsistent_settings_are_refused(change, fragment):
    with pytest.raises(ConfigError) as info:
        load_settings(QSamplingSettings, {"q_range": [0.003, 0.5], "fit": FIT, **change})
    assert fragment in str(info.value)


def test_missing_or_malformed_files(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_settings(QSamplingSettings, tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("- just\n- a list\n")
    with pytest.raises(ConfigError, match="mapping at the top level"):
        load_settings(QSamplingSettings, bad)


def test_every_way_a_settings_file_can_be_wrong_is_named(tmp_path):
    (tmp_path / "bad.yaml").write_text("agents: [\n")
    (tmp_path / "bad.json").write_text('{"a": }')
    (tmp_path / "empty.yaml").write_text("")
    cases = [(tmp_path / "nope.yaml", r"settings .*nope.yaml does not exist"),
             (tmp_path, r"settings .* is a directory: name the YAML file"),
             (tmp_path / "bad.yaml", r"bad.yaml is not valid YAML: line 2, column 1: expected the node content"),
             (tmp_path / "bad.json", r"bad.json is not valid JSON: line 1, column 7: Expecting value")]
    for path, message in cases:
        with pytest.raises(ConfigError, match=message):
            read_mapping(path, "settings")
    assert read_mapping(tmp_path / "empty.yaml") == {}


def test_a_daemon_agents_settings_file_that_is_not_yaml_is_named(tmp_path):
    from agents.daemon import build_agent
    from agents.daemon_config import AgentEntry

    (tmp_path / "map.yaml").write_text("extent: [0, 10\n")
    entry = AgentEntry(kind="mapping", name="m", settings=str(tmp_path / "map.yaml"),
                       safety={"limits": {"stage_x": {"low": 0, "high": 10}}})
    with pytest.raises(ConfigError, match=r"agent settings file .*map.yaml is not valid YAML: line 2"):
        build_agent(entry, tmp_path, [])


def test_safety_settings_build_the_gate_config():
    s = SafetySettings(limits={"q": {"low": 0.01, "high": 0.3, "max_step": 0.1}})
    config = s.to_config()
    assert config.allowed_plans == frozenset({"measure"}) and config.limits["q"].max_step == 0.1
    with pytest.raises(ConfigError, match="low=1.0 must be <= high=0.0"):
        load_settings(SafetySettings, {"limits": {"q": {"low": 1.0, "high": 0.0}}})

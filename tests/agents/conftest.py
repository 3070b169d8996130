import pytest
from bluesky import RunEngine

from agents.config import QSamplingSettings
from agents.demo_sas import DemoSetup, agent_settings, make_instrument, safety_settings
from agents.safety import SafetyGate
from simulators.sas import SimClock


@pytest.fixture
def RE():
    return RunEngine({}, context_managers=[])


@pytest.fixture
def setup():
    # a strongly scattering hidden sphere: a loose goal is reached in a few rounds
    return DemoSetup.draw("polydisperse_sphere", 1000)


@pytest.fixture
def settings(setup) -> QSamplingSettings:
    return agent_settings(setup, {"target_rel_sigma": 0.05, "fit_starts": 4})


@pytest.fixture
def clock():
    return SimClock(start=0.0)


@pytest.fixture
def instrument(setup, clock):
    return make_instrument(setup, clock, seed=1)


@pytest.fixture
def gate(setup, clock):
    return SafetyGate(safety_settings(setup).to_config(), clock=clock.time)

"""Tests of simulators.maps and simulators.stage: truth maps, and the stage under a RunEngine."""

from __future__ import annotations

import time

import bluesky.plan_stubs as bps
import bluesky.plans as bp
import numpy as np
import pytest
from bluesky import RunEngine
from bluesky.utils import FailedStatus
from ophyd.signal import InternalSignalError

from models.saxs2d import DetectorGeometry, ReductionError, reduce_frame
from simulators.errors import OutOfRangeError, SimulatedFaultError
from simulators.maps import (
    FILM_NAMES,
    DiscontinuousMap,
    FilmMap,
    SmoothMap,
    TruthMap,
    truth_grid,
)
from simulators.sas import SimClock, WallClock
from simulators.stage import ScalarRing, SimSampleStage, StageFaults

MAPS = [SmoothMap, DiscontinuousMap, FilmMap]


@pytest.fixture
def RE():
    engine = RunEngine({}, context_managers=[])
    docs: list[tuple[str, dict]] = []
    engine.subscribe(lambda name, doc: docs.append((name, doc)))
    engine.docs = docs
    return engine


def events(docs: list[tuple[str, dict]]) -> list[dict]:
    return [doc for name, doc in docs if name == "event"]


def angle_diff(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Smallest difference of orientations (degrees, period 180)."""
    return np.abs((np.asarray(a) - np.asarray(b) + 90.0) % 180.0 - 90.0)


# --- maps ------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", MAPS)
def test_maps_are_deterministic_per_seed_and_differ_across_seeds(kind: type) -> None:
    first, again, other = kind(seed=5), kind(seed=5), kind(seed=6)
    assert isinstance(first, TruthMap)
    _, _, a = truth_grid(first, n=40)
    _, _, b = truth_grid(again, n=40)
    _, _, c = truth_grid(other, n=40)
    assert set(a) == set(first.names)
    for name in first.names:
        np.testing.assert_array_equal(a[name], b[name])
        assert not np.allclose(a[name], c[name]), name


@pytest.mark.parametrize("kind", MAPS)
def test_truth_grid_is_indexed_iy_ix_over_the_extent(kind: type) -> None:
    truth = kind(seed=2, extent=(-1.0, 3.0, 10.0, 12.0))
    xs, ys, grid = truth_grid(truth, n=7)
    assert xs[0] == -1.0 and xs[-1] == 3.0 and ys[0] == 10.0 and ys[-1] == 12.0
    point = truth.values(xs[5], ys[2])
    for name in truth.names:
        assert grid[name].shape == (7, 7)
        assert grid[name][2, 5] == pytest.approx(float(point[name]))
    # Vectorised over any broadcast of x and y.
    assert truth.values(np.zeros((3, 1)), np.linspace(10, 12, 4))[truth.names[0]].shape == (3, 4)


@pytest.mark.parametrize("kind", MAPS)
def test_maps_refuse_points_outside_their_extent(kind: type) -> None:
    truth = kind(seed=0)
    with pytest.raises(ValueError, match=r"1 point\(s\) outside the map's extent"):
        truth.values([1.0, 10.5], [1.0, 2.0])
    with pytest.raises(ValueError, match="outside"):
        truth.values(np.nan, 1.0)
    with pytest.raises(ValueError, match="extent"):
        kind(seed=0, extent=(1.0, 0.0, 0.0, 1.0))
    with pytest.raises(ValueError, match="n must be an int >= 2"):
        truth_grid(truth, n=1)


def test_scalar_maps_are_positive_and_smooth_map_is_continuous() -> None:
    for seed in range(5):
        _, _, smooth = truth_grid(SmoothMap(seed=seed), n=200)
        _, _, jumpy = truth_grid(DiscontinuousMap(seed=seed), n=200)
        assert smooth["value"].min() > 0.1 and jumpy["value"].min() > 0.1
        step = max(np.abs(np.diff(smooth["value"], axis=1)).max(),
                   np.abs(np.diff(smooth["value"], axis=0)).max())
        assert step < 0.1


def test_discontinuous_map_jumps_across_its_boundaries() -> None:
    truth = DiscontinuousMap(seed=3)
    xs, ys, grid = truth_grid(truth, n=200)
    gx, gy = np.meshgrid(xs, ys)
    domain = truth.domain(gx, gy)
    assert len(np.unique(domain)) >= 3
    value = grid["value"]
    change = domain[:, 1:] != domain[:, :-1]
    step = np.abs(np.diff(value, axis=1))
    assert change.any()
    assert step[change].min() > 0.2  # every crossing jumps
    assert step[~change].max() < 0.05  # smooth elsewhere


def test_film_map_has_grains_with_orientation_jumps_at_their_boundaries() -> None:
    film = FilmMap(seed=4)
    assert film.names == FILM_NAMES
    xs, ys, grid = truth_grid(film, n=150)
    gx, gy = np.meshgrid(xs, ys)
    grain = film.grain(gx, gy)
    assert len(np.unique(grain)) >= 10
    boundary = grain[:, 1:] != grain[:, :-1]
    jump = angle_diff(grid["orientation"][:, 1:], grid["orientation"][:, :-1])
    assert np.mean(jump[boundary] > 10.0) > 0.7  # most boundaries are misorientations
    assert jump[~boundary].max() < 2.0  # within a grain the orientation varies smoothly
    # Physically sensible ranges, and the order vector is (a cos 2θ, a sin 2θ).
    assert 0.028 < grid["peak_q"].min() and grid["peak_q"].max() < 0.05
    assert 0.0 < grid["anisotropy"].min() and grid["anisotropy"].max() < 1.0
    assert np.all((grid["orientation"] >= 0) & (grid["orientation"] < 180))
    two_theta = np.deg2rad(2 * grid["orientation"])
    np.testing.assert_allclose(grid["order_x"], grid["anisotropy"] * np.cos(two_theta))
    np.testing.assert_allclose(grid["order_y"], grid["anisotropy"] * np.sin(two_theta))


def test_film_map_has_a_poorly_ordered_phase_with_sharp_edges() -> None:
    film = FilmMap(seed=0)
    xs, ys, grid = truth_grid(film, n=150)
    gx, gy = np.meshgrid(xs, ys)
    disordered = film.disordered(gx, gy)
    assert 0.05 < disordered.mean() < 0.95
    assert grid["anisotropy"][disordered].max() < 0.2 < np.median(grid["anisotropy"][~disordered])
    edge = disordered[:, 1:] != disordered[:, :-1]
    assert np.abs(np.diff(grid["peak_q"], axis=1))[edge].min() > 0.003


# --- stage -----------------------------------------------------------------------------------


@pytest.fixture
def film() -> FilmMap:
    return FilmMap(seed=1)


def test_descriptor_records_the_frame_inline(film: FilmMap, RE) -> None:
    stage = SimSampleStage("stage", truth=film, speed=2.5)
    RE(bp.count([stage]))
    (descriptor,) = [doc for name, doc in RE.docs if name == "descriptor"]
    keys = descriptor["data_keys"]
    assert set(keys) == {"stage_x", "stage_y", "stage_saxs_counts", "stage_saxs_exposure",
                         "stage_saxs_beam_time"}
    assert keys["stage_saxs_counts"]["dtype"] == "array"
    assert keys["stage_saxs_counts"]["shape"] == [64, 64]
    assert keys["stage_x"]["units"] == "mm"
    assert descriptor["configuration"]["stage"]["data"] == {"stage_speed": 2.5}
    (event,) = events(RE.docs)
    counts = np.asarray(event["data"]["stage_saxs_counts"])
    assert counts.shape == (64, 64) and np.all(counts == np.round(counts)) and counts.sum() > 0
    assert (event["data"]["stage_x"], event["data"]["stage_y"]) == (5.0, 5.0)


def test_list_scan_frames_reduce_to_the_map_at_their_position(film: FilmMap, RE) -> None:
    stage = SimSampleStage("stage", truth=film, seed=3)
    RE(bps.mv(stage.saxs.exposure, 2.0, stage.y, 3.3))
    xs = [0.5, 2.0, 4.1, 6.7, 9.9]
    RE(bp.list_scan([stage.saxs, stage.y], stage.x, xs))
    evs = events(RE.docs)
    assert [e["data"]["stage_x"] for e in evs] == xs
    for event in evs:
        x, y = event["data"]["stage_x"], event["data"]["stage_y"]
        reduced = reduce_frame(event["data"]["stage_saxs_counts"],
                               event["data"]["stage_saxs_exposure"], stage.geometry)
        truth = {k: float(v) for k, v in film.values(x, y).items()}
        for name in film.names:
            diff = reduced.values[name] - truth[name]
            if name == "orientation":
                diff = float(angle_diff(reduced.values[name], truth[name]))
            assert abs(diff) < 5 * reduced.sigmas[name], (x, name, reduced.values[name])


def test_scalar_maps_are_measured_as_ring_intensity(RE) -> None:
    truth = DiscontinuousMap(seed=2)
    ring = ScalarRing(peak_q=0.035, intensity_per_unit=2e4)
    stage = SimSampleStage("stage", truth=truth, scalar_ring=ring, background=1.0)
    points = [(1.0, 1.0), (5.0, 5.0), (9.0, 2.0)]

    def plan():
        yield from bps.open_run()
        for x, y in points:
            yield from bps.mv(stage.x, x, stage.y, y)
            yield from bps.trigger_and_read([stage])
        yield from bps.close_run()

    RE(plan())
    for event, (x, y) in zip(events(RE.docs), points, strict=True):
        assert (event["data"]["stage_x"], event["data"]["stage_y"]) == (x, y)
        reduced = reduce_frame(event["data"]["stage_saxs_counts"], 1.0, stage.geometry)
        expected = 2e4 * float(truth.values(x, y)["value"])
        assert reduced.values["intensity"] == pytest.approx(
            expected, abs=5 * reduced.sigmas["intensity"])
        assert reduced.values["peak_q"] == pytest.approx(0.035, abs=5 * reduced.sigmas["peak_q"])
    params = stage.ring_parameters(5.0, 5.0)
    assert params["orientation_deg"] == 45.0 and params["background"] == 1.0


def test_moves_take_distance_over_speed_on_the_clock(film: FilmMap, RE) -> None:
    clock = SimClock(start=100.0)
    stage = SimSampleStage("stage", truth=film, clock=clock, speed=2.0)
    wall = time.monotonic()
    RE(bps.mv(stage.saxs.exposure, 10.0))
    RE(bp.list_scan([stage.saxs], stage.x, [1.0, 9.0]))  # from x = 5: 4 mm then 8 mm
    assert stage.travel == pytest.approx(12.0)
    assert stage.move_time == pytest.approx(6.0)
    assert clock.time() == pytest.approx(100.0 + 6.0 + 2 * 10.0)
    RE(bps.mv(stage.x, 0.0, stage.y, 10.0))  # both axes: one after the other
    assert stage.travel == pytest.approx(12.0 + 9.0 + 5.0)
    assert stage.move_time == pytest.approx(6.0 + 7.0)
    assert clock.time() == pytest.approx(100.0 + 13.0 + 20.0)
    assert stage.saxs.beam_time.get() == pytest.approx(20.0)
    # x arrived before y's 2.5 s move.
    assert stage.x.read()["stage_x"]["timestamp"] == pytest.approx(100.0 + 13.0 + 20.0 - 2.5)
    assert time.monotonic() - wall < 5.0


def test_wall_clock_move_takes_real_time(film: FilmMap) -> None:
    stage = SimSampleStage("stage", truth=film, clock=WallClock(speed=20.0), speed=1.0)
    start = time.monotonic()
    status = stage.x.set(7.0)  # 2 mm at 1 mm/s: 2 clock s, 0.1 wall s
    assert not status.done
    status.wait(timeout=5)
    assert 0.08 <= time.monotonic() - start < 2.0
    assert stage.x.position == 7.0 and stage.travel == pytest.approx(2.0)
    status = stage.saxs.trigger()
    status.wait(timeout=5)
    assert np.isfinite(stage.saxs.counts.get()).all()


@pytest.mark.parametrize(("axis", "value"), [("x", 10.5), ("x", -0.1), ("y", 12.0),
                                             ("y", float("nan"))])
def test_moves_outside_travel_are_refused(film: FilmMap, RE, axis: str, value: float) -> None:
    stage = SimSampleStage("stage", truth=film)
    with pytest.raises(OutOfRangeError,
                       match=rf"axis '{axis}' cannot move to {value} mm: outside its travel "
                             r"\[0.0, 10.0\] mm"):
        RE(bps.mv(getattr(stage, axis), value))
    assert (stage.x.position, stage.y.position) == (5.0, 5.0)
    assert stage.travel == 0.0 and stage.x.limits == (0.0, 10.0)


def test_axes_and_results_cannot_be_put(film: FilmMap) -> None:
    stage = SimSampleStage("stage", truth=film)
    with pytest.raises(InternalSignalError, match="move it with set"):
        stage.x.put(1.0)
    with pytest.raises(InternalSignalError):
        stage.saxs.counts.put(np.zeros((64, 64)))
    with pytest.raises(OutOfRangeError, match="exposure"):
        stage.saxs.exposure.put(0.0)
    with pytest.raises(OutOfRangeError, match=r"exposure = 61.0 s must be a scalar in \(0, 60.0\]"):
        stage.saxs.exposure.set(61.0)


def test_refused_moves_fail_the_plan_and_leave_the_stage(film: FilmMap, RE) -> None:
    stage = SimSampleStage("stage", truth=film, faults=StageFaults(refuse_probability=1.0))
    with pytest.raises(FailedStatus) as info:
        RE(bps.mv(stage.x, 2.0))
    assert isinstance(info.value.__cause__, SimulatedFaultError)
    assert "move of 'stage_x' to 2.0 mm refused" in str(info.value.__cause__)
    assert stage.x.position == 5.0 and stage.travel == 0.0 and stage.move_time == 0.0


def test_lost_frames_are_nan_and_do_not_reduce(film: FilmMap, RE) -> None:
    stage = SimSampleStage("stage", truth=film, faults=StageFaults(drop_probability=1.0))
    RE(bp.count([stage], num=2))
    for event in events(RE.docs):
        counts = np.asarray(event["data"]["stage_saxs_counts"])
        assert counts.shape == (64, 64) and np.isnan(counts).all()
        with pytest.raises(ReductionError, match="NaN"):
            reduce_frame(counts, 1.0, stage.geometry)


def test_faults_are_reproducible_per_seed(film: FilmMap) -> None:
    def pattern(seed: int) -> tuple[list[bool], list[bool]]:
        faults = StageFaults(drop_probability=0.5, refuse_probability=0.5)
        stage = SimSampleStage("stage", truth=film, seed=seed, faults=faults)
        lost, refused = [], []
        for i in range(30):
            status = stage.x.set(float(i % 10))
            refused.append(status.exception() is not None)
            stage.trigger()
            lost.append(bool(np.isnan(stage.saxs.counts.get()).all()))
        return lost, refused

    first = pattern(3)
    assert first == pattern(3)
    assert first != pattern(4)
    assert 5 < sum(first[0]) < 25 and 5 < sum(first[1]) < 25


def test_reseed_restarts_the_noise(film: FilmMap) -> None:
    stage = SimSampleStage("stage", truth=film, seed=1)
    first = [stage.trigger() and stage.saxs.counts.get().copy() for _ in range(2)]
    stage.reseed(1)
    again = [stage.trigger() and stage.saxs.counts.get().copy() for _ in range(2)]
    np.testing.assert_array_equal(first, again)


def test_custom_geometry_sets_the_frame_shape(RE) -> None:
    stage = SimSampleStage("stage", truth=SmoothMap(seed=0),
                           geometry=DetectorGeometry(n_pixels=48, q_max=0.07))
    RE(bp.count([stage.saxs]))
    (descriptor,) = [doc for name, doc in RE.docs if name == "descriptor"]
    assert descriptor["data_keys"]["stage_saxs_counts"]["shape"] == [48, 48]
    assert np.asarray(events(RE.docs)[0]["data"]["stage_saxs_counts"]).shape == (48, 48)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [({"speed": 0.0}, "speed"), ({"background": -1.0}, "background"),
     ({"max_exposure": float("nan")}, "max_exposure")],
)
def test_stage_settings_are_validated(film: FilmMap, kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        SimSampleStage("stage", truth=film, **kwargs)


def test_settings_objects_are_validated() -> None:
    with pytest.raises(ValueError, match="refuse_probability"):
        StageFaults(refuse_probability=1.5)
    with pytest.raises(ValueError, match="anisotropy"):
        ScalarRing(anisotropy=1.0)

    class NoRing:
        names = ("temperature",)
        extent = (0.0, 1.0, 0.0, 1.0)

        def values(self, x, y):
            return {"temperature": np.asarray(x)}

    with pytest.raises(ValueError, match="neither all of"):
        SimSampleStage("stage", truth=NoRing())

"""Tests of models.saxs2d: the oriented-ring frame model and its reduction."""

from __future__ import annotations

import json
import math
import time

import numpy as np
import pytest

from models.errors import ModelError
from models.saxs2d import (
    REDUCED_NAMES,
    DetectorGeometry,
    ReducedFrame,
    ReductionError,
    reduce_frame,
    ring_intensity,
    ring_pixels,
)

GEOMETRY = DetectorGeometry()
FILM_LIKE = {"peak_q": 0.042, "width": 0.0045, "intensity": 1.2e4, "orientation_deg": 63.0,
             "anisotropy": 0.45, "background": 0.5}
FAINT_BROAD = {"peak_q": 0.031, "width": 0.006, "intensity": 3e3, "orientation_deg": 170.0,
               "anisotropy": 0.3, "background": 2.0}


def truth_values(params: dict[str, float]) -> dict[str, float]:
    a, theta = params["anisotropy"], math.radians(params["orientation_deg"])
    return {"peak_q": params["peak_q"], "width": params["width"],
            "intensity": params["intensity"], "orientation": params["orientation_deg"] % 180,
            "anisotropy": a, "order_x": a * math.cos(2 * theta), "order_y": a * math.sin(2 * theta),
            "background": params["background"]}


def frame(params: dict[str, float], exposure: float, seed: int) -> np.ndarray:
    rate = ring_intensity(GEOMETRY, **params)
    return np.random.default_rng(seed).poisson(rate * exposure)


def test_geometry_q_and_chi() -> None:
    g = DetectorGeometry(n_pixels=64, q_max=0.08)
    assert g.shape == (64, 64) and g.pixel_q == pytest.approx(0.0025)
    # Beam between the four central pixels; q = q_max half a pixel beyond the edge pixel centre.
    assert g.q.min() == pytest.approx(np.sqrt(0.5) * 0.0025)
    assert g.q[32, 63] == pytest.approx(np.hypot(31.5, 0.5) * 0.0025)
    assert g.q[0, 0] == pytest.approx(np.hypot(31.5, 31.5) * 0.0025)
    # chi from +x (columns) toward +y (rows).
    assert g.chi[32, 63] == pytest.approx(np.arctan2(0.5, 31.5))
    assert g.chi[63, 32] == pytest.approx(np.arctan2(31.5, 0.5))
    assert g.chi[31, 0] == pytest.approx(-np.pi + np.arctan2(0.5, 31.5))
    with pytest.raises(ValueError, match="read-only"):
        g.q[0, 0] = 1.0
    assert DetectorGeometry(n_pixels=33).q.shape == (33, 33)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [({"n_pixels": 4}, "n_pixels"), ({"n_pixels": 32.0}, "n_pixels"),
     ({"n_pixels": True}, "n_pixels"),
     ({"q_max": 0.0}, "q_max"), ({"q_max": float("nan")}, "q_max")],
)
def test_geometry_is_validated(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        DetectorGeometry(**kwargs)


def test_ring_intensity_integrates_to_intensity_and_peaks_at_orientation() -> None:
    rate = ring_intensity(GEOMETRY, **FILM_LIKE)
    assert rate.shape == (64, 64) and np.all(rate >= FILM_LIKE["background"])
    ring = rate - FILM_LIKE["background"]
    assert ring.sum() == pytest.approx(FILM_LIKE["intensity"], rel=1e-3)
    assert ring_pixels(GEOMETRY, 0.042, 0.0045) * ring.max() / (1 + 0.45) == pytest.approx(
        FILM_LIKE["intensity"], rel=0.05)
    on_ring = np.abs(GEOMETRY.q - 0.042) < 0.5 * GEOMETRY.pixel_q
    chi_max = GEOMETRY.chi[on_ring][np.argmax(ring[on_ring])]
    assert np.degrees(chi_max) % 180 == pytest.approx(63.0, abs=6.0)
    # Same ring whichever way the orientation is written (period 180 degrees).
    np.testing.assert_allclose(ring_intensity(GEOMETRY, **{**FILM_LIKE, "orientation_deg": 243.0}),
                               rate)


@pytest.mark.parametrize(
    ("name", "value"),
    [("peak_q", 0.0), ("width", -1e-3), ("intensity", -1.0), ("anisotropy", 1.0),
     ("anisotropy", -0.1), ("background", float("nan")), ("orientation_deg", float("inf")),
     ("peak_q", np.array([0.03, 0.04]))],
)
def test_ring_intensity_rejects_bad_parameters(name: str, value: object) -> None:
    with pytest.raises(ValueError, match=name):
        ring_intensity(GEOMETRY, **{**FILM_LIKE, name: value})


@pytest.mark.parametrize(("params", "exposure"), [(FILM_LIKE, 1.0), (FAINT_BROAD, 2.0)])
def test_reduction_pulls_are_standard_normal(params: dict[str, float], exposure: float) -> None:
    truth = truth_values(params)
    pulls: dict[str, list[float]] = {name: [] for name in REDUCED_NAMES}
    for seed in range(50):
        reduced = reduce_frame(frame(params, exposure, seed), exposure, GEOMETRY)
        for name in REDUCED_NAMES:
            diff = reduced.values[name] - truth[name]
            if name == "orientation":
                diff = (diff + 90.0) % 180.0 - 90.0
            pulls[name].append(diff / reduced.sigmas[name])
    for name, values in pulls.items():
        arr = np.asarray(values)
        assert abs(arr.mean()) < 0.5, (name, arr.mean())
        assert 0.7 < arr.std(ddof=1) < 1.5, (name, arr.std(ddof=1))


def test_reduced_frame_has_every_quantity_as_plain_floats() -> None:
    reduced = reduce_frame(frame(FILM_LIKE, 1.0, 0), 1.0, GEOMETRY)
    assert tuple(reduced.values) == REDUCED_NAMES == tuple(reduced.sigmas)
    assert all(type(v) is float for v in (*reduced.values.values(), *reduced.sigmas.values()))
    assert 0.0 <= reduced.values["orientation"] < 180.0
    json.dumps({"values": reduced.values, "sigmas": reduced.sigmas})
    ox, oy = reduced.values["order_x"], reduced.values["order_y"]
    assert reduced.values["anisotropy"] == pytest.approx(np.hypot(ox, oy))
    with pytest.raises(ValueError, match="same keys"):
        ReducedFrame({"peak_q": 1.0}, {})


def test_orientation_near_the_wrap_stays_in_range() -> None:
    params = {**FILM_LIKE, "orientation_deg": 179.5}
    for seed in range(10):
        reduced = reduce_frame(frame(params, 1.0, seed), 1.0, GEOMETRY)
        theta = reduced.values["orientation"]
        assert 0.0 <= theta < 180.0
        assert abs((theta - 179.5 + 90.0) % 180.0 - 90.0) < 5 * reduced.sigmas["orientation"]


def test_integer_and_float_frames_reduce_alike() -> None:
    counts = frame(FILM_LIKE, 1.0, 3)
    assert counts.dtype.kind == "i"
    as_int = reduce_frame(counts, 1.0, GEOMETRY)
    as_float = reduce_frame(counts.astype(np.float32), 1.0, GEOMETRY)
    assert as_int.values == pytest.approx(as_float.values)


def test_reduction_is_fast() -> None:
    frames = [frame(FILM_LIKE, 1.0, seed) for seed in range(30)]
    reduce_frame(frames[0], 1.0, GEOMETRY)  # geometry caches
    times = []
    for counts in frames:
        start = time.perf_counter()
        reduce_frame(counts, 1.0, GEOMETRY)
        times.append(time.perf_counter() - start)
    # ~2 ms on one core; a loose bound so a slow CI runner does not fail it.
    assert np.median(times) < 0.025


@pytest.mark.parametrize(
    ("counts", "match"),
    [
        (np.ones((32, 32)), r"counts must be a \(64, 64\) frame .* arr.shape=\(32, 32\)"),
        (np.ones(64 * 64), r"arr.shape=\(4096,\)"),
        (np.ones((64, 64), dtype=bool), "int or float dtype"),
        (np.ones((64, 64), dtype=complex), "int or float dtype"),
        (np.full((64, 64), "1"), "int or float dtype"),
        (np.where(np.eye(64, dtype=bool), np.nan, 1.0), "64 NaN or infinite pixels .* re-take"),
        (np.where(np.eye(64, dtype=bool), np.inf, 1.0), "NaN or infinite"),
        (np.where(np.eye(64, dtype=bool), -1.0, 1.0), "64 negative pixels"),
    ],
)
def test_bad_frames_raise_with_a_named_message(counts: np.ndarray, match: str) -> None:
    with pytest.raises(ReductionError, match=match):
        reduce_frame(counts, 1.0, GEOMETRY)


@pytest.mark.parametrize("exposure", [0.0, -1.0, float("nan"), float("inf"), np.ones(2), True])
def test_bad_exposure_raises(exposure: object) -> None:
    with pytest.raises(ReductionError, match="exposure"):
        reduce_frame(frame(FILM_LIKE, 1.0, 0), exposure, GEOMETRY)  # type: ignore[arg-type]


@pytest.mark.parametrize("background", [0.0, 0.5, 20.0])
def test_pure_background_has_no_ring(background: float) -> None:
    rng = np.random.default_rng(7)
    for _ in range(20):
        counts = rng.poisson(np.full((64, 64), background))
        with pytest.raises(ReductionError, match="no ring found.*exposure"):
            reduce_frame(counts, 1.0, GEOMETRY)


def test_too_faint_a_ring_is_no_ring_but_a_longer_exposure_finds_it() -> None:
    params = {**FILM_LIKE, "intensity": 50.0, "background": 1.0}
    with pytest.raises(ReductionError, match="no ring found"):
        reduce_frame(frame(params, 1.0, 0), 1.0, GEOMETRY)
    reduced = reduce_frame(frame(params, 400.0, 0), 400.0, GEOMETRY)
    assert reduced.values["intensity"] == pytest.approx(50.0, abs=5 * reduced.sigmas["intensity"])


def test_reduction_error_is_a_model_error_and_a_value_error() -> None:
    assert issubclass(ReductionError, ModelError) and issubclass(ReductionError, ValueError)
    with pytest.raises(TypeError, match="DetectorGeometry"):
        reduce_frame(frame(FILM_LIKE, 1.0, 0), 1.0, None)  # type: ignore[arg-type]

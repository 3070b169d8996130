"""Tests of simulators.frames: a simulated area detector under a RunEngine."""

from __future__ import annotations

import bluesky.plans as bp
import numpy as np
import pytest
from bluesky import RunEngine
from event_model import DocumentNames, schema_validators

from simulators.frames import SimFrameDetector


@pytest.mark.parametrize(("scene", "shape"), [("bragg", (64, 64)), ("sans", (32, 32)), ("denoise", (32, 32))])
def test_each_trigger_records_a_new_valid_frame_and_keeps_its_truth(scene, shape):
    RE = RunEngine({}, context_managers=[])
    docs = []
    RE.subscribe(lambda name, doc: docs.append((name, doc)))
    det = SimFrameDetector("det", scene=scene, shape=shape, seed=3)
    truths = []
    RE.subscribe(lambda name, doc: truths.append(det.truth) if name == "event" else None)
    RE(bp.count([det], num=2))
    for name, doc in docs:
        schema_validators[DocumentNames[name]].validate(doc)
    desc = next(d for n, d in docs if n == "descriptor")
    assert desc["data_keys"]["det_image"]["shape"] == list(shape)
    frames = [np.asarray(d["data"]["det_image"]) for n, d in docs if n == "event"]
    assert frames[0].shape == shape and not np.array_equal(frames[0], frames[1])
    assert np.all(frames[0] >= 0)
    masks = [np.asarray(d["data"]["det_mask"]) for n, d in docs if n == "event"]
    assert desc["data_keys"]["det_mask"]["shape"] == list(shape) and masks[0].dtype == np.uint8
    if scene == "sans":
        assert truths[0].fine_expected.shape == (4 * shape[0], 4 * shape[1])
        assert not masks[0].any()
    else:
        assert truths[0].expected.shape == shape
        # each mask is its frame's own (gaps, dead and hot pixels), and its pixels read 0
        for frame, mask, truth in zip(frames, masks, truths, strict=True):
            np.testing.assert_array_equal(mask.astype(bool), truth.mask)
            assert not frame[mask.astype(bool)].any()


def test_an_unknown_scene_is_named():
    with pytest.raises(ValueError, match="scene must be"):
        SimFrameDetector(scene="laue")

"""A simulated area detector: each trigger records a new frame from :mod:`simulators.detector`.

``SimFrameDetector(scene="bragg")`` is a diffractometer's detector (a 2D frame of Bragg peaks over
background, counted at a level that varies from frame to frame, through realistic detector
effects); ``scene="sans"`` a SANS detector (a coarse 2D pattern of a sasmodels sample);
``scene="denoise"`` a low-count frame of one of the denoising scenes. The frame is read inline
(``{name}_image``, an array data key with its shape in the descriptor), with its bad-pixel mask
(``{name}_mask``, uint8, 1 where a pixel is left out; it reads 0 in the frame); the truth of the last
frame stays available on the device (:attr:`SimFrameDetector.truth`) for a demo's report, never
in the documents.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from ophyd import Component as Cpt
from ophyd import Device, DeviceStatus, Signal

from simulators import detector as det

__all__ = ["SimFrameDetector"]


class _ArraySignal(Signal):
    """A read-only array signal whose descriptor carries the array's shape."""

    def describe(self) -> dict[str, Any]:
        d = super().describe()
        value = np.asarray(self.get())
        d[self.name].update({"dtype": "array", "shape": list(value.shape), "dtype_numpy": value.dtype.str})
        return d


class SimFrameDetector(Device):
    """A detector whose every trigger records one simulated frame.

    Parameters
    ----------
    name
        Device name (data key ``{name}_image``).
    scene
        ``"bragg"``, ``"sans"`` or ``"denoise"`` (not ``kind``: ophyd's ``kind`` is the signal role).
    shape
        Frame shape (``sans``: the coarse detector's).
    seed
        Seed of the frames.
    sans_kinds, factor
        ``sans`` only: the sample kinds drawn from, and the fine-to-coarse factor of the truth.
    mean_counts
        ``denoise`` only: the mean counts per pixel (``None``: 0.1, 1 or 10 in turn).
    """

    image = Cpt(_ArraySignal, value=np.zeros((2, 2), np.float32), kind="hinted")
    # the frame's bad pixels (module gaps, dead and hot pixels: 1, left out), as a detector's pixel
    # mask travels with its frames; all 0 for the SANS scene, which has no detector effects
    mask = Cpt(_ArraySignal, value=np.zeros((2, 2), np.uint8), kind="normal")

    def __init__(self, name: str = "det", *, scene: str = "bragg", shape: tuple[int, int] = (128, 128),
                 seed: int = 0, sans_kinds: tuple[str, ...] = det.SANS_HELD_OUT_KINDS, factor: int = 4,
                 mean_counts: float | None = None, **kwargs: Any) -> None:
        if scene not in ("bragg", "sans", "denoise"):
            raise ValueError(f"scene must be 'bragg', 'sans' or 'denoise', got {scene!r}")
        super().__init__(prefix="", name=name, **kwargs)
        self.scene, self.shape, self.factor = scene, tuple(shape), int(factor)
        self.sans_kinds, self.mean_counts = tuple(sans_kinds), mean_counts
        self._rng = np.random.default_rng(seed)
        self._n = 0
        self.truth: Any = None
        self.image.put(np.zeros(self.shape, np.float32))
        self.mask.put(np.zeros(self.shape, np.uint8))

    def trigger(self) -> DeviceStatus:
        frame, self.truth = self._draw()
        self._n += 1
        self.image.put(frame.astype(np.float32))
        bad = getattr(self.truth, "mask", None)
        self.mask.put(np.zeros(self.shape, np.uint8) if bad is None else np.asarray(bad, np.uint8))
        status = DeviceStatus(self)
        status.set_finished()
        return status

    def _draw(self) -> tuple[np.ndarray, Any]:
        rng = self._rng
        if self.scene == "bragg":
            recipe = det.BraggRecipe(shape=self.shape, n_peaks=(3, 12), count_scale=float(np.exp(rng.uniform(-3, 1.1))))
            s = det.bragg_frame_2d(rng, recipe, effects=det.PILATUS)
            return np.where(s.mask, 0.0, s.counts), s
        if self.scene == "sans":
            kind = self.sans_kinds[self._n % len(self.sans_kinds)]
            p = det.sans_pair(rng, kind, factor=self.factor, coarse_shape=self.shape,
                              total_counts=float(np.exp(rng.uniform(np.log(1e5), np.log(1e6)))))
            return p.coarse_counts, p
        level = self.mean_counts if self.mean_counts is not None else (0.1, 1.0, 10.0)[self._n % 3]
        kind = det.DENOISE_KINDS[self._n % len(det.DENOISE_KINDS)]
        s = det.denoise_frame(rng, kind, self.shape, level, effects=det.PILATUS)
        return np.where(s.mask, 0.0, np.maximum(s.counts, 0.0)), s

"""Image, segmentation and integration quality metrics, shared by the ML models and their baselines.

Every function takes arrays of any dimension (2D frames, 3D volumes). A ``mask`` argument follows
numpy's masked-array convention everywhere in ``models``: ``True`` marks a pixel to *leave out*
(a detector gap, a dead or hot pixel), never a pixel to keep.

References
----------
Z. Wang, A. C. Bovik, H. R. Sheikh and E. P. Simoncelli, "Image quality assessment: from error
visibility to structural similarity", IEEE Trans. Image Process. 13(4), 600-612 (2004).
"""

from __future__ import annotations

import numpy as np
from numpy.typing import ArrayLike, NDArray
from scipy import ndimage

__all__ = ["dice", "iou", "psnr", "r_factor", "ssim"]

#: SSIM constants and Gaussian window of Wang et al. (2004): K1, K2 and an 11-tap window of σ = 1.5.
_SSIM_K1 = 0.01
_SSIM_K2 = 0.03
_SSIM_SIGMA = 1.5
_SSIM_TRUNCATE = 3.5  # radius int(3.5 * 1.5 + 0.5) = 5, an 11-pixel window


def _pair(estimate: ArrayLike, truth: ArrayLike) -> tuple[NDArray[np.float64], NDArray[np.float64]]:
    est = np.asarray(estimate, dtype=np.float64)
    tru = np.asarray(truth, dtype=np.float64)
    if est.shape != tru.shape:
        raise ValueError(f"estimate and truth differ in shape: {est.shape=}, {tru.shape=}")
    if est.size == 0:
        raise ValueError(f"empty arrays: {est.shape=}")
    if not (np.isfinite(est).all() and np.isfinite(tru).all()):
        raise ValueError("estimate and truth must be finite (mask bad pixels instead)")
    return est, tru


def _keep(mask: ArrayLike | None, shape: tuple[int, ...]) -> NDArray[np.bool_]:
    if mask is None:
        return np.ones(shape, dtype=bool)
    m = np.asarray(mask)
    if m.dtype != np.bool_ or m.shape != shape:
        raise ValueError(f"mask must be a boolean array of the data's shape: {m.dtype=}, {m.shape=}")
    if m.all():
        raise ValueError("mask leaves no pixel to evaluate")
    return ~m


def _data_range(truth: NDArray[np.float64], keep: NDArray[np.bool_], data_range: float | None) -> float:
    if data_range is None:
        data_range = float(truth[keep].max() - truth[keep].min())
    if not data_range > 0:
        raise ValueError(f"data_range must be positive (a constant truth needs it given): {data_range=}")
    return float(data_range)


def psnr(
    estimate: ArrayLike,
    truth: ArrayLike,
    data_range: float | None = None,
    mask: ArrayLike | None = None,
) -> float:
    """Peak signal-to-noise ratio in dB.

    ``PSNR = 10 log10(data_range² / mean((estimate - truth)²))``, over the unmasked pixels.

    Parameters
    ----------
    estimate, truth : array_like
        Arrays of one shape.
    data_range : float, optional
        The peak value range; by default ``max(truth) - min(truth)`` over the unmasked pixels.
    mask : array_like of bool, optional
        ``True`` where a pixel is left out.

    Returns
    -------
    float
        PSNR in dB; ``inf`` when the estimate equals the truth.

    Raises
    ------
    ValueError
        Shapes differ, values are not finite, or the data range is not positive.

    Examples
    --------
    >>> round(psnr([0.0, 1.0], [0.0, 0.9]), 2)
    22.1
    """
    est, tru = _pair(estimate, truth)
    keep = _keep(mask, est.shape)
    rng = _data_range(tru, keep, data_range)
    mse = float(np.mean((est[keep] - tru[keep]) ** 2))
    return float("inf") if mse == 0.0 else float(10.0 * np.log10(rng**2 / mse))


def ssim(
    estimate: ArrayLike,
    truth: ArrayLike,
    data_range: float | None = None,
    mask: ArrayLike | None = None,
) -> float:
    """Mean structural similarity with the Gaussian window of Wang et al. (2004).

    ``SSIM = (2 μx μy + C1)(2 σxy + C2) / ((μx² + μy² + C1)(σx² + σy² + C2))`` with local moments
    from a Gaussian window of σ = 1.5 px (11 taps), ``C1 = (0.01 L)²``, ``C2 = (0.03 L)²``, ``L``
    the data range. The map is averaged over pixels at least 5 px from the border (as
    scikit-image does, ``gaussian_weights=True, use_sample_covariance=False``) and, with a mask,
    over the pixels whose whole window misses the mask.

    Parameters
    ----------
    estimate, truth : array_like
        Arrays of one shape, every side at least 11 pixels.
    data_range : float, optional
        ``L``; by default ``max(truth) - min(truth)`` over the unmasked pixels.
    mask : array_like of bool, optional
        ``True`` where a pixel is left out.

    Returns
    -------
    float
        Mean SSIM, 1 for identical arrays.

    Raises
    ------
    ValueError
        Shapes differ or are too small, values are not finite, or no pixel is left to average.
    """
    est, tru = _pair(estimate, truth)
    keep = _keep(mask, est.shape)
    radius = int(_SSIM_TRUNCATE * _SSIM_SIGMA + 0.5)
    if min(est.shape) < 2 * radius + 1:
        raise ValueError(f"every side must be at least {2 * radius + 1} pixels: {est.shape=}")
    L = _data_range(tru, keep, data_range)
    c1, c2 = (_SSIM_K1 * L) ** 2, (_SSIM_K2 * L) ** 2
    # masked pixels are zeroed so they cannot leak NaN or outliers; their windows are excluded below
    est, tru = np.where(keep, est, 0.0), np.where(keep, tru, 0.0)

    def blur(a: NDArray[np.float64]) -> NDArray[np.float64]:
        return ndimage.gaussian_filter(a, _SSIM_SIGMA, truncate=_SSIM_TRUNCATE, mode="reflect")

    mx, my = blur(est), blur(tru)
    vx = blur(est * est) - mx * mx
    vy = blur(tru * tru) - my * my
    cxy = blur(est * tru) - mx * my
    smap = ((2 * mx * my + c1) * (2 * cxy + c2)) / ((mx**2 + my**2 + c1) * (vx + vy + c2))
    valid = ndimage.binary_erosion(keep, np.ones((2 * radius + 1,) * est.ndim, dtype=bool),
                                   border_value=0)
    if not valid.any():
        raise ValueError("no pixel has its whole SSIM window inside the frame and off the mask")
    return float(smap[valid].mean())


def _bool_pair(a: ArrayLike, b: ArrayLike, valid: ArrayLike | None = None
               ) -> tuple[NDArray[np.bool_], NDArray[np.bool_]]:
    x, y = np.asarray(a), np.asarray(b)
    if x.dtype != np.bool_ or y.dtype != np.bool_:
        raise ValueError(f"masks must be boolean: {x.dtype=}, {y.dtype=}")
    if x.shape != y.shape:
        raise ValueError(f"masks differ in shape: {x.shape=}, {y.shape=}")
    if valid is not None:
        v = np.asarray(valid)
        if v.dtype != np.bool_ or v.shape != x.shape:
            raise ValueError(f"valid must be boolean and of the masks' shape: {v.dtype=}, {v.shape=}, {x.shape=}")
        x, y = x & v, y & v
    return x, y


def dice(a: ArrayLike, b: ArrayLike, valid: ArrayLike | None = None) -> float:
    """Dice coefficient ``2 |A ∩ B| / (|A| + |B|)`` of two boolean masks; 1 when both are empty.

    ``valid`` (boolean, the masks' shape): count only these pixels, e.g. the ones a detector
    measures (its module gaps and dead pixels carry no counts to segment).

    Raises
    ------
    ValueError
        The masks (or ``valid``) are not boolean or differ in shape.
    """
    x, y = _bool_pair(a, b, valid)
    total = int(x.sum()) + int(y.sum())
    return 1.0 if total == 0 else 2.0 * int((x & y).sum()) / total


def iou(a: ArrayLike, b: ArrayLike, valid: ArrayLike | None = None) -> float:
    """Intersection over union (Jaccard index) ``|A ∩ B| / |A ∪ B|``; 1 when both are empty.

    ``valid``: as for :func:`dice`.

    Raises
    ------
    ValueError
        The masks (or ``valid``) are not boolean or differ in shape.
    """
    x, y = _bool_pair(a, b, valid)
    union = int((x | y).sum())
    return 1.0 if union == 0 else int((x & y).sum()) / union


def r_factor(I_est: ArrayLike, I_true: ArrayLike) -> float:
    """Crystallographic R factor ``R = Σ |I_est - I_true| / Σ I_true``.

    Parameters
    ----------
    I_est, I_true : array_like
        Integrated intensities of the same peaks, ``n``.

    Raises
    ------
    ValueError
        Shapes differ, values are not finite, or ``Σ I_true`` is not positive.
    """
    est, tru = _pair(I_est, I_true)
    total = float(tru.sum())
    if not total > 0:
        raise ValueError(f"sum of I_true must be positive: {total=}")
    return float(np.abs(est - tru).sum() / total)

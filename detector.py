"""The circle detector of §5.5, and how combed the detected positions are.

The authors' detector ("edge detection with OpenCV", §5.5) is not published; this is ours.
  * threshold the uint8 image at mid-grey (>= 128) and label 8-connected components (OpenCV);
  * the expected disc is what ``toy_circles.render_disc`` draws at that image size: radius
    r = ``radius_for(S)``, A lit pixels (21 at 64 px, r = 2; 5 at 32 px, r = 1);
  * a component is a DISC if 0.5 A <= area <= 2 A and its bounding box is at most (2r+1)+2 px
    wide and high; a SPECK if it fits that box but area < 0.5 A (ignored when counting, reported
    as the rate ``speck``); anything larger or elongated is a BLOB (a grey/white background, a
    stripe, a large blob) - without this rule a uniform grey image would be "one disc at z = 0.5";
  * each image falls in exactly one category: ``blob`` (any blob component), else ``zero_disc``,
    ``one_disc`` or ``two_plus_disc`` by its number of discs (the four sum to 1);
  * z = x_centroid / (S - 1) of the disc of each one-disc image.
  * ``comb_strength``: how much the histogram of detected disc columns oscillates with a period
    of 2, 4 or 8 pixels (the periods of 1, 2, 3 stride-2 downsamplings in a classifier).
"""
from __future__ import annotations

import functools

import cv2
import numpy as np

from toy_circles import radius_for, render_disc


THRESHOLD = 128  # mid-grey: training pixels are exactly 0 or 255


@functools.lru_cache(maxsize=None)
def expected_disc(size: int) -> tuple[int, int]:
    """(radius, lit pixels) of the disc ``toy_circles.render_disc`` draws at this image size."""
    return radius_for(size), int((render_disc(size // 2, size // 2, size) >= THRESHOLD).sum())


def components(img: np.ndarray, threshold: int = THRESHOLD):
    """Classify the bright components of one uint8 image (H, W) or (H, W, C).

    Returns (disc centres (x, y) as a [k, 2] array, number of specks, number of blobs); the rule
    is in the module docstring."""
    img = np.asarray(img)
    if img.ndim == 3:
        img = img.mean(-1).astype(np.uint8)
    mask = (img >= threshold).astype(np.uint8)
    _, _, stats, centroids = cv2.connectedComponentsWithStats(mask, connectivity=8)
    discs, specks, blobs = [], 0, 0
    for (_, _, w, h, a), c in zip(stats[1:], centroids[1:]):  # label 0 is the background
        kind = component_kind(w, h, a, img.shape[1])
        if kind == "blob":
            blobs += 1
        elif kind == "speck":
            specks += 1
        else:
            discs.append(c)
    return np.asarray(discs, dtype=np.float64).reshape(-1, 2), specks, blobs


def component_kind(w: int, h: int, area: int, size: int) -> str:
    """disc, speck or blob: one component of bounding box w x h and ``area`` lit pixels in an
    image of ``size`` px (the rule in the module docstring)."""
    r, expected = expected_disc(size)
    box = (2 * r + 1) + 2  # the disc's extent plus one pixel of slack on each side
    if w > box or h > box or area > 2 * expected:
        return "blob"
    return "speck" if area < 0.5 * expected else "disc"


def detect_discs(img: np.ndarray, threshold: int = THRESHOLD) -> np.ndarray:
    """Centres (x, y) of the disc components of one image, shape [k, 2] (specks and blobs dropped)."""
    return components(img, threshold)[0]


def circle_stats(images: np.ndarray, lo: float = 0.2, hi: float = 0.8) -> dict:
    """Detector statistics over a batch of uint8 images [N, H, W(, C)].

    ``z`` and ``columns`` (rounded centre x) list the one-disc samples, in order."""
    size = images.shape[2]
    discs, has_speck, zs = [], [], []
    for im in images:
        c, specks, blobs = components(im)
        discs.append(-1 if blobs else len(c))  # -1: blob, which overrides any disc count
        has_speck.append(specks > 0)
        if len(c) == 1 and not blobs:
            zs.append(c[0, 0] / (size - 1))
    discs, zs = np.array(discs), np.array(zs, dtype=np.float64)
    n = len(images)
    middle = int(((zs >= lo) & (zs <= hi)).sum())
    return {"n": n, "one_disc": float((discs == 1).mean()), "blob": float((discs == -1).mean()),
            "zero_disc": float((discs == 0).mean()), "two_plus_disc": float((discs >= 2).mean()),
            "zero_or_two": float(((discs == 0) | (discs >= 2)).mean()),
            "speck": float(np.mean(has_speck)),              # images with >= 1 speck (any category)
            "accuracy": float(middle / n),                   # one disc AND z in [lo, hi]
            "middle_of_detected": float(middle / max(1, len(zs))), "hist_n": len(zs), "z": zs,
            "columns": np.rint(zs * (size - 1)).astype(int).tolist()}


def comb_strength(columns, period: int) -> float:
    """How much a histogram of integer disc columns oscillates with ``period`` pixels: the modulus
    of its discrete Fourier coefficient at frequency 1/period, divided by the count,
        |sum_x n_x exp(-2 pi i x / period)| / sum_x n_x   in [0, 1].
    1: every disc sits on the same column modulo ``period``; a smooth histogram spread over
    many periods gives ~0 (plus sampling noise of order 1/sqrt(count)). Two stride-2
    downsamplings in a classifier can prefer columns modulo 2 and 4 (issue: the "comb")."""
    x = np.asarray(columns, dtype=np.float64)
    if not len(x):
        return float("nan")
    return float(abs(np.exp(-2j * np.pi * x / period).sum()) / len(x))


def middle_comb(columns, size: int, lo: float = 0.2, hi: float = 0.8) -> dict:
    """comb_2, comb_4, comb_8 of the columns inside the unseen middle z in [lo, hi] (NaN if none):
    the periods of 1, 2 and 3 stride-2 downsamplings (the cpu classifier has 2 at 32 px, 3 at 64)."""
    c = np.asarray(columns)
    c = c[(c >= lo * (size - 1)) & (c <= hi * (size - 1))]
    return {**{f"comb_{p}": comb_strength(c, p) for p in (2, 4, 8)}, "comb_n": int(len(c))}

"""Evaluation of §5.5 (circles) and the histogram metrics of §5 / App. B.

    python evaluate.py --run runs/circles            # samples 512 per method, writes metrics + PNGs

Methods: ``uncond`` (no guidance), ``multi`` (multi-guidance, lambda = [30, 30], plain classifier),
``multi_sn`` (same with the spectral-norm classifier). For each, 512 samples are drawn (or read
back from ``<run>/eval_<method>.npz`` if present with the same settings) and measured with:

Circle detector (the authors' code has none; ours): threshold the uint8 image at mid-grey (>= 128),
label 8-connected components with OpenCV, and take each component's centroid as a disc centre,
z = x_centroid / (S - 1). A sample "has one disc" if exactly one component is found;
accuracy = fraction of *all* samples with exactly one disc whose z is in [0.2, 0.8] (faded or
doubled samples count as failures).

Histogram metrics vs uniform (App. B), on 100 bins over [0, 1]:
  "MSE" = sqrt(sum_i (h_i - 1/n)^2)  (the paper's name; it is an L2 distance),
  KLD   = KL(h || U) = sum_i h_i log(h_i n), empty bins contributing 0.
"""
from __future__ import annotations

import argparse
import json
import os
import time

import cv2
import numpy as np
import torch

# ----------------------------------------------------------------------------------------------
# Detector
# ----------------------------------------------------------------------------------------------


def detect_discs(img: np.ndarray, threshold: int = 128) -> np.ndarray:
    """Centres (x, y) of the bright blobs of one uint8 image (H, W) or (H, W, 1); shape [k, 2]."""
    img = np.asarray(img)
    if img.ndim == 3:
        img = img.mean(-1).astype(np.uint8)
    mask = (img >= threshold).astype(np.uint8)
    n, _, _, centroids = cv2.connectedComponentsWithStats(mask, connectivity=8)
    return centroids[1:]  # label 0 is the background


def circle_stats(images: np.ndarray, lo: float = 0.2, hi: float = 0.8) -> dict:
    """Detector statistics over a batch of uint8 images [N, H, W(, C)]."""
    size = images.shape[2]
    counts, zs = [], []
    for im in images:
        c = detect_discs(im)
        counts.append(len(c))
        if len(c) == 1:
            zs.append(c[0, 0] / (size - 1))
    counts, zs = np.array(counts), np.array(zs)
    n = len(images)
    middle = ((zs >= lo) & (zs <= hi)).sum() if len(zs) else 0
    return {"n": n, "one_disc": float((counts == 1).mean()), "zero_disc": float((counts == 0).mean()),
            "two_plus_disc": float((counts >= 2).mean()),
            "zero_or_two": float(((counts == 0) | (counts == 2)).mean()),
            "accuracy": float(middle / n),              # one disc AND z in [lo, hi]
            "middle_of_detected": float(middle / max(1, len(zs))), "z": zs}


# ----------------------------------------------------------------------------------------------
# Histogram metrics (App. B)
# ----------------------------------------------------------------------------------------------


def histogram(values, bins: int = 100, lo: float = 0.0, hi: float = 1.0) -> np.ndarray:
    """Normalised histogram (sums to 1) of values in [lo, hi]."""
    h, _ = np.histogram(np.clip(values, lo, hi), bins=bins, range=(lo, hi))
    return h / max(1, h.sum())


def hist_mse(h: np.ndarray) -> float:
    """The paper's "MSE" against uniform: sqrt(sum_i (h_i - 1/n)^2)."""
    h = np.asarray(h, dtype=np.float64)
    return float(np.sqrt(((h - 1.0 / len(h)) ** 2).sum()))


def hist_kld(h: np.ndarray) -> float:
    """Forward KL(h || U) = sum_i h_i log(h_i / (1/n)); empty bins add 0 (App. B)."""
    h = np.asarray(h, dtype=np.float64)
    nz = h > 0
    return float((h[nz] * np.log(h[nz] * len(h))).sum())

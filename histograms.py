"""The histogram metrics of App. B: how far a histogram of latents in [0, 1] is from uniform.

Both evaluations use them: evaluate.py on the detected disc positions z of the circles (§5.5) and
evaluate_faces.py on the evaluation classifier's calibrated p of the faces (§5.1, §5.3, §6).
On n bins with normalised counts h_i:
  "MSE" = sqrt(sum_i (h_i - 1/n)^2)   (the paper's name; it is an L2 distance),
  KLD   = KL(h || U) = sum_i h_i log(h_i n), empty bins contributing 0.
"""
from __future__ import annotations

import numpy as np


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

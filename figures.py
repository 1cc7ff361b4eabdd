"""The paper's evaluation figures, drawn from measured numbers (no model is run here).

  plot_histograms   Fig. 5 / 7a, circles: histogram of the detected disc position z per method
  plot_heatmaps     Fig. 7b, circles: P(right | disc at (x, y), t) of each classifier
  plot_hist_p       Fig. 5, CelebA: histogram of the calibrated P(attribute) per method
  plot_heatmap_2d   §6, Fig. 9: counts of (p_1, p_2) for two attributes
  plot_sweep        §5.3: histogram distance to uniform against the guidance scale lambda
``pyplot()`` is matplotlib with the file-only Agg backend (no display is needed or opened), which
every module that writes a PNG uses.
"""
from __future__ import annotations

import numpy as np


def pyplot():
    """matplotlib.pyplot on the Agg backend: figures go to files, never to a window."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def save(fig, path: str, dpi: int = 120, tight: bool = False) -> None:
    if tight:  # packs the axes (tight_layout) before writing
        fig.tight_layout()
    fig.savefig(path, dpi=dpi)
    pyplot().close(fig)


def plot_histograms(stats: dict, path: str, delta: float = 0.2) -> None:
    """Fig. 5 style: distribution of detected z per method, log-scaled counts."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 3.5))
    bins = np.linspace(0, 1, 101)
    for name, s in stats.items():
        if len(s["z"]):
            ax.hist(s["z"], bins=bins, histtype="step", lw=1.5,
                    label=f"{name} (n = {s['hist_n']} one-disc samples, acc {s['accuracy']:.0%}, "
                          f"MSE {s['hist_mse']:.2f}, KLD {s['hist_kld']:.2f})")
    for lo, hi in ((0, delta), (1 - delta, 1)):
        ax.axvspan(lo, hi, color="green", alpha=0.08)
    ax.set_yscale("log")
    ax.set_xlabel("z = normalised x of the detected disc (shaded: training regions)")
    ax.set_ylabel("count")
    ax.legend(fontsize=7)
    save(fig, path, tight=True)


def plot_heatmaps(heats: dict, path: str, delta: float = 0.2) -> None:
    """heats: {(classifier name, t): heatmap}; one column per classifier, one row per t."""
    plt = pyplot()
    names = sorted({k[0] for k in heats})
    ts = sorted({k[1] for k in heats})
    fig, axes = plt.subplots(len(ts), len(names), figsize=(3.8 * len(names), 3.4 * len(ts)), squeeze=False)
    for (name, t), h in heats.items():
        ax = axes[ts.index(t)][names.index(name)]
        im = ax.imshow(h, vmin=0, vmax=1, cmap="viridis", origin="upper")
        for z in (delta, 1 - delta):
            ax.axvline(z * (h.shape[0] - 1), color="lime", lw=1)
        ax.set_title(f"{name}: P(right | disc at (x, y), t={t})", fontsize=8)
        ax.set_xlabel("x")
        ax.set_ylabel("y")
    fig.colorbar(im, ax=axes.ravel().tolist(), shrink=0.8)
    save(fig, path)


def plot_hist_p(probs: dict, metrics: dict, path: str) -> None:
    """Fig. 5 style: distribution of calibrated p per row, log counts; one panel per attribute."""
    plt = pyplot()
    attrs = list(next(iter(probs.values())))
    fig, axes = plt.subplots(1, len(attrs), figsize=(7 * len(attrs), 3.6), squeeze=False)
    bins = np.linspace(0, 1, 101)
    for ax, a in zip(axes[0], attrs):
        sfx = f"_{a}" if len(attrs) > 1 else ""
        for name, pr in probs.items():
            m = metrics[name]
            ax.hist(pr[a], bins=bins, histtype="step", lw=1.5, density=True,
                    label=f"{name} (n {m['n']}, MSE {m['hist_mse' + sfx]:.2f}, KLD {m['hist_kld' + sfx]:.2f}, "
                          f"[0.3,0.7] {m['frac_03_07' + sfx]:.1%})")
        ax.axhline(1.0, color="grey", lw=0.8, ls=":")
        ax.set(yscale="log", xlabel=f"calibrated p({a} = 1 | x)", ylabel="density")
        ax.legend(fontsize=7)
    save(fig, path, tight=True)


def plot_heatmap_2d(counts, attrs, path: str, title: str = "", quantity: str = "p") -> None:
    """§6, Fig. 9: log counts of (p_1, p_2) (or of another ``quantity`` in [0, 1]) on a 20 x 20 grid."""
    plt = pyplot()
    c = np.asarray(counts, dtype=np.float64)
    fig, ax = plt.subplots(figsize=(4.6, 4))
    im = ax.imshow(np.log10(c + 1), origin="lower", extent=[0, 1, 0, 1], cmap="viridis")
    ax.set(ylabel=f"{quantity}({attrs[0]})", xlabel=f"{quantity}({attrs[1]})", title=title or "log10(1 + count)")
    for v in (0.3, 0.7):
        ax.axhline(v, color="w", lw=0.6, ls="--")
        ax.axvline(v, color="w", lw=0.6, ls="--")
    fig.colorbar(im, ax=ax)
    save(fig, path, tight=True)


def plot_sweep(sweep: dict, path: str) -> None:
    plt = pyplot()
    lams = sorted(sweep, key=float)
    fig, ax = plt.subplots(1, 2, figsize=(8, 3.2))
    for a, key in zip(ax, ("hist_mse", "hist_kld")):
        keys = [k for k in sweep[lams[0]] if k.startswith(key)]
        for kk in keys:
            a.plot([float(l) for l in lams], [sweep[l][kk] for l in lams], "o-", label=kk)
        a.set(xscale="log", xlabel="lambda (every class)", ylabel=key.replace("hist_", "") + " to uniform")
        a.legend(fontsize=7)
    save(fig, path, tight=True)

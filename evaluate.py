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

from checkpoint import UserError

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


# ----------------------------------------------------------------------------------------------
# Sampling per method, cached as <run>/eval_<method>.npz
# ----------------------------------------------------------------------------------------------

METHODS = {  # name -> (guidance, classifier)
    "uncond": ("none", None),
    "multi": ("multi", "classifier"),
    "multi_sn": ("multi", "classifier_sn"),
}
# Paper §5.5 (mean ± std over 10 classifiers); None where the paper gives no number.
PAPER = {"multi": {"accuracy": (0.78, 0.087), "zero_or_two": (0.0425, 0.0245)},
         "multi_sn": {"accuracy": (0.75, 0.133)}}


def method_samples(run, method, n, batch_size, seed, lambdas, steps, device, models, resample=False):
    """uint8 samples of one method, read from the cache if it was made with the same settings."""
    from checkpoint import ckpt_path
    from sample import generate, to_uint8
    guidance, clf = METHODS[method]
    stamp = [os.path.getmtime(ckpt_path(run, "ddpm"))] + \
        ([os.path.getmtime(ckpt_path(run, clf))] if clf else [])
    settings = json.dumps({"n": n, "seed": seed, "lambdas": lambdas if clf else None,
                           "steps": steps, "stamp": stamp})
    path = os.path.join(run, f"eval_{method}.npz")
    if not resample and os.path.exists(path):
        z = np.load(path)
        if str(z["settings"]) == settings:
            return z["images"], float(z["seconds"]), True
    t0 = time.time()
    x = generate(run, n, batch_size, seed, device, steps, guidance, lambdas, classifier=clf or "classifier",
                 progress=True, models=models)
    seconds = time.time() - t0
    images = to_uint8(x)
    np.savez_compressed(path, images=images, settings=settings, seconds=seconds)
    return images, seconds, False


def summarize(images) -> dict:
    s = circle_stats(images)
    h = histogram(s["z"])
    s.update(hist_mse=hist_mse(h), hist_kld=hist_kld(h))
    return s


# ----------------------------------------------------------------------------------------------
# Figures
# ----------------------------------------------------------------------------------------------


def plot_histograms(stats: dict, path: str, delta: float = 0.2) -> None:
    """Fig. 5 style: distribution of detected z per method, log-scaled counts."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(7, 3.5))
    bins = np.linspace(0, 1, 101)
    for name, s in stats.items():
        if len(s["z"]):
            ax.hist(s["z"], bins=bins, histtype="step", lw=1.5,
                    label=f"{name} (acc {s['accuracy']:.0%}, MSE {s['hist_mse']:.2f}, KLD {s['hist_kld']:.2f})")
    for lo, hi in ((0, delta), (1 - delta, 1)):
        ax.axvspan(lo, hi, color="green", alpha=0.08)
    ax.set_yscale("log")
    ax.set_xlabel("z = normalised x of the detected disc (shaded: training regions)")
    ax.set_ylabel("count")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


@torch.no_grad()
def classifier_heatmap(clf, size: int, t: int = 0, diffusion=None, draws: int = 4, device="cpu",
                       seed: int = 0) -> np.ndarray:
    """P(class 1 = right | disc centred at (x, y), t) for every valid centre (Fig. 7b).

    At t = 0 the clean image is classified; at t > 0 the probability is averaged over ``draws``
    noisy versions q(x_t | x_0) - the inputs guidance actually differentiates."""
    from toy_circles import radius_for, render_disc
    r = radius_for(size)
    gen = torch.Generator().manual_seed(seed)
    heat = np.full((size, size), np.nan)
    coords = [(x, y) for y in range(r, size - r) for x in range(r, size - r)]
    for i in range(0, len(coords), 256):
        chunk = coords[i:i + 256]
        imgs = np.stack([render_disc(x, y, size) for x, y in chunk])
        x0 = torch.from_numpy(imgs).float().div(127.5).sub(1)[:, None].repeat(1, clf.channels, 1, 1)
        tt = torch.full((len(chunk),), t, dtype=torch.long)
        p = 0
        for _ in range(draws if t > 0 else 1):
            xt = x0 if t == 0 else diffusion.q_sample(x0, tt, torch.randn(x0.shape, generator=gen))
            p = p + torch.softmax(clf(xt.to(device), tt.to(device)), -1)[:, 1].cpu()
        for (x, y), v in zip(chunk, (p / (draws if t > 0 else 1)).numpy()):
            heat[y, x] = v
    return heat


def plot_heatmaps(heats: dict, path: str, delta: float = 0.2) -> None:
    """heats: {(classifier name, t): heatmap}; one column per classifier, one row per t."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
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
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ----------------------------------------------------------------------------------------------
# CLI
# ----------------------------------------------------------------------------------------------


def format_table(metrics: dict) -> str:
    cols = ["one_disc", "zero_disc", "two_plus_disc", "zero_or_two", "accuracy", "hist_mse", "hist_kld"]
    lines = [f"{'method':<10}" + "".join(f"{c:>14}" for c in cols) + "   paper (§5.5)"]
    for name, m in metrics.items():
        paper = "; ".join(f"{k} {v[0]:.1%} ± {v[1]:.1%}" for k, v in PAPER.get(name, {}).items())
        lines.append(f"{name:<10}" + "".join(
            f"{m[c]:>14.1%}" if c not in ("hist_mse", "hist_kld") else f"{m[c]:>14.3f}" for c in cols)
            + "   " + (paper or "-"))
    return "\n".join(lines)


def evaluate_run(run, n=512, batch_size=256, seed=0, lambdas="30,30", steps=None,
                 methods=("uncond", "multi", "multi_sn"), device=None, resample=False, figures=True,
                 write_metrics=True, log=print) -> dict:
    """Sample (or read back) every method, measure it, and write metrics.json and the figures."""
    from checkpoint import pick_device
    from sample import load_classifier, load_ddpm, save_grid
    device = device or pick_device()
    models = load_ddpm(run, device)
    cfg = models[1]
    if cfg["data"].dataset != "circles":
        raise UserError(f"evaluate.py measures circles runs; {run} holds {cfg['data'].dataset}")
    delta = cfg["data"].delta
    stats, metrics = {}, {}
    for m in methods:
        if m not in METHODS:
            raise UserError(f"unknown method {m!r}; choose from {', '.join(METHODS)}")
        images, seconds, cached = method_samples(run, m, n, batch_size, seed, lambdas, steps, device,
                                                 models, resample)
        log(f"{m}: {len(images)} samples {'read from cache' if cached else f'in {seconds:.0f} s'}")
        stats[m] = summarize(images)
        metrics[m] = {k: v for k, v in stats[m].items() if k != "z"}
        metrics[m]["sample_seconds"] = seconds
        if figures:
            x = torch.from_numpy(images[:64]).permute(0, 3, 1, 2).float().div(127.5).sub(1)
            save_grid(x, os.path.join(run, f"grid_{m}.png"), marks=True, delta=delta)
    if figures:
        plot_histograms(stats, os.path.join(run, "hist_z.png"), delta)
        from diffusion import GaussianDiffusion
        diffusion = GaussianDiffusion.from_config(cfg["diffusion"])
        heats = {}
        for name in ("classifier", "classifier_sn"):
            if os.path.exists(os.path.join(run, f"{name}.pt")):
                clf = load_classifier(run, name, device, cfg)
                for t in (0, diffusion.T // 2):  # clean (Fig. 7b) and mid-noise, where guidance acts
                    heats[(name, t)] = classifier_heatmap(clf, cfg["data"].image_size, t, diffusion,
                                                          device=device)
        if heats:
            plot_heatmaps(heats, os.path.join(run, "heatmap_classifiers.png"), delta)
    if write_metrics:
        with open(os.path.join(run, "metrics.json"), "w") as f:
            json.dump(metrics, f, indent=2)
    return metrics


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", default="runs/circles")
    p.add_argument("--n", type=int, default=512, help="samples per method")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--lambdas", default="30,30", help="multi-guidance lambdas (one per class)")
    p.add_argument("--steps", type=int, default=None, help="respaced sampling steps (default: config)")
    p.add_argument("--methods", default="uncond,multi,multi_sn")
    p.add_argument("--device", default=None)
    p.add_argument("--resample", action="store_true", help="ignore cached eval_*.npz samples")
    a = p.parse_args(argv)
    from checkpoint import pick_device
    device = pick_device(a.device)
    if device.type == "cpu":
        torch.set_num_threads(os.cpu_count() or 1)
    t0 = time.time()
    metrics = evaluate_run(a.run, a.n, a.batch_size, a.seed, a.lambdas, a.steps,
                           [m.strip() for m in a.methods.split(",") if m.strip()], device, a.resample)
    print(format_table(metrics))
    print(f"evaluated in {time.time() - t0:.0f} s; wrote {os.path.join(a.run, 'metrics.json')}, "
          f"grid_*.png, hist_z.png, heatmap_classifiers.png in {a.run}")


if __name__ == "__main__":
    from checkpoint import cli
    cli(main)

"""Evaluation of §5.5 (circles) and the histogram metrics of §5 / App. B.

    python evaluate.py --run runs/circles            # samples 512 per method, writes metrics + PNGs
    python evaluate.py --run runs/circles --sampler ddim --eta 0   # the same with DDIM steps
    python evaluate.py --run runs/circles --guidance-at mu         # guidance gradient at mu_theta (§2.2)

A CelebA run (--dataset celeba) is measured by evaluate_faces.py instead (§5.1, §5.3 --sweep, §6,
App. H; its flags are the "CelebA runs" group below).

Methods: ``uncond`` (no guidance), ``multi`` (multi-guidance, lambda = [30, 30], plain classifier),
``multi_sn`` (same with the spectral-norm classifier), ``cfg`` (classifier-free multi-guidance, App. J,
Eq. 12, lambda = the mean of --lambdas, weights --cfg-form; only for a DDPM trained with
--class-cond, whose ``uncond`` row is its null label). By default every method whose checkpoints
exist is evaluated (the others are skipped with a one-line note); methods named with --methods must
exist. For each, 512 samples are drawn (or read back from ``<run>/eval_<method>.npz`` if present
with the same settings) and measured with:

The circle detector (detector.py) gives each sample one category (blob, zero_disc, one_disc,
two_plus_disc) and the one-disc samples' z = x / (S - 1).
accuracy = fraction of *all* samples that are one_disc with z in [0.2, 0.8] (§5.5); zero_or_two =
zero_disc + two_plus_disc, every non-blob failure (the paper's "zero or two circles").

Histogram metrics vs uniform (App. B, histograms.py), on 100 bins over [0, 1], of the z of the
one-disc samples only (``hist_n`` of them; NaN when there are none):
  "MSE" = sqrt(sum_i (h_i - 1/n)^2)  (the paper's name; it is an L2 distance),
  KLD   = KL(h || U) = sum_i h_i log(h_i n), empty bins contributing 0.

metrics.json: {method: {n, one_disc, blob, zero_disc, two_plus_disc, zero_or_two, speck, accuracy,
middle_of_detected, hist_n, hist_mse, hist_kld, comb_2, comb_4, comb_8, comb_n (period-2, -4 and
-8 strength of the middle columns, see comb_strength), column_counts {centre column: samples},
sample_seconds, batch_size, device, sampler, eta, guidance_at, classifier}}, fractions in [0, 1]. guidance_at (xt | mu,
see diffusion.GaussianDiffusion.guidance_point) applies to the classifier-guided methods; uncond
and cfg record xt. classifier is the guiding one (null for the unguided rows and cfg). The cfg row
also records lambdas, cfg_form, cfg_lambda, cfg_class_weights, cfg_null_weight and
cfg_average_weight (classifier_free.describe).

``method_samples``, ``summarize`` and ``metrics_of`` are what other evaluations reuse (the lab's
rows with a closed-form score or classifier, lab/exact_score.py).
batch_size and device are recorded (and keyed in the cache) because the noise each sample gets
depends on them: one seeded generator runs through the batches.
"""
from __future__ import annotations

import argparse
import json
import os
import time
from collections import Counter

import numpy as np
import torch

import config as C
from checkpoint import UserError, ckpt_path, from_uint8, to_uint8
from detector import circle_stats, middle_comb
from figures import plot_heatmaps, plot_histograms
from histograms import hist_kld, hist_mse, histogram
from rundir import check_run_writable, load_npz, save_npz, select_methods, write_json
from toy_circles import radius_for, render_disc, training_edges

# ----------------------------------------------------------------------------------------------
# Sampling per method, cached as <run>/eval_<method>.npz
# ----------------------------------------------------------------------------------------------

METHODS = {  # name -> (guidance, classifier)
    "uncond": ("none", None),
    "multi": ("multi", "classifier"),
    "multi_sn": ("multi", "classifier_sn"),
}
DEFAULT_METHODS = (*METHODS, "cfg")  # cfg only for a class-conditional DDPM (select_methods)
# Classifier-free multi-guidance (App. J, classifier_free.py): the DDPM's own labels guide, so no
# classifier.
METHODS["cfg"] = ("cfg", None)
# Paper §5.5 (mean ± std over 10 classifiers); None where the paper gives no number.
PAPER = {"multi": {"accuracy": (0.78, 0.087), "zero_or_two": (0.0425, 0.0245)},
         "multi_sn": {"accuracy": (0.75, 0.133)}}


def method_samples(run, method, n, batch_size, seed, lambdas, steps, device, models, resample=False,
                   sampler="ancestral", eta=0.0, guidance_at="xt", cfg_form="affine", spec=None, key=None):
    """uint8 samples of one method, read from the cache if it was made with the same settings.

    ``spec`` = (guidance, classifier) of a method that is not in METHODS, a caller's own row: the
    classifier a checkpoint name of the run or a classifier module, ``models`` = (network, cfg) the
    network to sample. ``key``: extra entries of the cache key that tell its samples apart from
    those of the run's own networks (a module has no checkpoint whose time stamp would)."""
    from sample import generate
    guidance, clf = spec or METHODS[method]
    stamp = [os.path.getmtime(ckpt_path(run, "ddpm"))] + \
        ([os.path.getmtime(ckpt_path(run, clf))] if isinstance(clf, str) else [])
    settings = json.dumps({"n": n, "seed": seed, "lambdas": lambdas if guidance != "none" else None,
                           "steps": steps, "stamp": stamp, "batch_size": batch_size,
                           "device": torch.device(device).type}
                          # Entries only where they differ from the default: the key of ancestral
                          # samples guided at x_t stays what it is.
                          | ({"sampler": sampler, "eta": eta} if sampler != "ancestral" else {})
                          | ({"guidance_at": guidance_at} if clf and guidance_at != "xt" else {})
                          | (key or {})
                          | ({"cfg_form": cfg_form} if guidance == "cfg" else {}))
    # One cache file per sampler, so that DDIM and ancestral samples of a method do not evict each other.
    tag = "" if sampler == "ancestral" else f"_ddim_eta{eta:g}"
    path = os.path.join(run, f"eval_{method}{tag}.npz")
    z = None if resample else load_npz(path)
    if z is not None and str(z.get("settings")) == settings and "images" in z:
        return z["images"], float(z.get("seconds", 0.0)), True
    t0 = time.time()
    x = generate(run, n, batch_size, seed, device, steps, guidance, lambdas, classifier=clf or "classifier",
                 progress=True, models=models, sampler=sampler, eta=eta,
                 guidance_at=guidance_at if clf else "xt", cfg_form=cfg_form)
    seconds = time.time() - t0
    images = to_uint8(x)
    save_npz(path, images=images, settings=settings, seconds=seconds)
    return images, seconds, False


def summarize(images) -> dict:
    """circle_stats plus the histogram metrics of the one-disc z (NaN if there is none: an empty
    histogram would otherwise score a perfect-looking KLD of 0)."""
    s = circle_stats(images)
    h = histogram(s["z"])
    empty = s["hist_n"] == 0
    s.update(hist_mse=float("nan") if empty else hist_mse(h), hist_kld=float("nan") if empty else hist_kld(h))
    s.update(middle_comb(s["columns"], images.shape[2]))
    return s


def metrics_of(stats: dict) -> dict:
    """The JSON-able metrics of one method's stats: per-sample lists become a {column: count} dict."""
    m = {k: v for k, v in stats.items() if k not in ("z", "columns")}
    m["column_counts"] = {str(c): k for c, k in sorted(Counter(stats["columns"]).items())}
    return m


# ----------------------------------------------------------------------------------------------
# The classifiers' heatmaps (Fig. 7b; figures.plot_heatmaps draws them)
# ----------------------------------------------------------------------------------------------


@torch.no_grad()
def classifier_heatmap(clf, size: int, t: int = 0, diffusion=None, draws: int = 4, device="cpu",
                       seed: int = 0) -> np.ndarray:
    """P(class 1 = right | disc centred at (x, y), t) for every valid centre (Fig. 7b).

    At t = 0 the clean image is classified; at t > 0 the probability is averaged over ``draws``
    noisy versions q(x_t | x_0) - the inputs guidance actually differentiates."""
    r = radius_for(size)
    gen = torch.Generator().manual_seed(seed)
    heat = np.full((size, size), np.nan)
    coords = [(x, y) for y in range(r, size - r) for x in range(r, size - r)]
    for i in range(0, len(coords), 256):
        chunk = coords[i:i + 256]
        imgs = np.stack([render_disc(x, y, size) for x, y in chunk])
        x0 = from_uint8(imgs, clf.channels)
        tt = torch.full((len(chunk),), t, dtype=torch.long)
        p = 0
        for _ in range(draws if t > 0 else 1):
            xt = x0 if t == 0 else diffusion.q_sample(x0, tt, torch.randn(x0.shape, generator=gen))
            p = p + torch.softmax(clf(xt.to(device), tt.to(device)), -1)[:, 1].cpu()
        for (x, y), v in zip(chunk, (p / (draws if t > 0 else 1)).numpy()):
            heat[y, x] = v
    return heat


def classifier_heatmaps(run, cfg, device, extra=()) -> dict:
    """{(name, t): heatmap} of the run's classifiers that exist, and of the (name, module) pairs in
    ``extra``, at t = 0 (Fig. 7b) and T/2 (mid-noise, where guidance acts)."""
    from diffusion import GaussianDiffusion
    from sample import load_classifier
    diffusion = GaussianDiffusion.from_config(cfg["diffusion"])
    clfs = [(name, load_classifier(run, name, device, cfg)) for name in ("classifier", "classifier_sn")
            if os.path.exists(os.path.join(run, f"{name}.pt"))] + list(extra)
    return {(name, t): classifier_heatmap(clf, cfg["data"].image_size, t, diffusion, device=device)
            for name, clf in clfs for t in (0, diffusion.T // 2)}


# ----------------------------------------------------------------------------------------------
# CLI
# ----------------------------------------------------------------------------------------------


TABLE = ["one_disc", "blob", "zero_disc", "two_plus_disc", "zero_or_two", "accuracy", "hist_mse",
         "hist_kld", "hist_n"]


def _cell(key: str, value) -> str:
    if value is None or (isinstance(value, float) and np.isnan(value)):
        return f"{'-':>14}"  # missing or undefined (empty histogram)
    if key == "hist_n":
        return f"{value:>14d}"
    if key in ("hist_mse", "hist_kld"):
        return f"{value:>14.3f}"
    return f"{value:>14.1%}"


def format_table(metrics: dict) -> str:
    """One row per method; hist_n = one-disc samples behind hist_mse / hist_kld."""
    w = max([10] + [len(name) + 1 for name in metrics])  # a caller's row names may be longer
    lines = [f"{'method':<{w}}" + "".join(f"{c:>14}" for c in TABLE) + "   paper (§5.5)"]
    for name, m in metrics.items():
        paper = "; ".join(f"{k} {v[0]:.1%} ± {v[1]:.1%}" for k, v in PAPER.get(name, {}).items())
        lines.append(f"{name:<{w}}" + "".join(_cell(c, m.get(c)) for c in TABLE) + "   " + (paper or "-"))
    return "\n".join(lines)


def run_dataset(run: str) -> str:
    """The dataset of a run, read from its DDPM checkpoint (one-line error if there is none)."""
    from checkpoint import load_checkpoint
    return C.from_dict(load_checkpoint(run, "ddpm")["config"])["data"].dataset


def evaluate_run(run, n=512, batch_size=C.SampleConfig.batch_size, seed=0, lambdas=None, steps=None, methods=None,
                 device=None, resample=False, figures=True, write_metrics=True, log=print,
                 sampler="ancestral", eta=0.0, guidance_at="xt", cfg_form="affine", **faces) -> dict:
    """Sample (or read back) every method, measure it, and write metrics.json and the figures.

    ``methods`` None: every method whose checkpoints exist (see ``select_methods``). ``lambdas``
    None: 30 per class. A CelebA run goes to ``evaluate_faces.evaluate_run`` (``faces``: its
    keyword arguments, e.g. eval_classifier)."""
    from checkpoint import pick_device
    from sample import load_ddpm, save_grid
    if run_dataset(run) == "celeba":
        if sampler != "ancestral" or guidance_at != "xt":
            raise UserError("--sampler ddim and --guidance-at mu are not wired into the CelebA evaluation "
                            "yet; drop them, or draw such samples with sample.py")
        import evaluate_faces
        return evaluate_faces.evaluate_run(run, n, batch_size, seed, lambdas, steps, methods, device, resample,
                                           figures, write_metrics, log, cfg_form=cfg_form, **faces)
    if faces:
        raise UserError(f"{', '.join(sorted(faces))} only apply to CelebA runs")
    lambdas = lambdas or "30,30"
    device = device or pick_device()
    models = load_ddpm(run, device)  # first: a missing DDPM is the error to report
    check_run_writable(run)
    cfg = models[1]
    if cfg["data"].dataset != "circles":
        raise UserError(f"evaluate.py measures circles runs; {run} holds {cfg['data'].dataset}")
    methods = select_methods(run, methods, METHODS, DEFAULT_METHODS, log, class_cond=cfg["unet"].class_cond)
    delta = cfg["data"].delta
    stats, metrics = {}, {}
    for m in methods:
        images, seconds, cached = method_samples(run, m, n, batch_size, seed, lambdas, steps, device,
                                                 models, resample, sampler, eta, guidance_at, cfg_form)
        log(f"{m}: {len(images)} samples {'read from cache' if cached else f'in {seconds:.0f} s'}")
        stats[m] = summarize(images)
        metrics[m] = dict(metrics_of(stats[m]), sample_seconds=seconds, batch_size=batch_size,
                          device=torch.device(device).type, sampler=sampler, eta=eta,
                          guidance_at=guidance_at if METHODS[m][1] else "xt", classifier=METHODS[m][1])
        if METHODS[m][0] == "cfg":
            from classifier_free import record
            metrics[m].update(record(lambdas, C.num_classes_of(cfg["data"]), cfg_form))
        if figures:
            save_grid(from_uint8(images[:64]), os.path.join(run, f"grid_{m}.png"), marks=True, delta=delta,
                      edges=training_edges(cfg["data"].bands, delta))  # a --bands middle run: its band
    if figures:
        plot_histograms(stats, os.path.join(run, "hist_z.png"), delta)
        heats = classifier_heatmaps(run, cfg, device)
        if heats:
            plot_heatmaps(heats, os.path.join(run, "heatmap_classifiers.png"), delta)
    if write_metrics:
        write_json(os.path.join(run, "metrics.json"), metrics)
    return metrics


EVAL_FLAGS = ("run", "n", "batch_size", "seed", "steps", "device", "lambdas", "sampler", "eta", "guidance_at",
              "cfg_form")  # of config.SampleConfig
EVAL_DEFAULTS = C.SampleConfig(n=512, lambdas="30,30")  # 512 samples per method, lambda = [30, 30] (§5.5)


def build_parser():
    from sample import add_sample_args
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_sample_args(p, only=EVAL_FLAGS, defaults=EVAL_DEFAULTS,
                    title="sampling (config.SampleConfig; --n per method, --lambdas of multi / multi_sn)")
    p.add_argument("--methods", default=None,
                   help=f"comma-separated, from {','.join(METHODS)} (default: those whose checkpoints exist)")
    p.add_argument("--resample", action="store_true", help="ignore cached eval_*.npz samples")
    import evaluate_faces
    evaluate_faces.add_args(p)
    return p


def evaluate_faces_flags(a) -> list:
    """The CelebA-only flags given on the command line."""
    import evaluate_faces
    return ["--" + f.replace("_", "-") for f in evaluate_faces.FACE_FLAGS if getattr(a, f) is not None]


def main(argv=None):
    from checkpoint import pick_device
    from sample import check_sampler, sample_config
    a = build_parser().parse_args(argv)
    s, typed = sample_config(a, EVAL_DEFAULTS)
    check_sampler(s.sampler, s.eta, s.guidance_at)
    methods = None if a.methods is None else [m.strip() for m in a.methods.split(",") if m.strip()]
    uses = {"lambdas": lambda m: METHODS[m][0] != "none", "guidance_at": lambda m: METHODS[m][1],
            "cfg_form": lambda m: METHODS[m][0] == "cfg"}
    for flag, used in uses.items():
        if flag in typed and methods is not None and set(methods) <= set(METHODS) \
                and not any(used(m) for m in methods):  # typed but would be ignored
            raise UserError(f"--{flag.replace('_', '-')} only applies to the "
                            f"{'cfg method' if flag == 'cfg_form' else 'guided methods'} "
                            f"({', '.join(m for m in METHODS if used(m))})")
    from classifier_free import check_form
    check_form(s.cfg_form)
    if s.n < 1 or s.batch_size < 1:
        raise UserError("--n and --batch-size must be positive")
    device = pick_device(s.device)  # also sets the CPU threads
    if run_dataset(s.run) == "celeba":
        if s.sampler != "ancestral" or s.guidance_at != "xt":
            raise UserError("--sampler ddim and --guidance-at mu are not wired into the CelebA evaluation "
                            "yet; drop them, or draw such samples with sample.py")
        import evaluate_faces
        return evaluate_faces.main_from_args(a, s, typed, methods, device)
    given = [f for f in evaluate_faces_flags(a)]
    if given:
        raise UserError(f"{' '.join(given)} only appl{'ies' if len(given) == 1 else 'y'} to CelebA runs")
    t0 = time.time()
    metrics = evaluate_run(s.run, s.n, s.batch_size, s.seed, s.lambdas or "30,30", s.steps or None, methods,
                           device, a.resample, sampler=s.sampler, eta=s.eta, guidance_at=s.guidance_at,
                           cfg_form=s.cfg_form)
    print(format_table(metrics))
    heat = any(os.path.exists(ckpt_path(s.run, c)) for c in ("classifier", "classifier_sn"))
    files = ["metrics.json"] + [f"grid_{m}.png" for m in metrics] + ["hist_z.png"] + \
        (["heatmap_classifiers.png"] if heat else [])
    print(f"evaluated in {time.time() - t0:.0f} s; wrote {', '.join(files)} in {s.run}")


if __name__ == "__main__":
    from checkpoint import cli
    cli(main)

"""Evaluation of the CelebA experiments (§5.1, §5.3, §6, App. H); ``evaluate.py`` dispatches here.

    python evaluate.py --run runs/smile                        # uncond, multi (lambda 30 a class), train
    python evaluate.py --run runs/smile --sweep 3.5,10,30,50,75,100 --n 256        # §5.3
    python evaluate.py --run runs/smile_hair --eval-classifier A.pt,B.pt            # §6, two attributes

The latent of a face is measured by the calibrated *evaluation classifier* (eval_classifier.py):
p = P(attribute = 1 | x) after temperature scaling (§5 intro). It is looked for (per attribute of
the run) at ``<dir of the run's index list>/eval_<Attr>.pt``, then ``<run>/eval_<Attr>.pt``, then
``runs/filter_<Attr>/eval_<Attr>.pt``; ``--eval-classifier PATH[,PATH2]`` names them explicitly
(eval_judges.py).

Rows: ``uncond`` (no guidance), ``multi`` (multi-guidance, lambda = 30 for every class, §5.1),
``multi_sn`` when named, ``cfg`` (classifier-free multi-guidance, App. J, Eq. 12: a DDPM trained with
--class-cond, whose ``uncond`` is its null label; classifier_free.py, lambda = the mean of
--lambdas, per-class weight (1 + lambda) / M), and ``train``: the run's training images (its index
list) as the reference. By default uncond, multi and cfg, each where the run has what it needs (a
classifier, a class-conditional DDPM), with one line naming the skipped ones. Per row and
attribute, on the p of every image:
  hist_mse / hist_kld  the 100-bin histogram on [0, 1] vs uniform (histograms.py;
                       paper §5.1: multi 0.13 / 0.61, train 0.56 / 3.17, uncond 0.64 / 3.5 at
                       10k samples, 64 px);
  frac_03_07, frac_04_06  fraction with p in [0.3, 0.7], [0.4, 0.6];
  z_frac_03_07 (stand-in only)  fraction whose *true-latent proxy* lies in [0.3, 0.7]: a z-regressor
                       (the clean-classifier architecture with one output, MSE on the true latent of
                       every train image of toy_faces; eval_classifier.zregressor), cached as
                       ``<eval classifier dir>/zreg_<Attr>.pt``.
  mouth_mild, mouth_clear, mouth_faded, mouth_doubled, mouth_other, mouth_n (stand-in, Smiling,
                       with the regressor)  fractions by the mouth readout (mouth_readout.py: one
                       rendered mouth fitted to each face; mild only if it fits and z in [0.3, 0.7]),
                       over at most 1024 images of a row (evenly spaced: every image is fitted, so the cost is capped).
With two attributes (§6, 4 corner classes) the keys carry the attribute (``hist_mse_Smiling``) and
each row also has ``center_03_07`` (both p in [0.3, 0.7]) and ``heatmap_counts`` (20 x 20 counts
of (p_1, p_2), rows = p_1 bins); on the stand-in also ``z_center_03_07`` and ``z_heatmap_counts``,
the same for the two regressed true latents.

Files in the run: metrics.json {row: {metric: value}}, eval_<method>.npz (sample cache),
grid_<row>.png, hist_p.png (Fig. 5 style), grid_mild.png (multi samples with 0.4 < p < 0.6,
Fig. 4/8), memorisation.png / memorisation_features.png / memorisation.json (App. H: the samples
closest to the training set beside their 8 nearest training images, pixel L2 and L2 between
evaluation-classifier features; the paper used CLIP embeddings), heatmap_2d.png (§6, Fig. 9) and,
on the stand-in, heatmap_2d_z.png (the same in true-latent proxies).
--sweep writes sweep.json, sweep.png and eval_sweep_<lambda>.npz only.
"""
from __future__ import annotations

import json
import os
import time

import numpy as np
import torch

from checkpoint import UserError, ckpt_path, from_uint8, to_uint8
from config import SampleConfig, num_classes_of
from celeba import CelebAData
from eval_classifier import ZREG_STEPS
from eval_judges import load_eval_classifiers, load_zregressors
from histograms import hist_kld, hist_mse, histogram
from figures import plot_heatmap_2d, plot_hist_p, plot_sweep
from memorisation import memorisation_report
from rundir import check_run_writable, load_npz, save_npz, select_methods, write_json
import mouth_readout

SAMPLE_BATCH = SampleConfig.batch_size
METHODS = {"uncond": ("none", None), "multi": ("multi", "classifier"),
           "multi_sn": ("multi", "classifier_sn"), "cfg": ("cfg", None)}
DEFAULT_METHODS = ("uncond", "multi", "cfg")
PAPER = {"multi": {"hist_mse": 0.13, "hist_kld": 0.61}, "train": {"hist_mse": 0.56, "hist_kld": 3.17},
         "uncond": {"hist_mse": 0.64, "hist_kld": 3.5}}  # §5.1, Smiling, 10k samples at 64 px
PAPER_SWEEP = {75.0: {"hist_mse": 0.065, "hist_kld": 0.188}, 30.0: {"hist_mse": 0.13, "hist_kld": 0.61}}
HEAT_BINS = 20


# ----------------------------------------------------------------------------------------------
# Pure metrics
# ----------------------------------------------------------------------------------------------

def frac_in(values, lo: float, hi: float) -> float:
    """Fraction of values in the closed interval [lo, hi] (NaN for no values)."""
    v = np.asarray(values, dtype=np.float64)
    return float(((v >= lo) & (v <= hi)).mean()) if len(v) else float("nan")


def p_metrics(p) -> dict:
    """Histogram metrics of calibrated probabilities p (one attribute)."""
    h = histogram(p, 100)
    return {"hist_mse": hist_mse(h), "hist_kld": hist_kld(h), "frac_03_07": frac_in(p, 0.3, 0.7),
            "frac_04_06": frac_in(p, 0.4, 0.6), "mean_p": float(np.mean(p))}


def hist2d(p1, p2, bins: int = HEAT_BINS) -> np.ndarray:
    """int counts [bins, bins] of (p1, p2) on [0, 1]^2; row i = p1 bin, column j = p2 bin
    (np.histogram2d: the last bin is closed, so p = 1 falls in the top bin)."""
    h, _, _ = np.histogram2d(np.clip(p1, 0, 1), np.clip(p2, 0, 1), bins=bins, range=[[0, 1], [0, 1]])
    return h.astype(np.int64)


def center_fraction(p1, p2, lo: float = 0.3, hi: float = 0.7) -> float:
    """Fraction of samples with both probabilities in [lo, hi] (§6: the central square)."""
    p1, p2 = np.asarray(p1), np.asarray(p2)
    return float(((p1 >= lo) & (p1 <= hi) & (p2 >= lo) & (p2 <= hi)).mean()) if len(p1) else float("nan")


# ----------------------------------------------------------------------------------------------
# Evaluation classifiers and the run's data
# ----------------------------------------------------------------------------------------------

def train_data(cfg, progress: bool = False) -> CelebAData:
    """The run's training set (its index list of the train split), unflipped."""
    d = cfg["data"]
    return CelebAData(d.data_dir, d.image_size, d.attribute, "train", d.index_list or None, flip=False,
                      cache_dir=d.cache_dir or None, progress=progress)


def train_images(cfg, progress: bool = False):
    """(uint8 images of the run's training set in index-list order, incl. repeats; unique positions)."""
    data = train_data(cfg, progress)
    images = np.array(data.images)  # a writable copy (the cache is a read-only memmap)
    _, first = np.unique(np.asarray(data.index), return_index=True)
    return images, np.sort(first)


# ----------------------------------------------------------------------------------------------
# Samples (cached like evaluate.method_samples)
# ----------------------------------------------------------------------------------------------

def cached_samples(run, tag, guidance, clf_name, n, batch_size, seed, lambdas, steps, device, models,
                   resample=False, log=print, cfg_form="affine"):
    """uint8 samples, read back from ``<run>/eval_<tag>.npz`` when made with the same settings."""
    from sample import generate
    stamp = [os.path.getmtime(ckpt_path(run, "ddpm"))] + \
        ([os.path.getmtime(ckpt_path(run, clf_name))] if clf_name else [])
    # Batch size and device decide each sample's noise (see evaluate.method_samples).
    settings = json.dumps({"n": n, "seed": seed, "lambdas": lambdas if guidance != "none" else None,
                           "steps": steps, "stamp": stamp, "classifier": clf_name,
                           "batch_size": batch_size, "device": torch.device(device).type}
                          | ({"cfg_form": cfg_form} if guidance == "cfg" else {}))
    path = os.path.join(run, f"eval_{tag}.npz")
    z = None if resample else load_npz(path, log)
    if z is not None and str(z.get("settings")) == settings and "images" in z:
        log(f"{tag}: {n} samples read from {path}")
        return z["images"], float(z.get("seconds", 0.0))
    t0 = time.time()
    x = generate(run, n, batch_size, seed, device, steps, guidance, lambdas,
                 classifier=clf_name or "classifier", progress=True, models=models, cfg_form=cfg_form)
    seconds = time.time() - t0
    images = to_uint8(x)
    save_npz(path, images=images, settings=settings, seconds=seconds)
    log(f"{tag}: {n} samples in {seconds:.0f} s")
    return images, seconds


def default_lambdas(num_classes: int, value: float = 30.0) -> str:
    return ",".join([f"{value:g}"] * num_classes)


# ----------------------------------------------------------------------------------------------
# Measuring one set of images
# ----------------------------------------------------------------------------------------------

def batched(fn, images, chunk: int = 4096) -> np.ndarray:
    """fn over chunks of uint8 images (EvalClassifier converts its whole input to float at once:
    2.9 GB for 60k images of 64 px)."""
    return np.concatenate([fn(images[i:i + chunk]) for i in range(0, len(images), chunk)])


def measure(images, clfs, zregs) -> tuple[dict, dict]:
    """(metrics, {attribute: p}) of uint8 images under the evaluation classifiers."""
    probs, zs, m = {}, [], {"n": int(len(images))}
    two = len(clfs) > 1
    for c, zr in zip(clfs, zregs):
        p = batched(c.prob, images)
        probs[c.attribute] = p
        sfx = f"_{c.attribute}" if two else ""
        m.update({k + sfx: v for k, v in p_metrics(p).items()})
        if zr is not None:
            z = zr(images)
            zs.append(z)
            m["z_frac_03_07" + sfx] = frac_in(z, 0.3, 0.7)
            m["z_frac_04_06" + sfx] = frac_in(z, 0.4, 0.6)
            if c.attribute == "Smiling":   # the stand-in's mouth, fitted with its renderer
                m.update({k + sfx: v for k, v in mouth_readout.fractions(images).items()})
    if two:
        a, b = (probs[c.attribute] for c in clfs[:2])
        m["center_03_07"] = center_fraction(a, b)
        m["heatmap_counts"] = hist2d(a, b).tolist()
        if len(zs) >= 2:  # the same square in the stand-in's true latents (regressor proxy)
            za, zb = zs[:2]
            m["z_center_03_07"] = center_fraction(za, zb)
            m["z_heatmap_counts"] = hist2d(za, zb).tolist()
    return m, probs


# ----------------------------------------------------------------------------------------------
# Entry points
# ----------------------------------------------------------------------------------------------

def setup(run, device, eval_classifier=None, zreg_steps=ZREG_STEPS, log=print):
    """(models, cfg, evaluation classifiers, z-regressors or None) of a run, checked for evaluation."""
    from sample import load_ddpm
    models = load_ddpm(run, device)
    check_run_writable(run)  # before any sampling or training of the z-regressor
    cfg = models[1]
    if cfg["data"].dataset != "celeba":
        raise UserError(f"evaluate_faces measures celeba runs; {run} holds {cfg['data'].dataset}")
    clfs = load_eval_classifiers(run, cfg, device, eval_classifier)
    return models, cfg, clfs, load_zregressors(run, cfg, clfs, device, zreg_steps, log)


def evaluate_run(run, n=512, batch_size=SAMPLE_BATCH, seed=0, lambdas=None, steps=None, methods=None, device=None,
                 resample=False, figures=True, write_metrics=True, log=print, eval_classifier=None,
                 zreg_steps=ZREG_STEPS, memo_rows=8, cfg_form="affine") -> dict:
    """Sample every method, measure it and the training set; write metrics.json and the figures."""
    from checkpoint import pick_device
    from classifier_free import record
    from sample import save_grid
    device = device or pick_device()
    models, cfg, clfs, zregs = setup(run, device, eval_classifier, zreg_steps, log)
    methods = select_methods(run, methods, METHODS, DEFAULT_METHODS, log, cfg["unet"].class_cond)
    k = num_classes_of(cfg["data"])
    if any(METHODS[m][0] != "none" for m in methods):
        lambdas = lambdas or default_lambdas(k)
    attrs = [c.attribute for c in clfs]
    metrics, probs, images = {}, {}, {}
    for m in methods:
        guidance, clf_name = METHODS[m]
        images[m], seconds = cached_samples(run, m, guidance, clf_name, n, batch_size, seed, lambdas, steps,
                                            device, models, resample, log, cfg_form)
        metrics[m], probs[m] = measure(images[m], clfs, zregs)
        metrics[m].update(sample_seconds=seconds, batch_size=batch_size, device=torch.device(device).type)
        if clf_name:
            metrics[m]["lambdas"] = lambdas
        if guidance == "cfg":
            metrics[m].update(record(lambdas, k, cfg_form))
    train_all, uniq = train_images(cfg)
    metrics["train"], probs["train"] = measure(train_all, clfs, zregs)
    images["train"] = train_all
    if figures:
        for name, ims in images.items():
            save_grid(from_uint8(ims[:64]), os.path.join(run, f"grid_{name}.png"))
        plot_hist_p(probs, metrics, os.path.join(run, "hist_p.png"))
        mild_src = next((m for m in ("multi", "cfg") if m in images), methods[0])
        p0 = probs[mild_src][attrs[0]]
        mild = np.flatnonzero((p0 > 0.4) & (p0 < 0.6))
        metrics[mild_src]["n_mild_04_06"] = int(len(mild))
        if len(mild):
            save_grid(from_uint8(images[mild_src][mild[:64]]), os.path.join(run, "grid_mild.png"))
            log(f"grid_mild.png: {min(64, len(mild))} of {len(mild)} {mild_src} samples with "
                f"0.4 < p({attrs[0]}) < 0.6")
        else:
            if os.path.exists(os.path.join(run, "grid_mild.png")):  # stale, from earlier samples
                os.remove(os.path.join(run, "grid_mild.png"))
            log(f"grid_mild.png not written: no {mild_src} sample has 0.4 < p({attrs[0]}) < 0.6")
        memo = memorisation_report(images[mild_src], train_all[uniq], lambda x: batched(clfs[0].features, x),
                                   run, mild_src, memo_rows)
        metrics[mild_src]["memorisation_min_pixel_l2"] = memo["pixel"]["distances"][0][0]
        metrics[mild_src]["memorisation_min_feature_l2"] = memo["features"]["distances"][0][0]
        if len(clfs) > 1:
            for m in probs:
                sfx = "" if m == "multi" else f"_{m}"
                plot_heatmap_2d(metrics[m]["heatmap_counts"], attrs, os.path.join(run, f"heatmap_2d{sfx}.png"),
                                f"{m}: central square {metrics[m]['center_03_07']:.1%}")
                if "z_heatmap_counts" in metrics[m]:
                    plot_heatmap_2d(metrics[m]["z_heatmap_counts"], attrs, os.path.join(run, f"heatmap_2d_z{sfx}.png"),
                                    f"{m}, true-z proxy: central square {metrics[m]['z_center_03_07']:.1%}",
                                    quantity="regressed true z")
    if write_metrics:
        write_json(os.path.join(run, "metrics.json"), metrics)
    return metrics


def sweep_run(run, lams, n=256, batch_size=SAMPLE_BATCH, seed=0, steps=None, device=None, resample=False,
              log=print, eval_classifier=None, zreg_steps=ZREG_STEPS, figures=True) -> dict:
    """§5.3: multi-guidance with lambda = each value for every class -> sweep.json, sweep.png."""
    from checkpoint import pick_device
    device = device or pick_device()
    models, cfg, clfs, zregs = setup(run, device, eval_classifier, zreg_steps, log)
    k = num_classes_of(cfg["data"])
    sweep = {}
    for lam in lams:
        imgs, seconds = cached_samples(run, f"sweep_{lam:g}", "multi", "classifier", n, batch_size, seed,
                                       default_lambdas(k, lam), steps, device, models, resample, log)
        m, _ = measure(imgs, clfs, zregs)
        m.pop("heatmap_counts", None)
        m.pop("z_heatmap_counts", None)
        sweep[f"{lam:g}"] = dict(m, sample_seconds=seconds, batch_size=batch_size,
                                 device=torch.device(device).type)
    write_json(os.path.join(run, "sweep.json"), sweep)
    if figures:
        plot_sweep(sweep, os.path.join(run, "sweep.png"))
    return sweep


def parse_sweep(text: str) -> list[float]:
    try:
        vals = [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise UserError(f"--sweep must be comma-separated numbers, e.g. 3.5,10,30,50,75,100; got {text!r}") from None
    if not vals or any(v < 0 for v in vals):
        raise UserError(f"--sweep needs non-negative lambdas, e.g. 3.5,10,30,50,75,100; got {text!r}")
    return vals


# ----------------------------------------------------------------------------------------------
# Tables and CLI hooks (evaluate.py declares the flags and calls main_from_args)
# ----------------------------------------------------------------------------------------------

def _fmt(v, pct=False, w=12) -> str:
    if v is None or (isinstance(v, float) and np.isnan(v)):
        return f"{'-':>{w}}"
    return f"{v:>{w}.1%}" if pct else f"{v:>{w}.3f}"


def format_table(metrics: dict, paper=PAPER, first="method") -> str:
    """One row per method / lambda: n, then MSE, KLD, fractions (per attribute when several)."""
    any_row = next(iter(metrics.values()))
    cols = [k for k in any_row if k.startswith(("hist_mse", "hist_kld", "frac_", "z_frac_", "center_",
                                                "mouth_m", "mouth_f", "mouth_d"))]
    short = [c.replace("hist_", "").replace("frac_", "") if len(cols) > 8 else c for c in cols]
    w = max([12] + [len(c) + 2 for c in short])
    lines = [f"{first:<10}{'n':>8}" + "".join(f"{c:>{w}}" for c in short) + "   paper (MSE / KLD)"]
    for name, m in metrics.items():
        p = paper.get(name) or paper.get(float(name) if _isnum(name) else None)
        ref = f"{p['hist_mse']:.3g} / {p['hist_kld']:.3g}" if p else "-"
        lines.append(f"{name:<10}{m['n']:>8d}" + "".join(_fmt(m.get(c), any(t in c for t in ("frac", "center", "mouth")), w)
                                                        for c in cols) + "   " + ref)
    return "\n".join(lines)


def _isnum(s) -> bool:
    try:
        float(s)
        return True
    except (TypeError, ValueError):
        return False


def add_args(p) -> None:
    g = p.add_argument_group("CelebA runs (evaluate_faces.py)")
    g.add_argument("--eval-classifier", default=None,
                   help="evaluation classifier(s) PATH[,PATH2], one per attribute of the run (default: "
                        "eval_<Attr>.pt beside the run's index list, in the run, or in runs/filter_<Attr>)")
    g.add_argument("--sweep", default=None, help="§5.3: comma-separated lambdas, e.g. 3.5,10,30,50,75,100; "
                                                 "only the sweep is run (sweep.json, sweep.png)")
    g.add_argument("--zreg-steps", type=int, default=None,
                   help=f"training steps of the stand-in's true-latent regressor (default {ZREG_STEPS}; "
                        "0: skip it)")


FACE_FLAGS = ("eval_classifier", "sweep", "zreg_steps")


def main_from_args(a, s, typed, methods, device) -> None:
    """evaluate.main's CelebA branch: s = SampleConfig, typed = the flags the user gave."""
    from checkpoint import load_checkpoint
    import config as C
    t0 = time.time()
    smiling = C.from_dict(load_checkpoint(s.run, "ddpm")["config"])["data"].attribute == "Smiling"
    zreg_steps = ZREG_STEPS if a.zreg_steps is None else a.zreg_steps
    if zreg_steps < 0:
        raise UserError("--zreg-steps must be >= 0 (0 skips the true-latent regressor)")
    if a.sweep is not None:
        if methods is not None:
            raise UserError("--sweep runs multi-guidance only; drop --methods")
        if "lambdas" in typed:
            raise UserError("--sweep sets lambda for every class; drop --lambdas")
        if "cfg_form" in typed:
            raise UserError("--sweep runs classifier multi-guidance, not --guidance cfg; drop --cfg-form")
        res = sweep_run(s.run, parse_sweep(a.sweep), s.n, s.batch_size, s.seed, s.steps or None, device,
                        a.resample, eval_classifier=a.eval_classifier, zreg_steps=zreg_steps)
        print(format_table(res, PAPER_SWEEP if smiling else {}, first="lambda"))
        print(f"swept in {time.time() - t0:.0f} s; wrote sweep.json, sweep.png in {s.run}")
        return
    metrics = evaluate_run(s.run, s.n, s.batch_size, s.seed, s.lambdas if "lambdas" in typed else None,
                           s.steps or None, methods, device, a.resample, eval_classifier=a.eval_classifier,
                           zreg_steps=zreg_steps, cfg_form=s.cfg_form)
    print(format_table(metrics, PAPER if smiling else {}))  # the paper's numbers are for Smiling
    print(f"evaluated in {time.time() - t0:.0f} s; wrote metrics.json, grid_*.png, hist_p.png, "
          f"grid_mild.png, memorisation*.png/json{', heatmap_2d*.png' if 'center_03_07' in metrics['train'] else ''} "
          f"in {s.run}")

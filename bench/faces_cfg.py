"""Classifier-free multi-guidance on the face stand-in beside classifier multi-guidance (App. J,
Fig. S19b; results/faces_cfg.json).

    python bench/faces_cfg.py [--root runs/faces_bench] [--data data/faces_bench] [--seed 0] [--n 512]

Needs what bench/faces_pipeline.py makes: the stand-in DATA and its filter ROOT/filter (index.txt,
eval_Smiling.pt); the classifier row also needs its classifier-guided run ROOT/faces. Trains what is
missing: a class-conditional DDPM with label dropout on the filtered extremes (train.py --dataset
celeba --class-cond --model ddpm --seed S, cpu preset) in ROOT/faces_cfg. Unknown flags go to that
train.py call (e.g. --steps 4000); give them again on a later call, as a resumed run checks them.

Rows, --n samples each, the run's respaced ancestral steps, sampling seed 0, evaluate.py's batch: the class-conditional
DDPM at its null label (unguided); classifier-free multi-guidance at λ = --scale and at the matched
λ = M·scale − 1, whose per-class weight (1 + λ) / M equals the classifier's λ (classifier_free.py);
classifier multi-guidance of ROOT/faces at λ = scale for every class (read back from the evaluation
cache faces_pipeline wrote, when the settings match); the filtered training set as reference.
Per row, by evaluate_faces.measure with the filter's calibrated classifier: MSE / KLD of the p(Smiling)
histogram against uniform (App. B), the fractions with p and with the true-z proxy
(eval_classifier.zregressor) in [0.3, 0.7], the mouth readout's classes (mouth_readout.py), and the
mass at the edges, p < 0.1 or p > 0.9 (App. J: "little-to-no mass on the edges" with CFG).
"""
import argparse
import os
import sys

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import evaluate_faces as EF  # noqa: E402
import train  # noqa: E402
from checkpoint import UserError, ckpt_path, cli, pick_device  # noqa: E402
from classifier_free import record  # noqa: E402
from config import SampleConfig, num_classes_of  # noqa: E402
from eval_classifier import ZREG_STEPS  # noqa: E402
from figures import pyplot, save  # noqa: E402
from sample import load_ddpm  # noqa: E402
from faces_pipeline import filtered_index  # noqa: E402
from results.record import Recorder  # noqa: E402

BATCH = SampleConfig.batch_size   # evaluate.py's, so faces_pipeline's cached multi samples are reused
KEYS = ("n", "hist_mse", "hist_kld", "mean_p", "frac_03_07", "frac_04_06", "z_frac_03_07", "z_frac_04_06", "edge_p",
        "mouth_mild", "mouth_clear", "mouth_faded", "mouth_doubled", "mouth_other", "mouth_n", "sample_seconds",
        "lambdas", "cfg_lambda")


def ensure_cfg_run(run, data, index, seed, flags):
    """Train (or finish) the class-conditional DDPM of ``run``; a finished one is left as it is."""
    resume = ["--resume"] if os.path.exists(ckpt_path(run, "ddpm")) else []
    train.main(["--dataset", "celeba", "--data-dir", data, "--index-list", index, "--model", "ddpm",
                "--class-cond", "--seed", str(seed), "--out", run, "--no-grid"] + resume + list(flags))


def plot(values: dict, path: str) -> None:
    """Fig. S19b style: the distribution of calibrated p and of the true-z proxy per row."""
    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(12, 3.6))
    bins = np.linspace(0, 1, 51)
    for ax, key, label in zip(axes, ("p", "z"), ("calibrated p(Smiling = 1 | x)", "true z_smile (regressor proxy)")):
        for name, v in values.items():
            if v.get(key) is not None:  # the regressor's z can leave [0, 1]: shown at the ends
                ax.hist(np.clip(v[key], 0, 1), bins=bins, histtype="step", lw=1.4, density=True, label=name)
        ax.axvspan(0.3, 0.7, color="grey", alpha=0.1)
        ax.set(xlabel=label, ylabel="density", yscale="log")
        ax.legend(fontsize=7)
    save(fig, path, tight=True)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                allow_abbrev=False)
    p.add_argument("--root", default="runs/faces_bench")
    p.add_argument("--data", default="data/faces_bench")
    p.add_argument("--seed", type=int, default=0, help="training seed of the class-conditional DDPM")
    p.add_argument("--n", type=int, default=512, help="samples per row")
    p.add_argument("--scale", type=float, default=30.0, help="the classifier's λ per class")
    p.add_argument("--zreg-steps", type=int, default=ZREG_STEPS, help="steps of the true-z regressor")
    a, flags = p.parse_known_args(argv)
    device = pick_device("cpu")
    index = filtered_index(a.root, a.data)
    rec = Recorder("faces_cfg", "Classifier-free multi-guidance on the face stand-in (App. J, Fig. S19b)",
                   argv=None if argv is None else [os.path.abspath(__file__), *argv])
    cfg_run, clf_run = os.path.join(a.root, "faces_cfg"), os.path.join(a.root, "faces")
    ensure_cfg_run(cfg_run, a.data, index, a.seed, flags)
    models, cfg, clfs, zregs = EF.setup(cfg_run, device, zreg_steps=a.zreg_steps)
    m = num_classes_of(cfg["data"])
    matched = m * a.scale - 1          # (1 + λ) / M = scale
    lam = lambda v: EF.default_lambdas(m, v)  # noqa: E731
    # (row name, run, cache tag, guidance, classifier, λ per class)
    rows = [("cfg, null label (unguided)", cfg_run, "uncond", "none", None, None),
            (f"cfg λ = {a.scale:g} (per class {(1 + a.scale) / m:g})", cfg_run, f"cfg_{a.scale:g}", "cfg", None,
             a.scale),
            (f"cfg λ = {matched:g} (per class {a.scale:g})", cfg_run, f"cfg_{matched:g}", "cfg", None, matched)]
    clf_models = None
    if all(os.path.exists(ckpt_path(clf_run, n)) for n in ("ddpm", "classifier")):
        clf_models = load_ddpm(clf_run, device)
        rows.append((f"classifier multi λ = [{', '.join([f'{a.scale:g}'] * m)}]", clf_run, "multi", "multi",
                     "classifier", a.scale))
    else:
        print(f"no classifier-guided run in {clf_run}: its row is left out (bench/faces_pipeline.py makes it)")
    metrics, values = {}, {}
    attr = clfs[0].attribute
    for name, run, tag, guidance, clf, scale in rows:
        lambdas = lam(scale) if scale is not None else None
        images, seconds = EF.cached_samples(run, tag, guidance, clf, a.n, BATCH, 0, lambdas, None,
                                            device, clf_models if run == clf_run else models)
        metrics[name], values[name] = row_metrics(images, clfs, zregs, attr)
        metrics[name].update(sample_seconds=seconds, guidance=guidance,
                             **(record(lambdas, m, "affine") if guidance == "cfg" else {"lambdas": lambdas}))
        print(f"{name}: p in [0.3, 0.7] {metrics[name]['frac_03_07']:.1%}, KLD {metrics[name]['hist_kld']:.3f}",
              flush=True)
    train_all, _ = EF.train_images(cfg)
    train_row = "train (filtered extremes)"
    metrics[train_row], values[train_row] = row_metrics(train_all, clfs, zregs, attr)
    plot(values, rec.figure_path("faces_cfg.png"))
    pct = lambda r, k: f"{100 * r[k]:.1f} %" if k in r else "–"  # noqa: E731
    trows = [[name, r["n"], f"{r['hist_mse']:.3f}", f"{r['hist_kld']:.3f}", pct(r, "frac_03_07"),
              pct(r, "z_frac_03_07"), pct(r, "edge_p"), pct(r, "mouth_mild"), pct(r, "mouth_faded"),
              pct(r, "mouth_doubled")] for name, r in metrics.items()]
    tables = [{"title": f"calibrated p({attr}) of {a.n} samples per row (train: the filtered set), "
                        f"{cfg['diffusion'].sample_steps} respaced ancestral steps; "
                        f"class-conditional DDPM seed {a.seed}",
               "columns": ["row", "n", "hist MSE", "hist KLD", "p in [0.3, 0.7]", "true z in [0.3, 0.7]",
                           "p < 0.1 or > 0.9", "mouth mild", "mouth faded", "mouth doubled"],
               "rows": trows}]
    cfg_row, clf_row = rows[2][0], (rows[3][0] if len(rows) > 3 else None)
    notes = [f"Matched strength (λ = {matched:g}): true z in [0.3, 0.7] for {pct(metrics[cfg_row], 'z_frac_03_07')} "
             f"of the cfg samples" + (f" against {pct(metrics[clf_row], 'z_frac_03_07')} with the classifier"
                                      if clf_row else "") + "."]
    path = rec.write({k: {kk: v.get(kk) for kk in KEYS} for k, v in metrics.items()},
                     seeds={"ddpm": [a.seed], "sampling": [0]}, n=a.n, tables=tables, notes=notes)
    print(f"wrote {path}")


def row_metrics(images, clfs, zregs, attr):
    """(evaluate_faces.measure's metrics + edge_p, {"p": calibrated p, "z": true-z proxy or None})."""
    m, probs = EF.measure(images, clfs, zregs)
    p = probs[attr]
    m["edge_p"] = 1.0 - EF.frac_in(p, 0.1, 0.9)
    return m, {"p": p, "z": zregs[0](images) if zregs[0] is not None else None}


if __name__ == "__main__":
    cli(main)

"""Extrapolation (§7) and interpolation (§5.5) with plain guidance against twisted SMC (lab/smc.py).

    python -m lab.extrapolate --run runs/mid                          # a --bands middle run
    python -m lab.extrapolate --run runs/mid --interp-run runs/circles --n 256 --particles 8

Extrapolation, on a run trained with ``train.py --bands middle`` (discs only at z in [0.35, 0.65];
the classifier learns right half against left half of that band): can guidance put discs where
the DDPM never saw one? Per method, plain (the guided ancestral sampler) and SMC with --particles
per system (--n samples = n / N systems, all particles returned):
  uncond        no guidance                          target z < 0.15 or z > 0.85 (leakage)
  single_left   single guidance towards class 0      target z < 0.15
  single_right  single guidance towards class 1      target z > 0.85
  multi         multi-guidance lambda = [s, s]       target z < 0.15 or z > 0.85 (Eq. 2 pulls to
                                                      the classifier's boundary: a control)
  multi_neg     lambda = [-s, -s] (--methods)        target z < 0.15 or z > 0.85 (pushed away from
                                                      the boundary on both sides)
Interpolation, on a normal (extremes) run given as --interp-run: multi-guidance, plain vs SMC,
target the middle z in [0.3, 0.7].

First a profile of the classifier: P(class 1 | a disc in column x, t) averaged over rows, at t = 0
and T/2, for every column, inside and outside the training band.
Columns: on_target = one-disc samples with z in the target / all samples (z<.15, z>.85: the same
on each side); one / zero / two_plus /
blob = detector categories (detector.py); z_mean, z_std = mean and std of the detected z of the
one-disc samples (z_std: diversity); s/sample = sampling wall time / n; resampled = fraction of
system-steps that resampled, survivors = distinct initial particles per system at the end (SMC).
With strong guidance a system often collapses onto one ancestor (survivors ~ 1): an SMC row of n
samples then holds only about (n / N) x survivors independent draws; size --n accordingly.
Writes <out>/extrapolate.json, the samples of every row (<out>/samples_<run>_<row>.npz, uint8) and
a grid of the first 64 (<out>/grid_<run>_<row>.png).
"""
import argparse
import json
import os
import time

import numpy as np

import config as C
from checkpoint import UserError, cli, pick_device, to_uint8
from detector import circle_stats
from lab import smc
from sample import load_ddpm, prepare, save_grid
from toy_circles import training_edges

OUTER = ((0.0, 0.15), (0.85, 1.0))
# name -> (guidance, target class or None, lambda signs (multi) or None, target z intervals)
EXTRAPOLATION = {
    "uncond": ("none", None, None, OUTER),
    "single_left": ("single", 0, None, ((0.0, 0.15),)),
    "single_right": ("single", 1, None, ((0.85, 1.0),)),
    "multi": ("multi", None, (1, 1), OUTER),
    "multi_neg": ("multi", None, (-1, -1), OUTER),
}
INTERP = {"multi": ("multi", None, (1, 1), ((0.3, 0.7),))}


def measure(images: np.ndarray, target) -> dict:
    """Detector categories, the fraction of all samples with one disc inside ``target``, and the
    mean / std of the detected z (one-disc samples)."""
    s = circle_stats(images)
    z = s["z"]
    inside = np.zeros(len(z), dtype=bool)
    for lo, hi in target:
        inside |= (z >= lo) & (z <= hi)
    return {"on_target": float(inside.sum() / s["n"]), "left": float((z < 0.15).sum() / s["n"]),
            "right": float((z > 0.85).sum() / s["n"]), "one": s["one_disc"], "zero": s["zero_disc"],
            "two_plus": s["two_plus_disc"], "blob": s["blob"], "hist_n": s["hist_n"],
            "z_mean": float(z.mean()) if len(z) else float("nan"),
            "z_std": float(z.std()) if len(z) else float("nan")}


def classifier_profile(run, name, device) -> dict:
    """P(class 1 | one disc in column x, t), averaged over rows, at t = 0 and T/2 (evaluate's heatmap):
    how the classifier behaves outside the columns it was trained on."""
    from diffusion import GaussianDiffusion
    from evaluate import classifier_heatmap
    from sample import load_classifier
    cfg = load_ddpm(run, "cpu")[1]
    clf = load_classifier(run, name, device, cfg)
    diffusion = GaussianDiffusion.from_config(cfg["diffusion"])
    out = {}
    for t in (0, diffusion.T // 2):
        heat = classifier_heatmap(clf, cfg["data"].image_size, t, diffusion, device=device)
        valid = ~np.isnan(heat).all(1)  # rows that can hold a disc centre: the same columns
        out[t] = heat[valid].mean(0)    # NaN for columns no disc centre fits in (printed as none)
    return out


def run_methods(run, methods, table, a, device, log=print) -> list:
    models = load_ddpm(run, device)
    cfg = models[1]
    rows = []
    for name in methods:
        guidance, target, signs, region = table[name]
        chosen = [0] if guidance == "none" else [0] * a.plain + [a.particles] * a.smc  # 0: plain
        for particles in chosen:
            lambdas = ",".join(str(s * a.scale) for s in signs) if signs else None
            draw = (smc.prepare(run, device, a.steps or None, guidance, lambdas, a.scale, target, a.classifier,
                                models, particles, a.ess) if particles else
                    prepare(run, device, a.steps or None, guidance, lambdas, a.scale, target, a.classifier, models))
            t0 = time.time()
            x = draw(a.n, a.batch_size, a.seed)
            dt = time.time() - t0
            images = to_uint8(x)
            label = f"{name}{f'_smc{particles}' if particles else ''}"
            row = {"run": run, "method": name, "sampler": f"smc x{particles}" if particles else "plain",
                   "target": " or ".join(f"[{lo:g}, {hi:g}]" for lo, hi in region),
                   **measure(images, region), "s_per_sample": dt / a.n, "seconds": dt}
            if particles:
                i = draw.smc_info
                row.update(resampled=i["resampled"] / i["system_steps"], survivors=i["survivors"],
                           final_ess=i["final_ess"])
            rows.append(row)
            os.makedirs(a.out, exist_ok=True)
            tag = os.path.basename(os.path.normpath(run))
            save_grid(x[:64], os.path.join(a.out, f"grid_{tag}_{label}.png"), marks=True,
                      edges=training_edges(cfg["data"].bands, cfg["data"].delta))
            np.savez_compressed(os.path.join(a.out, f"samples_{tag}_{label}.npz"), images=images)
            log(format_row(row))
    return rows


HEAD = (f"{'run':<12}{'method':<14}{'sampler':<10}{'target':<24}{'on_target':>10}{'z<.15':>7}{'z>.85':>7}"
        f"{'one':>7}{'zero':>7}"
        f"{'two+':>7}{'blob':>7}{'z_mean':>8}{'z_std':>7}{'s/sample':>10}{'resampled':>10}{'survivors':>10}")


def format_row(r) -> str:
    pct = lambda v: f"{v:>7.1%}"  # noqa: E731
    smc = f"{r['resampled']:>10.1%}{r['survivors']:>10.1f}" if "resampled" in r else f"{'-':>10}{'-':>10}"
    return (f"{os.path.basename(os.path.normpath(r['run'])):<12}{r['method']:<14}{r['sampler']:<10}"
            f"{r['target']:<24}{r['on_target']:>10.1%}{pct(r['left'])}{pct(r['right'])}{pct(r['one'])}{pct(r['zero'])}{pct(r['two_plus'])}"
            f"{pct(r['blob'])}{r['z_mean']:>8.3f}{r['z_std']:>7.3f}{r['s_per_sample']:>10.3f}{smc}")


def build_parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", default="runs/mid", help="a run trained with --bands middle")
    p.add_argument("--interp-run", default=None, help="a normal (extremes) run for the interpolation rows")
    p.add_argument("--methods", default="uncond,single_left,single_right,multi",
                   help=f"extrapolation methods, from {','.join(EXTRAPOLATION)}")
    p.add_argument("--n", type=int, default=128, help="samples per row")
    p.add_argument("--particles", type=int, default=8, help="SMC particles per system")
    p.add_argument("--ess", type=float, default=0.5, help="SMC resampling threshold")
    p.add_argument("--scale", type=float, default=30.0, help="lambda (single: the scale; multi: each class)")
    p.add_argument("--steps", type=int, default=0, help="respaced sampling steps (0: the run's)")
    p.add_argument("--batch-size", type=int, default=C.SampleConfig.batch_size)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--samplers", default="plain,smc", help="plain, smc or both (guided rows)")
    p.add_argument("--classifier", default="classifier", help="classifier | classifier_sn")
    p.add_argument("--device", default=None)
    p.add_argument("--out", default=None, help="output folder (default: <run>/extrapolate)")
    return p


def main(argv=None):
    a = build_parser().parse_args(argv)
    methods = [m.strip() for m in a.methods.split(",") if m.strip()]
    unknown = [m for m in methods if m not in EXTRAPOLATION]
    if unknown:
        raise UserError(f"unknown method(s) {', '.join(unknown)}; choose from {', '.join(EXTRAPOLATION)}")
    samplers = {v.strip() for v in a.samplers.split(",") if v.strip()}
    if not samplers or samplers - {"plain", "smc"}:
        raise UserError(f"--samplers {a.samplers!r}: use plain, smc or plain,smc")
    a.plain, a.smc = "plain" in samplers, "smc" in samplers
    if a.n < 1 or a.particles < 1:
        raise UserError("--n and --particles must be positive")
    a.out = a.out or os.path.join(a.run, "extrapolate")
    device = pick_device(a.device)
    bands = load_ddpm(a.run, "cpu")[1]["data"].bands
    if bands == "extremes":
        print(f"note: {a.run} was trained on the extremes, not --bands middle: the extrapolation rows "
              "then measure how far guidance pushes past the extreme bands")
    t0 = time.time()
    for t, p_right in classifier_profile(a.run, a.classifier, device).items():
        cols = [f"{x}:{v:.2f}" for x, v in enumerate(p_right) if v == v]
        print(f"{a.classifier} P(class 1 | disc in column x, t={t}): {' '.join(cols)}")
    print(HEAD)
    rows = run_methods(a.run, methods, EXTRAPOLATION, a, device)
    if a.interp_run:
        rows += run_methods(a.interp_run, ["multi"], INTERP, a, device)
    wall = time.time() - t0
    os.makedirs(a.out, exist_ok=True)
    with open(os.path.join(a.out, "extrapolate.json"), "w") as f:
        clean = [{k: (None if isinstance(v, float) and v != v else v) for k, v in r.items()} for r in rows]
        json.dump({"settings": vars(a), "rows": clean, "wall_s": wall}, f, indent=2)  # NaN -> null
    print(f"{len(rows)} rows of {a.n} samples in {wall:.0f} s; wrote {os.path.join(a.out, 'extrapolate.json')}")


if __name__ == "__main__":
    cli(main)

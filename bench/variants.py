"""Does interpolation survive every modelling choice? One row per variant on the circles (§5.5).

    python bench/variants.py [--root runs/variants] [--n 256] [--only unet_fixed,dit_fixed]

The paper claims (§2.2, App. A, C, J) that multi-guidance interpolates whatever the variance
parameterisation, the sampler, the guidance scheme and the backbone. This script trains what is
missing (cpu preset, one directory per network under --root) and evaluates, with --n samples per
method and lambda = [30, 30]:
  * {fixed variance + L_simple, learned Sigma + L_hybrid} x {UNet, DiT} DDPMs, each sampled with
    64 ancestral steps, DDIM eta = 0 and DDIM eta = 1 on the same respaced grid;
  * the classifier gradient taken at x_t (the authors' code) and at the posterior mean mu (§2.2);
  * classifier-free multi-guidance (App. J) of a class-conditional UNet, in the form whose weights
    sum to 1 (the default) and in Eq. 12 as printed.
One classifier pair (plain + spectral norm) is trained once and linked into every run: classifiers
see the data and the noise schedule, not the DDPM.

Columns: unconditional middle fraction (one disc with z in [0.2, 0.8]); multi-guidance accuracy
(the same, guided), its 0-disc and 2+-disc rates, histogram MSE / KLD vs uniform (App. B); training
wall time of the DDPM (as its checkpoint recorded it) and sampling seconds per 100 images. Wall
times are quoted beside the fp32 matmul GFLOP/s measured in the same run (machines differ). Writes
<root>/variants.json (rows of earlier commands are kept).
"""
import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import evaluate  # noqa: E402
import train  # noqa: E402
from checkpoint import pick_device  # noqa: E402
from train_speed import matmul_peak  # noqa: E402  (bench/ is on sys.path as the script's folder)

# DDPM runs: name -> extra train.py flags.
RUNS = {
    "unet_fixed": [],
    "unet_learned": ["--variance", "learned"],
    "dit_fixed": ["--arch", "dit"],
    "dit_learned": ["--arch", "dit", "--variance", "learned"],
    "unet_cfg": ["--class-cond"],
}
SAMPLERS = {"ancestral": dict(sampler="ancestral", eta=0.0), "ddim_eta0": dict(sampler="ddim", eta=0.0),
            "ddim_eta1": dict(sampler="ddim", eta=1.0)}


def rows_of(only):
    """(row name, run, method, evaluate_run keyword arguments) of every row."""
    rows = []
    for run in ("unet_fixed", "unet_learned", "dit_fixed", "dit_learned"):
        for s, kw in SAMPLERS.items():
            rows.append((f"{run}/{s}", run, ("uncond", "multi"), kw))
    rows.append(("unet_fixed/guidance_at_mu", "unet_fixed", ("multi",), dict(guidance_at="mu")))
    rows.append(("unet_cfg/cfg", "unet_cfg", ("uncond", "cfg"), {}))
    rows.append(("unet_cfg/cfg_printed", "unet_cfg", ("cfg",), dict(cfg_form="printed")))
    return [r for r in rows if not only or r[1] in only]


def ensure_run(root, name, seed):
    """Train the DDPM of ``name`` if missing, and link the shared classifier pair into it."""
    out = os.path.join(root, name)
    if not os.path.exists(os.path.join(out, "ddpm.pt")):
        train.main(["--dataset", "circles", "--model", "ddpm", "--seed", str(seed), "--out", out,
                    "--no-grid"] + RUNS[name])
    for clf in ("classifier.pt", "classifier_sn.pt"):
        link = os.path.join(out, clf)
        if not os.path.lexists(link):
            os.symlink(os.path.join("..", "classifiers", clf), link)
    return out


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--root", default="runs/variants")
    p.add_argument("--n", type=int, default=256, help="samples per method and row")
    p.add_argument("--seed", type=int, default=0, help="training seed of every network")
    p.add_argument("--lambdas", default="30,30")
    p.add_argument("--only", default="", help=f"comma-separated runs from {','.join(RUNS)} (default: all)")
    a = p.parse_args()
    only = [r for r in a.only.split(",") if r]
    for r in only:
        if r not in RUNS:
            p.error(f"unknown run {r!r}; choose from {', '.join(RUNS)}")
    pick_device("cpu")
    peak = matmul_peak()
    t_start = time.time()
    clf_dir = os.path.join(a.root, "classifiers")
    if not os.path.exists(os.path.join(clf_dir, "classifier_sn.pt")):
        train.main(["--dataset", "circles", "--model", "classifier", "--seed", str(a.seed), "--out", clf_dir])
    results = {}
    for name, run, methods, kw in rows_of(only):
        out = ensure_run(a.root, run, a.seed)
        m = evaluate.evaluate_run(out, a.n, lambdas=a.lambdas, methods=methods, figures=False,
                                  write_metrics=False, log=lambda *_: None, **kw)
        guided = m.get("multi") or m.get("cfg")
        row = {"uncond_middle": m["uncond"]["accuracy"] if "uncond" in m else None,
               "accuracy": guided["accuracy"], "zero_disc": guided["zero_disc"],
               "two_plus_disc": guided["two_plus_disc"], "blob": guided["blob"],
               "hist_mse": guided["hist_mse"], "hist_kld": guided["hist_kld"],
               "train_min": _train_seconds(out) / 60,
               "sample_s_per_100": 100 * sum(v["sample_seconds"] for v in m.values()) / (a.n * len(m))}
        results[name] = row
        print(f"{name:<28}" + "  ".join(f"{k} {_fmt(k, v)}" for k, v in row.items()), flush=True)

    print(f"\n{'variant':<28}{'uncond mid':>11}{'guided acc':>11}{'0-disc':>8}{'2+disc':>8}{'blob':>7}"
          f"{'MSE':>7}{'KLD':>7}{'train min':>10}{'s/100 smp':>10}")
    for name, r in results.items():
        print(f"{name:<28}{_fmt('uncond_middle', r['uncond_middle']):>11}{_fmt('accuracy', r['accuracy']):>11}"
              f"{_fmt('zero_disc', r['zero_disc']):>8}{_fmt('two_plus_disc', r['two_plus_disc']):>8}"
              f"{_fmt('blob', r['blob']):>7}{r['hist_mse']:>7.3f}{r['hist_kld']:>7.3f}"
              f"{r['train_min']:>10.1f}{r['sample_s_per_100']:>10.1f}")
    wall = time.time() - t_start
    out = os.path.join(a.root, "variants.json")
    if os.path.exists(out):  # rows of earlier commands (e.g. --only) stay, this command's replace theirs
        results = {**json.load(open(out))["rows"], **results}
    with open(out, "w") as f:
        json.dump({"n": a.n, "lambdas": a.lambdas, "seed": a.seed, "rows": results,
                   "wall_seconds": wall, "matmul_gflops": peak / 1e9}, f, indent=2)
    print(f"\n{len(results)} rows in {wall / 60:.1f} min (training included when it ran in this command); "
          f"fp32 matmul peak {peak / 1e9:.0f} GFLOP/s; wrote {out}")


def _train_seconds(run) -> float:
    """The DDPM's training wall time, as its checkpoint recorded it (train.py's meta)."""
    from checkpoint import load_checkpoint
    return float(load_checkpoint(run, "ddpm")["meta"].get("train_seconds", float("nan")))


def _fmt(k, v):
    if v is None:
        return "-"
    if k in ("uncond_middle", "accuracy", "zero_disc", "two_plus_disc", "blob"):
        return f"{v:.1%}"
    return f"{v:.2f}"


if __name__ == "__main__":
    main()

"""Multi-guided DDIM against ancestral sampling on the §5.5 table's pairs (results/guided_ddim.json).

    python bench/guided_ddim.py [--root runs/table] [--pairs 0:0,1:0,2:0] [--n 512]

For each (DDPM seed, classifier seed) pair of bench/circles_table.py's root (trained there first),
multi-guided samples with λ = [30, 30] from the same 64-step respaced grid, three ways: ancestral
(the paper's sampler), DDIM η = 1 and DDIM η = 0 (Song et al.), guidance shifting ε^ after x^_0 is
clipped (diffusion.GaussianDiffusion.ddim_eps_x0). Reports accuracy and zero-or-two rates, mean ± std
over the pairs, and each DDIM accuracy minus the pair's ancestral one.
"""
import argparse
import os
import sys

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import evaluate  # noqa: E402
from checkpoint import pick_device  # noqa: E402
from circles_table import link_pair  # noqa: E402  (bench/ is on sys.path as the script's folder)
from results.record import Recorder, mean_std  # noqa: E402

SAMPLERS = {"ancestral": dict(sampler="ancestral", eta=0.0), "ddim η = 1": dict(sampler="ddim", eta=1.0),
            "ddim η = 0": dict(sampler="ddim", eta=0.0)}


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--root", default="runs/table")
    p.add_argument("--pairs", default="0:0,1:0,2:0", help="DDPM seed:classifier seed, comma-separated")
    p.add_argument("--n", type=int, default=512)
    p.add_argument("--lambdas", default="30,30")
    a = p.parse_args()
    rec = Recorder("guided_ddim", "Multi-guided DDIM against ancestral sampling (§5.5, App. J)")
    pick_device("cpu")
    pairs = [tuple(int(v) for v in q.split(":")) for q in a.pairs.split(",")]
    res = {k: [] for k in SAMPLERS}
    for s, c in pairs:
        for d in (f"ddpm_seed{s}", f"clf_seed{c}"):
            if not os.path.isdir(os.path.join(a.root, d)):
                raise SystemExit(f"{a.root}/{d} is missing: run bench/circles_table.py --root {a.root} first")
        run = link_pair(a.root, s, c)
        for name, kw in SAMPLERS.items():
            m = evaluate.evaluate_run(run, a.n, lambdas=a.lambdas, methods=("multi",), figures=False,
                                      write_metrics=False, log=lambda *_: None, **kw)["multi"]
            res[name].append(dict(m, ddpm_seed=s, clf_seed=c))
            print(f"d{s} c{c} {name}: accuracy {m['accuracy']:.1%}, zero-or-two {m['zero_or_two']:.1%} "
                  f"(zero {m['zero_disc']:.1%}, two+ {m['two_plus_disc']:.1%})", flush=True)
    anc = np.array([r["accuracy"] for r in res["ancestral"]])
    rows = []
    for name, rs in res.items():
        acc = np.array([r["accuracy"] for r in rs])
        rows.append([name, len(rs), mean_std(acc, pct=True), mean_std([r["zero_disc"] for r in rs], pct=True),
                     mean_std([r["two_plus_disc"] for r in rs], pct=True),
                     "–" if name == "ancestral" else f"{100 * (acc - anc).mean():+.1f} points "
                     f"(worst {100 * (acc - anc).min():+.1f})"])
    per_pair = [[f"d{r['ddpm_seed']} c{r['clf_seed']}"] + [f"{100 * res[k][i]['accuracy']:.1f} %" for k in SAMPLERS]
                for i, r in enumerate(res["ancestral"])]
    tables = [{"title": f"multi-guidance λ = [{a.lambdas}], 64 respaced steps, {a.n} samples per pair",
               "columns": ["sampler", "pairs", "accuracy", "zero disc", "two+ discs", "accuracy − ancestral"],
               "rows": rows},
              {"title": "accuracy per pair", "columns": ["pair"] + list(SAMPLERS), "rows": per_pair}]
    metrics = {k: [{q: r[q] for q in ("ddpm_seed", "clf_seed", "accuracy", "one_disc", "zero_disc",
                                      "two_plus_disc", "zero_or_two", "hist_mse", "hist_kld", "sample_seconds")}
                   for r in rs] for k, rs in res.items()}
    path = rec.write(metrics, seeds={"pairs": [f"{s}:{c}" for s, c in pairs]}, n=a.n, tables=tables)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()

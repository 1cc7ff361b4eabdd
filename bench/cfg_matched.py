"""Classifier-free multi-guidance at the classifier's per-class strength (results/cfg_matched.json).

    python bench/cfg_matched.py [--root runs/table] [--seeds 0] [--n 512]

Classifier-free multi-guidance (App. J) with weight λ guides each of the M classes with (1 + λ) / M
(classifier_free.py), so λ = 30 on two classes is about half of classifier multi-guidance at
λ = [30, 30]; λ = 2·30 − 1 = 59 matches it. Trains a class-conditional DDPM with label dropout
(``train.py --class-cond --seed s``, cpu preset) per seed under <root>/cfg_seed<s>/ and samples,
64 respaced ancestral steps: the null label (unguided), cfg at λ = 30 and at the matched λ. Beside
it, classifier multi-guidance of the same DDPM seed from bench/circles_table.py (classifier seed
0), where that root holds it.
"""
import argparse
import json
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import evaluate  # noqa: E402
import train  # noqa: E402
from checkpoint import pick_device  # noqa: E402
from results.record import Recorder, mean_std  # noqa: E402

KEYS = ("accuracy", "zero_disc", "two_plus_disc", "hist_mse", "hist_kld")


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--root", default="runs/table")
    p.add_argument("--seeds", default="0")
    p.add_argument("--n", type=int, default=512)
    p.add_argument("--scale", type=float, default=30.0, help="the classifier's λ per class")
    a = p.parse_args()
    rec = Recorder("cfg_matched", "Classifier-free multi-guidance at matched per-class strength (App. J)")
    pick_device("cpu")
    matched = 2 * a.scale - 1  # (1 + λ) / M = scale with M = 2
    seeds = [int(s) for s in a.seeds.split(",")]
    rows = {"cfg, null label (unguided)": [], f"cfg λ = {a.scale:g} (per class {(1 + a.scale) / 2:g})": [],
            f"cfg λ = {matched:g} (per class {a.scale:g})": [], f"classifier multi λ = [{a.scale:g}, {a.scale:g}]": []}
    names = list(rows)
    for s in seeds:
        run = os.path.join(a.root, f"cfg_seed{s}")
        if not os.path.exists(os.path.join(run, "ddpm.pt")):
            train.main(["--dataset", "circles", "--model", "ddpm", "--class-cond", "--seed", str(s), "--out", run,
                        "--no-grid"])
        ev = dict(n=a.n, figures=False, write_metrics=False, log=lambda *_: None)
        rows[names[0]].append(evaluate.evaluate_run(run, methods=("uncond",), **ev)["uncond"])
        for name, lam in ((names[1], a.scale), (names[2], matched)):
            m = evaluate.evaluate_run(run, lambdas=f"{lam:g},{lam:g}", methods=("cfg",), resample=True, **ev)["cfg"]
            rows[name].append(m)
            print(f"seed {s} {name}: accuracy {m['accuracy']:.1%}", flush=True)
        table_run = os.path.join(a.root, f"pair_d{s}_c0")
        if os.path.exists(os.path.join(table_run, "eval_multi.npz")):
            rows[names[3]].append(evaluate.evaluate_run(table_run, lambdas=f"{a.scale:g},{a.scale:g}",
                                                        methods=("multi",), **ev)["multi"])
    fmt = lambda k, v: mean_std(v, pct=True) if k not in ("hist_mse", "hist_kld") else mean_std(v, digits=3)  # noqa: E731
    trows = [[name, len(rs)] + [fmt(k, [r[k] for r in rs]) for k in KEYS] for name, rs in rows.items() if rs]
    tables = [{"title": f"{a.n} samples per row and seed, 64 respaced ancestral steps; mean ± std over DDPM seeds "
                        "(the classifier row: bench/circles_table.py's unconditional DDPM of the same seed)",
               "columns": ["method", "seeds", "accuracy", "zero disc", "two+ discs", "hist MSE", "hist KLD"],
               "rows": trows}]
    metrics = {name: [{k: r[k] for k in KEYS + ("one_disc", "zero_or_two", "sample_seconds")} for r in rs]
               for name, rs in rows.items()}
    path = rec.write(metrics, seeds=seeds, n=a.n, tables=tables)
    print(json.dumps({k: [round(r["accuracy"], 3) for r in v] for k, v in metrics.items()}))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()

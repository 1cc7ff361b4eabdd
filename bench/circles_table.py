"""The §5.5 table over several classifier seeds on one DDPM: mean ± std per method.

    python bench/circles_table.py --run runs/circles [--seeds 3] [--n 512]

For each seed s, trains a fresh classifier and spectral-norm twin (train.py --seed s) into
<run>/table/seed<s>/ next to a link to the run's DDPM, samples --n images with multi-guidance for
each, and measures them with evaluate.py. The unconditional row uses the run itself. The paper
reports mean ± std over 10 classifiers (78 % ± 8.7 % plain, 75 % ± 13.3 % spectral norm).
"""
import argparse
import json
import os
import sys
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import evaluate  # noqa: E402
import train  # noqa: E402

KEYS = ["accuracy", "zero_disc", "two_plus_disc", "zero_or_two", "one_disc", "hist_mse", "hist_kld"]


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--run", default="runs/circles")
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--n", type=int, default=512)
    p.add_argument("--lambdas", default="30,30")
    a = p.parse_args()
    torch.set_num_threads(os.cpu_count() or 1)
    t0 = time.time()
    rows = {"uncond": [evaluate.evaluate_run(a.run, a.n, methods=("uncond",), figures=False,
                                                write_metrics=False)["uncond"]],
            "multi": [], "multi_sn": []}
    for s in range(1, a.seeds + 1):
        sub = os.path.join(a.run, "table", f"seed{s}")
        os.makedirs(sub, exist_ok=True)
        link = os.path.join(sub, "ddpm.pt")
        if not os.path.exists(link):
            os.symlink(os.path.abspath(os.path.join(a.run, "ddpm.pt")), link)
        if not os.path.exists(os.path.join(sub, "classifier_sn.pt")):
            train.main(["--model", "classifier", "--out", sub, "--resume", "--seed", str(s)])
        m = evaluate.evaluate_run(sub, a.n, lambdas=a.lambdas, methods=("multi", "multi_sn"), figures=False)
        for k in ("multi", "multi_sn"):
            rows[k].append(m[k])
        print(f"seed {s}: " + "; ".join(f"{k} acc {m[k]['accuracy']:.1%} zero {m[k]['zero_disc']:.1%}"
                                        for k in ("multi", "multi_sn")), flush=True)
    summary = {}
    print(f"\n{'method':<10}" + "".join(f"{k:>18}" for k in KEYS))
    for name, rs in rows.items():
        vals = {k: np.array([r[k] for r in rs]) for k in KEYS}
        summary[name] = {k: [float(v.mean()), float(v.std())] for k, v in vals.items()}
        fmt = lambda k, v: (f"{v.mean():.1%} ± {v.std():.1%}" if k not in ("hist_mse", "hist_kld")
                            else f"{v.mean():.3f} ± {v.std():.3f}")
        print(f"{name:<10}" + "".join(f"{fmt(k, v):>18}" for k, v in vals.items()))
    print("paper:    multi accuracy 78% ± 8.7%, zero-or-two 4.25% ± 2.45%; multi_sn accuracy 75% ± 13.3%")
    with open(os.path.join(a.run, "table", "summary.json"), "w") as f:
        json.dump({"seeds": a.seeds, "n": a.n, "lambdas": a.lambdas, "summary": summary}, f, indent=2)
    print(f"{a.seeds} seeds in {(time.time() - t0) / 60:.1f} min; wrote {a.run}/table/summary.json")


if __name__ == "__main__":
    main()

"""The CelebA pipeline (§4.3 filter, §5.1 histograms) end to end on the face stand-in
(results/faces_pipeline.json).

    python bench/faces_pipeline.py [--root runs/faces_bench] [--seed 0] [--n 512]

Runs the README's four stand-in commands as subprocesses, timed stage by stage:
    python toy_faces.py --out DATA --n 20000
    python data_filter.py --data-dir DATA --attribute Smiling --out ROOT/filter
    python train.py --dataset celeba --data-dir DATA --index-list ROOT/filter/index.txt --out ROOT/faces
    python evaluate.py --run ROOT/faces --n N
then records the filter's counts per stage with the true z_smile range of what it kept, and the
evaluation's histogram metrics of calibrated p(Smiling) (MSE / KLD against uniform, App. B) and the
fractions of mild faces by p and by the true-latent regressor, beside the paper's §5.1 numbers.
"""
import argparse
import json
import os
import shutil
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from results.record import Recorder  # noqa: E402

PAPER = {"uncond": "0.64 / 3.5", "multi": "0.13 / 0.61", "train": "0.56 / 3.17"}
KEYS = ("hist_mse", "hist_kld", "frac_03_07", "z_frac_03_07")


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--root", default="runs/faces_bench")
    p.add_argument("--data", default="data/faces_bench")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--n", type=int, default=512)
    a = p.parse_args()
    os.chdir(ROOT)
    rec = Recorder("faces_pipeline", "The CelebA pipeline on the face stand-in (§4.3, §5.1)")
    filt, run = os.path.join(a.root, "filter"), os.path.join(a.root, "faces")
    py = sys.executable
    stages = {
        "faces": [py, "toy_faces.py", "--out", a.data, "--n", "20000"],
        "filter": [py, "data_filter.py", "--data-dir", a.data, "--attribute", "Smiling", "--out", filt],
        "train": [py, "train.py", "--dataset", "celeba", "--data-dir", a.data, "--index-list",
                  os.path.join(filt, "index.txt"), "--out", run, "--seed", str(a.seed)],
        "evaluate": [py, "evaluate.py", "--run", run, "--n", str(a.n)],
    }
    secs = {}
    for name, cmd in stages.items():
        if name == "faces" and os.path.isdir(a.data):
            shutil.rmtree(a.data)
        t0 = time.time()
        subprocess.run(cmd, check=True)
        secs[name] = round(time.time() - t0, 1)
    with open(os.path.join(filt, "filter_summary.json")) as f:
        summary = json.load(f)
    with open(os.path.join(run, "metrics.json")) as f:
        metrics = json.load(f)
    rows = [[m, f"{r['hist_mse']:.3f}", f"{r['hist_kld']:.3f}", f"{100 * r['frac_03_07']:.1f} %",
             f"{100 * r['z_frac_03_07']:.1f} %" if "z_frac_03_07" in r else "–", PAPER.get(m, "–")]
            for m, r in metrics.items() if isinstance(r, dict) and "hist_mse" in r]
    tables = [{"title": f"calibrated p(Smiling) of {a.n} samples per method (train: the filtered set)",
               "columns": ["method", "hist MSE", "hist KLD", "p in [0.3, 0.7]", "true z in [0.3, 0.7]",
                           "paper MSE / KLD (§5.1)"], "rows": rows},
              {"title": "time per stage", "columns": list(secs),
               "rows": [[f"{v / 60:.1f} min" for v in secs.values()]]}]
    path = rec.write({"methods": metrics, "filter": summary, "stage_seconds": secs}, seeds=[a.seed], n=a.n,
                     tables=tables, notes=[f"Commands: `{' '.join(c[1:] and ['python'] + c[1:])}`"
                                           for c in stages.values()])
    print(f"wrote {path}")


if __name__ == "__main__":
    main()

"""The CelebA pipeline (§4.3 filter, §5.1 histograms, §5.3 λ sweep, §6 two attributes) end to end on
the face stand-in (results/faces_pipeline.json).

    python bench/faces_pipeline.py [--root runs/faces_bench] [--seed 0] [--n 512] [--sweep-n 256]

Runs the README's stand-in commands as subprocesses, timed stage by stage (DATA = --data, R = --root):
    python toy_faces.py --out DATA --n 20000
    python data_filter.py --data-dir DATA --attribute Smiling --out R/filter                # §4.3
    python train.py --dataset celeba --data-dir DATA --index-list R/filter/index.txt --out R/faces
    python evaluate.py --run R/faces --n N                                                   # §5.1
    python evaluate.py --run R/faces --sweep 3.5,10,30,50,75,100 --n SWEEP_N                 # §5.3
    python data_filter.py --data-dir DATA --attribute Black_Hair --out R/filter_hair         # §6
    python data_filter.py --intersect R/filter/index.txt,R/filter_hair/index.txt --out-list R/index_two.txt
    python train.py --dataset celeba --data-dir DATA --attribute Smiling,Black_Hair \\
        --index-list R/index_two.txt --out R/two
    python evaluate.py --run R/two --n N --eval-classifier R/filter/eval_Smiling.pt,R/filter_hair/eval_Black_Hair.pt
    python data_filter.py --data-dir DATA --attribute Smiling --out R/filter_paper_tau --tau1 0.95 --tau2 0.9999
    python data_filter.py ... --out R/filter_paper_tau_x5 --tau1 0.95 --tau2 0.9999 --ensemble-steps 1500
(the last two: the authors' released thresholds, data_filter's paper preset, at the cpu preset's
sizes, then with members trained 5x longer; where stage (b) keeps too few faces for --k, the filter
stops with its counts so far, which are reported)
then records the filter's counts per stage with the true z_smile range of what it kept; §5.1's
histogram metrics of calibrated p(Smiling) (MSE / KLD against uniform, App. B), the fractions of mild
faces by p, by the true-latent regressor and by the mouth readout (mouth_readout.py); the sweep's
metrics per λ; and §6's central square (both p in [0.3, 0.7]) by calibrated p and by true z.
--stages names a subset (a stage's inputs must exist from an earlier run).
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
SWEEP = "3.5,10,30,50,75,100"
STAGES = ("faces", "filter", "train", "evaluate", "sweep", "filter_hair", "intersect", "train_two",
          "evaluate_two", "filter_paper_tau", "filter_paper_tau_x5")
# The filter at the authors' thresholds may keep too few images for --k: it then writes its counts
# so far and exits 2, and the pipeline reports those counts.
MAY_FALL_SHORT = ("filter_paper_tau", "filter_paper_tau_x5")


def commands(a, py=sys.executable) -> dict:
    r = a.root
    filt, hair, run, two = (os.path.join(r, d) for d in ("filter", "filter_hair", "faces", "two"))
    index_two = os.path.join(r, "index_two.txt")
    return {
        "faces": [py, "toy_faces.py", "--out", a.data, "--n", "20000"],
        "filter": [py, "data_filter.py", "--data-dir", a.data, "--attribute", "Smiling", "--out", filt],
        "train": [py, "train.py", "--dataset", "celeba", "--data-dir", a.data, "--index-list",
                  os.path.join(filt, "index.txt"), "--out", run, "--seed", str(a.seed)],
        "evaluate": [py, "evaluate.py", "--run", run, "--n", str(a.n)],
        "sweep": [py, "evaluate.py", "--run", run, "--sweep", SWEEP, "--n", str(a.sweep_n)],
        "filter_hair": [py, "data_filter.py", "--data-dir", a.data, "--attribute", "Black_Hair", "--out", hair],
        "intersect": [py, "data_filter.py", "--intersect", f"{filt}/index.txt,{hair}/index.txt",
                      "--out-list", index_two],
        "train_two": [py, "train.py", "--dataset", "celeba", "--data-dir", a.data, "--attribute",
                      "Smiling,Black_Hair", "--index-list", index_two, "--out", two, "--seed", str(a.seed)],
        "evaluate_two": [py, "evaluate.py", "--run", two, "--n", str(a.n), "--eval-classifier",
                         f"{filt}/eval_Smiling.pt,{hair}/eval_Black_Hair.pt"],
        "filter_paper_tau": [py, "data_filter.py", "--data-dir", a.data, "--attribute", "Smiling", "--out",
                             os.path.join(r, "filter_paper_tau"), "--tau1", "0.95", "--tau2", "0.9999"],
        "filter_paper_tau_x5": [py, "data_filter.py", "--data-dir", a.data, "--attribute", "Smiling", "--out",
                                os.path.join(r, "filter_paper_tau_x5"), "--tau1", "0.95", "--tau2", "0.9999",
                                "--ensemble-steps", "1500"],
    }


def filtered_index(root: str, data: str) -> str:
    """ROOT/filter/index.txt, the filter stage's list (a one-line error when it or DATA is missing)."""
    from checkpoint import UserError
    index = os.path.join(root, "filter", "index.txt")
    if not os.path.isfile(index) or not os.path.isdir(data):
        raise UserError(f"no filtered stand-in at {index} and {data}; run python bench/faces_pipeline.py "
                        f"--root {root} --data {data} --stages faces,filter first")
    return index


def pct(v) -> str:
    return "–" if v is None else f"{100 * v:.1f} %"


def read(path):
    with open(path) as f:
        return json.load(f)


def read_or_none(path):
    return read(path) if os.path.exists(path) else None


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--root", default="runs/faces_bench")
    p.add_argument("--data", default="data/faces_bench")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--n", type=int, default=512, help="samples per method (§5.1, §6)")
    p.add_argument("--sweep-n", type=int, default=256, help="samples per λ of the sweep (§5.3)")
    p.add_argument("--stages", default=",".join(STAGES), help="comma-separated subset of " + ",".join(STAGES))
    a = p.parse_args()
    stages = [s for s in a.stages.split(",") if s]
    unknown = sorted(set(stages) - set(STAGES))
    if unknown:
        p.error(f"unknown stage(s) {', '.join(unknown)}; choose from {','.join(STAGES)}")
    os.chdir(ROOT)
    rec = Recorder("faces_pipeline", "The CelebA pipeline on the face stand-in (§4.3, §5.1, §5.3, §6)")
    cmds = commands(a)
    # Stage times persist in the root, so a command that re-runs a subset keeps the others' times.
    secs_path = os.path.join(a.root, "stage_seconds.json")
    secs = read(secs_path) if os.path.exists(secs_path) else {}
    for name in STAGES:
        if name not in stages:
            continue
        if name == "faces" and os.path.isdir(a.data):
            shutil.rmtree(a.data)
        t0 = time.time()
        done = subprocess.run(cmds[name], check=name not in MAY_FALL_SHORT)
        if done.returncode and "error" not in (read_or_none(os.path.join(a.root, name, "filter_summary.json")) or {}):
            raise SystemExit(f"stage {name} failed (exit {done.returncode}); see its output above")
        secs[name] = round(time.time() - t0, 1)
        os.makedirs(a.root, exist_ok=True)
        with open(secs_path, "w") as f:
            json.dump(secs, f)

    r = a.root
    summary = read(os.path.join(r, "filter", "filter_summary.json"))
    hair = read(os.path.join(r, "filter_hair", "filter_summary.json"))
    paper_tau = {name: read_or_none(os.path.join(r, name, "filter_summary.json")) for name in MAY_FALL_SHORT}
    metrics = read(os.path.join(r, "faces", "metrics.json"))
    sweep = read(os.path.join(r, "faces", "sweep.json"))
    two = read(os.path.join(r, "two", "metrics.json"))
    rows = [[m, f"{v['hist_mse']:.3f}", f"{v['hist_kld']:.3f}", pct(v["frac_03_07"]), pct(v.get("z_frac_03_07")),
             pct(v.get("mouth_mild")), pct(v.get("mouth_faded")), pct(v.get("mouth_doubled")), PAPER.get(m, "–")]
            for m, v in metrics.items() if isinstance(v, dict) and "hist_mse" in v]

    def counts(summ):
        """Images per filter stage, with the true z_smile range (and mild count) of each class kept."""
        zs = summ.get("true_latent", {})

        def zrange(stage, c):
            st = zs.get(stage, {}).get(f"class_{c}", {})
            return f"{st['min']:.2f}–{st['max']:.2f} ({st['in_0.3_0.7']} mild)" if st.get("n") else "–"
        return [[c["stage"], c["total"], c["class_0"], c["class_1"], zrange(c["stage"], 0), zrange(c["stage"], 1)]
                for c in summ["counts"]]
    filter_cols = ["stage", "total", "class 0", "class 1", "true z_smile, class 0", "true z_smile, class 1"]
    sweep_rows = [[lam, f"{v['hist_mse']:.3f}", f"{v['hist_kld']:.3f}", pct(v["frac_03_07"]),
                   pct(v.get("z_frac_03_07")), pct(v.get("mouth_mild"))] for lam, v in sweep.items()]
    square = [[m, pct(v.get("center_03_07")), pct(v.get("z_center_03_07"))]
              for m, v in two.items() if isinstance(v, dict) and "center_03_07" in v]
    tables = [
        {"title": f"§4.3 filter (Smiling, cpu preset, τ1 = {summary['tau1']:g}, τ2 = {summary['tau2']:g}): "
                  "images per stage", "columns": filter_cols, "rows": counts(summary)},
        {"title": f"§5.1: calibrated p(Smiling) of {a.n} samples per method (train: the filtered set)",
         "columns": ["method", "hist MSE", "hist KLD", "p in [0.3, 0.7]", "true z in [0.3, 0.7]",
                     "mouth mild", "mouth faded", "mouth doubled", "paper MSE / KLD (§5.1)"], "rows": rows},
        {"title": f"§5.3: multi-guidance at λ for every class, {a.sweep_n} samples per λ",
         "columns": ["λ", "hist MSE", "hist KLD", "p in [0.3, 0.7]", "true z in [0.3, 0.7]", "mouth mild"],
         "rows": sweep_rows},
        {"title": f"§6: Smiling × Black_Hair, {a.n} samples per method: the central square (both in [0.3, 0.7])",
         "columns": ["method", "by calibrated p", "by true-z proxy"], "rows": square},
    ]
    notes = []
    for summ in paper_tau.values():
        if not summ:
            continue
        cfg = summ["config"]
        what = (f"τ1 = {summ['tau1']:g}, τ2 = {summ['tau2']:g}, ensemble members of {cfg['ensemble_steps']} "
                f"steps, cpu preset otherwise")
        tables.append({"title": f"§4.3 filter at the authors' released thresholds ({what}): images per stage",
                       "columns": filter_cols, "rows": counts(summ)})
        if "b_agreement" in summ:
            tables.append({"title": f"stage (b) at τ2 = {summ['tau2']:g} ({what}): each image's least confident "
                                    "held-out p(label), over the images stage (a) kept",
                           "columns": ["class", "n", "1st percentile", "median", "99th percentile", "max"],
                           "rows": [[c[-1], v["n"]] + [f"{v[q]:.5f}" if v["n"] else "–"
                                                       for q in ("q01", "median", "q99", "max")]
                                    for c, v in summ["b_agreement"].items()]})
        if "error" in summ:
            notes.append(f"The filter with {what} stopped after stage (b): {summ['error']}")
    if secs:
        tables.append({"title": "time per stage (min)", "columns": list(secs),
                       "rows": [[f"{v / 60:.1f}" for v in secs.values()]]})
    for src, name in (("faces/hist_p.png", "faces_hist_p.png"), ("faces/sweep.png", "faces_sweep.png"),
                      ("two/heatmap_2d.png", "faces_heatmap_2d.png"), ("two/heatmap_2d_z.png", "faces_heatmap_2d_z.png")):
        if os.path.exists(os.path.join(r, src)):
            shutil.copy(os.path.join(r, src), rec.figure_path(name))
    notes += [f"Commands: `{' '.join(['python'] + c[1:])}`" for n_, c in cmds.items() if n_ in stages]
    path = rec.write({"methods": metrics, "sweep": sweep, "two_attributes": two, "filter": summary, **paper_tau,
                      "filter_hair": hair, "stage_seconds": secs}, seeds=[a.seed],
                     n={"methods": a.n, "sweep": a.sweep_n}, tables=tables, notes=notes,
                     compute_seconds=sum(secs.values()) if set(secs) >= set(STAGES) else None)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()

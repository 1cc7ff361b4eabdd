"""App. E's extrapolation through a classifier trained on synthetic data, on the circles or the face
stand-in (results/synthetic_property_<dataset>.json).

    python bench/synthetic_property.py --dataset circles [--run runs/table/ddpm_seed0] [--n 256]
    python bench/synthetic_property.py --dataset faces [--run runs/faces_bench/faces] [--n 256]

lab/synthetic_property.py on one trained run: a noise-aware classifier learns the run's training
images with a property pasted on half of them (circles: a ring for the disc; faces: a green mouth),
then single guidance towards "property" at each --lambdas draws --n samples from the DDPM, which
never saw the property. Reports the property rate by an independent detector (a shape test, a
colour test) against the unguided samples, what else breaks (circles: one-disc, zero, two+ and
blob rates; faces: the mouth readout's classes), and the detector on plain and painted training
images. The circles run is bench/circles_table.py's, the faces run bench/faces_pipeline.py's.
"""
import argparse
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from checkpoint import UserError, cli, load_checkpoint  # noqa: E402
from lab import synthetic_property as SP  # noqa: E402
from results.record import Recorder  # noqa: E402

RUNS = {"circles": "runs/table/ddpm_seed0", "faces": "runs/faces_bench/faces"}
DATASET = {"circles": "circles", "faces": "celeba"}
COLUMNS = {"ring": ["one ring (property)", "any ring", "one disc", "zero", "two+", "blob"],
           "green_mouth": ["green mouth (property)", "green anywhere", "mouth mild", "clear", "faded",
                           "doubled", "other"]}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", choices=list(RUNS), default="circles")
    p.add_argument("--run", default=None, help="default: runs/table/ddpm_seed0 (circles), runs/faces_bench/faces")
    p.add_argument("--n", type=int, default=256)
    p.add_argument("--lambdas", default="10,30,100")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--clf-steps", type=int, default=None, help="default: the run's preset")
    p.add_argument("--steps", type=int, default=None, help="respaced sampling steps (default: the run's)")
    p.add_argument("--overwrite", action="store_true", help="retrain the classifier")
    a = p.parse_args(argv)
    run = a.run or RUNS[a.dataset]
    found = load_checkpoint(run, "ddpm")["config"]["data"]["dataset"]
    if found != DATASET[a.dataset]:
        raise UserError(f"{run} is a {found} run, not {a.dataset}; pass --run of a {a.dataset} run")
    rec = Recorder(f"synthetic_property_{a.dataset}",
                   f"Extrapolation through a classifier trained on synthetic data, {a.dataset} (App. E)")
    r = SP.experiment(run, SP.parse_lambdas(a.lambdas), a.n, a.seed, None, a.clf_steps, a.steps,
                      device="cpu", overwrite=a.overwrite)
    SP.save_rows_grid(r, rec.figure_path(f"synthetic_property_{a.dataset}.png"))
    pct = lambda v: f"{100 * v:.1f} %"  # noqa: E731
    rows = [[name] + [pct(v) for k, v in row.items() if k not in ("lambda", "sample_seconds")]
            for name, row in r["rows"].items()]
    prop, rs = r["property"], r["rows"]
    guided = [k for k, v in rs.items() if v["lambda"]]
    best = max(guided, key=lambda k: rs[k]["property"])
    tables = [{"title": f"{a.n} samples per λ (single guidance towards the property); "
                        f"{SP.TRAIN_ROWS} training images per reference row",
               "columns": ["row"] + COLUMNS[prop], "rows": rows}]
    notes = [f"Classifier: {r['clf_steps']} steps in {r['clf_seconds'] / 60:.1f} min, clean accuracy "
             f"{pct(r['clean_accuracy'])} on its (half painted) training images.",
             f"Property rate: {pct(rs['uncond']['property'])} unguided, {pct(rs[best]['property'])} at {best}; "
             f"the detector finds it on {pct(rs['train painted']['property'])} of painted and "
             f"{pct(rs['train plain']['property'])} of plain training images.",
             f"Grid rows: {', '.join(r['grid'])} (16 each)."]
    metrics = {k: v for k, v in r.items() if k != "grid"}
    path = rec.write(metrics, seeds=[a.seed], n=a.n, tables=tables, notes=notes)
    print(f"wrote {path}")


if __name__ == "__main__":
    cli(main)

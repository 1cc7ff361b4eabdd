"""The lab's table: where interpolation comes from, why extrapolation fails, when composition works.

    python -m lab.table [--run runs/circles] [--mid-run runs/mid] [--n 256] [--particles 8]

Trains what is missing (cpu preset: ``--run`` on the extreme bands, ``--mid-run`` with
``--bands middle``), then one row per method, all on the circles (§5.5) with the detector's ground
truth, lambda = 30 per class, 64 respaced ancestral steps:

  interpolation (--run; target: one disc with z in [0.2, 0.8], the unseen middle, §5.5's accuracy)
    learned score, unguided | + learned classifier (multi) | + SMC (lab/smc.py) | + exact classifier,
    exact score (lab/exact_score.py) + learned classifier | + exact classifier
  extrapolation (--mid-run, trained on z in [0.35, 0.65] only; target z < 0.15 or z > 0.85, §7)
    single guidance towards each side and multi-guidance, plain and SMC
  composition (--run; target: exactly one disc in each half, a layout never seen in training)
    linear composition of the exact left / right experts (lab/composition.py) around the empty canvas
    (projective) and around the unconditional training set ("Bayes")

Columns: on_target (fraction of all samples), 0-disc and 2+-disc rates, diversity (std of the
detected z of the one-disc samples; composition: -), seconds per sample. Also writes the score-error
figure of the learned model against the exact score (<run>/score_error.png, lab/score_error.py) and
<run>/lab.json. Wall times are quoted beside the fp32 matmul GFLOP/s measured in the same run.
"""
import argparse
import json
import os
import time

import train
from checkpoint import pick_device, to_uint8
from lab import composition, exact_score, score_error, smc
from lab.extrapolate import measure
from results.record import Recorder
from sample import load_ddpm, prepare

MIDDLE, OUTER, LEFT, RIGHT = ((0.2, 0.8),), ((0.0, 0.15), (0.85, 1.0)), ((0.0, 0.15),), ((0.85, 1.0),)
# (section, label, target, row options): guidance, target, classifier / score ("exact": the closed
# form, lab/exact_score.py) and smc (drawn with --particles per system, lab/smc.py).
INTERPOLATION = [
    ("learned score, unguided", MIDDLE, dict()),
    ("learned score + learned clf", MIDDLE, dict(guidance="multi")),
    ("learned score + learned clf, SMC", MIDDLE, dict(guidance="multi", smc=True)),
    ("learned score + exact clf", MIDDLE, dict(guidance="multi", classifier="exact")),
    ("exact score, unguided", MIDDLE, dict(score="exact")),
    ("exact score + learned clf", MIDDLE, dict(guidance="multi", score="exact")),
    ("exact score + exact clf", MIDDLE, dict(guidance="multi", score="exact", classifier="exact")),
]
EXTRAPOLATION = [
    ("unguided", OUTER, dict()),
    ("single -> left", LEFT, dict(guidance="single", target=0)),
    ("single -> left, SMC", LEFT, dict(guidance="single", target=0, smc=True)),
    ("single -> right", RIGHT, dict(guidance="single", target=1)),
    ("single -> right, SMC", RIGHT, dict(guidance="single", target=1, smc=True)),
    ("multi", OUTER, dict(guidance="multi")),
    ("multi, SMC", OUTER, dict(guidance="multi", smc=True)),
]


def ensure_run(run, extra=()):
    if not all(os.path.exists(os.path.join(run, f"{m}.pt")) for m in train.C_NAMES):
        resume = ["--resume"] if os.path.exists(os.path.join(run, "ddpm.pt")) else []
        train.main(["--dataset", "circles", "--out", run, "--no-grid"] + resume + list(extra))


def guided_row(run, label, target, kw, a, device, models):
    cfg = models[1]
    if kw.get("score") == "exact":
        models = (exact_score.score_model(cfg, device), cfg)
    clf = exact_score.classifier(cfg, device) if kw.get("classifier") == "exact" else "classifier"
    args = (run, device, None, kw.get("guidance", "none"), None, a.scale, kw.get("target"), clf, models)
    draw = smc.prepare(*args, a.particles) if kw.get("smc") else prepare(*args)
    t0 = time.time()
    images = to_uint8(draw(a.n, a.batch_size, a.seed))
    dt = time.time() - t0
    m = measure(images, target)
    return {"label": label, "target": _target(target), "on_target": m["on_target"], "zero": m["zero"],
            "two_plus": m["two_plus"], "diversity": m["z_std"], "s_per_sample": dt / a.n}


def composition_row(run, background, a, device):
    cfg = load_ddpm(run, "cpu")[1]
    model = composition.composition_model(cfg, background, device)
    draw = prepare(run, device, None, models=(model, cfg))
    t0 = time.time()
    st = composition.two_disc_stats(to_uint8(draw(a.n, a.batch_size, a.seed)))
    dt = time.time() - t0
    return {"label": f"exact L + R experts, {background} background", "target": "one disc each half",
            "on_target": st["one_each_side"], "zero": st["zero_disc"],
            "two_plus": st["two_disc"] + st["three_plus_disc"], "diversity": None, "s_per_sample": dt / a.n}


def _target(t):
    return " or ".join(f"z in [{lo:g}, {hi:g}]" for lo, hi in t)


def fmt(r) -> str:
    div = "-" if r["diversity"] is None or r["diversity"] != r["diversity"] else f"{r['diversity']:.3f}"
    return (f"  {r['label']:<42}{r['target']:<34}{r['on_target']:>9.1%}{r['zero']:>8.1%}{r['two_plus']:>8.1%}"
            f"{div:>10}{r['s_per_sample']:>9.3f}")


def build_parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", default="runs/circles", help="a circles run on the extreme bands")
    p.add_argument("--mid-run", default="runs/mid", help="a circles run with --bands middle")
    p.add_argument("--n", type=int, default=256, help="samples per row")
    p.add_argument("--particles", type=int, default=8, help="SMC particles per system")
    p.add_argument("--scale", type=float, default=30.0, help="lambda of every class (multi) or of the target")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--sections", default="interpolation,extrapolation,composition")
    p.add_argument("--out", default=None, help="lab.json (default: <run>/lab.json)")
    return p


def main(argv=None):
    a = build_parser().parse_args(argv)
    sections = [s for s in a.sections.split(",") if s]
    device = pick_device("cpu")
    rec = Recorder("lab", "The lab table: interpolation, extrapolation, composition (LAB.md exercises 5–8)")
    peak = rec.gflops_before
    t_start = time.time()
    ensure_run(a.run)
    if "extrapolation" in sections:
        ensure_run(a.mid_run, ["--bands", "middle"])
    t_train = time.time() - t_start
    head = (f"  {'method':<42}{'target':<34}{'on_target':>9}{'0-disc':>8}{'2+disc':>8}{'diversity':>10}"
            f"{'s/sample':>9}")
    table = {}
    for section in sections:
        print(f"\n{section} ({a.n} samples per row)\n{head}", flush=True)
        if section == "composition":
            rows = [composition_row(a.run, bg, a, device) for bg in ("empty", "uncond")]
            for r in rows:
                print(fmt(r), flush=True)
        else:
            run = a.run if section == "interpolation" else a.mid_run
            spec = INTERPOLATION if section == "interpolation" else EXTRAPOLATION
            models, rows = load_ddpm(run, device), []
            for label, target, kw in spec:
                rows.append(guided_row(run, label, target, kw, a, device, models))
                print(fmt(rows[-1]), flush=True)
        table[section] = rows
    png = os.path.join(a.run, "score_error.png")
    if "interpolation" in sections:
        score_error.main(["--run", a.run, "--out", png])
    wall = time.time() - t_start
    out = a.out or os.path.join(a.run, "lab.json")
    with open(out, "w") as f:
        json.dump({"settings": vars(a), "table": table, "wall_seconds": wall, "train_seconds": t_train,
                   "matmul_gflops": peak}, f, indent=2)
    pct = lambda v: f"{100 * v:.1f} %"  # noqa: E731
    rows = [[sec, r["label"], r["target"], pct(r["on_target"]), pct(r["zero"]), pct(r["two_plus"]),
             "–" if r["diversity"] is None or r["diversity"] != r["diversity"] else f"{r['diversity']:.3f}"]
            for sec, rs in table.items() for r in rs]
    rec.write({"table": table, "train_seconds": t_train}, seeds=[a.seed], n=a.n,
              tables=[{"title": f"{a.n} samples per row, λ = {a.scale:g}",
                       "columns": ["section", "method", "target", "on target", "zero discs", "two+ discs",
                                   "diversity"], "rows": rows}])
    print(f"\n{wall / 60:.1f} min in this command (training {t_train / 60:.1f} min); fp32 matmul peak "
          f"{peak:.0f} GFLOP/s; wrote {out} and {png}")


if __name__ == "__main__":
    from checkpoint import cli
    cli(main)

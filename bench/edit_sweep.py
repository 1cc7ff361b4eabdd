"""App. N's attribute editing on the circles, swept over the inversion depth (results/edit_sweep.json).

    python bench/edit_sweep.py [--root runs/table] [--pairs 0:0,1:0,2:0] [--depths 0.25,0.5,0.75] [--n 32]

For each pair of bench/circles_table.py's root and each depth: lab/edit.py on --n left-band training discs,
inverted with DDIM to that fraction of the 64 respaced steps and decoded with single guidance
(λ = --scale) towards class 1 and App. N's linearly decaying η; plus the λ = 0 control at each depth.
Reports where the edited discs end (right band, the unseen middle, still left, or lost), mean ± std over
the pairs. On circles no blend of two images moves a disc, so "moved" needs the guidance to redraw it.
"""
import argparse
import json
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from lab import edit  # noqa: E402
from circles_table import link_pair  # noqa: E402
from results.record import Recorder, mean_std  # noqa: E402

OUTCOMES = ("right", "middle", "left", "lost")


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--root", default="runs/table")
    p.add_argument("--pairs", default="0:0,1:0,2:0")
    p.add_argument("--depths", default="0.25,0.5,0.75")
    p.add_argument("--scale", type=float, default=30.0)
    p.add_argument("--n", type=int, default=32)
    a = p.parse_args()
    rec = Recorder("edit_sweep", "Attribute editing on the circles over the inversion depth (App. N)")
    pairs = [tuple(int(v) for v in q.split(":")) for q in a.pairs.split(",")]
    depths = [float(d) for d in a.depths.split(",")]
    res = {}
    for depth in depths:
        for scale in (a.scale, 0.0):
            key = f"{depth:g}/{scale:g}"
            res[key] = []
            for s, c in pairs:
                run = link_pair(a.root, s, c)
                out = os.path.join(run, f"edit_d{depth:g}_s{scale:g}")
                edit.main(["--run", run, "--out", out, "--n", str(a.n), "--scale", str(scale),
                           "--depth", str(depth), "--device", "cpu"])
                with open(os.path.join(out, "edit.json")) as f:
                    r = json.load(f)
                res[key].append({k: r[k] for k in OUTCOMES + ("seconds", "invert_to", "model_t")})
    rows = [[k.split("/")[0], k.split("/")[1], rs[0]["model_t"]] + [mean_std([r[o] for r in rs], pct=True, digits=0)
                                                                   for o in OUTCOMES]
            for k, rs in res.items()]
    tables = [{"title": f"{a.n} left-band discs per pair, edited towards class 1; mean ± std over {len(pairs)} pairs",
               "columns": ["depth", "λ", "t of the latent", "right", "middle", "left (unchanged)", "lost"],
               "rows": rows}]
    path = rec.write(res, seeds={"pairs": [f"{s}:{c}" for s, c in pairs]}, n=a.n, tables=tables)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()

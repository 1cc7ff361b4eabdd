"""App. M (latent interpolation) and App. N (attribute editing) on the face stand-in
(results/faces_slerp.json, results/faces_edit.json).

    python bench/faces_appendix.py --part slerp [--run runs/faces_bench/faces] [--n 16]
    python bench/faces_appendix.py --part edit [--run runs/faces_bench/faces] [--n 32]

On the Smiling run that bench/faces_pipeline.py trains (data in data/faces_bench; its filter's
evaluation classifier and the true-latent regressor beside it). --part slerp runs
lab/faces_interpolate.py: --n pairs of training faces (true z_smile <= 0.2 -> >= 0.8), latents at
half of the respaced grid by DDIM inversion and by q(x_t | x_0) noising, 9 frames by slerp and by
lerp, DDIM eta = 0 decoding; per latent kind x interpolation the true-z readouts per frame (mean
+- std over the pairs) and along each path. --part edit runs lab/faces_edit.py: --n faces each way,
guided at lambda = --scale towards the other class and the lambda = 0 control; where the mouths end
and what stayed the same. Beside the edits, the circles' App. N from results/edit_sweep.json where
that file exists.
"""
import argparse
import json
import os
import sys

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from lab import faces_edit, faces_interpolate  # noqa: E402
from lab.face_readout import NUISANCES  # noqa: E402
from results.record import Recorder  # noqa: E402

pct = lambda v: f"{100 * v:.1f} %"  # noqa: E731


def slerp_part(a, common):
    rec = Recorder("faces_slerp", "Latent interpolation between real faces on the face stand-in (App. M)")
    out = faces_interpolate.run(["--n", str(a.n), "--frames", "9", "--out", os.path.join(a.run, "appendix_slerp")]
                                + common, png=rec.figure_path("faces_slerp_paths.png"),
                                z_png=rec.figure_path("faces_slerp_z.png"))
    paths, reg = out["paths"], "inner_reg_z_03_07" in next(iter(out["paths"].values()))
    rows = [[*name.split("/"), pct(r["inner_clean_mild"]), pct(r["inner_mouth_z_03_07"]),
             pct(r["inner_reg_z_03_07"]) if reg else "–", pct(r["monotone_mouth"]), pct(r["monotone_clean"]),
             pct(r["through_mild"]), " / ".join(pct(r["inner_classes"][c]) for c in ("faded", "doubled", "other")),
             f"{r['endpoint_mae']:.3f}"] for name, r in paths.items()]
    alphas = np.linspace(0, 1, out["frames"])
    per_frame = [[name, label] + [f"{m:.2f} ± {s:.2f}" for m, s in zip(r[f"{k}_mean"], r[f"{k}_std"])]
                 for name, r in paths.items() for k, label in (("z_mouth", "mouth fit"), ("z_reg", "regressor"))
                 if f"{k}_mean" in r]
    tables = [{"title": f"{out['pairs']} pairs (true z_smile <= 0.2 -> >= 0.8), {out['frames']} frames, latents at "
                        f"step {out['invert_to']} of {out['steps']} (t = {out['model_t']}); inner = the "
                        f"{out['frames'] - 2} frames between the endpoints",
               "columns": ["latent", "interpolation", "inner clean mild (mouth)", "inner mouth z in [0.3, 0.7]",
                           "inner regressor z in [0.3, 0.7]", "monotone z", "monotone, every frame one clean mouth",
                           "… and a clean mild frame", "inner faded / doubled / other", "endpoint MAE"],
               "rows": rows},
              {"title": "true z_smile per frame, mean ± std over the pairs",
               "columns": ["path", "readout"] + [f"α = {al:.3g}" for al in alphas], "rows": per_frame}]
    notes = [f"Monotone: z never drops by more than {out['mono_tol']:g} from one frame to the next. Endpoint MAE: "
             "the α = 0 and 1 frames against the original faces in [-1, 1] units (DDIM: the round trip; q: a "
             "fresh sample near the face)."]
    return rec, out, tables, notes


def circles_edit_note() -> list:
    """The circles' App. N at half depth from results/edit_sweep.json, if it was measured."""
    path = os.path.join(ROOT, "results", "edit_sweep.json")
    if not os.path.isfile(path):
        return []
    doc = json.load(open(path))
    t = doc["tables"][0]
    for row in t["rows"]:
        cells = dict(zip(t["columns"], row))
        if str(cells.get("depth")) == "0.5" and str(cells.get("λ")) == "30":
            return [f"On the circles (results/edit_sweep.json, `{doc['command']}`), half depth, λ = 30: right "
                    f"{cells['right']}, middle {cells['middle']}, left (unchanged) {cells['left (unchanged)']}, lost "
                    f"{cells['lost']}. There no blend of two images moves a disc, so the guidance alone must redraw "
                    "it; a mouth can change shape in place."]
    return []


def edit_part(a, common):
    rec = Recorder("faces_edit", "Attribute editing of real faces on the face stand-in (App. N)")
    out = faces_edit.run(["--n", str(a.n), "--scale", str(a.scale), "--control",
                          "--out", os.path.join(a.run, "appendix_edit")] + common,
                         png=rec.figure_path("faces_edit.png"))
    rows, drift = [], []
    for name, r in out["edits"].items():
        direction, lam = name.split("/")
        rows.append([direction, lam] + [pct(r[k]) for k in faces_edit.OUTCOMES]
                    + [pct(r["reg_z_03_07"]) if "reg_z_03_07" in r else "–",
                       f"{r['pixel_outside_mouth']:.1f}", f"{r['pixel_inside_mouth']:.1f}"])
        drift.append([direction, lam] + [f"{r['drift'][k]:.3f} ({r['readout_error'][k]:.3f})" for k in NUISANCES])
    tables = [{"title": f"{out['n']} training faces per direction, DDIM-inverted to step {out['invert_to']} of "
                        f"{out['steps']} (t = {out['model_t']}), guided DDIM with η from {out['eta_start']:g} to 0",
               "columns": ["direction", "λ", "mild (one clean mouth)", "crossed", "unchanged", "lost",
                           "regressor z in [0.3, 0.7]", "pixels outside the mouth", "pixels inside the mouth"],
               "rows": rows},
              {"title": "nuisance drift |edit − original| (in brackets: the readout's error on the originals)",
               "columns": ["direction", "λ"] + list(NUISANCES), "rows": drift}]
    notes = ["Pixels: mean |edit − original| in uint8 levels outside / inside the band any mouth can cover. "
             "dx, dy in source px of the 178×218 render, scale relative, the colour latents in [0, 1]."]
    return rec, out, tables, notes + circles_edit_note()


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--part", required=True, choices=("slerp", "edit"))
    p.add_argument("--run", default="runs/faces_bench/faces")
    p.add_argument("--n", type=int, default=None, help="pairs (slerp, default 16) or faces per direction "
                                                      "(edit, default 32)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--scale", type=float, default=30.0, help="edit: λ of the single guidance")
    p.add_argument("--steps", type=int, default=0, help="respaced steps (0: the run's)")
    p.add_argument("--zreg-steps", type=int, default=None, help="the regressor's steps (default: as evaluate.py)")
    a = p.parse_args()
    os.chdir(ROOT)
    a.n = a.n or (16 if a.part == "slerp" else 32)
    common = ["--run", a.run, "--seed", str(a.seed), "--device", "cpu"] + \
        (["--steps", str(a.steps)] if a.steps else []) + \
        (["--zreg-steps", str(a.zreg_steps)] if a.zreg_steps is not None else [])
    rec, out, tables, notes = (slerp_part if a.part == "slerp" else edit_part)(a, common)
    path = rec.write(out, seeds=[a.seed], n=a.n, tables=tables, notes=notes)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()

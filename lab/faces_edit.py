"""Attribute editing of real faces without mild training faces (App. N, Fig. S23), on the face stand-in.

    python -m lab.faces_edit --run runs/faces_bench/faces --out runs/faces_bench/faces/edit --n 32

App. N DDIM-inverts a real face over half of the steps and decodes it with single guidance
(lambda = 30) towards the other class, by DDIM whose eta decays linearly to 0 (lab.edit.edit and
its eta_schedule). Here, on a run trained on toy_faces.py's folder: --n of the run's training faces
clearly not smiling (true z_smile <= 0.2) are edited towards Smiling (class 1, "to_smile"), and --n
clearly smiling ones (>= 0.8) towards class 0 ("to_frown"); --control adds lambda = 0, the same
inversion and noise without the classifier, which tells what the eta noise alone changes.

Each edit is read by lab.face_readout. Where its mouth ends (mouth readout): "mild" (one clean mouth,
z in [0.3, 0.7]), "crossed" (a clean mouth on the other side), "unchanged" (a clean mouth on its own
side) or "lost" (faded, doubled or other); the fraction with the regressor's z in [0.3, 0.7]; and
what stayed the same: per nuisance latent the mean |edit - original| of the readouts, beside the
readout's own error on the originals (read against the true latents), and the mean pixel distance
to the original outside and inside the mouth's band. Writes <out>/faces_edit.json and
faces_edit.png (per direction, blocks of --cols originals above their edits and controls).
"""
from __future__ import annotations

import argparse
import os
import time

import numpy as np
import torch

import config as C
from checkpoint import UserError, cli, ensure_writable_dir, from_uint8, pick_device, to_uint8
from lab import face_readout as R
from lab.edit import add_eta_arg, edit
from rundir import write_json

DIRECTIONS = {"to_smile": (0, 1), "to_frown": (1, 0)}   # (side of the originals, guidance target)
OUTCOMES = ("mild", "crossed", "unchanged", "lost")


def outcome(z: float, cls: str, side: int) -> str:
    """Where an edit of a face from ``side`` (0: not smiling) ends, by its mouth readout."""
    if cls not in ("mild", "clear"):
        return "lost"
    if cls == "mild":
        return "mild"
    return "crossed" if (z > R.MILD[1]) == (side == 0) else "unchanged"


def summarise(before_u8: np.ndarray, after_u8: np.ndarray, side: int, true: dict, zreg=None) -> dict:
    """Outcomes, smile readouts and nuisance / pixel drift of edits ``after`` of ``before``."""
    r0, r1 = R.smile(before_u8, zreg), R.smile(after_u8, zreg)
    where = [outcome(z, c, side) for z, c in zip(r1["z_mouth"], r1["mouth_class"])]
    n0, n1 = R.nuisances(before_u8, r0["geometry"]), R.nuisances(after_u8, r1["geometry"])
    px = R.pixel_drift(before_u8, after_u8, r0["geometry"])
    res = {**{k: where.count(k) / len(where) for k in OUTCOMES},
           "z_mouth_before": r0["z_mouth"], "z_mouth_after": r1["z_mouth"], "class_after": r1["mouth_class"],
           "drift": {k: float(np.abs(n1[k] - n0[k]).mean()) for k in R.NUISANCES},
           "readout_error": {k: float(np.abs(n0[k] - true[k]).mean()) for k in R.NUISANCES},
           "pixel_outside_mouth": float(px["outside_mouth"].mean()),
           "pixel_inside_mouth": float(np.nanmean(px["inside_mouth"]))}
    if zreg is not None:
        res.update(reg_z_03_07=R.frac_mild(r1["z_reg"]), z_reg_before=r0["z_reg"], z_reg_after=r1["z_reg"])
    return res


def edit_faces(model, diffusion, clf, x_u8, target: int, scale: float, step: int, cfg, device, seed: int,
               eta_start: float = 1.0, refine: int = 0) -> np.ndarray:
    """uint8 edits of uint8 faces: lab.edit.edit with single guidance (lambda = scale) to ``target``."""
    from guidance import single_guidance
    guide = single_guidance(clf, torch.full((len(x_u8),), target, device=device), scale) if scale else None
    gen = torch.Generator(device=device).manual_seed(seed)
    x = edit(model, diffusion, from_uint8(x_u8).to(device), step, guide, eta_start,
             cfg["diffusion"].clip_denoised, gen, refine)
    return to_uint8(x.cpu())


DEFAULTS = C.SampleConfig(n=32, scale=30.0)   # 32 faces per direction


def build_parser():
    from lab.interpolate import add_inversion_args
    from sample import add_sample_args
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_sample_args(p, only=("run", "n", "seed", "steps", "device", "scale"), defaults=DEFAULTS,
                    title="sampling (config.SampleConfig; --n faces per direction, --seed picks them and "
                          "draws the noise, --scale is lambda)")
    g = p.add_argument_group("attribute editing of faces (App. N)")
    g.add_argument("--out", required=True, help="output directory for faces_edit.json and faces_edit.png")
    add_inversion_args(g)
    add_eta_arg(g)
    g.add_argument("--control", action="store_true", help="also decode with lambda = 0 (same noise)")
    R.add_readout_args(g)
    g.add_argument("--cols", type=int, default=16, help="faces per block of faces_edit.png (default 16)")
    return p


def run(argv=None, png=None) -> dict:
    """Parse, edit both ways, write <out>/faces_edit.json and the figure (or at png); return it."""
    from lab.faces_interpolate import setup
    from sample import load_classifier, sample_config, save_grid
    a = build_parser().parse_args(argv)
    s, _ = sample_config(a, DEFAULTS)
    if s.n < 1 or a.cols < 1 or not 0 <= a.eta_start <= 1:
        raise UserError("--n and --cols must be >= 1 and --eta-start in [0, 1] (DDIM's eta, DDIM Eq. 16)")
    device = pick_device(s.device)
    model, cfg, diffusion, step, zreg = setup(a, s, device)
    clf = load_classifier(s.run, "classifier", device, cfg)
    ensure_writable_dir(a.out)
    images, lat = R.training_faces(cfg)
    rng = np.random.default_rng(s.seed)
    scales = [s.scale] + ([0.0] if a.control and s.scale != 0 else [])
    res, tiles, t0 = {}, [], time.time()
    for name, (side, target) in DIRECTIONS.items():
        idx = R.pick(lat["z_smile"], side, s.n, rng)
        x = images[idx]
        edits = {lam: edit_faces(model, diffusion, clf, x, target, lam, step, cfg, device, s.seed, a.eta_start,
                                 a.refine) for lam in scales}
        for lam, e in edits.items():
            res[f"{name}/{lam:g}"] = summarise(x, e, side, {k: v[idx] for k, v in lat.items()}, zreg)
        for c in range(0, len(x), a.cols):
            tiles += [x[c:c + a.cols]] + [e[c:c + a.cols] for e in edits.values()]
    out = {"edits": res, "n": s.n, "scales": scales, "eta_start": a.eta_start, "steps": diffusion.T,
           "invert_to": step, "model_t": int(diffusion.timestep_map[step]), "refine": a.refine,
           "seconds": time.time() - t0}
    out = R.plain(out)
    write_json(os.path.join(a.out, "faces_edit.json"), out, indent=1)
    save_grid(from_uint8(np.concatenate(tiles)), png or os.path.join(a.out, "faces_edit.png"),
              nrow=min(a.cols, s.n))
    return out


def main(argv=None):
    out = run(argv)
    print(f"{out['n']} faces per direction, inverted to step {out['invert_to']}/{out['steps'] - 1} "
          f"(t = {out['model_t']}) in {out['seconds']:.0f} s")
    for name, r in out["edits"].items():
        print(f"  {name:>12}: " + ", ".join(f"{k} {r[k]:.0%}" for k in OUTCOMES)
              + f"; pixels outside the mouth {r['pixel_outside_mouth']:.1f} levels, skin drift "
              f"{r['drift']['skin']:.3f}, hair {r['drift']['z_hair']:.3f}, dx {r['drift']['dx']:.2f} px")


if __name__ == "__main__":
    cli(main)

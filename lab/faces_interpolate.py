"""Interpolation between DDPM latents of real faces (App. M, Fig. S22), on the face stand-in.

    python -m lab.faces_interpolate --run runs/faces_bench/faces --out runs/faces_bench/faces/interp --n 16

App. M takes the §5.1 smile DDPM, injects noise for 2000 of its 4000 steps, interpolates two latents
by slerp and decodes every interpolant with deterministic DDIM; its wording allows latents from
DDIM inversion or from q(x_t | x_0). Here, on a run trained on toy_faces.py's folder: --n pairs of
the run's own training faces, one clearly not smiling (true z_smile <= 0.2) and one clearly smiling
(>= 0.8); latents at --depth of the respaced grid both ways, DDIM inversion (lab.interpolate.invert)
and Eq. 4's noising (lab.interpolate.noised, each face its own noise from --seed); --frames latents
along slerp and along the straight line (lerp); DDIM eta = 0 decoding (lab.interpolate.decode).

Every frame's smile is read by lab.face_readout: the mouth fit (z_mouth and its class: "mild" only
for one clean mouth with z in [0.3, 0.7]) and the true-latent regressor (z_reg; --zreg-steps 0
skips it). Per latent kind x interpolation, over the pairs: mean and std of z per frame; of the
inner frames (alpha strictly between 0 and 1) the fraction that is clean mild, the fraction with
z in [0.3, 0.7] by each readout, and the mouth classes; per path whether z never drops by more
than MONO_TOL from one frame to the next (monotone), also with every frame one clean mouth
(monotone_clean), and that with at least one clean mild inner frame (through_mild, the faces'
version of the circles' "monotone through the middle"). Writes <out>/faces_interp.json,
faces_interp.png (one path per row: the first --rows pairs by ddim/slerp, then ddim/lerp, q/slerp,
q/lerp) and faces_interp_z.png.
"""
from __future__ import annotations

import argparse
import math
import os
import time

import numpy as np
import torch

import config as C
from checkpoint import UserError, cli, ensure_writable_dir, from_uint8, pick_device, to_uint8
from diffusion import GaussianDiffusion
from lab import face_readout as R
from lab.interpolate import add_inversion_args, decode, invert, noised, path_latents
from rundir import write_json

KINDS = ("ddim", "q")                 # DDIM inversion, q(x_t | x_0) noising
HOWS = ("slerp", "lerp")
MONO_TOL = 0.05                       # a drop the readouts' own noise can make (mouth z RMSE ~0.013)


def latents(model, diffusion, x0, step: int, kind: str, clip_denoised=True, refine: int = 0, seed: int = 0):
    """App. M's latents of clean images at respaced index ``step``: "ddim" inverts, "q" noises."""
    if kind == "ddim":
        return invert(model, diffusion, x0, step, clip_denoised, refine)
    return noised(diffusion, x0, step, torch.Generator().manual_seed(seed))


def paths(model, diffusion, a, b, frames: int, step: int, clip_denoised=True, refine: int = 0,
          seed: int = 0, batch: int | None = None) -> dict:
    """{(kind, how): decoded paths [N, frames, C, H, W]} from images a[i] to b[i]."""
    out = {}
    for kind in KINDS:
        za, zb = latents(model, diffusion, torch.cat([a, b]), step, kind, clip_denoised, refine, seed).chunk(2)
        for how in HOWS:
            zs = path_latents(za, zb, frames, how)
            out[kind, how] = decode(model, diffusion, zs.flatten(0, 1), step, clip_denoised, batch).view(zs.shape)
    return out


def monotone(z: np.ndarray, tol: float = MONO_TOL) -> np.ndarray:
    """[N] bool: no frame of a path [N, F] is more than ``tol`` below the one before it."""
    return (np.diff(z, axis=1) >= -tol).all(1)


def summarise(frames_u8: np.ndarray, zreg=None) -> dict:
    """The readouts of paths [N, F, S, S, 3] (uint8), per frame and per path (module docstring)."""
    n, f = frames_u8.shape[:2]
    r = R.smile(frames_u8.reshape(n * f, *frames_u8.shape[2:]), zreg)
    zm, cls = r["z_mouth"].reshape(n, f), r["mouth_class"].reshape(n, f)
    inner = slice(1, f - 1)
    clean = np.isin(cls, ("mild", "clear"))
    mild = cls == "mild"
    res = {"z_mouth_mean": zm.mean(0), "z_mouth_std": zm.std(0),
           "inner_clean_mild": float(mild[:, inner].mean()) if f > 2 else float("nan"),
           "inner_mouth_z_03_07": R.frac_mild(zm[:, inner]),
           "inner_classes": {c: float((cls[:, inner] == c).mean()) if f > 2 else float("nan")
                             for c in R.mouth_readout.CLASSES},
           "monotone_mouth": float(monotone(zm).mean()),
           "monotone_clean": float((monotone(zm) & clean.all(1)).mean()),
           "through_mild": float((monotone(zm) & clean.all(1) & mild[:, inner].any(1)).mean()),
           "z_mouth": zm, "mouth_class": cls}
    if r["z_reg"] is not None:
        zr = r["z_reg"].reshape(n, f)
        res.update(z_reg_mean=zr.mean(0), z_reg_std=zr.std(0), inner_reg_z_03_07=R.frac_mild(zr[:, inner]),
                   monotone_reg=float(monotone(zr).mean()), z_reg=zr)
    return res


def measure(model, cfg, a_u8, b_u8, frames, step, diffusion, device, zreg=None, refine=0, seed=0,
            batch=None) -> tuple[dict, dict]:
    """(summary per "kind/how", the decoded paths) for pairs of uint8 faces a -> b."""
    clip = cfg["diffusion"].clip_denoised
    a, b = from_uint8(a_u8).to(device), from_uint8(b_u8).to(device)
    decoded = {k: v.cpu() for k, v in paths(model, diffusion, a, b, frames, step, clip, refine, seed, batch).items()}
    res = {}
    for (kind, how), x in decoded.items():
        u8 = to_uint8(x.flatten(0, 1)).reshape(*x.shape[:2], *a_u8.shape[1:])
        ends = torch.cat([x[:, 0], x[:, -1]]) - torch.cat([a, b]).cpu()
        res[f"{kind}/{how}"] = dict(summarise(u8, zreg), endpoint_mae=float(ends.abs().mean()))
    return res, decoded


def plot_z(res: dict, path: str) -> None:
    """Mean +- std of z per frame, one line per latent kind x interpolation, a panel per readout."""
    from figures import pyplot, save
    plt = pyplot()
    keys = [k for k in ("z_mouth", "z_reg") if f"{k}_mean" in next(iter(res.values()))]
    fig, axes = plt.subplots(1, len(keys), figsize=(5 * len(keys), 3.6), squeeze=False)
    for ax, k in zip(axes[0], keys):
        for name, r in res.items():
            m, s = np.asarray(r[f"{k}_mean"]), np.asarray(r[f"{k}_std"])
            al = np.linspace(0, 1, len(m))
            ax.plot(al, m, marker="o", ms=3, label=name)
            ax.fill_between(al, m - s, m + s, alpha=0.12)
        ax.axhspan(*R.MILD, color="green", alpha=0.08)
        ax.set_xlabel("alpha (0: not smiling, 1: smiling)")
        ax.set_ylabel({"z_mouth": "z_smile by the mouth fit", "z_reg": "z_smile by the regressor"}[k])
        lo, hi = (f(np.concatenate([np.asarray(r[f"{k}_mean"]) for r in res.values()])) for f in (np.min, np.max))
        ax.set_ylim(min(-0.05, lo - 0.05), max(1.05, hi + 0.05))     # a regressor can leave [0, 1]
        ax.legend(fontsize=7)
    save(fig, path, tight=True)


def save_paths(decoded: dict, path: str, rows: int) -> None:
    """The first ``rows`` paths of every latent kind x interpolation, one path per row."""
    from sample import save_grid
    x = torch.cat([v[:rows].flatten(0, 1) for v in decoded.values()])
    save_grid(x, path, nrow=next(iter(decoded.values())).shape[1])


def setup(a, s, device):
    """(model, cfg, diffusion, inversion index, zreg) of a parsed lab.faces_* command line."""
    from sample import load_ddpm
    if not 0 < a.depth <= 1:
        raise UserError(f"--depth {a.depth} is outside (0, 1]; 0.5 inverts half of the steps, 1 all")
    if a.zreg_steps < 0 or a.refine < 0:
        raise UserError("--zreg-steps and --refine must be >= 0 (--zreg-steps 0 skips the regressor)")
    model, cfg = load_ddpm(s.run, device)
    if cfg["data"].dataset != "celeba":
        raise UserError(f"{s.run} holds {cfg['data'].dataset}; the faces' App. M / N need a stand-in "
                        "run (circles: python -m lab.interpolate / lab.edit)")
    diffusion = GaussianDiffusion.from_config(cfg["diffusion"], respaced=True, steps=s.steps or None).to(device)
    step = max(1, math.ceil(a.depth * (diffusion.T - 1)))
    return model, cfg, diffusion, step, R.load_zreg(s.run, cfg, device, a.zreg_steps, a.eval_classifier)


DEFAULTS = C.SampleConfig(n=16, batch_size=128)   # 16 pairs


def build_parser():
    from sample import add_sample_args
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_sample_args(p, only=("run", "n", "seed", "steps", "device", "batch_size"), defaults=DEFAULTS,
                    title="sampling (config.SampleConfig; --n pairs, --seed picks them and draws q's noise)")
    g = p.add_argument_group("interpolation of faces (App. M)")
    g.add_argument("--out", required=True, help="output directory for faces_interp.json and the figures")
    g.add_argument("--frames", type=int, default=9, help="images per path, endpoints included (default 9)")
    add_inversion_args(g)
    R.add_readout_args(g)
    g.add_argument("--rows", type=int, default=4, help="paths of each kind in faces_interp.png (default 4)")
    return p


def run(argv=None, png=None, z_png=None) -> dict:
    """Parse, measure, write <out>/faces_interp.json and the figures (or at png / z_png); return it."""
    from sample import sample_config
    a = build_parser().parse_args(argv)
    s, _ = sample_config(a, DEFAULTS)
    if a.frames < 2 or s.n < 1:
        raise UserError("--frames must be >= 2 and --n >= 1")
    device = pick_device(s.device)
    model, cfg, diffusion, step, zreg = setup(a, s, device)
    ensure_writable_dir(a.out)
    images, lat = R.training_faces(cfg)
    z = lat["z_smile"]
    rng = np.random.default_rng(s.seed)
    ia, ib = R.pick(z, 0, s.n, rng), R.pick(z, 1, s.n, rng)
    t0 = time.time()
    res, decoded = measure(model, cfg, images[ia], images[ib], a.frames, step, diffusion, device, zreg,
                           a.refine, s.seed, s.batch_size)
    out = {"paths": res, "pairs": s.n, "frames": a.frames, "steps": diffusion.T, "invert_to": step,
           "model_t": int(diffusion.timestep_map[step]), "refine": a.refine, "mono_tol": MONO_TOL,
           "true_z_a": z[ia], "true_z_b": z[ib], "seconds": time.time() - t0}
    out = R.plain(out)
    write_json(os.path.join(a.out, "faces_interp.json"), out, indent=1)
    save_paths(decoded, png or os.path.join(a.out, "faces_interp.png"), a.rows)
    plot_z(res, z_png or os.path.join(a.out, "faces_interp_z.png"))
    return out


def main(argv=None):
    out = run(argv)
    print(f"{out['pairs']} pairs x {out['frames']} frames, latents at step {out['invert_to']}/{out['steps'] - 1} "
          f"(t = {out['model_t']}) in {out['seconds']:.0f} s")
    for name, r in out["paths"].items():
        reg = f", z_reg in [0.3, 0.7] {r['inner_reg_z_03_07']:.0%}" if "inner_reg_z_03_07" in r else ""
        print(f"  {name:>10}: inner frames clean mild {r['inner_clean_mild']:.0%}{reg}; monotone "
              f"{r['monotone_mouth']:.0%}, clean {r['monotone_clean']:.0%}, through mild {r['through_mild']:.0%}")


if __name__ == "__main__":
    cli(main)

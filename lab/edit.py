"""Attribute editing without mild training examples (App. N), the circles version.

    python -m lab.edit --run runs/circles --out runs/circles/edit --n 32 --target 1 --scale 30
    python -m lab.edit --run runs/circles --out runs/circles/edit0 --n 32 --scale 0     # control

App. N: map a real image to a DDPM latent with deterministic DDIM inversion over half of the steps
(2000 of 4000), then denoise it with ordinary classifier guidance (§2.2, strength 30) towards the
wanted class, using DDIM with noise whose eta decays linearly, eta_t = t / 2000 for t = 2000 .. 1.
On the respaced grid the latent sits at index S = ceil(--depth * (K - 1)) and the step from index
i to i - 1 (i = 0 lands on the clean image) uses

    eta_i = --eta-start * i / S,     i = S, S-1, ..., 0,

a straight line from --eta-start (the paper: 1) at the latent to exactly 0 at the last step (the
paper's last step has 1/2000; DDIM's sigma there is 0 anyway, since beta~ at index 0 is 0).
Guidance acts on eps^ as in every DDIM step here (diffusion.GaussianDiffusion.ddim_eps_x0), at x_t.

Here the real images are left-band training discs (class 0) edited towards class 1 (right): does the
disc move, and does it stop in the unseen middle (z in [delta, 1 - delta]) as Fig. S23's mild
smiles do? Writes ``<out>/edit.png`` (blocks of --cols originals above their edits) and
``<out>/edit.json``: per image the detected disc centre z before and after (null: not exactly one
disc, or a blob), and the fractions of edits that end in the right band, the middle, still in the
left band ("left", i.e. unchanged band) or lost (no disc, two or more, or a blob).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import time

import numpy as np
import torch

import config as C
from checkpoint import UserError, cli, ensure_writable_dir, pick_device, to_uint8
from diffusion import GaussianDiffusion
from lab.interpolate import circle_pairs, invert


def eta_schedule(start_step: int, eta_start: float = 1.0):
    """App. N's linear decay as a per-step eta for GaussianDiffusion.denoise: i -> eta_start * i / S."""
    if start_step < 1:
        raise ValueError(f"editing needs at least one step to invert, got {start_step}")
    return lambda i: eta_start * i / start_step


def edit(model, diffusion: GaussianDiffusion, x0: torch.Tensor, step: int, guidance=None,
         eta_start: float = 1.0, clip_denoised=True, generator=None, refine: int = 0) -> torch.Tensor:
    """Edited images: DDIM-invert x0 to respaced index ``step``, then guided DDIM back with the
    decaying eta of ``eta_schedule``. With no guidance and eta_start = 0 this is plain inversion +
    decoding, i.e. a reconstruction of x0."""
    z = invert(model, diffusion, x0, step, clip_denoised, refine)
    return diffusion.denoise(model, z, step, clip_denoised, guidance, generator, sampler="ddim",
                             eta=eta_schedule(step, eta_start))


def disc_z(img: np.ndarray):
    """z of the one disc of a uint8 image (evaluate.py's detector), or None (0 or 2+ discs, a blob)."""
    from detector import components
    discs, _, blobs = components(img)
    return float(discs[0, 0] / (img.shape[1] - 1)) if len(discs) == 1 and not blobs else None


def outcomes(z_after: list, delta: float) -> dict:
    """Fractions of edits that end in the right band, the middle, the left band, or lost."""
    n = len(z_after)
    where = ["lost" if z is None else "left" if z < delta else "right" if z > 1 - delta else "middle"
             for z in z_after]
    return {k: where.count(k) / n for k in ("right", "middle", "left", "lost")}


def figure(x: torch.Tensor, edited: torch.Tensor, path: str, cols: int, delta: float) -> None:
    """Blocks of ``cols`` originals above their edits, with the band edges marked."""
    from sample import save_grid
    rows = [t for s in range(0, len(x), cols) for t in (x[s:s + cols], edited[s:s + cols])]
    save_grid(torch.cat(rows), path, nrow=min(cols, len(x)), marks=True, delta=delta)


def add_eta_arg(g) -> None:
    """--eta-start: App. N's eta at the latent (the faces' lab.faces_edit shares it)."""
    g.add_argument("--eta-start", type=float, default=1.0,
                   help="eta at the latent, decaying linearly to 0 (default 1, the paper's t/2000)")


DEFAULTS = C.SampleConfig(n=32, target=1)  # 32 left-band discs, edited towards class 1 (right)


def build_parser():
    from lab.interpolate import add_inversion_args
    from sample import add_sample_args
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_sample_args(p, only=("run", "n", "seed", "steps", "device", "scale", "target", "classifier"),
                    defaults=DEFAULTS, title="sampling (config.SampleConfig; --n images, --seed picks them "
                    "and draws the noise, --scale is lambda, 0 = no guidance)")
    g = p.add_argument_group("attribute editing (App. N)")
    g.add_argument("--out", required=True, help="output directory for edit.png and edit.json")
    add_inversion_args(g)
    add_eta_arg(g)
    g.add_argument("--cols", type=int, default=16, help="images per block of edit.png (default 16)")
    return p


def check_args(a, s) -> None:
    if s.n < 1 or a.refine < 0 or a.cols < 1:
        raise UserError("--n and --cols must be >= 1 and --refine >= 0")
    if not 0 < a.depth <= 1:
        raise UserError(f"--depth {a.depth} is outside (0, 1]; 0.5 inverts half of the steps, 1 all")
    if not 0 <= a.eta_start <= 1:
        raise UserError(f"--eta-start {a.eta_start} is outside [0, 1] (DDIM's eta, DDIM Eq. 16)")


def main(argv=None):
    from guidance import single_guidance
    from sample import load_classifier, load_ddpm, sample_config
    a = build_parser().parse_args(argv)
    s, _ = sample_config(a, DEFAULTS)
    check_args(a, s)
    device = pick_device(s.device)
    model, cfg = load_ddpm(s.run, device)
    if cfg["data"].dataset != "circles":
        raise UserError(f"lab.edit edits left-band circles; {s.run} holds {cfg['data'].dataset}")
    guide = None
    if s.scale != 0:  # lambda = 0 is the control: no classifier, the same noise
        clf = load_classifier(s.run, s.classifier, device, cfg)
        if not 0 <= s.target < clf.num_classes:
            raise UserError(f"--target {s.target} is not a class of the classifier (0..{clf.num_classes - 1})")
        guide = single_guidance(clf, torch.full((s.n,), s.target, device=device), s.scale)
    diffusion = GaussianDiffusion.from_config(cfg["diffusion"], respaced=True, steps=s.steps or None).to(device)
    step = max(1, math.ceil(a.depth * (diffusion.T - 1)))
    ensure_writable_dir(a.out)
    delta = cfg["data"].delta
    x = circle_pairs(cfg["data"].image_size, delta, s.n, s.seed)[0]  # the left-band images
    gen = torch.Generator(device=device).manual_seed(s.seed)
    t0 = time.time()
    edited = edit(model, diffusion, x.to(device), step, guide, a.eta_start, cfg["diffusion"].clip_denoised,
                  gen, a.refine).cpu()
    before, after = [[disc_z(im) for im in to_uint8(v)] for v in (x, edited)]
    res = dict(outcomes(after, delta), n=s.n, target=s.target, scale=s.scale, eta_start=a.eta_start,
               steps=diffusion.T, invert_to=step, model_t=int(diffusion.timestep_map[step]),
               refine=a.refine, seconds=time.time() - t0, z_before=before, z_after=after)
    with open(os.path.join(a.out, "edit.json"), "w") as f:
        json.dump(res, f, indent=1)
    png = os.path.join(a.out, "edit.png")
    figure(x, edited, png, a.cols, delta)
    print(f"{s.n} left discs, inverted to step {step}/{diffusion.T - 1} (t = {res['model_t']}), "
          f"lambda {s.scale:g} towards class {s.target} in {res['seconds']:.0f} s: right {res['right']:.0%}, "
          f"middle {res['middle']:.0%}, left {res['left']:.0%}, lost {res['lost']:.0%}; wrote {png}")


if __name__ == "__main__":
    cli(main)

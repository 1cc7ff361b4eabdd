"""Interpolation between DDIM latents (App. M), the circles version.

    python -m lab.interpolate --run runs/circles --out runs/circles/interp --n 32 --frames 9

App. M: map two real images to latents with deterministic DDIM inversion (the paper inverts 2000 of
4000 steps, i.e. half way), interpolate the latents with spherical linear interpolation (slerp),
and decode every interpolant with DDIM at eta = 0. Here the pairs are a training disc of the left
band and one of the right band; the question is whether the decoded path crosses the unseen middle
(z in [delta, 1 - delta]) with one disc moving left to right, as Fig. S22 shows for smiles.

--depth is the fraction of the respaced grid that is inverted (0.5: the paper's half way, 1: all
the way to x_T). Writes ``<out>/interp_path.png`` (one row per pair, the first --rows pairs) and
``<out>/interp.json``: the round-trip error of the endpoints (alpha = 0 and 1 decode the inverted
images themselves, in [-1, 1] units), and per pair whether the path is "monotone": every frame has exactly one disc,
its centre never moves left, and at least one frame lies in the middle.

The pieces also serve the faces' App. M (lab/faces_interpolate.py): ``noised``, the other latent
App. M's wording allows (q(x_t | x_0), Eq. 4), ``lerp`` beside ``slerp``, and ``path_latents``.
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
from checkpoint import UserError, cli, ensure_writable_dir, from_uint8, pick_device, to_uint8
from diffusion import GaussianDiffusion


def slerp(a: torch.Tensor, b: torch.Tensor, alpha: float) -> torch.Tensor:
    """Spherical interpolation per sample: sin((1-alpha) theta)/sin theta a + sin(alpha theta)/sin theta b,
    theta the angle between the flattened a[i] and b[i]. Unlike a straight line, it keeps the norm of
    equal-norm endpoints, and Gaussian latents live near a sphere of radius sqrt(dim); a lerp's
    midpoint is ~1/sqrt(2) too short and decodes as an unlikely, faded image."""
    fa, fb = a.flatten(1).double(), b.flatten(1).double()
    cos = (fa * fb).sum(1) / (fa.norm(dim=1) * fb.norm(dim=1))
    theta = torch.arccos(cos.clamp(-1, 1))
    s = torch.sin(theta)
    near = s < 1e-6  # (anti)parallel latents: the slerp weights are 0/0, fall back to a lerp
    wa = torch.where(near, 1 - alpha, torch.sin((1 - alpha) * theta) / torch.where(near, 1, s))
    wb = torch.where(near, alpha, torch.sin(alpha * theta) / torch.where(near, 1, s))
    shape = (-1,) + (1,) * (a.dim() - 1)
    return (wa.view(shape) * a.double() + wb.view(shape) * b.double()).to(a.dtype)


def lerp(a: torch.Tensor, b: torch.Tensor, alpha: float) -> torch.Tensor:
    """The straight line (1 - alpha) a + alpha b, slerp's baseline."""
    return (1 - alpha) * a + alpha * b


INTERPOLATIONS = {"slerp": slerp, "lerp": lerp}


def check_images(x: torch.Tensor, model) -> None:
    """Images must have the model's (channels, size, size): the UNet would fail deep inside otherwise."""
    want = (model.channels, model.image_size, model.image_size)
    if tuple(x.shape[1:]) != want:
        got = "x".join(map(str, x.shape[1:]))
        raise UserError(f"images are {got} (CxHxW) but the model makes {'x'.join(map(str, want))}; "
                        f"resize them to {want[1]}x{want[2]} px with {want[0]} channel(s)")


def invert(model, diffusion: GaussianDiffusion, x0: torch.Tensor, step: int, clip_denoised=True,
           refine: int = 0):
    """Clean images in [-1, 1] -> their DDIM latents at respaced index ``step`` (eta = 0)."""
    check_images(x0, model)
    return diffusion.ddim_invert(model, x0, step, clip_denoised, refine)


def noised(diffusion: GaussianDiffusion, x0: torch.Tensor, step: int, generator: torch.Generator) -> torch.Tensor:
    """Clean images -> x_t ~ q(x_t | x_0) at respaced index ``step`` (Eq. 4), App. M's other way to
    a latent; the noise is drawn on the CPU from ``generator``, so a seed fixes it on any device."""
    noise = torch.randn(x0.shape, generator=generator).to(x0.device, x0.dtype)
    return diffusion.q_sample(x0, torch.full((len(x0),), step, device=x0.device), noise)


def decode(model, diffusion: GaussianDiffusion, z: torch.Tensor, step: int, clip_denoised=True,
           batch: int | None = None):
    """Latents at respaced index ``step`` -> images, by DDIM with eta = 0 (the inverse of ``invert``),
    ``batch`` latents at a time (all at once by default)."""
    batch = batch or len(z)
    return torch.cat([diffusion.denoise(model, z[i:i + batch], step, clip_denoised, sampler="ddim", eta=0.0)
                      for i in range(0, len(z), batch)])


def path_latents(za: torch.Tensor, zb: torch.Tensor, frames: int, how: str = "slerp") -> torch.Tensor:
    """[N, frames, ...]: ``frames`` evenly spaced alphas from za (alpha = 0) to zb (alpha = 1)."""
    fn = INTERPOLATIONS[how]
    return torch.stack([fn(za, zb, float(al)) for al in np.linspace(0, 1, frames)], 1)


def interpolate(model, diffusion, a: torch.Tensor, b: torch.Tensor, frames: int, step: int,
                clip_denoised=True, refine: int = 0) -> torch.Tensor:
    """Decoded slerp paths from images a[i] to b[i]: [N, frames, C, H, W] (App. M)."""
    za, zb = invert(model, diffusion, torch.cat([a, b]), step, clip_denoised, refine).chunk(2)
    zs = path_latents(za, zb, frames)                                          # [N, F, C, H, W]
    x = decode(model, diffusion, zs.flatten(0, 1), step, clip_denoised)
    return x.view(zs.shape)


def circle_pairs(size: int, delta: float, n: int, seed: int = 0):
    """n (left, right) pairs of training images (toy_circles), drawn at random: [n, 1, S, S] each."""
    from toy_circles import make_circles
    images, labels, _ = make_circles(size, delta)
    rng = np.random.default_rng(seed)
    left = rng.choice(np.flatnonzero(labels == 0), n)
    right = rng.choice(np.flatnonzero(labels == 1), n)
    return from_uint8(images[left]), from_uint8(images[right])


def path_ok(frames_uint8: np.ndarray, delta: float) -> tuple[bool, list]:
    """(monotone left -> right with >= 1 frame in the middle, centre z per frame or None)."""
    from detector import detect_discs
    size = frames_uint8.shape[2]
    zs = []
    for im in frames_uint8:
        c = detect_discs(im)
        zs.append(float(c[0, 0] / (size - 1)) if len(c) == 1 else None)
    one_each = all(z is not None for z in zs)
    ok = one_each and all(b >= a for a, b in zip(zs, zs[1:])) and \
        any(delta <= z <= 1 - delta for z in zs)
    return ok, zs


def measure(paths: torch.Tensor, a: torch.Tensor, b: torch.Tensor, delta: float) -> dict:
    """Round-trip error of the endpoints and the fraction of monotone paths."""
    ends = torch.cat([paths[:, 0], paths[:, -1]])
    err = (ends - torch.cat([a, b])).abs()
    per_pair = [path_ok(to_uint8(p), delta) for p in paths]
    middle = [any(z is not None and delta <= z <= 1 - delta for z in zs) for _, zs in per_pair]
    return {"roundtrip_mae": float(err.mean()), "roundtrip_max": float(err.max()),
            "monotone_with_middle": float(np.mean([ok for ok, _ in per_pair])),
            "any_middle_disc": float(np.mean(middle)), "z": [zs for _, zs in per_pair]}


DEFAULTS = C.SampleConfig(n=32)  # 32 pairs


def add_inversion_args(g) -> None:
    """--depth and --refine: how far and how exactly the images are inverted (App. M and N)."""
    g.add_argument("--depth", type=float, default=0.5,
                   help="fraction of the respaced steps to invert (default 0.5, the paper's 2000 of 4000)")
    g.add_argument("--refine", type=int, default=0,
                   help="fixed-point iterations per inversion step (default 0; see diffusion.ddim_invert)")


def build_parser():
    from sample import add_sample_args
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_sample_args(p, only=("run", "n", "seed", "steps", "device"), defaults=DEFAULTS,
                    title="sampling (config.SampleConfig; --n pairs, --seed picks them)")
    g = p.add_argument_group("interpolation (App. M)")
    g.add_argument("--out", required=True, help="output directory for interp_path.png and interp.json")
    g.add_argument("--frames", type=int, default=9, help="images per path, endpoints included (default 9)")
    add_inversion_args(g)
    g.add_argument("--rows", type=int, default=8, help="pairs shown in interp_path.png (default 8)")
    return p


def main(argv=None):
    from sample import load_ddpm, sample_config, save_grid
    a = build_parser().parse_args(argv)
    s, _ = sample_config(a, DEFAULTS)
    if a.frames < 2 or s.n < 1 or a.refine < 0:
        raise UserError("--frames must be >= 2, --n >= 1 and --refine >= 0")
    if not 0 < a.depth <= 1:
        raise UserError(f"--depth {a.depth} is outside (0, 1]; 0.5 inverts half of the steps, 1 all")
    device = pick_device(s.device)
    model, cfg = load_ddpm(s.run, device)
    if cfg["data"].dataset != "circles":
        raise UserError(f"lab.interpolate pairs left/right circles; {s.run} holds {cfg['data'].dataset}")
    dcfg, delta = cfg["diffusion"], cfg["data"].delta
    diffusion = GaussianDiffusion.from_config(dcfg, respaced=True, steps=s.steps or None).to(device)
    step = max(1, math.ceil(a.depth * (diffusion.T - 1)))
    ensure_writable_dir(a.out)
    left, right = circle_pairs(cfg["data"].image_size, delta, s.n, s.seed)
    t0 = time.time()
    paths = interpolate(model, diffusion, left.to(device), right.to(device), a.frames, step,
                        dcfg.clip_denoised, a.refine).cpu()
    res = dict(measure(paths, left, right, delta), pairs=s.n, frames=a.frames, steps=diffusion.T,
               invert_to=step, refine=a.refine, model_t=int(diffusion.timestep_map[step]), seconds=time.time() - t0)
    with open(os.path.join(a.out, "interp.json"), "w") as f:
        json.dump(res, f, indent=1)
    png = os.path.join(a.out, "interp_path.png")
    save_grid(paths[:a.rows].flatten(0, 1), png, nrow=a.frames, marks=True, delta=delta)
    print(f"{s.n} pairs x {a.frames} frames, inverted to step {step}/{diffusion.T - 1} "
          f"(t = {res['model_t']}) in {res['seconds']:.0f} s: round-trip MAE {res['roundtrip_mae']:.4f}, "
          f"monotone through the middle {res['monotone_with_middle']:.0%}, "
          f"a middle disc {res['any_middle_disc']:.0%}; wrote {png}")


if __name__ == "__main__":
    cli(main)

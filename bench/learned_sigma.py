"""Learned reverse variance (App. A, Eq. 8) and the variational bound (Eq. 9) of trained runs.

    python bench/learned_sigma.py --run runs/ls --run runs/circles [--n 64] [--steps 0]

For each run (its EMA DDPM), prints
  (a) the learned interpolation weight frac = (v + 1) / 2 of Sigma_theta = exp(frac log beta_t +
      (1 - frac) log beta~_t), averaged over the held-out images and their pixels at --show
      timesteps spread over [0, T-1] of the training grid, with its 5th / 95th percentile and the
      share of pixels outside [0, 1] (frac in [0, 1] <=> Sigma_theta in [beta~_t, beta_t]); a
      fixed-variance run says which fixed variance it uses (frac = 1 for beta_t, 0 for beta~_t);
  (b) the variational bound in bits/dim (vlb.vlb_bits_per_dim: decoder
      NLL over 256 bins + every KL term + the prior) on each image set, mean +- standard error
      over images. --steps 0 sums all T terms of the training grid (T network calls per image:
      the bound of the T-step model); --steps K the K-step respaced grid (the bound of the K-step
      sampler, looser, T / K times cheaper). x^_0 is clipped as the run samples (clip_denoised).

Image sets. circles: the training set IS the whole data distribution (every centre column of the
two bands, every valid row; flips map band to band), so no image of that distribution is held
out, and a fresh noise draw of a training image would not be either. The honest held-out set is
"middle": discs at every centre column between the bands (the unseen region the paper
interpolates into), every row, rendered by toy_circles.render_disc exactly as the training discs;
"train" (the band discs, no flips) is printed beside it. CelebA runs: "test", the test split of the
run's --data-dir with its attribute (never trained on; mild faces included), and "train", the
run's own training images (its index list). --n images of each set, drawn without replacement
with --seed.

Sizes are flags: the T terms per image dominate the cost (--steps 64 is much cheaper than all T).
The default is 64 images per set with all T terms; check the script with --n 8 --steps 10.
"""
import argparse
import math
import os
import sys
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from checkpoint import UserError, cli, from_uint8, pick_device  # noqa: E402
from diffusion import GaussianDiffusion  # noqa: E402
from sample import load_ddpm  # noqa: E402
from vlb import vlb_bits_per_dim  # noqa: E402


def circles_sets(dcfg):
    """{"middle": held-out discs between the bands, "train": the band discs}, [-1, 1] NCHW."""
    from toy_circles import band_positions, render_disc
    size = dcfg.image_size
    band = set(band_positions(size, dcfg.delta))
    middle = [p for p in band_positions(size, dcfg.delta, full_range=True) if p not in band]
    img = lambda pos: from_uint8(np.stack([render_disc(x, y, size) for x, y in pos]), dcfg.channels)
    return {"middle": img(middle), "train": img(sorted(band))}


def celeba_sets(dcfg):
    """{"test": the test split (held out), "train": the run's training images}, [-1, 1] NCHW."""
    from celeba import CelebAData
    out = {}
    for name, split, index in (("test", "test", None), ("train", "train", dcfg.index_list or None)):
        d = CelebAData(dcfg.data_dir, dcfg.image_size, dcfg.attribute, split, index, flip=False,
                       cache_dir=dcfg.cache_dir or None, progress=False)
        out[name] = d  # taken lazily (CelebA splits are large): see pick
    return out


def pick(images, n: int, seed: int) -> torch.Tensor:
    """n images (all if fewer), without replacement, the same ones for every run of one seed."""
    size = len(images)
    idx = torch.randperm(size, generator=torch.Generator().manual_seed(seed))[:n].sort().values
    if isinstance(images, torch.Tensor):
        return images[idx]
    return images.take(idx, None)[0]


def frac_table(model, cfg, x0, show: int, seed: int, batch_size: int, device) -> list[str]:
    """(a): frac of the learned variance at ``show`` timesteps of the training grid."""
    dcfg = cfg["diffusion"]
    d = GaussianDiffusion.from_config(dcfg).to(device)
    if dcfg.variance != "learned":
        frac = {"fixed_large": "1 (Sigma = beta_t)", "fixed_small": "0 (Sigma = beta~_t)"}[dcfg.variance]
        return [f"  (a) variance {dcfg.variance}: fixed, frac = {frac} at every t"]
    lines = [f"  (a) learned Sigma on {len(x0)} held-out images (frac = (v + 1) / 2; in [0, 1] <=> "
             f"beta~_t <= Sigma <= beta_t):",
             f"      {'t':>5} {'beta~_t':>10} {'beta_t':>10} {'mean Sigma':>10} {'frac':>7} "
             f"{'p5':>7} {'p95':>7} {'outside':>8}"]
    gen = torch.Generator(device=device).manual_seed(seed)
    for t_i in np.unique(np.round(np.linspace(0, d.T - 1, show)).astype(int)):
        fr, sig = [], []
        for xb in x0.split(batch_size):
            xb = xb.to(device)
            t = torch.full((len(xb),), int(t_i), device=device, dtype=torch.long)
            xt = d.q_sample(xb, t, torch.randn(xb.shape, generator=gen, device=device))
            _, v = d.model_output(model, xt, t)
            fr.append(((v.float() + 1) / 2).flatten().cpu())
            sig.append(d.model_log_variance_of(v, t, xt.shape).exp().flatten().cpu())
        fr, sig = torch.cat(fr).double(), torch.cat(sig).double()
        lo = d.posterior_log_variance[t_i].exp().item()   # beta~_t (beta~_1 at t = 0)
        hi = d.betas[t_i].item()
        p5, p95 = torch.quantile(fr, torch.tensor([0.05, 0.95], dtype=torch.float64)).tolist()
        out = ((fr < 0) | (fr > 1)).double().mean().item()
        lines.append(f"      {t_i:>5} {lo:>10.3e} {hi:>10.3e} {sig.mean().item():>10.3e} "
                     f"{fr.mean().item():>7.3f} {p5:>7.3f} {p95:>7.3f} {100 * out:>7.1f}%")
    return lines


def vlb_line(name: str, model, cfg, x0, steps: int, seed: int, batch_size: int, device) -> str:
    """(b): the bound in bits/dim on one image set."""
    dcfg = cfg["diffusion"]
    d = GaussianDiffusion.from_config(dcfg, respaced=bool(steps), steps=steps or None).to(device)
    gen = torch.Generator(device=device).manual_seed(seed)
    t0 = time.time()
    res = {"total": [], "prior": [], "decoder": []}
    for xb in x0.split(batch_size):
        r = vlb_bits_per_dim(d, model, xb.to(device), dcfg.clip_denoised, gen)
        res["total"].append(r["total"].cpu())
        res["prior"].append(r["prior"].cpu())
        res["decoder"].append(r["terms"][:, 0].cpu())
    tot, prior, dec = (torch.cat(res[k]).double() for k in ("total", "prior", "decoder"))
    se = tot.std().item() / math.sqrt(len(tot)) if len(tot) > 1 else float("nan")
    grid = f"all {d.T} terms" if not steps else f"{d.T}-step respaced grid"
    return (f"  (b) VLB {name:>6}: {tot.mean().item():7.3f} +- {se:.3f} bits/dim over {len(tot)} images "
            f"({grid}; decoder L_0 {dec.mean().item():.3f}, KL terms "
            f"{(tot - dec - prior).mean().item():.3f}, prior {prior.mean().item():.1e}; "
            f"{time.time() - t0:.0f} s)")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", action="append", required=True, help="run directory with ddpm.pt (repeatable)")
    p.add_argument("--n", type=int, default=64, help="images per set (default 64)")
    p.add_argument("--steps", type=int, default=0,
                   help="0: every term of the T-step training grid; K: the K-step respaced grid")
    p.add_argument("--show", type=int, default=10, help="timesteps of the frac table (default 10)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--seed", type=int, default=0, help="which images, and the noise of every term")
    p.add_argument("--device", default=None)
    a = p.parse_args(argv)
    if a.n < 1 or a.batch_size < 1 or a.show < 1 or a.steps < 0:
        raise UserError("--n, --batch-size and --show must be positive and --steps >= 0")
    device = pick_device(a.device)
    for run in a.run:
        model, cfg = load_ddpm(run, device)
        dcfg = cfg["diffusion"]
        if a.steps and not 2 <= a.steps <= dcfg.timesteps:
            raise UserError(f"--steps {a.steps} is outside 2..{dcfg.timesteps} (the T of {run})")
        ds = cfg["data"].dataset
        sets = circles_sets(cfg["data"]) if ds == "circles" else celeba_sets(cfg["data"])
        sets = {k: pick(v, a.n, a.seed) for k, v in sets.items()}
        held_out = next(iter(sets))
        print(f"{run}: {ds} {cfg['data'].image_size}px, T = {dcfg.timesteps} {dcfg.noise_schedule}, "
              f"{dcfg.prediction}-prediction, variance {dcfg.variance}; held-out set: {held_out}")
        for line in frac_table(model, cfg, sets[held_out], a.show, a.seed, a.batch_size, device):
            print(line)
        for name, x0 in sets.items():
            print(vlb_line(name, model, cfg, x0, a.steps, a.seed, a.batch_size, device))


if __name__ == "__main__":
    cli(main)

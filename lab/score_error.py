"""How far a trained DDPM's score is from the exact score of its training set (§5.5, §7).

    python -m lab.score_error --run runs/circles      # runs/circles/score_error.png and .json

For discs rendered at every centre column - the training bands and the unseen middle - and a grid
of timesteps, E||eps_theta(x_t, t) - eps*(x_t, t)||^2 with eps* the closed-form score of the
training set (lab/exact_score.py). Where the two part is where the network generalises instead of
memorising: the "score estimation error off the support" that Catastrophic Compositional
Generation blames for what guided sampling produces, and what multi-guidance exploits.
"""
from __future__ import annotations

import argparse
import json
import os
import time

import numpy as np
import torch

from checkpoint import UserError, cli, ensure_writable_dir, from_uint8
from diffusion import GaussianDiffusion, respace_indices
from lab.exact_score import ExactEps, score_model


@torch.no_grad()
def score_error(model, exact: ExactEps, dcfg, size: int, ts, rows: int = 8, draws: int = 1,
                seed: int = 0, batch_size: int = 256, device="cpu", channels: int = 1,
                delta: float = 0.2) -> dict:
    """E ||eps_theta(x_t, t) - eps*(x_t, t)||^2 for discs rendered at every centre column.

    For each valid centre column x (training bands and the unseen middle), ``rows`` evenly spaced
    disc rows, ``draws`` noise draws each and each original timestep in ``ts``: x_t = sqrt(abar) x_0 +
    sqrt(1 - abar) eps (Eq. 4, the same eps for the network and for eps*), and the squared error is
    summed over the D pixels. Returns {columns, z, ts, err [len(ts), columns], eps_sq (E||eps*||^2),
    learned_err (E||eps_theta - eps||^2, the network's L_simple there), exact_err (E||eps* - eps||^2),
    band (whether each column is a training column)}."""
    from toy_circles import band_positions, radius_for, render_disc
    diffusion = GaussianDiffusion.from_config(dcfg).to(device)
    r = radius_for(size)
    cols = list(range(r, size - r))
    ys = np.unique(np.linspace(r, size - 1 - r, rows).round().astype(int))
    x0 = from_uint8(np.stack([render_disc(c, y, size) for c in cols for y in ys]), channels)
    x0 = x0.repeat(draws, 1, 1, 1)
    col_of = torch.tensor(cols).repeat_interleave(len(ys)).repeat(draws)
    gen = torch.Generator().manual_seed(seed)
    keys = ("err", "eps_sq", "learned_err", "exact_err")
    res = {k: np.zeros((len(ts), len(cols))) for k in keys}
    for k, t in enumerate(ts):
        noise = torch.randn(x0.shape, generator=gen)
        tt = torch.full((len(x0),), int(t), dtype=torch.long)
        sums = {k_: torch.zeros(len(cols), dtype=torch.float64) for k_ in keys}
        for s in range(0, len(x0), batch_size):
            xb, nb, tb = (a[s:s + batch_size].to(device) for a in (x0, noise, tt))
            xt = diffusion.q_sample(xb, tb, nb)
            e_theta = diffusion.model_eps(model(xt, tb), xt, tb).double()
            e_star = exact.eps(xt, tb)
            per = {"err": (e_theta - e_star), "eps_sq": e_star, "learned_err": e_theta - nb.double(),
                   "exact_err": e_star - nb.double()}
            idx = col_of[s:s + batch_size] - r
            for k_, v in per.items():
                sums[k_].index_add_(0, idx, (v ** 2).flatten(1).sum(1).cpu())
        for k_ in keys:
            res[k_][k] = (sums[k_] / (len(ys) * draws)).numpy()
    train_cols = {x for x, _ in band_positions(size, delta)}
    return {"columns": cols, "z": [c / (size - 1) for c in cols], "ts": [int(t) for t in ts],
            "band": [c in train_cols for c in cols],
            **{k: v.tolist() for k, v in res.items()}, "rows": len(ys), "draws": draws,
            "pixels": int(np.prod(x0.shape[1:]))}


def plot_score_error(res: dict, path: str, delta: float = 0.2) -> None:
    """Heatmap of log10 E||eps_theta - eps*||^2 (z on x, t on y) and line plots against t and z."""
    from figures import pyplot, save
    plt = pyplot()
    err, z, ts = np.asarray(res["err"]), np.asarray(res["z"]), np.asarray(res["ts"])
    fig, ax = plt.subplots(1, 3, figsize=(15, 4.2))
    dz, dt = (z[1] - z[0]) / 2, (ts[1] - ts[0]) / 2 if len(ts) > 1 else 1
    im = ax[0].imshow(np.log10(err + 1e-12), aspect="auto", origin="lower", cmap="magma",
                      extent=[z[0] - dz, z[-1] + dz, ts[0] - dt, ts[-1] + dt])
    for e in (delta, 1 - delta):
        ax[0].axvline(e, color="lime", lw=1)
    fig.colorbar(im, ax=ax[0], label="log10 E||eps_theta - eps*||^2")
    ax[0].set_xlabel("z of the disc (green: edges of the training bands)")
    ax[0].set_ylabel("t")
    ax[0].set_title("score error of the trained DDPM", fontsize=9)
    band = np.asarray(res["band"])
    mid = (z >= 0.4) & (z <= 0.6)
    for sel, name in ((band, "training columns"), (~band, "unseen columns"), (mid, "z in [0.4, 0.6]")):
        ax[1].plot(ts, err[:, sel].mean(1), label=name)
    ax[1].plot(ts, np.asarray(res["eps_sq"]).mean(1), "k:", label="E||eps*||^2 (scale)")
    ax[1].set_yscale("log")
    ax[1].set_xlabel("t")
    ax[1].set_ylabel(f"E||eps_theta - eps*||^2 (sum over {res['pixels']} px)")
    ax[1].legend(fontsize=7)
    for k in np.unique(np.linspace(0, len(ts) - 1, 5).round().astype(int)):
        ax[2].plot(z, err[k], label=f"t = {ts[k]}")
    for e in (delta, 1 - delta):
        ax[2].axvline(e, color="green", lw=0.8)
    ax[2].set_yscale("log")
    ax[2].set_xlabel("z of the disc")
    ax[2].legend(fontsize=7)
    save(fig, path, tight=True)


def summary_lines(res: dict, every: int = 1) -> list[str]:
    """A table against t: the error on the training columns, on every unseen column, on the middle
    fifth; E||eps*||^2; the network's and eps*'s own squared error against the true noise."""
    z, err, band = np.asarray(res["z"]), np.asarray(res["err"]), np.asarray(res["band"])
    mid = (z >= 0.4) & (z <= 0.6)
    lines = [f"{'t':>5} {'bands':>11} {'unseen':>11} {'z 0.4-0.6':>11} {'E||eps*||^2':>12} "
             f"{'learned L':>10} {'exact L':>10}   (E||eps_theta - eps*||^2, sum over {res['pixels']} px)"]
    for k, t in enumerate(res["ts"]):
        if k % every and k != len(res["ts"]) - 1:
            continue
        lines.append(f"{t:>5} {err[k, band].mean():>11.4g} {err[k, ~band].mean():>11.4g} "
                     f"{err[k, mid].mean():>11.4g} {np.mean(res['eps_sq'][k]):>12.4g} "
                     f"{np.mean(res['learned_err'][k]):>10.4g} {np.mean(res['exact_err'][k]):>10.4g}")
    return lines


def build_parser():
    from sample import add_sample_args
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_sample_args(p, only=("run", "seed", "device", "batch_size"))
    g = p.add_argument_group("score error")
    g.add_argument("--out", default=None,
                   help="PNG path (default: <run>/score_error.png; a .json is written beside it)")
    g.add_argument("--t-count", type=int, default=32, help="timesteps, evenly spread over 0..T-1 (both ends kept)")
    g.add_argument("--rows", type=int, default=8, help="disc rows per column, evenly spread")
    g.add_argument("--draws", type=int, default=1, help="noise draws per disc and timestep")
    return p


def main(argv=None):
    from checkpoint import pick_device
    from sample import load_ddpm, sample_config
    a = build_parser().parse_args(argv)
    s, _ = sample_config(a)
    if a.t_count < 2 or a.rows < 1 or a.draws < 1 or s.batch_size < 1:
        raise UserError("--t-count must be >= 2 and --rows, --draws, --batch-size >= 1")
    device = pick_device(s.device)
    model, cfg = load_ddpm(s.run, device)
    exact = score_model(cfg, device)
    dcfg = cfg["diffusion"]
    if a.t_count > dcfg.timesteps:
        raise UserError(f"--t-count {a.t_count} exceeds the run's T = {dcfg.timesteps}")
    out = a.out or os.path.join(s.run, "score_error.png")
    ensure_writable_dir(os.path.dirname(os.path.abspath(out)))
    t0 = time.time()
    res = score_error(model, exact, dcfg, cfg["data"].image_size, respace_indices(dcfg.timesteps, a.t_count),
                      a.rows, a.draws, s.seed, s.batch_size, device, cfg["data"].channels, cfg["data"].delta)
    res["seconds"] = time.time() - t0
    plot_score_error(res, out, cfg["data"].delta)
    with open(os.path.splitext(out)[0] + ".json", "w") as f:
        json.dump(res, f)
    print("\n".join(summary_lines(res, every=max(1, a.t_count // 16))))
    print(f"{len(res['columns'])} columns x {res['rows']} rows x {a.draws} draws x {a.t_count} timesteps "
          f"in {res['seconds']:.0f} s; wrote {out} and {os.path.splitext(out)[0]}.json")


if __name__ == "__main__":
    cli(main)

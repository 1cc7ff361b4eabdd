"""The README's quick start, timed end to end, recorded in results/quickstart.json.

    python bench/quickstart.py [--out runs/circles] [--seed 0]

Runs exactly the two commands a newcomer types (as subprocesses, so the time includes start-up):
    python train.py --dataset circles --out OUT && python evaluate.py --run OUT
then reads OUT/metrics.json and draws the headline figure (results/figures/quickstart.png):
unguided vs multi-guided samples, and the histogram of detected disc positions z (Fig. 5 / 7a).
The train step of this machine (bench/train_speed.py's measurement, batch 32) is recorded beside
the wall time: machines of one matmul peak can differ widely in convolution speed.
"""
import argparse
import json
import os
import subprocess
import sys
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from results.record import FIGURES, Recorder, mean_std  # noqa: E402,F401

METHODS = ("uncond", "multi", "multi_sn")
COLUMNS = ["method", "accuracy", "one disc", "zero disc", "two+ discs", "hist MSE", "hist KLD", "paper (§5.5)"]
PAPER = {"multi": "78.0 % ± 8.7", "multi_sn": "75.0 % ± 13.3", "uncond": "–"}


def train_step_ms(steps: int = 30) -> float:
    """ms per DDPM optimizer step of the cpu preset (batch 32), measured here."""
    import torch
    import config as C
    from diffusion import GaussianDiffusion
    from models import build_model
    from toy_circles import CirclesData
    cfg = C.make_config("circles", "cpu")
    torch.manual_seed(0)
    model = build_model(cfg)
    d = GaussianDiffusion.from_config(cfg["diffusion"])
    data = CirclesData(cfg["data"].image_size, cfg["data"].delta)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    g = torch.Generator().manual_seed(0)
    times = []
    for i in range(steps + 5):
        t0 = time.perf_counter()
        loss = d.training_loss(model, data.batch(cfg["train"].batch_size, g)[0])
        opt.zero_grad()
        loss.backward()
        opt.step()
        if i >= 5:
            times.append(time.perf_counter() - t0)
    return 1000 * float(np.median(times))


def figure(run: str, path: str, delta: float = 0.2) -> None:
    """Unguided vs multi-guided samples (16 each) and the z-histogram of every method."""
    from figures import pyplot, save
    from evaluate import summarize
    plt = pyplot()
    fig = plt.figure(figsize=(10, 3.6))
    grids = {}
    for k, m in enumerate(("uncond", "multi")):
        im = np.load(os.path.join(run, f"eval_{m}.npz"))["images"][:16]
        im = np.pad(im, ((0, 0), (1, 1), (1, 1), (0, 0)), constant_values=96)  # a grey frame per sample
        s = im.shape[1]
        g = im.reshape(4, 4, s, s, -1).transpose(0, 2, 1, 3, 4).reshape(4 * s, 4 * s, -1)
        grids[m] = g
        ax = fig.add_axes([0.01 + 0.2 * k, 0.08, 0.19, 0.8])
        ax.imshow(g.squeeze(-1) if g.shape[-1] == 1 else g, cmap="gray", vmin=0, vmax=255)
        ax.set_title({"uncond": "unguided", "multi": "multi-guided, λ = [30, 30]"}[m], fontsize=9)
        ax.axis("off")
    ax = fig.add_axes([0.47, 0.16, 0.51, 0.72])
    bins = np.linspace(0, 1, 101)
    for m in METHODS:
        z = summarize(np.load(os.path.join(run, f"eval_{m}.npz"))["images"])["z"]
        ax.hist(z, bins=bins, histtype="step", lw=1.4, label=m)
    for lo, hi in ((0, delta), (1 - delta, 1)):
        ax.axvspan(lo, hi, color="green", alpha=0.1)
    ax.set_yscale("log")
    ax.set_xlabel("z of the detected disc (shaded: the only positions seen in training)")
    ax.set_ylabel("samples")
    ax.legend(fontsize=8)
    save(fig, path)


def row(m: str, r: dict) -> list:
    pct = lambda k: f"{100 * r[k]:.1f} %"  # noqa: E731
    return [m, pct("accuracy"), pct("one_disc"), pct("zero_disc"), pct("two_plus_disc"),
            f"{r['hist_mse']:.3f}", f"{r['hist_kld']:.3f}", PAPER[m]]


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="runs/circles")
    p.add_argument("--seed", type=int, default=0, help="train.py --seed (the README's command uses 0)")
    p.add_argument("--figure-only", action="store_true",
                   help="redraw results/figures/quickstart.png from --out's cached samples; train nothing")
    a = p.parse_args()
    os.chdir(ROOT)
    if a.figure_only:
        figure(a.out, os.path.join(FIGURES, "quickstart.png"))
        return
    rec = Recorder("quickstart", "Quick start: §5.5 circles on a 2-core CPU")
    step = train_step_ms()
    seed = ["--seed", str(a.seed)] if a.seed else []
    cmds = {"train": [sys.executable, "train.py", "--dataset", "circles", "--out", a.out] + seed,
            "evaluate": [sys.executable, "evaluate.py", "--run", a.out]}
    secs = {}
    for name, cmd in cmds.items():
        t0 = time.time()
        subprocess.run(cmd, check=True)
        secs[name] = time.time() - t0
    with open(os.path.join(a.out, "metrics.json")) as f:
        metrics = {m: v for m, v in json.load(f).items() if m in METHODS}
    figure(a.out, rec.figure_path("quickstart.png"))
    total = sum(secs.values())
    timing = {"train_s": round(secs["train"], 1), "evaluate_s": round(secs["evaluate"], 1),
              "total_min": round(total / 60, 2), "ddpm_train_step_ms": round(step, 1)}
    tables = [{"title": f"{metrics['multi']['n']} samples per method, 64 respaced ancestral steps",
               "columns": COLUMNS, "rows": [row(m, metrics[m]) for m in METHODS if m in metrics]},
              {"title": "time", "columns": ["train", "evaluate", "total", "DDPM train step (batch 32)"],
               "rows": [[f"{secs['train'] / 60:.1f} min", f"{secs['evaluate'] / 60:.1f} min",
                         f"{total / 60:.1f} min", f"{step:.0f} ms"]]}]
    path = rec.write({"methods": metrics, "timing": timing}, seeds=[a.seed], n=metrics["multi"]["n"],
                     tables=tables,
                     notes=[f"Commands: `python train.py --dataset circles --out {a.out}` then "
                            f"`python evaluate.py --run {a.out}`."])
    print(f"quick start {total / 60:.1f} min (train {secs['train'] / 60:.1f}, evaluate "
          f"{secs['evaluate'] / 60:.1f}); DDPM step {step:.0f} ms; wrote {path}")


if __name__ == "__main__":
    main()

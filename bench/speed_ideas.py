"""Speed ideas for the CPU preset, each measured against the code's choice (results/speed_ideas.json).

    python bench/speed_ideas.py [--steps 20]

One row per idea: the time of the code's choice, the time of the idea, the gain, and whether the code
uses it. Every row is timed in this run, on this machine, as the median over --steps repetitions:
  * training layout: NCHW (train.py) vs channels_last, one DDPM optimizer step at batch 32;
  * sampling layout: channels_last weights (sample.inference_layout) vs NCHW, one forward at batch 128;
  * training batch: 64 vs 32 images per step, in images/s (a larger batch changes the optimisation
    that every seeded figure was measured with, so it is reported, not adopted);
  * AdamW fused=True vs the default loop (optimizer step alone; fused rounds differently, so seeded
    runs would stop reproducing bit for bit);
  * EMA with torch._foreach_lerp_ vs the per-parameter loop of trainer.update_ema;
  * sampling threads: 1 vs 2 (forward at batch 128).
"""
import argparse
import copy
import os
import sys
import time

import numpy as np
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import config as C  # noqa: E402
from checkpoint import pick_device  # noqa: E402
from diffusion import GaussianDiffusion  # noqa: E402
from models import build_model  # noqa: E402
from results.record import Recorder  # noqa: E402
from toy_circles import CirclesData  # noqa: E402
from trainer import update_ema  # noqa: E402


def median_ms(fn, steps: int, warmup: int = 3) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return 1000 * float(np.median(times))


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=20)
    a = p.parse_args()
    rec = Recorder("speed_ideas", "Speed ideas on the CPU preset")
    pick_device("cpu")
    cfg = C.make_config("circles", "cpu")
    d = GaussianDiffusion.from_config(cfg["diffusion"])
    data = CirclesData(cfg["data"].image_size, cfg["data"].delta)
    size = cfg["data"].image_size

    def train_step_ms(bs=32, layout=None, fused=False):
        torch.manual_seed(0)
        model = build_model(cfg)
        if layout:
            model = model.to(memory_format=layout)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=fused or None)
        g = torch.Generator().manual_seed(0)

        def step():
            loss = d.training_loss(model, data.batch(bs, g)[0])
            opt.zero_grad()
            loss.backward()
            opt.step()
        return median_ms(step, a.steps)

    def forward_ms(layout, threads=None):
        torch.manual_seed(0)
        model = build_model(cfg).eval().requires_grad_(False).to(memory_format=layout)
        x, t = torch.randn(128, 1, size, size), torch.full((128,), 500)
        n = torch.get_num_threads()
        if threads:
            torch.set_num_threads(threads)
        with torch.inference_mode():
            ms = median_ms(lambda: model(x, t), max(5, a.steps // 2))
        torch.set_num_threads(n)
        return ms

    def optimizer_ms(fused):
        torch.manual_seed(0)
        model = build_model(cfg)
        for q in model.parameters():
            q.grad = torch.randn_like(q)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=fused or None)
        return median_ms(opt.step, a.steps)

    def ema_ms(foreach):
        torch.manual_seed(0)
        model = build_model(cfg)
        ema = copy.deepcopy(model).requires_grad_(False)
        if foreach:
            pe, pm = list(ema.parameters()), list(model.parameters())
            def lerp():
                with torch.no_grad():
                    torch._foreach_lerp_(pe, pm, 1 - 0.999)
            return median_ms(lerp, a.steps)
        return median_ms(lambda: update_ema(ema, model, 0.999), a.steps)

    rows, metrics = [], {}

    def add(idea, ours_name, ours, alt_name, alt, used, unit="ms", higher_better=False):
        gain = (alt / ours if higher_better else ours / alt)
        metrics[idea] = {ours_name: ours, alt_name: alt, "gain": gain, "used": used, "unit": unit}
        rows.append([idea, f"{ours_name}: {ours:.0f} {unit}", f"{alt_name}: {alt:.0f} {unit}",
                     f"{gain:.2f}x", "yes" if used else "no"])
        print(rows[-1], flush=True)

    nchw, cl = torch.contiguous_format, torch.channels_last
    add("training layout (batch 32)", "NCHW", train_step_ms(layout=nchw), "channels_last",
        train_step_ms(layout=cl), False)
    add("sampling layout (forward, batch 128)", "NCHW", forward_ms(nchw), "channels_last", forward_ms(cl), True)
    bs32, bs64 = train_step_ms(32), train_step_ms(64)
    add("training batch 64 instead of 32", "batch 32", 32000 / bs32, "batch 64", 64000 / bs64, False,
        unit="images/s", higher_better=True)
    add("AdamW fused=True (optimizer step)", "default", optimizer_ms(False), "fused", optimizer_ms(True), False)
    add("EMA with _foreach_lerp_", "loop", ema_ms(False), "foreach", ema_ms(True), False)
    add("sampling threads (forward, batch 128, channels_last)", "1 thread", forward_ms(cl, 1), "2 threads",
        forward_ms(cl, 2), True)
    tables = [{"title": "gain > 1: the idea is faster (images/s: higher is faster)",
               "columns": ["idea", "without", "with", "gain", "used by the code?"], "rows": rows}]
    notes = ["Training ideas are weighed against a whole step (the first row): a larger batch changes the "
             "optimisation and fused AdamW rounds differently, so either would change every seeded figure here."]
    path = rec.write(metrics, seeds=[0], n=a.steps, tables=tables, notes=notes)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()

"""Time per sampling step: unguided vs single-class vs multi-guidance, on the same batch, one run.

    python bench/guidance_cost.py [--run runs/circles] [--batch-size 256] [--reps 5]

Uses the run's trained DDPM and classifier when --run exists, otherwise freshly initialised models of
the CPU preset (timings do not depend on the weights). Multi-guidance sums log p over all classes
before one backward pass, so it should cost the same as single-class guidance (App. C).
"""
import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import config as C  # noqa: E402
from checkpoint import pick_device  # noqa: E402
from classifier import NoisyClassifier  # noqa: E402
from diffusion import GaussianDiffusion  # noqa: E402
from guidance import multi_guidance, single_guidance  # noqa: E402
from models import build_model  # noqa: E402


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--run", default="runs/circles")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--reps", type=int, default=5)
    a = p.parse_args()
    pick_device("cpu")  # sets the CPU thread count
    if os.path.exists(os.path.join(a.run, "classifier.pt")):
        from sample import load_classifier, load_ddpm
        model, cfg = load_ddpm(a.run, "cpu")
        clf = load_classifier(a.run, "classifier", "cpu", cfg)
        src = a.run
    else:
        cfg = C.make_config("circles", "cpu")
        model = build_model(cfg).eval().requires_grad_(False)
        clf = NoisyClassifier.from_config(cfg["data"], cfg["classifier"]).eval().requires_grad_(False)
        src = "untrained cpu preset"
    d = GaussianDiffusion.from_config(cfg["diffusion"], respaced=True)
    n, s = a.batch_size, cfg["data"].image_size
    x = torch.randn(n, cfg["data"].channels, s, s)
    t = torch.full((n,), d.T // 2, dtype=torch.long)
    modes = {"unguided": None,
             "single": single_guidance(clf, torch.ones(n, dtype=torch.long), 30.0),
             "multi": multi_guidance([clf], [torch.tensor([30.0, 30.0])])}
    times = {k: [] for k in modes}
    with torch.no_grad():
        for _ in range(a.reps + 1):  # interleave modes so drift affects all alike; first rep warms up
            for k, g in modes.items():
                t0 = time.perf_counter()
                d.p_sample(model, x, t, guidance=g)
                times[k].append(time.perf_counter() - t0)
    med = {k: sorted(v[1:])[len(v[1:]) // 2] for k, v in times.items()}
    print(f"models: {src}; batch {n}, {s}x{s}, median of {a.reps} steps")
    for k, v in med.items():
        print(f"{k:>9}: {v * 1e3:8.1f} ms/step  ({v / n * 1e3:.2f} ms/image/step)")
    print(f"multi / single = {med['multi'] / med['single']:.3f}   "
          f"guided / unguided = {med['multi'] / med['unguided']:.2f}")


if __name__ == "__main__":
    main()

"""Training throughput of the CPU preset and its model FLOP utilisation (MFU).

    python bench/train_speed.py [--steps 20] [--batch-size 64] [--preset cpu]
    python bench/train_speed.py --arch dit [--patch-size 2 --dit-width 64 ...]   # the DiT (App. J)

Measures, in one run: (1) the machine's fp32 matmul peak (large square matmuls), (2) the FLOPs of one
DDPM training step (forward + backward, counted with torch.utils.flop_counter.FlopCounterMode),
(3) the wall time of real optimizer steps. MFU = achieved FLOP/s / matmul peak.
"""
import argparse
import os
import sys
import time

import torch
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import config as C  # noqa: E402
from checkpoint import pick_device  # noqa: E402
from diffusion import GaussianDiffusion  # noqa: E402
from toy_circles import CirclesData  # noqa: E402
from models import build_model  # noqa: E402


def _attention_flops(q, k, v, *args, out_shape=None, **kwargs) -> int:
    # softmax(q k^T) v: two batched matmuls of 2 * b * h * s_q * s_k * d FLOPs each.
    b, h, sq, d = q
    return 2 * (2 * b * h * sq * k[2] * d)


def _attention_backward_flops(grad_out, q, k, v, *args, out_shape=None, **kwargs) -> int:
    # Recompute q k^T, then the gradients of the two matmuls (two each): five matmuls in all.
    return 5 * _attention_flops(q, k, v) // 2


def flop_counter() -> FlopCounterMode:
    """FlopCounterMode that also counts CPU attention: torch's counter knows the CUDA kernels of
    F.scaled_dot_product_attention but not the CPU one, so CPU attention counted 0 (a few % of
    the UNet, a third of a DiT at patch 2). Same formulas as torch uses for the CUDA kernels."""
    aten = torch.ops.aten
    return FlopCounterMode(display=False, custom_mapping={
        aten._scaled_dot_product_flash_attention_for_cpu: _attention_flops,
        aten._scaled_dot_product_flash_attention_for_cpu_backward: _attention_backward_flops})


def matmul_peak(n=2048, reps=10):
    a, b = torch.randn(n, n), torch.randn(n, n)
    for _ in range(3):
        a @ b
    t0 = time.perf_counter()
    for _ in range(reps):
        a @ b
    return 2 * n ** 3 * reps / (time.perf_counter() - t0)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--preset", default="cpu")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--batch-size", type=int, default=None)
    C.add_dataclass_args(p, C.UNetConfig, title="network (config.UNetConfig: --arch and its knobs)")
    a = p.parse_args()
    pick_device("cpu")  # sets the CPU thread count
    cfg = C.make_config("circles", a.preset, **C.overrides_from_args(a, [C.UNetConfig]))
    bs = a.batch_size or cfg["train"].batch_size
    model = build_model(cfg)
    diffusion = GaussianDiffusion.from_config(cfg["diffusion"])
    data = CirclesData(cfg["data"].image_size, cfg["data"].delta)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    g = torch.Generator().manual_seed(0)

    def step():
        x0, _ = data.batch(bs, g)
        loss = diffusion.training_loss(model, x0)
        opt.zero_grad()
        loss.backward()
        opt.step()

    with flop_counter() as fc:
        step()
    flops = fc.get_total_flops()
    for _ in range(3):
        step()
    t0 = time.perf_counter()
    for _ in range(a.steps):
        step()
    dt = (time.perf_counter() - t0) / a.steps
    peak = matmul_peak()
    achieved = flops / dt
    print(f"preset {a.preset}, arch {cfg['unet'].arch}: {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M params, "
          f"{cfg['data'].image_size}px, batch {bs}, threads {torch.get_num_threads()}")
    print(f"train step: {dt * 1e3:.0f} ms  -> {bs / dt:.0f} images/s, {1 / dt:.2f} steps/s")
    print(f"FLOPs/step (fwd+bwd): {flops / 1e9:.2f} GFLOP  ({flops / bs / 1e9:.3f} GFLOP/image)")
    print(f"achieved {achieved / 1e9:.0f} GFLOP/s; fp32 matmul peak {peak / 1e9:.0f} GFLOP/s; "
          f"MFU {achieved / peak:.0%}")


if __name__ == "__main__":
    main()

"""Training throughput of the CPU preset and its model FLOP utilisation (MFU).

    python bench/train_speed.py [--steps 20] [--batch-size 64] [--preset cpu]
    python bench/train_speed.py --arch dit [--patch-size 2 --dit-width 64 ...]   # the DiT (App. J)
    python bench/train_speed.py --compile     # + torch.compile: its compile time against the gain

Measures, in one run: (1) the machine's fp32 matmul peak (large square matmuls), (2) the FLOPs of one
DDPM training step (forward + backward, counted with torch.utils.flop_counter.FlopCounterMode),
(3) the wall time of real optimizer steps, in torch's default NCHW layout (what train.py uses) and in
channels_last (sampling's layout on a CPU); with --compile, (4) torch.compile's compile time against
its gain per step. MFU = achieved FLOP/s / matmul peak.
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
from results.record import Recorder, matmul_gflops  # noqa: E402


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


def matmul_peak() -> float:
    """fp32 matmul FLOP/s (results.record.matmul_gflops, in FLOP/s for the FLOP counts here)."""
    return matmul_gflops() * 1e9


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--preset", default="cpu")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--batch-size", type=int, default=None)
    p.add_argument("--compile", action="store_true",
                   help="also time torch.compile of the training step (compile seconds and ms/step); "
                        "skipped with a message where no compiler works")
    C.add_dataclass_args(p, C.UNetConfig, title="network (config.UNetConfig: --arch and its knobs)")
    a = p.parse_args()
    pick_device("cpu")  # sets the CPU thread count
    cfg = C.make_config("circles", a.preset, **C.overrides_from_args(a, [C.UNetConfig]))
    bs = a.batch_size or cfg["train"].batch_size
    diffusion = GaussianDiffusion.from_config(cfg["diffusion"])
    data = CirclesData(cfg["data"].image_size, cfg["data"].delta)

    def timed(layout: str, compiled: bool = False):
        """(s per optimizer step, FLOPs per step, compile seconds, model) of a fresh model in
        ``layout``: nchw (torch's default, what train.py uses) or channels_last (what sampling uses
        on a CPU, sample.inference_layout)."""
        torch.manual_seed(0)
        model = build_model(cfg)
        if layout == "channels_last":
            model.to(memory_format=torch.channels_last)  # Adam's moments follow the parameters
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
        g = torch.Generator().manual_seed(0)
        net = torch.compile(model) if compiled else model

        def step():
            x0, _ = data.batch(bs, g)
            loss = diffusion.training_loss(net, x0)
            opt.zero_grad()
            loss.backward()
            opt.step()

        flops = 0
        if not compiled:
            with flop_counter() as fc:
                step()
            flops = fc.get_total_flops()
        t0 = time.perf_counter()
        step()  # a compiled model compiles here
        compile_s = time.perf_counter() - t0 if compiled else 0.0
        for _ in range(3):
            step()
        t0 = time.perf_counter()
        for _ in range(a.steps):
            step()
        return (time.perf_counter() - t0) / a.steps, flops, compile_s, model

    default = a.preset == "cpu" and cfg["unet"].arch == "unet"
    rec = Recorder("train_speed" if default else f"train_speed_{a.preset}_{cfg['unet'].arch}",
                   "Training throughput of the DDPM and its model FLOP utilisation")
    peak = rec.gflops_before * 1e9
    print(f"preset {a.preset}, arch {cfg['unet'].arch}, {cfg['data'].image_size}px, batch {bs}, "
          f"threads {torch.get_num_threads()}; fp32 matmul peak {peak / 1e9:.0f} GFLOP/s")
    rows, table = {}, []
    for layout in ("nchw", "channels_last"):
        dt, flops, _, model = timed(layout)
        rows[layout] = dt
        if layout == "nchw":
            print(f"{sum(p.numel() for p in model.parameters()) / 1e6:.2f}M params; FLOPs/step (fwd+bwd): "
                  f"{flops / 1e9:.2f} GFLOP ({flops / bs / 1e9:.3f} GFLOP/image)")
            step_flops = flops
        print(f"train step, {layout:13s}: {dt * 1e3:5.0f} ms -> {bs / dt:4.0f} images/s, "
              f"{step_flops / dt / 1e9:4.0f} GFLOP/s = {step_flops / dt / peak:4.0%} of the matmul peak")
        table.append([layout, f"{dt * 1e3:.0f} ms", f"{bs / dt:.0f}", f"{step_flops / dt / 1e9:.0f}",
                      f"{step_flops / dt / peak:.0%}"])
    # Unlike sampling, training stays NCHW: channels_last gains nothing there (why: RESULTS.md#speed_ideas).
    print(f"channels_last / nchw: {rows['nchw'] / rows['channels_last']:.2f}x speed-up "
          f"(train.py trains in NCHW; sampling uses channels_last)")
    if a.compile:
        try:
            dt, _, compile_s, _ = timed("nchw", compiled=True)
        except Exception as e:  # no compiler, or an unsupported op: report, do not fail the bench
            print(f"torch.compile: skipped ({type(e).__name__}: {str(e).splitlines()[0][:120]})")
        else:
            saved = rows["nchw"] - dt
            pays = f"pays for itself after {compile_s / saved:.0f} steps" if saved > 0 else "never pays"
            print(f"train step, compiled     : {dt * 1e3:5.0f} ms ({step_flops / dt / 1e9:.0f} GFLOP/s) after "
                  f"a {compile_s:.0f} s compile: {pays} (the cpu preset trains {cfg['train'].steps})")
            rows["compiled"], rows["compile_seconds"] = dt, compile_s
            table.append([f"nchw + torch.compile ({compile_s:.0f} s to compile; {pays})", f"{dt * 1e3:.0f} ms",
                          f"{bs / dt:.0f}", f"{step_flops / dt / 1e9:.0f}", f"{step_flops / dt / peak:.0%}"])
    path = rec.write({"step_seconds": rows, "flops_per_step": step_flops, "batch_size": bs,
                      "params": sum(p.numel() for p in model.parameters())}, seeds=[0], n=a.steps, tables=[{
        "title": f"one DDPM optimizer step, preset {a.preset}, arch {cfg['unet'].arch}, batch {bs}, "
                 f"{step_flops / 1e9:.2f} GFLOP per step (forward + backward), mean of {a.steps} steps",
        "columns": ["layout", "step", "images/s", "GFLOP/s", "of the matmul peak"], "rows": table}])
    print(f"fp32 matmul peak before / after: {rec.gflops_before:.0f} GFLOP/s (a drop means a busy machine); "
          f"wrote {path}")


if __name__ == "__main__":
    main()

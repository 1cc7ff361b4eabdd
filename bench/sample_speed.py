"""Speed of one sampling step of the §5.5 table: GFLOP/s and fraction of the fp32 matmul peak.

    python bench/sample_speed.py [--run runs/circles] [--batch-sizes 128,256] [--reps 5]
    python bench/sample_speed.py --run runs/dit          # a trained DiT run (--arch dit)
    python bench/sample_speed.py --run none --arch dit   # a fresh cpu-preset DiT

One run measures (1) the machine's fp32 matmul peak, (2) the FLOPs of an unguided step (one UNet
forward) and of a multi-guided step (UNet forward + classifier forward and backward), counted with
torch.utils.flop_counter (train_speed.flop_counter: CPU attention included), and (3) their median wall time, in the memory layouts the sampler can use
(NCHW, and channels_last: NHWC in memory, which oneDNN's CPU convolutions prefer). Uses the run's
trained models when --run exists, else fresh cpu-preset ones (speed does not depend on weights).
With the optional `diffusers` package installed, the same is measured for its UNet2DModel at about
the same FLOPs, to place our UNet beside a widely used implementation; without it, that row is
skipped with a message.
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
from guidance import multi_guidance  # noqa: E402
from train_speed import flop_counter, matmul_peak  # noqa: E402
from models import build_model  # noqa: E402


def flops_of(fn) -> int:
    with flop_counter() as fc:
        fn()
    return fc.get_total_flops()


def classifier_flops(clf, x, t) -> int:
    """Forward + backward to the input, as guidance does (counted through .backward(): the FLOP
    counter's module hooks do not support torch.autograd.grad)."""
    xi = x.detach().clone().requires_grad_(True)
    with flop_counter() as fc:
        torch.log_softmax(clf(xi, t), -1).sum().backward()
    return fc.get_total_flops()


def median_time(fn, reps: int) -> float:
    fn()  # warm-up (oneDNN picks its kernels on the first call)
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return sorted(ts)[len(ts) // 2]


def load_models(run, net_overrides):
    if os.path.exists(os.path.join(run, "classifier.pt")):
        if net_overrides:  # the run's checkpoint defines its network
            raise SystemExit(f"{run} holds trained models; network flags ({', '.join(net_overrides)}) "
                             "only apply without one: drop them or pass --run none")
        from sample import load_classifier, load_ddpm
        model, cfg = load_ddpm(run, "cpu")
        return model, load_classifier(run, "classifier", "cpu", cfg), cfg, run
    cfg = C.make_config("circles", "cpu", **net_overrides)
    model = build_model(cfg).eval().requires_grad_(False)
    clf = NoisyClassifier.from_config(cfg["data"], cfg["classifier"]).eval().requires_grad_(False)
    return model, clf, cfg, f"untrained cpu preset, arch {cfg['unet'].arch}"


def diffusers_row(our_flops: float, size: int, channels: int, n: int, reps: int, peak: float):
    try:
        from diffusers import UNet2DModel
    except Exception as e:  # optional, bench-only dependency
        print(f"diffusers UNet2DModel: skipped ({type(e).__name__}: pip install diffusers to compare)")
        return
    # Widths chosen so that its forward FLOPs are close to ours (printed, so the match is visible).
    best = None
    for w in (16, 24, 32, 40, 48, 64):
        m = UNet2DModel(sample_size=size, in_channels=channels, out_channels=channels,
                        block_out_channels=(w, 2 * w, 2 * w), layers_per_block=2,
                        down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D"),
                        up_block_types=("UpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
                        norm_num_groups=8).eval().requires_grad_(False)
        x, t = torch.randn(n, channels, size, size), torch.full((n,), 10)
        f = flops_of(lambda: m(x, t))
        if best is None or abs(f - our_flops) < abs(best[1] - our_flops):
            best = (w, f, m, x, t)
    w, f, m, x, t = best
    with torch.inference_mode():
        s = median_time(lambda: m(x, t), reps)
    print(f"diffusers UNet2DModel (width {w}): {f / n / 1e6:.0f} MFLOP/image, {s * 1e3:.0f} ms, "
          f"{f / s / 1e9:.1f} GFLOP/s ({f / s / peak:.0%} of peak)")
    return f / s


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--run", default="runs/circles")
    p.add_argument("--batch-sizes", default="128,256")
    p.add_argument("--reps", type=int, default=5)
    C.add_dataclass_args(p, C.UNetConfig, title="network without a trained --run (config.UNetConfig)")
    a = p.parse_args()
    pick_device("cpu")
    peak = matmul_peak()
    model, clf, cfg, src = load_models(a.run, C.overrides_from_args(a, [C.UNetConfig]))
    d = GaussianDiffusion.from_config(cfg["diffusion"], respaced=True)
    size, ch = cfg["data"].image_size, cfg["data"].channels
    g = multi_guidance([clf], [torch.tensor([30.0, 30.0])])
    print(f"models: {src}; {size}x{size}; fp32 matmul peak {peak / 1e9:.0f} GFLOP/s; median of {a.reps}")
    ours = None
    for n in (int(b) for b in a.batch_sizes.split(",")):
        t = torch.full((n,), d.T // 2, dtype=torch.long)
        for layout in ("nchw", "channels_last"):
            fmt = torch.channels_last if layout == "channels_last" else torch.contiguous_format
            model.to(memory_format=fmt)
            clf.to(memory_format=fmt)
            x = torch.randn(n, ch, size, size).contiguous(memory_format=fmt)
            for name, guide in (("unguided", None), ("multi", g)):
                step = lambda: d.p_sample(model, x, t, guidance=guide)  # noqa: E731
                f = flops_of(lambda: d.p_sample(model, x, t))
                if guide is not None:
                    f += classifier_flops(clf, x, t)
                with torch.no_grad():
                    s = median_time(step, a.reps)
                print(f"batch {n:4d} {layout:>13} {name:>9}: {f / n / 1e6:6.0f} MFLOP/image, "
                      f"{s * 1e3:7.0f} ms/step, {f / s / 1e9:5.1f} GFLOP/s ({f / s / peak:.0%} of peak)")
                if name == "unguided" and layout == "nchw" and n == 256:
                    ours = (f, f / s)
        model.to(memory_format=torch.contiguous_format)
        clf.to(memory_format=torch.contiguous_format)
    if ours:
        theirs = diffusers_row(ours[0], size, ch, 256, a.reps, peak)
        if theirs:
            print(f"ours / diffusers (GFLOP/s, unguided, batch 256, NCHW): {ours[1] / theirs:.2f}")


if __name__ == "__main__":
    main()

"""Sample from a trained run: unconditional, classifier-guided (§2.2) or multi-guided (§4.2, Eq. 2).

    python sample.py --run runs/circles --n 512                          # unconditional
    python sample.py --run runs/circles --guidance multi --lambdas 30,30 # interpolation
    python sample.py --run runs/circles --guidance multi --classifier classifier_sn
    python sample.py --run runs/circles --guidance single --scale 30 --target 1

The model config is read from the run's checkpoint (EMA weights); only sampling choices are flags.
Writes ``<run>/samples_<tag>.npz`` (uint8 images [N, H, W, C] + the settings) and a PNG grid.
"""
from __future__ import annotations

import argparse
import os
import time

import numpy as np
import torch
from PIL import Image

import config as C
from checkpoint import UserError, cli, load_checkpoint, pick_device
from classifier import NoisyClassifier
from diffusion import GaussianDiffusion
from guidance import multi_guidance, parse_lambdas, single_guidance
from unet import UNet


def load_ddpm(run: str, device, use_ema: bool = True):
    ck = load_checkpoint(run, "ddpm")
    cfg = C.from_dict(ck["config"])
    model = UNet.from_config(cfg["data"], cfg["unet"])
    model.load_state_dict(ck["ema" if use_ema else "model"])
    return model.to(device).eval().requires_grad_(False), cfg


def load_classifier(run: str, name: str, device, expect_cfg=None):
    """A trained noise-aware classifier; checks it matches the DDPM's images (size, channels)."""
    if name not in ("classifier", "classifier_sn"):
        raise UserError(f"unknown classifier {name!r}; use classifier or classifier_sn")
    ck = load_checkpoint(run, name)
    cfg = C.from_dict(ck["config"])
    if expect_cfg is not None:
        a, b = cfg["data"], expect_cfg["data"]
        if (a.image_size, a.channels) != (b.image_size, b.channels):
            raise UserError(f"{name} was trained on {a.image_size}x{a.image_size}x{a.channels} images "
                            f"but the DDPM makes {b.image_size}x{b.image_size}x{b.channels}; retrain "
                            f"it with python train.py --out {run} --model classifier --overwrite")
        if (cfg["diffusion"].timesteps, cfg["diffusion"].noise_schedule) != \
                (expect_cfg["diffusion"].timesteps, expect_cfg["diffusion"].noise_schedule):
            raise UserError(f"{name} was trained for another noise schedule than the DDPM; retrain it")
    model = NoisyClassifier.from_config(cfg["data"], cfg["classifier"], ck["num_classes"],
                                        spectral=ck["spectral_norm"])
    model.load_state_dict(ck["model"])
    return model.to(device).eval().requires_grad_(False)


def generate(run: str, n: int, batch_size: int = 256, seed: int = 0, device=None,
             steps: int | None = None, guidance: str = "none", lambdas: str | None = None,
             scale: float = 30.0, target: int | None = None, classifier: str = "classifier",
             progress: bool = False, models=None) -> torch.Tensor:
    """n samples in [-1, 1], NCHW float32 on the CPU. ``models`` = (ddpm, cfg) skips reloading."""
    if guidance not in ("none", "single", "multi"):
        raise UserError(f"unknown --guidance {guidance!r}; use none, single or multi")
    device = device or pick_device()
    model, cfg = models or load_ddpm(run, device)
    dcfg = cfg["diffusion"]
    steps = steps or dcfg.sample_steps
    if not 2 <= steps <= dcfg.timesteps:
        raise UserError(f"--steps {steps} is outside 2..{dcfg.timesteps} (the model's T)")
    diffusion = GaussianDiffusion.from_config(dcfg, respaced=True, steps=steps)
    clf = load_classifier(run, classifier, device, cfg) if guidance != "none" else None
    g = None
    if guidance == "multi":
        lam = parse_lambdas(lambdas, clf.num_classes) if lambdas else torch.full((clf.num_classes,), scale)
        g = multi_guidance([clf], [lam])
    if guidance == "single" and target is not None and not 0 <= target < clf.num_classes:
        raise UserError(f"--target {target} is not a class of the classifier (0..{clf.num_classes - 1})")
    gen = torch.Generator(device=device).manual_seed(seed)
    shape = (cfg["data"].channels, cfg["data"].image_size, cfg["data"].image_size)
    out = []
    for start in range(0, n, batch_size):
        b = min(batch_size, n - start)
        if guidance == "single":
            # Default target: alternate classes so a grid shows both.
            y = torch.full((b,), target) if target is not None else torch.arange(start, start + b) % clf.num_classes
            g = single_guidance(clf, y.to(device), scale)
        out.append(diffusion.sample(model, (b, *shape), dcfg.clip_denoised, g, gen, device,
                                    progress=progress).cpu())
    return torch.cat(out)


def to_uint8(x: torch.Tensor) -> np.ndarray:
    """[-1, 1] NCHW float -> uint8 NHWC (the file boundary)."""
    return ((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()


def save_grid(x: torch.Tensor, path: str, nrow: int | None = None, marks: bool = False,
              delta: float = 0.2, pad: int = 2) -> None:
    """Tile images into a PNG. ``marks`` draws green lines at z = delta and 1 - delta (the edges of
    the training regions, as in Fig. 7a); they are not part of the samples."""
    imgs = to_uint8(x)
    n, h, w, c = imgs.shape
    nrow = nrow or int(np.ceil(np.sqrt(n)))
    ncol = int(np.ceil(n / nrow))
    grid = np.full((ncol * (h + pad) + pad, nrow * (w + pad) + pad, 3), 80, dtype=np.uint8)
    for i in range(n):
        r, q = divmod(i, nrow)
        tile = np.repeat(imgs[i], 3, axis=-1) if c == 1 else imgs[i]
        if marks:
            tile = tile.copy()
            for z in (delta, 1 - delta):
                col = int(round(z * (w - 1)))
                tile[:, col] = np.maximum(tile[:, col], np.array([0, 110, 0], np.uint8))
        grid[pad + r * (h + pad): pad + r * (h + pad) + h, pad + q * (w + pad): pad + q * (w + pad) + w] = tile
    scale = max(1, 256 // h)  # small images are upscaled so the grid is readable
    Image.fromarray(grid).resize((grid.shape[1] * scale, grid.shape[0] * scale), Image.NEAREST).save(path)


def build_parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", default="runs/circles", help="run directory holding ddpm.pt")
    p.add_argument("--n", type=int, default=64)
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--steps", type=int, default=None, help="respaced sampling steps (default: config)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default=None)
    p.add_argument("--guidance", default="none", choices=["none", "single", "multi"])
    p.add_argument("--scale", type=float, default=30.0, help="lambda for every class / single target")
    p.add_argument("--lambdas", default=None, help="per-class lambdas for multi, e.g. 30,30")
    p.add_argument("--target", type=int, default=None, help="class for single guidance (default: alternate)")
    p.add_argument("--classifier", default="classifier", help="classifier or classifier_sn")
    p.add_argument("--tag", default=None, help="output name suffix (default: the guidance mode)")
    return p


def main(argv=None):
    a = build_parser().parse_args(argv)
    if a.n < 1 or a.batch_size < 1:
        raise UserError("--n and --batch-size must be positive")
    device = pick_device(a.device)
    if device.type == "cpu":
        torch.set_num_threads(os.cpu_count() or 1)
    models = load_ddpm(a.run, device)
    t0 = time.time()
    x = generate(a.run, a.n, a.batch_size, a.seed, device, a.steps, a.guidance, a.lambdas,
                 a.scale, a.target, a.classifier, progress=True, models=models)
    dt = time.time() - t0
    tag = a.tag or (a.guidance if a.guidance == "none" else f"{a.guidance}_{a.classifier}")
    npz = os.path.join(a.run, f"samples_{tag}.npz")
    png = os.path.join(a.run, f"samples_{tag}.png")
    np.savez_compressed(npz, images=to_uint8(x), guidance=a.guidance, seed=a.seed,
                        lambdas=a.lambdas or "", scale=a.scale, classifier=a.classifier)
    data_cfg = models[1]["data"]
    save_grid(x[:64], png, marks=data_cfg.dataset == "circles", delta=data_cfg.delta)
    print(f"{a.n} samples in {dt:.1f} s ({dt / a.n:.3f} s/image) -> {npz}, {png}")


if __name__ == "__main__":
    cli(main)

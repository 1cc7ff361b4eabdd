"""Train the DDPM (§2.1, App. A, C) and the noise-aware guidance classifiers (§4.2, §5.5).

    python train.py --dataset circles                  # DDPM + classifier + spectral-norm twin
    python train.py --dataset circles --model ddpm     # one part only (ddpm|classifier|all)
    python train.py --dataset circles --resume         # continue from runs/circles/*.pt

Every model of a run is written to ``--out`` (default runs/<dataset>) as one checkpoint file
(model, EMA, optimizer, step, RNG state, full config), atomically, every ``--save-every`` steps
and at the end; a finished model is skipped on --resume. The DDPM ends with a grid of EMA samples.
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import math
import os
import time

import torch
import torch.nn.functional as F

import config as C
from checkpoint import (UserError, cli, ckpt_path, ensure_writable_dir, load_checkpoint,
                        pick_device, rng_state, save_atomic, set_rng_state)
from classifier import NoisyClassifier
from diffusion import GaussianDiffusion
from unet import UNet

C_NAMES = ("ddpm", "classifier", "classifier_sn")

# Fields that define a model's shape or its data: a checkpoint and a request must agree on them.
FROZEN = {"data": ("dataset", "image_size", "channels", "delta"),
          "unet": tuple(f.name for f in C.fields(C.UNetConfig)),
          "diffusion": ("timesteps", "noise_schedule"),
          "classifier": ("clf_channels", "clf_channel_mult", "clf_res_blocks",
                         "clf_attention_resolutions", "sn_scale")}


def load_data(dcfg):
    if dcfg.dataset == "circles":
        from toy_circles import CirclesData
        return CirclesData(dcfg.image_size, dcfg.delta, dcfg.flip, dcfg.channels)
    raise UserError(f"unknown dataset {dcfg.dataset!r}; choose one of {C.DATASETS}")


def lr_at(step, base, warmup, total):
    """Linear warm-up, then cosine decay to 10% of the base rate (short CPU runs end sharper)."""
    if step < warmup:
        return base * (step + 1) / warmup
    p = (step - warmup) / max(1, total - warmup)
    return base * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, p))))


def ema_decay_at(step: int, max_decay: float) -> float:
    """EMA decay with warm-up, min(max_decay, (1 + step) / (10 + step)): early weights (random
    init) are forgotten fast, so short runs are not dominated by them."""
    return min(max_decay, (1 + step) / (10 + step))


@torch.no_grad()
def update_ema(ema: torch.nn.Module, model: torch.nn.Module, decay: float) -> None:
    """ema <- decay * ema + (1 - decay) * model, parameter by parameter (buffers are copied)."""
    for pe, pm in zip(ema.parameters(), model.parameters()):
        pe.lerp_(pm, 1 - decay)
    for be, bm in zip(ema.buffers(), model.buffers()):
        be.copy_(bm)


def resolve_config(args, name, device):
    """The config of model ``name``: from its checkpoint on --resume, else from preset + flags."""
    overrides = C.overrides_from_args(args)
    preset = args.preset or ("paper" if device.type == "cuda" else "cpu")
    path = ckpt_path(args.out, name)
    if not args.resume:
        if os.path.exists(path) and not args.overwrite:
            raise UserError(f"{path} already exists; pass --resume to continue it, --overwrite to "
                            "start over, or --out for a new run")
        with config_errors():
            return C.make_config(args.dataset, preset, **overrides), preset, None
    if not os.path.exists(path):
        # A run cut off before this model started: begin it fresh, with the run's config.
        others = [n for n in C_NAMES if os.path.exists(ckpt_path(args.out, n))]
        if not others:
            raise UserError(f"--resume given but {args.out!r} holds no checkpoint; drop --resume "
                            "to start a new run, or point --out at an existing run")
        cfg, preset, _ = resolve_config_from(load_checkpoint(args.out, others[0]), args, overrides, path)
        return cfg, preset, None
    ck = load_checkpoint(args.out, name)
    cfg, preset, _ = resolve_config_from(ck, args, overrides, path)
    return cfg, preset, ck


def resolve_config_from(ck, args, overrides, path):
    """A checkpoint's config with the flags the user typed applied; shape-defining ones must agree."""
    cfg = C.from_dict(ck["config"])
    if args.preset and args.preset != ck["meta"]["preset"]:
        raise UserError(f"{path} was trained with --preset {ck['meta']['preset']}, not "
                        f"{args.preset}; drop --preset or use another --out")
    requested = dict(overrides, dataset=args.dataset)
    for group, keys in FROZEN.items():
        for k in keys:
            if k in requested and requested[k] != getattr(cfg[group], k):
                raise UserError(f"{path} was trained with {k}={getattr(cfg[group], k)!r} but "
                                f"{requested[k]!r} was requested; use another --out for a new run")
    for group, obj in cfg.items():  # the rest (steps, lr, save_every, ...) may change on resume
        for k, v in overrides.items():
            if hasattr(obj, k):
                setattr(obj, k, v)
    return cfg, ck["meta"]["preset"], None


@contextlib.contextmanager
def config_errors():
    """A config value the model or schedule rejects is bad input, not a crash: one line, exit 2."""
    try:
        yield
    except ValueError as e:
        raise UserError(f"{e} (check the flags you passed; see python train.py --help)") from None


def autocast(device):
    if device.type == "cuda":
        dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.autocast("cuda", dtype=dtype)
    return torch.autocast("cpu", enabled=False)  # fp32 on CPU


def progress(total, initial, desc):
    from tqdm import tqdm
    return tqdm(total=total, initial=initial, desc=desc, dynamic_ncols=True, mininterval=1.0)


def train_ddpm(args, device) -> str:
    cfg, preset, ck = resolve_config(args, "ddpm", device)
    tc = cfg["train"]
    torch.manual_seed(tc.seed)
    gen = torch.Generator().manual_seed(tc.seed)
    data = load_data(cfg["data"])
    with config_errors():
        diffusion = GaussianDiffusion.from_config(cfg["diffusion"])
        model = UNet.from_config(cfg["data"], cfg["unet"]).to(device)
    ema = copy.deepcopy(model).requires_grad_(False)
    opt = torch.optim.AdamW(model.parameters(), lr=tc.lr, weight_decay=0.0)
    step, elapsed = 0, 0.0
    if ck is not None:
        model.load_state_dict(ck["model"]), ema.load_state_dict(ck["ema"])
        opt.load_state_dict(ck["optimizer"])
        step, elapsed = ck["step"], ck["meta"].get("train_seconds", 0.0)
        set_rng_state(ck["rng"], gen)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"ddpm: {n_params / 1e6:.2f}M parameters, {len(data)} training images "
          f"{cfg['data'].image_size}x{cfg['data'].image_size}, preset {preset}, steps {step}->{tc.steps}")

    def save():
        save_atomic({"kind": "ddpm", "model": model.state_dict(), "ema": ema.state_dict(),
                     "optimizer": opt.state_dict(), "step": step, "rng": rng_state(gen),
                     "config": C.to_dict(cfg),
                     "meta": {"preset": preset, "train_seconds": elapsed, "params": n_params}},
                    ckpt_path(args.out, "ddpm"))

    bar = progress(tc.steps, step, "ddpm")
    t0, seen = time.time(), 0
    stop = min(tc.steps, args.stop_at or tc.steps)
    while step < stop:
        x0, _ = data.batch(tc.batch_size, gen)
        x0 = x0.to(device)
        t = torch.randint(0, diffusion.T, (x0.shape[0],), generator=gen).to(device)
        noise = torch.randn(x0.shape, generator=gen).to(device)
        for g in opt.param_groups:
            g["lr"] = lr_at(step, tc.lr, tc.warmup_steps, tc.steps)
        with autocast(device):
            loss = diffusion.training_loss(model, x0, t, noise)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), tc.grad_clip)
        opt.step()
        update_ema(ema, model, ema_decay_at(step, tc.ema_decay))
        step += 1
        seen += x0.shape[0]
        bar.update(1)
        bar.set_postfix(loss=f"{loss.item():.4f}", img_s=f"{seen / (time.time() - t0):.0f}")
        if step % tc.save_every == 0 or step == stop:
            elapsed += time.time() - t0
            t0, seen = time.time(), 0
            save()
    bar.close()
    path = ckpt_path(args.out, "ddpm")
    print(f"ddpm: wrote {path} (step {step}, {elapsed / 60:.1f} min of training)")
    if not args.no_grid and step == tc.steps:
        from sample import generate, save_grid
        x = generate(args.out, n=64, batch_size=64, seed=tc.seed, device=device)
        grid = os.path.join(args.out, "ddpm_samples.png")
        save_grid(x, grid, marks=cfg["data"].dataset == "circles", delta=cfg["data"].delta)
        print(f"ddpm: wrote {grid} (64 EMA samples, {cfg['diffusion'].sample_steps} steps)")
    return path


def train_classifier(args, device, spectral: bool) -> str:
    name = "classifier_sn" if spectral else "classifier"
    cfg, preset, ck = resolve_config(args, name, device)
    cc, tc = cfg["classifier"], cfg["train"]
    seed = tc.seed + (1000 if spectral else 0)
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    data = load_data(cfg["data"])
    with config_errors():
        diffusion = GaussianDiffusion.from_config(cfg["diffusion"])
        model = NoisyClassifier.from_config(cfg["data"], cc, spectral=spectral).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=cc.clf_lr, weight_decay=0.0)
    step, elapsed = 0, 0.0
    if ck is not None:
        model.load_state_dict(ck["model"]), opt.load_state_dict(ck["optimizer"])
        step, elapsed = ck["step"], ck["meta"].get("train_seconds", 0.0)
        set_rng_state(ck["rng"], gen)
    print(f"{name}: {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters, "
          f"steps {step}->{cc.clf_steps}" + (f", spectral norm x{cc.sn_scale}" if spectral else ""))

    def save(acc=None):
        save_atomic({"kind": "classifier", "spectral_norm": spectral, "model": model.state_dict(),
                     "optimizer": opt.state_dict(), "step": step, "rng": rng_state(gen),
                     "config": C.to_dict(cfg), "num_classes": model.num_classes,
                     "meta": {"preset": preset, "train_seconds": elapsed, "clean_accuracy": acc}},
                    ckpt_path(args.out, name))

    bar = progress(cc.clf_steps, step, name)
    t0 = time.time()
    model.train()
    while step < cc.clf_steps:
        x0, y = data.batch(cc.clf_batch_size, gen)
        for g in opt.param_groups:  # same warm-up + cosine decay as the DDPM: ends at a calm point
            g["lr"] = lr_at(step, cc.clf_lr, min(tc.warmup_steps, cc.clf_steps // 10), cc.clf_steps)
        # Noise-aware: train on x_t = q_sample(x_0, t) with t uniform over all T steps.
        t = torch.randint(0, diffusion.T, (x0.shape[0],), generator=gen)
        xt = diffusion.q_sample(x0, t, torch.randn(x0.shape, generator=gen))
        with autocast(device):
            logits = model(xt.to(device), t.to(device))
        loss = F.cross_entropy(logits.float(), y.to(device))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        step += 1
        bar.update(1)
        bar.set_postfix(loss=f"{loss.item():.3f}")
        if step % tc.save_every == 0 or step == cc.clf_steps:
            elapsed += time.time() - t0
            t0 = time.time()
            save()
    bar.close()
    model.eval()
    with torch.no_grad():  # accuracy on clean training images (t = 0)
        logits = model(data.x.to(device), torch.zeros(len(data), dtype=torch.long, device=device))
        acc = (logits.argmax(-1).cpu() == data.y).float().mean().item()
    save(acc)
    path = ckpt_path(args.out, name)
    print(f"{name}: wrote {path} (step {step}, {elapsed / 60:.1f} min, clean accuracy {acc:.3f})")
    return path


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", default="circles", help=f"one of {C.DATASETS}")
    p.add_argument("--model", default="all", choices=["ddpm", "classifier", "all"],
                   help="ddpm, the two classifiers (plain + spectral norm), or all")
    p.add_argument("--preset", choices=["cpu", "paper"], default=None,
                   help="default: paper on CUDA, cpu otherwise")
    p.add_argument("--out", default=None, help="run directory (default runs/<dataset>)")
    p.add_argument("--device", default=None, help="cuda | mps | cpu (default: best available)")
    p.add_argument("--resume", action="store_true", help="continue from the checkpoints in --out")
    p.add_argument("--overwrite", action="store_true", help="start over even if --out has checkpoints")
    p.add_argument("--no-grid", action="store_true", help="skip the final DDPM sample grid")
    p.add_argument("--stop-at", type=int, default=None,
                   help="checkpoint and stop at this step (the schedule still targets --steps); "
                        "continue later with --resume")
    C.add_config_args(p)
    return p


def main(argv=None):
    args = build_parser().parse_args(argv)
    if args.dataset not in C.DATASETS:
        raise UserError(f"unknown dataset {args.dataset!r}; choose one of {C.DATASETS}")
    args.out = args.out or os.path.join("runs", args.dataset)
    device = pick_device(args.device)
    ensure_writable_dir(args.out)
    print(f"device: {device} ({'fp32' if device.type != 'cuda' else 'autocast'}), run directory: {args.out}")
    if device.type == "cpu":
        torch.set_num_threads(os.cpu_count() or 1)
    names = {"ddpm": ["ddpm"], "classifier": ["classifier", "classifier_sn"]}.get(args.model, C_NAMES)
    existing = [ckpt_path(args.out, n) for n in names if os.path.exists(ckpt_path(args.out, n))]
    if existing and not (args.resume or args.overwrite):
        raise UserError(f"{', '.join(existing)} already exist(s); pass --resume to continue, "
                        "--overwrite to start over, or --out for a new run")
    t0 = time.time()
    if args.model in ("ddpm", "all"):
        train_ddpm(args, device)
    if args.model in ("classifier", "all"):
        train_classifier(args, device, spectral=False)
        train_classifier(args, device, spectral=True)
    print(f"done in {(time.time() - t0) / 60:.1f} min; outputs in {args.out}")


if __name__ == "__main__":
    cli(main)

"""Train the DDPM (§2.1, App. A, C) and the noise-aware guidance classifiers (§4.2, §5.5).

    python train.py --dataset circles                  # DDPM + classifier + spectral-norm twin
    python train.py --dataset circles --model ddpm     # one part only (ddpm|classifier|all)
    python train.py --dataset circles --resume         # continue from runs/circles/*.pt

Every model of a run is written to ``--out`` (default runs/<dataset>) as one checkpoint file
(model, EMA, optimizer, step, RNG state, full config), atomically, every ``--save-every`` steps
and at the end; on --resume a finished model is skipped (its file is not rewritten).

A run is one experiment: all its models see the same data and noise schedule. A model added to
an existing run (``--model classifier`` after ``--model ddpm``) therefore takes the data and
diffusion config from the checkpoint already there, not from the preset, and a resumed model
keeps its whole config: only how long it trains (``--steps``, ``--clf-steps``) and how often it
saves may change.

Each model logs loss, learning rate and images/s every ``--log-every`` steps to
``log_<model>.jsonl`` (the only point where the loop waits for the device) and ends with a
loss curve ``loss_<model>.png``; the DDPM also ends with a grid of 64 EMA samples.
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import json
import math
import os
import time
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

import config as C
from checkpoint import (UserError, cli, ckpt_path, ensure_writable_dir, load_checkpoint,
                        pick_device, rng_state, save_atomic, set_rng_state)
from classifier import NoisyClassifier
from diffusion import GaussianDiffusion
from unet import UNet

C_NAMES = ("ddpm", "classifier", "classifier_sn")
# Every model of a run sees the same images and the same noise schedule.
SHARED_GROUPS = ("data", "diffusion")
# The only fields a resumed model may change: everything else defines what the checkpoint is.
RESUMABLE = {"steps", "clf_steps", "save_every", "log_every"}


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


# ----------------------------------------------------------------------------------------------
# Config: preset + flags for a new run, the run's config for a model added to it, the
# checkpoint's config on --resume
# ----------------------------------------------------------------------------------------------


def resolve_config(args, name, device, pending=()):
    """(config, preset, checkpoint or None) of model ``name``. ``pending``: models this command
    will retrain after ``name`` (their old checkpoints do not define the run any more)."""
    path = ckpt_path(args.out, name)
    overrides = C.overrides_from_args(args)
    if args.resume and os.path.exists(path):
        ck = load_checkpoint(args.out, name)
        cfg, preset = C.from_dict(ck["config"]), ck["meta"]["preset"]
        _check_preset(args, preset, path)
        for k, v in overrides.items():
            group = next(g for g, obj in cfg.items() if hasattr(obj, k))
            if k not in RESUMABLE and v != getattr(cfg[group], k):
                raise UserError(f"{path} was trained with {k}={getattr(cfg[group], k)!r} but {v!r} was "
                                f"requested; a resumed model keeps its config (only --steps, --clf-steps, "
                                f"--save-every, --log-every may change): drop --{k.replace('_', '-')} "
                                f"or use another --out")
            setattr(cfg[group], k, v)
        return cfg, preset, ck
    anchor = next((n for n in C_NAMES if n != name and n not in pending
                   and os.path.exists(ckpt_path(args.out, n))), None)
    if anchor is None:
        if args.resume:
            raise UserError(f"--resume given but {args.out!r} holds no checkpoint; drop --resume "
                            "to start a new run, or point --out at an existing run")
        preset = args.preset or ("paper" if device.type == "cuda" else "cpu")
        with config_errors():
            return C.make_config(args.dataset, preset, **overrides), preset, None
    # A new model in an existing run: its data and diffusion config are the run's.
    ack = load_checkpoint(args.out, anchor)
    preset, run_cfg = ack["meta"]["preset"], C.from_dict(ack["config"])
    _check_preset(args, preset, ckpt_path(args.out, anchor))
    with config_errors():
        cfg = C.make_config(run_cfg["data"].dataset, preset, **overrides)
    for g in SHARED_GROUPS:
        for k, v in overrides.items():
            if hasattr(run_cfg[g], k) and v != getattr(run_cfg[g], k):
                raise UserError(f"{ckpt_path(args.out, anchor)} in this run was trained with "
                                f"{k}={getattr(run_cfg[g], k)!r}, not {v!r}; all models of a run share "
                                f"data and diffusion settings: drop --{k.replace('_', '-')}, retrain "
                                f"every model with --model all --overwrite, or use another --out")
        cfg[g] = run_cfg[g]
    return cfg, preset, None


def _check_preset(args, preset, path):
    if args.preset and args.preset != preset:
        raise UserError(f"{path} was trained with --preset {preset}, not {args.preset}; drop --preset "
                        "or use another --out")


@contextlib.contextmanager
def config_errors():
    """A config value the model or schedule rejects is bad input, not a crash: one line, exit 2."""
    try:
        yield
    except ValueError as e:
        raise UserError(f"{e} (check the flags you passed; see python train.py --help)") from None


# ----------------------------------------------------------------------------------------------
# Precision: fp32 on CPU/MPS; on CUDA bf16 autocast where the GPU has native bf16 (compute
# capability >= 8), otherwise fp16 autocast with a GradScaler (fp16 gradients underflow without
# loss scaling). torch.cuda.is_bf16_supported() also counts emulated bf16, hence the explicit test.
# ----------------------------------------------------------------------------------------------


def precision(device, allow_reduced: bool = True):
    """(autocast context factory, GradScaler or None, label) for training on ``device``."""
    if device.type != "cuda" or not allow_reduced:
        return contextlib.nullcontext, None, "fp32"
    if torch.cuda.get_device_capability(device)[0] >= 8:
        return (lambda: torch.autocast("cuda", dtype=torch.bfloat16)), None, "bf16 autocast"
    return (lambda: torch.autocast("cuda", dtype=torch.float16)), torch.amp.GradScaler("cuda"), \
        "fp16 autocast + GradScaler"


# ----------------------------------------------------------------------------------------------
# One training loop for every model kind
# ----------------------------------------------------------------------------------------------


@dataclass
class Job:
    """What differs between training a DDPM and a classifier; ``fit`` does the rest."""
    name: str                          # checkpoint name (ddpm, classifier, classifier_sn)
    kind: str                          # checkpoint kind (ddpm | classifier)
    model: torch.nn.Module
    batch_loss: Callable               # () -> scalar loss of one freshly drawn batch
    batch_size: int
    lr: float
    total: int                         # steps of the lr schedule
    warmup: int
    grad_clip: float | None
    generator: torch.Generator         # the job's data/noise randomness (saved for --resume)
    ema: torch.nn.Module | None = None
    ema_decay: float = 0.0
    mixed_precision: bool = True       # classifiers train in fp32 (App. C)
    extra: dict | None = None          # extra checkpoint entries (e.g. spectral_norm, num_classes)


def fit(job: Job, args, cfg, preset, ck, device) -> dict:
    """Train ``job.model`` to ``job.total`` steps (or --stop-at), saving, logging and resuming.
    Returns the last checkpoint dict's meta (step, seconds)."""
    tc = cfg["train"]
    path = ckpt_path(args.out, job.name)
    log_path = os.path.join(args.out, f"log_{job.name}.jsonl")
    autocast, scaler, prec = precision(device, job.mixed_precision)
    opt = torch.optim.AdamW(job.model.parameters(), lr=job.lr, weight_decay=0.0)
    step, elapsed = 0, 0.0
    if ck is not None:
        job.model.load_state_dict(ck["model"])
        if job.ema is not None:
            job.ema.load_state_dict(ck["ema"])
        opt.load_state_dict(ck["optimizer"])
        if scaler is not None and ck.get("scaler"):
            scaler.load_state_dict(ck["scaler"])
        step, elapsed = ck["step"], ck["meta"].get("train_seconds", 0.0)
        set_rng_state(ck["rng"], job.generator)
    n_params = sum(p.numel() for p in job.model.parameters())
    stop = min(job.total, args.stop_at or job.total)
    meta = {"preset": preset, "train_seconds": elapsed, "params": n_params, "precision": prec,
            "device": device.type, "torch": torch.__version__}
    if ck is not None and step >= job.total:
        print(f"{job.name}: already trained ({step} steps); skipping (raise --steps to continue)")
        return dict(ck["meta"], step=step, skipped=True)
    print(f"{job.name}: {n_params / 1e6:.2f}M parameters, steps {step}->{stop}"
          f"{f' of {job.total}' if stop < job.total else ''}, {prec}")
    _truncate_log(log_path, step)

    def save():
        obj = {"kind": job.kind, "model": job.model.state_dict(), "optimizer": opt.state_dict(),
               "step": step, "rng": rng_state(job.generator), "config": C.to_dict(cfg),
               "meta": dict(meta, train_seconds=elapsed), **(job.extra or {})}
        if job.ema is not None:
            obj["ema"] = job.ema.state_dict()
        if scaler is not None:
            obj["scaler"] = scaler.state_dict()
        save_atomic(obj, path)

    from tqdm import tqdm
    bar = tqdm(total=stop, initial=step, desc=job.name, dynamic_ncols=True, mininterval=1.0)
    job.model.train()
    t0 = t_log = time.time()
    running, n_run = torch.zeros((), device=device), 0
    while step < stop:
        lr = lr_at(step, job.lr, job.warmup, job.total)
        for g in opt.param_groups:
            g["lr"] = lr
        with autocast():
            loss = job.batch_loss()
        opt.zero_grad(set_to_none=True)
        if scaler is not None:
            scaler.scale(loss).backward()
            scaler.unscale_(opt)           # clip the true gradients, not the scaled ones
        else:
            loss.backward()
        if job.grad_clip:
            torch.nn.utils.clip_grad_norm_(job.model.parameters(), job.grad_clip)
        if scaler is not None:
            scaler.step(opt)
            scaler.update()
        else:
            opt.step()
        if job.ema is not None:
            update_ema(job.ema, job.model, ema_decay_at(step, job.ema_decay))
        step += 1
        running += loss.detach().float()
        n_run += 1
        bar.update(1)
        if step % tc.log_every == 0 or step == stop:
            now = time.time()
            rec = {"step": step, "loss": running.item() / n_run, "lr": lr,
                   "images_per_s": n_run * job.batch_size / max(now - t_log, 1e-9),
                   "elapsed_s": elapsed + now - t0}
            with open(log_path, "a") as f:
                f.write(json.dumps(rec) + "\n")
            bar.set_postfix(loss=f"{rec['loss']:.4f}", img_s=f"{rec['images_per_s']:.0f}")
            running.zero_()
            n_run, t_log = 0, now
        if step % tc.save_every == 0 or step == stop:
            elapsed += time.time() - t0
            t0 = time.time()
            save()
    bar.close()
    job.model.eval()
    plot_loss_curve(log_path, os.path.join(args.out, f"loss_{job.name}.png"), job.name)
    print(f"{job.name}: wrote {path} (step {step}, {elapsed / 60:.1f} min of training), "
          f"{log_path}, loss_{job.name}.png")
    return dict(meta, step=step, train_seconds=elapsed, skipped=False, save=save)


def _truncate_log(log_path, step):
    """On resume, drop log lines written after the checkpoint (a crash between log and save)."""
    if not os.path.exists(log_path):
        return
    with open(log_path) as f:
        keep = [ln for ln in f if ln.strip() and json.loads(ln)["step"] <= step]
    with open(log_path, "w") as f:
        f.writelines(keep)


def plot_loss_curve(log_path, png, title):
    if not os.path.exists(log_path):
        return
    with open(log_path) as f:
        recs = [json.loads(ln) for ln in f if ln.strip()]
    if not recs:
        return
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6, 3.2))
    ax.plot([r["step"] for r in recs], [r["loss"] for r in recs], lw=1.2)
    ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel("training loss (mean over log interval)")
    ax.set_title(title)
    ax2 = ax.twinx()
    ax2.plot([r["step"] for r in recs], [r["lr"] for r in recs], color="grey", lw=0.8, ls="--")
    ax2.set_ylabel("lr (dashed)")
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    plt.close(fig)


# ----------------------------------------------------------------------------------------------
# The two model kinds
# ----------------------------------------------------------------------------------------------


def train_ddpm(args, device, pending=()) -> str:
    cfg, preset, ck = resolve_config(args, "ddpm", device, pending)
    tc = cfg["train"]
    torch.manual_seed(tc.seed)
    gen = torch.Generator().manual_seed(tc.seed)
    data = load_data(cfg["data"])
    with config_errors():
        diffusion = GaussianDiffusion.from_config(cfg["diffusion"]).to(device)
        model = UNet.from_config(cfg["data"], cfg["unet"]).to(device)
    print(f"ddpm: {len(data)} training images {cfg['data'].image_size}x{cfg['data'].image_size}, "
          f"preset {preset}")

    def batch_loss():
        x0, _ = data.batch(tc.batch_size, gen)
        t = torch.randint(0, diffusion.T, (x0.shape[0],), generator=gen)
        noise = torch.randn(x0.shape, generator=gen)
        return diffusion.training_loss(model, x0.to(device), t.to(device), noise.to(device))

    job = Job("ddpm", "ddpm", model, batch_loss, tc.batch_size, tc.lr, tc.steps, tc.warmup_steps,
              tc.grad_clip, gen, ema=copy.deepcopy(model).requires_grad_(False), ema_decay=tc.ema_decay)
    res = fit(job, args, cfg, preset, ck, device)
    if not args.no_grid and not res["skipped"] and res["step"] == tc.steps:
        from sample import generate, save_grid
        x = generate(args.out, n=64, batch_size=64, seed=tc.seed, device=device)
        grid = os.path.join(args.out, "ddpm_samples.png")
        save_grid(x, grid, marks=cfg["data"].dataset == "circles", delta=cfg["data"].delta)
        print(f"ddpm: wrote {grid} (64 EMA samples, {cfg['diffusion'].sample_steps} steps)")
    return ckpt_path(args.out, "ddpm")


def train_classifier(args, device, spectral: bool, pending=()) -> str:
    name = "classifier_sn" if spectral else "classifier"
    cfg, preset, ck = resolve_config(args, name, device, pending)
    cc, tc = cfg["classifier"], cfg["train"]
    seed = tc.seed + (1000 if spectral else 0)
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    data = load_data(cfg["data"])
    with config_errors():
        diffusion = GaussianDiffusion.from_config(cfg["diffusion"])  # q_sample on the CPU batch
        model = NoisyClassifier.from_config(cfg["data"], cc, spectral=spectral).to(device)

    def batch_loss():
        x0, y = data.batch(cc.clf_batch_size, gen)
        # Noise-aware: train on x_t = q_sample(x_0, t) with t uniform over all T steps.
        t = torch.randint(0, diffusion.T, (x0.shape[0],), generator=gen)
        xt = diffusion.q_sample(x0, t, torch.randn(x0.shape, generator=gen))
        return F.cross_entropy(model(xt.to(device), t.to(device)), y.to(device))

    # Same warm-up + cosine decay as the DDPM: with a constant rate, which snapshot training
    # stopped at decided whether 1 % or 20 % of guided samples faded (README).
    job = Job(name, "classifier", model, batch_loss, cc.clf_batch_size, cc.clf_lr, cc.clf_steps,
              min(tc.warmup_steps, cc.clf_steps // 10), None, gen, mixed_precision=False,
              extra={"spectral_norm": spectral, "num_classes": model.num_classes})
    if spectral:
        print(f"{name}: spectral norm, every layer scaled to {cc.sn_scale}")
    res = fit(job, args, cfg, preset, ck, device)
    if not res["skipped"] and res["step"] == cc.clf_steps:
        with torch.no_grad():  # accuracy on clean training images (t = 0)
            logits = model(data.x.to(device), torch.zeros(len(data), dtype=torch.long, device=device))
            acc = (logits.argmax(-1).cpu() == data.y).float().mean().item()
        job.extra["clean_accuracy"] = acc
        res["save"]()
        print(f"{name}: clean accuracy {acc:.3f} on the training images")
    return ckpt_path(args.out, name)


# ----------------------------------------------------------------------------------------------
# CLI
# ----------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", default=None, help=f"one of {C.DATASETS} (default: the run's, else circles)")
    p.add_argument("--model", default="all", choices=["ddpm", "classifier", "all"],
                   help="ddpm, the two classifiers (plain + spectral norm), or all")
    p.add_argument("--preset", choices=["cpu", "paper"], default=None,
                   help="default: the run's; for a new run paper on CUDA, cpu otherwise")
    p.add_argument("--out", default=None, help="run directory (default runs/<dataset>)")
    p.add_argument("--device", default=None, help="cuda | cuda:N | mps | cpu (default: best available)")
    p.add_argument("--resume", action="store_true", help="continue from the checkpoints in --out")
    p.add_argument("--overwrite", action="store_true", help="start over even if --out has checkpoints")
    p.add_argument("--no-grid", action="store_true", help="skip the final DDPM sample grid")
    p.add_argument("--stop-at", type=int, default=None,
                   help="checkpoint and stop at this step (the schedule still targets --steps); "
                        "continue later with --resume")
    C.add_config_args(p)
    return p


def run_dataset(out: str | None, dataset: str | None) -> str:
    """--dataset as typed, else the dataset of the run in --out, else circles."""
    if out:
        for n in C_NAMES:
            if os.path.exists(ckpt_path(out, n)):
                run_ds = load_checkpoint(out, n)["config"]["data"]["dataset"]
                if dataset and dataset != run_ds:
                    raise UserError(f"{out!r} is a {run_ds} run, not {dataset}; drop --dataset or use "
                                    "another --out")
                return run_ds
    return dataset or "circles"


def main(argv=None):
    args = build_parser().parse_args(argv)
    if args.dataset is not None and args.dataset not in C.DATASETS:
        raise UserError(f"unknown dataset {args.dataset!r}; choose one of {C.DATASETS}")
    if args.stop_at is not None and args.stop_at < 1:
        raise UserError("--stop-at must be a positive step number")
    args.dataset = run_dataset(args.out, args.dataset)
    args.out = args.out or os.path.join("runs", args.dataset)
    device = pick_device(args.device)
    ensure_writable_dir(args.out)
    print(f"device: {device} ({'fp32' if device.type != 'cuda' else 'autocast'}), run directory: {args.out}")
    names = {"ddpm": ["ddpm"], "classifier": ["classifier", "classifier_sn"]}.get(args.model, list(C_NAMES))
    existing = [ckpt_path(args.out, n) for n in names if os.path.exists(ckpt_path(args.out, n))]
    if existing and not (args.resume or args.overwrite):
        raise UserError(f"{', '.join(existing)} already exist(s); pass --resume to continue, "
                        "--overwrite to start over, or --out for a new run")
    # With --overwrite, the old checkpoints of models retrained later in this command do not
    # define the run's config any more.
    pending = lambda n: names[names.index(n) + 1:] if args.overwrite else []
    t0 = time.time()
    if "ddpm" in names:
        train_ddpm(args, device, pending("ddpm"))
    if "classifier" in names:
        train_classifier(args, device, spectral=False, pending=pending("classifier"))
        train_classifier(args, device, spectral=True, pending=pending("classifier_sn"))
    print(f"done in {(time.time() - t0) / 60:.1f} min; outputs in {args.out}")


if __name__ == "__main__":
    cli(main)

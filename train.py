"""Train the DDPM (§2.1, App. A, C) and the noise-aware guidance classifiers (§4.2, §5.5).

    python train.py --dataset circles                  # DDPM + classifier + spectral-norm twin
    python train.py --dataset circles --model ddpm     # one part only (ddpm|classifier|all)
    python train.py --dataset circles --resume         # continue from runs/circles/*.pt

Every model of a run is written to ``--out`` (default runs/<dataset>) as one checkpoint file
(model, EMA, optimizer, step, RNG state, full config), atomically, every ``--save-every`` steps
and at the end; on --resume a finished model is skipped (its file is not rewritten). One
train.py per run directory: a second one on the same --out refuses (rundir.run_lock).

A run is one experiment: all its models see the same data and noise schedule. A model added to
an existing run (``--model classifier`` after ``--model ddpm``) therefore takes the data and
diffusion config from the checkpoint already there, not from the preset, and a resumed model
keeps its whole config: only how long it trains (``--steps``, ``--clf-steps``) and how often it
saves may change.

Each model logs loss, learning rate and images/s every ``--log-every`` steps to
``log_<model>.jsonl`` (the only point where the loop waits for the device) and ends with a
loss curve ``loss_<model>.png``; the DDPM also ends with a grid of 64 EMA samples.

CelebA (§5): ``--dataset celeba --data-dir DIR --attribute Smiling --index-list FILE`` trains on
the images of the train split that ``data_filter.py`` kept (its index.txt); two attributes
(``--attribute Smiling,Black_Hair``, §6) give the classifiers the four corner classes;
``--attribute Blond_Hair/Black_Hair`` is blond against black hair (§5.4, brown faces left out).

Classifier-free guidance (App. J): ``--class-cond`` trains the DDPM on the labels too, each replaced
by the null label with probability ``--label-dropout`` (0.1); sample it with ``--guidance cfg``.

Several processes: ``torchrun --nproc_per_node=N train.py ...`` (DDP, see trainer.py).
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import os
import time

import torch
import torch.nn.functional as F

import config as C
from checkpoint import UserError, cli, ckpt_path, ensure_writable_dir, load_checkpoint
from rundir import remove_stale_temps, run_lock
from classifier import NoisyClassifier
from diffusion import GaussianDiffusion
from trainer import (Dist, Job, Shard, close_distributed, finish_model, fit, init_distributed,
                     per_rank)
from models import ARCHS, build_model, check_arch_flags, label_classes
from classifier_free import check_label_dropout, drop_labels

C_NAMES = ("ddpm", "classifier", "classifier_sn")
# Every model of a run sees the same images and the same noise schedule.
SHARED_GROUPS = ("data", "diffusion")
# The only fields a resumed model may change: everything else defines what the checkpoint is.
# Where the data lies (not what it is) may change too: a moved CelebA folder is the same data.
RESUMABLE = {"steps", "clf_steps", "save_every", "log_every"}
LOCATION = {"data_dir", "cache_dir"}


def load_data(dcfg, dist: Dist = Dist(), wrap=None):
    """The training set of a run's data config, as this rank's shard under DDP. ``wrap(data)``
    replaces the whole set before sharding (e.g. lab/synthetic_property's overlaid images)."""
    if dcfg.dataset == "circles":
        from toy_circles import CirclesData
        data = CirclesData(dcfg.image_size, dcfg.delta, dcfg.flip, dcfg.channels, bands=dcfg.bands)
    elif dcfg.dataset == "celeba":
        from celeba import CelebAData
        if not dcfg.data_dir:
            raise UserError("--dataset celeba needs --data-dir DIR, the folder holding img_align_celeba/, "
                            "list_attr_celeba.txt and list_eval_partition.txt (or python toy_faces.py "
                            "--out DIR for the stand-in)")
        data = CelebAData(dcfg.data_dir, dcfg.image_size, dcfg.attribute, "train",
                          dcfg.index_list or None, dcfg.flip, dcfg.cache_dir or None,
                          progress=dist.main)
        if data.labels.ndim == 2:  # several attributes: the classifiers learn the corners (§6)
            from attributes import corner_classes
            data.labels = corner_classes(data.labels)
    else:
        raise UserError(f"unknown dataset {dcfg.dataset!r}; choose one of {C.DATASETS}")
    data = wrap(data) if wrap else data
    return data if dist.world == 1 else Shard(data, dist.rank, dist.world)


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
            if k not in RESUMABLE | LOCATION and v != getattr(cfg[group], k):
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
        # The same small experiment on every device; the paper's sizes only when asked for.
        preset = args.preset or "cpu"
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
            if hasattr(run_cfg[g], k) and k not in LOCATION and v != getattr(run_cfg[g], k):
                raise UserError(f"{ckpt_path(args.out, anchor)} in this run was trained with "
                                f"{k}={getattr(run_cfg[g], k)!r}, not {v!r}; all models of a run share "
                                f"data and diffusion settings: drop --{k.replace('_', '-')}, retrain "
                                f"every model with --model all --overwrite, or use another --out")
        cfg[g] = run_cfg[g]
        for k in LOCATION & overrides.keys() & vars(cfg[g]).keys():
            setattr(cfg[g], k, overrides[k])
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
# The two model kinds
# ----------------------------------------------------------------------------------------------


def train_ddpm(args, device, dist: Dist, pending=()) -> str:
    cfg, preset, ck = resolve_config(args, "ddpm", device, pending)
    tc = cfg["train"]
    check_label_dropout(cfg["unet"].class_cond, tc.label_dropout,
                        typed="label_dropout" in C.overrides_from_args(args))
    torch.manual_seed(tc.seed)                      # same initial weights on every rank
    gen = torch.Generator().manual_seed(tc.seed + 7919 * dist.rank)   # own data/noise per rank
    with config_errors():  # before the data: a bad network config fails fast
        check_arch_flags(cfg["unet"].arch, C.overrides_from_args(args))
        diffusion = GaussianDiffusion.from_config(cfg["diffusion"]).to(device)
        model = build_model(cfg).to(device)
        if args.model == "all":  # the classifiers come next on the same images: fail now, not after
            with torch.random.fork_rng(devices=[]):  # a check only: the DDPM's randomness is unchanged
                NoisyClassifier.from_config(cfg["data"], cfg["classifier"], C.num_classes_of(cfg["data"]))
    data = load_data(cfg["data"], dist)
    bs = per_rank(tc.batch_size, dist)
    if dist.main:
        print(f"ddpm: {len(data) * dist.world} training images {cfg['data'].image_size}x"
              f"{cfg['data'].image_size}, preset {preset}")

    # Class-conditional (App. J): the labels, each dropped to the null label with probability
    # label_dropout. An unconditional run draws nothing more, so its random stream is unchanged.
    classes = label_classes(cfg)

    def batch_loss(net):
        x0, y = data.batch(bs, gen)
        t = torch.randint(0, diffusion.T, (x0.shape[0],), generator=gen)
        noise = torch.randn(x0.shape, generator=gen)
        if classes:
            y = drop_labels(y, tc.label_dropout, classes, gen).to(device)
        # Under DDP ``net`` is the wrapper (not .module), so the gradients are synchronised.
        model_fn = (lambda x, tt: net(x, tt, y)) if classes else net
        return diffusion.training_loss(model_fn, x0.to(device), t.to(device), noise.to(device))

    job = Job("ddpm", "ddpm", model, batch_loss, tc.batch_size, tc.lr, tc.steps, tc.warmup_steps,
              tc.grad_clip, gen, ema=copy.deepcopy(model).requires_grad_(False), ema_decay=tc.ema_decay)
    res = fit(job, args, cfg, preset, ck, device, dist)
    if dist.main and not args.no_grid and not res["skipped"] and res["step"] == tc.steps:
        from sample import generate, save_grid
        x = generate(args.out, n=64, batch_size=64, seed=tc.seed, device=device)
        grid = os.path.join(args.out, "ddpm_samples.png")
        save_grid(x, grid, marks=cfg["data"].dataset == "circles", delta=cfg["data"].delta,
                  edges=_edges(cfg["data"]))
        print(f"ddpm: wrote {grid} (64 EMA samples, {cfg['diffusion'].sample_steps} steps)")
    finish_model(job, dist)
    return ckpt_path(args.out, "ddpm")


def train_classifier(args, device, dist: Dist, spectral: bool, pending=(), wrap=None) -> str:
    """``wrap``: see ``load_data`` (images and labels other than the run's, same config)."""
    name = "classifier_sn" if spectral else "classifier"
    cfg, preset, ck = resolve_config(args, name, device, pending)
    cc, tc = cfg["classifier"], cfg["train"]
    seed = tc.seed + (1000 if spectral else 0)
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed + 7919 * dist.rank)
    data = load_data(cfg["data"], dist, wrap)
    bs = per_rank(cc.clf_batch_size, dist)
    with config_errors():
        diffusion = GaussianDiffusion.from_config(cfg["diffusion"])  # q_sample on the CPU batch
        model = NoisyClassifier.from_config(cfg["data"], cc, C.num_classes_of(cfg["data"]),
                                            spectral=spectral).to(device)

    def batch_loss(net):
        x0, y = data.batch(bs, gen)
        # Noise-aware: train on x_t = q_sample(x_0, t) with t uniform over all T steps.
        t = torch.randint(0, diffusion.T, (x0.shape[0],), generator=gen)
        xt = diffusion.q_sample(x0, t, torch.randn(x0.shape, generator=gen))
        return F.cross_entropy(net(xt.to(device), t.to(device)), y.to(device))

    # Same warm-up + cosine decay as the DDPM: with a constant rate the guided samples depend on
    # which snapshot training happened to stop at.
    job = Job(name, "classifier", model, batch_loss, cc.clf_batch_size, cc.clf_lr, cc.clf_steps,
              min(tc.warmup_steps, cc.clf_steps // 10), None, gen, mixed_precision=False,
              extra={"spectral_norm": spectral, "num_classes": model.num_classes})
    if spectral and dist.main:
        print(f"{name}: spectral norm, every layer scaled to {cc.sn_scale}")
    res = fit(job, args, cfg, preset, ck, device, dist)
    if dist.main and not res["skipped"] and res["step"] == cc.clf_steps:
        x, y = clean_set(data)
        with torch.no_grad():  # accuracy on clean training images (t = 0)
            pred = torch.cat([model(xb.to(device), torch.zeros(len(xb), dtype=torch.long, device=device))
                              .argmax(-1).cpu() for xb in x.split(512)])
        acc = (pred == y).float().mean().item()
        job.extra["clean_accuracy"] = acc
        res["save"]()
        print(f"{name}: clean accuracy {acc:.3f} on {len(y)} training images")
    finish_model(job, dist)
    return ckpt_path(args.out, name)


def _edges(dcfg):
    """z of the training region's edges (green lines of the grid): the delta bands or --bands."""
    from toy_circles import training_edges
    return training_edges(dcfg.bands, dcfg.delta) if dcfg.dataset == "circles" else None


def clean_set(data, limit: int = 4096):
    """Up to ``limit`` training images without augmentation, with their labels."""
    base = data.data if isinstance(data, Shard) else data
    return base.take(torch.arange(min(limit, len(base))), None)


# ----------------------------------------------------------------------------------------------
# CLI
# ----------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", default=None, help=f"one of {C.DATASETS} (default: the run's, else circles)")
    p.add_argument("--model", default="all", choices=["ddpm", "classifier", "all"],
                   help="ddpm, the two classifiers (plain + spectral norm), or all")
    p.add_argument("--preset", choices=C.PRESET_NAMES, default=None,
                   help="default: the run's; for a new run cpu on every device (paper: the authors' "
                        "sizes, for a GPU)")
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
    if args.preset and (args.dataset, args.preset) not in C.PRESETS:   # before any folder is made
        raise UserError(f"--preset {args.preset} does not exist for {args.dataset}; choose from "
                        f"{', '.join(p for d, p in C.PRESETS if d == args.dataset)}")
    if args.arch is not None and args.arch not in ARCHS:
        raise UserError(f"unknown --arch {args.arch!r}; use one of {', '.join(ARCHS)}")
    if args.attribute and args.dataset != "celeba":
        raise UserError(f"--attribute is a CelebA option but the dataset is {args.dataset}; drop "
                        "--attribute or use --dataset celeba")
    if args.bands is not None:
        if args.dataset != "circles":
            raise UserError(f"--bands is a circles option but the dataset is {args.dataset}; drop --bands")
        from toy_circles import parse_bands
        parse_bands(args.bands)  # an unknown band is a one-line error before any folder is made
    dist, device = init_distributed(args.device)
    try:
        _train(args, device, dist)
    finally:
        close_distributed()


def _train(args, device, dist: Dist):
    ensure_writable_dir(args.out)
    # One writer per run directory: rank 0 holds the lock (the other ranks never write).
    with run_lock(args.out) if dist.main else contextlib.nullcontext():
        if dist.main:
            remove_stale_temps(args.out)
        _train_locked(args, device, dist)


def _train_locked(args, device, dist: Dist):
    if dist.main:
        print(f"device: {device} ({'fp32' if device.type != 'cuda' else 'autocast'}), "
              f"{f'{dist.world} processes, ' if dist.world > 1 else ''}run directory: {args.out}")
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
        train_ddpm(args, device, dist, pending("ddpm"))
    if "classifier" in names:
        train_classifier(args, device, dist, spectral=False, pending=pending("classifier"))
        train_classifier(args, device, dist, spectral=True, pending=pending("classifier_sn"))
    if dist.main:
        print(f"done in {(time.time() - t0) / 60:.1f} min; outputs in {args.out}")


if __name__ == "__main__":
    cli(main)

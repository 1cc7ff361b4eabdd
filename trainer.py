"""The training loop shared by the DDPM and the classifiers (App. C), single process or DDP.

``fit(job, ...)`` trains one model to its step budget: lr warm-up + cosine decay, EMA, mixed
precision on CUDA, gradient clipping, a JSON-lines log every ``log_every`` steps with a loss
curve at the end, atomic checkpoints every ``save_every`` steps and bit-exact ``--resume``.
What differs between a DDPM and a classifier is only the ``Job`` (its model and batch loss).

Divergence: at every log point the mean loss, and at every save point the weights (and EMA), must
be finite; otherwise training stops with one line naming the step, before anything is logged or
saved, so the last good checkpoint on disk stays as it was (under DDP all ranks decide together).

Multi-process training (``torchrun --nproc_per_node=N train.py ...``): when ``RANK`` is set,
``init_distributed`` starts one process group (NCCL on CUDA, gloo on CPU), each rank takes its
own device (``LOCAL_RANK``), its own disjoint data shard (``Shard``) and its own data/noise seed,
and the model is wrapped in DistributedDataParallel so gradients are averaged over ranks; the
global batch (``--batch-size``) is split evenly between ranks. Every rank keeps identical
weights (same init, same averaged gradients, same EMA update); only rank 0 writes checkpoints,
logs and figures. Without ``RANK`` nothing of this runs.
"""
from __future__ import annotations

import contextlib
import gc
import json
import math
import os
import time
from dataclasses import dataclass
from typing import Callable

import torch

import config as C
from checkpoint import (UserError, ckpt_path, load_weights, nonfinite, pick_device, rng_state,
                        save_checkpoint, set_rng_state, versions, write_bytes_atomic)
from rundir import read_jsonl


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
# Distributed data parallel (torchrun)
# ----------------------------------------------------------------------------------------------


@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0


def init_distributed(device_name: str | None):
    """(Dist, device). A process group only when launched by torchrun (``RANK`` set)."""
    if "RANK" not in os.environ:
        return Dist(), pick_device(device_name)
    import torch.distributed as dist
    d = Dist(int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ.get("LOCAL_RANK", 0)))
    if device_name and device_name != "cpu" and not device_name.startswith("cuda"):
        raise UserError(f"--device {device_name} cannot be used with torchrun; use cuda or cpu")
    use_cuda = torch.cuda.is_available() and device_name != "cpu"
    device = pick_device(f"cuda:{d.local_rank}" if use_cuda else "cpu")
    if use_cuda:
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if use_cuda else "gloo")
    return d, device


def close_distributed() -> None:
    """Tear the process group down. The DDP wrappers must be gone first (``fit`` deletes its
    own): on gloo, destroying the group while a DDP reducer is alive aborts the process at exit
    in ~40 % of runs, hence the collection before the barrier."""
    import torch.distributed as dist
    if not dist.is_initialized():
        return
    gc.collect()
    dist.barrier()
    dist.destroy_process_group()


def shard_indices(n: int, rank: int, world: int) -> torch.Tensor:
    """Rank ``rank``'s share of ``range(n)``: every index on exactly one rank (strided, so each
    shard sees both classes of a sorted dataset)."""
    return torch.arange(rank, n, world)


def finish_model(job, dist: Dist) -> None:
    """After a model: wait until rank 0 has written its checkpoint (the next model of the run
    reads it), then print each rank's weight checksum - identical weights are what DDP promises."""
    if dist.world == 1:
        return
    import torch.distributed as tdist
    tdist.barrier()
    with torch.no_grad():
        s = sum(p.double().sum().item() for p in job.model.parameters())
    print(f"[rank {dist.rank}] {job.name} weight checksum {s:.10e}", flush=True)


def per_rank(batch_size: int, dist: Dist) -> int:
    """The batch one rank draws: the global batch split evenly (App. C's batch is global)."""
    if batch_size % dist.world:
        raise UserError(f"batch size {batch_size} is not divisible by {dist.world} processes; "
                        f"pick a multiple of {dist.world}")
    return batch_size // dist.world


class Shard:
    """A dataset restricted to one rank's indices; batches are drawn (with replacement) from it."""

    def __init__(self, data, rank: int, world: int):
        self.data, self.index = data, shard_indices(len(data), rank, world)
        if len(self.index) == 0:
            raise UserError(f"{len(data)} training images cannot be shared by {world} ranks; "
                            "use fewer processes")

    def __len__(self):
        return len(self.index)

    def batch(self, n: int, generator: torch.Generator):
        pick = torch.randint(0, len(self.index), (n,), generator=generator)
        return self.data.take(self.index[pick], generator)


# ----------------------------------------------------------------------------------------------
# One training loop for every model kind
# ----------------------------------------------------------------------------------------------


@dataclass
class Job:
    """What differs between training a DDPM and a classifier; ``fit`` does the rest."""
    name: str                          # checkpoint name (ddpm, classifier, classifier_sn)
    kind: str                          # checkpoint kind (ddpm | classifier)
    model: torch.nn.Module
    batch_loss: Callable               # (net) -> scalar loss of one freshly drawn batch through net
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


def fit(job: Job, args, cfg, preset, ck, device, dist: Dist = Dist()) -> dict:
    """Train ``job.model`` to ``job.total`` steps (or --stop-at), saving, logging and resuming.
    ``job.batch_size`` is the global batch: under DDP each rank draws batch_size / world.
    Returns the last checkpoint dict's meta (step, seconds) and a ``save`` function."""
    tc = cfg["train"]
    path = ckpt_path(args.out, job.name)
    log_path = os.path.join(args.out, f"log_{job.name}.jsonl")
    autocast, scaler, prec = precision(device, job.mixed_precision)
    opt = torch.optim.AdamW(job.model.parameters(), lr=job.lr, weight_decay=0.0)
    step, elapsed = 0, 0.0
    if ck is not None:
        load_weights(job.model, ck["model"], path, ck)
        if job.ema is not None:
            load_weights(job.ema, ck.get("ema"), path, ck)
        opt.load_state_dict(ck["optimizer"])
        if scaler is not None and ck.get("scaler"):
            scaler.load_state_dict(ck["scaler"])
        step, elapsed = ck["step"], ck["meta"].get("train_seconds", 0.0)
        set_rng_state(ck["rng"], job.generator)   # rank 0's stream (only rank 0 saves)
        if dist.rank > 0:
            # Other ranks derive their own stream from it: distinct data per rank, and still
            # deterministic (a DDP resume is reproducible, if not identical to an unbroken run).
            seed = int(torch.randint(0, 2 ** 62, (1,), generator=job.generator)) + dist.rank
            job.generator.manual_seed(seed)
    n_params = sum(p.numel() for p in job.model.parameters())
    stop = min(job.total, args.stop_at or job.total)
    meta = {"preset": preset, "train_seconds": elapsed, "params": n_params, "precision": prec,
            "device": device.type, **versions()}
    say = print if dist.main else (lambda *a, **k: None)
    if ck is not None and step >= job.total:
        say(f"{job.name}: already trained ({step} steps); skipping (raise --steps to continue)")
        return dict(ck["meta"], step=step, skipped=True)
    say(f"{job.name}: {n_params / 1e6:.2f}M parameters, steps {step}->{stop}"
        f"{f' of {job.total}' if stop < job.total else ''}, {prec}"
        f"{f', {dist.world} ranks' if dist.world > 1 else ''}")
    if dist.main:
        _truncate_log(log_path, step)
    net = job.model
    if dist.world > 1:
        from torch.nn.parallel import DistributedDataParallel as DDP
        net = DDP(job.model, device_ids=[device.index] if device.type == "cuda" else None)

    def save():
        if not dist.main:
            return
        obj = {"kind": job.kind, "model": job.model.state_dict(), "optimizer": opt.state_dict(),
               "step": step, "rng": rng_state(job.generator), "config": C.to_dict(cfg),
               "meta": dict(meta, train_seconds=elapsed), **(job.extra or {})}
        if job.ema is not None:
            obj["ema"] = job.ema.state_dict()
        if scaler is not None:
            obj["scaler"] = scaler.state_dict()
        save_checkpoint(obj, path)
        saved[0] = step

    saved = [ck["step"] if ck is not None else None]   # the step of the checkpoint on disk
    logged = [step]                                     # the last step whose loss was finite

    def stop_if_diverged(bad: bool, what: str) -> None:
        """Raise on every rank when any rank found a NaN / inf (see module doc)."""
        if dist.world > 1:
            import torch.distributed as tdist
            flag = torch.tensor([float(bad)], device=device)
            tdist.all_reduce(flag, op=tdist.ReduceOp.MAX)
            bad = bool(flag.item())
        if not bad:
            return
        kept = (f"the last checkpoint, {path} (step {saved[0]}), is untouched" if saved[0] is not None
                else "no checkpoint was written")
        flag = "--lr" if job.kind == "ddpm" else "--clf-lr"
        raise UserError(f"{job.name}: training diverged: {what} at step {step}"
                        f"{f' (finite at step {logged[0]})' if logged[0] else ''}; {kept}; lower {flag} "
                        f"(now {job.lr:g}) and train again with --overwrite")

    from tqdm import tqdm
    bar = tqdm(total=stop, initial=step, desc=job.name, dynamic_ncols=True, mininterval=1.0,
               disable=not dist.main)
    job.model.train()
    t0 = t_log = time.time()
    running, n_run = torch.zeros((), device=device), 0
    while step < stop:
        lr = lr_at(step, job.lr, job.warmup, job.total)
        for g in opt.param_groups:
            g["lr"] = lr
        with autocast():
            loss = job.batch_loss(net)
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
            stop_if_diverged(not bool(torch.isfinite(running)), "the loss is not finite")
            logged[0] = step
        if dist.main and (step % tc.log_every == 0 or step == stop):
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
            bad = nonfinite(model=job.model, ema=job.ema)
            stop_if_diverged(bool(bad), f"{len(bad)} weight tensor(s) hold NaN or inf"
                             + (f" (e.g. {bad[0]})" if bad else ""))
            elapsed += time.time() - t0
            t0 = time.time()
            save()
    bar.close()
    job.model.eval()
    del net  # the DDP wrapper (see close_distributed)
    if dist.main:
        plot_loss_curve(log_path, os.path.join(args.out, f"loss_{job.name}.png"), job.name)
    say(f"{job.name}: wrote {path} (step {step}, {elapsed / 60:.1f} min of training), "
          f"{log_path}, loss_{job.name}.png")
    return dict(meta, step=step, train_seconds=elapsed, skipped=False, save=save)


def _truncate_log(log_path, step):
    """On resume, drop log lines written after the checkpoint (a crash between log and save), and
    a line cut off by a crash mid-append; rewritten atomically."""
    if not os.path.exists(log_path):
        return
    recs, bad = read_jsonl(log_path)
    if bad:
        print(f"note: dropped {bad} unreadable line(s) of {log_path} (cut off by an interrupted run)")
    keep = [r for r in recs if isinstance(r, dict) and r.get("step", step + 1) <= step]
    write_bytes_atomic(log_path, "".join(json.dumps(r) + "\n" for r in keep).encode())


def plot_loss_curve(log_path, png, title):
    recs = [r for r in read_jsonl(log_path)[0] if isinstance(r, dict) and {"step", "loss", "lr"} <= r.keys()]
    if not recs:
        return
    from figures import pyplot, save
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6, 3.2))
    ax.plot([r["step"] for r in recs], [r["loss"] for r in recs], lw=1.2)
    ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel("training loss (mean over log interval)")
    ax.set_title(title)
    ax2 = ax.twinx()
    ax2.plot([r["step"] for r in recs], [r["lr"] for r in recs], color="grey", lw=0.8, ls="--")
    ax2.set_ylabel("lr (dashed)")
    save(fig, png, dpi=110, tight=True)

"""A short check of the GPU path of the `paper` presets (App. C's sizes), for a machine with CUDA.

    python bench/gpu_check.py [--out /tmp/gpu_check] [--steps 4] [--keep]

Stages, each printed with its wall time and peak GPU memory (torch.cuda.max_memory_allocated):
  1. circles, --preset paper: the DDPM (bf16 autocast where the GPU has it, else fp16 + GradScaler)
     and both classifiers for --steps steps (--stop-at: the schedules keep the preset's lengths);
  2. a checkpoint / resume round trip: --resume for --steps more steps, checking the step counts;
  3. one guided sampling step: multi-guidance (lambda 30, 30), 2 respaced steps, 8 samples;
  4. CelebA, --preset paper, on a 40-face toy_faces stand-in written here (64 px, the 121 M UNet,
     batch 128 as in the preset);
  5. torchrun with every GPU present (nproc = torch.cuda.device_count()), circles paper DDPM,
     global batch 64 (rounded to a multiple of the GPUs); its peak memory is per process, not
     visible from here ("-"), the ranks' weight checksums must agree.
Without CUDA it prints one line saying it skipped, and exits 0.
"""
from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import torch  # noqa: E402


def stage(name: str, fn):
    """Run ``fn``; print its wall time and the peak GPU memory it reached."""
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    t0 = time.time()
    result = fn()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() / 2 ** 30
    print(f"[gpu_check] {name:<44} {time.time() - t0:8.1f} s   peak {peak:6.2f} GiB", flush=True)
    return result


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=None, help="working folder (default: a temp folder, removed at the end)")
    p.add_argument("--steps", type=int, default=4, help="training steps per model and stage")
    p.add_argument("--keep", action="store_true", help="keep the working folder")
    a = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("gpu_check: skipped, CUDA is not available on this machine (run it where a GPU is)")
        return 0
    import train
    from checkpoint import load_checkpoint
    from sample import generate
    from trainer import precision

    work = a.out or tempfile.mkdtemp(prefix="gpu_check-")
    os.makedirs(work, exist_ok=True)
    n = a.steps
    dev = torch.device("cuda")
    print(f"[gpu_check] {torch.cuda.get_device_name(dev)}, {torch.cuda.device_count()} GPU(s), "
          f"torch {torch.__version__}, DDPM precision: {precision(dev)[2]}", flush=True)
    circles = os.path.join(work, "circles")
    common = ["--preset", "paper", "--no-grid", "--device", "cuda"]
    try:
        stage("circles paper: DDPM + 2 classifiers", lambda: train.main(
            ["--dataset", "circles", "--out", circles, "--stop-at", str(n)] + common))
        stage("circles paper: checkpoint/resume round trip", lambda: train.main(
            ["--dataset", "circles", "--out", circles, "--resume", "--stop-at", str(2 * n)] + common))
        for name in ("ddpm", "classifier", "classifier_sn"):
            step = load_checkpoint(circles, name)["step"]
            assert step == 2 * n, f"{name} resumed to step {step}, expected {2 * n}"
        x = stage("circles paper: multi-guided sampling (2 steps)", lambda: generate(
            circles, n=8, batch_size=8, steps=2, guidance="multi", lambdas="30,30", device=dev))
        assert x.shape == (8, 1, 64, 64) and torch.isfinite(x).all()

        import toy_faces
        faces, celeba = os.path.join(work, "faces"), os.path.join(work, "celeba")
        toy_faces.make_toy_faces(faces, n=40, seed=0)
        stage("celeba paper (toy faces): DDPM + 2 classifiers", lambda: train.main(
            ["--dataset", "celeba", "--data-dir", faces, "--out", celeba, "--stop-at", str(n)] + common))

        world = torch.cuda.device_count()
        ddp = os.path.join(work, "ddp")
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={world}",
               os.path.join(ROOT, "train.py"), "--dataset", "circles", "--model", "ddpm", "--out", ddp,
               "--stop-at", str(n), "--batch-size", str(max(1, 64 // world) * world)] + common

        def torchrun():
            r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=900)
            if r.returncode != 0:
                raise SystemExit(f"gpu_check: torchrun failed:\n{r.stdout[-2000:]}\n{r.stderr[-4000:]}")
            return r.stdout + r.stderr
        t0 = time.time()
        log = torchrun()
        sums = sorted({line.split()[-1] for line in log.splitlines() if "weight checksum" in line})
        print(f"[gpu_check] {f'torchrun, {world} process(es): circles paper DDPM':<44} "
              f"{time.time() - t0:8.1f} s   peak      - (per process); weight checksums {sums}", flush=True)
        assert load_checkpoint(ddp, "ddpm")["step"] == n
        if world > 1:
            assert len(sums) == 1, f"ranks disagree on the weights: {sums}"
        print("[gpu_check] all stages passed", flush=True)
    finally:
        if not a.keep and not a.out:
            shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    from checkpoint import cli
    sys.exit(cli(lambda: main()))

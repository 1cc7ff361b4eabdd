"""torchrun / DistributedDataParallel on the CPU (gloo): shards, identical weights, one checkpoint,
--resume. Two processes, a 16x16 DDPM, a few steps."""
import os
import re
import subprocess
import sys

import torch

from checkpoint import load_checkpoint
from conftest import TINY
from trainer import Dist, Shard, per_rank, shard_indices
from toy_circles import CirclesData

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_shards_cover_the_data_without_overlap():
    for n, world in ((300, 2), (301, 3), (7, 4)):
        shards = [shard_indices(n, r, world) for r in range(world)]
        allidx = torch.cat(shards)
        assert len(allidx) == n and set(allidx.tolist()) == set(range(n))
        assert max(len(s) for s in shards) - min(len(s) for s in shards) <= 1


def test_a_shard_draws_only_its_own_images():
    data = CirclesData(16, 0.2, flip=False)
    shard = Shard(data, 1, 2)
    x, y = shard.batch(64, torch.Generator().manual_seed(0))
    own = data.x[shard.index]
    for img in x:  # every drawn image is one of the shard's images
        assert (own == img).flatten(1).all(1).any()
    other = data.x[Shard(data, 0, 2).index]
    assert not any((other == img).flatten(1).all(1).any() for img in x)


def test_global_batch_is_split_between_ranks():
    assert per_rank(32, Dist(0, 2, 0)) == 16
    try:
        per_rank(30, Dist(0, 4, 0))
    except Exception as e:
        assert "not divisible by 4" in str(e)
    else:
        raise AssertionError("a batch not divisible by the ranks must be refused")


def _torchrun(args, tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1", MASTER_ADDR="127.0.0.1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           os.path.join(ROOT, "train.py")] + args
    r = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    return r.stdout + r.stderr


def test_torchrun_two_ranks_identical_weights_one_checkpoint_and_resume(tmp_path):
    out = str(tmp_path / "run")
    base = ["--dataset", "circles", "--model", "ddpm", "--out", out, "--no-grid", "--device", "cpu"] + TINY
    log = _torchrun(base + ["--steps", "8", "--stop-at", "4"], tmp_path)
    sums = dict(re.findall(r"\[rank (\d)\] ddpm weight checksum ([-+0-9.e]+)", log))
    assert set(sums) == {"0", "1"} and sums["0"] == sums["1"], log[-2000:]
    assert sorted(os.listdir(out)) == ["ddpm.pt", "log_ddpm.jsonl", "loss_ddpm.png"]
    assert load_checkpoint(out, "ddpm")["step"] == 4
    log = _torchrun(base + ["--steps", "8", "--resume"], tmp_path)
    sums = dict(re.findall(r"\[rank (\d)\] ddpm weight checksum ([-+0-9.e]+)", log))
    assert sums["0"] == sums["1"]
    ck = load_checkpoint(out, "ddpm")
    assert ck["step"] == 8 and "2 ranks" in log
    assert sorted(os.listdir(out)) == ["ddpm.pt", "log_ddpm.jsonl", "loss_ddpm.png"]
    steps = [int(s) for s in re.findall(r'"step": (\d+)', open(os.path.join(out, "log_ddpm.jsonl")).read())]
    assert steps == sorted(steps) and steps[-1] == 8  # one log, written by rank 0 only

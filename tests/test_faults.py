"""Safe to run, re-run and share: checkpoints that cannot run code, a NaN that cannot overwrite a
good model, one writer per run directory, evaluation that survives its own faults, the same
small experiment on every device. Each test reproduces one fault on a tiny run."""
import errno
import importlib.util
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile

import numpy as np
import pytest
import torch

import checkpoint
import evaluate
import rundir
import sample
import train
from checkpoint import UserError, load_checkpoint
from conftest import TINY, one_line_error

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY_DDPM = ["--model", "ddpm", "--device", "cpu", "--no-grid"] + TINY


@pytest.fixture(scope="module")
def base_run(tmp_path_factory):
    """A 2-step 16x16 DDPM alone in its run; tests work on copies (``run``)."""
    out = str(tmp_path_factory.mktemp("faults") / "base")
    train.main(["--out", out, "--steps", "2"] + TINY_DDPM)
    return out


@pytest.fixture
def run(base_run, tmp_path):
    out = str(tmp_path / "run")
    shutil.copytree(base_run, out)
    return out


def dead_pid() -> int:
    """The PID of a process that has exited (and been reaped)."""
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def temps(folder):
    return sorted(f for f in os.listdir(folder) if f.startswith(".tmp-"))


# ----- a checkpoint whose pickle runs code ------------------------------------------------------

class Payload:
    """What an attacker puts in a .pt: unpickling it calls os.system(cmd)."""

    def __init__(self, cmd):
        self.cmd = cmd

    def __reduce__(self):
        return os.system, (self.cmd,)


def test_a_pickle_that_runs_code_is_refused_and_nothing_runs(run, tmp_path):
    marker = tmp_path / "PWNED"
    evil = {"kind": "ddpm", "model": {}, "ema": {}, "config": {}, "meta": Payload(f"touch {marker}")}
    torch.save(evil, os.path.join(run, "ddpm.pt"))
    # The payload is live: the loading this code used to do would run it.
    probe = tmp_path / "probe.pt"
    torch.save({"x": Payload(f"touch {tmp_path / 'PROBE'}")}, probe)
    torch.load(probe, weights_only=False)
    assert (tmp_path / "PROBE").exists()

    msg = one_line_error(lambda: sample.main(["--run", run, "--n", "2", "--device", "cpu"]),
                         "refusing to load", "ddpm.pt", "system", "nothing in it was run")
    assert not marker.exists(), msg
    one_line_error(lambda: train.main(["--out", run, "--resume"] + TINY_DDPM), "refusing to load")
    from eval_classifier import EvalClassifier
    shutil.copy(os.path.join(run, "ddpm.pt"), tmp_path / "eval_Smiling.pt")
    one_line_error(lambda: EvalClassifier.load(str(tmp_path / "eval_Smiling.pt")), "refusing to load",
                   "data_filter.py")
    assert not marker.exists()


def test_checkpoints_hold_plain_values_and_name_their_code(base_run):
    ck = torch.load(os.path.join(base_run, "ddpm.pt"), weights_only=True)   # no allow-list needed
    assert type(ck["meta"]["torch"]) is str and ck["meta"]["torch"] == str(torch.__version__)
    assert ck["meta"]["code"] == checkpoint.code_version() != ""
    git = subprocess.run(["git", "-C", ROOT, "rev-parse", "HEAD"], capture_output=True, text=True)
    if git.returncode == 0:
        assert ck["meta"]["code"].startswith(git.stdout.strip())


def test_checkpoints_of_the_earlier_code_still_load(run):
    """They stored torch.__version__ itself (a TorchVersion, a str subclass) in meta."""
    path = os.path.join(run, "ddpm.pt")
    ck = torch.load(path, weights_only=True)
    ck["meta"]["torch"] = torch.__version__
    del ck["meta"]["code"]
    torch.save(ck, path)
    with pytest.raises(Exception):
        torch.load(path, weights_only=True)               # what a bare weights_only load says
    assert load_checkpoint(run, "ddpm")["meta"]["torch"] == str(torch.__version__)
    assert sample.generate(run, n=2, batch_size=2, steps=2, device="cpu").shape == (2, 1, 16, 16)


# ----- divergence -------------------------------------------------------------------------------

@pytest.mark.parametrize("every", [("--log-every", "1", "--save-every", "50"),
                                   ("--log-every", "50", "--save-every", "1")], ids=["log", "save"])
def test_a_diverging_run_stops_naming_the_step_and_keeps_the_good_checkpoint(tmp_path, every):
    out = str(tmp_path / "nan")
    # One step at lr 1e6 (warm-up: 2e5) leaves finite, huge weights: a good checkpoint at step 1.
    train.main(["--out", out, "--lr", "1e6", "--steps", "20", "--stop-at", "1"] + TINY_DDPM)
    path = os.path.join(out, "ddpm.pt")
    before, mtime = open(path, "rb").read(), os.stat(path).st_mtime_ns
    msg = one_line_error(lambda: train.main(["--out", out, "--resume", "--no-grid", *every]),
                         "ddpm: training diverged", "at step", "--lr", "untouched")
    step = int(msg.split("at step ")[1].split()[0].rstrip(";"))
    assert 2 <= step <= 20
    ck = load_checkpoint(out, "ddpm")
    for name in ("model", "ema"):
        assert all(torch.isfinite(t).all() for t in ck[name].values() if t.is_floating_point())
    if every[1] == "1":   # checked at each log point: nothing saved since step 1
        assert open(path, "rb").read() == before and os.stat(path).st_mtime_ns == mtime
        assert ck["step"] == 1 and "(step 1)" in msg
    else:                 # checked at each save point: the last finite weights are the file
        assert ck["step"] == step - 1 and f"(step {step - 1})" in msg
    recs = [json.loads(ln) for ln in open(os.path.join(out, "log_ddpm.jsonl"))]
    assert all(np.isfinite(r["loss"]) for r in recs)   # no NaN line logged


def test_a_non_finite_model_is_never_saved(tmp_path):
    path = str(tmp_path / "m.pt")
    checkpoint.save_checkpoint({"model": {"w": torch.ones(3)}}, path)
    good = open(path, "rb").read()
    one_line_error(lambda: checkpoint.save_checkpoint({"model": {"w": torch.ones(3)},
                                                       "ema": {"w": torch.tensor([1.0, float("nan"), 0])}},
                                                      path), "refusing to save", "NaN", "ema:w")
    assert open(path, "rb").read() == good


# ----- one writer per run directory -------------------------------------------------------------

def test_a_second_train_on_the_same_out_refuses(run):
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    try:
        lock = os.path.join(run, ".lock")
        with open(lock, "w") as f:
            f.write(f"{other.pid} {socket.gethostname()}\n")
        before = open(os.path.join(run, "ddpm.pt"), "rb").read()
        one_line_error(lambda: train.main(["--out", run, "--resume", "--steps", "4"] + TINY_DDPM),
                       "in use by another train.py", str(other.pid), "another --out")
        assert open(lock).read().split()[0] == str(other.pid)     # its lock is left alone
        assert open(os.path.join(run, "ddpm.pt"), "rb").read() == before
    finally:
        other.kill()
        other.wait()


def test_the_lock_is_exclusive_released_and_a_dead_owner_is_taken_over(run, capsys):
    lock = os.path.join(run, ".lock")
    with rundir.run_lock(run):
        assert open(lock).read().split() == [str(os.getpid()), socket.gethostname()]
        one_line_error(lambda: rundir.run_lock(run).__enter__(), "in use", str(os.getpid()))
    assert not os.path.exists(lock)
    dead = dead_pid()
    with open(lock, "w") as f:
        f.write(f"{dead} {socket.gethostname()}\n")
    train.main(["--out", run, "--resume", "--steps", "3"] + TINY_DDPM)
    assert f"took over the lock of {run} from process {dead}" in capsys.readouterr().out
    assert load_checkpoint(run, "ddpm")["step"] == 3 and not os.path.exists(lock)
    with open(lock, "w") as f:                       # another machine's lock: cannot be judged here
        f.write("12345 some-other-host\n")
    one_line_error(lambda: train.main(["--out", run, "--resume", "--steps", "4"] + TINY_DDPM),
                   "some-other-host", "delete")


# ----- evaluation caches ------------------------------------------------------------------------

def test_a_truncated_sample_cache_is_a_miss_that_is_drawn_again(run, capsys):
    models = sample.load_ddpm(run, "cpu")
    args = (run, "uncond", 4, 4, 0, None, 2, torch.device("cpu"), models)
    first, _, cached = evaluate.method_samples(*args)
    path = os.path.join(run, "eval_uncond.npz")
    assert not cached and os.path.isfile(path) and not temps(run)
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) // 2)
    again, _, cached = evaluate.method_samples(*args)
    assert not cached and np.array_equal(again, first)
    assert "eval_uncond.npz cannot be read" in capsys.readouterr().out
    assert evaluate.method_samples(*args)[2]        # rewritten whole: read back next time


def test_cache_and_metrics_writes_are_atomic(run, monkeypatch):
    path = os.path.join(run, "eval_uncond.npz")
    rundir.save_npz(path, images=np.zeros((2, 4, 4, 1), np.uint8), settings="old")
    rundir.write_json(os.path.join(run, "metrics.json"), {"old": 1})

    def crash(file, **arrays):
        with open(file, "wb") as f:
            f.write(b"PK\x03\x04 half")
        raise KeyboardInterrupt
    monkeypatch.setattr(np, "savez_compressed", crash)
    with pytest.raises(KeyboardInterrupt):
        rundir.save_npz(path, images=np.ones((2, 4, 4, 1), np.uint8), settings="new")
    assert str(rundir.load_npz(path)["settings"]) == "old" and not temps(run)
    monkeypatch.setattr(json, "dumps", lambda *a, **k: (_ for _ in ()).throw(KeyboardInterrupt()))
    with pytest.raises(KeyboardInterrupt):
        rundir.write_json(os.path.join(run, "metrics.json"), {"new": 1})
    monkeypatch.undo()
    assert json.load(open(os.path.join(run, "metrics.json"))) == {"old": 1}


def test_a_read_only_run_is_refused_before_sampling(run, monkeypatch):
    drawn = []
    real = sample.generate
    monkeypatch.setattr(sample, "generate", lambda *a, **k: drawn.append(1) or real(*a, **k))
    real_tmp = tempfile.NamedTemporaryFile

    def no_write(*a, dir=None, **k):
        if dir is not None and os.path.abspath(dir) == os.path.abspath(run):
            raise PermissionError(errno.EACCES, "Permission denied")
        return real_tmp(*a, dir=dir, **k)
    monkeypatch.setattr(tempfile, "NamedTemporaryFile", no_write)
    one_line_error(lambda: evaluate.evaluate_run(run, n=4, batch_size=4, steps=2, methods=["uncond"],
                                                 device="cpu", figures=False, log=lambda *a: None),
                   "cannot write to directory", run, "Permission denied", "writable")
    assert drawn == [] and not os.path.exists(os.path.join(run, "eval_uncond.npz"))


def test_samples_are_keyed_and_recorded_with_batch_size_and_device(run):
    def ev(bs, log):
        return evaluate.evaluate_run(run, n=8, batch_size=bs, steps=2, methods=["uncond"], device="cpu",
                                     figures=False, log=log)["uncond"]
    logs = []
    m8 = ev(8, logs.append)
    z8 = np.load(os.path.join(run, "eval_uncond.npz"))["images"]
    m4 = ev(4, logs.append)
    z4 = np.load(os.path.join(run, "eval_uncond.npz"))["images"]
    assert not any("read from cache" in line for line in logs), logs   # batch 4 is not batch 8's cache
    assert not np.array_equal(z8, z4)     # the noise of each sample depends on the batch size
    assert (m8["batch_size"], m8["device"], m4["batch_size"], m4["device"]) == (8, "cpu", 4, "cpu")
    on_disk = json.load(open(os.path.join(run, "metrics.json")))["uncond"]
    assert on_disk["batch_size"] == 4 and on_disk["device"] == "cpu"
    ev(4, logs.append)
    assert "read from cache" in logs[-1]


# ----- resume after a crash ---------------------------------------------------------------------

def test_a_cut_off_last_log_line_does_not_block_resume(run, capsys):
    log = os.path.join(run, "log_ddpm.jsonl")
    with open(log, "a") as f:
        f.write('{"step": 3, "loss": 0.4, "l')     # a crash in the middle of an append
    train.main(["--out", run, "--resume", "--steps", "3", "--log-every", "1"] + TINY_DDPM)
    recs = [json.loads(ln) for ln in open(log)]      # every line parses again
    assert [r["step"] for r in recs] == [2, 3]
    assert "dropped 1 unreadable line(s)" in capsys.readouterr().out


def test_disk_full_while_saving_is_one_line_and_the_old_checkpoint_survives(run, monkeypatch):
    path = os.path.join(run, "ddpm.pt")
    before = open(path, "rb").read()
    real_save = torch.save
    if os.path.exists("/dev/full"):   # torch's own failure on a full disk (ENOSPC from the OS)
        monkeypatch.setattr(torch, "save", lambda obj, f, *a, **k: real_save(obj, "/dev/full"))
        one_line_error(lambda: train.main(["--out", run, "--resume", "--steps", "3"] + TINY_DDPM),
                       f"cannot write checkpoint {path}: disk full?", "intact")
        assert open(path, "rb").read() == before and not temps(run)

    def enospc(obj, f, *a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(torch, "save", enospc)
    one_line_error(lambda: checkpoint.save_checkpoint({"model": {"w": torch.ones(2)}}, path),
                   "cannot write checkpoint", "disk full?", "No space left on device")
    monkeypatch.undo()
    assert open(path, "rb").read() == before and not temps(run)
    assert load_checkpoint(run, "ddpm")["step"] == 2


def test_temp_files_of_a_killed_save_are_removed_at_the_next_start(run, capsys, tmp_path):
    live = os.path.join(run, f".tmp-{os.getpid()}-busy.pt")    # a writer still running: kept
    open(live, "wb").close()
    code = (f"import os, signal, sys; sys.path.insert(0, {ROOT!r}); from checkpoint import atomic_path\n"
            f"with atomic_path({os.path.join(run, 'ddpm.pt')!r}, '.pt') as t:\n"
            f"    open(t, 'wb').write(b'x' * 4096); os.kill(os.getpid(), signal.SIGKILL)\n")
    assert subprocess.run([sys.executable, "-c", code]).returncode == -signal.SIGKILL
    orphans = [t for t in temps(run) if t != os.path.basename(live)]
    assert len(orphans) == 1 and orphans[0].endswith(".pt")
    orphan = os.path.join(run, orphans[0])
    debris = open(orphan, "rb").read()

    train.main(["--out", run, "--resume"] + TINY_DDPM)       # a finished model: only the start runs
    assert temps(run) == [os.path.basename(live)]
    assert "removed 1 temp file(s)" in capsys.readouterr().out
    open(orphan, "wb").write(debris)                           # the same debris, for the next starts
    sample.main(["--run", run, "--n", "2", "--steps", "2", "--device", "cpu", "--out", str(tmp_path / "s")])
    assert temps(run) == [os.path.basename(live)]
    open(orphan, "wb").write(debris)
    evaluate.evaluate_run(run, n=2, batch_size=2, steps=2, methods=["uncond"], device="cpu", figures=False,
                          log=lambda *a: None)
    assert temps(run) == [os.path.basename(live)]
    assert load_checkpoint(run, "ddpm")["step"] == 2


# ----- weights from other code ------------------------------------------------------------------

def test_renamed_weights_are_one_line_naming_the_code_that_wrote_them(run):
    path = os.path.join(run, "ddpm.pt")
    ck = torch.load(path, weights_only=True)
    ck["ema"] = {"net." + k: v for k, v in ck["ema"].items()}
    ck["meta"]["code"] = "f00dfeed" * 5
    torch.save(ck, path)
    one_line_error(lambda: sample.load_ddpm(run, "cpu"), "do not fit", "missing", "unexpected",
                   "f00dfeed" * 5, checkpoint.code_version())
    ck["model"] = ck["ema"]
    del ck["meta"]["code"]
    torch.save(ck, path)
    one_line_error(lambda: train.main(["--out", run, "--resume", "--steps", "3"] + TINY_DDPM),
                   "do not fit", "records no commit")


# ----- CUDA RNG on fewer GPUs -------------------------------------------------------------------

def test_cuda_rng_states_restore_only_the_gpus_present(monkeypatch):
    restored = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "set_rng_state", lambda state, device=0: restored.append(int(device)))
    g = torch.Generator().manual_seed(3)
    st = {"torch": torch.get_rng_state(), "generator": g.get_state(),
          "cuda": [torch.zeros(16, dtype=torch.uint8) for _ in range(4)]}     # written on 4 GPUs
    g.manual_seed(99)
    checkpoint.set_rng_state(st, g)
    assert restored == [0]
    assert torch.equal(g.get_state(), torch.Generator().manual_seed(3).get_state())


# ----- the same small experiment on every device ------------------------------------------------

def test_a_new_run_gets_the_cpu_preset_on_cuda_too(tmp_path, monkeypatch):
    cuda = torch.device("cuda")        # resolve_config only reads the device's type
    args = train.build_parser().parse_args(["--out", str(tmp_path / "r")])
    args.dataset = "circles"
    cfg, preset, _ = train.resolve_config(args, "ddpm", cuda)
    assert preset == "cpu" and cfg["data"].image_size == 32 and cfg["train"].steps == 2000
    args = train.build_parser().parse_args(["--out", str(tmp_path / "r"), "--preset", "paper"])
    args.dataset = "circles"
    cfg, preset, _ = train.resolve_config(args, "ddpm", cuda)
    assert preset == "paper" and cfg["data"].image_size == 64
    import data_filter
    chosen = []
    monkeypatch.setattr(data_filter, "pick_device", lambda name=None: cuda)
    monkeypatch.setattr(data_filter, "make_configs", lambda preset, **kw: chosen.append(preset) or 1 / 0)
    with pytest.raises(ZeroDivisionError):
        data_filter.main(["--data-dir", str(tmp_path)])
    assert chosen == ["cpu"]
    readme = open(os.path.join(ROOT, "README.md")).read()
    assert "default on CUDA" not in readme and "--preset paper" in readme


# ----- the GPU check ----------------------------------------------------------------------------

def test_gpu_check_skips_cleanly_without_cuda(monkeypatch, capsys):
    spec = importlib.util.spec_from_file_location("gpu_check", os.path.join(ROOT, "bench", "gpu_check.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert mod.main([]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    assert len(out) == 1 and "skipped" in out[0] and "CUDA" in out[0]

"""The run-directory contract (App. C's checkpoints): devices, one checkpoint file per model, the
uint8 file boundary, clear errors.

A run directory ``runs/<name>/`` holds one checkpoint per trained model:
  ddpm.pt, classifier.pt, classifier_sn.pt
each a dict {kind, model, ema?, optimizer, step, rng, config, meta} of tensors and plain values
only (dicts, lists, str, int, float, bool): the config as ``config.to_dict``, the RNG states as
tensors, ``meta`` with the torch version and the git commit of the code as strings. Loading uses
``torch.load(weights_only=True)``, so a file holding any other object (a pickle that would run
code) is refused with one line and nothing in it runs. Checkpoints are written atomically (temp
file in the same directory + os.replace), only with finite weights, so an interrupted or failed
save, or a diverged model, never replaces a good file. sample.py / evaluate.py rebuild models
from the stored config. The rest of the run directory's housekeeping (lock, stale temp files,
JSON / npz files) is rundir.py.
"""
from __future__ import annotations

import contextlib
import errno
import functools
import os
import pickle
import re
import shutil
import subprocess
import sys
import tempfile

import numpy as np
import torch

CKPT_NAMES = {"ddpm": "ddpm.pt", "classifier": "classifier.pt", "classifier_sn": "classifier_sn.pt"}


class UserError(Exception):
    """Bad input: printed as one line naming the problem and the fix, exit code 2."""


def cli(main):
    """Run ``main()``; turn UserError into a one-line message and exit code 2 (no traceback)."""
    try:
        return main()
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)


def _mps_available() -> bool:
    return bool(getattr(torch.backends, "mps", None) and torch.backends.mps.is_available())


def pick_device(name: str | None = None) -> torch.device:
    """cuda, then mps, then cpu, unless the user named one (a bad name is a one-line error).

    On the CPU, torch uses every core for intra-op parallelism, or OMP_NUM_THREADS if set (one
    place for set_num_threads)."""
    if name:
        try:
            device = torch.device(name)
        except RuntimeError:
            raise UserError(f"unknown --device {name!r}; use cpu, cuda, cuda:N or mps") from None
        if device.type not in ("cpu", "cuda", "mps"):
            raise UserError(f"unsupported --device {name!r}; use cpu, cuda, cuda:N or mps")
        if device.type == "cuda":
            if not torch.cuda.is_available():
                raise UserError(f"--device {name} requested but CUDA is not available; use --device cpu")
            if device.index is not None and device.index >= torch.cuda.device_count():
                raise UserError(f"--device {name}: only {torch.cuda.device_count()} CUDA device(s); "
                                f"use cuda:0..cuda:{torch.cuda.device_count() - 1}")
        if device.type == "mps" and not _mps_available():
            raise UserError(f"--device {name} requested but MPS is not available; use --device cpu")
    elif torch.cuda.is_available():
        device = torch.device("cuda")
    elif _mps_available():
        device = torch.device("mps")
    else:
        device = torch.device("cpu")
    if device.type == "cpu":
        # Every core, unless the user capped threads (OMP_NUM_THREADS), e.g. beside another job.
        torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS") or os.cpu_count() or 1))
    return device


# ----- the file boundary: images are float [-1, 1] NCHW inside, uint8 NHWC on disk -------------

def to_uint8(x: torch.Tensor) -> np.ndarray:
    """[-1, 1] float NCHW tensor -> uint8 NHWC array."""
    return ((x.detach().cpu().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()


def from_uint8(a: np.ndarray, channels: int | None = None) -> torch.Tensor:
    """uint8 NHWC (or NHW for grey images) array -> [-1, 1] float32 NCHW tensor; ``channels``
    repeats a grey channel (e.g. for a 3-channel model)."""
    x = torch.from_numpy(np.ascontiguousarray(a)).float().div(127.5).sub(1.0)
    x = x[:, None] if x.dim() == 3 else x.permute(0, 3, 1, 2)
    if channels is not None and x.shape[1] != channels:
        x = x.repeat(1, channels // x.shape[1], 1, 1)
    return x.contiguous()


def ckpt_path(run: str, name: str) -> str:
    return os.path.join(run, CKPT_NAMES[name])


def ensure_writable_dir(path: str, fix: str = "pass a writable --out") -> None:
    """Create ``path`` if needed and prove it writable with a real file, before any slow work."""
    try:
        os.makedirs(path, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path, prefix=f".tmp-{os.getpid()}-"):
            pass
    except OSError as e:
        raise UserError(f"cannot write to directory {path!r} ({e.strerror or e}); {fix}") from None


@contextlib.contextmanager
def atomic_path(path: str, suffix: str = ""):
    """Yield a temp file name beside ``path``; on success it replaces ``path`` (os.replace), on any
    error it is removed, so a crash leaves either the old file or none, never a truncated one.
    The file gets the permissions of a normally created one (mkstemp makes it 0600, which would
    hide a shared cache from other users)."""
    # The writer's PID is in the name: rundir.remove_stale_temps removes only a dead writer's files.
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(os.path.abspath(path)), prefix=f".tmp-{os.getpid()}-",
                               suffix=suffix)
    os.close(fd)
    try:
        yield tmp
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def write_failed(path: str, e: BaseException, what: str = "") -> UserError:
    """The one-line error of a failed write (OSError, or torch's RuntimeError of a short write):
    the old file is intact (atomic_path), and the likely cause is a full disk."""
    try:
        free = f", {shutil.disk_usage(os.path.dirname(os.path.abspath(path))).free / 1e6:.0f} MB free"
    except OSError:
        free = ""
    full = isinstance(e, RuntimeError) or getattr(e, "errno", None) in (errno.ENOSPC, errno.EDQUOT)
    text = str(e).strip()
    reason = getattr(e, "strerror", None) or (text.splitlines()[0] if text else type(e).__name__)
    again = "run again (train.py: with --resume)" if what == "checkpoint" else "run the command again"
    return UserError(f"cannot write {what + ' ' if what else ''}{path}: "
                     f"{'disk full? ' if full else ''}({reason[:160]}{free}); any previous {os.path.basename(path)} "
                     f"is intact; free some space and {again}")


def save_atomic(obj, path: str) -> None:
    try:
        with atomic_path(path, ".pt") as tmp:
            torch.save(obj, tmp)
    except (OSError, RuntimeError) as e:
        raise write_failed(path, e, "checkpoint") from None


def write_bytes_atomic(path: str, data: bytes) -> None:
    try:
        with atomic_path(path) as tmp, open(tmp, "wb") as f:
            f.write(data)
    except OSError as e:
        raise write_failed(path, e) from None


# ----- what a checkpoint may hold ----------------------------------------------------------------

@functools.lru_cache(maxsize=1)
def code_version() -> str:
    """The git commit of this code (with ``-dirty`` for uncommitted changes), or "unknown"."""
    here = os.path.dirname(os.path.abspath(__file__))
    try:
        git = lambda *a: subprocess.run(["git", "-C", here, *a], capture_output=True, text=True,  # noqa: E731
                                        timeout=10)
        head = git("rev-parse", "HEAD")
        if head.returncode != 0:
            return "unknown"
        dirty = git("diff", "--quiet", "HEAD", "--").returncode == 1
        return head.stdout.strip() + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def versions() -> dict:
    """What wrote a checkpoint, as plain strings (``meta``): torch and this code's commit."""
    return {"torch": str(torch.__version__), "code": code_version()}


def nonfinite(**named) -> list[str]:
    """``label:name`` of each floating-point tensor holding NaN or inf, for modules or state
    dicts given by label (e.g. ``model=..., ema=...``; None is skipped)."""
    bad = []
    for label, m in named.items():
        if m is None:
            continue
        items = m.state_dict().items() if isinstance(m, torch.nn.Module) else m.items()
        bad += [f"{label}:{n}" for n, t in items
                if torch.is_tensor(t) and t.is_floating_point() and not torch.isfinite(t).all()]
    return bad


def save_checkpoint(obj: dict, path: str) -> None:
    """Write a checkpoint atomically, refusing non-finite weights (a diverged model never replaces
    the last good file); a failed write is one line, the old file intact."""
    bad = nonfinite(model=obj.get("model"), ema=obj.get("ema"))
    if bad:
        raise UserError(f"refusing to save {path}: {len(bad)} weight tensor(s) hold NaN or inf (e.g. "
                        f"{bad[0]}); the previous {os.path.basename(path)} is kept; lower the learning rate")
    save_atomic(obj, path)


def safe_load(path: str, fix: str, map_location="cpu"):
    """``torch.load(weights_only=True)``: tensors and plain values only, nothing is executed. A file
    holding other objects, or an unreadable one, is a one-line error ending in ``fix``."""
    # TorchVersion (a str) is what checkpoints of earlier versions of this code stored in meta.
    from torch.torch_version import TorchVersion
    try:
        with torch.serialization.safe_globals([TorchVersion]):
            return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        m = re.search(r"GLOBAL ([\w.]+)", str(e))
        what = f" (e.g. {m.group(1)})" if m else ""
        raise UserError(f"refusing to load {path}: it holds Python objects other than tensors and plain "
                        f"values{what}, so this code did not write it or it was altered; nothing in it "
                        f"was run; {fix}") from None
    except Exception as e:  # truncated or not a torch file
        raise UserError(f"cannot read {path} ({type(e).__name__}); {fix}") from None


def load_checkpoint(run: str, name: str, map_location="cpu") -> dict:
    path = ckpt_path(run, name)
    if not os.path.isdir(run):
        raise UserError(f"run directory {run!r} does not exist; train first "
                        f"(python train.py --dataset circles --out {run})")
    if not os.path.exists(path):
        raise UserError(f"no {name} checkpoint in {run!r} (expected {path}); train it with "
                        f"python train.py --out {run} --model {'ddpm' if name == 'ddpm' else 'classifier'}")
    ck = safe_load(path, "delete it and retrain", map_location)
    if not isinstance(ck, dict) or ck.get("kind") != name.split("_")[0]:
        raise UserError(f"{path} is not a {name} checkpoint of this codebase; delete it and retrain")
    return ck


def load_weights(module: torch.nn.Module, state, path: str, ck: dict | None = None) -> None:
    """``module.load_state_dict(state)``; weights that do not fit this code's network (renamed,
    missing, other shapes) are one line naming the code version that wrote them."""
    try:
        module.load_state_dict(state)
        return
    except (RuntimeError, TypeError, AttributeError, KeyError):
        pass
    have = module.state_dict()
    state = state if isinstance(state, dict) else {}
    missing = [k for k in have if k not in state]
    extra = [k for k in state if k not in have]
    shape = [k for k in have if k in state and torch.is_tensor(state[k])
             and tuple(state[k].shape) != tuple(have[k].shape)]
    parts = ([f"{len(missing)} missing (e.g. {missing[0]})"] if missing else []) + \
        ([f"{len(extra)} unexpected (e.g. {extra[0]})"] if extra else []) + \
        ([f"{len(shape)} of another shape (e.g. {shape[0]})"] if shape else [])
    written = ((ck or {}).get("meta") or {}).get("code") if isinstance(ck, dict) else None
    by = f"code at commit {written}" if written else "code that records no commit (other code or an older version)"
    raise UserError(f"the weights in {path} do not fit this code's {type(module).__name__} "
                    f"({', '.join(parts) or 'unreadable'}); it was written by {by}, this is {code_version()}: "
                    "use that code, or retrain") from None


def rng_state(generator: torch.Generator) -> dict:
    st = {"torch": torch.get_rng_state(), "generator": generator.get_state()}
    if torch.cuda.is_available():
        st["cuda"] = torch.cuda.get_rng_state_all()
    return st


def set_rng_state(st: dict, generator: torch.Generator) -> None:
    """Restore the saved streams; of the CUDA ones only those of GPUs this machine has (a run
    resumed on fewer GPUs: the others have no device to go to)."""
    torch.set_rng_state(st["torch"])
    generator.set_state(st["generator"])
    if st.get("cuda") and torch.cuda.is_available():
        for i, s in enumerate(st["cuda"][:torch.cuda.device_count()]):
            torch.cuda.set_rng_state(s, i)

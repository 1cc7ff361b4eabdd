"""The run-directory contract: devices, one checkpoint file per model, the uint8 file boundary,
clear errors.

A run directory ``runs/<name>/`` holds one checkpoint per trained model:
  ddpm.pt, classifier.pt, classifier_sn.pt
each a dict {kind, model, ema?, optimizer, step, rng, config, meta}. Checkpoints are written
atomically (temp file in the same directory + os.replace), so an interrupted save never leaves a
truncated file behind. sample.py / evaluate.py rebuild models from the stored config.
"""
from __future__ import annotations

import contextlib
import os
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


def ensure_writable_dir(path: str) -> None:
    try:
        os.makedirs(path, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path):
            pass
    except OSError as e:
        raise UserError(f"cannot write to output directory {path!r} ({e.strerror or e}); "
                        "pass a writable --out") from None


@contextlib.contextmanager
def atomic_path(path: str, suffix: str = ""):
    """Yield a temp file name beside ``path``; on success it replaces ``path`` (os.replace), on any
    error it is removed, so a crash leaves either the old file or none, never a truncated one.
    The file gets the permissions of a normally created one (mkstemp makes it 0600, which would
    hide a shared cache from other users)."""
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(os.path.abspath(path)), prefix=".tmp-", suffix=suffix)
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


def save_atomic(obj, path: str) -> None:
    with atomic_path(path, ".pt") as tmp:
        torch.save(obj, tmp)


def write_bytes_atomic(path: str, data: bytes) -> None:
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        f.write(data)


def load_checkpoint(run: str, name: str, map_location="cpu") -> dict:
    path = ckpt_path(run, name)
    if not os.path.isdir(run):
        raise UserError(f"run directory {run!r} does not exist; train first "
                        f"(python train.py --dataset circles --out {run})")
    if not os.path.exists(path):
        raise UserError(f"no {name} checkpoint in {run!r} (expected {path}); train it with "
                        f"python train.py --out {run} --model {'ddpm' if name == 'ddpm' else 'classifier'}")
    try:
        ck = torch.load(path, map_location=map_location, weights_only=False)
    except Exception as e:  # truncated or foreign file
        raise UserError(f"cannot read checkpoint {path} ({type(e).__name__}); delete it and retrain") from None
    if not isinstance(ck, dict) or ck.get("kind") != name.split("_")[0]:
        raise UserError(f"{path} is not a {name} checkpoint of this codebase; delete it and retrain")
    return ck


def rng_state(generator: torch.Generator) -> dict:
    st = {"torch": torch.get_rng_state(), "generator": generator.get_state()}
    if torch.cuda.is_available():
        st["cuda"] = torch.cuda.get_rng_state_all()
    return st


def set_rng_state(st: dict, generator: torch.Generator) -> None:
    torch.set_rng_state(st["torch"])
    generator.set_state(st["generator"])
    if "cuda" in st and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(st["cuda"])

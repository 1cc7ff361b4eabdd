"""The run directory's housekeeping (App. C's long runs, passed between people): one writer per
run, no debris from a killed one, files that a later command reads written whole or not at all.

  * ``run_lock(run)``: train.py holds ``<run>/.lock`` (created with O_CREAT | O_EXCL, holding
    "PID host") while it trains, so a second train.py on the same directory refuses with one
    line instead of interleaving its log and checkpoints. A lock whose process is dead (killed,
    machine rebooted) is taken over with a note. Released on exit.
  * ``remove_stale_temps(dir)``: atomic writes go through a temp file ``.tmp-<pid>-*``
    (checkpoint.atomic_path); a writer killed mid-save (SIGKILL, power loss) leaves it behind,
    gigabytes at the paper's size. Every command that writes into a run removes the temp files
    of writers that no longer run when it starts.
  * ``write_json`` / ``save_npz``: atomic, so an interrupted write leaves the old file or none.
  * ``load_npz``: a cache that cannot be read (truncated, foreign) is a miss with a note, which
    the caller redraws, never a traceback on every later run.
  * ``read_jsonl``: a training log whose last line was cut off (a crash mid-append) reads as the
    complete lines before it.
  * ``check_run_writable`` / ``select_methods``: what evaluation (evaluate.py, evaluate_faces.py)
    asks of a run before it samples: a writable folder, and the classifiers each method needs.
"""
from __future__ import annotations

import contextlib
import json
import os
import socket
import time

import numpy as np

from checkpoint import UserError, atomic_path, ckpt_path, ensure_writable_dir, write_bytes_atomic, write_failed

LOCK = ".lock"
TEMP_PREFIX = ".tmp-"
LEGACY_TEMP_AGE_S = 3600   # a temp file without a PID in its name: removed once this old


def pid_alive(pid: int) -> bool:
    """Whether process ``pid`` exists on this machine (signal 0 only checks)."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by another user
        return True
    return True


def _read_lock(path: str):
    """(pid, host) written in a lock file, or None if it is empty or unreadable."""
    try:
        with open(path) as f:
            pid, host = (f.read().split() + ["", ""])[:2]
        return int(pid), host
    except (OSError, ValueError):
        return None


@contextlib.contextmanager
def run_lock(run: str, log=print):
    """Hold ``<run>/.lock`` for the duration of the block (see module doc)."""
    path, me, host = os.path.join(run, LOCK), os.getpid(), socket.gethostname()
    for _ in range(4):
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            owner = _read_lock(path)
            if owner is None:  # just created by another process, not written yet: look again
                time.sleep(0.2)
                owner = _read_lock(path) or (0, host)
            pid, where = owner
            if where and where != host:
                raise UserError(f"{run!r} is locked by process {pid} on {where} ({path}); one train.py per "
                                f"run directory: wait for it, use another --out, or delete {path} if nothing "
                                f"runs there any more") from None
            if pid_alive(pid):
                raise UserError(f"{run!r} is in use by another train.py (process {pid}, {path}); one writer "
                                "per run directory: wait for it to finish, or use another --out") from None
            if _read_lock(path) in (owner, None):  # still the dead owner's lock
                with contextlib.suppress(FileNotFoundError):
                    os.remove(path)
                log(f"note: took over the lock of {run} from "
                    f"{f'process {pid}, which no longer runs' if pid else 'an unreadable lock file'}")
            continue
        except OSError as e:
            raise write_failed(path, e, "lock file") from None
        with os.fdopen(fd, "w") as f:
            f.write(f"{me} {host}\n")
        break
    else:
        raise UserError(f"cannot take the lock {path}; delete it if no train.py runs on {run!r}")
    try:
        yield path
    finally:
        if _read_lock(path) == (me, host):
            with contextlib.suppress(OSError):
                os.remove(path)


def remove_stale_temps(folder: str, log=print) -> list[str]:
    """Remove the ``.tmp-<pid>-*`` files in ``folder`` whose writer no longer runs (see module
    doc); the temp files of a live writer (a training saving right now) are left alone."""
    try:
        names = [n for n in os.listdir(folder) if n.startswith(TEMP_PREFIX)]
    except OSError:
        return []
    removed = []
    for name in names:
        path = os.path.join(folder, name)
        pid = name[len(TEMP_PREFIX):].split("-", 1)[0]
        try:
            if pid.isdigit():
                if pid_alive(int(pid)):
                    continue
            elif time.time() - os.path.getmtime(path) < LEGACY_TEMP_AGE_S:
                continue
            os.remove(path)
            removed.append(name)
        except OSError:
            continue
    if removed:
        log(f"note: removed {len(removed)} temp file(s) left in {folder} by an interrupted save "
            f"({', '.join(sorted(removed)[:3])}{', ...' if len(removed) > 3 else ''})")
    return removed


def write_json(path: str, obj, indent: int = 2) -> None:
    """JSON (NaN written as NaN, as json.dump does) replacing ``path`` atomically."""
    write_bytes_atomic(path, json.dumps(obj, indent=indent).encode())


def save_npz(path: str, **arrays) -> None:
    """np.savez_compressed, atomically (the temp name ends in .npz, or numpy would append one)."""
    try:
        with atomic_path(path, ".npz") as tmp:
            np.savez_compressed(tmp, **arrays)
    except OSError as e:
        raise write_failed(path, e) from None


def load_npz(path: str, log=print) -> dict | None:
    """Every array of an .npz, or None when it is missing or cannot be read (then with a note)."""
    if not os.path.exists(path):
        return None
    try:
        with np.load(path) as z:  # allow_pickle=False: plain arrays only
            return {k: z[k] for k in z.files}
    except Exception as e:  # truncated zip, bad CRC, not an npz
        log(f"note: {path} cannot be read ({type(e).__name__}); drawing its samples again")
        return None


def read_jsonl(path: str) -> tuple[list[dict], int]:
    """(records, number of unreadable lines) of a JSON-lines log; a missing file is ([], 0)."""
    if not os.path.exists(path):
        return [], 0
    recs, bad = [], 0
    with open(path, encoding="utf-8", errors="replace") as f:
        for line in f:
            if not line.strip():
                continue
            try:
                recs.append(json.loads(line))
            except ValueError:
                bad += 1
    return recs, bad


def check_run_writable(run: str) -> None:
    """Before any sampling: the run takes the sample caches, metrics and figures (a read-only run
    would lose the samples at the first write). Also removes an interrupted writer's temp files."""
    ensure_writable_dir(run, "evaluation writes its samples, metrics.json and figures there: make it "
                             "writable, or copy the run to a writable place")
    remove_stale_temps(run)


def select_methods(run: str, methods, table: dict, defaults, log=print, class_cond: bool = False) -> list:
    """The methods to evaluate. Named ones must have their classifier (else a one-line error);
    by default (None) every method of ``defaults`` whose checkpoints exist, with one line naming the
    skipped ones. ``cfg`` needs a class-conditional DDPM (``class_cond``): by default it is left out
    without one. ``table``: {method: (guidance, classifier checkpoint name or None)}, the caller's
    (evaluate.METHODS for the circles, evaluate_faces.METHODS for CelebA)."""
    requested = methods is not None
    methods = [m for m in defaults if m != "cfg" or class_cond] if methods is None else list(methods)
    for m in methods:
        if m not in table:
            raise UserError(f"unknown method {m!r}; choose from {', '.join(table)}")
    if "cfg" in methods:
        from classifier_free import require_class_cond
        require_class_cond(class_cond, run, "method cfg")
    if not methods:
        raise UserError(f"no method to evaluate; choose from {', '.join(table)}")
    missing = [m for m in methods if table[m][1] and not os.path.exists(ckpt_path(run, table[m][1]))]
    if not missing:
        return methods
    files = ", ".join(sorted({os.path.basename(ckpt_path(run, table[m][1])) for m in missing}))
    fix = f"python train.py --out {run} --model classifier"
    if requested:
        many = len(missing) > 1
        raise UserError(f"method{'s' if many else ''} {', '.join(missing)} need{'' if many else 's'} {files} "
                        f"in {run}, which {'do' if many else 'does'} not exist; train with {fix}")
    log(f"skipped {', '.join(missing)}: no {files} in {run}; train with {fix}")
    return [m for m in methods if m not in missing]

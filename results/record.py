"""Provenance for every number the docs quote: one ``results/<experiment>.json`` per experiment.

Each file holds what is needed to regenerate and to judge a number:
  experiment, title, command (as typed), git commit and whether the tree was dirty, date, torch
  version, device, CPU model and threads, the fp32 matmul GFLOP/s measured in the same run (before
  and after: the machines are shared, and a drop means the wall times were measured under load),
  seeds, sample counts, the metrics, the tables the docs show (formatted from the metrics by the
  script that measured them) and the figures it wrote under results/figures/.
``results/render.py`` turns the files into RESULTS.md; nothing else writes RESULTS.md.
"""
from __future__ import annotations

import datetime
import json
import os
import platform
import shlex
import subprocess
import sys
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
FIGURES = os.path.join(HERE, "figures")


def matmul_gflops(n: int = 2048, reps: int = 10) -> float:
    """fp32 GFLOP/s of large square matmuls: the machine's practical peak, to quote beside wall times."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    for _ in range(3):
        a @ b
    t0 = time.perf_counter()
    for _ in range(reps):
        a @ b
    return 2 * n ** 3 * reps / (time.perf_counter() - t0) / 1e9


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def git_state() -> dict:
    """{commit, dirty} of the checkout this code runs from (None where git or the repo is missing)."""
    def git(*args):
        return subprocess.run(["git", "-C", ROOT, *args], capture_output=True, text=True, timeout=30).stdout.strip()
    try:
        commit = git("rev-parse", "HEAD") or None
        # Only tracked files count: run directories and caches are ignored, results/ itself excluded.
        dirty = bool(git("status", "--porcelain", "--untracked-files=no", "--", ".", ":(exclude)results",
                         ":(exclude)RESULTS.md"))
    except (OSError, subprocess.SubprocessError):
        return {"commit": None, "dirty": None}
    return {"commit": commit, "dirty": dirty if commit else None}


def command_line(argv=None) -> str:
    """The command as a user would type it from the repository root."""
    argv = list(sys.argv if argv is None else argv)
    if argv and os.path.isabs(argv[0]) and argv[0].startswith(ROOT + os.sep):
        rel = os.path.relpath(argv[0], ROOT)
        # A module of a package (lab/table.py) was run as `python -m lab.table`.
        if os.path.exists(os.path.join(os.path.dirname(argv[0]), "__init__.py")) and rel.endswith(".py"):
            return "python -m " + " ".join([rel[:-3].replace(os.sep, ".")] + [shlex.quote(a) for a in argv[1:]])
        argv[0] = rel
    return "python " + " ".join(shlex.quote(a) for a in argv)


class Recorder:
    """Measures the matmul peak at construction and at ``write``; collects figures on the way.

        rec = Recorder("quickstart", "Quick start (§5.5)")
        ... run, save figures with rec.figure_path("quickstart.png") ...
        rec.write(metrics, seeds=[0], n=512, tables=[...])
    """

    def __init__(self, experiment: str, title: str, device: str = "cpu", argv=None):
        self.experiment, self.title, self.device = experiment, title, device
        self.command = command_line(argv)
        self.t0 = time.time()
        self.gflops_before = matmul_gflops()
        self.figures: list[str] = []

    def figure_path(self, name: str) -> str:
        os.makedirs(FIGURES, exist_ok=True)
        self.figures.append(f"figures/{name}")
        return os.path.join(FIGURES, name)

    def write(self, metrics: dict, *, seeds, n, tables=(), notes=(), path: str | None = None, **extra) -> str:
        """Write results/<experiment>.json atomically; return its path. ``tables``: dicts of
        {title, columns, rows} with rows already formatted; ``notes``: sentences computed from the
        metrics (never typed by hand)."""
        doc = {
            "experiment": self.experiment,
            "title": self.title,
            "command": self.command,
            **git_state(),
            "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "torch": torch.__version__,
            "device": self.device,
            "cpu": cpu_model(),
            "threads": torch.get_num_threads(),
            "matmul_gflops": [round(self.gflops_before), round(matmul_gflops())],
            "wall_seconds": round(time.time() - self.t0, 1),
            "seeds": seeds if isinstance(seeds, dict) else list(seeds),
            "n": n,
            "metrics": metrics,
            "tables": list(tables),
            "notes": list(notes),
            "figures": self.figures,
            **extra,
        }
        path = path or os.path.join(HERE, f"{self.experiment}.json")
        tmp = path + ".tmp"
        with open(tmp, "w") as f:
            json.dump(doc, f, indent=1, default=_plain)
            f.write("\n")
        os.replace(tmp, path)
        return path


def _plain(o):
    if hasattr(o, "item"):
        return o.item()
    if hasattr(o, "tolist"):
        return o.tolist()
    return str(o)


def mean_std(values, pct: bool = False, digits: int = 1) -> str:
    """'m ± s' over seeds (population std, as numpy's default), in % when ``pct``; one value alone
    is shown without a spread."""
    import numpy as np
    v = np.asarray(values, dtype=float)
    scale, unit = (100, " %") if pct else (1, "")
    return f"{scale * v.mean():.{digits}f}{unit}" + (f" ± {scale * v.std():.{digits}f}" if v.size > 1 else "")

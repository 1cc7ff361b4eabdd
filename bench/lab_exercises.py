"""LAB.md's exercises, each timed as a student runs it (results/lab_exercises.json).

    python bench/lab_exercises.py [--from-run runs/circles] [--only 2,3,4] [--scratch runs/lab_exercises]

Reads the commands of every exercise from LAB.md itself (its ```bash blocks, `&&` chains split), so
the times belong to the commands printed there. Every ``runs/...`` path is moved under --scratch, so
nothing of yours is overwritten and no cached sample makes an exercise look free. Exercise 1 (the
quick start, timed by bench/quickstart.py) is skipped when --from-run names a trained circles run:
its checkpoints are copied to <scratch>/circles and the later exercises start from them, as they
would after exercise 1. After each ``evaluate.py`` command the accuracy, one-disc and zero-or-two
rates and histogram MSE / KLD of the methods it wrote are read from the run's metrics.json.

With --only, the exercises not named keep their entries from the existing
results/lab_exercises.json, each with the provenance of the call that measured it (command, commit,
date, matmul peak), so the file can be completed one exercise at a time.
"""
import argparse
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from results.record import Recorder  # noqa: E402

CHECKPOINTS = ("ddpm.pt", "classifier.pt", "classifier_sn.pt")
KEYS = ("accuracy", "one_disc", "zero_or_two", "hist_mse", "hist_kld")


def exercises(text: str) -> dict:
    """{number: (title, [argv, ...])} of LAB.md's numbered sections, in order."""
    out = {}
    for m in re.finditer(r"^## (\d+)\. (.+?)\n(.*?)(?=^## |\Z)", text, flags=re.S | re.M):
        cmds = [shlex.split(c) for block in re.findall(r"```bash\n(.*?)```", m.group(3), flags=re.S)
                for line in block.strip().splitlines() for c in line.split("&&")]
        out[int(m.group(1))] = (m.group(2).strip(), cmds)
    return out


def relocate(argv: list, scratch: str) -> list:
    """Every word naming a path under runs/ moved under ``scratch``; a train.py without --out gets
    its default, runs/circles, moved there too."""
    out = [os.path.join(scratch, w[len("runs/"):]) if w.startswith("runs/") else w for w in argv]
    if len(out) > 1 and out[1] == "train.py" and "--out" not in out:
        out += ["--out", os.path.join(scratch, "circles")]
    return out


def evaluated(argv: list) -> tuple:
    """(run, methods) an evaluate.py command writes to metrics.json, else (None, ())."""
    if len(argv) < 2 or argv[1] != "evaluate.py" or "--run" not in argv:
        return None, ()
    run = argv[argv.index("--run") + 1]
    methods = argv[argv.index("--methods") + 1].split(",") if "--methods" in argv else ()
    return run, tuple(methods)


def earlier(path: str, keep) -> dict:
    """{exercise: entry} of an existing results file for the exercises in ``keep``, each entry tagged
    with the provenance of the call that measured it (kept when it already carries one)."""
    if not os.path.exists(path):
        return {}
    with open(path) as f:
        doc = json.load(f)
    prov = {q: doc.get(q) for q in ("command", "commit", "date", "matmul_gflops")}
    return {int(k): {**v, "measured_by": v.get("measured_by", prov)}
            for k, v in doc.get("metrics", {}).items() if int(k) in keep}


def row(k: int, entry: dict) -> list:
    measured = entry["measured"]
    return [k, entry["title"], f"{entry['seconds'] / 60:.1f} min",
            "; ".join(f"{name}: {100 * v['accuracy']:.1f} %" for name, v in measured.items()) or "–"]


def provenance_notes(results: dict) -> list:
    """One sentence per earlier call whose exercises this file keeps."""
    calls = {}
    for k, v in sorted(results.items()):
        if "measured_by" in v:
            calls.setdefault(json.dumps(v["measured_by"], sort_keys=True), []).append(k)
    notes = []
    for key, ks in calls.items():
        m = json.loads(key)
        gf = m.get("matmul_gflops") or ["?", "?"]
        notes.append(f"Exercises {', '.join(map(str, ks))} were measured by an earlier call, `{m['command']}` "
                     f"({m['date']}, commit {str(m['commit'])[:7]}, matmul {gf[0]} → {gf[1]} GFLOP/s).")
    return notes


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--from-run", default="runs/circles", help="a trained circles run (exercise 1's); "
                   "'none' runs exercise 1 as well")
    p.add_argument("--only", default="", help="comma-separated exercise numbers (default: all)")
    p.add_argument("--scratch", default="runs/lab_exercises")
    a = p.parse_args(argv)
    os.chdir(ROOT)
    with open("LAB.md", encoding="utf-8") as f:
        todo = exercises_all = exercises(f.read())
    if a.only:
        todo = {k: v for k, v in todo.items() if str(k) in a.only.split(",")}
    if os.path.isdir(a.scratch):
        shutil.rmtree(a.scratch)
    os.makedirs(a.scratch)
    if a.from_run != "none":
        missing = [c for c in CHECKPOINTS if not os.path.exists(os.path.join(a.from_run, c))]
        if missing:
            p.error(f"--from-run {a.from_run} lacks {', '.join(missing)}; train it (LAB.md exercise 1) "
                    "or pass --from-run none")
        os.makedirs(os.path.join(a.scratch, "circles"))
        for c in CHECKPOINTS:
            shutil.copy(os.path.join(a.from_run, c), os.path.join(a.scratch, "circles", c))
        todo.pop(1, None)
    rec = Recorder("lab_exercises", "LAB.md's exercises, timed as printed")
    out_path = os.path.join(ROOT, "results", "lab_exercises.json")
    results = earlier(out_path, set(exercises_all) - set(todo) - {1}) if a.only else {}
    for k, (title, cmds) in todo.items():
        t0, measured = time.time(), {}
        for cmd in cmds:
            cmd = relocate(cmd, a.scratch)
            subprocess.run([sys.executable] + cmd[1:], check=True)
            run, methods = evaluated(cmd)
            if run:
                with open(os.path.join(run, "metrics.json")) as f:
                    m = json.load(f)
                lam = cmd[cmd.index("--lambdas") + 1] if "--lambdas" in cmd else "30,30"
                for meth in methods or [x for x in m if isinstance(m[x], dict)]:
                    if isinstance(m.get(meth), dict) and "accuracy" in m[meth]:
                        measured[f"{meth} λ={lam}"] = {q: m[meth].get(q) for q in KEYS}
        secs = round(time.time() - t0, 1)
        results[k] = {"title": title, "seconds": secs, "commands": [" ".join(c) for c in cmds], "measured": measured}
        print(f"exercise {k}: {secs / 60:.1f} min", flush=True)
        results = dict(sorted(results.items()))
        rec.write(results, seeds=[0], n="as printed in LAB.md", path=out_path, tables=[{
            "title": "time per exercise (runs/ moved under the scratch folder; exercise 1: results/quickstart.json)",
            "columns": ["exercise", "title", "time", "accuracy (middle, one disc) of what it evaluated"],
            "rows": [row(k, v) for k, v in results.items()]}], notes=provenance_notes(results),
                  compute_seconds=sum(v["seconds"] for v in results.values()))
    print(f"wrote {os.path.join('results', 'lab_exercises.json')}")


if __name__ == "__main__":
    main()

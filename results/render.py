"""Render RESULTS.md from results/*.json (the only way RESULTS.md is written), and the result
blocks of README.md and LAB.md.

    python results/render.py           # write RESULTS.md, refresh the blocks in README.md and LAB.md
    python results/render.py --check   # exit 1 if any of them differs from what would be written

RESULTS.md: one section per experiment, in the order of ORDER (then any other file, alphabetically);
its anchor is the experiment name, so the docs cite e.g. RESULTS.md#quickstart.
README.md / LAB.md quote numbers only inside blocks that this script fills:
    <!-- results quickstart table 0 -->  ...  <!-- /results -->     (table 0 of results/quickstart.json)
    <!-- results quickstart provenance -->  ...  <!-- /results -->  (its command, commit and machine)
    <!-- results all index -->  ...  <!-- /results -->               (every experiment: command, time, anchor)
so a quoted number cannot drift from its JSON file.
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import re
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
TARGET = os.path.join(ROOT, "RESULTS.md")
DOCS = [os.path.join(ROOT, "README.md"), os.path.join(ROOT, "LAB.md")]
BLOCK = re.compile(r"(<!-- results (\S+) (table \d+|provenance|notes|index) -->\n)(.*?)(<!-- /results -->)", re.S)
# Paper order: §5.5 circles first, then its variants and the appendix, CelebA stand-in, the lab, speed.
ORDER = ["quickstart", "circles_table", "guided_ddim", "cfg_matched", "dit_curve", "edit_sweep",
         "synthetic_property_circles", "antialias", "circles64", "variants", "mouth_readout", "faces_pipeline",
         "faces_seeds", "faces_square", "faces_slerp", "faces_edit", "faces_cfg", "synthetic_property_faces",
         "lab", "lab_exercises", "train_speed", "speed_ideas"]

HEADER = """# Results

Every number below is read from `results/<experiment>.json`, written by the command shown with
it; this file is rendered from those files by `python results/render.py` and is never edited by hand
(`python results/render.py --check` fails when it differs). Each section gives the git commit the
numbers were measured at (`+dirty` when tracked files had changed), the CPU and the fp32 matmul
GFLOP/s measured in the same run, before → after: a drop means the machine was shared, and wall
times are then longer than the machine's own. Standard deviations are population std over the
seeds or pairs named.
"""


def load(results_dir: str = HERE) -> list[dict]:
    docs = []
    for path in glob.glob(os.path.join(results_dir, "*.json")):
        with open(path) as f:
            docs.append(json.load(f))
    rank = {name: i for i, name in enumerate(ORDER)}
    return sorted(docs, key=lambda d: (rank.get(d["experiment"], len(ORDER)), d["experiment"]))


def _cell(v) -> str:
    return str(v).replace("|", "\\|").replace("\n", " ")


def table(t: dict) -> list[str]:
    lines = [f"**{t['title']}**", ""] if t.get("title") else []
    lines.append("| " + " | ".join(_cell(c) for c in t["columns"]) + " |")
    lines.append("|" + "---|" * len(t["columns"]))
    lines += ["| " + " | ".join(_cell(c) for c in row) + " |" for row in t["rows"]]
    return lines + [""]


def _time(d: dict) -> str:
    g = d.get("matmul_gflops") or []
    # A driver that re-reads earlier stages records their compute time (None: not all recorded).
    wall = d["compute_seconds"] if "compute_seconds" in d else d.get("wall_seconds")
    return (f"{wall / 60:.0f} min" if isinstance(wall, (int, float)) else "–") + \
        (f" ({min(g)}–{max(g)})" if g and min(g) != max(g) else f" ({g[0]})" if g else "")


def provenance(d: dict) -> str:
    commit = (d.get("commit") or "unknown")[:8] + ("+dirty" if d.get("dirty") else "")
    g = d.get("matmul_gflops") or []
    peak = " → ".join(str(x) for x in g) if g else "not measured"
    wall = d.get("wall_seconds")
    wall = f"{wall / 60:.1f} min" if isinstance(wall, (int, float)) else "–"
    seeds = d.get("seeds") or []
    seeds = "; ".join(f"{k} {', '.join(map(str, v))}" for k, v in seeds.items()) if isinstance(seeds, dict) \
        else ", ".join(map(str, seeds)) or "–"
    return (f"commit `{commit}` · {d.get('date', '?')} · torch {d.get('torch', '?')} · {d.get('device', '?')}"
            f" ({d.get('cpu', '?')}, {d.get('threads', '?')} threads) · matmul {peak} GFLOP/s · "
            f"wall {wall} · seeds {seeds} · n {d.get('n', '–')}")


def section(d: dict) -> list[str]:
    lines = [f'<a id="{d["experiment"]}"></a>', f"## {d['title']}", "", f"`{d['command']}`", "",
             provenance(d), ""]
    for t in d.get("tables", []):
        lines += table(t)
    lines += [f"- {n}" for n in d.get("notes", [])]
    if d.get("notes"):
        lines.append("")
    lines += [f"![{os.path.basename(fig)}](results/{fig})" for fig in d.get("figures", [])]
    if d.get("figures"):
        lines.append("")
    return lines


def render(results_dir: str = HERE) -> str:
    docs = load(results_dir)
    lines = [HEADER, "| experiment | section |", "|---|---|"]
    lines += [f"| [{d['experiment']}](#{d['experiment']}) | {d['title']} |" for d in docs]
    lines.append("")
    for d in docs:
        lines += section(d)
    return "\n".join(lines).rstrip() + "\n"


def fill(text: str, docs: list[dict]) -> str:
    """``text`` with every result block re-rendered from its experiment's JSON."""
    by_name = {d["experiment"]: d for d in docs}

    def block(m):
        name, what = m.group(2), m.group(3)
        d = by_name.get(name)
        if what == "index":  # every experiment: what it is, its command, its time, its anchor
            body = table({"columns": ["experiment", "command", "CPU time (matmul GFLOP/s)", "details"],
                          "rows": [[x["title"], f"`{x['command']}`", _time(x), f"[{x['experiment']}]"
                                    f"(RESULTS.md#{x['experiment']})"] for x in docs]})[:-1]
        elif d is None:
            body = [f"*Not measured with the current code yet (no results/{name}.json).*"]
        elif what == "provenance":
            body = [f"`{d['command']}` — " + provenance(d) + f" ([details](RESULTS.md#{name}))"]
        elif what == "notes":
            body = [f"- {n}" for n in d.get("notes", [])]
        else:
            k = int(what.split()[1])
            tables = d.get("tables", [])
            body = table(tables[k])[:-1] if k < len(tables) else [f"*results/{name}.json has no table {k}.*"]
        return m.group(1) + "\n".join(body) + "\n" + m.group(5)
    return BLOCK.sub(block, text)


def outputs(results_dir: str, target: str, docs_paths) -> dict:
    """{path: text it should hold}: RESULTS.md, and every doc that has result blocks."""
    docs = load(results_dir)
    out = {target: render(results_dir)}
    for path in docs_paths:
        if os.path.exists(path):
            with open(path) as f:
                out[path] = fill(f.read(), docs)
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--check", action="store_true", help="exit 1 if RESULTS.md is not what would be written")
    p.add_argument("--results", default=HERE, help="folder of the JSON files")
    p.add_argument("--target", default=TARGET, help="the Markdown file to write or check")
    p.add_argument("--docs", default=",".join(DOCS), help="comma-separated docs whose result blocks are filled")
    a = p.parse_args(argv)
    want = outputs(a.results, a.target, [d for d in a.docs.split(",") if d])
    if a.check:
        stale = []
        for path, text in want.items():
            try:
                with open(path) as f:
                    current = f.read()
            except OSError:
                current = None
            if current != text:
                stale.append(os.path.relpath(path, ROOT))
        if stale:
            print(f"{', '.join(stale)} differ{'s' if len(stale) == 1 else ''} from what results/render.py makes of "
                  f"{os.path.relpath(a.results, ROOT)}/*.json: run python results/render.py", file=sys.stderr)
            return 1
        print("RESULTS.md and the result blocks of the docs are up to date")
        return 0
    for path, text in want.items():
        with open(path, "w") as f:
            f.write(text)
    print(f"wrote {', '.join(os.path.relpath(p, ROOT) for p in want)} from {len(load(a.results))} result files")
    return 0

if __name__ == "__main__":
    sys.exit(main())

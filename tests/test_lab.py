"""LAB.md: every command of every exercise parses with the script or module it names (a dry run:
the parser, not the training), and every exercise names a figure and asks a question."""
import importlib
import importlib.util
import json
import os
import re
import shlex

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LAB = open(os.path.join(ROOT, "LAB.md"), encoding="utf-8").read()


def commands():
    """(script, argv) of every command in LAB.md's bash blocks, `&&` chains split; a module run
    with ``python -m lab.x`` is given as "-m lab.x"."""
    out = []
    for block in re.findall(r"```bash\n(.*?)```", LAB, flags=re.S):
        for line in block.strip().splitlines():
            for cmd in line.split("&&"):
                words = shlex.split(cmd)
                assert words[0] == "python", cmd
                if words[1] == "-m":
                    out.append(("-m " + words[2], words[3:]))
                else:
                    out.append((words[1], words[2:]))
    return out


def path_of(script):
    """The file a command runs: a script path, or lab/x.py for "-m lab.x"."""
    if script.startswith("-m "):
        return os.path.join(ROOT, *script[3:].split(".")) + ".py"
    return os.path.join(ROOT, script)


def load(script):
    if script.startswith("-m "):
        return importlib.import_module(script[3:])
    spec = importlib.util.spec_from_file_location("lab_" + script.replace("/", "_")[:-3],
                                                  os.path.join(ROOT, script))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_lab_has_six_to_eight_exercises_each_with_a_command_a_figure_and_a_question():
    sections = re.split(r"\n## \d+\. ", LAB)[1:]
    assert 6 <= len(sections) <= 8
    for s in sections:
        assert "```bash" in s and ".png" in s and "*Question.*" in s, s[:80]


@pytest.mark.parametrize("script,argv", commands(), ids=lambda v: v if isinstance(v, str) else " ".join(v))
def test_lab_command_parses(script, argv):
    assert os.path.exists(path_of(script)), f"LAB.md runs {script}, which does not exist"
    parser = load(script).build_parser()
    # parse_args exits (SystemExit 2) on an unknown flag or a value of the wrong type.
    args = parser.parse_args(argv)
    typed = {a.lstrip("-").replace("-", "_") for a in argv if a.startswith("--")}
    assert typed <= set(vars(args)), typed - set(vars(args))


def test_lab_exercises_bench_reads_every_exercise_and_moves_every_run_path():
    spec = importlib.util.spec_from_file_location("lab_exercises", os.path.join(ROOT, "bench", "lab_exercises.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    ex = mod.exercises(LAB)
    assert sorted(ex) == list(range(1, len(ex) + 1)) and len(ex) == len(re.findall(r"\n## \d+\. ", LAB))
    assert sum(len(c) for _, c in ex.values()) == len(commands())
    moved = [mod.relocate(c, "S") for _, cs in ex.values() for c in cs]
    assert not any(w.startswith("runs/") for c in moved for w in c)
    assert mod.relocate(["python", "train.py", "--dataset", "circles"], "S")[-2:] == ["--out", os.path.join("S", "circles")]
    assert mod.evaluated(["python", "evaluate.py", "--run", "S/c", "--methods", "multi,multi_sn"]) == ("S/c", ("multi", "multi_sn"))


def test_lab_exercises_only_keeps_the_other_exercises_with_their_own_provenance(tmp_path):
    spec = importlib.util.spec_from_file_location("lab_exercises", os.path.join(ROOT, "bench", "lab_exercises.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    path = tmp_path / "lab_exercises.json"
    entry = {"title": "t", "seconds": 90.0, "commands": [], "measured": {}}
    old = {"command": "python bench/lab_exercises.py --only 2,3", "commit": "abcdef0123", "date": "d",
           "matmul_gflops": [130, 170], "metrics": {"2": entry, "3": {**entry, "measured_by": {
               "command": "older", "commit": "1234567", "date": "e", "matmul_gflops": [1, 2]}}}}
    path.write_text(json.dumps(old))
    kept = mod.earlier(str(path), {2, 3, 4})
    assert sorted(kept) == [2, 3]
    assert kept[2]["measured_by"]["command"] == old["command"] and kept[3]["measured_by"]["command"] == "older"
    notes = mod.provenance_notes({**kept, 4: entry})
    assert len(notes) == 2 and "Exercises 2 " in notes[0] + notes[1] and "commit abcdef0" in " ".join(notes)
    assert mod.row(2, kept[2])[2] == "1.5 min" and mod.earlier(str(tmp_path / "none.json"), {2}) == {}

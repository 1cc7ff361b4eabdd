"""results/: the provenance every quoted number carries, and RESULTS.md rendered from it."""
import json
import os
import shutil
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from results import render  # noqa: E402
from results.record import Recorder, mean_std  # noqa: E402


def test_results_md_is_what_render_writes():
    """The committed RESULTS.md is exactly the rendering of the committed results/*.json."""
    r = subprocess.run([sys.executable, os.path.join(ROOT, "results", "render.py"), "--check"],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr


def test_a_hand_edit_of_results_md_fails_the_check(tmp_path):
    target = tmp_path / "RESULTS.md"
    shutil.copy(os.path.join(ROOT, "RESULTS.md"), target)
    assert render.main(["--check", "--target", str(target)]) == 0
    text = target.read_text()
    target.write_text(text.replace("%", " %", 1) if "%" in text else text + "edited\n")
    assert render.main(["--check", "--target", str(target)]) == 1


def test_recorder_writes_provenance_and_render_shows_it(tmp_path, monkeypatch):
    rec = Recorder("toy", "A toy experiment", argv=[os.path.join(ROOT, "bench", "x.py"), "--n", "4"])
    path = rec.write({"acc": 0.5}, seeds=[0, 1], n=4, path=str(tmp_path / "toy.json"),
                     tables=[{"title": "t", "columns": ["a", "b|c"], "rows": [[1, "x"]]}], notes=["a note"])
    d = json.load(open(path))
    for key in ("command", "commit", "dirty", "date", "torch", "device", "cpu", "threads", "matmul_gflops",
                "seeds", "n", "metrics", "wall_seconds"):
        assert key in d, key
    assert d["command"] == "python bench/x.py --n 4"
    assert len(d["matmul_gflops"]) == 2 and all(g > 0 for g in d["matmul_gflops"])
    text = render.render(str(tmp_path))
    assert '<a id="toy"></a>' in text and "## A toy experiment" in text and "`python bench/x.py --n 4`" in text
    assert "| a | b\\|c |" in text and "| 1 | x |" in text and "- a note" in text
    assert "seeds 0, 1 · n 4" in text


def test_mean_std_is_population_std_in_percent():
    assert mean_std([0.90, 0.96], pct=True) == "93.0 % ± 3.0"
    assert mean_std([1.0, 2.0, 3.0], digits=2) == "2.00 ± 0.82"
    assert mean_std([0.947], pct=True) == "94.7 %" and mean_std([0.16], digits=3) == "0.160"  # one seed: no spread


def test_doc_blocks_are_filled_from_json_and_a_hand_edit_is_caught(tmp_path):
    rec = Recorder("toy", "A toy experiment", argv=["bench/x.py"])
    rec.write({}, seeds=[0], n=1, path=str(tmp_path / "toy.json"),
              tables=[{"title": "", "columns": ["acc"], "rows": [["93.0 %"]]}])
    doc = tmp_path / "DOC.md"
    doc.write_text("intro\n<!-- results toy table 0 -->\nstale\n<!-- /results -->\n"
                   "<!-- results gone table 0 -->\n<!-- /results -->\nend\n")
    args = ["--results", str(tmp_path), "--target", str(tmp_path / "R.md"), "--docs", str(doc)]
    assert render.main(["--check"] + args) == 1
    assert render.main(args) == 0
    text = doc.read_text()
    assert "| acc |\n|---|\n| 93.0 % |\n<!-- /results -->" in text and "stale" not in text
    assert "no results/gone.json" in text and text.startswith("intro\n") and text.endswith("end\n")
    assert render.main(["--check"] + args) == 0
    doc.write_text(text.replace("93.0 %", "95.0 %"))
    assert render.main(["--check"] + args) == 1


def test_command_line_is_what_a_user_types_from_the_repository_root():
    from results.record import ROOT as R, command_line
    assert command_line([os.path.join(R, "bench", "quickstart.py"), "--out", "runs/x y"]) == \
        "python bench/quickstart.py --out 'runs/x y'"
    assert command_line([os.path.join(R, "lab", "table.py"), "--n", "8"]) == "python -m lab.table --n 8"

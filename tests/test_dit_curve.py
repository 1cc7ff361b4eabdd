"""bench/dit_curve.py (App. J): a DiT trained in chunks of one schedule, its clean-sample rate after
each chunk, the stop rules, and the multi-guided accuracy of the final model, on a tiny config."""
import json
import os
import sys

import pytest

from checkpoint import load_checkpoint
from conftest import one_line_error
from results import record
from test_dit import TINY_DIT

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "bench"))
import dit_curve  # noqa: E402

TINY = [f for f in TINY_DIT if f not in ("--arch", "dit")]


@pytest.fixture
def results_dir(tmp_path, monkeypatch):
    monkeypatch.setattr(record, "HERE", str(tmp_path))
    monkeypatch.setattr(record, "FIGURES", str(tmp_path / "figures"))
    monkeypatch.setattr(record, "matmul_gflops", lambda: 1.0)
    return tmp_path


def test_chunks_keep_one_schedule_and_the_curve_resumes(tiny_run, results_dir, tmp_path):
    out = str(tmp_path / "dit")
    args = ["--out", out, "--clf", tiny_run, "--steps", "6", "--chunk", "3", "--n", "4", "--n-final", "4"] + TINY
    one_line_error(lambda: dit_curve.main(args[:2] + ["--clf", str(tmp_path / "none")] + args[4:]),
                   "classifier.pt", "--clf")
    dit_curve.main(args + ["--target", "1.0"])
    d = json.load(open(results_dir / "dit_curve.json"))
    curve = d["metrics"]["curve"]
    assert [c["step"] for c in curve] == [3, 6] and curve[0]["minutes"] <= curve[1]["minutes"]
    assert all(0 <= c["one_disc"] <= 1 and abs(sum(c[k] for k in ("one_disc", "zero_disc", "two_plus_disc", "blob"))
                                               - 1) < 1e-9 for c in curve)
    ck = load_checkpoint(out, "ddpm")
    assert ck["step"] == 6 and ck["config"]["train"]["steps"] == 6 and ck["config"]["unet"]["arch"] == "dit"
    assert d["metrics"]["stopped"] == "ended its schedule" or curve[-1]["one_disc"] >= 1.0
    final = d["metrics"]["final"]
    assert list(final) == ["unguided", "multi λ = [30,30]"] and all(0 <= m["accuracy"] <= 1 for m in final.values())
    assert os.path.islink(os.path.join(out, "classifier.pt"))
    assert os.path.exists(results_dir / "figures" / "dit_curve.png")
    assert len(d["tables"][0]["rows"]) == 2 and d["seeds"]["classifier pair"] == [tiny_run]
    # Called again, with a longer schedule and a target the last point meets: nothing is trained.
    before = os.path.getmtime(os.path.join(out, "ddpm.pt"))
    dit_curve.main(args[:4] + ["--steps", "12", "--chunk", "3", "--n", "4", "--n-final", "4", "--target", "0"] + TINY)
    d = json.load(open(results_dir / "dit_curve.json"))
    assert [c["step"] for c in d["metrics"]["curve"]] == [3, 6] and d["metrics"]["stopped"] == "reached the target"
    assert os.path.getmtime(os.path.join(out, "ddpm.pt")) == before

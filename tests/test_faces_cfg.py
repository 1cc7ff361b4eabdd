"""Classifier-free multi-guidance on the face stand-in (App. J, Fig. S19b): a class-conditional CelebA
run trains on an index list, evaluate.py measures its ``cfg`` row at the classifier's per-class
strength, bench/faces_cfg.py runs end to end, and the unsupported combinations are one line."""
import json
import os
import sys

import numpy as np
import pytest

import evaluate
import toy_faces
import train
from checkpoint import load_checkpoint
from conftest import TINY, one_line_error
from results import record
from test_evaluate_faces import _eval_clf

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FAST = ["--n", "4", "--batch-size", "4", "--steps", "3", "--device", "cpu", "--zreg-steps", "2"]


@pytest.fixture(scope="module")
def stand_in(tmp_path_factory):
    """faces_pipeline's layout in miniature: DATA, ROOT/filter/{index.txt, eval_Smiling.pt} and the
    classifier-guided run ROOT/faces."""
    root = tmp_path_factory.mktemp("faces_cfg")
    data = str(root / "data")
    toy_faces.make_toy_faces(data, n=40, seed=2)
    filt = root / "filter"
    filt.mkdir()
    (filt / "index.txt").write_text("".join(f"{i}\n" for i in range(10)))
    _eval_clf(data, "Smiling", str(filt / "eval_Smiling.pt"))
    common = ["--dataset", "celeba", "--data-dir", data, "--index-list", str(filt / "index.txt"), "--steps", "3",
              "--clf-steps", "2", "--no-grid", "--device", "cpu"] + TINY
    train.main(common + ["--out", str(root / "faces")])
    cond = str(root / "cond")
    train.main(common + ["--out", cond, "--model", "ddpm", "--class-cond"])
    return {"root": str(root), "data": data, "filter": str(filt), "faces": str(root / "faces"), "cond": cond}


def test_class_conditional_faces_run_and_its_cfg_row(stand_in, capsys):
    run = stand_in["cond"]
    ck = load_checkpoint(run, "ddpm")
    assert ck["config"]["unet"]["class_cond"] and ck["config"]["data"]["index_list"].endswith("index.txt")
    assert ck["ema"]["label_embed.table.weight"].shape[0] == 3      # Smiling 0 / 1 and the null label
    # By default: the null label and cfg; multi is skipped (no classifier), with one line saying so.
    evaluate.main(["--run", run, "--lambdas", "59,59"] + FAST)
    out = capsys.readouterr().out
    assert "skipped multi" in out and "classifier.pt" in out
    m = json.load(open(os.path.join(run, "metrics.json")))
    assert set(m) == {"uncond", "cfg", "train"} and m["cfg"]["n"] == 4 and m["train"]["n"] == 10
    # λ = 59 on two classes: (1 + λ) / M = 30 per class, the classifier's λ = [30, 30].
    c = m["cfg"]
    assert c["lambdas"] == "59,59" and c["cfg_lambda"] == 59.0 and c["cfg_form"] == "affine"
    assert c["cfg_null_weight"] == -59.0 and c["cfg_average_weight"] == 60.0 and c["cfg_class_weights"] == [0.5, 0.5]
    assert c["cfg_average_weight"] * c["cfg_class_weights"][0] == 30.0
    for row in m.values():
        assert np.isfinite(row["hist_kld"]) and 0 <= row["z_frac_03_07"] <= 1 and "mouth_mild" in row
    assert "cfg_form" not in m["uncond"]
    settings = json.loads(str(np.load(os.path.join(run, "eval_cfg.npz"))["settings"]))
    assert settings["lambdas"] == "59,59" and settings["cfg_form"] == "affine"
    assert os.path.exists(os.path.join(run, "grid_cfg.png"))
    # Another form is another cache key, and is recorded.
    again = evaluate.evaluate_run(run, 4, 4, 0, "59,59", 3, ["cfg"], "cpu", figures=False, write_metrics=False,
                                  log=lambda *_: None, zreg_steps=2, cfg_form="printed")
    assert again["cfg"]["cfg_form"] == "printed" and again["cfg"]["cfg_average_weight"] == -58.0


def test_unsupported_combinations_are_one_line(stand_in):
    cond, plain = stand_in["cond"], stand_in["faces"]
    one_line_error(lambda: evaluate.main(["--run", plain, "--methods", "cfg"] + FAST), "method cfg", "--class-cond")
    one_line_error(lambda: evaluate.main(["--run", cond, "--methods", "uncond,multi"] + FAST),
                   "classifier.pt", "--model classifier")
    one_line_error(lambda: evaluate.main(["--run", cond, "--sweep", "30", "--cfg-form", "printed"] + FAST),
                   "--sweep", "drop --cfg-form")
    one_line_error(lambda: evaluate.main(["--run", cond, "--methods", "uncond", "--cfg-form", "printed"] + FAST),
                   "--cfg-form", "cfg method")


@pytest.fixture
def recorded(tmp_path, monkeypatch):
    """results/record.py writing into tmp_path (JSON and figures), without timing a matmul."""
    sys.path.insert(0, os.path.join(ROOT, "bench"))
    monkeypatch.setattr(record, "HERE", str(tmp_path))
    monkeypatch.setattr(record, "FIGURES", str(tmp_path / "figures"))
    monkeypatch.setattr(record, "matmul_gflops", lambda: 1.0)


def test_faces_cfg_bench_end_to_end(stand_in, tmp_path, recorded):
    import faces_cfg
    root, data = stand_in["root"], stand_in["data"]
    one_line_error(lambda: faces_cfg.main(["--root", str(tmp_path / "none"), "--data", data]), "faces_pipeline.py")
    tiny = ["--root", root, "--data", data, "--n", "4", "--zreg-steps", "2", "--steps", "3"] + TINY
    faces_cfg.main(tiny)
    d = json.load(open(tmp_path / "faces_cfg.json"))
    rows = list(d["metrics"])
    assert rows == ["cfg, null label (unguided)", "cfg λ = 30 (per class 15.5)", "cfg λ = 59 (per class 30)",
                    "classifier multi λ = [30, 30]", "train (filtered extremes)"]
    m = d["metrics"]
    assert m[rows[2]]["cfg_lambda"] == 59.0 and m[rows[1]]["lambdas"] == "30,30" and m[rows[3]]["lambdas"] == "30,30"
    for r in m.values():
        assert 0 <= r["edge_p"] <= 1 and np.isfinite(r["hist_kld"]) and r["mouth_n"] == r["n"]
    assert os.path.exists(tmp_path / "figures" / "faces_cfg.png") and d["figures"] == ["figures/faces_cfg.png"]
    assert os.path.exists(os.path.join(root, "faces_cfg", "eval_cfg_59.npz"))
    # A later call keeps the trained DDPM (train.py --resume skips a finished model).
    run = os.path.join(root, "faces_cfg")
    before = os.path.getmtime(os.path.join(run, "ddpm.pt"))
    faces_cfg.ensure_cfg_run(run, data, os.path.join(stand_in["filter"], "index.txt"), 0, ["--steps", "3"] + TINY)
    assert os.path.getmtime(os.path.join(run, "ddpm.pt")) == before


def test_faces_seeds_bench_end_to_end(stand_in, tmp_path, recorded):
    """bench/faces_seeds.py: seed 0 is the pipeline's run, seed 1 is trained beside it; mean ± std per method."""
    import faces_seeds
    root, data = stand_in["root"], stand_in["data"]
    one_line_error(lambda: faces_seeds.main(["--root", root, "--data", data, "--seeds", "0,x"]), "--seeds")
    one_line_error(lambda: faces_seeds.main(["--root", str(tmp_path / "none"), "--data", data]), "faces_pipeline.py")
    faces_seeds.main(["--root", root, "--data", data, "--seeds", "0,1", "--n", "4", "--zreg-steps", "2",
                      "--steps", "3", "--clf-steps", "2"] + TINY)
    assert load_checkpoint(os.path.join(root, "faces_seed1"), "ddpm")["config"]["train"]["seed"] == 1
    d = json.load(open(tmp_path / "faces_seeds.json"))
    assert d["seeds"]["ddpm"] == [0, 1] and set(d["metrics"]["per_seed"]) == {"0", "1"}
    s = d["metrics"]["summary"]
    assert set(s) == {"uncond", "multi", "train"}
    for row in s.values():
        assert len(row["mouth_mild"]) == 2 and all(0 <= v <= 1 for v in row["mouth_faded"] + row["z_frac_03_07"])
        total = [sum(row[k][i] for k in ("mouth_mild", "mouth_clear", "mouth_faded", "mouth_doubled", "mouth_other"))
                 for i in range(2)]
        assert total == pytest.approx([1.0, 1.0])   # the mouth classes partition the samples
    assert " ± " in d["tables"][0]["rows"][1][3]     # two seeds: a spread is shown
    assert d["figures"] == ["figures/faces_seeds.png"] and os.path.getsize(tmp_path / "figures" / "faces_seeds.png") > 1000

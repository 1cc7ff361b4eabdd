"""CelebA evaluation (evaluate_faces.py, dispatched from evaluate.py): §5.1 metrics end to end on a
tiny run, the [0.3, 0.7] fraction, the §6 2-D histogram, the App. H nearest neighbours, the λ sweep,
data_filter's --intersect, and the one-line errors."""
import json
import os

import numpy as np
import pytest
import torch

import data_filter
import evaluate
import evaluate_faces as EF
import memorisation
import toy_faces
from conftest import TINY, one_line_error

SIZE = 16


# ----- pure metrics ------------------------------------------------------------------------------

def test_fraction_and_histogram_by_hand():
    p = np.array([0.05, 0.3, 0.45, 0.5, 0.55, 0.7, 0.715, 0.95, 0.299, 1.0])
    assert EF.frac_in(p, 0.3, 0.7) == pytest.approx(0.5)     # 0.3, 0.45, 0.5, 0.55, 0.7 (closed)
    assert EF.frac_in(p, 0.4, 0.6) == pytest.approx(0.3)
    m = EF.p_metrics(p)
    assert m["frac_03_07"] == pytest.approx(0.5) and m["frac_04_06"] == pytest.approx(0.3)
    # 10 values in 10 distinct bins of 100: h = 0.1 on 10 bins -> KLD = log 10, MSE by formula
    assert m["hist_kld"] == pytest.approx(np.log(10))
    assert m["hist_mse"] == pytest.approx(np.sqrt(10 * (0.1 - 0.01) ** 2 + 90 * 0.01 ** 2))
    u = EF.p_metrics((np.arange(100) + 0.5) / 100)               # one per bin: uniform
    assert u["hist_mse"] == pytest.approx(0) and u["hist_kld"] == pytest.approx(0)
    assert np.isnan(EF.frac_in([], 0.3, 0.7))


def test_hist2d_counts_at_known_bins():
    p1 = np.array([0.01, 0.01, 0.51, 0.99, 1.0, 0.33])
    p2 = np.array([0.01, 0.01, 0.26, 0.99, 0.0, 0.72])
    h = EF.hist2d(p1, p2)                                         # rows: p1 bins of width 0.05
    assert h.shape == (20, 20) and h.sum() == 6
    assert h[0, 0] == 2 and h[10, 5] == 1 and h[19, 19] == 1 and h[19, 0] == 1 and h[6, 14] == 1
    assert EF.center_fraction(p1, p2) == 0                       # (0.51, 0.26), (0.33, 0.72): out
    assert EF.center_fraction([0.3, 0.5, 0.1], [0.7, 0.5, 0.5]) == pytest.approx(2 / 3)  # closed


def test_memorisation_finds_exact_training_image():
    rng = np.random.default_rng(0)
    train = rng.integers(0, 256, (30, 8, 8, 3), dtype=np.uint8)
    samples = rng.integers(0, 256, (5, 8, 8, 3), dtype=np.uint8)
    samples[3] = train[17]                                        # a memorised sample
    res = memorisation.memorisation(samples, train, k=8, rows=2)
    assert res["sample"][0] == 3 and res["neighbours"][0, 0] == 17 and res["distances"][0, 0] == 0
    assert res["neighbours"].shape == (2, 8) and np.all(np.diff(res["distances"][0]) >= 0)
    # chunked search (bounded memory) == brute force
    d, i = memorisation.nearest(samples, train, k=8, chunk=7)
    brute = np.sqrt(((samples.reshape(5, 1, -1).astype(float) - train.reshape(1, 30, -1)) ** 2).sum(-1))
    assert np.array_equal(i, np.argsort(brute, 1, kind="stable")[:, :8])
    assert np.allclose(d, np.sort(brute, 1)[:, :8])
    f_tr, f_s = rng.normal(size=(30, 4)), rng.normal(size=(5, 4))
    f_s[1] = f_tr[4]
    res = memorisation.memorisation(samples, train, k=3, rows=1, features=(f_s, f_tr))
    assert res["sample"][0] == 1 and res["neighbours"][0, 0] == 4 and res["distances"][0, 0] == 0


def test_intersect_lists(tmp_path):
    a, b, c = tmp_path / "a.txt", tmp_path / "b.txt", tmp_path / "c.txt"
    a.write_text("5\n3\n3\n9\n1\n")
    b.write_text("9\n2\n3\n7\n")
    data_filter.main(["--intersect", f"{a},{b}", "--out-list", str(c)])
    assert c.read_text() == "3\n9\n"
    deep = tmp_path / "new" / "dir" / "c.txt"                      # the folder is created
    data_filter.main(["--intersect", f"{a},{b}", "--out-list", str(deep)])
    assert deep.read_text() == "3\n9\n"
    one_line_error(lambda: data_filter.main(["--intersect", str(a), "--out-list", str(c)]), "two")
    b.write_text("100\n")
    one_line_error(lambda: data_filter.main(["--intersect", f"{a},{b}", "--out-list", str(c)]), "empty")


# ----- end to end on a tiny run ------------------------------------------------------------------

def _eval_clf(faces, attribute, path, size=SIZE):
    from eval_classifier import train_eval_classifier
    cfg = data_filter.FilterConfig(image_size=size, eval_steps=3, batch_size=8, clf_channels=8,
                                   clf_channel_mult=(1, 2), clf_attention_resolutions=(8,))
    train_eval_classifier(faces, attribute, size, path, cfg, "cpu", progress=False)
    return path


@pytest.fixture(scope="module")
def face_runs(tmp_path_factory):
    import train
    root = tmp_path_factory.mktemp("faces")
    faces = str(root / "faces")
    toy_faces.make_toy_faces(faces, n=60, seed=0)
    filt = root / "filter"
    filt.mkdir()
    (filt / "index.txt").write_text("".join(f"{i}\n" for i in (0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 3)))
    runs = {}
    for name, attr, index in (("smile", "Smiling", str(filt / "index.txt")), ("pair", "Smiling,Black_Hair", None)):
        out = str(root / name)
        train.main(["--dataset", "celeba", "--data-dir", faces, "--attribute", attr, "--out", out,
                    "--steps", "3", "--clf-steps", "3", "--no-grid", "--device", "cpu"] + TINY
                   + (["--index-list", index] if index else []))
        runs[name] = out
    _eval_clf(faces, "Smiling", str(filt / "eval_Smiling.pt"))
    hair = root / "filter_hair"
    hair.mkdir()
    _eval_clf(faces, "Black_Hair", str(hair / "eval_Black_Hair.pt"))
    return {"faces": faces, "filter": str(filt), "hair": str(hair), **runs}


FAST = ["--n", "6", "--batch-size", "6", "--steps", "3", "--device", "cpu", "--zreg-steps", "2"]


def test_dispatch_end_to_end(face_runs, capsys):
    run = face_runs["smile"]
    evaluate.main(["--run", run] + FAST)
    out = capsys.readouterr().out
    assert "multi" in out and "0.13 / 0.61" in out and "3.17" in out
    m = json.load(open(os.path.join(run, "metrics.json")))
    assert set(m) == {"uncond", "multi", "train"}
    assert m["train"]["n"] == 13 and m["multi"]["n"] == 6 and m["multi"]["lambdas"] == "30,30"
    for row in m.values():
        for k in ("hist_mse", "hist_kld", "frac_03_07", "frac_04_06", "mean_p", "z_frac_03_07"):
            assert np.isfinite(row[k]), (k, row)
        assert 0 <= row["frac_04_06"] <= row["frac_03_07"] <= 1
    for f in ("hist_p.png", "grid_uncond.png", "grid_multi.png", "grid_train.png", "memorisation.png",
              "memorisation_features.png", "memorisation.json", "zreg_Smiling.pt"):
        assert os.path.exists(os.path.join(run if f != "zreg_Smiling.pt" else face_runs["filter"], f)), f
    memo = json.load(open(os.path.join(run, "memorisation.json")))
    assert memo["train_images"] == 12   # the repeated index counts once
    assert len(memo["pixel"]["neighbours"][0]) == 8
    # the same call via the function reads the cached samples back
    again = evaluate.evaluate_run(run, 6, 6, 0, None, 3, None, torch.device("cpu"), figures=False,
                                  write_metrics=False, log=lambda *_: None, zreg_steps=2)
    assert again["multi"]["hist_kld"] == pytest.approx(m["multi"]["hist_kld"])


def test_sweep(face_runs, capsys):
    run = face_runs["smile"]
    evaluate.main(["--run", run, "--sweep", "3.5,30"] + FAST)
    out = capsys.readouterr().out
    assert "lambda" in out and "3.5" in out
    s = json.load(open(os.path.join(run, "sweep.json")))
    assert set(s) == {"3.5", "30"} and all(np.isfinite(v["hist_mse"]) for v in s.values())
    assert os.path.exists(os.path.join(run, "sweep.png"))


def test_two_attributes_heatmap(face_runs):
    run = face_runs["pair"]
    clfs = f"{face_runs['hair']}/eval_Black_Hair.pt,{face_runs['filter']}/eval_Smiling.pt"  # any order
    evaluate.main(["--run", run, "--eval-classifier", clfs] + FAST)
    m = json.load(open(os.path.join(run, "metrics.json")))
    assert m["multi"]["lambdas"] == "30,30,30,30"
    for row in m.values():
        h = np.array(row["heatmap_counts"])
        assert h.shape == (20, 20) and h.sum() == row["n"]
        assert 0 <= row["center_03_07"] <= 1
        assert np.isfinite(row["hist_kld_Smiling"]) and np.isfinite(row["hist_kld_Black_Hair"])
        z = np.array(row["z_heatmap_counts"])   # the stand-in: the same in regressed true latents
        assert z.shape == (20, 20) and z.sum() == row["n"] and 0 <= row["z_center_03_07"] <= 1
    for f in ("heatmap_2d.png", "heatmap_2d_z.png", "heatmap_2d_uncond.png", "heatmap_2d_z_train.png"):
        assert os.path.exists(os.path.join(run, f)), f


def test_square_readouts(face_runs, tmp_path, monkeypatch):
    """bench/faces_square.py: the Bayes curve at known points, the mild interval of an exact curve,
    and the driver end to end on the tiny two-attribute run (after its evaluation)."""
    import importlib.util
    from results import record
    spec = importlib.util.spec_from_file_location("faces_square", os.path.join(os.path.dirname(EF.__file__),
                                                                                "bench", "faces_square.py"))
    FS = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(FS)
    s = toy_faces.LABEL_NOISE
    assert FS.bayes_p([0.5, 0.5 + s, 0.5 - 2 * s]) == pytest.approx([0.5, 0.841345, 0.022750], abs=1e-6)
    z = np.linspace(0, 1, 4001)
    lo, hi = FS.mild_interval(*FS.p_of_z(z, FS.bayes_p(z)))
    assert (lo, hi) == pytest.approx((0.5 - 0.5244 * s, 0.5 + 0.5244 * s), abs=0.01)   # Φ⁻¹(0.7) = 0.5244
    assert FS.square(np.array([0.5, 0.5, 0.1]), np.array([0.4, 0.9, 0.5])) == pytest.approx(1 / 3)
    run = face_runs["pair"]
    clfs = f"{face_runs['filter']}/eval_Smiling.pt,{face_runs['hair']}/eval_Black_Hair.pt"
    if not os.path.exists(os.path.join(run, "eval_multi.npz")):
        evaluate.main(["--run", run, "--eval-classifier", clfs] + FAST)
    monkeypatch.setattr(record, "HERE", str(tmp_path))
    monkeypatch.setattr(record, "FIGURES", str(tmp_path / "figures"))
    monkeypatch.setattr(record, "matmul_gflops", lambda: 1.0)
    FS.main(["--run", run, "--eval-classifier", clfs, "--zreg-steps", "2"])
    d = json.load(open(tmp_path / "faces_square.json"))
    assert set(d["metrics"]["square"]) == {"test faces (true z uniform)", "uncond", "multi"}
    assert d["metrics"]["square"]["multi"]["n"] == 6
    for attr in ("Smiling", "Black_Hair"):
        lo, hi = d["metrics"]["interval"][attr]
        assert 0 <= lo <= hi <= 1
    assert os.path.exists(tmp_path / "figures" / "faces_square.png")


def test_errors(face_runs, tmp_path):
    run, pair = face_runs["smile"], face_runs["pair"]
    # no evaluation classifier for the run's attribute(s)
    one_line_error(lambda: evaluate.main(["--run", pair] + FAST), "eval_", "data_filter.py", "--eval-classifier")
    one_line_error(lambda: evaluate.main(["--run", run, "--eval-classifier", str(tmp_path / "x.pt")] + FAST),
                   "data_filter.py")
    # wrong attribute
    one_line_error(lambda: evaluate.main(["--run", run, "--eval-classifier",
                                          f"{face_runs['hair']}/eval_Black_Hair.pt"] + FAST),
                   "Black_Hair", "Smiling")
    # one file for two attributes
    one_line_error(lambda: evaluate.main(["--run", pair, "--eval-classifier",
                                          f"{face_runs['filter']}/eval_Smiling.pt"] + FAST), "one per attribute")
    # wrong image size
    big = _eval_clf(face_runs["faces"], "Smiling", str(tmp_path / "eval_Smiling.pt"), size=32)
    one_line_error(lambda: evaluate.main(["--run", run, "--eval-classifier", big] + FAST), "32 px", "16 px")
    one_line_error(lambda: evaluate.main(["--run", run, "--sweep", "a,b"] + FAST), "--sweep")


def test_face_flags_rejected_on_circles(tiny_run):
    one_line_error(lambda: evaluate.main(["--run", tiny_run, "--sweep", "30"] + FAST[:-2]), "--sweep", "CelebA")
    one_line_error(lambda: evaluate.main(["--run", tiny_run, "--eval-classifier", "x.pt"] + FAST[:-2]),
                   "--eval-classifier", "CelebA")

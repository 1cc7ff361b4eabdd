"""Histogram metrics of App. B on hand-computed histograms, and evaluate.py end to end."""
import json
import math
import os

import numpy as np
import pytest

from evaluate import format_table, hist_kld, hist_mse, histogram
from test_training import assert_one_line_error, run_cli


def test_uniform_histogram_scores_zero():
    h = histogram((np.arange(1000) + 0.5) / 1000)
    assert h == pytest.approx(np.full(100, 0.01))
    assert hist_mse(h) == pytest.approx(0.0, abs=1e-12) and hist_kld(h) == pytest.approx(0.0, abs=1e-12)


def test_all_mass_in_one_bin():
    h = np.zeros(100)
    h[37] = 1.0
    assert hist_mse(h) == pytest.approx(math.sqrt(0.99))  # sqrt((1-1/n)^2 + (n-1)/n^2)
    assert hist_kld(h) == pytest.approx(math.log(100))    # empty bins add 0


def test_two_bins_half_half():
    h = histogram([0.001] * 5 + [0.999] * 5)
    assert h[0] == 0.5 and h[-1] == 0.5
    assert hist_mse(h) == pytest.approx(0.7)              # sqrt(2 * 0.49^2 + 98 * 0.01^2)
    assert hist_kld(h) == pytest.approx(math.log(50))


def test_evaluate_cli_end_to_end(tiny_run):
    p = run_cli("evaluate.py", "--run", tiny_run, "--n", "8", "--batch-size", "8", "--device", "cpu")
    assert p.returncode == 0, p.stderr
    m = json.load(open(os.path.join(tiny_run, "metrics.json")))
    assert set(m) == {"uncond", "multi", "multi_sn"}
    for method in m.values():
        assert 0 <= method["accuracy"] <= method["one_disc"] <= 1
        assert method["one_disc"] + method["zero_disc"] + method["two_plus_disc"] == pytest.approx(1)
    for f in ("hist_z.png", "heatmap_classifiers.png", "grid_multi.png", "eval_multi_sn.npz"):
        assert os.path.getsize(os.path.join(tiny_run, f)) > 0
    assert "paper" in p.stdout and "multi_sn" in p.stdout
    # A second run reuses the cached samples: identical metrics.
    p2 = run_cli("evaluate.py", "--run", tiny_run, "--n", "8", "--batch-size", "8", "--device", "cpu")
    assert "read from cache" in p2.stdout and json.load(open(os.path.join(tiny_run, "metrics.json"))) == m


def test_evaluate_cli_without_checkpoint(tmp_path):
    assert_one_line_error(run_cli("evaluate.py", "--run", str(tmp_path)), "no ddpm checkpoint")


def test_table_shows_paper_figures():
    row = {"one_disc": 0.9, "zero_disc": 0.1, "two_plus_disc": 0.0, "zero_or_two": 0.1,
           "accuracy": 0.7, "hist_mse": 0.3, "hist_kld": 1.2}
    t = format_table({"multi": row})
    assert "78.0% ± 8.7%" in t and "70.0%" in t

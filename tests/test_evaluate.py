"""Histogram metrics of App. B on hand-computed histograms, and evaluate.py end to end."""
import dataclasses
import json
import math
import os
import re
import shutil
from collections import Counter

import numpy as np
import pytest

import config as C
import evaluate
from checkpoint import UserError
import detector
from detector import circle_stats
from evaluate import format_table, summarize
from histograms import hist_kld, hist_mse, histogram
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


def table_row(stdout, method):
    rows = [ln for ln in stdout.splitlines() if ln.split()[:1] == [method]]
    assert len(rows) == 1, stdout
    return rows[0].split()


def expected_cells(m):
    """The table cells of one metrics.json entry, formatted independently of format_table."""
    def cell(k):
        if k == "hist_n":
            return str(m[k])
        if k in ("hist_mse", "hist_kld"):
            return "-" if math.isnan(m[k]) else f"{m[k]:.3f}"
        return f"{m[k]:.1%}"
    return [cell(k) for k in ("one_disc", "blob", "zero_disc", "two_plus_disc", "zero_or_two", "accuracy",
                              "hist_mse", "hist_kld", "hist_n")]


def test_evaluate_cli_end_to_end(tiny_run):
    p = run_cli("evaluate.py", "--run", tiny_run, "--n", "8", "--batch-size", "8", "--device", "cpu")
    assert p.returncode == 0, p.stderr
    m = json.load(open(os.path.join(tiny_run, "metrics.json")))
    assert set(m) == {"uncond", "multi", "multi_sn"} and "skipped" not in p.stdout
    for name, method in m.items():
        # metrics.json is what the detector says about the cached samples, recomputed here.
        images = np.load(os.path.join(tiny_run, f"eval_{name}.npz"))["images"]
        assert images.shape == (8, 16, 16, 1) and images.dtype == np.uint8
        s = circle_stats(images)
        for k in ("n", "one_disc", "blob", "zero_disc", "two_plus_disc", "zero_or_two", "speck", "accuracy",
                  "middle_of_detected", "hist_n"):
            assert method[k] == s[k], (name, k)
        h = histogram(s["z"])
        empty = s["hist_n"] == 0
        assert method["hist_mse"] == pytest.approx(math.nan if empty else hist_mse(h), nan_ok=True)
        assert method["hist_kld"] == pytest.approx(math.nan if empty else hist_kld(h), nan_ok=True)
        assert method["hist_n"] == round(method["one_disc"] * 8) == len(s["z"])
        assert method["column_counts"] == {str(c): k for c, k in Counter(s["columns"]).items()}
        # The printed table shows exactly these numbers.
        assert table_row(p.stdout, name)[1:10] == expected_cells(method)
    for f in ("hist_z.png", "heatmap_classifiers.png", "grid_multi.png", "eval_multi_sn.npz"):
        assert os.path.getsize(os.path.join(tiny_run, f)) > 0
    assert "paper" in p.stdout and "hist_n" in p.stdout and "blob" in p.stdout
    # A second run reuses the cached samples: identical metrics (compared as JSON: NaN == NaN).
    p2 = run_cli("evaluate.py", "--run", tiny_run, "--n", "8", "--batch-size", "8", "--device", "cpu")
    assert "read from cache" in p2.stdout
    again = json.load(open(os.path.join(tiny_run, "metrics.json")))
    assert json.dumps(again, sort_keys=True) == json.dumps(m, sort_keys=True)


def test_evaluate_ddpm_only_run_skips_classifier_methods(tiny_run, tmp_path):
    run = str(tmp_path / "ddpm_only")  # what `train.py --model ddpm` leaves behind
    os.makedirs(run)
    shutil.copy(os.path.join(tiny_run, "ddpm.pt"), run)
    p = run_cli("evaluate.py", "--run", run, "--n", "4", "--batch-size", "4", "--device", "cpu")
    assert p.returncode == 0 and "Traceback" not in p.stderr, p.stderr
    skipped = [ln for ln in p.stdout.splitlines() if "skipped" in ln]
    assert len(skipped) == 1 and "multi, multi_sn" in skipped[0], p.stdout
    assert f"python train.py --out {run} --model classifier" in skipped[0]
    assert set(json.load(open(os.path.join(run, "metrics.json")))) == {"uncond"}
    assert not os.path.exists(os.path.join(run, "heatmap_classifiers.png"))
    # Asking for a method explicitly: its missing classifier is an error, not a skip.
    p = run_cli("evaluate.py", "--run", run, "--n", "4", "--methods", "uncond,multi_sn", "--device", "cpu")
    assert p.returncode == 2
    assert_one_line_error(p, "multi_sn", "classifier_sn.pt",
                          f"python train.py --out {run} --model classifier")


def test_evaluate_flag_errors(tiny_run):
    with pytest.raises(UserError, match="unknown method 'mutli'"):
        evaluate.main(["--run", tiny_run, "--methods", "mutli", "--device", "cpu"])
    with pytest.raises(UserError, match="--lambdas only applies to the guided methods"):
        evaluate.main(["--run", tiny_run, "--methods", "uncond", "--lambdas", "10,10", "--device", "cpu"])


def test_sampling_flags_declared_once_in_sample_config():
    """sample.py and evaluate.py generate their shared flags from config.SampleConfig."""
    import sample
    flags = {"--" + f.name.replace("_", "-") for f in dataclasses.fields(C.SampleConfig)}
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    for mod in ("sample.py", "evaluate.py"):
        written = set(re.findall(r"add_argument\(\s*[\"'](--[\w-]+)", open(os.path.join(root, mod)).read()))
        assert not written & flags, (mod, written & flags)
    sp, ep = sample.build_parser(), evaluate.build_parser()
    assert flags <= set(sp._option_string_actions)
    shared = {"--run", "--n", "--batch-size", "--seed", "--steps", "--device", "--lambdas", "--sampler", "--eta",
              "--guidance-at", "--cfg-form"}
    assert shared <= set(ep._option_string_actions)
    # evaluate.py always measures classifier (multi) and classifier_sn (multi_sn).
    assert not {"--guidance", "--scale", "--target", "--classifier"} & set(ep._option_string_actions)
    assert ep._option_string_actions["--n"].help.endswith("(default: 512)")
    assert ep._option_string_actions["--lambdas"].help.endswith("(default: 30,30)")
    assert sp._option_string_actions["--n"].help.endswith("(default: 64)")
    assert sp.parse_args(["--steps", "7", "--target", "1"]).steps == 7  # ints, not strings


def test_evaluate_cli_without_checkpoint(tmp_path):
    assert_one_line_error(run_cli("evaluate.py", "--run", str(tmp_path)), "no ddpm checkpoint")


def test_table_shows_paper_figures_and_histogram_n():
    row = {"one_disc": 0.9, "blob": 0.05, "zero_disc": 0.05, "two_plus_disc": 0.0, "zero_or_two": 0.05,
           "accuracy": 0.7, "hist_mse": 0.3, "hist_kld": 1.2, "hist_n": 461}
    empty = dict(row, one_disc=0.0, blob=1.0, accuracy=0.0, hist_mse=math.nan, hist_kld=math.nan, hist_n=0)
    t = format_table({"multi": row, "uncond": empty})
    assert "78.0% ± 8.7%" in t and "blob" in t.splitlines()[0] and "hist_n" in t.splitlines()[0]
    assert table_row(t, "multi")[1:10] == ["90.0%", "5.0%", "5.0%", "0.0%", "5.0%", "70.0%", "0.300", "1.200",
                                           "461"]
    # No one-disc sample: the histogram metrics are undefined, not a perfect-looking 0.
    assert table_row(t, "uncond")[7:10] == ["-", "-", "0"]


def test_empty_histogram_is_nan_not_zero():
    s = summarize(np.full((3, 16, 16, 1), 255, np.uint8))
    assert s["blob"] == 1.0 and s["hist_n"] == 0
    assert math.isnan(s["hist_mse"]) and math.isnan(s["hist_kld"])


def test_comb_strength_pinned():
    """|DFT at 1/period| / count: 1 for columns all equal modulo the period, 0 for one of each."""
    assert detector.comb_strength([2, 4, 6, 8], 2) == pytest.approx(1.0)
    assert detector.comb_strength([3, 7, 11], 4) == pytest.approx(1.0)
    assert detector.comb_strength(range(8), 2) == pytest.approx(0.0, abs=1e-12)
    assert detector.comb_strength(range(8), 4) == pytest.approx(0.0, abs=1e-12)
    assert detector.comb_strength([0, 0, 0, 1], 2) == pytest.approx(0.5)      # |3 - 1| / 4
    assert detector.comb_strength([0, 1], 4) == pytest.approx(2 ** 0.5 / 2)   # |1 - i| / 2
    assert math.isnan(detector.comb_strength([], 2))
    # the middle of a 32-px image is columns 6.2..24.8: the bands' columns are left out
    m = detector.middle_comb([1, 2, 8, 10, 12, 30], 32)
    assert m["comb_n"] == 3 and m["comb_2"] == pytest.approx(1.0) and m["comb_4"] == pytest.approx(1 / 3)
    assert m["comb_8"] == pytest.approx(1 / 3)   # x = 8, 10, 12 -> 1, -i, -1: |-i| / 3

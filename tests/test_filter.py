"""The extreme-subset filter (§4.3, App. D.1, §5.2, §5.4) and the calibrated evaluation classifier
(§5, Guo et al. 2017): temperature scaling and ECE pinned on synthetic logits, the ranking
direction on hand-made probabilities, the filter logic on faces with a known latent (classifiers
injected as functions of z), and the real command end to end on a tiny stand-in."""
import json
import os

import numpy as np
import pytest
import torch

import celeba
import data_filter as DF
import eval_classifier as E
import toy_faces
from conftest import one_line_error


# ----- calibration ------------------------------------------------------------------------------

def test_nll_and_probs_pinned():
    assert E.nll(np.array([[0.0, 0.0]]), [0]) == pytest.approx(np.log(2), abs=1e-15)
    # A 1-D array is a binary logit difference: sigmoid(log 3) = 3/4.
    assert E.nll(np.array([np.log(3)]), [1]) == pytest.approx(np.log(4 / 3), abs=1e-15)
    assert E.nll(np.array([np.log(3)]), [0], T=0.5) == pytest.approx(np.log(10), abs=1e-12)
    assert E.probs_of(np.array([[1000.0, 0.0]]))[0].tolist() == [1.0, 0.0]  # no overflow


def test_fit_temperature_recovers_known_T_exactly():
    """Labels in exact proportion softmax(l / T0) (5,000 copies of each of 25 logits): the NLL
    minimum is at T0 up to the rounding of the counts (3.4e-4 relative at most for these counts)."""
    l, M = np.linspace(-4, 4, 25), 5000
    for T0 in (0.5, 2.5):
        n1 = np.round(M / (1 + np.exp(-l / T0))).astype(int)
        labels = np.concatenate([np.r_[np.ones(a), np.zeros(M - a)] for a in n1]).astype(int)
        assert E.fit_temperature(np.repeat(l, M), labels) == pytest.approx(T0, rel=1e-3)


def test_fit_temperature_on_sampled_labels_and_lower_nll():
    """3-class logits, labels drawn from softmax(l / T0): T recovered within 2.5 % (5 standard
    errors: the Fisher information of 100k labels gives 0.5 %), and the over-confident logits
    (T0 = 3) get a much lower NLL and ECE once scaled."""
    rng = np.random.default_rng(0)
    l = rng.normal(0, 4, (100000, 3))
    T0 = 3.0
    p = E.probs_of(l, T0)
    y = (rng.random(len(l))[:, None] > np.cumsum(p, 1)).sum(1)
    T = E.fit_temperature(l, y)
    assert T == pytest.approx(T0, rel=0.025)
    assert E.nll(l, y, T) < E.nll(l, y) - 0.3
    assert E.nll(l, y, T) <= min(E.nll(l, y, T * 1.01), E.nll(l, y, T / 1.01))
    assert E.ece(E.probs_of(l, T), y) < 0.01 < 0.1 < E.ece(E.probs_of(l), y)


def test_fit_temperature_bounds():
    """Separable data: the NLL falls as T -> 0, so the lower bound comes back (no crash)."""
    assert E.fit_temperature(np.array([[0.0, 1.0], [1.0, 0.0]]), [1, 0]) == 1e-2
    assert E.fit_temperature(np.array([[0.0, 1.0], [0.0, 1.0]]), [1, 0]) == 1e2


def test_ece_hand_computed():
    """p = (.9, .9, .2, .2), y = (1, 0, 0, 0): bin (13/15, 14/15] holds confidences .9, .9 with
    accuracy 1/2; bin (11/15, 12/15] holds .8, .8 (predicted 0) with accuracy 1:
    ECE = 1/2 |.5 - .9| + 1/2 |1 - .8| = 0.3."""
    p, y = np.array([0.9, 0.9, 0.2, 0.2]), np.array([1, 0, 0, 0])
    assert E.ece(p, y) == pytest.approx(0.3, abs=1e-12)
    assert E.ece(np.stack([1 - p, p], 1), y) == pytest.approx(0.3, abs=1e-12)
    assert E.ece(p, y, bins=1) == pytest.approx(abs(0.75 - 0.85), abs=1e-12)  # one bin
    assert E.ece(np.array([1.0, 0.0]), [1, 0]) == 0.0                      # edges binned


def test_ece_calibrated_vs_overconfident():
    rng = np.random.default_rng(1)
    p = rng.uniform(0, 1, 200000)
    y = (rng.random(len(p)) < p).astype(int)
    assert E.ece(p, y) < 0.005
    logit = np.log(p / (1 - p))
    assert E.ece(1 / (1 + np.exp(-4 * logit)), y) > 0.15


# ----- ranking and lists ------------------------------------------------------------------------

ROWS = np.arange(6)
LABELS = np.array([0, 0, 0, 1, 1, 1])
P = np.array([0.3, 0.1, 0.2, 0.7, 0.9, 0.8])


def test_ranking_keeps_the_most_extreme_of_both_classes():
    o0, o1 = DF.rank_extremes(ROWS, LABELS, P)
    assert o0.tolist() == [1, 2, 0] and o1.tolist() == [4, 5, 3]
    lists = DF.select(ROWS, LABELS, P, (4, 2, 6))
    assert [(k, a.tolist(), b.tolist()) for k, (a, b) in lists.items()] == [
        (6, [1, 2, 0], [4, 5, 3]), (4, [1, 2], [4, 5]), (2, [1], [4])]
    # Per-class k (A:B = 1:2) and oversampling of class 0 (§5.4's old x 2).
    a, b = DF.select(ROWS, LABELS, P, (3,), k_per_class=(1, 2))[3]
    assert a.tolist() == [1] and b.tolist() == [4, 5]
    assert DF.index_list(a, b, (2, 1)).tolist() == [1, 1, 4, 5]
    assert DF.class_sizes(22000, (7000, 15000)) == (7000, 15000)
    assert DF.class_sizes(11000, (7000, 15000)) == (3500, 7500)
    assert DF.class_sizes(5) == (2, 3)


def test_ties_and_subsets_are_deterministic():
    o0, o1 = DF.rank_extremes(np.arange(4), np.array([0, 0, 1, 1]), np.full(4, 0.5))
    assert o0.tolist() == [0, 1] and o1.tolist() == [2, 3]


def test_ensemble_folds_are_disjoint_and_held_out():
    """Member k trains on fold k and judges the rest: the folds partition the rows, no member
    judges a row it trained on, every row gets ensemble - 1 judgements, and each class is dealt
    evenly (43 of class 0, 60 of class 1 over 5 folds: 8-9 and 12 per fold)."""
    labels = np.r_[np.zeros(143, int), np.ones(160, int)]
    rows = np.r_[np.arange(100, 143), np.arange(200, 260)]
    folds = DF.ensemble_folds(rows, labels, 5, seed=3)
    own = [set(o.tolist()) for o, _ in folds]
    assert sorted(np.concatenate([o for o, _ in folds]).tolist()) == sorted(rows.tolist())
    assert all(not a & b for i, a in enumerate(own) for b in own[i + 1:])           # disjoint
    for (o, j), mine in zip(folds, own):
        assert not mine & set(j.tolist()) and sorted(np.r_[o, j].tolist()) == sorted(rows.tolist())
        assert sorted(np.bincount(labels[o], minlength=2).tolist()) in ([8, 12], [9, 12])
    judged = np.concatenate([j for _, j in folds])
    assert np.bincount(judged)[rows].tolist() == [4] * len(rows)
    again = DF.ensemble_folds(rows, labels, 5, seed=3)
    assert all((a == c).all() and (b == d).all() for (a, b), (c, d) in zip(folds, again))
    assert any(len(set(a.tolist()) ^ set(c.tolist())) for (a, _), (c, _) in
               zip(folds, DF.ensemble_folds(rows, labels, 5, seed=4)))                  # seeded


def test_no_member_scores_an_image_it_trained_on():
    """Through run_filter: each member's scorer is only ever asked about rows outside its own
    training rows, and every row of S is judged by exactly ensemble - 1 members."""
    z, y = known_z(600)
    calls = []

    def fit(rows, seed, steps):
        trained = set(np.asarray(rows).tolist())
        scorer = fake_fit(z)(rows, seed, steps)

        def score(r):
            calls.append((seed, trained, np.asarray(r).tolist()))
            return scorer(r)
        return score

    res = DF.run_filter(y, "Smiling", DF.FilterConfig(), DF.SelectConfig(k=(20,)), fit,
                        lambda: (z.copy(), {}), log=lambda s: None)
    members = [c for c in calls if c[0] != 0]                       # seed 0: stage (a)
    assert len(members) == 5 and res["summary"]["held_out_judgements"] == 4
    S = [c for c in calls if c[0] == 0][0][1]                          # stage (a) trained on all
    kept_a = set(np.flatnonzero(DF.p_label(fake_fit(z)(None, 0, 0)(np.arange(600)), y) > 0.9).tolist())
    assert len(S) == 600 and kept_a
    for _, trained, scored in members:
        assert not trained & set(scored) and trained <= kept_a and set(scored) <= kept_a
    judged = np.bincount(np.concatenate([s for *_, s in members]), minlength=600)
    assert judged[sorted(kept_a)].tolist() == [4] * len(kept_a)


def test_paper_preset_thresholds():
    """The authors' released config: ensemble agreement 0.9999 (keep_thr), stage (a) 0.95
    (agree_095); cpu keeps 0.9 / 0.9; a flag still wins over either preset."""
    paper, _ = DF.make_configs("paper")
    assert (paper.tau1, paper.tau2, paper.ensemble) == (0.95, 0.9999, 5)
    cpu, _ = DF.make_configs("cpu")
    assert (cpu.tau1, cpu.tau2) == (0.9, 0.9)
    assert DF.make_configs("paper", tau2=0.99)[0].tau2 == 0.99
    one_line_error(lambda: DF.run_filter(np.r_[0, 1], "Smiling", DF.FilterConfig(ensemble=1),
                                         DF.SelectConfig(k=(2,)), None, None), "--ensemble 1")


def test_k_too_large_is_one_line():
    one_line_error(lambda: DF.select(ROWS, LABELS, P, (8,), attribute="Smiling"),
                   "--k 8 needs 4 images of class 0 and 4 of class 1", "kept 3 and 3",
                   "at most 6", "--tau1")
    one_line_error(lambda: DF.select(ROWS, LABELS, P, (5,), k_per_class=(1, 4)),
                   "--k-per-class at most 3,3")
    one_line_error(lambda: DF.check_select(DF.SelectConfig(oversample=(0, 1))), "--oversample")


# ----- the filter on faces with a known latent --------------------------------------------------

def known_z(n=4000, seed=0):
    """toy_faces' latents and its label noise (|z - 0.5| > 0.2 always gets its side's label)."""
    lat = toy_faces.sample_latents(n, seed)
    col = toy_faces.CELEBA_ATTRIBUTES.index("Smiling")
    return lat["z_smile"], (toy_faces.make_labels(lat, seed)[:, col] + 1) // 2


def fake_fit(z, sharp=12.0, noise=1.0):
    """A classifier whose P(y = 1 | x) is sigmoid(sharp (z - 1/2) + e), e ~ N(0, noise) fixed per
    (seed, image): members with different seeds err independently, as App. D.3 assumes."""
    def fit(rows, seed, steps):
        e = np.random.default_rng(seed).normal(0, noise, len(z))
        return lambda r: 1 / (1 + np.exp(-(sharp * (z[r] - 0.5) + e[r])))
    return fit


def test_filter_keeps_only_extremes_of_a_known_latent(tmp_path):
    z, y = known_z()
    calls = []

    def eval_probs():  # a calibrated classifier monotone in z
        calls.append(1)
        return z.copy(), {"T": 1.0}

    fcfg = DF.FilterConfig()
    scfg = DF.SelectConfig(k=(600, 1200, 300), oversample=(2, 1))
    res = DF.run_filter(y, "Smiling", fcfg, scfg, fake_fit(z), eval_probs, latent=z, log=lambda s: None)
    s = res["summary"]
    assert calls == [1] and [c["stage"] for c in s["counts"]] == [
        "train", "a_confident_agreeing", "b_ensemble", "k1200", "k600", "k300"]
    for c in ("class_0", "class_1"):
        n = [st[c] for st in s["counts"]]
        assert n == sorted(n, reverse=True) and n[-3:] == [600, 300, 150]
    mild = {st: s["true_latent"][st]["class_1"]["in_0.3_0.7"] + s["true_latent"][st]["class_0"]["in_0.3_0.7"]
            for st in ("train", "a_confident_agreeing", "b_ensemble")}
    assert mild["train"] > 1500 and mild["a_confident_agreeing"] > 50 > mild["b_ensemble"]
    # Stage (c): exactly the most extreme survivors by the evaluation classifier, both sides.
    a, b = res["lists"][1200]
    survivors = s["counts"][2]
    assert survivors["class_0"] > 600 and survivors["class_1"] > 600  # ranking had to choose
    assert z[a].max() < 0.3 and z[b].min() > 0.7
    assert s["true_latent"]["k1200"]["class_1"]["in_0.2_0.8"] == 0
    for k, (a, b) in res["lists"].items():
        big_a, big_b = res["lists"][1200]
        assert set(a) <= set(big_a) and set(b) <= set(big_b) and len(a) == len(b) == k // 2
        assert z[a].max() <= np.sort(z[big_a])[k // 2 - 1] and z[b].min() >= -np.sort(-z[big_b])[k // 2 - 1]
    # The files: the authors' format, index.txt = the largest list, class 0 written twice.
    written = DF.write_outputs(str(tmp_path), np.arange(len(z)), res, scfg.oversample)
    got = celeba.read_index_list(str(tmp_path / "index_k1200.txt"), len(z))
    assert got.tolist() == sorted(big_a.tolist() * 2 + big_b.tolist())
    assert (celeba.read_index_list(str(tmp_path / "index.txt"), len(z)) == got).all()
    assert np.bincount(got)[big_a].tolist() == [2] * 600 and np.bincount(got)[big_b].tolist() == [1] * 600
    small = celeba.read_index_list(str(tmp_path / "index_k300.txt"), len(z))
    assert set(small) <= set(got) and len(small) == 150 * 2 + 150
    assert os.path.getsize(tmp_path / "filter_hist.png") > 1000 and len(written) == 6


def test_label_agreement_and_every_member_are_required():
    """Stage (a) drops confident classifiers that DISAGREE with the label (rows 0, 1) and unsure
    ones (row 2); stage (b) drops what a single held-out member doubts (row 3)."""
    labels = np.arange(20) % 2
    base = np.where(labels == 1, 0.99, 0.01)
    base[[0, 1, 2]] = [0.99, 0.01, 0.5]

    doubted = []

    def fit(rows, seed, steps):
        p = base.copy()
        if seed > 0 and 3 not in rows and not doubted:   # the first member that judges row 3
            doubted.append(seed)
            p[3] = 0.5
        return lambda r: p[r]

    res = DF.run_filter(labels, "Smiling", DF.FilterConfig(), DF.SelectConfig(k=(16,)), fit,
                        lambda: (base + np.arange(20) * 1e-4, {}), log=lambda s: None)
    assert [c["total"] for c in res["summary"]["counts"]] == [20, 17, 16, 16]
    kept = np.concatenate(res["lists"][16])
    assert len(doubted) == 1 and not set(kept) & {0, 1, 2, 3} and sorted(kept) == list(range(4, 20))


def test_k_too_large_fails_before_the_evaluation_classifier():
    """1000 faces: 471 / 529 of class 0 / 1 in train, 199 / 233 after stage (b). --k 600 fits the
    train split but not the survivors; --k 2000 fails before any training."""
    z, y = known_z(1000)
    never = lambda: pytest.fail("the evaluation classifier must not train when --k cannot fit")
    run = lambda k, fit: DF.run_filter(y, "Smiling", DF.FilterConfig(), DF.SelectConfig(k=(k,)),
                                       fit, never, log=lambda s: None)
    one_line_error(lambda: run(600, fake_fit(z)), "--k 600 needs 300 images of class 0",
                   "the filter kept 199 and 233", "at most 398", "--tau2")
    # The error carries the counts so far and how confident the held-out members were.
    with pytest.raises(DF.FilterShortfall) as e:
        DF.run_filter(y, "Smiling", DF.FilterConfig(), DF.SelectConfig(k=(600,)), fake_fit(z), never,
                      latent=z, log=lambda s: None)
    s = e.value.summary
    assert [c["stage"] for c in s["counts"]] == ["train", "a_confident_agreeing", "b_ensemble"]
    assert (s["counts"][-1]["class_0"], s["counts"][-1]["class_1"]) == (199, 233) and "--k 600" in s["error"]
    a0 = s["b_agreement"]["class_0"]
    assert a0["n"] == s["counts"][1]["class_0"] and a0["q01"] <= a0["median"] <= a0["q99"] <= a0["max"] <= 1
    assert s["true_latent"]["b_ensemble"]["class_0"]["n"] == 199
    no_training = lambda rows, seed, steps: pytest.fail("no classifier may train")
    one_line_error(lambda: run(2000, no_training), "the train split has 471 and 529", "at most 942")


# ----- the real command on a tiny stand-in ------------------------------------------------------

TINY = ["--image-size", "16", "--steps", "30", "--ensemble-steps", "20", "--eval-steps", "30",
        "--batch-size", "16", "--clf-channels", "8", "--clf-channel-mult", "1,2",
        "--clf-attention-resolutions", "8", "--tau1", "0.4", "--tau2", "0.4", "--device", "cpu",
        "--quiet"]


@pytest.fixture(scope="module")
def tiny_filter(tmp_path_factory):
    d = tmp_path_factory.mktemp("filter")
    faces, out = str(d / "faces"), str(d / "out")
    toy_faces.make_toy_faces(faces, n=400, seed=0)
    DF.main(["--data-dir", faces, "--out", out, "--k", "20,10"] + TINY)
    return faces, out


def test_filter_command_end_to_end(tiny_filter):
    faces, out = tiny_filter
    n_train = toy_faces.split_sizes(400)[0]
    big = celeba.read_index_list(os.path.join(out, "index_k20.txt"), n_train)
    small = celeba.read_index_list(os.path.join(out, "index_k10.txt"), n_train)
    assert len(big) == 20 and len(small) == 10 and set(small) <= set(big)
    assert (celeba.read_index_list(os.path.join(out, "index.txt"), n_train) == big).all()
    d = celeba.CelebAData(faces, 16, "Smiling", index_list=os.path.join(out, "index.txt"), progress=False)
    assert np.bincount(d.labels).tolist() == [10, 10]
    with open(os.path.join(out, "filter_summary.json")) as f:
        s = json.load(f)
    assert [c["total"] for c in s["counts"]][0] == n_train and s["tau1"] == 0.4
    for c in ("class_0", "class_1"):
        n = [st[c] for st in s["counts"]]
        assert n == sorted(n, reverse=True)
    assert set(s["seconds"]) == {"a", "b", "c", "total"} and s["eval_classifier"]["reused"] is False
    assert "corr_true_z" in s["eval_classifier"] and "true_latent" in s


def test_filter_blond_versus_black_skips_the_other_hair(tmp_path):
    """§5.4 hair: --attribute Blond_Hair/Black_Hair ranks blond (1) against black (0) only; a face
    with neither label (brown) is in no list, and the indices still index the whole train split."""
    faces, out = str(tmp_path / "faces"), str(tmp_path / "out")
    toy_faces.make_toy_faces(faces, n=400, seed=1)
    path = os.path.join(faces, "list_attr_celeba.txt")
    lines = open(path).read().splitlines()
    cols = [lines[1].split().index(a) + 1 for a in ("Blond_Hair", "Black_Hair")]
    brown = list(range(0, 300, 7))                      # train rows relabelled: neither colour
    for r in brown:
        cells = lines[2 + r].split()
        for c in cols:
            cells[c] = "-1"
        lines[2 + r] = " ".join(cells)
    open(path, "w").write("\n".join(lines) + "\n")
    DF.main(["--data-dir", faces, "--attribute", "Blond_Hair/Black_Hair", "--out", out, "--k", "20"] + TINY)
    kept = celeba.read_index_list(os.path.join(out, "index.txt"), toy_faces.split_sizes(400)[0])
    assert len(kept) == 20 and not set(kept) & set(brown)
    _, _, attrs = celeba.read_attributes(faces)
    blond = attrs[kept, toy_faces.CELEBA_ATTRIBUTES.index("Blond_Hair")]
    assert blond.sum() == 10     # 10 blond, 10 black, read back through the authors' format
    clf = E.EvalClassifier.load(os.path.join(out, "eval_Blond_Hair-vs-Black_Hair.pt"))
    assert clf.attribute == "Blond_Hair/Black_Hair" and "corr_true_z" in clf.metrics


def test_eval_classifier_checkpoint(tiny_filter):
    faces, out = tiny_filter
    path = E.eval_path(out, "Smiling")
    clf = E.EvalClassifier.load(path)
    assert clf.attribute == "Smiling" and clf.image_size == 16 and clf.temperature > 0
    assert set(clf.metrics) >= {"T", "ece_before", "ece_after", "nll_before", "nll_after",
                                "valid_accuracy", "corr_true_z", "ece_test_before",
                                "ece_test_after", "test_accuracy"}
    assert clf.metrics["nll_after"] <= clf.metrics["nll_before"] + 1e-12  # T minimises valid NLL
    valid = celeba.CelebAData(faces, 16, "Smiling", "valid", progress=False)
    # T was fitted on the valid split (not on train, as the authors' smile script does).
    lv = E.logits_of(clf.model, valid.images, "cpu")
    assert E.fit_temperature(lv, valid.labels) == clf.temperature
    assert clf.metrics["valid_n"] == toy_faces.split_sizes(400)[1]
    u8 = np.array(valid.images[:5])
    p = clf.prob(u8)
    assert p.shape == (5,) and ((p > 0) & (p < 1)).all()
    assert np.allclose(clf.prob(torch.from_numpy(u8).float().div(127.5).sub(1).permute(0, 3, 1, 2)), p)
    assert clf.features(u8).shape == (5, 16)    # 8 channels x mult 2 at the last resolution
    one_line_error(lambda: clf.prob(torch.zeros(2, 3, 32, 32)),
                   "evaluation classifier is 16 px but images are 32 px")
    # Reused when data, attribute and size match (no training: returns at once).
    fcfg, _ = DF.make_configs("cpu", image_size=16)
    again, reused = DF.get_eval_classifier(faces, "Smiling", fcfg, out, "cpu")
    assert reused and again.temperature == clf.temperature
    one_line_error(lambda: E.EvalClassifier.load(os.path.join(out, "index.txt")), "delete it")
    one_line_error(lambda: E.EvalClassifier.load(os.path.join(out, "nope.pt")), "data_filter.py")


def test_clean_classifier_is_deterministic(tiny_filter):
    faces, _ = tiny_filter
    d = celeba.CelebAData(faces, 16, "Smiling", progress=False)
    arch = dict(clf_channels=8, clf_channel_mult=(1, 2), clf_res_blocks=1, clf_attention_resolutions=(8,))
    run = lambda: E.train_clean_classifier(d, 3, 8, 1e-3, 7, "cpu", arch, rows=np.arange(50),
                                           progress=False).state_dict()
    a, b = run(), run()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_filter_cli_errors(tmp_path):
    one_line_error(lambda: DF.main(["--data-dir", str(tmp_path / "none")] + TINY), "does not exist")
    faces = str(tmp_path / "faces")
    toy_faces.make_toy_faces(faces, n=40, seed=0)
    one_line_error(lambda: DF.main(["--data-dir", faces, "--attribute", "Smiling,Young"] + TINY),
                   "one attribute")
    one_line_error(lambda: DF.main(["--data-dir", faces, "--attribute", "Smile"] + TINY),
                   "unknown CelebA attribute 'Smile'")
    one_line_error(lambda: DF.main(["--data-dir", faces, "--k", "1"] + TINY), "--k 1")
    # Members of 20 steps are never 99.99 % sure: the filter stops, but says where the images went.
    out = str(tmp_path / "short")
    one_line_error(lambda: DF.main(["--data-dir", faces, "--out", out, "--k", "10"] + TINY + ["--tau2", "0.9999"]),
                   "--k 10 needs 5 images of class 0", "but the filter kept 0 and 0")
    with open(os.path.join(out, "filter_summary.json")) as f:
        s = json.load(f)
    assert s["counts"][-1] == {"stage": "b_ensemble", "class_0": 0, "class_1": 0, "total": 0}
    assert s["b_agreement"]["class_1"]["max"] < 0.9999 and "error" in s and not os.path.exists(
        os.path.join(out, "index.txt"))


# ----- the ranking's direction on a folder with its own latent -----------------------------------

def square_folder(path, n=300, seed=0):
    """A CelebA-layout folder (not toy_faces) whose attribute is driven by a known latent u: a
    light square on a dark background, side 30 + 100 u source px (u uniform), and noisy labels near
    the middle as CelebA's, Smiling = 1[u + e > 1/2] with e ~ N(0, 0.1) clipped to +-0.2 (without
    noise the classes separate and every classifier saturates). Returns u in file order."""
    from PIL import Image
    rng = np.random.default_rng(seed)
    u = rng.uniform(0, 1, n)
    y = u + np.clip(rng.normal(0, 0.1, n), -0.2, 0.2) > 0.5
    os.makedirs(os.path.join(path, celeba.IMAGE_DIR))
    files = [f"{i + 1:06d}.jpg" for i in range(n)]
    for f, v, (jx, jy) in zip(files, u, rng.integers(-5, 6, (n, 2))):
        a = np.full((218, 178, 3), 60, np.uint8)
        half = int(15 + 50 * v)
        a[109 + jy - half:109 + jy + half, 89 + jx - half:89 + jx + half] = 220
        Image.fromarray(a).save(os.path.join(path, celeba.IMAGE_DIR, f), quality=95)
    names = toy_faces.CELEBA_ATTRIBUTES
    col = names.index("Smiling")
    rows = [" ".join(["1" if (j == col and v) else "-1" for j in range(len(names))]) for v in y]
    with open(os.path.join(path, "list_attr_celeba.txt"), "w") as fh:
        fh.write(f"{n}\n" + " ".join(names) + "\n" + "".join(f"{f} {r}\n" for f, r in zip(files, rows)))
    tr, va, _ = toy_faces.split_sizes(n)
    with open(os.path.join(path, "list_eval_partition.txt"), "w") as fh:
        fh.write("".join(f"{f} {0 if i < tr else 1 if i < tr + va else 2}\n" for i, f in enumerate(files)))
    return u


def test_filter_keeps_the_extremes_of_another_latent(tmp_path):
    """The whole command on the square folder (8 px, tiny classifiers): the kept class-1 images
    are the largest squares of class 1 and the kept class-0 images the smallest of class 0, all
    in the outer quarter of their class by u (a reversed ranking keeps squares near u = 1/2)."""
    d, out = str(tmp_path / "squares"), str(tmp_path / "out")
    u = square_folder(d)
    DF.main(["--data-dir", d, "--out", out, "--k", "20", "--image-size", "8", "--steps", "20",
             "--ensemble-steps", "10", "--eval-steps", "80", "--lr", "3e-3"] + TINY[8:])
    n_train = toy_faces.split_sizes(len(u))[0]
    kept = celeba.read_index_list(os.path.join(out, "index.txt"), n_train)
    train = celeba.CelebAData(d, 8, "Smiling", progress=False)
    y, ut = train.labels, u[:n_train]
    ones, zeros = kept[y[kept] == 1], kept[y[kept] == 0]
    assert len(ones) == len(zeros) == 10
    assert ut[ones].min() > np.quantile(ut[y == 1], 0.75)
    assert ut[zeros].max() < np.quantile(ut[y == 0], 0.25)

"""The exact score eps*, the exact classifier p*, score composition (lab/exact_score.py, lab/composition.py).

Pinned on a 2-point toy by hand; memorisation (small-t snapping, sampling returns training images)
on the real circles training set; the classifier against a brute-force sum of Gaussian densities and
its gradient against the closed-form identity grad log p*(y|x) = (eps* - eps*_y) / sqrt(1 - abar);
composition against the closed-form score of the product distribution; the CLIs on the tiny run.
"""
import json
import math
import os
import shutil

import numpy as np
import pytest
import torch

import config as C
from checkpoint import to_uint8
from conftest import one_line_error
from diffusion import GaussianDiffusion, cosine_betas
from guidance import multi_guidance
from lab import exact_score, score_error
from lab.composition import LinearComposition, check_projective, two_disc_stats
from lab.exact_score import ExactClassifier, ExactEps, training_set
from toy_circles import CirclesData, render_disc


# ----- the 2-point toy, by hand ----------------------------------------------------------------

TWO = torch.tensor([[1.0, 1.0], [-1.0, -1.0]], dtype=torch.float64).view(2, 1, 1, 2)
AB = torch.tensor([0.64, 0.99], dtype=torch.float64)   # t = 0: sqrt(abar) 0.8, sqrt(1 - abar) 0.6


def test_eps_star_of_two_points_by_hand():
    """x = (0.5, 0): ||x - 0.8 x_1||^2 = 0.73, ||x - 0.8 x_2||^2 = 2.33, so
    w_1 = 1 / (1 + exp(-(2.33 - 0.73) / 0.72)) = 0.9022274001, x^_0 = (2 w_1 - 1)(1, 1) and
    eps* = (x - 0.8 x^_0) / 0.6; v* = 0.8 eps* - 0.6 x^_0."""
    x = torch.tensor([[0.5, 0.0]], dtype=torch.float64).view(1, 1, 1, 2)
    t = torch.tensor([0])
    for chunk_n in (1, 2):  # the online softmax over chunks of one image gives the same numbers
        m = ExactEps(TWO, AB, "eps", chunk_n=chunk_n)
        assert m.denoise(x, t).flatten().tolist() == pytest.approx([0.8044548002984016] * 2, abs=1e-14)
        assert m(x, t).flatten().tolist() == pytest.approx([-0.23927306706453544, -1.0726064003978688], abs=1e-14)
    v = ExactEps(TWO, AB, "v")(x, t).flatten().tolist()
    assert v == pytest.approx([-0.6740913338306692, -1.3407580004973358], abs=1e-13)
    # The classifier: p*(y = 0 | x) = w_1 (image 1 has label 0), in float64 logits.
    clf = ExactClassifier(TWO, torch.tensor([0, 1]), abar=AB)
    assert torch.softmax(clf(x, t), -1)[0, 0].item() == pytest.approx(0.9022274001492008, abs=1e-14)
    # Fed float32, the output is float32 and carries the float64 result.
    out32 = ExactEps(TWO, AB)(x.float(), t)
    assert out32.dtype == torch.float32 and out32.flatten()[1].item() == pytest.approx(-1.0726064, abs=1e-6)


def test_v_output_converts_back_through_the_diffusion():
    """diffusion.model_eps of the v-output is eps* again (so the samplers work unchanged)."""
    betas = cosine_betas(50)
    d = GaussianDiffusion(betas, prediction="v")
    data = torch.randn(5, 1, 3, 3, dtype=torch.float64)
    ab = np.cumprod(1 - betas)
    x, t = torch.randn(6, 1, 3, 3, dtype=torch.float64), torch.tensor([0, 3, 10, 25, 40, 49])
    eps = ExactEps(data, ab, "eps")(x, t)
    back = d.model_eps(ExactEps(data, ab, "v")(x, t).float(), x.float(), t)
    assert torch.allclose(back.double(), eps, atol=1e-4)


# ----- memorisation on the circles training set -----------------------------------------------

def circles(size=16):
    cfg = C.make_config("circles", "cpu", image_size=size, timesteps=1000)
    x, y = training_set(cfg)
    return cfg, x, y, exact_score.alphas_cumprod(cfg["diffusion"])


def test_training_set_is_the_flip_closed_band_set():
    cfg, x, y, _ = circles(16)
    d = CirclesData(16, 0.2, flip=False)
    assert len(x) == len(d) == 56   # x in {1, 2} U {13, 14}, 14 rows: the flips add nothing new
    key = lambda im: im.flatten().tolist()  # noqa: E731
    assert sorted(map(key, x.float())) == sorted(map(key, d.x))
    lit_cols = (x[:, 0] > 0).double() * torch.arange(16.)          # column index of every lit pixel
    centre = lit_cols.sum((1, 2)) / (x[:, 0] > 0).sum((1, 2))
    assert torch.equal((centre >= 8).long(), y)                       # label 1 = right half
    one_line_error(lambda: training_set(C.make_config("celeba", "cpu")), "circles runs only", "celeba")


def test_small_t_denoises_to_the_nearest_training_image():
    """At t = 0 (1 - abar = 4e-5) x^_0* is the nearest training image, also for an unseen middle
    disc: the exact score maps every disc back onto the training bands."""
    cfg, x, _, ab = circles(16)
    m = ExactEps(x, ab, chunk_n=7, chunk_b=3)
    probes = torch.cat([x[::9], torch.from_numpy(np.stack([render_disc(c, 6, 16) for c in range(3, 13)]))
                        .double().div(127.5).sub(1)[:, None]])
    g = torch.Generator().manual_seed(0)
    for t in (0, 5):
        noise = torch.randn(probes.shape, generator=g, dtype=torch.float64)
        xt = math.sqrt(ab[t]) * probes + math.sqrt(1 - ab[t]) * noise
        nearest = x[torch.cdist(xt.flatten(1), math.sqrt(ab[t]) * x.flatten(1)).argmin(1)]
        assert (m.denoise(xt, torch.full((len(xt),), t)) - nearest).abs().max() < 1e-6
    # The middle discs were all moved: none of them is its own x^_0.
    assert (m.denoise(probes[-10:] * math.sqrt(ab[0]), 0) - probes[-10:]).flatten(1).abs().amax(1).min() > 1


def test_class_restriction_and_the_classifier_identities():
    """eps*_y uses class y's images only; x^_0* = sum_y p*(y|x) x^_0*_y (the mixture of the class
    mixtures), and grad_x log p*(y|x) = (eps* - eps*_y) / sqrt(1 - abar) through multi_guidance."""
    cfg, x, y, ab = circles(16)
    full, clf = ExactEps(x, ab), ExactClassifier(x, y, 2, ab, chunk_n=5)
    cls = [ExactEps(x[y == k], ab) for k in (0, 1)]
    g = torch.Generator().manual_seed(1)
    xt = torch.randn(6, 1, 16, 16, generator=g, dtype=torch.float64)
    t = torch.tensor([300, 500, 600, 700, 800, 999])
    # Brute force, one Gaussian density (with its normaliser) per image.
    sab, var = ab[t].sqrt().view(-1, 1), (1 - ab[t]).view(-1, 1)
    logn = -((xt.flatten(1)[:, None] - sab[:, :, None] * x.flatten(1)[None]) ** 2).sum(-1) / (2 * var) \
        - 128 * torch.log(2 * math.pi * var)
    p_brute = torch.stack([torch.logsumexp(logn[:, y == k], 1) for k in (0, 1)], 1).softmax(-1)
    p = clf(xt, t).softmax(-1)
    assert torch.allclose(p.sum(1), torch.ones(6, dtype=torch.float64), atol=1e-14)
    assert torch.allclose(p, p_brute, atol=1e-12) and (p.min(1).values > 1e-3).sum() >= 2  # not all saturated
    x0_y = [c.denoise(xt, t) for c in cls]
    x0_brute = [(logn[:, y == k].softmax(1) @ x[y == k].flatten(1)).view_as(xt) for k in (0, 1)]
    assert all(torch.allclose(a, b, atol=1e-12) for a, b in zip(x0_y, x0_brute))
    mix = p[:, 0].view(-1, 1, 1, 1) * x0_y[0] + p[:, 1].view(-1, 1, 1, 1) * x0_y[1]
    assert torch.allclose(full.denoise(xt, t), mix, atol=1e-12)
    grad = multi_guidance([clf], [torch.tensor([1.0, 0.0])])(xt.float(), t)   # grad log p*(left | x)
    closed = (full.eps(xt, t) - cls[0].eps(xt, t)) / var.sqrt().view(-1, 1, 1, 1)
    assert grad.dtype == torch.float32 and torch.allclose(grad.double(), closed, rtol=1e-4, atol=1e-3)


def test_exact_classifier_gradient_vanishes_where_the_training_set_is_constant():
    """grad log p*(y|x) is a difference of averages of training images: exactly 0 on the unseen
    middle columns (black in every 16-px training image), non-zero on the bands."""
    cfg, x, y, ab = circles(16)
    const = (x == x[:1]).all(0)[0]                       # [16, 16] pixels equal in every image
    assert const[:, 4:12].all() and not const[:, 1:3].any()
    g = multi_guidance([ExactClassifier(x, y, 2, ab)], [torch.tensor([30.0, 30.0])])
    xt = torch.randn(8, 1, 16, 16, generator=torch.Generator().manual_seed(4))
    grad = g(xt, torch.tensor([50, 150, 300, 450, 600, 750, 900, 999]))
    assert grad[:, 0, const].abs().max() < 1e-9 * grad.abs().max() and grad.abs().max() > 1e-3


def test_exact_score_sampling_returns_training_images():
    """64 respaced ancestral steps of the exact eps* (v-parameterised, as the cpu preset) on the
    16-px circles: every sample is a training image, to float32 round-off."""
    cfg, x, _, ab = circles(16)
    d = GaussianDiffusion.from_config(cfg["diffusion"], respaced=True, steps=64)
    m = ExactEps(x, ab, cfg["diffusion"].prediction)
    s = d.sample(m, (48, 1, 16, 16), generator=torch.Generator().manual_seed(0)).double()
    err = (s.flatten(1)[:, None] - x.flatten(1)[None]).abs().amax(-1).min(1).values
    assert err.max() < 1e-3, err.max()
    which = (s.flatten(1)[:, None] - x.flatten(1)[None]).abs().amax(-1).argmin(1)
    assert len(set(which.tolist())) > 20   # many different training images, not one attractor


# ----- composition (Bradley et al. 2025) --------------------------------------------------------

def lit(columns, size=8):
    """One lit pixel per image, at every row of each of ``columns``."""
    ims = -torch.ones(len(columns) * size, 1, size, size, dtype=torch.float64)
    for i, (c, r) in enumerate((c, r) for c in columns for r in range(size)):
        ims[i, 0, r, c] = 1
    return ims


def test_projectivity_condition():
    left, right = lit([0, 1]), lit([6, 7])
    empty = -torch.ones(1, 1, 8, 8, dtype=torch.float64)
    res = check_projective([left, right], empty)
    assert res["projective"], res["reason"]
    assert res["masks"][0].view(8, 8)[:, :2].all() and not res["masks"][0].view(8, 8)[:, 2:].any()
    assert not (res["masks"][0] & res["masks"][1]).any()
    res = check_projective([left, right], torch.cat([left, right]))   # the unconditional background
    assert not res["projective"] and "both differ from the background on 32 pixels" in res["reason"]
    # Three pixels (a, b, c); background: a, b independent fair signs, c = -1. The expert sets c = 1
    # exactly when a = 1: its marginals differ on c only and (a, b) is the background's, but c is
    # not independent of the rest, so it is not "the background with c replaced".
    bg = torch.tensor([[a, b, -1.0] for a in (-1, 1) for b in (-1, 1)])
    expert = torch.tensor([[a, b, a] for a in (-1.0, 1.0) for b in (-1.0, 1.0)])
    res = check_projective([expert], bg)
    assert not res["projective"] and "factorise" in res["reason"]
    assert res["masks"][0].tolist() == [False, False, True]
    # ... while replacing c independently of (a, b) is projective.
    indep = torch.tensor([[a, b, c] for a in (-1.0, 1.0) for b in (-1.0, 1.0) for c in (0.0, 1.0)])
    assert check_projective([indep], bg)["projective"]


def test_projective_composition_is_the_exact_score_of_the_product():
    """Empty background: eps_b + sum (eps_i - eps_b) equals, at every (x, t), the exact eps* of the
    product set {left pixel} x {right pixel} (64 images); with the unconditional background it does not."""
    left, right = lit([0, 1]), lit([6, 7])
    ab = np.cumprod(1 - cosine_betas(100))
    product = torch.stack([torch.maximum(a, b) for a in left for b in right])
    g = torch.Generator().manual_seed(2)
    x, t = torch.randn(16, 1, 8, 8, generator=g, dtype=torch.float64), torch.arange(0, 96, 6)
    empty = LinearComposition([ExactEps(left, ab), ExactEps(right, ab)], ExactEps(-torch.ones(1, 1, 8, 8), ab))
    assert torch.allclose(empty.eps(x, t), ExactEps(product, ab).eps(x, t), atol=1e-9)
    bayes = LinearComposition([ExactEps(left, ab), ExactEps(right, ab)], ExactEps(torch.cat([left, right]), ab))
    assert (bayes.eps(x, t) - ExactEps(product, ab).eps(x, t)).abs().max() > 0.1


@pytest.mark.parametrize("background,expected", [("empty", 1.0), ("uncond", 0.0)])
def test_composition_samples(background, expected):
    """Sampling the composition: one lit pixel in each half for every sample with the empty canvas
    (projective), for none with the unconditional background (Bayes: one pixel, on one side)."""
    left, right = lit([0, 1]), lit([6, 7])
    betas = cosine_betas(100)
    ab = np.cumprod(1 - betas)
    bg = -torch.ones(1, 1, 8, 8) if background == "empty" else torch.cat([left, right])
    for prediction in ("eps", "v"):
        m = LinearComposition([ExactEps(left, ab), ExactEps(right, ab)], ExactEps(bg, ab), prediction)
        d = GaussianDiffusion.respaced(betas, 20, prediction=prediction)
        x = d.sample(m, (200, 1, 8, 8), generator=torch.Generator().manual_seed(3))
        on = x > 0
        nl, nr = on[..., :4].flatten(1).sum(1), on[..., 4:].flatten(1).sum(1)
        assert ((nl == 1) & (nr == 1)).double().mean().item() == expected, (prediction, nl, nr)
        if background == "uncond":
            assert ((nl + nr) == 1).all()   # each sample is one expert's image, never both


def test_two_disc_stats():
    both = np.maximum(render_disc(2, 5, 32), render_disc(28, 20, 32))
    imgs = np.stack([both, render_disc(2, 5, 32), np.zeros((32, 32), np.uint8),
                     np.maximum(render_disc(2, 5, 32), render_disc(8, 20, 32))])[..., None]
    s = two_disc_stats(imgs)
    assert s["one_each_side"] == 0.25 and s["two_disc"] == 0.5 and s["one_disc"] == 0.25
    assert s["zero_disc"] == 0.25 and s["blob"] == 0.0


# ----- the CLIs on the tiny run -----------------------------------------------------------------

@pytest.fixture
def run_copy(tiny_run, tmp_path):
    run = str(tmp_path / "run")
    os.makedirs(run)
    for f in ("ddpm.pt", "classifier.pt", "classifier_sn.pt"):
        shutil.copy(os.path.join(tiny_run, f), run)
    return run


def test_exact_score_cli_row_and_the_sampler_hooks(run_copy, tmp_path):
    import sample
    exact_score.main(["--run", run_copy, "--n", "6", "--rows", "exact_multi_exact", "--out", str(tmp_path / "s"),
                      "--device", "cpu"])
    z = np.load(os.path.join(run_copy, "eval_exact_multi_exact.npz"))
    settings = json.loads(str(z["settings"]))
    assert settings["score"] == "exact" and settings["classifier"] == "exact" and z["images"].shape == (6, 16, 16, 1)
    # Unguided exact-score samples are training images (the tiny run: T = 50, 10 steps): the core
    # sampler with eps* as its network (sample.setup's models).
    cfg = C.from_dict(torch.load(os.path.join(run_copy, "ddpm.pt"), weights_only=False)["config"])
    x, _ = training_set(cfg)
    s = sample.generate(run_copy, 8, device="cpu", models=(exact_score.score_model(cfg, "cpu"), cfg))
    assert (to_uint8(s).astype(int)[:, None] - to_uint8(x.float()).astype(int)[None]).__abs__() \
        .reshape(8, len(x), -1).max(-1).min(1).max() <= 1
    one_line_error(lambda: exact_score.main(["--run", run_copy, "--rows", "exakt_multi", "--device", "cpu"]),
                   "unknown row", "exact_multi")
    one_line_error(lambda: sample.load_classifier(run_copy, "exactly", "cpu"), "classifier or classifier_sn")


SIX = ["uncond", "multi", "multi_exact", "exact_uncond", "exact_multi", "exact_multi_exact"]


def test_exact_rows_cached_and_recorded(run_copy):
    out = os.path.join(run_copy, "exact_score")
    args = ["--run", run_copy, "--n", "6", "--batch-size", "6", "--device", "cpu", "--rows", ",".join(SIX)]
    m = exact_score.evaluate_rows(run_copy, 6, 6, rows=SIX[::-1], device="cpu", figures=False, log=lambda *a: None)
    assert list(m) == SIX   # the table's order, whatever the order asked for
    assert [(m[k]["score"], m[k]["classifier"]) for k in m] == [
        ("learned", None), ("learned", "classifier"), ("learned", "exact"), ("exact", None),
        ("exact", "classifier"), ("exact", "exact")]
    settings = {k: json.loads(str(np.load(os.path.join(run_copy, f"eval_{k}.npz"))["settings"])) for k in m}
    assert "score" not in settings["multi"] and "classifier" not in settings["multi"]   # evaluate.py's key
    assert settings["exact_multi"]["score"] == "exact" and "classifier" not in settings["exact_multi"]
    assert settings["multi_exact"]["classifier"] == "exact" and "score" not in settings["multi_exact"]
    assert settings["exact_multi_exact"]["score"] == settings["exact_multi_exact"]["classifier"] == "exact"
    # Exact-score unguided samples are training images: all one disc, none in the middle.
    assert m["exact_uncond"]["one_disc"] == 1.0 and m["exact_uncond"]["accuracy"] == 0.0
    # The CLI: the table has the six rows, and the exact rows come back from the cache.
    exact_score.main(args)
    rec = json.load(open(os.path.join(out, "exact_score.json")))
    assert json.dumps(rec, sort_keys=True) == json.dumps(
        {k: dict(v, sample_seconds=rec[k]["sample_seconds"]) for k, v in m.items()}, sort_keys=True)
    assert os.path.exists(os.path.join(out, "heatmap_classifiers.png"))
    one_line_error(lambda: exact_score.main(args[:-1] + ["uncond", "--lambdas", "10,10"]), "--lambdas",
                   "guided rows")
    one_line_error(lambda: exact_score.main(args[:-1] + ["exakt"]), "unknown row")


def test_core_clis_have_no_lab_flags():
    """sample.py and evaluate.py know nothing of the exact score or SMC (lab/ has their CLIs)."""
    import evaluate
    import sample
    for parser in (sample.build_parser(), evaluate.build_parser()):
        assert not {"--score", "--smc-particles", "--smc-ess"} & set(parser._option_string_actions)
    assert "--classifier" not in evaluate.build_parser()._option_string_actions
    assert "exact" not in evaluate.METHODS and not any(m.startswith("exact_") for m in evaluate.METHODS)


def test_score_error_and_composition_clis(run_copy, tmp_path):
    from lab import composition
    out = str(tmp_path / "err.png")
    score_error.main(["--run", run_copy, "--out", out, "--t-count", "4", "--rows", "2", "--device", "cpu"])
    res = json.load(open(str(tmp_path / "err.json")))
    assert os.path.getsize(out) > 0 and res["ts"] == [0, 16, 33, 49] and len(res["columns"]) == 14
    err, exact_err = np.array(res["err"]), np.array(res["exact_err"])
    assert np.isfinite(err).all() and (err > 0).all()
    # At t = 0 eps* of a training disc is the true noise (it denoises to itself), while a middle
    # disc is pulled to a band: E||eps* - eps||^2 is ~0 on the bands and huge in the middle.
    band = np.array(res["band"])
    assert [c for c, b in zip(res["columns"], band) if b] == [1, 2, 13, 14]   # the 16-px training columns
    assert exact_err[0, band].max() < 1e-6 and exact_err[0, ~band].min() > 1e3
    # eps* against itself has no error.
    cfg = C.from_dict(torch.load(os.path.join(run_copy, "ddpm.pt"), weights_only=False)["config"])
    ex = exact_score.score_model(cfg, "cpu")
    self_err = score_error.score_error(ex, ex, cfg["diffusion"], 16, [0, 25, 49], rows=1)
    assert np.abs(self_err["err"]).max() < 1e-6
    st = composition.main(["--run", run_copy, "--n", "8", "--background", "empty", "--device", "cpu",
                           "--out", str(tmp_path / "c.png")])
    assert st["one_each_side"] == 1.0 and os.path.getsize(str(tmp_path / "c.png")) > 0
    one_line_error(lambda: composition.main(["--run", run_copy, "--background", "bayes"]), "empty or uncond")


# ----- the score is the gradient of the mixture's log-density; bad sizes ----------------------

def _log_q(x, data, ab):
    """log q_t(x) = log (1/N) sum_i N(x; sqrt(abar) x_i, (1 - abar) I), brute force in float64."""
    d = x.numel()
    sq = ((x.flatten()[None] - ab.sqrt() * data.flatten(1)) ** 2).sum(1)
    return torch.logsumexp(-sq / (2 * (1 - ab)), 0) - math.log(len(data)) - 0.5 * d * math.log(2 * math.pi * (1 - ab))


def test_eps_star_is_minus_sqrt_one_minus_abar_times_the_finite_difference_score():
    """eps* = -sqrt(1 - abar) grad_x log q_t(x) (Tweedie), against central differences of the
    brute-force mixture density; and for one training point the closed form (x - sqrt(abar) x_1)/sqrt(1-abar)."""
    g = torch.Generator().manual_seed(0)
    data = torch.randn(5, 1, 2, 3, generator=g, dtype=torch.float64)
    abar = torch.tensor([0.3, 0.9], dtype=torch.float64)
    m = ExactEps(data, abar, chunk_n=2)
    for t in (0, 1):
        x = torch.randn(1, 1, 2, 3, generator=g, dtype=torch.float64)
        h, fd = 1e-5, torch.zeros(6, dtype=torch.float64)
        for k in range(6):
            e = torch.zeros(6, dtype=torch.float64)
            e[k] = h
            fd[k] = (_log_q(x.flatten() + e, data, abar[t]) - _log_q(x.flatten() - e, data, abar[t])) / (2 * h)
        eps = m.eps(x, torch.tensor([t])).flatten()
        assert torch.allclose(eps, -(1 - abar[t]).sqrt() * fd, atol=1e-7), (eps, fd)
    one = ExactEps(data[:1], abar)
    x = torch.randn(3, 1, 2, 3, generator=g, dtype=torch.float64)
    closed = (x - abar[1].sqrt() * data[:1]) / (1 - abar[1]).sqrt()
    assert torch.allclose(one.eps(x, torch.tensor([1])), closed, atol=1e-12)


def test_too_large_a_training_set_and_mismatched_experts_are_one_line(monkeypatch):
    monkeypatch.setattr(exact_score, "MAX_BYTES", 1000)
    one_line_error(lambda: ExactEps(torch.zeros(20, 1, 4, 4), AB), "GiB", "limit", "--image-size")
    monkeypatch.undo()
    small, big = ExactEps(torch.zeros(2, 1, 4, 4), AB), ExactEps(torch.zeros(2, 1, 8, 8), AB)
    one_line_error(lambda: LinearComposition([small, big], small), "expert 1", "(1, 8, 8)", "one image size")

"""Classifier-free multi-guidance (App. J, Eq. 12): the class-conditional UNet, label dropout, the
guided wrapper (eps-space combination, one forward per step, learned variance), CLI and errors."""
import json
import os

import numpy as np
import pytest
import torch

import config as C
import evaluate
import sample
import train
from checkpoint import UserError, load_checkpoint
from classifier_free import ClassifierFreeGuided, cfg_weights, describe, drop_labels
from conftest import TINY, one_line_error
from diffusion import GaussianDiffusion, cosine_betas
from models import build_model
from test_training import assert_one_line_error, run_cli
from unet import UNet, null_label

T = 50


class LabelSpy(torch.nn.Module):
    """A class-conditional "network" whose output depends on x, t and y per sample (so predictions
    can be told apart) and which records every label batch it is given."""

    def __init__(self, num_classes=2, out_factor=1):
        super().__init__()
        self.num_classes, self.out_factor, self.calls = num_classes, out_factor, []

    def forward(self, x, t, y=None):
        self.calls.append((x.shape[0], None if y is None else y.tolist()))
        y = torch.full((x.shape[0],), null_label(self.num_classes)) if y is None else y
        k = (y.float() + 1).view(-1, 1, 1, 1)
        out = torch.sin(k * x + 0.01 * t.float().view(-1, 1, 1, 1)) * k
        return torch.cat([out, torch.tanh(out + k)], 1) if self.out_factor == 2 else out


def separate(net, x, t, label):
    """The network's prediction for one label, in its own forward call."""
    return net(x, t, torch.full((x.shape[0],), label, dtype=torch.long))


def tiny_unet(num_classes=2, seed=0):
    torch.manual_seed(seed)
    m = UNet(16, 1, model_channels=8, channel_mult=(1, 2), attention_resolutions=(8,), num_head_channels=8,
             num_classes=num_classes)
    with torch.no_grad():  # zero-initialised convs (identity blocks, zero output) would hide y
        for p in m.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return m.eval()


# ---- the network -----------------------------------------------------------------------------


def test_unet_label_none_is_the_null_label_and_labels_matter():
    m = tiny_unet()
    x, t = torch.randn(3, 1, 16, 16), torch.tensor([1, 20, 40])
    null = torch.full((3,), null_label(2))
    assert null_label(2) == 2 and m.label_embed.table.num_embeddings == 3  # row num_classes is null
    assert torch.equal(m(x, t), m(x, t, null))
    zeros, ones = torch.zeros(3, dtype=torch.long), torch.ones(3, dtype=torch.long)
    assert not torch.allclose(m(x, t, zeros), m(x, t, ones))
    with pytest.raises(ValueError, match="--class-cond"):
        tiny_unet(num_classes=0)(x, t, torch.zeros(3, dtype=torch.long))


def test_build_model_class_cond_and_configs_without_the_field_are_refused():
    cfg = C.make_config("circles", "cpu", class_cond=True)
    assert build_model(cfg).num_classes == 2
    plain = C.from_dict(C.to_dict(C.make_config("circles", "cpu")))
    assert plain["unet"].class_cond is False and build_model(plain).label_embed is None
    d = C.to_dict(C.make_config("circles", "cpu"))
    del d["unet"]["class_cond"], d["train"]["label_dropout"]  # a checkpoint written by other code
    one_line_error(lambda: C.from_dict(d), "unet.class_cond", "other code", "retrain")
    celeba = C.make_config("celeba", "cpu", class_cond=True, attribute="Smiling,Black_Hair")
    assert build_model(celeba).num_classes == 4 == C.num_classes_of(celeba["data"])



def test_class_conditional_dit_shares_the_null_label_and_is_guided():
    cfg = C.make_config("circles", "cpu", class_cond=True, arch="dit", image_size=16, dit_width=16,
                        dit_depth=1, dit_heads=1)
    torch.manual_seed(0)
    net = build_model(cfg).eval()
    with torch.no_grad():  # adaLN-Zero: the untrained DiT outputs exactly 0 whatever y is
        for p in net.parameters():
            p.add_(0.1 * torch.randn_like(p))
    x, t = torch.randn(2, 1, 16, 16), torch.tensor([3, 40])
    assert net.num_classes == 2 and torch.equal(net(x, t), separate(net, x, t, null_label(2)))
    d = GaussianDiffusion(cosine_betas(T), prediction="v")
    e = {k: d.model_eps(separate(net, x, t, k), x, t) for k in (2, 0, 1)}
    out = ClassifierFreeGuided(net, d, torch.tensor([1.0, 1.0]))(x, t)
    assert torch.allclose(d.model_eps(out, x, t), -e[2] + (e[0] + e[1]), atol=1e-4)


# ---- training --------------------------------------------------------------------------------


def test_label_dropout_rate_and_reproducibility():
    y = torch.arange(20000) % 2
    a = drop_labels(y, 0.3, 2, torch.Generator().manual_seed(5))
    dropped = a == null_label(2)
    assert abs(dropped.float().mean().item() - 0.3) < 0.015   # ~4.6 std of a binomial
    assert torch.equal(a[~dropped], y[~dropped])               # kept labels are untouched
    assert torch.equal(a, drop_labels(y, 0.3, 2, torch.Generator().manual_seed(5)))
    assert not (drop_labels(y, 0.0, 2, torch.Generator()) == 2).any()


def _tiny_args(out, *extra):
    return ["--dataset", "circles", "--model", "ddpm", "--out", out, "--device", "cpu", "--no-grid"] + \
        TINY + list(extra)


def _spy_training_labels(monkeypatch) -> list:
    """Make train.py build networks that record the labels of every forward call (per call, a list)."""
    seen = []

    def spying_build(cfg):
        m = build_model(cfg)
        m.register_forward_pre_hook(lambda mod, args: seen.append(args[2].tolist()))
        return m

    monkeypatch.setattr(train, "build_model", spying_build)
    return seen


def test_null_label_of_training_is_the_null_label_of_sampling(tmp_path, monkeypatch):
    """label_dropout = 1: every label of a training step is the null; the guided sampler asks the
    same network for that same index (and y=None means it too)."""
    seen = _spy_training_labels(monkeypatch)
    train.main(_tiny_args(str(tmp_path / "r"), "--class-cond", "--label-dropout", "1.0", "--steps", "2"))
    assert len(seen) == 2 and {v for batch in seen for v in batch} == {null_label(2)}
    assert len(seen[0]) == 16  # the whole batch, labels per sample
    spy = LabelSpy()
    guided = ClassifierFreeGuided(spy, GaussianDiffusion(cosine_betas(T)), torch.tensor([3.0, 3.0]))
    guided(torch.randn(4, 1, 8, 8), torch.full((4,), 7))
    labels = spy.calls[0][1]
    assert labels[:4] == [null_label(2)] * 4 and labels[4:] == [0] * 4 + [1] * 4


def test_training_feeds_labels_and_dropout_draws_from_the_run_generator(tmp_path, monkeypatch):
    seen = _spy_training_labels(monkeypatch)
    for name in ("a", "b"):
        train.main(_tiny_args(str(tmp_path / name), "--class-cond", "--label-dropout", "0.5", "--steps", "3"))
    first, second = seen[:3], seen[3:]
    assert first == second                                     # reproducible
    flat = [v for batch in first for v in batch]
    assert set(flat) == {0, 1, 2} and 5 < flat.count(2) < 43   # real labels and some nulls (48 draws)


def test_label_dropout_errors(tmp_path):
    one_line_error(lambda: train.main(_tiny_args(str(tmp_path / "a"), "--class-cond", "--label-dropout", "0")),
                   "--label-dropout", "(0, 1]")
    one_line_error(lambda: train.main(_tiny_args(str(tmp_path / "b"), "--label-dropout", "0.2")),
                   "--label-dropout", "--class-cond")


# ---- the guided prediction -------------------------------------------------------------------


@pytest.mark.parametrize("form", ["affine", "printed"])
def test_lambda_zero_is_the_average_conditional_prediction_exactly(form):
    spy, d = LabelSpy(), GaussianDiffusion(cosine_betas(T), prediction="eps")
    x, t = torch.randn(5, 1, 8, 8), torch.tensor([0, 3, 10, 30, 49])
    out = ClassifierFreeGuided(spy, d, torch.zeros(2), form)(x, t)
    assert torch.equal(out, (separate(spy, x, t, 0) + separate(spy, x, t, 1)) / 2)


def test_guided_prediction_matches_eq12_both_forms_and_weighted_lambdas():
    spy, d = LabelSpy(), GaussianDiffusion(cosine_betas(T), prediction="eps")
    x, t = torch.randn(3, 1, 8, 8), torch.tensor([2, 25, 49])
    e_null, e0, e1 = (separate(spy, x, t, k) for k in (2, 0, 1))
    for form, c in (("affine", 1 + 4.0), ("printed", 1 - 4.0)):
        out = ClassifierFreeGuided(spy, d, torch.tensor([4.0, 4.0]), form)(x, t)
        assert torch.allclose(out, -4.0 * e_null + c * (e0 + e1) / 2, atol=1e-5)
    # Unequal lambdas: lambda = their mean (4), class weights proportional to them (1/4, 3/4).
    out = ClassifierFreeGuided(spy, d, torch.tensor([2.0, 6.0]))(x, t)
    assert torch.allclose(out, -4.0 * e_null + 5.0 * (0.25 * e0 + 0.75 * e1), atol=1e-5)
    assert describe(torch.tensor([2.0, 6.0]), "printed") == {
        "cfg_form": "printed", "cfg_lambda": 4.0, "cfg_class_weights": [0.25, 0.75],
        "cfg_null_weight": -4.0, "cfg_average_weight": -3.0}
    with pytest.raises(UserError, match=">= 0"):
        cfg_weights(torch.tensor([-1.0, 2.0]))
    lam, w = cfg_weights(torch.tensor([-1.0, -1.0]))[:2]   # equal lambdas may be negative
    assert lam == -1.0 and w.tolist() == [0.5, 0.5]


def test_v_prediction_is_combined_in_eps_space():
    """Printed weights (sum 1 - 2 lambda) differ between v and eps space: the wrapper combines eps
    and hands back v. Affine weights (sum 1) give the same result either way."""
    spy, d = LabelSpy(), GaussianDiffusion(cosine_betas(T), prediction="v")
    x, t = torch.randn(4, 1, 8, 8), torch.tensor([5, 20, 35, 49])
    v = {k: separate(spy, x, t, k) for k in (2, 0, 1)}
    eps = {k: d.model_eps(v[k], x, t) for k in v}
    lam = 0.5
    for form, c in (("printed", 1 - lam), ("affine", 1 + lam)):
        out = ClassifierFreeGuided(spy, d, torch.tensor([lam, lam]), form)(x, t)
        want_eps = -lam * eps[2] + c * (eps[0] + eps[1]) / 2
        assert torch.allclose(d.model_eps(out, x, t), want_eps, atol=1e-4)
        naive_v = -lam * v[2] + c * (v[0] + v[1]) / 2
        gap = (d.model_eps(out, x, t) - d.model_eps(naive_v, x, t)).abs().max().item()
        if form == "printed":
            assert gap > 0.1, gap          # weights sum to 0: the v-space mix is another prediction
        else:
            assert gap < 1e-5, gap


def test_learned_variance_output_combines_only_the_mean_part():
    spy, d = LabelSpy(out_factor=2), GaussianDiffusion(cosine_betas(T), prediction="eps")
    x, t = torch.randn(2, 1, 8, 8), torch.tensor([4, 40])
    outs = {k: separate(spy, x, t, k) for k in (2, 0, 1)}
    got = ClassifierFreeGuided(spy, d, torch.tensor([2.0, 6.0]), channels=1)(x, t)
    assert got.shape == (2, 2, 8, 8)
    mean = -4.0 * outs[2][:, :1] + 5.0 * (0.25 * outs[0][:, :1] + 0.75 * outs[1][:, :1])
    assert torch.allclose(got[:, :1], mean, atol=1e-5)
    assert torch.allclose(got[:, 1:], 0.25 * outs[0][:, 1:] + 0.75 * outs[1][:, 1:], atol=1e-6)
    # With the diffusion's learned Sigma (Eq. 8) the wrapped 2C-channel UNet samples like any network.
    net = tiny_unet()
    net.out[-1] = torch.nn.Conv2d(8, 2, 3, padding=1)
    d = GaussianDiffusion.respaced(cosine_betas(T), 5, variance="learned", prediction="v")
    full = GaussianDiffusion(cosine_betas(T), variance="learned", prediction="v")
    x = d.sample(ClassifierFreeGuided(net, full, torch.tensor([2.0, 2.0])), (3, 1, 16, 16),
                 generator=torch.Generator().manual_seed(0))
    assert x.shape == (3, 1, 16, 16) and torch.isfinite(x).all()


@pytest.mark.parametrize("sampler", ["ancestral", "ddim"])
def test_one_batched_forward_per_sampling_step(sampler):
    spy = LabelSpy()
    d = GaussianDiffusion.respaced(cosine_betas(T), 6, prediction="v")
    full = GaussianDiffusion(cosine_betas(T), prediction="v")  # the wrapper is told original timesteps
    guided = ClassifierFreeGuided(spy, full, torch.tensor([3.0, 3.0]))
    x = d.sample(guided, (5, 1, 8, 8), generator=torch.Generator().manual_seed(0), sampler=sampler)
    assert torch.isfinite(x).all()
    assert len(spy.calls) == 6 and all(b == 15 for b, _ in spy.calls)  # (M + 1) x B, once per step


def test_real_unet_batched_equals_separate_calls():
    m, d = tiny_unet(), GaussianDiffusion(cosine_betas(T), prediction="v")
    x, t = torch.randn(3, 1, 16, 16), torch.tensor([1, 25, 49])
    e = {k: d.model_eps(separate(m, x, t, k), x, t) for k in (2, 0, 1)}
    out = ClassifierFreeGuided(m, d, torch.tensor([2.0, 2.0]))(x, t)
    assert torch.allclose(d.model_eps(out, x, t), -2 * e[2] + 3 * (e[0] + e[1]) / 2, atol=1e-4)


# ---- CLI, errors, end to end -----------------------------------------------------------------


def test_cfg_on_a_label_free_model_is_a_one_line_error(tiny_run, tmp_path):
    p = run_cli("sample.py", "--run", tiny_run, "--guidance", "cfg", "--n", "2", "--device", "cpu",
                "--out", str(tmp_path))
    assert_one_line_error(p, "--guidance cfg", "without labels", "--class-cond")
    one_line_error(lambda: evaluate.main(["--run", tiny_run, "--methods", "cfg", "--device", "cpu"]),
                   "method cfg", "--class-cond")


def test_cfg_flag_errors(tiny_run):
    run = ["--run", tiny_run, "--device", "cpu", "--n", "2"]
    one_line_error(lambda: sample.main(run + ["--guidance", "cfg", "--cfg-form", "eq12"]),
                   "unknown --cfg-form", "affine", "printed")
    one_line_error(lambda: sample.main(run + ["--cfg-form", "printed"]), "--cfg-form", "--guidance cfg")
    one_line_error(lambda: sample.main(run + ["--guidance", "cfg", "--target", "1"]), "--target", "drop it")
    from lab import smc
    one_line_error(lambda: smc.main(run + ["--guidance", "cfg", "--particles", "4"]), "--guidance cfg")
    one_line_error(lambda: evaluate.main(run + ["--methods", "uncond,multi", "--cfg-form", "printed"]),
                   "--cfg-form", "cfg method")
    one_line_error(lambda: evaluate.main(run + ["--cfg-form", "eq12"]), "unknown --cfg-form")


def test_end_to_end_class_conditional_training_and_cfg_sampling(tmp_path):
    run = str(tmp_path / "cfg")
    train.main(_tiny_args(run, "--class-cond", "--steps", "12"))
    ck = load_checkpoint(run, "ddpm")
    assert ck["config"]["unet"]["class_cond"] is True and ck["config"]["train"]["label_dropout"] == 0.1
    assert "label_embed.table.weight" in ck["ema"]
    sample.main(["--run", run, "--guidance", "cfg", "--scale", "3", "--n", "6", "--batch-size", "4",
                 "--device", "cpu"])
    z = np.load(os.path.join(run, "samples_cfg_affine.npz"))
    assert z["images"].shape == (6, 16, 16, 1)
    assert str(z["cfg_form"]) == "affine" and str(z["classifier"]) == "" and float(z["scale"]) == 3.0
    sample.main(["--run", run, "--guidance", "cfg", "--cfg-form", "printed", "--lambdas", "0.5,0.5",
                 "--n", "2", "--device", "cpu"])
    assert os.path.exists(os.path.join(run, "samples_cfg_printed.npz"))
    # evaluate.py: uncond (the null label) and cfg rows by default for a DDPM-only class-cond run.
    m = evaluate.evaluate_run(run, n=4, batch_size=4, lambdas="2,2", device=torch.device("cpu"), figures=False,
                              log=lambda *a: None)
    assert set(m) == {"uncond", "cfg"}
    assert m["cfg"]["cfg_form"] == "affine" and m["cfg"]["cfg_lambda"] == 2.0 and m["cfg"]["lambdas"] == "2,2"
    saved = json.load(open(os.path.join(run, "metrics.json")))
    assert saved["cfg"]["cfg_average_weight"] == 3.0 and "cfg_form" not in saved["uncond"]
    # Another form is another cache key: resampled, and recorded.
    m = evaluate.evaluate_run(run, n=4, batch_size=4, lambdas="2,2", device=torch.device("cpu"), figures=False,
                              log=lambda *a: None, methods=["cfg"], cfg_form="printed")
    assert m["cfg"]["cfg_form"] == "printed" and m["cfg"]["cfg_average_weight"] == -1.0

"""Learned reverse variance (App. A, Eq. 8) and L_hybrid / the variational bound (Eq. 9).

* normal_kl and the discretised decoder likelihood against values computed by hand;
* the stop-gradient: L_vlb moves only the variance, L_simple only the mean, lambda = 0.001 x T;
* Sigma_theta lies between beta~_t and beta_t, equals them at v = -1 / +1, on full and respaced grids;
* the guided learned step is mu + Sigma g + sqrt(Sigma) z per pixel; DDIM reads only the mean part;
* the bound of an exact denoiser equals its decoder + prior (+ variance-mismatch) terms by hand;
* a tiny learned-variance run trains, samples (ancestral, DDIM, guided) and benches end to end;
* --variance learned on --resume of a fixed run, and an unknown variance, are one-line errors.
"""
import math
import os
import sys

import numpy as np
import pytest
import torch

import config as C
import models
import sample
import train
from checkpoint import load_checkpoint
from conftest import TINY, one_line_error
from diffusion import HYBRID_LAMBDA, GaussianDiffusion, cosine_betas
from vlb import discretised_gaussian_log_likelihood, normal_kl, vlb_bits_per_dim, vlb_terms

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LN2 = math.log(2.0)


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py: tiny tensors, one thread


def Phi(x: float) -> float:
    return 0.5 * (1 + math.erf(x / math.sqrt(2)))


# ----- the two likelihood pieces ------------------------------------------------------------------

def test_normal_kl_against_the_closed_form_by_hand():
    # KL(N(1, 2) || N(0, 0.5)) = 1/2 (log(0.5/2) - 1 + 2/0.5 + 1^2/0.5) = 1/2 (5 - log 4)
    kl = normal_kl(torch.tensor(1.0), torch.tensor(math.log(2.0)), torch.tensor(0.0), torch.tensor(math.log(0.5)))
    assert kl.item() == pytest.approx(1.8068528194, rel=1e-6)
    # KL(N(0, 1) || N(3, 4)) = 1/2 (log 4 - 1 + 1/4 + 9/4) = 1/2 (1.5 + log 4)
    kl = normal_kl(torch.tensor(0.0), torch.tensor(0.0), torch.tensor(3.0), torch.tensor(math.log(4.0)))
    assert kl.item() == pytest.approx(1.4431471806, rel=1e-6)
    # elementwise, zero for equal Gaussians, and asymmetric
    m, lv = torch.randn(5, dtype=torch.float64), torch.randn(5, dtype=torch.float64)
    assert torch.equal(normal_kl(m, lv, m, lv), torch.zeros(5, dtype=torch.float64))
    assert normal_kl(m, lv, m + 1, lv + 1).shape == (5,)


def test_discretised_decoder_by_hand():
    s = 1 / 255                                  # sigma = half a bin: the bin edges are at +-1 sigma
    lv = torch.tensor(2 * math.log(s), dtype=torch.float64)
    ll = lambda x, mu: discretised_gaussian_log_likelihood(torch.tensor(x, dtype=torch.float64),
                                                           torch.tensor(mu, dtype=torch.float64), lv).item()
    # end bins are open: P(x = -1 | mu = -1) = Phi(1) = P(x = 1 | mu = 1)
    assert ll(-1.0, -1.0) == pytest.approx(math.log(Phi(1)), rel=1e-9)
    assert ll(1.0, 1.0) == pytest.approx(math.log(Phi(1)), rel=1e-9)
    # an interior level (127 -> -1/255) centred in its bin: Phi(1) - Phi(-1) = 0.6826894921
    assert ll(-s, -s) == pytest.approx(math.log(0.6826894921), rel=1e-8)
    # one bin away: Phi(3) - Phi(1)
    assert ll(-s + 2 * s, -s) == pytest.approx(math.log(Phi(3) - Phi(1)), rel=1e-8)
    # 40 sigma away: Phi(-39) - Phi(-41) underflows a naive difference; Phi(-41) / Phi(-39) ~ e^-80,
    # so this is log Phi(-39) = -39^2/2 - log(39 sqrt(2 pi)) + log(1 - 1/39^2 + 3/39^4) (Mills ratio)
    far = ll(s, s - 40 * s)
    mills = -39 ** 2 / 2 - math.log(39 * math.sqrt(2 * math.pi)) + math.log(1 - 39 ** -2 + 3 * 39 ** -4)
    assert math.isfinite(far) and far == pytest.approx(mills, abs=1e-5) and mills == pytest.approx(-765.08316, abs=1e-5)
    # a white pixel (level 255) under a black mean: finite, hugely negative (the circles' case)
    assert -1e7 < ll(1.0, -1.0) < -1e4


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_discretised_decoder_sums_to_one_over_the_256_levels(dtype):
    levels = torch.arange(256, dtype=dtype) / 127.5 - 1
    for mu, sd in ((0.3, 0.01), (-0.97, 0.002), (0.0, 0.7), (1.0, 1e-4)):
        p = discretised_gaussian_log_likelihood(levels, torch.tensor(mu, dtype=dtype),
                                                torch.tensor(2 * math.log(sd), dtype=dtype)).exp()
        assert p.sum().item() == pytest.approx(1.0, abs=1e-5 if dtype == torch.float32 else 1e-10)


# ----- Eq. 8: Sigma_theta between beta~_t and beta_t ----------------------------------------------

@pytest.mark.parametrize("K", [None, 64])
def test_learned_sigma_lies_between_the_fixed_variances(K):
    betas = cosine_betas(1000)
    d = GaussianDiffusion(betas, "learned") if K is None else GaussianDiffusion.respaced(betas, K, "learned")
    t = torch.arange(d.T)
    shape = (d.T, 1, 1, 1)
    sig = lambda v: d.model_log_variance_of(torch.full(shape, float(v)), t, shape).double().exp().view(-1)
    hi = d.betas.clone()                                        # the grid's own betas (respaced ones if K)
    lo = torch.cat([d.posterior_variance[1:2], d.posterior_variance[1:]])   # beta~_1 at t = 0
    if K is not None:
        assert hi[1] > 10 * betas[d.timestep_map[1]]   # a kept step's beta, not the original one's
    assert torch.allclose(sig(-1), lo, rtol=1e-5) and torch.allclose(sig(1), hi, rtol=1e-5)
    assert torch.allclose(sig(0), (lo * hi).sqrt(), rtol=1e-5)  # v = 0 (zero-init output): geometric mean
    prev = sig(-1)
    for v in np.linspace(-1, 1, 9)[1:]:
        s = sig(v)
        assert (s >= lo * (1 - 1e-5)).all() and (s <= hi * (1 + 1e-5)).all()
        assert (s[1:] > prev[1:]).all()                         # monotone in v where beta~_t < beta_t
        prev = s


def test_p_mean_variance_reads_the_variance_channels():
    d = GaussianDiffusion(cosine_betas(50), "learned")
    xt = torch.randn(3, 2, 4, 4, generator=torch.Generator().manual_seed(0))
    t = torch.tensor([1, 20, 49])
    v = torch.linspace(-1, 1, 32).view(1, 2, 4, 4).expand(3, -1, -1, -1)
    net = lambda x, tt: torch.cat([0.3 * x, v], 1)
    mean, var, x0 = d.p_mean_variance(net, xt, t)
    assert var.shape == xt.shape                               # per pixel and channel
    b, bt = d.betas[t].view(-1, 1, 1, 1), d.posterior_variance[t].view(-1, 1, 1, 1)
    expected = torch.exp((v + 1) / 2 * b.log() + (1 - v) / 2 * bt.log())
    assert torch.allclose(var.double(), expected, rtol=1e-5)
    fixed = GaussianDiffusion(cosine_betas(50), "fixed_large")
    m2, _, x02 = fixed.p_mean_variance(lambda x, tt: 0.3 * x, xt, t)
    assert torch.equal(mean, m2) and torch.equal(x0, x02)      # the mean uses the first C channels only
    with pytest.raises(ValueError, match="needs 4"):
        d.p_mean_variance(lambda x, tt: 0.3 * x, xt, t)         # a C-channel net for a learned variance


def test_guided_learned_step_is_mean_plus_sigma_g_plus_sqrt_sigma_z():
    d = GaussianDiffusion(cosine_betas(50), "learned")
    xt = torch.randn(3, 1, 4, 4, generator=torch.Generator().manual_seed(1))
    t = torch.tensor([0, 10, 40])
    v = torch.linspace(-1, 1, 16).view(1, 1, 4, 4).expand(3, -1, -1, -1)
    net = lambda x, tt: torch.cat([0.2 * x - 0.1, v], 1)
    g = torch.randn(xt.shape, generator=torch.Generator().manual_seed(2))
    mean, var, _ = d.p_mean_variance(net, xt, t)
    x, _ = d.p_sample(net, xt, t, guidance=lambda x_, t_: g, generator=torch.Generator().manual_seed(3))
    z = torch.randn(xt.shape, generator=torch.Generator().manual_seed(3))
    nonzero = (t != 0).float().view(-1, 1, 1, 1)
    assert torch.allclose(x, mean + var * g + nonzero * var.sqrt() * z, atol=1e-6)
    assert var[1].max() > 1.1 * var[1].min()   # a per-pixel Sigma: a scalar variance would fail this


def test_ddim_and_inversion_read_only_the_mean_part():
    betas = cosine_betas(50)
    learned, fixed = GaussianDiffusion.respaced(betas, 10, "learned"), GaussianDiffusion.respaced(betas, 10)
    eps = lambda x, tt: 0.3 * x - 0.01 * tt.view(-1, 1, 1, 1).float()
    wild = lambda x, tt: torch.cat([eps(x, tt), 5 * torch.randn_like(x)], 1)   # any variance output
    xt = torch.randn(2, 1, 4, 4, generator=torch.Generator().manual_seed(4))
    t = torch.tensor([3, 9])
    a, _ = learned.ddim_sample(wild, xt, t, eta=0.5, generator=torch.Generator().manual_seed(5))
    b, _ = fixed.ddim_sample(eps, xt, t, eta=0.5, generator=torch.Generator().manual_seed(5))
    assert torch.equal(a, b)
    x0 = torch.rand(2, 1, 4, 4) * 2 - 1
    assert torch.equal(learned.ddim_invert(wild, x0, 6), fixed.ddim_invert(eps, x0, 6))


# ----- Eq. 9: the stop-gradient and L_hybrid -------------------------------------------------------

def binary_images(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.rand(n, 1, 4, 4, generator=g) > 0.7).float() * 2 - 1


def test_vlb_term_has_no_gradient_on_the_mean_part():
    d = GaussianDiffusion(cosine_betas(50), "learned", prediction="v")
    x0 = binary_images(4)
    t = torch.tensor([0, 1, 20, 49])          # the decoder term and three KL terms
    xt = d.q_sample(x0, t, torch.randn(x0.shape, generator=torch.Generator().manual_seed(1)))
    out = torch.randn(4, 2, 4, 4, generator=torch.Generator().manual_seed(2)).requires_grad_(True)
    terms = vlb_terms(d, out[:, :1], out[:, 1:], x0, xt, t)
    assert terms.shape == (4,) and torch.isfinite(terms).all() and (terms > 0).all()
    (grad,) = torch.autograd.grad(terms.sum(), out)
    assert torch.count_nonzero(grad[:, :1]) == 0                        # exactly zero: stop-gradient
    assert (grad[:, 1:].abs().flatten(1).amax(1) > 0).all()             # every term trains the variance


class SplitNet(torch.nn.Module):
    """[mean part, variance part] from two separate parameters, so their gradients can be told apart."""

    def __init__(self):
        super().__init__()
        self.m = torch.nn.Parameter(torch.full((1, 1, 4, 4), 0.1))
        self.s = torch.nn.Parameter(torch.full((1, 1, 4, 4), 0.2))

    def forward(self, x, t):
        return torch.cat([x * self.m, (x * 0 + 1) * self.s], 1)


def test_hybrid_loss_is_simple_plus_lambda_T_vlb_and_each_part_trains_its_half():
    d = GaussianDiffusion(cosine_betas(50), "learned")
    x0 = binary_images(6, seed=3)
    t = torch.tensor([0, 2, 9, 25, 40, 49])
    noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(4))
    net = SplitNet()
    loss = d.training_loss(net, x0, t, noise)
    gm, gs = torch.autograd.grad(loss, [net.m, net.s])
    xt = d.q_sample(x0, t, noise)
    out = net(xt, t)
    simple = ((out[:, :1] - noise) ** 2).mean()
    vlb = vlb_terms(d, out[:, :1], out[:, 1:], x0, xt, t).mean()
    assert loss.item() == pytest.approx(simple.item() + HYBRID_LAMBDA * 50 * vlb.item(), rel=1e-6)
    assert HYBRID_LAMBDA == 1e-3
    gm_simple, = torch.autograd.grad(simple, net.m, retain_graph=True)
    assert torch.allclose(gm, gm_simple, rtol=1e-6, atol=0)            # the mean: L_simple only
    assert torch.count_nonzero(gs) > 0
    gs_vlb, = torch.autograd.grad(HYBRID_LAMBDA * 50 * vlb, net.s)
    assert torch.allclose(gs, gs_vlb, rtol=1e-5, atol=0)               # the variance: L_vlb only
    # a fixed-variance run keeps plain L_simple
    fixed = GaussianDiffusion(cosine_betas(50))
    assert fixed.training_loss(lambda x, tt: 0.5 * x, x0, t, noise).item() == pytest.approx(
        ((0.5 * xt - noise) ** 2).mean().item(), rel=1e-6)


# ----- the full bound -------------------------------------------------------------------------------

@pytest.mark.parametrize("variance,K", [("fixed_small", None), ("learned", None), ("fixed_large", None),
                                        ("fixed_small", 10)])
def test_bound_of_the_exact_denoiser_by_hand(variance, K):
    """One training image and its exact eps: the model's mean is the true posterior mean, so the
    KL terms are pure variance mismatch (0 for beta~_t) and the bound is decoder + prior + those."""
    betas = cosine_betas(50)
    d = GaussianDiffusion(betas, variance) if K is None else GaussianDiffusion.respaced(betas, K, variance)
    x0 = binary_images(1, seed=5)
    ab = d.alphas_cumprod.float()

    def exact(x, tt):           # tt is the original timestep: this grid's index via timestep_map
        k = torch.searchsorted(d.timestep_map, tt)
        eps = (x - ab[k].sqrt().view(-1, 1, 1, 1) * x0) / (1 - ab[k]).sqrt().view(-1, 1, 1, 1)
        return torch.cat([eps, -torch.ones_like(x)], 1) if variance == "learned" else eps

    res = vlb_bits_per_dim(d, exact, x0, clip_denoised=True, generator=torch.Generator().manual_seed(0))
    assert res["terms"].shape == (1, d.T)
    # decoder: mean = x_0 exactly, sigma^2 = beta~_1 (fixed tables and frac = 0 alike), end bins
    s = math.sqrt(d.posterior_variance[1].item())
    dec = -math.log(Phi(1 / 255 / s)) / LN2
    assert res["terms"][0, 0].item() == pytest.approx(dec, rel=1e-4)
    # prior: KL(N(sqrt(abar_T) x0, 1 - abar_T) || N(0, 1)) per pixel, mean over pixels
    abT = d.alphas_cumprod[-1].item()
    prior = 0.5 * (-math.log(1 - abT) - 1 + (1 - abT) + abT * (x0.double() ** 2)).mean().item() / LN2
    assert res["prior"].item() == pytest.approx(prior, rel=1e-3, abs=1e-9)
    # KL terms: 1/2 (log(sigma^2 / beta~) - 1 + beta~ / sigma^2), the same for every pixel
    bt, b = d.posterior_variance[1:].numpy(), d.betas[1:].numpy()
    sig2 = b if variance == "fixed_large" else bt
    kl = 0.5 * (np.log(sig2 / bt) - 1 + bt / sig2) / LN2
    assert np.allclose(res["terms"][0, 1:].numpy(), kl, rtol=1e-3, atol=2e-5)
    assert res["total"].item() == pytest.approx(dec + prior + kl.sum(), rel=1e-3)
    if variance == "fixed_large":
        assert kl.sum() > 0.01       # beta_t != beta~_t costs bits; beta~_t is free here


# ----- end to end ----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def learned_run(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("ls") / "run")
    train.main(["--dataset", "circles", "--variance", "learned", "--out", out, "--steps", "6",
                "--clf-steps", "2", "--device", "cpu", "--no-grid", "--log-every", "3"] + TINY)
    return out


def test_tiny_learned_run_trains_samples_and_benches(learned_run, capsys):
    import json
    ck = load_checkpoint(learned_run, "ddpm")
    assert ck["config"]["diffusion"]["variance"] == "learned"
    assert ck["ema"]["out.2.weight"].shape[0] == 2           # [eps/v, v_var] for 1-channel images
    with open(os.path.join(learned_run, "log_ddpm.jsonl")) as f:
        losses = [json.loads(line)["loss"] for line in f]
    assert len(losses) == 2 and all(math.isfinite(v) and v > 0 for v in losses)
    for kw in ({}, {"sampler": "ddim"}, {"sampler": "ddim", "eta": 1.0},
               {"guidance": "multi", "lambdas": "30,30"}):
        x = sample.generate(learned_run, n=3, batch_size=3, device="cpu", **kw)
        assert x.shape == (3, 1, 16, 16) and torch.isfinite(x).all(), kw
    sys.path.insert(0, os.path.join(ROOT, "bench"))
    import learned_sigma
    capsys.readouterr()
    learned_sigma.main(["--run", learned_run, "--n", "2", "--steps", "3", "--show", "3", "--device", "cpu"])
    out = capsys.readouterr().out
    assert "held-out set: middle" in out and out.count("bits/dim") == 2
    rows = [line.split() for line in out.splitlines() if line.strip()[:1].isdigit()]
    assert [int(r[0]) for r in rows] == [0, 24, 49]
    for r in rows:      # a barely trained net starts at v ~ 0: frac ~ 1/2, Sigma between the ends
        lo, hi, sig, frac = map(float, r[1:5])
        assert lo <= sig <= hi and 0.3 < frac < 0.7


def test_learned_output_width_of_presets():
    assert models.output_channels(C.make_config("circles", "paper")) == 2
    assert models.output_channels(C.make_config("celeba", "paper")) == 6
    assert models.output_channels(C.make_config("circles", "cpu")) == 1   # fixed beta_t stays the default


def test_resume_of_a_fixed_run_with_learned_variance_is_one_line(tmp_path):
    out = str(tmp_path / "fixed")
    train.main(["--model", "ddpm", "--out", out, "--steps", "2", "--device", "cpu", "--no-grid"] + TINY)
    before = os.path.getmtime(os.path.join(out, "ddpm.pt"))
    one_line_error(lambda: train.main(["--model", "ddpm", "--out", out, "--resume", "--variance", "learned",
                                       "--steps", "4", "--no-grid"]),
                   "variance='fixed_large'", "'learned'", "drop --variance")
    assert os.path.getmtime(os.path.join(out, "ddpm.pt")) == before
    # and a classifier added to it keeps the run's fixed variance rather than taking the flag
    one_line_error(lambda: train.main(["--model", "classifier", "--out", out, "--variance", "learned",
                                       "--overwrite", "--clf-steps", "1", "--no-grid"]),
                   "variance='fixed_large'", "all models of a run share")


def test_unknown_variance_is_one_line(tmp_path):
    one_line_error(lambda: train.main(["--model", "ddpm", "--out", str(tmp_path / "r"), "--variance", "learnt",
                                       "--steps", "1", "--device", "cpu", "--no-grid"] + TINY),
                   "unknown variance 'learnt'", "learned")

"""Twisted SMC guided sampling (lab/smc.py) against closed forms, and the --bands middle data (§7).

The toy: one-pixel data x_0 ~ N(M, S^2) with its exact eps, and a Gaussian "likelihood"
p(y | x_0) = N(C; x_0, R^2) whose exact noisy version is known: x_0 | x_t ~ N(m_t(x_t), v_t) with
    m_t = M + k_t (x_t - sqrt(abar) M),  k_t = sqrt(abar) S^2 / (abar S^2 + 1 - abar),
    v_t = S^2 (1 - abar) / (abar S^2 + 1 - abar),
so  log p(y | x_t) = -(C - m_t)^2 / (2 (R^2 + v_t)) + const. The tilted target
p(x_0) p(y | x_0)^lambda is Gaussian with precision 1/S^2 + lambda/R^2. For lambda = 1 plain guidance
with this exact classifier is exact (the Feynman-Kac weight vanishes); for lambda != 1 it is not,
and SMC is what corrects it. (A log-likelihood *linear* in x_0 would not do: its exact noisy
gradient does not depend on x, so every particle gets the same weight and plain guidance with
lambda times it is already exact.)
"""
import json
import os

import numpy as np
import pytest
import torch

from conftest import one_line_error
from diffusion import GaussianDiffusion, cosine_betas
from lab import smc
from lab.smc import ess, smc_sample, smc_step, systematic_resample

M, S, C, R = 0.3, 0.2, 0.6, 0.2
BETAS = cosine_betas(1000)
ABAR = torch.from_numpy(np.cumprod(1 - BETAS))


class GaussEps:
    """The exact eps of N(M, S^2) data; receives model-time (original) indices, like the UNet."""

    def __call__(self, x, t):
        ab = ABAR[t].view(-1, 1, 1, 1).to(x.dtype)
        return (x - ab.sqrt() * M) * (1 - ab).sqrt() / (ab * S ** 2 + 1 - ab)


def gauss_twist(lam):
    """(x, t) -> (lam log p(y | x_t, t) per row, its gradient): the exact noisy Gaussian likelihood."""
    def twist(x, t):
        ab = ABAR[t].view(-1, 1, 1, 1).to(x.dtype)
        k = ab.sqrt() * S ** 2 / (ab * S ** 2 + 1 - ab)
        v = S ** 2 * (1 - ab) / (ab * S ** 2 + 1 - ab)
        m = M + k * (x - ab.sqrt() * M)
        return (-lam * (C - m) ** 2 / (2 * (R ** 2 + v))).flatten(1).sum(1), lam * (C - m) * k / (R ** 2 + v)
    return twist


def tilted(lam):
    """Mean and std of p(x_0) p(y | x_0)^lam, i.e. N(M, S^2) N(C; x_0, R^2)^lam (continuous time)."""
    prec = 1 / S ** 2 + lam / R ** 2
    return (M / S ** 2 + lam * C / R ** 2) / prec, prec ** -0.5


def chain_target(d, model, lam):
    """Mean and std of what SMC targets on the *discrete* chain, exactly: with the exact eps every
    ancestral step is affine in x plus Gaussian noise, so p_theta's marginal at index 0 is
    N(m, v) (propagated step by step); the final twist lam log p(y | x, t = 0) is quadratic in x
    (its gradient is affine: -A x + B), so the tilted law is Gaussian with precision 1/v + A; the
    last, noiseless step x -> mu(x) + sigma_0^2 g(x) is affine. (tilted() is the continuous-time
    limit: at 100 steps fixed_small draws p_theta with std 0.185, not 0.2.)"""
    def at(x, i):
        return d.p_mean_variance(model, torch.tensor([[[[x]]]]), torch.tensor([i]), False)[0].item()
    m, v = 0.0, 1.0
    for i in range(d.T - 1, 0, -1):
        b = at(0.0, i)
        a = at(1.0, i) - b
        m, v = a * m + b, a * a * v + d.model_variance[i].item()
    def grad0(x):  # the final twist's gradient, at the classifier's t = 0
        return gauss_twist(lam)(torch.tensor([[[[x]]]], dtype=torch.float64), d.model_t(torch.tensor([0])))[1].item()
    A, B = grad0(0.0) - grad0(1.0), grad0(0.0)
    prec = 1 / v + A
    mean = (m / v + B) / prec
    last = lambda x: at(x, 0) + d.model_variance[0].item() * grad0(x)  # noqa: E731
    f0 = last(0.0)
    f1 = last(1.0) - f0
    return f1 * mean + f0, abs(f1) / prec ** 0.5


def toy(K=100):
    return GaussianDiffusion.respaced(BETAS, K, "fixed_small", "eps"), GaussEps()


def run(d, model, twist, systems, particles, seed=0, **kw):
    x, info = smc_sample(d, model, twist, systems, particles, (1, 1, 1), False, torch.Generator().manual_seed(seed),
                         torch.Generator().manual_seed(seed), **kw)
    return x.flatten(), info


# ----- the sampler on the Gaussian toy --------------------------------------------------------

def test_smc_matches_the_tilted_target_and_plain_guidance_does_not():
    """lambda = 5 on 100 steps: the chain's tilted target is N(0.5435, 0.0802^2) (0.55, 0.0816 in
    continuous time). 64 systems x 64 particles land within 0.012 / 0.008 (largest errors over
    seeds 0-7: 0.0076 / 0.0047); plain guidance (one particle per system, never resampled) is
    0.037 too far right."""
    d, model = toy()
    mean, std = chain_target(d, model, 5.0)
    assert abs(mean - tilted(5.0)[0]) < 0.01 and abs(std - tilted(5.0)[1]) < 0.003
    x, info = run(d, model, gauss_twist(5.0), 64, 64)
    assert abs(x.mean().item() - mean) < 0.012 and abs(x.std().item() - std) < 0.008
    assert info["resampled"] > 0 and 0 < info["final_ess"] < 1 and info["survivors"] < 64
    plain, pinfo = run(d, model, gauss_twist(5.0), 4096, 1)
    assert pinfo["resampled"] == 0
    assert plain.mean().item() - mean > 0.025
    assert abs(x.mean().item() - mean) < abs(plain.mean().item() - mean) / 3


def test_lambda_one_with_the_exact_classifier_needs_little_correction():
    """Skreta et al.'s weight (g^2/2)(||sum lambda u||^2 - sum lambda ||u||^2) is 0 for one class at
    lambda = 1: guidance with the exact classifier samples the posterior, and the discrete weights
    stay nearly equal (only the step size moves them): no system resamples, ESS > 0.98 N. The
    chain target itself is checked against unguided draws (lambda = 0)."""
    d, model = toy()
    mean, std = chain_target(d, model, 0.0)
    u = d.sample(model, (4096, 1, 1, 1), False, None, torch.Generator().manual_seed(0)).flatten()
    assert abs(u.mean().item() - mean) < 0.01 and abs(u.std().item() - std) < 0.006 and std < 0.19
    mean, std = chain_target(d, model, 1.0)
    x, info = run(d, model, gauss_twist(1.0), 64, 64)
    assert info["resampled"] == 0 and info["final_ess"] > 0.98
    assert abs(x.mean().item() - mean) < 0.012 and abs(x.std().item() - std) < 0.008


def test_step_weight_is_the_gaussian_density_ratio():
    """The closed form -sigma g.z - sigma^2 ||g||^2 / 2 + log p~_{i-1} - log p~_i against
    torch.distributions on a 2x2 image."""
    d, model = toy(K=20)
    twist = gauss_twist(3.0)
    x = torch.randn(16, 1, 2, 2, generator=torch.Generator().manual_seed(0))
    i = 7
    t = torch.full((16,), i)
    logv, g = twist(x, d.model_t(t))
    x1, logv1, g1, inc = smc_step(d, model, twist, x, i, logv, g, False, torch.Generator().manual_seed(1))
    mean, var, _ = d.p_mean_variance(model, x, t, False)
    normal = lambda mu: torch.distributions.Normal(mu.double(), var.sqrt().double())  # noqa: E731
    log_p = normal(mean).log_prob(x1.double()).flatten(1).sum(1)
    log_q = normal(mean + var * g).log_prob(x1.double()).flatten(1).sum(1)
    want = log_p - log_q + twist(x1, d.model_t(t - 1))[0].double() - logv.double()
    assert torch.allclose(inc.double(), want, atol=1e-4)
    assert inc.std() > 0.1  # the particles do get different weights
    assert torch.allclose(logv1, twist(x1, d.model_t(t - 1))[0]) and torch.allclose(g1, twist(x1, d.model_t(t - 1))[1])
    z = torch.randn(x.shape, generator=torch.Generator().manual_seed(1))
    assert torch.allclose(x1, mean + var * g + var.sqrt() * z, atol=1e-6)  # the guided step itself


def test_one_particle_and_lambda_zero_are_the_plain_samplers():
    """N = 1 never reweighs: the plain guided sampler draw for draw. lambda = 0 through the real
    guidance code (a linear classifier): every log-weight increment is 0, nothing resamples, and
    the unguided sampler comes back draw for draw."""
    from guidance import multi_guidance
    d, model = toy(K=30)
    g = lambda x, t: gauss_twist(2.0)(x, t)[1]  # noqa: E731
    plain = d.sample(model, (64, 1, 1, 1), False, g, torch.Generator().manual_seed(3)).flatten()
    one, _ = run(d, model, gauss_twist(2.0), 64, 1, seed=3)
    assert torch.allclose(one, plain, atol=1e-6)

    class Linear(torch.nn.Module):
        num_classes = 2

        def forward(self, x, t):
            logit = 2.0 * x.flatten(1).sum(1)
            return torch.stack([torch.zeros_like(logit), logit], 1)

    zero = multi_guidance([Linear()], [torch.zeros(2)]).value_and_grad
    x0 = torch.randn(64, 1, 1, 1)
    logv, g0 = zero(x0, d.model_t(torch.full((64,), 20)))
    assert torch.equal(smc_step(d, model, zero, x0, 20, logv, g0, False)[3], torch.zeros(64))  # exactly
    x, info = run(d, model, zero, 8, 8, seed=3)
    assert info["resampled"] == 0 and info["final_ess"] == pytest.approx(1.0, abs=1e-12)
    assert all(e == pytest.approx(1.0, abs=1e-12) for e in info["ess_trace"])
    assert info["survivors"] == 8.0  # the final resampling of equal weights keeps every particle
    uncond = d.sample(model, (64, 1, 1, 1), False, None, torch.Generator().manual_seed(3)).flatten()
    assert torch.allclose(x, uncond, atol=1e-6)
    # ... while lambda != 0 does reweigh (the same code path, so the test above can fail).
    _, info = run(d, model, multi_guidance([Linear()], [torch.tensor([0.0, 3.0])]).value_and_grad, 8, 8, seed=3)
    assert info["final_ess"] < 1.0


def test_value_and_grad_is_the_weighted_log_softmax_and_guidance_gradient():
    from guidance import multi_guidance

    class Lin(torch.nn.Module):
        num_classes = 3

        def forward(self, x, t):
            s = x.flatten(1).sum(1, keepdim=True)
            return s * torch.tensor([1.0, -2.0, 0.5]) + t.view(-1, 1).float() / 10

    lam = torch.tensor([30.0, 30.0, -5.0])
    g = multi_guidance([Lin()], [lam])
    x = torch.randn(6, 1, 2, 2, generator=torch.Generator().manual_seed(0))
    t = torch.arange(6)
    value, grad = g.value_and_grad(x, t)
    want = (torch.log_softmax(Lin()(x, t), -1) * lam).sum(-1)
    assert value.shape == (6,) and torch.allclose(value, want, atol=1e-5)
    assert torch.equal(grad, g(x, t))
    h = 1e-3  # finite differences of the per-row value along one pixel
    e = torch.zeros_like(x)
    e[:, 0, 0, 0] = h
    fd = (g.value_and_grad(x + e, t)[0] - g.value_and_grad(x - e, t)[0]) / (2 * h)
    assert torch.allclose(fd, grad[:, 0, 0, 0], rtol=2e-3)  # float32 differences of values ~80


# ----- resampling and ESS -----------------------------------------------------------------------

def test_systematic_resampling_by_hand():
    w = torch.tensor([[0.1, 0.2, 0.7], [0.1, 0.2, 0.7], [1.0, 1.0, 2.0]])
    # points (u + k) / 3 against the cumulative weights [0.1, 0.3, 1.0] (and [0.25, 0.5, 1.0])
    idx = systematic_resample(w, torch.tensor([0.5, 0.2, 0.9]))
    assert idx.tolist() == [[1, 2, 2], [0, 2, 2], [1, 2, 2]]
    assert torch.equal(systematic_resample(w, torch.tensor([0.5, 0.2, 0.9])), idx)  # deterministic in u


def test_systematic_resampling_counts_follow_the_weights():
    gen = torch.Generator().manual_seed(0)
    w = torch.rand(50, 20, generator=gen) ** 3
    u = torch.rand(50, generator=gen)
    idx = systematic_resample(w, u)
    counts = torch.zeros_like(w).scatter_add_(1, idx, torch.ones_like(w))
    expected = 20 * w / w.sum(1, keepdim=True)
    assert (counts >= expected.floor() - 1e-9).all() and (counts <= expected.ceil() + 1e-9).all()
    assert (idx.diff(dim=1) >= 0).all()
    assert torch.equal(systematic_resample(torch.ones(4, 7), torch.rand(4, generator=gen)),
                       torch.arange(7).repeat(4, 1))  # equal weights: everyone once


def test_ess_formula():
    logw = torch.log(torch.tensor([[1.0, 1.0, 1.0, 1.0], [1.0, 0.0, 0.0, 0.0], [1.0, 1.0, 0.0, 0.0],
                                   [3.0, 1.0, 2.0, 2.0]], dtype=torch.float64))
    assert torch.allclose(ess(logw), torch.tensor([4.0, 1.0, 2.0, 64 / 18], dtype=torch.float64))
    assert torch.allclose(ess(logw + 1000.0), ess(logw))  # scale-free, no overflow in log space


# ----- the CLI on the tiny run ------------------------------------------------------------------

def test_smc_cli(tiny_run, tmp_path):
    import sample
    out = str(tmp_path)
    smc.main(["--run", tiny_run, "--guidance", "multi", "--particles", "4", "--n", "10",
              "--batch-size", "8", "--out", out, "--device", "cpu"])
    z = np.load(os.path.join(out, "samples_multi_classifier_smc4.npz"))
    assert z["images"].shape == (10, 16, 16, 1) and int(z["smc_particles"]) == 4
    info = json.loads(str(z["smc_info"]))
    assert info["systems"] == 3 and info["system_steps"] == 3 * 9  # 4 + 4 + 2 particles, 10 steps
    assert 0 <= info["resampled"] <= info["system_steps"] and 1 <= info["survivors"] <= 4
    # single guidance: one target per system; the lambda = 0 multi-guided SMC is the unguided sampler
    smc.main(["--run", tiny_run, "--guidance", "single", "--target", "1", "--particles", "3",
              "--n", "6", "--out", out, "--device", "cpu"])
    assert os.path.exists(os.path.join(out, "samples_single_classifier_smc3.npz"))
    a = smc.prepare(tiny_run, "cpu", guidance="multi", lambdas="0,0", particles=4)(8, 8, seed=1)
    b = sample.generate(tiny_run, 8, 8, seed=1, device="cpu")
    assert torch.allclose(a, b, atol=1e-5)


def test_smc_errors_are_one_line(tiny_run):
    base = ["--run", tiny_run, "--device", "cpu", "--n", "2"]
    one_line_error(lambda: smc.main(base + ["--guidance", "multi", "--particles", "0"]), "--particles", "1")
    one_line_error(lambda: smc.main(base + ["--guidance", "none"]), "--guidance multi")
    one_line_error(lambda: smc.main(base + ["--guidance", "cfg"]), "--guidance multi")
    one_line_error(lambda: smc.main(base + ["--guidance", "multi", "--ess", "1.5"]), "--ess", "[0, 1]")
    one_line_error(lambda: smc.main(base + ["--guidance", "multi", "--target", "1"]), "--target")
    # The proposal is the guided ancestral step at x_t: DDIM and guidance at mu are not options.
    for flag in (["--sampler", "ddim"], ["--guidance-at", "mu"]):
        with pytest.raises(SystemExit):
            smc.build_parser().parse_args(flag)


# ----- the middle-band data (§7) ----------------------------------------------------------------

def test_middle_band_data():
    from toy_circles import CirclesData, make_circles, training_edges
    images, labels, z = make_circles(32, 0.2, bands="middle")
    cols = np.rint(z * 31).astype(int)
    assert images.shape == (300, 32, 32) and sorted(set(cols)) == list(range(11, 21))
    assert 0.35 <= z.min() and z.max() <= 0.65
    assert (labels == (cols >= 16)).all() and labels.sum() == 150  # right half vs left half
    _, _, z64 = make_circles(64, 0.2, bands="middle")
    assert sorted(set(np.rint(z64 * 63).astype(int))) == list(range(23, 41))
    _, _, zc = make_circles(32, 0.2, bands="0.3:0.7")
    assert sorted(set(np.rint(zc * 31).astype(int))) == list(range(10, 22))
    d = CirclesData(32, 0.2, flip=True, bands="middle")
    x, y = d.batch(256, torch.Generator().manual_seed(0))
    lit = (x[:, 0] > 0).float().sum(1).argmax(1)  # centre column (the plus's vertical bar)
    assert set(lit.tolist()) <= set(range(11, 21)) and torch.equal(y, (lit >= 16).long())
    assert training_edges("middle") == (0.35, 0.65) and training_edges("extremes", 0.2) == (0.2, 0.8)


def test_configs_without_bands_and_bad_bands_are_one_line(tmp_path):
    import config as C
    import train
    from toy_circles import band_positions, parse_bands
    old = C.to_dict(C.make_config("circles", "cpu"))
    del old["data"]["bands"]
    one_line_error(lambda: C.from_dict(old), "data.bands", "other code")
    assert band_positions(32, 0.2) == band_positions(32, 0.2, bands="extremes")
    for bad in ("left", "0.2:0.7", "0.6:0.4", "a:b"):
        one_line_error(lambda: parse_bands(bad), "--bands")
    out = str(tmp_path / "r")
    one_line_error(lambda: train.main(["--bands", "sides", "--out", out]), "--bands", "middle")
    assert not os.path.exists(out)  # refused before any folder was made
    one_line_error(lambda: train.main(["--dataset", "celeba", "--bands", "middle", "--out", out]), "circles option")


def test_train_middle_run_end_to_end(tmp_path):
    """A tiny --bands middle run stores the band, and its classifier inherits it."""
    import train
    from checkpoint import load_checkpoint
    from conftest import TINY
    out = str(tmp_path / "mid")
    train.main(["--dataset", "circles", "--bands", "middle", "--model", "ddpm", "--out", out, "--steps", "2",
                "--device", "cpu", "--no-grid"] + TINY)
    train.main(["--model", "classifier", "--out", out, "--clf-steps", "2", "--device", "cpu"] + TINY)
    for name in ("ddpm", "classifier", "classifier_sn"):
        assert load_checkpoint(out, name)["config"]["data"]["bands"] == "middle"

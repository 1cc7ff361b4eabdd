"""DDIM sampling, deterministic DDIM inversion and latent slerp (App. M), against closed forms.

The toy: data x_0 ~ N(m, s^2) in one pixel ([N, 1, 1, 1]). Then x_t ~ N(sqrt(abar) m, abar s^2 + 1 - abar)
and the exact noise prediction E[eps | x_t] is
    eps*(x, t) = (x - sqrt(abar_t) m) sqrt(1 - abar_t) / (abar_t s^2 + 1 - abar_t),
so every sampler can be checked without a trained network.
"""
import json
import os
import shutil

import numpy as np
import pytest
import torch

from conftest import one_line_error
from diffusion import GaussianDiffusion, cosine_betas

M, S = 0.3, 0.2


class GaussEps:
    """The exact eps of N(M, S^2) data; receives model-time indices, like the UNet."""

    def __init__(self, betas):
        self.ab = torch.from_numpy(np.cumprod(1 - betas))

    def __call__(self, x, t):
        ab = self.ab[t].view(-1, 1, 1, 1).to(x.dtype)
        return (x - ab.sqrt() * M) * (1 - ab).sqrt() / (ab * S ** 2 + 1 - ab)


def toy(T=1000, K=None, variance="fixed_small"):
    betas = cosine_betas(T)
    d = GaussianDiffusion(betas, variance, prediction="eps") if K is None else \
        GaussianDiffusion.respaced(betas, K, variance, "eps")
    return d, GaussEps(betas)


def draw(d, model, n, seed, **kw):
    gen = torch.Generator().manual_seed(seed)
    return d.sample(model, (n, 1, 1, 1), clip_denoised=False, generator=gen, **kw).flatten()


def near_data(x, tol=0.015):
    """Sample mean and std within tol of (M, S): 4000 draws leave ~0.003 of sampling error, the
    1000-step discretisation ~0.002."""
    return abs(x.mean().item() - M) < tol and abs(x.std().item() - S) < tol


def test_ddim_eta1_is_ancestral_with_posterior_variance():
    """DDIM Eq. 16 [Song et al. 2021]: at eta = 1 sigma_t^2 = beta~_t, and DDIM Eq. 12 is then the posterior mean
    (Eq. 5); with the same noise, DDIM and ancestral (fixed_small) draw the same samples."""
    d, model = toy()
    t = torch.arange(1, d.T)
    ab = d.alphas_cumprod
    eq16 = ((1 - ab[:-1]) / (1 - ab[1:])).sqrt() * (1 - ab[1:] / ab[:-1]).sqrt()  # float64, by hand
    assert torch.allclose(d.ddim_sigma(t, 1.0, (len(t), 1)).flatten().double(), eq16, rtol=1e-5)
    assert torch.allclose(d.ddim_sigma(t, 0.5, (len(t), 1)).flatten().double(), eq16 / 2, rtol=1e-5)
    anc = draw(d, model, 4000, 0)
    ddim = draw(d, model, 4000, 0, sampler="ddim", eta=1.0)
    assert torch.allclose(anc, ddim, atol=1e-4)
    assert near_data(anc) and near_data(ddim)  # both recover the data distribution


def test_ddim_eta1_matches_ancestral_statistics_with_independent_noise():
    d, model = toy()
    anc, ddim = draw(d, model, 4000, 1), draw(d, model, 4000, 2, sampler="ddim", eta=1.0)
    assert abs(anc.mean() - ddim.mean()) < 0.015 and abs(anc.std() - ddim.std()) < 0.015
    assert near_data(ddim)


def test_ddim_eta0_is_deterministic_and_lands_on_the_data():
    x = torch.randn(4000, 1, 1, 1, generator=torch.Generator().manual_seed(0))
    for K in (None, 50):
        d, model = toy(K=K)
        outs = [d.denoise(model, x, d.T - 1, False, generator=torch.Generator().manual_seed(s),
                          sampler="ddim", eta=0.0) for s in (1, 2)]
        assert torch.equal(outs[0], outs[1])
    d, model = toy()
    assert near_data(d.denoise(model, x, d.T - 1, False, sampler="ddim", eta=0.0))  # the ODE's endpoint
    # eta > 0 does use the generator.
    noisy = [d.denoise(model, x[:100], d.T - 1, False, generator=torch.Generator().manual_seed(s),
                       sampler="ddim", eta=0.5) for s in (1, 2)]
    assert not torch.equal(noisy[0], noisy[1])


@pytest.mark.parametrize("K,refine,tol", [(None, 0, 1e-2), (None, 3, 1e-4), (64, 3, 2e-4)])
def test_inversion_then_decoding_is_the_identity(K, refine, tol):
    d, model = toy(K=K)
    x0 = M + S * torch.randn(1024, 1, 1, 1, generator=torch.Generator().manual_seed(0))
    z = d.ddim_invert(model, x0, d.T - 1, clip_denoised=False, refine=refine)
    if K is None:  # the ODE carries N(M, S^2) to the prior N(0, 1) ...
        assert abs(z.mean().item()) < 0.1 and abs(z.std().item() - 1) < 0.07  # 1024 draws: sd ~0.03, ~0.02
    back = d.denoise(model, z, d.T - 1, False, sampler="ddim", eta=0.0)  # ... and back
    assert (back - x0).abs().max().item() < tol
    half = d.T // 2  # a partial inversion (App. M inverts half of the steps) also comes back
    z = d.ddim_invert(model, x0, half, False, refine)
    assert (z - x0).abs().mean() > 0.1  # (it did move)
    back = d.denoise(model, z, half, False, sampler="ddim")
    assert (back - x0).abs().max().item() < tol


def test_refinement_beats_the_plain_inversion():
    d, model = toy(K=16)
    x0 = M + S * torch.randn(512, 1, 1, 1, generator=torch.Generator().manual_seed(0))
    err = [(d.denoise(model, d.ddim_invert(model, x0, 15, False, r), 15, False, sampler="ddim") - x0).abs().mean()
           for r in (0, 3)]
    assert err[1] < err[0] / 10


def test_ddim_guidance_shifts_eps_by_sqrt_one_minus_abar_times_g():
    """Dhariwal & Nichol Alg. 2: eps^ - sqrt(1 - abar_t) g; a constant g moves x^_0 by (1 - abar)/sqrt(abar) g."""
    d, model = toy()
    x = torch.randn(8, 1, 1, 1)
    t = torch.full((8,), 40)
    g = lambda x, t: torch.full_like(x, 0.5)  # noqa: E731
    eps0, x00 = d.ddim_eps_x0(model, x, t, False)
    eps1, x01 = d.ddim_eps_x0(model, x, t, False, guidance=g)
    ab = d.alphas_cumprod[40].item()
    assert torch.allclose(eps0 - eps1, torch.full_like(x, 0.5 * (1 - ab) ** 0.5), atol=1e-5)
    assert torch.allclose(x01 - x00, torch.full_like(x, 0.5 * (1 - ab) / ab ** 0.5), atol=1e-5)


def test_guided_ddim_step_clips_before_the_guidance_shift():
    """The reference order (guided-diffusion's condition_score under DDIM): clip x^_0 first, derive
    eps^ from it, shift eps^ by -sqrt(1 - abar) g, take x^_0 from the shifted eps^ unclipped. A
    guidance that pushes x^_0 past +1 must survive; clipping after the shift would erase it."""
    d, model = toy()
    t = torch.full((4,), 300)
    x = torch.tensor([0.9, 0.2, -0.5, 1.3]).view(4, 1, 1, 1)
    g = lambda x, t: torch.full_like(x, 3.0)  # noqa: E731  a strong push towards larger x^_0
    ab = d.alphas_cumprod[300].item()
    eps_net = model(x, t)
    x0 = ((x - (1 - ab) ** 0.5 * eps_net) / ab ** 0.5).clamp(-1, 1)     # 1. clip
    eps = (x - ab ** 0.5 * x0) / (1 - ab) ** 0.5                         #    eps^ from the clipped x^_0
    eps = eps - (1 - ab) ** 0.5 * 3.0                                      # 2. shift
    x0 = (x - (1 - ab) ** 0.5 * eps) / ab ** 0.5                          # 3. no second clip
    got_eps, got_x0 = d.ddim_eps_x0(model, x, t, True, guidance=g)
    assert torch.allclose(got_eps, eps, atol=1e-5) and torch.allclose(got_x0, x0, atol=1e-5)
    assert (got_x0 > 1).any()  # the guidance carried x^_0 past the clip, as the reference allows
    # One full step agrees with DDIM Eq. 12 built from the reference pair (eta = 0).
    xp, _ = d.ddim_sample(model, x, t, 0.0, True, guidance=g)
    abp = d.alphas_cumprod[299].item()
    assert torch.allclose(xp, abp ** 0.5 * x0 + (1 - abp) ** 0.5 * eps, atol=1e-5)


def test_slerp_endpoints_norm_and_orthogonal_midpoint():
    from lab.interpolate import slerp
    gen = torch.Generator().manual_seed(0)
    a, b = torch.randn(5, 1, 4, 4, generator=gen), torch.randn(5, 1, 4, 4, generator=gen)
    b = b * (a.flatten(1).norm(dim=1) / b.flatten(1).norm(dim=1)).view(-1, 1, 1, 1)  # equal norms
    assert torch.allclose(slerp(a, b, 0.0), a, atol=1e-6) and torch.allclose(slerp(a, b, 1.0), b, atol=1e-6)
    for al in (0.25, 0.5, 0.8):
        assert torch.allclose(slerp(a, b, al).flatten(1).norm(dim=1), a.flatten(1).norm(dim=1), rtol=1e-5)
    # A straight line would not keep the norm: the test can tell slerp from lerp.
    assert not torch.allclose((0.5 * (a + b)).flatten(1).norm(dim=1), a.flatten(1).norm(dim=1), rtol=1e-2)
    e0, e1 = torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, 1.0]])
    assert torch.allclose(slerp(e0, e1, 0.5), torch.tensor([[2 ** -0.5, 2 ** -0.5]]), atol=1e-6)
    assert torch.allclose(slerp(e0, e0, 0.3), e0)  # parallel endpoints: no 0/0


def test_eta_and_sampler_errors_are_one_line(tiny_run):
    import evaluate
    import sample
    one_line_error(lambda: sample.check_sampler("ddim", 1.5), "--eta", "[0, 1]")
    one_line_error(lambda: sample.main(["--run", tiny_run, "--sampler", "ddim", "--eta", "-0.1",
                                        "--device", "cpu"]), "--eta", "[0, 1]")
    one_line_error(lambda: evaluate.main(["--run", tiny_run, "--sampler", "ddim", "--eta", "2",
                                          "--device", "cpu"]), "--eta", "[0, 1]")
    one_line_error(lambda: sample.main(["--run", tiny_run, "--eta", "0.5", "--device", "cpu"]),
                   "--sampler ddim")
    one_line_error(lambda: sample.main(["--run", tiny_run, "--sampler", "ddpm", "--device", "cpu"]),
                   "ancestral or ddim")


def test_wrong_image_size_is_one_line(tiny_run):
    from lab import interpolate
    from sample import load_ddpm
    model, cfg = load_ddpm(tiny_run, "cpu")
    d = GaussianDiffusion.from_config(cfg["diffusion"], respaced=True)
    one_line_error(lambda: interpolate.invert(model, d, torch.zeros(2, 1, 8, 8), 3), "1x8x8", "16x16")
    one_line_error(lambda: interpolate.invert(model, d, torch.zeros(2, 3, 16, 16), 3), "1x16x16")


def test_interpolate_cli_and_ddim_evaluate_record_settings(tiny_run, tmp_path):
    import evaluate
    from lab import interpolate
    out = str(tmp_path / "interp")
    interpolate.main(["--run", tiny_run, "--out", out, "--n", "2", "--frames", "3", "--device", "cpu"])
    r = json.load(open(os.path.join(out, "interp.json")))
    assert r["pairs"] == 2 and len(r["z"]) == 2 and len(r["z"][0]) == 3 and 0 <= r["roundtrip_mae"] <= 2
    assert os.path.getsize(os.path.join(out, "interp_path.png")) > 0
    run = str(tmp_path / "run")
    os.makedirs(run)
    shutil.copy(os.path.join(tiny_run, "ddpm.pt"), run)
    kw = dict(n=4, batch_size=4, methods=("uncond",), device=torch.device("cpu"), figures=False, log=lambda *_: None)
    m = evaluate.evaluate_run(run, sampler="ddim", eta=0.0, **kw)["uncond"]
    assert (m["sampler"], m["eta"]) == ("ddim", 0.0)
    assert '"sampler": "ddim"' in str(np.load(os.path.join(run, "eval_uncond_ddim_eta0.npz"))["settings"])
    # The DDIM cache is not mistaken for ancestral samples (and vice versa), and both are kept.
    m = evaluate.evaluate_run(run, **kw)["uncond"]
    assert m["sampler"] == "ancestral" and "sampler" not in str(np.load(os.path.join(run, "eval_uncond.npz"))["settings"])
    assert os.path.exists(os.path.join(run, "eval_uncond_ddim_eta0.npz"))

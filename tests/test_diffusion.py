"""Schedules, posterior, respacing and the forward process, pinned to known values (App. A)."""
import numpy as np
import pytest
import torch

from diffusion import GaussianDiffusion, cosine_betas, linear_betas, respace_indices


def test_cosine_alphas_cumprod_known_values():
    d = GaussianDiffusion(cosine_betas(1000))
    ab = d.alphas_cumprod.numpy()
    assert d.alphas_cumprod.dtype == torch.float64
    # Reference values as quoted by the issue (float32-rounded: agree to ~3e-7 relative).
    assert ab[0] == pytest.approx(0.99995869, rel=1e-6)
    assert ab[500] == pytest.approx(0.49228504, rel=1e-6)
    # Exact telescoping of Eq. (10): abar_t = f(t+1) / f(0).
    f = lambda t: np.cos((t / 1000 + 0.008) / 1.008 * np.pi / 2) ** 2
    assert ab[500] == pytest.approx(f(501) / f(0), rel=1e-12)
    assert ab[999] == pytest.approx(2.43e-9, rel=1e-2)


def test_cosine_betas_capped():
    b = cosine_betas(1000)
    assert b.max() == pytest.approx(0.999)
    assert np.all(np.diff(b) > 0)


def test_linear_endpoints():
    b = linear_betas(1000)
    assert b[0] == pytest.approx(1e-4) and b[-1] == pytest.approx(0.02)


def test_posterior_variance_known_values():
    d = GaussianDiffusion(linear_betas(1000))
    # beta~_t = beta_t (1 - abar_{t-1}) / (1 - abar_t), Eq. (6); t = 1 by hand:
    b0, b1 = 1e-4, 1e-4 + (0.02 - 1e-4) / 999
    by_hand = b1 * (1 - (1 - b0)) / (1 - (1 - b0) * (1 - b1))
    assert d.posterior_variance[1].item() == pytest.approx(by_hand, rel=1e-10)
    assert d.posterior_variance[1].item() == pytest.approx(5.45318766e-05, rel=1e-7)
    assert d.posterior_variance[500].item() == pytest.approx(1.00513358e-02, rel=1e-7)
    assert d.posterior_variance[0].item() == 0.0
    c = GaussianDiffusion(cosine_betas(1000))
    assert c.posterior_variance[10].item() == pytest.approx(7.86776234e-05, rel=1e-7)


def test_posterior_mean_recovers_x0_direction():
    """Eq. (5): with x_t built from x_0 and eps, mu~ equals the eps form of Eq. (7)."""
    d = GaussianDiffusion(cosine_betas(100))
    x0, eps = torch.randn(4, 1, 4, 4), torch.randn(4, 1, 4, 4)
    t = torch.tensor([1, 10, 50, 99])
    xt = d.q_sample(x0, t, eps)
    mean, _ = d.q_posterior(x0, xt, t)
    a_t = 1 - d.betas[t].float().view(-1, 1, 1, 1)
    eq7 = (xt - (1 - a_t) / d.sqrt_1m_ab[t].float().view(-1, 1, 1, 1) * eps) / a_t.sqrt()
    assert torch.allclose(mean, eq7, atol=1e-4)


def test_respacing_identity_when_K_equals_T():
    betas = cosine_betas(50)
    r = GaussianDiffusion.respaced(betas, 50)
    assert r.timestep_map.tolist() == list(range(50))
    assert torch.allclose(r.betas, torch.from_numpy(betas))


def test_respacing_keeps_endpoints_and_alphas_cumprod():
    betas = cosine_betas(1000)
    full = GaussianDiffusion(betas)
    for K in (2, 7, 64, 250):
        keep = respace_indices(1000, K)
        assert keep[0] == 0 and keep[-1] == 999 and len(keep) == K
        r = GaussianDiffusion.respaced(betas, K)
        assert torch.allclose(r.alphas_cumprod, full.alphas_cumprod[keep], rtol=1e-12)
    with pytest.raises(ValueError):
        respace_indices(10, 11)


def test_q_sample_moments():
    d = GaussianDiffusion(cosine_betas(1000))
    g = torch.Generator().manual_seed(0)
    x0 = torch.full((20000, 1, 1, 1), 0.5)
    t = torch.full((20000,), 400)
    x = d.q_sample(x0, t, torch.randn(x0.shape, generator=g))
    ab = d.alphas_cumprod[400].item()
    assert x.mean().item() == pytest.approx(0.5 * ab ** 0.5, abs=0.02)
    assert x.var().item() == pytest.approx(1 - ab, abs=0.02)


def test_fixed_variances():
    betas = linear_betas(100)
    large = GaussianDiffusion(betas, "fixed_large").model_variance
    small = GaussianDiffusion(betas, "fixed_small").model_variance
    assert torch.allclose(large[1:], torch.from_numpy(betas[1:]))
    assert torch.all(small[1:] < large[1:])
    with pytest.raises(ValueError, match="unknown variance"):  # "learned" is a variance now
        GaussianDiffusion(betas, "learnt")


def test_v_prediction_round_trip():
    """An exact v-target converts back to the true eps and x_0 (so Eq. 7 and clipping apply as-is)."""
    d = GaussianDiffusion(cosine_betas(1000), prediction="v")
    x0, eps = torch.randn(3, 1, 4, 4), torch.randn(3, 1, 4, 4)
    t = torch.tensor([0, 500, 999])
    xt = d.q_sample(x0, t, eps)
    v = d.target(x0, eps, t)
    assert torch.allclose(d.model_eps(v, xt, t), eps, atol=1e-4)
    assert torch.allclose(d.predict_x0(xt[:2], t[:2], d.model_eps(v, xt, t)[:2]), x0[:2], atol=1e-3)
    e = GaussianDiffusion(cosine_betas(1000), prediction="eps")
    assert torch.equal(e.target(x0, eps, t), eps)


def test_channels_last_sampling_equals_nchw():
    """The CPU speed-up (channels_last weights and activations, sample.inference_layout and
    GaussianDiffusion.denoise) changes strides only: a guided step and a whole short sampling run
    give the values of the plain NCHW path up to float rounding."""
    import copy
    from classifier import NoisyClassifier
    from guidance import multi_guidance
    from sample import inference_layout
    from unet import UNet
    torch.manual_seed(0)
    unet = UNet(16, 3, 8, (1, 2), 1, (8,)).eval().requires_grad_(False)
    for p in unet.parameters():            # the zero-initialised output conv would hide any error
        p.data.normal_(0, 0.05)
    clf = NoisyClassifier(16, 3, 2, 8, (1, 2), 1, (8,)).eval().requires_grad_(False)
    fast_unet, fast_clf = inference_layout(copy.deepcopy(unet), "cpu"), inference_layout(copy.deepcopy(clf), "cpu")
    conv = next(m for m in fast_unet.modules() if isinstance(m, torch.nn.Conv2d) and m.in_channels > 3)
    assert conv.weight.is_contiguous(memory_format=torch.channels_last)
    d = GaussianDiffusion(cosine_betas(20))
    x, t = torch.randn(4, 3, 16, 16), torch.full((4,), 12)
    step = lambda m, c, xx: d.p_sample(m, xx, t, guidance=multi_guidance([c], [torch.tensor([30.0, 30.0])]),
                                        generator=torch.Generator().manual_seed(1))[0]
    ref = step(unet, clf, x)
    got = step(fast_unet, fast_clf, x.contiguous(memory_format=torch.channels_last))
    assert got.is_contiguous(memory_format=torch.channels_last)
    assert torch.allclose(got, ref, atol=1e-5) and (ref - x).abs().max() > 0.1
    run = lambda m: d.sample(m, (4, 3, 16, 16), generator=torch.Generator().manual_seed(2))
    assert torch.allclose(run(fast_unet), run(unet), atol=1e-4)

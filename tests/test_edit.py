"""Guidance at the posterior mean (§2.2, --guidance-at mu) and attribute editing (App. N).

The toy is test_ddim's: one-pixel data x_0 ~ N(M, S^2) with its exact eps, so the posterior mean is
known. Its classifier is linear-logistic, logit_1 - logit_0 = w(t) x + b, so that
    grad_x log p(y = 1 | x, t) = w(t) (1 - sigmoid(w(t) x + b))
in closed form; w depends on the timestep so the tests also see which t the classifier was told.
"""
import json
import os
import shutil

import numpy as np
import torch

from conftest import one_line_error
from test_ddim import M, S, toy

LAM, B = 3.0, -0.1


def w_of(t):
    return 1.0 + t.double() / 100  # model-time (original) indices, as the UNet's classifier gets


class Logistic(torch.nn.Module):
    num_classes = 2

    def forward(self, x, t):
        logit = w_of(t).view(-1).to(x.dtype) * x.flatten(1).sum(1) + B
        return torch.stack([torch.zeros_like(logit), logit], 1)


def closed_form(x, model_t):
    """lambda grad_x log p(y = 1 | x, t) with lambda = [0, LAM]."""
    w = w_of(model_t).view(-1, 1, 1, 1).to(x.dtype)
    return LAM * w * (1 - torch.sigmoid(w * x + B))


def guide():
    from guidance import multi_guidance
    return multi_guidance([Logistic()], [torch.tensor([0.0, LAM])])


def test_guidance_at_mu_is_the_closed_form_at_the_posterior_mean():
    d, model = toy(K=10)
    x = torch.randn(64, 1, 1, 1, generator=torch.Generator().manual_seed(0))
    t = torch.full((64,), 5)
    mean, var, _ = d.p_mean_variance(model, x, t, False)
    point, mt = d.guidance_point(x, mean, t, "mu")
    assert torch.equal(point, mean) and torch.equal(mt, d.model_t(t - 1))  # the timestep of x_{t-1}
    assert torch.allclose(guide()(point, mt), closed_form(mean, d.model_t(t - 1)), atol=1e-5)
    # One whole step: mu + sigma^2 g(mu) + sigma z, with the same z.
    step = lambda at: d.p_sample(model, x, t, False, guide(), torch.Generator().manual_seed(1), at)[0]  # noqa: E731
    z = torch.randn(x.shape, generator=torch.Generator().manual_seed(1))
    want = mean + var * closed_form(mean, d.model_t(t - 1)) + var.sqrt() * z
    assert torch.allclose(step("mu"), want, atol=1e-5)
    # ... which is not the x_t step: the point and the timestep both differ.
    assert (step("mu") - step("xt")).abs().max() > 1e-2
    assert not torch.allclose(guide()(point, mt), closed_form(x, d.model_t(t)), atol=1e-3)
    # At the last step the classifier is told t = 0, not a negative index.
    assert d.guidance_point(x, mean, torch.zeros_like(t), "mu")[1].eq(0).all()


def test_xt_stays_the_default_and_unchanged():
    """A whole guided sample against the x_t rule written out by hand, step by step."""
    d, model = toy(K=10)
    draw = lambda **kw: d.sample(model, (32, 1, 1, 1), False, guide(), torch.Generator().manual_seed(2), **kw)  # noqa: E731
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(32, 1, 1, 1, generator=gen)
    for i in range(d.T - 1, -1, -1):
        t = torch.full((32,), i)
        mean, var, _ = d.p_mean_variance(model, x, t, False)
        x = mean + var * closed_form(x, d.model_t(t)) + (i > 0) * var.sqrt() * torch.randn(x.shape, generator=gen)
    assert torch.allclose(draw(), x, atol=1e-5) and torch.equal(draw(), draw(guidance_at="xt"))
    assert not torch.allclose(draw(guidance_at="mu"), x, atol=1e-3)


def test_guidance_at_errors_are_one_line(tiny_run):
    import evaluate
    import pytest
    import sample
    d, model = toy(K=10)
    with pytest.raises(ValueError, match="ancestral"):
        d.sample(model, (2, 1, 1, 1), False, guide(), sampler="ddim", guidance_at="mu")
    one_line_error(lambda: sample.check_sampler("ancestral", 0.0, "x0"), "--guidance-at", "xt", "mu")
    one_line_error(lambda: sample.main(["--run", tiny_run, "--guidance", "multi", "--guidance-at", "mean",
                                        "--device", "cpu"]), "--guidance-at", "'mean'")
    one_line_error(lambda: sample.main(["--run", tiny_run, "--guidance", "multi", "--guidance-at", "mu",
                                        "--sampler", "ddim", "--device", "cpu"]), "--sampler ancestral")
    one_line_error(lambda: sample.main(["--run", tiny_run, "--guidance-at", "mu", "--device", "cpu"]),
                   "--guidance-at", "guided")
    one_line_error(lambda: evaluate.main(["--run", tiny_run, "--guidance-at", "mid", "--device", "cpu"]),
                   "--guidance-at", "xt")
    one_line_error(lambda: evaluate.main(["--run", tiny_run, "--guidance-at", "mu", "--methods", "uncond",
                                          "--device", "cpu"]), "--guidance-at", "guided methods")


def test_evaluate_records_guidance_at_and_keeps_the_xt_cache_key(tiny_run, tmp_path):
    import evaluate
    run = str(tmp_path / "run")
    os.makedirs(run)
    for f in ("ddpm.pt", "classifier.pt"):
        shutil.copy(os.path.join(tiny_run, f), run)
    kw = dict(n=4, batch_size=4, methods=("multi",), device=torch.device("cpu"), figures=False, log=lambda *_: None)
    settings = lambda: str(np.load(os.path.join(run, "eval_multi.npz"))["settings"])  # noqa: E731
    m = evaluate.evaluate_run(run, **kw)["multi"]
    xt_key, xt_images = settings(), np.load(os.path.join(run, "eval_multi.npz"))["images"]
    assert m["guidance_at"] == "xt" and "guidance_at" not in xt_key  # the key it always had
    m = evaluate.evaluate_run(run, guidance_at="mu", **kw)["multi"]
    assert m["guidance_at"] == "mu" and '"guidance_at": "mu"' in settings()
    assert not np.array_equal(np.load(os.path.join(run, "eval_multi.npz"))["images"], xt_images)


# ----- attribute editing (App. N) -----------------------------------------------------------------

def test_eta_schedule_is_linear_and_ends_at_zero():
    from lab.edit import eta_schedule
    S_ = 31
    eta = np.array([eta_schedule(S_, 0.8)(i) for i in range(S_, -1, -1)])
    assert eta[0] == 0.8 and eta[-1] == 0.0
    assert np.allclose(np.diff(eta), -0.8 / S_)  # a straight line, one equal decrement per step


def test_denoise_takes_a_per_step_eta():
    d, model = toy(K=16)
    x = torch.randn(64, 1, 1, 1, generator=torch.Generator().manual_seed(0))
    run = lambda eta: d.denoise(model, x, 10, False, generator=torch.Generator().manual_seed(3),  # noqa: E731
                                sampler="ddim", eta=eta)
    assert torch.equal(run(lambda i: 0.5), run(0.5)) and torch.equal(run(lambda i: 0.0), run(0.0))
    one_step = run(lambda i: 0.5 if i == 4 else 0.0)  # noise at one step only: a different path
    assert not torch.allclose(one_step, run(0.0)) and not torch.allclose(one_step, run(0.5))


class ToyNet:
    """test_ddim's exact eps with the image shape lab.interpolate.check_images asks for."""
    channels, image_size = 1, 1

    def __init__(self, eps):
        self.eps = eps

    def __call__(self, x, t):
        return self.eps(x, t)


def test_edit_without_guidance_or_noise_reconstructs():
    from lab.edit import edit
    d, eps = toy(K=64)
    model = ToyNet(eps)
    x0 = M + S * torch.randn(512, 1, 1, 1, generator=torch.Generator().manual_seed(0))
    back = edit(model, d, x0, 32, None, eta_start=0.0, clip_denoised=False, refine=3)
    assert (back - x0).abs().max() < 2e-4  # as test_ddim's plain round trip
    noisy = edit(model, d, x0, 32, None, 1.0, False, torch.Generator().manual_seed(0), refine=3)
    assert (noisy - x0).abs().mean() > 1e-2  # eta > 0 does re-draw part of the image
    pushed = edit(model, d, x0, 32, guide(), 0.0, False, refine=3)
    assert (pushed - x0).mean() > 1e-2  # guidance towards class 1 (larger x) moves the images up


def test_edit_cli_on_a_tiny_run(tiny_run, tmp_path):
    from lab import edit
    out = str(tmp_path / "edit")
    edit.main(["--run", tiny_run, "--out", out, "--n", "3", "--cols", "2", "--device", "cpu"])
    r = json.load(open(os.path.join(out, "edit.json")))
    assert len(r["z_before"]) == len(r["z_after"]) == 3 and r["target"] == 1 and r["scale"] == 30
    assert all(z is not None and z < 0.2 for z in r["z_before"])  # the originals are left-band discs
    assert abs(sum(r[k] for k in ("right", "middle", "left", "lost")) - 1) < 1e-9
    assert r["invert_to"] == 5 and os.path.getsize(os.path.join(out, "edit.png")) > 0  # ceil(0.5 * 9)
    one_line_error(lambda: edit.main(["--run", tiny_run, "--out", out, "--eta-start", "2", "--device", "cpu"]),
                   "--eta-start", "[0, 1]")
    one_line_error(lambda: edit.main(["--run", tiny_run, "--out", out, "--target", "5", "--device", "cpu"]),
                   "--target 5")


def test_outcomes_bands():
    from lab.edit import outcomes
    r = outcomes([0.1, 0.5, 0.9, None, 0.85], 0.2)
    assert r == {"right": 0.4, "middle": 0.2, "left": 0.2, "lost": 0.2}

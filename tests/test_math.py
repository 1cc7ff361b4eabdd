"""Tests that fail when the math is wrong: every assertion pins an exact or tightly bounded value
computed independently of the code under test (float64 tables, closed forms, an oracle denoiser).

* the guided ancestral step  x_{t-1} = mu + sigma_t^2 g + sigma_t z  (§2.2) and that it raises log p(y|x);
* p_mean_variance against Eq. (7) and the x_0 clamp;
* fixed small / fixed large reverse variances, in the tables and in the noise p_sample adds;
* labels 1[x >= S/2] survive horizontal flips in CirclesData.batch;
* an exact (oracle) denoiser of a 3-image training set, sampled on the full and on a respaced grid,
  with eps- and v-prediction, lands on the training images with equal frequency;
* lr warm-up + cosine decay to 10 %, EMA decay warm-up and the EMA update;
* an unwritable --out is a one-line UserError even when running as root.
"""
import math
import os
import tempfile

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import checkpoint
import train
import trainer
from checkpoint import UserError
from diffusion import GaussianDiffusion, cosine_betas, linear_betas
from guidance import multi_guidance, single_guidance
from toy_circles import CirclesData


# ----- helpers ----------------------------------------------------------------------------------

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py: tiny tensors, one thread


def col(table: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """table[t] (float64) broadcast against NCHW."""
    return table[t].view(-1, 1, 1, 1)


def affine_eps(x, t):
    """A deterministic, timestep-dependent 'network': eps = 0.3 x + 0.01 t - 0.2."""
    return 0.3 * x + 0.01 * t.view(-1, 1, 1, 1).to(x.dtype) - 0.2


class MeanLogistic:
    """Two-class classifier with closed-form log p: logit_1 - logit_0 = w * mean(x) + b."""
    num_classes = 2

    def __init__(self, w=4.0, b=-0.5):
        self.w, self.b = w, b

    def score(self, x):
        return self.w * x.mean(dim=(1, 2, 3)) + self.b

    def __call__(self, x, t):
        s = self.score(x)
        return torch.stack([torch.zeros_like(s), s], -1)

    def log_p(self, x, y):
        s = self.score(x.double())
        return torch.where(y == 1, F.logsigmoid(s), F.logsigmoid(-s))

    def grad(self, x, lam):
        """Closed form of grad_x [lam0 log p(0|x) + lam1 log p(1|x)], per pixel (uniform)."""
        s = self.score(x.double())
        sig = torch.sigmoid(s)
        per = self.w / x[0].numel() * (lam[1] * (1 - sig) - lam[0] * sig)
        return per.view(-1, 1, 1, 1).expand(x.shape)


# ----- 1. guided ancestral step ---------------------------------------------------------------

@pytest.mark.parametrize("variance", ["fixed_large", "fixed_small"])
def test_guided_step_is_mean_plus_var_times_grad_plus_sigma_z(variance):
    d = GaussianDiffusion(cosine_betas(50), variance)
    clf, lam = MeanLogistic(), [2.0, 10.0]
    xt = torch.randn(4, 1, 4, 4, generator=torch.Generator().manual_seed(0))
    t = torch.tensor([0, 5, 25, 49])
    guide = multi_guidance([clf], [lam])
    g = guide(xt, t)
    # guidance.py's autograd gradient equals the closed form of Eq. (2) for this classifier
    assert torch.allclose(g.double(), clf.grad(xt, lam), rtol=1e-5, atol=1e-7)
    assert g.abs().min() > 0.1  # large enough that sigma^2 g, sigma g and -sigma^2 g all differ

    mean, var, _ = d.p_mean_variance(affine_eps, xt, t)
    var64 = col(d.model_variance, t)
    assert torch.allclose(var.double(), var64, rtol=1e-6)
    seed = 1234
    x_prev, _ = d.p_sample(affine_eps, xt, t, guidance=guide, generator=torch.Generator().manual_seed(seed))
    z = torch.randn(xt.shape, generator=torch.Generator().manual_seed(seed), dtype=xt.dtype).double()
    nonzero = (t != 0).double().view(-1, 1, 1, 1)
    expected = mean.double() + var64 * clf.grad(xt, lam) + nonzero * var64.sqrt() * z
    assert torch.allclose(x_prev.double(), expected, rtol=0, atol=2e-5)
    # t = 0 adds no noise: the step is exactly the shifted mean
    assert torch.allclose(x_prev[0].double(), (mean.double() + var64 * clf.grad(xt, lam))[0], atol=2e-6)


def test_guidance_raises_log_p_of_target_class():
    """Same noise, same x_t: the guided x_{t-1} is more likely under the target class than the
    unguided one, for every sample and both target classes."""
    d = GaussianDiffusion(cosine_betas(50))
    clf = MeanLogistic()
    gen = torch.Generator().manual_seed(3)
    xt = torch.randn(8, 1, 4, 4, generator=gen)
    t = torch.tensor([1, 10, 20, 30, 40, 49, 25, 0])
    y = torch.tensor([0, 1, 0, 1, 0, 1, 1, 0])
    guided, _ = d.p_sample(affine_eps, xt, t, guidance=single_guidance(clf, y, 5.0),
                           generator=torch.Generator().manual_seed(7))
    plain, _ = d.p_sample(affine_eps, xt, t, generator=torch.Generator().manual_seed(7))
    gain = clf.log_p(guided, y) - clf.log_p(plain, y)
    assert (gain > 1e-4).all(), gain
    # and the shift is exactly sigma_t^2 * grad: mean brightness moves by var * w * lam * (1-p)/HW * ...
    var64 = col(d.model_variance, t)
    shift = (guided.double() - plain.double())
    lam = 5.0 * F.one_hot(y, 2).double()
    expected = torch.stack([var64[i, 0] * clf.grad(xt[i:i + 1], lam[i])[0] for i in range(8)])
    assert torch.allclose(shift, expected, atol=2e-5)


# ----- p_mean_variance: Eq. (7) and clipping ----------------------------------------------------

def test_p_mean_variance_matches_eq7_and_x0_inversion():
    d = GaussianDiffusion(cosine_betas(50))
    gen = torch.Generator().manual_seed(0)
    xt = 0.5 * torch.randn(5, 1, 4, 4, generator=gen)
    t = torch.tensor([1, 7, 20, 35, 48])
    eps = affine_eps(xt, t).double()
    mean, var, x0 = d.p_mean_variance(affine_eps, xt, t, clip_denoised=False)
    ab, b = col(d.alphas_cumprod, t), col(d.betas, t)
    x0_ref = (xt.double() - (1 - ab).sqrt() * eps) / ab.sqrt()
    eq7 = (xt.double() - b / (1 - ab).sqrt() * eps) / (1 - b).sqrt()
    assert torch.allclose(x0.double(), x0_ref, rtol=1e-5, atol=1e-5)
    assert torch.allclose(mean.double(), eq7, rtol=1e-5, atol=1e-5)
    assert torch.allclose(var.double(), b, rtol=1e-6)  # fixed_large, t >= 1


def test_x0_is_clipped_before_the_posterior_mean():
    d = GaussianDiffusion(cosine_betas(50))
    xt = 3 * torch.randn(4, 1, 4, 4, generator=torch.Generator().manual_seed(1))
    t = torch.tensor([2, 10, 30, 45])
    wild = lambda x, tt: -x  # x^_0 = (sqrt(1/ab) + sqrt(1/ab - 1)) x_t: far outside [-1, 1]
    ab = col(d.alphas_cumprod, t)
    raw = (xt.double() + (1 - ab).sqrt() * xt.double()) / ab.sqrt()
    assert raw.abs().max() > 2 and (raw.abs() < 1).any()

    mean_c, _, x0_c = d.p_mean_variance(wild, xt, t, clip_denoised=True)
    assert x0_c.min() >= -1 and x0_c.max() <= 1
    assert torch.allclose(x0_c.double(), raw.clamp(-1, 1), atol=1e-5)
    c0, ct = col(d.posterior_c0, t), col(d.posterior_ct, t)
    assert torch.allclose(mean_c.double(), c0 * raw.clamp(-1, 1) + ct * xt.double(), atol=1e-5)
    assert torch.allclose(mean_c, d.q_posterior(raw.clamp(-1, 1).float(), xt, t)[0], atol=1e-5)

    mean_u, _, x0_u = d.p_mean_variance(wild, xt, t, clip_denoised=False)
    assert torch.allclose(x0_u.double(), raw, rtol=1e-5, atol=1e-5)
    assert torch.allclose(mean_u.double(), c0 * raw + ct * xt.double(), rtol=1e-5, atol=1e-5)
    assert (mean_u - mean_c).abs().max() > 0.1


# ----- 5. fixed small / fixed large -------------------------------------------------------------

@pytest.mark.parametrize("betas", [cosine_betas(50), linear_betas(100)])
def test_variance_tables(betas):
    large = GaussianDiffusion(betas, "fixed_large")
    small = GaussianDiffusion(betas, "fixed_small")
    b = torch.from_numpy(betas)
    assert torch.equal(large.model_variance[1:], b[1:])
    assert torch.equal(small.model_variance[1:], small.posterior_variance[1:])
    ab = np.cumprod(1 - betas)
    post = betas[1:] * (1 - ab[:-1]) / (1 - ab[1:])  # Eq. (6), independently
    assert np.allclose(small.model_variance[1:].numpy(), post, rtol=1e-12)
    assert (small.model_variance[1:] < large.model_variance[1:]).all()
    # t = 0 uses beta~_1 for both (finite log-variance); no noise is added there anyway
    assert large.model_variance[0] == small.model_variance[0] == small.posterior_variance[1]


@pytest.mark.parametrize("variance", ["fixed_large", "fixed_small"])
def test_p_sample_noise_has_the_model_variance(variance):
    betas = cosine_betas(50)
    d = GaussianDiffusion(betas, variance)
    xt = torch.randn(6, 1, 4, 4, generator=torch.Generator().manual_seed(2))
    t = torch.tensor([0, 1, 5, 20, 40, 49])
    mean, _, _ = d.p_mean_variance(affine_eps, xt, t)
    x_prev, _ = d.p_sample(affine_eps, xt, t, generator=torch.Generator().manual_seed(9))
    z = torch.randn(xt.shape, generator=torch.Generator().manual_seed(9)).double()
    ab = np.cumprod(1 - betas)
    ref = betas.copy() if variance == "fixed_large" else np.append(0.0, betas[1:] * (1 - ab[:-1]) / (1 - ab[1:]))
    sigma = torch.from_numpy(np.sqrt(ref))[t].view(-1, 1, 1, 1)
    sigma[0] = 0.0  # t = 0: no noise
    assert torch.allclose(x_prev.double() - mean.double(), sigma * z, atol=2e-6)
    # empirical check of the same thing, without reconstructing z: many draws at one (x_t, t)
    x1 = xt[3:4].expand(4000, -1, -1, -1)
    t1 = torch.full((4000,), 20)
    m1, _, _ = d.p_mean_variance(affine_eps, x1, t1)
    s1, _ = d.p_sample(affine_eps, x1, t1, generator=torch.Generator().manual_seed(4))
    emp = ((s1 - m1).double() ** 2).mean().item()
    assert emp == pytest.approx(ref[20], rel=0.05)


# ----- 2. labels under flipping -----------------------------------------------------------------

def centre_columns(x: torch.Tensor) -> torch.Tensor:
    """Column of each disc's centre: the column with the most lit pixels (the plus's vertical bar)."""
    lit = (x[:, 0] > 0).float()
    assert (lit.sum(dim=(1, 2)) == 5).all()  # one radius-1 disc (a 5-pixel plus) at 32 px
    return lit.sum(dim=1).argmax(dim=1)


def test_labels_follow_the_disc_side_under_flips():
    S = 32
    d = CirclesData(S, 0.2, flip=True)
    gen = torch.Generator().manual_seed(0)
    for _ in range(5):
        x, y = d.batch(64, gen)
        assert torch.equal(y, (centre_columns(x) >= S / 2).long())
    # Left-band images only: every right-side disc in a batch must come from a flip.
    left = CirclesData(S, 0.2, flip=True)
    keep = left.y == 0
    left.x, left.y = left.x[keep], left.y[keep]
    x, y = left.batch(256, gen)
    cx = centre_columns(x)
    right = cx >= S / 2
    assert 0.3 < right.float().mean() < 0.7  # flipped and unflipped draws both occurred
    assert torch.equal(y, right.long())
    assert set(cx[right].tolist()) <= set(range(26, 31)) and set(cx[~right].tolist()) <= set(range(1, 6))
    # Without flipping, left stays left.
    left.flip = False
    x, y = left.batch(64, gen)
    assert (centre_columns(x) < S / 2).all() and (y == 0).all()


# ----- 3. oracle denoiser ----------------------------------------------------------------------

TRAIN = torch.tensor([[[1, -1, -1, 1], [-1, -1, -1, -1], [1, 1, -1, -1], [-1, 1, 1, -1]],
                      [[-1, -1, 1, 1], [1, -1, 1, -1], [-1, -1, -1, 1], [1, 1, -1, 1]],
                      [[1, 1, 1, -1], [-1, 1, -1, 1], [1, -1, 1, 1], [-1, -1, 1, -1]]],
                     dtype=torch.float64)[:, None]  # 3 images, 1x4x4, values in {-1, 1}


class Oracle:
    """The exact eps (or v) of q_t = (1/N) sum_i N(sqrt(ab_t) x_i, (1 - ab_t) I), fed ORIGINAL t."""

    def __init__(self, data, betas, prediction="eps"):
        self.D = data.flatten(1)
        self.ab = torch.from_numpy(np.cumprod(1 - betas))
        self.prediction = prediction

    def __call__(self, x, t):
        xf = x.double().flatten(1)
        ab = self.ab[t].view(-1, 1)
        d2 = ((xf[:, None, :] - ab.sqrt()[:, :, None] * self.D[None]) ** 2).sum(-1)  # [B, N]
        w = torch.softmax(-d2 / (2 * (1 - ab)), dim=-1)
        x0 = w @ self.D
        eps = (xf - ab.sqrt() * x0) / (1 - ab).sqrt()
        out = eps if self.prediction == "eps" else ab.sqrt() * eps - (1 - ab).sqrt() * x0
        return out.view_as(x).to(x.dtype)


@pytest.mark.parametrize("T,K,prediction,variance", [
    (50, None, "eps", "fixed_large"),
    (100, 20, "eps", "fixed_large"),
    (50, None, "v", "fixed_large"),
    (100, 20, "v", "fixed_small"),
])
def test_oracle_denoiser_reproduces_the_training_set(T, K, prediction, variance):
    betas = cosine_betas(T)
    d = (GaussianDiffusion(betas, variance, prediction=prediction) if K is None
         else GaussianDiffusion.respaced(betas, K, variance, prediction))
    n = 2000
    x = d.sample(Oracle(TRAIN, betas, prediction), (n, 1, 4, 4), generator=torch.Generator().manual_seed(0))
    err = (x.double()[:, None] - TRAIN[None]).abs().flatten(2).amax(-1)  # [n, 3]
    best, which = err.min(dim=1)
    assert best.max() < 1e-3, best.max()  # every sample is a training image (float32 round-off)
    freq = torch.bincount(which, minlength=3).double() / n
    assert (freq - 1 / 3).abs().max() < 0.05, freq  # binomial sd 0.011


@pytest.mark.parametrize("T,K", [(50, None), (100, 20)])
def test_oracle_on_a_weighted_mixture(T, K):
    """Duplicating one image gives it weight 1/2: the sampler follows the mixture weights (on a
    respaced grid only if the network gets the original timestep, i.e. the right noise level)."""
    betas = cosine_betas(T)
    data = torch.cat([TRAIN, TRAIN[:1]])  # weights 1/2, 1/4, 1/4
    d = GaussianDiffusion(betas) if K is None else GaussianDiffusion.respaced(betas, K)
    n = 2000
    x = d.sample(Oracle(data, betas), (n, 1, 4, 4), generator=torch.Generator().manual_seed(1))
    which = (x.double()[:, None] - TRAIN[None]).abs().flatten(2).amax(-1).argmin(1)
    freq = torch.bincount(which, minlength=3).double() / n
    assert torch.allclose(freq, torch.tensor([0.5, 0.25, 0.25], dtype=torch.float64), atol=0.05), freq


# ----- 4. learning rate and EMA ----------------------------------------------------------------

def test_lr_warmup_then_cosine_to_ten_percent():
    base, W, total = 2e-4, 10, 110
    assert trainer.lr_at(0, base, W, total) == pytest.approx(base / W, rel=1e-12)
    assert trainer.lr_at(4, base, W, total) == pytest.approx(base * 5 / W, rel=1e-12)
    assert trainer.lr_at(W - 1, base, W, total) == pytest.approx(base, rel=1e-12)
    assert trainer.lr_at(W, base, W, total) == pytest.approx(base, rel=1e-12)
    assert trainer.lr_at(W + 25, base, W, total) == pytest.approx(
        base * (0.1 + 0.45 * (1 + math.cos(math.pi / 4))), rel=1e-12)  # 0.868198 base
    assert trainer.lr_at(W + 50, base, W, total) == pytest.approx(0.55 * base, rel=1e-12)
    assert trainer.lr_at(total, base, W, total) == pytest.approx(0.1 * base, rel=1e-12)
    assert trainer.lr_at(total + 50, base, W, total) == pytest.approx(0.1 * base, rel=1e-12)
    warm = [trainer.lr_at(s, base, W, total) for s in range(W)]
    decay = [trainer.lr_at(s, base, W, total) for s in range(W, total + 1)]
    assert all(a < b for a, b in zip(warm, warm[1:]))
    assert all(a > b for a, b in zip(decay, decay[1:]))


def test_ema_decay_warmup():
    assert trainer.ema_decay_at(0, 0.999) == pytest.approx(0.1, rel=1e-12)
    assert trainer.ema_decay_at(10, 0.999) == pytest.approx(11 / 20, rel=1e-12)
    assert trainer.ema_decay_at(990, 0.999) == pytest.approx(991 / 1000, rel=1e-12)
    assert trainer.ema_decay_at(10 ** 6, 0.999) == 0.999
    assert trainer.ema_decay_at(0, 0.05) == 0.05


def test_update_ema_is_the_exact_lerp():
    def net(w, b, buf):
        m = torch.nn.Linear(2, 2)
        m.register_buffer("stat", torch.tensor(buf))
        with torch.no_grad():
            m.weight.copy_(torch.tensor(w)), m.bias.copy_(torch.tensor(b))
        return m

    ema = net([[1.0, 2.0], [3.0, 4.0]], [0.5, -0.5], [7.0])
    model = net([[3.0, 0.0], [-1.0, 4.0]], [1.5, 0.5], [9.0])
    trainer.update_ema(ema, model, 0.75)
    assert torch.allclose(ema.weight, torch.tensor([[1.5, 1.5], [2.0, 4.0]]), atol=1e-7)
    assert torch.allclose(ema.bias, torch.tensor([0.75, -0.25]), atol=1e-7)
    assert torch.equal(ema.stat, torch.tensor([9.0]))  # buffers copied, not averaged
    assert torch.equal(model.weight, torch.tensor([[3.0, 0.0], [-1.0, 4.0]]))  # model untouched
    trainer.update_ema(ema, model, 0.0)
    assert torch.equal(ema.weight, model.weight) and torch.equal(ema.bias, model.bias)


# ----- 7. unwritable --out, effective as root --------------------------------------------------

def _deny(*args, **kwargs):
    raise PermissionError(13, "Permission denied")


def _must_not_train(*args, **kwargs):
    raise AssertionError("training started although --out is not writable")


@pytest.mark.parametrize("target", ["NamedTemporaryFile", "makedirs"])
def test_unwritable_out_is_a_user_error_even_as_root(tmp_path, monkeypatch, capsys, target):
    if target == "NamedTemporaryFile":
        monkeypatch.setattr(tempfile, "NamedTemporaryFile", _deny)
    else:
        monkeypatch.setattr(os, "makedirs", _deny)
    monkeypatch.setattr(train, "train_ddpm", _must_not_train)
    monkeypatch.setattr(train, "train_classifier", _must_not_train)
    out = str(tmp_path / "ro" / "run")
    with pytest.raises(UserError) as e:  # (pick_device's set_num_threads is undone by one_thread)
        train.main(["--dataset", "circles", "--out", out, "--device", "cpu", "--steps", "1"])
    msg = str(e.value)
    assert "cannot write" in msg and "--out" in msg and "Permission denied" in msg and out in msg
    assert "\n" not in msg
    # and the CLI wrapper turns it into one stderr line and exit code 2
    with pytest.raises(SystemExit) as ex:
        checkpoint.cli(lambda: train.main(["--out", out, "--device", "cpu"]))
    err = capsys.readouterr().err.strip()
    assert ex.value.code == 2 and len(err.splitlines()) == 1 and err.startswith("error: cannot write"), err

"""The variational bound of a DDPM (paper App. A, Eq. 9): its terms, L_hybrid's L_vlb, bits/dim.

L_hybrid (App. A.3, Eq. 9) = L_simple + 0.001 L_vlb when the variance is learned
(diffusion.GaussianDiffusion.training_loss).
L_vlb = sum_t L_t is estimated from the one uniformly drawn t of each image as T * L_t, and L_t is in
bits per dimension, the units Nichol & Dhariwal's lambda = 0.001 was set for (``vlb_terms``): for
t > 0 the Gaussian KL (``normal_kl``) between q(x_{t-1} | x_t, x_0) and p_theta(x_{t-1} | x_t) with a
stop-gradient on the mean part, so L_vlb trains only the variance; at t = 0 the decoder NLL
-log p_theta(x_0 | x_1) of Ho et al.'s discretised Gaussian over the 256 levels of 8-bit data
(``discretised_gaussian_log_likelihood``), which fits the 0/255 circles and 8-bit faces alike.
``vlb_bits_per_dim`` sums every term of a (possibly respaced) diffusion plus the prior L_T: the full
variational bound of fixed- and learned-variance models alike.

The functions take the (possibly respaced) ``GaussianDiffusion`` as their first argument ``d``: the
bound is a property of a diffusion's grid and of a model, not a sampling step.
"""
from __future__ import annotations

import math

import torch


def normal_kl(mean1, logvar1, mean2, logvar2):
    """KL(N(mean1, e^logvar1) || N(mean2, e^logvar2)) per element, in nats:
    (logvar2 - logvar1 + (e^logvar1 + (mean1 - mean2)^2) / e^logvar2 - 1) / 2."""
    return 0.5 * (logvar2 - logvar1 - 1.0 + torch.exp(logvar1 - logvar2)
                  + (mean1 - mean2) ** 2 * torch.exp(-logvar2))


def discretised_gaussian_log_likelihood(x, mean, log_var):
    """log P(x) per element, in nats, for 8-bit data x in [-1, 1] (the 256 levels k/127.5 - 1) under
    N(mean, e^log_var) discretised into bins of width 2/255 (Ho et al. 2020, §3.3): the mass of
    [x - 1/255, x + 1/255], with the end bins open to -inf (x = -1) and +inf (x = 1).

    The difference Phi(b) - Phi(a) is taken on the side of the smaller tail, through log_ndtr, so a
    bin far from the mean keeps its (tiny) log-probability instead of rounding to log 0."""
    inv_std = torch.exp(-0.5 * log_var)
    a = (x - mean - 1.0 / 255) * inv_std   # lower bin edge, standardised
    b = (x - mean + 1.0 / 255) * inv_std   # upper bin edge
    log_below_b = torch.special.log_ndtr(b)      # the x = -1 bin: P(X < -1 + 1/255)
    log_above_a = torch.special.log_ndtr(-a)     # the x = +1 bin: P(X > 1 - 1/255)
    # Interior bins: Phi(b) - Phi(a) = Phi(-a) - Phi(-b); use the form whose edges lie below 0.
    flip = a > 0
    lo, hi = torch.where(flip, -b, a), torch.where(flip, -a, b)
    log_hi = torch.special.log_ndtr(hi)
    mid = log_hi + torch.log((-torch.expm1(torch.special.log_ndtr(lo) - log_hi)).clamp(min=1e-12))
    return torch.where(x < -0.999, log_below_b, torch.where(x > 0.999, log_above_a, mid))




def vlb_terms(d, mean_out, var_out, x0, xt, t, clip_denoised=False):
    """L_t of Eq. (9) per image, in bits per dimension, from the network's two output parts at
    (x_t, t), with a stop-gradient on the mean part (App. A.3: L_vlb drives Sigma_theta only).

    t > 0: KL(q(x_{t-1} | x_t, x_0) || p_theta(x_{t-1} | x_t)), both Gaussian (normal_kl).
    t = 0: -log p_theta(x_0 | x_1), the discretised Gaussian over 256 bins (8-bit data).
    ``clip_denoised`` False (training): the variance learns to fit the network's own mean;
    vlb_bits_per_dim passes the run's setting, so the bound is that of the sampler."""
    mean, _, log_var, _ = d.p_from_parts(mean_out.detach(), var_out, xt, t, clip_denoised)
    true_mean, _ = d.q_posterior(x0, xt, t)
    true_log_var = d._at("posterior_log_variance", t, xt.shape)
    kl = normal_kl(true_mean, true_log_var, mean, log_var).flatten(1).mean(1)
    nll = -discretised_gaussian_log_likelihood(x0, mean, log_var).flatten(1).mean(1)
    return torch.where(t == 0, nll, kl) / math.log(2.0)

def prior_bits_per_dim(d, x0):
    """L_T of Eq. (9) per image in bits/dim: KL(q(x_T | x_0) || N(0, I)) at the last step of this
    grid. No parameter enters it; negligible for the cosine schedule (2e-9 at T = 1000)."""
    t = torch.full((x0.shape[0],), d.T - 1, device=x0.device, dtype=torch.long)
    mean = d._at("sqrt_ab", t, x0.shape) * x0
    log_var = 2 * torch.log(d._at("sqrt_1m_ab", t, x0.shape))
    kl = normal_kl(mean, log_var.expand_as(mean), torch.zeros_like(mean), torch.zeros_like(mean))
    return kl.flatten(1).mean(1) / math.log(2.0)

@torch.no_grad()
def vlb_bits_per_dim(d, model, x0, clip_denoised=True, generator=None):
    """The variational bound -log p(x_0) <= L_T + sum_t L_t (Eq. 9) per image, in bits/dim:
    {"total": [B], "prior": [B], "terms": [B, T]} (terms[:, k]: respaced index k, 0 = decoder).

    Every term of this diffusion's grid is summed: on the full grid (T network calls per image)
    the bound of the T-step model; on a respaced one (GaussianDiffusion.respaced) the bound of
    the K-step sampler, a different and usually looser model (larger bits/dim), cheaper by
    T / K. Each L_t is estimated with one draw of x_t ~ q(x_t | x_0) (``generator``). Works for
    fixed and learned variances alike (the fixed ones read their table)."""
    terms = []
    for k in range(d.T):
        t = torch.full((x0.shape[0],), k, device=x0.device, dtype=torch.long)
        noise = torch.randn(x0.shape, generator=generator, device=x0.device, dtype=x0.dtype)
        xt = d.q_sample(x0, t, noise)
        terms.append(vlb_terms(d, *d.model_output(model, xt, t), x0, xt, t, clip_denoised))
    terms = torch.stack(terms, 1)
    prior = prior_bits_per_dim(d, x0)
    return {"total": terms.sum(1) + prior, "prior": prior, "terms": terms}

"""Gaussian diffusion (DDPM): paper §2.1 and Appendix A; guided sampling hooks for §2.2 / §4.2.

One implementation shared by every experiment:
  * noise schedules, linear (Ho et al.) and cosine (Eq. 10), computed in float64;
  * the forward process q(x_t | x_0) (Eq. 4);
  * the posterior q(x_{t-1} | x_t, x_0) (Eq. 5-6) and the eps-parameterised mean (Eq. 7);
  * fixed small (beta~_t), fixed large (beta_t) or learned reverse variance (Eq. 8, see below);
  * the training loss L_simple, for an eps-predicting network (the paper) or, optionally, a
    v-predicting one (v = sqrt(abar) eps - sqrt(1-abar) x_0, Salimans & Ho 2022). Why v exists here:
    with eps-prediction, an error in x^_0 costs abar/(1-abar) in the loss, ~1e-4 at the noisiest
    steps of the cosine schedule, so a briefly trained net leaves x^_0's mean brightness free there
    and samples come out with grey or white backgrounds. The authors' 30k GPU steps wash this out;
    the CPU preset's few minutes do not, and v-prediction fixes it at no cost;
  * ancestral sampling, optionally on a respaced grid of K <= T steps;
  * DDIM sampling (DDIM Eq. 12, Song et al. 2021) on the same grid, with eta in [0, 1] (eta = 1 has the
    posterior variance beta~_t, eta = 0 is the deterministic probability-flow path), and the
    deterministic DDIM inversion x_0 -> x_t that App. M of the paper interpolates between, and a
    per-step eta for App. N's editing (eta decaying linearly, see lab/edit.py);
  * where classifier guidance (§2.2) is evaluated: at x_t (default) or at the posterior mean
    mu_theta(x_t, t) (``guidance_point``).

Respacing (Nichol & Dhariwal 2021, §4): keep K of the T timesteps and recompute
beta'_k = 1 - abar[t_k] / abar[t_{k-1}] so that the kept steps have the same cumulative noise.
The network was trained on the original indices, so it always receives t_k, never k.

Learned variance (App. A, Eq. 8; Nichol & Dhariwal 2021), the paper's choice (App. C): the network
returns 2C channels, [mean part (eps or v, per ``prediction``), v_var], and
    Sigma_theta(x_t, t) = exp(frac log beta_t + (1 - frac) log beta~_t),  frac = (v_var + 1) / 2,
per pixel (``model_log_variance_of``). Why (v + 1) / 2 and not Eq. 8's v itself: the output conv is
zero-initialised (unet.py), so at v = 0 training starts from the geometric mean of the two fixed
choices, and the raw outputs -1 / +1 are the endpoints beta~_t / beta_t, a range symmetric about
the network's initial output (improved-diffusion's convention). frac is not clamped (neither Eq. 8 nor
Nichol & Dhariwal constrain v, who report it staying in range in practice); bench/learned_sigma.py
reports how often it leaves [0, 1].
At t = 0, beta~_0 = 0, so the lower end is beta~_1 there (posterior_log_variance), the upper end
beta_0. On a respaced grid both ends are the respaced diffusion's own beta_k and beta~_k (the
kept steps' betas), so the same raw v means a wider variance per kept step. ``p_from_parts`` is the
single place that turns network output into (mean, variance); every other caller (DDIM, inversion,
L_simple) reads only the first C channels (``model_output``). DDIM keeps its own sigma_t(eta).
Guidance shifts the mean by the learned Sigma_theta g, per pixel.

L_hybrid (App. A.3, Eq. 9) = L_simple + 0.001 L_vlb when the variance is learned (``training_loss``);
the bound's terms, and the full bound in bits/dim, are in vlb.py.
"""
from __future__ import annotations

import math

import numpy as np
import torch

from vlb import vlb_terms


def linear_betas(T: int) -> np.ndarray:
    # Ho et al. (2020): beta from 1e-4 to 0.02 at T=1000, scaled so other T keep the same curve.
    scale = 1000 / T
    return np.linspace(scale * 1e-4, scale * 0.02, T, dtype=np.float64)


def cosine_betas(T: int, s: float = 0.008, max_beta: float = 0.999) -> np.ndarray:
    # Eq. (10): abar(t) = f(t)/f(0), f(t) = cos^2(((t/T + s)/(1 + s)) * pi/2); beta_t from the
    # ratio of consecutive abar, capped at 0.999 to avoid the singularity at t = T.
    f = lambda t: math.cos((t / T + s) / (1 + s) * math.pi / 2) ** 2
    return np.array([min(1 - f(i + 1) / f(i), max_beta) for i in range(T)], dtype=np.float64)


def make_betas(schedule: str, T: int) -> np.ndarray:
    if schedule == "cosine":
        return cosine_betas(T)
    if schedule == "linear":
        return linear_betas(T)
    raise ValueError(f"unknown noise schedule {schedule!r}; use 'cosine' or 'linear'")


def extract(a: torch.Tensor, t: torch.Tensor, shape) -> torch.Tensor:
    """Gather a[t] for a batch of indices and broadcast it against ``shape`` (no copy, no cast:
    ``a`` must already live on t's device in the working dtype, see GaussianDiffusion.to)."""
    if a.device != t.device:
        raise RuntimeError(f"schedule table on {a.device} but timesteps on {t.device}; "
                           "call diffusion.to(device) once after building it")
    return a[t].view(-1, *([1] * (len(shape) - 1)))


def respace_indices(T: int, K: int) -> list[int]:
    """K evenly spread original timesteps, always including 0 and T-1."""
    if not 2 <= K <= T:
        raise ValueError(f"respacing needs 2 <= steps <= T={T}, got {K}")
    return sorted({round(i * (T - 1) / (K - 1)) for i in range(K)})


VARIANCES = ("fixed_large", "fixed_small", "learned")
HYBRID_LAMBDA = 1e-3   # lambda of L_hybrid (Eq. 9), Nichol & Dhariwal's value, quoted in App. A.3


class GaussianDiffusion:
    def __init__(self, betas: np.ndarray, variance: str = "fixed_large",
                 timestep_map: list[int] | None = None, prediction: str = "eps"):
        if prediction not in ("eps", "v"):
            raise ValueError(f"unknown prediction {prediction!r}; use eps or v")
        self.prediction = prediction
        if variance not in VARIANCES:
            raise ValueError(f"unknown variance {variance!r}; use fixed_large, fixed_small or learned")
        b = np.asarray(betas, dtype=np.float64)
        assert b.ndim == 1 and len(b) >= 2 and (b > 0).all() and (b <= 1).all()
        self.T = len(b)
        self.variance = variance
        # Original timestep that each (possibly respaced) index stands for.
        self.timestep_map = torch.tensor(timestep_map if timestep_map is not None else range(self.T))
        t64 = lambda a: torch.from_numpy(np.asarray(a, dtype=np.float64))
        ab = np.cumprod(1.0 - b)
        ab_prev = np.append(1.0, ab[:-1])
        self.betas = t64(b)
        self.alphas_cumprod = t64(ab)
        self.alphas_cumprod_prev = t64(ab_prev)
        # Eq. (4): x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps
        self.sqrt_ab = t64(np.sqrt(ab))
        self.sqrt_1m_ab = t64(np.sqrt(1.0 - ab))
        # Inverting Eq. (4) for x_0 given eps: x_0 = (x_t - sqrt(1-abar) eps) / sqrt(abar)
        self.sqrt_recip_ab = t64(np.sqrt(1.0 / ab))
        self.sqrt_recipm1_ab = t64(np.sqrt(1.0 / ab - 1.0))
        # Eq. (6): beta~_t = (1 - abar_{t-1}) / (1 - abar_t) * beta_t  (0 at t = 0)
        post_var = b * (1.0 - ab_prev) / (1.0 - ab)
        self.posterior_variance = t64(post_var)
        # beta~_0 = 0: use beta~_1 at t = 0 instead (as improved-diffusion does) so that the
        # log-variance stays finite. The t = 0 step adds no noise anyway (see p_sample).
        small = np.append(post_var[1], post_var[1:])
        self.posterior_log_variance = t64(np.log(small))
        # Upper end of the learned variance (Eq. 8): log beta_t, with the true beta_0 at t = 0.
        self.log_betas = t64(np.log(b))
        # Eq. (5): mu~(x_t, x_0) = c0 x_0 + ct x_t
        self.posterior_c0 = t64(b * np.sqrt(ab_prev) / (1.0 - ab))
        self.posterior_ct = t64((1.0 - ab_prev) * np.sqrt(1.0 - b) / (1.0 - ab))
        # Reverse-process variance sigma_t^2: fixed large = beta_t, fixed small = beta~_t (Ho et
        # al.). Both use beta~_1 at t = 0 for the same reason as above. A learned variance has no
        # table (it comes from the network, model_log_variance_of): NaN, so that code reading the
        # fixed table for a learned model produces NaN instead of a silently wrong variance.
        large = np.append(post_var[1], b[1:])
        fixed = {"fixed_large": large, "fixed_small": small}.get(variance, np.full(self.T, np.nan))
        self.model_variance = t64(fixed)
        self.model_log_variance = t64(np.log(fixed))
        self.to("cpu")

    _TABLES = ("betas", "alphas_cumprod", "alphas_cumprod_prev", "sqrt_ab", "sqrt_1m_ab", "sqrt_recip_ab", "sqrt_recipm1_ab",
               "posterior_variance", "posterior_c0", "posterior_ct", "model_variance",
               "posterior_log_variance", "log_betas", "model_log_variance")

    def to(self, device) -> "GaussianDiffusion":
        """Working copies of the schedule on ``device``: float32 (MPS has no float64), made once so
        that no sampling or training step copies host -> device. The float64 tables above stay the
        reference (tests, analysis); ``self.f32[name]`` is what the hot paths read."""
        self.device = torch.device(device)
        self.f32 = {k: getattr(self, k).to(self.device, torch.float32) for k in self._TABLES}
        self._map = self.timestep_map.to(self.device)
        return self

    def _at(self, name: str, t: torch.Tensor, shape) -> torch.Tensor:
        return extract(self.f32[name], t, shape)

    # ----- construction helpers -------------------------------------------------------------
    @classmethod
    def from_config(cls, dcfg, respaced: bool = False, steps: int | None = None):
        betas = make_betas(dcfg.noise_schedule, dcfg.timesteps)
        if not respaced:
            return cls(betas, dcfg.variance, prediction=dcfg.prediction)
        return cls.respaced(betas, steps or dcfg.sample_steps, dcfg.variance, dcfg.prediction)

    @classmethod
    def respaced(cls, betas: np.ndarray, K: int, variance: str = "fixed_large", prediction: str = "eps"):
        """A diffusion over K kept steps whose betas reproduce abar at those steps."""
        keep = respace_indices(len(betas), K)
        ab = np.cumprod(1.0 - np.asarray(betas, dtype=np.float64))
        new_betas, last = [], 1.0
        for t in keep:
            new_betas.append(1.0 - ab[t] / last)
            last = ab[t]
        return cls(np.array(new_betas), variance, timestep_map=keep, prediction=prediction)

    # ----- forward process --------------------------------------------------------------------
    def q_sample(self, x0, t, noise=None):
        """Eq. (4): draw x_t ~ q(x_t | x_0)."""
        noise = torch.randn_like(x0) if noise is None else noise
        return self._at("sqrt_ab", t, x0.shape) * x0 + self._at("sqrt_1m_ab", t, x0.shape) * noise

    def q_posterior(self, x0, xt, t):
        """Eq. (5)-(6): mean and variance of q(x_{t-1} | x_t, x_0)."""
        mean = self._at("posterior_c0", t, xt.shape) * x0 + self._at("posterior_ct", t, xt.shape) * xt
        return mean, self._at("posterior_variance", t, xt.shape)

    def predict_x0(self, xt, t, eps):
        return self._at("sqrt_recip_ab", t, xt.shape) * xt - self._at("sqrt_recipm1_ab", t, xt.shape) * eps

    def model_eps(self, out, xt, t):
        """The network's output as an eps-prediction. For v-prediction (Salimans & Ho, 2022),
        v = sqrt(abar) eps - sqrt(1 - abar) x_0, hence eps = sqrt(1 - abar) x_t + sqrt(abar) v."""
        if self.prediction == "eps":
            return out
        return self._at("sqrt_1m_ab", t, xt.shape) * xt + self._at("sqrt_ab", t, xt.shape) * out

    def eps_to_model(self, eps, xt, t):
        """The inverse of ``model_eps``: an eps-prediction in the network's parameterisation,
        v = (eps - sqrt(1 - abar) x_t) / sqrt(abar). Lets a wrapper that combines predictions in
        eps space (classifier_free.py) hand its result back as if a network had made it."""
        if self.prediction == "eps":
            return eps
        return (eps - self._at("sqrt_1m_ab", t, xt.shape) * xt) / self._at("sqrt_ab", t, xt.shape)

    def target(self, x0, noise, t):
        """What the network regresses: eps (Ho et al.) or v."""
        if self.prediction == "eps":
            return noise
        return self._at("sqrt_ab", t, x0.shape) * noise - self._at("sqrt_1m_ab", t, x0.shape) * x0

    # ----- reverse process --------------------------------------------------------------------
    def model_t(self, t):
        """Original timestep indices for (respaced) indices t: what networks are fed."""
        return self._map[t]

    def model_output(self, model, xt, t):
        """(mean part, variance part or None) of the network at (x_t, t): the network sees the
        original timestep; with a learned variance its 2C output channels are split in two."""
        return self.split_output(model(xt, self.model_t(t)), xt.shape[1])

    def split_output(self, out, channels: int):
        """[mean part (eps or v), v_var] for a learned variance, (out, None) for a fixed one."""
        want = 2 * channels if self.variance == "learned" else channels
        if out.shape[1] != want:
            raise ValueError(f"the network returns {out.shape[1]} channels but variance={self.variance!r} "
                             f"with {channels}-channel images needs {want}")
        if self.variance != "learned":
            return out, None
        return out[:, :channels], out[:, channels:]

    def model_log_variance_of(self, var_out, t, shape):
        """log Sigma_theta (Eq. 8): frac log beta_t + (1 - frac) log beta~_t with frac = (v + 1) / 2
        of the raw variance output v (see the module docstring); the fixed table if var_out is None."""
        if var_out is None:
            return self._at("model_log_variance", t, shape)
        frac = (var_out.float() + 1) / 2
        return frac * self._at("log_betas", t, shape) + (1 - frac) * self._at("posterior_log_variance", t, shape)

    def p_mean_variance(self, model, xt, t, clip_denoised=True):
        """Model output -> (mean, variance, x^_0) of p_theta(x_{t-1} | x_t) (see p_from_parts)."""
        mean, var, _, x0 = self.p_from_parts(*self.model_output(model, xt, t), xt, t, clip_denoised)
        return mean, var, x0

    def p_from_parts(self, mean_out, var_out, xt, t, clip_denoised=True):
        """(mean, variance, log variance, x^_0) of p_theta(x_{t-1} | x_t) from the two parts of the
        network's output: the one place where output becomes a Gaussian.

        With an eps-prediction, Eq. (7) equals the posterior mean (Eq. 5) at x^_0 = predict_x0(eps);
        going through x^_0 lets us clip it to the data range [-1, 1] first. The variance is the
        fixed table ([B, 1, 1, 1]) or, learned, Eq. 8 per pixel ([B, C, H, W]).
        """
        eps = self.model_eps(mean_out, xt, t)
        x0 = self.predict_x0(xt, t, eps)
        if clip_denoised:
            x0 = x0.clamp(-1, 1)
        mean, _ = self.q_posterior(x0, xt, t)
        if var_out is None:
            return mean, self._at("model_variance", t, xt.shape), self._at("model_log_variance", t, xt.shape), x0
        log_var = self.model_log_variance_of(var_out, t, xt.shape)
        return mean, log_var.exp(), log_var, x0

    def p_sample(self, model, xt, t, clip_denoised=True, guidance=None, generator=None, guidance_at="xt"):
        """One ancestral step x_t -> x_{t-1}.

        1. mean, variance from the model (Eq. 7 / Eq. 5; the variance fixed or learned, Eq. 8).
        2. classifier guidance (§2.2): mu~ = mu + sigma_t^2 * g, g = grad_x sum_m lambda_m log p(y_m|x),
           taken where ``guidance_at`` says (see guidance_point); sigma_t^2 is Sigma_theta per pixel
           when the variance is learned.
        3. x_{t-1} = mu~ + sigma_t z, with no noise at t = 0.
        """
        mean, var, x0 = self.p_mean_variance(model, xt, t, clip_denoised)
        if guidance is not None:
            mean = mean + var * guidance(*self.guidance_point(xt, mean, t, guidance_at))
        noise = torch.randn(xt.shape, generator=generator, device=xt.device, dtype=xt.dtype)
        nonzero = (t != 0).float().view(-1, *([1] * (xt.dim() - 1)))
        return mean + nonzero * var.sqrt() * noise, x0

    def guidance_point(self, xt, mean, t, guidance_at="xt"):
        """(point, classifier timestep) at which an ancestral step evaluates the guidance g.

        ``xt`` (default, the authors' guided-diffusion code): g at x_t, the classifier told the
        current step's original timestep. ``mu`` (§2.2 as written, g = lambda grad_x log p(y|x) at
        x = mu_theta(x_t, t)): g at the (clipped) posterior mean, the classifier told the timestep
        of x_{t-1}, the previous kept step (original index 0 at the last step). Why t-1: mu is the
        mean of p(x_{t-1} | x_t), and the shift sigma_t^2 g is the first-order expansion of
        log p(y | x_{t-1}) around x_{t-1} = mu (Dhariwal & Nichol 2021, §4.1), a classifier of
        x_{t-1}'s noise level. The mean shift sigma_t^2 g is the same in both cases."""
        if guidance_at == "xt":
            return xt, self.model_t(t)
        if guidance_at == "mu":
            return mean, self.model_t((t - 1).clamp(min=0))
        raise ValueError(f"unknown guidance_at {guidance_at!r}; use xt or mu")

    @torch.no_grad()
    def sample(self, model, shape, clip_denoised=True, guidance=None, generator=None,
               device="cpu", progress=False, sampler="ancestral", eta=0.0, guidance_at="xt"):
        """Sampling from x_T ~ N(0, I) over all steps of this (possibly respaced) diffusion, with
        ancestral steps (p_sample) or DDIM steps (ddim_sample, noise scale ``eta``)."""
        x = torch.randn(shape, generator=generator, device=device)
        return self.denoise(model, x, self.T - 1, clip_denoised, guidance, generator, progress, sampler, eta,
                            guidance_at)

    @torch.no_grad()
    def denoise(self, model, x, start, clip_denoised=True, guidance=None, generator=None,
                progress=False, sampler="ancestral", eta=0.0, guidance_at="xt"):
        """Run the reverse process from x at (respaced) index ``start`` down to a clean image.

        DDIM's ``eta`` is a number, or a callable i -> eta_i of the respaced step index i (a per-step
        schedule, e.g. the linear decay of App. N's attribute editing). ``guidance_at="mu"`` is
        ancestral only: DDIM has no posterior mean before its noise is chosen (see guidance_point)."""
        if sampler not in ("ancestral", "ddim"):
            raise ValueError(f"unknown sampler {sampler!r}; use ancestral or ddim")
        if guidance_at not in ("xt", "mu") or (guidance_at == "mu" and sampler == "ddim"):
            raise ValueError(f"guidance_at {guidance_at!r} with sampler {sampler!r}: use xt, or mu "
                             "with the ancestral sampler")
        eta_at = eta if callable(eta) else (lambda i: eta)
        if x.device.type == "cpu" and x.dim() == 4:
            # NHWC in memory: oneDNN's CPU convolutions run in this layout, so no conv converts
            # its input (1.3x per unguided step, bench/sample_speed.py). Same values, other strides.
            x = x.contiguous(memory_format=torch.channels_last)
        steps = range(start, -1, -1)
        if progress:
            from tqdm import tqdm
            steps = tqdm(steps, desc="sampling", leave=False)
        for i in steps:
            t = torch.full((x.shape[0],), i, device=x.device, dtype=torch.long)
            if sampler == "ddim":
                x, _ = self.ddim_sample(model, x, t, float(eta_at(i)), clip_denoised, guidance, generator)
            else:
                x, _ = self.p_sample(model, x, t, clip_denoised, guidance, generator, guidance_at)
        return x

    # ----- DDIM (Song et al. 2021) ------------------------------------------------------------
    def eps_from_x0(self, xt, t, x0):
        """Eq. (4) solved for eps: the noise that carries x0 to xt at step t."""
        return (self._at("sqrt_recip_ab", t, xt.shape) * xt - x0) / self._at("sqrt_recipm1_ab", t, xt.shape)

    def ddim_eps_x0(self, model, xt, t, clip_denoised=True, guidance=None):
        """(eps^, x^_0) of one DDIM step.

        1. x^_0 from the network's eps^ (Eq. 4 solved for x_0), clipped to the data range, and eps^
           re-derived from the clipped x^_0 so that the pair satisfies Eq. (4) at x_t.
        2. Guidance shifts that eps^ by -sqrt(1 - abar_t) g (Dhariwal & Nichol 2021, Alg. 2), the same
           g = grad_x sum_m lambda_m log p(y_m | x_t) that shifts the ancestral mean by sigma_t^2 g
           (both add g to the score -eps / sqrt(1 - abar_t)).
        3. x^_0 is taken again from the shifted eps^, without a second clip: clipping after the
           shift would cut away exactly the guidance that pushes x^_0 past the data range."""
        eps = self.model_eps(self.model_output(model, xt, t)[0], xt, t)
        x0 = self.predict_x0(xt, t, eps)
        if clip_denoised:
            x0 = x0.clamp(-1, 1)
            eps = self.eps_from_x0(xt, t, x0)
        if guidance is not None:
            eps = eps - self._at("sqrt_1m_ab", t, xt.shape) * guidance(xt, self.model_t(t))
            x0 = self.predict_x0(xt, t, eps)
        return eps, x0

    def ddim_sigma(self, t, eta: float, shape) -> torch.Tensor:
        """sigma_t(eta) of DDIM Eq. 16 [Song et al. 2021]: eta sqrt((1-abar_{t-1})/(1-abar_t)) sqrt(1-abar_t/abar_{t-1}).
        The product under the roots is exactly beta~_t (Eq. 6), read from its float64-built table:
        1 - abar_t/abar_{t-1} in float32 would lose most digits near t = 0. eta = 1 is the DDPM
        posterior std, eta = 0 the deterministic DDIM."""
        return eta * self._at("posterior_variance", t, shape).sqrt()

    def ddim_sample(self, model, xt, t, eta=0.0, clip_denoised=True, guidance=None, generator=None):
        """One DDIM step x_t -> x_{t-1} on this (respaced) grid, DDIM Eq. 12 [Song et al. 2021]:
        x_{t-1} = sqrt(abar_{t-1}) x^_0 + sqrt(1 - abar_{t-1} - sigma_t^2) eps^ + sigma_t z."""
        eps, x0 = self.ddim_eps_x0(model, xt, t, clip_denoised, guidance)
        ab_prev = self._at("alphas_cumprod_prev", t, xt.shape)
        sigma = self.ddim_sigma(t, eta, xt.shape)
        # The clamp only absorbs float32 rounding: sigma_t^2 <= 1 - abar_{t-1} for eta <= 1.
        x = ab_prev.sqrt() * x0 + (1 - ab_prev - sigma ** 2).clamp(min=0).sqrt() * eps
        if eta > 0:  # eta = 0 draws nothing, so the path is the same whatever the generator
            x = x + sigma * torch.randn(xt.shape, generator=generator, device=xt.device, dtype=xt.dtype)
        return x, x0

    @torch.no_grad()
    def ddim_invert(self, model, x0, to_step: int, clip_denoised=True, refine: int = 0, progress=False):
        """Deterministic DDIM inversion: clean images x0 -> latents at (respaced) index ``to_step``,
        which ``denoise(model, z, to_step, sampler="ddim", eta=0)`` decodes back.

        Decoding step s -> s-1 is DDIM Eq. 12 with eta = 0, x_{s-1} = sqrt(abar_{s-1}) x^_0 +
        sqrt(1 - abar_{s-1}) eps^, with (eps^, x^_0) taken at x_s: the clean image is index -1
        (abar = 1). Run forwards, x_s is unknown, so (eps^, x^_0) are first taken at x_{s-1}
        (Song et al. §4.3: the ODE discretised the other way; the first step then keeps the clean
        image as x_0, as in the common implementations). ``refine`` > 0 fixed-point iterations
        re-evaluate eps^ at the new x_s and solve the decoding step exactly for it, which removes
        that first-order error (one network call each)."""
        if not 0 <= to_step < self.T:
            raise ValueError(f"inversion step {to_step} is outside 0..{self.T - 1}")
        x = x0
        steps = range(to_step + 1)
        if progress:
            from tqdm import tqdm
            steps = tqdm(steps, desc="inverting", leave=False)
        for s in steps:
            t = torch.full((x.shape[0],), s, device=x.device, dtype=torch.long)
            eps, x0_hat = self.ddim_eps_x0(model, x, (t - 1).clamp(min=0), clip_denoised)
            nxt = self._ddim_up(x0_hat, eps, t)
            for _ in range(refine):
                eps, _ = self.ddim_eps_x0(model, nxt, t, clip_denoised)
                # The decoding step from nxt must land on x: solve DDIM Eq. 12 for x^_0 given eps^.
                ab_prev = self._at("alphas_cumprod_prev", t, x.shape)
                nxt = self._ddim_up((x - (1 - ab_prev).sqrt() * eps) / ab_prev.sqrt(), eps, t)
            x = nxt
        return x

    def _ddim_up(self, x0_hat, eps, t):
        """Eq. (4) with the predicted noise: the point at index t on the DDIM path of (x^_0, eps^)."""
        ab = self._at("alphas_cumprod", t, x0_hat.shape)
        return ab.sqrt() * x0_hat + (1 - ab).sqrt() * eps

    # ----- training ---------------------------------------------------------------------------
    def training_loss(self, model, x0, t=None, noise=None):
        """L_simple = E ||eps - eps_theta(x_t, t)||^2 with t uniform over all T steps
        (or ||v - v_theta||^2 for v-prediction: eps-error / abar_t, i.e. L_simple reweighted by
        1 + 1/snr_t, which keeps a training signal on x_0 at the noisiest steps).

        Learned variance: L_hybrid = L_simple + lambda L_vlb (Eq. 9, lambda = 0.001), L_vlb = sum_t L_t
        estimated as T * L_t at this uniform t (bits/dim, vlb_terms; its mean part is detached, so
        L_vlb trains only the variance and L_simple only the mean)."""
        if t is None:
            t = torch.randint(0, self.T, (x0.shape[0],), device=x0.device)
        noise = torch.randn_like(x0) if noise is None else noise
        xt = self.q_sample(x0, t, noise)
        mean_out, var_out = self.model_output(model, xt, t)
        simple = ((mean_out - self.target(x0, noise, t)) ** 2).mean()
        if var_out is None:
            return simple
        return simple + HYBRID_LAMBDA * self.T * vlb_terms(self, mean_out, var_out, x0, xt, t).mean()

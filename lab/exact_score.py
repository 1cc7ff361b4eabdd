"""The exact score of the training set, and the exact noisy classifier (the memorisation lab).

Beside §5.5 of the paper (circles), §7 (what the model does off its training support), and the
score-error argument of "Catastrophic Compositional Generation" (score estimation error off the
data decides what guided sampling produces). Kadkhodaie et al. (2024) and Kamb & Ganguli (2024)
make the same point: the *exact* minimiser of L_simple on a finite training set memorises.

The training set {x_i}, i = 1..N, is an empirical distribution (1/N) sum_i delta(x - x_i), so the
noised data distribution (Eq. 4) is a Gaussian mixture and its score is closed-form:

    q_t(x)   = (1/N) sum_i N(x; sqrt(abar_t) x_i, (1 - abar_t) I)
    eps*(x, t) = -sqrt(1 - abar_t) grad log q_t(x) = sum_i w_i (x - sqrt(abar_t) x_i) / sqrt(1 - abar_t),
    w_i(x, t) = softmax_i( -||x - sqrt(abar_t) x_i||^2 / (2 (1 - abar_t)) ).

Derivation in two lines: grad log N(x; m_i, s^2 I) = -(x - m_i) / s^2, and the gradient of the log of
a sum of densities is the posterior-weighted (w_i = responsibility of component i) average of the
component gradients; eps* = -s grad log q_t with s = sqrt(1 - abar_t) (Eq. 4: x_t = sqrt(abar) x_0 + s eps).
Equivalently eps* is E[eps | x_t], the minimiser of L_simple, and x^_0* = E[x_0 | x_t] = sum_i w_i x_i.

Why it memorises: near t = 0, 1 - abar_t -> 0 and the softmax becomes an argmax, so x^_0* is the
training image nearest to x_t / sqrt(abar_t) - a disc in the unseen middle is denoised to a disc in a
training band, never to itself. Every sample of the exact reverse process is therefore a training
image (tests/test_exact_score.py). A trained network does not minimise L_simple exactly; its errors
off the training set (score_error below) are what lets it draw discs in the middle at all.

Restricting the sum to the images of one class gives the class-conditional score, and the ratio
of the two sums is the exact noisy classifier

    p*(y | x_t) = sum_{i in y} N(x_t; sqrt(abar_t) x_i, (1 - abar_t) I) / sum_i N(...),

(class priors N_y / N included) whose logits are the per-class logsumexp of the log-densities.

Why neither can interpolate on the circles: grad_x log p*(y | x_t) = (eps* - eps*_y) / sqrt(1 - abar)
= sqrt(abar) / (1 - abar) (E[x_0 | x_t, y] - E[x_0 | x_t]), a difference of averages of training
images, so it is exactly 0 on every pixel that is constant over the training set - the whole unseen
middle (columns 7..24 at 32 px are black in all 300 images). Exact-classifier guidance never lights a
middle pixel, whatever the score. And with the exact score, x^_0* is a convex combination of
training images at every step, black in the middle, so a guidance push there is undone at the
next step; only the last step's shift sigma_0^2 g (sigma_0^2 ~ 1e-4) survives.

Numerics: distances, the softmax and the logsumexp are in float64 (1 - abar_0 = 4e-5 on the cosine
schedule, so the log-weights differ by ~1e5 between neighbouring training images at t = 0); the
training set is processed in chunks of ``chunk_n`` images with a running (online) softmax, and the
batch in chunks of ``chunk_b``, so memory is O(chunk_b x chunk_n + chunk_b x D).

    python score_error.py --run runs/circles     # the learned score's error against eps* (score_error.py)

``sample.py --score exact`` / ``--classifier exact`` and ``evaluate.py --score exact --classifier
exact`` use the modules below in place of the run's networks (see ``score_model`` / ``classifier``).
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn as nn

from checkpoint import UserError
from diffusion import make_betas

SCORES = ("learned", "exact")


# ----------------------------------------------------------------------------------------------
# The training set of a run
# ----------------------------------------------------------------------------------------------


def training_set(cfg) -> tuple[torch.Tensor, torch.Tensor]:
    """(images [N, C, H, W] float64 in [-1, 1], labels [N]) the run's DDPM was trained on.

    Random flips (``flip``) are part of the training distribution, so flipped copies are added
    (with the circles' flipped label) and duplicates dropped; the circles bands are mirror images
    of each other, so for them N stays 300 (cpu preset)."""
    d = cfg["data"]
    if d.dataset != "circles":
        raise UserError(f"--score exact / --classifier exact need the training set in memory and are "
                        f"implemented for circles runs only; this run holds {d.dataset}: use the learned "
                        f"score and classifier")
    from toy_circles import CirclesData
    data = CirclesData(d.image_size, d.delta, flip=False, channels=d.channels)
    x, y = data.x.double(), data.y
    if d.flip:  # the horizontal flip maps x -> S-1-x and the circles label y -> 1 - y
        x, y = torch.cat([x, x.flip(-1)]), torch.cat([y, 1 - y])
        flat = torch.cat([x.flatten(1), y[:, None].double()], 1)
        flat = torch.unique(flat, dim=0)
        x, y = flat[:, :-1].view(-1, *x.shape[1:]), flat[:, -1].long()
    return x.contiguous(), y


def alphas_cumprod(dcfg) -> torch.Tensor:
    """abar_t of the run's full (not respaced) schedule, float64, indexed by original t."""
    return torch.from_numpy(np.cumprod(1.0 - make_betas(dcfg.noise_schedule, dcfg.timesteps)))


# ----------------------------------------------------------------------------------------------
# The Gaussian-mixture log-densities, in chunks
# ----------------------------------------------------------------------------------------------


def log_kernel(xf: torch.Tensor, data: torch.Tensor, sq_norm: torch.Tensor, sab: torch.Tensor,
               var: torch.Tensor) -> torch.Tensor:
    """-||x - sqrt(abar) x_i||^2 / (2 (1 - abar)) for a batch [B, D] against images [N, D] (float64).

    Expanded as ||x||^2 - 2 sqrt(abar) x.x_i + abar ||x_i||^2 so that it is one matmul; in float64
    the cancellation costs ~1e-13 on distances of order D, far below the 1 - abar >= 4e-5 scale."""
    d2 = (xf * xf).sum(1, keepdim=True) - 2 * sab * (xf @ data.T) + sab ** 2 * sq_norm[None]
    return -d2 / (2 * var)


# The training set is held in memory as float64: 2 GiB (65k circles at 64 px; the authors' 1200
# take 39 MB) is the most this module accepts, so a large request fails at once, not in swap.
MAX_BYTES = 2 * 1024 ** 3


class _Mixture(nn.Module):
    """Training images as float64 buffers plus the schedule: the shared part of score and classifier."""

    def __init__(self, data: torch.Tensor, abar, chunk_n: int = 1024, chunk_b: int = 256):
        super().__init__()
        if len(data) == 0:
            raise UserError("the exact score needs at least one training image; this class has none")
        need = data[0].numel() * len(data) * 8
        if need > MAX_BYTES:
            raise UserError(f"the exact score holds the training set in float64: {len(data)} images of "
                            f"{tuple(data.shape[1:])} need {need / 1024 ** 3:.1f} GiB, over the "
                            f"{MAX_BYTES / 1024 ** 3:.0f} GiB limit (exact_score.MAX_BYTES); use a smaller "
                            f"--image-size or the learned score")
        self.image_shape = tuple(data.shape[1:])
        flat = data.double().flatten(1)
        self.register_buffer("data", flat)
        self.register_buffer("sq_norm", (flat * flat).sum(1))
        self.register_buffer("abar", torch.as_tensor(abar, dtype=torch.float64))
        self.chunk_n, self.chunk_b = chunk_n, chunk_b

    def _schedule(self, t: torch.Tensor):
        """(sqrt(abar_t), 1 - abar_t) as [B, 1] float64 columns for timesteps t [B]."""
        ab = self.abar[t][:, None]
        return ab.sqrt(), 1.0 - ab

    def log_kernels(self, xf, sab, var, rows=None):
        """Per-chunk log-kernels of images ``rows`` (an index tensor; default all), lazily."""
        data, sq = (self.data, self.sq_norm) if rows is None else (self.data[rows], self.sq_norm[rows])
        for s in range(0, len(data), self.chunk_n):
            yield log_kernel(xf, data[s:s + self.chunk_n], sq[s:s + self.chunk_n], sab, var), \
                data[s:s + self.chunk_n]


# ----------------------------------------------------------------------------------------------
# The exact score eps*(x, t)
# ----------------------------------------------------------------------------------------------


class ExactEps(_Mixture):
    """eps*(x, t) of the training set, a drop-in for the run's denoising network.

    ``model(x, t)`` takes images [B, C, H, W] (any float dtype) and ORIGINAL timesteps t [B] (what
    GaussianDiffusion.model_t passes), and returns the run's parameterisation: eps*, or
    v* = sqrt(abar) eps* - sqrt(1 - abar) x^_0* for a v-prediction run (``prediction``), in x's
    dtype; diffusion.model_eps turns it back into eps*. ``eps`` / ``denoise`` give float64 values."""

    def __init__(self, data: torch.Tensor, abar, prediction: str = "eps", chunk_n: int = 1024,
                 chunk_b: int = 256):
        super().__init__(data, abar, chunk_n, chunk_b)
        if prediction not in ("eps", "v"):
            raise ValueError(f"unknown prediction {prediction!r}; use eps or v")
        self.prediction = prediction

    @torch.no_grad()
    def denoise(self, x: torch.Tensor, t) -> torch.Tensor:
        """x^_0* = E[x_0 | x_t] = sum_i w_i x_i (float64, x's shape)."""
        t = timesteps(t, len(x), self.abar.device)
        xf = x.double().reshape(len(x), -1)
        out = [self._denoise_flat(xf[s:s + self.chunk_b], t[s:s + self.chunk_b])
               for s in range(0, len(x), self.chunk_b)]
        return torch.cat(out).view(x.shape)

    def _denoise_flat(self, xf, t):
        sab, var = self._schedule(t)
        # Online softmax over chunks of the training set: running max m, normaliser s, sum acc.
        m = torch.full((len(xf), 1), -torch.inf, dtype=torch.float64, device=xf.device)
        s = torch.zeros_like(m)
        acc = torch.zeros_like(xf)
        for logk, data in self.log_kernels(xf, sab, var):
            m_new = torch.maximum(m, logk.amax(1, keepdim=True))
            w = torch.exp(logk - m_new)
            scale = torch.exp(m - m_new)
            s = s * scale + w.sum(1, keepdim=True)
            acc = acc * scale + w @ data
            m = m_new
        return acc / s

    @torch.no_grad()
    def eps(self, x: torch.Tensor, t) -> torch.Tensor:
        """eps* = (x - sqrt(abar) x^_0*) / sqrt(1 - abar), float64."""
        sab, var = self._schedule(timesteps(t, len(x), self.abar.device))
        shape = (-1,) + (1,) * (x.dim() - 1)
        return (x.double() - sab.view(shape) * self.denoise(x, t)) / var.sqrt().view(shape)

    def forward(self, x: torch.Tensor, t) -> torch.Tensor:
        return to_prediction(self.eps(x, t), x, self.abar, t, self.prediction).to(x.dtype)


def timesteps(t, n: int, device) -> torch.Tensor:
    """Original timesteps as a long tensor [n] on ``device`` (an int or a 1-element tensor is broadcast)."""
    t = torch.as_tensor(t, device=device).long().reshape(-1)
    return t.expand(n) if t.numel() == 1 else t


def to_prediction(eps: torch.Tensor, x: torch.Tensor, abar: torch.Tensor, t, prediction: str):
    """eps (float64) -> the network parameterisation ``prediction`` at (x, original t).

    v = sqrt(abar) eps - sqrt(1 - abar) x_0 with x_0 = (x - sqrt(1 - abar) eps) / sqrt(abar), i.e.
    v = (eps - sqrt(1 - abar) x) / sqrt(abar) (Salimans & Ho 2022); diffusion.model_eps inverts it."""
    if prediction == "eps":
        return eps
    ab = abar[timesteps(t, len(x), abar.device)].view(-1, *([1] * (x.dim() - 1)))
    return (eps - (1 - ab).sqrt() * x.double()) / ab.sqrt()


# ----------------------------------------------------------------------------------------------
# The exact noisy classifier p*(y | x_t)
# ----------------------------------------------------------------------------------------------


class ExactClassifier(_Mixture):
    """p*(y | x_t) of the training set with the NoisyClassifier interface.

    ``clf(x, t)`` returns logits [B, M] (float64) = logsumexp over the images of class m of
    -||x - sqrt(abar_t) x_i||^2 / (2 (1 - abar_t)); their softmax is p*(y | x_t) (the Gaussian
    normalisers are shared by all i and cancel). Differentiable in x (guidance.multi_guidance
    takes grad_x log p*(y | x_t) through the float64 graph). ``num_classes``, ``channels`` and
    ``image_size`` are those of a NoisyClassifier."""

    def __init__(self, data: torch.Tensor, labels: torch.Tensor, num_classes: int | None = None,
                 abar=None, chunk_n: int = 1024, chunk_b: int = 256):
        super().__init__(data, abar, chunk_n, chunk_b)
        labels = torch.as_tensor(labels).long()
        self.num_classes = int(num_classes or labels.max().item() + 1)
        self.register_buffer("labels", labels.to(self.data.device))
        self.channels, self.image_size = self.image_shape[0], self.image_shape[-1]

    def forward(self, x: torch.Tensor, t) -> torch.Tensor:
        t = timesteps(t, len(x), self.abar.device)
        flat = x.double().reshape(len(x), -1)
        out = []
        for s in range(0, len(x), self.chunk_b):
            xf = flat[s:s + self.chunk_b]
            sab, var = self._schedule(t[s:s + self.chunk_b])
            cols = []
            for m in range(self.num_classes):
                rows = (self.labels == m).nonzero()[:, 0]
                lse = torch.full((len(xf),), -torch.inf, dtype=torch.float64, device=x.device)
                for logk, _ in self.log_kernels(xf, sab, var, rows):
                    lse = torch.logaddexp(lse, torch.logsumexp(logk, 1))
                cols.append(lse)
            out.append(torch.stack(cols, 1))
        return torch.cat(out)


# ----------------------------------------------------------------------------------------------
# Wiring: what sample.py / evaluate.py call
# ----------------------------------------------------------------------------------------------


def _float64_device(device) -> torch.device:
    device = torch.device(device)
    if device.type == "mps":
        raise UserError("the exact score and classifier compute in float64, which MPS lacks; add --device cpu")
    return device


def check_score(score: str) -> None:
    if score not in SCORES:
        raise UserError(f"unknown --score {score!r}; use learned (the run's DDPM) or exact (the "
                        f"training set's closed-form eps*, exact_score.py)")


def score_model(cfg, device, classes=None) -> ExactEps:
    """The exact eps* of a run's training set (restricted to the labels in ``classes`` if given),
    in the run's output parameterisation, on ``device``."""
    x, y = training_set(cfg)
    if classes is not None:
        x = x[torch.isin(y, torch.as_tensor(list(classes)))]
    return ExactEps(x, alphas_cumprod(cfg["diffusion"]), cfg["diffusion"].prediction).to(_float64_device(device))


def classifier(cfg, device) -> ExactClassifier:
    """The exact noisy classifier p*(y | x_t) of a run's training set (circles: left = 0, right = 1)."""
    x, y = training_set(cfg)
    return ExactClassifier(x, y, 2, alphas_cumprod(cfg["diffusion"])).to(_float64_device(device))


# evaluate.py's rows beside uncond / multi / multi_sn: "exact_<m>" is <m> with the exact score
# eps* (§5.5 row (b) = exact_multi), "multi_exact" is multi-guidance with the exact classifier
# p*(y | x_t), and "exact_multi_exact" uses both (row (c)).
EXACT_PREFIX = "exact_"


def method_score(method: str) -> str:
    return "exact" if method.startswith(EXACT_PREFIX) else "learned"


def eval_methods(base: dict) -> dict:
    """{name: (guidance, classifier)} of the exact rows, built from evaluate.py's base methods."""
    rows = dict(base, multi_exact=("multi", "exact"))
    return {"multi_exact": ("multi", "exact"), **{EXACT_PREFIX + k: v for k, v in rows.items()}}


def expand_methods(methods: list, score: str = "learned", clf: str | None = None) -> list:
    """The default rows plus their exact-score versions (--score exact) and the exact classifier's
    rows (--classifier exact), learned rows first so that the table reads (a), (b), (c)."""
    out = list(methods)
    if clf == "exact" and "multi_exact" not in out:
        out.append("multi_exact")
    if score == "exact":
        out += [EXACT_PREFIX + m for m in list(out) if not m.startswith(EXACT_PREFIX)
                and EXACT_PREFIX + m not in out]
    return out

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

    python -m lab.exact_score --run runs/circles               # every row below that can be drawn
    python -m lab.exact_score --run runs/circles --rows multi,exact_multi,exact_multi_exact
    python -m lab.score_error --run runs/circles               # the learned score's error against eps*

The CLI measures the §5.5 experiment with evaluate.py's metrics, one row per (score, classifier):
``multi`` (learned / learned, row (a)), ``exact_multi`` (exact eps* / learned, row (b)),
``exact_multi_exact`` (exact / exact, row (c)), ``multi_exact`` (learned / exact p*), the unguided
``uncond`` / ``exact_uncond`` and the spectral-norm ``multi_sn`` / ``exact_multi_sn``. Samples are
cached as evaluate.py caches them (``<run>/eval_<row>.npz``, the learned rows shared with it);
``<out>`` (default ``<run>/exact_score``) gets exact_score.json ({row: evaluate.py's metrics plus
score and classifier}), grid_<row>.png, hist_z.png and heatmap_classifiers.png (learned and exact).
"""
from __future__ import annotations

import argparse
import json
import os
import time

import numpy as np
import torch
import torch.nn as nn

import config as C
from checkpoint import UserError, cli, ensure_writable_dir
from diffusion import make_betas


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
        raise UserError(f"the exact score and classifier need the training set in memory and are "
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
                            f"{MAX_BYTES / 1024 ** 3:.0f} GiB limit (lab.exact_score.MAX_BYTES); use a smaller "
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
# A run's exact score and classifier, and the §5.5 rows they give
# ----------------------------------------------------------------------------------------------


def _float64_device(device) -> torch.device:
    device = torch.device(device)
    if device.type == "mps":
        raise UserError("the exact score and classifier compute in float64, which MPS lacks; add --device cpu")
    return device


def score_model(cfg, device, classes=None) -> ExactEps:
    """The exact eps* of a run's training set (restricted to the labels in ``classes`` if given),
    in the run's output parameterisation, on ``device``: a drop-in for the run's DDPM
    (sample.setup's ``models``)."""
    x, y = training_set(cfg)
    if classes is not None:
        x = x[torch.isin(y, torch.as_tensor(list(classes)))]
    return ExactEps(x, alphas_cumprod(cfg["diffusion"]), cfg["diffusion"].prediction).to(_float64_device(device))


def classifier(cfg, device) -> ExactClassifier:
    """The exact noisy classifier p*(y | x_t) of a run's training set (circles: left = 0, right = 1),
    a drop-in for its guidance classifier (sample.setup's ``classifier``)."""
    x, y = training_set(cfg)
    return ExactClassifier(x, y, 2, alphas_cumprod(cfg["diffusion"])).to(_float64_device(device))


# name -> (score, guidance, classifier); "exact" is the closed form. The order is the table's:
# learned score first, so that it reads (a) multi, (b) exact_multi, (c) exact_multi_exact.
ROWS = {"uncond": ("learned", "none", None), "multi": ("learned", "multi", "classifier"),
        "multi_sn": ("learned", "multi", "classifier_sn"), "multi_exact": ("learned", "multi", "exact"),
        "exact_uncond": ("exact", "none", None), "exact_multi": ("exact", "multi", "classifier"),
        "exact_multi_sn": ("exact", "multi", "classifier_sn"), "exact_multi_exact": ("exact", "multi", "exact")}
DEFAULTS = C.SampleConfig(n=512, lambdas="30,30")  # evaluate.py's: 512 samples a row, lambda = [30, 30]


def select_rows(run: str, rows=None, log=print) -> list:
    """The rows to draw, in ROWS order. Named ones must have their classifier checkpoint (else a
    one-line error); by default (None) every row whose checkpoints exist, the others noted."""
    from checkpoint import ckpt_path
    for r in rows or ():
        if r not in ROWS:
            raise UserError(f"unknown row {r!r}; choose from {', '.join(ROWS)}")
    chosen = [r for r in ROWS if rows is None or r in rows]
    missing = [r for r in chosen if ROWS[r][2] not in (None, "exact")
               and not os.path.exists(ckpt_path(run, ROWS[r][2]))]
    if missing and rows is not None:
        raise UserError(f"row(s) {', '.join(missing)} need a classifier checkpoint that {run} lacks; train "
                        f"it with python train.py --out {run} --model classifier")
    if missing:
        log(f"skipped {', '.join(missing)}: no classifier checkpoint in {run}")
    return [r for r in chosen if r not in missing]


def evaluate_rows(run, n=512, batch_size=C.SampleConfig.batch_size, seed=0, lambdas="30,30", steps=None,
                  rows=None, device=None, resample=False, figures=True, out=None, log=print,
                  sampler="ancestral", eta=0.0, guidance_at="xt") -> dict:
    """Sample (or read back) every row, measure it as evaluate.py does, write ``<out>``'s files."""
    from checkpoint import from_uint8, pick_device
    from evaluate import classifier_heatmaps, method_samples, metrics_of, summarize
    from figures import plot_heatmaps, plot_histograms
    from sample import load_ddpm, save_grid
    from toy_circles import training_edges
    device = device or pick_device()
    learned = load_ddpm(run, device)
    cfg = learned[1]
    if cfg["data"].dataset != "circles":
        raise UserError(f"lab.exact_score measures circles runs; {run} holds {cfg['data'].dataset}")
    rows = select_rows(run, rows, log)
    eps_star = score_model(cfg, device) if any(ROWS[r][0] == "exact" for r in rows) else None
    p_star = classifier(cfg, device) if any(ROWS[r][2] == "exact" for r in rows) else None
    out = out or os.path.join(run, "exact_score")
    ensure_writable_dir(out)
    stats, metrics = {}, {}
    for r in rows:
        score, guidance, clf = ROWS[r]
        key = ({"score": "exact"} if score == "exact" else {}) | ({"classifier": "exact"} if clf == "exact" else {})
        images, seconds, cached = method_samples(
            run, r, n, batch_size, seed, lambdas, steps, device, (eps_star, cfg) if score == "exact" else learned,
            resample, sampler, eta, guidance_at, spec=(guidance, p_star if clf == "exact" else clf), key=key)
        log(f"{r}: {len(images)} samples {'read from cache' if cached else f'in {seconds:.0f} s'}")
        stats[r] = summarize(images)
        metrics[r] = dict(metrics_of(stats[r]), sample_seconds=seconds, sampler=sampler, eta=eta,
                          guidance_at=guidance_at if clf else "xt", score=score, classifier=clf)
        if figures:
            save_grid(from_uint8(images[:64]), os.path.join(out, f"grid_{r}.png"), marks=True,
                      delta=cfg["data"].delta, edges=training_edges(cfg["data"].bands, cfg["data"].delta))
    if figures:
        plot_histograms(stats, os.path.join(out, "hist_z.png"), cfg["data"].delta)
        heats = classifier_heatmaps(run, cfg, device, [("exact", p_star or classifier(cfg, device))])
        plot_heatmaps(heats, os.path.join(out, "heatmap_classifiers.png"), cfg["data"].delta)
    with open(os.path.join(out, "exact_score.json"), "w") as f:
        json.dump(metrics, f, indent=2)
    return metrics


def build_parser():
    from sample import add_sample_args
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_sample_args(p, only=("run", "n", "batch_size", "seed", "steps", "device", "lambdas", "sampler", "eta",
                             "guidance_at"), defaults=DEFAULTS,
                    title="sampling (config.SampleConfig; --n per row, --lambdas of the guided rows)")
    g = p.add_argument_group("exact score")
    g.add_argument("--rows", default=None, help=f"comma-separated, from {','.join(ROWS)} (default: every row "
                                                "whose classifier checkpoint exists)")
    g.add_argument("--resample", action="store_true", help="ignore cached eval_*.npz samples")
    g.add_argument("--out", default=None, help="output folder (default: <run>/exact_score)")
    return p


def main(argv=None):
    from checkpoint import pick_device
    from evaluate import format_table
    from sample import check_sampler, sample_config
    a = build_parser().parse_args(argv)
    s, typed = sample_config(a, DEFAULTS)
    check_sampler(s.sampler, s.eta, s.guidance_at)
    if s.n < 1 or s.batch_size < 1:
        raise UserError("--n and --batch-size must be positive")
    rows = None if a.rows is None else [r.strip() for r in a.rows.split(",") if r.strip()]
    if rows is not None and set(rows) <= set(ROWS) and all(ROWS[r][1] == "none" for r in rows):
        given = [f for f in ("lambdas", "guidance_at") if f in typed]
        if given:
            raise UserError(f"--{given[0].replace('_', '-')} only applies to the guided rows "
                            f"({', '.join(r for r in ROWS if ROWS[r][1] != 'none')})")
    t0 = time.time()
    metrics = evaluate_rows(s.run, s.n, s.batch_size, s.seed, s.lambdas, s.steps or None, rows,
                            pick_device(s.device), a.resample, out=a.out, sampler=s.sampler, eta=s.eta,
                            guidance_at=s.guidance_at)
    print(format_table(metrics))
    print(f"evaluated in {time.time() - t0:.0f} s; wrote exact_score.json, grid_*.png, hist_z.png and "
          f"heatmap_classifiers.png in {a.out or os.path.join(s.run, 'exact_score')}")


if __name__ == "__main__":
    cli(main)

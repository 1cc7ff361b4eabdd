"""Linear score composition and when it is projective (Bradley et al. 2025), on the circles.

"Mechanisms of Projective Composition of Diffusion Models" (Bradley et al., 2025) studies the
linear combination of the scores of experts p_1..p_k around a background p_b,

    s(x, t) = s_b(x, t) + sum_i (s_i(x, t) - s_b(x, t)),      in eps space the same combination
    eps(x, t) = eps_b + sum_i (eps_i - eps_b)                  (eps = -sqrt(1 - abar_t) s).

It is *projective* when every expert is the background with a set M_i of coordinates replaced,
the sets disjoint:  p_i(x) = p_b(x restricted to M_i^c) * p~_i(x restricted to M_i), M_i pairwise
disjoint (``check_projective`` tests exactly this on empirical distributions). Then the combination
is the exact score, at every t, of the distribution that takes each M_i from its expert and the rest
from the background: the forward noise acts on every coordinate independently, so the noised
expert keeps the factorisation, its score equals s_b off M_i and the differences s_i - s_b live on
disjoint coordinates; summing them assembles the composite coordinate block by block. Sampling the
combined score then draws the composite exactly (tests/test_exact_score.py checks the score
against the closed form of the product on a toy).

On the circles (§5.5) the experts are the exact class-conditional scores (lab/exact_score.py): "a disc
on the left" and "a disc on the right". With the **empty canvas** (the all-black image, a single
point, so eps_b = (x - sqrt(abar) b) / sqrt(1 - abar) in closed form) as background, the left expert
differs from it only on the left band's pixels and the right expert only on the right band's:
projective, and the composite has one disc on each side - a length-generalisation (two discs),
never seen in training. With the **unconditional** training distribution as background the
experts differ from it on both bands (the background holds right discs that the left expert never
has): not projective. That combination is the "Bayes" composition p_L p_R / p_u proportional to
p_u p(L|x) p(R|x), i.e. exact multi-guidance with lambda = [1, 1] in score space, whose target has
almost no mass (no training image is both left and right).

    python -m lab.composition --run runs/circles --background empty --n 256    # two discs
    python -m lab.composition --run runs/circles --background uncond --n 256   # Bayes: not two discs
"""
from __future__ import annotations

import argparse
import os
import time

import numpy as np
import torch
import torch.nn as nn

from checkpoint import UserError, cli, ensure_writable_dir, to_uint8
from lab.exact_score import ExactEps, alphas_cumprod, timesteps, to_prediction, training_set

BACKGROUNDS = ("empty", "uncond")


class LinearComposition(nn.Module):
    """eps = eps_b + sum_i (eps_i - eps_b) of ExactEps experts, in the run's parameterisation."""

    def __init__(self, experts, background: ExactEps, prediction: str = "eps"):
        super().__init__()
        for i, e in enumerate(experts):
            if e.image_shape != background.image_shape:
                raise UserError(f"expert {i} holds images of shape {e.image_shape} but the background "
                                f"{background.image_shape}; compose experts of one image size (one run)")
        self.experts = nn.ModuleList(experts)
        self.background = background
        self.prediction = prediction

    def eps(self, x, t):
        eb = self.background.eps(x, t)
        return eb + sum(e.eps(x, t) - eb for e in self.experts)

    def forward(self, x, t):
        return to_prediction(self.eps(x, t), x, self.background.abar, timesteps(t, len(x), x.device),
                             self.prediction).to(x.dtype)


# ----------------------------------------------------------------------------------------------
# Is a composition projective?
# ----------------------------------------------------------------------------------------------


def _law(rows: torch.Tensor) -> dict:
    """Empirical law of the rows of a [N, k] tensor: {row as a tuple: frequency}."""
    if rows.shape[1] == 0:
        return {(): 1.0}
    u, c = torch.unique(rows, dim=0, return_counts=True)
    return {tuple(r.tolist()): n / len(rows) for r, n in zip(u, c.tolist())}


def _same_law(a: dict, b: dict, tol: float = 1e-9) -> bool:
    return a.keys() == b.keys() and all(abs(a[k] - b[k]) <= tol for k in a)


def check_projective(experts, background) -> dict:
    """Whether the empirical experts (each [N_i, ...]) are projective around the empirical background.

    M_i is taken as the coordinates where expert i's one-coordinate marginal differs from the
    background's (any valid M_i must contain them). Projective if, for every i,
      (1) the expert's law of x restricted to M_i^c is the background's (joint, not per coordinate),
      (2) the expert factorises: law(x) = law(x on M_i) x law(x on M_i^c),
    and (3) the M_i are pairwise disjoint. Returns {projective, masks [D] bool each, reason}; a False
    names the first condition that fails (with these minimal masks)."""
    bg = background.double().flatten(1)
    exps = [e.double().flatten(1) for e in experts]
    masks = []
    for e in exps:
        m = torch.tensor([not _same_law(_law(e[:, [d]]), _law(bg[:, [d]])) for d in range(bg.shape[1])])
        masks.append(m)
    for i, (e, m) in enumerate(zip(exps, masks)):
        if not _same_law(_law(e[:, ~m]), _law(bg[:, ~m])):
            return {"projective": False, "masks": masks,
                    "reason": f"expert {i} differs from the background jointly outside its {int(m.sum())} pixels"}
        joint, a, b = _law(e), _law(e[:, m]), _law(e[:, ~m])
        idx_m, idx_c = m.nonzero()[:, 0].tolist(), (~m).nonzero()[:, 0].tolist()
        product = {}
        for ka, pa in a.items():
            for kb, pb in b.items():
                row = [0.0] * len(m)
                for d, v in zip(idx_m, ka):
                    row[d] = v
                for d, v in zip(idx_c, kb):
                    row[d] = v
                product[tuple(row)] = pa * pb
        if not _same_law(joint, product):
            return {"projective": False, "masks": masks,
                    "reason": f"expert {i} does not factorise over its pixels and the rest"}
    for i in range(len(masks)):
        for j in range(i + 1, len(masks)):
            overlap = int((masks[i] & masks[j]).sum())
            if overlap:
                return {"projective": False, "masks": masks,
                        "reason": f"experts {i} and {j} both differ from the background on {overlap} pixels"}
    return {"projective": True, "masks": masks, "reason": "disjoint masks, background elsewhere"}


# ----------------------------------------------------------------------------------------------
# The circles composition
# ----------------------------------------------------------------------------------------------


def empty_canvas(cfg) -> torch.Tensor:
    """The all-black image [1, C, S, S] (-1 everywhere): a one-point background."""
    d = cfg["data"]
    return torch.full((1, d.channels, d.image_size, d.image_size), -1.0, dtype=torch.float64)


def composition_parts(cfg, background: str):
    """(experts [left images, right images], background images) of a circles run."""
    if background not in BACKGROUNDS:
        raise UserError(f"unknown --background {background!r}; use empty (the all-black canvas) or "
                        f"uncond (the whole training set)")
    x, y = training_set(cfg)
    experts = [x[y == 0], x[y == 1]]
    return experts, (empty_canvas(cfg) if background == "empty" else x)


def composition_model(cfg, background: str, device="cpu") -> LinearComposition:
    experts, bg = composition_parts(cfg, background)
    ab, pred = alphas_cumprod(cfg["diffusion"]), cfg["diffusion"].prediction
    return LinearComposition([ExactEps(e, ab) for e in experts], ExactEps(bg, ab), pred).to(device)


def two_disc_stats(images: np.ndarray) -> dict:
    """Fractions of images with exactly one disc in each half (left z < 0.5, right z >= 0.5, no
    blob), and with 0 / 1 / 2 / 3+ discs or a blob (detector.components)."""
    from detector import components
    size = images.shape[2]
    both, counts, blobs = 0, [], 0
    for im in images:
        c, _, b = components(im)
        z = c[:, 0] / (size - 1)
        if b:
            blobs += 1
            counts.append(-1)
            continue
        counts.append(len(c))
        both += int((z < 0.5).sum() == 1 and (z >= 0.5).sum() == 1)
    counts, n = np.array(counts), len(images)
    return {"n": n, "one_each_side": both / n, "zero_disc": float((counts == 0).mean()),
            "one_disc": float((counts == 1).mean()), "two_disc": float((counts == 2).mean()),
            "three_plus_disc": float((counts >= 3).mean()), "blob": blobs / n}


def build_parser():
    from sample import add_sample_args
    from config import SampleConfig
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_sample_args(p, only=("run", "n", "batch_size", "seed", "steps", "device"),
                    defaults=SampleConfig(n=256))
    g = p.add_argument_group("composition")
    g.add_argument("--background", default="empty", help="empty (all-black canvas: projective) | uncond "
                   "(the whole training set: Bayes composition)")
    g.add_argument("--out", default=None, help="grid PNG (default: <run>/composition_<background>.png)")
    return p


def main(argv=None):
    from checkpoint import pick_device
    from config import SampleConfig
    from sample import load_ddpm, prepare, sample_config, save_grid
    a = build_parser().parse_args(argv)
    s, _ = sample_config(a, SampleConfig(n=256))
    if s.n < 1 or s.batch_size < 1:
        raise UserError("--n and --batch-size must be positive")
    if a.background not in BACKGROUNDS:
        raise UserError(f"unknown --background {a.background!r}; use empty or uncond")
    device = pick_device(s.device)
    _, cfg = load_ddpm(s.run, device)  # the run's data and diffusion config
    model = composition_model(cfg, a.background, device)
    draw = prepare(s.run, device, s.steps or None, models=(model, cfg))
    out = a.out or os.path.join(s.run, f"composition_{a.background}.png")
    ensure_writable_dir(os.path.dirname(os.path.abspath(out)))
    t0 = time.time()
    x = draw(s.n, s.batch_size, s.seed, progress=True)
    st = two_disc_stats(to_uint8(x))
    save_grid(x[:64], out, marks=True, delta=cfg["data"].delta)
    print(f"background {a.background}: {s.n} samples in {time.time() - t0:.0f} s; one disc on each side "
          f"{st['one_each_side']:.1%}; discs 0: {st['zero_disc']:.1%}, 1: {st['one_disc']:.1%}, "
          f"2: {st['two_disc']:.1%}, 3+: {st['three_plus_disc']:.1%}, blob {st['blob']:.1%}; wrote {out}")
    return st


if __name__ == "__main__":
    cli(main)

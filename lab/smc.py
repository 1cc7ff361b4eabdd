"""Twisted SMC guided sampler: particles that target Eq. 2's product distribution (§2.2, §4.2, §7).

Plain guidance (§2.2) and multi-guidance (§4.2) shift every ancestral mean by sigma_t^2 g and hope
the samples follow p_Pi(x) ∝ p_theta(x) prod_m p(y_m | x)^lambda_m (Eq. 2). They do not in general:
a product of noisy classifiers is not the noised product, lambda != 1 over-sharpens, and a learned
classifier is not the exact p(y | x_t). Sequential Monte Carlo corrects for all three by weighting
and resampling a population of N particles per "system": the Twisted Diffusion Sampler (Wu et al.
2023) with the guided step as proposal; Skreta et al. (ICML 2025) give its continuous-time form.

On our respaced grid (index i = K-1 .. 0, original timestep t_i, reverse variance sigma_i^2):
  base      p_theta(x_{i-1} | x_i) = N(mu_i, sigma_i^2 I)                (diffusion.p_mean_variance)
  twist     p~_i(x) = prod_m p(y_m | x, t_i)^lambda_m                    (the guidance classifiers)
  proposal  q(x_{i-1} | x_i) = N(mu_i + sigma_i^2 g_i, sigma_i^2 I),  g_i = grad log p~_i(x_i)
  target    pi_i(x_{K-1:i}) ∝ N(x_{K-1}; 0, I) prod_{j > i} p_theta(x_{j-1} | x_j) p~_i(x_i)
Importance weights of pi_{i-1} against pi_i x q (TDS):
  log w_{K-1} = log p~_{K-1}(x_{K-1}),
  log w += log p_theta(x_{i-1}|x_i) - log q(x_{i-1}|x_i) + log p~_{i-1}(x_{i-1}) - log p~_i(x_i),
and with x_{i-1} = mu_i + sigma_i^2 g_i + sigma_i z the two Gaussians (same covariance) give
  log p_theta - log q = (||x - mu - sigma^2 g||^2 - ||x - mu||^2) / (2 sigma^2)
                      = -sigma g.z - sigma^2 ||g||^2 / 2                  (no cancellation in float32).
The twist values telescope, so a whole path weighs prod (p_theta / q) * p~_0(x_0): the particles
at index 0 target p_theta(x_0) prod_m p(y_m | x_0, t = 0)^lambda_m.
Final twist: p~_0 is the classifier at t = 0, i.e. on (almost) clean images: then the last target
is Eq. 2's p_Pi itself, with the DDPM's marginal as p(x), which is what guidance is meant to
sample. (A final twist of 1 would target the unguided DDPM.) The last ancestral step (index 0) adds
no noise: it maps x_0 deterministically to the output (its posterior mean plus sigma_0^2 g, as the
plain sampler does), after a final resampling, so it carries no weight of its own.

Link to the Feynman-Kac corrector (Skreta et al. 2025). Let sigma_i^2 = g(tau)^2 dtau, sigma z =
g dW (reverse time tau), u_m = grad log p(y_m | x_tau). For exact noisy classifiers p(y|x_tau) is a
martingale of the unguided reverse process, so Ito gives d log p(y_m|x) = -(g^2/2)||u_m||^2 dtau +
g u_m.dW; under the proposal dW = dW~ + g sum_m lambda_m u_m dtau, and the sum of the twist
increments with -sigma g.z - sigma^2||g||^2/2 (the Girsanov term) leaves
  d log w = (g^2/2) (||sum_m lambda_m u_m||^2 - sum_m lambda_m ||u_m||^2) dtau,
their product-of-experts corrector. It is 0 for one class with lambda = 1 (guidance with the exact
classifier is exact). Our discrete weights are exact for the discrete chain: they also absorb the
step size and a learned classifier that is not a martingale; the continuous one is not implemented.

Batching: ``systems`` x ``particles`` images, particle k of system s at row s * particles + k, all
evaluated in one batched model forward and one classifier forward/backward per step (the cost of
plain guidance). A system resamples (systematic) when its ESS = (sum w)^2 / sum w^2 falls below
``ess_threshold`` * particles, and every system resamples once at the end, so all returned
particles are equally weighted draws. Resampling makes duplicates: a system's N particles are
correlated, which ``survivors`` (distinct initial particles left) measures. Ancestral sampling with
guidance at x_t only: DDIM has no Gaussian proposal of this form at eta = 0, and guidance at mu
is not the gradient of the twist at x_t.

    python -m lab.smc --run runs/circles --guidance multi --particles 8 --n 64
    python -m lab.smc --run runs/circles --guidance single --target 1 --particles 8

--n samples = n / N systems of N particles (the last one holds the remainder), all returned.
Single guidance: one target per system (alternating over systems when --target is -1). Writes
``<out>/samples_<guidance>_<classifier>_smc<N>.npz`` (sample.py's fields plus particles, ess and
the resampling summary smc_info, merge_info's) and its PNG grid; --out defaults to the run.
"""
from __future__ import annotations

import argparse
import json
import math
import time

import torch

import config as C
from checkpoint import UserError, cli


def ess(logw: torch.Tensor) -> torch.Tensor:
    """Effective sample size (sum w)^2 / sum w^2 of each row of log-weights [S, N], computed in
    log space: exp(2 logsumexp(log w) - logsumexp(2 log w))."""
    return torch.exp(2 * torch.logsumexp(logw, -1) - torch.logsumexp(2 * logw, -1))


def systematic_resample(weights: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Systematic resampling (Kitagawa 1996) of each row of ``weights`` [S, N] (>= 0, any scale)
    with one uniform u[s] in [0, 1) per row: the N points (u + k) / N, k = 0..N-1, fall into the
    cumulative normalised weights; particle j is copied once per point in [c_{j-1}, c_j), i.e.
    floor(N w_j) or ceil(N w_j) times. Returns the ancestor indices [S, N], in increasing order."""
    w = weights.double()
    c = w.cumsum(-1)
    c = c / c[:, -1:]
    n = w.shape[-1]
    points = (u.double().view(-1, 1) + torch.arange(n, dtype=torch.float64)) / n
    # right=True: a point exactly on c_{j-1} belongs to particle j (the half-open [c_{j-1}, c_j)).
    return torch.searchsorted(c, points, right=True).clamp(max=n - 1)


def smc_step(diffusion, model, twist, x, i: int, logv, g, clip_denoised=True, generator=None):
    """One proposal step x_i -> x_{i-1} (i >= 1) and its log-weight increment per row.

    ``logv``, ``g``: log p~_i(x_i) and its gradient (from the previous step). Returns (x_{i-1},
    log p~_{i-1}(x_{i-1}), its gradient, log p_theta - log q + log p~_{i-1} - log p~_i)."""
    t = torch.full((x.shape[0],), i, device=x.device, dtype=torch.long)
    mean, var, _ = diffusion.p_mean_variance(model, x, t, clip_denoised)
    sigma = var.sqrt()
    z = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
    x_new = mean + var * g + sigma * z                        # the guided step: proposal q
    sg = (sigma * g).flatten(1)
    log_p_over_q = -(sg * z.flatten(1)).sum(1) - 0.5 * (sg ** 2).sum(1)
    logv_new, g_new = twist(x_new, diffusion.model_t(t - 1))  # p~_{i-1}, at x_{i-1}'s timestep
    return x_new, logv_new, g_new, log_p_over_q + logv_new - logv


def check_smc(particles: int, ess_threshold: float, guidance: str) -> None:
    """One-line errors for the SMC knobs."""
    if particles < 1:
        raise UserError(f"--particles {particles}: use 1 or more particles per system "
                        "(1 is plain guidance: sample.py draws the same)")
    if guidance not in ("single", "multi"):
        raise UserError(f"SMC weights particles by the guidance classifiers, which --guidance {guidance} "
                        "does not use; use --guidance multi (or single)")
    if not 0.0 <= ess_threshold <= 1.0:
        raise UserError(f"--ess {ess_threshold} is outside [0, 1]; a system resamples when its "
                        "ESS < ess * particles (0: only at the end, 1: every step)")


@torch.no_grad()
def smc_sample(diffusion, model, twist, systems: int, particles: int, shape, clip_denoised=True,
               generator=None, resample_generator=None, device="cpu", ess_threshold=0.5,
               progress=False):
    """Draw ``systems`` x ``particles`` images (rows grouped by system) with twisted SMC.

    ``twist(x, model_t)`` -> (log p~(x) per row [B], grad_x log p~ [B, ...]) from one classifier
    forward/backward (guidance.multi_guidance(...).value_and_grad). ``generator`` draws the
    Gaussian noise in the order the plain ancestral sampler does (one draw per step, the last one
    unused), so one particle, or lambda = 0, reproduces diffusion.sample draw for draw;
    ``resample_generator`` (CPU) draws the resampling uniforms. Returns (images, info) with info:
    resampled (system-steps that resampled, the final resampling not counted), system_steps,
    ess_trace (mean ESS / N after each step), final_ess (mean ESS / N before the final
    resampling), survivors (mean distinct initial particles per system at the end)."""
    S, N = systems, particles
    B = S * N
    x = torch.randn((B, *shape), generator=generator, device=device)
    if x.device.type == "cpu" and x.dim() == 4:
        x = x.contiguous(memory_format=torch.channels_last)  # as diffusion.denoise: oneDNN's layout
    K = diffusion.T
    t = torch.full((B,), K - 1, device=device, dtype=torch.long)
    logv, g = twist(x, diffusion.model_t(t))
    # Weights live on the CPU in float64: products of ~K Gaussian ratios, and MPS has no float64.
    logw = logv.view(S, N).double().cpu()
    lineage = torch.arange(N).repeat(S, 1)  # initial particle each particle descends from
    info = {"systems": S, "particles": N, "resampled": 0, "system_steps": S * (K - 1), "ess_trace": []}

    def resample(rows: torch.Tensor):
        nonlocal x, logv, g, logw, lineage
        u = torch.rand(S, generator=resample_generator, dtype=torch.float64)
        idx = systematic_resample(torch.softmax(logw, -1), u)
        idx = torch.where(rows.view(-1, 1), idx, torch.arange(N))          # others keep theirs
        lineage = lineage.gather(1, idx)
        flat_idx = (idx + N * torch.arange(S).view(-1, 1)).flatten().to(x.device)
        x, logv, g = x[flat_idx], logv[flat_idx], g[flat_idx]
        if x.device.type == "cpu" and x.dim() == 4:
            x = x.contiguous(memory_format=torch.channels_last)
        logw = torch.where(rows.view(-1, 1), torch.zeros_like(logw), logw)  # equal weights again

    steps = range(K - 1, 0, -1)
    bar = None
    if progress:
        from tqdm import tqdm
        steps = bar = tqdm(steps, desc=f"SMC ({S} x {N})", leave=False)
    for i in steps:
        x, logv, g, inc = smc_step(diffusion, model, twist, x, i, logv, g, clip_denoised, generator)
        logw = logw + inc.view(S, N).double().cpu()
        e = ess(logw)
        info["ess_trace"].append(float(e.mean()) / N)
        low = e < ess_threshold * N
        if low.any():
            info["resampled"] += int(low.sum())
            resample(low)
        if bar is not None:
            bar.set_postfix(ess=f"{info['ess_trace'][-1]:.2f}", resampled=info["resampled"])
    info["final_ess"] = float(ess(logw).mean()) / N
    resample(torch.ones(S, dtype=torch.bool))  # equally weighted draws from each system
    info["survivors"] = float(sum(len(set(r.tolist())) for r in lineage)) / S
    # Index 0: deterministic (no noise at t = 0), the plain sampler's last step. Its noise is
    # drawn and unused, as diffusion.p_sample does, so later batches see the same stream.
    t = torch.zeros(B, device=device, dtype=torch.long)
    mean, var, _ = diffusion.p_mean_variance(model, x, t, clip_denoised)
    torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
    return mean + var * g, info


def merge_info(infos: list[dict]) -> dict:
    """One summary over several smc_sample calls (batches of systems), weighted by systems."""
    if not infos:
        return {}
    systems = sum(i["systems"] for i in infos)
    avg = lambda k: sum(i[k] * i["systems"] for i in infos) / systems  # noqa: E731
    return {"systems": systems, "particles": max(i["particles"] for i in infos),
            "resampled": sum(i["resampled"] for i in infos),
            "system_steps": sum(i["system_steps"] for i in infos),
            "final_ess": avg("final_ess"), "survivors": avg("survivors"),
            "min_ess": min(min(i["ess_trace"], default=math.nan) for i in infos)}


# ----------------------------------------------------------------------------------------------
# A run's networks (sample.setup) sampled with SMC, and the CLI
# ----------------------------------------------------------------------------------------------


def prepare(run: str, device=None, steps: int | None = None, guidance: str = "multi",
            lambdas: str | None = None, scale: float = 30.0, target: int | None = None,
            classifier="classifier", models=None, particles: int = 8, ess_threshold: float = 0.5):
    """sample.prepare's ``draw(n, batch_size, seed=0, progress=False)`` with twisted SMC: n samples
    = ceil(n / particles) systems, all particles returned, as many whole systems per batch as
    ``batch_size`` holds (at least one). ``draw.smc_info`` holds the last call's resampling
    summary (merge_info). The arguments are sample.setup's (ancestral steps, guidance at x_t)."""
    from guidance import single_guidance
    from sample import setup
    check_smc(particles, ess_threshold, guidance)
    p = setup(run, device, steps, guidance, lambdas, scale, target, classifier, models)
    N = particles

    def draw(n: int, batch_size: int = C.SampleConfig.batch_size, seed: int = 0, progress: bool = False):
        gen = torch.Generator(device=p.device).manual_seed(seed)
        resample_gen = torch.Generator().manual_seed(seed)
        sizes = [N] * (n // N) + ([n % N] if n % N else [])
        per_batch = max(1, batch_size // N)
        out, infos, done = [], [], 0
        while done < len(sizes):
            k = sizes[done]
            s = min(per_batch, sum(1 for m in sizes[done:] if m == k))   # systems of equal size
            if guidance == "single":
                y = (torch.full((s,), target) if target is not None
                     else torch.arange(done, done + s) % p.clf.num_classes).repeat_interleave(k)
                twist = single_guidance(p.clf, y.to(p.device), scale).value_and_grad
            else:
                twist = p.guide.value_and_grad
            x, info = smc_sample(p.diffusion, p.model, twist, s, k, p.shape, p.dcfg.clip_denoised, gen,
                                 resample_gen, p.device, ess_threshold, progress)
            out.append(x.cpu())
            infos.append(info)
            done += s
        draw.smc_info = merge_info(infos)
        return torch.cat(out)

    draw.smc_info = {}
    return draw


DEFAULTS = C.SampleConfig(guidance="multi")


def build_parser():
    from sample import add_output_args, add_sample_args
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    g = p.add_argument_group("twisted SMC")
    g.add_argument("--guidance", default=None, help="single (§2.2) | multi (§4.2, Eq. 2; default)")
    g.add_argument("--particles", type=int, default=8, help="particles per system (default 8)")
    g.add_argument("--ess", type=float, default=0.5,
                   help="a system resamples (systematic) when its ESS < ess * particles (default 0.5)")
    add_sample_args(p, only=("run", "n", "batch_size", "seed", "steps", "device", "lambdas", "scale", "target",
                             "classifier"), defaults=DEFAULTS)
    add_output_args(p)
    return p


def main(argv=None):
    from checkpoint import pick_device
    from sample import check_guidance_flags, default_tag, load_ddpm, output_paths, sample_config, \
        sample_settings, save_samples
    a = build_parser().parse_args(argv)
    s, typed = sample_config(a, DEFAULTS)
    check_smc(a.particles, a.ess, s.guidance)  # before anything slow
    check_guidance_flags(s.guidance, typed)
    if s.n < 1 or s.batch_size < 1:
        raise UserError("--n and --batch-size must be positive")
    device = pick_device(s.device)
    models = load_ddpm(s.run, device)  # first, so a missing run is reported before --out is created
    draw = prepare(s.run, device, s.steps or None, s.guidance, s.lambdas, s.scale,
                   None if s.target == -1 else s.target, s.classifier, models, a.particles, a.ess)
    npz, png = output_paths(a.out or s.run, a.tag or f"{default_tag(s)}_smc{a.particles}", a.overwrite)
    t0 = time.time()
    x = draw(s.n, s.batch_size, s.seed, progress=True)
    dt = time.time() - t0
    i = draw.smc_info
    save_samples(npz, png, x, models[1]["data"], **sample_settings(s), smc_particles=a.particles, smc_ess=a.ess,
                 smc_info=json.dumps(i))
    print(f"SMC: {i['systems']} systems x {a.particles} particles; resampled {i['resampled']} of "
          f"{i['system_steps']} system-steps (ESS < {a.ess:g} N), lowest mean ESS {i['min_ess']:.2f} N, "
          f"final ESS {i['final_ess']:.2f} N, {i['survivors']:.1f} distinct initial particles per system")
    print(f"{s.n} samples in {dt:.1f} s ({dt / s.n:.3f} s/image); wrote {npz} and {png}")


if __name__ == "__main__":
    cli(main)

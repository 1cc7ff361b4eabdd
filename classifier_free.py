"""Classifier-free multi-guidance (paper App. J, Eq. 12; Ho & Salimans 2022).

A class-conditional denoiser eps(x_t, t, y) trained with label dropout (``drop_labels``: each label
becomes the null label with probability p, so one network also learns the unconditional
eps(x_t, t, null)) is sampled with multi-guidance over all M classes, without a classifier:

    affine (default):  eps~ = -lambda eps(x_t, null) + (1 + lambda) mean_m eps(x_t, m)
    printed (Eq. 12):  eps~ = -lambda eps(x_t, null) + (1 - lambda) mean_m eps(x_t, m)

Why the affine form is the default: its weights sum to 1, as in Ho & Salimans' (1 + w) eps_c -
w eps_null. Where the conditional and unconditional predictions agree, eps~ is that prediction:
guidance only adds the difference. Rewritten around the null prediction,
    eps~ = eps(null) + sum_m ((1 + lambda) / M) [eps(m) - eps(null)],
and in scores (s = -eps / sqrt(1 - abar), s(m) - s(null) = grad log p(m | x_t) by Bayes) it is
multi-guidance (Eq. 2) with the classifier implied by the denoiser at (1 + lambda) / M per class, not
lambda / M: on two classes --scale 59 here is the counterpart of the classifier's --lambdas 30,30,
and --scale 30 guides each class about half as strongly. The printed weights sum to 1 - 2 lambda:
even where every prediction agrees on eps, the result is (1 - 2 lambda) eps (-59 eps at lambda = 30),
a rescaled noise estimate rather than a guided one; we read it as a sign slip and offer it as
``--cfg-form printed`` to compare.

Unequal ``--lambdas`` generalise the mean to a weighted mean: lambda = mean_m lambda_m and class m
weighs lambda_m / sum_k lambda_k (entries must then be >= 0), which is again multi-guidance with
the implied classifier. Equal lambdas (``--scale``, any sign) weigh the
classes equally.

The combination is taken in eps space. A v-predicting network's output (the cpu preset,
diffusion.model_eps) is affine in x_t: v = (eps - sqrt(1 - abar) x_t) / sqrt(abar), so a combination
whose weights do not sum to 1 differs between v and eps space. Each output is turned into eps, the
eps are combined, and the result is handed back in the network's own parameterisation
(diffusion.eps_to_model), so the diffusion's samplers (ancestral, DDIM) call the wrapper like any
network. With a learned variance (2C output channels, models.output_channels) only the first C are
combined; the variance part is the conditional predictions' (weighted) average: the guided mean
follows the classes, and the variance of an extrapolated combination (weights -lambda, 1 + lambda)
could leave the [beta~_t, beta_t] range the network interpolates in.

Cost: the M + 1 predictions of a step come from one forward pass on the batch repeated M + 1 times.
"""
from __future__ import annotations

import torch

from checkpoint import UserError
from config import num_classes_of
from guidance import parse_lambdas
from unet import null_label

FORMS = ("affine", "printed")


def drop_labels(y: torch.Tensor, p: float, num_classes: int, generator: torch.Generator) -> torch.Tensor:
    """Training labels with each one replaced by the null label with probability p (one uniform
    draw per sample from the run's generator, so a run stays reproducible)."""
    drop = torch.rand(y.shape, generator=generator, device=y.device) < p
    return torch.where(drop, torch.full_like(y, null_label(num_classes)), y)


def check_label_dropout(class_cond: bool, p: float, typed: bool = False) -> None:
    """The label-dropout rate of a class-conditional run: in (0, 1], since p = 0 never trains the
    null label that unconditional and guided sampling ask for."""
    if not class_cond:
        if typed:
            raise UserError("--label-dropout only applies to a class-conditional DDPM; add --class-cond "
                            "or drop --label-dropout")
        return
    if not 0.0 < p <= 1.0:
        raise UserError(f"--label-dropout {p} is outside (0, 1]; the null label (unconditional and "
                        "--guidance cfg sampling) is only learnt with p > 0, e.g. 0.1")


def check_form(form: str) -> None:
    if form not in FORMS:
        raise UserError(f"unknown --cfg-form {form!r}; use affine (weights sum to 1, the default) or "
                        "printed (Eq. 12 of the paper as printed)")


def cfg_weights(lambdas: torch.Tensor, form: str = "affine"):
    """(lambda, class weights w [M] summing to 1, coefficient of the null, of the class average)."""
    check_form(form)
    lam = torch.as_tensor(lambdas, dtype=torch.float64).flatten()
    m = len(lam)
    if bool((lam == lam[0]).all()):
        w = torch.full((m,), 1.0 / m, dtype=torch.float64)
    elif bool((lam >= 0).all()):
        w = lam / lam.sum()
    else:
        raise UserError(f"--lambdas {','.join(f'{v:g}' for v in lam.tolist())}: unequal lambdas weigh the "
                        "classes of --guidance cfg, so they must be >= 0; give equal ones (or --scale) "
                        "for a negative lambda")
    mean = float(lam.mean())
    return mean, w, -mean, (1.0 + mean if form == "affine" else 1.0 - mean)


class ClassifierFreeGuided:
    """A "network" (x_t, t) -> output in ``net``'s parameterisation, the classifier-free multi-guided
    prediction. ``diffusion`` is the run's un-respaced diffusion: ``t`` here is already an original
    timestep (GaussianDiffusion.model_t), which indexes its tables."""

    def __init__(self, net, diffusion, lambdas, form: str = "affine", channels: int = 1):
        """``lambdas``: one per class of ``net`` (its labels 0..M-1, null_label(M) the null)."""
        self.net, self.diffusion, self.channels = net, diffusion, channels
        self.lam, w, self.c_null, self.c_cond = cfg_weights(lambdas, form)
        self.num_classes, self.weights = len(w), w.float()

    def __call__(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        b, m, c = x.shape[0], self.num_classes, self.channels
        # One forward for every label: [null] * B, [0] * B, ..., [M - 1] * B.
        y = torch.tensor([null_label(m)] + list(range(m)), device=x.device).repeat_interleave(b)
        xs, ts = torch.cat([x] * (m + 1)), t.repeat(m + 1)
        out = self.net(xs, ts, y)
        eps = self.diffusion.model_eps(out[:, :c], xs, ts).unflatten(0, (m + 1, b))
        w = self.weights.to(x.device, x.dtype).view(m, *([1] * x.dim()))
        avg = (w * eps[1:]).sum(0)
        guided = self.diffusion.eps_to_model(self.c_null * eps[0] + self.c_cond * avg, x, t)
        if out.shape[1] == c:
            return guided
        # Learned variance: the conditional average of the variance part (module docstring).
        var = (w * out[:, c:].unflatten(0, (m + 1, b))[1:]).sum(0)
        return torch.cat([guided, var], dim=1)


def describe(lambdas, form: str) -> dict:
    """What produced classifier-free guided samples (metrics.json): the form, lambda (Eq. 12), the
    class weights of the average and the coefficients of the null and of the class average."""
    lam, w, c_null, c_cond = cfg_weights(lambdas, form)
    return {"cfg_form": form, "cfg_lambda": lam, "cfg_class_weights": [round(v, 6) for v in w.tolist()],
            "cfg_null_weight": c_null, "cfg_average_weight": c_cond}


def record(lambdas: str, num_classes: int, form: str) -> dict:
    """``describe`` of the --lambdas text of a run with ``num_classes`` classes, the text beside it."""
    return {"lambdas": lambdas, **describe(parse_lambdas(lambdas, num_classes), form)}


def guided_model(net, cfg, lambdas: str | None = None, scale: float = 30.0, form: str = "affine",
                 device="cpu", run: str = "") -> ClassifierFreeGuided:
    """The classifier-free multi-guided wrapper of a run's DDPM (one-line errors for bad input)."""
    from diffusion import GaussianDiffusion
    check_form(form)
    require_class_cond(cfg["unet"].class_cond, run)
    k = num_classes_of(cfg["data"])
    lam = parse_lambdas(lambdas, k) if lambdas else torch.full((k,), float(scale))
    diffusion = GaussianDiffusion.from_config(cfg["diffusion"]).to(device)
    return ClassifierFreeGuided(net, diffusion, lam, form, cfg["data"].channels)


def require_class_cond(class_cond: bool, run: str = "", what: str = "--guidance cfg") -> None:
    """``what`` needs a DDPM trained with labels (config.UNetConfig.class_cond)."""
    if not class_cond:
        raise UserError(f"{what} needs a class-conditional DDPM but {run or 'this run'} was trained "
                        "without labels; train one with python train.py --class-cond --out DIR")


def check_cfg_flags(guidance: str, typed) -> None:
    """Sampling flags that --guidance cfg would ignore, or --cfg-form without it, are errors."""
    if guidance != "cfg":
        if "cfg_form" in typed:
            raise UserError("--cfg-form only applies to --guidance cfg; add it or drop --cfg-form")
        return
    given = [k for k in ("target", "classifier", "guidance_at") if k in typed]
    if given:
        many = len(given) > 1
        raise UserError(f"{' '.join('--' + k.replace('_', '-') for k in given)} do{'' if many else 'es'} "
                        "not apply to --guidance cfg (no classifier: the denoiser's own labels guide); "
                        f"drop {'them' if many else 'it'}")
    if "lambdas" in typed and "scale" in typed:
        raise UserError("give --lambdas (one per class) or --scale (the same for every class), not both")

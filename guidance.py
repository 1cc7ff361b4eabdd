"""Classifier guidance (§2.2) and multi-guidance (§4.2, Eq. 2).

Guided sampling shifts the mean of every reverse step (diffusion.GaussianDiffusion.p_sample):
    mu~ = mu_theta(x_t, t) + sigma_t^2 * g.
Multi-guidance (Eq. 2) sums the scores of *all* classes of K classifiers:
    g = grad_x  sum_k sum_m  lambda_km * log p_k(y_m | x_t, t).
With lambda = [30, 30] on left/right circles, the maximum of log p(left) + log p(right) lies where
the classifier is most unsure: between the two training modes - the unseen middle.
Single-class guidance towards class y with scale s is the special case lambda = s * onehot(y).

Cost: one forward and one backward per classifier for the whole batch, whatever the number of
classes, since the sum over classes is taken before autograd (App. C: "multi-guidance does not
introduce additional cost"). By default the gradient is taken at x_t, as in the authors' code (based
on guided-diffusion); ``--guidance-at mu`` takes it at the posterior mean mu_theta(x_t, t), as §2.2
writes it (GaussianDiffusion.guidance_point says which point and timestep). Either way the classifier
receives an original, un-respaced timestep, which GaussianDiffusion.p_sample passes in.
"""
from __future__ import annotations

from typing import Callable, Sequence

import torch
import torch.nn.functional as F

from checkpoint import UserError


def parse_lambdas(text: str, num_classes: int) -> torch.Tensor:
    """'30,30' -> tensor([30., 30.]); the length must match the classifier's classes."""
    try:
        vals = [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise UserError(f"--lambdas must be comma-separated numbers, got {text!r}") from None
    if len(vals) != num_classes:
        raise UserError(f"--lambdas has {len(vals)} value(s) but the classifier has {num_classes} "
                        f"classes; give one lambda per class, e.g. --lambdas "
                        f"{','.join(['30'] * num_classes)}")
    return torch.tensor(vals)


def multi_guidance(classifiers: Sequence[torch.nn.Module], lambdas) -> Callable:
    """Return g(x_t, t) = grad_x sum_k sum_m lambda_km log p_k(y_m | x_t, t)  (Eq. 2).

    ``lambdas``: one entry per classifier, each of shape [M] (same for every sample) or [B, M]
    (per-sample weights, e.g. single-class guidance towards a different class per sample).
    ``g.value_and_grad(x, t)`` returns (the weighted log-probability per sample [B], g) from the
    same forward/backward pass: the log twist that lab/smc.py weights particles with.
    """
    lambdas = [torch.as_tensor(l, dtype=torch.float32) for l in lambdas]
    if len(lambdas) != len(classifiers):
        raise UserError(f"got {len(lambdas)} lambda lists for {len(classifiers)} classifiers")
    for clf, lam in zip(classifiers, lambdas):
        if lam.shape[-1] != clf.num_classes:
            raise UserError(f"lambda list has {lam.shape[-1]} entries but the classifier has "
                            f"{clf.num_classes} classes; give one lambda per class")

    def value_and_grad(x: torch.Tensor, t: torch.Tensor):
        with torch.enable_grad():
            x = x.detach().requires_grad_(True)
            value = x.new_zeros(x.shape[0])
            for clf, lam in zip(classifiers, lambdas):
                logp = F.log_softmax(clf(x, t), dim=-1)                    # [B, M]
                value = value + (logp * lam.to(x.device, x.dtype)).sum(-1)
            # Samples never interact (no BatchNorm), so the gradient of the batch sum is the
            # per-sample gradient.
            return value.detach(), torch.autograd.grad(value.sum(), x)[0]

    def grad(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return value_and_grad(x, t)[1]

    grad.value_and_grad = value_and_grad
    return grad


def single_guidance(classifier: torch.nn.Module, y: torch.Tensor, scale: float) -> Callable:
    """Classic classifier guidance towards class y[i] for sample i: lambda = scale * onehot(y)."""
    lam = scale * F.one_hot(y.long(), classifier.num_classes).float()
    return multi_guidance([classifier], [lam])

"""Which denoising network a run uses: one ``build_model(cfg)`` for train, sample, evaluate, bench.

The paper's claim (App. J) is that interpolation does not hinge on the backbone, so the backbone is
a config choice (``--arch``), decided here and nowhere else. The output width follows the diffusion
config: with a learned reverse variance (App. A, Eq. 8) the network returns 2C channels, the mean
parameterisation followed by the variance interpolation weight v. With ``class_cond`` (App. J,
classifier-free guidance) the network also takes a label y, one per class of the run's data
(config.num_classes_of) plus the null label (unet.null_label).
"""
from __future__ import annotations

import torch.nn as nn

from config import num_classes_of
from unet import UNet

ARCHS = ("unet",)


def output_channels(cfg) -> int:
    """C for a fixed variance; 2C when the network also predicts Sigma (diffusion.py)."""
    c = cfg["data"].channels
    return 2 * c if cfg["diffusion"].variance == "learned" else c


def label_classes(cfg) -> int:
    """Classes the denoiser is conditioned on: 0 (unconditional, also every run saved before
    class_cond existed) or the run's label count."""
    return num_classes_of(cfg["data"]) if cfg["unet"].class_cond else 0


def build_model(cfg) -> nn.Module:
    """The (untrained) denoising network of a run's config (config.make_config / from_dict)."""
    arch = cfg["unet"].arch
    if arch not in ARCHS:
        raise ValueError(f"unknown --arch {arch!r}; use one of {', '.join(ARCHS)}")
    return UNet.from_config(cfg["data"], cfg["unet"], out_channels=output_channels(cfg),
                            num_classes=label_classes(cfg))

"""Which denoising network a run uses: one ``build_model(cfg)`` for train, sample, evaluate, bench.

The paper's claim (App. J) is that interpolation does not hinge on the backbone, so the backbone is
a config choice (``--arch``), decided here and nowhere else. The output width follows the diffusion
config: with a learned reverse variance (App. A, Eq. 8) the network returns 2C channels, the mean
parameterisation followed by the variance interpolation weight v.

Backbones: ``unet`` (unet.py, the paper's main network) and ``dit`` (dit.py, the diffusion
transformer of App. J). Both take (x_t, t) and return [B, out_channels, H, W]; the config group
"unet" holds the knobs of both (``ARCH_KNOBS``: which fields belong to which).
With ``class_cond`` (App. J, classifier-free guidance) either backbone also takes a label y, one per
class of the run's data (config.num_classes_of) plus the null label (unet.null_label).
"""
from __future__ import annotations

import torch.nn as nn

from config import num_classes_of
from dit import DiT
from unet import UNet

ARCHS = ("unet", "dit")
# The config fields only one backbone reads (dropout is shared): a typed flag of the other
# backbone would be silently ignored, so train.py refuses it (check_arch_flags).
ARCH_KNOBS = {"unet": ("model_channels", "channel_mult", "num_res_blocks", "attention_resolutions",
                       "num_head_channels"),
              "dit": ("patch_size", "dit_width", "dit_depth", "dit_heads")}


def output_channels(cfg) -> int:
    """C for a fixed variance; 2C when the network also predicts Sigma (diffusion.py)."""
    c = cfg["data"].channels
    return 2 * c if cfg["diffusion"].variance == "learned" else c


def label_classes(cfg) -> int:
    """Classes the denoiser is conditioned on: 0 (unconditional) or the run's label count."""
    return num_classes_of(cfg["data"]) if cfg["unet"].class_cond else 0


def build_model(cfg) -> nn.Module:
    """The (untrained) denoising network of a run's config (config.make_config / from_dict)."""
    arch = cfg["unet"].arch
    if arch not in ARCHS:
        raise ValueError(f"unknown --arch {arch!r}; use one of {', '.join(ARCHS)}")
    net = DiT if arch == "dit" else UNet
    return net.from_config(cfg["data"], cfg["unet"], out_channels=output_channels(cfg),
                           num_classes=label_classes(cfg))


def check_arch_flags(arch: str, typed) -> None:
    """ValueError if ``typed`` (the config fields a user set) names a knob of another backbone."""
    if arch not in ARCHS:
        raise ValueError(f"unknown --arch {arch!r}; use one of {', '.join(ARCHS)}")
    for other, knobs in ARCH_KNOBS.items():
        foreign = ["--" + k.replace("_", "-") for k in knobs if k in typed]
        if other != arch and foreign:
            one = len(foreign) == 1
            raise ValueError(f"{' '.join(foreign)} {'is a' if one else 'are'} {other} option{'' if one else 's'} "
                             f"but --arch is {arch}; drop {'it' if one else 'them'} or use --arch {other}")

"""The noise-aware guidance classifier p(y | x_t, t): paper §4.2 and the §5.5 spectral-norm ablation.

Architecture: the encoder half of unet.UNet (same timestep-conditioned residual blocks,
downsampling and attention), a middle block, and an attention-pooling head that reads out
class logits (as in Dhariwal & Nichol's classifier). It is trained with cross-entropy on
q_sample(x_0, t) with t uniform over all T steps, so that it is meaningful at every noise level
met during sampling (train.py; learning rate warmed up then cosine-decayed: with a constant rate,
which snapshot training stops at decided whether 1 % or 20 % of guided samples faded). No BatchNorm: guided samples must not interact through batch statistics.

Spectral normalisation (Miyato et al., 2018; Fig. 7b): every conv and linear weight W is replaced
by  c * W / sigma(W),  sigma(W) the largest singular value of W reshaped to (out, in*k*k), estimated
by power iteration, and c = ``sn_scale`` a fixed Lipschitz scale. With c = 1 each layer is
1-Lipschitz, which makes a small network too weak to separate the classes at high noise; a
constant c > 1 keeps the bound explicit while leaving enough capacity. Biases are left free
(they do not change a layer's Lipschitz constant). GroupNorm is not bounded by this, so the whole
network is smoother, not certifiably Lipschitz.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.utils import parametrize
from torch.nn.utils.parametrizations import spectral_norm

from config import ClassifierConfig, DataConfig
from unet import AttentionBlock, ResBlock, Sequence, TimeEmbedding, build_encoder, norm


class AttentionPool(nn.Module):
    """Pool a feature map into one vector: the mean token attends over all positions."""

    def __init__(self, res: int, ch: int, out: int, head_channels: int = 32):
        super().__init__()
        self.pos = nn.Parameter(torch.randn(ch, res * res + 1) / ch ** 0.5)
        self.heads = max(1, ch // head_channels)
        self.qkv = nn.Conv1d(ch, 3 * ch, 1)
        self.out = nn.Conv1d(ch, out, 1)

    def forward(self, x):
        b, c = x.shape[:2]
        x = x.reshape(b, c, -1)
        x = torch.cat([x.mean(-1, keepdim=True), x], dim=-1) + self.pos
        q, k, v = self.qkv(x).reshape(b, 3, self.heads, c // self.heads, -1).transpose(-1, -2).unbind(1)
        q = q[:, :, :1]                                         # only the pooled token queries
        h = F.scaled_dot_product_attention(q, k, v)             # B, heads, 1, d
        return self.out(h.transpose(-1, -2).reshape(b, c, 1))[:, :, 0]


class NoisyClassifier(nn.Module):
    # Defaults are config.py's (the cpu preset): one place for every default.
    def __init__(self, image_size=DataConfig.image_size, channels=DataConfig.channels, num_classes=2,
                 clf_channels=ClassifierConfig.clf_channels,
                 clf_channel_mult=ClassifierConfig.clf_channel_mult,
                 clf_res_blocks=ClassifierConfig.clf_res_blocks,
                 clf_attention_resolutions=ClassifierConfig.clf_attention_resolutions,
                 head_channels=32, spectral_norm_scale: float | None = None,
                 antialias: bool = ClassifierConfig.clf_antialias):
        super().__init__()
        # The UNet's own check used to cover this; a DiT DDPM (patch size only) does not.
        if image_size % 2 ** (len(clf_channel_mult) - 1):
            raise ValueError(f"image size {image_size} is not divisible by 2^{len(clf_channel_mult) - 1} "
                             f"(clf_channel_mult {clf_channel_mult}) for the classifier; change "
                             f"--image-size or --clf-channel-mult")
        self.image_size, self.channels, self.num_classes = image_size, channels, num_classes
        ch = clf_channels
        self.time_embed = TimeEmbedding(ch)
        self.down, _, cur, res = build_encoder(channels, ch, clf_channel_mult, clf_res_blocks,
                                               clf_attention_resolutions, head_channels, 0.0,
                                               image_size, antialias)
        self.middle = Sequence([ResBlock(cur, cur, 4 * ch), AttentionBlock(cur, head_channels),
                                ResBlock(cur, cur, 4 * ch)])
        self.head = nn.Sequential(norm(cur), nn.SiLU(), AttentionPool(res, cur, num_classes, head_channels))
        self.spectral_norm_scale = spectral_norm_scale
        if spectral_norm_scale is not None:
            apply_spectral_norm(self, spectral_norm_scale)

    @classmethod
    def from_config(cls, data_cfg, clf_cfg, num_classes=2, spectral=False):
        return cls(image_size=data_cfg.image_size, channels=data_cfg.channels,
                   num_classes=num_classes, clf_channels=clf_cfg.clf_channels,
                   clf_channel_mult=clf_cfg.clf_channel_mult, clf_res_blocks=clf_cfg.clf_res_blocks,
                   clf_attention_resolutions=clf_cfg.clf_attention_resolutions,
                   spectral_norm_scale=clf_cfg.sn_scale if spectral else None,
                   antialias=clf_cfg.clf_antialias)

    def forward(self, x, t):
        emb = self.time_embed(t)
        for block in self.down:
            x = block(x, emb)
        return self.head(self.middle(x, emb))


class _Scale(nn.Module):
    def __init__(self, c: float):
        super().__init__()
        self.c = c

    def forward(self, w):
        return self.c * w


def apply_spectral_norm(model: nn.Module, scale: float, n_power_iterations: int = 1) -> None:
    """W -> scale * W / sigma(W) on every Conv1d/Conv2d/Linear weight of ``model``."""
    for m in model.modules():
        if isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Linear)):
            if not m.weight.detach().any():
                m.reset_parameters()  # zero-initialised layers have sigma = 0: W / sigma undefined
            spectral_norm(m, n_power_iterations=n_power_iterations)
            parametrize.register_parametrization(m, "weight", _Scale(scale))


def spectral_layers(model: nn.Module):
    """(name, effective weight) of every spectrally normalised layer, for tests and reports."""
    return [(n, m.weight) for n, m in model.named_modules()
            if parametrize.is_parametrized(m, "weight")]

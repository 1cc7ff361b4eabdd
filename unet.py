"""The eps-network: the UNet of Nichol & Dhariwal (2021) used by the paper (§5, App. C).

Building blocks (shared with classifier.py, which is the encoder half of this network):
  * sinusoidal timestep embedding -> 2-layer MLP;
  * optionally a class-label embedding added to it (classifier-free guidance, App. J), whose last
    row is the null label (``null_label``: the one convention training and sampling share);
  * residual blocks whose second GroupNorm is modulated by the timestep ("scale-shift norm":
    h = norm(h) * (1 + scale) + shift), with the last conv zero-initialised so every block starts
    as the identity;
  * multi-head self-attention at chosen resolutions;
  * strided-conv downsampling, nearest + conv upsampling, channel multipliers per resolution.
There is no BatchNorm anywhere: samples in a batch must never interact (guidance depends on it).
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from config import DataConfig, UNetConfig


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Transformer-style sinusoidal embedding of integer timesteps: [cos(t w_i), sin(t w_i)]."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=t.device) / half)
    args = t.float()[:, None] * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    return F.pad(emb, (0, dim % 2))


def norm(ch: int) -> nn.GroupNorm:
    # 32 groups as in the reference UNet, fewer when the width is small.
    return nn.GroupNorm(math.gcd(32, ch), ch)


def zero(module: nn.Module) -> nn.Module:
    for p in module.parameters():
        nn.init.zeros_(p)
    return module


class ResBlock(nn.Module):
    def __init__(self, cin: int, cout: int, emb_dim: int, dropout: float = 0.0):
        super().__init__()
        self.in_layers = nn.Sequential(norm(cin), nn.SiLU(), nn.Conv2d(cin, cout, 3, padding=1))
        self.emb = nn.Sequential(nn.SiLU(), nn.Linear(emb_dim, 2 * cout))
        self.out_norm = norm(cout)
        self.out_layers = nn.Sequential(nn.SiLU(), nn.Dropout(dropout),
                                        zero(nn.Conv2d(cout, cout, 3, padding=1)))
        self.skip = nn.Identity() if cin == cout else nn.Conv2d(cin, cout, 1)

    def forward(self, x, emb):
        h = self.in_layers(x)
        scale, shift = self.emb(emb)[:, :, None, None].chunk(2, dim=1)
        h = self.out_norm(h) * (1 + scale) + shift  # scale-shift norm
        return self.skip(x) + self.out_layers(h)


class AttentionBlock(nn.Module):
    def __init__(self, ch: int, head_channels: int = 32):
        super().__init__()
        self.heads = max(1, ch // head_channels)
        self.norm = norm(ch)
        self.qkv = nn.Conv1d(ch, 3 * ch, 1)
        self.proj = zero(nn.Conv1d(ch, ch, 1))

    def forward(self, x, emb=None):
        b, c, hh, ww = x.shape
        qkv = self.qkv(self.norm(x).reshape(b, c, -1))                       # B, 3C, L
        q, k, v = qkv.reshape(b, 3, self.heads, c // self.heads, -1).transpose(-1, -2).unbind(1)
        h = F.scaled_dot_product_attention(q, k, v)                          # B, heads, L, d
        h = h.transpose(-1, -2).reshape(b, c, -1)
        return x + self.proj(h).reshape(b, c, hh, ww)


class Downsample(nn.Module):
    """Stride-2 3x3 conv. With ``antialias`` a fixed binomial low-pass ([1, 2, 1]/4 in each
    direction, per channel) runs first (Zhang, 2019, "Making convolutional networks shift-invariant
    again"): a bare stride-2 conv samples every other pixel, so its output depends on the input's
    position modulo 2 (modulo 4 after two of them) and a classifier built on it can prefer some
    columns over their neighbours; blurring first removes the frequencies that alias. Since both
    are convolutions, blur-then-strided-conv equals conv-then-blur-then-subsample (BlurPool).
    The kernel is a constant, not a parameter: spectral normalisation leaves it alone and its
    gain is 1 (its weights are positive and sum to 1), so no Lipschitz bound changes."""

    def __init__(self, ch: int, antialias: bool = False):
        super().__init__()
        self.conv = nn.Conv2d(ch, ch, 3, stride=2, padding=1)
        self.antialias = antialias
        if antialias:
            k = torch.tensor([1.0, 2.0, 1.0])
            self.register_buffer("blur", (k[:, None] * k[None, :] / 16).expand(ch, 1, 3, 3).clone(),
                                 persistent=False)

    def forward(self, x, emb=None):
        if self.antialias:
            # Replicate padding: zero padding would darken the border and make it an edge.
            x = F.conv2d(F.pad(x, (1, 1, 1, 1), mode="replicate"), self.blur, groups=x.shape[1])
        return self.conv(x)


class Upsample(nn.Module):
    """Nearest-neighbour 2x upsampling followed by a 3x3 conv (the reference UNet's conv_resample),
    which smooths the blocky nearest-neighbour output before the skip connection is joined. It
    runs at the higher resolution with the lower level's width: 22 % of the cpu UNet's FLOPs."""

    def __init__(self, ch: int):
        super().__init__()
        self.conv = nn.Conv2d(ch, ch, 3, padding=1)

    def forward(self, x, emb=None):
        return self.conv(F.interpolate(x, scale_factor=2, mode="nearest"))


class Sequence(nn.ModuleList):
    """Apply blocks in order, passing the timestep embedding to those that take it."""

    def forward(self, x, emb):
        for m in self:
            x = m(x, emb)
        return x


class TimeEmbedding(nn.Module):
    def __init__(self, ch: int):
        super().__init__()
        self.ch = ch
        self.mlp = nn.Sequential(nn.Linear(ch, 4 * ch), nn.SiLU(), nn.Linear(4 * ch, 4 * ch))

    def forward(self, t):
        return self.mlp(timestep_embedding(t, self.ch).to(self.mlp[0].weight.dtype))


def null_label(num_classes: int) -> int:
    """The label index meaning "no label" for a network conditioned on ``num_classes`` classes.

    The one place this convention lives: label dropout in training (classifier_free.drop_labels),
    unconditional calls (``y=None``) and the guided sampler (classifier_free.py) all ask here, so
    the null the network learns is the null it is asked for. Classes are 0..num_classes - 1, so
    the null is the extra row num_classes of the embedding table."""
    return num_classes


class LabelEmbedding(nn.Module):
    """y -> a vector added to the timestep embedding; ``y=None`` is the null label for every sample.
    Backbones other than the UNet reuse it, so they share the null convention."""

    def __init__(self, num_classes: int, dim: int):
        super().__init__()
        self.num_classes = num_classes
        self.table = nn.Embedding(num_classes + 1, dim)   # + 1: the null label's row

    def forward(self, y: torch.Tensor | None, batch: int, device) -> torch.Tensor:
        if y is None:
            y = torch.full((batch,), null_label(self.num_classes), dtype=torch.long, device=device)
        return self.table(y)


def build_encoder(in_ch, ch, mult, n_res, attn_res, head_ch, dropout, image_size, antialias=False):
    """Input conv + per-resolution [ResBlock (+Attention)] x n_res + Downsample; returns the
    block list and the channel count of every skip connection (for the decoder)."""
    emb_dim = 4 * ch
    blocks = nn.ModuleList([Sequence([_InConv(in_ch, ch)])])
    skips, cur, res = [ch], ch, image_size
    for level, m in enumerate(mult):
        for _ in range(n_res):
            layers = [ResBlock(cur, m * ch, emb_dim, dropout)]
            cur = m * ch
            if res in attn_res:
                layers.append(AttentionBlock(cur, head_ch))
            blocks.append(Sequence(layers))
            skips.append(cur)
        if level != len(mult) - 1:
            blocks.append(Sequence([Downsample(cur, antialias)]))
            skips.append(cur)
            res //= 2
    return blocks, skips, cur, res


class _InConv(nn.Conv2d):
    def __init__(self, cin, cout):
        super().__init__(cin, cout, 3, padding=1)

    def forward(self, x, emb=None):
        return super().forward(x)


class UNet(nn.Module):
    """eps_theta(x_t, t) for images of ``image_size`` and ``channels`` channels; with
    ``num_classes`` > 0, eps_theta(x_t, t, y), y in 0..num_classes - 1 or the null label."""

    # Defaults are config.py's (the cpu preset): one place for every default.
    def __init__(self, image_size=DataConfig.image_size, channels=DataConfig.channels,
                 model_channels=UNetConfig.model_channels, channel_mult=UNetConfig.channel_mult,
                 num_res_blocks=UNetConfig.num_res_blocks,
                 attention_resolutions=UNetConfig.attention_resolutions,
                 num_head_channels=UNetConfig.num_head_channels, dropout=UNetConfig.dropout,
                 out_channels: int | None = None, num_classes: int = 0):
        super().__init__()
        if image_size % 2 ** (len(channel_mult) - 1):
            raise ValueError(f"image size {image_size} is not divisible by 2^{len(channel_mult) - 1} "
                             f"(channel_mult {channel_mult}); change --image-size or --channel-mult")
        self.image_size, self.channels = image_size, channels
        # out_channels = 2 * channels when the network also predicts the variance (models.py).
        self.out_channels = out_channels or channels
        ch, emb_dim = model_channels, 4 * model_channels
        self.time_embed = TimeEmbedding(ch)
        # Class conditioning as in Ho & Salimans (2022) / guided-diffusion: the label's embedding is
        # added to the timestep embedding, which every ResBlock's scale-shift norm reads.
        self.num_classes = num_classes
        self.label_embed = LabelEmbedding(num_classes, emb_dim) if num_classes > 0 else None
        self.down, skips, cur, res = build_encoder(channels, ch, channel_mult, num_res_blocks,
                                                   attention_resolutions, num_head_channels,
                                                   dropout, image_size)
        self.middle = Sequence([ResBlock(cur, cur, emb_dim, dropout),
                                AttentionBlock(cur, num_head_channels),
                                ResBlock(cur, cur, emb_dim, dropout)])
        self.up = nn.ModuleList()
        for level, m in reversed(list(enumerate(channel_mult))):
            for i in range(num_res_blocks + 1):
                layers = [ResBlock(cur + skips.pop(), m * ch, emb_dim, dropout)]
                cur = m * ch
                if res in attention_resolutions:
                    layers.append(AttentionBlock(cur, num_head_channels))
                if level and i == num_res_blocks:
                    layers.append(Upsample(cur))
                    res *= 2
                self.up.append(Sequence(layers))
        self.out = nn.Sequential(norm(cur), nn.SiLU(), zero(nn.Conv2d(cur, self.out_channels, 3, padding=1)))

    @classmethod
    def from_config(cls, data_cfg, unet_cfg, out_channels: int | None = None, num_classes: int = 0):
        return cls(out_channels=out_channels, num_classes=num_classes,
                   image_size=data_cfg.image_size, channels=data_cfg.channels,
                   model_channels=unet_cfg.model_channels, channel_mult=unet_cfg.channel_mult,
                   num_res_blocks=unet_cfg.num_res_blocks,
                   attention_resolutions=unet_cfg.attention_resolutions,
                   num_head_channels=unet_cfg.num_head_channels, dropout=unet_cfg.dropout)

    def forward(self, x, t, y=None):
        emb = self.time_embed(t)
        if self.label_embed is not None:
            emb = emb + self.label_embed(y, x.shape[0], x.device).to(emb.dtype)
        elif y is not None:
            raise ValueError("labels given to an unconditional network (trained without --class-cond)")
        hs = []
        for block in self.down:
            x = block(x, emb)
            hs.append(x)
        x = self.middle(x, emb)
        for block in self.up:
            x = block(torch.cat([x, hs.pop()], dim=1), emb)
        return self.out(x)

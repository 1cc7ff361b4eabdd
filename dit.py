"""The Diffusion Transformer (DiT, Peebles & Xie 2023): the alternative backbone of App. J.

App. J of the paper replaces the UNet of Nichol & Dhariwal by a DiT and still sees multi-guidance
interpolate (Fig. S19a): the ability to interpolate does not hinge on convolutions. Here the DiT is
a drop-in eps/v-network, ``models.build_model`` picks it with ``--arch dit``:

  * patchify: a conv with kernel = stride = p turns [B, C, H, W] into (H/p)(W/p) tokens of width D;
  * fixed (not learned) 2-D sin-cos position embeddings: half the width encodes the row, half the
    column, each with the transformer sinusoids;
  * conditioning vector c = MLP(sinusoidal embedding of t) (+ a label embedding, see below);
  * N transformer blocks (pre-LayerNorm self-attention and MLP) with **adaLN-Zero**: the
    LayerNorms have no parameters of their own; instead a linear layer regresses from c a shift,
    a scale and a gate for each of the two sub-layers, x <- x + gate * f(LN(x) * (1 + scale) +
    shift). The linear layer is zero-initialised, so every gate starts at 0 and every block
    starts as the identity (the transformer counterpart of the UNet's zero-initialised last conv);
  * a final adaLN layer (shift/scale from c) and a zero-initialised linear map each token to its
    p x p x out_channels pixels, unpatchified back to [B, out_channels, H, W]. The untrained
    network therefore outputs exactly 0.

Labels (for classifier-free guidance, App. J): with ``num_classes`` > 0 an embedding table of
num_classes + 1 rows is added to c; row ``unet.null_label(num_classes)`` (= num_classes) is the null
label, used when y is None: the one convention that training and classifier_free.py share.

Only LayerNorm (per token) and attention (within one image) mix activations: samples in a batch
never interact, which classifier guidance relies on (no BatchNorm anywhere).
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from config import DataConfig, UNetConfig
from unet import null_label, timestep_embedding, zero

FREQ_DIM = 256  # sinusoidal timestep features before the MLP (as in DiT; per image, so cheap)


def sincos_2d(grid: int, dim: int) -> torch.Tensor:
    """[grid*grid, dim] fixed position embedding of a grid x grid token map (row-major tokens):
    the first dim/2 features are the sinusoids of the row index, the last dim/2 of the column."""
    if dim % 4:
        raise ValueError(f"DiT width {dim} is not divisible by 4 (the 2-D sin-cos position embedding "
                         "needs cos and sin of rows and columns); change --dit-width")
    rows, cols = torch.meshgrid(torch.arange(grid), torch.arange(grid), indexing="ij")
    # timestep_embedding is the same sinusoid family ([cos, sin] of pos * 10000^(-i/half)).
    return torch.cat([timestep_embedding(rows.reshape(-1), dim // 2),
                      timestep_embedding(cols.reshape(-1), dim // 2)], dim=1)


def modulate(x, shift, scale):
    # The adaLN of one sub-layer: a LayerNorm without affine parameters, then per-image affine.
    return x * (1 + scale[:, None]) + shift[:, None]


class Attention(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x):
        b, n, d = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        h = F.scaled_dot_product_attention(q, k, v)                 # B, heads, N, d/heads
        return self.proj(h.transpose(1, 2).reshape(b, n, d))


class DiTBlock(nn.Module):
    def __init__(self, dim: int, heads: int, mlp_ratio: int = 4, dropout: float = 0.0):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(dim, heads)
        self.norm2 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.mlp = nn.Sequential(nn.Linear(dim, mlp_ratio * dim), nn.GELU(approximate="tanh"),
                                 nn.Dropout(dropout), nn.Linear(mlp_ratio * dim, dim))
        # adaLN-Zero: shift, scale, gate for attention and for the MLP, regressed from c; its
        # zero initialisation (DiT._init_weights) makes both gates 0: the block starts as identity.
        self.ada = nn.Sequential(nn.SiLU(), nn.Linear(dim, 6 * dim))

    def forward(self, x, c):
        s1, sc1, g1, s2, sc2, g2 = self.ada(c).chunk(6, dim=1)
        x = x + g1[:, None] * self.attn(modulate(self.norm1(x), s1, sc1))
        return x + g2[:, None] * self.mlp(modulate(self.norm2(x), s2, sc2))


class FinalLayer(nn.Module):
    def __init__(self, dim: int, patch: int, out_channels: int):
        super().__init__()
        self.norm = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.ada = nn.Sequential(nn.SiLU(), nn.Linear(dim, 2 * dim))
        self.linear = nn.Linear(dim, patch * patch * out_channels)  # zero-initialised: output 0

    def forward(self, x, c):
        shift, scale = self.ada(c).chunk(2, dim=1)
        return self.linear(modulate(self.norm(x), shift, scale))


class DiT(nn.Module):
    """eps_theta(x_t, t[, y]) for images of ``image_size`` and ``channels`` channels."""

    # Defaults are config.py's (the cpu preset with --arch dit): one place for every default.
    def __init__(self, image_size=DataConfig.image_size, channels=DataConfig.channels,
                 patch_size=UNetConfig.patch_size, width=UNetConfig.dit_width,
                 depth=UNetConfig.dit_depth, heads=UNetConfig.dit_heads, mlp_ratio: int = 4,
                 dropout=UNetConfig.dropout, out_channels: int | None = None, num_classes: int = 0):
        super().__init__()
        if patch_size < 1 or image_size % patch_size:
            raise ValueError(f"image size {image_size} is not divisible by the DiT patch size "
                             f"{patch_size}; change --image-size or --patch-size")
        if heads < 1 or width % heads:
            raise ValueError(f"DiT width {width} is not divisible by {heads} heads; change "
                             "--dit-width or --dit-heads")
        self.image_size, self.channels, self.patch = image_size, channels, patch_size
        # out_channels = 2 * channels when the network also predicts the variance (models.py).
        self.out_channels = out_channels or channels
        self.num_classes, self.grid = num_classes, image_size // patch_size
        self.patchify = nn.Conv2d(channels, width, patch_size, stride=patch_size)
        # A buffer, not a parameter: fixed, and rebuilt from the config rather than stored.
        self.register_buffer("pos", sincos_2d(self.grid, width)[None], persistent=False)
        self.t_mlp = nn.Sequential(nn.Linear(FREQ_DIM, width), nn.SiLU(), nn.Linear(width, width))
        # Row num_classes is the null label (classifier-free guidance's unconditional branch).
        self.label = nn.Embedding(num_classes + 1, width) if num_classes > 0 else None
        self.blocks = nn.ModuleList([DiTBlock(width, heads, mlp_ratio, dropout) for _ in range(depth)])
        self.final = FinalLayer(width, patch_size, self.out_channels)
        self._init_weights()

    def _init_weights(self):
        # DiT's initialisation: Xavier-uniform linears (the patchify conv as the linear it is),
        # N(0, 0.02) for the timestep MLP and the label table, then adaLN-Zero: every modulation
        # layer and the output linear start at exactly 0.
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
        w = self.patchify.weight
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.zeros_(self.patchify.bias)
        for lin in (self.t_mlp[0], self.t_mlp[2]):
            nn.init.normal_(lin.weight, std=0.02)
        if self.label is not None:
            nn.init.normal_(self.label.weight, std=0.02)
        for lin in [blk.ada[-1] for blk in self.blocks] + [self.final.ada[-1], self.final.linear]:
            zero(lin)

    @classmethod
    def from_config(cls, data_cfg, unet_cfg, out_channels: int | None = None, num_classes: int = 0):
        return cls(image_size=data_cfg.image_size, channels=data_cfg.channels,
                   patch_size=unet_cfg.patch_size, width=unet_cfg.dit_width, depth=unet_cfg.dit_depth,
                   heads=unet_cfg.dit_heads, dropout=unet_cfg.dropout, out_channels=out_channels,
                   num_classes=num_classes)

    def forward(self, x, t, y=None):
        b = x.shape[0]
        h = self.tokens(x) + self.pos
        c = self.t_mlp(timestep_embedding(t, FREQ_DIM).to(h.dtype))
        if self.label is not None:
            if y is None:
                y = torch.full((b,), null_label(self.num_classes), dtype=torch.long, device=x.device)
            c = c + self.label(y)
        elif y is not None:
            raise ValueError("labels given to a DiT built with num_classes=0")
        for block in self.blocks:
            h = block(h, c)
        return self.unpatchify(self.final(h, c))

    def tokens(self, x: torch.Tensor) -> torch.Tensor:
        """[B, C, H, W] -> [B, g*g, D], token i*g + j from the patch at rows i*p.., columns j*p..
        (flatten(2) also accepts the channels_last activations of sample.inference_layout)."""
        return self.patchify(x).flatten(2).transpose(1, 2)

    def unpatchify(self, h: torch.Tensor) -> torch.Tensor:
        """[B, g*g, p*p*C] tokens -> [B, C, g*p, g*p]: token i*g + j holds the p x p pixels of rows
        i*p.., columns j*p.., its features ordered (row in the patch, column, channel)."""
        b, p, g, c = h.shape[0], self.patch, self.grid, h.shape[-1] // self.patch ** 2
        h = h.reshape(b, g, g, p, p, c).permute(0, 5, 1, 3, 2, 4)      # B, C, i, row, j, column
        return h.reshape(b, c, g * p, g * p)

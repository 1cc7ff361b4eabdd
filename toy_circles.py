"""The controlled synthetic distribution of §5.5 (Fig. 7): one white disc on a black square.

The authors' images are 64x64 with a disc of radius 2 drawn by PIL as
``ellipse([x-2, y-2, x+2, y+2], fill=white)`` (21 lit pixels, values 0 or 255). The latent is the
normalised horizontal position z = x / (S - 1). The training set holds only *extreme* examples:
centres x in {2..11} (left, z <= 0.175) and their mirror images {52..61} (right), every y in
{2..61}: 2 x 10 x 60 = 1200 images, label 1 if the disc is on the right (x >= S/2).

Band rule, so other sizes keep the same delta: centres keep the disc inside the image
(r <= x <= S-1-r) and the left band is x in {r, ..., floor(delta (S-1)) - 1}; the right band is
its mirror x -> S-1-x. At S=64, r=2, delta=0.2 this is exactly the authors' 2..11 / 52..61.

CPU mapping: the ``cpu`` preset renders natively at S=32 with radius 1 (PIL draws a 5-pixel
plus), giving x in {1..5} U {26..30}, y in {1..30}: 300 images, z in [0.03, 0.16] U [0.84, 0.97].
No resizing is involved, so pixels stay exactly 0 or 255.

Extrapolation (§7, ``DataConfig.bands``): ``bands="middle"`` trains on the *middle* instead,
centres with z in [0.35, 0.65] (x in {11..20} at 32 px: 300 images, as many as the extremes;
{23..40} at 64 px), and ``"LO:HI"`` on any band centred on the image (LO + HI = 1, so that a
horizontal flip maps the band onto itself). The label stays 1[x >= S/2]: for a centred band that
is its right half against its left half, so guidance towards class 1 (0) asks for "further right
(left)" and can push discs *outwards*, past the band's edge, into z > 0.85 (< 0.15) that the
DDPM never saw; flips map one half onto the other, so the label flips with the image as before.
"""
from __future__ import annotations

import math

import numpy as np
import torch
from PIL import Image, ImageDraw

from checkpoint import UserError, from_uint8


def radius_for(size: int) -> int:
    """Radius 2 at 64 px (the authors'), scaled with the image size, at least 1 px."""
    return max(1, round(2 * size / 64))


def render_disc(x: float, y: float, size: int = 64, radius: int | None = None) -> np.ndarray:
    """uint8 (size, size) image with one disc centred at (x, y); x is the column, y the row."""
    r = radius_for(size) if radius is None else radius
    im = Image.new("L", (size, size), 0)
    ImageDraw.Draw(im).ellipse([x - r, y - r, x + r, y + r], fill=255)
    return np.asarray(im)


BANDS = {"extremes": None, "middle": (0.35, 0.65)}  # name -> centred z interval (None: the delta bands)


def parse_bands(bands: str) -> tuple[float, float] | None:
    """``DataConfig.bands`` -> None (the two extreme delta bands) or the centred z interval (lo, hi)."""
    if bands in BANDS:
        return BANDS[bands]
    try:
        lo, hi = (float(v) for v in bands.split(":"))
    except ValueError:
        raise UserError(f"unknown --bands {bands!r}; use extremes, middle (z in [0.35, 0.65]) or LO:HI "
                        "(a band centred on the image, e.g. 0.3:0.7)") from None
    if not (0 <= lo < 0.5 < hi <= 1 and abs(lo + hi - 1) < 1e-9):
        raise UserError(f"--bands {bands}: LO:HI must satisfy 0 <= LO < 0.5 < HI <= 1 and LO + HI = 1 "
                        "(centred, so that flips keep discs inside the band), e.g. 0.3:0.7")
    return lo, hi


def band_positions(size: int = 64, delta: float = 0.2, radius: int | None = None,
                   full_range: bool = False, bands: str = "extremes") -> list[tuple[int, int]]:
    """All (x, y) centres of the dataset: extreme bands only (the default), the centred band
    ``bands`` names (see parse_bands; ``delta`` is then unused), or every valid x if full_range."""
    r = radius_for(size) if radius is None else radius
    valid = range(r, size - r)
    interval = parse_bands(bands)
    if full_range:
        xs = list(valid)
    elif interval is not None:
        lo, hi = interval
        # 1e-9: z = 0.35 exactly must count as inside (x / (S - 1) is not exact in floating point).
        xs = [x for x in valid if lo - 1e-9 <= z_of(x, size) <= hi + 1e-9]
        if not any(x < size / 2 for x in xs):
            raise UserError(f"--bands {bands} holds no disc centre left of the middle at {size} px; "
                            "widen it (e.g. 0.3:0.7)")
    else:
        x_max = math.floor(delta * (size - 1)) - 1
        if x_max < r:
            raise ValueError(f"delta={delta} leaves no disc centre in the bands at size {size}")
        left = list(range(r, x_max + 1))
        xs = left + sorted(size - 1 - x for x in left)
    return [(x, y) for x in xs for y in valid]


def training_edges(bands: str = "extremes", delta: float = 0.2) -> tuple[float, ...]:
    """The z of the edges of the training region(s), for the green lines of sample grids."""
    interval = parse_bands(bands)
    return (delta, 1 - delta) if interval is None else interval


def z_of(x, size: int):
    """Latent of a centre column: z = x / (S - 1) in [0, 1]."""
    return x / (size - 1)


def make_circles(size: int = 64, delta: float = 0.2, radius: int | None = None,
                 full_range: bool = False, bands: str = "extremes"):
    """Return (images uint8 [N, S, S], labels int64 [N], z float64 [N])."""
    pos = band_positions(size, delta, radius, full_range, bands)
    images = np.stack([render_disc(x, y, size, radius) for x, y in pos])
    xs = np.array([p[0] for p in pos], dtype=np.float64)
    labels = (xs >= size / 2).astype(np.int64)
    return images, labels, z_of(xs, size)


class CirclesData:
    """The whole (tiny) dataset as a [-1, 1] float tensor in memory, drawn in random batches."""

    def __init__(self, size: int = 64, delta: float = 0.2, flip: bool = True, channels: int = 1,
                 full_range: bool = False, bands: str = "extremes"):
        images, labels, z = make_circles(size, delta, full_range=full_range, bands=bands)
        self.x = from_uint8(images, channels)
        self.y = torch.from_numpy(labels)
        self.z = torch.from_numpy(z)
        self.flip = flip

    def __len__(self):
        return len(self.x)

    def batch(self, n: int, generator: torch.Generator):
        """n images drawn with replacement, randomly flipped: (x [-1, 1] NCHW, y int64 [n])."""
        return self.take(torch.randint(0, len(self.x), (n,), generator=generator), generator)

    def take(self, idx: torch.Tensor, generator: torch.Generator | None):
        """Images ``idx``; flipped at random with ``generator`` (none: as stored)."""
        x, y = self.x[idx], self.y[idx]
        if self.flip and generator is not None:
            # Horizontal flip maps x -> S-1-x: the left band onto the right one, so the label flips.
            f = torch.rand(len(idx), generator=generator) < 0.5
            x = torch.where(f[:, None, None, None], x.flip(-1), x)
            y = torch.where(f, 1 - y, y)
        return x, y

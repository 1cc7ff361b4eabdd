"""The face stand-in's renderer as linear masks, and each face's position and scale (§5.1, §4.1).

``toy_faces.render_face`` draws flat-coloured parts; the stand-in's pixels are its crop rows 20..197
and antialiased bicubic resize (``celeba.preprocess``), a linear map, written here as matrices
(``resize_matrix``). So a face at S px is sum_k colour_k M_k, M_k the resized mask of part k drawn
at 178x218, and any geometry can be fitted by least squares with every part's colour free.
``fit_geometry`` finds (dx, dy, scale) on a grid (one drawing per scale, offsets as whole-pixel
shifts of the resize matrices), refines them by parabolas, then again on a 1-source-px grid with
the mouth's band left out; ``mouth_readout.py`` fits the mouth at that geometry.
"""
from __future__ import annotations

import functools

import numpy as np
import torch
from PIL import Image, ImageDraw

import toy_faces as T
from celeba import CROP_ROWS

GEO_DX, GEO_DY = np.arange(-12, 13, 3), np.arange(-9, 10, 3)      # the stand-in draws +-9, +-6
GEO_S = np.arange(0.84, 1.141, 0.05)                              # the stand-in draws 0.9 .. 1.08
PARTS = {"background": 0, "shirt": 1, "neck": 2, "head": 2, "hair": 3, "fringe": 3, "brow": 3,
         "wrinkle": 4, "temple": 5, "eye": 6, "pupil": 7, "nose": 8, "lip": 9, "teeth": 9}
SKIN, MOUTH, NPARTS = 2, 9, 10              # MOUTH: the band every z's mouth can cover
PAD = 64                                   # zero columns around the resize matrices (shifts)


@functools.lru_cache(maxsize=None)
def resize_matrix(n_in: int, n_out: int) -> torch.Tensor:
    """[n_out, n_in]: PIL's antialiased bicubic resize (celeba.preprocess) as a matrix, read off
    by resizing the identity as a float image (one pass per axis, no uint8 rounding)."""
    eye = Image.fromarray(np.eye(n_in, dtype=np.float32), "F")
    w = np.asarray(eye.resize((n_out, n_in), Image.BICUBIC, reducing_gap=None), np.float64).T
    return torch.from_numpy(np.ascontiguousarray(w))


@functools.lru_cache(maxsize=None)
def padded(size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Resize matrices over the whole 178x218 frame, with PAD zero columns on each side:
    rows outside the crop and points outside the frame contribute nothing."""
    w = resize_matrix(T.W, size)
    wx = torch.zeros(size, T.W + 2 * PAD, dtype=torch.float64)
    wx[:, PAD:PAD + T.W] = w
    wy = torch.zeros(size, T.H + 2 * PAD, dtype=torch.float64)
    wy[:, PAD + CROP_ROWS[0]:PAD + CROP_ROWS[1]] = w
    return wx, wy


def resample(onehot: np.ndarray, y0: int, x0: int, size: int, ys=(0,), xs=(0,), rows=None,
              cols=None, dtype=torch.float64) -> torch.Tensor:
    """[B, |ys|, |xs|, rows, cols]: masks [B, h, w] drawn with their corner at (x0, y0) of the
    178x218 frame, shifted by every (xs, ys) in whole source px, cropped and resized (two GEMMs
    over the support of the wanted output pixels)."""
    wx, wy = padded(size)
    rows = np.arange(size) if rows is None else rows
    cols = np.arange(size) if cols is None else cols
    b, h, w = onehot.shape
    ax = torch.cat([wx[cols, PAD + x0 + o:PAD + x0 + o + w] for o in xs])         # [sx c, w]
    ay = torch.cat([wy[rows, PAD + y0 + o:PAD + y0 + o + h] for o in ys])         # [sy r, h]
    sx, sy = (np.flatnonzero(a.abs().sum(0).numpy()) for a in (ax, ay))
    sx, sy = (slice(v[0], v[-1] + 1) if len(v) else slice(0, 0) for v in (sx, sy))
    ax, ay = ax[:, sx].to(dtype), ay[:, sy].to(dtype)
    m = torch.from_numpy(np.ascontiguousarray(onehot[:, sy, sx])).to(dtype)
    h, w = m.shape[1:]
    t = (m.reshape(b * h, w) @ ax.T).reshape(b, h, -1).transpose(0, 1).reshape(h, -1)
    out = (ay @ t).reshape(len(ys), len(rows), b, len(xs), len(cols))
    return out.permute(2, 0, 3, 1, 4)


def part_masks(labels: np.ndarray, size: int, ys=(0,), xs=(0,), rows=None, cols=None,
          dtype=torch.float64) -> torch.Tensor:
    """[|ys|, |xs|, NPARTS, rows, cols] part masks of a 218x178 label image after the crop and
    the resize; the background is what the other parts leave (so shifts fill in background)."""
    onehot = labels[None] == np.arange(1, NPARTS)[:, None, None]
    m = resample(onehot, 0, 0, size, ys, xs, rows, cols, dtype).permute(1, 2, 0, 3, 4)
    return torch.cat([1 - m.sum(2, keepdim=True), m], dim=2)


def basis(a: torch.Tensor) -> torch.Tensor:
    """An orthonormal basis [P, r] of the columns of a [P, k] (empty parts dropped), from the
    eigenvectors of its Gram matrix."""
    lam, v = torch.linalg.eigh(a.T @ a)
    keep = lam > 1e-9 * lam.max()
    return a @ (v[:, keep] / lam[keep].sqrt())


def _explained(a: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """[...]: the squared norm of x [P, 3] explained by least squares on the rows of a [..., k, P]
    (x^T A (A^T A)^+ A^T x per channel, summed), batched through eigh of the Gram matrices."""
    lam, v = torch.linalg.eigh(a @ a.transpose(-1, -2))
    proj = v.transpose(-1, -2) @ (a @ x)                             # [..., k, 3]
    keep = lam > 1e-9 * lam.amax(-1, keepdim=True)
    return ((proj ** 2).sum(-1) / torch.where(keep, lam, 1.0) * keep).sum(-1)


def face_labels(dx: float, dy: float, s: float) -> np.ndarray:
    """The face's parts as labels (PARTS); the mouth label covers the band of every z."""
    row = {**{c: 0.5 for c in T.LATENT_COLUMNS}, "dx": dx, "dy": dy, "scale": s}
    im = T.render_face(row, lambda part, colour: PARTS[part], "L")
    d = ImageDraw.Draw(im)
    for z in (0.0, 0.25, 0.75, 1.0):
        T._mouth(d, T.W / 2 + dx, 120 + dy + 33 * s, s, z, lambda part, colour: MOUTH)
    return np.asarray(im)


@functools.lru_cache(maxsize=2)
def _geometry_bank(size: int) -> torch.Tensor:
    """[G, size^2, NPARTS] orthonormal bases of the part masks of every grid geometry (dx, dy,
    scale in C order): one drawing per scale, the offsets as whole-pixel shifts."""
    q = torch.zeros(len(GEO_DX), len(GEO_DY), len(GEO_S), size * size, NPARTS)
    for k, s in enumerate(GEO_S):
        m = part_masks(face_labels(0, 0, s), size, GEO_DY, GEO_DX)          # [dy, dx, parts, S, S]
        for j in range(len(GEO_DY)):
            for i in range(len(GEO_DX)):
                u = basis(m[j, i].reshape(NPARTS, -1).T)
                q[i, j, k, :, :u.shape[1]] = u
    return q.reshape(-1, size * size, NPARTS)


def _vertex(r: np.ndarray, i: int, axis: np.ndarray) -> float:
    """The grid value at i moved to the minimum of the parabola through r[i-1], r[i], r[i+1]."""
    if 0 < i < len(r) - 1 and r[i - 1] - 2 * r[i] + r[i + 1] > 0:
        off = 0.5 * (r[i - 1] - r[i + 1]) / (r[i - 1] - 2 * r[i] + r[i + 1])
        return float(axis[i] + np.clip(off, -0.5, 0.5) * (axis[1] - axis[0]))
    return float(axis[i])


def fit_geometry(images: np.ndarray) -> np.ndarray:
    """[N, 3] (dx, dy, scale) of each face, in toy_faces' units (source px, relative size)."""
    n, size = len(images), images.shape[1]
    q = _geometry_bank(size)
    x = torch.from_numpy(np.asarray(images, np.float32).reshape(n, size * size, 3))
    proj = torch.einsum("gpk,npc->ngkc", q, x)
    res = ((x ** 2).sum((1, 2))[:, None] - (proj ** 2).sum((2, 3))).numpy()
    shape = (len(GEO_DX), len(GEO_DY), len(GEO_S))
    out = np.zeros((n, 3))
    for m, r in enumerate(res.reshape(n, *shape)):
        i, j, k = np.unravel_index(int(np.argmin(r)), shape)
        geo = _vertex(r[:, j, k], i, GEO_DX), _vertex(r[i, :, k], j, GEO_DY), _vertex(r[i, j, :], k, GEO_S)
        out[m] = _refine_offset(x[m], size, *geo)
    return out


def _refine_offset(x: torch.Tensor, size: int, dx: float, dy: float, s: float) -> tuple:
    """(dx, dy, s) refined on a grid of whole source px (5 x 5, one drawing per scale, shifted)
    and of scale (s +- 0.015), the mouth's band left out, by a parabola per axis."""
    grid, scales = np.arange(-2.0, 3.0), s + np.array([-0.015, 0.0, 0.015])
    res = np.zeros((len(grid), len(grid), len(scales)))
    for k, sk in enumerate(scales):
        m = part_masks(face_labels(dx, dy, sk), size, grid.astype(int), grid.astype(int), dtype=torch.float32)
        m = m.flatten(3)
        keep = m[:, :, MOUTH].amax((0, 1)) < 0.01    # the mouth's band would pull the offset
        xk = x[keep].double()
        res[:, :, k] = float((xk ** 2).sum()) - _explained(m[:, :, :MOUTH, keep].double(), xk).T.numpy()
    i, j, k = np.unravel_index(int(np.argmin(res)), res.shape)
    return (dx + _vertex(res[:, j, k], i, grid), dy + _vertex(res[i, :, k], j, grid),
            _vertex(res[i, j, :], k, scales))

"""A mouth readout with a failure class for the face stand-in (§5.1, §4.1).

§5.1 counts a sample as an interpolation when its smile is mild. On the stand-in the evaluation
classifier and the z regressor were trained only on faces with one clear mouth, so a missing or a
doubled mouth (a smile and a frown overlaid) can still score p ~ 0.5. This is the stand-in's
analogue of the circle detector's one-disc rule (``detector.py``): a sample is mild only if ONE
rendered mouth explains it and that mouth's z_smile lies in [0.3, 0.7].

Per uint8 image [S, S, 3], at the face's position and scale from ``face_geometry.fit_geometry``:
  1. one mouth, in a patch around it: image = the face's other parts (free colours) + a [(lip -
     skin) M_lip(z) + (teeth(z) - skin) M_teeth(z)], M the masks of ``toy_faces._mouth`` at z
     after the stand-in's crop and resize, skin the fitted skin colour, a >= 0 the contrast (1 for
     a rendered mouth); z on a grid of step 0.05 with the mouth shifted by up to 3 source px,
     then on a grid of step 0.005 around the best, with a sub-pixel shift (first order);
  2. two mouths: a1 M(z1) + a2 M(z2) on the coarse grid, z2 - z1 >= DOUBLE_GAP, a1, a2 >= MIN_PART.
Classes (``classify``), thresholds calibrated on JPEG renders of known z (``validate``):
  doubled  a second mouth explains at least DOUBLE_GAIN of the patch's energy beyond the other
           parts, more than the best single mouth does (both on the coarse grids);
  faded    a < MIN_CONTRAST: far fainter than a rendered mouth (blank or absent);
  other    one mouth leaves more than FIT_REL of the patch's rms signal beyond the other parts;
  clear / mild   one good mouth, z outside / inside [0.3, 0.7].

    python mouth_readout.py --n 300 [--record]   # z RMSE and classes of clean, blanked, overlaid renders

``--record`` writes results/mouth_readout.json (RESULTS.md#mouth_readout).
"""
from __future__ import annotations

import argparse
import io

import numpy as np
import torch
from PIL import Image, ImageDraw

import face_geometry as G
import toy_faces as T
from celeba import CROP_ROWS, preprocess
from checkpoint import UserError, cli

CLASSES = ("mild", "clear", "faded", "doubled", "other")
MILD = (0.3, 0.7)
# Calibration on JPEG renders at 32 px (80 faces, each clean, blanked and smile+frown overlaid,
# with and without white noise of sd 4): the second mouth's gain is <= 0.007 clean and >= 0.10
# overlaid; the one-mouth residual / signal <= 0.44 clean (0.67 with the noise); the contrast is
# 0.86..1.13 clean, <= 0.11 blanked, ~0.5 for each mouth of an even overlay.
FIT_REL = 0.7
DOUBLE_GAIN = 0.05
MIN_CONTRAST = 0.4
MIN_PART = 0.25
DOUBLE_GAP = 0.3       # a smile and a frown, not one mouth fitted twice

Z_COARSE = np.linspace(0, 1, 21)                  # one and two mouths, every shift
Z_FINE = np.arange(-10, 11) * 0.005                # around the best coarse z, at its shift
SHIFT_X, SHIFT_Y = np.arange(-2, 3), np.arange(-3, 4)          # mouth offsets, source px
BOX_X, BOX_Y = (-40, 40), (-24, 40)        # local mouth canvas around (cx, my), source px


def _mouth_masks(cx: float, my: float, s: float, zs, rows, cols, size: int, ys=SHIFT_Y,
                 xs=SHIFT_X) -> torch.Tensor:
    """[|zs|, 2 (lip, teeth), |ys|, |xs|, rows, cols] masks of the mouth at each z, shifted."""
    x0, y0 = int(np.floor(cx)) + BOX_X[0], int(np.floor(my)) + BOX_Y[0]
    labs = []
    for z in zs:
        im = Image.new("L", (BOX_X[1] - BOX_X[0], BOX_Y[1] - BOX_Y[0]), 0)
        T._mouth(ImageDraw.Draw(im), cx - x0, my - y0, s, z, lambda part, colour: 1 if part == "lip" else 2)
        labs += [np.asarray(im) == 1, np.asarray(im) == 2]
    m = G.resample(np.stack(labs), y0, x0, size, ys, xs, rows, cols)
    return m.reshape(len(zs), 2, *m.shape[1:])


def _patch(cx: float, my: float, s: float, size: int) -> tuple[np.ndarray, np.ndarray]:
    """Output rows and columns around the mouth: its extent at every z plus the shifts and the
    resize's support (bicubic: 2 output px)."""
    f = size / T.W
    to_out = lambda v: (v + 0.5) * f - 0.5
    lo_y, hi_y = to_out(my - 14 * s - 3 - CROP_ROWS[0]) - 2, to_out(my + 26 * s + 3 - CROP_ROWS[0]) + 2
    lo_x, hi_x = to_out(cx - 30 * s - 2) - 2, to_out(cx + 30 * s + 2) + 2
    rows = np.arange(max(0, int(np.ceil(lo_y))), min(size, int(np.floor(hi_y)) + 1))
    cols = np.arange(max(0, int(np.ceil(lo_x))), min(size, int(np.floor(hi_x)) + 1))
    return rows, cols


def fit_mouth(image: np.ndarray, geometry) -> dict:
    """The one- and two-mouth fits of one uint8 image [S, S, 3] at its (dx, dy, scale)."""
    size = image.shape[0]
    dx, dy, s = geometry
    cx, my = T.W / 2 + dx, 120 + dy + 33 * s
    rows, cols = _patch(cx, my, s, size)
    parts = G.part_masks(G.face_labels(dx, dy, s), size, rows=rows, cols=cols)[0, 0].reshape(G.NPARTS, -1).T
    x = torch.from_numpy(image[rows][:, cols].reshape(-1, 3).astype(np.float64))     # [P, 3]
    # The skin colour, with the mouth band apart; then the band counted as skin around the mouth.
    skin = torch.linalg.lstsq(parts, x, driver="gelsd").solution[G.SKIN]
    base = parts.clone()[:, :G.MOUTH]
    base[:, G.SKIN] += parts[:, G.MOUTH]
    u = G.basis(base)
    xp = (x - u @ (u.T @ x)).T                                       # [3, P], the base removed
    energy, n_values = float((xp ** 2).sum()), xp.numel()

    def templates(zs, ys=SHIFT_Y, xs=SHIFT_X):
        """t [Z, ys, xs, 3, P] of each mouth (contrast 1) and its projection on the base."""
        m = _mouth_masks(cx, my, s, zs, rows, cols, size, ys, xs).reshape(len(zs), 2, len(ys), len(xs), -1)
        colour = torch.tensor([[T.LIP, T.teeth_colour(z)] for z in zs], dtype=torch.float64) - skin
        t = torch.einsum("zkyxp,zkc->zyxcp", m, colour)
        return t, t @ u

    def one(t, tu):                                                  # contrast and residual
        num = torch.einsum("...cp,cp->...", t, xp)
        den = ((t ** 2).sum((-1, -2)) - (tu ** 2).sum((-1, -2))).clamp_min(1e-9)
        a = (num / den).clamp_min(0.0)
        return a.numpy(), (energy - a * num).numpy()

    coarse = templates(Z_COARSE)
    _, res = one(*coarse)
    iz, iy, ix = np.unravel_index(int(np.argmin(res)), res.shape)
    fine = np.clip(Z_COARSE[iz] + Z_FINE, 0, 1)
    near = lambda i, n: np.clip([i - 1, i, i + 1], 0, n - 1)
    ys, xs = SHIFT_Y[near(iy, len(SHIFT_Y))], SHIFT_X[near(ix, len(SHIFT_X))]
    t, tu = templates(fine, ys, xs)                                  # [Z, 3, 3, 3, P]
    # Sub-pixel position: the mouth moved by (dy, dx) source px is t + dy dt/dy + dx dt/dx
    # (central differences of the whole-pixel shifts), least squares in (a, a dy, a dx).
    taylor = lambda v: torch.stack([v[:, 1, 1], (v[:, 2, 1] - v[:, 0, 1]) / float(ys[2] - ys[0]),
                                    (v[:, 1, 2] - v[:, 1, 0]) / float(xs[2] - xs[0])], 1).flatten(2)
    regs, regs_u = taylor(t), taylor(tu)
    gram = regs @ regs.transpose(1, 2) - regs_u @ regs_u.transpose(1, 2)  # [Z, 3, 3]
    rhs = regs @ xp.flatten()                                        # [Z, 3]
    coef = torch.linalg.solve(gram + 1e-9 * torch.eye(3, dtype=gram.dtype), rhs)
    sub = (coef[:, 1:] / coef[:, :1].clamp_min(1e-9)).abs().amax(1)
    ok = (coef[:, 0] > 0) & (sub <= 1.5)                             # else: no sub-pixel move
    a0 = (rhs[:, 0] / gram[:, 0, 0].clamp_min(1e-9)).clamp_min(0)
    res_f = torch.where(ok, energy - (coef * rhs).sum(1), energy - a0 * rhs[:, 0]).numpy()
    a_f = torch.where(ok, coef[:, 0], a0).numpy()
    k = int(np.argmin(res_f))
    move = (coef[k, 2] / coef[k, 0], coef[k, 1] / coef[k, 0]) if ok[k] else (0.0, 0.0)
    rms = lambda r: float(np.sqrt(max(r, 0) / n_values))
    return {"z": float(fine[k]), "contrast": float(a_f[k]), "rms": rms(res_f[k]),
            "rms_coarse": rms(res.min()), "signal": rms(energy), "geometry": (float(dx), float(dy), float(s)),
            "shift": (float(SHIFT_X[ix] + move[0]), float(SHIFT_Y[iy] + move[1])),
            **_two_mouths(*coarse, xp, energy, n_values)}


def _two_mouths(t, tu, xp, energy: float, n_values: int) -> dict:
    """Best a1 M(z1) + a2 M(z2), z1 < z2 on Z_COARSE at one shift, DOUBLE_GAP apart, each
    a >= MIN_PART (least squares in the complement of the base parts)."""
    g = (torch.einsum("ayxcp,byxcp->yxab", t, t) - torch.einsum("ayxcr,byxcr->yxab", tu, tu)).numpy()
    b = torch.einsum("ayxcp,cp->yxa", t, xp).numpy()
    i, j = np.triu_indices(len(Z_COARSE), 1)
    keep = Z_COARSE[j] - Z_COARSE[i] >= DOUBLE_GAP - 1e-9
    i, j = i[keep], j[keep]
    gii, gjj, gij, bi, bj = g[..., i, i], g[..., j, j], g[..., i, j], b[..., i], b[..., j]
    det = np.maximum(gii * gjj - gij ** 2, 1e-9)
    a1, a2 = (gjj * bi - gij * bj) / det, (gii * bj - gij * bi) / det
    res = np.where((a1 >= MIN_PART) & (a2 >= MIN_PART), energy - a1 * bi - a2 * bj, np.inf)
    k = np.unravel_index(int(np.argmin(res)), res.shape)
    if not np.isfinite(res[k]):
        return {"rms2": float("inf"), "z_pair": (float("nan"),) * 2, "contrast_pair": (float("nan"),) * 2}
    return {"rms2": float(np.sqrt(max(res[k], 0) / n_values)),
            "z_pair": (float(Z_COARSE[i[k[-1]]]), float(Z_COARSE[j[k[-1]]])),
            "contrast_pair": (float(a1[k]), float(a2[k]))}


def classify(fit: dict) -> str:
    """One of CLASSES for one fit (the rule in the module docstring)."""
    if fit["rms_coarse"] ** 2 - fit["rms2"] ** 2 >= DOUBLE_GAIN * fit["signal"] ** 2:
        return "doubled"
    if fit["contrast"] < MIN_CONTRAST:
        return "faded"
    if fit["rms"] > FIT_REL * fit["signal"]:
        return "other"
    return "mild" if MILD[0] <= fit["z"] <= MILD[1] else "clear"


def readout(images) -> list[dict]:
    """fit_mouth + its class for each uint8 image [N, S, S, 3] of the stand-in's layout."""
    images = np.asarray(images)
    if images.ndim != 4 or images.shape[-1] != 3 or images.shape[1] != images.shape[2]:
        raise UserError(f"the mouth readout takes uint8 RGB images [N, S, S, 3], got shape "
                        f"{images.shape}; pass the samples as evaluate_faces stores them")
    fits = [fit_mouth(im, g) for im, g in zip(images, G.fit_geometry(images) if len(images) else [])]
    for f in fits:
        f["class"] = classify(f)
    return fits


def fractions(images, limit: int = 1024) -> dict:
    """{"mouth_<class>": fraction} over the images (at most ``limit``, evenly spaced, so the
    training set of a large run costs as much as a sample row) and ``mouth_n``."""
    images = np.asarray(images)
    if len(images) > limit:
        images = images[np.linspace(0, len(images) - 1, limit).round().astype(int)]
    labels = [f["class"] for f in readout(images)]
    n = max(1, len(labels))
    return {**{f"mouth_{c}": labels.count(c) / n for c in CLASSES}, "mouth_n": len(labels)}


# ----- validation on renders of known z --------------------------------------------------------

def render_variant(row: dict, kind: str = "clean", size: int = 32) -> np.ndarray:
    """One stand-in face as the stand-in stores it (JPEG 95, crop, resize): ``clean``; ``blank``
    (the mouth painted in skin); ``overlay`` (the pixel mean of the face with a broad smile,
    z = 0.95, and with a frown, z = 0.05)."""
    def pipe(im):
        buf = io.BytesIO()
        im.save(buf, "JPEG", quality=95)
        return preprocess(Image.open(buf), size).astype(np.float64)
    skin = T._mix(T.SKIN_LIGHT, T.SKIN_DARK, row["skin"])
    out = {"clean": lambda: pipe(T.render_face(row)),
           "blank": lambda: pipe(T.render_face(row, lambda part, c: skin if part in ("lip", "teeth") else c)),
           "overlay": lambda: (pipe(T.render_face({**row, "z_smile": 0.95}))
                               + pipe(T.render_face({**row, "z_smile": 0.05}))) / 2}
    if kind not in out:
        raise UserError(f"unknown render kind {kind!r}; use clean, blank or overlay")
    return np.clip(np.rint(out[kind]()), 0, 255).astype(np.uint8)


def validate(n: int = 300, seed: int = 0, size: int = 32) -> dict:
    """The readout on n faces with z_smile on an even grid over [0, 1] and random nuisances: the
    z RMSE of clean renders and the class fractions of clean, blanked and overlaid ones."""
    lat = T.sample_latents(n, seed)
    lat["z_smile"] = np.linspace(0, 1, n)
    rows = [{k: float(v[i]) for k, v in lat.items()} for i in range(n)]
    out = {}
    for kind in ("clean", "blank", "overlay"):
        fits = readout(np.stack([render_variant(r, kind, size) for r in rows]))
        out[kind] = {c: sum(f["class"] == c for f in fits) / n for c in CLASSES}
        if kind == "clean":
            err = np.array([f["z"] for f in fits]) - lat["z_smile"]
            out[kind].update(z_rmse=float(np.sqrt(np.mean(err ** 2))), z_max_error=float(np.abs(err).max()))
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description="Validate the mouth readout on stand-in renders of known z.")
    p.add_argument("--n", type=int, default=300)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--size", type=int, default=32)
    p.add_argument("--record", action="store_true", help="write results/mouth_readout.json")
    a = p.parse_args(argv)
    if a.n < 1:
        raise UserError("--n must be positive")
    if a.record:
        from results.record import Recorder
        rec = Recorder("mouth_readout", "The mouth readout on stand-in renders of known z (§5.1 on the stand-in)",
                       argv=None if argv is None else [__file__, *argv])
    out = validate(a.n, a.seed, a.size)
    for kind, row in out.items():
        print(f"{kind:>8}: " + ", ".join(f"{k} {v:.4f}" for k, v in row.items()))
    if a.record:
        clean = out["clean"]
        mild_true = float(np.mean((np.linspace(0, 1, a.n) >= 0.3) & (np.linspace(0, 1, a.n) <= 0.7)))
        tables = [{"title": f"{a.n} faces per kind, z_smile evenly over [0, 1], {a.size} px, JPEG 95 as the stand-in "
                            "stores them",
                   "columns": ["render", *CLASSES],
                   "rows": [[kind, *(f"{100 * row[c]:.1f} %" for c in CLASSES)] for kind, row in out.items()]}]
        notes = [f"Clean renders: z RMSE {clean['z_rmse']:.3f} (largest error {clean['z_max_error']:.3f}); "
                 f"{100 * clean['mild']:.1f} % read mild against {100 * mild_true:.1f} % with true z in [0.3, 0.7]."]
        print(f"wrote {rec.write(out, seeds=[a.seed], n=a.n, tables=tables, notes=notes)}")


if __name__ == "__main__":
    cli(main)

"""What a decoded stand-in face shows, read back against toy_faces.py's latents (App. M, App. N).

The face stand-in draws every face from known latents, so what an interpolation path or an edit
changed can be read off its pixels instead of guessed by a classifier:
  z_smile    the mouth readout (mouth_readout.py: one rendered mouth fitted at the face's geometry;
             its class says whether one clean mouth explains the pixels, "mild" only for z in
             [0.3, 0.7]) and, where the run has an evaluation classifier, the true-latent regressor
             (eval_classifier.zregressor);
  nuisances  the face's position and scale (face_geometry.fit_geometry, via the mouth readout) and
             the flat colours of its parts, least squares on the renderer's part masks at that
             geometry, each mapped to the nearest point of toy_faces' colour line: skin, hair
             (black -> brown -> blond, z_hair) and background;
  pixels     the mean absolute difference (uint8 levels) to a reference image outside the band that
             the mouth of any z can cover, and inside it.
The faces used as endpoints and originals are the run's own training faces with a clear true smile.
"""
from __future__ import annotations

import json

import numpy as np
import torch

import face_geometry as G
import mouth_readout
import toy_faces as T
from checkpoint import UserError

CLEAR = (0.2, 0.8)          # "clearly not smiling": true z_smile <= 0.2; "clearly smiling": >= 0.8
MILD = mouth_readout.MILD
NUISANCES = ("dx", "dy", "scale", "skin", "z_hair", "background")


def training_faces(cfg) -> tuple[np.ndarray, dict]:
    """(uint8 images [N, S, S, 3], their true latents {toy_faces.LATENT_COLUMNS: [N]}) of a Smiling
    run's training set, each face once."""
    from evaluate_faces import train_data
    d = cfg["data"]
    if d.dataset != "celeba" or d.attribute != "Smiling":
        raise UserError(f"App. M / N on faces need a Smiling run of the face stand-in, not "
                        f"{d.dataset} {d.attribute or ''}; train one with python train.py --dataset celeba "
                        "--data-dir DATA --attribute Smiling")
    lat = T.read_latents(d.data_dir)
    data = train_data(cfg)
    _, first = np.unique(np.asarray(data.index), return_index=True)
    first = np.sort(first)
    where = {f: i for i, f in enumerate(lat["file"])}
    rows = [where[data.files[i]] for i in first]
    return np.array(data.images[first]), {c: lat[c][rows] for c in T.LATENT_COLUMNS}


def pick(z: np.ndarray, side: int, n: int, rng: np.random.Generator) -> np.ndarray:
    """n positions of faces clearly on ``side`` (0: not smiling, 1: smiling), without repeats
    while there are enough."""
    pool = np.flatnonzero(z <= CLEAR[0] if side == 0 else z >= CLEAR[1])
    if not len(pool):
        raise UserError(f"the run's training set has no face with true z_smile {'<=' if side == 0 else '>='} "
                        f"{CLEAR[side]}; train on a toy_faces.py folder of a few hundred faces or more")
    return rng.choice(pool, n, replace=len(pool) < n)


def smile(images: np.ndarray, zreg=None) -> dict:
    """The z_smile readouts of uint8 images [N, S, S, 3]: z_mouth and mouth_class (mouth_readout),
    z_reg (the regressor, or None), and each face's fitted geometry [N, 3]."""
    fits = mouth_readout.readout(images)
    return {"z_mouth": np.array([f["z"] for f in fits]), "mouth_class": np.array([f["class"] for f in fits]),
            "geometry": np.array([f["geometry"] for f in fits]).reshape(-1, 3),
            "z_reg": None if zreg is None else np.asarray(zreg(images), dtype=np.float64)}


def plain(obj):
    """``obj`` with numpy arrays and scalars turned into lists and numbers (JSON, results.record)."""
    return json.loads(json.dumps(obj, default=lambda o: o.tolist()))


def frac_mild(z) -> float:
    """Fraction of the values of z (any shape) in [0.3, 0.7] (NaN for none)."""
    from evaluate_faces import frac_in
    return frac_in(np.ravel(z), *MILD)


def _masks(geometry, size: int) -> torch.Tensor:
    """[NPARTS, S, S] part masks of the renderer at one (dx, dy, scale)."""
    return G.part_masks(G.face_labels(*map(float, geometry)), size)[0, 0]


def part_colours(images: np.ndarray, geometry: np.ndarray) -> np.ndarray:
    """[N, NPARTS, 3] flat colour of each part (face_geometry.PARTS), least squares at the geometry."""
    out = np.zeros((len(images), G.NPARTS, 3))
    for i, (im, geo) in enumerate(zip(images, geometry)):
        m = _masks(geo, im.shape[0]).reshape(G.NPARTS, -1).T                     # [P, parts]
        x = torch.from_numpy(im.reshape(-1, 3).astype(np.float64))
        out[i] = torch.linalg.lstsq(m, x, driver="gelsd").solution.numpy()
    return out


def _on_line(c: np.ndarray, a, b) -> tuple[np.ndarray, np.ndarray]:
    """(t in [0, 1] of the point of the segment a -> b nearest to each colour c [N, 3], its distance)."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    t = np.clip((c - a) @ (b - a) / ((b - a) @ (b - a)), 0, 1)
    return t, np.linalg.norm(c - (a + t[:, None] * (b - a)), axis=1)


def nuisances(images: np.ndarray, geometry: np.ndarray) -> dict:
    """{name: [N]} for NUISANCES: the geometry as given, the colour latents read off the parts."""
    col = part_colours(images, geometry)
    hair = col[:, G.PARTS["hair"]]
    t1, d1 = _on_line(hair, T.HAIR_BLACK, T.HAIR_BROWN)          # toy_faces.hair_colour's two pieces
    t2, d2 = _on_line(hair, T.HAIR_BROWN, T.HAIR_BLOND)
    geometry = np.asarray(geometry, np.float64)
    return {"dx": geometry[:, 0], "dy": geometry[:, 1], "scale": geometry[:, 2],
            "skin": _on_line(col[:, G.SKIN], T.SKIN_LIGHT, T.SKIN_DARK)[0],
            "z_hair": np.where(d1 <= d2, t1 / 2, 0.5 + t2 / 2),
            "background": _on_line(col[:, G.PARTS["background"]], T.BG_DARK, T.BG_LIGHT)[0]}


def pixel_drift(before: np.ndarray, after: np.ndarray, geometry: np.ndarray) -> dict:
    """Mean |after - before| in uint8 levels per image, outside and inside the mouth's band (the
    pixels any z's mouth can touch, at ``before``'s geometry)."""
    out, inside = [], []
    for b, a, geo in zip(before, after, geometry):
        band = (_masks(geo, b.shape[0])[G.MOUTH] >= 0.01).numpy()
        diff = np.abs(a.astype(np.float64) - b.astype(np.float64)).mean(-1)
        out.append(diff[~band].mean())
        inside.append(diff[band].mean() if band.any() else float("nan"))
    return {"outside_mouth": np.array(out), "inside_mouth": np.array(inside)}


def load_zreg(run, cfg, device, zreg_steps: int, eval_classifier=None):
    """The run's true-latent regressor for Smiling (evaluate_faces), or None for zreg_steps = 0."""
    if zreg_steps == 0:
        return None
    from eval_judges import load_eval_classifiers, load_zregressors
    clfs = load_eval_classifiers(run, cfg, device, eval_classifier)
    return load_zregressors(run, cfg, clfs, device, zreg_steps)[0]


def add_readout_args(g) -> None:
    """--zreg-steps and --eval-classifier: the regressor readout of lab.faces_* (evaluate_faces)."""
    from eval_classifier import ZREG_STEPS
    g.add_argument("--zreg-steps", type=int, default=ZREG_STEPS,
                   help=f"training steps of the true-latent regressor (default {ZREG_STEPS}, cached; 0: mouth "
                        "readout only)")
    g.add_argument("--eval-classifier", default=None,
                   help="the run's evaluation classifier (default: found as evaluate.py finds it)")

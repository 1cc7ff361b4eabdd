"""Cartoon faces with a KNOWN latent, written in CelebA's layout (a stand-in for §4.1, §5.1, §5.4).

CelebA only has binary labels, so the paper estimates each face's latent z with classifiers
(§4.3, §5 "evaluation classifiers"). Here the latents are drawn first and the faces rendered from
them, so interpolation can be measured against the truth while the real CelebA loader, crop and
cache (``celeba.py``) are exercised unchanged:

  z_smile  in [0, 1]: mouth curvature, width and opening (0 clear frown, 0.5 flat, 1 broad smile)
  z_hair   in [0, 1]: hair colour, black -> brown -> blond
  z_young  in [0, 1]: forehead wrinkles and grey temples fade as z_young grows (1 = young)
  nuisance: face position and size jitter, skin tone, background tone, shirt colour.

Labels are noisy near the middle, like CelebA's (§4.1: z = 0.45 vs 0.5 is not visually
decidable): ``Smiling = 1[z_smile + e > 0.5]``, ``Black_Hair = 1[z_hair + e' < 0.5]``,
``Blond_Hair = 1 - Black_Hair``, ``Young = 1[z_young + e'' > 0.5]``, with e ~ N(0, 0.08)
clipped to +-0.2, so an extreme face (|z - 0.5| > 0.2) always gets the label of its side (the
paper's assumption that extremes are unambiguous). The other 37 CelebA attributes are -1.

Files written under DIR (the CelebA layout plus one side file):
  img_align_celeba/NNNNNN.jpg   178x218 RGB; the face sits inside the rows 20..197 crop
  list_attr_celeba.txt          CelebA's 40 attribute names, in CelebA's order
  list_eval_partition.txt       contiguous train / valid / test in CelebA's proportions
  latents.csv                   index,file,z_smile,z_hair,z_young + nuisance (NOT CelebA's layout)
"""
from __future__ import annotations

import argparse
import csv
import os
import time

import numpy as np
from PIL import Image, ImageDraw

import celeba
from checkpoint import UserError, cli

# CelebA's 40 attributes, in list_attr_celeba.txt's order.
CELEBA_ATTRIBUTES = [
    "5_o_Clock_Shadow", "Arched_Eyebrows", "Attractive", "Bags_Under_Eyes", "Bald", "Bangs",
    "Big_Lips", "Big_Nose", "Black_Hair", "Blond_Hair", "Blurry", "Brown_Hair", "Bushy_Eyebrows",
    "Chubby", "Double_Chin", "Eyeglasses", "Goatee", "Gray_Hair", "Heavy_Makeup",
    "High_Cheekbones", "Male", "Mouth_Slightly_Open", "Mustache", "Narrow_Eyes", "No_Beard",
    "Oval_Face", "Pale_Skin", "Pointy_Nose", "Receding_Hairline", "Rosy_Cheeks", "Sideburns",
    "Smiling", "Straight_Hair", "Wavy_Hair", "Wearing_Earrings", "Wearing_Hat",
    "Wearing_Lipstick", "Wearing_Necklace", "Wearing_Necktie", "Young",
]
# CelebA's partition sizes (162,770 / 19,867 / 19,962 of 202,599): contiguous, train first.
CELEBA_SPLIT = (162770, 19867, 19962)
W, H = 178, 218
LABEL_NOISE, NOISE_CLIP = 0.08, 0.2
LATENT_COLUMNS = ["z_smile", "z_hair", "z_young", "dx", "dy", "scale", "skin", "background",
                  "shirt"]

SKIN_LIGHT, SKIN_DARK = np.array([245, 215, 190]), np.array([120, 80, 55])
HAIR_BLACK, HAIR_BROWN, HAIR_BLOND = np.array([20, 16, 14]), np.array([115, 72, 40]), np.array([240, 205, 105])
BG_DARK, BG_LIGHT = np.array([45, 50, 65]), np.array([215, 210, 200])
HAIR_GREY = np.array([175, 175, 175])
LIP = (110, 20, 30)


def sample_latents(n: int, seed: int = 0) -> dict:
    """z's uniform in [0, 1] and the nuisance values, one row per image (numpy arrays)."""
    rng = np.random.default_rng(seed)
    return {
        "z_smile": rng.uniform(0, 1, n), "z_hair": rng.uniform(0, 1, n),
        "z_young": rng.uniform(0, 1, n),
        "dx": rng.uniform(-9, 9, n), "dy": rng.uniform(-6, 6, n), "scale": rng.uniform(0.9, 1.08, n),
        "skin": rng.uniform(0, 1, n), "background": rng.uniform(0, 1, n), "shirt": rng.uniform(0, 1, n),
    }


def make_labels(lat: dict, seed: int = 0) -> np.ndarray:
    """int8 [n, 40] in CelebA's -1/1 convention; noisy near z = 0.5 only (see module doc)."""
    rng = np.random.default_rng(seed + 1)
    n = len(lat["z_smile"])
    noise = lambda: np.clip(rng.normal(0, LABEL_NOISE, n), -NOISE_CLIP, NOISE_CLIP)
    smiling = lat["z_smile"] + noise() > 0.5
    blond = lat["z_hair"] + noise() > 0.5
    young = lat["z_young"] + noise() > 0.5
    out = -np.ones((n, len(CELEBA_ATTRIBUTES)), dtype=np.int8)
    for name, v in (("Smiling", smiling), ("Blond_Hair", blond), ("Black_Hair", ~blond),
                    ("Young", young)):
        out[:, CELEBA_ATTRIBUTES.index(name)] = np.where(v, 1, -1)
    return out


def _mix(a, b, t) -> tuple:
    return tuple(int(round(v)) for v in (1 - t) * a + t * b)


def _mouth(draw: ImageDraw.ImageDraw, cx: float, my: float, s: float, z: float, paint=None) -> None:
    """A filled lip shape whose bend goes from frown (z=0) through flat (0.5) to smile (1).

    Along u in [-1, 1] the centre line is my + c (b(u) - 1/2) with b = 1 - u^2: for c > 0 the
    middle sits below the corners (a smile). The lips open (thicker in the middle) as z grows,
    so that even at 32 px a broad smile is a dark crescent and a frown a thin arch."""
    half_w = s * (19 + 9 * z)
    c = s * 20 * (2 * z - 1)
    open_ = s * (3 + 11 * max(0.0, z - 0.4))
    u = np.linspace(-1, 1, 17)
    b = 1 - u ** 2
    mid = my + c * (b - 0.5)
    xs = cx + half_w * u
    top = list(zip(xs, mid - (1.5 * s + 0.15 * open_) * b))
    bottom = list(zip(xs[::-1], (mid + open_ * b)[::-1]))
    paint = paint or _keep
    draw.polygon(top + bottom, fill=paint("lip", LIP))
    teeth = teeth_colour(z)
    ty = mid + 0.35 * open_ * b
    draw.line(list(zip(xs[3:-3], ty[3:-3])), fill=paint("teeth", teeth), width=max(1, int(s * 3)))


def hair_colour(z: float) -> tuple:
    """Black -> brown (z = 0.5, the paper's mild hair colour, §5.4) -> blond, piecewise linear."""
    return _mix(HAIR_BLACK, HAIR_BROWN, 2 * z) if z < 0.5 else _mix(HAIR_BROWN, HAIR_BLOND, 2 * z - 1)


def teeth_colour(z: float) -> tuple:
    """Lip red at z <= 0.6 to white at z >= 0.9: teeth fade in continuously (no threshold in z
    would be visible as a jump in the images)."""
    return _mix(np.array(LIP), np.array([250, 250, 245]), float(np.clip((z - 0.6) / 0.3, 0, 1)))


def _keep(part: str, colour):
    return colour


def render_face(row: dict, paint=None, mode: str = "RGB") -> Image.Image:
    """One 178x218 RGB face from a latent row (floats). Hair and head stay inside rows 23..191
    for any jitter (the crop keeps 20..197); only the shoulders reach below.

    ``paint(part, colour)`` returns the fill of each named part (default: its colour), e.g. a
    label per part in ``mode="L"``: mouth_readout.py draws the same geometry as masks. Parts:
    background, shirt, neck, hair, head, fringe, wrinkle, temple, eye, pupil, brow, nose, lip,
    teeth."""
    p = paint or _keep
    s = row["scale"]
    cx, cy = W / 2 + row["dx"], 120 + row["dy"]
    im = Image.new(mode, (W, H), p("background", _mix(BG_DARK, BG_LIGHT, row["background"])))
    d = ImageDraw.Draw(im)
    hair = hair_colour(row["z_hair"])
    skin = _mix(SKIN_LIGHT, SKIN_DARK, row["skin"])
    shirt = _mix(np.array([40, 60, 150]), np.array([150, 40, 40]), row["shirt"])
    # Shoulders (below the face, partly cut by the crop), hair behind the head, the head.
    d.ellipse([cx - 80 * s, cy + 58 * s, cx + 80 * s, cy + 150 * s], fill=p("shirt", shirt))
    d.rectangle([cx - 16 * s, cy + 40 * s, cx + 16 * s, cy + 70 * s], fill=p("neck", skin))
    d.ellipse([cx - 57 * s, cy - 84 * s, cx + 57 * s, cy + 40 * s], fill=p("hair", hair))
    d.ellipse([cx - 44 * s, cy - 58 * s, cx + 44 * s, cy + 60 * s], fill=p("head", skin))
    # Fringe: hair over the top of the forehead makes the colour visible from the front.
    d.chord([cx - 46 * s, cy - 76 * s, cx + 46 * s, cy - 16 * s], 180, 360, fill=p("fringe", hair))
    _age(d, cx, cy, s, row["z_young"], skin, p)
    for side in (-1, 1):  # eyes and brows
        ex, ey = cx + side * 19 * s, cy - 8 * s
        d.ellipse([ex - 9 * s, ey - 5 * s, ex + 9 * s, ey + 5 * s], fill=p("eye", (250, 250, 250)))
        d.ellipse([ex - 4 * s, ey - 4 * s, ex + 4 * s, ey + 4 * s], fill=p("pupil", (30, 25, 20)))
        d.line([ex - 10 * s, ey - 11 * s, ex + 10 * s, ey - 12 * s], fill=p("brow", hair), width=max(1, int(3 * s)))
    d.line([cx, cy, cx - 4 * s, cy + 14 * s, cx + 3 * s, cy + 15 * s],
           fill=p("nose", _mix(np.array(skin), np.zeros(3), 0.35)), width=max(1, int(2 * s)))
    _mouth(d, cx, cy + 33 * s, s, row["z_smile"], p)
    return im


def _age(d: ImageDraw.ImageDraw, cx, cy, s, z_young: float, skin: tuple, p=_keep) -> None:
    """Old faces (z_young -> 0): darker forehead wrinkles and grey temples."""
    a = 1 - z_young
    line = _mix(np.array(skin), np.zeros(3), 0.5 * a)
    for k in range(3):
        y = cy - (20 + 7 * k) * s
        d.line([cx - 22 * s, y, cx + 22 * s, y], fill=p("wrinkle", line), width=max(1, int(2 * s)))
    grey = _mix(np.array(skin), HAIR_GREY, a)
    for side in (-1, 1):
        d.ellipse([cx + side * 44 * s - 7 * s, cy - 24 * s, cx + side * 44 * s + 7 * s, cy + 8 * s],
                  fill=p("temple", grey))


def _write_text(path: str, lines) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.writelines(lines)
    os.replace(tmp, path)


def split_sizes(n: int) -> tuple[int, int, int]:
    """(train, valid, test) counts in CelebA's proportions; each split non-empty when n >= 3."""
    valid = max(1, round(n * CELEBA_SPLIT[1] / sum(CELEBA_SPLIT))) if n >= 3 else 0
    test = max(1, round(n * CELEBA_SPLIT[2] / sum(CELEBA_SPLIT))) if n >= 3 else 0
    return n - valid - test, valid, test


def make_toy_faces(out_dir: str, n: int = 20000, seed: int = 0, jpeg_quality: int = 95,
                   progress: bool = False) -> dict:
    """Write n faces in CelebA's layout under out_dir; return the latents (dict of arrays)."""
    if n < 1:
        raise UserError(f"--n must be at least 1, got {n}")
    img_dir = os.path.join(out_dir, "img_align_celeba")
    try:
        os.makedirs(img_dir, exist_ok=True)
    except OSError as e:
        raise UserError(f"cannot create {img_dir!r} ({e.strerror or e}); pass a writable --out") from None
    lat = sample_latents(n, seed)
    labels = make_labels(lat, seed)
    files = [f"{i + 1:06d}.jpg" for i in range(n)]
    rows = range(n)
    if progress:
        from tqdm import tqdm
        rows = tqdm(rows, desc="drawing faces", unit="img", mininterval=1.0)
    for i in rows:
        render_face({k: float(v[i]) for k, v in lat.items()}).save(
            os.path.join(img_dir, files[i]), quality=jpeg_quality)
    # The lists go last: a half-written folder has no list files and is refused by celeba.py.
    _write_text(os.path.join(out_dir, "latents.csv"), _latent_lines(files, lat))
    tr, va, _ = split_sizes(n)
    part = [0] * tr + [1] * va + [2] * (n - tr - va)
    _write_text(os.path.join(out_dir, "list_eval_partition.txt"),
                [f"{f} {p}\n" for f, p in zip(files, part)])
    _write_text(os.path.join(out_dir, "list_attr_celeba.txt"),
                [f"{n}\n", " ".join(CELEBA_ATTRIBUTES) + " \n"]
                + [f + " " + " ".join(f"{v:2d}" for v in row) + "\n" for f, row in zip(files, labels)])
    return lat


def _latent_lines(files, lat):
    yield "index,file," + ",".join(LATENT_COLUMNS) + "\n"
    for i, f in enumerate(files):
        yield f"{i},{f}," + ",".join(f"{lat[c][i]:.6f}" for c in LATENT_COLUMNS) + "\n"


def read_latents(data_dir: str) -> dict:
    """latents.csv back as {column: float array} (plus ``file``), in file order."""
    path = os.path.join(data_dir, "latents.csv")
    if not os.path.isfile(path):
        raise UserError(f"{path} is missing; it is written by toy_faces.py (real CelebA has no "
                        "latents)")
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    out = {c: np.array([float(r[c]) for r in rows]) for c in LATENT_COLUMNS}
    out["file"] = [r["file"] for r in rows]
    return out


def preview(data_dir: str, out_png: str, n: int = 64, size: int = 32, zoom: int = 4,
            sort_by: str | None = "z_smile") -> str:
    """A grid of the first n faces after the real crop + resize, sorted by a latent (row-major),
    scaled up ``zoom`` times with nearest neighbour so the 32 px pixels are visible."""
    img_dir = os.path.join(data_dir, celeba.IMAGE_DIR)
    files = sorted(f for f in os.listdir(img_dir) if f.endswith(".jpg"))[:n]
    if sort_by and os.path.isfile(os.path.join(data_dir, "latents.csv")):
        z = read_latents(data_dir)[sort_by][:len(files)]
        files = [files[i] for i in np.argsort(z)]
    cols = int(np.ceil(np.sqrt(len(files))))
    grid = np.full((cols * (size + 1), cols * (size + 1), 3), 255, np.uint8)
    for k, f in enumerate(files):
        r, c = divmod(k, cols)
        grid[r * (size + 1):r * (size + 1) + size, c * (size + 1):c * (size + 1) + size] = \
            celeba.decode_image(os.path.join(img_dir, f), size)
    Image.fromarray(grid).resize((grid.shape[1] * zoom, grid.shape[0] * zoom), Image.NEAREST).save(out_png)
    return out_png


def main(argv=None):
    p = argparse.ArgumentParser(description="Write cartoon faces with known smile/hair/age "
                                "latents in CelebA's folder layout.")
    p.add_argument("--out", default="data/toy_faces")
    p.add_argument("--n", type=int, default=20000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--jpeg-quality", type=int, default=95)
    p.add_argument("--preview", default=None, help="also write a PNG grid of 64 faces at 32 px")
    a = p.parse_args(argv)
    t0 = time.perf_counter()
    make_toy_faces(a.out, a.n, a.seed, a.jpeg_quality, progress=True)
    dt = time.perf_counter() - t0
    tr, va, te = split_sizes(a.n)
    print(f"wrote {a.n} faces to {a.out}/img_align_celeba (train {tr}, valid {va}, test {te}), "
          f"list_attr_celeba.txt, list_eval_partition.txt, latents.csv in {dt:.1f} s "
          f"({1000 * dt / a.n:.2f} ms/image)")
    if a.preview:
        print(f"preview: {preview(a.out, a.preview)}")


if __name__ == "__main__":
    cli(main)

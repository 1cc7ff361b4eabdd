"""Extrapolation through a guidance classifier trained on synthetic data (App. E).

    python -m lab.synthetic_property --run runs/table/ddpm_seed0                 # circles: rings
    python -m lab.synthetic_property --run runs/faces_bench/faces --n 256        # faces: green mouths

App. E: dlib finds the lips of CelebA faces, a green polygon is pasted over them, and a noise-aware
classifier trained on "green lips" against plain faces guides an unconditional DDPM that never saw
a green mouth: the samples get green lips (not always centred). Here, on the two synthetic datasets:

  faces (toy_faces stand-in): the lips and teeth of ``toy_faces._mouth`` at the face's true position,
      scale and z_smile (latents.csv: the stand-in's landmarks, where the paper had dlib's), widened
      by 2 source px as a landmark polygon is, drawn at 178x218 and resized as the stand-in's pixels
      are (face_geometry.resample); its coverage m pastes GREEN: x <- (1 - m) x + m GREEN.
      Detector: fit_geometry finds the face; the mouth is green when at least ``green_min`` pixels of
      the mouth's patch (mouth_readout's) are strongly green (G >= 100, G - max(R, B) >= 60). No
      stand-in face has one such pixel; a pasted mouth has 10..34 at 32 px.
  circles: the disc replaced by a ring at its centre: the disc one px larger than the data's,
      hollowed by the data's disc (16 lit px at 32 and 64 px). Detector: a bright component of the
      ring's size whose centroid pixel is dark (a disc's is lit); detector.py's rule for the rest.

A fixed half of the DDPM's training images (a seeded permutation) carries the overlay, class 1;
the other half is class 0. The overlay is painted once, before the random flip. The classifier is
train.py's (noise-aware, same loop and config), in ``<run>/synthetic_<property>`` beside a link to
the run's DDPM; sampling is sample.py's classifier guidance towards class 1 (§2.2) at each lambda.
Rows: the unguided DDPM, each lambda, and TRAIN_ROWS training images plain and painted (the
detector's false-positive rate and recall). Writes <out>/synthetic_property.json and grid.png (16 per row).
"""
from __future__ import annotations

import argparse
import functools
import os
import time

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFilter

import config as C
from checkpoint import UserError, cli, from_uint8, load_checkpoint, pick_device, to_uint8
from detector import THRESHOLD, component_kind, detect_discs, expected_disc
from rundir import write_json
from toy_circles import render_disc

GREEN = np.array([0, 200, 0])
WIDEN = 5                         # max filter over the lip mask: 2 source px on every side
PROPERTY = {"circles": "ring", "celeba": "green_mouth"}
TRAIN_ROWS = 128                  # training images per reference row (plain, painted)


# ----- circles: a ring for the disc ------------------------------------------------------------

def render_ring(x: int, y: int, size: int) -> np.ndarray:
    """bool (size, size): the disc of radius r + 1 at (x, y) without the data's disc of radius r."""
    r = expected_disc(size)[0]
    return (render_disc(x, y, size, r + 1) >= THRESHOLD) & (render_disc(x, y, size, r) < THRESHOLD)


def paint_rings(images: np.ndarray, index=None) -> np.ndarray:
    """uint8 [N, S, S, C] circles, each disc replaced by the ring at its (rounded) centre (``index``:
    the painter interface, unused). At 32 px the border cuts the ring of a corner disc in two."""
    out = images.copy()
    for im in out:
        for x, y in np.rint(detect_discs(im[..., 0])).astype(int):
            im[render_disc(x, y, im.shape[0], expected_disc(im.shape[0])[0]) >= THRESHOLD] = 0
            im[render_ring(x, y, im.shape[0])] = 255
    return out


@functools.lru_cache(maxsize=None)
def ring_shape(size: int) -> tuple[int, int]:
    """(lit pixels, bounding box side + 2 px of slack) of the ring at this image size."""
    ys, xs = np.nonzero(render_ring(size // 2, size // 2, size))
    return len(ys), max(np.ptp(ys), np.ptp(xs)) + 1 + 2


def ring_kinds(img: np.ndarray) -> list[str]:
    """ring, disc, speck or blob for each bright component of one uint8 image (H, W(, C))."""
    import cv2
    img = img.mean(-1) if img.ndim == 3 else img
    area, box = ring_shape(img.shape[1])
    _, _, stats, centroids = cv2.connectedComponentsWithStats((img >= THRESHOLD).astype(np.uint8), connectivity=8)
    kinds = []
    for (_, _, w, h, a), (cx, cy) in zip(stats[1:], centroids[1:]):
        hollow = img[int(round(cy)), int(round(cx))] < THRESHOLD
        fits = w <= box and h <= box and 0.5 * area <= a <= 1.5 * area
        kinds.append("ring" if hollow and fits else component_kind(w, h, a, img.shape[1]))
    return kinds


def ring_stats(images: np.ndarray) -> dict:
    """Fractions of images with exactly one ring (``property``), at least one ring, exactly one
    disc, no object, two or more objects, or a blob (exclusive but for ``any_ring``)."""
    cats, any_ring = [], []
    for im in images:
        k = [v for v in ring_kinds(im) if v != "speck"]
        cats.append("blob" if "blob" in k else {0: "zero", 1: k[0] if k else ""}.get(len(k), "two_plus"))
        any_ring.append("ring" in k)
    f = lambda c: float(np.mean([v == c for v in cats]))  # noqa: E731
    return {"property": f("ring"), "any_ring": float(np.mean(any_ring)), "one_disc": f("disc"),
            "zero": f("zero"), "two_plus": f("two_plus"), "blob": f("blob")}


# ----- faces: a green mouth --------------------------------------------------------------------

def green_min(size: int) -> int:
    """Strongly green pixels that make a green mouth: 4 at 32 px, scaled with the area."""
    return max(1, round(4 * (size / 32) ** 2))


def paint_green_mouths(images: np.ndarray, landmarks: np.ndarray) -> np.ndarray:
    """uint8 [N, S, S, 3] faces with GREEN pasted over the mouth; ``landmarks`` [N, 4] holds each
    face's (dx, dy, scale, z_smile) in toy_faces' units."""
    import face_geometry as G
    import toy_faces as T
    size, out = images.shape[1], []
    for im, (dx, dy, s, z) in zip(images, landmarks):
        cx, my = T.W / 2 + dx, 120 + dy + 33 * s
        x0, y0 = int(cx) - 40, int(my) - 24            # a canvas that holds every mouth
        mask = Image.new("L", (80, 64), 0)
        T._mouth(ImageDraw.Draw(mask), cx - x0, my - y0, s, z, lambda part, colour: 255)
        mask = np.asarray(mask.filter(ImageFilter.MaxFilter(WIDEN))) > 0
        m = G.resample(mask[None], y0, x0, size)[0, 0, 0].numpy().clip(0, 1)[..., None]
        out.append((1 - m) * im + m * GREEN)
    return np.clip(np.rint(np.stack(out)), 0, 255).astype(np.uint8)


def face_landmarks(data_dir: str, files) -> np.ndarray:
    """[N, 4] (dx, dy, scale, z_smile) of the stand-in's ``files`` from its latents.csv."""
    from toy_faces import read_latents
    if not os.path.isfile(os.path.join(data_dir, "latents.csv")):
        raise UserError(f"{data_dir} has no latents.csv: the green mouth is pasted at the stand-in's "
                        "true mouth (toy_faces.py); real CelebA needs a lip detector (the paper: dlib)")
    lat = read_latents(data_dir)
    row = {f: i for i, f in enumerate(lat["file"])}
    i = [row[f] for f in files]
    return np.stack([lat[c][i] for c in ("dx", "dy", "scale", "z_smile")], 1)


def strongly_green(images: np.ndarray) -> np.ndarray:
    """bool [N, S, S]: G >= 100 and G - max(R, B) >= 60 (no skin, hair, lip, shirt or background)."""
    x = images.astype(np.int32)
    return (x[..., 1] >= 100) & (x[..., 1] - np.maximum(x[..., 0], x[..., 2]) >= 60)


def green_stats(images: np.ndarray, readout: bool = True) -> dict:
    """Fractions of faces with a green mouth (``property``), with green anywhere, and (``readout``)
    the mouth readout's classes (its template is a red mouth: a green one reads faded or other)."""
    import face_geometry as G
    import mouth_readout as MR
    import toy_faces as T
    size, need = images.shape[1], green_min(images.shape[1])
    geo = G.fit_geometry(images)
    green = strongly_green(images)
    mouth, classes = [], []
    for im, g, (dx, dy, s) in zip(images, green, geo):
        rows, cols = MR._patch(T.W / 2 + dx, 120 + dy + 33 * s, s, size)
        mouth.append(g[rows][:, cols].sum() >= need)
        if readout:
            classes.append(MR.classify(MR.fit_mouth(im, (dx, dy, s))))
    out = {"property": float(np.mean(mouth)), "green_anywhere": float(np.mean(green.sum((1, 2)) >= need))}
    return {**out, **{f"mouth_{c}": float(np.mean([v == c for v in classes])) for c in MR.CLASSES if classes}}


# ----- the labelled training set ---------------------------------------------------------------

def marked_half(n: int, seed: int) -> np.ndarray:
    """bool [n]: the images that carry the overlay, n // 2 of them by a seeded permutation."""
    marked = np.zeros(n, bool)
    marked[np.random.default_rng(seed).permutation(n)[:n // 2]] = True
    return marked


class PropertyData:
    """The DDPM's training set with the overlay on a fixed half (label 1), the rest plain (0);
    ``batch`` / ``take`` as toy_circles.CirclesData, flips after the overlay."""

    def __init__(self, base, paint, seed: int = 0, log=print):
        n = len(base)
        self.base, self.flip = base, base.flip
        self.marked = marked_half(n, seed)
        where = np.flatnonzero(self.marked)
        self.slot = np.cumsum(self.marked) - 1            # row of painted[] of a marked index
        t0 = time.time()
        self.painted = np.concatenate([paint(to_uint8(base.take(torch.from_numpy(c), None)[0]), c)
                                       for c in np.array_split(where, max(1, len(where) // 512))])
        log(f"overlay painted on {len(where)} of {n} training images in {time.time() - t0:.0f} s")

    def __len__(self):
        return len(self.base)

    def batch(self, n: int, generator: torch.Generator):
        return self.take(torch.randint(0, len(self), (n,), generator=generator), generator)

    def take(self, idx: torch.Tensor, generator: torch.Generator | None):
        x, _ = self.base.take(idx, None)
        m = self.marked[idx.numpy()]
        if m.any():
            x[torch.from_numpy(m)] = from_uint8(self.painted[self.slot[idx.numpy()[m]]], x.shape[1])
        if self.flip and generator is not None:
            f = torch.rand(len(idx), generator=generator) < 0.5
            x = torch.where(f[:, None, None, None], x.flip(-1), x)
        return x, torch.from_numpy(m.astype(np.int64))


def painter(cfg, base):
    """paint(uint8 images, their indices in ``base``) for the run's dataset."""
    if cfg["data"].dataset == "circles":
        return paint_rings
    marks = face_landmarks(cfg["data"].data_dir, base.files)
    return lambda images, index: paint_green_mouths(images, marks[index])


def train_property_classifier(run: str, out: str, clf_steps: int | None = None, device="cpu",
                              overwrite: bool = False, log=print) -> dict:
    """train.py's noise-aware classifier on the run's images, half with the overlay, in ``out``
    (next to a link to the run's DDPM, so its data and schedule are the run's). A finished one
    is kept unless ``overwrite``. Returns its checkpoint."""
    import train
    from rundir import run_lock
    from trainer import Dist
    os.makedirs(out, exist_ok=True)
    link = os.path.join(out, "ddpm.pt")
    if not os.path.lexists(link):
        os.symlink(os.path.relpath(os.path.abspath(os.path.join(run, "ddpm.pt")), os.path.abspath(out)), link)
    have = os.path.exists(os.path.join(out, "classifier.pt"))
    argv = ["--out", out, "--model", "classifier", "--no-grid"] + (["--clf-steps", str(clf_steps)] if clf_steps else [])
    args = train.build_parser().parse_args(argv + (["--overwrite"] if overwrite else ["--resume"] if have else []))
    cfg = C.from_dict(load_checkpoint(run, "ddpm")["config"])
    with run_lock(out):
        train.train_classifier(args, torch.device(device), Dist(), spectral=False,
                               wrap=lambda base: PropertyData(base, painter(cfg, base), cfg["train"].seed, log))
    return load_checkpoint(out, "classifier")


# ----- the experiment --------------------------------------------------------------------------

def experiment(run: str, lambdas=(10.0, 30.0, 100.0), n: int = 256, seed: int = 0, out: str | None = None,
               clf_steps: int | None = None, steps: int | None = None, batch_size: int = C.SampleConfig.batch_size,
               device=None, overwrite: bool = False, train_rows: int = TRAIN_ROWS, log=print) -> dict:
    """Train (or reuse) the classifier, sample unguided and guided towards class 1, detect the
    property (and on ``train_rows`` plain and painted training images). Returns {rows: {name:
    metrics}, grid: {name: uint8 images}, clean_accuracy, ...}."""
    from sample import load_ddpm, prepare
    from train import load_data
    device = pick_device(device)
    models = load_ddpm(run, device)
    cfg = models[1]
    prop = PROPERTY[cfg["data"].dataset]
    out = out or os.path.join(run, f"synthetic_{prop}")
    ck = train_property_classifier(run, out, clf_steps, device, overwrite, log)
    stats = ring_stats if prop == "ring" else green_stats
    rows, grid = {}, {}
    for lam in [0.0, *lambdas]:
        name = "uncond" if lam == 0 else f"λ = {lam:g}"
        draw = prepare(out, device, steps, "none" if lam == 0 else "single", scale=lam, target=1, models=models)
        t = time.time()
        images = to_uint8(draw(n, batch_size, seed))
        dt = round(time.time() - t, 1)
        rows[name] = {"lambda": lam, **stats(images), "sample_seconds": dt}
        grid[name] = images[:16]
        log(describe(name, rows[name]))
    base = load_data(cfg["data"])
    paint, marked = painter(cfg, base), marked_half(len(base), cfg["train"].seed)   # as the classifier's
    for name, flag in (("train plain", False), ("train painted", True)):
        idx = np.flatnonzero(marked == flag)
        idx = idx[np.linspace(0, len(idx) - 1, min(train_rows, len(idx))).round().astype(int)]
        images = to_uint8(base.take(torch.from_numpy(idx), None)[0])
        images = paint(images, idx) if flag else images
        rows[name] = {"lambda": None, **stats(images)}
        grid[name] = images[:16]
        log(describe(name, rows[name]))
    return {"property": prop, "run": run, "classifier": out, "rows": rows, "grid": grid,
            "clean_accuracy": ck.get("clean_accuracy"), "clf_steps": ck["config"]["classifier"]["clf_steps"],
            "clf_seconds": round(ck["meta"]["train_seconds"], 1), "n": n, "seed": seed}


def describe(name: str, row: dict) -> str:
    return f"{name}: " + ", ".join(f"{k} {v:.3f}" for k, v in row.items() if v is not None)


def save_rows_grid(result: dict, path: str) -> None:
    """One grid row of 16 images per row of the result (uncond, each lambda, train plain / painted)."""
    from sample import save_grid
    imgs = np.concatenate([np.pad(v, ((0, 16 - len(v)), (0, 0), (0, 0), (0, 0)), constant_values=80)
                           for v in result["grid"].values()])             # short rows: grid grey
    save_grid(from_uint8(imgs), path, nrow=16)


def parse_lambdas(text: str) -> list[float]:
    try:
        lams = [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        lams = []
    if not lams or any(v <= 0 for v in lams):
        raise UserError(f"--lambdas {text!r}: give positive guidance scales, e.g. 10,30,100")
    return lams


def build_parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", required=True, help="a trained run (its DDPM never saw the property)")
    p.add_argument("--lambdas", default="10,30,100", help="single-guidance scales towards class 1")
    p.add_argument("--n", type=int, default=256, help="samples per row")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--clf-steps", type=int, default=None, help="classifier steps (default: the run's preset)")
    p.add_argument("--steps", type=int, default=None, help="respaced sampling steps (default: the run's)")
    p.add_argument("--batch-size", type=int, default=C.SampleConfig.batch_size)
    p.add_argument("--out", default=None, help="classifier folder (default: <run>/synthetic_<property>)")
    p.add_argument("--overwrite", action="store_true", help="retrain the classifier")
    p.add_argument("--device", default=None)
    return p


def main(argv=None) -> dict:
    a = build_parser().parse_args(argv)
    if a.n < 1:
        raise UserError("--n must be positive")
    r = experiment(a.run, parse_lambdas(a.lambdas), a.n, a.seed, a.out, a.clf_steps, a.steps, a.batch_size,
                   a.device, a.overwrite)
    write_json(os.path.join(r["classifier"], "synthetic_property.json"), {k: v for k, v in r.items() if k != "grid"})
    save_rows_grid(r, os.path.join(r["classifier"], "grid.png"))
    print(f"wrote {r['classifier']}/synthetic_property.json and grid.png")
    return r


if __name__ == "__main__":
    cli(main)

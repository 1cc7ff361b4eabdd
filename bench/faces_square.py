"""Why §6's central square is nearly empty by calibrated p on the face stand-in (Fig. 9;
results/faces_square.json).

    python bench/faces_square.py [--run runs/faces_bench/two] [--n-test 2000]
        [--eval-classifier runs/faces_bench/filter/eval_Smiling.pt,runs/faces_bench/filter_hair/eval_Black_Hair.pt]

Reads a two-attribute run that evaluate.py has evaluated (its cached uncond / multi samples and
evaluation classifiers; bench/faces_pipeline.py makes runs/faces_bench/two) and the stand-in's test
split, whose true latents are known. Three questions, one figure:

1. How steep is each calibrated evaluation classifier in the true latent? Test faces binned by true
   z: the mean calibrated p per bin, the z-interval where it lies in [0.3, 0.7], and the Bayes curve
   of the stand-in's labels, p(y = 1 | z) = Φ((z - 0.5) / σ) with σ = toy_faces.LABEL_NOISE (the
   clip of the noise at ±NOISE_CLIP only matters past it). A classifier calibrated on such labels
   can only call a face "mild" (p in [0.3, 0.7]) when z is within ~0.5σ of 0.5.
2. What would a perfect interpolator score? The test faces cover the square uniformly in the true
   latents: their central-square fractions by true z and by calibrated p are the ceiling of each
   readout for a uniform model.
3. Is the gap in the samples the classifiers' steepness or the guidance? Each sample's true-z proxy
   (the z-regressor) is pushed through the measured p(z) curve of question 1: if the predicted p-square
   fraction matches the measured one, the samples are where the z-readout says and the p-readout is
   only steeper. Also the quartiles of each latent, uncond vs multi (does the guided hair sweep
   [0, 1] or stay brown?).

The readout this points to is reported as "p read back to z": the calibrated p mapped to a latent
through the test split's p(z) curve (monotone interpolation). It uses the stand-in's true latents,
which CelebA does not have, so it is a stand-in diagnostic, not a CelebA metric.
"""
import argparse
import math
import os
import sys

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import evaluate_faces as EF  # noqa: E402
from celeba import CelebAData  # noqa: E402
from checkpoint import UserError, cli, pick_device  # noqa: E402
from eval_classifier import ZREG_STEPS, true_latent  # noqa: E402
from figures import pyplot, save  # noqa: E402
from results.record import Recorder  # noqa: E402
from rundir import load_npz  # noqa: E402
from toy_faces import LABEL_NOISE  # noqa: E402

BINS = np.linspace(0, 1, 21)
LO, HI = 0.3, 0.7


def bayes_p(z, sigma: float = LABEL_NOISE) -> np.ndarray:
    """p(y = 1 | z) of the stand-in's labels 1[z + e > 0.5], e ~ N(0, σ) (unclipped)."""
    return np.array([0.5 * (1 + math.erf((v - 0.5) / (sigma * math.sqrt(2)))) for v in np.atleast_1d(z)])


def p_of_z(z, p) -> tuple[np.ndarray, np.ndarray]:
    """(bin centres, mean p per bin) of the true latent; empty bins are left out."""
    at = np.clip(np.digitize(z, BINS) - 1, 0, len(BINS) - 2)
    centres = (BINS[:-1] + BINS[1:]) / 2
    keep = np.bincount(at, minlength=len(centres)) > 0
    mean = np.bincount(at, p, len(centres))[keep] / np.bincount(at, minlength=len(centres))[keep]
    return centres[keep], np.maximum.accumulate(mean)  # monotone, so it can be inverted


def mild_interval(centres, curve) -> tuple[float, float]:
    """The z where the (monotone) curve crosses 0.3 and 0.7."""
    return float(np.interp(LO, curve, centres)), float(np.interp(HI, curve, centres))


def square(a, b) -> float:
    return float(np.mean((a >= LO) & (a <= HI) & (b >= LO) & (b <= HI)))


def quartiles(v) -> list:
    return [round(float(q), 3) for q in np.percentile(v, [25, 50, 75])]


def plot(curves, rows, attrs, path):
    plt = pyplot()
    fig, axes = plt.subplots(1, 3, figsize=(14, 3.8))
    zz = np.linspace(0, 1, 201)
    for ax, attr in zip(axes[:2], attrs):
        centres, curve = curves[attr]
        ax.plot(centres, curve, "o-", label="calibrated p, test faces (mean per z bin)")
        ax.plot(zz, bayes_p(zz), "--", label=f"Bayes p(y | z), label noise σ = {LABEL_NOISE:g}")
        ax.axhspan(LO, HI, color="grey", alpha=0.15)
        ax.axvspan(LO, HI, color="orange", alpha=0.08)
        ax.set(xlabel=f"true latent of {attr}", ylabel="p", title=f"{attr}: p in [{LO}, {HI}] ⇔ z in "
               f"[{rows['interval'][attr][0]:.2f}, {rows['interval'][attr][1]:.2f}]")
        ax.legend(fontsize=7)
    ax = axes[2]
    names = list(rows["square"])
    x = np.arange(len(names))
    for k, (key, label) in enumerate((("p", "calibrated p"), ("z", "true-z proxy"), ("p_to_z", "p read back to z"))):
        ax.bar(x + (k - 1) * 0.27, [100 * rows["square"][n].get(key, np.nan) for n in names], 0.27, label=label)
    ax.set(xticks=x, xticklabels=names, ylabel="% in the central square [0.3, 0.7]²")
    ax.legend(fontsize=7)
    save(fig, path, tight=True)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                allow_abbrev=False)
    p.add_argument("--run", default="runs/faces_bench/two")
    p.add_argument("--eval-classifier", default=None,
                   help="the evaluation classifiers evaluate.py used, comma-separated (default: "
                        "<parent of --run>/filter/eval_Smiling.pt,<parent>/filter_hair/eval_Black_Hair.pt "
                        "where both exist, as bench/faces_pipeline.py lays them out; else evaluate.py's search)")
    p.add_argument("--zreg-steps", type=int, default=ZREG_STEPS, help="steps of the true-z regressor (as evaluate.py)")
    p.add_argument("--n-test", type=int, default=2000, help="test faces for the p(z) curves (0: all)")
    a = p.parse_args(argv)
    device = pick_device("cpu")
    caches = {m: os.path.join(a.run, f"eval_{m}.npz") for m in ("uncond", "multi")}
    if not all(os.path.isfile(c) for c in caches.values()):
        raise UserError(f"{a.run} has no evaluated samples (eval_uncond.npz, eval_multi.npz); run python "
                        f"evaluate.py --run {a.run} first (bench/faces_pipeline.py does)")
    rec = Recorder("faces_square", "§6's central square on the face stand-in: calibrated p against the true latent",
                   argv=None if argv is None else [os.path.abspath(__file__), *argv])
    parent = os.path.dirname(os.path.abspath(a.run))
    pair = [os.path.join(parent, "filter", "eval_Smiling.pt"), os.path.join(parent, "filter_hair", "eval_Black_Hair.pt")]
    if a.eval_classifier is None and all(os.path.isfile(f) for f in pair):
        a.eval_classifier = ",".join(pair)
    _, cfg, clfs, zregs = EF.setup(a.run, device, a.eval_classifier, a.zreg_steps)
    if len(clfs) < 2 or any(z is None for z in zregs[:2]):
        raise UserError(f"{a.run} is not a two-attribute stand-in run (it needs two evaluation classifiers "
                        "with true latents)")
    clfs, zregs = clfs[:2], zregs[:2]
    attrs = [c.attribute for c in clfs]
    data_dir = cfg["data"].data_dir
    test = CelebAData(data_dir, cfg["data"].image_size, attrs[0], "test", flip=False, progress=False)
    rows_at = np.arange(len(test.files))
    if a.n_test:
        rows_at = np.sort(np.random.default_rng(0).permutation(rows_at)[:a.n_test])
    images = np.asarray(test.images[rows_at])
    files = [test.files[i] for i in rows_at]
    curves, interval, test_p, test_z = {}, {}, {}, {}
    for c in clfs:
        test_p[c.attribute] = EF.batched(c.prob, images)
        test_z[c.attribute] = true_latent(data_dir, c.attribute, files)
        curves[c.attribute] = p_of_z(test_z[c.attribute], test_p[c.attribute])
        interval[c.attribute] = mild_interval(*curves[c.attribute])
    back = lambda attr, v: np.interp(v, curves[attr][1], curves[attr][0])  # noqa: E731  p -> z

    sq = {"test faces (true z uniform)": {
        "p": square(*(test_p[t] for t in attrs)), "z": square(*(test_z[t] for t in attrs)),
        "p_to_z": square(*(back(t, test_p[t]) for t in attrs))}}
    spread = {}
    for m, path in caches.items():
        z = load_npz(path)
        if z is None or "images" not in z:
            raise UserError(f"{path} cannot be read; run python evaluate.py --run {a.run} again")
        ims = z["images"]
        ps = {c.attribute: EF.batched(c.prob, ims) for c in clfs}
        zs = {c.attribute: zr(ims) for c, zr in zip(clfs, zregs)}
        predicted = [np.interp(zs[t], *curves[t]) for t in attrs]  # the z proxy through p(z)
        sq[m] = {"p": square(*(ps[t] for t in attrs)), "z": square(*(zs[t] for t in attrs)),
                 "p_predicted_from_z": square(*predicted), "p_to_z": square(*(back(t, ps[t]) for t in attrs)),
                 "n": int(len(ims))}
        spread[m] = {t: {"z_quartiles": quartiles(zs[t]), "p_quartiles": quartiles(ps[t]),
                         "z_frac_03_07": EF.frac_in(zs[t], LO, HI), "p_frac_03_07": EF.frac_in(ps[t], LO, HI)}
                     for t in attrs}
    width = {t: interval[t][1] - interval[t][0] for t in attrs}
    plot(curves, {"interval": interval, "square": sq}, attrs, rec.figure_path("faces_square.png"))
    pct = lambda v: "–" if v is None else f"{100 * v:.1f} %"  # noqa: E731
    tables = [
        {"title": f"how steep each calibrated evaluation classifier is in the true latent ({len(files)} test faces)",
         "columns": ["attribute", "p in [0.3, 0.7] ⇔ z in", "width", "Bayes width (σ = label noise)"],
         "rows": [[t, f"[{interval[t][0]:.3f}, {interval[t][1]:.3f}]", f"{width[t]:.3f}",
                   f"{2 * 0.5244 * LABEL_NOISE:.3f}"] for t in attrs]},
        {"title": "central square [0.3, 0.7]² by each readout",
         "columns": ["images", "calibrated p", "true-z proxy (test: true z)", "p predicted from the z proxy",
                     "p read back to z"],
         "rows": [[m, pct(r["p"]), pct(r["z"]), pct(r.get("p_predicted_from_z")), pct(r["p_to_z"])]
                  for m, r in sq.items()]},
        {"title": "where the samples sit in each latent (z-regressor proxy; quartiles)",
         "columns": ["samples", "attribute", "z quartiles", "z in [0.3, 0.7]", "p in [0.3, 0.7]"],
         "rows": [[m, t, ", ".join(f"{q:.2f}" for q in s["z_quartiles"]), pct(s["z_frac_03_07"]),
                   pct(s["p_frac_03_07"])] for m, d in spread.items() for t, s in d.items()]}]
    notes = [f"A calibrated p in [0.3, 0.7] means z within {min(width.values()) / 2:.3f}–"
             f"{max(width.values()) / 2:.3f} of the boundary on this stand-in; test faces spread uniformly over "
             f"the square score {pct(sq['test faces (true z uniform)']['p'])} by p against "
             f"{pct(sq['test faces (true z uniform)']['z'])} by true z.",
             f"Multi: measured p-square {pct(sq['multi']['p'])}, predicted from its z proxy through p(z) "
             f"{pct(sq['multi']['p_predicted_from_z'])}; true-z proxy {pct(sq['multi']['z'])}; uncond "
             f"{pct(sq['uncond']['p'])} / {pct(sq['uncond']['z'])}."]
    path = rec.write({"interval": interval, "width": width, "square": sq, "spread": spread,
                      "label_noise": LABEL_NOISE, "curves": {t: [c.tolist() for c in curves[t]] for t in attrs}},
                     seeds={"sampling": [0]}, n=sq["multi"]["n"], tables=tables, notes=notes)
    print("\n".join(notes))
    print(f"wrote {path}")


if __name__ == "__main__":
    cli(main)

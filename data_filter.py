"""Extract an extreme subset of CelebA for one attribute (§4.3, App. D.1, §5.2, §5.4, App. D.3).

    python data_filter.py --data-dir data/toy_faces --attribute Smiling
    python data_filter.py --data-dir DIR --attribute Young --k-per-class 7000,15000 --oversample 2,1
    python data_filter.py --data-dir DIR --attribute Blond_Hair/Black_Hair   # §5.4: blond vs black

Three stages, all on the train split (labels y = CelebA's 0/1 for the attribute):
  (a) a clean classifier p_theta trained on every train image; keep x when p_theta(y | x) > tau1,
      i.e. it is confident AND agrees with the label: the set S (D_filter in App. D.1);
  (b) an ensemble of 5 clean classifiers on disjoint, label-stratified folds of S ("distinct
      subsets", §4.3): member k trains on fold k and judges only the other folds; keep x when all
      its ensemble - 1 held-out judgements give p_k(y | x) > tau2: the set S' (D*). App. D.3's
      (error rate)^5 assumes independent judgements by models not trained on the image; 5
      members give 4 per image, (error rate)^4, --ensemble 6 gives 5;
  (c) the calibrated evaluation classifier of §5 (eval_classifier.py; trained here or reused from
      --out when its data folder, attribute and image size match) ranks S': class 1 keeps the
      highest p, class 0 the lowest p, the most extreme first on each side (§4.3 "the k most
      extreme samples on each side", §5.2 "the 5k examples with the lowest and highest
      likelihood"). Each --k gives one list, k/2 per class (or split as --k-per-class), so the
      lists are nested (60k > 30k > 10k > 5k in §5.2). --oversample repeats the indices of a class
      (§5.4: the 7k old faces twice, the 15k young once).
(The authors' Young/hair scripts skip the label check of (a)/(b) and keep the *least* extreme of
one class; this module does neither.)

Writes in --out (default runs/filter_<Attribute>): index_k<k>.txt per k and index.txt (= the
largest) in the authors' format (one 0-based train index per line, celeba.read_index_list),
eval_<Attribute>.pt, filter_summary.json (counts per class after each stage, taus, k's, seconds
per stage, evaluation-classifier metrics and, on the toy_faces stand-in, the true latent of what
each stage kept) and filter_hist.png (calibrated p of all train images vs the kept ones).

Thresholds: the paper chose tau1, tau2 for precision 1 on 200 hand-labelled clear faces (App. D.1;
values not in the text). The ``paper`` preset takes the authors' released config: tau2 = 0.9999
(ensemble agreement, ``keep_thr``), tau1 = 0.95 (stage (a) runs named ``agree_095``). ``cpu``
keeps tau1 = tau2 = 0.9: if each member errs confidently on a mild face 10 % of the time, four
held-out judgements keep it with probability 1e-4 (App. D.3: 15 %, five: 7.6e-5).
"""
from __future__ import annotations

import argparse
import dataclasses
import glob
import os
import time
from dataclasses import dataclass
from typing import Callable

import numpy as np

import config as C
from checkpoint import UserError, cli, ensure_writable_dir, pick_device
from rundir import write_json
from config import knob
from eval_classifier import (EvalClassifier, arch_of, eval_path, logits_of, probs_of,
                             train_clean_classifier, train_eval_classifier, true_latent)


@dataclass
class FilterConfig:
    image_size: int = knob(32, "image side in pixels of every classifier (paper: 64)")
    steps: int = knob(400, "training steps of the stage (a) classifier (all train images)")
    ensemble_steps: int = knob(300, "training steps of each ensemble member (stage b)")
    eval_steps: int = knob(800, "training steps of the evaluation classifier (stage c, §5); longer "
                           "makes it over-confident but a worse ranker (eval_classifier.py)")
    batch_size: int = knob(64, "batch size of every classifier")
    lr: float = knob(1e-3, "peak learning rate (AdamW, 5% warm-up, cosine decay)")
    clf_channels: int = knob(16, "base width of the clean classifiers (NoisyClassifier at t = 0)")
    clf_channel_mult: tuple = knob((1, 2, 4), "width multiplier per resolution")
    clf_res_blocks: int = knob(1, "residual blocks per resolution")
    clf_attention_resolutions: tuple = knob((8,), "resolutions (in px) with self-attention")
    ensemble: int = knob(5, "ensemble members of stage (b) (App. D.1: 5); each trains on its own "
                         "fold of S and judges the other folds")
    tau1: float = knob(0.9, "stage (a): keep x if p(y_label | x) > tau1")
    tau2: float = knob(0.9, "stage (b): keep x if every member gives p(y_label | x) > tau2")
    seed: int = knob(0, "seed (member m uses seed + 1 + m, the evaluation classifier seed + 100)")


@dataclass
class SelectConfig:
    k: tuple = knob((3000, 1500, 500), "sizes of the nested lists (distinct images, k/2 a class)")
    k_per_class: tuple = knob((), "A,B: class 0 and class 1 images of the largest list, smaller "
                              "--k split in the same ratio (§5.4: 7000,15000 old,young)")
    oversample: tuple = knob((1, 1), "times each kept index of class 0, class 1 is repeated in "
                             "the lists (§5.4: 2,1)")


# cpu: the 20k-face stand-in at 32 px in a few minutes on 2 cores (7 trainings + inference).
# Its k's keep ~19 % of each class, so that only extreme faces are kept: a larger k reaches into
# the mild faces the experiment must not train on (why: RESULTS.md#faces_pipeline).
# paper: 64 px, the guidance classifier's widths (config.py), lr 3e-4 (App. C), §5.2's k's, and
# the thresholds of the authors' released code: ensemble agreement keep_thr = 0.9999 (tau2), stage
# (a) at 0.95 (tau1; its runs are named agree_095).
PRESETS = {
    "cpu": {},
    "paper": {"filter": dict(image_size=64, steps=20000, ensemble_steps=10000, eval_steps=30000,
                             batch_size=128, lr=3e-4, clf_channels=64, clf_channel_mult=(1, 2, 3, 4),
                             clf_res_blocks=2, clf_attention_resolutions=(8,), tau1=0.95, tau2=0.9999),
              "select": dict(k=(60000, 30000, 10000, 5000))},
}
Fit = Callable  # (rows, seed, steps) -> scorer: rows -> P(y = 1 | x) as a float array


def make_configs(preset: str = "cpu", **overrides) -> tuple[FilterConfig, SelectConfig]:
    names = lambda cls: {f.name for f in dataclasses.fields(cls)}
    pick = lambda cls, group: cls(**{**PRESETS[preset].get(group, {}),
                                     **{k: v for k, v in overrides.items() if k in names(cls)}})
    fcfg, scfg = pick(FilterConfig, "filter"), pick(SelectConfig, "select")
    if scfg.k_per_class and "k" not in overrides:  # --k-per-class alone: one list of A + B
        scfg.k = (sum(scfg.k_per_class),)
    return fcfg, scfg


def check_select(s: SelectConfig) -> None:
    if not s.k or min(s.k) < 2:
        raise UserError(f"--k {','.join(map(str, s.k))}: give list sizes >= 2, e.g. --k 6000,3000")
    if s.k_per_class and (len(s.k_per_class) != 2 or min(s.k_per_class) < 1):
        raise UserError("--k-per-class takes two positive counts (class 0, class 1), e.g. 7000,15000")
    if len(s.oversample) != 2 or min(s.oversample) < 1:
        raise UserError("--oversample takes two factors >= 1 (class 0, class 1), e.g. 2,1")


# ----- the selection logic (pure numpy) ---------------------------------------------------------

def p_label(p1: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """p(y_label | x) from P(y = 1 | x)."""
    return np.where(labels == 1, p1, 1.0 - p1)


def ensemble_folds(rows: np.ndarray, labels: np.ndarray, n: int, seed: int) -> list[tuple]:
    """(trained on, judged) rows of each of n members: ``rows`` dealt into n disjoint folds, each
    class shuffled and dealt in turn (folds differ by at most one image per class); member k
    trains on fold k and judges every other fold, so each row is judged by n - 1 members, none
    of which trained on it."""
    rng, rows = np.random.default_rng(seed), np.asarray(rows)
    fold = np.empty(len(rows), dtype=np.int64)
    for c in np.unique(labels[rows]):
        at = rng.permutation(np.flatnonzero(labels[rows] == c))
        fold[at] = (np.arange(len(at)) + rng.integers(n)) % n
    return [(rows[fold == k], rows[fold != k]) for k in range(n)]


def class_sizes(total: int, k_per_class=()) -> tuple[int, int]:
    """(class 0, class 1) counts of a list of ``total``: halves (class 1 gets the odd one), or
    the ratio A:B of --k-per-class."""
    if not k_per_class:
        return total // 2, total - total // 2
    a, b = k_per_class
    k0 = int(round(total * a / (a + b)))
    return k0, total - k0


def rank_extremes(rows, labels, p) -> tuple[np.ndarray, np.ndarray]:
    """Rows of class 0 by increasing p and of class 1 by decreasing p: most extreme first on each
    side. Ties are broken by row, so the order (and every list) is deterministic."""
    rows, labels, p = np.asarray(rows), np.asarray(labels), np.asarray(p, dtype=np.float64)
    r0, r1 = rows[labels[rows] == 0], rows[labels[rows] == 1]
    return r0[np.lexsort((r0, p[r0]))], r1[np.lexsort((r1, -p[r1]))]


def check_k(n0: int, n1: int, totals, k_per_class=(), attribute="attribute",
            where="the filter kept", loosen=" or loosen --tau1/--tau2") -> None:
    """UserError unless the largest list fits the n0, n1 images (survivors) of class 0, 1."""
    big = max(totals)
    k0, k1 = class_sizes(big, k_per_class)
    if k0 > n0 or k1 > n1:
        fix = f"at most {2 * min(n0, n1)}" if not k_per_class else f"--k-per-class at most {n0},{n1}"
        raise UserError(f"--k {big} needs {k0} images of class 0 and {k1} of class 1 "
                        f"({attribute}=0/1) but {where} {n0} and {n1}; lower --k ({fix}){loosen}")


def select(rows, labels, p, totals, k_per_class=(), attribute="attribute") -> dict:
    """{total: (kept class-0 rows, kept class-1 rows)}: the first k_c of each ranking, so every
    list is a subset of every larger one. A k_c above the survivors of a class is a UserError."""
    o0, o1 = rank_extremes(rows, labels, p)
    check_k(len(o0), len(o1), totals, k_per_class, attribute)
    return {t: (o0[:class_sizes(t, k_per_class)[0]], o1[:class_sizes(t, k_per_class)[1]])
            for t in sorted(set(totals), reverse=True)}


def index_list(kept0, kept1, oversample=(1, 1)) -> np.ndarray:
    """Sorted rows of both classes, each repeated its class's oversampling factor."""
    return np.sort(np.concatenate([np.repeat(kept0, oversample[0]), np.repeat(kept1, oversample[1])]))


def _counts(stage: str, rows, labels) -> dict:
    y = np.asarray(labels)[rows]
    return {"stage": stage, "class_0": int((y == 0).sum()), "class_1": int((y == 1).sum()),
            "total": int(len(y))}


def latent_stats(z: np.ndarray) -> dict:
    """The true latent of kept images: range and how many are mild (§4.1, §5.4's [0.2, 0.8])."""
    if not len(z):
        return {"n": 0}
    return {"n": int(len(z)), "min": float(z.min()), "max": float(z.max()), "mean": float(z.mean()),
            "in_0.3_0.7": int(((z >= 0.3) & (z <= 0.7)).sum()),
            "in_0.2_0.8": int(((z >= 0.2) & (z <= 0.8)).sum())}


def agreement_stats(a: np.ndarray) -> dict:
    """Quantiles of stage (b)'s least confident held-out judgement p(y_label | x) over a class."""
    if not len(a):
        return {"n": 0}
    q = np.quantile(a, [0.01, 0.5, 0.99])
    return {"n": int(len(a)), "q01": float(q[0]), "median": float(q[1]), "q99": float(q[2]),
            "max": float(a.max())}


class FilterShortfall(UserError):
    """Stage (b) kept too few images for --k; ``summary`` holds the counts and agreement so far."""

    def __init__(self, message: str, summary: dict):
        super().__init__(message)
        self.summary = summary


# ----- the three stages -------------------------------------------------------------------------

def run_filter(labels, attribute: str, fcfg: FilterConfig, scfg: SelectConfig, fit: Fit,
               eval_probs: Callable, latent=None, log=print) -> dict:
    """Run stages (a), (b), (c). ``fit(rows, seed, steps)`` trains a clean classifier on the train
    positions ``rows`` and returns a scorer (rows -> P(y = 1 | x)); ``eval_probs()`` returns the
    calibrated p of the evaluation classifier on every train image and a dict about it.
    Returns {"lists": {k: (rows0, rows1)}, "p_eval", "summary"}; positions, not CelebA indices."""
    check_select(scfg)
    if fcfg.ensemble < 2:
        raise UserError(f"--ensemble {fcfg.ensemble}: stage (b) needs at least 2 members (each "
                        "judges only the folds it did not train on); use --ensemble 5")
    labels = np.asarray(labels)
    everything = np.arange(len(labels))
    counts, seconds, t0 = [_counts("train", everything, labels)], {}, time.perf_counter()
    stages = {"train": everything}
    check_k(counts[0]["class_0"], counts[0]["class_1"], scfg.k, scfg.k_per_class, attribute,
            "the train split has", "")  # before any training

    t = time.perf_counter()
    log(f"(a) clean classifier on all {len(labels)} train images ({fcfg.steps} steps)")
    p_a = fit(everything, fcfg.seed, fcfg.steps)(everything)
    S = everything[p_label(p_a, labels) > fcfg.tau1]
    stages["a_confident_agreeing"], seconds["a"] = S, time.perf_counter() - t
    counts.append(_counts("a_confident_agreeing", S, labels))
    if min(counts[-1]["class_0"], counts[-1]["class_1"]) < fcfg.ensemble:
        raise UserError(f"stage (a) kept {len(S)} images ({counts[-1]['class_0']} of class 0, "
                        f"{counts[-1]['class_1']} of class 1): too few for {fcfg.ensemble} folds "
                        "with both classes; lower --tau1 or train longer (--steps)")

    t = time.perf_counter()
    # The least confident held-out judgement of each image in S: kept iff it exceeds tau2.
    agree = np.ones(len(labels))
    for m, (own, judged) in enumerate(ensemble_folds(S, labels, fcfg.ensemble, fcfg.seed)):
        log(f"(b) ensemble member {m + 1}/{fcfg.ensemble} on {len(own)} images, judging the other "
            f"{len(judged)} ({fcfg.ensemble_steps} steps)")
        p = fit(own, fcfg.seed + 1 + m, fcfg.ensemble_steps)(judged)
        agree[judged] = np.minimum(agree[judged], p_label(p, labels[judged]))
    S2 = S[agree[S] > fcfg.tau2]
    stages["b_ensemble"], seconds["b"] = S2, time.perf_counter() - t
    counts.append(_counts("b_ensemble", S2, labels))

    summary = {"attribute": attribute, "config": dataclasses.asdict(fcfg),
               "select": dataclasses.asdict(scfg), "tau1": fcfg.tau1, "tau2": fcfg.tau2,
               "held_out_judgements": fcfg.ensemble - 1, "counts": counts, "seconds": seconds,
               "b_agreement": {f"class_{c}": agreement_stats(agree[S[labels[S] == c]]) for c in (0, 1)}}

    def add_latents():
        if latent is not None:
            z = np.asarray(latent)
            summary["true_latent"] = {s: {f"class_{c}": latent_stats(z[r[labels[r] == c]]) for c in (0, 1)}
                                      for s, r in stages.items()}

    t = time.perf_counter()
    # Before the evaluation classifier trains: a --k too large should fail in seconds, leaving
    # the counts so far (why it fell short) in the error.
    try:
        check_k(counts[-1]["class_0"], counts[-1]["class_1"], scfg.k, scfg.k_per_class, attribute)
    except UserError as e:
        add_latents()
        raise FilterShortfall(str(e), {**summary, "error": str(e)}) from None
    log("(c) ranking by the calibrated evaluation classifier")
    p_eval, eval_info = eval_probs()
    lists = select(S2, labels, p_eval, scfg.k, scfg.k_per_class, attribute)
    seconds["c"] = time.perf_counter() - t
    seconds["total"] = time.perf_counter() - t0
    for k, (r0, r1) in lists.items():
        stages[f"k{k}"] = np.concatenate([r0, r1])
        counts.append(_counts(f"k{k}", stages[f"k{k}"], labels))

    summary.update(eval_classifier=eval_info, lists={str(k): {"file": f"index_k{k}.txt", "class_0": len(r0), "class_1": len(r1),
                                  "lines": len(r0) * scfg.oversample[0] + len(r1) * scfg.oversample[1],
                                  "class_0_max_p": float(p_eval[r0].max()) if len(r0) else None,
                                  "class_1_min_p": float(p_eval[r1].min()) if len(r1) else None}
                         for k, (r0, r1) in lists.items()})
    add_latents()
    return {"lists": lists, "p_eval": p_eval, "summary": summary}


# ----- the real classifiers and the outputs -----------------------------------------------------

def make_fit(data, fcfg: FilterConfig, device, progress: bool = True) -> Fit:
    """``fit`` for run_filter: trains a clean classifier on ``data`` and scores with it."""
    def fit(rows, seed, steps):
        model = train_clean_classifier(data, steps, fcfg.batch_size, fcfg.lr, seed, device,
                                       arch_of(fcfg), rows=rows, progress=progress)
        return lambda r: probs_of(logits_of(model, data.images, device, rows=r))[:, 1]
    return fit


def get_eval_classifier(data_dir, attribute, fcfg, out, device, progress=True):
    """(EvalClassifier, reused): the one in ``out`` if made from the same data folder, attribute
    and image size (delete it to retrain with other widths or steps), else a new one (trained on
    train, calibrated on valid)."""
    path = eval_path(out, attribute)
    if os.path.isfile(path):
        clf = EvalClassifier.load(path, device)
        same = (os.path.realpath(clf.data_dir) == os.path.realpath(data_dir)
                and clf.attribute == attribute and clf.image_size == fcfg.image_size)
        if same:
            return clf, True
        print(f"{path} was made for other data, attribute or size; training a new one")
    return train_eval_classifier(data_dir, attribute, fcfg.image_size, path, fcfg, device,
                                 progress=progress), False


def write_outputs(out: str, index: np.ndarray, result: dict, oversample) -> list[str]:
    """index_k<k>.txt per list, index.txt (largest), filter_summary.json, filter_hist.png."""
    from celeba import write_index_list
    lists, written = result["lists"], []
    for old in glob.glob(os.path.join(out, "index_k*.txt")):   # lists of an earlier --k
        if os.path.basename(old) not in {f"index_k{k}.txt" for k in lists}:
            os.remove(old)
    for k, (r0, r1) in lists.items():
        written.append(os.path.join(out, f"index_k{k}.txt"))
        write_index_list(written[-1], index[index_list(r0, r1, oversample)])
    big = max(lists)
    written.append(os.path.join(out, "index.txt"))
    write_index_list(written[-1], index[index_list(*lists[big], oversample)])
    written.append(os.path.join(out, "filter_summary.json"))
    write_json(written[-1], result["summary"], indent=1)
    written.append(plot_hist(os.path.join(out, "filter_hist.png"), result["p_eval"],
                             np.concatenate(lists[big]), result["summary"]["attribute"], big))
    return written


def plot_hist(path: str, p_all, kept_rows, attribute: str, k: int) -> str:
    from figures import pyplot, save
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6, 3.5))
    bins = np.linspace(0, 1, 51)
    ax.hist(p_all, bins, histtype="step", lw=1.5, label=f"all train ({len(p_all)})")
    ax.hist(p_all[kept_rows], bins, alpha=0.6, label=f"kept, k = {k}")
    ax.set(yscale="log", xlabel=f"calibrated p({attribute} = 1 | x)", ylabel="images",
           title=f"{attribute}: evaluation-classifier p before and after filtering")
    ax.legend()
    save(fig, path, tight=True)
    return path


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-dir", default=None, help="CelebA folder (or toy_faces.py's stand-in); required "
                   "unless --intersect")
    p.add_argument("--intersect", default=None, metavar="A.txt,B.txt",
                   help="§6: write the sorted intersection of two index lists to --out-list and exit "
                        "(e.g. the Smiling and Black_Hair lists, for a two-attribute run)")
    p.add_argument("--out-list", default=None, metavar="C.txt", help="output of --intersect")
    p.add_argument("--attribute", default="Smiling", help="one CelebA attribute, e.g. Smiling, Young, or A/B for "
                   "A against B, e.g. Blond_Hair/Black_Hair (§5.4: faces with neither are left out)")
    p.add_argument("--out", default=None, help="output folder (default runs/filter_<attribute>)")
    p.add_argument("--preset", choices=sorted(PRESETS), default=None,
                   help="default: cpu on every device (paper: the authors' sizes, for a GPU)")
    p.add_argument("--device", default=None, help="cuda | cuda:N | mps | cpu (default: best available)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    C.add_dataclass_args(p, FilterConfig, title="classifiers (FilterConfig, cpu preset)")
    C.add_dataclass_args(p, SelectConfig, title="lists (SelectConfig, cpu preset)")
    return p


def intersect_lists(a: str, b: str, out: str) -> np.ndarray:
    """Write the sorted distinct indices present in both index lists (one per line) to ``out``."""
    from celeba import _lines, write_index_list
    sets = []
    for path in (a, b):
        if not os.path.isfile(path):
            raise UserError(f"index list {path!r} does not exist; give two files with one 0-based "
                            "train index per line")
        try:
            sets.append({int(line) for line in _lines(path) if line.strip()})
        except ValueError:
            raise UserError(f"index list {path} holds a line that is not an integer; expected one "
                            "0-based train index per line") from None
    both = np.array(sorted(sets[0] & sets[1]), dtype=np.int64)
    if not len(both):
        raise UserError(f"the intersection of {a} and {b} is empty; loosen the filters (larger --k) "
                        "so that the two lists share images")
    ensure_writable_dir(os.path.dirname(os.path.abspath(out)))
    write_index_list(out, both)
    return both


def main(argv=None):
    from attributes import attribute_slug
    from celeba import CelebAData
    args = build_parser().parse_args(argv)
    if args.intersect is not None:
        lists = [p.strip() for p in args.intersect.split(",") if p.strip()]
        if len(lists) != 2 or not args.out_list:
            raise UserError("--intersect takes two index lists, A.txt,B.txt, and needs --out-list C.txt")
        both = intersect_lists(lists[0], lists[1], args.out_list)
        print(f"{len(both)} indices in both {lists[0]} and {lists[1]}; wrote {args.out_list}")
        return
    if args.data_dir is None:
        raise UserError("--data-dir is required (the CelebA folder), unless --intersect A.txt,B.txt")
    if "," in args.attribute:
        raise UserError(f"--attribute {args.attribute}: the filter takes one attribute; run it "
                        "once per attribute")
    device = pick_device(args.device)
    preset = args.preset or "cpu"  # as train.py: the paper's sizes only when asked for
    overrides = C.overrides_from_args(args, [FilterConfig, SelectConfig])
    fcfg, scfg = make_configs(preset, **overrides)
    check_select(scfg)
    out = args.out or os.path.join("runs", f"filter_{attribute_slug(args.attribute)}")
    progress = not args.quiet
    data = CelebAData(args.data_dir, fcfg.image_size, args.attribute, "train", progress=progress)
    ensure_writable_dir(out)

    def eval_probs():
        clf, reused = get_eval_classifier(args.data_dir, args.attribute, fcfg, out, device, progress)
        p = probs_of(logits_of(clf.model, data.images, device), clf.temperature)[:, 1]
        return p, {"path": eval_path(out, args.attribute), "reused": reused, **clf.metrics}

    print(f"filter {args.attribute}: {len(data)} train images at {fcfg.image_size} px, preset "
          f"{preset}, device {device.type}, tau1 {fcfg.tau1}, tau2 {fcfg.tau2}, k {scfg.k}")
    try:
        result = run_filter(data.labels, args.attribute, fcfg, scfg, make_fit(data, fcfg, device, progress),
                            eval_probs, true_latent(args.data_dir, args.attribute, data.files))
    except FilterShortfall as e:
        # No list is written, but the counts per stage say where the images went.
        e.summary.update(data_dir=os.path.abspath(args.data_dir), preset=preset, device=device.type)
        write_json(os.path.join(out, "filter_summary.json"), e.summary, indent=1)
        for c in ("class_0", "class_1"):
            a = e.summary["b_agreement"][c]
            if a["n"]:
                print(f"  stage (b), {c}: least confident held-out p(label) median {a['median']:.4f}, "
                      f"99th percentile {a['q99']:.5f}, max {a['max']:.6f} (tau2 {fcfg.tau2})")
        print(f"wrote {os.path.join(out, 'filter_summary.json')} (counts so far, no list)")
        raise
    s = result["summary"]
    s.update(data_dir=os.path.abspath(args.data_dir), preset=preset, device=device.type)
    written = write_outputs(out, data.index, result, scfg.oversample)
    for c in s["counts"]:
        print(f"  {c['stage']:>22}: {c['total']:6d}  (class 0 {c['class_0']}, class 1 {c['class_1']})")
    e = s["eval_classifier"]
    print(f"  evaluation classifier{' (reused)' if e['reused'] else ''}: T {e['T']:.3f}, ECE "
          f"{e['ece_before']:.4f} -> {e['ece_after']:.4f}, NLL {e['nll_before']:.4f} -> "
          f"{e['nll_after']:.4f}, valid accuracy {e['valid_accuracy']:.3f}"
          + (f"; test ECE {e['ece_test_before']:.4f} -> {e['ece_test_after']:.4f}"
             if "ece_test_before" in e else "")
          + (f", corr with true z {e['corr_true_z']:.3f}" if "corr_true_z" in e else ""))
    if "true_latent" in s:
        for c in (0, 1):
            st = s["true_latent"][f"k{max(result['lists'])}"][f"class_{c}"]
            print(f"  true z of kept class {c}: [{st['min']:.3f}, {st['max']:.3f}], "
                  f"{st['in_0.3_0.7']} in [0.3, 0.7], {st['in_0.2_0.8']} in [0.2, 0.8]")
    print("  seconds: " + ", ".join(f"{k} {v:.0f}" for k, v in s["seconds"].items()))
    print("wrote " + ", ".join(written) + f", {eval_path(out, args.attribute)}")


if __name__ == "__main__":
    cli(main)

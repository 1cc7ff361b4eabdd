"""The judges of a CelebA run (§5 "evaluation classifiers"): which calibrated evaluation classifier
scores each of the run's attributes, and, on the face stand-in, the true-latent regressor beside
each one (eval_classifier.py trains both; evaluate_faces.py and the lab use what this finds).

Lookup order per attribute: ``--eval-classifier`` (one file per attribute, in any order), else
``eval_<Attr>.pt`` beside the run's index list, in the run, then in ``runs/filter_<Attr>/``.
"""
from __future__ import annotations

import os

from attributes import attribute_slug
from checkpoint import UserError
from eval_classifier import ZREG_STEPS, EvalClassifier, eval_path, zregressor


def run_attributes(cfg) -> list[str]:
    return [a.strip() for a in cfg["data"].attribute.split(",") if a.strip()]


def find_eval_classifiers(run: str, cfg, explicit: str | None = None) -> list[str]:
    """Paths of the evaluation classifiers, one per attribute of the run, in the run's order."""
    attrs = run_attributes(cfg)
    if explicit:
        paths = [p.strip() for p in explicit.split(",") if p.strip()]
        if len(paths) != len(attrs):
            raise UserError(f"--eval-classifier names {len(paths)} file(s) but the run has "
                            f"{len(attrs)} attribute(s) ({', '.join(attrs)}); give one per attribute")
        for p in paths:
            if not os.path.isfile(p):
                raise UserError(f"no evaluation classifier at {p}; run data_filter.py or fix "
                                "--eval-classifier")
        return paths
    index_dir = os.path.dirname(cfg["data"].index_list) if cfg["data"].index_list else None
    out = []
    for a in attrs:
        name = os.path.basename(eval_path(".", a))
        places = ([index_dir] if index_dir is not None else []) + [run, os.path.join("runs", f"filter_{attribute_slug(a)}")]
        found = [os.path.join(d, name) for d in places if os.path.isfile(os.path.join(d, name))]
        if not found:
            raise UserError(f"no evaluation classifier {name} for {run} (looked in "
                            f"{', '.join(places)}); run python data_filter.py --data-dir "
                            f"{cfg['data'].data_dir} --attribute {a} or pass --eval-classifier PATH")
        out.append(found[0])
    return out


def load_eval_classifiers(run: str, cfg, device, explicit: str | None = None) -> list:
    """EvalClassifiers in the run's attribute order; checks attribute and image size."""
    attrs = run_attributes(cfg)
    clfs = []
    for p in find_eval_classifiers(run, cfg, explicit):
        clfs.append(EvalClassifier.load(p, device))
        clfs[-1].path = p
    got = [c.attribute for c in clfs]
    if sorted(got) != sorted(attrs) or len(set(got)) != len(got):
        raise UserError(f"evaluation classifier attribute(s) {', '.join(got)} do not match the run's "
                        f"{', '.join(attrs)}; pass --eval-classifier with one file per attribute")
    clfs = [clfs[got.index(a)] for a in attrs]
    size = cfg["data"].image_size
    for c in clfs:
        if c.image_size != size:
            raise UserError(f"evaluation classifier for {c.attribute} is {c.image_size} px but the run "
                            f"makes {size} px images; run data_filter.py --image-size {size} or pass "
                            "--eval-classifier")
    return clfs


def load_zregressors(run, cfg, clfs, device, zreg_steps=ZREG_STEPS, log=print) -> list:
    """The stand-in's true-latent regressor of each evaluation classifier (None: no true latent,
    or zreg_steps = 0), cached beside the classifier, or in the run where that is read-only."""
    zregs = []
    for c in clfs:
        zp = os.path.join(os.path.dirname(os.path.abspath(c.path)), f"zreg_{attribute_slug(c.attribute)}.pt")
        if not os.access(os.path.dirname(zp), os.W_OK):
            zp = os.path.join(run, f"zreg_{attribute_slug(c.attribute)}.pt")
        zr = zregressor(c, cfg["data"].data_dir, device, zreg_steps, cache_dir=cfg["data"].cache_dir or None,
                        path=zp) if zreg_steps > 0 else None
        if zr is not None:
            q = zr.quality
            log(f"z-regressor for {c.attribute}: {zp}" + (
                f" (test RMSE {q['test_rmse']:.3f}, corr {q['test_corr']:.3f} with the true z)"
                if "test_rmse" in q else ""))
        zregs.append(zr)
    return zregs

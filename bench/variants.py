"""Does interpolation survive every modelling choice? One row per variant on the circles (§5.5).

    python bench/variants.py [--root runs/variants] [--n 256] [--only unet_fixed,dit_fixed]

The paper claims (§2.2, App. A, C, J) that multi-guidance interpolates whatever the variance
parameterisation, the sampler, the guidance scheme and the backbone. This script trains what is
missing (cpu preset, one directory per network under --root) and evaluates, with --n samples per
method and lambda = [30, 30]:
  * {fixed variance + L_simple, learned Sigma + L_hybrid} x {UNet, DiT} DDPMs, each sampled with
    64 ancestral steps, DDIM eta = 0 and DDIM eta = 1 on the same respaced grid;
  * the classifier gradient taken at x_t (the authors' code) and at the posterior mean mu (§2.2);
  * classifier-free multi-guidance (App. J) of a class-conditional UNet, in the form whose weights
    sum to 1 (the default) and in Eq. 12 as printed.
One classifier pair (plain + spectral norm) is trained once and linked into every run: classifiers
see the data and the noise schedule, not the DDPM.

Columns: unconditional middle fraction (one disc with z in [0.2, 0.8]); multi-guidance accuracy
(the same, guided), its 0-disc and 2+-disc rates, histogram MSE / KLD vs uniform (App. B); training
wall time of the DDPM (as its checkpoint recorded it) and sampling seconds per 100 images. Writes
results/variants.json (with the matmul peak of the same run beside the wall times) after every row.
"""
import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import evaluate  # noqa: E402
import train  # noqa: E402
from checkpoint import pick_device  # noqa: E402
from results.record import Recorder  # noqa: E402

# DDPM runs: name -> extra train.py flags.
RUNS = {
    "unet_fixed": [],
    "unet_learned": ["--variance", "learned"],
    "dit_fixed": ["--arch", "dit"],
    "dit_learned": ["--arch", "dit", "--variance", "learned"],
    "unet_cfg": ["--class-cond"],
}
SAMPLERS = {"ancestral": dict(sampler="ancestral", eta=0.0), "ddim_eta0": dict(sampler="ddim", eta=0.0),
            "ddim_eta1": dict(sampler="ddim", eta=1.0)}


def rows_of(only):
    """(row name, run, method, evaluate_run keyword arguments) of every row."""
    rows = []
    for run in ("unet_fixed", "unet_learned", "dit_fixed", "dit_learned"):
        for s, kw in SAMPLERS.items():
            rows.append((f"{run}/{s}", run, ("uncond", "multi"), kw))
    rows.append(("unet_fixed/guidance_at_mu", "unet_fixed", ("multi",), dict(guidance_at="mu")))
    rows.append(("unet_cfg/cfg", "unet_cfg", ("uncond", "cfg"), {}))
    rows.append(("unet_cfg/cfg_printed", "unet_cfg", ("cfg",), dict(cfg_form="printed")))
    return [r for r in rows if not only or r[1] in only]


def ensure_run(root, name, seed):
    """Train the DDPM of ``name`` if missing, and link the shared classifier pair into it."""
    out = os.path.join(root, name)
    if not os.path.exists(os.path.join(out, "ddpm.pt")):
        train.main(["--dataset", "circles", "--model", "ddpm", "--seed", str(seed), "--out", out,
                    "--no-grid"] + RUNS[name])
    for clf in ("classifier.pt", "classifier_sn.pt"):
        link = os.path.join(out, clf)
        if not os.path.lexists(link):
            os.symlink(os.path.join("..", "classifiers", clf), link)
    return out


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--root", default="runs/variants")
    p.add_argument("--n", type=int, default=256, help="samples per method and row")
    p.add_argument("--seed", type=int, default=0, help="training seed of every network")
    p.add_argument("--lambdas", default="30,30")
    p.add_argument("--only", default="", help=f"comma-separated runs from {','.join(RUNS)} (default: all)")
    p.add_argument("--reuse", default=None, metavar="TABLE_ROOT",
                   help="link the networks that bench/circles_table.py and bench/cfg_matched.py trained under "
                        "this root with the same command and seed (unet_fixed, unet_cfg, the classifier pair) "
                        "instead of training them again")
    a = p.parse_args()
    only = [r for r in a.only.split(",") if r]
    for r in only:
        if r not in RUNS:
            p.error(f"unknown run {r!r}; choose from {', '.join(RUNS)}")
    pick_device("cpu")
    rec = Recorder("variants", "Does interpolation survive every modelling choice? (§2.2, App. A, C, J)")
    clf_dir = os.path.join(a.root, "classifiers")
    reused = link_reused(a.reuse, a.root, a.seed) if a.reuse else []
    if not os.path.exists(os.path.join(clf_dir, "classifier_sn.pt")):
        train.main(["--dataset", "circles", "--model", "classifier", "--seed", str(a.seed), "--out", clf_dir])
    results = {}
    for name, run, methods, kw in rows_of(only):
        out = ensure_run(a.root, run, a.seed)
        m = evaluate.evaluate_run(out, a.n, lambdas=a.lambdas, methods=methods, figures=False,
                                  write_metrics=False, log=lambda *_: None, **kw)
        guided = m.get("multi") or m.get("cfg")
        results[name] = {"uncond_middle": m["uncond"]["accuracy"] if "uncond" in m else None,
                         "accuracy": guided["accuracy"], "zero_disc": guided["zero_disc"],
                         "two_plus_disc": guided["two_plus_disc"], "blob": guided["blob"],
                         "hist_mse": guided["hist_mse"], "hist_kld": guided["hist_kld"],
                         "train_min": _train_seconds(out) / 60,
                         "sample_s_per_100": 100 * sum(v["sample_seconds"] for v in m.values()) / (a.n * len(m))}
        print(name, "  ".join(f"{k} {_fmt(k, v)}" for k, v in results[name].items()), flush=True)
        # Written after every row, so an interrupted command keeps what it measured.
        path = rec.write({"rows": results}, seeds=[a.seed], n=a.n, tables=[table(results, a)],
                         notes=[f"Linked, not retrained (same command and seed): {', '.join(reused)}."] if reused else [])
    print(f"{len(results)} rows; wrote {path}")


def link_reused(table_root, root, seed) -> list:
    """Symlink <table_root>'s DDPMs / classifiers of ``seed`` into ``root``; return what was linked."""
    pairs = [(f"ddpm_seed{seed}/ddpm.pt", "unet_fixed/ddpm.pt"), (f"cfg_seed{seed}/ddpm.pt", "unet_cfg/ddpm.pt"),
             (f"clf_seed{seed}/classifier.pt", "classifiers/classifier.pt"),
             (f"clf_seed{seed}/classifier_sn.pt", "classifiers/classifier_sn.pt")]
    linked = []
    for src, dst in pairs:
        src, dst = os.path.abspath(os.path.join(table_root, src)), os.path.join(root, dst)
        if os.path.exists(src) and not os.path.lexists(dst):
            os.makedirs(os.path.dirname(dst), exist_ok=True)
            os.symlink(src, dst)
            linked.append(os.path.relpath(dst, root))
    return linked


def table(results, a) -> dict:
    cols = ["variant", "uncond middle", "guided accuracy", "0 disc", "2+ discs", "blob", "hist MSE", "hist KLD",
            "DDPM train (min)", "s / 100 samples"]
    rows = [[name, _fmt("uncond_middle", r["uncond_middle"]), _fmt("accuracy", r["accuracy"]),
             _fmt("zero_disc", r["zero_disc"]), _fmt("two_plus_disc", r["two_plus_disc"]), _fmt("blob", r["blob"]),
             f"{r['hist_mse']:.3f}", f"{r['hist_kld']:.3f}", f"{r['train_min']:.1f}", f"{r['sample_s_per_100']:.1f}"]
            for name, r in results.items()]
    return {"title": f"λ = [{a.lambdas}], {a.n} samples per method and row, training seed {a.seed}",
            "columns": cols, "rows": rows}


def _train_seconds(run) -> float:
    """The DDPM's training wall time, as its checkpoint recorded it (train.py's meta)."""
    from checkpoint import load_checkpoint
    return float(load_checkpoint(run, "ddpm")["meta"].get("train_seconds", float("nan")))


def _fmt(k, v):
    if v is None:
        return "-"
    if k in ("uncond_middle", "accuracy", "zero_disc", "two_plus_disc", "blob"):
        return f"{v:.1%}"
    return f"{v:.2f}"


if __name__ == "__main__":
    main()

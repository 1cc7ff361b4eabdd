"""§5.1 on the face stand-in over DDPM seeds, read by the mouth readout beside the classifier and
the true-z regressor (results/faces_seeds.json).

    python bench/faces_seeds.py [--root runs/faces_bench] [--data data/faces_bench] [--seeds 0,1,2] [--n 512]

Needs bench/faces_pipeline.py's filter (ROOT/filter/index.txt and its eval_Smiling.pt). Seed 0 is
the pipeline's run ROOT/faces when it exists; every other seed s trains ROOT/faces_seed<s> with the
pipeline's command and --seed s (the DDPM and its guidance classifiers), then evaluate.py draws --n
samples per method (cached in each run). Unknown flags go to those train.py calls (e.g. --steps
400 for a quick look); give them again on a later call, as a resumed run checks them.

Per method (uncond, multi, and the filtered training set as reference), mean ± std over the seeds:
the calibrated p(Smiling) histogram's MSE / KLD against uniform (App. B), the fractions with p and
with the true-z proxy (eval_classifier.zregressor) in [0.3, 0.7], and the mouth readout's classes
(mouth_readout.py): clean mild, clear, faded or absent, doubled, other; drawn in
results/figures/faces_seeds.png.
"""
import argparse
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import evaluate  # noqa: E402
import train  # noqa: E402
from checkpoint import UserError, ckpt_path, cli, load_checkpoint, pick_device  # noqa: E402
from eval_classifier import ZREG_STEPS  # noqa: E402
from faces_pipeline import filtered_index  # noqa: E402
from results.record import Recorder, mean_std  # noqa: E402

METHODS = ("uncond", "multi", "train")
PCT = ("frac_03_07", "z_frac_03_07", "mouth_mild", "mouth_clear", "mouth_faded", "mouth_doubled", "mouth_other")
PAPER = {"uncond": "0.64 / 3.5", "multi": "0.13 / 0.61", "train": "0.56 / 3.17"}  # §5.1, 10k samples, 64 px


def run_of(root: str, seed: int) -> str:
    """Seed 0 is the pipeline's run; the others get their own folder."""
    return os.path.join(root, "faces" if seed == 0 else f"faces_seed{seed}")


def ensure_trained(run, data, index, seed, flags) -> None:
    """Train (or finish) the DDPM and guidance classifiers of ``run``; a finished run is left as it is."""
    if all(os.path.exists(ckpt_path(run, n)) for n in ("ddpm", "classifier")):
        return
    resume = ["--resume"] if os.path.exists(ckpt_path(run, "ddpm")) else []
    train.main(["--dataset", "celeba", "--data-dir", data, "--index-list", index, "--seed", str(seed),
                "--out", run, "--no-grid"] + resume + list(flags))


def plot_classes(summary: dict, path: str) -> None:
    """One bar per method: the mouth readout's classes stacked (mean over seeds, std as a tick),
    beside the fractions counted mild by calibrated p and by the true-z proxy."""
    import numpy as np
    from figures import pyplot, save
    plt = pyplot()
    fig, (ax, bx) = plt.subplots(1, 2, figsize=(9, 3.4), gridspec_kw={"width_ratios": [3, 2]})
    names = list(summary)
    bottom = np.zeros(len(names))
    for kk in PCT[2:]:
        v = np.array([summary[m][kk] for m in names], dtype=float)
        ax.bar(names, v.mean(1), bottom=bottom, yerr=v.std(1), capsize=3, label=kk.replace("mouth_", ""))
        bottom += v.mean(1)
    ax.set_ylabel("fraction of samples")
    ax.set_title("mouth readout", fontsize=10)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    x = np.arange(len(names))
    for j, (kk, label) in enumerate((("frac_03_07", "p in [0.3, 0.7]"), ("z_frac_03_07", "true z in [0.3, 0.7]"),
                                     ("mouth_mild", "mouth mild"))):
        v = np.array([summary[m][kk] for m in names], dtype=float)
        bx.bar(x + 0.27 * (j - 1), v.mean(1), 0.27, yerr=v.std(1), capsize=3, label=label)
    bx.set_xticks(x, names)
    bx.set_title("counted mild", fontsize=10)
    bx.legend(fontsize=8)
    save(fig, path, tight=True)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                allow_abbrev=False)
    p.add_argument("--root", default="runs/faces_bench")
    p.add_argument("--data", default="data/faces_bench")
    p.add_argument("--seeds", default="0,1,2", help="DDPM (and guidance classifier) training seeds")
    p.add_argument("--n", type=int, default=512, help="samples per method and seed")
    p.add_argument("--zreg-steps", type=int, default=ZREG_STEPS, help="steps of the true-z regressor")
    a, flags = p.parse_known_args(argv)
    try:
        seeds = [int(s) for s in a.seeds.split(",") if s.strip()]
    except ValueError:
        raise UserError(f"--seeds takes comma-separated integers, not {a.seeds!r}") from None
    if not seeds or a.n < 1:
        raise UserError("give at least one seed in --seeds and a positive --n")
    index = filtered_index(a.root, a.data)
    rec = Recorder("faces_seeds", "§5.1 on the face stand-in over DDPM seeds, by the mouth readout",
                   argv=None if argv is None else [os.path.abspath(__file__), *argv])
    device = pick_device("cpu")
    per_seed, seconds = {}, 0.0
    for s in seeds:
        run = run_of(a.root, s)
        ensure_trained(run, a.data, index, s, flags)
        m = evaluate.evaluate_run(run, n=a.n, methods=("uncond", "multi"), device=device, zreg_steps=a.zreg_steps)
        per_seed[s] = {k: {kk: v for kk, v in m[k].items() if kk in PCT + ("hist_mse", "hist_kld", "n")}
                       for k in METHODS}
        seconds += load_checkpoint(run, "ddpm")["meta"]["train_seconds"] + \
            sum(m[k].get("sample_seconds", 0.0) for k in ("uncond", "multi"))
        print(f"seed {s}: multi p in [0.3, 0.7] {m['multi']['frac_03_07']:.1%}, true z {m['multi']['z_frac_03_07']:.1%}, "
              f"mouth mild {m['multi']['mouth_mild']:.1%}", flush=True)
    summary = {k: {kk: [per_seed[s][k][kk] for s in seeds] for kk in PCT + ("hist_mse", "hist_kld")} for k in METHODS}
    rows = [[k, f"{mean_std(v['hist_mse'], digits=3)} / {mean_std(v['hist_kld'], digits=3)}", PAPER[k]]
            + [mean_std(v[kk], pct=True) for kk in PCT] for k, v in summary.items()]
    tables = [{"title": f"§5.1 over {len(seeds)} DDPM seeds ({', '.join(map(str, seeds))}), {a.n} samples per method "
                        "and seed (train: the filtered set); mean ± std over the seeds",
               "columns": ["method", "hist MSE / KLD of p", "paper MSE / KLD", "p in [0.3, 0.7]",
                           "true z in [0.3, 0.7]", "mouth mild", "mouth clear", "mouth faded", "mouth doubled",
                           "mouth other"], "rows": rows}]
    multi = summary["multi"]
    notes = [f"Multi-guided faces counted mild: {mean_std(multi['frac_03_07'], pct=True)} by calibrated p, "
             f"{mean_std(multi['z_frac_03_07'], pct=True)} by the true-z proxy, "
             f"{mean_std(multi['mouth_mild'], pct=True)} by the mouth readout (a good fit with z in [0.3, 0.7])."]
    plot_classes(summary, rec.figure_path("faces_seeds.png"))
    path = rec.write({"per_seed": {str(s): v for s, v in per_seed.items()}, "summary": summary},
                     seeds={"ddpm": seeds, "sampling": [0]}, n=a.n, tables=tables, notes=notes,
                     compute_seconds=round(seconds, 1))  # cached runs count their first time
    print(f"wrote {path}")


if __name__ == "__main__":
    cli(main)

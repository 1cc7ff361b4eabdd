"""The §5.5 table over DDPM seeds x classifier seeds: mean ± std per method, leakage per DDPM seed.

    python bench/circles_table.py [--root runs/table] [--ddpm-seeds 0,1,2] [--clf-seeds 1,2] [--n 512]
    python bench/circles_table.py --antialias     # the same DDPMs, anti-aliased classifiers
    python bench/circles_table.py --preset cpu64 --root runs/table64   # the authors' 64-px circles

Trains what is missing (``train.py --preset P --seed s``, cpu preset by default), one directory per
model seed:
  <root>/ddpm_seed<s>/ddpm.pt            the DDPM of seed s
  <root>/clf_seed<c>/classifier{,_sn}.pt  a classifier pair of seed c (it does not depend on the DDPM)
  <root>/pair_d<s>_c<c>/                 links to both, where multi / multi_sn are sampled
then samples --n images per method with evaluate.py (cached in each directory) and prints:
  * per DDPM seed: the unconditional middle fraction (one disc with z in [0.2, 0.8], over all
    samples) and *where* the leaking discs sit: centre columns just past a band edge vs deep in
    the middle;
  * per method: mean ± std over all (DDPM seed, classifier seed) pairs of accuracy, blob, zero,
    two-or-more and zero-or-two rates, histogram MSE / KLD (with the histogram's n), and the comb
    strength of the middle columns (detector.comb_strength, periods 2, 4 and 8; ~0 when smooth).
The paper reports mean ± std over 10 classifiers on one DDPM (78 % ± 8.7 % plain, 75 % ± 13.3 %
spectral norm). Wall time is printed beside the fp32 matmul GFLOP/s measured in the same run.
"""
import argparse
import os
import sys
import time
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import evaluate  # noqa: E402
import train  # noqa: E402
from checkpoint import pick_device  # noqa: E402
from toy_circles import band_positions  # noqa: E402
from results.record import Recorder, mean_std  # noqa: E402

KEYS = ["accuracy", "one_disc", "blob", "zero_disc", "two_plus_disc", "zero_or_two", "hist_mse",
        "hist_kld", "hist_n", "comb_2", "comb_4", "comb_8"]
PCT = {"accuracy", "one_disc", "blob", "zero_disc", "two_plus_disc", "zero_or_two"}


def ensure_trained(out, model, seed, preset, extra=()):
    names = {"ddpm": ["ddpm.pt"], "classifier": ["classifier.pt", "classifier_sn.pt"]}[model]
    if all(os.path.exists(os.path.join(out, n)) for n in names):
        # A root holds one preset: a 32-px classifier cannot guide a 64-px DDPM.
        size = train.C.from_dict(train.load_checkpoint(out, names[0][:-3])["config"])["data"].image_size
        want = train.C.make_config("circles", preset)["data"].image_size
        if size != want:
            raise SystemExit(f"{out} holds {size}-px models but --preset {preset} is {want} px; "
                             "use another --root for each preset")
        return
    resume = ["--resume"] if any(os.path.exists(os.path.join(out, n)) for n in names) else []
    train.main(["--dataset", "circles", "--preset", preset, "--model", model, "--seed", str(seed),
                "--out", out, "--no-grid"] + resume + list(extra))


def link_pair(root, s, c, tag=""):
    pair = os.path.join(root, f"pair_d{s}_c{c}{tag}")
    os.makedirs(pair, exist_ok=True)
    for name, src in (("ddpm.pt", f"ddpm_seed{s}"), ("classifier.pt", f"clf_seed{c}{tag}"),
                      ("classifier_sn.pt", f"clf_seed{c}{tag}")):
        link = os.path.join(pair, name)
        if not os.path.lexists(link):
            os.symlink(os.path.join("..", src, name), link)
    return pair


def leak_columns(metrics, size, delta=0.2):
    """{centre column: samples} of the one-disc samples whose z lies in [delta, 1 - delta]."""
    cols = {int(k): v for k, v in metrics["column_counts"].items()}
    return {x: v for x, v in sorted(cols.items()) if delta <= x / (size - 1) <= 1 - delta}


def band_edges(size, delta=0.2):
    """Last centre column of the left training band and first of the right one."""
    xs = {x for x, _ in band_positions(size, delta)}
    return max(x for x in xs if x < size / 2), min(x for x in xs if x >= size / 2)


def fmt(k, v):
    """mean ± std of a column; one value alone has no spread to show."""
    v = np.asarray(v, dtype=float)
    if k == "hist_n":
        return f"{v.mean():.0f}"
    f = (lambda x: f"{x:.1%}") if k in PCT else (lambda x: f"{x:.3f}")
    return f(v.mean()) + (f" ± {f(v.std())}" if len(v) > 1 else "")


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--root", default="runs/table")
    p.add_argument("--ddpm-seeds", default="0,1,2")
    p.add_argument("--clf-seeds", default="1,2")
    p.add_argument("--preset", default="cpu", help="train.py preset of the models it trains: cpu "
                   "(32 px) or cpu64 (the authors' 64-px images); keep one preset per --root")
    p.add_argument("--n", type=int, default=512)
    p.add_argument("--lambdas", default="30,30")
    p.add_argument("--antialias", action="store_true",
                   help="classifiers with a blur before each stride-2 downsampling (clf_seed<c>_aa/, "
                        "pair_d<s>_c<c>_aa/; the DDPMs and their unguided samples are shared)")
    a = p.parse_args()
    tag, extra = ("_aa", ["--clf-antialias"]) if a.antialias else ("", [])
    pick_device("cpu")
    ds = [int(s) for s in a.ddpm_seeds.split(",")]
    cs = [int(c) for c in a.clf_seeds.split(",")]
    experiment = {"cpu": "circles_table", "cpu64": "circles64"}.get(a.preset, f"circles_table_{a.preset}")
    if a.antialias:
        experiment = "antialias" if a.preset == "cpu" else experiment + "_antialias"
    rec = Recorder(experiment, f"§5.5 table over seeds ({a.preset} preset{', anti-aliased classifiers' if a.antialias else ''})")
    t0 = time.time()
    for s in ds:
        ensure_trained(os.path.join(a.root, f"ddpm_seed{s}"), "ddpm", s, a.preset)
    for c in cs:
        ensure_trained(os.path.join(a.root, f"clf_seed{c}{tag}"), "classifier", c, a.preset, extra)
    # The checkpoints' own clocks, so a re-read of trained models still counts their training.
    t_train = sum(train.load_checkpoint(os.path.join(a.root, d), n)["meta"].get("train_seconds", 0.0)
                  for d, names in [(f"ddpm_seed{s}", ("ddpm",)) for s in ds]
                  + [(f"clf_seed{c}{tag}", ("classifier", "classifier_sn")) for c in cs] for n in names)

    rows = {"uncond": [], "multi": [], "multi_sn": []}
    per_ddpm, sample_s = {}, 0.0
    for s in ds:
        run = os.path.join(a.root, f"ddpm_seed{s}")
        m = evaluate.evaluate_run(run, a.n, methods=("uncond",), figures=False, log=lambda *_: None)["uncond"]
        rows["uncond"].append(m)
        sample_s += m["sample_seconds"]
        size = train.C.from_dict(train.load_checkpoint(run, "ddpm")["config"])["data"].image_size
        cols = leak_columns(m, size)
        left_end, right_start = band_edges(size)
        edge = {x for x in range(size) if 0 < x - left_end <= 2 or 0 < right_start - x <= 2}
        per_ddpm[s] = {"uncond_middle": m["accuracy"], "leak_columns": cols,
                       "leak_near_band_edge": sum(v for x, v in cols.items() if x in edge),
                       "leak_deep_middle": sum(v for x, v in cols.items() if x not in edge)}
        for c in cs:
            pair = link_pair(a.root, s, c, tag)
            mm = evaluate.evaluate_run(pair, a.n, lambdas=a.lambdas, methods=("multi", "multi_sn"),
                                       figures=False, log=lambda *_: None)
            for k in ("multi", "multi_sn"):
                rows[k].append(dict(mm[k], ddpm_seed=s, clf_seed=c))
                sample_s += mm[k]["sample_seconds"]
            print(f"ddpm {s} clf {c}: " + "; ".join(
                f"{k} acc {mm[k]['accuracy']:.1%} blob {mm[k]['blob']:.1%} zero {mm[k]['zero_disc']:.1%} "
                f"2+ {mm[k]['two_plus_disc']:.1%}" for k in ("multi", "multi_sn")), flush=True)

    print(f"\nunconditional leakage per DDPM seed ({a.n} samples each; the left band ends at x = "
          f"{left_end}, the right one starts at {right_start}, {size} px):")
    for s, d in per_ddpm.items():
        print(f"  seed {s}: middle {d['uncond_middle']:.1%}  ({d['leak_near_band_edge']} within 2 px of a "
              f"band edge, {d['leak_deep_middle']} deeper)  columns {d['leak_columns']}")
    um = np.array([d["uncond_middle"] for d in per_ddpm.values()])
    print(f"  mean ± std over {len(ds)} DDPM seeds: {um.mean():.1%} ± {um.std():.1%}")

    print(f"\n{'method':<9}{'pairs':>6}" + "".join(f"{k:>17}" for k in KEYS))
    summary = {}
    for name, rs in rows.items():
        vals = {k: [r[k] for r in rs] for k in KEYS}
        summary[name] = {k: [float(np.mean(v)), float(np.std(v))] for k, v in vals.items()}
        print(f"{name:<9}{len(rs):>6}" + "".join(f"{fmt(k, v):>17}" for k, v in vals.items()))
    print("paper:    multi accuracy 78% ± 8.7%, zero-or-two 4.25% ± 2.45%; multi_sn accuracy 75% ± 13.3%")
    wall = time.time() - t0
    pct = ("accuracy", "one_disc", "zero_disc", "two_plus_disc", "zero_or_two")
    cols = ["method", "pairs", "accuracy", "one disc", "zero disc", "two+ discs", "zero or two", "hist MSE",
            "hist KLD", "comb_4"]
    trows = []
    for name, rs in rows.items():
        trows.append([name, len(rs)] + [mean_std([r[k] for r in rs], pct=True) for k in pct] +
                     [mean_std([r[k] for r in rs], digits=3) for k in ("hist_mse", "hist_kld")] +
                     ["–" if name == "uncond" else mean_std([r["comb_4"] for r in rs], digits=3)])
    trows.append(["paper, multi", "10 clf", "78.0 % ± 8.7", "", "", "", "4.2 % ± 2.5", "", "", ""])
    trows.append(["paper, multi_sn", "10 clf", "75.0 % ± 13.3", "", "", "", "", "", "", ""])
    pair_rows = [[f"d{r['ddpm_seed']} c{r['clf_seed']}", f"{100 * r['accuracy']:.1f} %",
                  f"{100 * r['zero_or_two']:.1f} %", f"{100 * q['accuracy']:.1f} %", f"{100 * q['zero_or_two']:.1f} %"]
                 for r, q in zip(rows["multi"], rows["multi_sn"])]
    leak_rows = [[s, f"{100 * d['uncond_middle']:.1f} %", d["leak_near_band_edge"], d["leak_deep_middle"]]
                 for s, d in per_ddpm.items()]
    spread = "mean ± std over " if len(ds) * len(cs) > 1 else "one pair: "
    tables = [{"title": f"{spread}{len(ds)} DDPM seeds × {len(cs)} classifier seeds (uncond: over DDPM seeds); "
                        f"λ = [{a.lambdas}], {a.n} samples per method and pair",
               "columns": cols, "rows": trows},
              {"title": "per pair: accuracy and zero-or-two rate", "columns":
               ["pair", "multi", "multi zero/two", "multi_sn", "multi_sn zero/two"], "rows": pair_rows},
              {"title": "unconditional leakage per DDPM seed (discs in z ∈ [0.2, 0.8])", "columns":
               ["DDPM seed", "middle", "within 2 px of a band edge", "deeper"], "rows": leak_rows}]
    path = rec.write({"summary": summary, "per_ddpm_seed": {str(k): v for k, v in per_ddpm.items()},
                      "pairs": {k: v for k, v in rows.items() if k != "uncond"}, "lambdas": a.lambdas,
                      "train_seconds": t_train, "sample_seconds": sample_s},
                     seeds={"ddpm": ds, "classifier": cs}, n=a.n, tables=tables,
                     compute_seconds=round(t_train + sample_s, 1))  # cached stages count their first time
    print(f"\n{len(ds)} DDPM seeds x {len(cs)} classifier seeds: {wall / 60:.1f} min in this command "
          f"(training {t_train / 60:.1f} min, sampling {sample_s / 60:.1f} min of which cached runs "
          f"count their original time); wrote {path}")

if __name__ == "__main__":
    main()

"""The DiT's learning curve on the circles, then its multi-guided accuracy (App. J, Fig. S19a;
results/dit_curve.json).

    python bench/dit_curve.py [--out runs/dit_curve] [--steps 12000] [--chunk 1000] [--max-minutes 60]

Trains a DiT DDPM (train.py --arch dit --model ddpm, cpu preset) whose learning-rate schedule spans
--steps, in chunks of --chunk steps (train.py --stop-at, then --resume: the schedule keeps its
length whatever the chunks). After each chunk it draws --n unguided samples (the run's respaced
ancestral steps, seed 0) and measures the clean-sample rate: the fraction holding exactly one disc
(detector.py). It stops at the first chunk whose rate reaches --target, when the training time
(the checkpoint's own clock, checked after each chunk) reaches --max-minutes, or at --steps. The curve is kept in
<out>/curve.json, so a stopped call continues where it was.

Then the final model, --n-final samples per method: unguided, and multi-guided at λ = --lambdas
with the classifier pair of --clf (bench/circles_table.py's <root>/clf_seed0, linked into the run:
a classifier sees the data and the noise schedule, not the DDPM). Unknown flags go to train.py for
a new run (e.g. --lr 5e-4).
"""
import argparse
import json
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import evaluate  # noqa: E402
import train  # noqa: E402
from checkpoint import UserError, ckpt_path, cli, load_checkpoint, pick_device  # noqa: E402
from figures import pyplot, save  # noqa: E402
from rundir import write_json  # noqa: E402
from results.record import Recorder  # noqa: E402

RATES = ("one_disc", "zero_disc", "two_plus_disc", "blob", "accuracy")
FINAL = RATES + ("hist_mse", "hist_kld", "hist_n", "sample_seconds")


def link_classifiers(out: str, clf_dir: str) -> None:
    """<out>/classifier{,_sn}.pt as links to the pair in ``clf_dir`` (nothing to do when it is ``out``)."""
    names = ("classifier.pt", "classifier_sn.pt")
    for name in names:
        if not os.path.exists(os.path.join(clf_dir, name)):
            raise UserError(f"no {os.path.join(clf_dir, name)}; train the pair with python bench/circles_table.py "
                            f"(or python train.py --model classifier --out {clf_dir}), or point --clf at a "
                            "folder holding it")
    os.makedirs(out, exist_ok=True)
    if os.path.realpath(clf_dir) == os.path.realpath(out):
        return
    for name in names:
        src, link = os.path.join(clf_dir, name), os.path.join(out, name)
        if os.path.lexists(link):
            os.remove(link)
        os.symlink(os.path.relpath(os.path.abspath(src), os.path.abspath(out)), link)


def train_chunk(out: str, steps: int, stop: int, seed: int, flags) -> None:
    """Train to step ``stop`` of a ``steps``-long schedule (a resumed run checks ``flags`` again)."""
    resume = ["--resume"] if os.path.exists(ckpt_path(out, "ddpm")) else []
    train.main(["--dataset", "circles", "--arch", "dit", "--model", "ddpm", "--seed", str(seed), "--out", out,
                "--steps", str(steps), "--stop-at", str(stop), "--no-grid"] + resume + list(flags))


def measure(out: str, n: int, ev: dict) -> dict:
    """The checkpoint's step and training minutes, and the rates of ``n`` unguided samples."""
    ck = load_checkpoint(out, "ddpm")
    m = evaluate.evaluate_run(out, n=n, methods=("uncond",), **ev)["uncond"]
    return {"step": ck["step"], "minutes": ck["meta"]["train_seconds"] / 60, **{k: m[k] for k in RATES},
            "sample_seconds": m["sample_seconds"]}


def plot(curve, final, size, target, path):
    """Left: the clean-sample rate against training steps; right: where the final samples' discs sit."""
    plt = pyplot()
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 3.6))
    steps = [c["step"] for c in curve]
    for k, style in (("one_disc", "o-"), ("zero_disc", "s--"), ("two_plus_disc", "^--"), ("accuracy", "x:")):
        a.plot(steps, [100 * c[k] for c in curve], style, label=k.replace("_", " ") + (" (unguided middle)"
                                                                                      if k == "accuracy" else ""))
    a.axhline(100 * target, color="grey", lw=0.8, ls=":")
    a.set(xlabel="training step", ylabel="% of unguided samples", ylim=(-2, 102),
          title=f"step {steps[-1]}: {curve[-1]['minutes']:.1f} training minutes")
    a.legend(fontsize=7)
    for name, m in final.items():
        cols = {int(k): v for k, v in m["column_counts"].items()}
        b.step([c / (size - 1) for c in sorted(cols)], [cols[c] for c in sorted(cols)], where="mid",
               label=f"{name}: accuracy {m['accuracy']:.0%}, one disc {m['one_disc']:.0%}")
    b.axvspan(0.2, 0.8, color="grey", alpha=0.1)
    b.set(xlabel="z of the detected disc (shaded: the unseen middle)", ylabel="samples", xlim=(0, 1))
    b.legend(fontsize=7)
    save(fig, path, tight=True)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                allow_abbrev=False)
    p.add_argument("--out", default="runs/dit_curve")
    p.add_argument("--clf", default="runs/table/clf_seed0", help="folder of the classifier pair")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--steps", type=int, default=12000, help="length of the learning-rate schedule")
    p.add_argument("--chunk", type=int, default=1000, help="training steps between two measurements")
    p.add_argument("--n", type=int, default=128, help="unguided samples per measurement")
    p.add_argument("--target", type=float, default=0.95, help="clean-sample (one-disc) rate to stop at")
    p.add_argument("--max-minutes", type=float, default=60.0, help="training-time budget")
    p.add_argument("--n-final", type=int, default=512, help="samples per method of the final model")
    p.add_argument("--lambdas", default="30,30")
    a, flags = p.parse_known_args(argv)
    if a.chunk < 1 or a.steps < 1 or a.n < 1 or a.n_final < 1:
        raise UserError("--steps, --chunk, --n and --n-final must be positive")
    device = pick_device("cpu")
    link_classifiers(a.out, a.clf)   # first: a missing pair is reported before an hour of training
    rec = Recorder("dit_curve", "The DiT's learning curve and its multi-guided accuracy (App. J)",
                   argv=None if argv is None else [os.path.abspath(__file__), *argv])
    curve_path = os.path.join(a.out, "curve.json")
    step = load_checkpoint(a.out, "ddpm")["step"] if os.path.exists(ckpt_path(a.out, "ddpm")) else 0
    curve = []
    if step and os.path.exists(curve_path):
        with open(curve_path) as f:
            curve = [c for c in json.load(f) if c["step"] <= step]
    ev = dict(figures=False, write_metrics=False, log=lambda *_: None, device=device)
    while True:
        if step and (not curve or curve[-1]["step"] < step):   # a checkpoint not measured yet
            curve.append(measure(a.out, a.n, ev))
            write_json(curve_path, curve)
            print(f"step {step} ({curve[-1]['minutes']:.1f} min): one disc {curve[-1]['one_disc']:.1%}", flush=True)
        last = curve[-1] if curve else None
        if last and (last["one_disc"] >= a.target or last["minutes"] >= a.max_minutes or last["step"] >= a.steps):
            break
        train_chunk(a.out, a.steps, min(a.steps, (step // a.chunk + 1) * a.chunk), a.seed, flags)
        before, step = step, load_checkpoint(a.out, "ddpm")["step"]
        if step <= before:
            raise UserError(f"training did not move {a.out}/ddpm.pt past step {step}; use another --out")
    final = {name: evaluate.evaluate_run(a.out, n=a.n_final, lambdas=a.lambdas, methods=(method,), **ev)[method]
             for name, method in (("unguided", "uncond"), (f"multi λ = [{a.lambdas}]", "multi"))}
    cfg = train.C.from_dict(load_checkpoint(a.out, "ddpm")["config"])
    size = cfg["data"].image_size
    plot(curve, final, size, a.target, rec.figure_path("dit_curve.png"))
    last = curve[-1]
    why = ("reached the target" if last["one_disc"] >= a.target else
           "ran out of the time budget" if last["minutes"] >= a.max_minutes else "ended its schedule")
    tables = [{"title": f"unguided clean-sample rate after each chunk ({a.n} samples, "
                        f"{cfg['diffusion'].sample_steps} respaced ancestral steps); schedule of {a.steps} steps",
               "columns": ["step", "train min", "one disc", "zero disc", "two+ discs", "blob", "unguided middle"],
               "rows": [[c["step"], f"{c['minutes']:.1f}"] + [f"{100 * c[k]:.1f} %" for k in RATES] for c in curve]},
              {"title": f"final model, {a.n_final} samples per method; classifier pair {a.clf}",
               "columns": ["method", "accuracy", "one disc", "zero disc", "two+ discs", "hist MSE", "hist KLD"],
               "rows": [[name, f"{100 * m['accuracy']:.1f} %", f"{100 * m['one_disc']:.1f} %",
                         f"{100 * m['zero_disc']:.1f} %", f"{100 * m['two_plus_disc']:.1f} %",
                         f"{m['hist_mse']:.3f}", f"{m['hist_kld']:.3f}"] for name, m in final.items()]}]
    multi = final[f"multi λ = [{a.lambdas}]"]
    notes = [f"The DiT {why} at step {last['step']} ({last['minutes']:.1f} training minutes) with "
             f"{100 * last['one_disc']:.1f} % one-disc unguided samples (target {100 * a.target:.0f} %).",
             f"Multi-guided, {100 * multi['accuracy']:.1f} % of its samples hold one disc in the unseen middle, "
             f"against {100 * final['unguided']['accuracy']:.1f} % unguided."]
    path = rec.write({"curve": curve, "final": {k: {kk: m[kk] for kk in FINAL} for k, m in final.items()},
                      "stopped": why, "schedule_steps": a.steps, "chunk": a.chunk, "target": a.target},
                     seeds={"ddpm": [a.seed], "sampling": [0], "classifier pair": [a.clf]}, n=a.n_final,
                     tables=tables, notes=notes)
    print(f"wrote {path}")


if __name__ == "__main__":
    cli(main)

"""Sample from a trained run: unconditional, classifier-guided (§2.2) or multi-guided (§4.2, Eq. 2).

    python sample.py --run runs/circles --n 512                          # unconditional
    python sample.py --run runs/circles --guidance multi --lambdas 30,30 # interpolation
    python sample.py --run runs/circles --guidance multi --classifier classifier_sn
    python sample.py --run runs/circles --guidance single --scale 30 --target 1
    python sample.py --run runs/circles --sampler ddim --eta 0           # DDIM (Song et al. 2021)
    python sample.py --run runs/circles --guidance multi --guidance-at mu  # grad at mu_theta (§2.2)
    python sample.py --run runs/cfg --guidance cfg --scale 3     # classifier-free (App. J, Eq. 12)

The model config is read from the run's checkpoint (EMA weights); only sampling choices are flags,
declared once in config.SampleConfig (evaluate.py shares them). --steps 0 means the run's
sample_steps; --target -1 alternates the classes over the batch. --lambdas, --scale, --target and
--classifier only apply to guided sampling: with --guidance none they are an error, not ignored.
--eta only applies to --sampler ddim; with DDIM, guidance shifts eps^ instead of the mean (see
diffusion.GaussianDiffusion.ddim_eps_x0). --guidance-at mu evaluates the classifier gradient at the
posterior mean instead of x_t (diffusion.GaussianDiffusion.guidance_point); ancestral sampling only.
--guidance cfg (a DDPM trained with --class-cond) needs no classifier: --lambdas / --scale give
lambda, --cfg-form the weights (classifier_free.py).

Writes ``<out>/samples_<tag>.npz`` (uint8 images [N, H, W, C] + the settings) and a PNG grid;
--out defaults to the run directory, --tag to the guidance mode. Existing samples are never
replaced unless --overwrite is given.

Other samplers reuse the pieces: ``setup`` loads and checks the networks (``models`` and
``classifier`` also take ready modules, e.g. a score or a classifier computed in closed form), and
``output_paths`` / ``save_samples`` write what main writes (the lab's CLIs, lab/).
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import time
from types import SimpleNamespace

import numpy as np
import torch
from PIL import Image

import config as C
from checkpoint import UserError, cli, ensure_writable_dir, load_checkpoint, load_weights, pick_device, to_uint8
from classifier import NoisyClassifier
from diffusion import GaussianDiffusion
from classifier_free import check_cfg_flags, guided_model
from guidance import multi_guidance, parse_lambdas, single_guidance
from models import build_model


def inference_layout(model: torch.nn.Module, device) -> torch.nn.Module:
    """``model`` on ``device`` for sampling: eval mode, no parameter gradients and, on a CPU, its
    conv weights in channels_last (NHWC) layout. oneDNN's CPU convolutions run in NHWC; with NCHW
    weights every conv converts its input and output (why: RESULTS.md#speed_ideas). The outputs
    are the same up to float rounding (tests/test_diffusion.py). The input can stay NCHW: a conv
    with channels_last weights returns channels_last activations."""
    model = model.to(torch.device(device)).eval().requires_grad_(False)
    if torch.device(device).type == "cpu":
        model = model.to(memory_format=torch.channels_last)
    return model


def load_ddpm(run: str, device, use_ema: bool = True):
    ck = load_checkpoint(run, "ddpm")
    cfg = C.from_dict(ck["config"])
    model = build_model(cfg)
    load_weights(model, ck.get("ema" if use_ema else "model"), os.path.join(run, "ddpm.pt"), ck)
    return inference_layout(model, device), cfg


def load_classifier(run: str, name: str, device, expect_cfg=None):
    """A trained noise-aware classifier; checks it matches the DDPM's images (size, channels)."""
    if name not in ("classifier", "classifier_sn"):
        raise UserError(f"unknown classifier {name!r}; use classifier or classifier_sn")
    ck = load_checkpoint(run, name)
    cfg = C.from_dict(ck["config"])
    if expect_cfg is not None:
        a, b = cfg["data"], expect_cfg["data"]
        if (a.dataset, a.attribute) != (b.dataset, b.attribute):
            what = lambda d: d.dataset + (f" ({d.attribute})" if d.attribute else "")
            raise UserError(f"{name} was trained on {what(a)} but the DDPM on {what(b)}; train the "
                            f"classifier in the DDPM's run: python train.py --out {run} --model "
                            f"classifier --overwrite")
        if (a.image_size, a.channels) != (b.image_size, b.channels):
            raise UserError(f"{name} was trained on {a.image_size}x{a.image_size}x{a.channels} images "
                            f"but the DDPM makes {b.image_size}x{b.image_size}x{b.channels}; retrain "
                            f"it with python train.py --out {run} --model classifier --overwrite")
        if (cfg["diffusion"].timesteps, cfg["diffusion"].noise_schedule) != \
                (expect_cfg["diffusion"].timesteps, expect_cfg["diffusion"].noise_schedule):
            raise UserError(f"{name} was trained for another noise schedule than the DDPM; retrain it")
    model = NoisyClassifier.from_config(cfg["data"], cfg["classifier"], ck["num_classes"],
                                        spectral=ck["spectral_norm"])
    load_weights(model, ck["model"], os.path.join(run, f"{name}.pt"), ck)
    return inference_layout(model, device)


def check_sampler(sampler: str, eta: float, guidance_at: str = "xt") -> None:
    """The sampler name, DDIM's eta (DDIM Eq. 16 [Song et al. 2021] is defined for 0 <= eta <= 1)
    and where guidance is evaluated (mu needs the ancestral posterior mean)."""
    if guidance_at not in ("xt", "mu"):
        raise UserError(f"unknown --guidance-at {guidance_at!r}; use xt (at x_t) or mu (at the posterior mean)")
    if guidance_at == "mu" and sampler != "ancestral":
        raise UserError("--guidance-at mu needs --sampler ancestral (DDIM has no posterior mean to "
                        "evaluate the classifier at); drop one of them")
    if sampler not in ("ancestral", "ddim"):
        raise UserError(f"unknown --sampler {sampler!r}; use ancestral or ddim")
    if not 0.0 <= eta <= 1.0:
        raise UserError(f"--eta {eta} is outside [0, 1]; use 0 (deterministic DDIM) up to 1 (DDPM variance)")
    if sampler == "ancestral" and eta != 0.0:
        raise UserError("--eta only applies to DDIM; add --sampler ddim, or drop --eta")


def setup(run: str, device=None, steps: int | None = None, guidance: str = "none",
          lambdas: str | None = None, scale: float = 30.0, target: int | None = None,
          classifier="classifier", models=None, sampler: str = "ancestral", eta: float = 0.0,
          guidance_at: str = "xt", cfg_form: str = "affine") -> SimpleNamespace:
    """Load the networks and check every sampling choice (one-line errors) before any sampling.

    ``models`` = (network, cfg) samples ``network`` instead of loading the run's DDPM: the DDPM
    already loaded, or any module with its (x_t, original t) interface and output
    parameterisation. ``classifier``: a classifier checkpoint of the run (classifier,
    classifier_sn) or a module with the NoisyClassifier interface (num_classes, (x_t, t) ->
    logits). ``guidance="cfg"`` samples the class-conditional DDPM with classifier-free
    multi-guidance (classifier_free.py, ``cfg_form``).

    Returns the pieces a sampler needs: diffusion (respaced to ``steps``), model, cfg, dcfg, clf
    (None without classifier guidance), guide (the multi-guidance function, or None), guidance,
    scale, target, shape (C, H, W), device, sampler, eta, guidance_at."""
    if guidance not in GUIDANCE:
        raise UserError(f"unknown --guidance {guidance!r}; use {', '.join(GUIDANCE)}")
    check_sampler(sampler, eta, guidance_at)
    device = device or pick_device()
    model, cfg = models or load_ddpm(run, device)
    dcfg = cfg["diffusion"]
    steps = steps or dcfg.sample_steps
    if not 2 <= steps <= dcfg.timesteps:
        raise UserError(f"--steps {steps} is outside 2..{dcfg.timesteps} (the model's T)")
    diffusion = GaussianDiffusion.from_config(dcfg, respaced=True, steps=steps).to(device)
    if guidance == "cfg":  # the classifier-free wrapper is the "network" the sampler calls
        model = guided_model(model, cfg, lambdas, scale, cfg_form, device, run)
    clf = None
    if guidance in ("single", "multi"):
        clf = load_classifier(run, classifier, device, cfg) if isinstance(classifier, str) else classifier
    g = None
    if guidance == "multi":
        lam = parse_lambdas(lambdas, clf.num_classes) if lambdas else torch.full((clf.num_classes,), scale)
        g = multi_guidance([clf], [lam])
    if guidance == "single" and target is not None and not 0 <= target < clf.num_classes:
        raise UserError(f"--target {target} is not a class of the classifier (0..{clf.num_classes - 1})")
    shape = (cfg["data"].channels, cfg["data"].image_size, cfg["data"].image_size)
    return SimpleNamespace(diffusion=diffusion, model=model, cfg=cfg, dcfg=dcfg, clf=clf, guide=g,
                           guidance=guidance, scale=scale, target=target, shape=shape, device=device,
                           sampler=sampler, eta=eta, guidance_at=guidance_at)


def prepare(run: str, device=None, steps: int | None = None, guidance: str = "none",
            lambdas: str | None = None, scale: float = 30.0, target: int | None = None,
            classifier="classifier", models=None, sampler: str = "ancestral", eta: float = 0.0,
            guidance_at: str = "xt", cfg_form: str = "affine"):
    """``setup`` (its arguments), then ``draw(n, batch_size, seed=0, progress=False)`` -> n samples
    in [-1, 1], NCHW float32 on the CPU."""
    p = setup(run, device, steps, guidance, lambdas, scale, target, classifier, models, sampler, eta,
              guidance_at, cfg_form)

    def draw(n: int, batch_size: int = C.SampleConfig.batch_size, seed: int = 0, progress: bool = False) -> torch.Tensor:
        gen = torch.Generator(device=p.device).manual_seed(seed)
        out, guide = [], p.guide
        for start in range(0, n, batch_size):
            b = min(batch_size, n - start)
            if guidance == "single":
                # Default target: alternate classes so a grid shows both.
                y = (torch.full((b,), target) if target is not None
                     else torch.arange(start, start + b) % p.clf.num_classes)
                guide = single_guidance(p.clf, y.to(p.device), scale)
            out.append(p.diffusion.sample(p.model, (b, *p.shape), p.dcfg.clip_denoised, guide, gen, p.device,
                                          progress=progress, sampler=sampler, eta=eta,
                                          guidance_at=guidance_at).cpu())
        return torch.cat(out)

    return draw


def generate(run: str, n: int, batch_size: int = C.SampleConfig.batch_size, seed: int = 0, device=None,
             steps: int | None = None, guidance: str = "none", lambdas: str | None = None,
             scale: float = 30.0, target: int | None = None, classifier="classifier",
             progress: bool = False, models=None, sampler: str = "ancestral", eta: float = 0.0,
             guidance_at: str = "xt", cfg_form: str = "affine") -> torch.Tensor:
    """n samples in [-1, 1], NCHW float32 on the CPU (``setup`` explains the arguments)."""
    return prepare(run, device, steps, guidance, lambdas, scale, target, classifier, models, sampler, eta,
                   guidance_at, cfg_form)(n, batch_size, seed, progress)


def save_grid(x: torch.Tensor, path: str, nrow: int | None = None, marks: bool = False,
              delta: float = 0.2, pad: int = 2, edges=None) -> None:
    """Tile images into a PNG. ``marks`` draws green lines at z = delta and 1 - delta (the edges of
    the training regions, as in Fig. 7a), or at the z listed in ``edges`` (a --bands middle run's
    toy_circles.training_edges); they are not part of the samples."""
    imgs = to_uint8(x)
    n, h, w, c = imgs.shape
    nrow = nrow or int(np.ceil(np.sqrt(n)))
    ncol = int(np.ceil(n / nrow))
    grid = np.full((ncol * (h + pad) + pad, nrow * (w + pad) + pad, 3), 80, dtype=np.uint8)
    for i in range(n):
        r, q = divmod(i, nrow)
        tile = np.repeat(imgs[i], 3, axis=-1) if c == 1 else imgs[i]
        if marks:
            tile = tile.copy()
            for z in (edges or (delta, 1 - delta)):
                col = int(round(z * (w - 1)))
                tile[:, col] = np.maximum(tile[:, col], np.array([0, 110, 0], np.uint8))
        grid[pad + r * (h + pad): pad + r * (h + pad) + h, pad + q * (w + pad): pad + q * (w + pad) + w] = tile
    scale = max(1, 256 // h)  # small images are upscaled so the grid is readable
    Image.fromarray(grid).resize((grid.shape[1] * scale, grid.shape[0] * scale), Image.NEAREST).save(path)


GUIDANCE = ("none", "single", "multi", "cfg")
GUIDED_FLAGS = ("lambdas", "scale", "target", "classifier", "guidance_at")


def add_sample_args(parser: argparse.ArgumentParser, only=None, defaults: C.SampleConfig | None = None,
                    title: str = "sampling (config.SampleConfig)") -> None:
    """Declare the flags of ``config.SampleConfig`` (every field, or those named in ``only``).

    sample.py and evaluate.py both call this, so each shared flag is written once, in config.py.
    ``defaults`` (a SampleConfig) is what --help shows; the flags themselves default to None so
    that ``sample_config`` can tell a typed flag from a default."""
    C.add_dataclass_args(parser, C.SampleConfig, help_defaults=defaults, title=title, only=only)


def sample_config(args: argparse.Namespace, defaults: C.SampleConfig | None = None):
    """(SampleConfig with the typed flags applied over ``defaults``, {typed field: value})."""
    typed = C.overrides_from_args(args, [C.SampleConfig])
    base = dataclasses.asdict(defaults or C.SampleConfig())
    return C.SampleConfig(**{**base, **typed}), typed


def check_guidance_flags(guidance: str, typed) -> None:
    """A flag the chosen guidance would ignore is an error, not silently dropped."""
    if guidance not in GUIDANCE:
        raise UserError(f"unknown --guidance {guidance!r}; use {', '.join(GUIDANCE)}")
    check_cfg_flags(guidance, typed)
    flags = lambda names: " ".join("--" + k.replace("_", "-") for k in names)  # noqa: E731
    if guidance == "none":
        given = [k for k in GUIDED_FLAGS if k in typed]
        if given:
            many = len(given) > 1
            raise UserError(f"{flags(given)} only appl{'y' if many else 'ies'} to guided sampling; add "
                            f"--guidance multi (or single), or drop {'them' if many else 'it'}")
    elif guidance == "single" and "lambdas" in typed:
        raise UserError("--lambdas is for --guidance multi; single guidance uses --scale and --target")
    elif guidance == "multi":
        if "target" in typed:
            raise UserError("--target is for --guidance single; multi-guidance pushes towards every "
                            "class (weights: --lambdas)")
        if "lambdas" in typed and "scale" in typed:
            raise UserError("give --lambdas (one per class) or --scale (the same for every class), not both")


def default_tag(s: C.SampleConfig) -> str:
    """The output name suffix of ``s``'s samples: the guidance mode (and classifier or CFG form)."""
    return {"none": "none", "cfg": f"cfg_{s.cfg_form}"}.get(s.guidance, f"{s.guidance}_{s.classifier}")


def output_paths(out: str, tag: str, overwrite: bool = False) -> tuple[str, str]:
    """(``<out>/samples_<tag>.npz``, ``.png``), refused if they exist and ``overwrite`` is not set
    (earlier samples are results: never replace them silently); ``out`` is created."""
    npz, png = (os.path.join(out, f"samples_{tag}.{ext}") for ext in ("npz", "png"))
    existing = [f for f in (npz, png) if os.path.exists(f)]
    if existing and not overwrite:
        raise UserError(f"{existing[0]} already exists; pass --tag NAME to write beside it "
                        f"or --overwrite to replace it")
    ensure_writable_dir(out)
    return npz, png


def sample_settings(s: C.SampleConfig) -> dict:
    """The settings stored beside the images; those the guidance mode does not use are empty."""
    guided, clf_guided = s.guidance != "none", s.guidance in ("single", "multi")
    return dict(guidance=s.guidance, seed=s.seed, lambdas=(s.lambdas or "") if guided else "",
                scale=s.scale if guided else 0.0, classifier=s.classifier if clf_guided else "",
                sampler=s.sampler, eta=s.eta, guidance_at=s.guidance_at if clf_guided else "",
                cfg_form=s.cfg_form if s.guidance == "cfg" else "")


def save_samples(npz: str, png: str, x: torch.Tensor, data_cfg, **settings) -> None:
    """The uint8 images and ``settings`` in ``npz``; a grid of the first 64 in ``png`` (circles:
    the edges of the training region marked)."""
    from rundir import save_npz
    save_npz(npz, images=to_uint8(x), **settings)  # atomic: a later command reads it
    circles = data_cfg.dataset == "circles"
    from toy_circles import training_edges
    save_grid(x[:64], png, marks=circles, delta=data_cfg.delta,
              edges=training_edges(data_cfg.bands, data_cfg.delta) if circles else None)


def build_parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_sample_args(p)
    add_output_args(p)
    return p


def add_output_args(p: argparse.ArgumentParser) -> None:
    out = p.add_argument_group("output")
    out.add_argument("--out", default=None, help="output directory (default: the run directory)")
    out.add_argument("--tag", default=None, help="output name suffix (default: the guidance mode)")
    out.add_argument("--overwrite", action="store_true", help="replace samples_<tag>.npz/.png if they exist")


def main(argv=None):
    a = build_parser().parse_args(argv)
    s, typed = sample_config(a)
    check_guidance_flags(s.guidance, typed)  # before anything slow
    check_sampler(s.sampler, s.eta, s.guidance_at)
    if s.n < 1 or s.batch_size < 1:
        raise UserError("--n and --batch-size must be positive")
    device = pick_device(s.device)
    models = load_ddpm(s.run, device)  # first, so a missing run is reported before --out is created
    draw = prepare(s.run, device, s.steps or None, s.guidance, s.lambdas, s.scale,
                   None if s.target == -1 else s.target, s.classifier, models, s.sampler, s.eta,
                   s.guidance_at, s.cfg_form)
    npz, png = output_paths(a.out or s.run, a.tag or default_tag(s), a.overwrite)
    from rundir import remove_stale_temps
    for d in {s.run, a.out or s.run}:
        remove_stale_temps(d)
    t0 = time.time()
    x = draw(s.n, s.batch_size, s.seed, progress=True)
    dt = time.time() - t0
    save_samples(npz, png, x, models[1]["data"], batch_size=s.batch_size, device=torch.device(device).type,
                 **sample_settings(s))
    print(f"{s.n} samples in {dt:.1f} s ({dt / s.n:.3f} s/image); wrote {npz} and {png}")


if __name__ == "__main__":
    cli(main)

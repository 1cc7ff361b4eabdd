"""Configuration: one dataclass per concern, presets, and argparse generated from them.

Every hyper-parameter of a run lives in exactly one dataclass field below. The command-line
flags of train.py are generated from these fields (``model_channels`` -> ``--model-channels``),
so a flag is written once, here. A run's full config is stored in its checkpoint; sample.py and
evaluate.py read it back from there (``from_dict``) instead of repeating flags.

Presets (paper §5.5, App. C; the authors' circles configuration):
  * ``paper`` - the authors' circles setup: 64x64, UNet 128 ch, 3 res blocks, mult 1,2,3,4,
    attention at 16 and 8, T = 4000 cosine, 30k steps x batch 64; classifier width 64, depth 2,
    attention at 8, 3000 steps; learned Sigma trained with L_hybrid, as the authors do (App. A, C;
    diffusion.py).
  * ``cpu`` - the same experiment sized for a 2-core laptop CPU: 32x32 images rendered natively
    (radius-1 discs, same delta), a small UNet, minutes of training for the DDPM and both
    classifiers (why: RESULTS.md#quickstart).
"""
from __future__ import annotations

import argparse
import dataclasses
from dataclasses import dataclass, field, fields

from checkpoint import UserError


def knob(default, help: str):
    """A config field with its --help text: the flag, its default and its meaning in one place."""
    return field(default=default, metadata={"help": help})


@dataclass
class DataConfig:
    dataset: str = knob("circles", "the dataset (train.py --dataset)")
    image_size: int = knob(32, "image side in pixels; circles: 64 is the authors' grid, 32 the CPU mapping")
    channels: int = knob(1, "image channels: 1 for circles, 3 for RGB datasets")
    delta: float = knob(0.2, "width of each extreme training band in z (§4.1)")
    bands: str = knob("extremes", "circles: which disc centres are trained on: extremes (z <= delta or "
                                  ">= 1 - delta, §5.5) | middle (z in [0.35, 0.65], the extrapolation "
                                  "test of §7) | LO:HI (a band centred on the image, e.g. 0.3:0.7); "
                                  "label = right half vs left half (toy_circles.py)")
    flip: bool = knob(True, "random horizontal flips x -> S-1-x (circles: the label flips with it)")
    data_dir: str = knob("", "celeba: folder with img_align_celeba/, list_attr_celeba.txt, "
                             "list_eval_partition.txt (or a toy_faces.py stand-in)")
    attribute: str = knob("", "celeba: the attribute the classifiers learn (Smiling, Young, ...), or "
                              "A/B for A against B (Blond_Hair/Black_Hair, §5.4); two of them, e.g. "
                              "Smiling,Black_Hair, give the 4 corner classes of §6")
    index_list: str = knob("", "celeba: train only on these train-split indices, one 0-based index per "
                               "line (data_filter.py's index.txt; the authors' lists work as they are)")
    cache_dir: str = knob("", "celeba: folder for the decoded uint8 cache (default: beside the data)")


@dataclass
class UNetConfig:
    """The denoising network (the group is named "unet" after the paper's backbone; ``arch`` picks it)."""
    arch: str = knob("unet", "denoising backbone: unet (Nichol & Dhariwal, the paper's) | dit (diffusion "
                             "transformer, Peebles & Xie, App. J) (models.build_model)")
    model_channels: int = knob(16, "base width of the UNet")
    # Four levels (32 -> 16 -> 8 -> 4) at 32 px: the 4x4 level costs 2 % more FLOPs and lowers the
    # unconditional leak into the unseen middle (why: RESULTS.md#circles_table).
    channel_mult: tuple = knob((1, 2, 4, 4), "width multiplier per resolution (one downsampling between each)")
    num_res_blocks: int = knob(1, "residual blocks per resolution")
    attention_resolutions: tuple = knob((8, 4), "resolutions (in px) with self-attention")
    num_head_channels: int = knob(32, "channels per attention head")
    dropout: float = knob(0.0, "dropout in the residual blocks (dit: in the MLPs)")
    # The DiT's knobs (--arch dit, dit.py). The defaults cost about what the cpu UNet does at 32 px
    # (why: RESULTS.md#variants).
    patch_size: int = knob(2, "dit: patch side in pixels (the image size must be a multiple)")
    dit_width: int = knob(64, "dit: token width (divisible by 4 and by --dit-heads)")
    dit_depth: int = knob(4, "dit: number of transformer blocks")
    dit_heads: int = knob(2, "dit: attention heads per block")
    class_cond: bool = knob(False, "class-conditional denoiser eps(x_t, t, y) with a learned null label, "
                                   "for classifier-free guidance (App. J; sample with --guidance cfg)")


@dataclass
class DiffusionConfig:
    timesteps: int = knob(1000, "T, diffusion steps of training")
    noise_schedule: str = knob("cosine", "cosine (Eq. 10) | linear (Ho et al.)")
    variance: str = knob("fixed_large", "reverse variance: fixed_large (beta_t) | fixed_small (beta~_t) | "
                                        "learned (Eq. 8: C extra output channels interpolate log beta~_t.."
                                        "log beta_t; trains with L_hybrid, Eq. 9; the paper presets)")
    prediction: str = knob("v", "network target: eps (Eq. 7, the paper) | v (cpu preset, see diffusion.py)")
    sample_steps: int = knob(64, "respaced ancestral steps used at sampling time")
    clip_denoised: bool = knob(True, "clip x^_0 to [-1, 1] before the posterior mean")


@dataclass
class ClassifierConfig:
    clf_channels: int = knob(16, "base width of the noise-aware classifier")
    clf_channel_mult: tuple = knob((1, 2, 4), "classifier width multiplier per resolution")
    clf_res_blocks: int = knob(1, "classifier residual blocks per resolution")
    clf_attention_resolutions: tuple = knob((8,), "classifier resolutions (in px) with self-attention")
    clf_steps: int = knob(600, "classifier training steps (warm-up + cosine lr decay)")
    clf_lr: float = knob(3e-4, "classifier peak learning rate")
    clf_batch_size: int = knob(64, "classifier batch size")
    sn_scale: float = knob(2.0, "Lipschitz bound of each layer of the spectral-norm twin (§5.5)")
    clf_antialias: bool = knob(False, "blur before every stride-2 downsampling of the classifier "
                               "(unet.Downsample): no preference for even columns")


@dataclass
class TrainConfig:
    # 2000 steps: fewer leave more unconditional samples in the unseen middle (why: RESULTS.md#circles_table).
    steps: int = knob(2000, "DDPM training steps")
    batch_size: int = knob(32, "DDPM batch size")
    lr: float = knob(2e-3, "DDPM peak learning rate (linear warm-up, cosine decay to 10%)")
    warmup_steps: int = knob(100, "learning-rate warm-up steps")
    ema_decay: float = knob(0.999, "EMA decay of the DDPM weights used for sampling")
    grad_clip: float = knob(1.0, "gradient-norm clipping of the DDPM (0: off)")
    save_every: int = knob(500, "checkpoint every N steps (and at the end)")
    log_every: int = knob(50, "log loss/lr/images-per-s every N steps (the only host syncs)")
    seed: int = knob(0, "seed of initialisation and data order (classifier_sn uses seed + 1000)")
    label_dropout: float = knob(0.1, "with --class-cond: probability that a training label is replaced "
                                     "by the null label (trains the unconditional eps(x_t, t, null))")


@dataclass
class SampleConfig:
    """Sampling choices of sample.py and evaluate.py (not part of a run's stored config: the model
    comes from the checkpoint). Both CLIs generate their shared flags from these fields, and so do
    the lab's (lab/)."""
    run: str = knob("runs/circles", "run directory holding ddpm.pt (and the classifiers)")
    n: int = knob(64, "number of samples (evaluate.py: per method)")
    batch_size: int = knob(128, "samples drawn at once (128: fastest per image on a 2-core CPU, "
                                "bench/sample_speed.py)")
    seed: int = knob(0, "sampling seed")
    steps: int = knob(0, "respaced sampling steps; 0 = the run's sample_steps")
    device: str | None = knob(None, "cuda, cuda:N, mps or cpu; default: the best available")
    guidance: str = knob("none", "none | single (§2.2) | multi (§4.2, Eq. 2) | cfg (App. J, Eq. 12: "
                                 "classifier-free multi-guidance; needs a DDPM trained with --class-cond)")
    lambdas: str | None = knob(None, "multi-guidance lambda per class, e.g. 30,30 (default: --scale each)")
    scale: float = knob(30.0, "lambda of single guidance, and of every class if no --lambdas")
    cfg_form: str = knob("affine", "--guidance cfg weights: affine (-lambda, 1 + lambda: they sum to 1) | "
                                   "printed (-lambda, 1 - lambda: Eq. 12 as printed); see classifier_free.py")
    target: int = knob(-1, "class of single guidance; -1 = alternate classes over the batch")
    classifier: str = knob("classifier", "classifier | classifier_sn (the spectral-norm twin)")
    sampler: str = knob("ancestral", "ancestral (DDPM) | ddim (DDIM Eq. 12, Song et al. 2021) on the same "
                                     "respaced steps")
    eta: float = knob(0.0, "DDIM noise scale in [0, 1]: 0 deterministic, 1 the DDPM posterior variance")
    guidance_at: str = knob("xt", "where guidance takes grad log p(y|x): xt (the authors' code) | mu "
                                  "(§2.2 as written: at the posterior mean mu_theta(x_t, t); ancestral only)")


GROUPS = {"data": DataConfig, "unet": UNetConfig, "diffusion": DiffusionConfig,
          "classifier": ClassifierConfig, "train": TrainConfig}

# Presets override the dataclass defaults (which already are the circles/cpu values).
PRESETS = {
    ("circles", "cpu"): {},
    ("circles", "paper"): {
        "data": dict(image_size=64),
        "unet": dict(model_channels=128, channel_mult=(1, 2, 3, 4), num_res_blocks=3,
                     attention_resolutions=(16, 8), num_head_channels=64),
        "diffusion": dict(timesteps=4000, noise_schedule="cosine", sample_steps=64, prediction="eps",
                          variance="learned"),
        "classifier": dict(clf_channels=64, clf_channel_mult=(1, 2, 3, 4), clf_res_blocks=2,
                           clf_attention_resolutions=(8,), clf_steps=3000),
        "train": dict(steps=30000, batch_size=64, lr=1e-4, warmup_steps=0, ema_decay=0.9999,
                      save_every=2000),
    },
}
# The authors' exact circles (64 px, radius 2, the 1200 images of §5.5) on a 2-core CPU: the cpu
# networks with one more resolution level (64 -> 32 -> 16 -> 8, attention at 8), so every level
# below 64 px has the cpu preset's width; v-prediction, T = 1000, 64 respaced steps as on cpu.
# What still differs from ``paper``: 16-channel networks instead of 128/64, 1400 DDPM steps of 32
# instead of 30k of 64, T = 1000 instead of 4000, fixed instead of learned variance, v instead of
# eps prediction, fp32 on CPU instead of fp16 on GPU. Attention at 8 only and 1400 steps, unlike the
# 32-px preset's 8, 4 and 2000: the settings of the 64-px table (why: RESULTS.md#circles64).
PRESETS[("circles", "cpu64")] = {
    "data": dict(image_size=64),
    "unet": dict(channel_mult=(1, 2, 2, 4), attention_resolutions=(8,)),
    "classifier": dict(clf_channel_mult=(1, 2, 2, 4)),
    "train": dict(steps=1400),
}
PRESET_NAMES = sorted({p for _, p in PRESETS})
# CelebA (§5, App. C). ``paper``: the authors' 64 px faces. ``cpu``: sized for the toy_faces
# stand-in at 32 px on a 2-core CPU (a wider UNet than the circles: faces have colour and texture).
_CELEBA_DATA = dict(channels=3, attribute="Smiling")
PRESETS[("celeba", "paper")] = {
    "data": dict(_CELEBA_DATA, image_size=64),
    "unet": dict(model_channels=128, channel_mult=(1, 2, 3, 4), num_res_blocks=3,
                 attention_resolutions=(16, 8), num_head_channels=64),
    "diffusion": dict(timesteps=4000, noise_schedule="cosine", sample_steps=250, prediction="eps",
                      variance="learned"),
    "classifier": dict(clf_channels=128, clf_channel_mult=(1, 2, 3, 4), clf_res_blocks=2,
                       clf_attention_resolutions=(32, 16, 8), clf_steps=150000, clf_batch_size=128,
                       clf_lr=3e-4),
    "train": dict(steps=250000, batch_size=128, lr=1e-4, warmup_steps=0, ema_decay=0.9999,
                  save_every=5000),
}
PRESETS[("celeba", "cpu")] = {
    "data": dict(_CELEBA_DATA, image_size=32),
    "unet": dict(model_channels=32, channel_mult=(1, 2, 2), num_res_blocks=1, attention_resolutions=(8,)),
    "classifier": dict(clf_steps=600),
    "train": dict(steps=2000, batch_size=32, lr=1e-3),
}
DATASETS = sorted({d for d, _ in PRESETS})


def make_config(dataset: str = "circles", preset: str = "cpu", **overrides) -> dict:
    """Return {group: dataclass} for a dataset/preset, with field-level overrides applied."""
    if (dataset, preset) not in PRESETS:
        raise ValueError(f"unknown dataset/preset {dataset!r}/{preset!r}; choose a dataset from "
                         f"{DATASETS} and a preset from {', '.join(p for d, p in PRESETS if d == dataset) or PRESET_NAMES}")
    cfg = {}
    for group, cls in GROUPS.items():
        values = dict(PRESETS[(dataset, preset)].get(group, {}))
        values.update({k: v for k, v in overrides.items() if k in _names(cls)})
        cfg[group] = cls(**values)
    cfg["data"].dataset = dataset
    unknown = set(overrides) - set().union(*(_names(c) for c in GROUPS.values()))
    if unknown:
        raise ValueError(f"unknown config field(s): {sorted(unknown)}")
    return cfg


def to_dict(cfg: dict) -> dict:
    return {g: dataclasses.asdict(c) for g, c in cfg.items()}


def from_dict(d: dict) -> dict:
    """Rebuild the dataclasses from a checkpoint's plain dict (tuples come back as tuples).

    Every field must be stored: a missing one is not filled with today's default (a run trained
    without it may not have behaved like the default), it is a one-line error."""
    out = {}
    for g, cls in GROUPS.items():
        stored = d.get(g, {})
        missing = [f.name for f in fields(cls) if f.name not in stored]
        if missing:
            raise UserError(f"the checkpoint's config has no {g}.{missing[0]}"
                            f"{f' (nor {len(missing) - 1} more)' if len(missing) > 1 else ''}: it was "
                            f"written by other code than this; retrain the run with this code")
        vals = {k: (tuple(v) if isinstance(v, list) else v) for k, v in stored.items() if k in _names(cls)}
        out[g] = cls(**vals)
    return out


def num_classes_of(dcfg) -> int:
    """Classes of a run's labels: two for one attribute (or the circles' two sides); 2^k corners
    for k attributes (§6). The guidance classifiers and a class-conditional DDPM both use it."""
    if dcfg.dataset == "celeba":
        return 2 ** len([a for a in dcfg.attribute.split(",") if a.strip()])
    return 2


def _names(cls) -> set:
    return {f.name for f in fields(cls)}


def _parse_tuple(s: str) -> tuple:
    try:
        return tuple(int(v) for v in s.split(",") if v.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {s!r}")


def add_dataclass_args(parser: argparse.ArgumentParser, cls, help_defaults=None,
                       title: str | None = None, only=None) -> None:
    """One ``--flag`` per field of dataclass ``cls`` (``model_channels`` -> ``--model-channels``).

    Defaults are None so that only the flags a user typed override a preset or a stored config
    (see ``overrides_from_args``); ``help_defaults`` (an instance) is what ``--help`` shows;
    ``only`` restricts the flags to those field names."""
    shown = help_defaults if help_defaults is not None else cls()
    grp = parser.add_argument_group(title or f"{cls.__name__}")
    for f in fields(cls):
        if only is not None and f.name not in only:
            continue
        flag = "--" + f.name.replace("_", "-")
        if flag in parser._option_string_actions:  # e.g. --dataset, declared by the CLI itself
            continue
        default = getattr(shown, f.name)
        kind = f.default if f.default is not dataclasses.MISSING else default
        doc = f.metadata.get("help", "").replace("%", "%%")  # argparse formats help with %
        if isinstance(kind, bool):
            grp.add_argument(flag, action=argparse.BooleanOptionalAction, default=None,
                             help=f"{doc} (default: {default})")
        elif isinstance(kind, tuple):
            grp.add_argument(flag, type=_parse_tuple, default=None, metavar="A,B,..",
                             help=f"{doc} (default: {','.join(map(str, default))})")
        else:
            typ = type(kind) if kind is not None else str
            grp.add_argument(flag, type=typ, default=None, help=f"{doc} (default: {default})")


def add_config_args(parser: argparse.ArgumentParser, groups=("data", "unet", "diffusion",
                                                              "classifier", "train")) -> None:
    """The flags of the model/training config groups (their help shows the cpu preset)."""
    for g in groups:
        add_dataclass_args(parser, GROUPS[g], title=f"{g} config ({GROUPS[g].__name__}, cpu preset)")


def overrides_from_args(args: argparse.Namespace, classes=None) -> dict:
    """The fields the user typed (non-None), for the given dataclasses (default: GROUPS)."""
    classes = classes or GROUPS.values()
    names = set().union(*(_names(c) for c in classes)) - {"dataset"}
    return {k: v for k, v in vars(args).items() if k in names and v is not None}

"""Configuration: one dataclass per concern, presets, and argparse generated from them.

Every hyper-parameter of a run lives in exactly one dataclass field below. The command-line
flags of train.py are generated from these fields (``model_channels`` -> ``--model-channels``),
so a flag is written once, here. A run's full config is stored in its checkpoint; sample.py and
evaluate.py read it back from there (``from_dict``) instead of repeating flags.

Presets (paper §5.5, App. C; the authors' circles configuration):
  * ``paper`` - the authors' circles setup: 64x64, UNet 128 ch, 3 res blocks, mult 1,2,3,4,
    attention at 16 and 8, T = 4000 cosine, 30k steps x batch 64; classifier width 64, depth 2,
    attention at 8, 3000 steps. (The authors learn Sigma; this codebase uses fixed variance
    until L_hybrid lands, see diffusion.py.)
  * ``cpu`` - the same experiment sized for a 2-core laptop CPU: 32x32 images rendered natively
    (radius-1 discs, same delta), a small UNet, ~6 minutes of training.
"""
from __future__ import annotations

import argparse
import dataclasses
from dataclasses import dataclass, field, fields


@dataclass
class DataConfig:
    dataset: str = "circles"       # circles (celeba arrives with its own issue)
    image_size: int = 32           # circles: 64 reproduces the authors' grid, 32 is the CPU mapping
    channels: int = 1              # circles are grey-scale; 3 for RGB datasets
    delta: float = 0.2             # width of each extreme band in z (§4.1)
    flip: bool = True              # horizontal flip x -> S-1-x (symmetric for circles, used by the authors)


@dataclass
class UNetConfig:
    model_channels: int = 16
    channel_mult: tuple = (1, 2, 4)
    num_res_blocks: int = 1
    attention_resolutions: tuple = (8,)
    num_head_channels: int = 32    # attention heads of this width
    dropout: float = 0.0


@dataclass
class DiffusionConfig:
    timesteps: int = 1000
    noise_schedule: str = "cosine"       # cosine (Eq. 10) | linear
    variance: str = "fixed_large"        # fixed_large (beta_t) | fixed_small (beta~_t)
    prediction: str = "v"                # eps (Eq. 7, the paper) | v (CPU preset, see diffusion.py)
    sample_steps: int = 64               # respaced ancestral steps used at sampling time
    clip_denoised: bool = True           # clip x^_0 to [-1, 1] before the posterior mean


@dataclass
class ClassifierConfig:
    clf_channels: int = 16
    clf_channel_mult: tuple = (1, 2, 4)
    clf_res_blocks: int = 1
    clf_attention_resolutions: tuple = (8,)
    clf_steps: int = 600
    clf_lr: float = 3e-4
    clf_batch_size: int = 64
    sn_scale: float = 2.0          # Lipschitz bound of each layer of the spectral-norm twin (§5.5)


@dataclass
class TrainConfig:
    steps: int = 1400
    batch_size: int = 32
    lr: float = 2e-3
    warmup_steps: int = 100
    ema_decay: float = 0.999
    grad_clip: float = 1.0
    save_every: int = 500
    log_every: int = 50            # loss/lr/images-per-s to log_<model>.jsonl (the only host syncs)
    seed: int = 0


@dataclass
class SampleConfig:
    """Sampling choices of sample.py and evaluate.py (not part of a run's stored config: the model
    comes from the checkpoint). Both CLIs generate their shared flags from these fields."""
    run: str = "runs/circles"      # run directory holding ddpm.pt (and the classifiers)
    n: int = 64                    # samples (evaluate.py: per method, default 512)
    batch_size: int = 256
    seed: int = 0
    steps: int = 0                 # respaced sampling steps; 0 = the run's diffusion.sample_steps
    device: str | None = None      # cuda, mps or cpu; None = the best available (pick_device)
    guidance: str = "none"         # none | single (§2.2) | multi (§4.2, Eq. 2)
    lambdas: str | None = None     # multi-guidance lambda per class, e.g. "30,30" (default: --scale)
    scale: float = 30.0            # lambda of single guidance, and of every class if no --lambdas
    target: int = -1               # class of single guidance; -1 = alternate classes over the batch
    classifier: str = "classifier"  # classifier | classifier_sn (the spectral-norm twin)


GROUPS = {"data": DataConfig, "unet": UNetConfig, "diffusion": DiffusionConfig,
          "classifier": ClassifierConfig, "train": TrainConfig}

# Presets override the dataclass defaults (which already are the circles/cpu values).
PRESETS = {
    ("circles", "cpu"): {},
    ("circles", "paper"): {
        "data": dict(image_size=64),
        "unet": dict(model_channels=128, channel_mult=(1, 2, 3, 4), num_res_blocks=3,
                     attention_resolutions=(16, 8), num_head_channels=64),
        "diffusion": dict(timesteps=4000, noise_schedule="cosine", sample_steps=64, prediction="eps"),
        "classifier": dict(clf_channels=64, clf_channel_mult=(1, 2, 3, 4), clf_res_blocks=2,
                           clf_attention_resolutions=(8,), clf_steps=3000),
        "train": dict(steps=30000, batch_size=64, lr=1e-4, warmup_steps=0, ema_decay=0.9999,
                      save_every=2000),
    },
}
DATASETS = sorted({d for d, _ in PRESETS})


def make_config(dataset: str = "circles", preset: str = "cpu", **overrides) -> dict:
    """Return {group: dataclass} for a dataset/preset, with field-level overrides applied."""
    if (dataset, preset) not in PRESETS:
        raise ValueError(f"unknown dataset/preset {dataset!r}/{preset!r}; choose a dataset from "
                         f"{DATASETS} and a preset from cpu, paper")
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
    """Rebuild the dataclasses from a checkpoint's plain dict (tuples come back as tuples)."""
    out = {}
    for g, cls in GROUPS.items():
        vals = {k: (tuple(v) if isinstance(v, list) else v) for k, v in d.get(g, {}).items()
                if k in _names(cls)}
        out[g] = cls(**vals)
    return out


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
        if isinstance(kind, bool):
            grp.add_argument(flag, action=argparse.BooleanOptionalAction, default=None,
                             help=f"(default: {default})")
        elif isinstance(kind, tuple):
            grp.add_argument(flag, type=_parse_tuple, default=None, metavar="A,B,..",
                             help=f"(default: {','.join(map(str, default))})")
        else:
            typ = type(kind) if kind is not None else str
            grp.add_argument(flag, type=typ, default=None, help=f"(default: {default})")


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

"""Clean classifiers and the calibrated *evaluation classifier* (§4.3, App. D.1, §5 intro).

Two uses of one training routine (``train_clean_classifier``):
  * the filter of §4.3 / App. D.1 (``data_filter.py``) trains a classifier on all of the train
    split and an ensemble of 5 on subsets of what it kept;
  * §5 measures each face's latent with an *evaluation classifier* whose probability, after
    temperature scaling (Guo et al., 2017), is the proxy z reported in every histogram (Fig. 5/6).

"Clean" classifier = ``classifier.NoisyClassifier`` (the guidance classifier's architecture)
always called with t = 0, i.e. on noise-free images. The paper used EfficientNet (Tan & Le, 2021)
here; using the guidance architecture keeps one network family in the codebase.

Temperature scaling: one scalar T > 0 divides the logits, p = softmax(l / T), T chosen to
minimise the negative log-likelihood on held-out data. It changes no prediction (argmax and,
for 2 classes, the ranking are unchanged), only the confidence. T is fitted on the **valid**
split: on the training images the network is over-confident *because it fitted them*, so a T
fitted there under-corrects (T -> 1, or even < 1 for a network that memorised them) and the
calibrated p would still be over-confident on unseen images. (The authors' smile script fits T
on train; we do not copy that.)

How long to train it: 800 steps by default. Longer training makes the network over-confident (T
grows, and scaling then lowers the ECE), but its logits also saturate at the extremes, so it ranks
the most extreme faces worse and stage (c) of the filter lets mild faces in; at 800 steps the
stand-in's classifier ranks best and is already calibrated, with T close to the paper's 1.05 for
Smiling (why: RESULTS.md#faces_pipeline).

Checkpoint ``<filter_dir>/eval_<Attribute>.pt`` (``eval_path``): one dict {kind="eval_classifier",
model, arch, image_size, channels, num_classes, attribute, temperature, metrics, data_dir, meta}, plain
values and tensors only, read with ``checkpoint.safe_load`` (weights_only: nothing in it can run).
"""
from __future__ import annotations

import os
from types import SimpleNamespace

import numpy as np
import torch
import torch.nn.functional as F

from checkpoint import UserError, from_uint8, load_weights, safe_load, save_checkpoint, versions
from classifier import NoisyClassifier
from trainer import lr_at  # the project's one warm-up + cosine schedule

KIND = "eval_classifier"
ARCH_KEYS = ("clf_channels", "clf_channel_mult", "clf_res_blocks", "clf_attention_resolutions")
# The stand-in's true latent for each attribute, oriented so that 1 <-> attribute = 1
# (toy_faces: Black_Hair = 1[z_hair + e < 0.5], the others 1[z + e > 0.5]).
LATENT_OF = {"Smiling": ("z_smile", False), "Young": ("z_young", False),
             "Black_Hair": ("z_hair", True), "Blond_Hair": ("z_hair", False)}
EVAL_SEED_OFFSET = 100   # the eval classifier's seed differs from the filter classifiers'


def eval_path(filter_dir: str, attribute: str) -> str:
    from attributes import attribute_slug
    return os.path.join(filter_dir, f"eval_{attribute_slug(attribute)}.pt")


def arch_of(cfg) -> dict:
    """The NoisyClassifier widths of a config with clf_* fields (e.g. data_filter.FilterConfig)."""
    return {k: getattr(cfg, k) for k in ARCH_KEYS}


# ----- training and inference -------------------------------------------------------------------

def train_clean_classifier(data, steps: int, batch_size: int, lr: float, seed: int, device,
                           arch: dict, num_classes: int = 2, rows=None, progress: bool = True):
    """Train a clean classifier (t = 0 always) on ``data`` (.images uint8 NHWC, .labels int [N]),
    or on the positions ``rows`` of it only; return it in eval mode. ``num_classes=1`` makes it a
    regressor instead: float labels, MSE on its single output (the stand-in's true-z proxy).

    Cross-entropy, AdamW without weight decay, fp32, warm-up over 5 % of the steps then cosine
    decay (trainer.lr_at). Batches are drawn with replacement; each image is mirrored with
    probability 1/2 (a mirrored face keeps its smile, hair and age, so the label is unchanged).
    Deterministic given ``seed`` (initialisation and batches)."""
    device = torch.device(device)
    labels = np.asarray(data.labels)
    if labels.ndim != 1:
        raise UserError("a clean classifier takes one attribute; pass a single --attribute")
    rows = np.arange(len(labels)) if rows is None else np.asarray(rows, dtype=np.int64)
    if not len(rows):
        raise UserError("no images to train a classifier on; loosen the filter thresholds")
    size, channels = data.images.shape[1], data.images.shape[3]
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    model = NoisyClassifier(size, channels, num_classes, **arch).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    t0 = torch.zeros(batch_size, dtype=torch.long, device=device)
    from tqdm import tqdm
    model.train()
    for step in tqdm(range(steps), desc=f"clean classifier (seed {seed}, {len(rows)} images)",
                     disable=not progress, mininterval=1.0, dynamic_ncols=True, leave=False):
        for g in opt.param_groups:
            g["lr"] = lr_at(step, lr, max(1, steps // 20), steps)
        # Sorted rows read the memmap in order; the order inside a batch does not matter.
        pick = np.sort(rows[torch.randint(0, len(rows), (batch_size,), generator=gen).numpy()])
        x = from_uint8(np.asarray(data.images[pick]))
        flip = torch.rand(batch_size, generator=gen) < 0.5
        x = torch.where(flip[:, None, None, None], x.flip(-1), x).to(device)
        y = torch.from_numpy(labels[pick]).to(device)
        out = model(x, t0)
        loss = F.mse_loss(out[:, 0], y.float()) if num_classes == 1 else F.cross_entropy(out, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return model.eval()


@torch.inference_mode()
def logits_of(model, images_uint8, device, batch: int = 256, rows=None) -> np.ndarray:
    """float64 [N, C] logits at t = 0 of uint8 NHWC images (all, or the positions ``rows``).
    batch 256: at 32 px its activations stay cache-sized on a CPU, which 512 does not."""
    device = torch.device(device)
    rows = np.arange(len(images_uint8)) if rows is None else np.asarray(rows, dtype=np.int64)
    out = []
    for i in range(0, len(rows), batch):
        x = from_uint8(np.asarray(images_uint8[rows[i:i + batch]])).to(device)
        t = torch.zeros(len(x), dtype=torch.long, device=device)
        out.append(model(x, t).double().cpu().numpy())
    return np.concatenate(out) if out else np.zeros((0, model.num_classes))


# ----- calibration (Guo et al., 2017) -----------------------------------------------------------

def _matrix(logits) -> np.ndarray:
    """[N, C] float64; a 1-D array is read as binary logit differences l1 - l0."""
    a = np.asarray(logits, dtype=np.float64)
    return np.stack([np.zeros_like(a), a], 1) if a.ndim == 1 else a


def probs_of(logits, T: float = 1.0) -> np.ndarray:
    """softmax(logits / T) in float64, [N, C]."""
    z = _matrix(logits) / T
    z = z - z.max(1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(1, keepdims=True)


def nll(logits, labels, T: float = 1.0) -> float:
    """Mean negative log-likelihood -log softmax(l / T)[y]."""
    z = _matrix(logits) / T
    m = z.max(1, keepdims=True)
    lse = (m + np.log(np.exp(z - m).sum(1, keepdims=True)))[:, 0]
    return float(np.mean(lse - z[np.arange(len(z)), np.asarray(labels)]))


def fit_temperature(logits, labels, bounds=(1e-2, 1e2)) -> float:
    """T in ``bounds`` minimising nll(logits, labels, T).

    With beta = 1/T the NLL is convex in beta (log-sum-exp of a linear function of beta minus a
    linear term), with derivative
        g(beta) = mean_i( sum_c softmax(beta l_i)_c l_ic - l_i,y_i ),
    increasing in beta (its derivative is the variance of l_i under softmax(beta l_i)). So the
    optimum is the root of g, found by bisection on log beta in float64 to machine precision: no
    step size, no local minimum. If g has no root inside the bounds (e.g. separable data: the
    NLL keeps falling as T -> 0), the nearest bound is returned."""
    l = _matrix(logits)
    y = np.asarray(labels)
    ly = l[np.arange(len(l)), y]

    def g(log_beta):
        return float(np.mean((probs_of(l * np.exp(log_beta)) * l).sum(1) - ly))

    lo, hi = -np.log(bounds[1]), -np.log(bounds[0])      # log beta range
    if g(lo) >= 0:
        return float(bounds[1])
    if g(hi) <= 0:
        return float(bounds[0])
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if g(mid) < 0 else (lo, mid)
        if hi - lo < 1e-13:
            break
    return float(np.exp(-0.5 * (lo + hi)))


def ece(probs, labels, bins: int = 15) -> float:
    """Expected calibration error of Guo et al. (2017), confidence-bin definition.

    ``probs``: [N] P(y = 1) of a binary classifier, or [N, C] class probabilities. Each sample's
    confidence is its top probability, its prediction the argmax (ties -> the lower class). With
    B_m the samples whose confidence lies in ((m-1)/M, m/M] (m = 1..M; confidence 0 joins B_1),
        ECE = sum_m |B_m| / N * | acc(B_m) - conf(B_m) |,
    acc the fraction of correct predictions and conf the mean confidence in the bin."""
    p = np.asarray(probs, dtype=np.float64)
    p = np.stack([1 - p, p], 1) if p.ndim == 1 else p
    conf, pred = p.max(1), p.argmax(1)
    correct = (pred == np.asarray(labels)).astype(np.float64)
    b = np.clip(np.ceil(conf * bins).astype(np.int64) - 1, 0, bins - 1)
    n = np.bincount(b, minlength=bins)
    gap = np.abs(np.bincount(b, correct, bins) - np.bincount(b, conf, bins))  # = n |acc - conf|
    return float(gap.sum() / max(1, n.sum()))


# ----- the stand-in's true latent ---------------------------------------------------------------

def true_latent(data_dir: str, attribute: str, files) -> np.ndarray | None:
    """The true z of ``files`` (oriented: 1 <-> attribute = 1) when ``data_dir`` is the toy_faces
    stand-in (it has latents.csv) and the attribute has a latent; else None. For ``A/B`` the
    label is A's, so is the latent."""
    attribute = attribute.split("/")[0].strip()
    if attribute not in LATENT_OF or not os.path.isfile(os.path.join(data_dir, "latents.csv")):
        return None
    from toy_faces import read_latents
    lat = read_latents(data_dir)
    column, flipped = LATENT_OF[attribute]
    where = {f: i for i, f in enumerate(lat["file"])}
    z = lat[column][[where[f] for f in files]]
    return 1.0 - z if flipped else z


# ----- the stand-in's true-latent proxy (evaluate_faces: the "z_" columns) ---------------------

ZREG_STEPS = 400


def zregressor(clf, data_dir: str, device, steps: int = ZREG_STEPS, batch_size: int = 64,
               cache_dir: str | None = None, path: str | None = None, progress: bool = False):
    """The stand-in's true-latent proxy for ``clf.attribute`` (None when there is no true latent):
    the clean-classifier architecture with one output, trained with MSE on the true z of every
    train image; cached at ``path`` (default beside the evaluation classifier) for this data folder,
    attribute, size and steps. Returns a function uint8 NHWC -> predicted z."""
    from celeba import CelebAData
    from classifier import NoisyClassifier
    attr, size = clf.attribute, clf.image_size
    if true_latent(data_dir, attr, []) is None:
        return None
    key = {"data_dir": os.path.realpath(data_dir), "attribute": attr, "image_size": size, "steps": steps,
           "arch": clf.arch}
    model = NoisyClassifier(size, 3, 1, **clf.arch)

    def predict(images_u8) -> np.ndarray:
        return logits_of(model, images_u8, device)[:, 0]

    ck = safe_load(path, "delete it; it is retrained on the next run") if path and os.path.isfile(path) else None
    if isinstance(ck, dict) and ck.get("key") == key:
        load_weights(model, ck["model"], path, ck)
        model = model.to(device).eval()
        predict.quality = ck.get("quality", {})
        return predict
    data = CelebAData(data_dir, size, attr, "train", flip=False, cache_dir=cache_dir, progress=progress)
    # The clean-classifier recipe with one output and MSE (eval_classifier.train_clean_classifier).
    target = SimpleNamespace(images=data.images, labels=true_latent(data_dir, attr, data.files).astype(np.float32))
    model = train_clean_classifier(target, steps, batch_size, 1e-3, 0, device, clf.arch, num_classes=1,
                                   progress=progress)
    quality = {}
    try:  # held-out quality on the test split (the stand-in has true latents for every split)
        test = CelebAData(data_dir, size, attr, "test", flip=False, cache_dir=cache_dir, progress=progress)
        zt, pt = true_latent(data_dir, attr, test.files), predict(test.images)
        quality = dict(test_rmse=float(np.sqrt(np.mean((pt - zt) ** 2))),
                       test_corr=float(np.corrcoef(pt, zt)[0, 1]), test_n=len(zt))
    except UserError:
        pass
    if path:
        save_checkpoint({"kind": "zregressor", "key": key, "quality": quality, "meta": versions(),
                         "model": {k: v.cpu() for k, v in model.state_dict().items()}}, path)
    predict.quality = quality
    return predict


# ----- the evaluation classifier ----------------------------------------------------------------

def train_eval_classifier(data_dir: str, attribute: str, size: int, out_path: str, cfg, device,
                          cache_dir: str | None = None, progress: bool = True) -> "EvalClassifier":
    """Train on the whole train split, fit one temperature on the valid split, save ``out_path``.

    ``cfg`` needs eval_steps, batch_size, lr, seed and the clf_* widths (data_filter.FilterConfig).
    Metrics: on valid, T, ECE and NLL before/after scaling, accuracy; on test (unused by the fit),
    ECE before/after and accuracy; on the stand-in also the Pearson correlation of the calibrated
    p with the true latent on the test split."""
    from celeba import CelebAData
    device = torch.device(device)
    load = lambda split: CelebAData(data_dir, size, attribute, split, cache_dir=cache_dir,
                                    progress=progress)
    train, valid = load("train"), load("valid")
    arch = arch_of(cfg)
    model = train_clean_classifier(train, cfg.eval_steps, cfg.batch_size, cfg.lr,
                                   cfg.seed + EVAL_SEED_OFFSET, device, arch, progress=progress)
    lv, yv = logits_of(model, valid.images, device), valid.labels
    T = fit_temperature(lv, yv)
    metrics = {"T": T, "ece_before": ece(probs_of(lv), yv), "ece_after": ece(probs_of(lv, T), yv),
               "nll_before": nll(lv, yv), "nll_after": nll(lv, yv, T),
               "valid_accuracy": float(np.mean(lv.argmax(1) == yv)), "valid_n": len(yv)}
    # The test split was not used to fit T: its ECE before/after is the unbiased check.
    test = load("test")
    lt, yt = logits_of(model, test.images, device), test.labels
    metrics.update(ece_test_before=ece(probs_of(lt), yt), ece_test_after=ece(probs_of(lt, T), yt),
                   test_accuracy=float(np.mean(lt.argmax(1) == yt)), test_n=len(yt))
    z = true_latent(data_dir, attribute, test.files)
    if z is not None:
        metrics["corr_true_z"] = float(np.corrcoef(probs_of(lt, T)[:, 1], z)[0, 1])
    ck = {"kind": KIND, "model": model.state_dict(), "arch": arch, "image_size": size,
          "channels": 3, "num_classes": 2, "attribute": attribute, "temperature": T,
          "metrics": metrics, "data_dir": os.path.abspath(data_dir), "steps": cfg.eval_steps,
          "meta": versions()}
    save_checkpoint(ck, out_path)
    return EvalClassifier(model, ck)


class EvalClassifier:
    """A trained evaluation classifier: calibrated P(attribute = 1 | x) and penultimate features.

    Inputs ``x`` of ``prob``/``logits``/``features``: float images in [-1, 1] NCHW (torch or
    numpy, the sampler's format) or uint8 NHWC (torch or numpy, the file format); both must be
    ``image_size`` px."""

    def __init__(self, model: NoisyClassifier, ck: dict):
        self.model = model.eval()
        self.device = next(model.parameters()).device
        self.attribute, self.image_size = ck["attribute"], ck["image_size"]
        self.temperature, self.metrics = float(ck["temperature"]), dict(ck["metrics"])
        self.data_dir, self.arch = ck["data_dir"], dict(ck["arch"])

    @classmethod
    def load(cls, path: str, device=None) -> "EvalClassifier":
        if not os.path.isfile(path):
            raise UserError(f"no evaluation classifier at {path}; train it with python "
                            "data_filter.py --data-dir DIR --attribute ATTR --out "
                            f"{os.path.dirname(path) or '.'}")
        ck = safe_load(path, "delete it and run data_filter.py again")
        if not isinstance(ck, dict) or ck.get("kind") != KIND:
            raise UserError(f"{path} is not an evaluation classifier; delete it and run "
                            "data_filter.py again")
        model = NoisyClassifier(ck["image_size"], ck["channels"], ck["num_classes"], **ck["arch"])
        load_weights(model, ck["model"], path, ck)
        return cls(model.to(torch.device(device or "cpu")), ck)

    def _input(self, x) -> torch.Tensor:
        """float [-1, 1] NCHW on the classifier's device, after checking the image size."""
        uint8 = (x.dtype == torch.uint8) if torch.is_tensor(x) else np.asarray(x).dtype == np.uint8
        size = x.shape[1] if uint8 else x.shape[-1]
        if len(x.shape) != 4 or size != self.image_size:
            raise UserError(f"evaluation classifier is {self.image_size} px but images are "
                            f"{size} px ({tuple(x.shape)}); evaluate at {self.image_size} px or "
                            f"train one at {size} px (data_filter.py --image-size {size})")
        if uint8:  # np.array copies: a read-only memmap would make torch warn
            x = from_uint8(np.array(x.cpu() if torch.is_tensor(x) else x))
        x = x.float() if torch.is_tensor(x) else torch.as_tensor(np.asarray(x)).float()
        return x.to(self.device)

    @torch.inference_mode()
    def logits(self, x, batch: int = 256) -> np.ndarray:
        """Uncalibrated float64 [N, 2] logits (t = 0)."""
        x = self._input(x)
        t = torch.zeros(len(x), dtype=torch.long, device=self.device)
        return torch.cat([self.model(x[i:i + batch], t[i:i + batch]).double().cpu()
                          for i in range(0, len(x), batch)]).numpy()

    def prob(self, x, batch: int = 256) -> np.ndarray:
        """Calibrated P(attribute = 1 | x) = softmax(logits / T)[:, 1], float64 [N]."""
        return probs_of(self.logits(x, batch), self.temperature)[:, 1]

    @torch.inference_mode()
    def features(self, x, batch: int = 256) -> np.ndarray:
        """float32 [N, C] penultimate features: the attention-pooled vector fed to the last
        linear layer (for nearest-neighbour memorisation checks, App. H)."""
        x = self._input(x)
        grabbed = []
        hook = self.model.head[-1].out.register_forward_pre_hook(
            lambda m, args: grabbed.append(args[0][:, :, 0].float().cpu()))
        try:
            t = torch.zeros(len(x), dtype=torch.long, device=self.device)
            for i in range(0, len(x), batch):
                self.model(x[i:i + batch], t[i:i + batch])
        finally:
            hook.remove()
        return torch.cat(grabbed).numpy()

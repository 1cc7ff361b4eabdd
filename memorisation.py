"""The memorisation check of App. H, offline: are the generated faces copies of training faces?

For the samples closest to the training set, a figure shows each beside its 8 nearest training
images with the distances, in pixel space (L2 of images in [0, 1]) and in the feature space of the
evaluation classifier (its pooled penultimate features; the paper used CLIP embeddings and FAISS,
neither available offline here). A copied training image shows up as distance 0 in both.
"""
from __future__ import annotations

import os

import numpy as np
import torch


def nearest(queries: np.ndarray, base: np.ndarray, k: int = 8, chunk: int = 4096):
    """(distances [Q, k], indices [Q, k]) of the k nearest rows of ``base`` (L2).

    Candidates are found chunk by chunk of ``base`` with float32 cdist (bounded memory at 60k
    training images of 64 px), then the k kept are re-measured exactly in float64: the
    matrix-product form of cdist loses ~1e-7 to cancellation, so a copied image reads 0 exactly."""
    q = np.asarray(queries).reshape(len(queries), -1)
    b = np.asarray(base).reshape(len(base), -1)
    k = min(k, len(b))
    qf = torch.as_tensor(q, dtype=torch.float32)
    best_d = torch.full((len(q), 0), float("inf"))
    best_i = torch.zeros((len(q), 0), dtype=torch.long)
    for s in range(0, len(b), chunk):
        d = torch.cdist(qf, torch.as_tensor(b[s:s + chunk], dtype=torch.float32))
        v, j = d.topk(min(k, d.shape[1]), dim=1, largest=False)
        cand_d, cand_i = torch.cat([best_d, v], 1), torch.cat([best_i, j + s], 1)
        best_d, o = cand_d.topk(min(k, cand_d.shape[1]), dim=1, largest=False)
        best_i = cand_i.gather(1, o)
    q64 = torch.as_tensor(q, dtype=torch.float64)
    exact = (q64[:, None, :] - torch.as_tensor(b[best_i.numpy()], dtype=torch.float64)).norm(dim=-1)
    exact, o = exact.sort(dim=1, stable=True)
    return exact.numpy(), best_i.gather(1, o).numpy()


def memorisation(samples_u8, train_u8, k: int = 8, rows: int = 8, features=None):
    """App. H: the ``rows`` samples closest to the training set and their k nearest training images.

    ``features``: None for pixel space (uint8 / 255), else (sample features, train features).
    Returns {sample: [r], neighbours: [r, k], distances: [r, k]} (positions in the inputs)."""
    if features is None:
        a = np.asarray(samples_u8, dtype=np.float64) / 255.0
        b = np.asarray(train_u8, dtype=np.float64) / 255.0
    else:
        a, b = features
    d, j = nearest(a, b, k)
    order = np.argsort(d[:, 0], kind="stable")[:rows]
    return {"sample": order, "neighbours": j[order], "distances": d[order]}


def plot_memorisation(samples_u8, train_u8, res: dict, path: str, title: str) -> None:
    from figures import pyplot, save
    plt = pyplot()
    r, k = res["neighbours"].shape
    fig, axes = plt.subplots(r, k + 1, figsize=(1.2 * (k + 1), 1.35 * r), squeeze=False)
    for i in range(r):
        axes[i][0].imshow(samples_u8[res["sample"][i]])
        axes[i][0].set_title(f"sample {res['sample'][i]}", fontsize=6, color="red")
        for j in range(k):
            axes[i][j + 1].imshow(train_u8[res["neighbours"][i, j]])
            axes[i][j + 1].set_title(f"d={res['distances'][i, j]:.3g}", fontsize=6)
    for ax in axes.ravel():
        ax.axis("off")
    fig.suptitle(title, fontsize=8)
    save(fig, path, dpi=110, tight=True)


def memorisation_report(samples, train_u8, featurize, run, name, rows=8, k=8) -> dict:
    """memorisation.png (pixel L2), memorisation_features.png (evaluation-classifier features),
    memorisation.json (sample / neighbour positions and distances). ``featurize``: uint8 images
    -> evaluation-classifier features."""
    out = {}
    pix = memorisation(samples, train_u8, k, rows)
    plot_memorisation(samples, train_u8, pix, os.path.join(run, "memorisation.png"),
                      f"{name}: samples closest to the training set (pixel L2, images in [0,1])")
    feats = memorisation(samples, train_u8, k, rows, features=(featurize(samples), featurize(train_u8)))
    plot_memorisation(samples, train_u8, feats, os.path.join(run, "memorisation_features.png"),
                      f"{name}: nearest training images in eval-classifier feature space (L2)")
    for key, r in (("pixel", pix), ("features", feats)):
        out[key] = {kk: np.asarray(v).tolist() for kk, v in r.items()}
    out["method"] = name
    out["train_images"] = int(len(train_u8))
    from rundir import write_json
    write_json(os.path.join(run, "memorisation.json"), out, indent=1)
    return out


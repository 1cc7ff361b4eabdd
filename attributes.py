"""Classes from CelebA's binary attributes: one attribute (§5.1), A versus B (§5.4), corners (§6).

Every CelebA experiment of the paper is a classification of faces into a few classes, which the
guidance classifier learns and multi-guidance interpolates between:
  * ``Smiling``: CelebA's column, 1 = smiling, 0 = not (§5.1); ``Young``, ``Male``, ... alike;
  * ``Blond_Hair/Black_Hair``: A *versus* B (§5.4), faces that are exactly one of them;
  * ``Smiling,Black_Hair``: k attributes at once (§6, App. F), each face one of the 2^k corner
    classes of the k-dimensional attribute square (``corner_classes``).
celeba.py reads the attribute table; this module turns its columns into labels.
"""
from __future__ import annotations

import numpy as np

from checkpoint import UserError


def attribute_index(names: list[str], name: str) -> int:
    """Column of attribute ``name``; an unknown name is a one-line error listing the valid ones."""
    if name not in names:
        raise UserError(f"unknown CelebA attribute {name!r}; choose from {', '.join(names)}")
    return names.index(name)


def attribute_list(attribute) -> tuple[list[str], bool]:
    """(names, single): a name, a comma-separated string, or a list of names."""
    if isinstance(attribute, str):
        names = [a.strip() for a in attribute.split(",") if a.strip()]
        return names, len(names) == 1
    return list(attribute), False


def attribute_slug(attribute: str) -> str:
    """``attribute`` as a file-name part: ``Blond_Hair/Black_Hair`` -> ``Blond_Hair-vs-Black_Hair``."""
    return attribute.replace("/", "-vs-").replace(",", "+")


def attribute_labels(names: list[str], attrs: np.ndarray, item: str):
    """(0/1 labels [N], defined [N] bool) of one attribute item over the rows of ``attrs``.

    ``A`` is CelebA's column A (defined everywhere). ``A/B`` is the paper's *A versus B* (§5.4:
    "Blond_Hair"/"Black_Hair"): label 1 where A = 1 and B = 0, label 0 where A = 0 and B = 1, and
    undefined where both or neither hold (CelebA's brown- or grey-haired faces: neither class of
    a blond-vs-black experiment, so they must not be read as class 0)."""
    parts = [a.strip() for a in item.split("/")]
    if len(parts) > 2 or not all(parts) or len(set(parts)) != len(parts):
        raise UserError(f"attribute {item!r}: write one name (Smiling) or two different names A/B "
                        "(Blond_Hair/Black_Hair: A = class 1 against B = class 0)")
    a = attrs[:, attribute_index(names, parts[0])].astype(np.int64)
    if len(parts) == 1:
        return a, np.ones(len(a), dtype=bool)
    b = attrs[:, attribute_index(names, parts[1])].astype(np.int64)
    return a, a != b


def corner_classes(labels: np.ndarray) -> np.ndarray:
    """k binary attributes [N, k] -> one of 2^k corner classes (§6, App. F), attribute 1 first:
    class = sum_i (1 - a_i) 2^(k-1-i). For Smiling,Black_Hair: 0 smile+black, 1 smile+not black,
    2 no smile+black, 3 no smile+not black (the authors' order)."""
    labels = np.asarray(labels, dtype=np.int64)
    k = labels.shape[1]
    return ((1 - labels) * (2 ** np.arange(k - 1, -1, -1))).sum(1)

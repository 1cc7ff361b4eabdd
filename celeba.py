"""CelebA from a local folder: attributes, partitions, the authors' crop, a decoded cache (§4.3, §5.1).

The paper trains on CelebA (Liu et al., 2015) at 64x64 (§5, App. C): the DDPM and the guidance
classifier see a subset of the *train* partition that keeps only extreme examples of one
attribute ("Smiling" in §5.1, "Young" and "Blond_Hair"/"Black_Hair" in §5.4), selected by the
filtering of §4.3 / App. D.1. The authors publish those subsets as *index lists*: one 0-based
integer per line indexing the train partition (index i <-> file ``{i+1:06d}.jpg``, since
CelebA's train partition is the contiguous files 000001..162770). ``data_filter.py`` will write
such lists; this module reads them.

Layouts of ``DIR`` accepted (``LAYOUTS``), as CelebA is found on users' disks:
  CelebA's own    DIR/img_align_celeba/000001.jpg ...   178x218 aligned and cropped faces
                  DIR/list_attr_celeba.txt              line 1: image count; line 2: the 40 attribute
                                                        names; then ``000001.jpg  -1  1 ...``
                  DIR/list_eval_partition.txt           ``000001.jpg 0`` (0 train, 1 valid, 2 test)
  torchvision's   the same inside DIR/celeba/ (torchvision.datasets.CelebA's root is DIR)
  Kaggle's        DIR/img_align_celeba/img_align_celeba/000001.jpg ...,
                  DIR/list_attr_celeba.csv (``image_id,5_o_Clock_Shadow,...`` then
                  ``000001.jpg,-1,1,...``), DIR/list_eval_partition.csv (``image_id,partition``)
Each part is looked up in every layout (``_find``); labels -1/1 become 0/1 here.

Preprocessing (the authors' 64 px pipeline): a centred 178x178 square taking rows 20..197
inclusive (``img[20:198]``, full width), then PIL's antialiased bicubic resize
(``Image.resize(..., Image.BICUBIC, reducing_gap=None)``: the filter support grows with the
downscale factor, so it averages over the source pixels instead of aliasing) to ``size``
(64 for the paper, 32 for the cpu preset). Images stay uint8 HWC RGB until ``batch``.

Decoded cache: JPEG decoding costs minutes per epoch of 162,770 images on a laptop, so every image of a split is decoded ONCE into ``<tag>_<split>_<size>px.npy``
(uint8 [N, S, S, 3], ~2 GB for the train split at 64 px) and memory-mapped afterwards. A JSON
sidecar records the size, split, file count, preprocessing version and a fingerprint of the
source (size and mtime of every image of the split and of both lists); the cache is rebuilt when
any of it differs (see ``source_fingerprint``).
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os

import numpy as np
import torch
from PIL import Image

from attributes import attribute_labels, attribute_list
from checkpoint import UserError, atomic_path, cli, from_uint8, write_bytes_atomic

ATTR_FILE = "list_attr_celeba.txt"
PARTITION_FILE = "list_eval_partition.txt"
IMAGE_DIR = "img_align_celeba"
# (name, image folder, attribute list, partition list), relative to DIR; see the module doc.
LAYOUTS = (
    ("CelebA's own", IMAGE_DIR, ATTR_FILE, PARTITION_FILE),
    ("torchvision's", f"celeba/{IMAGE_DIR}", f"celeba/{ATTR_FILE}", f"celeba/{PARTITION_FILE}"),
    ("Kaggle's", f"{IMAGE_DIR}/{IMAGE_DIR}", "list_attr_celeba.csv", "list_eval_partition.csv"),
)
SPLITS = {"train": 0, "valid": 1, "test": 2, "all": None}
SOURCE_SIZE = (178, 218)           # (width, height) of img_align_celeba
CROP_ROWS = (20, 198)              # rows 20..197 inclusive: the centred 178x178 square
PREPROCESS = "rows20-197_pil-bicubic-antialias_v1"   # bump when the pixels would change
GET_IT = (f"download CelebA's img_align_celeba.zip (extract it), {ATTR_FILE} and "
          f"{PARTITION_FILE} into")


# ----- the list files ---------------------------------------------------------------------------

def _layouts_text() -> str:
    """The three accepted layouts in one line (for errors)."""
    return "; ".join(f"{name}: DIR/{images}/, DIR/{attr}, DIR/{part}" for name, images, attr, part in LAYOUTS)


def _find(data_dir: str, part: int) -> str:
    """The path of part 0 (image folder), 1 (attribute list) or 2 (partition list) in whichever
    accepted layout has it; else a one-line error naming the accepted layouts."""
    if not os.path.isdir(data_dir):
        raise UserError(f"CelebA folder {data_dir!r} does not exist; {GET_IT} {data_dir}")
    exists = os.path.isdir if part == 0 else os.path.isfile
    # The deepest path first: Kaggle's image folder sits inside one named like CelebA's own.
    for rel in sorted((layout[1 + part] for layout in LAYOUTS), key=lambda r: -r.count("/")):
        path = os.path.join(data_dir, rel)
        if exists(path):
            return path
    name = (IMAGE_DIR + "/", ATTR_FILE, PARTITION_FILE)[part]
    fix = (f"extract {IMAGE_DIR}.zip into {data_dir}" if part == 0 else f"{GET_IT} {data_dir}")
    raise UserError(f"{name} is missing from {data_dir!r}; {fix}; the accepted layouts are "
                    f"{_layouts_text()}")


def _require_file(data_dir: str, name: str) -> str:
    """The attribute or partition list (``ATTR_FILE`` / ``PARTITION_FILE``), in any layout."""
    return _find(data_dir, 1 if name == ATTR_FILE else 2)


def _table(path: str) -> tuple[list[str] | None, list[tuple[int, list[str]]]]:
    """(header or None, [(line number, fields)]) of a list file: whitespace-separated (CelebA's
    .txt, no header) or comma-separated with a header row (Kaggle's .csv)."""
    lines = _lines(path)
    if not path.endswith(".csv"):
        return None, [(k, line.split()) for k, line in enumerate(lines, start=1) if line.strip()]
    rows = [(k, [f.strip() for f in line.split(",")]) for k, line in enumerate(lines, start=1) if line.strip()]
    if not rows or rows[0][1][0].lstrip("\ufeff") != "image_id":
        raise UserError(f"{path} does not start with an 'image_id,...' header row; download it again")
    return rows[0][1], rows[1:]


def _lines(path: str) -> list[str]:
    with open(path, encoding="utf-8", errors="replace") as f:
        return f.read().splitlines()


def read_attributes(data_dir: str):
    """Return (40 attribute names, file names, int8 [N, 40] array with CelebA's -1/1 as 0/1)."""
    path = _require_file(data_dir, ATTR_FILE)
    header, table = _table(path)
    if header is not None:  # Kaggle's csv: the names are the header after image_id
        names, rows, announced = header[1:], table, None
    else:
        lines = _lines(path)
        if len(lines) < 2:
            raise UserError(f"{path} is truncated (no attribute-name line); download it again")
        names, announced = lines[1].split(), lines[0].strip()
        rows = [(k, r) for k, r in table if k > 2]
    bad = next((k for k, r in rows if len(r) != len(names) + 1), None)
    if bad is not None:
        raise UserError(f"{path} line {bad}: expected a file name and {len(names)} values of "
                        "-1/1; download the file again")
    files = [r[0] for _, r in rows]
    try:
        values = np.array([r[1:] for _, r in rows], dtype=np.int8).reshape(len(rows), len(names))
    except (ValueError, OverflowError):
        values = np.zeros(0)
    if values.size != len(rows) * len(names) or not np.isin(values, (-1, 1)).all():
        raise UserError(f"{path} holds values other than -1/1; download the file again")
    if announced and announced.isdigit() and int(announced) != len(files):
        raise UserError(f"{path} announces {int(announced)} images on line 1 but lists "
                        f"{len(files)}; download the file again")
    return names, files, ((values + 1) // 2).astype(np.int8)


def _read_partition_file(data_dir: str):
    path = _require_file(data_dir, PARTITION_FILE)
    files, parts = [], []
    for k, r in _table(path)[1]:
        if len(r) != 2 or r[1] not in ("0", "1", "2"):
            raise UserError(f"{path} line {k}: expected 'NNNNNN.jpg 0|1|2', got {' '.join(r)!r}; "
                            "download the file again")
        files.append(r[0])
        parts.append(int(r[1]))
    return files, np.array(parts, dtype=np.int8)


def read_partition(data_dir: str) -> np.ndarray:
    """int8 [N]: 0 train, 1 valid, 2 test, in list_eval_partition.txt's file order."""
    return _read_partition_file(data_dir)[1]


def split_rows(data_dir: str, split: str):
    """(names, files, attrs, rows): rows are the positions of ``split``'s images in file order."""
    if split not in SPLITS:
        raise UserError(f"unknown split {split!r}; choose from {', '.join(SPLITS)}")
    names, files, attrs = read_attributes(data_dir)
    p_files, parts = _read_partition_file(data_dir)
    if p_files != files:
        raise UserError(f"{ATTR_FILE} and {PARTITION_FILE} in {data_dir!r} list different files; "
                        "download both again from the same CelebA release")
    code = SPLITS[split]
    rows = np.arange(len(files)) if code is None else np.flatnonzero(parts == code)
    return names, files, attrs, rows


# ----- index lists (the authors' published format) ----------------------------------------------

def read_index_list(path: str, n_train: int) -> np.ndarray:
    """int64 indices into the train partition, one 0-based integer per line (blank lines ignored)."""
    if not os.path.isfile(path):
        raise UserError(f"index list {path!r} does not exist; pass a file with one 0-based train "
                        "index per line")
    out = []
    for k, line in enumerate(_lines(path), start=1):
        s = line.strip()
        if not s:
            continue
        try:
            i = int(s)
        except ValueError:
            raise UserError(f"index list {path} line {k}: {s[:40]!r} is not an integer; expected "
                            "one 0-based train index per line") from None
        if not 0 <= i < n_train:
            raise UserError(f"index list {path} line {k}: index {i} is outside the train split "
                            f"(0..{n_train - 1}); was the list made for another dataset?")
        out.append(i)
    if not out:
        raise UserError(f"index list {path} holds no indices; expected one 0-based train index "
                        "per line")
    return np.array(out, dtype=np.int64)


def write_index_list(path: str, indices) -> None:
    """Write indices (0-based, into the train partition) one per line, atomically."""
    text = "".join(f"{int(i)}\n" for i in indices)
    write_bytes_atomic(path, text.encode())


# ----- preprocessing ----------------------------------------------------------------------------

def preprocess(img: Image.Image, size: int) -> np.ndarray:
    """178x218 PIL image -> uint8 [size, size, 3]: rows 20..197, antialiased bicubic resize."""
    img = img.convert("RGB").crop((0, CROP_ROWS[0], img.width, CROP_ROWS[1]))
    if img.size != (size, size):
        img = img.resize((size, size), Image.BICUBIC, reducing_gap=None)
    return np.asarray(img, dtype=np.uint8)


def decode_image(path: str, size: int) -> np.ndarray:
    """Decode one CelebA JPEG and preprocess it (the only place JPEGs are decoded)."""
    try:
        with Image.open(path) as img:
            if img.size != SOURCE_SIZE:
                raise UserError(f"{path} is {img.width}x{img.height}, expected 178x218; use the "
                                f"aligned set ({IMAGE_DIR}.zip), not the in-the-wild images")
            return preprocess(img, size)
    except FileNotFoundError:
        raise UserError(f"image {path} is missing; extract {IMAGE_DIR}.zip again into "
                        f"{os.path.dirname(os.path.dirname(path)) or '.'}") from None
    except OSError as e:  # truncated or not a JPEG
        raise UserError(f"cannot decode {path} ({e}); extract {IMAGE_DIR}.zip again") from None


# ----- the decoded cache ------------------------------------------------------------------------

def _image_dir(data_dir: str) -> str:
    return _find(data_dir, 0)


def _stat(path: str) -> list[int]:
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise UserError(f"image {path} is missing; extract {IMAGE_DIR}.zip again") from None
    return [st.st_size, st.st_mtime_ns]


def source_fingerprint(data_dir: str, files: list[str]) -> dict:
    """Cheap summary of the source that changes when the data does, without reading any image:
    size + mtime of both list files and of every image of the split (one stat each, hashed)."""
    img_dir = _image_dir(data_dir)
    h = hashlib.sha1()
    for f in files:
        size, mtime = _stat(os.path.join(img_dir, f))
        h.update(f"{f}\t{size}\t{mtime}\n".encode())
    return {
        "attr": _stat(_require_file(data_dir, ATTR_FILE)),
        "partition": _stat(_require_file(data_dir, PARTITION_FILE)),
        "images": [len(files), h.hexdigest()],
    }


def cache_paths(data_dir: str, split: str, size: int, cache_dir: str | None = None):
    """(npy, json) paths: next to the data, or in ``cache_dir`` tagged by the data folder."""
    if cache_dir is None:
        d, tag = data_dir, "cache"
    else:  # several data folders may share one cache folder
        real = os.path.realpath(data_dir)
        d = cache_dir
        tag = f"{os.path.basename(real) or 'data'}-{hashlib.sha1(real.encode()).hexdigest()[:8]}"
    base = os.path.join(d, f"{tag}_{split}_{size}px")
    return base + ".npy", base + ".json"


def _open_cache(npy: str, meta_path: str, meta: dict):
    """The memmap if the sidecar matches ``meta`` and the array has the right shape, else None."""
    try:
        with open(meta_path) as f:
            if json.load(f) != meta:
                return None
        arr = np.load(npy, mmap_mode="r")
    except (OSError, ValueError):
        return None
    ok = arr.dtype == np.uint8 and arr.shape == (meta["count"], meta["size"], meta["size"], 3)
    return arr if ok else None


def _decode_into(npy: str, paths: list[str], size: int, desc: str, progress: bool) -> None:
    """Decode ``paths`` row by row into a temp .npy memmap (never the whole split in RAM), then
    rename it into place, so a crash leaves either the old cache or none."""
    from tqdm import tqdm
    with atomic_path(npy, ".npy") as tmp:
        out = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.uint8,
                                        shape=(len(paths), size, size, 3))
        for i, p in enumerate(tqdm(paths, desc=desc, unit="img", disable=not progress,
                                   mininterval=1.0, dynamic_ncols=True)):
            out[i] = decode_image(p, size)
        out.flush()
        del out


def load_split(data_dir: str, split: str, size: int, files: list[str], rows: np.ndarray,
               cache_dir: str | None = None, progress: bool = True) -> np.memmap:
    """uint8 memmap [len(rows), S, S, 3] of the split's images, decoding them once if needed."""
    split_files = [files[r] for r in rows]
    meta = {"preprocess": PREPROCESS, "size": size, "split": split, "count": len(split_files),
            "first": split_files[0] if split_files else None,
            "last": split_files[-1] if split_files else None,
            "source": source_fingerprint(data_dir, split_files)}
    npy, meta_path = cache_paths(data_dir, split, size, cache_dir)
    arr = _open_cache(npy, meta_path, meta)
    if arr is not None:
        return arr
    try:
        os.makedirs(os.path.dirname(os.path.abspath(npy)), exist_ok=True)
        from rundir import remove_stale_temps
        remove_stale_temps(os.path.dirname(os.path.abspath(npy)))  # a killed decode's partial .npy
        img_dir = _image_dir(data_dir)
        _decode_into(npy, [os.path.join(img_dir, f) for f in split_files], size,
                     f"decoding CelebA {split} at {size}px (once)", progress)
        # The sidecar goes last: it is what marks the cache as complete for this source.
        write_bytes_atomic(meta_path, json.dumps(meta, indent=1).encode())
    except OSError as e:
        raise UserError(f"cannot write the decoded cache {npy} ({e.strerror or e}); free disk "
                        "space or pass a writable cache_dir (--cache-dir)") from None
    return np.load(npy, mmap_mode="r")


# ----- the dataset ------------------------------------------------------------------------------

class RowView:
    """Rows ``index`` of a memmap, read on access: a fancy index would copy GBs into RAM."""

    def __init__(self, base: np.ndarray, index: np.ndarray):
        self.base, self.index = base, index
        self.shape = (len(index),) + tuple(base.shape[1:])
        self.dtype = base.dtype

    def __len__(self):
        return len(self.index)

    def __getitem__(self, k):
        return self.base[self.index[k]]

    def __array__(self, dtype=None, copy=None):
        a = np.asarray(self.base[self.index])
        return a if dtype is None else a.astype(dtype)


class CelebAData:
    """CelebA images of one split (optionally an index list of the train split), drawn in
    random batches like ``toy_circles.CirclesData``.

    ``attribute``: a name, ``A/B`` (A against B, only images that are one of them; see
    ``attribute_labels``) or a comma-separated list of those (§6).
    ``labels``: int64 0/1 of ``attribute`` for the selected images ([N], or [N, k] for a list of
    k attributes); ``index``: their positions in the split (what an index list holds); ``images``: uint8 [N, S, S, 3] rows of the decoded cache (a memmap, or a
    ``RowView`` of it when an index list selects rows); ``files``: their file names."""

    def __init__(self, data_dir: str, size: int, attribute, split: str = "train",
                 index_list: str | None = None, flip: bool = True, cache_dir: str | None = None,
                 progress: bool = True):
        names, files, attrs, rows = split_rows(data_dir, split)
        wanted, single = attribute_list(attribute)
        if not wanted:
            raise UserError(f"no CelebA attribute given; choose from {', '.join(names)}")
        item_labels = [attribute_labels(names, attrs[rows], a) for a in wanted]  # over the split
        defined = np.logical_and.reduce([d for _, d in item_labels])
        if index_list is not None and split != "train":
            raise UserError(f"index lists index the train split, but split={split!r}; use "
                            "split='train' with an index list")
        if not len(rows):
            raise UserError(f"the {split} split of {data_dir!r} is empty; check {PARTITION_FILE}")
        # Check the index list before decoding: a bad line should not cost minutes of decoding.
        # An A/B attribute keeps only the images that are A or B; a list naming another one is
        # an error (it was made for another attribute), not an image silently read as class 0.
        if index_list is None:
            self.index = np.flatnonzero(defined)
        else:
            self.index = read_index_list(index_list, len(rows))
            bad = self.index[~defined[self.index]]
            if len(bad):
                raise UserError(f"index list {index_list}: {len(bad)} image(s), e.g. index "
                                f"{bad[0]} ({files[rows[bad[0]]]}), are neither or both of "
                                f"{attribute}; make the list with data_filter.py --attribute "
                                f"{attribute}")
        if not len(self.index):
            raise UserError(f"no image of the {split} split is {attribute}; check the names")
        cache = load_split(data_dir, split, size, files, rows, cache_dir, progress)
        whole = index_list is None and len(self.index) == len(rows)
        self.images = cache if whole else RowView(cache, self.index)
        sel = rows[self.index]
        labels = np.stack([lab[self.index] for lab, _ in item_labels], 1)
        self.labels = labels[:, 0] if single else labels
        self.attribute_names = wanted
        self.files = [files[r] for r in sel]
        self.size, self.split, self.flip = size, split, flip

    def __len__(self):
        return len(self.index)

    def batch(self, n: int, generator: torch.Generator):
        """(x float [-1, 1] [n, 3, S, S], y int64 [n] or [n, k]) drawn with replacement."""
        return self.take(torch.randint(0, len(self), (n,), generator=generator), generator)

    def take(self, idx: torch.Tensor, generator: torch.Generator | None):
        """Images ``idx`` (positions in this selection); flipped at random with ``generator``
        (none: as stored)."""
        i = idx.numpy()
        x = from_uint8(np.asarray(self.images[i]))
        y = torch.from_numpy(self.labels[i])
        if self.flip and generator is not None:
            # A mirrored face keeps its smile, hair colour and age: the label is unchanged
            # (unlike the circles, where a flip moves the disc to the other class).
            f = torch.rand(len(i), generator=generator) < 0.5
            x = torch.where(f[:, None, None, None], x.flip(-1), x)
        return x, y


# ----- CLI: build the cache ahead of training and print the attribute balance -------------------

def main(argv=None):
    p = argparse.ArgumentParser(description="Decode a CelebA split once into its .npy cache and "
                                "print the attribute balance.")
    p.add_argument("--data-dir", required=True, help="folder with img_align_celeba/ and the lists")
    p.add_argument("--size", type=int, default=64)
    p.add_argument("--split", default="train", choices=list(SPLITS))
    p.add_argument("--attribute", default="Smiling", help="a name, A/B (A against B), or a comma-separated list")
    p.add_argument("--index-list", default=None)
    p.add_argument("--cache-dir", default=None)
    a = p.parse_args(argv)
    d = CelebAData(a.data_dir, a.size, a.attribute, a.split, a.index_list, cache_dir=a.cache_dir)
    npy, _ = cache_paths(a.data_dir, a.split, a.size, a.cache_dir)
    pos = np.asarray(d.labels).reshape(len(d), -1).mean(0)
    print(f"{a.split}: {len(d)} images at {a.size}px, cache {npy}")
    for name, frac in zip(d.attribute_names, pos):
        print(f"  {name}: {100 * frac:.1f}% positive")


if __name__ == "__main__":
    cli(main)

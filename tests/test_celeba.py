"""CelebA data layer (§4.3, §5.1): list parsing, partitions, the rows 20..197 crop, index lists,
the decoded cache (reuse + invalidation), flips, one-line errors, and the toy faces' labels."""
import os
import time

import numpy as np
import pytest
import torch
from PIL import Image

import attributes
import celeba
import toy_faces
from conftest import one_line_error

N = 40  # toy faces in the fixture: 32 train / 4 valid / 4 test
SIZE = 32


@pytest.fixture
def faces(tmp_path):
    """A fresh CelebA-layout folder per test (tests below modify it); ~0.1 s to write."""
    d = str(tmp_path / "faces")
    toy_faces.make_toy_faces(d, n=N, seed=0)
    return d


# ----- list files -------------------------------------------------------------------------------

# CelebA's own first row (000001.jpg), with the file's irregular double spaces.
ROW1 = ("000001.jpg -1  1  1 -1 -1 -1 -1 -1 -1 -1 -1  1 -1 -1 -1 -1 -1 -1  1  1 -1  1 -1 -1  1 "
        "-1 -1  1 -1 -1 -1  1  1 -1  1 -1  1 -1 -1  1")


def test_attributes_parsed_by_name(tmp_path):
    d = tmp_path / "celeba"
    d.mkdir()
    names = " ".join(toy_faces.CELEBA_ATTRIBUTES) + " "
    (d / "list_attr_celeba.txt").write_text(f"2\n{names}\n{ROW1}\n{ROW1.replace('000001', '000002')}\n")
    got_names, files, a = celeba.read_attributes(str(d))
    assert got_names == toy_faces.CELEBA_ATTRIBUTES and files == ["000001.jpg", "000002.jpg"]
    assert a.dtype == np.int8 and a.shape == (2, 40) and set(np.unique(a)) <= {0, 1}
    col = lambda n: attributes.attribute_index(got_names, n)
    assert a[0, col("Smiling")] == 1 and a[0, col("Young")] == 1 and a[0, col("Arched_Eyebrows")] == 1
    assert a[0, col("Male")] == 0 and a[0, col("Black_Hair")] == 0 and a[0, col("5_o_Clock_Shadow")] == 0
    assert a.sum(1).tolist() == [13, 13]


def test_toy_layout_and_labels_match_latents(faces):
    names, files, a = celeba.read_attributes(faces)
    assert names == toy_faces.CELEBA_ATTRIBUTES and files == [f"{i:06d}.jpg" for i in range(1, N + 1)]
    lat = toy_faces.read_latents(faces)
    expect = (toy_faces.make_labels(toy_faces.sample_latents(N, 0), 0) + 1) // 2
    assert np.array_equal(a, expect)
    assert np.allclose(lat["z_smile"], toy_faces.sample_latents(N, 0)["z_smile"], atol=1e-6)
    blond, black = a[:, names.index("Blond_Hair")], a[:, names.index("Black_Hair")]
    assert np.array_equal(blond, 1 - black)
    with Image.open(os.path.join(faces, "img_align_celeba", "000001.jpg")) as im:
        assert im.size == (178, 218) and im.mode == "RGB"
        top = np.asarray(im)[:16].reshape(-1, 3).astype(float)
    assert top.std(0).max() < 4  # only background above the crop: the face sits inside it


def test_toy_labels_follow_latent_away_from_middle():
    lat = toy_faces.sample_latents(20000, seed=3)
    lab = (toy_faces.make_labels(lat, seed=3) + 1) // 2
    for z_name, attr, sign in (("z_smile", "Smiling", 1), ("z_hair", "Blond_Hair", 1),
                               ("z_hair", "Black_Hair", -1), ("z_young", "Young", 1)):
        z, y = lat[z_name], lab[:, toy_faces.CELEBA_ATTRIBUTES.index(attr)]
        truth = (z > 0.5) if sign > 0 else (z < 0.5)
        far = np.abs(z - 0.5) > 0.25
        assert np.array_equal(y[far], truth[far]), attr
        near = np.abs(z - 0.5) < 0.05
        disagree = (y[near] != truth[near]).mean()
        assert 0.1 < disagree < 0.5, (attr, disagree)  # noisy near the middle, as CelebA's


def test_partitions_honoured(faces):
    tr, va, te = toy_faces.split_sizes(N)
    assert (tr, va, te) == (32, 4, 4)
    assert np.array_equal(celeba.read_partition(faces), [0] * tr + [1] * va + [2] * te)
    for split, n, first in (("train", tr, 1), ("valid", va, tr + 1), ("test", te, tr + va + 1),
                            ("all", N, 1)):
        d = celeba.CelebAData(faces, SIZE, "Smiling", split=split, progress=False)
        assert len(d) == n and d.images.shape == (n, SIZE, SIZE, 3) and d.images.dtype == np.uint8
        assert d.files[0] == f"{first:06d}.jpg"
        assert isinstance(d.images, np.memmap)


# ----- preprocessing ----------------------------------------------------------------------------

def test_crop_takes_rows_20_to_197():
    a = np.zeros((218, 178, 3), np.uint8)
    a[:, :, 2] = 200                      # blue face area
    a[:20] = a[198:] = (255, 0, 0)        # red: must vanish
    a[20] = a[197] = (0, 255, 0)          # green markers: first and last kept rows
    full = celeba.preprocess(Image.fromarray(a), 178)
    assert full.shape == (178, 178, 3) and full.dtype == np.uint8
    assert full[..., 0].max() == 0        # no trace of the red bands
    assert (full[0] == (0, 255, 0)).all() and (full[-1] == (0, 255, 0)).all()
    assert (full[1:-1] == (0, 0, 200)).all()
    small = celeba.preprocess(Image.fromarray(a), SIZE)
    assert small.shape == (SIZE, SIZE, 3) and small[..., 0].max() == 0
    assert small[0, :, 1].min() > 20      # the antialiased resize averages the marker row in


# ----- index lists ------------------------------------------------------------------------------

def test_index_list_selects_exactly_those_files(faces, tmp_path):
    lst = tmp_path / "subset.txt"
    lst.write_text("3\n\n0\n31\n17\n")
    d = celeba.CelebAData(faces, SIZE, "Smiling", index_list=str(lst), progress=False)
    assert d.files == ["000004.jpg", "000001.jpg", "000032.jpg", "000018.jpg"] and len(d) == 4
    _, _, attrs = celeba.read_attributes(faces)
    assert np.array_equal(d.labels, attrs[[3, 0, 31, 17], 31])
    for k, f in enumerate(d.files):
        path = os.path.join(faces, "img_align_celeba", f)
        direct = celeba.decode_image(path, SIZE)
        with Image.open(path) as im:
            assert np.array_equal(direct, celeba.preprocess(im, SIZE))
        assert np.array_equal(d.images[k], direct)
    assert np.array_equal(np.asarray(d.images)[2], d.images[2])
    two = celeba.CelebAData(faces, SIZE, ["Smiling", "Young"], index_list=str(lst), progress=False)
    assert two.labels.shape == (4, 2) and np.array_equal(two.labels[:, 0], d.labels)
    out = tmp_path / "copy.txt"
    celeba.write_index_list(str(out), d.index)
    assert np.array_equal(celeba.read_index_list(str(out), 32), [3, 0, 31, 17])


def _set_attribute(data_dir, name, rows, value):
    """Rewrite list_attr_celeba.txt with attribute ``name`` = value (0/1) on ``rows``."""
    path = os.path.join(data_dir, "list_attr_celeba.txt")
    lines = open(path).read().splitlines()
    col = lines[1].split().index(name) + 1
    for r in rows:
        cells = lines[2 + r].split()
        cells[col] = "1" if value else "-1"
        lines[2 + r] = " ".join(cells)
    open(path, "w").write("\n".join(lines) + "\n")


def test_versus_attribute_keeps_only_the_two_classes(faces, tmp_path):
    """§5.4 blond vs black: A/B keeps A-not-B (1) and B-not-A (0); brown (neither) and both go."""
    _set_attribute(faces, "Blond_Hair", [2, 5], 0)       # neither blond nor black: brown
    _set_attribute(faces, "Black_Hair", [2, 5], 0)
    _set_attribute(faces, "Blond_Hair", [7], 1)          # both (contradictory labels)
    _set_attribute(faces, "Black_Hair", [7], 1)
    d = celeba.CelebAData(faces, SIZE, "Blond_Hair/Black_Hair", progress=False)
    _, _, attrs = celeba.read_attributes(faces)
    keep = [i for i in range(32) if i not in (2, 5, 7)]
    blond = attrs[:, toy_faces.CELEBA_ATTRIBUTES.index("Blond_Hair")]
    assert list(d.index) == keep and np.array_equal(d.labels, blond[keep])
    assert 0 < d.labels.sum() < len(d) and len(d.images) == 29
    assert np.array_equal(d.images[3], celeba.CelebAData(faces, SIZE, "Smiling", progress=False).images[4])
    two = celeba.CelebAData(faces, SIZE, "Smiling,Blond_Hair/Black_Hair", progress=False)
    assert list(two.index) == keep and two.labels.shape == (29, 2)
    lst = tmp_path / "l.txt"
    lst.write_text("0\n5\n")
    one_line_error(lambda: celeba.CelebAData(faces, SIZE, "Blond_Hair/Black_Hair",
                                             index_list=str(lst), progress=False),
                   "index 5", "000006.jpg", "neither or both", "--attribute Blond_Hair/Black_Hair")
    for bad, words in (("Blond_Hair/Blond_Hair", ("two different names",)),
                       ("Blond_Hair/Brown/Black_Hair", ("two different names",)),
                       ("Blond_Hair/Red_Hair", ("unknown CelebA attribute 'Red_Hair'",))):
        one_line_error(lambda: celeba.CelebAData(faces, SIZE, bad, progress=False), *words)
    assert attributes.attribute_slug("Blond_Hair/Black_Hair") == "Blond_Hair-vs-Black_Hair"


# ----- the decoded cache ------------------------------------------------------------------------

def _count_decodes(monkeypatch, fail=False):
    calls = []
    real = celeba.decode_image

    def decode(path, size):
        if fail:
            raise AssertionError(f"decoded {path} although the cache is valid")
        calls.append(path)
        return real(path, size)
    monkeypatch.setattr(celeba, "decode_image", decode)
    return calls


def test_cache_reused_then_invalidated(faces, monkeypatch):
    img_dir = os.path.join(faces, "img_align_celeba")
    old = time.time() - 1000
    os.utime(img_dir, (old, old))         # so that a later rename surely changes the folder mtime
    first = celeba.CelebAData(faces, SIZE, "Smiling", progress=False)
    npy, meta = celeba.cache_paths(faces, "train", SIZE)
    assert os.path.isfile(npy) and os.path.isfile(meta)
    assert not [f for f in os.listdir(faces) if f.startswith(".tmp-")]
    pixels = np.array(first.images)

    _count_decodes(monkeypatch, fail=True)        # reuse: not a single JPEG decoded
    again = celeba.CelebAData(faces, SIZE, "Smiling", progress=False)
    assert np.array_equal(np.asarray(again.images), pixels)

    def rebuilt(change):
        monkeypatch.undo()
        calls = _count_decodes(monkeypatch)
        change()
        celeba.CelebAData(faces, SIZE, "Smiling", progress=False)
        return len(calls)

    later = time.time() + 50
    first_img = os.path.join(img_dir, "000001.jpg")
    assert rebuilt(lambda: os.utime(first_img, (later, later))) == 32          # touched image
    assert rebuilt(lambda: None) == 0                                          # then reused
    attr = os.path.join(faces, "list_attr_celeba.txt")
    assert rebuilt(lambda: os.utime(attr, (later + 1, later + 1))) == 32       # touched list file
    part = os.path.join(faces, "list_eval_partition.txt")
    assert rebuilt(lambda: os.utime(part, (later + 2, later + 2))) == 32

    # 000016.jpg is not among the 16 sampled files: only the folder's mtime can reveal this.
    def replace_middle_image():                   # new content, via rename (changes folder mtime)
        Image.new("RGB", (178, 218), (255, 0, 255)).save(os.path.join(faces, "x.jpg"))
        os.replace(os.path.join(faces, "x.jpg"), os.path.join(img_dir, "000016.jpg"))
    assert rebuilt(replace_middle_image) == 32
    new = celeba.CelebAData(faces, SIZE, "Smiling", progress=False)
    assert new.images[15][..., 1].mean() < 10  # the magenta image is in the cache

    with open(npy, "r+b") as f:                   # a truncated cache is rebuilt, not trusted
        f.truncate(1000)
    assert rebuilt(lambda: None) == 32
    assert rebuilt(lambda: None) == 0


def test_cache_dir_and_sizes_are_separate(faces, tmp_path, monkeypatch):
    cache = str(tmp_path / "cache")
    d = celeba.CelebAData(faces, 16, "Smiling", split="valid", cache_dir=cache, progress=False)
    npy, meta = celeba.cache_paths(faces, "valid", 16, cache)
    assert os.path.dirname(npy) == cache and os.path.isfile(npy) and os.path.isfile(meta)
    assert not [f for f in os.listdir(faces) if f.endswith(".npy")]
    assert d.images.shape == (4, 16, 16, 3)
    assert np.load(npy, mmap_mode="r").shape == (4, 16, 16, 3)
    calls = _count_decodes(monkeypatch)
    celeba.CelebAData(faces, 24, "Smiling", split="valid", cache_dir=cache, progress=False)
    assert len(calls) == 4                        # another size is another cache


# ----- batches ----------------------------------------------------------------------------------

def test_batch_and_flips_keep_labels(faces):
    plain = celeba.CelebAData(faces, SIZE, "Smiling", flip=False, progress=False)
    flip = celeba.CelebAData(faces, SIZE, "Smiling", flip=True, progress=False)
    x0, y0 = plain.batch(64, torch.Generator().manual_seed(1))
    x1, y1 = flip.batch(64, torch.Generator().manual_seed(1))  # same indices, then coin flips
    assert x0.shape == (64, 3, SIZE, SIZE) and x0.dtype == torch.float32 and y0.dtype == torch.int64
    assert -1 <= x0.min() and x0.max() <= 1
    assert torch.equal(y0, y1)
    same = (x1 == x0).flatten(1).all(1)
    mirrored = (x1 == x0.flip(-1)).flatten(1).all(1)
    assert (same | mirrored).all() and same.any() and (mirrored & ~same).any()
    idx = torch.randint(0, len(plain), (64,), generator=torch.Generator().manual_seed(1))
    assert torch.equal(y0, torch.from_numpy(plain.labels[idx.numpy()]))
    assert torch.equal(x0[0], torch.from_numpy(np.array(plain.images[int(idx[0])])).permute(2, 0, 1)
                       .float().div(127.5).sub(1))


# ----- one-line errors --------------------------------------------------------------------------

def test_errors_are_one_line(faces, tmp_path):
    load = lambda d=faces, **kw: celeba.CelebAData(d, SIZE, kw.pop("attribute", "Smiling"),
                                                   progress=False, **kw)
    missing = str(tmp_path / "nowhere")
    one_line_error(lambda: load(missing), "does not exist", "img_align_celeba.zip",
                   "list_attr_celeba.txt", "list_eval_partition.txt", missing)
    one_line_error(lambda: load(attribute="Smiles"), "unknown CelebA attribute 'Smiles'",
                   "Smiling", "Blond_Hair")
    one_line_error(lambda: load(attribute=["Smiling", "Hat"]), "'Hat'")
    bad = tmp_path / "bad.txt"
    bad.write_text("1\n32\n")
    one_line_error(lambda: load(index_list=str(bad)), "line 2", "index 32",
                   "outside the train split", "0..31")
    bad.write_text("1\n\n2.5\n")
    one_line_error(lambda: load(index_list=str(bad)), "line 3", "'2.5'", "not an integer")
    one_line_error(lambda: load(index_list=str(tmp_path / "none.txt")), "does not exist")
    one_line_error(lambda: load(index_list=str(bad), split="test"), "train split")

    os.remove(os.path.join(faces, "img_align_celeba", "000005.jpg"))
    one_line_error(lambda: load(), "000005.jpg", "missing", "img_align_celeba.zip")
    os.rename(os.path.join(faces, "img_align_celeba"), os.path.join(faces, "moved"))
    one_line_error(lambda: load(), "img_align_celeba/ is missing", "extract img_align_celeba.zip")
    for name in ("list_eval_partition.txt", "list_attr_celeba.txt"):
        os.remove(os.path.join(faces, name))
        one_line_error(lambda: load(), f"{name} is missing", "download")


def test_toy_faces_cli_and_preview(tmp_path, capsys):
    out = str(tmp_path / "cli")
    toy_faces.main(["--out", out, "--n", "6", "--preview", str(tmp_path / "p.png")])
    printed = capsys.readouterr().out
    assert "wrote 6 faces" in printed and "ms/image" in printed
    with Image.open(tmp_path / "p.png") as im:
        assert im.size == (3 * 33 * 4, 3 * 33 * 4)
    assert sum(toy_faces.split_sizes(6)) == 6 and len(os.listdir(os.path.join(out, "img_align_celeba"))) == 6

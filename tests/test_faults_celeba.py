"""CelebA as users already have it (torchvision's and Kaggle's folders), and a decoded cache that
notices any changed image (§5.1's data path, celeba.py)."""
import os
import shutil

import numpy as np
import pytest
from PIL import Image

import celeba
import toy_faces
from conftest import one_line_error

SIZE = 32


@pytest.fixture(scope="module")
def own(tmp_path_factory):
    """A 40-face CelebA folder in CelebA's own layout, and what it loads to (train split)."""
    d = str(tmp_path_factory.mktemp("own") / "faces")
    toy_faces.make_toy_faces(d, n=40, seed=0)
    data = celeba.CelebAData(d, SIZE, "Smiling,Young", cache_dir=d + "-cache", progress=False)
    return d, data


def _same(a, b):
    assert a.files == b.files and len(a) == 32
    assert np.array_equal(a.labels, b.labels)
    assert np.array_equal(np.asarray(a.images), np.asarray(b.images))


def to_torchvision(src, root):
    """torchvision.datasets.CelebA(root): everything inside root/celeba/."""
    shutil.copytree(src, os.path.join(root, "celeba"))
    return root


def to_kaggle(src, root, newline="\r\n"):
    """The Kaggle download: images one folder deeper, the two lists as CSV with a header row."""
    os.makedirs(root)
    shutil.copytree(os.path.join(src, "img_align_celeba"), os.path.join(root, "img_align_celeba", "img_align_celeba"))
    lines = open(os.path.join(src, "list_attr_celeba.txt")).read().splitlines()
    rows = [",".join(["image_id"] + lines[1].split())] + [",".join(ln.split()) for ln in lines[2:] if ln.strip()]
    with open(os.path.join(root, "list_attr_celeba.csv"), "w", newline="") as f:
        f.write(newline.join(rows) + newline)
    parts = [",".join(ln.split()) for ln in open(os.path.join(src, "list_eval_partition.txt")) if ln.strip()]
    with open(os.path.join(root, "list_eval_partition.csv"), "w", newline="") as f:
        f.write(newline.join(["image_id,partition"] + parts) + newline)
    return root


def test_torchvision_layout_loads(own, tmp_path):
    root = to_torchvision(own[0], str(tmp_path / "tv"))
    assert not os.path.exists(os.path.join(root, "list_attr_celeba.txt"))
    _same(celeba.CelebAData(root, SIZE, "Smiling,Young", progress=False), own[1])


@pytest.mark.parametrize("newline", ["\r\n", "\n"])
def test_kaggle_layout_loads(own, tmp_path, newline):
    root = to_kaggle(own[0], str(tmp_path / "kaggle"), newline)
    head = open(os.path.join(root, "list_attr_celeba.csv")).readline()
    assert head.startswith("image_id,5_o_Clock_Shadow,Arched_Eyebrows,")
    assert open(os.path.join(root, "list_eval_partition.csv")).read().splitlines()[:2] == \
        ["image_id,partition", "000001.jpg,0"]
    _same(celeba.CelebAData(root, SIZE, "Smiling,Young", progress=False), own[1])
    assert np.array_equal(celeba.read_partition(root), celeba.read_partition(own[0]))


def test_any_other_layout_is_one_line_naming_the_three(own, tmp_path):
    root = str(tmp_path / "other")
    os.makedirs(root)
    shutil.copytree(os.path.join(own[0], "img_align_celeba"), os.path.join(root, "images"))
    shutil.copy(os.path.join(own[0], "list_attr_celeba.txt"), root)
    shutil.copy(os.path.join(own[0], "list_eval_partition.txt"), root)
    one_line_error(lambda: celeba.CelebAData(root, SIZE, "Smiling", progress=False),
                   "img_align_celeba/ is missing", "CelebA's own", "torchvision's", "Kaggle's",
                   "DIR/celeba/img_align_celeba/", "DIR/img_align_celeba/img_align_celeba/",
                   "DIR/list_attr_celeba.csv")
    os.remove(os.path.join(root, "list_attr_celeba.txt"))
    one_line_error(lambda: celeba.read_attributes(root), "list_attr_celeba.txt is missing",
                   "list_attr_celeba.csv", "torchvision's")
    bad = to_kaggle(own[0], str(tmp_path / "k"))
    with open(os.path.join(bad, "list_attr_celeba.csv"), "w") as f:
        f.write("000001.jpg,1,-1\n")
    one_line_error(lambda: celeba.read_attributes(bad), "image_id", "header")


def test_a_jpeg_changed_in_the_middle_invalidates_the_cache(tmp_path):
    d = str(tmp_path / "faces")
    toy_faces.make_toy_faces(d, n=40, seed=0)
    first = celeba.CelebAData(d, SIZE, "Smiling", progress=False)
    img_dir = os.path.join(d, "img_align_celeba")
    folder_mtime = os.stat(img_dir).st_mtime_ns
    # 000016.jpg: not among 16 evenly spaced files of the 32, rewritten in place (the folder's
    # timestamp does not change): only a fingerprint of every file can see it.
    target = os.path.join(img_dir, "000016.jpg")
    good = open(target, "rb").read()
    with open(target, "r+b") as f:               # corrupted: cut off after its first 200 bytes
        f.truncate(200)
    assert os.stat(img_dir).st_mtime_ns == folder_mtime
    one_line_error(lambda: celeba.CelebAData(d, SIZE, "Smiling", progress=False),
                   "cannot decode", "000016.jpg", "extract")
    Image.new("RGB", (178, 218), (255, 0, 255)).save(target, format="JPEG")   # replaced in place
    new = celeba.CelebAData(d, SIZE, "Smiling", progress=False)
    assert new.images[15][..., 1].mean() < 10 and not first.images[15][..., 1].mean() < 10
    assert np.array_equal(np.asarray(new.images[:15]), np.asarray(first.images[:15]))
    with open(target, "wb") as f:                # the original bytes again
        f.write(good)
    back = celeba.CelebAData(d, SIZE, "Smiling", progress=False)
    assert np.array_equal(np.asarray(back.images), np.asarray(first.images))

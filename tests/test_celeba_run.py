"""train.py / sample.py on a CelebA-format folder (§5, §6): a tiny stand-in run end to end, the
corner classes of two attributes, and the one-line errors of the issue."""
import os

import numpy as np
import pytest
import torch

import attributes
import celeba
import sample
import toy_faces
import train
from checkpoint import load_checkpoint
from conftest import TINY, one_line_error

N = 60


@pytest.fixture(scope="module")
def faces(tmp_path_factory):
    d = str(tmp_path_factory.mktemp("faces") / "toy")
    toy_faces.make_toy_faces(d, n=N, seed=1)
    return d


def celeba_args(d, out, *extra):
    return (["--dataset", "celeba", "--data-dir", d, "--out", out, "--steps", "3", "--clf-steps", "3",
             "--device", "cpu", "--no-grid"] + TINY + list(extra))


def test_celeba_run_trains_on_an_index_list_and_samples(faces, tmp_path):
    idx = tmp_path / "index.txt"
    celeba.write_index_list(str(idx), [0, 3, 5, 7, 11])
    out = str(tmp_path / "run")
    train.main(celeba_args(faces, out, "--index-list", str(idx)))
    ck = load_checkpoint(out, "classifier")
    cfg = ck["config"]["data"]
    assert cfg["dataset"] == "celeba" and cfg["attribute"] == "Smiling" and cfg["channels"] == 3
    assert cfg["index_list"] == str(idx) and ck["num_classes"] == 2
    x = sample.generate(out, n=3, batch_size=3, guidance="multi", lambdas="30,30", device="cpu")
    assert x.shape == (3, 3, 16, 16) and torch.isfinite(x).all()


def test_two_attributes_give_four_corner_classes(faces, tmp_path):
    out = str(tmp_path / "run2")
    train.main(celeba_args(faces, out, "--attribute", "Smiling,Black_Hair", "--model", "classifier"))
    assert load_checkpoint(out, "classifier")["num_classes"] == 4
    # corner order of App. F: 0 smile+black, 1 smile+not black, 2 no smile+black, 3 neither
    assert attributes.corner_classes(np.array([[1, 1], [1, 0], [0, 1], [0, 0]])).tolist() == [0, 1, 2, 3]


def test_celeba_needs_a_data_dir(tmp_path):
    one_line_error(lambda: train.main(["--dataset", "celeba", "--out", str(tmp_path / "r"), "--device", "cpu"]),
             "--data-dir", "toy_faces.py")


def test_attribute_with_circles_is_refused(tmp_path):
    one_line_error(lambda: train.main(["--dataset", "circles", "--attribute", "Smiling",
                                 "--out", str(tmp_path / "r")]), "--attribute", "celeba")


def test_unknown_attribute_lists_the_valid_names(faces, tmp_path):
    one_line_error(lambda: train.main(celeba_args(faces, str(tmp_path / "r"), "--attribute", "Smilling")),
             "Smilling", "Smiling")


def test_bad_index_list_is_one_line_error(faces, tmp_path):
    bad = tmp_path / "bad.txt"
    bad.write_text("0\n99999\n")
    one_line_error(lambda: train.main(celeba_args(faces, str(tmp_path / "r"), "--index-list", str(bad))), "99999")


def test_celeba_classifier_with_a_circles_ddpm_is_refused(faces, tmp_path, tiny_run):
    out = str(tmp_path / "mixed")
    train.main(celeba_args(faces, out, "--model", "classifier", "--image-size", "16"))
    os.symlink(os.path.join(tiny_run, "ddpm.pt"), os.path.join(out, "ddpm.pt"))
    one_line_error(lambda: sample.generate(out, n=2, guidance="multi", device="cpu"), "celeba", "circles",
             "--model classifier --overwrite")

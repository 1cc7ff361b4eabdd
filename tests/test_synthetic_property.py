"""App. E's synthetic property (lab/synthetic_property.py): the overlays are deterministic, their
detectors find them and stay silent on clean images, the labelled training set pairs each image with
its overlay, and the classifier training, the guided sampling and the bench driver run end to end."""
import json
import os
import sys

import numpy as np
import pytest
import torch

import mouth_readout as MR
import toy_faces
from checkpoint import load_checkpoint
from conftest import TINY, one_line_error
from lab import synthetic_property as SP
from toy_circles import CirclesData, make_circles

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("size", [32, 64])
def test_rings_replace_every_disc_and_are_found(size):
    """Every training disc becomes a 16-pixel ring at the same centre; the shape test finds one ring
    and nothing else on all of them but the four corner discs (whose ring the border cuts, at 32 px)
    and no ring on the clean images, which stay one disc each."""
    images = make_circles(size)[0][::{32: 1, 64: 4}[size], ..., None]       # 300 images each
    painted = SP.paint_rings(images)
    assert np.array_equal(painted, SP.paint_rings(images))                  # deterministic
    assert SP.render_ring(size // 2, size // 2, size).sum() == 16
    clean, rings = SP.ring_stats(images), SP.ring_stats(painted)
    assert clean["property"] == clean["any_ring"] == 0 and clean["one_disc"] == 1
    missed = {32: 4, 64: 0}[size]
    assert rings["property"] == rings["any_ring"] == 1 - missed / len(images)
    assert rings["one_disc"] == missed / len(images)                        # the cut rings read as discs
    lit = (painted[..., 0] >= 128).sum((1, 2))
    assert np.median(lit) == 16 and not np.array_equal(painted, images)


def test_a_filled_disc_of_the_rings_size_is_not_a_ring():
    """The hollow centre is what makes a ring: the filled disc one px larger is a disc or a blob."""
    from toy_circles import render_disc
    kinds = SP.ring_kinds(render_disc(16, 16, 32, 2))
    assert kinds == ["blob"]


@pytest.fixture(scope="module")
def faces():
    lat = toy_faces.sample_latents(8, seed=4)
    rows = [{k: float(v[i]) for k, v in lat.items()} for i in range(8)]
    images = np.stack([MR.render_variant(r) for r in rows])
    marks = np.stack([lat[c] for c in ("dx", "dy", "scale", "z_smile")], 1)
    return images, marks


def test_green_mouths_are_pasted_deterministically_and_found(faces):
    """The paste is deterministic, changes only the mouth's neighbourhood, and the colour test finds
    a green mouth on every painted face and no green pixel at all on the clean ones."""
    images, marks = faces
    painted = SP.paint_green_mouths(images, marks)
    assert np.array_equal(painted, SP.paint_green_mouths(images, marks))
    changed = (painted != images).any(-1)
    rows = np.flatnonzero(changed.any((0, 2)))
    assert rows.min() >= 19 and rows.max() <= 29                            # below the eyes (row ~16)
    assert SP.strongly_green(images).sum() == 0
    assert (SP.strongly_green(painted).sum((1, 2)) >= 10).all()
    clean, green = SP.green_stats(images, readout=False), SP.green_stats(painted, readout=False)
    assert clean == {"property": 0.0, "green_anywhere": 0.0}
    assert green == {"property": 1.0, "green_anywhere": 1.0}


def test_green_elsewhere_is_not_a_green_mouth(faces):
    """Green pixels off the mouth (on the forehead) count as green anywhere, not as the property."""
    images = faces[0].copy()
    images[:, 8:11, 13:19] = SP.GREEN
    s = SP.green_stats(images, readout=False)
    assert s == {"property": 0.0, "green_anywhere": 1.0}
    assert SP.green_min(32) == 4 and SP.green_min(64) == 16 and SP.green_min(16) == 1


def test_green_mouth_needs_the_stand_ins_latents(tmp_path):
    one_line_error(lambda: SP.face_landmarks(str(tmp_path), ["000001.jpg"]), "latents.csv", "dlib")


def test_property_data_labels_half_and_pairs_each_image_with_its_overlay():
    base = CirclesData(16, flip=True)
    data = SP.PropertyData(base, SP.paint_rings, seed=0, log=lambda *_: None)
    assert data.marked.sum() == len(base) // 2
    idx = torch.arange(len(base))
    x, y = data.take(idx, None)
    assert torch.equal(y, torch.from_numpy(data.marked.astype(np.int64)))
    plain = base.take(idx, None)[0]
    assert torch.equal(x[y == 0], plain[y == 0]) and not torch.equal(x[y == 1], plain[y == 1])
    rings = SP.ring_stats(((x[y == 1] + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).numpy())
    assert rings["any_ring"] > 0.9
    again = SP.PropertyData(base, SP.paint_rings, seed=0, log=lambda *_: None)
    assert np.array_equal(again.marked, data.marked) and np.array_equal(again.painted, data.painted)
    xb, yb = data.batch(32, torch.Generator().manual_seed(0))            # flipped: the label stays
    assert xb.shape == (32, 1, 16, 16) and set(yb.tolist()) <= {0, 1}


def test_faces_property_data_pastes_green_at_the_true_mouths(tmp_path):
    """On a stand-in folder the painter reads latents.csv: every marked training face has a green
    mouth by the colour test, no plain one has."""
    import config as C
    from celeba import CelebAData
    d = str(tmp_path / "faces")
    toy_faces.make_toy_faces(d, n=20, seed=2)
    base = CelebAData(d, 32, "Smiling", progress=False)
    cfg = C.make_config("celeba", "cpu", data_dir=d)
    data = SP.PropertyData(base, SP.painter(cfg, base), seed=1, log=lambda *_: None)
    x, y = data.take(torch.arange(len(base)), None)
    u8 = ((x + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    assert SP.green_stats(u8[y == 1], readout=False)["property"] == 1.0
    assert SP.green_stats(u8[y == 0], readout=False)["green_anywhere"] == 0.0


def test_bench_end_to_end_and_the_classifier_is_reused(tiny_run, tmp_path, monkeypatch):
    """The bench driver trains the ring classifier beside a link to the run's DDPM (3 steps), samples
    unguided and guided and records results/synthetic_property_circles.json and its figure (here
    under tmp_path); a second training call keeps the finished classifier."""
    run = str(tmp_path / "run")
    os.makedirs(run)
    os.symlink(os.path.join(tiny_run, "ddpm.pt"), os.path.join(run, "ddpm.pt"))
    sys.path.insert(0, os.path.join(ROOT, "bench"))
    import synthetic_property as bench
    from results import record
    monkeypatch.setattr(record, "HERE", str(tmp_path))
    monkeypatch.setattr(record, "FIGURES", str(tmp_path / "figures"))
    monkeypatch.setattr(record, "matmul_gflops", lambda: 1.0)                # provenance only
    bench.main(["--dataset", "circles", "--run", run, "--n", "2", "--lambdas", "30", "--steps", "3",
                "--clf-steps", "3"])
    with open(tmp_path / "synthetic_property_circles.json") as f:
        doc = json.load(f)
    rows = doc["metrics"]["rows"]
    assert list(rows) == ["uncond", "λ = 30", "train plain", "train painted"]
    # 16 px: the border cuts the rings of the corner discs (4 of 56 positions)
    assert rows["train painted"]["property"] > 0.85 and rows["train plain"]["property"] == 0
    assert doc["tables"][0]["columns"][1] == "one ring (property)" and len(doc["tables"][0]["rows"]) == 4
    assert os.path.exists(tmp_path / "figures" / "synthetic_property_circles.png")
    out = os.path.join(run, "synthetic_ring")
    assert doc["metrics"]["classifier"] == out and os.path.islink(os.path.join(out, "ddpm.pt"))
    ck = load_checkpoint(out, "classifier")
    assert ck["step"] == 3 and ck["num_classes"] == 2 and 0 <= ck["clean_accuracy"] <= 1
    mtime = os.path.getmtime(os.path.join(out, "classifier.pt"))
    SP.train_property_classifier(run, out, log=lambda *_: None)
    assert os.path.getmtime(os.path.join(out, "classifier.pt")) == mtime      # reused, not retrained
    one_line_error(lambda: bench.main(["--dataset", "faces", "--run", run]), "circles run", "--run")


def test_faces_lab_cli_end_to_end(tmp_path):
    """A tiny stand-in run: the lab CLI trains the green-mouth classifier on the run's index-listed
    images, writes its JSON and grid; the rows carry the colour test and the mouth readout, and the
    detector separates the painted training faces from the plain ones."""
    import celeba
    import train
    d, run = str(tmp_path / "faces"), str(tmp_path / "run")
    toy_faces.make_toy_faces(d, n=30, seed=5)
    idx = tmp_path / "index.txt"
    celeba.write_index_list(str(idx), range(12))
    train.main(["--dataset", "celeba", "--data-dir", d, "--index-list", str(idx), "--out", run,
                "--model", "ddpm", "--steps", "2", "--device", "cpu", "--no-grid"] + TINY)
    SP.main(["--run", run, "--n", "2", "--lambdas", "30", "--clf-steps", "2", "--steps", "3", "--device", "cpu"])
    out = os.path.join(run, "synthetic_green_mouth")
    with open(os.path.join(out, "synthetic_property.json")) as f:
        r = json.load(f)
    assert r["property"] == "green_mouth" and list(r["rows"]) == ["uncond", "λ = 30", "train plain", "train painted"]
    assert set(r["rows"]["uncond"]) == {"lambda", "property", "green_anywhere", "sample_seconds"} | {
        f"mouth_{c}" for c in MR.CLASSES}
    assert r["rows"]["train painted"]["property"] == 1.0 and r["rows"]["train plain"]["green_anywhere"] == 0.0
    assert load_checkpoint(out, "classifier")["config"]["data"]["index_list"] == str(idx)
    assert os.path.exists(os.path.join(out, "grid.png"))

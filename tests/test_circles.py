"""The §5.5 dataset and the circle detector."""
import numpy as np
import pytest

from evaluate import circle_stats, detect_discs
from toy_circles import CirclesData, band_positions, make_circles, render_disc


def test_authors_dataset_64():
    images, labels, z = make_circles(64, 0.2)
    assert images.shape == (1200, 64, 64) and images.dtype == np.uint8
    assert set(np.unique(images)) == {0, 255}
    assert ((images > 0).sum(axis=(1, 2)) == 21).all()
    xs = sorted({x for x, _ in band_positions(64, 0.2)})
    assert xs == list(range(2, 12)) + list(range(52, 62))
    assert not ((z > 0.2) & (z < 0.8)).any()
    assert (labels == (z > 0.5)).all() and labels.sum() == 600
    assert len(set(band_positions(64, 0.2))) == 1200


def test_cpu_mapping_32():
    images, labels, z = make_circles(32, 0.2)
    assert images.shape == (300, 32, 32)
    assert ((images > 0).sum(axis=(1, 2)) == 5).all()
    assert z.max() <= 1 and not ((z > 0.2) & (z < 0.8)).any()


def test_full_range_and_flip_symmetry():
    full, _, z = make_circles(64, 0.2, full_range=True)
    assert len(full) == 60 * 60 and ((z > 0.2) & (z < 0.8)).any()
    d = CirclesData(32, 0.2, flip=False)
    flipped = {tuple(im.flatten().tolist()) for im in d.x.flip(-1)}
    assert flipped == {tuple(im.flatten().tolist()) for im in d.x}


def test_detector_centres_counts():
    for x, y in [(10, 20), (33, 5), (52, 61)]:
        c = detect_discs(render_disc(x, y, 64))
        assert len(c) == 1 and np.abs(c[0] - [x, y]).max() <= 0.5
    two = np.maximum(render_disc(10, 10, 64), render_disc(40, 40, 64))
    assert len(detect_discs(two)) == 2
    assert len(detect_discs(np.zeros((64, 64), np.uint8))) == 0


def test_circle_stats_accuracy():
    imgs = np.stack([render_disc(32, 32, 64), render_disc(5, 5, 64), np.zeros((64, 64), np.uint8),
                     np.maximum(render_disc(32, 10, 64), render_disc(32, 40, 64))])
    s = circle_stats(imgs)
    assert s["one_disc"] == 0.5 and s["zero_disc"] == 0.25 and s["two_plus_disc"] == 0.25
    assert s["accuracy"] == 0.25 and s["zero_or_two"] == 0.5
    assert s["z"] == pytest.approx([32 / 63, 5 / 63])

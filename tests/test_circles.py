"""The §5.5 dataset and the circle detector."""
import numpy as np
import pytest

from detector import circle_stats, components, detect_discs, expected_disc
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


def category(img):
    s = circle_stats(img[None])
    return [k for k in ("blob", "zero_disc", "one_disc", "two_plus_disc") if s[k] == 1.0]


def test_expected_disc_is_what_render_disc_draws():
    assert expected_disc(64) == (2, 21) and expected_disc(32) == (1, 5)


def test_detector_rejects_blobs_and_ignores_specks():
    S = 32
    grey = np.full((S, S), 128, np.uint8)       # a naive detector calls it "one disc at z = 0.5"
    white = np.full((S, S), 255, np.uint8)
    stripe = np.zeros((S, S), np.uint8)
    stripe[:, 15:17] = 255                      # full height, 2 px wide: area 64, box 2 x 32
    big = render_disc(16, 16, S, radius=4)      # radius 4 at 32 px: 9 x 9 box
    speck = render_disc(20, 10, S).copy()
    speck[25, 3] = 255                          # an isolated 1-px speck beside a real disc
    three = np.maximum.reduce([render_disc(x, 16, S) for x in (5, 15, 25)])
    for img in (grey, white, stripe, big):
        assert category(img) == ["blob"]
        assert len(detect_discs(img)) == 0
    assert components(grey)[2] == 1
    assert category(speck) == ["one_disc"] and components(speck)[1] == 1
    assert detect_discs(speck) == pytest.approx(np.array([[20, 10]]))
    assert category(three) == ["two_plus_disc"]
    assert circle_stats(three[None])["zero_or_two"] == 1.0  # 3+ discs are a failure too
    # A blob wins over a disc in the same image: the sample is not a clean one-disc image.
    assert category(np.maximum(big, render_disc(3, 3, S))) == ["blob"]
    # Grey-scale channels: (H, W, 1) works like (H, W).
    assert category(white[..., None]) == ["blob"]


@pytest.mark.parametrize("size", [32, 64])
def test_render_disc_is_one_disc_with_exact_centre(size):
    r = expected_disc(size)[0]
    corners = [(r, r), (size - 1 - r, size - 1 - r), (7, size - 1 - r)]
    for x, y in corners + [(size // 2, size // 3), (size // 4, 5)]:
        img = render_disc(x, y, size)
        assert category(img) == ["one_disc"], (x, y)
        assert np.abs(detect_discs(img)[0] - [x, y]).max() <= 0.5
        assert circle_stats(img[None])["columns"] == [x]


def test_category_fractions_pinned():
    S = 32
    disc = lambda x, y=16: render_disc(x, y, S)  # noqa: E731
    speck = disc(16).copy()
    speck[2, 2] = 255
    batch = np.stack([
        disc(16), disc(3), speck,                              # one disc: middle, band, middle + speck
        np.zeros((S, S), np.uint8),                            # zero
        np.maximum(disc(5), disc(25)),                         # two
        np.maximum.reduce([disc(5), disc(15), disc(25)]),      # three
        np.full((S, S), 200, np.uint8),                        # blob (grey background)
        np.maximum(render_disc(16, 16, S, radius=4), disc(3)),  # blob + disc
    ])
    s = circle_stats(batch)
    assert s["n"] == 8 and s["one_disc"] == 3 / 8 and s["zero_disc"] == 1 / 8
    assert s["two_plus_disc"] == 2 / 8 and s["blob"] == 2 / 8
    assert s["zero_or_two"] == 3 / 8 and s["speck"] == 1 / 8
    assert s["accuracy"] == 2 / 8 and s["middle_of_detected"] == 2 / 3
    assert s["hist_n"] == 3 and s["z"] == pytest.approx([16 / 31, 3 / 31, 16 / 31])
    assert s["columns"] == [16, 3, 16]

"""The stand-in's mouth readout (§5.1; mouth_readout.py, face_geometry.py): the renderer's masks
reproduce the stand-in's pixels, the face's geometry and z_smile are recovered on renders of known
latents, blanked mouths read as faded and smile+frown overlays as doubled, and evaluate_faces
reports the classes."""
import numpy as np
import pytest
import torch

import celeba
import evaluate_faces as EF
import face_geometry as G
import mouth_readout as MR
import toy_faces
from conftest import one_line_error

pytestmark = pytest.mark.usefixtures("one_thread")
N = 24          # faces per kind; z_smile on an even grid over [0, 1], random nuisances


@pytest.fixture(scope="module")
def faces():
    lat = toy_faces.sample_latents(N, seed=3)
    lat["z_smile"] = np.linspace(0, 1, N)
    rows = [{k: float(v[i]) for k, v in lat.items()} for i in range(N)]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)                # small tensors: one thread is faster on a busy box
    fits = {kind: MR.readout(np.stack([MR.render_variant(r, kind) for r in rows]))
            for kind in ("clean", "blank", "overlay")}
    torch.set_num_threads(threads)
    return lat, rows, fits


def test_masks_reproduce_the_stand_in_pixels():
    """A face is sum_k colour_k M_k: with the part colours of the drawing, the resized masks
    give celeba.preprocess's pixels within 1.5 levels (its uint8 passes round; measured 0.9)."""
    row = {k: float(v[5]) for k, v in toy_faces.sample_latents(8, seed=1).items()}
    parts = []

    def label(part, colour):
        if (part, colour) not in parts:
            parts.append((part, colour))
        return parts.index((part, colour))
    labels = np.asarray(toy_faces.render_face(row, label, "L"))
    onehot = labels[None] == np.arange(len(parts))[:, None, None]
    masks = G.resample(onehot, 0, 0, 32)[:, 0, 0].numpy()               # [parts, 32, 32]
    colours = np.array([np.broadcast_to(c, 3) for _, c in parts], dtype=np.float64)
    rebuilt = np.einsum("kyx,kc->yxc", masks, colours)
    true = celeba.preprocess(toy_faces.render_face(row), 32).astype(np.float64)
    assert np.abs(np.clip(rebuilt, 0, 255) - true).max() < 1.5
    assert np.allclose(masks.sum(0)[:, :], 1, atol=1e-6)               # the parts tile the crop


def test_geometry_and_z_recovered(faces):
    """Clean JPEG renders: offsets within 0.6 source px, scale within 0.012, z_smile RMSE below
    0.025 and every error below 0.06 (measured 0.014 / 0.04 on these 24; 0.015 / 0.07 over 80);
    each is mild exactly when its z is in [0.3, 0.7] away from the edges, with contrast ~1."""
    lat, _, fits = faces
    geo = np.array([f["geometry"] for f in fits["clean"]])
    true = np.c_[lat["dx"], lat["dy"], lat["scale"]]
    assert np.abs(geo - true)[:, :2].max() < 0.6 and np.abs(geo - true)[:, 2].max() < 0.012
    z = np.array([f["z"] for f in fits["clean"]])
    err = z - lat["z_smile"]
    assert np.sqrt(np.mean(err ** 2)) < 0.025 and np.abs(err).max() < 0.06
    assert np.corrcoef(z, lat["z_smile"])[0, 1] > 0.99
    labels = np.array([f["class"] for f in fits["clean"]])
    assert set(labels) <= {"mild", "clear"}
    inside = (lat["z_smile"] > 0.33) & (lat["z_smile"] < 0.67)
    outside = (lat["z_smile"] < 0.27) | (lat["z_smile"] > 0.73)
    assert (labels[inside] == "mild").all() and (labels[outside] == "clear").all()
    assert all(0.8 < f["contrast"] < 1.2 for f in fits["clean"])


def test_blanked_mouths_are_faded(faces):
    """The mouth painted in skin: every face reads faded (contrast < 0.15), never mild."""
    _, _, fits = faces
    assert [f["class"] for f in fits["blank"]] == ["faded"] * N
    assert max(f["contrast"] for f in fits["blank"]) < 0.15


def test_overlaid_mouths_are_doubled(faces):
    """The pixel mean of a smile (z = 0.95) and a frown (z = 0.05) face: every face reads doubled,
    the two mouths found near those z with about half the contrast each, the second mouth
    explaining well over DOUBLE_GAIN of the patch (measured >= 0.10)."""
    _, _, fits = faces
    assert [f["class"] for f in fits["overlay"]] == ["doubled"] * N
    for f in fits["overlay"]:
        assert abs(f["z_pair"][0] - 0.05) < 0.11 and abs(f["z_pair"][1] - 0.95) < 0.11   # 2 steps
        assert all(0.3 < a < 0.7 for a in f["contrast_pair"])
        assert f["rms_coarse"] ** 2 - f["rms2"] ** 2 > 1.5 * MR.DOUBLE_GAIN * f["signal"] ** 2


def test_classify_rule_by_hand():
    base = {"z": 0.5, "contrast": 1.0, "rms": 1.0, "signal": 10.0, "rms_coarse": 3.0, "rms2": 2.9}
    assert MR.classify(base) == "mild" and MR.classify({**base, "z": 0.71}) == "clear"
    assert MR.classify({**base, "z": 0.3}) == "mild"                                # closed
    assert MR.classify({**base, "contrast": 0.39}) == "faded"
    assert MR.classify({**base, "rms": 7.1}) == "other"                           # > 0.7 signal
    assert MR.classify({**base, "rms2": 2.01}) == "mild"       # gain (9 - 2.01^2) / 100 < 0.05
    assert MR.classify({**base, "rms2": 1.99}) == "doubled"
    assert MR.classify({**base, "rms2": float("inf"), "contrast": 0.1}) == "faded"


def test_fractions_and_errors(faces):
    _, rows, _ = faces
    ims = np.stack([MR.render_variant(rows[i], "clean") for i in (0, 12)]
                   + [MR.render_variant(rows[i], "blank") for i in (1, 2)])
    f = MR.fractions(ims)
    assert f == {"mouth_mild": 0.25, "mouth_clear": 0.25, "mouth_faded": 0.5, "mouth_doubled": 0.0,
                 "mouth_other": 0.0, "mouth_n": 4}
    assert MR.fractions(ims, limit=2)["mouth_n"] == 2                      # first and last
    assert MR.fractions(ims[:0])["mouth_n"] == 0
    one_line_error(lambda: MR.readout(ims[..., 0]), "[N, S, S, 3]")
    one_line_error(lambda: MR.render_variant(rows[0], "twice"), "clean, blank or overlay")


def test_evaluate_faces_reports_the_mouth_classes(faces):
    """evaluate_faces.measure adds the mouth_* fractions for Smiling when the stand-in's
    regressor is there, and leaves every other key as it was."""
    _, rows, _ = faces
    ims = np.stack([MR.render_variant(rows[i], k) for i, k in ((3, "clean"), (4, "blank"), (5, "overlay"))])

    class Clf:
        attribute = "Smiling"
        prob = staticmethod(lambda x: np.full(len(x), 0.5))
    without, _ = EF.measure(ims, [Clf()], [None])
    with_z, _ = EF.measure(ims, [Clf()], [lambda x: np.full(len(x), 0.5)])
    assert not any(k.startswith("mouth_") for k in without)
    assert {k: v for k, v in with_z.items() if not k.startswith(("mouth_", "z_"))} == without
    assert (with_z["mouth_clear"], with_z["mouth_faded"], with_z["mouth_doubled"]) == (1 / 3,) * 3
    assert "mouth_mild" in EF.format_table({"multi": with_z})


def test_validation_cli_records(tmp_path, monkeypatch):
    """``python mouth_readout.py --record`` writes results/mouth_readout.json with a row per render kind."""
    import json
    from results import record
    monkeypatch.setattr(record, "HERE", str(tmp_path))
    monkeypatch.setattr(record, "matmul_gflops", lambda: 1.0)
    MR.main(["--n", "3", "--record"])
    d = json.load(open(tmp_path / "mouth_readout.json"))
    assert [r[0] for r in d["tables"][0]["rows"]] == ["clean", "blank", "overlay"]
    assert d["metrics"]["blank"]["faded"] == 1.0 and d["metrics"]["overlay"]["doubled"] == 1.0
    assert d["n"] == 3 and "z RMSE" in d["notes"][0]
    one_line_error(lambda: MR.main(["--n", "0"]), "--n")

"""App. M and App. N on the face stand-in (lab/faces_interpolate.py, lab/faces_edit.py,
lab/face_readout.py): the readouts on renders of known latents, the latents and paths by their
definitions, and both drivers end to end on a tiny run."""
import json
import os

import numpy as np
import pytest
import torch

import mouth_readout as MR
import toy_faces
from checkpoint import from_uint8
from conftest import TINY, one_line_error
from lab import face_readout as R
from lab import faces_edit as FE
from lab import faces_interpolate as FI
from lab.interpolate import lerp, noised, path_latents, slerp

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def face_run(tmp_path_factory):
    """A 16 px Smiling run trained for 3 steps on 80 stand-in faces through an index list, and an
    evaluation classifier beside the list (for the regressor readout)."""
    import train
    from test_evaluate_faces import _eval_clf
    root = tmp_path_factory.mktemp("faces_app")
    data = str(root / "faces")
    toy_faces.make_toy_faces(data, n=80, seed=2)
    filt = root / "filter"
    filt.mkdir()
    (filt / "index.txt").write_text("".join(f"{i}\n" for i in range(0, 60, 2)) + "4\n")   # a repeat
    run = str(root / "run")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)                # tiny tensors: one thread is faster on a busy box
    train.main(["--dataset", "celeba", "--data-dir", data, "--attribute", "Smiling", "--out", run,
                "--index-list", str(filt / "index.txt"), "--steps", "3", "--clf-steps", "3", "--no-grid",
                "--device", "cpu"] + TINY)
    _eval_clf(data, "Smiling", str(filt / "eval_Smiling.pt"))
    torch.set_num_threads(threads)
    return run


# ----- the readouts on renders of known latents ----------------------------------------------

def test_nuisances_read_back_the_true_latents():
    """Clean 32 px renders: skin, hair and background within 0.03 of the truth (measured <= 0.012
    over 40 faces), the offsets within 0.8 source px, the scale within 0.015; identical images
    have zero pixel drift, and a changed mouth moves only the pixels inside the mouth's band."""
    lat = toy_faces.sample_latents(8, seed=5)
    rows = [{k: float(v[i]) for k, v in lat.items()} for i in range(8)]
    ims = np.stack([MR.render_variant(r, "clean") for r in rows])
    geo = R.smile(ims)["geometry"]
    got = R.nuisances(ims, geo)
    for k, tol in (("skin", 0.03), ("z_hair", 0.03), ("background", 0.03), ("dx", 0.8), ("dy", 0.8),
                   ("scale", 0.015)):
        assert np.abs(got[k] - lat[k]).max() < tol, k
    assert np.all(R.pixel_drift(ims, ims, geo)["outside_mouth"] == 0)
    other = np.stack([MR.render_variant({**r, "z_smile": 1 - r["z_smile"]}, "clean") for r in rows])
    d = R.pixel_drift(ims, other, geo)
    assert d["outside_mouth"].max() < 1.0 < d["inside_mouth"].min()   # JPEG ringing only, outside


def test_summarise_paths_of_known_smiles():
    """Two rendered paths, z = 0.1 -> 0.5 -> 0.9 and 0.9 -> 0.1 -> 0.5, with a regressor that
    returns the true z: the first is monotone through a clean mild frame, the second is not."""
    row = {k: float(v[0]) for k, v in toy_faces.sample_latents(1, seed=7).items()}
    zs = [[0.1, 0.5, 0.9], [0.9, 0.1, 0.5]]
    frames = np.stack([[MR.render_variant({**row, "z_smile": z}, "clean") for z in p] for p in zs])
    r = FI.summarise(frames, zreg=lambda x: np.ravel(zs)[:len(x)])
    assert r["inner_clean_mild"] == 0.5 and r["inner_mouth_z_03_07"] == 0.5 and r["inner_reg_z_03_07"] == 0.5
    assert r["monotone_mouth"] == r["monotone_clean"] == r["through_mild"] == r["monotone_reg"] == 0.5
    assert r["mouth_class"].tolist() == [["clear", "mild", "clear"], ["clear", "clear", "mild"]]
    assert np.allclose(r["z_reg_mean"], [0.5, 0.3, 0.7]) and np.allclose(r["z_reg_std"], [0.4, 0.2, 0.2])
    assert np.abs(r["z_mouth"] - np.array(zs)).max() < 0.06
    assert r["inner_classes"]["mild"] == 0.5 and r["inner_classes"]["clear"] == 0.5


def test_pick_is_clear_and_errors():
    z = np.array([0.1, 0.5, 0.9, 0.2, 0.85, 0.79])
    rng = np.random.default_rng(0)
    assert set(R.pick(z, 0, 2, rng)) == {0, 3} and set(R.pick(z, 1, 5, rng)) <= {2, 4}
    one_line_error(lambda: R.pick(np.array([0.5]), 1, 1, rng), "z_smile", "0.8")
    import config as C
    one_line_error(lambda: R.training_faces({"data": C.DataConfig(dataset="circles")}), "circles", "Smiling")


# ----- latents and paths by their definitions ------------------------------------------------

def test_slerp_and_lerp_endpoints_and_identical_latents():
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(3, 3, 4, 4, generator=g), torch.randn(3, 3, 4, 4, generator=g)
    zs = path_latents(a, b, 5, "slerp")
    assert zs.shape == (3, 5, 3, 4, 4)
    assert torch.allclose(zs[:, 0], a, atol=1e-6) and torch.allclose(zs[:, -1], b, atol=1e-6)
    assert torch.allclose(slerp(a, a, 0.3), a, atol=1e-6)              # identical latents: themselves
    assert torch.allclose(lerp(a, b, 0.25), 0.75 * a + 0.25 * b)
    # Equal-norm endpoints: slerp keeps the norm, the straight line's midpoint is shorter.
    b = b / b.flatten(1).norm(dim=1).view(-1, 1, 1, 1) * a.flatten(1).norm(dim=1).view(-1, 1, 1, 1)
    mid = path_latents(a, b, 3, "slerp")[:, 1].flatten(1).norm(dim=1)
    assert torch.allclose(mid, a.flatten(1).norm(dim=1), rtol=1e-5)
    assert (path_latents(a, b, 3, "lerp")[:, 1].flatten(1).norm(dim=1) < mid).all()


def test_q_noising_is_eq4_and_deterministic():
    from diffusion import GaussianDiffusion, make_betas
    d = GaussianDiffusion.respaced(make_betas("cosine", 100), 10)
    x0 = torch.rand(2, 3, 4, 4) * 2 - 1
    z1, z2 = (noised(d, x0, 5, torch.Generator().manual_seed(7)) for _ in range(2))
    assert torch.equal(z1, z2)
    assert not torch.equal(z1, noised(d, x0, 5, torch.Generator().manual_seed(8)))
    eps = torch.randn(x0.shape, generator=torch.Generator().manual_seed(7))
    ab = d.alphas_cumprod[5].float()
    assert torch.allclose(z1, ab.sqrt() * x0 + (1 - ab).sqrt() * eps, atol=1e-6)


def test_monotone_tolerance_and_outcomes():
    z = np.array([[0.1, 0.3, 0.27, 0.9], [0.1, 0.3, 0.2, 0.9]])
    assert FI.monotone(z).tolist() == [True, False]                      # drops of 0.03 and 0.10
    assert [FE.outcome(z, c, 0) for z, c in ((0.5, "mild"), (0.9, "clear"), (0.1, "clear"), (0.5, "faded"))] \
        == ["mild", "crossed", "unchanged", "lost"]
    assert FE.outcome(0.1, "clear", 1) == "crossed" and FE.outcome(0.9, "doubled", 1) == "lost"


# ----- the drivers end to end on a tiny run --------------------------------------------------

def test_paths_end_on_the_endpoint_latents(face_run):
    from sample import load_ddpm
    from diffusion import GaussianDiffusion
    model, cfg = load_ddpm(face_run, "cpu")
    d = GaussianDiffusion.from_config(cfg["diffusion"], respaced=True, steps=6)
    images, lat = R.training_faces(cfg)
    assert len(images) == 30 and images.shape[1:] == (16, 16, 3)         # the index list, repeat once
    x = from_uint8(images[:2])
    out = FI.paths(model, d, x[:1], x[1:], 3, 3, seed=4)
    assert set(out) == {(k, h) for k in FI.KINDS for h in FI.HOWS}
    for kind in FI.KINDS:
        z = FI.latents(model, d, x, 3, kind, seed=4)
        ends = FI.decode(model, d, z, 3)
        for how in FI.HOWS:
            assert torch.allclose(out[kind, how][:, 0], ends[:1], atol=1e-5)
            assert torch.allclose(out[kind, how][:, -1], ends[1:], atol=1e-5)
        assert torch.equal(z, FI.latents(model, d, x, 3, kind, seed=4))   # q: the seed fixes the noise
    assert not torch.allclose(out["ddim", "slerp"][:, 1], out["ddim", "lerp"][:, 1])


def test_interpolate_cli(face_run, tmp_path):
    out = str(tmp_path / "interp")
    r = FI.run(["--run", face_run, "--out", out, "--n", "1", "--frames", "3", "--steps", "6",
                "--device", "cpu", "--zreg-steps", "2"])
    saved = json.load(open(os.path.join(out, "faces_interp.json")))
    assert set(saved["paths"]) == {"ddim/slerp", "ddim/lerp", "q/slerp", "q/lerp"}
    assert saved["invert_to"] == 3 and saved["frames"] == 3 and saved["pairs"] == 1   # ceil(0.5 * 5)
    assert max(saved["true_z_a"]) <= 0.2 and min(saved["true_z_b"]) >= 0.8
    for p in saved["paths"].values():
        assert len(p["z_mouth_mean"]) == len(p["z_reg_mean"]) == 3 and np.shape(p["z_mouth"]) == (1, 3)
        assert abs(sum(p["inner_classes"].values()) - 1) < 1e-9
        assert 0 <= p["through_mild"] <= p["monotone_clean"] <= p["monotone_mouth"] <= 1
    assert r["paths"]["q/slerp"]["endpoint_mae"] == saved["paths"]["q/slerp"]["endpoint_mae"]
    for f in ("faces_interp.png", "faces_interp_z.png"):
        assert os.path.getsize(os.path.join(out, f)) > 0
    one_line_error(lambda: FI.run(["--run", face_run, "--out", out, "--depth", "0", "--device", "cpu"]),
                   "--depth")


def test_edit_cli(face_run, tmp_path):
    out = str(tmp_path / "edit")
    FE.run(["--run", face_run, "--out", out, "--n", "1", "--steps", "6", "--control", "--cols", "2",
            "--device", "cpu", "--zreg-steps", "0"])
    r = json.load(open(os.path.join(out, "faces_edit.json")))
    assert set(r["edits"]) == {"to_smile/30", "to_smile/0", "to_frown/30", "to_frown/0"}
    for e in r["edits"].values():
        assert abs(sum(e[k] for k in FE.OUTCOMES) - 1) < 1e-9 and len(e["z_mouth_after"]) == 1
        assert set(e["drift"]) == set(R.NUISANCES) and e["pixel_outside_mouth"] >= 0
        assert "reg_z_03_07" not in e                                    # --zreg-steps 0
    assert os.path.getsize(os.path.join(out, "faces_edit.png")) > 0
    one_line_error(lambda: FE.run(["--run", face_run, "--out", out, "--eta-start", "2", "--device", "cpu"]),
                   "--eta-start")

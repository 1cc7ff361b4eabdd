"""Training end to end on a tiny config: loss goes down, checkpoints round-trip, --resume."""
import os
import subprocess
import sys

import pytest
import torch

import config as C
import train
from checkpoint import load_checkpoint
from conftest import TINY
from diffusion import GaussianDiffusion, cosine_betas
from toy_circles import CirclesData
from unet import UNet

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_unet_shapes_and_identity_init():
    m = UNet(16, 1, model_channels=8, channel_mult=(1, 2), attention_resolutions=(8,), num_head_channels=8)
    x, t = torch.randn(3, 1, 16, 16), torch.tensor([0, 5, 9])
    assert m(x, t).shape == x.shape
    assert torch.count_nonzero(m(x, t)) == 0  # zero-initialised output conv
    with pytest.raises(ValueError, match="divisible"):
        UNet(18, 1, channel_mult=(1, 2, 2))


def test_every_decoder_upsampling_is_followed_by_a_conv():
    """The reference UNet's conv_resample: a 3x3 conv after each nearest 2x upsampling of the decoder,
    three of them for the cpu preset's four levels."""
    cfg = C.from_dict(C.to_dict(C.make_config("circles", "cpu")))
    keys = UNet.from_config(cfg["data"], cfg["unet"]).state_dict()
    assert sum(k.endswith("conv.weight") and ".up." in "." + k for k in keys) == 3  # 4 levels


def test_thirty_steps_lower_the_loss():
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    data = CirclesData(16, 0.2)
    d = GaussianDiffusion(cosine_betas(50))
    m = UNet(16, 1, model_channels=8, channel_mult=(1, 2), attention_resolutions=(8,), num_head_channels=8)
    opt = torch.optim.Adam(m.parameters(), lr=3e-3)
    x0, _ = data.batch(64, g)
    t = torch.randint(0, 50, (64,), generator=g)
    noise = torch.randn(x0.shape, generator=g)
    with torch.no_grad():
        before = d.training_loss(m, x0, t, noise).item()
    for _ in range(30):
        xb, _ = data.batch(16, g)
        loss = d.training_loss(m, xb)
        opt.zero_grad(), loss.backward(), opt.step()
    with torch.no_grad():
        after = d.training_loss(m, x0, t, noise).item()
    assert after < 0.8 * before


def test_checkpoint_round_trip_and_config(tiny_run):
    ck = load_checkpoint(tiny_run, "ddpm")
    assert ck["step"] == 20 and set(ck) >= {"model", "ema", "optimizer", "rng", "config", "meta"}
    cfg = C.from_dict(ck["config"])
    assert cfg["data"].image_size == 16 and cfg["unet"].channel_mult == (1, 2)
    m = UNet.from_config(cfg["data"], cfg["unet"])
    m.load_state_dict(ck["ema"])  # strict: the stored config rebuilds the exact network
    assert not any(n.startswith(".tmp-") for n in os.listdir(tiny_run))  # atomic writes cleaned up


def test_resume_continues_at_saved_step(tmp_path):
    out = str(tmp_path / "r")
    base = ["--model", "ddpm", "--out", out, "--device", "cpu", "--no-grid"] + TINY
    train.main(base + ["--steps", "10"])
    first = load_checkpoint(out, "ddpm")
    train.main(["--model", "ddpm", "--out", out, "--resume", "--steps", "15", "--no-grid"])
    second = load_checkpoint(out, "ddpm")
    assert first["step"] == 10 and second["step"] == 15
    c1, c2 = first["config"], second["config"]
    c1["train"].pop("steps"), c2["train"].pop("steps")
    assert c1 == c2  # config came from the checkpoint, not from the (absent) flags
    assert not torch.equal(first["model"]["out.2.weight"], second["model"]["out.2.weight"])


def test_resume_is_deterministic(tmp_path):
    """10 steps + resume to 20 gives the same weights as 20 steps straight (RNG state saved)."""
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    base = ["--model", "ddpm", "--device", "cpu", "--no-grid", "--save-every", "10"] + TINY
    train.main(base + ["--out", a, "--steps", "20"])
    train.main(base + ["--out", b, "--steps", "20", "--stop-at", "10"])
    train.main(["--model", "ddpm", "--out", b, "--resume", "--steps", "20", "--no-grid"])
    wa, wb = load_checkpoint(a, "ddpm")["model"], load_checkpoint(b, "ddpm")["model"]
    assert all(torch.allclose(wa[k], wb[k], atol=1e-6) for k in wa)


def run_cli(*args):
    return subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=300)


def assert_one_line_error(p, *words):
    assert p.returncode != 0
    err = p.stderr.strip()
    assert "Traceback" not in err and len(err.splitlines()) == 1, err
    for w in words:
        assert w in err, err


def test_cli_unknown_dataset(tmp_path):
    assert_one_line_error(run_cli("train.py", "--dataset", "mnist", "--out", str(tmp_path / "x")),
                          "unknown dataset", "circles")


def test_cli_resume_without_checkpoint(tmp_path):
    assert_one_line_error(run_cli("train.py", "--resume", "--out", str(tmp_path / "none")),
                          "--resume", "no checkpoint")


def test_cli_size_mismatch_on_resume(tiny_run):
    before = os.path.getmtime(os.path.join(tiny_run, "ddpm.pt"))
    p = run_cli("train.py", "--model", "ddpm", "--out", tiny_run, "--resume", "--image-size", "32")
    assert_one_line_error(p, "image_size=16", "32")
    assert os.path.getmtime(os.path.join(tiny_run, "ddpm.pt")) == before  # nothing overwritten


def test_cli_existing_run_not_overwritten(tiny_run):
    before = os.path.getmtime(os.path.join(tiny_run, "ddpm.pt"))
    assert_one_line_error(run_cli("train.py", "--model", "ddpm", "--out", tiny_run), "--resume", "--overwrite")
    assert os.path.getmtime(os.path.join(tiny_run, "ddpm.pt")) == before


def test_cli_out_is_a_file(tmp_path):
    f = tmp_path / "file"
    f.write_text("x")
    assert_one_line_error(run_cli("train.py", "--out", str(f)), "cannot write", "--out")


def test_cli_bad_config_value(tmp_path):
    assert_one_line_error(run_cli("train.py", "--out", str(tmp_path / "x"), "--noise-schedule", "quadratic"),
                          "noise schedule", "quadratic")
    assert_one_line_error(run_cli("train.py", "--out", str(tmp_path / "y"), "--image-size", "30"),
                          "divisible")


def test_paper_preset_builds_the_authors_models():
    from classifier import NoisyClassifier
    cfg = C.make_config("circles", "paper")
    assert cfg["data"].image_size == 64 and cfg["diffusion"].timesteps == 4000
    assert cfg["diffusion"].prediction == "eps" and cfg["train"].steps == 30000
    m = UNet.from_config(cfg["data"], cfg["unet"])
    clf = NoisyClassifier.from_config(cfg["data"], cfg["classifier"])
    x, t = torch.randn(1, 1, 64, 64), torch.tensor([3999])
    with torch.no_grad():
        assert m(x, t).shape == x.shape and clf(x, t).shape == (1, 2)
    n = sum(p.numel() for p in m.parameters())
    assert 50e6 < n < 200e6, n  # 128 ch x (1,2,3,4), 3 res blocks


def test_unknown_preset_is_clear():
    with pytest.raises(ValueError, match="unknown dataset/preset"):
        C.make_config("circles", "gpu")


def test_cpu64_preset_is_the_authors_circles_and_trains(tmp_path):
    """--preset cpu64: the authors' 64 px data (1200 images, 21 lit pixels each) and the cpu
    networks with one more level; a few steps of every model run and land in the checkpoint."""
    import config as C
    import train
    from toy_circles import CirclesData
    cfg = C.make_config("circles", "cpu64")
    data = CirclesData(cfg["data"].image_size, cfg["data"].delta)
    assert len(data) == 1200 and cfg["data"].image_size == 64
    assert ((data.x > 0).sum(dim=(1, 2, 3)) == 21).all()
    out = str(tmp_path / "r64")
    train.main(["--dataset", "circles", "--preset", "cpu64", "--out", out, "--steps", "2",
                "--clf-steps", "2", "--batch-size", "4", "--clf-batch-size", "4", "--no-grid",
                "--device", "cpu"])
    ck = train.load_checkpoint(out, "classifier_sn")
    assert ck["meta"]["preset"] == "cpu64" and ck["step"] == 2
    assert C.from_dict(ck["config"])["unet"].channel_mult == (1, 2, 2, 4)
    from conftest import one_line_error
    one_line_error(lambda: train.main(["--dataset", "celeba", "--preset", "cpu64",
                                       "--out", str(tmp_path / "x")]), "cpu64", "celeba")
    assert not os.path.exists(tmp_path / "x")

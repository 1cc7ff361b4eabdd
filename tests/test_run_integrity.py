"""A run's config cannot drift; logs, skips and stops behave; devices and precision are explicit."""
import contextlib
import json
import os
import re

import pytest
import torch

import train
import trainer
from checkpoint import UserError, load_checkpoint, pick_device
from conftest import TINY
from diffusion import GaussianDiffusion, cosine_betas
from test_training import assert_one_line_error, run_cli

TINY_DDPM = ["--device", "cpu", "--no-grid"] + TINY


@pytest.fixture(scope="module")
def ddpm_run(tmp_path_factory):
    """A 16x16, T=50 DDPM alone in its run (v-prediction, the cpu preset's)."""
    out = str(tmp_path_factory.mktemp("integrity") / "run")
    train.main(["--model", "ddpm", "--out", out, "--steps", "10"] + TINY_DDPM)
    return out


@pytest.mark.parametrize("flag", [["--prediction", "eps"], ["--lr", "0.1"], ["--seed", "3"],
                                  ["--variance", "fixed_small"], ["--no-flip"]])
def test_resume_freezes_what_the_checkpoint_means(ddpm_run, flag):
    before = os.path.getmtime(os.path.join(ddpm_run, "ddpm.pt"))
    with pytest.raises(UserError, match="keeps its config"):
        train.main(["--model", "ddpm", "--out", ddpm_run, "--resume", "--steps", "12"] + flag)
    assert os.path.getmtime(os.path.join(ddpm_run, "ddpm.pt")) == before
    assert load_checkpoint(ddpm_run, "ddpm")["config"]["diffusion"]["prediction"] == "v"


def test_finished_model_is_skipped_on_resume(ddpm_run):
    path = os.path.join(ddpm_run, "ddpm.pt")
    before = os.path.getmtime(path)
    train.main(["--model", "ddpm", "--out", ddpm_run, "--resume", "--no-grid"])
    assert os.path.getmtime(path) == before  # not rewritten, so evaluate's sample cache stays valid
    assert load_checkpoint(ddpm_run, "ddpm")["step"] == 10


def test_training_log_and_loss_curve(ddpm_run):
    recs = [json.loads(ln) for ln in open(os.path.join(ddpm_run, "log_ddpm.jsonl"))]
    # TINY logs every 50 steps by default: a 10-step run logs once, at its last step.
    assert [r["step"] for r in recs] == [10]
    assert recs[0]["loss"] > 0 and recs[0]["images_per_s"] > 0
    assert recs[0]["lr"] == pytest.approx(trainer.lr_at(9, 2e-3, 5, 10))
    assert os.path.getsize(os.path.join(ddpm_run, "loss_ddpm.png")) > 0


def test_log_interval_and_truncation_on_resume(tmp_path):
    out = str(tmp_path / "r")
    train.main(["--model", "ddpm", "--out", out, "--steps", "12", "--stop-at", "8", "--log-every", "3",
                "--save-every", "4"] + TINY_DDPM)
    log = os.path.join(out, "log_ddpm.jsonl")
    assert [json.loads(ln)["step"] for ln in open(log)] == [3, 6, 8]
    with open(log, "a") as f:  # a crash after logging step 9 but before the step-12 checkpoint
        f.write(json.dumps({"step": 9, "loss": 1.0, "lr": 0.0, "images_per_s": 1.0, "elapsed_s": 0}) + "\n")
    train.main(["--model", "ddpm", "--out", out, "--resume", "--no-grid"])
    assert [json.loads(ln)["step"] for ln in open(log)] == [3, 6, 8, 9, 12]


def test_classifier_inherits_the_runs_data_and_diffusion(tmp_path):
    out = str(tmp_path / "r")
    # A non-default delta and schedule: the preset would give 32 px, T = 1000, delta 0.2.
    train.main(["--model", "ddpm", "--out", out, "--steps", "2", "--delta", "0.25",
                "--noise-schedule", "linear"] + TINY_DDPM)
    clf_tiny = ["--clf-channels", "8", "--clf-channel-mult", "1,2", "--clf-attention-resolutions", "8",
                "--clf-steps", "2", "--clf-batch-size", "8", "--device", "cpu"]
    train.main(["--model", "classifier", "--out", out] + clf_tiny)
    ddpm, clf = load_checkpoint(out, "ddpm")["config"], load_checkpoint(out, "classifier")["config"]
    assert clf["data"] == ddpm["data"] and clf["diffusion"] == ddpm["diffusion"]
    assert clf["data"]["image_size"] == 16 and clf["diffusion"]["timesteps"] == 50
    with pytest.raises(UserError, match="share"):  # a flag contradicting the run is refused
        train.main(["--model", "classifier", "--out", out, "--overwrite", "--image-size", "32"] + clf_tiny)


def test_suggested_fix_for_a_mismatched_classifier_works(tmp_path):
    """sample.py refuses a classifier made for other images and names a command; typed, it works."""
    out, other = str(tmp_path / "r"), str(tmp_path / "other")
    clf_tiny = ["--clf-channels", "8", "--clf-channel-mult", "1,2", "--clf-attention-resolutions", "8",
                "--clf-steps", "2", "--clf-batch-size", "8"]
    train.main(["--model", "ddpm", "--out", out, "--steps", "2"] + TINY_DDPM)
    train.main(["--model", "classifier", "--out", other, "--device", "cpu", "--image-size", "32",
                "--timesteps", "50"] + clf_tiny)
    for n in ("classifier.pt", "classifier_sn.pt"):
        os.replace(os.path.join(other, n), os.path.join(out, n))
    p = run_cli("sample.py", "--run", out, "--n", "2", "--guidance", "multi", "--device", "cpu")
    assert_one_line_error(p, "retrain")
    fix = re.search(r"(python train\.py [^;]*?--overwrite)", p.stderr).group(1).split()[1:]
    assert run_cli(*fix, *clf_tiny).returncode == 0
    p = run_cli("sample.py", "--run", out, "--n", "2", "--guidance", "multi", "--device", "cpu")
    assert p.returncode == 0, p.stderr


def test_classifier_honours_stop_at(tmp_path):
    out = str(tmp_path / "r")
    train.main(["--model", "classifier", "--out", out, "--stop-at", "3", "--clf-steps", "6",
                "--clf-channels", "8", "--clf-channel-mult", "1,2", "--clf-attention-resolutions", "8",
                "--clf-batch-size", "8", "--device", "cpu"] + TINY[:2] + ["--timesteps", "50"])
    ck = load_checkpoint(out, "classifier")
    assert ck["step"] == 3 and "clean_accuracy" not in ck
    train.main(["--model", "classifier", "--out", out, "--resume"])
    assert load_checkpoint(out, "classifier")["step"] == 6 and "clean_accuracy" in load_checkpoint(out, "classifier")


def test_gradscaler_unscales_before_clipping(tmp_path, monkeypatch):
    """fp16 path: with a GradScaler the clipped update must equal the fp32 one (unscale first)."""
    def run(out, use_scaler):
        if use_scaler:  # a CPU GradScaler stands in for the CUDA one: same unscale/clip/step logic
            monkeypatch.setattr(trainer, "precision", lambda device, allow=True: (
                contextlib.nullcontext, torch.amp.GradScaler("cpu", init_scale=2.0 ** 12), "scaled"))
        else:
            monkeypatch.setattr(trainer, "precision", lambda device, allow=True: (
                contextlib.nullcontext, None, "fp32"))
        train.main(["--model", "ddpm", "--out", out, "--steps", "3", "--grad-clip", "0.01"] + TINY_DDPM)
        return load_checkpoint(out, "ddpm")
    a, b = run(str(tmp_path / "a"), False), run(str(tmp_path / "b"), True)
    assert "scaler" in b and "scaler" not in a
    for k in a["model"]:
        assert torch.allclose(a["model"][k], b["model"][k], atol=1e-6), k


def test_precision_is_fp32_off_cuda():
    ctx, scaler, label = trainer.precision(torch.device("cpu"))
    assert scaler is None and label == "fp32"
    assert trainer.precision(torch.device("cpu"), False)[2] == "fp32"


def test_bad_device_is_one_line(tmp_path):
    assert_one_line_error(run_cli("train.py", "--device", "foo", "--out", str(tmp_path / "x")),
                          "unknown --device", "cpu")
    with pytest.raises(UserError, match="CUDA is not available"):
        if not torch.cuda.is_available():
            pick_device("cuda:0")
        else:
            raise UserError("CUDA is not available (skipped: a GPU is present)")


def test_schedule_tables_live_on_the_device_in_float32():
    d = GaussianDiffusion(cosine_betas(100))
    assert d.alphas_cumprod.dtype == torch.float64  # the reference stays float64
    for name, table in d.f32.items():
        assert table.dtype == torch.float32 and table.device.type == "cpu"
        assert torch.equal(table, getattr(d, name).float()), name
    d.to("meta")  # tables elsewhere than the timesteps: a clear error, not a silent copy
    with pytest.raises(RuntimeError, match=r"diffusion\.to\(device\)"):
        d.q_sample(torch.zeros(2, 1, 4, 4), torch.tensor([1, 2]))


def test_every_config_flag_says_what_it_means():
    import dataclasses
    import config as C
    for cls in (*C.GROUPS.values(), C.SampleConfig):
        for f in dataclasses.fields(cls):
            assert f.metadata.get("help"), f"{cls.__name__}.{f.name} has no help text"
    text = " ".join(train.build_parser().format_help().split())
    assert "width of each extreme training band in z (§4.1) (default: 0.2)" in text
    assert "cosine decay to 10%)" in text  # '%' survives argparse's formatting


def test_atomic_writes_keep_the_old_file_on_error_and_get_normal_permissions(tmp_path):
    from checkpoint import atomic_path, write_bytes_atomic
    path = tmp_path / "f.bin"
    write_bytes_atomic(str(path), b"old")
    with pytest.raises(RuntimeError):
        with atomic_path(str(path)) as tmp:
            with open(tmp, "wb") as f:
                f.write(b"half-writ")
            raise RuntimeError("crash mid-write")
    assert path.read_bytes() == b"old"                      # the old file survives a crash
    assert os.listdir(tmp_path) == ["f.bin"]                # and the temp file is gone
    write_bytes_atomic(str(path), b"new")
    umask = os.umask(0)
    os.umask(umask)
    assert path.read_bytes() == b"new"
    assert path.stat().st_mode & 0o777 == 0o666 & ~umask    # not mkstemp's private 0600

"""Noise-aware classifier, spectral norm, (multi-)guidance, and the sampling CLI's errors."""
import os
import shutil

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import train
from checkpoint import UserError
from classifier import NoisyClassifier, spectral_layers
from conftest import TINY
from diffusion import GaussianDiffusion, cosine_betas
from guidance import multi_guidance, parse_lambdas, single_guidance
from test_training import assert_one_line_error, run_cli


def tiny_classifier(**kw):
    torch.manual_seed(0)
    return NoisyClassifier(16, 1, 2, clf_channels=8, clf_channel_mult=(1, 2),
                           clf_attention_resolutions=(8,), head_channels=8, **kw)


def test_guidance_gradient_matches_finite_differences():
    clf = tiny_classifier().double().eval()
    lam = torch.tensor([3.0, 7.0], dtype=torch.float64)
    x, t = torch.randn(2, 1, 16, 16, dtype=torch.float64), torch.tensor([3, 40])
    g = multi_guidance([clf], [lam])(x, t)

    def f(z):
        return (F.log_softmax(clf(z, t), -1) * lam).sum()

    gen = torch.Generator().manual_seed(1)
    for _ in range(3):
        v = torch.randn(x.shape, generator=gen, dtype=torch.float64)
        h = 1e-5
        fd = (f(x + h * v) - f(x - h * v)) / (2 * h)
        assert (g * v).sum().item() == pytest.approx(fd.item(), rel=1e-5, abs=1e-8)


def test_multi_with_zero_lambda_equals_single():
    clf = tiny_classifier().eval()
    x, t = torch.randn(4, 1, 16, 16), torch.tensor([0, 10, 20, 49])
    multi = multi_guidance([clf], [torch.tensor([0.0, 30.0])])(x, t)
    single = single_guidance(clf, torch.ones(4, dtype=torch.long), 30.0)(x, t)
    assert torch.allclose(multi, single, atol=1e-6) and multi.abs().sum() > 0


def test_multi_guidance_sums_classifiers():
    a, b = tiny_classifier().eval(), tiny_classifier(spectral_norm_scale=2.0).eval()
    x, t = torch.randn(2, 1, 16, 16), torch.tensor([5, 30])
    both = multi_guidance([a, b], [[1.0, 2.0], [3.0, 4.0]])(x, t)
    sep = multi_guidance([a], [[1.0, 2.0]])(x, t) + multi_guidance([b], [[3.0, 4.0]])(x, t)
    assert torch.allclose(both, sep, atol=1e-5)


def test_lambda_list_wrong_length_is_clear():
    with pytest.raises(UserError, match="2 classes"):
        parse_lambdas("30,30,30", 2)
    with pytest.raises(UserError, match="one lambda per class"):
        multi_guidance([tiny_classifier()], [torch.tensor([1.0, 2.0, 3.0])])
    assert parse_lambdas("30, 10", 2).tolist() == [30.0, 10.0]


class Spy(torch.nn.Module):
    """Records the timesteps it is given; eps = 0 / constant logits."""

    def __init__(self, out_classes=None):
        super().__init__()
        self.seen, self.num_classes = [], out_classes

    def forward(self, x, t):
        self.seen.append(sorted(set(t.tolist())))
        if self.num_classes:
            return (x.flatten(1)[:, :1] * torch.ones(1, self.num_classes))  # depends on x
        return torch.zeros_like(x)


def test_networks_see_original_timesteps_under_respacing():
    d = GaussianDiffusion.respaced(cosine_betas(1000), 8)
    net, clf = Spy(), Spy(out_classes=2)
    d.sample(net, (2, 1, 4, 4), guidance=multi_guidance([clf], [[1.0, 1.0]]))
    expected = [[t] for t in reversed(d.timestep_map.tolist())]
    assert net.seen == expected and clf.seen == expected
    assert expected[0] == [999] and expected[-1] == [0]


def test_spectral_norm_bounds_every_layer():
    clf = tiny_classifier(spectral_norm_scale=2.0)
    clf.train()
    for _ in range(20):  # let the power iteration converge
        clf(torch.randn(2, 1, 16, 16), torch.tensor([1, 2]))
    clf.eval()
    layers = spectral_layers(clf)
    assert len(layers) >= 10
    for name, w in layers:
        s = torch.linalg.matrix_norm(w.detach().reshape(w.shape[0], -1), ord=2).item()
        assert s <= 2.0 * 1.01, name
    assert max(torch.linalg.matrix_norm(w.detach().reshape(w.shape[0], -1), ord=2).item()
               for _, w in layers) > 1.9  # and the bound is actually reached


def test_trained_classifiers_and_spectral_twin(tiny_run):
    from sample import load_classifier
    plain = load_classifier(tiny_run, "classifier", "cpu")
    sn = load_classifier(tiny_run, "classifier_sn", "cpu")
    assert not spectral_layers(plain) and spectral_layers(sn)
    for _, w in spectral_layers(sn):
        assert torch.linalg.matrix_norm(w.reshape(w.shape[0], -1), ord=2).item() <= sn.spectral_norm_scale * 1.05


def test_sample_cli_writes_npz(tiny_run):
    p = run_cli("sample.py", "--run", tiny_run, "--n", "6", "--guidance", "multi", "--lambdas", "30,30",
                "--device", "cpu")
    assert p.returncode == 0, p.stderr
    npz = os.path.join(tiny_run, "samples_multi_classifier.npz")  # default --out: the run directory
    z = np.load(npz)
    assert z["images"].shape == (6, 16, 16, 1) and z["images"].dtype == np.uint8
    assert str(z["lambdas"]) == "30,30" and str(z["classifier"]) == "classifier"
    assert os.path.exists(os.path.join(tiny_run, "samples_multi_classifier.png"))
    assert f"wrote {npz} and " in p.stdout  # says where


def test_sample_cli_out_dir_and_no_silent_overwrite(tiny_run, tmp_path):
    import sample
    out = str(tmp_path / "elsewhere" / "samples")
    base = ["--run", tiny_run, "--n", "2", "--device", "cpu", "--out", out]
    sample.main(base)
    npz = os.path.join(out, "samples_none.npz")
    first = np.load(npz)["images"]
    assert not os.path.exists(os.path.join(tiny_run, "samples_none.npz"))
    p = run_cli("sample.py", *base, "--seed", "1")
    assert p.returncode == 2
    assert_one_line_error(p, npz, "--tag NAME", "--overwrite")
    assert (np.load(npz)["images"] == first).all()  # untouched
    sample.main(base + ["--seed", "1", "--tag", "seed1"])
    assert os.path.exists(os.path.join(out, "samples_seed1.npz")) and os.path.exists(npz)
    sample.main(base + ["--seed", "1", "--overwrite"])
    assert (np.load(npz)["images"] == np.load(os.path.join(out, "samples_seed1.npz"))["images"]).all()


def test_sample_cli_guidance_only_flags_are_not_ignored(tiny_run):
    import sample
    assert_one_line_error(run_cli("sample.py", "--run", tiny_run, "--lambdas", "30,30", "--n", "2"),
                          "--lambdas only applies to guided sampling", "--guidance multi")
    for flags, words in [(["--scale", "10"], "--scale only applies to guided"),
                         (["--target", "1"], "--target only applies to guided"),
                         (["--classifier", "classifier_sn", "--scale", "5"],
                          "--scale --classifier only apply to"),
                         (["--guidance", "none", "--scale", "30"], "--scale only applies"),  # typed = meant
                         (["--guidance", "single", "--lambdas", "1,2"], "--lambdas is for --guidance multi"),
                         (["--guidance", "multi", "--target", "1"], "--target is for --guidance single"),
                         (["--guidance", "multi", "--lambdas", "1,2", "--scale", "3"], "not both"),
                         (["--guidance", "mutli"], "unknown --guidance")]:
        with pytest.raises(UserError, match=words):
            sample.main(["--run", tiny_run, "--n", "2", "--device", "cpu"] + flags)


def test_sample_cli_wrong_lambda_length(tiny_run):
    assert_one_line_error(run_cli("sample.py", "--run", tiny_run, "--guidance", "multi",
                                  "--lambdas", "30,30,30", "--n", "2"), "--lambdas", "2 classes")


def test_sample_cli_missing_checkpoint(tmp_path):
    assert_one_line_error(run_cli("sample.py", "--run", str(tmp_path)), "no ddpm checkpoint")
    assert_one_line_error(run_cli("sample.py", "--run", str(tmp_path / "nope")), "does not exist")


def test_sample_cli_classifier_for_other_image_size(tiny_run, tmp_path):
    run, other = str(tmp_path / "mixed"), str(tmp_path / "other")
    os.makedirs(run)
    shutil.copy(os.path.join(tiny_run, "ddpm.pt"), run)
    # train.py refuses to mix image sizes in one run, so the foreign classifier is made elsewhere.
    train.main(["--model", "classifier", "--out", other, "--clf-steps", "2", "--device", "cpu"]
               + TINY + ["--image-size", "32"])
    shutil.copy(os.path.join(other, "classifier.pt"), run)
    assert_one_line_error(run_cli("sample.py", "--run", run, "--guidance", "multi", "--n", "2"),
                          "32x32", "16x16")


def test_sample_cli_bad_steps_and_target(tiny_run):
    assert_one_line_error(run_cli("sample.py", "--run", tiny_run, "--steps", "500", "--n", "2"),
                          "--steps 500", "2..50")
    assert_one_line_error(run_cli("sample.py", "--run", tiny_run, "--guidance", "single", "--target", "7",
                                  "--n", "2"), "--target 7")


# ----- anti-aliased downsampling (issue: the period-4 comb of guided histograms) ------------------

def test_antialiased_downsample_removes_the_nyquist_column_pattern():
    """An alternating-column image (-1, +1, -1, ...) is the frequency a stride-2 sample aliases
    to a constant. With a centre-tap conv, the plain Downsample returns that constant (-1
    everywhere); the blurred one returns 0 inside the image (the [1, 2, 1] / 4 filter has a
    zero at the Nyquist frequency). A constant image keeps its value (gain 1)."""
    from unet import Downsample
    alt = torch.tensor([(-1.0) ** (x + 1) for x in range(8)]).expand(1, 2, 8, 8).contiguous()
    outs = {}
    for aa in (False, True):
        d = Downsample(2, antialias=aa)
        with torch.no_grad():
            d.conv.weight.zero_()
            d.conv.bias.zero_()
            d.conv.weight[[0, 1], [0, 1], 1, 1] = 1.0          # output = input at the sampled pixel
        outs[aa] = d(alt)
        assert outs[aa].shape == (1, 2, 4, 4)
        assert torch.allclose(d(torch.full((1, 2, 8, 8), 0.7)), torch.full((1, 2, 4, 4), 0.7))
    assert torch.allclose(outs[False], torch.full((1, 2, 4, 4), -1.0))
    assert outs[True][..., 1:].abs().max() < 1e-6 and outs[True][..., 0].abs().max() > 0.1  # edge


def test_antialiased_classifier_has_the_same_parameters_and_works_with_spectral_norm():
    plain = NoisyClassifier(16, 1, 2, 8, (1, 2, 2), 1, (8,))
    aa = NoisyClassifier(16, 1, 2, 8, (1, 2, 2), 1, (8,), antialias=True)
    assert plain.state_dict().keys() == aa.state_dict().keys()   # the blur is a constant
    aa.load_state_dict(plain.state_dict())
    x, t = torch.randn(3, 1, 16, 16), torch.tensor([0, 5, 9])
    assert aa(x, t).shape == (3, 2) and not torch.allclose(aa(x, t), plain(x, t))
    sn = NoisyClassifier(16, 1, 2, 8, (1, 2, 2), 1, (8,), spectral_norm_scale=2.0, antialias=True)
    assert torch.isfinite(sn(x, t)).all() and all("blur" not in n for n, _ in spectral_layers(sn))
    import config as C
    stored = C.to_dict(C.make_config("circles", "cpu"))
    del stored["classifier"]["clf_antialias"]   # a checkpoint written by other code: no silent default
    with pytest.raises(UserError, match="classifier.clf_antialias"):
        C.from_dict(stored)

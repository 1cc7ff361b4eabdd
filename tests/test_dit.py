"""The DiT backbone (App. J, dit.py): shapes, adaLN-Zero init, labels, learning, config, CLI."""
import copy
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

import config as C
import train
from checkpoint import load_checkpoint
from conftest import one_line_error
from diffusion import GaussianDiffusion, cosine_betas
from dit import DiT, sincos_2d
from models import build_model
from toy_circles import CirclesData
from unet import UNet

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY_DIT = ["--arch", "dit", "--image-size", "16", "--patch-size", "4", "--dit-width", "32",
            "--dit-depth", "2", "--dit-heads", "2", "--timesteps", "50", "--sample-steps", "10",
            "--batch-size", "16", "--warmup-steps", "5", "--save-every", "10"]


def tiny(out_channels=None, num_classes=0, seed=0, randomise=True):
    """A 16 px DiT; ``randomise`` replaces the zero-initialised layers' weights (which would hide
    any error by making the output 0) with small random ones."""
    torch.manual_seed(seed)
    m = DiT(16, 3, patch_size=4, width=32, depth=2, heads=2, out_channels=out_channels,
            num_classes=num_classes)
    if randomise:
        for p in m.parameters():
            p.data.normal_(0, 0.1)
    return m


def test_output_shape_for_c_and_2c_channels():
    x, t = torch.randn(3, 3, 16, 16), torch.tensor([0, 10, 999])
    assert tiny()(x, t).shape == (3, 3, 16, 16)
    assert tiny(out_channels=6)(x, t).shape == (3, 6, 16, 16)   # learned variance: mean + v


def test_adaln_zero_makes_every_block_the_identity():
    m = tiny(randomise=False)
    x, t = torch.randn(2, 3, 16, 16), torch.tensor([3, 700])
    assert torch.count_nonzero(m(x, t)) == 0          # zero-initialised final linear
    h, c = torch.randn(2, 16, 32), torch.randn(2, 32)
    for block in m.blocks:
        assert torch.equal(block(h, c), h)            # both gates are exactly 0
    # ... which is an initialisation, not a dead network: the gates open as soon as they move.
    torch.nn.init.normal_(m.blocks[0].ada[-1].weight, std=0.1)
    assert not torch.allclose(m.blocks[0](h, c), h)
    # Only the adaLN/output layers start at zero; the rest is randomly initialised.
    assert m.blocks[0].attn.qkv.weight.abs().sum() > 0 and m.patchify.weight.abs().sum() > 0


def test_out_channels_split_mean_and_variance_halves_in_unpatchify():
    """Unpatchify puts token (i, j)'s p x p x C_out values back at rows i*p.., columns j*p..:
    a final linear that writes one constant per output channel gives exactly that image."""
    m = tiny(out_channels=6)
    lin = m.final.linear
    with torch.no_grad():
        lin.weight.zero_()
        # Output features are ordered (row in patch, column in patch, channel).
        lin.bias.copy_(torch.arange(6.0).repeat(16))
    out = m(torch.randn(1, 3, 16, 16), torch.tensor([5]))
    assert torch.equal(out[0], torch.arange(6.0)[:, None, None].expand(6, 16, 16))


def test_unpatchify_inverts_the_patchify_token_layout():
    """With a patchify conv that copies its p x p x C pixels into the token's features in (row,
    column, channel) order, unpatchify(tokens(x)) is exactly x: token positions and pixel order
    agree between the two ends of the network."""
    p, c = 4, 3
    m = DiT(16, c, patch_size=p, width=p * p * c, depth=1, heads=2)
    with torch.no_grad():
        eye = torch.eye(p * p * c).reshape(p * p * c, p, p, c).permute(0, 3, 1, 2)
        m.patchify.weight.copy_(eye)
        m.patchify.bias.zero_()
    x = torch.randn(2, c, 16, 16)
    tok = m.tokens(x)
    assert tok.shape == (2, 16, 48)
    assert torch.equal(tok[0, 1, :3], x[0, :, 0, 4])   # token (0, 1) starts at row 0, column 4
    assert torch.equal(m.unpatchify(tok), x)
    assert torch.equal(m.unpatchify(m.tokens(x.contiguous(memory_format=torch.channels_last))), x)


def test_position_embedding_is_2d_sincos():
    pe = sincos_2d(4, 8)                               # 16 tokens, row-major
    assert pe.shape == (16, 8)
    # Token 0 = (row 0, column 0): cos 0 = 1, sin 0 = 0 in both halves.
    assert torch.equal(pe[0], torch.tensor([1.0, 1, 0, 0, 1, 1, 0, 0]))
    # Token 1 = (row 0, column 1): same row half as token 0, column half at position 1.
    assert torch.equal(pe[1, :4], pe[0, :4]) and pe[1, 6] == pytest.approx(np.sin(1.0))
    assert torch.equal(pe[4, 4:], pe[0, 4:]) and pe[4, 2] == pytest.approx(np.sin(1.0))
    assert len({tuple(r.tolist()) for r in pe}) == 16  # every token has its own position


def test_null_label_is_row_num_classes_and_y_none():
    m = tiny(num_classes=2)
    assert m.label.weight.shape == (3, 32)             # num_classes + 1 rows
    x, t = torch.randn(4, 3, 16, 16), torch.tensor([1, 2, 3, 4])
    null = m(x, t, torch.full((4,), 2))
    assert torch.equal(m(x, t), null)                  # y=None is the null label, index num_classes
    assert not torch.allclose(m(x, t, torch.zeros(4, dtype=torch.long)), null)
    with pytest.raises(ValueError, match="num_classes=0"):
        tiny()(x, t, torch.zeros(4, dtype=torch.long))


def test_a_few_steps_lower_the_diffusion_loss():
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    x0, _ = CirclesData(16, 0.2).batch(32, g)
    d = GaussianDiffusion(cosine_betas(50), prediction="v")
    t = torch.randint(0, 50, (32,), generator=g)
    noise = torch.randn(x0.shape, generator=g)
    m = DiT(16, 1, patch_size=2, width=32, depth=2, heads=2)
    opt = torch.optim.AdamW(m.parameters(), lr=2e-3)
    losses = []
    for _ in range(15):
        loss = d.training_loss(m, x0, t, noise)
        opt.zero_grad(), loss.backward(), opt.step()
        losses.append(loss.item())
    # Step 0: the output is exactly 0, so the loss is the mean square of the v target.
    assert losses[0] == pytest.approx((d.target(x0, noise, t) ** 2).mean().item(), rel=1e-6)
    assert losses[-1] < 0.7 * losses[0]


def test_build_model_picks_the_backbone_from_the_config():
    cfg = C.make_config("circles", "cpu", arch="dit", patch_size=4, dit_width=48, dit_depth=3, dit_heads=3)
    m = build_model(cfg)
    assert isinstance(m, DiT) and len(m.blocks) == 3 and m.blocks[0].attn.heads == 3
    assert m.patchify.weight.shape == (48, 1, 4, 4) and m.out_channels == 1
    cfg["diffusion"].variance = "learned"              # output_channels: 2C
    assert build_model(cfg).out_channels == 2
    assert isinstance(build_model(C.make_config("circles", "cpu")), UNet)
    # A stored config without the backbone fields is refused, not guessed.
    old = C.to_dict(C.make_config("circles", "cpu"))
    for k in ("arch", "patch_size", "dit_width", "dit_depth", "dit_heads"):
        del old["unet"][k]
    one_line_error(lambda: C.from_dict(old), "unet.arch", "(nor 4 more)", "other code")
    with pytest.raises(ValueError, match="unknown --arch 'vit'"):
        build_model(C.make_config("circles", "cpu", arch="vit"))


def test_samples_in_a_batch_never_interact():
    m = tiny().eval()
    x, t = torch.randn(4, 3, 16, 16), torch.tensor([0, 100, 500, 999])
    with torch.no_grad():
        full = m(x, t)
        alone = torch.cat([m(x[i:i + 1], t[i:i + 1]) for i in range(4)])
        x2 = x.clone()
        x2[1:] = torch.randn(3, 3, 16, 16)             # change every other sample
        other = m(x2, t)
    assert torch.allclose(full, alone, atol=1e-5)
    assert torch.allclose(other[0], full[0], atol=1e-6)
    assert not torch.allclose(other[1], full[1])


def test_channels_last_inference_layout_gives_the_same_output():
    from sample import inference_layout
    m = tiny().eval()
    fast = inference_layout(copy.deepcopy(m), "cpu")
    assert fast.patchify.weight.is_contiguous(memory_format=torch.channels_last)
    x, t = torch.randn(4, 3, 16, 16), torch.tensor([0, 100, 500, 999])
    with torch.no_grad():
        ref = m(x, t)
        got = fast(x.contiguous(memory_format=torch.channels_last), t)
    assert torch.allclose(got, ref, atol=1e-6) and ref.abs().max() > 0.1


def test_bad_arch_and_patch_size_are_one_line(tmp_path):
    base = ["--model", "ddpm", "--device", "cpu", "--no-grid", "--steps", "2"]
    one_line_error(lambda: train.main(base + ["--out", str(tmp_path / "a"), "--arch", "vit"]),
                   "unknown --arch 'vit'", "unet, dit")
    assert not os.path.exists(tmp_path / "a")          # refused before any folder is made
    one_line_error(lambda: train.main(base + ["--out", str(tmp_path / "b"), "--arch", "dit",
                                              "--image-size", "18", "--patch-size", "4"]),
                   "not divisible", "--patch-size")
    one_line_error(lambda: train.main(base + ["--out", str(tmp_path / "c"), "--arch", "dit",
                                              "--dit-width", "30", "--dit-heads", "4"]),
                   "--dit-heads")
    # 30 px is fine for a patch-2 DiT but not for the classifiers trained next: refused up front.
    one_line_error(lambda: train.main(["--model", "all", "--device", "cpu", "--steps", "2",
                                       "--out", str(tmp_path / "f"), "--arch", "dit", "--image-size", "30"]),
                   "image size 30", "for the classifier", "--clf-channel-mult")
    assert not os.path.exists(tmp_path / "f" / "ddpm.pt")
    # A knob of the other backbone would be silently ignored: refused instead.
    one_line_error(lambda: train.main(base + ["--out", str(tmp_path / "d"), "--arch", "dit",
                                              "--model-channels", "32"]),
                   "--model-channels", "unet option", "--arch is dit")
    one_line_error(lambda: train.main(base + ["--out", str(tmp_path / "e"), "--dit-depth", "3"]),
                   "--dit-depth", "dit option", "--arch dit")


def test_cli_unknown_arch_prints_one_line(tmp_path):
    p = subprocess.run([sys.executable, "train.py", "--arch", "vit", "--out", str(tmp_path / "x")],
                       cwd=ROOT, capture_output=True, text=True, timeout=120)
    err = p.stderr.strip()
    assert p.returncode == 2 and len(err.splitlines()) == 1 and "unknown --arch 'vit'" in err, err


def test_dit_run_trains_resumes_and_samples(tmp_path):
    """End to end: train.py --arch dit stores the DiT config; sample.py rebuilds it from there."""
    import sample
    out = str(tmp_path / "dit")
    train.main(["--model", "ddpm", "--out", out, "--device", "cpu", "--no-grid", "--steps", "10",
                "--stop-at", "5"] + TINY_DIT)
    train.main(["--model", "ddpm", "--out", out, "--resume", "--steps", "10", "--no-grid"])
    ck = load_checkpoint(out, "ddpm")
    cfg = C.from_dict(ck["config"])
    assert ck["step"] == 10 and cfg["unet"].arch == "dit" and cfg["unet"].patch_size == 4
    model, _ = sample.load_ddpm(out, "cpu")
    assert isinstance(model, DiT) and model.final.linear.weight.abs().sum() > 0   # trained
    sample.main(["--run", out, "--n", "4", "--batch-size", "4", "--device", "cpu"])
    imgs = np.load(os.path.join(out, "samples_none.npz"))["images"]
    assert imgs.shape == (4, 16, 16, 1) and imgs.dtype == np.uint8

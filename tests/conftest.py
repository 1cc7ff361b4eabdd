"""Shared fixtures: a tiny trained run (16x16 circles, T=50) reused by the end-to-end tests."""
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
torch.set_num_threads(min(2, os.cpu_count() or 1))

# Small enough to train in seconds on 2 cores, large enough to exercise every block type.
TINY = ["--image-size", "16", "--model-channels", "8", "--channel-mult", "1,2",
        "--attention-resolutions", "8", "--num-head-channels", "8", "--timesteps", "50",
        "--sample-steps", "10", "--clf-channels", "8", "--clf-channel-mult", "1,2",
        "--clf-attention-resolutions", "8", "--save-every", "10", "--batch-size", "16",
        "--clf-batch-size", "16", "--warmup-steps", "5"]


@pytest.fixture
def one_thread():
    """Tensors are tiny in the math tests: one intra-op thread is ~50x faster than two on a busy
    2-core box (use with ``pytestmark = pytest.mark.usefixtures("one_thread")``)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def one_line_error(fn, *words):
    """Bad input must end in one UserError line that names ``words`` (the problem and the fix)."""
    from checkpoint import UserError
    with pytest.raises(UserError) as e:
        fn()
    msg = str(e.value)
    assert "\n" not in msg, msg
    for w in words:
        assert w in msg, (w, msg)
    return msg


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory):
    import train
    out = str(tmp_path_factory.mktemp("run") / "circles")
    train.main(["--dataset", "circles", "--model", "all", "--out", out, "--steps", "20",
                "--clf-steps", "20", "--device", "cpu", "--no-grid"] + TINY)
    return out

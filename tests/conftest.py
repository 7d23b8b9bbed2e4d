"""Shared fixtures: tiny checkpoints of every architecture, converted once per test session."""

from __future__ import annotations

import pytest
import torch

import fate
from tests.tiny_models import ARCHS, make_checkpoint

@pytest.fixture(scope="session", autouse=True)
def _private_cache_dir(tmp_path_factory):
    """Timing profiles go to a temporary cache, not the user's ~/.cache/fate."""
    import os

    old = os.environ.get("FATE_CACHE_DIR")
    os.environ["FATE_CACHE_DIR"] = str(tmp_path_factory.mktemp("fate-cache"))
    yield
    if old is None:
        os.environ.pop("FATE_CACHE_DIR", None)
    else:
        os.environ["FATE_CACHE_DIR"] = old


# the devices a test parametrized over them runs on: cuda only where torch sees a GPU (never in CI)
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(),
                                                                reason="no CUDA GPU"))]


CALIB_TEXT = ("The quick brown fox jumps over the lazy dog. Experts are routed by a gate; "
              "cross-layer prediction reads the next router early. 1 2 3 4 5. def f(x): return x * 2\n") * 8
CALIB_TOKENS = 200


@pytest.fixture(scope="session")
def calib_file(tmp_path_factory):
    p = tmp_path_factory.mktemp("calib") / "calib.txt"
    p.write_text(CALIB_TEXT)
    return p


@pytest.fixture(scope="session")
def converted(tmp_path_factory, calib_file):
    """arch → (checkpoint dir, gguf bundle path) with f16, q4 and q2 experts and calibration."""
    out = {}
    for arch in ARCHS:
        d = tmp_path_factory.mktemp(arch)
        ckpt = d / "ckpt"
        make_checkpoint(arch, ckpt, shards=2 if arch == "mixtral" else 1)
        bundle = d / "model.gguf"
        fate.convert(ckpt, bundle, experts="f16,q4,q2", calib=str(calib_file), calib_tokens=CALIB_TOKENS,
                     progress=False)
        out[arch] = (ckpt, bundle)
    return out




def assert_one_line_error(res, *needles):
    """A click result that is one ``error: ...`` line (containing each needle) with exit status 2."""
    assert res.exit_code == 2, res.output
    lines = [line for line in res.output.strip().splitlines() if line]
    assert len(lines) == 1 and lines[0].startswith("error: "), res.output
    for n in needles:
        assert n in lines[0], lines[0]

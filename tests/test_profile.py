"""fate.runtime.experts.profile: the timing profile's arithmetic, its cache, and a real measurement."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil

import pytest
import torch

from fate.formats import constants as C
from fate.formats.bundle import Bundle
from fate.model.config import ModelConfig
from fate.model.experts import DenseExperts
from fate.runtime.experts import profile as P
from fate.runtime.experts.store import ExpertStore
from fate.runtime.weights import BundleWeights


def _prof(**changes) -> P.TimingProfile:
    p = P.TimingProfile(layer_decode_seconds=0.010, expert_copy_seconds={"q4": 0.001, "q2": 0.0005},
                        expert_bytes={"q4": 1_000_000, "q2": 600_000}, device="cpu", measured_at="2026-01-01T00:00:00")
    return dataclasses.replace(p, **changes)


def test_transfer_seconds_is_the_slower_of_the_copy_and_the_link():
    p = _prof()
    assert p.transfer_seconds("q4") == 0.001 and p.transfer_seconds("q4", None) == 0.001
    assert p.transfer_seconds("q4", 2e9) == 0.001  # 0.5 ms on the link: the measured copy is slower
    assert p.transfer_seconds("q4", 1e8) == pytest.approx(0.010)  # 1 MB at 100 MB/s
    assert p.transfer_seconds("q2", 1e8) == pytest.approx(0.006)
    with pytest.raises(KeyError):
        p.transfer_seconds("f16")


def test_copies_in_window():
    p = _prof()
    assert p.copies_in_window("q4", None) == 10  # 10 ms of compute / 1 ms per copy
    assert p.copies_in_window("q2", None) == 20
    assert p.copies_in_window("q4", 4e8) == 4  # 2.5 ms per copy
    assert p.copies_in_window("q4", 1e6) == 1  # slower than a layer: still one
    assert _prof(expert_copy_seconds={"q4": 0.0}).copies_in_window("q4", None) == int(0.010 / 1e-9)


def test_extra_candidates():
    p = _prof()
    assert p.extra_candidates(2, 8, "q4", None) == 6  # 10 fit, capped at the 6 experts beyond top-2
    assert p.extra_candidates(2, 64, "q4", None) == 8  # 10 fit, 2 of them are the top-k
    assert p.extra_candidates(4, 64, "q2", None) == 16
    assert p.extra_candidates(4, 64, "q4", 4e8) == 0  # 4 fit: the top-k only
    assert p.extra_candidates(4, 64, "q4", 1e6) == 0
    assert p.extra_candidates(8, 8, "q2", None) == 0  # every expert is in the top-k


def test_describe():
    text = _prof().describe()
    assert text.startswith("profile: layer decode 10.000 ms; expert copy q4 1.000 ms (976.6 KiB), q2 0.500 ms")
    assert text.endswith("[cpu]")


def test_cache_round_trip_under_fate_cache_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("FATE_CACHE_DIR", str(tmp_path / "c"))
    assert P.cache_dir() == tmp_path / "c" / "profiles"
    assert P.load_cached("abc") is None
    p = _prof()
    P.save_cached("abc", p)
    assert sorted(os.listdir(tmp_path / "c" / "profiles")) == ["abc.json"]  # no temporary left behind
    assert json.loads((tmp_path / "c" / "profiles" / "abc.json").read_text())["version"] == P.PROFILE_VERSION
    assert P.load_cached("abc") == p
    P.save_cached("abc", _prof(layer_decode_seconds=0.5))  # replaced whole
    assert P.load_cached("abc").layer_decode_seconds == 0.5
    monkeypatch.delenv("FATE_CACHE_DIR")
    assert P.cache_dir() == P.Path(os.path.expanduser("~")) / ".cache" / "fate" / "profiles"


@pytest.mark.parametrize("text", [
    "{not json", "[]", "null", '{"version": 2}', "",
    json.dumps({**dataclasses.asdict(_prof()), "bogus": 1}),
    json.dumps({**dataclasses.asdict(_prof()), "version": P.PROFILE_VERSION - 1}),
    json.dumps({**dataclasses.asdict(_prof()), "version": P.PROFILE_VERSION + 1}),
])
def test_a_profile_of_another_version_or_a_corrupt_file_is_ignored(tmp_path, monkeypatch, text):
    monkeypatch.setenv("FATE_CACHE_DIR", str(tmp_path))
    (tmp_path / "profiles").mkdir()
    (tmp_path / "profiles" / "k.json").write_text(text)
    assert P.load_cached("k") is None


def test_an_unwritable_cache_is_no_error(tmp_path, monkeypatch):
    (tmp_path / "file").write_text("")
    monkeypatch.setenv("FATE_CACHE_DIR", str(tmp_path / "file"))  # a file where the directory would go
    P.save_cached("k", _prof())
    assert P.load_cached("k") is None


def test_profile_key_names_the_bundle_the_machine_and_the_precision(converted, tmp_path):
    path = tmp_path / "m.gguf"
    shutil.copy(converted["mixtral"][1], path)
    cpu = torch.device("cpu")
    k = P.profile_key(path, cpu, torch.float32, "q4")
    assert k == P.profile_key(path, cpu, torch.float32, "q4") and len(k) == 20
    others = {P.profile_key(path, cpu, torch.float16, "q4"), P.profile_key(path, cpu, torch.float32, "q2"),
              P.profile_key(path, torch.device("meta"), torch.float32, "q4"),
              P.profile_key(path, cpu, torch.float32, "q4", "torch")}  # --kernels times differently
    assert k not in others and len(others) == 4
    st = path.stat()
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))  # a re-converted file is another bundle
    assert P.profile_key(path, cpu, torch.float32, "q4") != k


@pytest.fixture(scope="module")
def parts(converted):
    b = Bundle(converted["qwen2_moe"][1])
    cfg = ModelConfig.from_json(b.require(C.K_MODEL_CONFIG))
    return cfg, BundleWeights(b, torch.float32, torch.device("cpu")), ExpertStore(b, cfg)


@pytest.mark.parametrize("precision", ["q4", "q2"])
def test_measure_times_the_model_and_one_copy_per_stored_precision(parts, precision):
    cfg, weights, store = parts
    p = P.measure(cfg, weights, store, torch.device("cpu"), torch.float32, precision, steps=4)
    assert 0 < p.layer_decode_seconds < 1
    assert set(p.expert_copy_seconds) == set(store.precisions) == {"f16", "q4", "q2"}
    assert all(0 < s < 1 for s in p.expert_copy_seconds.values())
    assert p.expert_bytes == {q: store.blob_bytes(q) for q in store.precisions}
    assert p.device == "cpu" and p.version == P.PROFILE_VERSION
    assert p.copies_in_window(precision, None) >= 1


def test_the_profiled_executor_computes_one_real_expert_for_every_route(parts):
    """What measure() times is real work: every routed expert computed (by the offloading executor's
    primitive) from the one blob it holds, combined as the model combines experts."""
    cfg, weights, store = parts
    layer = cfg.moe_layer_ids[0]
    one = P._OneBlob(store.blob(layer, 0, "q2").clone(), store.layouts["q2"], torch.float32, torch.device("cpu"),
                     kernels="torch")
    ref = DenseExperts(lambda i, e: store.dense(layer, 0, "q2"))
    g = torch.Generator().manual_seed(0)
    x = torch.randn(5, cfg.hidden_size, generator=g)
    ids = torch.randint(0, cfg.n_experts, (5, cfg.top_k), generator=g)
    w = torch.rand(5, cfg.top_k, generator=g)
    assert torch.equal(one.moe(layer, x, ids, w), ref.moe(layer, x, ids, w))

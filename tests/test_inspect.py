"""fate-inspect on the tiny converted bundles: the report agrees with the bundle's own tensors and
metadata, --verify finds exactly the corrupted blob, --plot draws or says how to get matplotlib."""

from __future__ import annotations

import json
import math
import shutil
import sys

import pytest
from click.testing import CliRunner

import fate
from fate.formats import constants as C
from fate.formats.bundle import Bundle
from fate.model.config import ModelConfig
from fate.cli import inspect as inspect_cli
from fate.tools import inspector as I
from tests.tiny_models import ARCHS, make_checkpoint

TOP_KEYS = {"path", "container", "file_bytes", "format_version", "architecture", "params", "bytes", "non_expert_storage", "precisions",
            "quant", "tokenizer", "chat_template", "calibration", "provenance", "top_n", "layers"}
LAYER_KEYS = {"layer", "kind", "popularity", "assignments", "top_share", "max_share", "unused_experts", "cosine",
              "recall"}


def _invoke(*args):
    return CliRunner().invoke(inspect_cli.main, [str(a) for a in args])


def _one_line_error(res, code=2):
    assert res.exit_code == code, res.output
    lines = [ln for ln in res.output.strip().splitlines() if ln]
    assert len(lines) == 1 and lines[0].startswith("error: "), res.output
    return lines[0]


def _nan_to_none(v):
    return None if math.isnan(v) else v


@pytest.mark.parametrize("arch", ARCHS)
def test_json_report_matches_bundle_tensors(converted, arch):
    path = converted[arch][1]
    res = _invoke(path, "--json", "--top", 3)
    assert res.exit_code == 0, res.output
    r = json.loads(res.stdout)
    assert set(r) == TOP_KEYS
    for key in TOP_KEYS | LAYER_KEYS:  # every key is documented in the module docstring
        assert f"``{key}``" in I.__doc__, key

    b = Bundle(path)
    cfg = ModelConfig.from_json(b.metadata[C.K_MODEL_CONFIG])
    assert r["container"] == "gguf" and r["file_bytes"] == path.stat().st_size and r["format_version"] == 1
    a = r["architecture"]
    assert a["model_type"] == arch and a["arch"] == C.LLAMA_CPP_ARCH[arch]
    assert (a["n_layers"], a["n_experts"], a["top_k"], a["hidden_size"]) == (cfg.n_layers, cfg.n_experts,
                                                                              cfg.top_k, cfg.hidden_size)
    assert a["moe_layers"] == cfg.moe_layer_ids
    assert (a["attention"], a["router"], a["layer_windows"], a["attn_sinks"], a["expert_act"]) == \
        (cfg.attention, cfg.router, cfg.layer_windows, cfg.attn_sinks, cfg.expert_act)
    assert r["precisions"] == ["f16", "q4", "q2"]
    for p in r["precisions"]:
        q = r["quant"]["by_precision"][p]
        assert q["bits"] == {"f16": 16, "q4": 4, "q2": 2}[p]
        assert q["blob_bytes"] == b.metadata[C.K_PRECISION_BLOB_SIZE.format(p=p)]
        assert q["blob_stride"] == b.metadata[C.K_PRECISION_BLOB_STRIDE.format(p=p)]
        assert q["group_size_down"] == b.metadata[C.K_PRECISION_GROUP_DOWN.format(p=p)]
        want = sum(b.tensors[C.T_EXPERTS.format(i=i, p=p)].nbytes for i in cfg.moe_layer_ids)
        assert r["bytes"]["experts_by_precision"][p] == want == len(cfg.moe_layer_ids) * cfg.n_experts * q["blob_stride"]
    assert r["quant"]["alignment"] == b.metadata[C.K_EXPERT_ALIGNMENT]
    assert r["params"]["routed_experts"] == 3 * cfg.hidden_size * cfg.expert_ffn * cfg.n_experts * len(cfg.moe_layer_ids)
    assert r["params"]["total"] == r["params"]["non_expert"] + r["params"]["routed_experts"] > r["params"]["active"]
    assert r["bytes"]["other"] >= 0

    tok = r["tokenizer"]
    assert tok["error"] is None and tok["vocab_size"] == 384
    assert {t["content"]: t["id"] for t in tok["special_tokens"]} == {"<|endoftext|>": 0, "<|im_start|>": 1,
                                                                      "<|im_end|>": 2}
    assert tok["eos_token"] == "<|im_end|>" and tok["eos_token_ids"][0] == 2
    assert r["chat_template"]["chars"] == len(b.metadata[C.K_CHAT_TEMPLATE])
    assert r["chat_template"]["head"][0] == b.metadata[C.K_CHAT_TEMPLATE].splitlines()[0]
    assert r["calibration"] == {"source": "calib.txt", "tokens": 200, "sha256": b.metadata[C.K_CALIB_SHA256],
                                "recall_extra": [0, 1, 2, 4], "predictor": "fitted"}
    for k in (C.K_HF_MODEL_TYPE, C.K_SOURCE_NAME, C.K_SOURCE_CONFIG_SHA256, C.K_CREATED, C.K_FATE_VERSION,
              C.K_HQQ_VERSION):
        assert r["provenance"][k] == b.metadata[k]

    pop = b.tensor(C.T_CALIB_POPULARITY)
    cos = b.tensor(C.T_CALIB_COSINE)
    rec = b.tensor(C.T_CALIB_RECALL)
    assert r["top_n"] == 3 and len(r["layers"]) == cfg.n_layers
    for i, row in enumerate(r["layers"]):
        assert set(row) == LAYER_KEYS and row["layer"] == i
        if not cfg.moe_layers[i]:
            assert row["kind"] == "dense" and row["popularity"] is None and row["cosine"] is None
            assert all(v is None for v in row["recall"].values())
            continue
        counts = pop[i].tolist()
        assert row["kind"] == "moe" and row["popularity"] == counts
        assert row["assignments"] == sum(counts) == 200 * cfg.top_k  # calibration tokens x top-k
        assert row["unused_experts"] == sum(1 for c in counts if c == 0)
        assert row["top_share"] == pytest.approx(sum(sorted(counts)[-3:]) / sum(counts))
        assert row["max_share"] == pytest.approx(max(counts) / sum(counts))
        c = float(cos[i])
        assert row["cosine"] is None if math.isnan(c) else row["cosine"] == pytest.approx(c)
        assert list(row["recall"]) == ["k", "k+1", "k+2", "k+4"]
        for j, v in enumerate(row["recall"].values()):
            want = _nan_to_none(float(rec[i, j]))
            assert (v is None and want is None) or v == pytest.approx(want)
    # layer 0 is predicted from the token embedding when it has a router; a dense layer 0 has no prediction
    assert (r["layers"][0]["cosine"] is None) == (not cfg.moe_layers[0])
    assert r["layers"][cfg.moe_layer_ids[-1]]["recall"]["k"] is not None
    b.close()


def test_text_report(converted):
    path = converted["deepseek"][1]
    res = _invoke(path)
    assert res.exit_code == 0, res.output
    out = res.stdout
    for word in ("architecture  deepseek", "layers 3: 2 MoE, 1 dense (0)", "q4            4     64",
                 "tokenizer     vocab 384", "<|im_end|>=2", "chat template", "calibration   source calib.txt, 200 tokens",
                 "prediction by maps fitted on it",
                 "fate.created = ", "fate.fate_version = ", "fate.quant.hqq_version = "):
        assert word in out, word
    table = out[out.index("  layer  kind"):].splitlines()
    header, rows = table[0].split(), [ln.split() for ln in table[1:]]
    assert header[-4:] == ["r@k", "r@k+1", "r@k+2", "r@k+4"]
    assert [row[:2] for row in rows] == [["0", "dense"], ["1", "moe"], ["2", "moe"]]
    assert rows[0][2:] == ["-"] * 9
    rec = Bundle(path).tensor(C.T_CALIB_RECALL)
    assert [float(v) for v in rows[2][-4:]] == pytest.approx(rec[2].tolist(), abs=5e-4)
    assert rows[1][2] == "400"


def test_text_report_of_the_new_families(converted, tmp_path):
    out = _invoke(converted["gpt_oss"][1]).stdout
    assert "attention gqa; rope half on 16 of 16 dims; sliding window 8 on layers 0,2; attention sinks" in out
    assert "router softmax_topk; experts clamped SwiGLU with biases" in out
    assert "rope theta 150000, scaling type=yarn, attention_factor=1.1386" in out and "factor=4.0" in out
    out = _invoke(converted["deepseek_v3"][1]).stdout
    assert "attention mla (kv latent 32, q rank 24, v head 16); rope interleave on 8 of 24 dims" in out
    assert "router sigmoid_group (4 groups, 2 chosen), correction bias, weights x2.5; experts SwiGLU" in out
    # a group size that does not divide the expert FFN: the down matrices' own group size is shown
    make_checkpoint("qwen3_moe", tmp_path / "ckpt", n_layers=2, moe_intermediate_size=32)
    fate.convert(tmp_path / "ckpt", tmp_path / "m.gguf", no_calib=True, progress=False)
    out = _invoke(tmp_path / "m.gguf").stdout
    assert "q4            4  64/32" in out and "q2            2     32" in out


def test_verify_good_bundle(converted):
    path = converted["qwen3_moe"][1]
    assert I.verify_bundle(path) == []
    res = _invoke(path, "--verify")
    assert res.exit_code == 0, res.output
    assert "verify        72 expert blobs" in res.stdout and "all good" in res.stdout  # 3 layers x 3 precisions x 8
    res = _invoke(path, "--verify", "--json", "-q")
    assert res.exit_code == 0 and json.loads(res.stdout)["verify"] == {"checked": 72, "bytes": json.loads(
        res.stdout)["verify"]["bytes"], "bad": [], "ok": True}


@pytest.mark.parametrize("container", ["gguf", "safetensors"])
def test_verify_reports_exactly_the_flipped_blob(converted, tmp_path, container):
    arch = "deepseek"
    if container == "gguf":
        src = converted[arch][1]
    else:
        src = tmp_path / "model.safetensors"
        fate.convert(converted[arch][0], src, experts="f16,q4,q2", no_calib=True, progress=False)
    bad_path = tmp_path / f"bad.{container}"
    shutil.copy(src, bad_path)
    layer, precision, expert = 2, "q4", 5
    b = Bundle(bad_path)
    entry = b.tensors[C.T_EXPERTS.format(i=layer, p=precision)]
    stride = entry.shape[1]
    offset = entry.offset + expert * stride + 1000  # inside the blob (q4 blobs here are 6912 bytes)
    assert 1000 < b.metadata[C.K_PRECISION_BLOB_SIZE.format(p=precision)]
    b.close()
    data = bytearray(bad_path.read_bytes())
    data[offset] ^= 0x40
    bad_path.write_bytes(bytes(data))

    bad = I.verify_bundle(bad_path)
    assert [(x["layer"], x["precision"], x["expert"]) for x in bad] == [(layer, precision, expert)]
    assert bad[0]["expected"] != bad[0]["actual"]

    res = _invoke(bad_path, "--verify")
    assert res.exit_code == 1, res.output
    lines = [ln for ln in res.stdout.splitlines() if ln.startswith("bad blob:")]
    assert lines == [f"bad blob: layer {layer}, {precision}, expert {expert} (crc32 stored "
                     f"{bad[0]['expected']:08x}, computed {bad[0]['actual']:08x})"]
    assert "1 bad" in res.stdout
    res = _invoke(bad_path, "--verify", "--json")
    assert res.exit_code == 1
    v = json.loads(res.stdout)["verify"]
    assert v["ok"] is False and [(x["layer"], x["precision"], x["expert"]) for x in v["bad"]] == [(2, "q4", 5)]
    # without --verify, the report itself still works (the damage is only in expert bytes)
    assert _invoke(bad_path).exit_code == 0


def test_bundle_without_calibration(converted, tmp_path):
    ckpt = tmp_path / "ckpt"
    make_checkpoint("mixtral", ckpt, seed=3)
    path = tmp_path / "nocalib.gguf"
    fate.convert(ckpt, path, experts="q4", no_calib=True, progress=False)
    r = I.inspect_bundle(path)
    assert r["calibration"] is None and r["precisions"] == ["q4"]
    for row in r["layers"]:
        assert row["kind"] == "moe" and row["popularity"] is None and row["top_share"] is None
        assert all(v is None for v in row["recall"].values())
    res = _invoke(path)
    assert res.exit_code == 0 and "calibration   none" in res.stdout
    assert res.stdout.strip().splitlines()[-1].split()[2:] == ["-"] * 9
    pytest.importorskip("matplotlib")
    line = _one_line_error(_invoke(path, "--plot", tmp_path / "x.png"))
    assert "no calibration statistics" in line


def test_plot(converted, tmp_path):
    pytest.importorskip("matplotlib")
    out = tmp_path / "layers.png"
    res = _invoke(converted["qwen2_moe"][1], "--plot", out)
    assert res.exit_code == 0, res.output
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and out.stat().st_size > 5000


def test_plot_without_matplotlib(converted, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib now raises ImportError
    line = _one_line_error(_invoke(converted["olmoe"][1], "--plot", tmp_path / "x.png"))
    assert "pip install matplotlib" in line
    assert not (tmp_path / "x.png").exists()


def test_bad_inputs(converted, tmp_path):
    assert "no such file" in _one_line_error(_invoke(tmp_path / "missing.gguf"))
    junk = tmp_path / "junk.gguf"
    junk.write_bytes(b"hello, not a bundle at all")
    assert "not a fate bundle" in _one_line_error(_invoke(junk, "--verify"))
    _one_line_error(_invoke(converted["mixtral"][1], "--top", 0))

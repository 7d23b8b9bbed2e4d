"""fate-convert on tiny random checkpoints of every architecture: blobs, checksums, calibration
statistics against an independent transformers computation, both output formats, and bad inputs."""

from __future__ import annotations

import errno
import json
import os
import zlib
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

import fate
from fate import quant as Q
from fate.model import arch as A
from fate.cli.convert import main as convert_main
from fate.convert.calibrate import RIDGES, folds_of
from fate.runtime.experts.prefetch import prediction_maps
from fate.errors import ConvertError
from fate.formats import constants as C
from fate.formats.bundle import Bundle
from tests.conftest import CALIB_TEXT, CALIB_TOKENS, assert_one_line_error
from tests.tiny_models import ARCHS, load_oracle, make_checkpoint, oracle_prediction_fit

def _hf(ckpt: Path):
    from fate.formats.hf import HFCheckpoint

    c = HFCheckpoint(ckpt)
    return c, A.spec_for(c.config), A.model_config(c.config)


@pytest.mark.parametrize("arch", ARCHS)
def test_experts_blobs_checksums_and_round_trip(converted, arch):
    ckpt_dir, path = converted[arch]
    ckpt, spec, cfg = _hf(ckpt_dir)
    b = Bundle(path)
    align = b.metadata[C.K_EXPERT_ALIGNMENT]
    assert b.metadata[C.K_PRECISIONS] == ["f16", "q4", "q2"]
    for i in range(cfg.n_layers):
        for p in ("f16", "q4", "q2"):
            name = C.T_EXPERTS.format(i=i, p=p)
            if not cfg.moe_layers[i]:
                assert name not in b.tensors
                continue
            entry = b.tensors[name]
            stride = b.metadata[C.K_PRECISION_BLOB_STRIDE.format(p=p)]
            size = b.metadata[C.K_PRECISION_BLOB_SIZE.format(p=p)]
            assert entry.shape == (cfg.n_experts, stride)
            assert entry.offset % align == 0 and stride % align == 0
            crcs = b.tensor(C.T_EXPERTS_CRC.format(i=i, p=p))
            raw = b.tensor(name).view(torch.uint8)
            for e in range(cfg.n_experts):
                assert zlib.crc32(raw[e, :size].numpy().tobytes()) == int(crcs[e])
    # round trip on the first MoE layer: f16 exact, q4/q2 equal to hqq's own dequantization, biases exact
    i = cfg.moe_layer_ids[0]
    kind, _ = A.expert_storage(spec, cfg, i, ckpt.__contains__)
    for e in (0, cfg.n_experts - 1):
        src = A.expert_weights(spec, cfg, i, e, kind, lambda n, j: ckpt.get(n) if j is None else ckpt.get_row(n, j))
        for p in ("f16", "q4", "q2"):
            bits, group = b.metadata[C.K_PRECISION_BITS.format(p=p)], b.metadata[C.K_PRECISION_GROUP.format(p=p)]
            down_group = b.metadata[C.K_PRECISION_GROUP_DOWN.format(p=p)]
            s = Q.QuantSpec(p, bits, group)
            layout = cfg.expert_layout(s, down_group)
            blob = b.expert_blob(i, p, e)
            got = Q.unpack_expert(blob, layout)
            for w, g, m in zip(src, got, layout.matrices):
                if p == "f16":
                    assert torch.equal(g, w.half().float())
                else:
                    torch.testing.assert_close(g, Q.hqq_reference_dequant(w, m.spec), rtol=0, atol=1e-6)
            bias = Q.unpack_bias(blob, layout)
            assert (bias is None) == (len(src) == 3)
            if bias is not None:
                assert torch.equal(bias[0], src[3]) and torch.equal(bias[1], src[4])


@pytest.mark.parametrize("arch", ARCHS)
def test_non_expert_tensors_and_gguf_reader(converted, arch):
    from gguf import GGUFReader

    ckpt_dir, path = converted[arch]
    ckpt, spec, cfg = _hf(ckpt_dir)
    r = GGUFReader(path)
    names = {t.name for t in r.tensors}
    q = "blk.0.attn_q_a.weight" if cfg.q_lora_rank else "blk.0.attn_q.weight"  # DeepSeek-V3: low-rank q
    assert {"token_embd.weight", "output_norm.weight", q, "blk.0.ffn_norm.weight"} <= names
    arch_name = C.LLAMA_CPP_ARCH[arch]
    assert r.fields["general.architecture"].contents() == arch_name
    assert r.fields[f"{arch_name}.block_count"].contents() == cfg.n_layers
    assert r.fields[f"{arch_name}.expert_count"].contents() == cfg.n_experts
    b = Bundle(path)
    for name, (hf_name, shape) in A.non_expert_tensors(spec, cfg).items():
        t = b.tensor(name)
        src = ckpt.get(hf_name)
        want = src.float() if C.keeps_f32(name) else src.half()
        assert t.shape == tuple(shape)
        assert torch.equal(t, want), name
    assert json.loads(b.metadata[C.K_MODEL_CONFIG]) == json.loads(cfg.to_json())
    assert b.metadata[C.K_TOKENIZER_HF_JSON] == (ckpt_dir / "tokenizer.json").read_text()
    assert "<|im_start|>" in b.metadata[C.K_CHAT_TEMPLATE]


def _selection(arch: str, router, x: torch.Tensor, cfg) -> torch.Tensor:
    """What each family's router ranks experts by, from the transformers router module's parameters:
    logits (softmax routers rank alike), gpt-oss's biased logits, DeepSeek-V2's probabilities,
    DeepSeek-V3/GLM's sigmoid + correction bias, the experts of the best groups (by best expert / by the sum
    of the two best) before the others, ERNIE's probabilities + correction bias."""
    w = router.weight.float()
    logits = x.float() @ w.T
    if arch == "gpt_oss":
        return logits + router.bias.float()
    G, per = cfg.n_group, cfg.n_experts // cfg.n_group

    def groups_first(s, group_scores):  # the chosen groups' experts, then the others, each by score
        best = group_scores.topk(cfg.topk_group, dim=-1).indices
        keep = torch.zeros(x.shape[0], G, dtype=torch.bool).scatter_(1, best, True).repeat_interleave(per, dim=1)
        return torch.where(keep, s.double(), s.double() - 100.0)  # float64: the shift loses no order

    if arch == "deepseek_v2":
        probs = torch.softmax(logits, dim=-1)
        return groups_first(probs, probs.view(-1, G, per).max(dim=-1).values)
    if arch in ("deepseek_v3", "glm4_moe"):
        s = torch.sigmoid(logits) + router.e_score_correction_bias.float()
        return groups_first(s, s.view(-1, G, per).topk(2, dim=-1).values.sum(-1))
    if arch == "ernie4_5_moe":
        return torch.softmax(logits, dim=-1) + router.moe_statics.e_score_correction_bias.float().reshape(-1)
    return logits


def _oracle_stats(arch: str, ckpt_dir: Path, ids: list[int], cfg, maps: torch.Tensor):
    """Calibration statistics computed independently: transformers' forward, gate inputs captured with
    hooks on post_attention_layernorm, routers applied by hand from the oracle's own parameters; each stored
    prediction map (``maps``, fate.calib.predict) checked against the least-squares oracle's fit from the
    transformers gate input a layers back to the router logits (tests.tiny_models.oracle_prediction_fit), and
    the recall counted with the oracle's held-out scores."""
    model = load_oracle(arch, ckpt_dir)
    layers = model.model.layers
    captured: dict[int, torch.Tensor] = {}
    hooks = [layer.post_attention_layernorm.register_forward_hook(
        lambda mod, inp, out, i=i: captured.__setitem__(i, out[0].detach().float())) for i, layer in enumerate(layers)]
    emb = []
    hooks.append(model.model.embed_tokens.register_forward_hook(lambda mod, inp, out: emb.append(out[0].detach())))
    with torch.no_grad():
        model(torch.tensor([ids]))
        for h in hooks:
            h.remove()
        # layer 0 is predicted from the token embedding through its own post-attention norm
        captured[-1] = layers[0].post_attention_layernorm(emb[0]).float()
    L, E, k = cfg.n_layers, cfg.n_experts, cfg.top_k
    pop = torch.zeros(L, E, dtype=torch.int64)
    cos = torch.full((L,), float("nan"))
    rec = torch.full((L, 4), float("nan"))
    for i in range(L):
        if not cfg.moe_layers[i]:
            continue
        moe = layers[i].mlp if hasattr(layers[i].mlp, "experts") else layers[i].block_sparse_moe
        router = moe.router if hasattr(moe, "router") else moe.gate
        with torch.no_grad():
            # the experts transformers' own router picks ...
            top = router(captured[i])[2].sort(dim=-1).values
            # ... are the top k of the family's selection rule, written out here by hand
            assert torch.equal(_selection(arch, router, captured[i], cfg).topk(k, dim=-1).indices.sort(dim=-1).values, top)
            fold = folds_of([len(ids)])  # the calibration's one sequence (CALIB_TOKENS fit in one)
            w = router.weight.float()
            for a in (1, 2):
                if i - a < -1:
                    continue
                want, scores = oracle_prediction_fit(captured[i - a], captured[i] @ w.T, w, top, fold, RIDGES)
                got = maps[a - 1, i].double()
                assert torch.allclose(got, want, rtol=0, atol=3e-3 * want.abs().max().item()), (i, a)
                if a == 1:
                    pred = scores
        pop[i] = torch.bincount(top.flatten(), minlength=E)
        cos[i] = torch.nn.functional.cosine_similarity(captured[i - 1].double(), captured[i].double(), dim=-1).mean()
        for j, m in enumerate((0, 1, 2, 4)):
            cand = pred.topk(min(k + m, E), dim=-1).indices
            rec[i, j] = (top.unsqueeze(-1) == cand.unsqueeze(1)).any(-1).sum(-1).double().mean() / k
    return pop, cos, rec


@pytest.mark.parametrize("arch", ARCHS)
def test_calibration_statistics_match_transformers(converted, arch, calib_file):
    from tokenizers import Tokenizer

    ckpt_dir, path = converted[arch]
    _, _, cfg = _hf(ckpt_dir)
    b = Bundle(path)
    ids = Tokenizer.from_file(str(ckpt_dir / "tokenizer.json")).encode(CALIB_TEXT, add_special_tokens=False).ids
    ids = ids[:CALIB_TOKENS]
    assert b.metadata[C.K_CALIB_TOKENS] == len(ids) == CALIB_TOKENS
    pop, cos, rec = _oracle_stats(arch, ckpt_dir, ids, cfg, b.tensor(C.T_CALIB_PREDICT))
    assert torch.equal(b.tensor(C.T_CALIB_POPULARITY), pop)
    assert pop.sum() == CALIB_TOKENS * cfg.top_k * len(cfg.moe_layer_ids)
    torch.testing.assert_close(b.tensor(C.T_CALIB_COSINE), cos.float(), atol=1e-4, rtol=0, equal_nan=True)
    torch.testing.assert_close(b.tensor(C.T_CALIB_RECALL), rec.float(), atol=1e-4, rtol=0, equal_nan=True)
    r = b.tensor(C.T_CALIB_RECALL)
    finite = r[~torch.isnan(r[:, 0])]
    assert len(finite) >= 1 and (finite[:, 1:] >= finite[:, :-1]).all()  # more candidates, more recall


def test_safetensors_output_matches_gguf(converted, tmp_path):
    from safetensors import safe_open

    ckpt_dir, gguf_path = converted["qwen2_moe"]
    out = tmp_path / "model.safetensors"
    fate.convert(ckpt_dir, out, experts="q4,q2", calib_tokens=64, progress=False)
    g, s = Bundle(gguf_path), Bundle(out)
    with safe_open(str(out), framework="pt") as f:
        keys = set(f.keys())
        assert "token_embd.weight" in keys and "blk.0.fate_exps.q4" in keys
        assert json.loads(f.metadata()[C.MAGIC_KEY]) == C.FORMAT_VERSION
        assert torch.equal(f.get_tensor("blk.1.attn_q.weight"), g.tensor("blk.1.attn_q.weight"))
    assert s.metadata[C.K_PRECISIONS] == ["q4", "q2"]
    for p in ("q4", "q2"):  # quantization is deterministic: the same blobs in both containers
        assert torch.equal(s.expert_blob(0, p, 3), g.expert_blob(0, p, 3))
    for t in s.tensors.values():
        assert t.offset % s.metadata[C.K_EXPERT_ALIGNMENT] == 0


def test_builtin_calibration_and_no_calib(converted, tmp_path):
    ckpt_dir, _ = converted["olmoe"]
    a = tmp_path / "a.gguf"
    fate.convert(ckpt_dir, a, calib_tokens=128, progress=False)
    b = Bundle(a)
    assert b.metadata[C.K_CALIB_SOURCE] == "builtin:calib.txt" and b.metadata[C.K_CALIB_TOKENS] == 128
    n = tmp_path / "n.gguf"
    fate.convert(ckpt_dir, n, no_calib=True, progress=False)
    bn = Bundle(n)
    assert bn.metadata[C.K_CALIB_PRESENT] is False and C.T_CALIB_POPULARITY not in bn.tensors
    # the fitted prediction maps: one per MoE layer and distance whose source exists, [E, H] from the stored
    # float16; none without calibration (the routers predict then)
    _, _, cfg = _hf(ckpt_dir)
    maps = prediction_maps(b, cfg)
    want = {(j - a, j) for a in (1, 2) for j in cfg.moe_layer_ids if j - a >= -1}
    assert set(maps) == want
    t = b.tensor(C.T_CALIB_PREDICT)
    assert t.dtype == torch.float16 and t.shape == (2, cfg.n_layers, cfg.n_experts, cfg.hidden_size)
    for (src, j), w in maps.items():
        assert w.dtype == torch.float32 and torch.equal(w, t[j - src - 1, j].float())
    assert prediction_maps(bn, cfg) is None and prediction_maps(None, cfg) is None


# --- bad input: one clear line, non-zero exit, nothing written -----------------------------------------

def _cli(args):
    return CliRunner().invoke(convert_main, [str(a) for a in args])




@pytest.fixture
def small_ckpt(tmp_path):
    d = tmp_path / "ckpt"
    make_checkpoint("mixtral", d, n_layers=2)
    return d


def test_cli_success_prints_summary(small_ckpt, tmp_path):
    out = tmp_path / "m.gguf"
    res = _cli([small_ckpt, out, "--no-calib", "-q"])
    assert res.exit_code == 0, res.output
    assert "wrote" in res.output and "q4" in res.output and out.is_file()
    res = _cli([small_ckpt, out, "--no-calib", "-q"])
    assert_one_line_error(res, "already exists", "--force")
    assert _cli([small_ckpt, out, "--no-calib", "-q", "--force"]).exit_code == 0


def test_bad_inputs(small_ckpt, tmp_path):
    out = tmp_path / "o.gguf"
    assert_one_line_error(_cli([tmp_path / "nope", out]), "no such directory")
    empty = tmp_path / "empty"
    empty.mkdir()
    assert_one_line_error(_cli([empty, out]), "config.json is missing")
    assert_one_line_error(_cli([small_ckpt, tmp_path / "o.bin"]), ".gguf or .safetensors")
    assert_one_line_error(_cli([small_ckpt, tmp_path / "missing-dir" / "o.gguf"]), "does not exist")
    assert_one_line_error(_cli([small_ckpt, out, "--experts", "q3"]), "--experts")
    # no power of two >= 8 and <= 6 divides hidden 64: refused, naming the matrices and a size that works
    assert_one_line_error(_cli([small_ckpt, out, "--group-size-q4", "6"]), "hidden size 64", "gate/up",
                          "--group-size-q4 4")
    empty_calib = tmp_path / "empty.txt"
    empty_calib.write_text("  \n")
    assert_one_line_error(_cli([small_ckpt, out, "--calib", empty_calib]), "empty")
    assert_one_line_error(_cli([small_ckpt, out, "--calib", tmp_path / "nope.txt"]), "no such file")
    assert not out.exists()


def _variant(src: Path, dst: Path) -> Path:
    import shutil

    shutil.copytree(src, dst)
    return dst


def test_bad_checkpoints(small_ckpt, tmp_path):
    from safetensors.torch import load_file, save_file

    out = tmp_path / "o.gguf"
    d = _variant(small_ckpt, tmp_path / "arch")
    cfg = json.loads((d / "config.json").read_text())
    cfg["model_type"] = "llama4"
    (d / "config.json").write_text(json.dumps(cfg))
    assert_one_line_error(_cli([d, out]), "'llama4' is not supported", "qwen2_moe")

    d = _variant(small_ckpt, tmp_path / "trunc")
    f = d / "model.safetensors"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    assert_one_line_error(_cli([d, out]), "truncated")

    d = _variant(small_ckpt, tmp_path / "missing")
    t = load_file(d / "model.safetensors")
    del t["model.layers.1.block_sparse_moe.experts.5.w2.weight"]
    save_file(t, d / "model.safetensors")
    assert_one_line_error(_cli([d, out]), "experts.5.w2.weight", "missing")

    d = _variant(small_ckpt, tmp_path / "shape")
    t = load_file(d / "model.safetensors")
    t["model.layers.0.self_attn.q_proj.weight"] = t["model.layers.0.self_attn.q_proj.weight"][:-1].contiguous()
    save_file(t, d / "model.safetensors")
    assert_one_line_error(_cli([d, out]), "q_proj.weight", "shape")

    d = _variant(small_ckpt, tmp_path / "notok")
    (d / "tokenizer.json").unlink()
    assert_one_line_error(_cli([d, out]), "tokenizer.json is missing")
    assert not out.exists() and not list(tmp_path.glob(".o.gguf.part-*"))


def test_interrupted_or_failed_write_leaves_nothing(small_ckpt, tmp_path, monkeypatch):
    out = tmp_path / "o.gguf"
    calls = {"n": 0}
    real = Q.pack_expert

    def dying(*a, **k):
        calls["n"] += 1
        if calls["n"] == 5:
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(Q, "pack_expert", dying)
    with pytest.raises(KeyboardInterrupt):
        fate.convert(small_ckpt, out, no_calib=True, progress=False)
    assert not out.exists() and not list(tmp_path.glob(".o.gguf.part-*"))
    monkeypatch.setattr(Q, "pack_expert", real)

    real_pwrite = os.pwrite

    def full(fd, data, offset):
        if offset > 4096:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_pwrite(fd, data, offset)

    monkeypatch.setattr(os, "pwrite", full)
    with pytest.raises(ConvertError, match="No space left on device"):
        fate.convert(small_ckpt, out, no_calib=True, progress=False)
    assert not out.exists() and not list(tmp_path.glob(".o.gguf.part-*"))


@pytest.mark.slow
def test_killed_converter_leaves_nothing_at_out_and_rerun_succeeds(tmp_path):
    """SIGKILL the converter (a real subprocess) at several points: never a file at OUT; the next run
    removes the dead run's temporary file and succeeds."""
    import signal
    import subprocess
    import sys
    import time

    ckpt = tmp_path / "ckpt"
    make_checkpoint("qwen2_moe", ckpt, n_layers=4, num_experts=16)
    out = tmp_path / "m.gguf"
    code = ("import sys, fate; fate.convert(sys.argv[1], sys.argv[2], calib_tokens=256, progress=False)")
    for delay in (0.0, 0.5, 2.0):
        proc = subprocess.Popen([sys.executable, "-c", code, str(ckpt), str(out)])
        deadline = time.time() + 60
        while not list(tmp_path.glob(".m.gguf.part-*")) and proc.poll() is None and time.time() < deadline:
            time.sleep(0.02)
        time.sleep(delay)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        assert not out.exists() or proc.returncode == 0
        if out.exists():  # it finished before the signal: start over
            out.unlink()
    assert list(tmp_path.glob(".m.gguf.part-*")) and not out.exists()  # the last run died mid-write
    fate.convert(ckpt, out, no_calib=True, progress=False)
    assert out.is_file() and not list(tmp_path.glob(".m.gguf.part-*"))
    assert Bundle(out).metadata[C.MAGIC_KEY] == C.FORMAT_VERSION


def test_provenance_records_the_source(small_ckpt, tmp_path):
    import hashlib
    import shutil

    snap = tmp_path / "models--org--tiny" / "snapshots" / ("ab12" * 10)
    shutil.copytree(small_ckpt, snap)
    out = tmp_path / "p.gguf"
    fate.convert(snap, out, no_calib=True, progress=False)
    m = Bundle(out).metadata
    assert m[C.K_SOURCE_REVISION] == "ab12" * 10
    assert m[C.K_SOURCE_CONFIG_SHA256] == hashlib.sha256((snap / "config.json").read_bytes()).hexdigest()
    assert m[C.K_SOURCE_NAME] == "org/tiny" and m[C.K_HF_MODEL_TYPE] == "mixtral"
    assert m[C.K_FATE_VERSION] == fate.__version__ and m[C.K_QUANT_METHOD] == "hqq" and m[C.K_CREATED].endswith("Z")
    plain = tmp_path / "q.gguf"
    fate.convert(small_ckpt, plain, no_calib=True, progress=False)
    m = Bundle(plain).metadata
    assert C.K_SOURCE_REVISION not in m and m[C.K_SOURCE_NAME] == small_ckpt.name


def test_any_expert_ffn_converts_with_defaults(tmp_path):
    """Expert FFN 32: q4's group size 64 does not divide down's input dimension, so down uses 32 (gate/up
    keep 64); one line says so, the bundle records both, and the model runs with them."""
    d = tmp_path / "ckpt"
    make_checkpoint("qwen3_moe", d, n_layers=2, moe_intermediate_size=32)
    out = tmp_path / "m.gguf"
    res = _cli([d, out, "--calib-tokens", "64", "-q"])
    assert res.exit_code == 0, res.output
    lines = [line for line in res.output.splitlines() if "group size" in line]
    assert lines == ["q4: group size 64 does not divide the expert FFN size 32; the down matrices use group size 32"]
    b = Bundle(out)
    assert (b.metadata[C.K_PRECISION_GROUP.format(p="q4")], b.metadata[C.K_PRECISION_GROUP_DOWN.format(p="q4")]) == (64, 32)
    assert (b.metadata[C.K_PRECISION_GROUP.format(p="q2")], b.metadata[C.K_PRECISION_GROUP_DOWN.format(p="q2")]) == (32, 32)
    m = fate.load(out, experts="q4")
    layout = m.store.layouts["q4"]
    assert [x.spec.group_size for x in layout.matrices] == [64, 64, 32]
    # the runtime computes with what is stored: hqq's own round trip of each matrix at its group size
    ckpt, spec, cfg = _hf(d)
    e = 3
    src = A.expert_weights(spec, cfg, 1, e, "per_expert", lambda n, j: ckpt.get(n))
    for w, got, mat in zip(src, m.store.dense(1, e, "q4"), layout.matrices):
        torch.testing.assert_close(got, Q.hqq_reference_dequant(w, mat.spec), rtol=0, atol=1e-6)
    assert len(m.generate("the quick brown fox", 8, temperature=0.0, stop_at_eos=False).token_ids) == 8
    m.close()


def test_gpt_oss_mxfp4_experts_are_dequantized(tmp_path):
    """gpt-oss as published: MXFP4 experts.  Conversion dequantizes them (to transformers' own values) and
    stores HQQ/f16 blobs like any other expert; the f16 bundle generates transformers' greedy tokens."""
    d = tmp_path / "ckpt"
    make_checkpoint("gpt_oss", d, seed=4, mxfp4=True)
    oracle = load_oracle("gpt_oss", d)  # transformers dequantizes the MXFP4 experts itself
    out = tmp_path / "m.gguf"
    fate.convert(d, out, experts="f16,q4", calib_tokens=64, progress=False)
    m = fate.load(out, experts="f16")
    want = oracle.model.layers[1].mlp.experts
    gate, up, down, gu_bias, down_bias = m.store.dense(1, 5, "f16")
    assert torch.equal(gate, want.gate_up_proj[5, :, 0::2].t().half().float())
    assert torch.equal(up, want.gate_up_proj[5, :, 1::2].t().half().float())
    assert torch.equal(down, want.down_proj[5].t().half().float())
    assert torch.equal(gu_bias, torch.cat((want.gate_up_proj_bias[5, 0::2], want.gate_up_proj_bias[5, 1::2])))
    ids = m.encode_prompt("the quick brown fox jumps over")
    oracle.generation_config.eos_token_id = None
    with torch.no_grad():
        ref = oracle.generate(torch.tensor([ids]), max_new_tokens=16, do_sample=False, pad_token_id=0)[0, len(ids):]
    assert m.generate(ids, 16, temperature=0.0, stop_at_eos=False).token_ids == ref.tolist()
    m.close()


def test_other_quantized_checkpoints_are_refused(small_ckpt, tmp_path):
    d = _variant(small_ckpt, tmp_path / "fp8")
    cfg = json.loads((d / "config.json").read_text())
    cfg["quantization_config"] = {"quant_method": "fp8", "weight_block_size": [128, 128]}
    (d / "config.json").write_text(json.dumps(cfg))
    assert_one_line_error(_cli([d, tmp_path / "o.gguf"]), "quantized ('fp8')", "float copy")


@pytest.mark.parametrize("arch", ["qwen2_moe", "olmoe"])
def test_dtype_q8_stores_projections_in_8_bits(tmp_path, arch):
    """--dtype q8: every projection as I8 codes with an F16 scale per 32 (the documented rounding), the rest
    F16; fate-inspect says so; the model runs under every kernel choice close to the f16 bundle's."""
    from fate.cli.inspect import main as inspect_main
    from fate.quant.q8 import dequantize_q8, quantize_q8
    from fate.runtime.weights import BundleWeights

    ckpt = tmp_path / "ckpt"
    make_checkpoint(arch, ckpt, n_layers=2)
    f16, q8 = tmp_path / "f16.gguf", tmp_path / "q8.gguf"
    fate.convert(ckpt, f16, experts="q4", no_calib=True, progress=False)
    res = _cli([ckpt, q8, "--experts", "q4", "--dtype", "q8", "--no-calib", "-q"])
    assert res.exit_code == 0, res.output
    a, b = Bundle(f16), Bundle(q8)
    assert b.metadata[C.K_NON_EXPERT_DTYPE] == "q8" and b.metadata[C.K_Q8_GROUP] == 32
    projections = [n for n in a.tensors if C.is_projection(n)]
    assert projections and C.T_OUTPUT in projections
    for name in a.tensors:
        if name in projections:
            codes, scale = b.tensor(name), b.tensor(C.q8_scale_name(name))
            assert b.tensors[name].dtype == "I8" and b.tensors[C.q8_scale_name(name)].dtype == "F16"
            w = a.tensor(name).float()  # the f16 bundle's matrix: the checkpoint rounded to f16
            want_codes, want_scale = quantize_q8(read_checkpoint_f32(ckpt, arch, name))
            assert torch.equal(codes, want_codes) and torch.equal(scale, want_scale)
            step = scale.float().repeat_interleave(32, 1)
            assert ((dequantize_q8(codes, scale) - w).abs() <= step / 2 + w.abs() * 2 ** -10).all()
        elif C.is_model_tensor(name):
            assert b.tensors[name].dtype == a.tensors[name].dtype  # F16 / F32 as before
            assert torch.equal(b.tensor(name), a.tensor(name))
    assert torch.equal(a.tensor(C.T_EXPERTS.format(i=0, p="q4")), b.tensor(C.T_EXPERTS.format(i=0, p="q4")))
    out = CliRunner().invoke(inspect_main, [str(q8)]).output
    assert f"non-expert q8: {len(projections)} projection matrices as 8-bit codes" in out
    assert "non-expert f16" in CliRunner().invoke(inspect_main, [str(f16)]).output
    # the model: q8 projections dequantized exactly by the torch path; int8 products within ~1 %
    ref = fate.load(f16, kernels="torch")
    ids = ref.encode_prompt("the quick brown fox jumps over")
    want = ref.logits(ids)
    got = {k: fate.load(q8, kernels=k).logits(ids) for k in ("torch", "fp32", "int8")}
    # fp32 computes a q8 bundle's prefill with torch too (float32 activations, q8 widened), up to the
    # summation order of torch's own products at the thread counts each load set
    torch.testing.assert_close(got["torch"], got["fp32"], rtol=1e-5, atol=1e-5)
    for k, v in got.items():
        assert float((v - want).norm() / want.norm()) < 0.03, k
    bw = BundleWeights(b, torch.float32, torch.device("cpu"))
    assert torch.equal(bw.get(projections[0]), dequantize_q8(b.tensor(projections[0]), b.tensor(C.q8_scale_name(projections[0]))))
    m = fate.load(q8)
    assert set(m.weights.native_names) == set(projections)  # the int8 kernels compute every q8 projection
    assert len(m.generate(ids, 4, temperature=0.0, stop_at_eos=False).token_ids) == 4


def read_checkpoint_f32(ckpt, arch, name):
    """The checkpoint's float32 matrix behind bundle tensor ``name``."""
    from fate.model import arch as A
    from tests.tiny_models import read_checkpoint_tensors

    hf = json.loads((ckpt / "config.json").read_text())
    hf_name = A.non_expert_tensors(A.spec_for(hf), A.model_config(hf))[name][0]
    return read_checkpoint_tensors(ckpt)[hf_name].float()


def test_q8_bundle_without_its_scales_is_refused(tmp_path):
    from fate.errors import BundleStructureError
    from fate.model.config import ModelConfig
    from fate.runtime.experts.store import check_bundle_config

    ckpt = tmp_path / "ckpt"
    make_checkpoint("mixtral", ckpt, n_layers=1)
    q8 = tmp_path / "q8.gguf"
    fate.convert(ckpt, q8, experts="q4", dtype="q8", no_calib=True, progress=False)
    b = Bundle(q8)
    cfg = ModelConfig.from_json(b.metadata[C.K_MODEL_CONFIG])
    check_bundle_config(b, cfg)
    name = C.T_ATTN_Q.format(i=0)
    scale = b.tensors.pop(C.q8_scale_name(name))
    with pytest.raises(BundleStructureError, match="I8 \\(q8\\) but blk.0.attn_q.scale"):
        check_bundle_config(b, cfg)
    b.tensors[C.q8_scale_name(name)] = scale
    b.tensors[name] = b.tensors[C.T_TOKEN_EMBD]  # wrong shape is still the first thing named
    with pytest.raises(BundleStructureError, match="shape"):
        check_bundle_config(b, cfg)
    b.close()

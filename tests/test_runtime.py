"""fate-run / fate.load on converted tiny bundles of every architecture, against transformers."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import save_file

import fate
from fate import quant as Q
from fate.model import arch as A
from fate.formats import constants as C
from fate.errors import BundleError
from fate.formats.bundle import Bundle
from fate.cli.run import main as run_main
from fate.errors import RequestError
from tests.conftest import DEVICES, assert_one_line_error
from tests.tiny_models import ARCHS, load_oracle, read_checkpoint_tensors

PROMPT = "the quick brown fox jumps over"


def _rounded_checkpoint(ckpt: Path, dst: Path, bundle: Bundle, precision: str) -> Path:
    """A copy of ``ckpt`` whose weights are what the bundle stores: non-expert tensors rounded to their
    storage dtype, experts replaced by hqq's own dequantization (q4/q2) or f16 rounding."""
    hf = json.loads((ckpt / "config.json").read_text())
    spec, cfg = A.spec_for(hf), A.model_config(hf)
    tensors = read_checkpoint_tensors(ckpt)
    for name, (hf_name, _) in A.non_expert_tensors(spec, cfg).items():
        stored = bundle.tensors[name].dtype
        tensors[hf_name] = tensors[hf_name].to({"F16": torch.float16, "F32": torch.float32}[stored]).float()
    bits = bundle.metadata[C.K_PRECISION_BITS.format(p=precision)]
    group = bundle.metadata[C.K_PRECISION_GROUP.format(p=precision)]
    qspec = Q.QuantSpec(precision, bits, group)
    down_spec = Q.QuantSpec(precision, bits, bundle.metadata.get(C.K_PRECISION_GROUP_DOWN.format(p=precision), group))

    def rounded(w, s):
        return w.half().float() if precision == "f16" else Q.hqq_reference_dequant(w, s)

    for i in cfg.moe_layer_ids:
        kind, _ = A.expert_storage(spec, cfg, i, tensors.__contains__)
        for e in range(cfg.n_experts):
            if kind == "per_expert":
                for n, s in zip(A.expert_tensor_names(spec, i, e), (qspec, qspec, down_spec)):
                    tensors[n] = rounded(tensors[n].float(), s)
                continue
            assert kind == "gpt_oss", kind  # stacked [E, H, 2F] with gate and up interleaved, [E, F, H]
            gate, up, down = A.expert_weights(spec, cfg, i, e, kind, lambda n, j: tensors[n][j])[:3]
            base = f"model.layers.{i}.mlp.experts."
            gu = torch.empty(2 * cfg.expert_ffn, cfg.hidden_size)
            gu[0::2], gu[1::2] = rounded(gate, qspec), rounded(up, qspec)
            tensors[base + "gate_up_proj"][e] = gu.t()
            tensors[base + "down_proj"][e] = rounded(down, down_spec).t()
    dst.mkdir(parents=True)
    for f in ckpt.iterdir():
        if not f.name.endswith(".safetensors") and f.name != "model.safetensors.index.json":
            shutil.copy(f, dst / f.name)
    save_file({k: v.contiguous() for k, v in tensors.items()}, dst / "model.safetensors")
    return dst


class _Routes:
    """An executor wrapper recording each MoE layer's chosen experts."""

    def __init__(self, inner):
        self.inner, self.ids = inner, []

    def moe(self, layer, x, ids, w):
        self.ids.append(ids.clone())
        return self.inner.moe(layer, x, ids, w)


def _logits_and_routes(model, ids):
    rec = _Routes(model.model.experts)
    model.model.experts = rec
    try:
        with torch.no_grad():
            logits = model.model.forward(torch.tensor(ids, device=model.device), None).cpu()
    finally:
        model.model.experts = rec.inner
    return logits, rec.ids


@pytest.fixture(scope="module")
def models(converted):
    return {arch: fate.load(converted[arch][1], experts="f16", device="cpu") for arch in ARCHS}


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("precision", ["f16", "q4"])
def test_logits_and_greedy_tokens_match_transformers(converted, tmp_path, arch, precision, device):
    ckpt, path = converted[arch]
    # f16 experts with the default kernels; q4 with float32 activations (the reference: 8-bit activations,
    # fate-run's default, are checked against it in tests/test_kernels.py and below)
    kernels = "int8" if precision == "f16" else "fp32"
    model = fate.load(path, experts=precision, device=device, compute_dtype="fp32", kernels=kernels)
    oracle = load_oracle(arch, _rounded_checkpoint(ckpt, tmp_path / "rounded", model.bundle, precision))
    ids = model.encode_prompt(PROMPT)
    with torch.no_grad():
        want = oracle(torch.tensor([ids])).logits[0].float()
        got = model.model.forward(torch.tensor(ids, device=model.device), None).cpu()
    torch.testing.assert_close(got, want, atol=1e-3, rtol=1e-3)
    if precision == "q4" and device == "cpu":
        # 8-bit activations: within ~1% of the logits at every position whose routing they leave as it was
        # (a router's near-tie may flip one expert under any rounding change, as ERNIE's does here once)
        fast_model = fate.load(path, experts=precision, device=device)
        fast, routes = _logits_and_routes(fast_model, ids)
        _, ref_routes = _logits_and_routes(model, ids)
        same = [t for t in range(len(ids)) if all(torch.equal(a[t], b[t]) for a, b in zip(routes, ref_routes))]
        assert len(same) >= len(ids) - 1
        for t in same:
            assert float((fast[t] - want[t]).norm() / want[t].norm()) < 0.02, t
    if precision == "f16":
        oracle.generation_config.eos_token_id = None
        with torch.no_grad():
            ref = oracle.generate(torch.tensor([ids]), max_new_tokens=32, do_sample=False, pad_token_id=0)[0, len(ids):]
        out = model.generate(ids, 32, temperature=0.0, stop_at_eos=False)
        assert out.token_ids == ref.tolist()
        assert out.stats.to_dict()["decode"]["tokens"] == 31


def test_kv_decode_equals_full_recompute(models):
    m = models["qwen3_moe"]
    ids = m.encode_prompt(PROMPT)
    toks = m.generate(ids, 12, temperature=0.0, stop_at_eos=False).token_ids
    full = m.model.forward(torch.tensor(ids + toks[:-1]), None)
    assert full[len(ids) - 1:].argmax(-1).tolist() == toks


def test_seed_reproduces_samples(models):
    m = models["mixtral"]
    a = m.generate(PROMPT, 24, temperature=1.0, top_k=0, top_p=1.0, min_p=0.0, seed=7, stop_at_eos=False).token_ids
    b = m.generate(PROMPT, 24, temperature=1.0, top_k=0, top_p=1.0, min_p=0.0, seed=7, stop_at_eos=False).token_ids
    c = m.generate(PROMPT, 24, temperature=1.0, top_k=0, top_p=1.0, min_p=0.0, seed=8, stop_at_eos=False).token_ids
    assert a == b and a != c


def test_chat_prompt_matches_transformers(models, converted):
    from transformers import AutoTokenizer

    m = models["qwen2_moe"]
    tok = AutoTokenizer.from_pretrained(converted["qwen2_moe"][0])
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": PROMPT}]
    want = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    want = want["input_ids"] if isinstance(want, dict) or hasattr(want, "keys") else want
    assert m.encode_prompt(PROMPT, chat=True, system="be brief") == list(want)


def test_stream_yields_the_generated_text(models):
    m = models["olmoe"]
    pieces = list(m.stream(PROMPT, 16, temperature=0.0, stop_at_eos=False))
    assert "".join(pieces) == m.tokenizer.decode(m.last_stats.generated_token_ids)


def _rss_file_kib() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("RssFile:"):
            return int(line.split()[1])
    pytest.skip("no RssFile in /proc/self/status")


def test_open_does_not_read_unused_experts(tmp_path):
    """A bundle with 48 MiB of f16 experts: opening it maps them but reads (makes resident) only
    what generation touches."""
    from tests.tiny_models import make_checkpoint

    ckpt = tmp_path / "big"
    make_checkpoint("mixtral", ckpt, n_layers=2, hidden_size=256, intermediate_size=2048, num_local_experts=16)
    path = tmp_path / "big.gguf"
    fate.convert(ckpt, path, experts="f16", no_calib=True, progress=False)
    expert_bytes = sum(t.nbytes for n, t in Bundle(path).tensors.items() if ".fate_exps." in n)
    assert expert_bytes > 40 * 2**20
    before = _rss_file_kib()
    m = fate.load(path, experts="f16", verify=False, device="cpu")  # on a GPU experts go to device memory
    after_open = _rss_file_kib()
    assert (after_open - before) * 1024 < expert_bytes / 10
    m.generate([5], 1, temperature=0.0)  # one token: top-2 of 16 experts in each of 2 layers
    after_one = _rss_file_kib()
    assert (after_one - before) * 1024 < expert_bytes / 2


# --- bad input --------------------------------------------------------------------------------------

def _run(args):
    return CliRunner().invoke(run_main, [str(a) for a in args])




def test_cli_generates_with_timings_and_stats_json(converted, tmp_path):
    path = converted["deepseek"][1]
    stats = tmp_path / "s.json"
    res = _run([path, "-p", PROMPT, "-n", 8, "--temp", 0, "--ignore-eos", "--stats-json", stats])
    assert res.exit_code == 0, res.output
    assert "prompt eval" in res.output and "tokens per second" in res.output
    d = json.loads(stats.read_text())
    for ph in ("prefill", "decode"):
        assert set(d[ph]) == {"tokens", "seconds", "tokens_per_s"}
    for k in ("generated_tokens", "stop_reason", "load_seconds", "peak_rss_bytes", "prompt_token_ids",
              "generated_token_ids", "experts", "budget"):
        assert k in d
    assert len(d["generated_token_ids"]) == 8 and d["decode"]["tokens"] == 7 and d["peak_rss_bytes"] > 0


def test_cli_kernels_and_threads(converted, tmp_path):
    """--kernels picks the products (each runs, the torch path included), -t the threads; a bad value is
    refused; the engine gives fate's kernels the threads and torch one while they serve."""
    from fate.quant import kernels as K

    path = converted["qwen2_moe"][1]
    tokens = {}
    for k in ("int8", "fp32", "torch"):
        stats = tmp_path / f"{k}.json"
        res = _run([path, "-p", PROMPT, "-n", 6, "--temp", 0, "--ignore-eos", "--kernels", k, "-t", 2,
                    "--stats-json", stats])
        assert res.exit_code == 0, res.output
        tokens[k] = json.loads(stats.read_text())["generated_token_ids"]
    assert len(tokens["int8"]) == len(tokens["torch"]) == 6
    res = _run([path, "-p", "x", "--kernels", "int4"])  # click's choice check, like --policy's
    assert res.exit_code == 2 and "'--kernels': 'int4' is not one of" in res.output
    with pytest.raises(RequestError, match="--kernels 'int4'"):
        fate.load(path, kernels="int4")
    before = torch.get_num_threads()
    try:
        m = fate.load(path, threads=2, kernels="torch")
        assert not m.native and torch.get_num_threads() == 2
        m = fate.load(path, threads=2)
        if K.available():
            assert m.native and K.threads() == 2 and torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)
        if K.available():
            K.set_threads(0)


def test_bad_bundles(converted, tmp_path):
    good = converted["olmoe"][1]
    junk = tmp_path / "junk.gguf"
    junk.write_bytes(b"hello, this is not a model at all" * 10)
    assert_one_line_error(_run([junk, "-p", "x"]), "not a fate bundle")
    assert_one_line_error(_run([tmp_path, "-p", "x"]), "is a directory")
    assert_one_line_error(_run([tmp_path / "none.gguf", "-p", "x"]), "no such file")
    trunc = tmp_path / "trunc.gguf"
    trunc.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    assert_one_line_error(_run([trunc, "-p", "x"]), "truncated")
    assert_one_line_error(_run([good, "-p", "x", "--experts", "q3"]), "stored as")


def _safetensors_copy(ckpt: Path, tmp_path: Path) -> Path:
    out = tmp_path / "m.safetensors"
    fate.convert(ckpt, out, no_calib=True, progress=False)
    return out


def _with_metadata(raw: bytes, key: str, value) -> bytes:
    """The safetensors bundle ``raw`` with one metadata value replaced (header kept at its length)."""
    n = int.from_bytes(raw[:8], "little")
    table = json.loads(raw[8:8 + n])
    table["__metadata__"][key] = json.dumps(value)
    # a consistent file (as another fate might write it): the metadata checksum recomputed
    from fate.formats.bundle import metadata_crc32

    meta = {k: json.loads(v) for k, v in table["__metadata__"].items()}
    table["__metadata__"][C.K_METADATA_CRC] = json.dumps(metadata_crc32(meta))
    header = json.dumps(table, separators=(",", ":")).encode()
    assert len(header) <= n
    return raw[:8] + header + b" " * (n - len(header)) + raw[8 + n:]


def test_version_arch_and_checksum_errors(converted, tmp_path):
    st = _safetensors_copy(converted["olmoe"][0], tmp_path)
    raw = st.read_bytes()
    newer = tmp_path / "v9.safetensors"
    newer.write_bytes(_with_metadata(raw, C.MAGIC_KEY, 9))
    assert_one_line_error(_run([newer, "-p", "x"]), "version 9", "version 1")
    cfg = json.loads(Bundle(st).metadata[C.K_MODEL_CONFIG])
    cfg["model_type"] = "gpt2x"
    arch = tmp_path / "arch.safetensors"
    arch.write_bytes(_with_metadata(raw, C.K_MODEL_CONFIG, json.dumps(cfg)))
    assert_one_line_error(_run([arch, "-p", "x"]), "'gpt2x' is not supported")
    corrupt = tmp_path / "meta.safetensors"  # the same edit without the checksum: caught as corruption
    corrupt.write_bytes(raw.replace(b'olmoe', b'olmoE', 1))
    assert_one_line_error(_run([corrupt, "-p", "x"]), "checksum mismatch in the metadata")
    # flip one byte in every q4 blob of layer 0: the first expert used there fails its crc32
    b = Bundle(st)
    entry = b.tensors[C.T_EXPERTS.format(i=0, p="q4")]
    data = bytearray(raw)
    for e in range(entry.shape[0]):
        data[entry.offset + e * entry.shape[1] + 100] ^= 0xFF
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(bytes(data))
    assert_one_line_error(_run([bad, "-p", "x", "-n", 1]), "checksum mismatch", "layer 0")
    assert _run([bad, "-p", "x", "-n", 1, "--no-verify"]).exit_code == 0
    # a flipped byte in a non-expert tensor is caught at load, naming the tensor
    entry = b.tensors["blk.1.attn_v.weight"]
    data = bytearray(raw)
    data[entry.offset + 7] ^= 0x40
    bad.write_bytes(bytes(data))
    assert_one_line_error(_run([bad, "-p", "x", "-n", 1]), "checksum mismatch", "blk.1.attn_v.weight")
    assert _run([bad, "-p", "x", "-n", 1, "--no-verify"]).exit_code == 0


def test_bad_requests(converted):
    path = converted["qwen2_moe"][1]
    assert_one_line_error(_run([path, "-p", PROMPT * 20, "-c", 16]), "context holds 16", "-c")
    assert_one_line_error(_run([path, "-p", "x", "--top-p", 2]), "top_p")
    assert_one_line_error(_run([path, "-p", "x", "--temp", -1]), "temperature")
    assert_one_line_error(_run([path, "-p", ""]), "empty")
    assert_one_line_error(_run([path]), "no prompt")
    if not torch.cuda.is_available():
        assert_one_line_error(_run([path, "-p", "x", "--device", "cuda"]), "no CUDA")
    with pytest.raises(RequestError):
        fate.load(path).generate([], 4)
    with pytest.raises(BundleError):
        fate.load(path, experts="f32")


def test_demo_bundle_ships_and_generates():
    from fate.cli.common import demo_path

    assert demo_path().is_file() and demo_path().stat().st_size < 16 * 2**20
    res = _run(["--demo", "-p", "The module", "-n", 12, "--temp", 0])
    assert res.exit_code == 0, res.output
    text = res.output.split("load time")[0]
    assert sum(c.isalpha() for c in text) >= 10  # words, not nothing
    m = fate.load(demo_path())
    assert m.config.model_type == "qwen2_moe" and m.chat_template and m.bundle.get(C.K_CALIB_PRESENT)


@pytest.mark.parametrize("precision", ["f16", "q4"])
def test_no_mmap_preload_gives_the_same_tokens(converted, precision):
    from fate.runtime.experts.resident import ResidentExperts

    path = converted["qwen2_moe"][1]
    a = fate.load(path, experts=precision).generate(PROMPT, 16, temperature=0.0, stop_at_eos=False).token_ids
    m = fate.load(path, experts=precision, no_mmap=True)
    assert isinstance(m.model.experts, ResidentExperts)
    assert m.generate(PROMPT, 16, temperature=0.0, stop_at_eos=False).token_ids == a


@pytest.mark.parametrize("fraction", [0.10, 0.50, 0.99])
def test_truncated_bundles_fail_with_one_line(converted, tmp_path, fraction):
    for src in (converted["qwen3_moe"][1], _safetensors_copy(converted["qwen3_moe"][0], tmp_path)):
        raw = src.read_bytes()
        cut = tmp_path / f"cut{src.suffix}"
        cut.write_bytes(raw[: int(len(raw) * fraction)])
        res = _run([cut, "-p", "x", "-n", 1])
        assert res.exit_code == 2, res.output
        lines = [l for l in res.output.strip().splitlines() if l]
        assert len(lines) == 1 and lines[0].startswith("error: ") and str(cut) in lines[0]
        assert "truncated" in lines[0] or "corrupt" in lines[0], lines[0]


def test_prompt_file_must_be_utf8_and_no_verify_is_announced(converted, tmp_path):
    path = converted["olmoe"][1]
    bad = tmp_path / "p.txt"
    bad.write_bytes(b"caf\xe9 \xff\xfe")
    assert_one_line_error(_run([path, "-f", bad]), "not UTF-8")
    res = _run([path, "-p", "x", "-n", 1, "--no-verify"])
    assert res.exit_code == 0 and "checksums are not verified" in res.output

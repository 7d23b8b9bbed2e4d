"""Perplexity on the trained demo model: 8-bit activations (``--kernels int8``) against today's float32 ones, and
``fate-convert --dtype q8`` against f16 non-expert storage.

    python -m benchmarks.q8_quality [--text FILE] [--work DIR] [-c 512]

* **kernels**: ``fate/data/demo.gguf`` (q4 experts, f16 rest) scored with ``--kernels fp32`` (float32
  activations: the INT4 products as before issue 12), ``int8`` (fate-run's default now) and ``torch``.
* **storage**: the demo has no float checkpoint beside it, so one is rebuilt from the bundle (its f16
  non-expert tensors as they are, every routed expert dequantized from its q4 blob in float32) and converted
  twice with fate-convert's defaults (q4,q2 experts, builtin calibration): ``--dtype f16`` and ``--dtype q8``.
  Both hold the same expert blobs, so the difference between them is the q8 storage of the projections alone.

The text (default ``fate/data/calib.txt``: the standard library documentation the demo was trained on, shipped
with fate) is scored in windows of ``-c`` tokens.  Everything runs on the CPU in this process.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

from safetensors.torch import save_file

import fate
from fate.formats import constants as C
from fate.formats.bundle import Bundle
from fate.model import arch as A
from fate.model.config import ModelConfig
from fate.tools.perplexity import perplexity

ROOT = Path(__file__).resolve().parents[1]

DEMO = ROOT / "fate" / "data" / "demo.gguf"


def hf_config(cfg: ModelConfig, b: Bundle) -> dict:
    """A qwen2_moe config.json for the demo's ModelConfig."""
    if cfg.model_type != "qwen2_moe":
        raise SystemExit(f"this script rebuilds qwen2_moe checkpoints; the bundle is {cfg.model_type}")
    return {"architectures": ["Qwen2MoeForCausalLM"], "model_type": "qwen2_moe", "vocab_size": cfg.vocab_size,
            "hidden_size": cfg.hidden_size, "num_hidden_layers": cfg.n_layers, "num_attention_heads": cfg.n_heads,
            "num_key_value_heads": cfg.n_kv_heads, "rms_norm_eps": cfg.rms_eps, "rope_theta": cfg.rope_theta,
            "max_position_embeddings": cfg.max_position, "num_experts": cfg.n_experts,
            "num_experts_per_tok": cfg.top_k, "moe_intermediate_size": cfg.expert_ffn,
            "shared_expert_intermediate_size": cfg.shared_ffn, "intermediate_size": cfg.dense_ffn or cfg.shared_ffn,
            "norm_topk_prob": cfg.norm_topk_prob, "qkv_bias": cfg.qkv_bias, "decoder_sparse_step": 1,
            "mlp_only_layers": [i for i, m in enumerate(cfg.moe_layers) if not m],
            "tie_word_embeddings": cfg.tie_embeddings, "torch_dtype": "float32",
            "eos_token_id": b.get(C.K_EOS_ID), "bos_token_id": b.get(C.K_BOS_ID)}


def rebuild_checkpoint(bundle: Path, out: Path) -> Path:
    """An HF checkpoint holding what ``bundle`` computes with: non-expert tensors as stored, experts from q4."""
    b = Bundle(bundle)
    cfg = ModelConfig.from_json(b.require(C.K_MODEL_CONFIG))
    hf = hf_config(cfg, b)
    spec = A.spec_for(hf)
    tensors = {}
    for name, (hf_name, _) in A.non_expert_tensors(spec, cfg).items():
        tensors[hf_name] = b.tensor(name).float().contiguous()
    m = fate.load(bundle, experts="q4", kernels="torch", verify=False)
    for layer in cfg.moe_layer_ids:
        for e in range(cfg.n_experts):
            for hf_name, w in zip(A.expert_tensor_names(spec, layer, e), m.store.dense(layer, e, "q4")):
                tensors[hf_name] = w.contiguous()
    m.close()
    out.mkdir(parents=True, exist_ok=True)
    save_file(tensors, out / "model.safetensors")
    (out / "config.json").write_text(json.dumps(hf, indent=1))
    (out / "tokenizer.json").write_text(b.require(C.K_TOKENIZER_HF_JSON))
    tc = {k: v for k, v in (("bos_token", b.get(C.K_BOS_TOKEN)), ("eos_token", b.get(C.K_EOS_TOKEN)),
                            ("chat_template", b.get(C.K_CHAT_TEMPLATE))) if v}
    (out / "tokenizer_config.json").write_text(json.dumps(tc))
    b.close()
    return out


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.q8_quality", description=__doc__.split("\n\n")[0])
    ap.add_argument("--text", type=Path, default=ROOT / "fate" / "data" / "calib.txt")
    ap.add_argument("--work", type=Path, default=None, help="where the rebuilt checkpoint and bundles go "
                                                             "(default: a temporary folder)")
    ap.add_argument("-c", "--ctx", type=int, default=512)
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args(argv)
    work = args.work or Path(tempfile.mkdtemp(prefix="fate-q8-quality-"))
    text = args.text.read_text(encoding="utf-8")
    t0 = time.perf_counter()
    ckpt = work / "demo-hf"
    if not (ckpt / "model.safetensors").exists():
        rebuild_checkpoint(DEMO, ckpt)
    bundles = {}
    for dtype in ("f16", "q8"):
        bundles[dtype] = work / f"demo-{dtype}.gguf"
        if not bundles[dtype].exists():
            fate.convert(ckpt, bundles[dtype], dtype=dtype, progress=False)
    runs = [("demo.gguf", DEMO, "fp32"), ("demo.gguf", DEMO, "int8"), ("demo.gguf", DEMO, "torch"),
            ("rebuilt, --dtype f16", bundles["f16"], "int8"), ("rebuilt, --dtype q8", bundles["q8"], "int8"),
            ("rebuilt, --dtype f16", bundles["f16"], "fp32"), ("rebuilt, --dtype q8", bundles["q8"], "fp32")]
    rows = []
    for label, path, kernels in runs:
        r = perplexity(str(path), text, args.ctx, experts="q4", kernels=kernels, threads=args.threads)
        rows.append((label, kernels, r["perplexity"], r["tokens"]))
        print(f"{label:>22}  --kernels {kernels:<5}  ppl {r['perplexity']:.4f}  ({r['tokens']} tokens)", file=sys.stderr)
    base = {lab: p for lab, k, p, _ in rows if k == "fp32"}
    print(f"perplexity of {args.text.name} (-c {args.ctx}, q4 experts), {time.perf_counter() - t0:.0f} s; "
          f"work dir {work}")
    print("| bundle | --kernels | perplexity | vs the same bundle with --kernels fp32 |")
    print("|---|---|---:|---:|")
    for label, kernels, ppl, _ in rows:
        print(f"| {label} | {kernels} | {ppl:.4f} | {100 * (ppl / base[label] - 1):+.2f}% |")
    f16, q8 = (next(p for lab, k, p, _ in rows if lab == f"rebuilt, --dtype {d}" and k == "int8") for d in ("f16", "q8"))
    print(f"\n--dtype q8 vs --dtype f16 (both --kernels int8): {100 * (q8 / f16 - 1):+.2f}%")
    print("command: python -m benchmarks.q8_quality " + " ".join(argv if argv is not None else sys.argv[1:]))
    if os.environ.get("FATE_NATIVE") == "0":
        print("note: FATE_NATIVE=0: every row ran the torch path")


if __name__ == "__main__":
    main()

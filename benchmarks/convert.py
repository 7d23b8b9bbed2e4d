"""Conversion benchmark: wall time, throughput and peak RSS ÷ the largest decoder layer's bytes.

Writes a random bf16 checkpoint with Qwen1.5-MoE-A2.7B's real widths (hidden 2048, 60 experts of
FFN 1408, shared expert 5632 with its gate, vocab 151936; see shared/reference/models.md) and
``--layers`` decoder layers, then runs ``fate-convert`` on it in a child process and reads that
process's peak RSS (``python -m fate.cli.convert``: this tree's fate-convert). Target: peak RSS ≤ 3 ×
the largest decoder layer.  From the repository root:

    python -m benchmarks.convert --layers 1 --workdir /tmp/fate-bench-convert
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

from tests.tiny_models import tokenizer_json

ROOT = Path(__file__).resolve().parents[1]

H, E, F, SHARED, VOCAB, HEADS = 2048, 60, 1408, 5632, 151936, 16


def write_checkpoint(out: Path, layers: int, seed: int = 0) -> int:
    """Write the checkpoint one layer per shard; return the largest decoder layer's bytes."""
    out.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape, std=0.02):
        return (torch.randn(shape, generator=g) * std).to(torch.bfloat16)

    weight_map, largest = {}, 0
    shards = []
    emb = {"model.embed_tokens.weight": rnd(VOCAB, H, std=0.5), "lm_head.weight": rnd(VOCAB, H, std=0.05),
           "model.norm.weight": torch.ones(H, dtype=torch.bfloat16)}
    shards.append(emb)
    for i in range(layers):
        p = f"model.layers.{i}."
        t = {p + "input_layernorm.weight": torch.ones(H, dtype=torch.bfloat16),
             p + "post_attention_layernorm.weight": torch.ones(H, dtype=torch.bfloat16)}
        for n in ("q", "k", "v"):
            t[p + f"self_attn.{n}_proj.weight"] = rnd(H, H)
            t[p + f"self_attn.{n}_proj.bias"] = rnd(H)
        t[p + "self_attn.o_proj.weight"] = rnd(H, H)
        t[p + "mlp.gate.weight"] = rnd(E, H, std=0.5)
        for e in range(E):
            t[p + f"mlp.experts.{e}.gate_proj.weight"] = rnd(F, H)
            t[p + f"mlp.experts.{e}.up_proj.weight"] = rnd(F, H)
            t[p + f"mlp.experts.{e}.down_proj.weight"] = rnd(H, F)
        t[p + "mlp.shared_expert.gate_proj.weight"] = rnd(SHARED, H)
        t[p + "mlp.shared_expert.up_proj.weight"] = rnd(SHARED, H)
        t[p + "mlp.shared_expert.down_proj.weight"] = rnd(H, SHARED)
        t[p + "mlp.shared_expert_gate.weight"] = rnd(1, H)
        largest = max(largest, sum(x.numel() * x.element_size() for x in t.values()))
        shards.append(t)
    for k, tensors in enumerate(shards):
        name = f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file(tensors, out / name)
        weight_map.update({n: name for n in tensors})
    (out / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    cfg = {"model_type": "qwen2_moe", "architectures": ["Qwen2MoeForCausalLM"], "vocab_size": VOCAB,
           "hidden_size": H, "intermediate_size": 5632, "moe_intermediate_size": F,
           "shared_expert_intermediate_size": SHARED, "num_hidden_layers": layers, "num_attention_heads": HEADS,
           "num_key_value_heads": HEADS, "num_experts": E, "num_experts_per_tok": 4, "norm_topk_prob": False,
           "decoder_sparse_step": 1, "mlp_only_layers": [], "rms_norm_eps": 1e-6, "rope_theta": 1e6,
           "max_position_embeddings": 8192, "tie_word_embeddings": False, "torch_dtype": "bfloat16"}
    (out / "config.json").write_text(json.dumps(cfg, indent=1))
    (out / "tokenizer.json").write_text(tokenizer_json())
    (out / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|im_end|>"}))
    return largest


def main() -> None:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.convert",
                                 description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=1)
    ap.add_argument("--workdir", default="/tmp/fate-bench-convert")
    ap.add_argument("--calib-tokens", type=int, default=4096)
    ap.add_argument("--keep", action="store_true", help="keep the checkpoint and bundle")
    ap.add_argument("--write-checkpoint-only", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.write_checkpoint_only:
        print(write_checkpoint(Path(args.write_checkpoint_only), args.layers))
        return
    work = Path(args.workdir)
    shutil.rmtree(work, ignore_errors=True)
    ckpt = work / "ckpt"
    t = time.perf_counter()
    # written by a child process: ru_maxrss survives fork+exec, so a big parent would inflate the
    # converter's measured peak with its own pages
    gen = subprocess.run([sys.executable, "-m", "benchmarks.convert", "--layers", str(args.layers),
                          "--write-checkpoint-only", str(ckpt)], capture_output=True, text=True, check=True, cwd=ROOT)
    largest = int(gen.stdout.strip().splitlines()[-1])
    gen_s = time.perf_counter() - t
    ckpt_bytes = sum(f.stat().st_size for f in ckpt.glob("*.safetensors"))
    out = work / "bundle.gguf"
    # fate-convert of this tree (an installed console script may belong to another checkout)
    cmd = [sys.executable, "-m", "fate.cli.convert", str(ckpt), str(out), "-q",
           "--calib-tokens", str(args.calib_tokens)]
    t = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT)
    peak = 0
    while proc.poll() is None:  # VmHWM: the converter's own high-water mark (it starts afresh at exec)
        try:
            status = Path(f"/proc/{proc.pid}/status").read_text()
            peak = max(peak, int(next(l for l in status.splitlines() if l.startswith("VmHWM:")).split()[1]) * 1024)
        except (OSError, StopIteration):
            pass
        time.sleep(0.2)
    stdout, stderr = proc.communicate()
    wall = time.perf_counter() - t
    if proc.returncode:
        sys.exit(f"fate-convert failed: {stderr.strip()}")
    res = subprocess.CompletedProcess(cmd, proc.returncode, stdout, stderr)
    print(res.stderr.strip().splitlines()[-1])
    print(f"checkpoint:            {ckpt_bytes / 2**30:.2f} GiB ({args.layers} layer(s), written in {gen_s:.0f} s)")
    print(f"largest decoder layer: {largest / 2**30:.3f} GiB")
    print(f"bundle:                {out.stat().st_size / 2**30:.3f} GiB")
    print(f"wall time:             {wall:.1f} s  ({ckpt_bytes / 2**20 / wall:.1f} MiB/s of checkpoint)")
    print(f"peak RSS:              {peak / 2**30:.3f} GiB")
    print(f"peak RSS / largest layer = {peak / largest:.2f}  (target ≤ 3)")
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()

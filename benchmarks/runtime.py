"""Prefill and decode tokens/s of fate's runtime next to transformers, on CPU, all experts resident.

    python -m benchmarks.runtime [--threads 1] [--reps 5] [--variants f16,q4,...] [--work DIR]
    python -m benchmarks.runtime --kernels [--threads 1] [--compile]   # per-matrix ways, see kernels()

(from the repository root).

Builds a small random Qwen2-MoE checkpoint with tests.tiny_models.make_checkpoint (hidden 512, 8
layers, 16 experts top-4, expert FFN 512, shared expert FFN 1024, stored as float16 so that
transformers in float32 and fate compute the same function), converts it once with
``fate.convert(..., experts="f16,q4,q2")`` (cached under ``--work``), then in one process times:

* ``transformers``: the checkpoint loaded by ``AutoModelForCausalLM`` in float32 (sdpa attention, its
  default ``grouped_mm`` experts), ``generate`` greedy;
* ``fate <variant>``: ``fate.load(bundle, experts=P, policy="resident")`` — the engine fate-run uses —
  computing in float32.  ``P`` alone is what ``fate-run`` does by default on CPU: routed experts by
  :class:`fate.runtime.experts.resident.ResidentExperts` read in place from the memory map (``mapped``) and
  widened per call into cached scratch, non-expert matrices by :class:`fate.runtime.experts.resident.ResidentWeights`;
  ``P+nommap`` holds the experts in memory in their stored precision (``fate-run --no-mmap``; q4/q2 codes
  one byte each, so no unpacking per call); q4 one-token calls go through :mod:`fate.quant.kernels` (the
  native INT4 product) where it builds, ``P+torch`` keeps them on torch ops; ``P+dense`` adds a dense
  cache of every expert;
  ``P+fp32w`` keeps the engine's BundleWeights (non-expert weights widened once to float32);
  ``P+plain`` is the runtime before resident.py (DenseExperts over ExpertStore.dense, BundleWeights).
  Where the engine already installs these (``policy="resident"``), the script uses what it installed.

Both get the same prompt token ids and generate ``--new-tokens`` tokens without stopping at EOS.  One
clock for both: prefill tokens/s = prompt tokens / time to the first generated token (each side's
per-call setup included); decode tokens/s = (tokens - 1) / time from the first to the last generated
token.  Every repetition runs each fate variant right next to a transformers run (alternating which
goes first) and keeps the ratio of that pair; the table shows medians of the tokens/s and the median
(min-max) of the pair ratios.  Thread counts: ``torch.set_num_threads(--threads)``, and OMP/MKL/
OPENBLAS_NUM_THREADS set to the same value before torch is imported.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import shlex
import statistics
import sys
import time
from pathlib import Path

DEFAULT_VARIANTS = "f16,q4,q4+torch,f16+nommap,q4+nommap,q2,f16+plain,q4+plain"


def parse_args(argv=None):
    ap = argparse.ArgumentParser(prog="python -m benchmarks.runtime",
                                 description=__doc__.split("\n\n")[0])
    ap.add_argument("--threads", type=int, default=1, help="intra-op threads for both sides (default 1)")
    ap.add_argument("--reps", type=int, default=5, help="timed repetitions per system (median reported; ≥3)")
    ap.add_argument("--prompt-tokens", type=int, default=128)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--variants", default=DEFAULT_VARIANTS,
                    help="fate variants (comma list): P[+dense][+fp32w] or P+plain, P in f16, q4, q2")
    ap.add_argument("--work", default=os.path.join(os.environ.get("TMPDIR", "/tmp"), "fate-bench-runtime"),
                    help="where the checkpoint and bundle are built (reused when present)")
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--experts", type=int, default=16)
    ap.add_argument("--top-k", type=int, default=4)
    ap.add_argument("--expert-ffn", type=int, default=512)
    ap.add_argument("--shared-ffn", type=int, default=1024)
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--kv-heads", type=int, default=4)
    ap.add_argument("--device", default="cpu", help="cpu (default) or cuda: both systems run there")
    ap.add_argument("--dtype", default=None, choices=("fp32", "fp16", "bf16"),
                    help="compute dtype of both systems (default fp32 on cpu, fp16 on cuda)")
    ap.add_argument("--json", help="also write the results here")
    ap.add_argument("--kernels", action="store_true",
                    help="instead: time the ways to run one-token expert matmuls from each stored precision")
    ap.add_argument("--compile", action="store_true", help="with --kernels: include a torch.compile'd dequantization")
    args = ap.parse_args(argv)
    if args.reps < 3:
        ap.error("--reps must be at least 3 (medians)")
    for name in ("hidden", "expert_ffn", "shared_ffn"):
        if getattr(args, name) % 64:
            ap.error(f"--{name.replace('_', '-')} must be a multiple of 64 (quantization groups)")
    return args


ARGS = parse_args() if __name__ == "__main__" else None
if ARGS is not None:  # thread counts must be in the environment before torch (and its BLAS) loads
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        os.environ[var] = str(ARGS.threads)

import torch  # noqa: E402

import fate  # noqa: E402
from fate.errors import BundleError  # noqa: E402
from fate.model.experts import DenseExperts  # noqa: E402
from fate.runtime.experts.resident import ResidentExperts  # noqa: E402
from fate.runtime.weights import BundleWeights, ResidentWeights  # noqa: E402
from tests import tiny_models as TM  # noqa: E402

ARCH = "qwen2_moe"


def model_overrides(args) -> dict:
    return dict(hidden_size=args.hidden, num_attention_heads=args.heads, num_key_value_heads=args.kv_heads,
                moe_intermediate_size=args.expert_ffn, shared_expert_intermediate_size=args.shared_ffn,
                intermediate_size=args.shared_ffn, num_experts=args.experts, num_experts_per_tok=args.top_k)


def build(args, force: bool = False) -> tuple[Path, Path]:
    """(checkpoint dir, bundle path), made once per model shape under --work (again with ``force``)."""
    spec = dict(model_overrides(args), layers=args.layers, arch=ARCH, v=1)
    key = hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:12]
    d = Path(args.work) / key
    ckpt, bundle = d / "ckpt", d / "model.gguf"
    if bundle.exists() and not force:
        return ckpt, bundle
    d.mkdir(parents=True, exist_ok=True)
    t = time.perf_counter()
    print(f"building the checkpoint and bundle in {d} (once) ...", file=sys.stderr, flush=True)
    TM.make_checkpoint(ARCH, ckpt, n_layers=args.layers, dtype=torch.float16, **model_overrides(args))
    fate.convert(ckpt, bundle, experts="f16,q4,q2", calib_tokens=1024, force=True, progress=False)
    print(f"  done in {time.perf_counter() - t:.0f} s", file=sys.stderr, flush=True)
    return ckpt, bundle


class _Stamps:
    """A transformers streamer that only records when each put() happens (first put: the prompt)."""

    def __init__(self):
        self.times: list[float] = []

    def put(self, value) -> None:
        self.times.append(time.perf_counter())

    def end(self) -> None:
        pass


class HFSystem:
    name = "transformers"

    def __init__(self, ckpt: Path, prompt: list[int], new_tokens: int, device: str = "cpu",
                 dtype: torch.dtype = torch.float32):
        from transformers.generation.streamers import BaseStreamer

        self.model = TM.load_oracle(ARCH, ckpt, torch.float32).to(device=device, dtype=dtype)
        self.model.generation_config.eos_token_id = None  # always generate new_tokens
        self.ids = torch.tensor([prompt], dtype=torch.long, device=device)
        self.mask = torch.ones_like(self.ids)
        self.n = new_tokens
        self.streamer_cls = type("Stamps", (_Stamps, BaseStreamer), {})
        cfg = self.model.config
        self.describe = (f"{str(dtype).removeprefix('torch.')} on {device}, attention {cfg._attn_implementation}, "
                         f"experts {getattr(cfg, '_experts_implementation', None) or 'default'}")

    def run(self) -> tuple[float, list[float], list[int]]:
        s = self.streamer_cls()
        t0 = time.perf_counter()
        with torch.inference_mode():
            out = self.model.generate(self.ids, attention_mask=self.mask, max_new_tokens=self.n, min_new_tokens=self.n,
                                      do_sample=False, pad_token_id=0, streamer=s)
        return t0, s.times[1:], out[0, self.ids.shape[1]:].tolist()


class FateSystem:
    """``fate.load(bundle, experts=P)`` with its executor and weight source set as the variant says:
    ``P`` — ResidentExperts (no dense cache) and ResidentWeights; modifiers ``+dense`` (dense cache of
    every expert), ``+fp32w`` (the engine's BundleWeights: non-expert weights widened once to float32),
    ``+plain`` (DenseExperts over ExpertStore.dense and BundleWeights: the runtime before resident.py)."""

    def __init__(self, bundle: Path, variant: str, prompt: list[int], new_tokens: int, threads: int,
                 device: str = "cpu", dtype: str = "fp32"):
        self.name = f"fate {variant}"
        precision, *mods = variant.split("+")
        bad = set(mods) - {"dense", "fp32w", "plain", "nommap", "torch"}
        if bad or precision not in ("f16", "q4", "q2"):
            raise SystemExit(f"unknown variant {variant!r}: use P[+nommap][+torch][+dense][+fp32w] or P+plain, P in f16, q4, q2")
        self.model = m = fate.load(bundle, experts=precision, threads=threads, policy="resident", device=device,
                                   compute_dtype=dtype)
        if "plain" in mods:
            m.model.experts = DenseExperts(lambda layer, e: m.store.dense(layer, e, precision, dtype=m.dtype,
                                                                          device=m.device), m.config.act)
            self.describe = f"{precision} experts: DenseExperts over ExpertStore.dense (dequantized per use)"
        else:
            want = None if "dense" in mods else 0
            mapped = m.device.type == "cpu" and not ({"dense", "nommap"} & set(mods))
            kernels = "torch" if "torch" in mods else m.options.kernels
            ex = m.model.experts
            if (not isinstance(ex, ResidentExperts) or ex.dense_cache_bytes != want
                    or getattr(ex, "mapped", False) != mapped or ex.compute.kernels != kernels):
                ex = m.model.experts = ResidentExperts(m.store, precision, m.dtype, m.device, want, mapped=mapped,
                                                       kernels=kernels)
            if mapped:
                how = "read from the map on first use (fate-run's default, " + (
                    "f16 in place)" if precision == "f16" else "codes widened to a byte then)")
            else:
                how = f"{ex.resident_bytes / 2**20:.0f} MiB resident (fate-run --no-mmap)"
            self.describe = (f"{precision} experts: ResidentExperts, {how}, dense cache {ex.dense_bytes / 2**20:.0f} MiB"
                             + (f"; products by fate.quant.kernels ({kernels})" if ex.native else ""))
        if m.device.type != "cpu":
            self.describe += f"; non-expert weights: {type(m.model.weights).__name__} ({dtype} on {device})"
        elif "fp32w" in mods or "plain" in mods:
            if not isinstance(m.weights, BundleWeights):
                m.weights = BundleWeights(m.bundle, m.dtype, m.device, verify=False)
            m.model.weights = m.weights
            self.describe += "; non-expert weights: BundleWeights (float32)"
        else:
            if not isinstance(m.model.weights, ResidentWeights):
                m.model.weights = ResidentWeights.from_bundle(m.bundle, m.dtype, m.device)
            w = m.model.weights
            kept = sorted({str(m.bundle.tensor(n).dtype).removeprefix("torch.") for n in w.narrow_names})
            self.describe += (f"; non-expert weights: ResidentWeights ({len(w.narrow_names)} matrices kept "
                              f"{'/'.join(kept) or '-'}, {w.nbytes / 2**20:.0f} MiB)")
        self.prompt = prompt
        self.n = new_tokens
        self.params = m.sampling_params(temperature=0.0)

    def run(self) -> tuple[float, list[float], list[int]]:
        times, toks = [], []
        t0 = time.perf_counter()
        for tok in self.model.generate_ids(self.prompt, self.n, self.params, stop_at_eos=False):
            times.append(time.perf_counter())
            toks.append(tok)
        return t0, times, toks


def _figures(prompt_tokens: int, t0: float, times: list[float]) -> tuple[float, float]:
    """(prefill tok/s, decode tok/s) from the start time and the time each generated token arrived."""
    return prompt_tokens / (times[0] - t0), (len(times) - 1) / (times[-1] - times[0])


def main(args) -> int:
    torch.set_num_threads(args.threads)
    ckpt, bundle = build(args)
    g = torch.Generator().manual_seed(0)
    prompt = torch.randint(len(TM.SPECIAL_TOKENS), TM.VOCAB, (args.prompt_tokens,), generator=g).tolist()
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    dtype = args.dtype or ("fp32" if args.device == "cpu" else "fp16")
    tdtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[dtype]
    try:
        fates = [FateSystem(bundle, v, prompt, args.new_tokens, args.threads, args.device, dtype) for v in variants]
    except BundleError as e:  # a bundle cached by an older converter: make it again
        print(f"{e}; rebuilding", file=sys.stderr)
        ckpt, bundle = build(args, force=True)
        fates = [FateSystem(bundle, v, prompt, args.new_tokens, args.threads, args.device, dtype) for v in variants]
    hf = HFSystem(ckpt, prompt, args.new_tokens, args.device, tdtype)
    torch.set_num_threads(args.threads)
    systems = [hf] + fates

    results = {s.name: {"prefill": [], "decode": [], "prefill_ratio": [], "decode_ratio": [], "tokens": None}
               for s in systems}
    for s in systems:  # warm-up: first touch of pages, allocator, lazy initialisation
        s.run()
    # Each repetition runs every fate variant right next to a transformers run (the pair's order
    # alternates) and keeps the ratio within the pair: on a shared machine the load changes from one
    # minute to the next, and a ratio of two adjacent runs is far steadier than a ratio of medians.
    for rep in range(args.reps):
        k = rep % len(fates)
        for i, f in enumerate(fates[k:] + fates[:k]):
            pair = (hf, f) if (rep + i) % 2 == 0 else (f, hf)
            got = {}
            for s in pair:
                t0, times, toks = s.run()
                got[s.name] = _figures(args.prompt_tokens, t0, times)
                r = results[s.name]
                r["prefill"].append(got[s.name][0])
                r["decode"].append(got[s.name][1])
                r["tokens"] = toks
            r = results[f.name]
            r["prefill_ratio"].append(got[f.name][0] / got[hf.name][0])
            r["decode_ratio"].append(got[f.name][1] / got[hf.name][1])
        print(f"rep {rep + 1}/{args.reps}: decode vs transformers " + ", ".join(
            f"{f.name} {results[f.name]['decode_ratio'][-1]:.2f}x" for f in fates), file=sys.stderr, flush=True)

    med = statistics.median
    ref = results[hf.name]
    cmd = "python -m benchmarks.runtime " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    cfg = fates[0].model.config if fates else None
    lines = [
        f"command: {cmd.strip()}",
        f"machine: {platform.machine()} {_cpu_name()}, {os.cpu_count()} cores"
        + (f", {torch.cuda.get_device_name()}" if args.device.startswith("cuda") else "")
        + f"; device {args.device}, compute {dtype}; torch {torch.__version__}, "
        f"transformers {_hf_version()}; torch threads {torch.get_num_threads()}, "
        + ", ".join(f"{v}={os.environ.get(v, 'unset')}" for v in ("OMP_NUM_THREADS", "MKL_NUM_THREADS",
                                                                  "OPENBLAS_NUM_THREADS")),
        f"model: {ARCH}, hidden {args.hidden}, {args.layers} layers, {args.experts} experts top-{args.top_k}, "
        f"expert FFN {args.expert_ffn}, shared FFN {args.shared_ffn}, heads {args.heads}/{args.kv_heads}, "
        f"vocab {cfg.vocab_size if cfg else TM.VOCAB}; prompt {args.prompt_tokens} tokens, "
        f"{args.new_tokens} generated; {args.reps} reps",
        "",
        "| system | prefill tok/s | prefill vs transformers | decode tok/s | decode vs transformers "
        "| greedy tokens = transformers |",
        "|---|---:|---:|---:|---:|---|",
        f"| {hf.name} | {med(ref['prefill']):.0f} | 1 | {med(ref['decode']):.1f} | 1 | - |",
    ]
    for f in fates:
        r = results[f.name]
        lines.append(f"| {f.name} | {med(r['prefill']):.0f} | {med(r['prefill_ratio']):.2f}x "
                     f"({min(r['prefill_ratio']):.2f}-{max(r['prefill_ratio']):.2f}) | {med(r['decode']):.1f} | "
                     f"{med(r['decode_ratio']):.2f}x ({min(r['decode_ratio']):.2f}-{max(r['decode_ratio']):.2f}) "
                     f"| {_agreement(r['tokens'], ref['tokens'])} |")
    lines += ["", "tok/s: medians over all runs of a system; ratios: median (min-max) of the per-pair ratios", ""]
    lines += [f"- {s.name}: {s.describe}" for s in systems]
    print("\n".join(lines))
    if args.json:
        Path(args.json).write_text(json.dumps({"command": cmd, "threads": args.threads, "results": results},
                                              indent=1))
    return 0


def kernels(args) -> int:
    """Per [F, H] matrix, one token: the ways to multiply by a weight stored as f16 / q4 / q2, each over
    enough distinct matrices (>= 64 MiB as float32) that the weights come from memory, not cache, as in
    a decode step.  'exact' marks the ways whose output equals F.linear on the float32 weights."""
    import torch.nn.functional as F

    from fate import quant as Q

    torch.set_num_threads(args.threads)
    rows_, cols = args.expert_ffn, args.hidden
    count = max(16, (64 << 20) // (4 * rows_ * cols))
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, cols, generator=g)
    scratch = torch.empty(rows_ * cols)
    buf = scratch.view(rows_, cols)
    table = []

    def quantized(name):
        spec = Q.QuantSpec.default(name)
        ng = cols // spec.group_size
        out = []
        for _ in range(count):
            codes = torch.randint(0, 2 ** spec.bits, (rows_, cols), generator=g)
            scale = (torch.rand(rows_, ng, generator=g) * 0.01).half()
            zero = (torch.rand(rows_, ng, generator=g) * (2 ** spec.bits - 1)).half()
            out.append((spec, Q.pack_codes(codes, spec.bits), scale, zero, codes.to(torch.uint8)))
        return out

    w32 = [torch.randn(rows_, cols, generator=g) * 0.05 for _ in range(count)]
    w16 = [w.half() for w in w32]
    q4, q2 = quantized("q4"), quantized("q2")

    def one_byte(item):  # ResidentExperts' path for q4/q2
        spec, _, scale, zero, codes = item
        v = buf.view(rows_, cols // spec.group_size, spec.group_size)
        v.copy_(codes.view(v.shape))
        v.sub_(zero.float().unsqueeze(-1))
        v.mul_(scale.float().unsqueeze(-1))
        return F.linear(x, buf)

    def packed(item):  # fate.quant's unpack into a reused buffer
        spec, p, scale, zero, _ = item
        Q.dequantize_weight((p, scale, zero), (rows_, cols), spec, out=buf)
        return F.linear(x, buf)

    # prepare the per-call inputs outside the timed region
    q4_one = [(s_, p_, sc.float(), z.float(), c) for s_, p_, sc, z, c in q4]
    q2_one = [(s_, p_, sc.float(), z.float(), c) for s_, p_, sc, z, c in q2]
    def exact_q(it):  # the float32 weights fate computes with for a quantized item
        return Q.dequantize_weight((it[1], it[2], it[3]), (rows_, cols), it[0])

    # (name, items, way, exact float32 weights of an item)
    table += [
        ("float32 weights, F.linear", w32, lambda w: F.linear(x, w), lambda w: w),
        ("f16 resident, widen into scratch + F.linear (fate)", w16, lambda w: F.linear(x, buf.copy_(w)),
         lambda w: w.float()),
        ("q4 one byte/code, dequantize into scratch + F.linear (fate with FATE_NATIVE=0)", q4_one, one_byte, exact_q),
        ("q4 packed, fate.quant dequantize out= + F.linear", q4, packed, exact_q),
        ("q2 one byte/code, dequantize into scratch + F.linear (fate)", q2_one, one_byte, exact_q),
        ("q2 packed, fate.quant dequantize out= + F.linear", q2, packed, exact_q),
    ]
    from fate.quant import kernels as K

    if K.available():
        table.append(("q4 packed, fate.quant.kernels float32-activation product (--kernels fp32)", q4,
                      lambda it: K.q4_matvec(x, it[1], it[2], it[3]), exact_q))
        table.append(("q4 packed, fate.quant.kernels 8-bit-activation product (fate's default)", q4,
                      lambda it: K.mm(x, [(it[1], it[2], it[3])], K.Q4_I8), exact_q))
        table.append(("q2 packed, fate.quant.kernels 8-bit-activation product (fate's default)", q2,
                      lambda it: K.mm(x, [(it[1], it[2], it[3])], K.Q2_I8), exact_q))
    else:
        print(f"(fate.quant.kernels unavailable: {K.unavailable_reason()})", file=sys.stderr)
    if args.compile:
        spec4 = Q.QuantSpec.default("q4")
        ng = cols // spec4.group_size

        def deq(p, scale, zero, out):
            b = p.view(rows_, ng, spec4.group_size // 2).to(torch.int32)
            q = torch.stack(((b & 15).float(), (b >> 4).float()), -1).view(rows_, ng, spec4.group_size)
            out.copy_(((q - zero.view(rows_, ng, 1).float()) * scale.view(rows_, ng, 1).float()).view(rows_, cols))
            return out

        cdeq = torch.compile(deq, dynamic=False, fullgraph=True)
        table.append(("q4 packed, torch.compile'd dequantize + F.linear", q4,
                      lambda it: F.linear(x, cdeq(it[1], it[2], it[3], buf)), exact_q))
    try:  # torch's fused int4 kernel: w = (q - 8) * scale + offset, so offset = (8 - zero) * scale
        conv = torch.ops.aten._convert_weight_to_int4pack_for_cpu
        mm4 = torch.ops.aten._weight_int4pack_mm_for_cpu
        g4 = Q.QuantSpec.default("q4").group_size
        for dt in (torch.float32, torch.bfloat16):
            items = []
            for it in q4:
                spec, _, scale, zero, codes = it
                sz = torch.stack((scale.float(), (8 - zero.float()) * scale.float()), -1).transpose(0, 1)
                items.append((spec, it[1], scale, zero, conv(codes.to(torch.int32), 1), sz.contiguous().to(dt)))
            xd = x.to(dt)
            table.append((f"q4 torch int4pack fused kernel, {str(dt)[6:]} activations", items,
                          lambda it, xd=xd: mm4(xd, it[4], g4, it[5]), exact_q))
    except (AttributeError, RuntimeError) as e:
        print(f"(torch int4pack kernel unavailable: {e})", file=sys.stderr)
    wb = [w.bfloat16() for w in w32]
    table.append(("bfloat16 weights and activations, F.linear", list(zip(wb, w32)),
                  lambda it: F.linear(x.bfloat16(), it[0]), lambda it: it[1]))

    print(f"one-token matmul by a [{rows_}, {cols}] matrix from memory ({count} distinct matrices), "
          f"{args.threads} thread(s); median of {args.reps} passes, microseconds per matrix")
    print("| way | output = F.linear on the float32 weights | us | vs float32 |\n|---|---|---:|---:|")
    base = None
    for name, items, fn, exact_w in table:
        diff = max((fn(it).float() - F.linear(x, exact_w(it))).abs().max().item() for it in items[:4])
        times = []
        for _ in range(args.reps):
            t = time.perf_counter()
            for it in items:
                fn(it)
            times.append((time.perf_counter() - t) / len(items) * 1e6)
        us = statistics.median(times)
        base = base or us
        exact = "yes (bit for bit)" if diff == 0 else f"no (max abs diff {diff:.1e})"
        print(f"| {name} | {exact} | {us:.1f} | {base / us:.2f}x |", flush=True)
    print("\ncommand: python -m benchmarks.runtime " + " ".join(shlex.quote(a) for a in sys.argv[1:]))
    return 0


def _agreement(ours: list[int], ref: list[int]) -> str:
    if ours == ref:
        return f"all {len(ref)}"
    first = next(i for i, (a, b) in enumerate(zip(ours, ref)) if a != b)
    return f"first {first} of {len(ref)}"


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def _hf_version() -> str:
    import transformers

    return transformers.__version__


if __name__ == "__main__":
    sys.exit(kernels(ARGS) if ARGS.kernels else main(ARGS))

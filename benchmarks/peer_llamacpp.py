"""fate next to llama.cpp on the same generated checkpoint at a real model's widths, side by side in one run.

    python -m benchmarks.peer_llamacpp [--work DIR] [--reps 5] [--threads 1,2] [--steps all]

What it does, every step in ``--work`` (default ``$TMPDIR/fate-peer-llamacpp``; each step is skipped when its
output is there, so a rerun only measures):

1. **llama.cpp**: ``pip download --no-binary :all: --no-deps llama-cpp-python==VERSION`` (its source
   distribution vendors llama.cpp), then a cmake build of ``llama-bench`` and ``llama-quantize`` (native CPU
   flags, ``-j`` = cores, ``nice``).  Nothing of it enters the repository.
2. **the checkpoint**: Qwen1.5-MoE-A2.7B's widths with random float16 weights and 2 layers
   (:func:`tests.tiny_models.make_checkpoint`): hidden 2048, 16 heads (16 KV) with qkv bias, 60 experts x
   1408 top-4, a shared expert of 5632 with its sigmoid gate, vocab 8192 (its tokenizer is the tests' small
   BPE, padded by both converters).
3. **fate**: ``fate-convert`` with its defaults (q4,q2 experts, f16 non-expert tensors), and again with
   ``--dtype q8``.
4. **llama.cpp's files**: its ``convert_hf_to_gguf.py`` (run from a scratch copy whose BPE pre-tokenizer check
   is bypassed: the generated tokenizer is in no list) to f16, then ``llama-quantize ... Q4_0`` twice: with
   ``--tensor-type attn=f16 --tensor-type shexp=f16 --output-tensor-type f16 --token-embedding-type f16``
   (INT4 experts, f16 for the rest: fate's default storage) and plainly (all Q4_0).
5. **measure**: ``--reps`` rounds, each running, for every thread count, llama-bench (``-p 64 -n 32 -r 1``) on
   both files and fate on both bundles right after one another, alternating which goes first (and which thread
   count).  fate runs
   in this process through ``fate.load`` (what fate-run uses, default options: ``--kernels int8``) and
   times a 64-token prefill and 32 decoded tokens as fate-run reports them.  Ratios are taken within a
   round (fate against llama.cpp, 2 threads against 1); the table shows medians of the tokens/s and the
   median (min-max) of the round ratios.

The rows: fate (f16 non-experts) against llama.cpp with the same storage; fate ``--dtype q8`` against
llama.cpp all-Q4_0; fate at 2 threads against fate at 1.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import statistics
import subprocess
import sys
import tarfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LLAMA_CPP_PYTHON = "0.3.36"  # the llama-cpp-python source distribution whose llama.cpp is measured
WIDTHS = dict(hidden_size=2048, num_attention_heads=16, num_key_value_heads=16, moe_intermediate_size=1408,
              shared_expert_intermediate_size=5632, intermediate_size=5632, num_experts=60, num_experts_per_tok=4,
              vocab_size=8192, max_position_embeddings=4096)
LAYERS = 2
PROMPT, GEN = 64, 32


def log(msg: str) -> None:
    print(f"[peer] {msg}", file=sys.stderr, flush=True)


def run(cmd, **kw) -> subprocess.CompletedProcess:
    log("$ " + " ".join(shlex.quote(str(c)) for c in cmd))
    return subprocess.run([str(c) for c in cmd], check=True, **kw)


# --- 1. llama.cpp -----------------------------------------------------------------------------------------
def llama_source(work: Path, version: str) -> Path:
    src = work / f"llama_cpp_python-{version}" / "vendor" / "llama.cpp"
    if (src / "CMakeLists.txt").exists():
        return src
    sdist = work / "sdist"
    sdist.mkdir(parents=True, exist_ok=True)
    run([sys.executable, "-m", "pip", "download", "--no-binary", ":all:", "--no-deps",
         f"llama-cpp-python=={version}", "-d", sdist])
    tgz = next(sdist.glob(f"llama_cpp_python-{version}.tar.gz"))
    with tarfile.open(tgz) as t:
        t.extractall(work, filter="data")
    return src


def llama_build(work: Path, src: Path) -> Path:
    bin_dir = work / "build" / "bin"
    if (bin_dir / "llama-bench").exists() and (bin_dir / "llama-quantize").exists():
        return bin_dir
    build = work / "build"
    run(["nice", "-n", "10", "cmake", "-S", src, "-B", build, "-DCMAKE_BUILD_TYPE=Release", "-DBUILD_SHARED_LIBS=OFF",
         "-DLLAMA_BUILD_TESTS=OFF", "-DLLAMA_BUILD_EXAMPLES=OFF", "-DLLAMA_BUILD_SERVER=OFF", "-DLLAMA_BUILD_APP=OFF",
         "-DLLAMA_OPENSSL=OFF", "-DLLAMA_CURL=OFF", "-DGGML_NATIVE=ON"], stdout=subprocess.DEVNULL)
    run(["nice", "-n", "10", "cmake", "--build", build, "-j", str(os.cpu_count() or 2), "--target", "llama-bench",
         "llama-quantize"], stdout=subprocess.DEVNULL)
    return bin_dir


# --- 2. the checkpoint --------------------------------------------------------------------------------------
def checkpoint(work: Path) -> Path:
    ckpt = work / "ckpt"
    if (ckpt / "config.json").exists():
        return ckpt
    import torch

    from tests.tiny_models import make_checkpoint  # needs transformers (a test extra): only when generating

    log("generating the checkpoint (random weights, Qwen1.5-MoE-A2.7B widths, 2 layers) ...")
    make_checkpoint("qwen2_moe", ckpt, n_layers=LAYERS, dtype=torch.float16, **WIDTHS)
    return ckpt


# --- 3. fate's bundles --------------------------------------------------------------------------------------
def fate_bundles(work: Path, ckpt: Path) -> dict[str, Path]:
    out = {}
    for dtype in ("f16", "q8"):
        path = work / f"fate-{dtype}.gguf"
        if not path.exists():
            run([sys.executable, "-m", "fate.cli.convert", ckpt, path, "--dtype", dtype, "-q"],
                env={**os.environ, "PYTHONPATH": str(ROOT)})
        out[dtype] = path
    return out


# --- 4. llama.cpp's files -----------------------------------------------------------------------------------
def llama_files(work: Path, src: Path, bin_dir: Path, ckpt: Path) -> dict[str, Path]:
    f16 = work / "llama-f16.gguf"
    if not f16.exists():
        # a scratch copy of the converter whose BPE pre-tokenizer check lets the generated tokenizer through
        base = src / "conversion" / "base.py"
        text = base.read_text()
        marker = 'raise NotImplementedError("BPE pre-tokenizer was not recognized - update get_vocab_base_pre()")'
        if marker in text:
            base.write_text(text.replace(marker, 'res = "qwen2"  # fate benchmark: a generated test tokenizer'))
        run([sys.executable, src / "convert_hf_to_gguf.py", ckpt, "--outtype", "f16", "--outfile", f16])
    files = {"q4e": work / "llama-q4experts-f16rest.gguf", "q4": work / "llama-q4_0.gguf"}
    if not files["q4e"].exists():
        run([bin_dir / "llama-quantize", "--tensor-type", "attn=f16", "--tensor-type", "shexp=f16",
             "--output-tensor-type", "f16", "--token-embedding-type", "f16", f16, files["q4e"], "Q4_0"],
            stdout=subprocess.DEVNULL)
    if not files["q4"].exists():
        run([bin_dir / "llama-quantize", f16, files["q4"], "Q4_0"], stdout=subprocess.DEVNULL)
    return files


# --- 5. measure ---------------------------------------------------------------------------------------------
def llama_bench(bin_dir: Path, model: Path, threads: int) -> dict[str, float]:
    """{"prefill": tok/s, "decode": tok/s} of one llama-bench round (-p 64 -n 32 -r 1)."""
    out = subprocess.run([str(bin_dir / "llama-bench"), "-m", str(model), "-p", str(PROMPT), "-n", str(GEN),
                          "-t", str(threads), "-r", "1", "-o", "json"], check=True, capture_output=True, text=True)
    res = {}
    for row in json.loads(out.stdout):
        res["prefill" if row["n_prompt"] else "decode"] = float(row["avg_ts"])
    return res


class FateRun:
    def __init__(self, bundle: Path, threads: int, **options):
        import fate

        self.m = fate.load(bundle, threads=threads, **options)
        self.threads = threads
        vocab = self.m.config.vocab_size
        self.prompt = [3 + (7919 * i) % (vocab - 3) for i in range(PROMPT)]
        self.params = self.m.sampling_params(temperature=0.0)
        self.once()  # first use: pages of the map, scratch, the kernels' build

    def once(self) -> dict[str, float]:
        for _ in self.m.generate_ids(self.prompt, GEN, self.params, stop_at_eos=False):
            pass
        s = self.m.last_stats
        return {"prefill": PROMPT / s.prefill_seconds, "decode": s.decode_tokens / s.decode_seconds}


def median_range(xs: list[float]) -> str:
    return f"{statistics.median(xs):.2f}x ({min(xs):.2f}-{max(xs):.2f})"


def measure(args, bin_dir: Path, bundles: dict[str, Path], files: dict[str, Path]) -> dict:
    """{threads: {system: {"prefill": [tok/s per round], "decode": [...]}}}: every round runs every system at
    every thread count back to back (the thread counts' order alternates too), so that the ratios between
    systems and between thread counts are both taken side by side."""
    fates = {(k, t): FateRun(bundles[k], t) for t in args.threads for k in ("f16", "q8")}
    results = {t: {k: {"prefill": [], "decode": []} for k in ("llama q4e", "llama q4", "fate f16", "fate q8")}
               for t in args.threads}
    for r in range(args.reps):
        for t in (args.threads if r % 2 == 0 else args.threads[::-1]):
            rows = results[t]
            order = [("llama q4e", lambda: llama_bench(bin_dir, files["q4e"], t)),
                     ("fate f16", fates["f16", t].once),
                     ("llama q4", lambda: llama_bench(bin_dir, files["q4"], t)),
                     ("fate q8", fates["q8", t].once)]
            if r % 2:
                order = order[1::-1] + order[:1:-1]  # fate first in odd rounds
            for name, f in order:
                for metric, v in f().items():
                    rows[name][metric].append(v)
            log(f"threads {t} round {r + 1}/{args.reps} (load {os.getloadavg()[0]:.1f}): " + ", ".join(
                f"{n} {v['prefill'][-1]:.0f}/{v['decode'][-1]:.1f}" for n, v in rows.items()))
    for f in fates.values():
        f.m.close()
    return results


def report(args, results: dict) -> str:
    lines = [f"fate vs llama.cpp (llama-cpp-python {args.llama_cpp_python}'s), {LAYERS} layers at "
             f"Qwen1.5-MoE-A2.7B widths, prefill {PROMPT} / decode {GEN} tokens, {args.reps} rounds; "
             f"{platform.processor() or platform.machine()}, load {os.getloadavg()[0]:.1f}", ""]
    lines.append("| threads | system | prefill tok/s | decode tok/s | prefill ratio | decode ratio |")
    lines.append("|---|---|---:|---:|---:|---:|")
    for t, rows in results.items():
        for fate_name, peer in (("fate f16", "llama q4e"), ("fate q8", "llama q4")):
            for name in (peer, fate_name):
                v = rows[name]
                ratio = ["", ""]
                if name == fate_name:
                    ratio = [median_range([a / b for a, b in zip(v[m], rows[peer][m])]) for m in ("prefill", "decode")]
                label = {"llama q4e": "llama.cpp Q4_0 experts, f16 rest", "llama q4": "llama.cpp all Q4_0",
                         "fate f16": "fate q4 experts, f16 rest (vs the row above)",
                         "fate q8": "fate q4 experts, --dtype q8 (vs the row above)"}[name]
                lines.append(f"| {t} | {label} | {statistics.median(v['prefill']):.1f} | "
                             f"{statistics.median(v['decode']):.1f} | {ratio[0]} | {ratio[1]} |")
    if 1 in results and 2 in results:
        lines.append("")
        for name in ("fate f16", "fate q8", "llama q4e", "llama q4"):
            d1, d2 = results[1][name]["decode"], results[2][name]["decode"]
            lines.append(f"{name}: decode at 2 threads / 1 thread = {median_range([b / a for a, b in zip(d1, d2)])} "
                         "(per round)")
    return "\n".join(lines)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.peer_llamacpp", description=__doc__.split("\n\n")[0])
    ap.add_argument("--work", type=Path, default=Path(os.environ.get("TMPDIR", "/tmp")) / "fate-peer-llamacpp")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--threads", default="1,2", help="comma list of thread counts (default 1,2)")
    ap.add_argument("--llama-cpp-python", default=LLAMA_CPP_PYTHON, help="the sdist version whose llama.cpp is built")
    ap.add_argument("--json", type=Path, help="also write the figures here")
    args = ap.parse_args(argv)
    args.threads = [int(t) for t in args.threads.split(",")]
    args.work.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    src = llama_source(args.work, args.llama_cpp_python)
    bin_dir = llama_build(args.work, src)
    ckpt = checkpoint(args.work)
    bundles = fate_bundles(args.work, ckpt)
    files = llama_files(args.work, src, bin_dir, ckpt)
    log(f"ready in {time.perf_counter() - t0:.0f} s; measuring")
    results = measure(args, bin_dir, bundles, files)
    text = report(args, results)
    print(text)
    if args.json:
        args.json.write_text(json.dumps({str(t): r for t, r in results.items()}, indent=1))


if __name__ == "__main__":
    main()

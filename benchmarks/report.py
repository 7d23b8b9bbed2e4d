"""Regenerate docs/REPORT.md (and its plots in docs/report/) in one go: fate-inspect, fate-perplexity and
fate-bench on the built-in demo model and on a generated larger model, each shown with the exact
command that produced it.

    python -m benchmarks.report            # from the repository root; ~10 min on 2 cores; needs the test extra

The commands run as subprocesses, so what the page shows is what a user would type (the console scripts
next to this Python, importing this tree's fate). Everything under an emulated link is labelled so by
fate-bench itself.
"""

from __future__ import annotations

import argparse
import os
import platform
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from tests.tiny_models import make_checkpoint

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
DEMO = ROOT / "fate" / "data" / "demo.gguf"


def run(cmd: list[str], env: dict) -> str:
    """Run one command; return its stdout (raise with its stderr if it fails)."""
    res = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT)
    if res.returncode != 0:
        raise SystemExit(f"{shlex.join(cmd)} failed ({res.returncode}):\n{res.stderr[-2000:]}")
    return res.stdout.strip()


def shown(cmd: list[str], tmp: Path) -> str:
    """The command as a reader would type it: tools by name, paths relative to the repository."""
    out = []
    for part in cmd:
        p = part.replace(str(BIN) + "/", "").replace(str(ROOT) + "/", "").replace(str(tmp) + "/", "$WORK/")
        out.append(p)
    return shlex.join(out)


def build_larger(work: Path, env: dict) -> Path:
    """qwen2_moe, hidden 512, 8 layers, 32 experts top-4, expert FFN 512: experts dominate the bytes."""
    ckpt = work / "larger-hf"
    make_checkpoint("qwen2_moe", ckpt, n_layers=8, hidden_size=512, num_attention_heads=8, num_key_value_heads=4,
                    num_experts=32, num_experts_per_tok=4, moe_intermediate_size=512,
                    shared_expert_intermediate_size=512, intermediate_size=512)
    bundle = work / "larger.gguf"
    run([str(BIN / "fate-convert"), str(ckpt), str(bundle), "-q", "--calib-tokens", "2048"], env)
    return bundle


def main() -> None:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.report",
                                 description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--out", default=str(ROOT / "docs" / "REPORT.md"))
    args = ap.parse_args()
    out = Path(args.out)
    plots = out.parent / "report"
    plots.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    with tempfile.TemporaryDirectory() as tmp_s:
        tmp = Path(tmp_s)
        # this tree's fate, whichever checkout the console scripts were installed from
        path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)
        env = dict(os.environ, FATE_CACHE_DIR=str(tmp / "cache"), OMP_NUM_THREADS="1", PYTHONPATH=path)
        larger = build_larger(tmp, env)
        text = ROOT / "README.md"  # held-out text for perplexity: not in the demo's training data
        r = str(args.reps)
        sections = [
            ("Demo model: fate-inspect", [str(BIN / "fate-inspect"), str(DEMO), "-q",
                                          "--plot", str(plots / "demo-inspect.png")], "demo-inspect.png"),
            ("Demo model: perplexity by stored precision", [str(BIN / "fate-perplexity"), str(DEMO), "-f", str(text),
                                                           "-c", "256", "--compare", "-q", "-t", "1"], None),
            ("Demo model: fate-bench", [str(BIN / "fate-bench"), str(DEMO), "--mem", "50%", "--link", "ratio:1",
                                        "-r", r, "-n", "32", "-t", "1", "--plot", str(plots / "demo-bench.png")],
             "demo-bench.png"),
            ("Larger generated model: fate-inspect", [str(BIN / "fate-inspect"), str(larger), "-q"], None),
            ("Larger generated model: fate-bench", [str(BIN / "fate-bench"), str(larger), "--mem", "25%,50%",
                                                    "--link", "ratio:1", "-r", r, "-n", "32", "--prompt-tokens",
                                                    "128", "-t", "1", "--plot", str(plots / "larger-bench.png")],
             "larger-bench.png"),
        ]
        parts = [
            "# Benchmark report (generated)",
            "",
            f"Written by `python -m benchmarks.report` on {time.strftime('%Y-%m-%d')} "
            f"({platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}); do not edit by hand: "
            "re-run the script. Hand-written analysis with targets lives in [BENCHMARKS.md](BENCHMARKS.md).",
            "",
            "The larger model is `tests.tiny_models.make_checkpoint('qwen2_moe', n_layers=8, hidden_size=512, "
            "num_experts=32, num_experts_per_tok=4, moe_intermediate_size=512, ...)` with random weights, converted "
            "with `fate-convert -q --calib-tokens 2048` ($WORK is a temporary folder). Rows measured under "
            "`--link` are **emulated** (no real host-to-device link on this machine).",
        ]
        for title, cmd, plot in sections:
            print(f"[{time.time() - t0:6.0f} s] {title}", file=sys.stderr)
            output = run(cmd, env)
            parts += ["", f"## {title}", "", "```sh", shown(cmd, tmp), "```", "", "```", output, "```"]
            if plot:
                parts += ["", f"![{title}](report/{plot})"]
    out.write_text("\n".join(parts) + "\n", encoding="utf-8")
    print(f"wrote {out} in {time.time() - t0:.0f} s", file=sys.stderr)


if __name__ == "__main__":
    main()

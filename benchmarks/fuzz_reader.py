"""Fuzzing the bundle reader at scale: the cases of tests.test_fuzz, many thousands of them.

Converts the tiny 2-layer OLMoE of the fuzz test to ``.gguf`` and ``.safetensors``, then for each case
``i`` draws one mutation from ``random.Random(f"{seed}:{i}")`` (so any case can be replayed alone with
``--replay i``), opens the result with ``fate.load`` and, for every ``--token-every``-th case, generates
one greedy token and compares it with the unmutated bundle's.  Cases run in worker processes, a chunk at
a time, so that a crash (a signal, not an exception) is recorded against the case that caused it and the
run goes on.  Prints counts by outcome — ok (identical token / opened), BundleError by class, other
exceptions with their messages, wrong tokens, timeouts, crashes — and the peak RSS growth of the
workers; ``--json`` writes them, ``--doc`` appends them to docs/BENCHMARKS.md as the section
"Fuzzing the bundle reader".

    nice python -m benchmarks.fuzz_reader --cases 10000 --token-every 10 --doc     # from the repository root
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from tests import test_fuzz as F

ROOT = Path(__file__).resolve().parents[1]

SECTION = "Fuzzing the bundle reader"


def _case(pristine, seed: int, i: int):
    rng = random.Random(f"{seed}:{i}")
    ch = F.RandomChooser(rng)
    p = pristine[ch.pick(["gguf", "safetensors"])]
    desc, data = F.mutate(p, ch)
    return p, desc, data


def _load_pristine(workdir: Path):
    tokens = json.loads((workdir / "tokens.json").read_text())
    return {fmt: F.take_apart(workdir / f"tiny.{fmt}", tokens[fmt]) for fmt in ("gguf", "safetensors")}


def worker(args) -> None:
    """Run cases [start, stop) and write one JSON line per case: "begin" before it, the outcome after."""
    torch.set_num_threads(1)
    workdir = Path(args.workdir)
    pristine = _load_pristine(workdir)
    cases = workdir / "cases"
    cases.mkdir(exist_ok=True)
    # one warm-up load so that lazily imported modules do not count as growth
    F.run_case(pristine["gguf"], pristine["gguf"].raw, cases)
    base = F.reset_peak_rss()
    with open(args.out, "a", buffering=1) as out:
        for i in range(args.start, args.stop):
            p, desc, data = _case(pristine, args.seed, i)
            out.write(json.dumps({"begin": i, "desc": desc}) + "\n")
            t = time.perf_counter()
            o = F.run_case(p, data, cases, generate=args.token_every > 0 and i % args.token_every == 0)
            out.write(json.dumps({"case": i, "fmt": p.fmt, "desc": desc, "kind": o.kind, "cls": o.error_class,
                                  "detail": o.detail[:300], "seconds": time.perf_counter() - t}) + "\n")
        out.write(json.dumps({"rss_growth": F.peak_rss() - base}) + "\n")


def make_bundles(workdir: Path) -> None:
    pristine = F.make_pristine(workdir)
    (workdir / "tokens.json").write_text(json.dumps({fmt: p.token_ids for fmt, p in pristine.items()}))


def run(args) -> dict:
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="fate-fuzz-"))
    workdir.mkdir(parents=True, exist_ok=True)
    if not (workdir / "tokens.json").exists():
        make_bundles(workdir)
    log = workdir / "cases.jsonl"
    log.unlink(missing_ok=True)
    t0 = time.perf_counter()
    start, crashes, rss = 0, [], []
    while start < args.cases:
        stop = min(args.cases, start + args.chunk)
        cmd = [sys.executable, "-m", "benchmarks.fuzz_reader", "--worker", "--workdir", str(workdir),
               "--seed", str(args.seed), "--start", str(start), "--stop", str(stop), "--out", str(log),
               "--token-every", str(args.token_every)]
        rc = subprocess.run(cmd, cwd=ROOT).returncode
        lines = [json.loads(line) for line in log.read_text().splitlines() if line.strip()]
        done = {d["case"] for d in lines if "case" in d}
        if rc != 0:
            begun = [d for d in lines if "begin" in d and d["begin"] not in done and d["begin"] >= start]
            if not begun:
                raise SystemExit(f"worker for cases {start}..{stop} failed (exit {rc}) before its first case")
            bad = begun[-1]
            crashes.append({"case": bad["begin"], "desc": bad["desc"], "exit": rc})
            start = bad["begin"] + 1
        else:
            rss += [d["rss_growth"] for d in lines if "rss_growth" in d]
            start = stop
        print(f"\r{start}/{args.cases} cases", end="", file=sys.stderr, flush=True)
    print(file=sys.stderr)
    lines = [json.loads(line) for line in log.read_text().splitlines() if line.strip()]
    results = [d for d in lines if "case" in d]
    rss = [d["rss_growth"] for d in lines if "rss_growth" in d]
    return summarize(results, crashes, rss, time.perf_counter() - t0, args)


def summarize(results, crashes, rss, seconds, args) -> dict:
    kinds = collections.Counter(d["kind"] for d in results)
    by_class = collections.Counter(d["cls"] for d in results if d["kind"] == "bundle-error")
    others = collections.Counter(d["detail"] for d in results if d["kind"] == "other-exception")
    bad = [d for d in results if d["kind"] in ("bad-drift", "timeout", "other-exception")]
    ops = collections.Counter(d["desc"].split(":")[1].strip().split(" ")[0] for d in results)
    token_cases = sum(1 for d in results if d["kind"] != "ok-opened" and
                      (args.token_every > 0 and d["case"] % args.token_every == 0))
    slowest = max(results, key=lambda d: d["seconds"]) if results else None
    return {
        "cases": len(results) + len(crashes), "seed": args.seed, "token_every": args.token_every,
        "cases_with_token": token_cases, "seconds": seconds,
        "outcomes": dict(kinds), "bundle_errors_by_class": dict(by_class),
        "other_exceptions": dict(others.most_common(20)), "crashes": crashes,
        "other_exception_types": dict(collections.Counter(
            d["cls"] for d in results if d["kind"] == "other-exception").most_common()),
        "failures": bad[:50], "max_case_seconds": slowest["seconds"] if slowest else 0.0,
        "slowest_case": slowest["desc"] if slowest else "", "max_worker_rss_growth_bytes": max(rss, default=0),
        "mutations": dict(ops.most_common()),
        "by_format": dict(collections.Counter(d["fmt"] for d in results)),
    }


def _failures(s: dict) -> int:
    o = s["outcomes"]
    return o.get("other-exception", 0) + o.get("bad-drift", 0) + o.get("timeout", 0) + len(s["crashes"])


def report_text(s: dict, before: dict | None = None, before_label: str = "") -> str:
    o = s["outcomes"]
    failures = _failures(s)
    lines = [
        f"## {SECTION}",
        "",
        f"`python -m benchmarks.fuzz_reader --cases {s['cases']} --token-every {s['token_every']} --seed {s['seed']}`: "
        f"{s['cases']} mutated copies of the tiny 2-layer OLMoE bundle (q4 experts; "
        f"{s['by_format'].get('gguf', 0)} `.gguf`, {s['by_format'].get('safetensors', 0)} `.safetensors`), each "
        f"opened with `fate.load`; {s['cases_with_token']} of them also generate one greedy token, compared with "
        "the unmutated bundle's. Mutations (tests/test_fuzz.py): byte flips, overwrites, truncations, appended "
        "bytes, header integers (counts, lengths, value types, dims, tensor types, offsets), metadata values "
        "(wrong type, out of range, deleted, added, duplicated), model-config and generation fields, tensor "
        "table entries, safetensors header text (duplicate keys, deep nesting, junk).",
        "",
        "| outcome | cases |",
        "|---|---:|",
        f"| works, same token | {o.get('ok-identical', 0)} |",
        f"| opens (no token asked) | {o.get('ok-opened', 0)} |",
        f"| works, other token, explained (config field no other key mirrors) | {o.get('ok-drift', 0)} |",
    ]
    for cls, n in sorted(s["bundle_errors_by_class"].items(), key=lambda kv: -kv[1]):
        lines.append(f"| `{cls}` | {n} |")
    lines += [
        f"| other exception | {o.get('other-exception', 0)} |",
        f"| wrong token, unexplained | {o.get('bad-drift', 0)} |",
        f"| over {_case_seconds()} s (hang) | {o.get('timeout', 0)} |",
        f"| crash (process killed by a signal) | {len(s['crashes'])} |",
        "",
        f"Failures: **{failures}**. Slowest case {s['max_case_seconds']:.2f} s; largest peak-RSS growth of a "
        f"worker over its chunk of cases {s['max_worker_rss_growth_bytes'] / 2**20:.1f} MiB; "
        f"{s['seconds'] / 60:.1f} min in all on {os.cpu_count()} cores (niced, one torch thread).",
    ]
    if s["other_exceptions"]:
        lines += ["", "Other exceptions:", ""] + [f"* {n} × `{msg}`" for msg, n in s["other_exceptions"].items()]
    if s["crashes"]:
        lines += ["", "Crashes:", ""] + [f"* case {c['case']}: {c['desc']} (exit {c['exit']})" for c in s["crashes"]]
    if before:
        b = before["outcomes"]
        kinds = collections.Counter(before.get("other_exception_types") or {})
        if not kinds:  # older summaries: types from the most frequent messages only
            for msg, n in before["other_exceptions"].items():
                kinds[msg.split(":")[0]] += n
        top = ", ".join(f"`{k}` ×{n}" for k, n in kinds.most_common(6))
        lines += [
            "",
            f"The same {before['cases']} cases (same seed) against {before_label or 'the reader before hardening'}: "
            f"**{_failures(before)} failures** — {b.get('other-exception', 0)} other exceptions ({top}), "
            f"{b.get('bad-drift', 0)} wrong tokens without an error, "
            f"{b.get('timeout', 0)} cases over {_case_seconds()} s, peak-RSS growth of a worker up to "
            f"{before['max_worker_rss_growth_bytes'] / 2**30:.1f} GiB.",
        ]
    return "\n".join(lines) + "\n"


def _case_seconds() -> int:
    return F.CASE_SECONDS


def append_to_doc(text: str, doc: Path) -> None:
    """Append the section in one write with O_APPEND (other helpers write other sections of the file)."""
    doc.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(doc, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        size = os.fstat(fd).st_size
        lead = ""
        if size:
            with open(doc, "rb") as f:
                f.seek(max(0, size - 2))
                tail = f.read()
            lead = "" if tail.endswith(b"\n\n") else ("\n" if tail.endswith(b"\n") else "\n\n")
        os.write(fd, (lead + text).encode())
    finally:
        os.close(fd)


def replay(args) -> None:
    workdir = Path(args.workdir)
    pristine = _load_pristine(workdir)
    p, desc, data = _case(pristine, args.seed, args.replay)
    print(desc)
    (workdir / "cases").mkdir(exist_ok=True)
    print(F.run_case(p, data, workdir / "cases"))


def main() -> None:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.fuzz_reader",
                                 description=__doc__.split("\n\n")[0])
    ap.add_argument("--cases", type=int, default=10_000)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--token-every", type=int, default=10, help="generate one token for every Nth case (0: never)")
    ap.add_argument("--chunk", type=int, default=1000, help="cases per worker process")
    ap.add_argument("--workdir", help="where the bundles and the case log go (default: a new temp dir)")
    ap.add_argument("--json", help="write the summary here")
    ap.add_argument("--doc", action="store_true", help=f"append the section '{SECTION}' to docs/BENCHMARKS.md")
    ap.add_argument("--replay", type=int, help="run case N alone and print it (needs --workdir of a run)")
    ap.add_argument("--compare", help="--json summary of the same run on another tree (e.g. before a change)")
    ap.add_argument("--compare-label", default="", help="what --compare measured, for the report")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--start", type=int, default=0, help=argparse.SUPPRESS)
    ap.add_argument("--stop", type=int, default=0, help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        return worker(args)
    if args.replay is not None:
        return replay(args)
    summary = run(args)
    before = json.loads(Path(args.compare).read_text()) if args.compare else None
    text = report_text(summary, before, args.compare_label)
    print(text)
    if args.json:
        Path(args.json).write_text(json.dumps(summary, indent=2) + "\n")
    if args.doc:
        append_to_doc(text, ROOT / "docs" / "BENCHMARKS.md")


if __name__ == "__main__":
    main()

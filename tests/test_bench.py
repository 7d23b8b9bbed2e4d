"""fate-bench: the table, JSON and CSV parse; the figures are the engine's own; repetitions alternate;
emulated rows are labelled; bad inputs are one-line errors."""

from __future__ import annotations

import csv
import json
import sys

import pytest
from click.testing import CliRunner

import fate
from fate.tools import bench
from fate.cli.bench import main
from fate.tools.bench import ROW_KEYS, run_bench, synthetic_prompt

ARCH = "qwen2_moe"  # shared expert + routed experts: the offloading engine's usual case
FAST = ["-n", "4", "-r", "1", "--prompt-tokens", "16", "--no-progress"]


def _invoke(args):
    return CliRunner().invoke(main, [str(a) for a in args])


def _table(stdout: str) -> list[list[str]]:
    lines = [ln for ln in stdout.splitlines() if ln.startswith("|")]
    cells = [[c.strip() for c in ln.strip().strip("|").split("|")] for ln in lines]
    assert set(cells[1][0]) <= {"-", ":"}, "second line is the markdown separator"
    return [cells[0]] + cells[2:]


def _prompt(path, n=16):
    m = fate.load(path)
    ids = synthetic_prompt(m.tokenizer, n)
    m.close()
    return ids


def test_cli_table_json_csv(converted, tmp_path):
    path = converted[ARCH][1]
    js, cs = tmp_path / "b.json", tmp_path / "b.csv"
    r = _invoke([path, "--policies", "ondemand,lru,fate,resident", "--mem", "50%", "--link", "none,2GB/s",
                 *FAST, "--json", js, "--csv", cs, "--per-layer"])
    assert r.exit_code == 0, r.output
    table = _table(r.stdout)
    head, body = table[0], table[1:]
    assert head[:5] == ["policy", "mem", "link", "prefill t/s", "decode t/s"]
    assert {"hit rate", "dec recall", "MB q4", "stall s", "x resident"} <= set(head)
    # (policy, mem, link) per row: 3 offloaded policies x 1 budget x 2 links, then resident once
    got = [(c[0], c[1], c[2]) for c in body]
    assert got == [("ondemand", "50%", "none"), ("lru", "50%", "none"), ("fate", "50%", "none"),
                   ("ondemand", "50%", "2GB/s (emulated)"), ("lru", "50%", "2GB/s (emulated)"),
                   ("fate", "50%", "2GB/s (emulated)"), ("resident", "all", "none")]
    col = {h: i for i, h in enumerate(head)}
    for c in body:
        assert float(c[col["decode t/s"]].split()[0]) > 0 and float(c[col["prefill t/s"]].split()[0]) > 0
    ondemand = body[0]
    assert ondemand[col["decode x od"]] == "1.00" and ondemand[col["hit rate"]] == "0.0%"
    assert body[-1][col["x resident"]] == "1.00" and body[-1][col["hit rate"]] == "-"
    assert "(emulated)" in r.stdout.split("\n| ")[-1]  # the footnote explains the label

    doc = json.loads(js.read_text())
    rows, meta = doc["rows"], doc["meta"]
    assert len(rows) == 7 and all(list(row) == list(ROW_KEYS) for row in rows)
    assert meta["prompt_tokens"] == 16 and meta["n"] == 4 and meta["reps"] == 1 and meta["mems"] == ["50%"]
    assert meta["profile"]["fresh"] and meta["profile"]["layer_decode_seconds"] > 0
    for row in rows:
        assert row["reps"] == 1 and row["decode"]["tokens"] == 3 and row["prefill"]["tokens"] == 16
        assert row["error"] is None and row["failed_runs"] == 0
        assert row["emulated"] == (row["link"] == "2GB/s")
        run = row["runs"][0]
        dec = row["decode"]
        assert dec["tokens_per_s"] == run["decode"]["tokens_per_s"] == dec["tokens_per_s_min"] == dec["tokens_per_s_max"]
        assert len(run["generated_token_ids"]) == 4
        if row["policy"] == "resident":
            assert row["experts"] is None and row["budget"] is None
        else:
            ex, t = row["experts"], row["experts"]["total"]
            assert t["needed"] == t["hits"] + t["late_prefetches"] + t["misses"] > 0
            assert ex["mb_by_precision"]["q4"] == pytest.approx(ex["bytes_by_precision"]["q4"] / 1e6)
            b = row["budget"]
            assert 0 < b["slot_fraction"] < 1 and not b["fully_resident"]
            assert len(ex["layers"]) == len(b["slots_per_layer"]) and sum(b["slots_per_layer"]) == b["slots"]
            for k in ("needed", "hits", "misses", "late_prefetches", "evictions"):  # layers add up to the totals
                assert sum(lay[k] for lay in ex["layers"]) == t[k] == ex["prefill"][k] + ex["decode"][k]
    emu = [row for row in rows if row["emulated"]]
    assert emu and all("emulated" in row["link_label"] and "2 GB/s" in row["link_label"] for row in emu)
    assert all(row["link_bytes_per_s"] == 2e9 and row["copy_ms"] > 0 and row["effective_ratio"] > 0 for row in emu)
    assert "one expert copy: 2GB/s" in r.stdout
    assert "fate mem 50% link 2GB/s (emulated):" in r.stdout and "  layer  slots  needed" in r.stdout
    # greedy decoding: every policy generates the resident model's tokens (int2_share only moves prefill)
    res = rows[-1]["runs"][0]["generated_token_ids"]
    assert all(row["runs"][0]["generated_token_ids"] == res for row in rows if row["policy"] in ("ondemand", "lru"))

    with open(cs, newline="") as f:
        recs = list(csv.DictReader(f))
    assert len(recs) == 7 and recs[0]["policy"] == "ondemand" and "mb_q4" in recs[0] and "runs" not in recs[0]
    assert float(recs[3]["decode.tokens_per_s"]) == pytest.approx(rows[3]["decode"]["tokens_per_s"])
    assert int(recs[0]["experts.total.needed"]) == rows[0]["experts"]["total"]["needed"]


def test_figures_are_the_engines(converted):
    """run_bench's counts are what fate.load reports for the same configuration and prompt."""
    path = converted[ARCH][1]
    ids = _prompt(path)
    rows = run_bench(path, policies=["ondemand", "lru", "fate"], mems=["50%"], links=["none"], prompt_ids=ids,
                     n=4, reps=1)
    by = {row["policy"]: row for row in rows}
    assert set(by) == {"ondemand", "lru", "fate"}  # no resident row when it is not asked for
    blob = fate.load(path).store.blob_bytes("q4")

    def direct(policy):
        m = fate.load(path, experts="q4", policy=policy, mem="50%", link="none")
        out = m.generate(ids, 4, temperature=0.0, stop_at_eos=False)
        m.close()
        return out.stats.to_dict()

    # ondemand is fully deterministic: every use is a miss and a copy
    d = direct("ondemand")
    row, ex = by["ondemand"], d["experts"]
    t, et = row["experts"]["total"], ex["total"]
    assert (t["needed"], t["hits"], t["misses"]) == (et["needed"], et["hits"], et["misses"])
    assert row["experts"]["bytes_by_precision"] == ex["bytes_by_precision"] == {"q4": et["needed"] * blob}
    assert row["runs"][0]["generated_token_ids"] == d["generated_token_ids"]
    assert row["prefill"]["tokens"] == d["prefill"]["tokens"] and row["decode"]["tokens"] == d["decode"]["tokens"]
    assert row["budget"]["slots"] == d["budget"]["slots"]
    # lru and fate: which expert is needed depends only on the (greedy) tokens; hits depend on timing
    for policy in ("lru", "fate"):
        d = direct(policy)
        row, ex = by[policy], d["experts"]
        assert row["experts"]["total"]["needed"] == ex["total"]["needed"], policy
        assert row["runs"][0]["generated_token_ids"] == d["generated_token_ids"], policy
        assert row["budget"]["slots"] == d["budget"]["slots"], policy
    # lru never prefetches: each miss is one q4 copy, and the hit rate is hits / needed
    t = by["lru"]["experts"]["total"]
    assert by["lru"]["experts"]["bytes_by_precision"] == {"q4": t["misses"] * blob} and t["late_prefetches"] == 0
    assert t["hit_rate"] == pytest.approx(t["hits"] / t["needed"])
    # without a link a copy costs less than predicting it: fate's value rule does not predict at all
    assert by["fate"]["experts"]["decode"]["prefetch_recall"] is None
    assert by["lru"]["experts"]["decode"]["prefetch_recall"] is None


def test_repetitions_alternate_and_aggregate(converted, monkeypatch):
    """Forwards then backwards over the configurations; medians, spreads and ratios from the runs."""
    path = converted[ARCH][1]
    calls = []
    speed = {"ondemand": 10.0, "lru": 20.0, "fate": 40.0, "resident": 50.0}

    def fake(bundle, policy, mem, link, prompt_ids, n, opts):
        rep = sum(1 for c in calls if c == (policy, mem, link))
        calls.append((policy, mem, link))
        scale = (1.0, 2.0, 0.5)[rep]  # median 1.0, min 0.5, max 2.0
        off = policy != "resident"
        counts = {"needed": 10 + rep, "hits": 5, "late_prefetches": 0, "misses": 5 + rep, "evictions": rep,
                  "predicted_needed": 0, "named": 0, "named_needed": 0, "stall_seconds": 0.1 * (rep + 1),
                  "hit_rate": 0.5, "prefetch_recall": None, "prefetch_precision": None}
        experts = {"policy": policy, "link": {"kind": "bandwidth" if link != "none" else "none", "label": link,
                                              "emulated": link != "none",
                                              "bytes_per_s": 1e9 if link != "none" else 0.0},
                   "total": counts, "prefill": counts, "decode": counts, "layers": [{"layer": 0, **counts}],
                   "bytes_by_precision": {"q4": 1000 * (rep + 1)}}
        return {"prefill": {"tokens": 8, "seconds": 1.0, "tokens_per_s": 2 * speed[policy] * scale},
                "decode": {"tokens": n - 1, "seconds": 1.0, "tokens_per_s": speed[policy] * scale},
                "generated_tokens": n, "stop_reason": "length", "load_seconds": 0.0, "peak_rss_bytes": 1,
                "generated_token_ids": [1] * n, "experts": experts if off else None,
                "budget": {"slots": 7, "slots_per_layer": [7], "slot_fraction": 0.5, "budget_bytes": 1,
                           "fully_resident": False} if off else None}

    monkeypatch.setattr(bench, "_one_run", fake)
    rows = run_bench(path, mems=["25%", "50%"], links=["none", "1GB/s"], n=4, reps=3, prompt_tokens=8)
    configs = [(p, m, ln) for m in ("25%", "50%") for ln in ("none", "1GB/s") for p in ("ondemand", "lru", "fate")]
    configs.append(("resident", "all", "none"))
    assert calls == configs + configs[::-1] + configs
    assert [(r["policy"], r["mem"], r["link"]) for r in rows] == configs
    for r in rows:
        s = speed[r["policy"]]
        dec, pre = r["decode"], r["prefill"]
        assert (dec["tokens_per_s"], dec["tokens_per_s_min"], dec["tokens_per_s_max"]) == (s, 0.5 * s, 2 * s)
        assert pre["tokens_per_s"] == 2 * s and r["reps"] == 3
        assert dec["x_resident"] == pytest.approx(s / 50.0)
        if r["policy"] == "resident":
            assert dec["x_ondemand"] is None and r["experts"] is None
        else:
            assert dec["x_ondemand"] == pytest.approx(s / 10.0)
            assert pre["x_ondemand"] == pytest.approx(s / 10.0)
            t = r["experts"]["total"]
            assert t["needed"] == 11 and t["misses"] == 6 and t["evictions"] == 1 and isinstance(t["needed"], int)
            assert r["experts"]["bytes_by_precision"] == {"q4": 2000} and r["experts"]["mb_by_precision"] == {"q4": 0.002}
            assert t["stall_seconds"] == pytest.approx(0.2)
            assert r["experts"]["layers"] == [{"layer": 0, **t}]
            assert r["emulated"] == (r["link"] == "1GB/s")
        if r["emulated"]:  # one expert over 1 GB/s, against resident's 1/50 s per token over the layers
            m = fate.load(path)
            blob, layers = m.store.blob_bytes("q4"), m.config.n_layers
            m.close()
            assert r["copy_ms"] == pytest.approx(1e3 * blob / 1e9)
            assert r["effective_ratio"] == pytest.approx((blob / 1e9) / (1 / 50.0 / layers))
        else:
            assert r["copy_ms"] is None and r["effective_ratio"] is None
    body = _table(bench.table_text(rows))[1:]
    assert [c[2] for c in body] == [ln + (" (emulated)" if ln != "none" else "") for _, _, ln in configs]
    assert body[0][3] == "20.0 (10.0–40.0)" and body[0][4] == "10.0 (5.0–20.0)"  # median (min–max)


def test_a_failing_configuration_is_reported_not_fatal(converted, monkeypatch, tmp_path):
    path = converted[ARCH][1]
    real = bench._one_run

    def flaky(bundle, policy, mem, link, prompt_ids, n, opts):
        if policy == "fate":
            raise RuntimeError("layer 2: no expert slot could be freed (cache of 2 slots)")
        return real(bundle, policy, mem, link, prompt_ids, n, opts)

    monkeypatch.setattr(bench, "_one_run", flaky)
    js = tmp_path / "b.json"
    r = _invoke([path, "--policies", "ondemand,fate", "--mem", "50%", "--link", "none", *FAST, "--json", js])
    assert r.exit_code == 1
    body = _table(r.stdout)[1:]
    assert [c[0] for c in body] == ["ondemand", "fate †"]
    assert "no expert slot could be freed" in r.stdout and "failed in 1 of 1" in r.stdout
    assert r.stderr.strip().splitlines()[-1].startswith("error: 1 configuration(s) failed")
    rows = json.loads(js.read_text())["rows"]
    assert rows[1]["error"].startswith("RuntimeError") and rows[1]["failed_runs"] == 1 and rows[1]["reps"] == 0
    assert rows[1]["decode"] is None and rows[0]["error"] is None


def test_prompt_choices(converted, tmp_path):
    path = converted[ARCH][1]
    m = fate.load(path)
    a, b = synthetic_prompt(m.tokenizer, 40), synthetic_prompt(m.tokenizer, 40)
    long = synthetic_prompt(m.tokenizer, 3000)  # longer than the text: it repeats
    text_ids = m.encode_prompt("the quick brown fox")
    m.close()
    assert a == b and len(a) == 40 and len(long) == 3000 and long[:40] == a
    rows = run_bench(path, policies="resident", prompt_ids=text_ids, n=3, reps=1)
    assert len(rows) == 1 and rows[0]["prefill"]["tokens"] == len(text_ids) and rows[0]["mem"] == "all"
    f = tmp_path / "p.txt"
    f.write_text("the quick brown fox")
    r = _invoke([path, "--policies", "resident", "-f", f, "-n", "3", "-r", "1", "--no-progress", "--json",
                 tmp_path / "b.json"])
    assert r.exit_code == 0, r.output
    assert json.loads((tmp_path / "b.json").read_text())["rows"][0]["prefill"]["tokens"] == len(text_ids)


@pytest.mark.parametrize("args, needle", [
    (["--policies", "fate,warp"], "unknown policy 'warp'"),
    (["--policies", "fate,,lru"], "empty item"),
    (["--mem", "25%,lots"], "'lots' is not a memory size"),
    (["--link", "ratio:1,fast"], "'fast' is not a link"),
    (["--link", "12Gb/s"], "bits per second"),
    (["--mem", "1%"], "below the minimum"),
    (["-n", "1"], "-n 1"),
    (["-r", "0"], "-r 0"),
    (["-p", "hello", "--prompt-tokens", "5"], "not both"),
    (["--prompt-tokens", "100000"], "exceeds the context"),
])
def test_bad_inputs_are_one_line_errors(converted, args, needle):
    path = converted[ARCH][1]
    base = ["-n", "4", "-r", "1", "--no-progress"]
    r = _invoke([path, *base, *args])  # later options win over the defaults in base
    assert r.exit_code == 2, r.output
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and needle in lines[0], r.stderr
    assert r.stdout == ""


def test_missing_bundle_is_one_line(tmp_path):
    for target in (tmp_path / "nope.gguf", tmp_path):
        r = _invoke([target, "--no-progress"])
        assert r.exit_code == 2
        lines = r.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: ") and str(target) in lines[0]
    r = _invoke([])
    assert r.exit_code == 2 and r.stderr.strip().startswith("error: no bundle given")


def test_plot_without_matplotlib_names_the_install(converted, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib now raises ImportError
    r = _invoke([converted[ARCH][1], *FAST, "--plot", tmp_path / "p.png"])
    assert r.exit_code == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "pip install matplotlib" in lines[0]
    assert not (tmp_path / "p.png").exists()


def test_plot(converted, tmp_path):
    pytest.importorskip("matplotlib")
    png = tmp_path / "p.png"
    r = _invoke([converted[ARCH][1], "--policies", "ondemand,fate", "--mem", "50%,75%", "--link", "none", *FAST,
                 "--plot", png])
    assert r.exit_code == 0, r.output
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_simulate_replays_every_configuration(converted, tmp_path):
    """--simulate adds the trace replay of each offloaded configuration: simulated decode, the perfect bound,
    measured / simulated; --simulate-only runs nothing but the replay."""
    path = converted[ARCH][1]
    js = tmp_path / "b.json"
    r = _invoke([path, "--policies", "lru,fate,resident", "--mem", "50%", "--link", "ratio:1", *FAST, "--simulate",
                 "--json", js])
    assert r.exit_code == 0, r.output
    assert "trace replay (simulated" in r.stdout and "measured / sim" in r.stdout and "measured / anchored" in r.stdout
    rows = json.loads(js.read_text())["rows"]
    res_tps = next(r["decode"]["tokens_per_s"] for r in rows if r["policy"] == "resident")
    # the bound is the budget and link's ceiling (fate's plan and caching, perfect prediction): one for lru and fate
    assert len({r["simulated"]["perfect_tokens_per_s"] for r in rows if r["policy"] != "resident"}) == 1
    assert "perfect: the budget and link's ceiling" in r.stdout
    for row in rows:
        if row["policy"] == "resident":
            assert row["simulated"] is None
            continue
        sim = row["simulated"]
        assert sim["decode"]["tokens_per_s"] > 0 and 0 < sim["efficiency"]
        assert sim["perfect_tokens_per_s"] <= sim["resident_tokens_per_s"] * 1.001
        assert sim["experts"]["decode"]["needed"] == row["experts"]["decode"]["needed"]  # the same tokens
        # anchored: the measured resident time per token plus what the replay adds to its own resident time
        want = 1.0 / (1.0 / res_tps + 1.0 / sim["decode"]["tokens_per_s"] - 1.0 / sim["resident_tokens_per_s"])
        assert sim["anchored_tokens_per_s"] == pytest.approx(want)
        assert sim["anchored_efficiency"] == pytest.approx(row["decode"]["tokens_per_s"] / want)
    r = _invoke([path, "--policies", "lru,fate", "--mem", "50%", "--link", "ratio:1", *FAST, "--simulate-only"])
    assert r.exit_code == 0, r.output
    assert "trace replay" in r.stdout and "| policy   |" not in r.stdout  # no measured table
    js2 = tmp_path / "router.json"  # the paper's predictor (the next routers) instead of the fitted maps
    r = _invoke([path, "--policies", "fate", "--mem", "50%", "--link", "ratio:1", *FAST, "--simulate-only",
                 "--predictor", "router", "--json", js2])
    assert r.exit_code == 0, r.output
    out = json.loads(js2.read_text())
    assert out["meta"]["predictor"] == "router" and out["rows"][0]["simulated"]["decode"]["tokens_per_s"] > 0
    assert "--predictor router" in r.stdout  # the header says what differs from the defaults


def test_evict_reaches_every_run(converted, tmp_path):
    """--evict: each measured run caches with it (its stats say so), the replay is told, the header says it."""
    path = converted[ARCH][1]
    js = tmp_path / "arc.json"
    r = _invoke([path, "--policies", "fate,lru", "--mem", "50%", "--link", "ratio:1", *FAST, "--evict", "arc",
                 "--simulate", "--json", js])
    assert r.exit_code == 0, r.output
    assert "--evict arc" in r.stdout
    out = json.loads(js.read_text())
    assert out["meta"]["evict"] == "arc"
    caching = {row["policy"]: {run["experts"]["evict"] for run in row["runs"]} for row in out["rows"]}
    assert caching == {"fate": {"arc"}, "lru": {"lru"}}  # lru caching stays LRU
    r = _invoke([path, "--policies", "fate", "--mem", "50%", "--link", "ratio:1", *FAST, "--json", js])
    assert r.exit_code == 0, r.output
    assert "--evict" not in r.stdout
    assert {run["experts"]["evict"] for run in json.loads(js.read_text())["rows"][0]["runs"]} == {"lrfu"}


def test_anchored_replay_adds_the_replays_stall_to_the_measured_resident_time():
    """A replay at 100 tok/s whose own resident is 200 tok/s adds 5 ms of stall a token; on a measured
    resident of 100 tok/s (10 ms) that is 15 ms: 66.7 tok/s.  No stall in the replay: the resident figure;
    without a measured resident there is nothing to anchor to."""
    from fate.tools.bench import _anchored

    assert _anchored(100.0, 200.0, 100.0) == pytest.approx(1000.0 / 15.0)
    assert _anchored(200.0, 200.0, 150.0) == pytest.approx(150.0)
    assert _anchored(100.0, 200.0, None) is None


def test_every_model_of_a_session_computes_with_its_threads(converted, monkeypatch):
    """-t reaches every model fate-bench loads (the reference, the plan probes, each run): a model applies its
    own thread split, so a count set on torch alone would be overridden by the default (one per core)."""
    from fate.runtime.engine import FateModel
    from fate.sysinfo import default_threads

    want = default_threads() + 1  # not what a model left to its default would use
    seen = []
    orig = FateModel.use_threads

    def use_threads(self):
        seen.append(self.threads)
        return orig(self)

    monkeypatch.setattr(FateModel, "use_threads", use_threads)
    path = converted[ARCH][1]
    rows = run_bench(path, policies=["lru", "resident"], mems=["50%"], links=["none"], n=3, reps=1, prompt_tokens=8,
                     threads=want)
    assert all(r["reps"] == 1 for r in rows)
    assert seen and set(seen) == {want}

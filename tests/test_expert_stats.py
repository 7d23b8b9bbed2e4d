"""The one stats schema: fate.runtime.experts.stats.ExpertStats (counted per (phase, layer) cell, summed
into totals that add up) and fate.runtime.stats.GenerationStats, checked against docs/STATS.md itself."""

from __future__ import annotations

import json
import re
import threading
from pathlib import Path

import pytest

import fate
from fate.runtime.experts.stats import COUNTERS, ExpertStats, summarize
from fate.runtime.stats import EXPERT_FIELDS, PHASE_FIELDS, RATES, GenerationStats, experts_line, phase

DOC = (Path(__file__).resolve().parents[1] / "docs" / "STATS.md").read_text(encoding="utf-8")
ALL = COUNTERS + ("stall_seconds", "host_seconds")


def _section(title: str) -> str:
    """The text of the docs/STATS.md section called ``title``."""
    return re.search(rf"^## {re.escape(title)}\n(.*?)(?=^## |\Z)", DOC, re.S | re.M).group(1)


def _json_keys(block: str) -> list[str]:
    return re.findall(r'"(\w+)":', block)


def _table_names(section: str) -> list[str]:
    """The backticked names in the first column of the section's table."""
    return re.findall(r"^\| `(\w+)` \|", section, re.M)


def test_the_doc_and_the_code_name_the_same_fields():
    one = _section("One generation (`fate-run --stats-json`)")
    example = re.search(r"```json\n(.*?)```", one, re.S).group(1)
    keys = _json_keys(example)
    assert keys[:2] == ["prefill", "tokens"]
    top = [k for k in keys if k not in PHASE_FIELDS]
    assert top == list(GenerationStats().to_dict())  # the same fields, in the same order
    assert set(keys) - set(top) == set(PHASE_FIELDS)
    experts = _section("The `experts` block")
    block = re.search(r"```json\n(.*?)```", experts, re.S).group(1)
    assert _json_keys(block)[:1] == ["experts"]
    assert set(_json_keys(block)[1:]) - {"kind", "bytes_per_s", "ratio", "label", "emulated", "q4", "q2", "layer"} \
        == {"policy", "evict", "link", "bytes_by_precision", "total", "prefill", "decode", "layers"}
    assert _table_names(experts) == list(EXPERT_FIELDS) == list(summarize({}, 0.0))


def _stats() -> ExpertStats:
    s = ExpertStats(3)
    s.phase = "prefill"
    s.add(0, needed=4, hits=1, late_prefetches=1, misses=2, predicted_needed=4, named=6, named_needed=3)
    s.evicted(0)
    s.stalled(0, 0.25)
    s.add(1, needed=2, misses=2)
    s.evicted(1)
    s.evicted(1)
    s.phase = "decode"
    s.add(0, needed=2, hits=2, predicted_needed=2, named=3, named_needed=2)
    s.add(2, needed=2, hits=1, misses=1)
    s.evicted(2)
    s.stalled(2, 0.5)
    s.moved("q4", 1000)
    s.moved("q2", 10)
    s.moved("q4", 500)
    return s


def test_counts_land_in_their_phase_and_layer_cell():
    d = _stats().to_dict()
    assert list(d) == ["total", "prefill", "decode", "layers", "bytes_by_precision"]
    L0, L1, L2 = d["layers"]
    assert [r["layer"] for r in d["layers"]] == [0, 1, 2]
    assert (L0["needed"], L0["hits"], L0["late_prefetches"], L0["misses"], L0["evictions"]) == (6, 3, 1, 2, 1)
    assert (L1["needed"], L1["misses"], L1["evictions"], L1["stall_seconds"]) == (2, 2, 2, 0.0)
    assert (L2["needed"], L2["hits"], L2["evictions"], L2["stall_seconds"]) == (2, 1, 1, 0.5)
    pre, dec = d["prefill"], d["decode"]
    assert (pre["needed"], pre["evictions"], pre["stall_seconds"], pre["named_needed"]) == (6, 3, 0.25, 3)
    assert (dec["needed"], dec["evictions"], dec["stall_seconds"], dec["named_needed"]) == (4, 1, 0.5, 2)
    assert d["bytes_by_precision"] == {"q4": 1500, "q2": 10}


def test_totals_are_the_sums_of_phases_and_of_layers_for_every_counter():
    d = _stats().to_dict()
    for k in ALL:
        assert d["total"][k] == d["prefill"][k] + d["decode"][k] == sum(r[k] for r in d["layers"]), k
    assert d["total"]["evictions"] == 4 and d["total"]["needed"] == 10


def test_rates_and_none_where_undefined():
    d = _stats().to_dict()
    t, pre, dec = d["total"], d["prefill"], d["decode"]
    assert t["hit_rate"] == 4 / 10 and t["prefetch_recall"] == 5 / 6 and t["prefetch_precision"] == 5 / 9
    assert pre["hit_rate"] == 1 / 6 and dec["prefetch_recall"] == 1.0 and dec["prefetch_precision"] == 2 / 3
    L1 = d["layers"][1]
    assert L1["hit_rate"] == 0.0 and L1["prefetch_recall"] is None and L1["prefetch_precision"] is None
    empty = ExpertStats(2).to_dict()
    assert all(empty["total"][r] is None for r in RATES) and empty["total"]["needed"] == 0
    assert summarize({"hits": 2}, 0.1) == {**dict.fromkeys(COUNTERS, 0), "hits": 2, "stall_seconds": 0.1,
                                           "host_seconds": 0.0, "hit_rate": None, "prefetch_recall": None,
                                           "prefetch_precision": None}


def test_reset_and_the_transfer_threads_byte_counts():
    s = _stats()
    s.reset()
    d = s.to_dict()
    assert d["total"] == summarize({}, 0.0) and d["bytes_by_precision"] == {}
    threads = [threading.Thread(target=lambda: [s.moved("q4", 3) for _ in range(2000)]) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert s.to_dict()["bytes_by_precision"] == {"q4": 4 * 2000 * 3}


def test_table_lists_the_layers_that_needed_experts_and_the_total():
    lines = _stats().table().splitlines()
    assert lines[0].split()[:3] == ["layer", "needed", "hits"] and "evict" in lines[0]
    rows = {line.split()[0]: line.split() for line in lines[1:]}
    assert set(rows) == {"0", "1", "2", "total"}
    assert rows["total"][1] == "10" and rows["total"][2] == "40.0%" and rows["1"][3] == "-"
    assert rows["total"][-2] == "4" and rows["2"][-1] == "500.0"  # evictions; stall in ms


def test_generation_stats_schema_and_figures():
    g = GenerationStats(prompt_token_ids=[5, 6, 7, 8], generated_token_ids=[1, 2, 3], prefill_seconds=0.5,
                        decode_tokens=2, decode_seconds=0.25, load_seconds=0.125, peak_rss_bytes=3 << 20,
                        stop_reason="length")
    d = g.to_dict()
    assert d["prefill"] == {"tokens": 4, "seconds": 0.5, "tokens_per_s": 8.0}
    assert d["decode"] == {"tokens": 2, "seconds": 0.25, "tokens_per_s": 8.0}
    assert list(d["prefill"]) == list(PHASE_FIELDS)
    assert (d["generated_tokens"], d["stop_reason"], d["experts"], d["budget"]) == (3, "length", None, None)
    assert d["prompt_token_ids"] == [5, 6, 7, 8] and d["prompt_token_ids"] is not g.prompt_token_ids
    assert phase(3, 0.0)["tokens_per_s"] == 0.0
    text = g.timings_text()
    assert "4 tokens" in text and "2 runs" in text and "(stop: length)" in text and "3.0 MiB" in text
    assert "experts" not in text
    json.dumps(d, allow_nan=False)


def test_experts_line():
    e = {"policy": "fate", "link": {"kind": "ratio", "label": "ratio:1 (80 MB/s, emulated)"}, **_stats().to_dict()}
    line = experts_line(e)
    assert line.startswith("experts (fate) = hit rate 40.0%, prefetch recall 83.3%")
    assert "evictions 4" in line and "stall 750.0 ms" in line and "q4 1.5 KiB" in line and "[link ratio:1" in line
    e = {"policy": "ondemand", "link": {"kind": "none"}, **ExpertStats(1).to_dict()}
    assert experts_line(e) == ("experts (ondemand) = hit rate -, prefetch recall -, misses 0, evictions 0, "
                               "stall 0.0 ms, moved nothing")


@pytest.fixture(scope="module")
def offloaded_stats(converted):
    path = converted["qwen2_moe"][1]
    m = fate.load(path, mem="25%", prefetch_extra=2)
    out = m.generate(list(range(3, 14)), 8, temperature=0.0, stop_at_eos=False)
    n_moe = len(m.config.moe_layer_ids)
    top_k, layers = m.config.top_k, m.config.n_layers
    m.close()
    return out.stats.to_dict(), n_moe, top_k, layers


def test_an_offloaded_generation_adds_up(offloaded_stats):
    d, n_moe, top_k, layers = offloaded_stats
    ex = d["experts"]
    assert list(ex) == ["policy", "evict", "link", "total", "prefill", "decode", "layers", "bytes_by_precision"]
    assert ex["policy"] == "fate" and len(ex["layers"]) == layers
    for k in ALL:
        total = ex["total"][k]
        assert total == pytest.approx(ex["prefill"][k] + ex["decode"][k]), k
        assert total == pytest.approx(sum(r[k] for r in ex["layers"])), k
    t = ex["total"]
    assert t["evictions"] > 0 and ex["prefill"]["evictions"] + ex["decode"]["evictions"] == t["evictions"]
    for c in [t, ex["prefill"], ex["decode"]] + ex["layers"]:
        assert c["hits"] + c["late_prefetches"] + c["misses"] == c["needed"]
        assert c["named_needed"] <= min(c["named"], c["predicted_needed"])
        assert set(c) - {"layer"} == set(EXPERT_FIELDS)
    assert ex["decode"]["needed"] == d["decode"]["tokens"] * top_k * n_moe  # k distinct experts per token
    assert d["decode"]["tokens"] == 7 and d["generated_tokens"] == 8 and d["prefill"]["tokens"] == 11
    assert t["hit_rate"] == t["hits"] / t["needed"]
    budget_row = _section("One generation (`fate-run --stats-json`)").split("| `budget` |")[1].splitlines()[0]
    assert set(d["budget"]) == set(re.findall(r"`(\w+)`", budget_row)) - {"null"}  # the plan's fields, as documented
    assert sum(ex["bytes_by_precision"].values()) > 0
    json.dumps(d, allow_nan=False)


def test_resident_generation_has_no_experts_block(converted):
    m = fate.load(converted["mixtral"][1])
    d = m.generate([5, 6, 7], 2, temperature=0.0, stop_at_eos=False).stats.to_dict()
    assert d["experts"] is None and d["budget"] is None and m.experts_report() is None
    assert d["decode"]["tokens"] == 1 and d["prefill"]["tokens"] == 3

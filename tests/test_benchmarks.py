"""The benchmark scripts are a package run as ``python -m benchmarks.NAME``: each imports (the test fixtures
as packages, no sys.path edits) and answers --help under that name."""

from __future__ import annotations

import importlib
import sys
from pathlib import Path

import pytest

BENCHMARKS = sorted(p.stem for p in (Path(__file__).resolve().parents[1] / "benchmarks").glob("*.py")
                    if p.stem != "__init__")


def test_the_scripts_are_there():
    assert {"convert", "dequant", "fuzz_reader", "offload", "report", "runtime"} <= set(BENCHMARKS)


@pytest.mark.parametrize("name", BENCHMARKS)
def test_imports_as_a_package_and_answers_help(name, monkeypatch, capsys):
    src = (Path(__file__).resolve().parents[1] / "benchmarks" / f"{name}.py").read_text()
    assert "sys.path" not in src and "benchmarks/" + name + ".py" not in src
    mod = importlib.import_module(f"benchmarks.{name}")
    monkeypatch.setattr(sys, "argv", [f"{name}.py", "--help"])
    with pytest.raises(SystemExit) as info:
        mod.parse_args() if name == "runtime" else mod.main()
    assert info.value.code == 0
    assert capsys.readouterr().out.startswith(f"usage: python -m benchmarks.{name}")


def test_offload_pairs_measures_a_cell(converted):
    """benchmarks.offload_pairs on a tiny bundle: the resident reference and a policy, rounds alternated; the
    decode time splits into stall + host + rest, the ratios are against the same rounds' runs, and LRU's
    greedy tokens are the resident run's."""
    from benchmarks.offload_pairs import measure_cell

    path = converted["qwen2_moe"][1]
    m = __import__("fate").load(path, policy="resident")
    ids = m.encode_prompt("The module defines functions")
    m.close()
    rows = measure_cell(str(path), "50%", "ratio:1", ["lru"], rounds=2, n=4, threads=1, prompt_ids=ids)
    by = {r["policy"]: r for r in rows}
    assert set(by) == {"resident", "lru"}
    assert by["resident"]["x_resident"] == pytest.approx(1.0) and by["resident"]["stall_ms"] == 0.0
    lru = by["lru"]
    assert lru["emulated"] and "emulated" in lru["link"] and lru["mem"] == "50%"
    assert lru["tokens_equal_resident"] and lru["x_lru"] == pytest.approx(1.0)
    assert 0.0 <= lru["hit_rate"] <= 1.0 and lru["stall_ms"] > 0.0  # a 50 % cache over ratio:1 waits for copies
    assert lru["decode_ms_per_token"] > 0 and lru["rest_ms"] > 0


def test_host_paths_switches_the_decode_step_and_keeps_its_tokens(converted):
    """benchmarks.host_paths on a tiny bundle: the Python reference, the native rule, the fused call, the
    fused call queueing its own copies and the native decode step run on one model in alternated rounds; each
    really is switched in, and all five give the same greedy tokens."""
    from benchmarks import host_paths
    from fate.runtime.experts import copier
    from fate.runtime.experts.offload import value_plan

    if copier.value_planner() is None:
        pytest.skip(f"native extension not built: {copier.why}")
    path = converted["qwen2_moe"][1]
    m = __import__("fate").load(path, policy="fate", mem="50%", link="ratio:1", int2_share=0.0)
    off = m.offloading.executor.offloader
    host_paths._use(m, "python")
    assert off._value_plan is value_plan and off.predictor._fused is None
    host_paths._use(m, "native")
    assert off._value_plan is copier.value_plan() and off.predictor._fused is None
    host_paths._use(m, "fused")
    assert off.predictor._fused is copier.value_planner() and off._planners == {} and off._queuer is None
    ids = m.encode_prompt("The module defines functions")
    m.generate(ids, 4, temperature=0.0, stop_at_eos=False)
    assert off._planners and not any(p.queues for p in off._planners.values() if p is not None)
    host_paths._use(m, "queued")
    assert off.predictor._fused is copier.value_planner() and off._queuer is False
    m.generate(ids, 4, temperature=0.0, stop_at_eos=False)
    assert type(off._queuer).__name__ == "Queuer" and off._step is None
    assert off._planners and all(p.queues for p in off._planners.values() if p is not None)
    host_paths._use(m, "step")
    m.generate(ids, 4, temperature=0.0, stop_at_eos=False)
    assert type(off._step).__name__ == "DecodeStep"
    m.close()
    rows = host_paths.measure(str(path), "50%", "ratio:1", rounds=2, n=4, threads=1, prompt_ids=ids)
    by = {r["path"]: r for r in rows}
    assert set(by) == set(host_paths.PATHS)
    assert all(r["tokens_equal_python"] and r["host_us_per_layer"] >= 0 and "emulated" in r["link"] for r in rows)
    assert by["python"]["time_x_python"] == pytest.approx(1.0) and by["python"]["host_us_less_than_python"] == 0.0


def test_layer_hits_splits_the_decode_by_layer(converted):
    """benchmarks.layer_hits on a tiny bundle: per MoE layer the slots of the plan, hit rates that add up to
    the run's decode hit rate, and the reuse curves at those slots (the allocation counts at least what an
    LRU cache holds)."""
    from benchmarks.layer_hits import measure

    path = str(converted["qwen2_moe"][1])
    rows = measure(path, "50%", "ratio:1", ["lru", "fate@even"], n=4, prompt_tokens=16)
    assert [r["spec"] for r in rows] == ["lru", "fate@even"] and all(r["alloc"] == "even" for r in rows)
    for r in rows:
        d = r["decode"]
        assert d["needed"] > 0 and len(r["slots"]) == len(r["hit"])
        assert all(h is None or 0.0 <= h <= 1.0 for h in r["hit"])
        assert min(r["slots"]) >= 1 and len(set(r["slots"])) <= 2  # even: what does not divide goes shallow
        if r["lru"] is not None:
            assert all(0.0 <= lo <= c + 1e-9 <= 1.0 + 1e-9 for lo, c in zip(r["lru"], r["counted"]))
        assert sum(r["needed"]) == d["needed"]
        assert sum((h or 0.0) * k for h, k in zip(r["hit"], r["needed"])) == pytest.approx(d["hits"])
    lru = rows[0]
    assert any(h is not None and h < 1.0 for h in lru["hit"])  # a 50 % cache misses somewhere

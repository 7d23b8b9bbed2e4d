"""plan_budget against budgets worked by hand; parse_mem; the too-small error."""

from __future__ import annotations

import json
import math

import pytest
import torch

from fate.errors import BudgetError
from fate.runtime.experts.budget import BudgetPlan, parse_mem, plan_budget
from fate.model.config import ModelConfig

MiB = 2**20


def _cfg(moe_layers: list[bool], n_experts: int = 8, top_k: int = 2) -> ModelConfig:
    dense = not all(moe_layers)
    return ModelConfig(model_type="deepseek" if dense else "mixtral", vocab_size=64, hidden_size=16,
                       n_layers=len(moe_layers), n_heads=2, n_kv_heads=2, head_dim=8, rms_eps=1e-6,
                       rope_theta=1e4, max_position=64, n_experts=n_experts, top_k=top_k, expert_ffn=8,
                       moe_layers=moe_layers, dense_ffn=32 if dense else 0).validate()


# 6 MoE layers x 8 experts, top-2.  Resident part 10_000 + 2_000 + 1_000 = 13_000 bytes; one slot 1_000
# bytes, so all experts = 48 slots = 48_000 bytes and the minimum is 13_000 + 6 x 2 x 1_000 = 25_000.
SIX = _cfg([True] * 6)
SIZES = dict(non_expert_bytes=10_000, kv_bytes=2_000, buffer_bytes=1_000, slot_bytes=1_000)


def _plan(mem, cfg=SIX, **kw) -> BudgetPlan:
    return plan_budget(cfg, mem=mem, **SIZES, **kw)


def _budget_for(slots: int) -> int:
    return 13_000 + 1_000 * slots + 999  # the 999 spare bytes do not make another slot


# recall[i, 2] per layer (k+2 column): NaN for layer 0 (nothing predicts it).  Miss rates in ppm:
# L0 1_000_000, L1 100_000, L2 50_000, L3 200_000, L4 100_000, L5 0.
RECALL_COL2 = [math.nan, 0.9, 0.95, 0.8, 0.9, 1.0]


def _recall(col2: list[float]) -> torch.Tensor:
    t = torch.full((len(col2), 4), math.nan, dtype=torch.float32)
    for i, r in enumerate(col2):
        if not math.isnan(r):
            t[i] = torch.tensor([r - 0.2, r - 0.1, r, min(r + 0.05, 1.0)])
    return t


# --- parse_mem ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("text,want", [
    ("6GiB", ("bytes", 6 * 2**30)), ("512MiB", ("bytes", 512 * MiB)), ("1.5GB", ("bytes", 1.5e9)),
    ("1000", ("bytes", 1000)), (" 2 GiB ", ("bytes", 2 * 2**30)),
    ("40%", ("percent", 40.0)), ("12.5 %", ("percent", 12.5)), ("150%", ("percent", 150.0)),
])
def test_parse_mem_good(text, want):
    assert parse_mem(text) == want


@pytest.mark.parametrize("text", ["", "lots", "6 gigs", "-1GiB", "%", "40%%", "-5%", "1e9", "6GiBs"])
def test_parse_mem_bad(text):
    with pytest.raises(BudgetError, match=r"is not a memory size; write it like 6GiB, 512MiB, 1.5GB or 40%"):
        parse_mem(text)
    assert issubclass(BudgetError, ValueError)


# --- fully resident ----------------------------------------------------------------------------------

@pytest.mark.parametrize("mem", [None, "100%", "150%", 61_000, 13_000 + 48_000, "1GiB"])
def test_fully_resident(mem):
    p = _plan(mem)
    assert p.fully_resident and p.alloc == "resident"
    assert p.slots_per_layer == [8] * 6
    assert p.slot_fraction() == 1.0
    assert p.expert_bytes_total == 48_000
    assert p.budget_bytes == (None if mem is None else p.budget_bytes)


def test_one_byte_short_of_everything_is_not_resident():
    # 60_999 bytes: (60_999 - 13_000) // 1_000 = 47 slots, extra over the floor 47 - 12 = 35.
    # shallow4: L0..L3 take 6 each (24), 11 left over L4, L5: 6 and 5 -> [8, 8, 8, 8, 8, 7].
    p = _plan(60_999)
    assert not p.fully_resident and p.alloc == "shallow4"
    assert p.slots_per_layer == [8, 8, 8, 8, 8, 7]


def test_dense_layers_get_no_slots_even_when_resident():
    cfg = _cfg([False] + [True] * 6)
    p = plan_budget(cfg, mem=None, **SIZES)
    assert p.slots_per_layer == [0] + [8] * 6


# --- shallow4 ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("slots,want", [
    (12, [2, 2, 2, 2, 2, 2]),  # exactly the minimum
    (20, [8, 4, 2, 2, 2, 2]),  # extra 8: L0 +6, L1 +2
    (30, [8, 8, 8, 2, 2, 2]),  # extra 18: L0, L1, L2 +6 each, nothing left
    (40, [8, 8, 8, 8, 4, 4]),  # extra 28: 24 to L0..L3, 4 over L4, L5 -> +2 each
    (41, [8, 8, 8, 8, 5, 4]),  # extra 29: 24, then 5 over two layers -> +3 (shallower), +2
    (47, [8, 8, 8, 8, 8, 7]),
])
def test_shallow4(slots, want):
    p = _plan(_budget_for(slots), alloc="shallow4")
    assert p.slots_per_layer == want and sum(want) == slots
    assert p.alloc == "shallow4" and not p.fully_resident


def test_shallow4_is_the_default_without_stats():
    assert _plan(_budget_for(30)).alloc == "shallow4"


def test_shallow4_with_a_dense_first_layer():
    # DeepSeek-like: layer 0 dense (0 slots), MoE layers 1..6.  30 slots, extra 18: layers 1, 2, 3 full.
    cfg = _cfg([False] + [True] * 6)
    p = plan_budget(cfg, mem=_budget_for(30), **SIZES)
    assert p.slots_per_layer == [0, 8, 8, 8, 2, 2, 2]
    # 41 slots, extra 29: layers 1..4 full (24), 5 over layers 5, 6 -> 3, 2.
    p = plan_budget(cfg, mem=_budget_for(41), **SIZES)
    assert p.slots_per_layer == [0, 8, 8, 8, 8, 5, 4]


def test_shallow4_fewer_moe_layers_than_four():
    # 3 MoE layers, 15 slots: floor 6, extra 9: L0 +6, L1 +3.
    cfg = _cfg([True] * 3)
    p = plan_budget(cfg, mem=_budget_for(15), **SIZES, alloc="shallow4")
    assert p.slots_per_layer == [8, 5, 2]


# --- even --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("slots,want", [
    (12, [2] * 6),
    (30, [5] * 6),  # extra 18 = 6 x 3
    (33, [6, 6, 6, 5, 5, 5]),  # extra 21 = 6 x 3 + 3 to the shallowest
    (47, [8, 8, 8, 8, 8, 7]),  # extra 35 = 6 x 5 + 5 to the shallowest
])
def test_even(slots, want):
    p = _plan(_budget_for(slots), alloc="even")
    assert p.slots_per_layer == want and sum(want) == slots


def test_even_with_a_dense_first_layer():
    cfg = _cfg([False] + [True] * 6)
    p = plan_budget(cfg, mem=_budget_for(33), **SIZES, alloc="even")
    assert p.slots_per_layer == [0, 6, 6, 6, 5, 5, 5]


# --- recall ------------------------------------------------------------------------------------------

def test_recall_by_hand():
    # 30 slots, extra 18, room 6 per layer.  Miss weights (ppm) 1e6, 1e5, 5e4, 2e5, 1e5, 0; W = 1_450_000.
    # Round 1: L0's share 18 x 1e6 / 1.45e6 = 12.4 >= 6 -> L0 full (+6); 12 left.
    # Round 2: W = 450_000; shares L1 2.67, L2 1.33, L3 5.33, L4 2.67, L5 0 - none reaches 6.
    #   floors 2, 1, 5, 2, 0 = 10; the 2 left over go to the shallowest: L1, L2.
    # Extras [6, 3, 2, 5, 2, 0] -> slots [8, 5, 4, 7, 4, 2].
    p = _plan(_budget_for(30), recall=_recall(RECALL_COL2))
    assert p.alloc == "recall"  # auto picks recall when stats exist
    assert p.slots_per_layer == [8, 5, 4, 7, 4, 2]


def test_recall_caps_cascade():
    # 40 slots, extra 28.  Round 1 (W 1.45e6): L0 19.3 >= 6 -> full; 22 left.
    # Round 2 (W 450_000): L3 22 x 2e5 / 4.5e5 = 9.8 >= 6 -> full; 16 left.
    # Round 3 (W 250_000): L1 6.4 >= 6 and L4 6.4 >= 6 -> both full; 4 left.
    # Round 4 (W 50_000, L2 and L5): L2 4 x 5e4 / 5e4 = 4 < 6; floors L2 4, L5 0; nothing left over.
    # Extras [6, 6, 4, 6, 6, 0] -> slots [8, 8, 6, 8, 8, 2].
    p = _plan(_budget_for(40), alloc="recall", recall=_recall(RECALL_COL2))
    assert p.slots_per_layer == [8, 8, 6, 8, 8, 2]


def test_recall_zero_miss_layers_share_evenly_at_the_end():
    # 45 slots, extra 33.  As above L0, L3, L1, L4 fill (24) leaving 9 for L2 (room 6) and L5 (weight 0):
    # L2's share 9 >= 6 -> full; 3 left over L5 alone (weight 0 -> even): +3.
    p = _plan(_budget_for(45), alloc="recall", recall=_recall(RECALL_COL2))
    assert p.slots_per_layer == [8, 8, 8, 8, 8, 5]


def test_recall_ties_go_shallow():
    # Every layer predicts equally well (k+2 recall 0.5), and the first has no prediction (NaN -> miss 1).
    # 20 slots, extra 8.  W = 1e6 + 5 x 5e5 = 3.5e6.  Shares: L0 8 x 1e6 / 3.5e6 = 2.29, others 1.14.
    # Floors 2, 1, 1, 1, 1, 1 = 7; one left over -> L0 (the shallowest).  Extras [3, 1, 1, 1, 1, 1].
    p = _plan(_budget_for(20), recall=_recall([math.nan] + [0.5] * 5))
    assert p.slots_per_layer == [5, 3, 3, 3, 3, 3]


def test_recall_with_a_dense_first_layer():
    # DeepSeek-like: layer 0 dense (its recall row NaN, ignored), MoE layers 1..6 carry the six rates.
    cfg = _cfg([False] + [True] * 6)
    p = plan_budget(cfg, mem=_budget_for(30), **SIZES, recall=_recall([math.nan] + RECALL_COL2))
    assert p.slots_per_layer == [0, 8, 5, 4, 7, 4, 2]


def test_recall_needs_stats_and_the_right_shape():
    with pytest.raises(BudgetError, match="needs the bundle's calibration statistics"):
        _plan(_budget_for(30), alloc="recall")
    with pytest.raises(BudgetError, match=r"shape \(5, 4\), expected \(6, 4\)"):
        _plan(_budget_for(30), recall=torch.zeros(5, 4))
    with pytest.raises(BudgetError, match="--cache-alloc .lru. is not one of auto, reuse, recall, shallow4, even"):
        _plan(_budget_for(30), alloc="lru")


def test_explicit_alloc_overrides_stats():
    p = _plan(_budget_for(30), alloc="shallow4", recall=_recall(RECALL_COL2))
    assert p.alloc == "shallow4" and p.slots_per_layer == [8, 8, 8, 2, 2, 2]


# --- percent -----------------------------------------------------------------------------------------

def test_percent_budgets():
    # 25 % of 48_000 = 12_000 -> budget 25_000, exactly the minimum: top_k everywhere.
    p = _plan("25%")
    assert p.budget_bytes == 25_000 and p.slots_per_layer == [2] * 6
    assert p.slot_fraction() == pytest.approx(12 / 48)
    # 50 % -> 13_000 + 24_000 -> 24 slots, extra 12: shallow4 fills L0, L1.
    p = _plan("50%")
    assert p.budget_bytes == 37_000 and p.slots_per_layer == [8, 8, 2, 2, 2, 2]
    # 62.5 % -> 30_000 -> 30 slots.  even: 5 each.
    p = _plan("62.5%", alloc="even")
    assert p.budget_bytes == 43_000 and p.slots_per_layer == [5] * 6


def test_percent_of_decimal_text_is_exact():
    # 33.3 % of 48_000 is 15_984 exactly; a binary float would floor it to 15_983.
    assert _plan("33.3%").budget_bytes == 13_000 + 15_984


# --- too small ---------------------------------------------------------------------------------------

def test_below_minimum_by_bytes():
    _plan(25_000)  # the minimum itself runs
    with pytest.raises(BudgetError) as e:
        _plan(24_999)
    msg = str(e.value)
    assert "below the minimum 24.5 KiB" in msg
    assert "2 experts per MoE layer x 6 layers 11.7 KiB" in msg and msg.endswith("raise --mem")
    assert "\n" not in msg


def test_below_minimum_message_as_in_the_issue():
    # Qwen1.5-MoE-like: 24 MoE layers x 60 experts, top-4; 4 x 24 slots of 255_590 bytes = 23.4 MiB.
    cfg = _cfg([True] * 24, n_experts=60, top_k=4)
    with pytest.raises(BudgetError) as e:
        plan_budget(cfg, mem="100MiB", non_expert_bytes=120 * MiB, kv_bytes=32 * MiB, buffer_bytes=8 * MiB,
                    slot_bytes=255_590)
    assert str(e.value) == ("--mem 100MiB is below the minimum 183.4 MiB (non-expert weights 120.0 MiB, "
                            "KV cache 32.0 MiB, buffers 8.0 MiB, 4 experts per MoE layer x 24 layers 23.4 MiB); "
                            "raise --mem")


def test_below_minimum_by_percent_names_the_percent():
    # 10 % -> 13_000 + 4_800 = 17_800 bytes = 17.4 KiB; the minimum is 25 % (k / E = 2 / 8).
    with pytest.raises(BudgetError, match=r"^--mem 10% \(17.4 KiB\) is below the minimum .*"
                                          r"raise --mem to at least 25.0%$"):
        _plan("10%")


def test_minimum_is_printed_rounded_up():
    # Minimum 192_308_800 bytes = 183.39996 MiB: printed 183.4 MiB, and asking for 183.4MiB is enough.
    cfg = _cfg([True] * 24, n_experts=60, top_k=4)
    kw = dict(non_expert_bytes=120 * MiB, kv_bytes=32 * MiB, buffer_bytes=8 * MiB, slot_bytes=255_590)
    p = plan_budget(cfg, mem="183.4MiB", **kw)
    assert p.slots_per_layer == [4] * 24 and p.min_bytes == 192_308_800


def test_bad_mem_values():
    with pytest.raises(BudgetError, match="is not a memory size"):
        _plan("six gigs")
    with pytest.raises(BudgetError, match="negative"):
        _plan(-1)
    with pytest.raises(BudgetError, match="not a size"):
        _plan(1.5)


# --- invariants and outputs --------------------------------------------------------------------------

@pytest.mark.parametrize("alloc", ["shallow4", "even", "recall"])
def test_every_budget_keeps_the_invariants(alloc):
    cfg = _cfg([False, True, True, False] + [True] * 5, n_experts=10, top_k=3)  # 7 MoE layers
    recall = _recall([math.nan, math.nan, 0.7, math.nan, 0.99, 0.6, 0.85, 1.0, 0.2])
    for slots in range(21, 70):
        for spare in (0, 1, 999):
            p = plan_budget(cfg, mem=13_000 + 1_000 * slots + spare, **SIZES, alloc=alloc, recall=recall)
            moe = [p.slots_per_layer[i] for i in cfg.moe_layer_ids]
            assert sum(moe) == slots and all(3 <= s <= 10 for s in moe)
            assert [p.slots_per_layer[i] for i in (0, 3)] == [0, 0]
            assert p.planned_bytes <= p.budget_bytes


def test_to_dict_and_describe():
    p = _plan(_budget_for(30))
    d = json.loads(json.dumps(p.to_dict()))
    assert d["slots_per_layer"] == [8, 8, 8, 2, 2, 2]
    assert d["budget_bytes"] == 43_999 and d["resident_bytes"] == 13_000
    assert d["slots"] == 30 and d["slot_bytes_total"] == 30_000 and d["planned_bytes"] == 43_000
    assert d["min_bytes"] == 25_000 and d["alloc"] == "shallow4" and d["fully_resident"] is False
    assert d["slot_fraction"] == pytest.approx(30 / 48)
    text = p.describe()
    assert "allocation shallow4" in text and "L0:   8" in text and "L5:   2" in text, text
    assert "62.5% of" in text
    assert "unlimited" in _plan(None).describe()
    assert _plan(None).to_dict()["budget_bytes"] is None


def _curves(slopes, E=8, named_extra=0.0):
    """reuse [2, L, E+1] from per-layer piecewise-linear curves: ``slopes[i]`` = (gain per slot for the first
    four slots, gain per slot after them); row 1 adds ``named_extra`` (what the prediction names)."""
    L = len(slopes)
    t = torch.full((2, L, E + 1), float("nan"))
    for i, (first, rest) in enumerate(slopes):
        s = torch.arange(E + 1, dtype=torch.float64)
        held = torch.clamp(torch.minimum(s, torch.tensor(4.0)) * first + torch.clamp(s - 4, min=0) * rest, max=1.0)
        t[0, i] = held
        t[1, i] = torch.clamp(held + named_extra, max=1.0)
    return t


def test_a_skewed_reuse_curve_gets_more_slots():
    """With the reuse allocation the layers whose needed experts a few slots hold (skewed) get them first; the
    flat layers (every slot worth about the same) get what is left."""
    cfg = _cfg([True] * 6)
    flat, skewed = (0.125, 0.125), (0.2, 0.05)
    reuse = _curves([flat, skewed, flat, flat, skewed, flat])
    p = _plan(_budget_for(6 * 2 + 8), cfg=cfg, reuse=reuse, alloc="reuse")
    s = p.slots_per_layer
    assert p.alloc == "reuse" and sum(s) == 6 * 2 + 8 and min(s) >= 2
    assert s[1] == s[4] == 4  # the skewed ones fill their knee first ...
    assert s[0] + s[2] + s[3] + s[5] == 4 * 2 + 4  # ... the flat ones share the rest (any split is as good)
    # auto picks reuse when the curves are there, shallow4 without any statistics
    assert _plan(_budget_for(20), cfg=cfg, reuse=reuse).alloc == "reuse"
    assert _plan(_budget_for(20), cfg=cfg).alloc == "shallow4"


def test_reuse_counts_the_links_capacity():
    """Named experts only help as far as the link can move them in a layer's window: over a slow link layer 1's
    prediction hides nothing and it gets the slots its curve earns; over a fast one it needs few."""
    cfg = _cfg([True] * 3)
    reuse = _curves([(0.11, 0.11), (0.125, 0.125), (0.12, 0.12)])
    reuse[1, 1] = torch.clamp(reuse[0, 1] + 0.6, max=1.0)  # layer 1: the prediction names most of what it needs
    slow = _plan(_budget_for(3 * 2 + 6), cfg=cfg, reuse=reuse, alloc="reuse", link_copies=0.001).slots_per_layer
    fast = _plan(_budget_for(3 * 2 + 6), cfg=cfg, reuse=reuse, alloc="reuse", link_copies=4.0).slots_per_layer
    assert slow == [2, 8, 2] and fast == [2, 3, 7]


def test_reuse_needs_stats():
    with pytest.raises(BudgetError, match="needs the bundle's reuse statistics"):
        _plan(_budget_for(30), alloc="reuse")

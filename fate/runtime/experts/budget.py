"""The memory budget: how many expert slots each layer's device cache gets.

A budget (``--mem``) pays first for what must stay resident — non-expert weights, the KV cache and
transfer buffers — and then for expert slots, each holding one routed expert at decode precision.
Every MoE layer needs at least ``top_k`` slots (a token uses its k experts at once); the slots above
that floor go to the shallow layers first, because cross-layer prediction is weakest there (Fate §4):

* ``shallow4`` — the paper's rule: the first four MoE layers are filled completely, shallowest first,
  and the other layers share what is left evenly;
* ``even`` — the same number of slots everywhere;
* ``recall`` — in proportion to how often prediction misses, from the bundle's calibration statistics;
* ``auto`` — ``recall`` when the statistics exist, else ``shallow4``.

All arithmetic on slots is on integers, so a plan is the same on every machine.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from fractions import Fraction

import torch

from fate.errors import BudgetError
from fate.formats import constants as C
from fate.model.config import ModelConfig
from fate.units import SizeError, format_size, parse_size

ALLOCS = ("auto", "reuse", "recall", "shallow4", "even")
SHALLOW_FULL_LAYERS = 4  # MoE layers the paper's reference code pins completely
RECALL_COLUMN = C.RECALL_EXTRA.index(2)  # the "top k+2" column of fate.calib.recall
_PPM = 1_000_000  # miss rates become integers in parts per million before any slot arithmetic

_PERCENT = re.compile(r"^\s*([0-9]*\.?[0-9]+)\s*%\s*$")


def parse_mem(text: str) -> tuple[str, float]:
    """``"6GiB"``, ``"512MiB"``, ``"1.5GB"``, ``"1000"`` → ``("bytes", n)``; ``"40%"`` → ``("percent", 40.0)``.

    A percentage is of all routed experts at decode precision, on top of the resident part (see
    :func:`plan_budget`)."""
    s = str(text)
    m = _PERCENT.match(s)
    if m:
        return "percent", float(m.group(1))
    try:
        return "bytes", float(parse_size(s))
    except SizeError:
        raise BudgetError(f"--mem {s.strip()!r} is not a memory size; write it like 6GiB, 512MiB, 1.5GB or 40%") from None


@dataclass
class BudgetPlan:
    budget_bytes: int | None  # None = unlimited
    non_expert_bytes: int
    kv_bytes: int
    buffer_bytes: int
    slot_bytes: int  # bytes of one expert slot (the decode precision's blob)
    slots_per_layer: list[int]  # per layer id; 0 for dense layers, n_experts everywhere when fully resident
    fully_resident: bool
    alloc: str  # "resident", "recall", "shallow4", "even"
    expert_bytes_total: int  # all routed experts at decode precision
    n_experts: int = 0  # routed experts per MoE layer
    min_bytes: int = 0  # the smallest budget that runs: resident part + top_k slots per MoE layer
    request: str = ""  # the --mem as asked ("40%", "6GiB"), "" when unlimited

    @property
    def resident_bytes(self) -> int:
        return self.non_expert_bytes + self.kv_bytes + self.buffer_bytes

    @property
    def slot_count(self) -> int:
        return sum(self.slots_per_layer)

    @property
    def slot_bytes_total(self) -> int:
        return self.slot_count * self.slot_bytes

    @property
    def planned_bytes(self) -> int:
        return self.resident_bytes + self.slot_bytes_total

    def slot_fraction(self) -> float:
        """Resident slots / all routed experts (1.0 when fully resident or when there are no experts)."""
        n_moe = sum(1 for s in self.slots_per_layer if s > 0)
        total = n_moe * self.n_experts
        if self.fully_resident or total == 0:
            return 1.0
        return self.slot_count / total

    def to_dict(self) -> dict:
        return {
            "budget_bytes": self.budget_bytes,
            "request": self.request,
            "alloc": self.alloc,
            "fully_resident": self.fully_resident,
            "non_expert_bytes": self.non_expert_bytes,
            "kv_bytes": self.kv_bytes,
            "buffer_bytes": self.buffer_bytes,
            "resident_bytes": self.resident_bytes,
            "slot_bytes": self.slot_bytes,
            "slots": self.slot_count,
            "slot_bytes_total": self.slot_bytes_total,
            "planned_bytes": self.planned_bytes,
            "min_bytes": self.min_bytes,
            "expert_bytes_total": self.expert_bytes_total,
            "slot_fraction": self.slot_fraction(),
            "slots_per_layer": list(self.slots_per_layer),
        }

    def describe(self) -> str:
        if self.budget_bytes is None:
            head = "memory budget: unlimited"
        else:
            asked = f" (--mem {self.request})" if self.request else ""
            head = f"memory budget: {format_size(self.budget_bytes)}{asked}"
        mode = "all experts resident" if self.fully_resident else f"allocation {self.alloc}"
        rows = [
            f"{head}, {mode}",
            f"  non-expert weights {format_size(self.non_expert_bytes):>12}",
            f"  KV cache           {format_size(self.kv_bytes):>12}",
            f"  buffers            {format_size(self.buffer_bytes):>12}",
            f"  expert slots       {format_size(self.slot_bytes_total):>12}  ({self.slot_count} x {format_size(self.slot_bytes)}, "
            f"{100 * self.slot_fraction():.1f}% of {format_size(self.expert_bytes_total)} of experts)",
            f"  total              {format_size(self.planned_bytes):>12}",
        ]
        moe = [(i, s) for i, s in enumerate(self.slots_per_layer) if s > 0]
        if moe:
            rows.append(f"  slots per MoE layer (of {self.n_experts}):")
            for start in range(0, len(moe), 8):
                rows.append("   " + "".join(f"{f'L{i}:':>6}{s:>4}" for i, s in moe[start:start + 8]))
        return "\n".join(rows)


def _check_bytes(name: str, v) -> int:
    if not isinstance(v, int) or isinstance(v, bool) or v < 0:
        raise BudgetError(f"plan_budget: {name}={v!r} is not a byte count")
    return v


def _miss_ppm(cfg: ModelConfig, recall) -> list[int]:
    """Per MoE layer, in depth order: the miss rate of cross-layer prediction at k+2 in parts per million.
    No prediction (NaN or any non-finite value, e.g. at the first MoE layer) counts as a miss rate of 1."""
    t = torch.as_tensor(recall)
    want = (cfg.n_layers, len(C.RECALL_EXTRA))
    if tuple(t.shape) != want:
        raise BudgetError(f"recall statistics have shape {tuple(t.shape)}, expected {want} "
                          f"(layers x k+{list(C.RECALL_EXTRA)})")
    col = t.detach().to("cpu", torch.float64)[:, RECALL_COLUMN].tolist()
    out = []
    for i in cfg.moe_layer_ids:
        r = col[i]
        if not math.isfinite(r):
            out.append(_PPM)
        else:
            out.append(_PPM - round(min(max(r, 0.0), 1.0) * _PPM))
    return out


def _level_fill(extra: int, caps: list[int]) -> list[int]:
    """Spread ``extra`` as evenly as possible over layers holding at most ``caps[j]`` each; what does not
    divide evenly goes one each to the shallowest layers that still have room."""
    got = [0] * len(caps)
    open_ = [j for j, c in enumerate(caps) if c > 0]
    while extra > 0 and open_:
        share = extra // len(open_)
        if share == 0:
            for j in open_[:extra]:
                got[j] += 1
            extra = 0
            break
        still = []
        for j in open_:
            g = min(share, caps[j] - got[j])
            got[j] += g
            extra -= g
            if got[j] < caps[j]:
                still.append(j)
        open_ = still
    return got


def _shallow_fill(extra: int, caps: list[int]) -> list[int]:
    """The first SHALLOW_FULL_LAYERS layers are filled completely, shallowest first; the rest level-fill."""
    got = [0] * len(caps)
    head = min(SHALLOW_FULL_LAYERS, len(caps))
    for j in range(head):
        got[j] = min(caps[j], extra)
        extra -= got[j]
    got[head:] = _level_fill(extra, caps[head:])
    return got


def _proportional_fill(extra: int, caps: list[int], weights: list[int]) -> list[int]:
    """Spread ``extra`` in proportion to integer ``weights``, at most ``caps[j]`` per layer.

    Repeat: with W the weight of the layers that still have room, every layer whose share
    ``extra * w / W`` reaches its room is filled and leaves (shares of the others only grow, so filling
    them together is exact).  When no share reaches its room, each layer gets ``floor(extra * w / W)``
    and the few slots those floors leave (fewer than the layers) go one each to the shallowest layers
    that still have room.  If the layers with room all weigh 0, they level-fill."""
    got = [0] * len(caps)
    open_ = [j for j, c in enumerate(caps) if c > 0]
    while extra > 0 and open_:
        total = sum(weights[j] for j in open_)
        if total == 0:
            rest = _level_fill(extra, [caps[j] - got[j] for j in open_])
            for j, g in zip(open_, rest):
                got[j] += g
            return got
        full = [j for j in open_ if extra * weights[j] >= (caps[j] - got[j]) * total]
        if full:
            for j in full:
                extra -= caps[j] - got[j]
                got[j] = caps[j]
            open_ = [j for j in open_ if got[j] < caps[j]]
            continue
        given = 0
        for j in open_:
            g = extra * weights[j] // total
            got[j] += g
            given += g
        for j in open_[:extra - given]:
            got[j] += 1
        extra = 0
    return got


def _reuse_fill(extra: int, caps: list[int], curves: list[list[float]], floor: int) -> list[int]:
    """Spread ``extra`` slots to minimise the expected misses: each next slot goes to the layer whose curve
    (share of its needed experts held with s slots, ``curves[j][s]``) gains most from it; ties go to the
    shallower layer.  The curves are non-decreasing, so this is the greedy of a sum of concave gains."""
    got = [0] * len(caps)
    for _ in range(extra):
        best, gain = -1, -1.0
        for j, c in enumerate(caps):
            if got[j] < c:
                s = floor + got[j]
                g = curves[j][s + 1] - curves[j][s]
                if g > gain + 1e-12:
                    best, gain = j, g
        if best < 0:
            break
        got[best] += 1
    return got


FIRST_LAYER_WINDOW = 0.8  # the first MoE layer is predicted from the embedding: its window is its attention


def reuse_table(cfg: ModelConfig, reuse) -> torch.Tensor | None:
    """``fate.calib.reuse`` as a float64 CPU tensor ``[2, n_layers, n_experts + 1]`` (held by an LRU cache of s
    slots; plus those the prediction names), or None where it is missing, misshapen or not finite at a MoE
    layer: what the ``reuse`` allocation and fate's choice of where to predict both read."""
    if reuse is None:
        return None
    t = torch.as_tensor(reuse).detach().to("cpu", torch.float64)
    if tuple(t.shape) != (2, cfg.n_layers, cfg.n_experts + 1) or not torch.isfinite(t[:, cfg.moe_layer_ids]).all():
        return None
    return t


def _reuse_curves(cfg: ModelConfig, reuse, link_copies: float) -> list[list[float]] | None:
    """Per MoE layer, in depth order: the share of its needed experts that are held or hidden with s slots.
    From ``fate.calib.reuse``: held by an LRU cache of s slots, plus those the prediction names — but no more
    of those than the link moves in the layer's window (``link_copies`` copies per layer; the first MoE
    layer, predicted from the embedding, has one attention)."""
    t = reuse_table(cfg, reuse)
    if t is None:
        return None
    k = max(cfg.top_k, 1)
    first = cfg.moe_layer_ids[0] if cfg.moe_layer_ids else -1
    out = []
    for i in cfg.moe_layer_ids:
        cap = link_copies * (FIRST_LAYER_WINDOW if i == first else 1.0) / k  # hidden per needed expert, at most
        held, named = t[0, i].tolist(), t[1, i].tolist()
        out.append([h + min(max(0.0, n - h), cap) for h, n in zip(held, named)])
    return out


def plan_budget(cfg: ModelConfig, *, mem: str | int | None, non_expert_bytes: int, kv_bytes: int,
                buffer_bytes: int, slot_bytes: int, alloc: str = "auto",
                recall: torch.Tensor | None = None, reuse: torch.Tensor | None = None,
                link_copies: float = 1.0) -> BudgetPlan:
    """Split a memory budget into the resident part and expert slots per layer.

    ``mem``: ``None`` keeps every expert resident; bytes (an int, or a size such as ``"6GiB"``) are the
    budget as given; ``"P%"`` is the resident part (non-expert + KV + buffers) plus P % of all routed
    experts at decode precision (``slot_bytes x n_experts x MoE layers``) — the knob benchmarks use.

    A budget that holds everything is fully resident.  Below the minimum — the resident part plus
    ``top_k`` slots in every MoE layer — it is a :class:`BudgetError` naming the minimum and its parts.
    Otherwise ``(budget - resident part) // slot_bytes`` slots are spread over the MoE layers, each
    getting at least ``top_k`` and at most ``n_experts``; the slots above the ``top_k`` floor go:

    * ``shallow4``: to the first 4 MoE layers until each holds every expert, shallowest first; the
      other layers then share the rest evenly, what does not divide going one each to the shallower ones;
    * ``even``: evenly over all MoE layers, what does not divide going one each to the shallower ones;
    * ``recall``: in proportion to each MoE layer's miss rate ``m = 1 - recall[i, 2]`` (prediction of
      layer i from layer i-1 with k+2 candidates; NaN/undefined → ``m = 1``), with ``m`` taken as an
      integer in parts per million (recall clamped to [0, 1] and rounded).  Layers whose proportional
      share reaches ``n_experts - top_k`` are filled and drop out, and the rest is shared again among the
      others by their weights; once no share reaches its cap, each layer gets the floor of its share and
      the slots the floors leave over (fewer than the layers) go one each to the shallowest remaining
      layers.  If only zero-miss layers remain, they share evenly as in ``even``;
    * ``reuse``: to minimise the expected misses, from each layer's reuse curves measured on the calibration
      text (``fate.calib.reuse``: the share of its needed experts an LRU cache of s slots holds, and the share
      held or named by the cross-layer prediction — of which the link can hide ``link_copies`` per layer):
      one slot at a time to the layer it helps most (:func:`_reuse_fill`);
    * ``auto``: ``reuse`` when the reuse curves are given, else ``recall`` when ``recall`` statistics are,
      else ``shallow4``.

    ``recall`` is the bundle's float32 ``[n_layers, 4]`` tensor (``fate.calib.recall``), ``reuse`` its
    ``[2, n_layers, n_experts + 1]`` one.  The sum of the
    slots never exceeds the slot budget; when the budget is not fully used it is because one slot more
    would not fit, or every layer is at ``n_experts``.
    """
    for name, v in (("non_expert_bytes", non_expert_bytes), ("kv_bytes", kv_bytes),
                    ("buffer_bytes", buffer_bytes), ("slot_bytes", slot_bytes)):
        _check_bytes(name, v)
    if alloc not in ALLOCS:
        raise BudgetError(f"--cache-alloc {alloc!r} is not one of {', '.join(ALLOCS)}")
    moe_ids = cfg.moe_layer_ids
    n_moe, n_exp, top_k = len(moe_ids), cfg.n_experts, cfg.top_k
    if n_moe and slot_bytes <= 0:
        raise BudgetError("plan_budget: slot_bytes must be positive for a model with routed experts")
    if alloc == "recall" and recall is None:
        raise BudgetError("--cache-alloc recall needs the bundle's calibration statistics, and this bundle has none "
                          "(converted with --no-calib); use --cache-alloc shallow4 or even")
    curves = _reuse_curves(cfg, reuse, link_copies)
    if alloc == "reuse" and curves is None:
        raise BudgetError("--cache-alloc reuse needs the bundle's reuse statistics (fate.calib.reuse), and this "
                          "bundle has none (converted by an older fate, or with --no-calib); re-convert it or use "
                          "--cache-alloc recall, shallow4 or even")
    miss = _miss_ppm(cfg, recall) if recall is not None else None
    if alloc != "auto":
        mode = alloc
    else:
        mode = "reuse" if curves is not None else "recall" if recall is not None else "shallow4"

    resident = non_expert_bytes + kv_bytes + buffer_bytes
    expert_total = slot_bytes * n_exp * n_moe
    floor_bytes = top_k * n_moe * slot_bytes
    min_bytes = resident + floor_bytes
    all_slots = [n_exp if m else 0 for m in cfg.moe_layers]

    def plan(budget, slots, full, how, request):
        return BudgetPlan(budget_bytes=budget, non_expert_bytes=non_expert_bytes, kv_bytes=kv_bytes,
                          buffer_bytes=buffer_bytes, slot_bytes=slot_bytes, slots_per_layer=slots,
                          fully_resident=full, alloc=how, expert_bytes_total=expert_total, n_experts=n_exp,
                          min_bytes=min_bytes, request=request)

    if mem is None:
        return plan(None, all_slots, True, "resident", "")

    percent = None
    if isinstance(mem, str):
        kind, value = parse_mem(mem)
        request = mem.strip()
        if kind == "percent":
            percent = value
            # Fraction of the decimal text, so "33.3%" means 333/1000 exactly, not a binary neighbour.
            budget = resident + math.floor(expert_total * Fraction(repr(value)) / 100)
        else:
            budget = int(value)
    elif isinstance(mem, int) and not isinstance(mem, bool):
        if mem < 0:
            raise BudgetError(f"--mem {mem} is negative")
        budget, request = mem, str(mem)
    else:
        raise BudgetError(f"--mem {mem!r} is not a size; write it like 6GiB, 512MiB, 1.5GB or 40%")

    if budget >= resident + expert_total:
        return plan(budget, all_slots, True, "resident", request)

    if budget < min_bytes:
        asked = f"--mem {request}" + (f" ({format_size(budget)})" if percent is not None else "")
        hint = "raise --mem"
        if percent is not None:
            tenths = -(-1000 * top_k // n_exp)  # 100 * k / E percent, rounded up to a tenth
            hint = f"raise --mem to at least {tenths // 10}.{tenths % 10}%"
        raise BudgetError(
            f"{asked} is below the minimum {format_size(min_bytes, ceil=True)} (non-expert weights "
            f"{format_size(non_expert_bytes)}, KV cache {format_size(kv_bytes)}, buffers {format_size(buffer_bytes)}, {top_k} experts "
            f"per MoE layer x {n_moe} layers {format_size(floor_bytes)}); {hint}")

    slots = (budget - resident) // slot_bytes
    extra = slots - top_k * n_moe  # >= 0 by the minimum; < n_moe * (n_exp - top_k) as not fully resident
    caps = [n_exp - top_k] * n_moe
    if mode == "shallow4":
        got = _shallow_fill(extra, caps)
    elif mode == "even":
        got = _level_fill(extra, caps)
    elif mode == "reuse":
        got = _reuse_fill(extra, caps, curves, top_k)
    else:
        got = _proportional_fill(extra, caps, miss)
    if sum(got) != extra or any(g > c for g, c in zip(got, caps)):
        raise AssertionError(f"slot distribution broke its invariants: {got} for {extra} over caps {caps}")
    out = [0] * cfg.n_layers
    for i, g in zip(moe_ids, got):
        out[i] = top_k + g
    return plan(budget, out, False, mode, request)

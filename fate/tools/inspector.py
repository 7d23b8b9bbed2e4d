"""fate-inspect: what is inside a bundle, and whether its expert blobs are intact.

``fate-inspect BUNDLE`` prints the architecture, sizes, stored precisions and their quantization
settings, the tokenizer and chat template, the calibration and provenance records, and a per-layer
table of the calibration statistics: expert popularity spread, the cosine of adjacent gate inputs and
the recall of cross-layer prediction with k, k+1, k+2 and k+4 candidates ("-" where the bundle has no
value).  ``--verify`` recomputes the crc32 of every expert blob and lists each bad one (exit 1 if any);
``--json`` prints the same report as JSON; ``--plot FILE.png`` draws a layer x expert popularity heatmap
and the per-layer recall curves (needs matplotlib).

Python: ``inspect_bundle(path) -> dict`` (the ``--json`` report without ``verify``) and
``verify_bundle(path) -> list`` (the bad blobs, empty when all are good).

JSON keys (``--json``); sizes are bytes, shares are fractions in [0, 1], absent values are ``null``:

* ``path``, ``container`` (``gguf`` / ``safetensors``), ``file_bytes``, ``format_version``
* ``architecture``: ``model_type`` (Hugging Face), ``arch`` (llama.cpp's ``general.architecture``),
  ``name``, ``n_layers``, ``moe_layers`` / ``dense_layers`` (layer ids), ``hidden_size``, ``n_heads``,
  ``n_kv_heads``, ``head_dim``, ``vocab_size``, ``context_length``, ``n_experts``, ``top_k``,
  ``expert_ffn``, ``dense_ffn``, ``shared_ffn``, ``shared_gate``, ``norm_topk_prob``, ``qk_norm``,
  ``qkv_bias``, ``clip_qkv``, ``tie_embeddings``, ``rope_theta``, ``rope_scaling``, ``attention``
  (``gqa`` / ``mla``), ``q_lora_rank``, ``kv_lora_rank``, ``v_head_dim``, ``rope_dim``, ``rope_style``,
  ``layer_windows`` (per layer sliding window, 0 full; [] none), ``attn_sinks``, ``router`` (the routing
  rule), ``n_group``, ``topk_group``, ``routed_scaling``, ``score_bias``, ``expert_act``, ``expert_bias``
* ``params``: ``non_expert`` (elements of every non-expert tensor), ``routed_experts``
  (3 x hidden x expert_ffn per expert), ``total``, ``active`` (non-expert + top_k routed experts per
  MoE layer: what one token computes with)
* ``bytes``: ``non_expert`` and ``non_expert_by_dtype`` ({``F16``: n, ...}), ``experts_by_precision``
  ({precision: bytes of its expert tensors, padding included}), ``checksums``, ``calibration``,
  ``other`` (header, metadata and alignment padding: the rest of the file)
* ``non_expert_storage``: ``dtype`` (``fate-convert --dtype``: ``f16``, ``bf16``, ``f32`` or ``q8``; from the
  tensors for bundles that predate the key), ``q8_matrices`` (projections stored as 8-bit codes), ``q8_group_size``
  (weights per float16 scale; ``null`` without q8)
* ``precisions``: stored precisions in file order
* ``quant``: ``method``, ``hqq_version``, ``alignment``, ``checksum``, and ``by_precision``:
  {precision: ``bits``, ``group_size`` (gate and up), ``group_size_down`` (down, whose input is the
  expert FFN; smaller when the group size does not divide it), ``axis``, ``blob_bytes``, ``blob_stride``}
* ``tokenizer``: ``vocab_size`` (ids the tokenizer can produce), ``bos_token``, ``bos_token_id``,
  ``eos_token``, ``eos_token_ids``, ``pad_token_id``, ``add_bos_token``, ``special_tokens``
  ([{``id``, ``content``}] of the added special tokens), ``error`` (why the tokenizer did not load, else
  ``null``)
* ``chat_template``: ``null``, or ``chars``, ``lines`` and ``head`` (its first lines)
* ``calibration``: ``null`` when the bundle has no statistics, else ``source``, ``tokens``, ``sha256``,
  ``recall_extra`` (the m of each "k+m" recall column), ``predictor`` (``fitted``: the bundle has prediction
  maps, ``fate.calib.predict``, which the runtime predicts by and the recall measured; ``router``: neither)
* ``provenance``: the provenance keys present, with their values (``fate.source.*``, ``fate.created``,
  ``fate.fate_version``, ``fate.quant.hqq_version``)
* ``top_n``: N of the ``top_share`` column (``--top``, 8 by default, at most the expert count)
* ``layers``: one entry per layer: ``layer``, ``kind`` (``moe`` / ``dense``), ``popularity`` (token ->
  expert assignments per expert over the calibration text), ``assignments`` (their sum), ``top_share``
  (share of the assignments going to the N most popular experts), ``max_share`` (the most popular
  expert's share), ``unused_experts`` (experts that got no assignment), ``cosine``, ``recall``
  ({``"k"``: r, ``"k+1"``: r, ``"k+2"``: r, ``"k+4"``: r}); the statistics are ``null`` for dense
  layers, for bundles without calibration and where the bundle stores NaN
* ``verify`` (with ``--verify`` only): ``checked`` (blobs), ``bytes``, ``bad`` (list of {``layer``,
  ``precision``, ``expert``, ``expected``, ``actual``}: stored and computed crc32), ``ok``
"""

from __future__ import annotations

import json
import math
import os
import sys
import zlib
from pathlib import Path

from tokenizers import Tokenizer
from tqdm import tqdm

from fate.errors import BundleMetadataError, BundleStructureError, ConfigError, UsageError
from fate.formats import constants as C
from fate.formats.bundle import Bundle
from fate.model.config import ModelConfig
from fate.units import format_size

PROVENANCE_KEYS = (C.K_HF_MODEL_TYPE, C.K_SOURCE_NAME, C.K_SOURCE_CONFIG_SHA256, C.K_CREATED, C.K_FATE_VERSION,
                   C.K_HQQ_VERSION)
TEMPLATE_HEAD_LINES = 5
DEFAULT_TOP_N = 8


# --- the report ------------------------------------------------------------------------------------

def _config(b: Bundle):
    try:
        return ModelConfig.from_json(b.require(C.K_MODEL_CONFIG))
    except ConfigError as e:
        raise BundleMetadataError(f"{b.path}: {e}") from None


def _finite(v) -> float | None:
    v = float(v)
    return v if math.isfinite(v) else None


def _recall_label(m: int) -> str:
    return "k" if m == 0 else f"k+{m}"


def _tokenizer_info(b: Bundle) -> dict:
    info = {
        "vocab_size": None,
        "bos_token": b.get(C.K_BOS_TOKEN),
        "bos_token_id": b.get(C.K_BOS_ID),
        "eos_token": b.get(C.K_EOS_TOKEN),
        "eos_token_ids": list(b.get(C.K_EOS_IDS) or ([b.get(C.K_EOS_ID)] if b.get(C.K_EOS_ID) is not None else [])),
        "pad_token_id": b.get(C.K_PAD_ID),
        "add_bos_token": b.get(C.K_ADD_BOS),
        "special_tokens": [],
        "error": None,
    }
    tj = b.get(C.K_TOKENIZER_HF_JSON)
    if tj is None:
        info["error"] = f"no {C.K_TOKENIZER_HF_JSON} key"
        return info
    try:
        tok = Tokenizer.from_str(tj)
        added = json.loads(tj).get("added_tokens") or []
    except Exception as e:  # noqa: BLE001 - reported, not raised: the rest of the report is still useful
        info["error"] = f"the tokenizer does not load ({e})"
        return info
    ids = [i for i in tok.get_vocab(with_added_tokens=True).values()]
    info["vocab_size"] = max(ids) + 1 if ids else 0
    info["special_tokens"] = [{"id": int(t["id"]), "content": str(t["content"])}
                              for t in added if isinstance(t, dict) and t.get("special")]
    return info


def _template_info(b: Bundle, head_lines: int = TEMPLATE_HEAD_LINES) -> dict | None:
    t = b.get(C.K_CHAT_TEMPLATE)
    if not isinstance(t, str) or not t:
        return None
    lines = t.splitlines()
    return {"chars": len(t), "lines": len(lines), "head": lines[:head_lines]}


def _layer_rows(b: Bundle, cfg, top_n: int) -> list[dict]:
    L, E = cfg.n_layers, cfg.n_experts
    pop = b.tensor(C.T_CALIB_POPULARITY) if b.has(C.T_CALIB_POPULARITY) else None
    cos = b.tensor(C.T_CALIB_COSINE) if b.has(C.T_CALIB_COSINE) else None
    rec = b.tensor(C.T_CALIB_RECALL) if b.has(C.T_CALIB_RECALL) else None
    extra = list(b.get(C.K_CALIB_RECALL_EXTRA) or C.RECALL_EXTRA)
    for name, t, shape in ((C.T_CALIB_POPULARITY, pop, (L, E)), (C.T_CALIB_COSINE, cos, (L,)),
                           (C.T_CALIB_RECALL, rec, (L, len(extra)))):
        if t is not None and tuple(t.shape) != shape:
            raise BundleMetadataError(f"{b.path}: tensor {name} has shape {list(t.shape)}, expected {list(shape)}")
    rows = []
    for i in range(L):
        moe = bool(cfg.moe_layers[i])
        row = {"layer": i, "kind": "moe" if moe else "dense", "popularity": None, "assignments": None,
               "top_share": None, "max_share": None, "unused_experts": None, "cosine": None,
               "recall": {_recall_label(m): None for m in extra}}
        if moe and pop is not None:
            counts = [int(c) for c in pop[i].tolist()]
            total = sum(counts)
            ranked = sorted(counts, reverse=True)
            row.update(popularity=counts, assignments=total, unused_experts=sum(1 for c in counts if c == 0))
            if total > 0:
                row["top_share"] = sum(ranked[:top_n]) / total
                row["max_share"] = ranked[0] / total
        if moe and cos is not None:
            row["cosine"] = _finite(cos[i])
        if moe and rec is not None:
            row["recall"] = {_recall_label(m): _finite(rec[i, j]) for j, m in enumerate(extra)}
        rows.append(row)
    return rows


def inspect_bundle(path: str | os.PathLike, *, top_n: int = DEFAULT_TOP_N,
                   template_lines: int = TEMPLATE_HEAD_LINES) -> dict:
    """Everything ``fate-inspect --json`` prints except ``verify`` (keys: see the module docstring)."""
    if top_n < 1:
        raise UsageError(f"--top {top_n}: give a positive number of experts")
    b = Bundle(path)
    try:
        return _report(b, top_n, template_lines)
    finally:
        b.close()


def _report(b: Bundle, top_n: int, template_lines: int) -> dict:
    cfg = _config(b)
    arch = b.get(C.K_GENERAL_ARCH)
    precisions = b.get(C.K_PRECISIONS) or []
    if not isinstance(precisions, list) or not all(isinstance(p, str) for p in precisions):
        raise BundleMetadataError(f"{b.path}: {C.K_PRECISIONS} is not a list of precisions")
    top_n = min(top_n, cfg.n_experts) if cfg.n_experts else top_n

    by_dtype: dict[str, int] = {}
    non_expert_elems = 0
    q8 = [n for n, t in b.tensors.items() if t.dtype == "I8" and C.is_projection(n) and C.q8_scale_name(n) in b.tensors]
    q8_scales = {C.q8_scale_name(n) for n in q8}
    experts_bytes = {p: 0 for p in precisions}
    crc_bytes = calib_bytes = 0
    for name, t in b.tensors.items():
        if name.startswith("fate.calib."):
            calib_bytes += t.nbytes
        elif C.is_expert_tensor(name):
            if name.endswith(".crc32"):
                crc_bytes += t.nbytes
            else:
                p = name.rsplit(".", 1)[1]
                experts_bytes[p] = experts_bytes.get(p, 0) + t.nbytes
        elif not name.startswith("fate."):
            by_dtype[t.dtype] = by_dtype.get(t.dtype, 0) + t.nbytes
            if name in q8_scales:  # bytes of a q8 matrix, not parameters of the model
                continue
            n = 1
            for d in t.shape:
                n *= d
            non_expert_elems += n
    non_expert_bytes = sum(by_dtype.values())
    tensor_bytes = non_expert_bytes + sum(experts_bytes.values()) + crc_bytes + calib_bytes

    n_moe = len(cfg.moe_layer_ids)
    per_expert = 3 * cfg.hidden_size * cfg.expert_ffn
    routed = per_expert * cfg.n_experts * n_moe

    quant = {"method": b.get(C.K_QUANT_METHOD), "hqq_version": b.get(C.K_HQQ_VERSION),
             "alignment": b.get(C.K_EXPERT_ALIGNMENT), "checksum": b.get(C.K_CHECKSUM_ALGO), "by_precision": {}}
    for p in precisions:
        quant["by_precision"][p] = {
            "bits": b.get(C.K_PRECISION_BITS.format(p=p)),
            "group_size": b.get(C.K_PRECISION_GROUP.format(p=p)),
            # down's input is the expert FFN: its group size may be smaller (bundles before it: the same)
            "group_size_down": b.get(C.K_PRECISION_GROUP_DOWN.format(p=p), b.get(C.K_PRECISION_GROUP.format(p=p))),
            "axis": b.get(C.K_PRECISION_AXIS.format(p=p)),
            "blob_bytes": b.get(C.K_PRECISION_BLOB_SIZE.format(p=p)),
            "blob_stride": b.get(C.K_PRECISION_BLOB_STRIDE.format(p=p)),
        }

    has_calib = b.has(C.T_CALIB_POPULARITY) or b.has(C.T_CALIB_RECALL) or bool(b.get(C.K_CALIB_PRESENT))
    calibration = None
    if has_calib:
        calibration = {"source": b.get(C.K_CALIB_SOURCE), "tokens": b.get(C.K_CALIB_TOKENS),
                       "sha256": b.get(C.K_CALIB_SHA256),
                       "recall_extra": list(b.get(C.K_CALIB_RECALL_EXTRA) or C.RECALL_EXTRA),
                       # how the runtime predicts by default, and what the recall columns measured
                       "predictor": "fitted" if b.has(C.T_CALIB_PREDICT) else "router"}

    return {
        "path": str(b.path),
        "container": b.format,
        "file_bytes": b.file_size,
        "format_version": b.get(C.MAGIC_KEY),
        "architecture": {
            "model_type": cfg.model_type, "arch": arch, "name": b.get(C.K_GENERAL_NAME),
            "n_layers": cfg.n_layers, "moe_layers": cfg.moe_layer_ids,
            "dense_layers": [i for i, m in enumerate(cfg.moe_layers) if not m],
            "hidden_size": cfg.hidden_size, "n_heads": cfg.n_heads, "n_kv_heads": cfg.n_kv_heads,
            "head_dim": cfg.head_dim, "vocab_size": cfg.vocab_size, "context_length": cfg.max_position,
            "n_experts": cfg.n_experts, "top_k": cfg.top_k, "expert_ffn": cfg.expert_ffn,
            "dense_ffn": cfg.dense_ffn, "shared_ffn": cfg.shared_ffn, "shared_gate": cfg.shared_gate,
            "norm_topk_prob": cfg.norm_topk_prob, "qk_norm": cfg.qk_norm, "qkv_bias": cfg.qkv_bias,
            "clip_qkv": cfg.clip_qkv, "tie_embeddings": cfg.tie_embeddings, "rope_theta": cfg.rope_theta,
            "rope_scaling": dict(cfg.rope_scaling or {}),
            "attention": cfg.attention, "q_lora_rank": cfg.q_lora_rank, "kv_lora_rank": cfg.kv_lora_rank,
            "v_head_dim": cfg.value_dim, "rope_dim": cfg.rotary_dim, "rope_style": cfg.rope_style,
            "layer_windows": list(cfg.layer_windows), "attn_sinks": cfg.attn_sinks, "router": cfg.router,
            "n_group": cfg.n_group, "topk_group": cfg.topk_group, "routed_scaling": cfg.routed_scaling,
            "score_bias": cfg.score_bias, "expert_act": cfg.expert_act, "expert_bias": cfg.expert_bias,
        },
        "params": {"non_expert": non_expert_elems, "routed_experts": routed, "total": non_expert_elems + routed,
                   "active": non_expert_elems + per_expert * cfg.top_k * n_moe},
        "bytes": {"non_expert": non_expert_bytes, "non_expert_by_dtype": dict(sorted(by_dtype.items())),
                  "experts_by_precision": experts_bytes, "checksums": crc_bytes, "calibration": calib_bytes,
                  "other": b.file_size - tensor_bytes},
        "non_expert_storage": _storage(b, q8),
        "precisions": list(precisions),
        "quant": quant,
        "tokenizer": _tokenizer_info(b),
        "chat_template": _template_info(b, template_lines),
        "calibration": calibration,
        "provenance": {k: b.get(k) for k in PROVENANCE_KEYS if k in b.metadata},
        "top_n": top_n,
        "layers": _layer_rows(b, cfg, top_n),
    }


def _storage(b: Bundle, q8: list[str]) -> dict:
    dtype = b.get(C.K_NON_EXPERT_DTYPE)
    if not isinstance(dtype, str):  # older bundles: the dtype of their matrices
        mats = [t.dtype for n, t in b.tensors.items() if C.is_projection(n)]
        dtype = "q8" if q8 else (max(set(mats), key=mats.count).lower() if mats else None)
    return {"dtype": dtype, "q8_matrices": len(q8), "q8_group_size": (b.get(C.K_Q8_GROUP) or C.Q8_GROUP) if q8 else None}


# --- verification ----------------------------------------------------------------------------------

def _blob_table(b: Bundle, cfg) -> list[tuple[int, str, int, int, int, list[int]]]:
    """(layer, precision, file offset of row 0, stride, blob bytes, stored crcs) per expert tensor."""
    precisions = b.require(C.K_PRECISIONS)
    out = []
    for i in cfg.moe_layer_ids:
        for p in precisions:
            name = C.T_EXPERTS.format(i=i, p=p)
            t = b.tensors.get(name)
            if t is None:
                raise BundleStructureError(f"{b.path}: tensor {name} is missing")
            size = int(b.require(C.K_PRECISION_BLOB_SIZE.format(p=p)))
            if len(t.shape) != 2 or t.shape[0] != cfg.n_experts or not 0 < size <= t.shape[1]:
                raise BundleMetadataError(f"{b.path}: tensor {name} has shape {list(t.shape)}, expected "
                                   f"[{cfg.n_experts}, >={size}]")
            crc_name = C.T_EXPERTS_CRC.format(i=i, p=p)
            crc = b.tensors.get(crc_name)
            if crc is None or crc.shape != (cfg.n_experts,) or crc.dtype != "I64":
                raise BundleMetadataError(f"{b.path}: checksums {crc_name} are missing or malformed")
            out.append((i, p, t.offset, t.shape[1], size, [int(v) for v in b.tensor(crc_name).tolist()]))
    return out


def verify_bundle(path: str | os.PathLike, *, progress: bool = False, report: dict | None = None) -> list[dict]:
    """crc32 of every expert blob against the stored one; the bad blobs, in file order, each as
    ``{"layer", "precision", "expert", "expected", "actual"}`` (empty when all are good).

    Blobs are read with plain file reads into one buffer, so memory stays flat on any bundle size.
    ``report``, when given, receives ``checked`` (blobs) and ``bytes`` (bytes read)."""
    b = Bundle(path)
    try:
        cfg = _config(b)
        table = _blob_table(b, cfg)
    finally:
        b.close()
    total = sum(cfg.n_experts * size for *_, size, _ in table)
    bad: list[dict] = []
    checked = 0
    buf = bytearray(max((size for *_, size, _ in table), default=0))
    with open(path, "rb", buffering=0) as f, tqdm(total=total, desc="verify", unit="B", unit_scale=True,
                                                   unit_divisor=1024, disable=not progress, file=sys.stderr,
                                                   dynamic_ncols=True) as bar:
        for layer, p, offset, stride, size, stored in table:
            view = memoryview(buf)[:size]
            for e in range(cfg.n_experts):
                f.seek(offset + e * stride)
                got = f.readinto(view)
                if got != size:
                    raise BundleMetadataError(f"{path}: truncated: expert {e} of layer {layer} ({p}) ends past the file")
                actual = zlib.crc32(view)
                if actual != stored[e]:
                    bad.append({"layer": layer, "precision": p, "expert": e, "expected": stored[e],
                                "actual": actual})
                checked += 1
                bar.update(size)
    if report is not None:
        report.update(checked=checked, bytes=total)
    return bad


# --- text ------------------------------------------------------------------------------------------

def _num(n: int) -> str:
    for unit, scale in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= scale:
            return f"{n / scale:.2f}{unit}"
    return str(n)


def _pct(v) -> str:
    return "-" if v is None else f"{100 * v:.1f}%"


def _flt(v, digits: int = 3) -> str:
    return "-" if v is None else f"{v:.{digits}f}"


def _yes(v) -> str:
    return "yes" if v else "no"


def format_report(r: dict) -> str:
    a, q, tok = r["architecture"], r["quant"], r["tokenizer"]
    out = [f"bundle        {r['path']}",
           f"              {r['container']}, {format_size(r['file_bytes'])} ({r['file_bytes']} bytes), "
           f"format version {r['format_version']}"]
    dense = a["dense_layers"]
    out.append(f"architecture  {a['model_type']} (general.architecture {a['arch']}), name {a['name']!r}")
    out.append(f"  layers {a['n_layers']}: {len(a['moe_layers'])} MoE"
               + (f", {len(dense)} dense ({', '.join(map(str, dense))})" if dense else ""))
    out.append(f"  hidden {a['hidden_size']}, heads {a['n_heads']} ({a['n_kv_heads']} kv) x {a['head_dim']}, "
               f"vocab {a['vocab_size']}, context {a['context_length']}")
    line = f"  experts {a['n_experts']} routed, top-{a['top_k']}, expert FFN {a['expert_ffn']}"
    if a["shared_ffn"]:
        line += f"; shared expert FFN {a['shared_ffn']}" + (" (gated)" if a["shared_gate"] else "")
    if a["dense_ffn"] and dense:
        line += f"; dense FFN {a['dense_ffn']}"
    out.append(line)
    scaling = dict(sorted(a["rope_scaling"].items(), key=lambda kv: kv[0] != "type"))  # the kind first
    out.append(f"  rope theta {a['rope_theta']:g}, scaling "
               + (", ".join(f"{k}={v}" for k, v in scaling.items()) if scaling else "none")
               + f"; qk norm {a['qk_norm']}; qkv bias {_yes(a['qkv_bias'])}; top-k renormalized "
               f"{_yes(a['norm_topk_prob'])}; tied embeddings {_yes(a['tie_embeddings'])}")
    line = f"  attention {a['attention']}"
    if a["attention"] == "mla":
        line += (f" (kv latent {a['kv_lora_rank']}, q rank {a['q_lora_rank'] or '-'}, v head {a['v_head_dim']})")
    line += f"; rope {a['rope_style']} on {a['rope_dim']} of {a['head_dim']} dims"
    windows = a["layer_windows"]
    if any(windows):
        line += (f"; sliding window {max(windows)} on layers "
                 + ",".join(str(i) for i, w in enumerate(windows) if w))
    if a["attn_sinks"]:
        line += "; attention sinks"
    out.append(line)
    line = f"  router {a['router']}"
    if a["n_group"] > 1:
        line += f" ({a['n_group']} groups, {a['topk_group']} chosen)"
    if a["score_bias"]:
        line += ", correction bias"
    if a["routed_scaling"] != 1.0:
        line += f", weights x{a['routed_scaling']:g}"
    line += f"; experts {'clamped SwiGLU' if a['expert_act'] == 'clamped' else 'SwiGLU'}" \
            + (" with biases" if a["expert_bias"] else "")
    out.append(line)
    pr = r["params"]
    out.append(f"params        {_num(pr['total'])} total, {_num(pr['active'])} active per token "
               f"(non-expert {_num(pr['non_expert'])}, routed experts {_num(pr['routed_experts'])})")
    by = r["bytes"]
    out.append(f"bytes         non-expert {format_size(by['non_expert'])} ("
               + ", ".join(f"{d} {format_size(n)}" for d, n in by["non_expert_by_dtype"].items()) + ")"
               + f", checksums {format_size(by['checksums'])}, calibration {format_size(by['calibration'])}, "
               f"header/padding {format_size(by['other'])}")
    st = r["non_expert_storage"]
    out.append(f"storage       non-expert {st['dtype'] or '-'}" + (
        f": {st['q8_matrices']} projection matrices as 8-bit codes with a float16 scale per {st['q8_group_size']} "
        "weights, the rest F16 (norms and routers F32)" if st["q8_matrices"] else ""))
    out.append(f"quantization  {q['method'] or '-'} {q['hqq_version'] or ''}".rstrip()
               + f", alignment {q['alignment']}, checksum {q['checksum']}")
    out.append("  precision  bits  group  axis  blob bytes  stride  stored")
    for p in r["precisions"]:
        s = q["by_precision"][p]
        group = "-" if not s["group_size"] else s["group_size"] if s["group_size_down"] == s["group_size"] \
            else f"{s['group_size']}/{s['group_size_down']}"  # gate and up / down
        out.append(f"  {p:<9} {s['bits']!s:>5} {group!s:>6} {s['axis']!s:>5} {s['blob_bytes']!s:>11} "
                   f"{s['blob_stride']!s:>7}  {format_size(by['experts_by_precision'].get(p, 0))}")
    if tok["error"]:
        out.append(f"tokenizer     {tok['error']}")
    else:
        eos = ", ".join(map(str, tok["eos_token_ids"])) or "-"
        bos = "none" if tok["bos_token"] is None and tok["bos_token_id"] is None else \
            f"{tok['bos_token']!r} ({tok['bos_token_id']})"
        out.append(f"tokenizer     vocab {tok['vocab_size']}, bos {bos}, eos {tok['eos_token']!r} (ids {eos}), "
                   f"pad {tok['pad_token_id'] if tok['pad_token_id'] is not None else '-'}, "
                   f"add_bos {_yes(tok['add_bos_token'])}")
        specials = tok["special_tokens"]
        if specials:
            shown = " ".join(f"{t['content']}={t['id']}" for t in specials[:12])
            more = f" (+{len(specials) - 12} more)" if len(specials) > 12 else ""
            out.append(f"  special tokens: {shown}{more}")
    t = r["chat_template"]
    if t is None:
        out.append("chat template none")
    else:
        out.append(f"chat template {t['lines']} line{'s' if t['lines'] != 1 else ''}, {t['chars']} chars:")
        for ln in t["head"]:
            out.append("  | " + (ln if len(ln) <= 100 else ln[:99] + "…"))
        if t["lines"] > len(t["head"]):
            out.append("  | …")
    c = r["calibration"]
    if c is None:
        out.append("calibration   none (converted with --no-calib)")
    else:
        out.append(f"calibration   source {c['source']}, {c['tokens']} tokens, sha256 {c['sha256']}; prediction by "
                   + ("maps fitted on it (fate.calib.predict)" if c["predictor"] == "fitted" else "the next routers"))
    out.append("provenance    none" if not r["provenance"] else "provenance")
    for k, v in r["provenance"].items():
        out.append(f"  {k} = {v}")

    rows = r["layers"]
    labels = list(rows[0]["recall"]) if rows else []
    n = r["top_n"]
    how = ("" if c is None else " by the fitted maps, held out" if c["predictor"] == "fitted"
           else " by layer i's router")
    out.append("layers        popularity: token->expert assignments on the calibration text; recall: layer i's "
               f"experts predicted from layer i-1's gate input (layer 0: from the token embedding){how}")
    out.append(f"  layer  kind   assign  top-{n:<2}  max    unused  cosine " + "".join(f"{'r@' + lb:>7}" for lb in labels))
    for row in rows:
        assign = "-" if row["assignments"] is None else str(row["assignments"])
        unused = "-" if row["unused_experts"] is None else str(row["unused_experts"])
        out.append(f"  {row['layer']:>5}  {row['kind']:<5} {assign:>7} {_pct(row['top_share']):>7} "
                   f"{_pct(row['max_share']):>6} {unused:>6}  {_flt(row['cosine']):>6} "
                   + "".join(f"{_flt(row['recall'][lb]):>7}" for lb in labels))
    return "\n".join(out)


def format_bad(bad: list[dict]) -> list[str]:
    return [f"bad blob: layer {x['layer']}, {x['precision']}, expert {x['expert']} "
            f"(crc32 stored {x['expected']:08x}, computed {x['actual']:08x})" for x in bad]


# --- plot ------------------------------------------------------------------------------------------

def require_matplotlib():
    """matplotlib is an optional dependency (the ``plot`` extra): imported only to draw."""
    try:
        import matplotlib  # noqa: F401  (optional dependency: the plot extra)
        from matplotlib.backends.backend_agg import FigureCanvasAgg  # noqa: F401
        from matplotlib.figure import Figure  # noqa: F401
    except ImportError:
        raise UsageError("--plot needs matplotlib, which is not installed: pip install matplotlib") from None


def plot_report(r: dict, out: str | os.PathLike) -> None:
    """Layer x expert popularity heatmap (each MoE layer's share per expert) beside the per-layer recall
    curves (and the adjacent cosine), written to ``out`` (the format follows its extension)."""
    require_matplotlib()
    from matplotlib.backends.backend_agg import FigureCanvasAgg  # optional dependency (see require_matplotlib)
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    rows = [row for row in r["layers"] if row["kind"] == "moe"]
    if r["calibration"] is None or not rows or all(row["popularity"] is None for row in rows):
        raise UsageError(f"{r['path']} has no calibration statistics to plot (converted with --no-calib); "
                               "re-convert it with calibration")
    E = r["architecture"]["n_experts"]
    grid = []
    for row in rows:
        counts, total = row["popularity"] or [0] * E, row["assignments"] or 0
        grid.append([c / total if total else float("nan") for c in counts])
    fig = Figure(figsize=(12, max(4.0, 0.22 * len(rows) + 2)), layout="constrained")
    FigureCanvasAgg(fig)
    ax_heat, ax_rec = fig.subplots(1, 2, width_ratios=[3, 2])
    im = ax_heat.imshow(grid, aspect="auto", interpolation="nearest", cmap="viridis")
    ax_heat.set_xlabel("expert")
    ax_heat.set_ylabel("layer")
    ax_heat.set_yticks(range(len(rows)))
    ax_heat.set_yticklabels([str(row["layer"]) for row in rows], fontsize=7 if len(rows) > 24 else 9)
    ax_heat.set_title(f"expert popularity (share of each layer's assignments, top-{r['architecture']['top_k']})")
    fig.colorbar(im, ax=ax_heat, label="share")

    layers = [row["layer"] for row in rows]
    labels = list(rows[0]["recall"])
    for lb in labels:
        ys = [row["recall"][lb] if row["recall"][lb] is not None else float("nan") for row in rows]
        ax_rec.plot(layers, ys, marker="o", markersize=3, label=f"recall @ {lb}")
    cos = [row["cosine"] if row["cosine"] is not None else float("nan") for row in rows]
    ax_rec.plot(layers, cos, linestyle=":", color="gray", label="cosine(g[i-1], g[i])")
    ax_rec.set_xlabel("layer")
    ax_rec.xaxis.set_major_locator(MaxNLocator(integer=True))
    finite_cos = [c for c in cos if math.isfinite(c)]
    ax_rec.set_ylim(min([0.0] + finite_cos) - (0.02 if finite_cos and min(finite_cos) < 0 else 0.0), 1.02)
    ax_rec.set_title("cross-layer prediction of layer i from layer i-1")
    ax_rec.grid(alpha=0.3)
    ax_rec.legend(fontsize=8, loc="lower right")
    fig.suptitle(f"{Path(r['path']).name}: {r['architecture']['model_type']}, {E} experts")
    fig.savefig(out, dpi=120)

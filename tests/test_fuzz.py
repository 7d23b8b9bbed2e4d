"""Fuzzing the bundle reader: a mutated bundle either works exactly like the original or raises BundleError.

A tiny OLMoE checkpoint (2 layers, q4 experts, no calibration) is converted to ``.gguf`` and
``.safetensors``.  Each example mutates one of them — integer fields of the header (counts, lengths,
value types, dimensions, tensor types and offsets), metadata values (wrong types, out of range, deleted,
added, duplicated), the model config's fields, tensor table entries, truncations, appended bytes and
random byte flips or overwrites — then opens the result with ``fate.load`` and generates ONE greedy
token from a fixed id prompt.  Allowed outcomes:

* it works and the token is the unmutated bundle's;
* it raises ``BundleError`` (any subclass);
* it works with another token, but only where no reader can tell without a checksum — see
  :data:`ACCEPT_UNCHECKED_CONFIG_DRIFT` and :data:`ACCEPT_NON_EXPERT_DATA_DRIFT`, one flag each.

Anything else fails: another exception type, a case running past :data:`CASE_SECONDS` (SIGALRM), or the
process's peak RSS growing by more than :data:`RSS_GROWTH_LIMIT` over the run (Linux's VmHWM, reset
first through /proc/self/clear_refs).  A byte flipped inside an expert blob that the one token does not
use goes unnoticed by design (crc32 is checked on first read), so the output is identical then.

The mutators and the oracle are plain functions of a :class:`Chooser`, so ``benchmarks/fuzz_reader.py``
runs the very same cases at scale from a seeded ``random.Random``.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import math
import os
import random
import signal
import struct
from dataclasses import dataclass, field
from pathlib import Path

import pytest

import fate
from fate.formats import constants as C
from fate.errors import BundleError
from fate.formats.bundle import Bundle

# --- what counts as a pass ----------------------------------------------------------------------------
ACCEPT_NON_EXPERT_DATA_DRIFT = False
"""Accept "works, different token" when only non-expert tensor bytes changed.  Off: the converter stores
a crc32 per non-expert tensor (``fate.crc32.non_expert``) and the runtime checks it at load."""

ACCEPT_UNCHECKED_CONFIG_DRIFT = False
"""Accept "works, different token" when ``fate.model_config`` changed only in fields that nothing else in
the bundle mirrors (:data:`UNCHECKED_CONFIG_FIELDS`): such a file is a valid bundle of a slightly different
model, which no reader can tell from the original without a checksum over the metadata.  Turn off once the
metadata carries one."""

UNCHECKED_CONFIG_FIELDS = frozenset({"clip_qkv", "norm_topk_prob", "rope_scaling"})

PROMPT_IDS = [5, 17, 42, 9]
CASE_SECONDS = 20
RSS_GROWTH_LIMIT = 200 << 20
EXAMPLES = 200


# --- choices: hypothesis draws in the test, random.Random in the benchmark ------------------------------
class RandomChooser:
    def __init__(self, rng: random.Random):
        self.rng = rng

    def int(self, lo: int, hi: int) -> int:
        return self.rng.randint(lo, hi)

    def pick(self, seq):
        seq = list(seq)
        return seq[self.rng.randrange(len(seq))]

    def bytes(self, n: int) -> bytes:
        return self.rng.randbytes(n)


class DrawChooser:
    def __init__(self, data):
        from hypothesis import strategies as st

        self.data, self.st = data, st

    def int(self, lo: int, hi: int) -> int:
        return self.data.draw(self.st.integers(lo, hi))

    def pick(self, seq):
        return self.data.draw(self.st.sampled_from(list(seq)))

    def bytes(self, n: int) -> bytes:
        return self.data.draw(self.st.binary(min_size=n, max_size=n))


# --- the unmutated bundle, taken apart ------------------------------------------------------------------
@dataclass
class Pristine:
    fmt: str  # "gguf" or "safetensors"
    path: Path
    raw: bytes
    token_ids: list[int]
    bundle: Bundle
    slots: list[tuple[int, int, str]] = field(default_factory=list)  # (offset, width, label): header integers
    spans: list[tuple[int, int, str]] = field(default_factory=list)  # (start, end, label): strings, tensor data
    header_end: int = 0
    alignment: int = 64
    data: bytes = b""  # the data section
    kvs: list = field(default_factory=list)  # gguf: [key, vtype, subtype, value]
    infos: list = field(default_factory=list)  # gguf: [name, dims (GGUF order), ggml type, relative offset]
    table: dict = field(default_factory=dict)  # safetensors: the header, metadata values decoded

    @property
    def suffix(self) -> str:
        return "." + self.fmt


def take_apart(path: Path, token_ids: list[int]) -> Pristine:
    raw = path.read_bytes()
    p = Pristine(path.suffix[1:], path, raw, token_ids, Bundle(path))
    if p.fmt == "gguf":
        from gguf import GGUFReader  # trusted input here: the converter's own output

        r = GGUFReader(path)
        p.slots += [(4, 4, "GGUF version"), (8, 8, "tensor count"), (16, 8, "metadata count")]

        def walk(fld, label):
            off = fld.offset
            for j, part in enumerate(fld.parts):
                if part.size == 1:
                    p.slots.append((off, part.nbytes, f"{label} part {j}"))
                elif part.dtype.itemsize == 1:
                    p.spans.append((off, off + part.nbytes, f"{label} bytes"))
                else:  # tensor dims
                    for d in range(part.size):
                        p.slots.append((off + d * part.dtype.itemsize, part.dtype.itemsize, f"{label} dim {d}"))
                off += part.nbytes

        for key, fld in r.fields.items():
            if key.startswith("GGUF."):
                continue
            walk(fld, f"metadata {key}")
            types = [int(t) for t in fld.types]
            p.kvs.append([key, types[0], types[1] if len(types) > 1 else None, fld.contents()])
        for t in r.tensors:
            walk(t.field, f"tensor info {t.name}")
            p.infos.append([t.name, [int(d) for d in t.shape], int(t.tensor_type), int(t.data_offset - r.data_offset)])
            p.spans.append((int(t.data_offset), int(t.data_offset) + int(t.n_bytes), f"data {t.name}"))
        p.header_end, p.alignment = int(r.data_offset), int(r.alignment)
        del r
    else:
        n = struct.unpack_from("<Q", raw)[0]
        table = json.loads(raw[8:8 + n])
        table["__metadata__"] = {k: json.loads(v) for k, v in table["__metadata__"].items()}
        p.table = table
        p.slots.append((0, 8, "header length"))
        p.spans.append((8, 8 + n, "header"))
        for name, info in table.items():
            if name != "__metadata__":
                s, e = info["data_offsets"]
                p.spans.append((8 + n + s, 8 + n + e, f"data {name}"))
        p.header_end = 8 + n
        p.alignment = int(table["__metadata__"][C.K_EXPERT_ALIGNMENT])
    p.data = raw[p.header_end:]
    return p


# --- writing containers from parts ------------------------------------------------------------------------
_PACK = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<B", 10: "<Q", 11: "<q", 12: "<d"}


def _gguf_value(vtype: int, value, subtype=None) -> bytes:
    if vtype == 8:
        b = value.encode("utf-8", "surrogatepass") if isinstance(value, str) else bytes(value)
        return struct.pack("<Q", len(b)) + b
    if vtype == 9:
        if subtype == 9:  # arrays of (empty) arrays
            return struct.pack("<IQ", 9, len(value)) + b"".join(struct.pack("<IQ", 4, 0) for _ in value)
        return struct.pack("<IQ", subtype, len(value)) + b"".join(_gguf_value(subtype, v) for v in value)
    return struct.pack(_PACK[vtype], value)


def build_gguf(kvs, infos, alignment: int, data: bytes) -> bytes:
    out = [b"GGUF", struct.pack("<IQQ", 3, len(infos), len(kvs))]
    for key, vtype, subtype, value in kvs:
        out += [_gguf_value(8, key), struct.pack("<I", vtype), _gguf_value(vtype, value, subtype)]
    for name, dims, gtype, offset in infos:
        out += [_gguf_value(8, name), struct.pack("<I", len(dims)), struct.pack(f"<{len(dims)}Q", *dims),
                struct.pack("<IQ", gtype, offset)]
    head = b"".join(out)
    head += b"\0" * (-len(head) % alignment)
    return head + data


def build_safetensors(table: dict, data: bytes, alignment: int = 64, encode_metadata: bool = True) -> bytes:
    table = dict(table)
    if encode_metadata and isinstance(table.get("__metadata__"), dict):
        table["__metadata__"] = {k: json.dumps(v) for k, v in table["__metadata__"].items()}
    return _st_from_text(json.dumps(table, separators=(",", ":")).encode(), data, alignment)


def _st_from_text(header: bytes, data: bytes, alignment: int = 64) -> bytes:
    header += b" " * (-(8 + len(header)) % alignment)
    return struct.pack("<Q", len(header)) + header + data


# --- values -----------------------------------------------------------------------------------------------
_RANGES = {0: (0, 2**8 - 1), 1: (-2**7, 2**7 - 1), 2: (0, 2**16 - 1), 3: (-2**15, 2**15 - 1), 4: (0, 2**32 - 1),
           5: (-2**31, 2**31 - 1), 10: (0, 2**64 - 1), 11: (-2**63, 2**63 - 1)}
_INTS = [0, 1, 2, 3, 4, 7, 8, 16, 31, 32, 63, 64, 65, 255, 256, 4095, 4096, 6912, 65535, 65536, 2**24, 2**31 - 1,
         2**31, 2**32 - 1, 2**32, 2**53, 2**63 - 1, 2**63, 2**64 - 1, -1, -2, -64, -2**31, -2**63]
_FLOATS = [0.0, -1.0, 0.5, 1e-6, 1e-5, 10000.0, 1e30, float("nan"), float("inf"), float("-inf")]
_STRINGS = ["", "q4", "q2", "f16", "olmoe", "llama", "crc32", "{}", "[]", "null", "1", '{"a": 1}', "\x00",
            "é" * 3, "x" * 300, "[" * 3000]


def interesting_int(ch, orig: int | None = None, size: int | None = None) -> int:
    pool = list(_INTS)
    if orig is not None:
        pool += [orig - 1, orig + 1, orig * 2, orig // 2, orig + 64, orig - 64, orig + 4096, orig ^ 1]
    if size is not None:
        pool += [size, size - 1, size + 1, size // 2]
    return ch.pick(pool)


def random_value(ch, st: bool = False):
    """(vtype, subtype, value) of a random GGUF metadata value (safetensors: vtype ignored)."""
    kind = ch.pick(["int", "int", "float", "bool", "str", "str", "array"] + (["json"] if st else []))
    if kind == "int":
        vtype = ch.pick([0, 1, 2, 3, 4, 5, 10, 11])
        lo, hi = _RANGES[vtype]
        v = interesting_int(ch)
        return vtype, None, v if lo <= v <= hi else (v - lo) % (hi - lo + 1) + lo
    if kind == "float":
        vtype = ch.pick([6, 12])
        v = ch.pick(_FLOATS)
        return vtype, None, (v if vtype == 12 or not math.isfinite(v) or abs(v) < 1e38 else 3e38)
    if kind == "bool":
        return 7, None, ch.pick([True, False])
    if kind == "str":
        return 8, None, ch.pick(_STRINGS)
    if kind == "json":
        return None, None, ch.pick([None, {}, {"a": [1]}, [[1, 2]], [None], [{"x": 1}]])
    sub = ch.pick([4, 11, 8, 6, 7] + ([] if st else [9]))
    n = ch.int(0, 4)
    items = [random_value(ch)[2] for _ in range(n)] if sub == 9 else [
        {4: lambda: ch.pick([0, 1, 64, 2**32 - 1]), 11: lambda: ch.pick([0, 2, -1, 2**63 - 1, -2**63]),
         8: lambda: ch.pick(_STRINGS[:8]), 6: lambda: ch.pick([0.0, 1.0, float("nan")]),
         7: lambda: ch.pick([True, False])}[sub]() for _ in range(n)]
    return 9, sub, items


_CONFIG_VALUES = [0, 1, -1, 2, 3, 7, 8, 9, 15, 16, 17, 32, 64, 128, 513, 2**24, 2**24 + 1, 2**62, 10**30, 0.5, 1e-6,
                  -1.0, 2.0, 1e9, float("nan"), float("inf"), True, False, None, "", "full", "head", "none",
                  "linear", "olmoe", "mixtral", [], [True], [True, False], [False, True], [True, True, True], [1, 1],
                  {}, {"type": "linear", "factor": 2.0}, {"type": "linear", "factor": 0}, {"type": "yarn"},
                  {"type": "linear", "factor": "x"}, {"factor": 2.0}, [[[[[]]]]]]
_GEN_VALUES = [0, 1, -1, 0.0, 0.5, 1.5, -0.1, 50, 2**40, float("nan"), float("inf"), True, False, None, "x", [], {}]

IMPORTANT_KEYS = [C.MAGIC_KEY, C.K_MODEL_CONFIG, C.K_PRECISIONS, "fate.quant.q4.bits", "fate.quant.q4.group_size",
                  "fate.quant.q4.axis", "fate.quant.q4.blob_bytes", "fate.quant.q4.blob_stride", C.K_EXPERT_ALIGNMENT,
                  C.K_GENERAL_ALIGNMENT, C.K_GENERAL_ARCH, C.K_TOKENIZER_HF_JSON, C.K_EOS_ID, C.K_EOS_IDS, C.K_BOS_ID,
                  C.K_PAD_ID, C.K_GEN_DEFAULTS, C.K_NON_EXPERT_CRC_NAMES, C.K_EOS_TOKEN, C.K_BOS_TOKEN, C.K_ADD_BOS,
                  C.K_CHAT_TEMPLATE, C.K_CALIB_PRESENT, C.K_CALIB_RECALL_EXTRA, "olmoe.block_count",
                  "olmoe.expert_used_count", "olmoe.attention.layer_norm_rms_epsilon", "olmoe.rope.freq_base",
                  "olmoe.embedding_length", "olmoe.context_length", "olmoe.leading_dense_block_count"]


# --- mutators: each returns (description, bytes) -----------------------------------------------------------
def _flip(p: Pristine, ch):
    data = bytearray(p.raw)
    where = ch.pick(["anywhere", "header", "header", "span"])
    k = ch.int(1, 8)
    for _ in range(k):
        if where == "header":
            pos = ch.int(0, p.header_end - 1)
        elif where == "span":
            s, e, _label = ch.pick(p.spans)
            pos = ch.int(s, max(s, e - 1))
        else:
            pos = ch.int(0, len(data) - 1)
        data[pos] ^= ch.int(1, 255)
    return f"flip {k} bytes ({where})", bytes(data)


def _overwrite(p: Pristine, ch):
    n = ch.int(1, 32)
    pos = ch.int(0, (p.header_end if ch.int(0, 1) else len(p.raw)) - 1)
    return f"overwrite {n} bytes at {pos}", p.raw[:pos] + ch.bytes(n) + p.raw[pos + n:]


def _truncate(p: Pristine, ch):
    where = ch.pick(["anywhere", "header", "boundary"])
    if where == "header":
        cut = ch.int(0, p.header_end)
    elif where == "boundary":
        s, e, _label = ch.pick(p.spans)
        cut = max(0, ch.pick([s, e]) + ch.int(-2, 2))
    else:
        cut = ch.int(0, len(p.raw) - 1)
    return f"truncate to {cut} bytes", p.raw[:cut]


def _append(p: Pristine, ch):
    n = ch.int(1, 4096)
    return f"append {n} bytes", p.raw + ch.bytes(min(n, 64)) * (n // 64 + 1)


def _slot(p: Pristine, ch):
    off, width, label = ch.pick(p.slots)
    orig = int.from_bytes(p.raw[off:off + width], "little")
    v = interesting_int(ch, orig, len(p.raw)) & ((1 << (8 * width)) - 1)
    return f"{label} (offset {off}): {orig} -> {v}", p.raw[:off] + v.to_bytes(width, "little") + p.raw[off + width:]


def _metadata_items(p: Pristine) -> list:
    if p.fmt == "gguf":
        return [list(kv) for kv in p.kvs]
    return [[k, None, None, v] for k, v in p.table["__metadata__"].items()]


def _rebuild(p: Pristine, items=None, infos=None, table=None) -> bytes:
    if p.fmt == "gguf":
        return build_gguf(items if items is not None else p.kvs, infos if infos is not None else p.infos,
                          p.alignment, p.data)
    t = dict(table if table is not None else p.table)
    if items is not None:
        t["__metadata__"] = {k: v for k, _, _, v in items}
    return build_safetensors(t, p.data, p.alignment)


def _meta(p: Pristine, ch):
    items = _metadata_items(p)
    keys = [kv[0] for kv in items]
    key = ch.pick(IMPORTANT_KEYS + keys)
    action = ch.pick(["retype", "retype", "same-type", "delete", "add", "duplicate"])
    idx = keys.index(key) if key in keys else None
    if action == "delete" and idx is not None:
        del items[idx]
    elif action == "duplicate" and idx is not None and p.fmt == "gguf":
        vt, sub, v = random_value(ch) if ch.int(0, 1) else items[idx][1:]
        items.append([key, vt, sub, v])
    elif action == "same-type" and idx is not None:
        _, vt, sub, v = items[idx]
        if isinstance(v, bool):
            v = not v
        elif isinstance(v, int):
            v = interesting_int(ch, v)
            if vt is not None:
                lo, hi = _RANGES.get(vt, (-2**63, 2**63 - 1))
                v = min(max(v, lo), hi)
        elif isinstance(v, float):
            v = ch.pick(_FLOATS) if vt != 6 else ch.pick([0.0, -1.0, 1e-6, float("nan"), float("inf")])
        elif isinstance(v, str):
            cut = ch.int(0, len(v))
            v = ch.pick([v[:cut], v[:cut] + "\"" + v[cut + 1:], v + v, v[:cut] + "\\" + v[cut:]])
        elif isinstance(v, list):
            v = ch.pick([[], v + v, v[:-1], v[::-1], [7] + v[1:], [None] + v[1:] if p.fmt != "gguf" else v[:1]])
            if p.fmt == "gguf" and sub in _RANGES:
                v = [x for x in v if isinstance(x, int)]
            if p.fmt == "gguf" and sub == 8:
                v = [x for x in v if isinstance(x, str)]
        items[idx] = [key, vt, sub, v]
    else:
        vt, sub, v = random_value(ch, st=p.fmt != "gguf")
        if p.fmt == "gguf" and vt is None:
            vt, v = 8, json.dumps(v)
        if idx is None:
            items.append([key, vt, sub, v])
        else:
            items[idx] = [key, vt, sub, v]
        action = f"set {vt}/{sub} {v!r:.60}"
    return f"metadata {key}: {action}", _rebuild(p, items=items)


def _json_field_edit(ch, text: str, values, extra_field: str) -> tuple[str, str]:
    obj = json.loads(text)
    name = ch.pick(sorted(obj) + [extra_field])
    if ch.int(0, 5) == 0:
        obj.pop(name, None)
        return f"delete {name}", json.dumps(obj)
    v = ch.pick(values)
    if isinstance(v, (int, float)) and not isinstance(v, bool) and isinstance(obj.get(name), (int, float)) \
            and not isinstance(obj.get(name), bool) and ch.int(0, 1):
        v = obj[name] + ch.pick([-1, 1, 2, -2, 0.5])
    obj[name] = v
    return f"{name} = {v!r:.60}", json.dumps(obj)


def _config(p: Pristine, ch):
    items = _metadata_items(p)
    key = ch.pick([C.K_MODEL_CONFIG, C.K_MODEL_CONFIG, C.K_GEN_DEFAULTS])
    idx = [kv[0] for kv in items].index(key)
    desc, text = _json_field_edit(ch, items[idx][3], _CONFIG_VALUES if key == C.K_MODEL_CONFIG else _GEN_VALUES,
                                  "bogus" if key == C.K_MODEL_CONFIG else "top_p")
    items[idx] = [key, 8, None, text]
    return f"{key}: {desc}", _rebuild(p, items=items)


def _tensor_gguf(p: Pristine, ch):
    infos = [[n, list(d), t, o] for n, d, t, o in p.infos]
    names = [i[0] for i in infos]
    j = ch.int(0, len(infos) - 1)
    name, dims, gtype, off = infos[j]
    action = ch.pick(["dim", "dim", "ndims", "type", "offset", "offset", "name", "delete", "duplicate", "swap"])
    if action == "dim":
        d = ch.int(0, len(dims) - 1)
        dims[d] = interesting_int(ch, dims[d]) & (2**64 - 1)
    elif action == "ndims":
        dims[:] = ch.pick([dims + [1], dims[:-1], dims[::-1], [1] * 5, dims + [2**32], []])
    elif action == "type":
        infos[j][2] = ch.pick([0, 1, 24, 27, 30, 2, 8, 99, 2**32 - 1])
    elif action == "offset":
        other = ch.pick(infos)[3]
        infos[j][3] = ch.pick([other, off + p.alignment, off - p.alignment, off + 1, 0, 2**63, len(p.data),
                               len(p.data) - p.alignment, interesting_int(ch, off) & (2**64 - 1)]) & (2**64 - 1)
    elif action == "name":
        infos[j][0] = ch.pick(names + ["", "blk.0.attn_q.bias", "blk.9.attn_q.weight", "x" * 70000])
    elif action == "delete":
        del infos[j]
    elif action == "duplicate":
        infos.append(list(infos[j]))
    else:
        k = ch.int(0, len(infos) - 1)
        infos[j][3], infos[k][3] = infos[k][3], infos[j][3]
        action = f"swap offsets with {infos[k][0]}"
    return f"tensor info {name}: {action}", _rebuild(p, infos=infos)


def _tensor_st(p: Pristine, ch):
    table = json.loads(json.dumps({k: v for k, v in p.table.items() if k != "__metadata__"}))
    names = [n for n in table if not n.startswith("fate.pad.")]
    name = ch.pick(names)
    info = table[name]
    action = ch.pick(["dtype", "shape", "shape", "offsets", "offsets", "delete", "rename", "junk", "not-a-dict"])
    if action == "dtype":
        info["dtype"] = ch.pick(["F16", "F32", "BF16", "I8", "I64", "U8", "F64", "", 5, None, ["F16"]])
    elif action == "shape":
        shape = info["shape"]
        choice = ch.pick(["dim", "append", "drop", "reverse", "weird"])
        if choice == "dim" and shape:
            shape[ch.int(0, len(shape) - 1)] = interesting_int(ch)
        elif choice == "append":
            shape.append(ch.pick([1, 2, 0, 2**40]))
        elif choice == "drop" and shape:
            shape.pop()
        elif choice == "reverse":
            shape.reverse()
        else:
            info["shape"] = ch.pick([[-1], [1.5], ["2"], None, [[1]], [1] * 9, [True], {}])
        action = f"shape {choice} -> {info['shape']!r:.60}"
    elif action == "offsets":
        s, e = info["data_offsets"]
        other = table[ch.pick(names)]["data_offsets"]
        info["data_offsets"] = ch.pick([[s + 64, e + 64], [s - 64, e - 64], [s, e + 1], [e, s], [s + 1, e + 1],
                                        [-s, e], [s, 2**64], [s], [], "x", [s, None], list(other),
                                        [other[0], other[0] + e - s], [s + 2**40, e + 2**40], [1.0 * s, e]])
        action = f"data_offsets [{s}, {e}] -> {info['data_offsets']!r:.60}"
    elif action == "delete":
        del table[name]
    elif action == "rename":
        table[ch.pick(["", "x" * 10, "blk.0.attn_q.bias", "blk.9.attn_q.weight"])] = table.pop(name)
    elif action == "junk":
        table[f"junk{ch.int(0, 9)}"] = {"dtype": "F32", "shape": [ch.int(0, 64)], "data_offsets": [0, 4 * ch.int(0, 64)]}
    else:
        table[name] = ch.pick([None, 1, "x", [1, 2]])
    table["__metadata__"] = p.table["__metadata__"]
    return f"tensor entry {name}: {action}", build_safetensors(table, p.data, p.alignment)


def _text_st(p: Pristine, ch):
    """Header edits that only text can express (duplicate keys, deep nesting, junk in the padding)."""
    n = p.header_end - 8
    header = p.raw[8:p.header_end]
    action = ch.pick(["duplicate-key", "nest-value", "nest-header", "junk-padding", "not-object", "bad-utf8"])
    if action == "duplicate-key":
        header = header.replace(b'"__metadata__":{', b'"__metadata__":{"fate.format_version":"2",', 1)
    elif action == "nest-value":
        header = header.replace(b'"__metadata__":{', b'"__metadata__":{"fate.deep":"' + b"[" * 100000 + b'",', 1)
    elif action == "nest-header":
        header = b"[" * ch.pick([1000, 100000]) + b"]" * 5
    elif action == "junk-padding":
        stripped = header.rstrip(b" ")
        header = stripped + b"x" * (n - len(stripped))
        if header == p.raw[8:p.header_end]:
            header = header[:-1] + b"!"
    elif action == "not-object":
        header = b'["a", 1]'
    else:
        header = header.replace(b"olmoe", b"olm\xffe", 1)
    return f"safetensors header text: {action}", _st_from_text(header.rstrip(b" "), p.data, p.alignment)


MUTATORS_COMMON = [_flip, _flip, _flip, _overwrite, _truncate, _append, _slot, _slot, _meta, _meta, _config, _config]


def mutate(p: Pristine, ch) -> tuple[str, bytes]:
    ops = MUTATORS_COMMON + ([_tensor_gguf, _tensor_gguf] if p.fmt == "gguf" else [_tensor_st, _tensor_st, _text_st])
    op = ch.pick(ops)
    desc, data = op(p, ch)
    return f"{p.fmt}: {desc}", data


# --- running a case ---------------------------------------------------------------------------------------
class CaseTimeout(BaseException):
    """Raised by SIGALRM: a BaseException so no ``except Exception`` in the code under test swallows it."""


@contextlib.contextmanager
def time_limit(seconds: float):
    def on_alarm(signum, frame):
        raise CaseTimeout(f"case ran longer than {seconds} s")

    old = signal.signal(signal.SIGALRM, on_alarm)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


@dataclass
class Outcome:
    kind: str  # "ok-identical", "ok-opened" (no token asked), "ok-drift", "bundle-error", "bad-drift",
    #            "other-exception", "timeout"
    detail: str = ""
    error_class: str = ""

    @property
    def passed(self) -> bool:
        return self.kind in ("ok-identical", "ok-opened", "ok-drift", "bundle-error")


_counter = itertools.count()


def drift_explained(p: Pristine, b: Bundle) -> str | None:
    """Why a mutated bundle that loads may legitimately give another token (None: it may not)."""
    if ACCEPT_UNCHECKED_CONFIG_DRIFT:
        try:
            old, new = json.loads(p.bundle.metadata[C.K_MODEL_CONFIG]), json.loads(b.metadata[C.K_MODEL_CONFIG])
        except (KeyError, TypeError, ValueError):
            old = new = None
        if isinstance(new, dict) and old != new:
            changed = {k for k in set(old) | set(new) if old.get(k) != new.get(k)}
            if changed <= UNCHECKED_CONFIG_FIELDS:
                return f"model config changed only in {sorted(changed)}"
    if ACCEPT_NON_EXPERT_DATA_DRIFT:
        same_table = {n: (t.dtype, t.shape) for n, t in b.tensors.items()} == \
            {n: (t.dtype, t.shape) for n, t in p.bundle.tensors.items()}
        if same_table and b.metadata == p.bundle.metadata:
            return "non-expert tensor bytes changed"
    return None


def run_case(p: Pristine, data: bytes, workdir: Path, generate: bool = True) -> Outcome:
    """Open ``data`` as a bundle with fate.load (and generate one greedy token when asked); classify."""
    path = workdir / f"case-{os.getpid()}-{next(_counter)}{p.suffix}"
    path.write_bytes(data)
    model = None
    try:
        with time_limit(CASE_SECONDS):
            model = fate.load(path, device="cpu", experts="q4")
            if not generate:
                return Outcome("ok-opened")
            out = model.generate(PROMPT_IDS, 1, temperature=0.0, top_k=0, top_p=1.0, min_p=0.0,
                                 repetition_penalty=1.0, stop_at_eos=False).token_ids
            if out == p.token_ids:
                return Outcome("ok-identical")
            why = drift_explained(p, model.bundle)
            if why:
                return Outcome("ok-drift", why)
            return Outcome("bad-drift", f"token {out} instead of {p.token_ids}")
    except BundleError as e:
        return Outcome("bundle-error", str(e), type(e).__name__)
    except CaseTimeout as e:
        return Outcome("timeout", str(e))
    except Exception as e:  # noqa: BLE001 - the point: nothing else may escape
        return Outcome("other-exception", f"{type(e).__name__}: {e}"[:500], type(e).__name__)
    finally:
        if model is not None:
            model.close()
        del model
        path.unlink(missing_ok=True)


# --- memory -----------------------------------------------------------------------------------------------
def _status_kib(field_name: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field_name + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return None


def reset_peak_rss() -> int:
    """Reset VmHWM to the current RSS where Linux allows it; return the baseline (bytes)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return (_status_kib("VmRSS") or 0) * 1024
    except OSError:
        return (_status_kib("VmHWM") or 0) * 1024


def peak_rss() -> int:
    return (_status_kib("VmHWM") or 0) * 1024


# --- fixtures ---------------------------------------------------------------------------------------------
def make_pristine(workdir: Path) -> dict[str, Pristine]:
    """Convert the tiny OLMoE into both containers and take each apart."""
    from tests.tiny_models import make_checkpoint

    ckpt = workdir / "ckpt"
    make_checkpoint("olmoe", ckpt, n_layers=2)
    out = {}
    for fmt in ("gguf", "safetensors"):
        path = workdir / f"tiny.{fmt}"
        fate.convert(ckpt, path, experts="q4", no_calib=True, progress=False)
        m = fate.load(path, device="cpu", experts="q4")
        tokens = m.generate(PROMPT_IDS, 1, temperature=0.0, top_k=0, top_p=1.0, min_p=0.0, repetition_penalty=1.0,
                            stop_at_eos=False).token_ids
        m.close()
        out[fmt] = take_apart(path, tokens)
    assert out["gguf"].token_ids == out["safetensors"].token_ids
    return out


@pytest.fixture(scope="module")
def pristine(tmp_path_factory):
    return make_pristine(tmp_path_factory.mktemp("fuzz"))


# --- tests ------------------------------------------------------------------------------------------------
def test_rebuilding_unmutated_parts_gives_the_same_file(pristine):
    """The mutators' writers are faithful: the parts put back together are the converter's bytes."""
    g, s = pristine["gguf"], pristine["safetensors"]
    assert build_gguf(g.kvs, g.infos, g.alignment, g.data) == g.raw
    assert build_safetensors(s.table, s.data, s.alignment) == s.raw


def test_reader_agrees_with_gguf_py(pristine):
    """On a valid file our bounded GGUF reader gives exactly what gguf-py's GGUFReader gives."""
    from gguf import GGUFReader

    p = pristine["gguf"]
    r = GGUFReader(p.path)
    for key, fld in r.fields.items():
        if not key.startswith("GGUF."):
            want = fld.contents()
            assert p.bundle.metadata[key] == want and type(p.bundle.metadata[key]) is type(want), key
    assert len(r.tensors) == len(p.bundle.tensors)
    for t in r.tensors:
        e = p.bundle.tensors[t.name]
        assert (e.offset, e.shape, e.nbytes) == (int(t.data_offset), tuple(reversed(t.shape.tolist())), int(t.n_bytes))


def _expect_error(p: Pristine, data: bytes, tmp_path: Path, *needles: str, cls: str | None = None) -> str:
    out = run_case(p, data, tmp_path)
    assert out.kind == "bundle-error", out
    if cls:
        assert out.error_class == cls, out
    for n in needles:
        assert n in out.detail, out.detail
    return out.detail


def test_huge_counts_and_lengths_are_refused_before_anything_is_allocated(pristine, tmp_path):
    g = pristine["gguf"]
    base = reset_peak_rss()

    def at(off, width, value, raw=g.raw):
        return raw[:off] + value.to_bytes(width, "little") + raw[off + width:]

    _expect_error(g, at(8, 8, 2**62), tmp_path, "tensors", cls="BundleStructureError")
    _expect_error(g, at(16, 8, 2**64 - 1), tmp_path, "metadata keys", cls="BundleStructureError")
    first_key_len = 24  # the first metadata key's length field
    _expect_error(g, at(first_key_len, 8, 2**60), tmp_path, "metadata key #0", "offset 24", cls="BundleStructureError")
    # a string value claiming 2^60 bytes, and an array claiming 2^60 items
    tok = next(s for s in g.slots if s[2] == f"metadata {C.K_TOKENIZER_HF_JSON} part 3")
    _expect_error(g, at(tok[0], 8, 2**60), tmp_path, C.K_TOKENIZER_HF_JSON, "truncated", cls="BundleStructureError")
    arr = next(s for s in g.slots if s[2] == f"metadata {C.K_PRECISIONS} part 4")
    _expect_error(g, at(arr[0], 8, 2**60), tmp_path, C.K_PRECISIONS, cls="BundleStructureError")
    dim = next(s for s in g.slots if s[2] == "tensor info token_embd.weight dim 1")
    _expect_error(g, at(dim[0], 8, 2**63), tmp_path, "token_embd.weight", cls="BundleStructureError")
    s = pristine["safetensors"]
    _expect_error(s, at(0, 8, 2**63, raw=s.raw), tmp_path, "not a fate bundle")
    _expect_error(s, at(0, 8, s.header_end - 8 - 64, raw=s.raw), tmp_path, "corrupt safetensors header")
    assert peak_rss() - base < 64 << 20


def test_wrong_metadata_types_raise_bundle_errors(pristine, tmp_path):
    for p in pristine.values():
        # without the metadata checksum (optional), so that each value's own check is what fires
        items = [kv for kv in _metadata_items(p) if kv[0] != C.K_METADATA_CRC]
        for key, value, needle in [(C.K_MODEL_CONFIG, 7, C.K_MODEL_CONFIG), (C.K_PRECISIONS, [1, 2], C.K_PRECISIONS),
                                   ("fate.quant.q4.group_size", -64, "group_size"),
                                   (C.K_GEN_DEFAULTS, "[1]", C.K_GEN_DEFAULTS),
                                   (C.K_EOS_IDS, ["a"], C.K_EOS_IDS), ("olmoe.expert_used_count", 3, "expert_used_count")]:
            vt, sub = ((11, None) if isinstance(value, int) else (8, None) if isinstance(value, str)
                       else (9, 11 if isinstance(value[0], int) else 8))
            edited = [[key, vt, sub, value] if kv[0] == key else kv for kv in items]
            _expect_error(p, _rebuild(p, items=edited), tmp_path, needle)
        cfg = json.loads(p.bundle.metadata[C.K_MODEL_CONFIG])
        for fld, value in [("moe_layers", 3), ("rms_eps", "x"), ("rope_scaling", [1]), ("head_dim", 32),
                           ("qk_norm", "none"), ("tie_embeddings", True), ("top_k", 3)]:
            bad = dict(cfg, **{fld: value})
            edited = [[k, 8, None, json.dumps(bad)] if k == C.K_MODEL_CONFIG else [k, vt, sub, v]
                      for k, vt, sub, v in items]
            _expect_error(p, _rebuild(p, items=edited), tmp_path)


def test_cli_reports_a_mutated_bundle_in_one_line(pristine, tmp_path):
    from click.testing import CliRunner

    from fate.cli.run import main as run_main

    g = pristine["gguf"]
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(g.raw[:16] + (2**60).to_bytes(8, "little") + g.raw[24:])
    res = CliRunner().invoke(run_main, [str(bad), "-p", "x", "-n", "1"])
    assert res.exit_code == 2, res.output
    lines = [line for line in res.output.strip().splitlines() if line]
    assert len(lines) == 1 and lines[0].startswith("error: ") and "offset 16" in lines[0], res.output


def test_mutated_bundles_work_identically_or_raise_bundle_error(pristine, tmp_path):
    from hypothesis import HealthCheck, given, note, settings
    from hypothesis import strategies as st

    base = reset_peak_rss()
    seen: dict[str, int] = {}

    @settings(max_examples=EXAMPLES, deadline=None, database=None, derandomize=True, print_blob=False,
              suppress_health_check=list(HealthCheck))
    @given(st.data())
    def check(data):
        ch = DrawChooser(data)
        p = pristine[ch.pick(["gguf", "safetensors"])]
        desc, blob = mutate(p, ch)
        note(desc)
        out = run_case(p, blob, tmp_path)
        note(repr(out))
        seen[out.kind] = seen.get(out.kind, 0) + 1
        assert out.passed, f"{desc}: {out}"

    check()
    grew = peak_rss() - base
    assert grew < RSS_GROWTH_LIMIT, f"peak RSS grew by {grew / 2**20:.0f} MiB over the fuzz run ({seen})"
    assert seen.get("bundle-error", 0) > EXAMPLES // 4 and seen.get("ok-identical", 0) > 0, seen


def _with_config(p: Pristine, items: list, **fields) -> list:
    cfg = json.loads(p.bundle.metadata[C.K_MODEL_CONFIG])
    cfg.update(fields)
    return [[C.K_MODEL_CONFIG, 8, None, json.dumps(cfg)] if kv[0] == C.K_MODEL_CONFIG else kv for kv in items]


def test_unmirrored_config_fields_drift_silently_unless_the_metadata_has_a_checksum(pristine, tmp_path):
    """A config field nothing mirrors (clip_qkv) makes a valid bundle of another model: only a checksum over
    the metadata (``fate.checksums.metadata``, checked at open when present) tells it from the original."""
    from fate.formats.bundle import K_METADATA_CRC, metadata_crc32

    for p in pristine.values():
        items = [list(kv) for kv in _metadata_items(p)]
        out = run_case(p, _rebuild(p, items=_with_config(p, items, clip_qkv=0.01)), tmp_path)
        assert out.kind in (("ok-identical", "ok-drift") if ACCEPT_UNCHECKED_CONFIG_DRIFT else ("bundle-error",)), out
        if K_METADATA_CRC not in p.bundle.metadata:  # what the converter will write
            crc = metadata_crc32({k: v for k, _, _, v in items})
            items.append([K_METADATA_CRC, 4, None, crc])
            assert run_case(p, _rebuild(p, items=items), tmp_path).kind == "ok-identical"
        out = run_case(p, _rebuild(p, items=_with_config(p, items, clip_qkv=0.01)), tmp_path)
        assert out.kind == "bundle-error" and out.error_class == "ChecksumError", out
        assert "metadata" in out.detail

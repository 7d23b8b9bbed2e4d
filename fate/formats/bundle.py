"""Opening a bundle (``.gguf`` or ``.safetensors``) by memory map.

``Bundle`` gives the metadata as plain Python values and every tensor as a zero-copy torch view of
the map.  The map is private copy-on-write: views are writable in Python's eyes (no warnings, no
copies) but nothing ever reaches the file, and pages are read from disk only when touched, so RSS
grows with what is used.

A bundle is untrusted input (bundles are shared between strangers).  Both containers are parsed here,
by a reader whose every read is checked against the file size *before* it happens, so no count,
length, offset or shape in the file can make it allocate more than the file holds, read past the end
or loop for long:

* GGUF is parsed by our own bounded reader rather than gguf-py's ``GGUFReader``: that one maps the file
  a second time, builds numpy views from header counts before checking them against anything, walks
  arrays item by item in Python whatever their claimed length, and raises assorted exception types
  (ValueError, KeyError, IndexError, struct/numpy errors) on corrupt input.  The subset fate reads is
  small (GGUF v2/v3 little endian: scalar, string and flat array values; tensor infos), so owning it is
  simpler than fencing in a general reader.
* safetensors: the header length is capped (100 MB, the safetensors library's own limit) and the number
  of JSON values in it is bounded before ``json.loads`` sees it, so parsing cannot blow up in memory.

Then, for both: every tensor's dtype, shape and byte range is checked (known dtype, at most 4
dimensions, element count × size computed exactly and bounded by the file, range inside the file, no
two tensors overlapping), and every metadata key fate reads is checked for type and range.  Every
violation raises a :class:`BundleError` subclass whose message names the file, the key or tensor and
the offset: :class:`BundleStructureError` (container: header, counts, lengths, offsets, shapes; a
truncated file), :class:`BundleMetadataError` (a value of the wrong type or range, or contradicting
another), :class:`BundleVersionError`, :class:`ChecksumError`.
"""

from __future__ import annotations

import json
import math
import mmap
import operator
import os
import re
import stat
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from fate.errors import BundleError, BundleMetadataError, BundleStructureError, BundleVersionError, ChecksumError
from fate.formats import constants as C
from fate.formats.writer import DTYPE_BYTES, PAD_PREFIX, TORCH_DTYPES


@dataclass(frozen=True)
class TensorEntry:
    name: str
    dtype: str
    shape: tuple[int, ...]
    offset: int  # absolute, in the file
    nbytes: int


_GGUF_DTYPES = {0: "F32", 1: "F16", 24: "I8", 27: "I64", 30: "BF16"}

# --- limits on what a header may claim (all far above anything fate writes) ------------------------
MAX_ITEMS = 1 << 20
"""Most metadata keys, tensors, or metadata array items (all arrays together) a bundle may have."""
MAX_NAME_BYTES = 1 << 16
"""Longest metadata key or tensor name, in bytes."""
MAX_DIMS = 4
"""Most dimensions of a tensor (GGML's limit; fate writes 1 or 2)."""
MAX_SAFETENSORS_HEADER = 100_000_000
"""Longest safetensors JSON header (the safetensors library's own limit)."""
MAX_SAFETENSORS_VALUES = 1 << 22
"""Most JSON values a safetensors header may hold (a real one has ≈10 per tensor plus one per metadata key):
bounds what ``json.loads`` allocates for it to ≈64 bytes per value plus the text itself."""
MAX_TOKEN_ID = (1 << 31) - 1

K_METADATA_CRC = C.K_METADATA_CRC
"""uint32: :func:`metadata_crc32` of the bundle's metadata; checked at open when present."""

# GGUF metadata value types: numpy dtype of the scalar types; 7 is BOOL (one byte, 0 or 1)
_GGUF_SCALAR = {0: "<u1", 1: "<i1", 2: "<u2", 3: "<i2", 4: "<u4", 5: "<i4", 6: "<f4", 7: "<u1",
                10: "<u8", 11: "<i8", 12: "<f8"}
_GGUF_BOOL, _GGUF_STRING, _GGUF_ARRAY = 7, 8, 9
_GGUF_TYPE_NAMES = {0: "uint8", 1: "int8", 2: "uint16", 3: "int16", 4: "uint32", 5: "int32", 6: "float32",
                    7: "bool", 8: "string", 9: "array", 10: "uint64", 11: "int64", 12: "float64"}

# a JSON string (escapes included): what the safetensors structure check collapses to ""
_JSON_STRING = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"', re.DOTALL)


class _Reader:
    """Little-endian reads from a buffer, each checked against the buffer's size before it happens."""

    def __init__(self, path: Path, buf, size: int, pos: int = 0):
        self.path, self.buf, self.size, self.pos = path, buf, size, pos

    @property
    def left(self) -> int:
        return self.size - self.pos

    def need(self, n: int, what: str) -> None:
        if n < 0 or n > self.size - self.pos:
            raise BundleStructureError(
                f"{self.path} is truncated or corrupt: {what} at offset {self.pos} needs {n} bytes, "
                f"but only {max(0, self.size - self.pos)} remain in the {self.size}-byte file")

    def unpack(self, fmt: str, what: str):
        n = struct.calcsize(fmt)
        self.need(n, what)
        v = struct.unpack_from(fmt, self.buf, self.pos)
        self.pos += n
        return v

    def u32(self, what: str) -> int:
        return self.unpack("<I", what)[0]

    def u64(self, what: str) -> int:
        return self.unpack("<Q", what)[0]

    def string(self, what: str, limit: int | None = None) -> str:
        at = self.pos
        n = self.u64(f"length of {what}")
        if limit is not None and n > limit:
            raise BundleStructureError(f"{self.path}: {what} at offset {at} claims {n} bytes, more than the "
                                       f"{limit} fate accepts")
        self.need(n, what)
        raw = self.buf[self.pos:self.pos + n]
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError:
            raise BundleStructureError(f"{self.path}: {what} at offset {at} is not valid UTF-8") from None
        self.pos += n
        return text


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _json_values_bound(text: bytes) -> int:
    """An upper bound on the number of values in a JSON text: every value but the first is preceded by a
    ',' or ':' or opens a container."""
    return text.count(b",") + text.count(b":") + text.count(b"[") + text.count(b"{") + 1


def _no_duplicate_keys(pairs):
    out = {}
    for k, v in pairs:
        if k in out:
            raise ValueError(f"duplicate key {k!r}")
        out[k] = v
    return out


class Bundle:
    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        if not self.path.exists():
            raise BundleError(f"{self.path}: no such file")
        if self.path.is_dir():
            raise BundleError(f"{self.path} is a directory, not a bundle; convert a checkpoint with fate-convert first")
        with open(self.path, "rb") as f:
            st = os.fstat(f.fileno())  # the size of what is open, not of whatever the path names later
            if not stat.S_ISREG(st.st_mode):
                raise BundleError(f"{self.path}: not a regular file, so not a bundle")
            self.file_size = st.st_size
            if self.file_size < 16:
                raise BundleStructureError(f"{self.path}: not a fate bundle (only {self.file_size} bytes)")
            magic = f.read(8)
            self._map = mmap.mmap(f.fileno(), self.file_size, access=mmap.ACCESS_COPY)
        try:
            self._open(magic)
        except BaseException:
            self._map.close()  # nothing else holds it yet
            raise
        self._verified: set[tuple[str, int]] = set()

    def _open(self, magic: bytes) -> None:
        if magic[:4] == b"GGUF":
            self.format = "gguf"
            self.metadata, self.tensors = self._read_gguf()
        elif magic[:8] != b"\0" * 8 and struct.unpack("<Q", magic)[0] < self.file_size and self._map[8:9] == b"{":
            self.format = "safetensors"
            self.metadata, self.tensors = self._read_safetensors()
        else:
            raise BundleStructureError(f"{self.path}: not a fate bundle (neither GGUF nor safetensors)")
        self._check_ranges()
        version = self.metadata.get(C.MAGIC_KEY)
        if version is None:
            raise BundleMetadataError(f"{self.path}: no {C.MAGIC_KEY} key: a GGUF/safetensors file, but not made by "
                                      "fate-convert")
        if not _is_int(version) or version != C.FORMAT_VERSION:
            raise BundleVersionError(
                f"{self.path}: bundle format version {version!r}, this fate reads version {C.FORMAT_VERSION}; "
                "convert the checkpoint again with this fate (or use the fate that made it)")
        self._check_metadata()
        self._check_metadata_crc()

    # --- parsing ----------------------------------------------------------------------------------
    def _shape_bytes(self, name: str, dtype: str, shape: tuple[int, ...], where: str) -> int:
        """Bytes of a tensor, computed exactly; every dimension and the product are bounded by the file."""
        n = DTYPE_BYTES[dtype]
        for d in shape:
            if not _is_int(d) or d < 0 or d > self.file_size:
                raise BundleStructureError(f"{self.path}: tensor {name!r} ({where}) has dimension {d!r} in shape "
                                           f"{list(shape)}, impossible in a {self.file_size}-byte file")
        for d in shape:
            n *= d
        if n > self.file_size:
            raise BundleStructureError(f"{self.path} is truncated or corrupt: tensor {name!r} ({where}) of shape "
                                       f"{list(shape)} and dtype {dtype} needs {n} bytes, more than the whole "
                                       f"{self.file_size}-byte file")
        return n

    def _read_gguf(self):
        r = _Reader(self.path, self._map, self.file_size, 4)
        version = r.u32("GGUF version")
        if version not in (2, 3):
            raise BundleStructureError(f"{self.path}: GGUF version {version} at offset 4 is not supported "
                                       "(fate reads GGUF v3, little endian)")
        n_tensors = r.u64("tensor count")
        n_kv = r.u64("metadata count")
        # smallest possible entries: a key/value is ≥ 8 + 4 + 1 bytes, a tensor info ≥ 8 + 4 + 8 + 4 + 8
        if n_kv > MAX_ITEMS or n_kv * 13 > r.left:
            raise BundleStructureError(f"{self.path} is truncated or corrupt: the header at offset 16 claims "
                                       f"{n_kv} metadata keys, which cannot fit the {self.file_size}-byte file")
        if n_tensors > MAX_ITEMS or n_tensors * 32 > r.left - n_kv * 13:
            raise BundleStructureError(f"{self.path} is truncated or corrupt: the header at offset 8 claims "
                                       f"{n_tensors} tensors, which cannot fit the {self.file_size}-byte file")
        meta: dict = {}
        self._array_budget = MAX_ITEMS
        for j in range(n_kv):
            at = r.pos
            key = r.string(f"metadata key #{j}", MAX_NAME_BYTES)
            if not key.isprintable():
                raise BundleStructureError(f"{self.path}: metadata key {key!r} at offset {at} has control characters")
            if key in meta:
                raise BundleStructureError(f"{self.path}: metadata key {key!r} at offset {at} appears twice")
            vtype = r.u32(f"value type of metadata {key!r}")
            meta[key] = self._gguf_value(r, vtype, key)
        alignment = meta.get(C.K_GENERAL_ALIGNMENT, 32)
        if not _is_int(alignment) or alignment <= 0 or alignment & (alignment - 1) or alignment > 1 << 24:
            raise BundleMetadataError(f"{self.path}: metadata {C.K_GENERAL_ALIGNMENT} = {alignment!r} is not a power "
                                      "of two")
        infos = []
        seen: set[str] = set()
        for j in range(n_tensors):
            at = r.pos
            name = r.string(f"name of tensor #{j}", MAX_NAME_BYTES)
            if not name.isprintable():
                raise BundleStructureError(f"{self.path}: tensor name {name!r} at offset {at} has control characters")
            if name in seen:
                raise BundleStructureError(f"{self.path}: tensor {name!r} at offset {at} appears twice")
            seen.add(name)
            (nd,) = r.unpack("<I", f"dimension count of tensor {name!r}")
            if not 1 <= nd <= MAX_DIMS:
                raise BundleStructureError(f"{self.path}: tensor {name!r} (info at offset {at}) has {nd} dimensions; "
                                           f"fate reads 1 to {MAX_DIMS}")
            dims = r.unpack(f"<{nd}Q", f"shape of tensor {name!r}")
            gtype, offset = r.unpack("<IQ", f"type and offset of tensor {name!r}")
            dt = _GGUF_DTYPES.get(gtype)
            if dt is None:
                raise BundleStructureError(f"{self.path}: tensor {name!r} (info at offset {at}) has GGML type "
                                           f"{gtype}, which fate does not use")
            shape = tuple(reversed(dims))
            nbytes = self._shape_bytes(name, dt, shape, f"info at offset {at}")
            if offset % alignment:
                raise BundleStructureError(f"{self.path}: tensor {name!r} (info at offset {at}) starts at data offset "
                                           f"{offset}, not a multiple of the alignment {alignment}")
            infos.append((name, dt, shape, offset, nbytes))
        data_start = -(-r.pos // alignment) * alignment
        tensors = {}
        for name, dt, shape, offset, nbytes in infos:
            tensors[name] = TensorEntry(name, dt, shape, data_start + offset, nbytes)
        return meta, tensors

    def _gguf_value(self, r: _Reader, vtype: int, key: str):
        at = r.pos
        if vtype == _GGUF_STRING:
            return r.string(f"value of metadata {key!r}")
        if vtype in _GGUF_SCALAR:
            dt = np.dtype(_GGUF_SCALAR[vtype])
            r.need(dt.itemsize, f"value of metadata {key!r}")
            v = np.frombuffer(self._map, dtype=dt, count=1, offset=r.pos)[0].item()
            r.pos += dt.itemsize
            return self._gguf_bool(v, key, at) if vtype == _GGUF_BOOL else v
        if vtype != _GGUF_ARRAY:
            raise BundleStructureError(f"{self.path}: metadata {key!r} (offset {at}) has value type {vtype}, "
                                       "which GGUF does not define")
        itype, count = r.unpack("<IQ", f"array header of metadata {key!r}")
        self._array_budget -= count
        if self._array_budget < 0:
            raise BundleStructureError(f"{self.path}: metadata {key!r} (offset {at}) claims {count} items, more than "
                                       f"the {MAX_ITEMS} array items in all that fate accepts")
        if itype == _GGUF_STRING:
            r.need(8 * count, f"{count} strings of metadata {key!r}")  # each string is at least its length
            return [r.string(f"item {i} of metadata {key!r}") for i in range(count)]
        if itype not in _GGUF_SCALAR:
            raise BundleStructureError(f"{self.path}: metadata {key!r} (offset {at}) is an array of "
                                       f"{_GGUF_TYPE_NAMES.get(itype, f'type {itype}')}, which fate does not read")
        dt = np.dtype(_GGUF_SCALAR[itype])
        r.need(count * dt.itemsize, f"{count} items of metadata {key!r}")
        values = np.frombuffer(self._map, dtype=dt, count=count, offset=r.pos).tolist() if count else []
        r.pos += count * dt.itemsize
        if itype == _GGUF_BOOL:
            values = [self._gguf_bool(v, key, at) for v in values]
        return values

    def _gguf_bool(self, v: int, key: str, at: int) -> bool:
        if v not in (0, 1):
            raise BundleStructureError(f"{self.path}: metadata {key!r} (offset {at}) is a bool stored as {v}, "
                                       "not 0 or 1")
        return bool(v)

    def _read_safetensors(self):
        (n,) = struct.unpack_from("<Q", self._map, 0)
        if n > min(self.file_size - 8, MAX_SAFETENSORS_HEADER):
            raise BundleStructureError(f"{self.path} is truncated or corrupt: its safetensors header claims {n} bytes "
                                       f"(the file has {self.file_size}; at most {MAX_SAFETENSORS_HEADER} accepted)")
        raw = self._map[8:8 + n]
        values = _json_values_bound(raw)  # fast, but counts punctuation inside strings too
        if values > MAX_SAFETENSORS_VALUES:
            values = _json_values_bound(_JSON_STRING.sub(b'""', raw))
            if values > MAX_SAFETENSORS_VALUES:
                raise BundleStructureError(f"{self.path}: its safetensors header holds about {values} JSON values, "
                                           f"more than the {MAX_SAFETENSORS_VALUES} fate accepts")
        try:
            table = json.loads(raw, object_pairs_hook=_no_duplicate_keys)
        except (ValueError, RecursionError) as e:
            raise BundleStructureError(f"{self.path}: corrupt safetensors header (8 bytes + {n}): "
                                       f"{str(e)[:200]}") from None
        del raw
        if not isinstance(table, dict):
            raise BundleStructureError(f"{self.path}: corrupt safetensors header: not a JSON object")
        if len(table) > MAX_ITEMS:
            raise BundleStructureError(f"{self.path}: the safetensors header lists {len(table)} tensors, more than "
                                       f"the {MAX_ITEMS} fate accepts")
        md = table.pop("__metadata__", None)
        if md is None:
            md = {}
        if not isinstance(md, dict):
            raise BundleStructureError(f"{self.path}: corrupt safetensors header: __metadata__ is not an object")
        meta = {}
        for k, v in md.items():
            if len(k.encode("utf-8", "surrogatepass")) > MAX_NAME_BYTES or not k.isprintable():
                raise BundleMetadataError(f"{self.path}: metadata key {k[:80]!r} is longer than {MAX_NAME_BYTES} bytes "
                                          "or has control characters")
            if not isinstance(v, str):
                raise BundleMetadataError(f"{self.path}: metadata {k!r} is not a string (safetensors metadata values "
                                          "are strings)")
            try:
                value = json.loads(v)
            except (ValueError, RecursionError):
                raise BundleMetadataError(f"{self.path}: metadata {k!r} is not JSON-encoded") from None
            meta[k] = self._check_plain_value(k, value)
        data_start = 8 + n
        tensors = {}
        for name, info in table.items():
            where = "safetensors header"
            if not isinstance(info, dict):
                raise BundleStructureError(f"{self.path}: corrupt entry for tensor {name!r} in the {where}")
            if name.startswith(PAD_PREFIX):
                continue
            if len(name.encode("utf-8", "surrogatepass")) > MAX_NAME_BYTES or not name.isprintable():
                raise BundleStructureError(f"{self.path}: tensor name {name[:80]!r} in the {where} is longer than "
                                           f"{MAX_NAME_BYTES} bytes or has control characters")
            dt, shape, offsets = info.get("dtype"), info.get("shape"), info.get("data_offsets")
            if not isinstance(dt, str) or dt not in DTYPE_BYTES:
                raise BundleStructureError(f"{self.path}: tensor {name!r} has dtype {dt!r}, which fate does not use")
            if not isinstance(shape, list) or len(shape) > MAX_DIMS or not all(_is_int(d) for d in shape):
                raise BundleStructureError(f"{self.path}: tensor {name!r} has shape {shape!r}; expected at most "
                                           f"{MAX_DIMS} non-negative integers")
            if not (isinstance(offsets, list) and len(offsets) == 2 and all(_is_int(o) for o in offsets)
                    and 0 <= offsets[0] <= offsets[1]):
                raise BundleStructureError(f"{self.path}: tensor {name!r} has data_offsets {offsets!r}; expected "
                                           "[start, end] with 0 ≤ start ≤ end")
            start, end = offsets
            shape = tuple(shape)
            nbytes = self._shape_bytes(name, dt, shape, where)
            if end - start != nbytes:
                raise BundleStructureError(f"{self.path}: tensor {name!r} spans {end - start} bytes (data_offsets "
                                           f"[{start}, {end}]) but shape {list(shape)} of {dt} needs {nbytes}")
            if start > self.file_size:
                raise BundleStructureError(f"{self.path} is truncated or corrupt: tensor {name!r} starts at data "
                                           f"offset {start}, past the end of the {self.file_size}-byte file")
            tensors[name] = TensorEntry(name, dt, shape, data_start + start, nbytes)
        return meta, tensors

    def _check_plain_value(self, key: str, value):
        """Metadata values are what GGUF can hold: a string, number or bool, or a flat list of those."""
        if isinstance(value, (str, int, float)):  # bool is an int
            return value
        if isinstance(value, list):
            if len(value) > MAX_ITEMS:
                raise BundleMetadataError(f"{self.path}: metadata {key!r} has {len(value)} items, more than the "
                                          f"{MAX_ITEMS} fate accepts")
            if all(isinstance(v, (str, int, float)) for v in value):
                return value
        raise BundleMetadataError(f"{self.path}: metadata {key!r} is a {type(value).__name__} value "
                                  "(expected a string, number, bool or a flat list of those)")

    def _check_ranges(self) -> None:
        """Every tensor inside the file, none overlapping another."""
        for t in self.tensors.values():
            if t.offset < 0 or t.offset + t.nbytes > self.file_size:
                raise BundleStructureError(
                    f"{self.path} is truncated or corrupt: tensor {t.name!r} needs bytes up to "
                    f"{t.offset + t.nbytes} of a {self.file_size}-byte file")
        prev = None
        for t in sorted((t for t in self.tensors.values() if t.nbytes), key=lambda t: t.offset):
            if prev is not None and t.offset < prev.offset + prev.nbytes:
                raise BundleStructureError(
                    f"{self.path} is corrupt: tensors {prev.name!r} (bytes {prev.offset}..{prev.offset + prev.nbytes}) "
                    f"and {t.name!r} (from byte {t.offset}) overlap")
            prev = t

    # --- metadata types -----------------------------------------------------------------------------
    def _meta_error(self, key: str, value, expected: str) -> BundleMetadataError:
        shown = repr(value)
        if len(shown) > 80:
            shown = shown[:77] + "..."
        return BundleMetadataError(f"{self.path}: metadata {key} = {shown} is not {expected}")

    def _check_metadata(self) -> None:
        """Type and range of every key fate reads (absent keys are the consumers' business)."""
        m = self.metadata
        for key in _STRING_KEYS:
            if key in m and not isinstance(m[key], str):
                raise self._meta_error(key, m[key], "a string")
        for key in _BOOL_KEYS:
            if key in m and not isinstance(m[key], bool):
                raise self._meta_error(key, m[key], "a bool")
        for key in _TOKEN_ID_KEYS:
            if key in m and not (_is_int(m[key]) and 0 <= m[key] <= MAX_TOKEN_ID):
                raise self._meta_error(key, m[key], "a token id")
        for key in (C.K_GENERAL_ALIGNMENT, C.K_EXPERT_ALIGNMENT):
            v = m.get(key)
            if v is not None and not (_is_int(v) and 0 < v <= 1 << 24 and not v & (v - 1)):
                raise self._meta_error(key, v, "a power of two")
        if C.K_CALIB_TOKENS in m and not (_is_int(m[C.K_CALIB_TOKENS]) and m[C.K_CALIB_TOKENS] >= 0):
            raise self._meta_error(C.K_CALIB_TOKENS, m[C.K_CALIB_TOKENS], "a non-negative integer")
        eos = m.get(C.K_EOS_IDS)
        if eos is not None and not (isinstance(eos, list) and all(_is_int(i) and 0 <= i <= MAX_TOKEN_ID for i in eos)):
            raise self._meta_error(C.K_EOS_IDS, eos, "a list of token ids")
        extra = m.get(C.K_CALIB_RECALL_EXTRA)
        if extra is not None and not (isinstance(extra, list) and all(_is_int(i) and 0 <= i < 1 << 16 for i in extra)):
            raise self._meta_error(C.K_CALIB_RECALL_EXTRA, extra, "a list of small non-negative integers")
        precisions = m.get(C.K_PRECISIONS)
        if precisions is not None:
            if not (isinstance(precisions, list) and precisions and all(isinstance(p, str) and p for p in precisions)
                    and len(set(precisions)) == len(precisions)):
                raise self._meta_error(C.K_PRECISIONS, precisions, "a list of distinct precision names")
            for p in precisions:
                for template, top in ((C.K_PRECISION_BITS, 64), (C.K_PRECISION_GROUP, 1 << 24),
                                      (C.K_PRECISION_AXIS, 8), (C.K_PRECISION_BLOB_SIZE, self.file_size),
                                      (C.K_PRECISION_BLOB_STRIDE, self.file_size)):
                    key = template.format(p=p)
                    if key in m and not (_is_int(m[key]) and 0 <= m[key] <= top):
                        raise self._meta_error(key, m[key], f"an integer in [0, {top}]")
        gen = m.get(C.K_GEN_DEFAULTS)
        if gen is not None:
            self._check_generation(gen)
        self._check_non_expert_checksums()

    def _check_generation(self, text: str) -> None:
        key = C.K_GEN_DEFAULTS
        try:
            gen = json.loads(text)
        except (ValueError, RecursionError):
            raise self._meta_error(key, text, "JSON") from None
        if not isinstance(gen, dict):
            raise self._meta_error(key, text, "a JSON object")
        checks = {
            "temperature": lambda v: _is_number(v) and math.isfinite(v) and v >= 0,
            "top_k": lambda v: _is_int(v) and v >= 0,
            "top_p": lambda v: _is_number(v) and 0 < v <= 1,
            "min_p": lambda v: _is_number(v) and 0 <= v <= 1,
            "repetition_penalty": lambda v: _is_number(v) and math.isfinite(v) and v > 0,
            "do_sample": lambda v: isinstance(v, bool),
        }
        for name, ok in checks.items():
            if name in gen and not ok(gen[name]):
                raise BundleMetadataError(f"{self.path}: metadata {key}: {name} = {gen[name]!r} is not a valid value")

    def _check_non_expert_checksums(self) -> None:
        names = self.metadata.get(C.K_NON_EXPERT_CRC_NAMES)
        crc = self.tensors.get(C.T_NON_EXPERT_CRC)
        if names is None and crc is None:
            return  # a bundle from before non-expert checksums (or none at all): the runtime decides
        if names is None or crc is None:
            raise BundleMetadataError(f"{self.path}: {C.K_NON_EXPERT_CRC_NAMES} and tensor {C.T_NON_EXPERT_CRC} "
                                      "must come together; one is missing")
        if not (isinstance(names, list) and all(isinstance(x, str) for x in names) and len(set(names)) == len(names)):
            raise self._meta_error(C.K_NON_EXPERT_CRC_NAMES, names, "a list of distinct tensor names")
        missing = [x for x in names if x not in self.tensors]
        if missing:
            raise BundleMetadataError(f"{self.path}: {C.K_NON_EXPERT_CRC_NAMES} names tensor {missing[0]!r}, which the "
                                      "bundle does not have")
        if crc.dtype != "I64" or crc.shape != (len(names),):
            raise BundleStructureError(f"{self.path}: tensor {C.T_NON_EXPERT_CRC} is {crc.dtype} {list(crc.shape)}, "
                                       f"expected I64 [{len(names)}] (one per name in {C.K_NON_EXPERT_CRC_NAMES})")

    def _check_metadata_crc(self) -> None:
        want = self.metadata.get(K_METADATA_CRC)
        if want is None:
            return  # written from format version 1 on by converters that know it; older bundles lack it
        if not _is_int(want) or not 0 <= want < 1 << 32:
            raise self._meta_error(K_METADATA_CRC, want, "a crc32")
        if metadata_crc32(self.metadata) != want:
            raise ChecksumError(f"{self.path}: checksum mismatch in the metadata ({K_METADATA_CRC}); the file is "
                                "corrupt: re-download or re-convert it")

    # --- access -----------------------------------------------------------------------------------
    def has(self, name: str) -> bool:
        return name in self.tensors

    def raw(self, name: str) -> torch.Tensor:
        """uint8 view of a tensor's bytes in the map."""
        t = self._entry(name)
        if t.nbytes == 0:  # torch.frombuffer refuses a count of 0
            return torch.empty(0, dtype=torch.uint8)
        return torch.frombuffer(self._map, dtype=torch.uint8, count=t.nbytes, offset=t.offset)

    def tensor(self, name: str) -> torch.Tensor:
        """Zero-copy view of a tensor with its stored dtype and shape."""
        t = self._entry(name)
        return self.raw(name).view(TORCH_DTYPES[t.dtype]).view(t.shape)

    def _entry(self, name: str) -> TensorEntry:
        try:
            return self.tensors[name]
        except KeyError:
            raise BundleStructureError(f"{self.path}: tensor {name} is missing") from None

    def get(self, key: str, default=None):
        return self.metadata.get(key, default)

    def require(self, key: str):
        if key not in self.metadata:
            raise BundleMetadataError(f"{self.path}: metadata key {key} is missing")
        return self.metadata[key]

    # --- integrity --------------------------------------------------------------------------------
    def expert_blob(self, layer: int, precision: str, expert: int, verify: bool = True) -> torch.Tensor:
        """uint8 view of one expert's unpadded blob; its crc32 is checked the first time it is read."""
        name = C.T_EXPERTS.format(i=layer, p=precision)
        t = self._entry(name)
        key = C.K_PRECISION_BLOB_SIZE.format(p=precision)
        size = self.require(key)
        if len(t.shape) != 2:
            raise BundleStructureError(f"{self.path}: tensor {name} has shape {list(t.shape)}, expected 2 dimensions")
        n_exp, stride = t.shape
        if not _is_int(size) or not 0 < size <= stride:
            raise BundleMetadataError(f"{self.path}: metadata {key} = {size!r} does not fit the rows of {name} "
                                      f"({stride} bytes)")
        try:
            expert = operator.index(expert)
        except TypeError:
            raise BundleError(f"{self.path}: expert {expert!r} of {name} is not an index") from None
        if not 0 <= expert < n_exp:
            raise BundleError(f"{self.path}: expert {expert} of {name} is out of range")
        start = t.offset + expert * stride
        view = torch.frombuffer(self._map, dtype=torch.uint8, count=size, offset=start)
        if verify and (name, expert) not in self._verified:
            crc_name = C.T_EXPERTS_CRC.format(i=layer, p=precision)
            crc = self._entry(crc_name)
            if crc.dtype != "I64" or crc.shape != (n_exp,):
                raise BundleStructureError(f"{self.path}: tensor {crc_name} is {crc.dtype} {list(crc.shape)}, "
                                           f"expected I64 [{n_exp}]")
            want = int(self.tensor(crc_name)[expert])
            got = zlib.crc32(memoryview(self._map)[start:start + size])
            if got != want:
                raise ChecksumError(
                    f"{self.path}: checksum mismatch in expert {expert} of layer {layer} ({precision}); "
                    "the file is corrupt: re-download or re-convert it")
            self._verified.add((name, expert))
        return view

    def close(self) -> None:
        try:
            self._map.close()
        except BufferError:
            pass  # views still alive; the map closes when they are gone


_STRING_KEYS = (
    C.K_MODEL_CONFIG, C.K_FATE_VERSION, C.K_HF_MODEL_TYPE, C.K_SOURCE_NAME, C.K_SOURCE_CONFIG_SHA256, C.K_CREATED,
    C.K_HQQ_VERSION, C.K_QUANT_METHOD, C.K_CHECKSUM_ALGO, C.K_BOS_TOKEN, C.K_EOS_TOKEN, C.K_GEN_DEFAULTS,
    C.K_CALIB_SOURCE, C.K_CALIB_SHA256, C.K_GENERAL_ARCH, C.K_GENERAL_NAME, C.K_TOKENIZER_MODEL,
    C.K_TOKENIZER_HF_JSON, C.K_CHAT_TEMPLATE,
)
_BOOL_KEYS = (C.K_CALIB_PRESENT, C.K_ADD_BOS)
_TOKEN_ID_KEYS = (C.K_BOS_ID, C.K_EOS_ID, C.K_PAD_ID)


def _has_float(v) -> bool:
    return isinstance(v, float) or (isinstance(v, list) and any(isinstance(x, float) for x in v))


def metadata_crc32(metadata: dict) -> int:
    """crc32 of a bundle's metadata in a form both containers give back identically: every key but
    ``fate.checksums.metadata`` itself and ``general.alignment`` (GGUF's own), sorted, with its value, as
    compact JSON (UTF-8).  Values holding floats are left out: GGUF stores llama.cpp's float keys as float32
    (they mirror ``fate.model_config``, which is covered, and are checked against it at load)."""
    items = [[k, v] for k, v in sorted(metadata.items())
             if k not in (K_METADATA_CRC, C.K_GENERAL_ALIGNMENT) and not _has_float(v)]
    text = json.dumps(items, ensure_ascii=False, separators=(",", ":"), allow_nan=True)
    return zlib.crc32(text.encode("utf-8", "surrogatepass"))


def open_bundle(path: str | os.PathLike) -> Bundle:
    return Bundle(path)


__all__ = ["Bundle", "K_METADATA_CRC", "TensorEntry", "metadata_crc32", "open_bundle"]

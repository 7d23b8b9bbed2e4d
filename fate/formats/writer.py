"""Writing a bundle: the header (metadata + tensor table) first, then tensor bytes at precomputed,
aligned offsets, in any order.

Knowing every tensor's shape up front lets the converter stream: it writes each expert blob the
moment it is quantized and never holds more than a layer in memory.  GGUF headers are produced by
gguf-py's own GGUFWriter; safetensors headers are written here (the format is a length-prefixed
JSON table) with explicit padding tensors so that every tensor starts at an aligned offset.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass

import gguf
import numpy as np
import torch

DTYPE_BYTES = {"F32": 4, "F16": 2, "BF16": 2, "I8": 1, "I64": 8}
NP_DTYPES = {"F32": np.float32, "F16": np.float16, "I8": np.int8, "I64": np.int64}
TORCH_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "I8": torch.int8, "I64": torch.int64}
PAD_PREFIX = "fate.pad."


@dataclass(frozen=True)
class TensorPlan:
    name: str
    dtype: str  # one of DTYPE_BYTES
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        n = DTYPE_BYTES[self.dtype]
        for d in self.shape:
            n *= d
        return n


def _pad(x: int, a: int) -> int:
    return (x + a - 1) // a * a


class BundleWriter:
    """Create ``path`` with the given metadata and tensor table; then ``write`` tensors' bytes."""

    def __init__(self, path: str | os.PathLike, fmt: str, metadata: dict, tensors: list[TensorPlan],
                 alignment: int = 64):
        if alignment & (alignment - 1) or alignment < 8:
            raise ValueError("alignment must be a power of two ≥ 8")
        self.path = os.fspath(path)
        self.alignment = alignment
        self.plans = {t.name: t for t in tensors}
        if len(self.plans) != len(tensors):
            raise ValueError("duplicate tensor names in the bundle plan")
        if fmt == "gguf":
            self.offsets, self.size = self._gguf_header(metadata, tensors)
        elif fmt == "safetensors":
            self.offsets, self.size = self._safetensors_header(metadata, tensors)
        else:
            raise ValueError(f"unknown bundle format {fmt!r}")
        self._f = open(self.path, "r+b")
        self._f.truncate(self.size)  # sparse until written; the final size is fixed now

    # --- headers ----------------------------------------------------------------------------------
    def _gguf_header(self, metadata: dict, tensors: list[TensorPlan]) -> tuple[dict[str, int], int]:
        arch = metadata["general.architecture"]
        w = gguf.GGUFWriter(self.path, arch)
        w.add_custom_alignment(self.alignment)
        for k, v in metadata.items():
            if k in ("general.architecture", "general.alignment"):
                continue
            _gguf_add(w, k, v)
        raw = {"BF16": gguf.GGMLQuantizationType.BF16}
        np_for = {"F32": np.float32, "F16": np.float16, "BF16": np.int16, "I8": np.int8, "I64": np.int64}
        for t in tensors:
            w.add_tensor_info(t.name, t.shape, np.dtype(np_for[t.dtype]), t.nbytes, raw_dtype=raw.get(t.dtype))
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_ti_data_to_file()
        end_of_info = w.fout[0].tell()
        w.close()
        data_start = _pad(end_of_info, self.alignment)
        offsets, pos = {}, 0
        for t in tensors:  # the same rule as GGUFWriter.write_ti_data_to_file
            offsets[t.name] = data_start + pos
            pos += _pad(t.nbytes, self.alignment)
        return offsets, data_start + pos

    def _safetensors_header(self, metadata: dict, tensors: list[TensorPlan]) -> tuple[dict[str, int], int]:
        table: dict = {"__metadata__": {k: json.dumps(v) for k, v in metadata.items()}}
        rel, pos, n_pad = {}, 0, 0
        for t in tensors:
            aligned = _pad(pos, self.alignment)
            if aligned != pos:  # safetensors wants the data section fully covered: pad with a named tensor
                table[f"{PAD_PREFIX}{n_pad}"] = {"dtype": "U8", "shape": [aligned - pos], "data_offsets": [pos, aligned]}
                n_pad += 1
                pos = aligned
            table[t.name] = {"dtype": t.dtype, "shape": list(t.shape), "data_offsets": [pos, pos + t.nbytes]}
            rel[t.name] = pos
            pos += t.nbytes
        header = json.dumps(table, separators=(",", ":")).encode()
        # pad the header with spaces so that the data section starts aligned
        hlen = _pad(8 + len(header), self.alignment) - 8
        header = header + b" " * (hlen - len(header))
        with open(self.path, "wb") as f:
            f.write(hlen.to_bytes(8, "little"))
            f.write(header)
        data_start = 8 + hlen
        return {k: data_start + v for k, v in rel.items()}, data_start + pos

    # --- data -------------------------------------------------------------------------------------
    def write(self, name: str, data, byte_offset: int = 0) -> None:
        """Write ``data`` (numpy array, torch tensor or bytes) into tensor ``name`` at ``byte_offset``."""
        plan = self.plans[name]
        if isinstance(data, torch.Tensor):
            if data.dtype == torch.bfloat16:
                data = data.contiguous().view(torch.int16)
            data = data.detach().cpu().contiguous().numpy()
        buf = memoryview(np.ascontiguousarray(data)).cast("B") if isinstance(data, np.ndarray) else memoryview(data)
        if byte_offset < 0 or byte_offset + buf.nbytes > plan.nbytes:
            raise ValueError(f"write of {buf.nbytes} bytes at {byte_offset} overflows tensor {name} ({plan.nbytes} bytes)")
        os.pwrite(self._f.fileno(), buf, self.offsets[name] + byte_offset)

    def close(self) -> None:
        if self._f is not None:
            self._f.flush()
            os.fsync(self._f.fileno())
            self._f.close()
            self._f = None

    def abort(self) -> None:
        if self._f is not None:
            self._f.close()
            self._f = None


def _gguf_add(w, key: str, value) -> None:
    T = gguf.GGUFValueType
    if isinstance(value, bool):
        w.add_key_value(key, value, T.BOOL)
    elif isinstance(value, int):
        w.add_key_value(key, value, T.UINT32 if 0 <= value < 2**32 else T.INT64)
    elif isinstance(value, float):
        w.add_key_value(key, value, T.FLOAT64 if key.startswith("fate.") else T.FLOAT32)
    elif isinstance(value, str):
        w.add_key_value(key, value, T.STRING)
    elif isinstance(value, (list, tuple)):
        if not value:
            raise ValueError(f"metadata {key}: empty arrays are not stored (omit the key)")
        first = value[0]
        sub = (T.BOOL if isinstance(first, bool) else T.INT64 if isinstance(first, int)
               else T.FLOAT64 if isinstance(first, float) else T.STRING)
        w.add_key_value(key, list(value), T.ARRAY, sub_type=sub)
    else:
        raise TypeError(f"metadata {key}: unsupported value type {type(value).__name__}")

"""Opening a bundle (``.gguf`` or ``.safetensors``) by memory map.

``Bundle`` gives the metadata as plain Python values and every tensor as a zero-copy torch view of
the map.  The map is private copy-on-write: views are writable in Python's eyes (no warnings, no
copies) but nothing ever reaches the file, and pages are read from disk only when touched, so RSS
grows with what is used.  A bundle is untrusted input: every offset and size is checked against the
file before a view is made; problems raise ``BundleError`` naming the tensor or key.
"""

from __future__ import annotations

import json
import mmap
import os
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from fate.formats import constants as C
from fate.formats.writer import DTYPE_BYTES, PAD_PREFIX, TORCH_DTYPES


class BundleError(ValueError):
    """Anything wrong with a bundle file; the message names the part."""


class BundleVersionError(BundleError):
    pass


class ChecksumError(BundleError):
    pass


@dataclass(frozen=True)
class TensorEntry:
    name: str
    dtype: str
    shape: tuple[int, ...]
    offset: int  # absolute, in the file
    nbytes: int


_GGUF_DTYPES = {0: "F32", 1: "F16", 24: "I8", 27: "I64", 30: "BF16"}


class Bundle:
    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        if not self.path.exists():
            raise BundleError(f"{self.path}: no such file")
        if self.path.is_dir():
            raise BundleError(f"{self.path} is a directory, not a bundle; convert a checkpoint with fate-convert first")
        self.file_size = self.path.stat().st_size
        if self.file_size < 16:
            raise BundleError(f"{self.path}: not a fate bundle (only {self.file_size} bytes)")
        with open(self.path, "rb") as f:
            magic = f.read(8)
            self._map = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
        if magic[:4] == b"GGUF":
            self.format = "gguf"
            self.metadata, self.tensors = self._read_gguf()
        elif magic[:8] != b"\0" * 8 and struct.unpack("<Q", magic)[0] < self.file_size and self._map[8:9] == b"{":
            self.format = "safetensors"
            self.metadata, self.tensors = self._read_safetensors()
        else:
            raise BundleError(f"{self.path}: not a fate bundle (neither GGUF nor safetensors)")
        for t in self.tensors.values():
            if t.offset < 0 or t.offset + t.nbytes > self.file_size:
                raise BundleError(
                    f"{self.path} is truncated or corrupt: tensor {t.name} needs bytes up to "
                    f"{t.offset + t.nbytes} of a {self.file_size}-byte file")
        version = self.metadata.get(C.MAGIC_KEY)
        if version is None:
            raise BundleError(f"{self.path}: no {C.MAGIC_KEY} key: a GGUF/safetensors file, but not made by fate-convert")
        if not isinstance(version, int) or version != C.FORMAT_VERSION:
            raise BundleVersionError(
                f"{self.path}: bundle format version {version!r}, this fate reads version {C.FORMAT_VERSION}; "
                "convert the checkpoint again with this fate (or use the fate that made it)")
        self._verified: set[tuple[str, int]] = set()

    # --- parsing ----------------------------------------------------------------------------------
    def _read_gguf(self):
        from gguf import GGUFReader

        try:
            r = GGUFReader(self.path)
        except Exception as e:  # gguf-py raises assorted errors on corrupt input
            raise BundleError(f"{self.path} is truncated or corrupt: its GGUF header and tensor table do not fit the file ({e})") from None
        meta = {}
        for name, field in r.fields.items():
            if name.startswith("GGUF."):
                continue
            try:
                meta[name] = field.contents()
            except Exception:
                raise BundleError(f"{self.path}: corrupt metadata value for key {name!r}") from None
        tensors = {}
        for t in r.tensors:
            dt = _GGUF_DTYPES.get(int(t.tensor_type))
            if dt is None:
                raise BundleError(f"{self.path}: tensor {t.name} has type {t.tensor_type!r}, which fate does not use")
            shape = tuple(int(d) for d in reversed(t.shape.tolist()))
            tensors[t.name] = TensorEntry(t.name, dt, shape, int(t.data_offset), _nbytes(dt, shape))
        del r
        return meta, tensors

    def _read_safetensors(self):
        (n,) = struct.unpack("<Q", self._map[:8])
        try:
            table = json.loads(bytes(self._map[8:8 + n]))
        except ValueError:
            raise BundleError(f"{self.path}: corrupt safetensors header") from None
        if not isinstance(table, dict):
            raise BundleError(f"{self.path}: corrupt safetensors header")
        meta = {}
        for k, v in (table.pop("__metadata__", None) or {}).items():
            try:
                meta[k] = json.loads(v)
            except (TypeError, ValueError):
                raise BundleError(f"{self.path}: metadata {k!r} is not JSON-encoded") from None
        tensors = {}
        for name, info in table.items():
            if name.startswith(PAD_PREFIX):
                continue
            try:
                dt, shape, (start, end) = info["dtype"], tuple(int(d) for d in info["shape"]), info["data_offsets"]
            except (KeyError, TypeError, ValueError):
                raise BundleError(f"{self.path}: corrupt entry for tensor {name!r}") from None
            if dt not in DTYPE_BYTES or end - start != _nbytes(dt, shape) or start < 0:
                raise BundleError(f"{self.path}: tensor {name!r} has inconsistent dtype/shape/offsets")
            tensors[name] = TensorEntry(name, dt, shape, 8 + n + int(start), end - start)
        return meta, tensors

    # --- access -----------------------------------------------------------------------------------
    def has(self, name: str) -> bool:
        return name in self.tensors

    def raw(self, name: str) -> torch.Tensor:
        """uint8 view of a tensor's bytes in the map."""
        t = self._entry(name)
        return torch.frombuffer(self._map, dtype=torch.uint8, count=t.nbytes, offset=t.offset)

    def tensor(self, name: str) -> torch.Tensor:
        """Zero-copy view of a tensor with its stored dtype and shape."""
        t = self._entry(name)
        return self.raw(name).view(TORCH_DTYPES[t.dtype]).view(t.shape)

    def _entry(self, name: str) -> TensorEntry:
        try:
            return self.tensors[name]
        except KeyError:
            raise BundleError(f"{self.path}: tensor {name} is missing") from None

    def get(self, key: str, default=None):
        return self.metadata.get(key, default)

    def require(self, key: str):
        if key not in self.metadata:
            raise BundleError(f"{self.path}: metadata key {key} is missing")
        return self.metadata[key]

    # --- integrity --------------------------------------------------------------------------------
    def expert_blob(self, layer: int, precision: str, expert: int, verify: bool = True) -> torch.Tensor:
        """uint8 view of one expert's unpadded blob; its crc32 is checked the first time it is read."""
        name = C.T_EXPERTS.format(i=layer, p=precision)
        t = self._entry(name)
        size = int(self.require(C.K_PRECISION_BLOB_SIZE.format(p=precision)))
        n_exp, stride = t.shape
        if not (0 <= expert < n_exp) or size > stride:
            raise BundleError(f"{self.path}: expert {expert} of {name} is out of range")
        view = torch.frombuffer(self._map, dtype=torch.uint8, count=size, offset=t.offset + expert * stride)
        if verify and (name, expert) not in self._verified:
            want = int(self.tensor(C.T_EXPERTS_CRC.format(i=layer, p=precision))[expert])
            got = zlib.crc32(memoryview(self._map)[t.offset + expert * stride: t.offset + expert * stride + size])
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


def _nbytes(dtype: str, shape: tuple[int, ...]) -> int:
    n = DTYPE_BYTES[dtype]
    for d in shape:
        if d < 0:
            raise BundleError("negative dimension")
        n *= d
    return n


def open_bundle(path: str | os.PathLike) -> Bundle:
    return Bundle(path)


__all__ = ["Bundle", "BundleError", "BundleVersionError", "ChecksumError", "TensorEntry", "open_bundle", "np"]

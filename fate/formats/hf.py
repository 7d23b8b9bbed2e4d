"""Reading a Hugging Face checkpoint directory lazily: config, tokenizer files, and tensors one at a
time from one or many ``*.safetensors`` shards (never the whole model in memory)."""

from __future__ import annotations

import hashlib
import json
import os
import struct
from pathlib import Path

import torch

from fate.errors import CheckpointError


_TORCH_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "F64": torch.float64,
                 "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
                 "BOOL": torch.bool}
_ST_DTYPES = {"F32": 4, "F16": 2, "BF16": 2, "F64": 8, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1}


def read_safetensors_header(path: Path) -> dict:
    """Parse and check a safetensors header against the file size (truncation shows up here)."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise CheckpointError(f"{path}: not a safetensors file (shorter than 8 bytes)")
        (n,) = struct.unpack("<Q", head)
        if n > size - 8 or n > 100 << 20:
            raise CheckpointError(f"{path}: corrupt or truncated safetensors header (claims {n} bytes)")
        try:
            header = json.loads(f.read(n))
        except ValueError:
            raise CheckpointError(f"{path}: corrupt safetensors header (not JSON)") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: corrupt safetensors header")
    data_len = size - 8 - n
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            start, end = info["data_offsets"]
            dtype = info["dtype"]
            count = 1
            for d in info["shape"]:
                count *= int(d)
        except (KeyError, TypeError, ValueError):
            raise CheckpointError(f"{path}: corrupt entry for tensor {name!r}") from None
        if end > data_len:
            raise CheckpointError(
                f"{path} is truncated: tensor {name!r} ends at byte {end} of a {data_len}-byte data section;"
                " re-download or re-save the checkpoint")
        if dtype in _ST_DTYPES and end - start != count * _ST_DTYPES[dtype]:
            raise CheckpointError(f"{path}: tensor {name!r} has {end - start} bytes for shape {info['shape']}")
    return header


class HFCheckpoint:
    """A checkpoint directory: ``config.json`` + safetensors shard(s) + tokenizer files."""

    def __init__(self, model_dir: str | os.PathLike):
        self.dir = Path(model_dir)
        if not self.dir.exists():
            raise CheckpointError(f"{self.dir}: no such directory")
        if not self.dir.is_dir():
            raise CheckpointError(f"{self.dir} is not a directory; pass the checkpoint folder that holds config.json")
        cfg_path = self.dir / "config.json"
        if not cfg_path.is_file():
            raise CheckpointError(f"{self.dir}: config.json is missing; is this a Hugging Face checkpoint folder?")
        raw = cfg_path.read_bytes()
        self.config_sha256 = hashlib.sha256(raw).hexdigest()
        try:
            self.config = json.loads(raw)
        except ValueError as e:
            raise CheckpointError(f"{cfg_path}: not valid JSON ({e})") from None
        if not isinstance(self.config, dict):
            raise CheckpointError(f"{cfg_path}: not a JSON object")
        self._where: dict[str, Path] = {}
        self._info: dict[str, dict] = {}
        self._data_start: dict[Path, int] = {}
        for shard in self._shards():
            header = read_safetensors_header(shard)
            with open(shard, "rb") as f:
                self._data_start[shard] = 8 + struct.unpack("<Q", f.read(8))[0]
            for name, info in header.items():
                if name != "__metadata__":
                    self._where[name] = shard
                    self._info[name] = info

    def _shards(self) -> list[Path]:
        index = self.dir / "model.safetensors.index.json"
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (ValueError, KeyError, TypeError):
                raise CheckpointError(f"{index}: corrupt index (no weight_map)") from None
            files = sorted(set(weight_map.values()))
            missing = [f for f in files if not (self.dir / f).is_file()]
            if missing:
                raise CheckpointError(f"{self.dir}: shard {missing[0]} named in the index is missing")
            return [self.dir / f for f in files]
        files = sorted(self.dir.glob("*.safetensors"))
        if not files:
            raise CheckpointError(
                f"{self.dir}: no *.safetensors weights (only safetensors checkpoints are read; "
                "convert .bin weights with transformers' save_pretrained(safe_serialization=True))")
        return files

    # --- tensors --------------------------------------------------------------------------------
    def __contains__(self, name: str) -> bool:
        return name in self._where

    def names(self) -> list[str]:
        return list(self._where)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(int(d) for d in self._info[name]["shape"])

    def dtype_name(self, name: str) -> str:
        return self._info[name]["dtype"]

    def nbytes(self, name: str) -> int:
        start, end = self._info[name]["data_offsets"]
        return end - start

    def get(self, name: str, shape: tuple[int, ...] | None = None) -> torch.Tensor:
        """Read one tensor (a fresh CPU tensor in its stored dtype), checking its shape if given."""
        if name not in self._where:
            raise CheckpointError(f"{self.dir}: tensor {name!r} is missing from the checkpoint")
        if shape is not None and self.shape(name) != tuple(shape):
            raise CheckpointError(
                f"{self.dir}: tensor {name!r} has shape {list(self.shape(name))}, config.json implies {list(shape)}")
        # plain reads, not safetensors' memory map: mapped pages would stay resident for as long as the
        # shard is open, and conversion must stay within a few layers' worth of memory
        shard = self._where[name]
        info = self._info[name]
        start, end = info["data_offsets"]
        dtype = _TORCH_DTYPES.get(info["dtype"])
        if dtype is None:
            raise CheckpointError(f"{shard}: tensor {name!r} has dtype {info['dtype']}, which fate cannot read")
        buf = bytearray(end - start)
        with open(shard, "rb") as f:
            f.seek(self._data_start[shard] + start)
            if f.readinto(buf) != len(buf):
                raise CheckpointError(f"{shard} is truncated: tensor {name!r} cannot be read whole")
        if not buf:
            return torch.empty(self.shape(name), dtype=dtype)
        return torch.frombuffer(buf, dtype=dtype).reshape(self.shape(name))

    def get_row(self, name: str, index: int) -> torch.Tensor:
        """``get(name)[index]`` reading only that entry's bytes (one expert of a stacked [E, ...] tensor)."""
        if name not in self._where:
            raise CheckpointError(f"{self.dir}: tensor {name!r} is missing from the checkpoint")
        shape = self.shape(name)
        if not shape or not 0 <= index < shape[0]:
            raise CheckpointError(f"{self.dir}: tensor {name!r} of shape {list(shape)} has no row {index}")
        shard = self._where[name]
        info = self._info[name]
        dtype = _TORCH_DTYPES.get(info["dtype"])
        if dtype is None:
            raise CheckpointError(f"{shard}: tensor {name!r} has dtype {info['dtype']}, which fate cannot read")
        start, end = info["data_offsets"]
        row = (end - start) // shape[0]
        buf = bytearray(row)
        with open(shard, "rb") as f:
            f.seek(self._data_start[shard] + start + index * row)
            if f.readinto(buf) != len(buf):
                raise CheckpointError(f"{shard} is truncated: tensor {name!r} cannot be read whole")
        if not buf:
            return torch.empty(shape[1:], dtype=dtype)
        return torch.frombuffer(buf, dtype=dtype).reshape(shape[1:])

    def largest_dtype_bytes(self) -> int:
        return max((_ST_DTYPES.get(i["dtype"], 4) for i in self._info.values()), default=4)

    # --- tokenizer and generation files ------------------------------------------------------------
    def read_json(self, filename: str) -> dict | None:
        path = self.dir / filename
        if not path.is_file():
            return None
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (ValueError, UnicodeDecodeError) as e:
            raise CheckpointError(f"{path}: not valid JSON ({e})") from None
        return data if isinstance(data, dict) else None

    def tokenizer_json(self) -> str:
        path = self.dir / "tokenizer.json"
        if not path.is_file():
            raise CheckpointError(
                f"{self.dir}: tokenizer.json is missing (a bundle carries its tokenizer; save the fast tokenizer "
                "with tokenizer.save_pretrained)")
        text = path.read_text(encoding="utf-8")
        try:
            json.loads(text)
        except ValueError as e:
            raise CheckpointError(f"{path}: not valid JSON ({e})") from None
        return text

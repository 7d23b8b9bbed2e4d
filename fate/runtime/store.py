"""ExpertStore: the routed experts of a bundle, as views of the memory map, per precision.

The store never copies an expert until asked: ``blob`` is a zero-copy uint8 view (checked against its
crc32 the first time it is read in this process); ``dense`` dequantizes it into the three weight
matrices for a matmul.  The offloading engine builds its device cache on ``blob``; the resident
runtime calls ``dense`` per use.
"""

from __future__ import annotations

import torch

from fate import quant as Q
from fate.formats import constants as C
from fate.formats.bundle import Bundle, BundleError
from fate.runtime.config import ModelConfig


class ExpertStore:
    def __init__(self, bundle: Bundle, cfg: ModelConfig, verify: bool = True):
        self.bundle, self.cfg, self.verify = bundle, cfg, verify
        precisions = bundle.require(C.K_PRECISIONS)
        if not isinstance(precisions, list) or not precisions or not all(isinstance(p, str) for p in precisions):
            raise BundleError(f"{bundle.path}: {C.K_PRECISIONS} is not a list of precisions")
        self.precisions: list[str] = precisions
        self.specs: dict[str, Q.QuantSpec] = {}
        self.layouts: dict[str, Q.BlobLayout] = {}
        for p in precisions:
            bits = bundle.require(C.K_PRECISION_BITS.format(p=p))
            group = bundle.require(C.K_PRECISION_GROUP.format(p=p))
            try:
                spec = Q.QuantSpec(p, int(bits), int(group))
                layout = Q.expert_blob_layout(cfg.hidden_size, cfg.expert_ffn, spec)
            except (ValueError, TypeError) as e:
                raise BundleError(f"{bundle.path}: quantization settings of {p} are invalid ({e})") from None
            size = bundle.require(C.K_PRECISION_BLOB_SIZE.format(p=p))
            if size != layout.size:
                raise BundleError(f"{bundle.path}: {p} expert blobs are {size} bytes, the layout needs {layout.size}")
            for i in cfg.moe_layer_ids:
                name = C.T_EXPERTS.format(i=i, p=p)
                entry = bundle.tensors.get(name)
                if entry is None:
                    raise BundleError(f"{bundle.path}: tensor {name} is missing")
                if len(entry.shape) != 2 or entry.shape[0] != cfg.n_experts or entry.shape[1] < size:
                    raise BundleError(f"{bundle.path}: tensor {name} has shape {list(entry.shape)}, "
                                      f"expected [{cfg.n_experts}, ≥{size}]")
                crc = bundle.tensors.get(C.T_EXPERTS_CRC.format(i=i, p=p))
                if crc is None or crc.shape != (cfg.n_experts,) or crc.dtype != "I64":
                    raise BundleError(f"{bundle.path}: checksums of {name} are missing or malformed")
            self.specs[p], self.layouts[p] = spec, layout

    def blob_bytes(self, precision: str) -> int:
        return self.layouts[precision].size

    def check_precision(self, precision: str) -> str:
        if precision not in self.layouts:
            raise BundleError(f"{self.bundle.path}: experts are stored as {', '.join(self.precisions)}, "
                              f"not {precision}; pick one of those (or re-convert with --experts)")
        return precision

    def blob(self, layer: int, expert: int, precision: str) -> torch.Tensor:
        return self.bundle.expert_blob(layer, precision, expert, verify=self.verify)

    def dense(self, layer: int, expert: int, precision: str, dtype: torch.dtype = torch.float32,
              device: str | torch.device = "cpu") -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        blob = self.blob(layer, expert, precision)
        if torch.device(device).type != "cpu":
            blob = blob.to(device, non_blocking=True)
        return Q.unpack_expert(blob, self.layouts[precision], dtype=dtype)

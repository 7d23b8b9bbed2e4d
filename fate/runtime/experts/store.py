"""ExpertStore: the routed experts of a bundle, as views of the memory map, per precision.

The store never copies an expert until asked: ``blob`` is a zero-copy uint8 view (checked against its
crc32 the first time it is read in this process); ``dense`` dequantizes it into the three weight
matrices for a matmul.  The offloading engine builds its device cache on ``blob``, the resident executor
reads ``blob`` through :class:`fate.quant.expert.ExpertView`; ``dense`` serves the tests' reference.
"""

from __future__ import annotations

import numpy as np
import torch

from fate import quant as Q
from fate.errors import BundleError, BundleMetadataError, BundleStructureError
from fate.formats import constants as C
from fate.formats.bundle import Bundle
from fate.model import arch as A
from fate.model.config import ModelConfig

FLOAT_DTYPES = ("F16", "BF16", "F32")
_LAYER_TENSORS = (C.T_ATTN_NORM, C.T_ATTN_Q, C.T_ATTN_K, C.T_ATTN_V, C.T_ATTN_Q_BIAS, C.T_ATTN_K_BIAS, C.T_ATTN_V_BIAS,
                  C.T_ATTN_OUT, C.T_ATTN_Q_NORM, C.T_ATTN_K_NORM, C.T_FFN_NORM, C.T_FFN_GATE_INP, C.T_FFN_GATE,
                  C.T_FFN_UP, C.T_FFN_DOWN, C.T_FFN_GATE_SHEXP, C.T_FFN_UP_SHEXP, C.T_FFN_DOWN_SHEXP,
                  C.T_FFN_GATE_INP_SHEXP, C.T_ATTN_OUT_BIAS, C.T_ATTN_SINKS, C.T_ATTN_Q_A, C.T_ATTN_Q_A_NORM,
                  C.T_ATTN_Q_B, C.T_ATTN_KV_A_MQA, C.T_ATTN_KV_A_NORM, C.T_ATTN_KV_B, C.T_FFN_GATE_INP_BIAS,
                  C.T_FFN_EXP_PROBS_B)


def check_bundle_config(bundle: Bundle, cfg: ModelConfig) -> None:
    """The bundle agrees with its own model config: the llama.cpp keys that mirror it hold the same values,
    and every tensor the model reads is there with the shape the config implies and a float dtype (F32 for
    norms and routers, one dtype for every other matrix; projections may be q8: I8 codes with their F16 scale
    tensor); calibration tensors, when present, are shaped for
    the config too.  Raises BundleMetadataError / BundleStructureError naming the key or tensor."""
    path = bundle.path
    arch = C.LLAMA_CPP_ARCH[cfg.model_type]
    stored_arch = bundle.get(C.K_GENERAL_ARCH)
    if stored_arch is not None and stored_arch != arch:
        raise BundleMetadataError(f"{path}: metadata {C.K_GENERAL_ARCH} = {stored_arch!r} contradicts "
                                  f"{C.K_MODEL_CONFIG} (model_type {cfg.model_type!r} is {arch!r})")
    first_moe = next((i for i, m in enumerate(cfg.moe_layers) if m), cfg.n_layers)
    exact = {C.K_CONTEXT_LENGTH: cfg.max_position, C.K_EMBEDDING_LENGTH: cfg.hidden_size,
             C.K_BLOCK_COUNT: cfg.n_layers, C.K_HEAD_COUNT: cfg.n_heads, C.K_HEAD_COUNT_KV: cfg.n_kv_heads,
             C.K_KEY_LENGTH: cfg.head_dim, C.K_VALUE_LENGTH: cfg.value_dim, C.K_EXPERT_COUNT: cfg.n_experts,
             C.K_EXPERT_USED_COUNT: cfg.top_k, C.K_EXPERT_FFN_LENGTH: cfg.expert_ffn, C.K_VOCAB_SIZE: cfg.vocab_size,
             C.K_LEADING_DENSE_BLOCKS: first_moe, C.K_FEED_FORWARD_LENGTH: cfg.dense_ffn,
             C.K_EXPERT_SHARED_FFN_LENGTH: cfg.shared_ffn,
             C.K_ROPE_SCALING_TYPE: (cfg.rope_scaling or {}).get("type")}
    floats = {C.K_RMS_EPS: cfg.rms_eps, C.K_ROPE_FREQ_BASE: cfg.rope_theta,
              C.K_ROPE_SCALING_FACTOR: (cfg.rope_scaling or {}).get("factor")}
    for template, want in exact.items():
        key = C.key(template, arch)
        if key in bundle.metadata:
            got = bundle.metadata[key]
            if got != want or isinstance(got, bool) or type(got) is not type(want):
                raise BundleMetadataError(f"{path}: metadata {key} = {got!r} contradicts {C.K_MODEL_CONFIG} ({want!r})")
    for template, want in floats.items():
        key = C.key(template, arch)
        if key in bundle.metadata:
            got = bundle.metadata[key]
            same = (isinstance(got, (int, float)) and not isinstance(got, bool) and isinstance(want, (int, float))
                    and np.float32(got) == np.float32(want))  # GGUF keeps llama.cpp's floats as float32
            if not same:
                raise BundleMetadataError(f"{path}: metadata {key} = {got!r} contradicts {C.K_MODEL_CONFIG} ({want!r})")

    expected = {name: shape for name, (_, shape) in A.non_expert_tensors(A.ARCHS[cfg.model_type], cfg).items()}
    matrix_dtype = None
    for name, shape in expected.items():
        entry = bundle.tensors.get(name)
        if entry is None:
            raise BundleStructureError(f"{path}: tensor {name} is missing (the model config needs it)")
        if entry.shape != tuple(shape):
            raise BundleStructureError(f"{path}: tensor {name} has shape {list(entry.shape)}, the model config "
                                       f"implies {list(shape)}")
        if entry.dtype == "I8" and C.is_projection(name):  # --dtype q8: codes here, scales beside them
            scale, want = bundle.tensors.get(C.q8_scale_name(name)), (shape[0], shape[1] // C.Q8_GROUP)
            if shape[1] % C.Q8_GROUP or scale is None or scale.dtype != "F16" or scale.shape != want:
                raise BundleStructureError(f"{path}: tensor {name} is I8 (q8) but {C.q8_scale_name(name)} is not "
                                           f"F16 {list(want)} beside it")
            continue
        if C.keeps_f32(name):
            if entry.dtype != "F32":
                raise BundleStructureError(f"{path}: tensor {name} is {entry.dtype}; norms and routers are stored as F32")
        elif entry.dtype not in FLOAT_DTYPES or (matrix_dtype is not None and entry.dtype != matrix_dtype):
            raise BundleStructureError(f"{path}: tensor {name} is {entry.dtype}, the other matrices are "
                                       f"{matrix_dtype or 'a float type'}")
        else:
            matrix_dtype = entry.dtype
    # a tensor the spec says this config does not have (output.weight with tied embeddings, q/k norms
    # without qk_norm, biases without qkv_bias, ...) means the config and the tensors disagree
    known = {C.T_OUTPUT} | {t.format(i=i) for t in _LAYER_TENSORS for i in range(cfg.n_layers)}
    for name in bundle.tensors:
        if name in known and name not in expected:
            raise BundleStructureError(f"{path}: tensor {name} is present, but the model config does not use it")
    L, E = cfg.n_layers, cfg.n_experts
    extra = bundle.get(C.K_CALIB_RECALL_EXTRA) or list(C.RECALL_EXTRA)
    for name, dtype, shape in ((C.T_CALIB_POPULARITY, "I64", (L, E)), (C.T_CALIB_COSINE, "F32", (L,)),
                               (C.T_CALIB_RECALL, "F32", (L, len(extra))), (C.T_CALIB_RANK_HIT, "F32", (2, L, E)),
                               (C.T_CALIB_REUSE, "F32", (2, L, E + 1))):
        entry = bundle.tensors.get(name)
        if entry is not None and (entry.dtype != dtype or entry.shape != shape):
            raise BundleStructureError(f"{path}: tensor {name} is {entry.dtype} {list(entry.shape)}, the model config "
                                       f"implies {dtype} {list(shape)}")


class ExpertStore:
    def __init__(self, bundle: Bundle, cfg: ModelConfig, verify: bool = True):
        self.bundle, self.cfg, self.verify = bundle, cfg, verify
        self._views: dict[tuple[int, int, str], torch.Tensor] = {}
        self._addresses: dict[tuple[int, int, str], tuple[int, int]] = {}
        check_bundle_config(bundle, cfg)
        precisions = bundle.require(C.K_PRECISIONS)
        if not isinstance(precisions, list) or not precisions or not all(isinstance(p, str) for p in precisions):
            raise BundleMetadataError(f"{bundle.path}: {C.K_PRECISIONS} is not a list of precisions")
        self.precisions: list[str] = precisions
        self.specs: dict[str, Q.QuantSpec] = {}
        self.layouts: dict[str, Q.BlobLayout] = {}
        for p in precisions:
            bits = bundle.require(C.K_PRECISION_BITS.format(p=p))
            group = bundle.require(C.K_PRECISION_GROUP.format(p=p))
            down_group = bundle.get(C.K_PRECISION_GROUP_DOWN.format(p=p), group)  # older bundles: one group size
            if not all(isinstance(v, int) and not isinstance(v, bool) for v in (bits, group, down_group)):
                raise BundleMetadataError(f"{bundle.path}: quantization settings of {p!r} are not integers "
                                          f"(bits {bits!r}, group sizes {group!r}, {down_group!r})")
            try:
                spec = Q.QuantSpec(p, bits, group)
                layout = cfg.expert_layout(spec, down_group)
            except (ValueError, TypeError) as e:
                raise BundleMetadataError(f"{bundle.path}: quantization settings of {p} are invalid ({e})") from None
            size = bundle.require(C.K_PRECISION_BLOB_SIZE.format(p=p))
            if size != layout.size or not isinstance(size, int) or isinstance(size, bool):
                raise BundleMetadataError(f"{bundle.path}: {p} expert blobs are {size!r} bytes, the layout needs "
                                          f"{layout.size}")
            stride = bundle.get(C.K_PRECISION_BLOB_STRIDE.format(p=p))
            for i in cfg.moe_layer_ids:
                name = C.T_EXPERTS.format(i=i, p=p)
                entry = bundle.tensors.get(name)
                if entry is None:
                    raise BundleStructureError(f"{bundle.path}: tensor {name} is missing")
                if (len(entry.shape) != 2 or entry.shape[0] != cfg.n_experts or entry.shape[1] < size
                        or entry.dtype != "I8"):
                    raise BundleStructureError(f"{bundle.path}: tensor {name} is {entry.dtype} {list(entry.shape)}, "
                                               f"expected I8 [{cfg.n_experts}, ≥{size}]")
                if stride is not None and stride != entry.shape[1]:
                    raise BundleMetadataError(f"{bundle.path}: metadata {C.K_PRECISION_BLOB_STRIDE.format(p=p)} = "
                                              f"{stride!r}, but the rows of {name} are {entry.shape[1]} bytes")
                crc = bundle.tensors.get(C.T_EXPERTS_CRC.format(i=i, p=p))
                if crc is None or crc.shape != (cfg.n_experts,) or crc.dtype != "I64":
                    raise BundleStructureError(f"{bundle.path}: checksums of {name} are missing or malformed")
            self.specs[p], self.layouts[p] = spec, layout

    def blob_bytes(self, precision: str) -> int:
        return self.layouts[precision].size

    def check_precision(self, precision: str) -> str:
        if precision not in self.layouts:
            raise BundleError(f"{self.bundle.path}: experts are stored as {', '.join(self.precisions)}, "
                              f"not {precision}; pick one of those (or re-convert with --experts)")
        return precision

    def blob(self, layer: int, expert: int, precision: str) -> torch.Tensor:
        """A uint8 view of the expert's blob in the map, its crc32 checked on the first read; the view is
        kept (the offloading engine asks for the same blobs again and again)."""
        key = (layer, expert, precision)
        view = self._views.get(key)
        if view is None:
            view = self._views[key] = self.bundle.expert_blob(layer, precision, expert, verify=self.verify)
        return view

    def blob_address(self, layer: int, expert: int, precision: str) -> tuple[int, int]:
        """(address, bytes) of the expert's blob (:meth:`blob`'s view, which the store keeps alive): what the
        native copy thread takes."""
        key = (layer, expert, precision)
        addr = self._addresses.get(key)
        if addr is None:
            view = self.blob(layer, expert, precision)
            addr = self._addresses[key] = (view.data_ptr(), view.numel())
        return addr

    def dense(self, layer: int, expert: int, precision: str, dtype: torch.dtype = torch.float32,
              device: str | torch.device = "cpu") -> tuple[torch.Tensor, ...]:
        """(gate, up, down) in ``dtype``, and (gate_up bias, down bias) for experts with biases — what
        :class:`fate.model.experts.DenseExperts` takes."""
        blob = self.blob(layer, expert, precision)
        if torch.device(device).type != "cpu":
            blob = blob.to(device, non_blocking=True)
        layout = self.layouts[precision]
        bias = Q.unpack_bias(blob, layout, dtype)
        return Q.unpack_expert(blob, layout, dtype=dtype) + (bias or ())

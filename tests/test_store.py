"""fate.runtime.experts.store: the bundle's experts per precision as views of the map, each blob's crc32
checked on its first read, and the bundle checked against its own model config."""

from __future__ import annotations

import dataclasses
import json
import shutil

import numpy as np
import pytest
import torch

import fate
from fate.errors import BundleError, BundleMetadataError, BundleStructureError, ChecksumError
from fate.formats import constants as C
from fate.formats.bundle import Bundle, metadata_crc32
from fate.formats.hf import HFCheckpoint
from fate.model import arch as A
from fate.model.config import ModelConfig
from fate.quant import QuantSpec, expert_blob_layout, pack_expert, unpack_expert
from fate.runtime.experts.store import ExpertStore, check_bundle_config
from tests import test_fuzz as FZ

ARCH = "deepseek"  # a dense first layer, a shared expert: the most varied tensor set


def _open(path) -> tuple[Bundle, ModelConfig]:
    b = Bundle(path)
    return b, ModelConfig.from_json(b.require(C.K_MODEL_CONFIG))


@pytest.mark.parametrize("arch", ["qwen2_moe", "deepseek"])
def test_every_stored_precision_with_its_layout(converted, arch):
    b, cfg = _open(converted[arch][1])
    s = ExpertStore(b, cfg)
    assert s.precisions == ["f16", "q4", "q2"]
    for p in s.precisions:
        spec = QuantSpec.default(p)
        layout = expert_blob_layout(cfg.hidden_size, cfg.expert_ffn, spec)
        assert s.specs[p] == spec and s.layouts[p] == layout
        assert s.blob_bytes(p) == layout.size == b.metadata[C.K_PRECISION_BLOB_SIZE.format(p=p)]
        assert s.check_precision(p) == p
    with pytest.raises(BundleError) as info:
        s.check_precision("q8")
    assert "f16, q4, q2" in str(info.value) and "not q8" in str(info.value)


def test_blobs_are_views_of_the_bytes_written(converted):
    ckpt_dir, path = converted[ARCH]
    b, cfg = _open(path)
    s = ExpertStore(b, cfg)
    raw = path.read_bytes()
    ckpt = HFCheckpoint(ckpt_dir)
    spec = A.spec_for(json.loads((ckpt_dir / "config.json").read_text()))
    for p in s.precisions:
        for layer in cfg.moe_layer_ids:
            entry = b.tensors[C.T_EXPERTS.format(i=layer, p=p)]
            stride = entry.shape[1]
            for e in (0, 5, cfg.n_experts - 1):
                blob = s.blob(layer, e, p)
                start = entry.offset + e * stride
                assert blob.dtype == torch.uint8 and blob.numel() == s.blob_bytes(p)
                assert blob.numpy().tobytes() == raw[start:start + s.blob_bytes(p)]  # the bytes in the file
                assert blob.data_ptr() == b.raw(entry.name).data_ptr() + e * stride  # read in place, not copied
                w = unpack_expert(blob, s.layouts[p])
                assert all(torch.equal(x, y) for x, y in zip(s.dense(layer, e, p), w))
        # and they are the converter's packing of the checkpoint's weights
        layer = cfg.moe_layer_ids[-1]
        weights = [ckpt.get(n).float() for n in A.expert_tensor_names(spec, layer, 3)]
        packed = np.asarray(pack_expert(*weights, s.specs[p]))
        assert packed.tobytes()[:s.blob_bytes(p)] == s.blob(layer, 3, p).numpy().tobytes()


def test_a_flipped_byte_raises_checksum_error_on_first_read(converted, tmp_path):
    path = tmp_path / "flipped.gguf"
    shutil.copy(converted[ARCH][1], path)
    b, cfg = _open(path)
    layer, e, p = cfg.moe_layer_ids[0], 4, "q4"
    entry = b.tensors[C.T_EXPERTS.format(i=layer, p=p)]
    at = entry.offset + e * entry.shape[1] + 100
    b.close()
    data = bytearray(path.read_bytes())
    data[at] ^= 0x10
    path.write_bytes(data)

    b, cfg = _open(path)
    s = ExpertStore(b, cfg)  # opening checks nothing of the blobs: they are read on first use
    with pytest.raises(ChecksumError) as info:
        s.blob(layer, e, p)
    msg = str(info.value)
    assert f"expert {e} of layer {layer} (q4)" in msg and "\n" not in msg
    with pytest.raises(ChecksumError):
        s.dense(layer, e, p)  # still refused: a failed check is not remembered as passed
    assert s.blob(layer, e + 1, p).numel() == s.blob_bytes(p)  # the others are intact
    assert s.blob(layer, e, "q2").numel() == s.blob_bytes("q2")

    unchecked = ExpertStore(b, cfg, verify=False)
    blob = unchecked.blob(layer, e, p)
    assert int(blob[100]) == data[at]  # the corrupt byte, as it is in the file
    assert fate.load(path, verify=False).store.blob(layer, e, p)[100] == data[at]


def test_a_blob_is_checked_once_per_process(converted, tmp_path):
    path = tmp_path / "m.gguf"
    shutil.copy(converted[ARCH][1], path)
    b, cfg = _open(path)
    s = ExpertStore(b, cfg)
    layer = cfg.moe_layer_ids[0]
    blob = s.blob(layer, 2, "q4")  # checked now
    blob[0] ^= 1  # the map is private (copy on write): this changes the process's bytes, not the file
    assert int(s.blob(layer, 2, "q4")[0]) == int(blob[0])  # not checked again
    assert Bundle(path).expert_blob(layer, "q4", 2)[0] != blob[0]  # the file is unchanged


# --- the bundle against its own config --------------------------------------------------------------
def _refused(b: Bundle, cfg: ModelConfig, cls, *needles):
    with pytest.raises(cls) as info:
        check_bundle_config(b, cfg)
    msg = str(info.value)
    for n in needles:
        assert n in msg, msg
    assert "\n" not in msg
    with pytest.raises(cls):  # the store checks it before anything else
        ExpertStore(b, cfg)
    return msg


MIRRORED_INTS = ["context_length", "embedding_length", "block_count", "attention.head_count",
                 "attention.head_count_kv", "attention.key_length", "attention.value_length", "expert_count",
                 "expert_used_count", "expert_feed_forward_length", "vocab_size", "leading_dense_block_count",
                 "feed_forward_length", "expert_shared_feed_forward_length"]


@pytest.mark.parametrize("suffix", MIRRORED_INTS)
def test_a_mirror_key_that_contradicts_the_config_is_refused(converted, suffix):
    b, cfg = _open(converted[ARCH][1])
    key = f"{ARCH}.{suffix}"
    assert key in b.metadata  # the converter writes every one of them
    check_bundle_config(b, cfg)
    good = b.metadata[key]
    b.metadata[key] = good + 1
    _refused(b, cfg, BundleMetadataError, key, repr(good + 1), C.K_MODEL_CONFIG)
    for same_value_other_type in (float(good), str(good), bool(good)):
        b.metadata[key] = same_value_other_type
        _refused(b, cfg, BundleMetadataError, key)
    del b.metadata[key]  # an absent mirror is no contradiction
    check_bundle_config(b, cfg)


def test_float_mirrors_compare_as_float32_and_the_architecture_must_match(converted):
    b, cfg = _open(converted[ARCH][1])
    key = f"{ARCH}.attention.layer_norm_rms_epsilon"
    assert np.float32(b.metadata[key]) == np.float32(cfg.rms_eps)
    b.metadata[key] = float(np.nextafter(np.float64(cfg.rms_eps), 1.0))  # the same float32: GGUF's precision
    check_bundle_config(b, cfg)
    b.metadata[key] = cfg.rms_eps * 2
    _refused(b, cfg, BundleMetadataError, key)
    b.metadata[key] = True
    _refused(b, cfg, BundleMetadataError, key)
    b.metadata[key] = cfg.rms_eps
    b.metadata[f"{ARCH}.rope.freq_base"] = 5e5
    _refused(b, cfg, BundleMetadataError, f"{ARCH}.rope.freq_base")
    b.metadata[f"{ARCH}.rope.freq_base"] = cfg.rope_theta
    b.metadata[C.K_GENERAL_ARCH] = "qwen2moe"
    _refused(b, cfg, BundleMetadataError, C.K_GENERAL_ARCH, "'qwen2moe'", "'deepseek'")


def test_tensors_of_the_wrong_shape_or_dtype_are_refused(converted):
    b, cfg = _open(converted[ARCH][1])
    T = b.tensors
    orig = dict(T)
    q, norm, router = "blk.1.attn_q.weight", "blk.1.ffn_norm.weight", "blk.1.ffn_gate_inp.weight"
    assert T[q].dtype == "F16" and T[norm].dtype == "F32" and T[router].dtype == "F32"

    def edit(name, **changes):
        T.clear()
        T.update(orig)
        T[name] = dataclasses.replace(orig[name], **changes)

    edit(q, shape=(64, 63))
    _refused(b, cfg, BundleStructureError, q, "[64, 63]", "[64, 64]")
    edit(norm, dtype="F16")
    _refused(b, cfg, BundleStructureError, norm, "F32")
    edit(router, dtype="BF16")
    _refused(b, cfg, BundleStructureError, router)
    edit(q, dtype="BF16")  # one matrix of another float type than the rest
    _refused(b, cfg, BundleStructureError, q, "BF16", "F16")
    edit(q, dtype="I8")
    _refused(b, cfg, BundleStructureError, q)
    edit(C.T_CALIB_RECALL, shape=(cfg.n_layers, 3))
    _refused(b, cfg, BundleStructureError, C.T_CALIB_RECALL)
    edit(C.T_CALIB_POPULARITY, dtype="F32")
    _refused(b, cfg, BundleStructureError, C.T_CALIB_POPULARITY)
    T.clear()
    T.update(orig)
    del T["blk.2.attn_v.weight"]
    _refused(b, cfg, BundleStructureError, "blk.2.attn_v.weight", "missing")
    T.clear()
    T.update(orig)
    T["blk.0.attn_q_norm.weight"] = orig[norm]  # a tensor this config (no qk norm) does not use
    _refused(b, cfg, BundleStructureError, "blk.0.attn_q_norm.weight", "does not use")
    T.clear()
    T.update(orig)
    check_bundle_config(b, cfg)


def test_expert_tables_that_do_not_fit_the_layout_are_refused(converted):
    b, cfg = _open(converted[ARCH][1])
    layer = cfg.moe_layer_ids[0]
    name = C.T_EXPERTS.format(i=layer, p="q2")
    meta, tensors = dict(b.metadata), dict(b.tensors)

    def refused(cls, *needles):
        with pytest.raises(cls) as info:
            ExpertStore(b, cfg)
        for n in needles:
            assert n in str(info.value), str(info.value)
        b.metadata.clear()
        b.metadata.update(meta)
        b.tensors.clear()
        b.tensors.update(tensors)

    b.metadata[C.K_PRECISION_BITS.format(p="q2")] = 3
    refused(BundleMetadataError, "q2")
    b.metadata[C.K_PRECISION_GROUP.format(p="q4")] = 60.0
    refused(BundleMetadataError, "q4", "not integers")
    b.metadata[C.K_PRECISION_BLOB_SIZE.format(p="q2")] += 64
    refused(BundleMetadataError, "q2 expert blobs")
    b.metadata[C.K_PRECISION_BLOB_STRIDE.format(p="q2")] += 64
    refused(BundleMetadataError, C.K_PRECISION_BLOB_STRIDE.format(p="q2"))
    b.metadata[C.K_PRECISIONS] = "q4"
    refused(BundleMetadataError, C.K_PRECISIONS)
    del b.tensors[name]
    refused(BundleStructureError, name, "missing")
    b.tensors[name] = dataclasses.replace(tensors[name], dtype="F16")
    refused(BundleStructureError, name, "I8")
    b.tensors[name] = dataclasses.replace(tensors[name], shape=(cfg.n_experts - 1, tensors[name].shape[1]))
    refused(BundleStructureError, name)
    del b.tensors[C.T_EXPERTS_CRC.format(i=layer, p="q2")]
    refused(BundleStructureError, "checksums")
    ExpertStore(b, cfg)


def test_a_contradicting_bundle_file_is_refused_by_fate_load(converted, tmp_path):
    """The same check end to end: the block count in the file's bytes edited (and the metadata checksum
    made to match, as a careless tool would), then opened with fate.load."""
    p = FZ.take_apart(converted[ARCH][1], [])
    items = FZ._metadata_items(p)
    key = f"{ARCH}.block_count"
    for kv in items:
        if kv[0] == key:
            kv[3] = 4
    meta = {k: v for k, _, _, v in items}
    for kv in items:
        if kv[0] == C.K_METADATA_CRC:
            kv[3] = metadata_crc32(meta)
    path = tmp_path / "edited.gguf"
    path.write_bytes(FZ.build_gguf(items, p.infos, p.alignment, p.data))
    assert Bundle(path).metadata[key] == 4  # a well-formed file
    with pytest.raises(BundleMetadataError, match=f"{key} = 4 contradicts"):
        fate.load(path)

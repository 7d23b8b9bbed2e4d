"""Every name and metadata key of a fate bundle, in one place.

Non-expert tensors and model hyper-parameters use llama.cpp's names and keys so that ``gguf-dump``
reads a bundle naturally; everything fate adds lives under ``fate.*``.  docs/FORMAT.md is the prose
version of this module: change both together.
"""

from __future__ import annotations

FORMAT_VERSION = 1
"""Bumped whenever a reader of the previous version would misread a new bundle."""

MAGIC_KEY = "fate.format_version"

# --- llama.cpp architecture names (general.architecture) per Hugging Face model_type ------------
LLAMA_CPP_ARCH = {
    "qwen2_moe": "qwen2moe",
    "qwen3_moe": "qwen3moe",
    "mixtral": "llama",  # llama.cpp runs Mixtral as a llama with experts
    "olmoe": "olmoe",
    "deepseek": "deepseek",
    "gpt_oss": "gpt-oss",
    "deepseek_v2": "deepseek2",
    "deepseek_v3": "deepseek2",  # llama.cpp runs DeepSeek-V3 as deepseek2
    "glm4_moe": "glm4moe",
    "ernie4_5_moe": "ernie4_5-moe",
}

# --- general / llama.cpp hyper-parameter keys ({arch} is general.architecture) -------------------
K_GENERAL_ARCH = "general.architecture"
K_GENERAL_NAME = "general.name"
K_GENERAL_ALIGNMENT = "general.alignment"
K_GENERAL_FILE_TYPE = "general.file_type"

K_CONTEXT_LENGTH = "{arch}.context_length"
K_EMBEDDING_LENGTH = "{arch}.embedding_length"
K_BLOCK_COUNT = "{arch}.block_count"
K_FEED_FORWARD_LENGTH = "{arch}.feed_forward_length"
K_HEAD_COUNT = "{arch}.attention.head_count"
K_HEAD_COUNT_KV = "{arch}.attention.head_count_kv"
K_KEY_LENGTH = "{arch}.attention.key_length"
K_VALUE_LENGTH = "{arch}.attention.value_length"
K_RMS_EPS = "{arch}.attention.layer_norm_rms_epsilon"
K_ROPE_FREQ_BASE = "{arch}.rope.freq_base"
K_ROPE_SCALING_TYPE = "{arch}.rope.scaling.type"
K_ROPE_SCALING_FACTOR = "{arch}.rope.scaling.factor"
K_ROPE_SCALING_ORIG_CTX = "{arch}.rope.scaling.original_context_length"
K_EXPERT_COUNT = "{arch}.expert_count"
K_EXPERT_USED_COUNT = "{arch}.expert_used_count"
K_EXPERT_FFN_LENGTH = "{arch}.expert_feed_forward_length"
K_EXPERT_SHARED_FFN_LENGTH = "{arch}.expert_shared_feed_forward_length"
K_EXPERT_SHARED_COUNT = "{arch}.expert_shared_count"
K_LEADING_DENSE_BLOCKS = "{arch}.leading_dense_block_count"
K_VOCAB_SIZE = "{arch}.vocab_size"

# --- tokenizer (llama.cpp's keys) ------------------------------------------------------------------
K_TOKENIZER_MODEL = "tokenizer.ggml.model"
K_TOKENIZER_HF_JSON = "tokenizer.huggingface.json"
K_CHAT_TEMPLATE = "tokenizer.chat_template"
K_BOS_ID = "tokenizer.ggml.bos_token_id"
K_EOS_ID = "tokenizer.ggml.eos_token_id"
K_PAD_ID = "tokenizer.ggml.padding_token_id"
K_ADD_BOS = "tokenizer.ggml.add_bos_token"

# --- fate's own keys -------------------------------------------------------------------------------
K_FATE_VERSION = "fate.fate_version"
K_MODEL_CONFIG = "fate.model_config"  # JSON of fate.model.config.ModelConfig (complete, authoritative)
K_HF_MODEL_TYPE = "fate.source.model_type"
K_SOURCE_NAME = "fate.source.name"
K_SOURCE_CONFIG_SHA256 = "fate.source.config_sha256"
K_SOURCE_REVISION = "fate.source.revision"  # the Hub commit of a snapshot folder, when the path shows one
K_CREATED = "fate.created"
K_HQQ_VERSION = "fate.quant.hqq_version"
K_QUANT_METHOD = "fate.quant.method"
K_PRECISIONS = "fate.experts.precisions"  # e.g. ["q4", "q2"]; order = order of the stored tensors
K_PRECISION_BITS = "fate.quant.{p}.bits"
K_PRECISION_GROUP = "fate.quant.{p}.group_size"  # gate and up (input dimension: hidden size)
K_PRECISION_GROUP_DOWN = "fate.quant.{p}.group_size_down"  # down (input: expert FFN size); absent: = group_size
K_PRECISION_AXIS = "fate.quant.{p}.axis"
K_PRECISION_BLOB_SIZE = "fate.quant.{p}.blob_bytes"  # unpadded bytes of one expert blob
K_PRECISION_BLOB_STRIDE = "fate.quant.{p}.blob_stride"  # padded bytes: distance between blobs
K_EXPERT_ALIGNMENT = "fate.experts.alignment"
K_CHECKSUM_ALGO = "fate.experts.checksum"  # "crc32"
K_EOS_IDS = "fate.tokenizer.eos_token_ids"  # all ids that end generation
K_BOS_TOKEN = "fate.tokenizer.bos_token"
K_EOS_TOKEN = "fate.tokenizer.eos_token"
K_GEN_DEFAULTS = "fate.generation"  # JSON: temperature, top_p, top_k, ...
K_CALIB_PRESENT = "fate.calib.present"
K_CALIB_SOURCE = "fate.calib.source"
K_CALIB_TOKENS = "fate.calib.tokens"
K_CALIB_SHA256 = "fate.calib.sha256"
K_CALIB_RECALL_EXTRA = "fate.calib.recall_extra"  # [0, 1, 2, 4]: the m of "top k+m" per recall column
K_NON_EXPERT_DTYPE = "fate.non_expert.dtype"  # fate-convert --dtype: f16, bf16, f32 or q8 (absent: before q8)
K_Q8_GROUP = "fate.non_expert.q8_group_size"  # q8: weights per float16 scale along a row (32)

RECALL_EXTRA = (0, 1, 2, 4)

# --- tensor names ----------------------------------------------------------------------------------
T_TOKEN_EMBD = "token_embd.weight"
T_OUTPUT_NORM = "output_norm.weight"
T_OUTPUT = "output.weight"

T_ATTN_NORM = "blk.{i}.attn_norm.weight"
T_ATTN_Q = "blk.{i}.attn_q.weight"
T_ATTN_K = "blk.{i}.attn_k.weight"
T_ATTN_V = "blk.{i}.attn_v.weight"
T_ATTN_Q_BIAS = "blk.{i}.attn_q.bias"
T_ATTN_K_BIAS = "blk.{i}.attn_k.bias"
T_ATTN_V_BIAS = "blk.{i}.attn_v.bias"
T_ATTN_OUT = "blk.{i}.attn_output.weight"
T_ATTN_OUT_BIAS = "blk.{i}.attn_output.bias"  # gpt-oss
T_ATTN_SINKS = "blk.{i}.attn_sinks.weight"  # gpt-oss: one learned sink logit per head
# multi-head latent attention (DeepSeek-V2/V3), llama.cpp's deepseek2 names
T_ATTN_Q_A = "blk.{i}.attn_q_a.weight"  # [q_lora_rank, hidden]
T_ATTN_Q_A_NORM = "blk.{i}.attn_q_a_norm.weight"
T_ATTN_Q_B = "blk.{i}.attn_q_b.weight"  # [heads * head_dim, q_lora_rank]
T_ATTN_KV_A_MQA = "blk.{i}.attn_kv_a_mqa.weight"  # [kv_lora_rank + rope_dim, hidden]
T_ATTN_KV_A_NORM = "blk.{i}.attn_kv_a_norm.weight"
T_ATTN_KV_B = "blk.{i}.attn_kv_b.weight"  # [heads * (nope + v_head_dim), kv_lora_rank]
T_ATTN_Q_NORM = "blk.{i}.attn_q_norm.weight"
T_ATTN_K_NORM = "blk.{i}.attn_k_norm.weight"
T_FFN_NORM = "blk.{i}.ffn_norm.weight"  # post-attention norm: its output is the gate input
T_FFN_GATE_INP = "blk.{i}.ffn_gate_inp.weight"  # router
T_FFN_GATE_INP_BIAS = "blk.{i}.ffn_gate_inp.bias"  # router bias (gpt-oss)
T_FFN_EXP_PROBS_B = "blk.{i}.exp_probs_b.bias"  # expert score correction bias, for choosing only
T_FFN_GATE = "blk.{i}.ffn_gate.weight"  # dense layer MLP
T_FFN_UP = "blk.{i}.ffn_up.weight"
T_FFN_DOWN = "blk.{i}.ffn_down.weight"
T_FFN_GATE_SHEXP = "blk.{i}.ffn_gate_shexp.weight"
T_FFN_UP_SHEXP = "blk.{i}.ffn_up_shexp.weight"
T_FFN_DOWN_SHEXP = "blk.{i}.ffn_down_shexp.weight"
T_FFN_GATE_INP_SHEXP = "blk.{i}.ffn_gate_inp_shexp.weight"  # shared expert's sigmoid gate

# Routed experts: one uint8 tensor per (layer, precision), shape [n_experts, blob_stride]; row e is
# expert e's blob (see fate.quant for the bytes inside), zero padded to the stride.
T_EXPERTS = "blk.{i}.fate_exps.{p}"
T_EXPERTS_CRC = "blk.{i}.fate_exps.{p}.crc32"  # int64 [n_experts]: crc32 of each blob's unpadded bytes

K_METADATA_CRC = "fate.checksums.metadata"  # uint32: crc32 of the metadata (fate.formats.bundle.metadata_crc32)

# Checksums of the non-expert tensors: names in the metadata array, crc32 values in a tensor, same order.
K_NON_EXPERT_CRC_NAMES = "fate.checksums.non_expert"
T_NON_EXPERT_CRC = "fate.crc32.non_expert"  # int64 [N]: zlib crc32 of each named tensor's bytes

# Calibration statistics (absent when converted with --no-calib).  L = block count, E = experts.
T_CALIB_POPULARITY = "fate.calib.popularity"  # int64 [L, E]: tokens routed to each expert (0 rows: dense)
T_CALIB_COSINE = "fate.calib.cosine"  # f32 [L]: mean cos(gate input i-1, gate input i); NaN at i=0
T_CALIB_RECALL = "fate.calib.recall"  # f32 [L, 4]: recall of predicting layer i from layer i-1, k+m
# f32 [2, L, E]: [a-1, i, r] = share of tokens for which the expert ranked r by layer i's router applied to
# the gate input a layers earlier (a = 1, 2; for i < a the token embedding's) was among layer i's top k
T_CALIB_RANK_HIT = "fate.calib.rank_hit"
# f32 [2, L, E + 1]: [0, i, s] = share of layer i's needed experts an LRU cache of s slots holds (stack
# distance < s); [1, i, s] = share held or named among the top k by the prediction from layer i-1
T_CALIB_REUSE = "fate.calib.reuse"
# f16 [2, L, E, H]: [a-1, i] = the linear map from the gate input a layers before layer i (for i < a the token
# embedding's) to layer i's router logits, fitted on the calibration text (least squares pulled towards the
# router, the pull chosen by two-fold cross-validation: fate.convert.calibrate.fit_map); NaN where
# undefined (dense layers, i = 0 at a = 2).  fate's prediction ranks by it; the statistics above are its own
T_CALIB_PREDICT = "fate.calib.predict"


# --dtype q8: each projection matrix (is_projection) is stored as I8 codes [out, in] under its own name, with
# one float16 scale per Q8_GROUP weights of a row in ``q8_scale_name(name)`` [out, in / Q8_GROUP];
# w = code * scale.
Q8_GROUP = 32


def q8_scale_name(name: str) -> str:
    """The scale tensor of a q8 projection: ``blk.N.attn_q.weight`` -> ``blk.N.attn_q.scale``."""
    return name[:-len(".weight")] + ".scale" if name.endswith(".weight") else name + ".scale"


def key(template: str, arch: str) -> str:
    return template.format(arch=arch)


# --- what kind of tensor a name is (the one place that decides) -------------------------------------
def is_expert_tensor(name: str) -> bool:
    """A routed experts tensor ``blk.N.fate_exps.P`` or its checksums ``blk.N.fate_exps.P.crc32``."""
    return name.startswith("blk.") and ".fate_exps." in name


def is_model_tensor(name: str) -> bool:
    """A non-expert tensor of the model (embedding, norms, attention, routers, dense and shared MLPs, LM
    head): not a routed expert tensor and not one of fate's own (``fate.*``: checksums, calibration)."""
    return not is_expert_tensor(name) and not name.startswith("fate.")


_PROJECTIONS = ("attn_q.weight", "attn_k.weight", "attn_v.weight", "attn_output.weight", "ffn_gate.weight",
                "ffn_up.weight", "ffn_down.weight", "ffn_gate_shexp.weight", "ffn_up_shexp.weight",
                "ffn_down_shexp.weight")


def is_projection(name: str) -> bool:
    """A matrix the model multiplies activations by (attention q/k/v/output, dense and shared-expert MLPs, the
    LM head): what the runtime computes with its native products, and what ``--dtype q8`` stores as 8 bits.
    Not the embedding (a lookup), routers or gates (float32, :func:`keeps_f32`)."""
    return name == T_OUTPUT or (name.startswith("blk.") and name.split(".", 2)[-1] in _PROJECTIONS)


def keeps_f32(name: str) -> bool:
    """Norm weights, routers (and their biases), expert score correction biases and attention sinks stay
    float32 whatever --dtype says: they are tiny, and routing decisions (which experts run, what gets
    prefetched) and the sink logits are sensitive to their rounding."""
    return (name.endswith("norm.weight") or ".ffn_gate_inp" in name or ".exp_probs_b." in name
            or name.endswith(".attn_sinks.weight"))

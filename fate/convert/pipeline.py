"""``fate.convert``: a Hugging Face MoE checkpoint → one bundle (GGUF or safetensors).

Phases, each with its own progress bar: check (every tensor's presence and shape, from the shard
headers only), non-expert tensors (read, cast, write), experts (read, quantize to each precision,
write with a crc32 each), calibration (run the model layer by layer over the calibration text).
The bundle is written to a temporary file beside OUT and renamed at the very end, so a failed or
interrupted conversion never leaves a file at OUT.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import time
import zlib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime, timezone
from importlib import metadata, resources
from pathlib import Path
from typing import Callable

import torch
from tokenizers import Tokenizer
from tqdm import tqdm

import fate
from fate import quant as Q
from fate.errors import CheckpointError, ConvertError
from fate.formats import constants as C
from fate.formats.bundle import metadata_crc32
from fate.formats.hf import HFCheckpoint
from fate.formats.writer import BundleWriter, TensorPlan
from fate.convert.calibrate import calibrate
from fate.quant.q8 import quantize_q8
from fate.model import arch as A
from fate.sysinfo import peak_rss_bytes
from fate.units import format_size

DTYPES = {"f16": ("F16", torch.float16), "bf16": ("BF16", torch.bfloat16), "f32": ("F32", torch.float32),
          "q8": ("F16", torch.float16)}
"""--dtype → (storage of the non-expert matrices, torch dtype).  q8 stores every projection matrix
(fate.formats.constants.is_projection) as 8-bit codes with a float16 scale per 32 (fate.quant.q8) and
everything else as F16."""
PRECISIONS = ("q4", "q2", "f16")
BUILTIN_CALIB = "builtin:calib.txt"


@dataclass
class ConvertResult:
    path: Path
    bytes_total: int
    bytes_by_precision: dict[str, int]
    bytes_non_expert: int
    seconds: float
    peak_rss_bytes: int
    calib_tokens: int
    phase_seconds: dict[str, float] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)  # what was adapted (group sizes), one line each

    def summary(self) -> str:
        gib = format_size
        parts = ", ".join(f"{p} {gib(n)}" for p, n in self.bytes_by_precision.items())
        return (f"wrote {self.path} ({gib(self.bytes_total)}: non-expert {gib(self.bytes_non_expert)}, experts {parts}) "
                f"in {self.seconds:.1f} s, peak RSS {gib(self.peak_rss_bytes)}"
                + (f", calibrated on {self.calib_tokens} tokens" if self.calib_tokens else ", no calibration"))




def convert(model_dir: str | os.PathLike, out: str | os.PathLike, *, experts: str | list[str] = "q4,q2",
            group_size_q4: int = 64, group_size_q2: int = 32, dtype: str = "f16", calib: str | None = None,
            calib_tokens: int = 4096, no_calib: bool = False, force: bool = False, threads: int | None = None,
            progress: bool = True, log: Callable[[str], None] | None = None) -> ConvertResult:
    """Convert ``model_dir`` into the bundle ``out`` (format from its extension); see fate-convert --help.
    ``log`` receives each adaptation the conversion makes (a smaller group size), one line each, as it is
    decided; they are also in the result's ``notes``."""
    t0 = time.perf_counter()
    out = Path(out)
    fmt = {".gguf": "gguf", ".safetensors": "safetensors"}.get(out.suffix.lower())
    if fmt is None:
        raise ConvertError(f"{out}: the output name must end in .gguf or .safetensors")
    if out.is_dir():
        raise ConvertError(f"{out} is a directory; give a file name ending in .gguf or .safetensors")
    if out.exists() and not force:
        raise ConvertError(f"{out} already exists; pass --force to overwrite it")
    if not out.parent.exists():
        raise ConvertError(f"{out.parent}: output directory does not exist")
    if not os.access(out.parent, os.W_OK):
        raise ConvertError(f"{out.parent}: output directory is not writable")
    if dtype not in DTYPES:
        raise ConvertError(f"--dtype {dtype!r}: choose one of {', '.join(DTYPES)}")
    precisions = [p.strip() for p in (experts.split(",") if isinstance(experts, str) else experts) if p.strip()]
    bad = [p for p in precisions if p not in PRECISIONS]
    if bad or not precisions or len(set(precisions)) != len(precisions):
        raise ConvertError(f"--experts {','.join(precisions)!r}: give a comma list of distinct {', '.join(PRECISIONS)}")
    if calib_tokens <= 0 and not no_calib:
        raise ConvertError("--calib-tokens must be positive (or use --no-calib)")

    ckpt = HFCheckpoint(model_dir)
    spec = A.spec_for(ckpt.config)
    cfg = A.model_config(ckpt.config)
    quant = ckpt.config.get("quantization_config")
    method = quant.get("quant_method") if isinstance(quant, dict) else quant
    if method is not None and not (method == "mxfp4" and spec.fused == "gpt_oss"):
        raise ConvertError(f"{ckpt.dir}: the checkpoint is quantized ({method!r}); fate converts float "
                           "checkpoints (f32/bf16/f16) and gpt-oss's MXFP4 experts: convert from a float copy")

    notes: list[str] = []
    specs, down_groups = {}, {}
    for p in precisions:
        requested = {"q4": group_size_q4, "q2": group_size_q2}.get(p)
        try:
            s = Q.QuantSpec.default(p, requested)
        except ValueError as e:
            raise ConvertError(f"--group-size-{p} {requested}: {e}") from None
        specs[p], down_groups[p] = _fit_group_sizes(p, s, cfg, notes, log)

    # --- everything is checked before anything is written -----------------------------------------
    non_expert = A.non_expert_tensors(spec, cfg)
    for name, (hf_name, shape) in non_expert.items():
        _check(ckpt, hf_name, shape)
    expert_source = _ExpertSource(ckpt, spec, cfg)
    tok_meta = _tokenizer_metadata(ckpt)
    calib_ids, calib_meta = ([], {}) if no_calib else _calibration_tokens(calib, tok_meta[C.K_TOKENIZER_HF_JSON], calib_tokens)

    layouts = {p: cfg.expert_layout(s, down_groups[p]) for p, s in specs.items()}
    largest_blob = max(l.size for l in layouts.values())
    alignment = 4096 if largest_blob >= 64 * 1024 else 64
    strides = {p: -(-l.size // alignment) * alignment for p, l in layouts.items()}
    st_dtype, torch_dtype = DTYPES[dtype]

    q8 = {n for n, (_, shape) in non_expert.items()
          if dtype == "q8" and C.is_projection(n) and len(shape) == 2 and shape[1] % C.Q8_GROUP == 0}
    plans = []
    for n, (_, shape) in non_expert.items():
        if n in q8:  # the codes under the matrix's own name, then its scales
            plans += [TensorPlan(n, "I8", shape), TensorPlan(C.q8_scale_name(n), "F16", (shape[0], shape[1] // C.Q8_GROUP))]
        else:
            plans.append(TensorPlan(n, "F32" if C.keeps_f32(n) else st_dtype, shape))
    stored_names = [pl.name for pl in plans]
    n_stored = len(plans)
    moe_layers = cfg.moe_layer_ids
    for i in moe_layers:
        for p in precisions:
            plans.append(TensorPlan(C.T_EXPERTS.format(i=i, p=p), "I8", (cfg.n_experts, strides[p])))
            plans.append(TensorPlan(C.T_EXPERTS_CRC.format(i=i, p=p), "I64", (cfg.n_experts,)))
    plans.append(TensorPlan(C.T_NON_EXPERT_CRC, "I64", (n_stored,)))
    if calib_ids:
        plans += [TensorPlan(C.T_CALIB_POPULARITY, "I64", (cfg.n_layers, cfg.n_experts)),
                  TensorPlan(C.T_CALIB_COSINE, "F32", (cfg.n_layers,)),
                  TensorPlan(C.T_CALIB_RECALL, "F32", (cfg.n_layers, len(C.RECALL_EXTRA))),
                  TensorPlan(C.T_CALIB_RANK_HIT, "F32", (2, cfg.n_layers, cfg.n_experts)),
                  TensorPlan(C.T_CALIB_REUSE, "F32", (2, cfg.n_layers, cfg.n_experts + 1)),
                  TensorPlan(C.T_CALIB_PREDICT, "F16", (2, cfg.n_layers, cfg.n_experts, cfg.hidden_size))]

    meta = _metadata(ckpt, cfg, specs, layouts, strides, alignment, tok_meta, calib_meta, model_dir, stored_names,
                     dtype)

    _remove_stale_parts(out)
    tmp = out.parent / f".{out.name}.part-{os.getpid()}"
    writer = None
    phase_seconds: dict[str, float] = {}
    if threads:
        torch.set_num_threads(max(1, threads))
    torch_threads = torch.get_num_threads()
    try:
        writer = BundleWriter(tmp, fmt, meta, plans, alignment)
        t = time.perf_counter()
        crcs = []
        for name, (hf_name, shape) in tqdm(non_expert.items(), desc="non-expert tensors", unit="tensor",
                                           disable=not progress, leave=True):
            w = ckpt.get(hf_name, shape)
            target = torch.float32 if C.keeps_f32(name) else torch_dtype
            # cast in row blocks: a second full copy of a 150k-token embedding would be the peak of RSS
            rows = max(1, (32 << 20) // max(1, w[0].numel() * 4)) if w.dim() > 1 else w.shape[0] or 1
            if name in q8:
                crcs += _write_q8(writer, name, w, rows)
                del w
                continue
            row_bytes = (w[0].numel() if w.dim() > 1 else 1) * torch.finfo(target).bits // 8
            crc = 0
            for r in range(0, max(w.shape[0], 1), rows):
                block = w[r:r + rows].to(target).contiguous()
                writer.write(name, block, byte_offset=r * row_bytes)
                crc = zlib.crc32(block.view(torch.uint8).numpy() if block.numel() else b"", crc)
            crcs.append(crc)
            del w
        writer.write(C.T_NON_EXPERT_CRC, torch.tensor(crcs, dtype=torch.int64))
        phase_seconds["non_expert"] = time.perf_counter() - t

        t = time.perf_counter()
        total = len(moe_layers) * cfg.n_experts
        # hqq's optimizer is a chain of small elementwise ops: one torch thread per worker and one
        # worker per core is ~4x faster than torch's own threading over them (measured on 2 cores)
        torch_threads = torch.get_num_threads()
        torch.set_num_threads(1)
        with tqdm(total=total, desc=f"experts ({'+'.join(precisions)})", unit="expert", disable=not progress) as bar:
            workers = max(1, threads or os.cpu_count() or 1)
            with ThreadPoolExecutor(max_workers=workers) as pool:
                for i in moe_layers:
                    def job(e, i=i):
                        w = expert_source(i, e)
                        bias = (w[3], w[4]) if len(w) == 5 else None
                        return e, {p: Q.pack_expert(w[0], w[1], w[2], layouts[p], bias) for p in precisions}
                    crcs = {p: [0] * cfg.n_experts for p in precisions}
                    for e, blobs in pool.map(job, range(cfg.n_experts)):
                        for p, blob in blobs.items():
                            writer.write(C.T_EXPERTS.format(i=i, p=p), blob, e * strides[p])
                            crcs[p][e] = zlib.crc32(memoryview(blob))
                        bar.update(1)
                    for p in precisions:
                        writer.write(C.T_EXPERTS_CRC.format(i=i, p=p), torch.tensor(crcs[p], dtype=torch.int64))
        torch.set_num_threads(torch_threads)
        phase_seconds["experts"] = time.perf_counter() - t

        if calib_ids:
            t = time.perf_counter()
            seq_len = min(512, cfg.max_position)
            with tqdm(total=cfg.n_layers, desc="calibration", unit="layer", disable=not progress) as bar:
                stats = calibrate(ckpt, spec, cfg, calib_ids, seq_len, expert_source, progress=bar)
            writer.write(C.T_CALIB_POPULARITY, stats.popularity)
            writer.write(C.T_CALIB_COSINE, stats.cosine)
            writer.write(C.T_CALIB_RECALL, stats.recall)
            writer.write(C.T_CALIB_RANK_HIT, stats.rank_hit.to(torch.float32))
            writer.write(C.T_CALIB_REUSE, stats.reuse.to(torch.float32))
            writer.write(C.T_CALIB_PREDICT, stats.predict.to(torch.float16))
            phase_seconds["calibration"] = time.perf_counter() - t
        t = time.perf_counter()
        writer.close()
        os.replace(tmp, out)
        phase_seconds["write"] = time.perf_counter() - t
    except BaseException as e:
        torch.set_num_threads(torch_threads)
        if writer is not None:
            writer.abort()
        tmp.unlink(missing_ok=True)
        if isinstance(e, OSError):
            raise ConvertError(f"writing {out} failed: {e.strerror or e} (nothing was written at {out})") from None
        raise

    by_prec = {p: strides[p] * cfg.n_experts * len(moe_layers) for p in precisions}
    return ConvertResult(out, out.stat().st_size, by_prec, sum(pl.nbytes for pl in plans[:n_stored]),
                         time.perf_counter() - t0, peak_rss_bytes(), len(calib_ids), phase_seconds, notes)


def _write_q8(writer, name: str, w: torch.Tensor, rows: int) -> list[int]:
    """A projection as q8 (codes under ``name``, scales under its scale name), in row blocks; the crc32 of
    each of the two tensors."""
    k = w.shape[1]
    crc_codes = crc_scale = 0
    for r in range(0, w.shape[0], rows):
        try:
            codes, scale = quantize_q8(w[r:r + rows])
        except ValueError as e:
            raise ConvertError(f"{name}: {e}; convert with --dtype f16") from None
        writer.write(name, codes, byte_offset=r * k)
        writer.write(C.q8_scale_name(name), scale, byte_offset=r * (k // C.Q8_GROUP) * 2)
        crc_codes = zlib.crc32(codes.view(torch.uint8).numpy(), crc_codes)
        crc_scale = zlib.crc32(scale.view(torch.uint8).numpy(), crc_scale)
    return [crc_codes, crc_scale]


def _hqq_version() -> str:
    try:
        return metadata.version("hqq")
    except metadata.PackageNotFoundError:
        return "unknown"


def _snapshot_revision(model_dir: Path) -> str | None:
    """A Hugging Face cache snapshot lives in ``.../snapshots/<40-hex commit>/``: that commit is the revision."""
    d = model_dir.resolve()
    if d.parent.name == "snapshots" and re.fullmatch(r"[0-9a-f]{40}", d.name):
        return d.name
    return None


def _source_name(model_dir: Path) -> str:
    """The checkpoint's name: "org/model" for a Hugging Face cache snapshot, else the folder's name."""
    d = model_dir.resolve()
    if _snapshot_revision(d) and d.parent.parent.name.startswith("models--"):
        return d.parent.parent.name[len("models--"):].replace("--", "/")
    return d.name


def _remove_stale_parts(out: Path) -> None:
    """Temporary files of earlier conversions to the same OUT whose process is gone (killed, crashed)."""
    for part in out.parent.glob(f".{out.name}.part-*"):
        try:
            pid = int(part.name.rsplit("-", 1)[1])
            os.kill(pid, 0)  # still running: leave it alone
        except ProcessLookupError:
            part.unlink(missing_ok=True)
        except (ValueError, PermissionError, OSError):
            continue


def _fit_group_sizes(p: str, s, cfg, notes: list[str], log) -> tuple:
    """(gate/up spec, down's group size) for precision ``p`` asked for as ``s``: a group size that does not
    divide a matrix's input dimension falls back to the largest power of two >= 8 that does and is no
    larger (fate.quant.layout.fallback_group_size), said in one line; refused when there is none."""
    if not s.is_quantized:
        return s, None
    got = {}
    for what, dim_name, dim in (("gate/up", "hidden size", cfg.hidden_size), ("down", "expert FFN size", cfg.expert_ffn)):
        g = Q.fallback_group_size(dim, s.group_size)
        if g is None:
            hint = Q.suggest_group_size(dim, s)
            fix = f"pass --group-size-{p} {hint}" if hint else f"drop {p} from --experts (f16 needs no groups)"
            raise ConvertError(f"{p}: no group size of 8 or more that divides the {dim_name} {dim} (the input of the "
                               f"{what} matrices) is at most {s.group_size}; {fix}")
        if g != s.group_size:
            line = (f"{p}: group size {s.group_size} does not divide the {dim_name} {dim}; the {what} matrices use "
                    f"group size {g}")
            notes.append(line)
            if log is not None:
                log(line)
        got[what] = g
    return Q.QuantSpec(p, s.bits, got["gate/up"]), got["down"]


def _check(ckpt: HFCheckpoint, hf_name: str, shape: tuple[int, ...]) -> None:
    if hf_name not in ckpt:
        raise CheckpointError(f"{ckpt.dir}: tensor {hf_name!r} is missing from the checkpoint")
    if ckpt.shape(hf_name) != tuple(shape):
        raise CheckpointError(
            f"{ckpt.dir}: tensor {hf_name!r} has shape {list(ckpt.shape(hf_name))}, config.json implies {list(shape)}")


class _ExpertSource:
    """Reads routed experts from the checkpoint in whichever form it stores them (fate.model.arch's
    ``expert_storage``: per-expert tensors, stacked ones, gpt-oss's interleaved or MXFP4 ones), one expert's
    bytes at a time; every tensor's presence and shape is checked up front."""

    def __init__(self, ckpt: HFCheckpoint, spec: A.ArchSpec, cfg):
        self.ckpt, self.spec, self.cfg = ckpt, spec, cfg
        self.kind: dict[int, str] = {}
        for i in cfg.moe_layer_ids:
            kind, names = A.expert_storage(spec, cfg, i, ckpt.__contains__)
            for name, shape in names.items():
                _check(ckpt, name, shape)
            self.kind[i] = kind

    def _read(self, name: str, e: int | None):
        return self.ckpt.get(name) if e is None else self.ckpt.get_row(name, e)

    def __call__(self, layer: int, e: int):
        """float32 (gate, up, down) of expert ``e``, plus (gate_up bias, down bias) for experts with biases."""
        return A.expert_weights(self.spec, self.cfg, layer, e, self.kind[layer], self._read)


def _token_text(tok) -> str | None:
    if isinstance(tok, dict):
        return tok.get("content")
    return tok if isinstance(tok, str) else None


def _tokenizer_metadata(ckpt: HFCheckpoint) -> dict:
    tj = ckpt.tokenizer_json()
    try:
        tokenizer = Tokenizer.from_str(tj)
    except Exception as e:
        raise ConvertError(f"{ckpt.dir}/tokenizer.json cannot be loaded by the tokenizers library ({e})") from None
    tc = ckpt.read_json("tokenizer_config.json") or {}
    gen = ckpt.read_json("generation_config.json") or {}
    meta: dict = {C.K_TOKENIZER_MODEL: "huggingface", C.K_TOKENIZER_HF_JSON: tj}

    template = tc.get("chat_template")
    jinja = ckpt.dir / "chat_template.jinja"
    if template is None and jinja.is_file():
        template = jinja.read_text(encoding="utf-8")
    if template is None and (ckpt.dir / "chat_template.json").is_file():
        template = (ckpt.read_json("chat_template.json") or {}).get("chat_template")
    if isinstance(template, list):  # named templates: keep the default one
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default") or next(iter(named.values()), None)
    if isinstance(template, str) and template:
        meta[C.K_CHAT_TEMPLATE] = template

    bos, eos = _token_text(tc.get("bos_token")), _token_text(tc.get("eos_token"))
    if bos:
        meta[C.K_BOS_TOKEN] = bos
        bid = tokenizer.token_to_id(bos)
        if bid is not None:
            meta[C.K_BOS_ID] = bid
    eos_ids: list[int] = []
    if eos:
        meta[C.K_EOS_TOKEN] = eos
        eid = tokenizer.token_to_id(eos)
        if eid is not None:
            eos_ids.append(eid)
    for src in (gen.get("eos_token_id"), ckpt.config.get("eos_token_id")):
        for v in (src if isinstance(src, list) else [src]):
            if isinstance(v, int) and v not in eos_ids:
                eos_ids.append(v)
    if eos_ids:
        meta[C.K_EOS_ID] = eos_ids[0]
        meta[C.K_EOS_IDS] = eos_ids
    pad = _token_text(tc.get("pad_token"))
    if pad and tokenizer.token_to_id(pad) is not None:
        meta[C.K_PAD_ID] = tokenizer.token_to_id(pad)
    if isinstance(tc.get("add_bos_token"), bool):
        meta[C.K_ADD_BOS] = tc["add_bos_token"]
    defaults = {k: gen[k] for k in ("temperature", "top_p", "min_p", "repetition_penalty")
                if isinstance(gen.get(k), (int, float)) and not isinstance(gen.get(k), bool)}
    if isinstance(gen.get("top_k"), int) and not isinstance(gen.get("top_k"), bool):
        defaults["top_k"] = gen["top_k"]
    if isinstance(gen.get("do_sample"), bool):
        defaults["do_sample"] = gen["do_sample"]
    meta[C.K_GEN_DEFAULTS] = json.dumps(defaults)
    return meta


def _calibration_tokens(calib: str | None, tokenizer_json: str, n_tokens: int) -> tuple[list[int], dict]:
    if calib is None:
        raw = resources.files("fate").joinpath("data/calib.txt").read_bytes()
        source = BUILTIN_CALIB
    else:
        path = Path(calib)
        if not path.is_file():
            raise ConvertError(f"--calib {calib}: no such file")
        raw = path.read_bytes()
        source = path.name
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise ConvertError(f"--calib {calib}: not UTF-8 text") from None
    if not text.strip():
        raise ConvertError(f"--calib {calib or source}: the calibration file is empty; give a file with text")
    ids = Tokenizer.from_str(tokenizer_json).encode(text, add_special_tokens=False).ids[:n_tokens]
    if not ids:
        raise ConvertError(f"--calib {calib or source}: the text encodes to no tokens")
    return ids, {C.K_CALIB_SOURCE: source, C.K_CALIB_TOKENS: len(ids),
                 C.K_CALIB_SHA256: hashlib.sha256(raw).hexdigest()}


def _metadata(ckpt, cfg, specs, layouts, strides, alignment, tok_meta, calib_meta, model_dir,
              non_expert_names, dtype: str) -> dict:
    arch = C.LLAMA_CPP_ARCH[cfg.model_type]
    k = lambda t: C.key(t, arch)  # noqa: E731
    m: dict = {
        C.K_GENERAL_ARCH: arch,
        C.K_GENERAL_NAME: _source_name(Path(model_dir)),
        C.MAGIC_KEY: C.FORMAT_VERSION,
        C.K_FATE_VERSION: fate.__version__,
        C.K_MODEL_CONFIG: cfg.to_json(),
        C.K_HF_MODEL_TYPE: cfg.model_type,
        C.K_SOURCE_NAME: _source_name(Path(model_dir)),
        C.K_SOURCE_CONFIG_SHA256: ckpt.config_sha256,
        C.K_CREATED: datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        k(C.K_CONTEXT_LENGTH): cfg.max_position,
        k(C.K_EMBEDDING_LENGTH): cfg.hidden_size,
        k(C.K_BLOCK_COUNT): cfg.n_layers,
        k(C.K_HEAD_COUNT): cfg.n_heads,
        k(C.K_HEAD_COUNT_KV): cfg.n_kv_heads,
        k(C.K_KEY_LENGTH): cfg.head_dim,
        k(C.K_VALUE_LENGTH): cfg.value_dim,
        k(C.K_RMS_EPS): cfg.rms_eps,
        k(C.K_ROPE_FREQ_BASE): cfg.rope_theta,
        k(C.K_EXPERT_COUNT): cfg.n_experts,
        k(C.K_EXPERT_USED_COUNT): cfg.top_k,
        k(C.K_EXPERT_FFN_LENGTH): cfg.expert_ffn,
        k(C.K_VOCAB_SIZE): cfg.vocab_size,
        k(C.K_LEADING_DENSE_BLOCKS): next((i for i, m_ in enumerate(cfg.moe_layers) if m_), cfg.n_layers),
        C.K_QUANT_METHOD: "hqq",
        C.K_HQQ_VERSION: _hqq_version(),
        C.K_PRECISIONS: list(specs),
        C.K_EXPERT_ALIGNMENT: alignment,
        C.K_CHECKSUM_ALGO: "crc32",
        C.K_CALIB_PRESENT: bool(calib_meta),
        C.K_CALIB_RECALL_EXTRA: list(C.RECALL_EXTRA),
        C.K_NON_EXPERT_CRC_NAMES: list(non_expert_names),
        C.K_NON_EXPERT_DTYPE: dtype,
    }
    if dtype == "q8":
        m[C.K_Q8_GROUP] = C.Q8_GROUP
    revision = _snapshot_revision(Path(model_dir))
    if revision:
        m[C.K_SOURCE_REVISION] = revision
    if cfg.dense_ffn:
        m[k(C.K_FEED_FORWARD_LENGTH)] = cfg.dense_ffn
    if cfg.shared_ffn:
        m[k(C.K_EXPERT_SHARED_FFN_LENGTH)] = cfg.shared_ffn
    if cfg.rope_scaling:
        m[k(C.K_ROPE_SCALING_TYPE)] = cfg.rope_scaling["type"]
        m[k(C.K_ROPE_SCALING_FACTOR)] = float(cfg.rope_scaling["factor"])
    for p, s in specs.items():
        m[C.K_PRECISION_BITS.format(p=p)] = s.bits
        m[C.K_PRECISION_GROUP.format(p=p)] = s.group_size
        m[C.K_PRECISION_GROUP_DOWN.format(p=p)] = layouts[p].down_group_size
        m[C.K_PRECISION_AXIS.format(p=p)] = 1
        m[C.K_PRECISION_BLOB_SIZE.format(p=p)] = layouts[p].size
        m[C.K_PRECISION_BLOB_STRIDE.format(p=p)] = strides[p]
    m.update(tok_meta)
    m.update(calib_meta)
    m[C.K_METADATA_CRC] = metadata_crc32(m)
    return m

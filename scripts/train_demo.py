"""Train the tiny Mixture-of-Experts demo model that ships inside fate.

Usage::

    python -m scripts.train_demo OUT_DIR [--steps N] [--seed S]

The script is fully offline and reproducible:

* The training text is gathered on the fly from the documentation of the
  Python standard library of the interpreter running it (the reference
  manual topics in ``pydoc_data.topics``, docstrings of a fixed, sorted list
  of modules, and the source code of a few small pure-Python modules).  All
  of it is PSF-licensed; see ``fate/data/DEMO_TEXT_SOURCES.md``.  With the
  same Python version the gathered text is byte-for-byte identical between
  runs (its SHA-256 is printed and recorded).
* A byte-level BPE tokenizer (``tokenizers``) with the special tokens
  ``<|endoftext|>``, ``<|im_start|>`` and ``<|im_end|>`` is trained on it.
* A small ``Qwen2MoeForCausalLM`` (8 routed experts, top-2, plus a gated
  shared expert per layer) is trained with AdamW on fixed-length chunks of
  the token stream, including the router load-balancing loss.
* OUT_DIR receives a Hugging Face checkpoint (``config.json``,
  ``model.safetensors``, ``generation_config.json``, ``tokenizer.json``,
  ``tokenizer_config.json`` with a ChatML chat template) plus
  ``fate_train_demo.json`` describing the run.

``--write-calib PATH`` writes the default calibration text used by
``fate-convert`` (``fate/data/calib.txt``) from the same sources.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import importlib
import inspect
import json
import math
import os
import random
import re
import subprocess
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

# ---------------------------------------------------------------------------
# Training text: Python standard library documentation (PSF license)
# ---------------------------------------------------------------------------

#: Modules whose docstrings (module, public classes, their public methods and
#: properties, public functions) are gathered.  Kept sorted; modules that fail
#: to import on a given installation are skipped (and reported).
DOC_MODULES: tuple[str, ...] = tuple(sorted("""
abc argparse array ast asyncio base64 bdb binascii bisect builtins bz2 calendar cmath cmd code codecs codeop
collections collections.abc colorsys compileall concurrent.futures configparser contextlib contextvars copy
copyreg csv dataclasses datetime decimal difflib dis doctest email email.message email.utils enum errno filecmp
fileinput fnmatch fractions ftplib functools gc getopt getpass gettext glob graphlib gzip hashlib heapq hmac html
html.parser http http.client http.cookies http.server imaplib importlib importlib.metadata importlib.resources
inspect io ipaddress itertools json keyword linecache locale logging logging.handlers lzma mailbox marshal math
mimetypes modulefinder multiprocessing netrc numbers operator optparse os os.path pathlib pdb pickle pickletools
pkgutil platform plistlib poplib pprint profile pstats py_compile pyclbr queue quopri random re reprlib
rlcompleter runpy sched secrets selectors shelve shlex shutil signal smtplib socket socketserver sqlite3 stat
statistics string struct subprocess symtable sys sysconfig tabnanny tarfile tempfile textwrap threading time
timeit token tokenize tomllib trace traceback tracemalloc types typing unicodedata unittest unittest.mock
urllib.parse urllib.request uuid warnings wave weakref wsgiref.simple_server xml.dom.minidom
xml.etree.ElementTree xmlrpc.client zipapp zipfile zipimport zlib zoneinfo
asyncio.base_events asyncio.events asyncio.futures asyncio.locks asyncio.queues asyncio.runners asyncio.streams
asyncio.subprocess asyncio.taskgroups asyncio.tasks asyncio.timeouts concurrent.futures._base
concurrent.futures.process concurrent.futures.thread ctypes curses curses.ascii curses.textpad dbm dbm.dumb
email.charset email.contentmanager email.feedparser email.generator email.header email.headerregistry
email.iterators email.mime.base email.mime.multipart email.mime.text email.parser email.policy encodings
encodings.idna fcntl grp http.cookiejar importlib.abc importlib.machinery importlib.util json.decoder
json.encoder logging.config mmap multiprocessing.connection multiprocessing.context multiprocessing.managers
multiprocessing.pool multiprocessing.process multiprocessing.queues multiprocessing.shared_memory
multiprocessing.synchronize pty pwd pydoc readline resource select ssl termios tty unittest.case
unittest.loader unittest.main unittest.result unittest.runner unittest.suite urllib.error urllib.response
urllib.robotparser wsgiref.handlers wsgiref.headers wsgiref.util wsgiref.validate xml.dom xml.dom.pulldom
xml.sax xml.sax.handler xml.sax.saxutils xml.sax.xmlreader xmlrpc.server
""".split()))

#: Small pure-Python modules whose complete source code is included, so the
#: model also sees real Python code (these files are PSF-licensed too).
SOURCE_MODULES: tuple[str, ...] = tuple(sorted("""
abc base64 bisect calendar colorsys contextlib copy fnmatch fractions functools glob graphlib heapq json
json.decoder json.encoder keyword netrc numbers operator pprint queue reprlib sched shlex statistics string
textwrap
""".split()))

ENDOFTEXT = "<|endoftext|>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
SPECIAL_TOKENS: tuple[str, ...] = (ENDOFTEXT, IM_START, IM_END)

#: Qwen-style ChatML template (no implicit default system prompt).
CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}"
    "{{- '<|im_start|>assistant\\n' }}"
    "{%- endif %}"
)

#: Questions used to turn docstrings into short ChatML conversations so that
#: the demo model also answers (and stops with ``<|im_end|>``) when prompted
#: through the chat template.
_CHAT_QUESTIONS: tuple[str, ...] = (
    "What does {name} do?",
    "Explain {name}.",
    "How do I use {name}?",
    "Describe {name} in Python.",
    "What is {name} for?",
    "Tell me about {name}.",
)
_TOPIC_QUESTIONS: tuple[str, ...] = (
    "Explain {title}.",
    "Tell me about {title}.",
    "What should I know about {title}?",
)

_ADDRESS_RE = re.compile(r" at 0x[0-9a-fA-F]+")


def render_chat(messages: Sequence[dict], add_generation_prompt: bool = False) -> str:
    """Render *messages* exactly like :data:`CHAT_TEMPLATE` does."""
    out = [f"{IM_START}{m['role']}\n{m['content']}{IM_END}\n" for m in messages]
    if add_generation_prompt:
        out.append(f"{IM_START}assistant\n")
    return "".join(out)


@dataclass
class TextEntry:
    """One gathered document."""

    kind: str  # "topic", "doc" or "source"
    name: str
    text: str


def _import_quietly(name: str):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return importlib.import_module(name)


class _Default:
    """Stand-in for a parameter default whose repr is not a plain literal."""

    def __init__(self, value) -> None:
        if inspect.isclass(value) or inspect.isroutine(value):
            self.text = getattr(value, "__qualname__", None) or getattr(value, "__name__", "...")
        else:
            self.text = "..."

    def __repr__(self) -> str:
        return self.text


def _is_literal(value) -> bool:
    if isinstance(value, (bool, int, float, complex, str, bytes, type(None))):
        return True
    return type(value) is tuple and all(_is_literal(v) for v in value)


def _signature(obj) -> str:
    try:
        sig = inspect.signature(obj)
    except Exception:  # noqa: BLE001 - C text signatures can fail in many ways
        return ""
    # Defaults may be live objects (lists of handlers, sentinels...) whose
    # repr varies between runs; keep only plain literals.
    params = [
        p.replace(default=_Default(p.default)) if p.default is not p.empty and not _is_literal(p.default) else p
        for p in sig.parameters.values()
    ]
    try:
        text = str(sig.replace(parameters=params))
    except (TypeError, ValueError):
        return ""
    return _ADDRESS_RE.sub("", text)


def _from_stdlib(obj) -> bool:
    """False for functions that third-party packages attached to stdlib classes."""
    mod = getattr(obj, "__module__", None)
    if isinstance(obj, property):
        mod = getattr(obj.fget, "__module__", None)
    return mod is None or mod.split(".")[0] in sys.stdlib_module_names


def _clean(text: str) -> str:
    lines = [line.rstrip() for line in text.replace("\r\n", "\n").split("\n")]
    return "\n".join(lines).strip("\n")


def reference_topics() -> list[TextEntry]:
    """Sections of the Python Language Reference shipped in ``pydoc_data``."""
    from pydoc_data import topics

    return [TextEntry("topic", key, _clean(topics.topics[key])) for key in sorted(topics.topics)]


def docstring_entries(modules: Iterable[str] = DOC_MODULES) -> tuple[list[TextEntry], list[str]]:
    """Docstrings of *modules* in a deterministic order (duplicates dropped).

    Returns the entries and the names of modules that could not be imported.
    """
    seen: set[str] = set()
    entries: list[TextEntry] = []
    failed: list[str] = []

    def add(name: str, header: str, obj) -> None:
        doc = inspect.getdoc(obj)
        if not doc:
            return
        doc = _clean(doc)
        if len(doc) < 20 or doc in seen:
            return
        seen.add(doc)
        entries.append(TextEntry("doc", name, f"{header}\n\n{doc}"))

    for modname in modules:
        try:
            module = _import_quietly(modname)
        except Exception:  # noqa: BLE001 - platform-specific modules may be missing
            failed.append(modname)
            continue
        add(modname, f"Module {modname}", module)
        owners = {modname, module.__name__, "_" + modname.rpartition(".")[2]}
        namespace = vars(module)
        for attr in sorted(namespace):
            if attr.startswith("_"):
                continue
            obj = namespace[attr]
            if not (inspect.isclass(obj) or inspect.isroutine(obj)):
                continue
            # Only objects defined by this module or its C accelerator
            # (``heapq`` -> ``_heapq``, ``os.path`` -> ``posixpath``);
            # re-exports are documented where they are defined.
            if modname != "builtins" and getattr(obj, "__module__", None) not in owners:
                continue
            qual = f"{modname}.{attr}"
            if inspect.isclass(obj):
                add(qual, f"class {qual}{_signature(obj)}", obj)
                members = vars(obj)
                for mname in sorted(members):
                    if mname.startswith("_") and mname != "__init__":
                        continue
                    member = members[mname]
                    if isinstance(member, (staticmethod, classmethod)):
                        member = member.__func__
                    if not _from_stdlib(member):
                        continue
                    if isinstance(member, property):
                        add(f"{qual}.{mname}", f"{qual}.{mname} (property)", member)
                    elif inspect.isroutine(member):
                        add(f"{qual}.{mname}", f"{qual}.{mname}{_signature(member)}", member)
            else:
                add(qual, f"{qual}{_signature(obj)}", obj)
    return entries, failed


def source_entries(modules: Iterable[str] = SOURCE_MODULES) -> list[TextEntry]:
    """Complete source code of a few small pure-Python modules."""
    out = []
    for modname in modules:
        try:
            src = inspect.getsource(_import_quietly(modname))
        except Exception:  # noqa: BLE001
            continue
        out.append(TextEntry("source", modname, f"# Source of the Python module {modname}\n\n{_clean(src)}"))
    return out


def _first_paragraphs(text: str, limit: int) -> str:
    paras = [p.strip("\n") for p in text.split("\n\n") if p.strip()]
    out: list[str] = []
    size = 0
    for p in paras:
        if out and size + len(p) > limit:
            break
        out.append(p)
        size += len(p) + 2
    return "\n\n".join(out)


def chat_entries(docs: Sequence[TextEntry], topics: Sequence[TextEntry], every: int = 3) -> list[str]:
    """Deterministic ChatML conversations built from docstrings and topics."""
    chats: list[str] = []
    for i, entry in enumerate(docs):
        if i % every:
            continue
        _header, _, body = entry.text.partition("\n\n")
        answer = _first_paragraphs(body, 600)
        if len(answer) < 40:
            continue
        short = entry.name
        q = _CHAT_QUESTIONS[(i // every) % len(_CHAT_QUESTIONS)].format(name=f"`{short}`")
        chats.append(render_chat([{"role": "user", "content": q}, {"role": "assistant", "content": answer}]))
    for i, entry in enumerate(topics):
        title, _, body = entry.text.partition("\n")
        title = title.strip()
        body = body.lstrip("*\n")
        answer = _first_paragraphs(body, 700)
        if len(answer) < 40 or not title:
            continue
        if title.startswith("The "):
            title = "the " + title[4:]
        q = _TOPIC_QUESTIONS[i % len(_TOPIC_QUESTIONS)].format(title=title)
        chats.append(render_chat([{"role": "user", "content": q}, {"role": "assistant", "content": answer}]))
    return chats


def _collect_entries_here() -> dict:
    docs, failed = docstring_entries()
    return {
        "python": sys.version.split()[0],
        "topics": [dataclasses.astuple(e) for e in reference_topics()],
        "docs": [dataclasses.astuple(e) for e in docs],
        "sources": [dataclasses.astuple(e) for e in source_entries()],
        "failed": failed,
    }


def collect_entries() -> dict:
    """Gather all text entries in a fresh, isolated interpreter.

    Importing third-party packages (torch, transformers, pytest...) patches
    some stdlib objects and changes what introspection sees, so the text is
    gathered by ``python -I -S`` running this very file, which imports nothing
    outside the standard library.  That keeps the corpus identical for a given
    Python installation no matter what the calling process has imported.
    """
    proc = subprocess.run(
        [sys.executable, "-I", "-S", str(Path(__file__).resolve()), _DUMP_FLAG],
        capture_output=True,
    )
    if proc.returncode != 0:
        err = proc.stderr.decode("utf-8", "replace")[-2000:]
        raise RuntimeError(f"gathering the standard-library text failed (exit {proc.returncode}):\n{err}")
    raw = json.loads(proc.stdout.decode("ascii"))
    return {
        "python": raw["python"],
        "topics": [TextEntry(*e) for e in raw["topics"]],
        "docs": [TextEntry(*e) for e in raw["docs"]],
        "sources": [TextEntry(*e) for e in raw["sources"]],
        "failed": raw["failed"],
    }


_DUMP_FLAG = "--dump-text-entries"


@dataclass
class Corpus:
    train: list[str]
    valid: list[str]
    failed_modules: list[str]
    sha256: str
    n_chars: int
    counts: dict[str, int]


def gather_corpus(max_chars: int | None = None, valid_every: int = 50) -> Corpus:
    """Gather the training text.  Deterministic for a given Python install.

    Every ``valid_every``-th document is held out for validation.  With
    *max_chars* the document list (in its canonical order, interleaving the
    sources) is truncated, which is only meant for quick tests.
    """
    entries = collect_entries()
    topics, docs, sources, failed = entries["topics"], entries["docs"], entries["sources"], entries["failed"]
    chats = chat_entries(docs, topics)
    # Canonical order: merge the four kinds proportionally (document i of a
    # kind of length n sits at position (i + 0.5) / n), so any prefix keeps a
    # mix of prose, code and chat.
    streams = [[e.text for e in topics], [e.text for e in docs], [e.text for e in sources], chats]
    keyed = [((i + 0.5) / len(s), k, i) for k, s in enumerate(streams) for i in range(len(s))]
    ordered = [streams[k][i] for _, k, i in sorted(keyed)]
    if max_chars is not None:
        kept, size = [], 0
        for t in ordered:
            if size >= max_chars:
                break
            kept.append(t)
            size += len(t)
        ordered = kept
    train = [t for i, t in enumerate(ordered) if i % valid_every != valid_every - 1]
    valid = [t for i, t in enumerate(ordered) if i % valid_every == valid_every - 1]
    h = hashlib.sha256()
    for t in ordered:
        h.update(t.encode("utf-8"))
        h.update(b"\x00")
    counts = {"topics": len(topics), "docstrings": len(docs), "sources": len(sources), "chats": len(chats)}
    return Corpus(train, valid, failed, h.hexdigest(), sum(len(t) for t in ordered), counts)


def _chunks(text: str, size: int) -> list[str]:
    """Split *text* at blank lines into pieces of about *size* characters."""
    out: list[str] = []
    cur: list[str] = []
    n = 0
    for para in text.split("\n\n"):
        if cur and n + len(para) > size:
            out.append("\n\n".join(cur))
            cur, n = [], 0
        cur.append(para)
        n += len(para) + 2
    if cur:
        out.append("\n\n".join(cur))
    return out


#: What goes into the default calibration text (see build_calibration_text).
CALIB_TOPICS: tuple[str, ...] = (
    "assert", "for", "with", "exceptions", "numbers", "integers", "floating", "formatstrings", "typesseq",
    "string-methods", "specialnames", "lambda", "import", "dict", "slicings", "try", "class", "operator-summary",
)
CALIB_DOCS: tuple[str, ...] = (
    "statistics.mean", "statistics.median", "statistics.stdev", "statistics.correlation", "fractions.Fraction",
    "math.comb", "math.isclose", "decimal.Decimal.quantize", "datetime.timedelta", "calendar.monthrange",
    "itertools.accumulate", "itertools.groupby", "bisect.bisect_left", "heapq.merge", "textwrap.dedent",
    "json.dumps", "re.sub", "collections.Counter", "collections.Counter.most_common", "functools.lru_cache",
    "pathlib.PurePath.relative_to", "os.path.join", "shlex.split", "struct.pack", "builtins.round", "builtins.int",
    "builtins.sorted", "builtins.zip", "builtins.range", "string.Template", "difflib.SequenceMatcher",
    "ipaddress.ip_network", "base64.b64encode", "subprocess.run", "argparse.ArgumentParser",
    "logging.basicConfig", "urllib.parse.urlsplit", "zipfile.ZipFile", "csv.writer", "unicodedata.UCD.normalize",
)
CALIB_SOURCES: tuple[str, ...] = ("bisect", "colorsys", "fnmatch", "heapq", "textwrap", "statistics")
CALIB_CHATS: tuple[tuple[str, str], ...] = (
    ("What does `json.dumps` do?", "json.dumps"),
    ("Explain `heapq.merge`.", "heapq.merge"),
    ("How do I use `shlex.split`?", "shlex.split"),
)


def build_calibration_text(target_chars: int = 48_000) -> str:
    """Varied calibration text: prose, grammar, lists, docstrings with numbers, code and chat.

    Drawn deterministically from the same PSF-licensed sources as the
    training text and interleaved, so any prefix of it is varied too.  It is
    written to ``fate/data/calib.txt`` by ``--write-calib``.
    """
    entries = collect_entries()
    topics = {e.name: e.text for e in entries["topics"]}
    by_name = {e.name: e.text for e in entries["docs"]}
    sources = {e.name: e.text for e in entries["sources"]}

    prose = [_first_paragraphs(topics[k], 2400) for k in CALIB_TOPICS if k in topics]
    docs = [_first_paragraphs(by_name[n], 1400) for n in CALIB_DOCS if n in by_name]
    code: list[str] = []
    for name in CALIB_SOURCES:
        if name in sources:
            code.extend(_chunks(sources[name], 1400)[:3])
    chats = []
    for q, name in CALIB_CHATS:
        if name in by_name:
            answer = _first_paragraphs(by_name[name].partition("\n\n")[2], 500)
            chats.append(render_chat([{"role": "user", "content": q}, {"role": "assistant", "content": answer}]))

    pattern = ("prose", "doc", "code", "doc", "prose", "doc", "code", "doc", "chat")
    pools = {"prose": prose, "doc": docs, "code": code, "chat": chats}
    pos = dict.fromkeys(pools, 0)
    parts: list[str] = []
    size = 0
    while size < target_chars and any(pos[k] < len(pools[k]) for k in pools):
        for kind in pattern:
            if pos[kind] < len(pools[kind]) and size < target_chars:
                part = pools[kind][pos[kind]]
                pos[kind] += 1
                parts.append(part)
                size += len(part) + 2
    return "\n\n".join(parts).rstrip() + "\n"


# ---------------------------------------------------------------------------
# Tokenizer
# ---------------------------------------------------------------------------


def train_tokenizer(texts: Sequence[str], vocab_size: int):
    """Byte-level BPE with the ChatML special tokens at ids 0, 1, 2."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer, length=len(texts))
    return tok


def save_tokenizer_files(tok, out_dir: Path, model_max_length: int) -> None:
    tok.save(str(out_dir / "tokenizer.json"))
    cfg = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "add_bos_token": False,
        "add_prefix_space": False,
        "bos_token": None,
        "eos_token": IM_END,
        "pad_token": ENDOFTEXT,
        "unk_token": None,
        "additional_special_tokens": [IM_START, IM_END],
        "clean_up_tokenization_spaces": False,
        "model_max_length": model_max_length,
        "split_special_tokens": False,
        "errors": "replace",
        "chat_template": CHAT_TEMPLATE,
    }
    (out_dir / "tokenizer_config.json").write_text(json.dumps(cfg, indent=2) + "\n", encoding="utf-8")
    special_map = {"eos_token": IM_END, "pad_token": ENDOFTEXT, "additional_special_tokens": [IM_START, IM_END]}
    (out_dir / "special_tokens_map.json").write_text(json.dumps(special_map, indent=2) + "\n", encoding="utf-8")


# ---------------------------------------------------------------------------
# Model and training
# ---------------------------------------------------------------------------


@dataclass
class DemoSettings:
    vocab_size: int = 2048
    hidden_size: int = 128
    num_layers: int = 4
    num_heads: int = 4
    num_kv_heads: int = 2
    num_experts: int = 8
    top_k: int = 2
    moe_intermediate_size: int = 256
    shared_expert_intermediate_size: int = 256
    max_position_embeddings: int = 1024
    rope_theta: float = 10000.0
    router_aux_loss_coef: float = 0.01  # weight of router_balance_loss (per-layer Switch loss)
    seq_len: int = 256
    batch_size: int = 12
    steps: int = 1100
    lr: float = 3e-3
    min_lr_ratio: float = 0.1
    warmup_steps: int = 40
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    seed: int = 0
    dtype: str = "float32"  # "bfloat16" autocasts the forward pass; weights stay float32
    threads: int = 2
    max_corpus_chars: int | None = None
    eval_chunks: int = 64
    sample_prompt: str = "The module"
    sample_tokens: int = 48


PRESETS: dict[str, dict] = {
    "demo": {},
    # Deeper, with twice the experts: a trained model whose bytes are mostly experts, for the
    # offloading benchmark (docs/BENCHMARKS.md); ~21 minutes with --threads 1.
    "offload": dict(num_layers=8, num_experts=16, steps=1100),
    # A few-second configuration for tests.
    "tiny": dict(
        vocab_size=320, hidden_size=64, num_layers=2, num_heads=2, num_kv_heads=1, num_experts=4,
        moe_intermediate_size=64, shared_expert_intermediate_size=64, max_position_embeddings=256,
        seq_len=64, batch_size=4, steps=30, lr=1e-2, warmup_steps=3, max_corpus_chars=60_000,
        eval_chunks=8, sample_tokens=8,
    ),
}


def check_settings(s: DemoSettings) -> None:
    if s.hidden_size % 64 or s.moe_intermediate_size % 64:
        raise ValueError("hidden_size and moe_intermediate_size must be multiples of 64 (quantization groups)")
    if s.hidden_size % s.num_heads or (s.hidden_size // s.num_heads) % 2:
        raise ValueError("hidden_size must split into an even head dimension")
    if s.num_heads % s.num_kv_heads:
        raise ValueError("num_heads must be a multiple of num_kv_heads")
    if s.top_k > s.num_experts:
        raise ValueError("top_k cannot exceed num_experts")
    if s.dtype not in ("float32", "bfloat16"):
        raise ValueError("dtype must be float32 or bfloat16")


def make_config(s: DemoSettings, special_ids: dict[str, int]):
    from transformers import Qwen2MoeConfig

    return Qwen2MoeConfig(
        vocab_size=s.vocab_size,
        hidden_size=s.hidden_size,
        intermediate_size=s.shared_expert_intermediate_size,  # only used by dense (mlp_only) layers: none
        num_hidden_layers=s.num_layers,
        num_attention_heads=s.num_heads,
        num_key_value_heads=s.num_kv_heads,
        hidden_act="silu",
        max_position_embeddings=s.max_position_embeddings,
        initializer_range=0.02,
        rms_norm_eps=1e-6,
        use_cache=True,
        tie_word_embeddings=False,
        rope_parameters={"rope_type": "default", "rope_theta": float(s.rope_theta)},
        use_sliding_window=False,
        attention_dropout=0.0,
        decoder_sparse_step=1,
        moe_intermediate_size=s.moe_intermediate_size,
        shared_expert_intermediate_size=s.shared_expert_intermediate_size,
        num_experts_per_tok=s.top_k,
        num_experts=s.num_experts,
        norm_topk_prob=False,
        output_router_logits=False,
        router_aux_loss_coef=s.router_aux_loss_coef,
        mlp_only_layers=[],
        qkv_bias=True,
        bos_token_id=None,
        eos_token_id=special_ids[IM_END],
        pad_token_id=special_ids[ENDOFTEXT],
    )


def encode_documents(tok, texts: Sequence[str], eot_id: int):
    """Concatenate the documents into one token stream separated by <|endoftext|>."""
    import torch

    ids: list[int] = []
    for enc in tok.encode_batch(list(texts), add_special_tokens=False):
        ids.extend(enc.ids)
        ids.append(eot_id)
    return torch.tensor(ids, dtype=torch.long)


class ChunkSampler:
    """Deterministic epoch-wise shuffled fixed-length chunks of a token stream."""

    def __init__(self, stream, seq_len: int, batch_size: int, seed: int):
        import torch

        self.stream = stream
        self.seq_len = seq_len
        self.batch_size = batch_size
        self.gen = torch.Generator().manual_seed(seed)
        self.epoch = 0
        self._order = None
        self._pos = 0
        if len(stream) < seq_len * batch_size + seq_len:
            raise ValueError("training text too short for one batch")

    def _new_epoch(self) -> None:
        import torch

        self.offset = int(torch.randint(0, self.seq_len, (1,), generator=self.gen))
        n = (len(self.stream) - self.offset) // self.seq_len
        self._order = torch.randperm(n, generator=self.gen)
        self._pos = 0
        self.epoch += 1

    def next_batch(self):
        import torch

        rows = []
        while len(rows) < self.batch_size:
            if self._order is None or self._pos >= len(self._order):
                self._new_epoch()
            start = self.offset + int(self._order[self._pos]) * self.seq_len
            self._pos += 1
            rows.append(self.stream[start : start + self.seq_len])
        return torch.stack(rows)


def _lr_at(step: int, s: DemoSettings) -> float:
    if step < s.warmup_steps:
        return s.lr * (step + 1) / s.warmup_steps
    progress = (step - s.warmup_steps) / max(1, s.steps - s.warmup_steps)
    cosine = 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
    return s.lr * (s.min_lr_ratio + (1.0 - s.min_lr_ratio) * cosine)


def _param_groups(model, weight_decay: float):
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (decay if p.ndim >= 2 and "norm" not in name else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def evaluate(model, stream, s: DemoSettings) -> tuple[float, list[list[int]]]:
    """Mean LM loss over the first ``eval_chunks`` chunks of *stream* and expert counts per layer."""
    import torch

    n = min(s.eval_chunks, len(stream) // s.seq_len)
    if n == 0:
        return float("nan"), []
    chunks = stream[: n * s.seq_len].view(n, s.seq_len)
    counts = torch.zeros(s.num_layers, s.num_experts, dtype=torch.long)
    losses = []
    model.eval()
    with torch.no_grad(), _autocast(s):
        for i in range(0, n, s.batch_size):
            batch = chunks[i : i + s.batch_size]
            out = model(input_ids=batch, output_router_logits=True)
            losses.append((float(lm_loss(out.logits, batch)), batch.shape[0]))
            for layer, logits in enumerate(out.router_logits):
                top = torch.topk(logits.float(), s.top_k, dim=-1).indices.reshape(-1)
                counts[layer] += torch.bincount(top, minlength=s.num_experts)
    model.train()
    total = sum(w for _, w in losses)
    return sum(l * w for l, w in losses) / total, counts.tolist()


def lm_loss(logits, input_ids):
    """Next-token cross-entropy (the language-modelling part of the loss)."""
    import torch.nn.functional as F

    return F.cross_entropy(logits[:, :-1].float().reshape(-1, logits.shape[-1]), input_ids[:, 1:].reshape(-1))


def router_balance_loss(router_logits, num_experts: int, top_k: int):
    """Switch-Transformer load-balancing loss, computed per layer and averaged over layers.

    For each layer ``E * sum_i f_i * P_i`` where ``f_i`` is the fraction of
    top-k assignments that go to expert ``i`` and ``P_i`` its mean router
    probability; it equals ``top_k`` for perfectly uniform routing.
    ``transformers``' ``load_balancing_loss_func`` pools the counts of all
    layers before multiplying, which lets an expert go almost unused in one
    layer as long as the same expert index is busy in another; fate caches and
    quantizes experts per layer, so every layer should use all its experts.
    """
    import torch

    per_layer = []
    for logits in router_logits:
        probs = torch.softmax(logits.float(), dim=-1)
        top = torch.topk(probs, top_k, dim=-1).indices.reshape(-1)
        ones = torch.ones_like(top, dtype=probs.dtype)
        counts = torch.zeros(num_experts, dtype=probs.dtype).scatter_add_(0, top, ones)
        frac = counts / probs.shape[0]
        per_layer.append(num_experts * torch.sum(frac * probs.mean(dim=0)))
    return torch.stack(per_layer).mean()


def _autocast(s: DemoSettings):
    import contextlib

    import torch

    if s.dtype == "bfloat16":
        return torch.autocast("cpu", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def generate_sample(model, tok, prompt: str, max_new_tokens: int, eos_ids: Sequence[int]) -> str:
    import torch

    ids = torch.tensor([tok.encode(prompt, add_special_tokens=False).ids])
    model.eval()
    with torch.no_grad():
        out = model.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=max_new_tokens,
            do_sample=False,
            eos_token_id=list(eos_ids),
            pad_token_id=eos_ids[-1],
        )
    return tok.decode(out[0].tolist(), skip_special_tokens=False)


def train(out_dir: str | Path, settings: DemoSettings, progress: bool = True, log=print) -> dict:
    """Run the whole pipeline and write the checkpoint to *out_dir*.  Returns a summary dict."""
    import torch
    from tqdm.auto import tqdm
    from transformers import GenerationConfig, Qwen2MoeForCausalLM

    s = settings
    check_settings(s)
    t_start = time.time()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(s.threads)
    random.seed(s.seed)
    torch.manual_seed(s.seed)

    corpus = gather_corpus(max_chars=s.max_corpus_chars)
    log(
        f"[train_demo] corpus: {corpus.n_chars:,} chars, {len(corpus.train)} train / {len(corpus.valid)} valid docs "
        f"({corpus.counts}), sha256 {corpus.sha256[:16]}"
    )
    if corpus.failed_modules:
        log(f"[train_demo] modules not importable here (skipped): {', '.join(corpus.failed_modules)}")

    tok = train_tokenizer(corpus.train, s.vocab_size)
    special_ids = {t: tok.token_to_id(t) for t in SPECIAL_TOKENS}
    if tok.get_vocab_size() != s.vocab_size:
        log(f"[train_demo] tokenizer vocabulary has {tok.get_vocab_size()} entries (asked {s.vocab_size})")
    eot = special_ids[ENDOFTEXT]
    train_stream = encode_documents(tok, corpus.train, eot)
    valid_stream = encode_documents(tok, corpus.valid, eot)
    log(
        f"[train_demo] tokens: {len(train_stream):,} train, {len(valid_stream):,} valid "
        f"({corpus.n_chars / max(1, len(train_stream) + len(valid_stream)):.2f} chars/token)"
    )

    config = make_config(s, special_ids)
    torch.manual_seed(s.seed)
    model = Qwen2MoeForCausalLM(config)
    model.train()
    n_params = sum(p.numel() for p in model.parameters())
    n_expert = sum(p.numel() for n, p in model.named_parameters() if ".mlp.experts." in n)
    log(f"[train_demo] model: {n_params:,} parameters, {n_expert:,} in routed experts ({n_expert / n_params:.0%})")

    opt = torch.optim.AdamW(_param_groups(model, s.weight_decay), lr=s.lr, betas=(0.9, 0.95), eps=1e-8)
    sampler = ChunkSampler(train_stream, s.seq_len, s.batch_size, s.seed)
    history: list[dict] = []
    ema = None
    t_train = time.time()
    bar = tqdm(range(s.steps), desc="train", disable=not progress, dynamic_ncols=True, file=sys.stdout)
    for step in bar:
        lr = _lr_at(step, s)
        for g in opt.param_groups:
            g["lr"] = lr
        batch = sampler.next_batch()
        with _autocast(s):
            outp = model(input_ids=batch, output_router_logits=True)
            lm_t = lm_loss(outp.logits, batch)
            aux_t = router_balance_loss(outp.router_logits, s.num_experts, s.top_k)
        loss = lm_t + s.router_aux_loss_coef * aux_t
        lm, aux = float(lm_t.detach()), float(aux_t.detach())
        if not math.isfinite(lm):
            raise FloatingPointError(f"loss became {lm} at step {step}")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        gnorm = float(torch.nn.utils.clip_grad_norm_(model.parameters(), s.grad_clip))
        opt.step()
        ema = lm if ema is None else 0.95 * ema + 0.05 * lm
        history.append({"step": step, "loss": round(lm, 5), "aux": round(aux, 5), "lr": lr, "gnorm": round(gnorm, 4)})
        bar.set_postfix(loss=f"{ema:.3f}", aux=f"{aux:.3f}", lr=f"{lr:.1e}", epoch=sampler.epoch)
    bar.close()
    train_seconds = time.time() - t_train

    val_loss, expert_counts = evaluate(model, valid_stream, s)
    tail = history[-max(1, min(50, len(history) // 5)) :]
    final_loss = sum(h["loss"] for h in tail) / len(tail)
    log(
        f"[train_demo] final train loss (mean of last {len(tail)} steps) {final_loss:.4f}, "
        f"validation loss {val_loss:.4f}"
    )
    for layer, c in enumerate(expert_counts):
        tot = max(1, sum(c))
        log(f"[train_demo] layer {layer} expert share: " + " ".join(f"{x / tot:.2f}" for x in c))

    # ---- save -----------------------------------------------------------
    model.config.output_router_logits = False
    model.save_pretrained(out, safe_serialization=True)
    eos_ids = [special_ids[IM_END], special_ids[ENDOFTEXT]]
    gen = GenerationConfig(
        bos_token_id=None,
        eos_token_id=eos_ids,
        pad_token_id=special_ids[ENDOFTEXT],
        do_sample=True,
        temperature=0.7,
        top_p=0.9,
        top_k=40,
    )
    gen.save_pretrained(out)
    save_tokenizer_files(tok, out, s.max_position_embeddings)
    # Older loaders (and some converters) look for a top-level rope_theta.
    cfg_path = out / "config.json"
    cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
    cfg.setdefault("rope_theta", float(s.rope_theta))
    cfg_path.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n", encoding="utf-8")

    sample = generate_sample(model, tok, s.sample_prompt, s.sample_tokens, eos_ids)
    chat_prompt = render_chat([{"role": "user", "content": "What does `json.dumps` do?"}], add_generation_prompt=True)
    chat_sample = generate_sample(model, tok, chat_prompt, s.sample_tokens, eos_ids)
    wall = time.time() - t_start
    log(f"[train_demo] greedy sample: {sample!r}")
    log(f"[train_demo] chat sample: {chat_sample!r}")

    summary = {
        "settings": dataclasses.asdict(s),
        "python": sys.version.split()[0],
        "corpus_sha256": corpus.sha256,
        "corpus_chars": corpus.n_chars,
        "corpus_counts": corpus.counts,
        "skipped_modules": corpus.failed_modules,
        "train_tokens": len(train_stream),
        "valid_tokens": len(valid_stream),
        "epochs_started": sampler.epoch,
        "parameters": n_params,
        "expert_parameters": n_expert,
        "first_loss": history[0]["loss"],
        "final_loss": final_loss,
        "valid_loss": val_loss,
        "expert_counts": expert_counts,
        "train_seconds": train_seconds,
        "wall_seconds": wall,
        "sample": sample,
        "chat_sample": chat_sample,
        "history": history,
    }
    (out / "fate_train_demo.json").write_text(json.dumps(summary, indent=1) + "\n", encoding="utf-8")
    for f in out.iterdir():
        if f.is_file():
            f.chmod(0o644)  # save_pretrained creates some files owner-only
    log(f"[train_demo] wrote {out} in {wall:.1f} s (training {train_seconds:.1f} s)")
    return summary


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m scripts.train_demo",
        description="Train fate's tiny Mixture-of-Experts demo model (offline, reproducible).",
    )
    p.add_argument("out_dir", nargs="?", help="directory for the Hugging Face checkpoint")
    p.add_argument(
        "--steps", type=int, default=None,
        help="optimizer steps (default: the preset's; 1100 for demo, about 8 minutes on 2 idle cores)",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--preset", choices=sorted(PRESETS), default="demo")
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default=None, help="compute dtype (autocast)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--no-progress", action="store_true", help="hide the tqdm bar")
    p.add_argument("--write-calib", metavar="PATH", help="write the default calibration text to PATH and exit")
    args = p.parse_args(argv)
    # Sleep instead of spinning in OpenMP barriers: on a 2-core machine that is
    # also running something else, spinning threads slow training down a lot.
    # (Only effective if torch has not been imported yet, as in the CLI.)
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

    if args.write_calib:
        text = build_calibration_text()
        Path(args.write_calib).write_text(text, encoding="utf-8")
        print(f"wrote {len(text.encode('utf-8')):,} bytes to {args.write_calib}")
        return 0
    if not args.out_dir:
        p.error("OUT_DIR is required")
    s = DemoSettings(**PRESETS[args.preset])
    s.seed = args.seed
    s.threads = args.threads
    if args.steps is not None:
        s.steps = args.steps
    if args.dtype is not None:
        s.dtype = args.dtype
    train(args.out_dir, s, progress=not args.no_progress)
    return 0


if __name__ == "__main__":
    if sys.argv[1:] == [_DUMP_FLAG]:
        # Child process of collect_entries(): print the entries as ASCII JSON.
        sys.stdout.write(json.dumps(_collect_entries_here(), ensure_ascii=True))
        sys.stdout.flush()
        raise SystemExit(0)
    raise SystemExit(main())

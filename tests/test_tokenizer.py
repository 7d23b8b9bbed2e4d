"""BundleTokenizer / StreamDecoder against transformers' PreTrainedTokenizerFast on tokenizers built here."""

from __future__ import annotations

import json

import pytest
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

from fate.runtime.chat import render_chat
from fate.errors import TokenizerError
from fate.runtime.tokenizer import BundleTokenizer, StreamDecoder

transformers = pytest.importorskip("transformers")
from transformers import AutoTokenizer, PreTrainedTokenizerFast  # noqa: E402

CORPUS = [
    "The quick brown fox jumps over the lazy dog. The dog sleeps in the warm afternoon sun, "
    "and the fox runs back into the forest where the other foxes are waiting for their dinner.",
    "Mixture-of-experts models route every token to a few experts out of many. Only the chosen "
    "experts run, so the compute per token stays small while the total number of parameters is large.",
    "Caching experts in memory matters: a cache that keeps the experts of shallow layers avoids "
    "reading them again from the disk, and prefetching the next layer's experts hides the latency.",
    "Numbers like 12345, 2024-06-01 and 3.14159 appear in text too; so do symbols such as #, @, & and %.",
    "東京は日本の首都です。京都は古い都です。日本語の文章も少し入れておきます。",
    "Le café est très bon, déjà prêt à être servi. Über alles, naïve façade, Ærø and smörgåsbord.",
    "def hello(name):\n    return f'Hello, {name}!'\n\nprint(hello('world'))\n",
]

CHATML_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]

SAMPLES = [
    "Hello world! The fox is quick.",
    "  leading and trailing spaces   ",
    "line one\nline two\n\n\ttabbed",
    "emoji: 🦊🐶🎉 and a family 👨‍👩‍👧 done",
    "CJK: 東京の天気は晴れです。新しい単語：鳩、龍、鬱",
    "accents: café naïve Ærø — “quoted” ½ ∑ ∞",
    "<|im_start|>user\nHi there!<|im_end|>\n<|im_start|>assistant\n",
    "text<|endoftext|>more text<|im_end|>",
    "",
]


def _train_byte_level(special_tokens: list[str], vocab_size: int = 400) -> Tokenizer:
    tok = Tokenizer(models.BPE())
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=special_tokens,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(CORPUS, trainer=trainer)
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    return tok


def build_chatml_tokenizer_json() -> str:
    """Qwen-like: byte-level BPE, ChatML specials, no BOS."""
    return _train_byte_level(CHATML_SPECIALS).to_str()


def build_bos_tokenizer_json() -> str:
    """Llama-3-like: byte-level BPE whose post-processor prepends <|begin_of_text|>."""
    tok = _train_byte_level(["<|begin_of_text|>", "<|end_of_text|>", "<|eot_id|>"])
    bos_id = tok.token_to_id("<|begin_of_text|>")
    tok.post_processor = processors.Sequence([
        processors.ByteLevel(trim_offsets=False),
        processors.TemplateProcessing(
            single="<|begin_of_text|> $A",
            pair="<|begin_of_text|> $A <|begin_of_text|> $B:1",
            special_tokens=[("<|begin_of_text|>", bos_id)],
        ),
    ])
    return tok.to_str()


def build_sentencepiece_like_json() -> str:
    """Llama-2/Mistral-like: Metaspace BPE with byte fallback and a leading-space-stripping decoder."""
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<unk>", "<s>", "</s>"], show_progress=False)
    tok.train_from_iterator(CORPUS[:4], trainer=trainer)
    data = json.loads(tok.to_str())
    vocab = data["model"]["vocab"]
    for b in range(256):
        vocab[f"<0x{b:02X}>"] = len(vocab)
    data["model"]["byte_fallback"] = True
    data["normalizer"] = None
    data["decoder"] = {
        "type": "Sequence",
        "decoders": [
            {"type": "Replace", "pattern": {"String": "▁"}, "content": " "},
            {"type": "ByteFallback"},
            {"type": "Fuse"},
            {"type": "Strip", "content": " ", "start": 1, "stop": 0},
        ],
    }
    data["post_processor"] = {
        "type": "TemplateProcessing",
        "single": [{"SpecialToken": {"id": "<s>", "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}],
        "pair": [
            {"SpecialToken": {"id": "<s>", "type_id": 0}},
            {"Sequence": {"id": "A", "type_id": 0}},
            {"SpecialToken": {"id": "<s>", "type_id": 1}},
            {"Sequence": {"id": "B", "type_id": 1}},
        ],
        "special_tokens": {"<s>": {"id": "<s>", "ids": [vocab["<s>"]], "tokens": ["<s>"]}},
    }
    return json.dumps(data, ensure_ascii=False)


@pytest.fixture(scope="module")
def chatml_json() -> str:
    return build_chatml_tokenizer_json()


@pytest.fixture(scope="module")
def bos_json() -> str:
    return build_bos_tokenizer_json()


@pytest.fixture(scope="module")
def sp_json() -> str:
    return build_sentencepiece_like_json()


def _hf(tokenizer_json: str, **kwargs) -> PreTrainedTokenizerFast:
    return PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(tokenizer_json), **kwargs)


def _ids(tok: BundleTokenizer, name: str) -> int:
    i = tok.token_to_id(name)
    assert i is not None
    return i


# --- encode / decode parity -----------------------------------------------------------------------------


@pytest.mark.parametrize("add_special", [True, False])
def test_chatml_encode_decode_matches_transformers(chatml_json, add_special):
    hf = _hf(chatml_json, eos_token="<|im_end|>", pad_token="<|endoftext|>")
    ours = BundleTokenizer(chatml_json, None, [], None, eos_token="<|im_end|>", pad_token="<|endoftext|>")
    for text in SAMPLES:
        ids = ours.encode(text, add_special_tokens=add_special)
        assert ids == hf.encode(text, add_special_tokens=add_special), text
        for skip in (True, False):
            assert ours.decode(ids, skip_special_tokens=skip) == hf.decode(ids, skip_special_tokens=skip), text
    # specials are single ids, not split into pieces
    ids = ours.encode("<|im_start|>user<|im_end|>")
    assert ids[0] == _ids(ours, "<|im_start|>") and ids[-1] == _ids(ours, "<|im_end|>")
    assert ours.decode(ids) == "user"
    # round trip of ordinary text
    for text in SAMPLES[:6]:
        assert ours.decode(ours.encode(text)) == text


def test_bos_post_processor_matches_transformers(bos_json):
    hf = _hf(bos_json, bos_token="<|begin_of_text|>", eos_token="<|eot_id|>")
    ours = BundleTokenizer(bos_json, None, [], None, bos_token="<|begin_of_text|>", eos_token="<|eot_id|>")
    bos = _ids(ours, "<|begin_of_text|>")
    assert ours.bos_token_id == bos
    for text in SAMPLES:
        with_bos = ours.encode(text)
        assert with_bos == hf.encode(text), text
        assert with_bos[0] == bos
        assert ours.encode(text, add_special_tokens=False) == hf.encode(text, add_special_tokens=False)
        assert bos not in ours.encode(text, add_special_tokens=False) or "<|begin_of_text|>" in text
        assert ours.decode(with_bos) == hf.decode(with_bos, skip_special_tokens=True)
        assert ours.decode(with_bos, skip_special_tokens=False) == hf.decode(with_bos)


def test_sentencepiece_like_matches_transformers(sp_json):
    hf = _hf(sp_json, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    ours = BundleTokenizer(sp_json, None, [], None, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    for text in SAMPLES:
        ids = ours.encode(text)
        assert ids == hf.encode(text), text
        assert ours.decode(ids) == hf.decode(ids, skip_special_tokens=True), text
    # byte fallback really is in use for characters the vocabulary lacks
    assert _ids(ours, "<0xF0>") in ours.encode("🦊")


@pytest.mark.parametrize("add_bos,add_eos", [(True, None), (False, None), (True, True), (None, True)])
def test_explicit_add_bos_eos_flags_match_transformers(chatml_json, bos_json, add_bos, add_eos):
    """Explicit flags replace the post-processor, as PreTrainedTokenizerFast(add_bos_token=...) does."""
    for tj, bos, eos in ((bos_json, "<|begin_of_text|>", "<|eot_id|>"), (chatml_json, "<|endoftext|>", "<|im_end|>")):
        flags = {}
        if add_bos is not None:
            flags["add_bos_token"] = add_bos
        if add_eos is not None:
            flags["add_eos_token"] = add_eos
        hf = _hf(tj, bos_token=bos, eos_token=eos, **flags)
        ours = BundleTokenizer(tj, None, [], add_bos, add_eos=add_eos, bos_token=bos, eos_token=eos)
        for text in SAMPLES:
            assert ours.encode(text) == hf.encode(text), (flags, text)
            assert ours.encode(text, add_special_tokens=False) == hf.encode(text, add_special_tokens=False)
        ids = ours.encode("hi")
        assert (ids[0] == ours.bos_token_id) == bool(add_bos)
        assert (ids[-1] == ours.token_to_id(eos)) == bool(add_eos)


@pytest.mark.parametrize("flags", [{}, {"add_bos_token": True}, {"add_bos_token": False, "add_eos_token": True}])
def test_from_config_matches_auto_tokenizer(tmp_path, chatml_json, bos_json, flags):
    """AutoTokenizer (transformers 5) keeps tokenizer.json's post-processor whatever the config's flags say."""
    for tj, bos, eos in ((bos_json, "<|begin_of_text|>", "<|eot_id|>"), (chatml_json, "<|endoftext|>", "<|im_end|>")):
        cfg = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": bos, "eos_token": eos, **flags}
        d = tmp_path / f"tok_{bos.strip('<|>')}"
        d.mkdir()
        (d / "tokenizer.json").write_text(tj, encoding="utf-8")
        (d / "tokenizer_config.json").write_text(json.dumps(cfg), encoding="utf-8")
        hf = AutoTokenizer.from_pretrained(str(d))
        ours = BundleTokenizer.from_config(tj, cfg)
        for text in SAMPLES:
            assert ours.encode(text) == hf.encode(text), (cfg, text)
            assert ours.encode(text, add_special_tokens=False) == hf.encode(text, add_special_tokens=False)
            ids = ours.encode(text)
            assert ours.decode(ids) == hf.decode(ids, skip_special_tokens=True)


def test_from_config_without_flags_keeps_file_post_processor(tmp_path, bos_json):
    cfg = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": {"__type": "AddedToken", "content": "<|begin_of_text|>", "special": True},
        "eos_token": "<|eot_id|>",
    }
    (tmp_path / "tokenizer.json").write_text(bos_json, encoding="utf-8")
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(cfg), encoding="utf-8")
    hf = AutoTokenizer.from_pretrained(str(tmp_path))
    end_of_text = _ids(BundleTokenizer(bos_json), "<|end_of_text|>")
    ours = BundleTokenizer.from_config(bos_json, cfg, eos_token_ids=[end_of_text])
    assert ours.bos_token == "<|begin_of_text|>"
    for text in SAMPLES:
        assert ours.encode(text) == hf.encode(text)
    assert ours.is_eos(_ids(ours, "<|eot_id|>")) and ours.is_eos(_ids(ours, "<|end_of_text|>"))
    assert not ours.is_eos(_ids(ours, "<|begin_of_text|>"))


def test_unknown_special_token_string_is_added_like_transformers(chatml_json):
    hf = _hf(chatml_json, eos_token="<|im_end|>", bos_token="<|fate_bos|>")
    ours = BundleTokenizer(chatml_json, None, [], None, eos_token="<|im_end|>", bos_token="<|fate_bos|>")
    assert ours.bos_token_id == hf.bos_token_id is not None
    text = "<|fate_bos|>hello<|im_end|>"
    assert ours.encode(text) == hf.encode(text)
    assert ours.decode(ours.encode(text)) == hf.decode(hf.encode(text), skip_special_tokens=True) == "hello"
    assert ours.vocab_size == len(hf)


def test_truncation_in_file_is_not_applied(chatml_json):
    data = json.loads(chatml_json)
    data["truncation"] = {"direction": "Right", "max_length": 4, "strategy": "LongestFirst", "stride": 0}
    ours = BundleTokenizer(json.dumps(data))
    assert len(ours.encode(SAMPLES[0])) > 4


def test_chat_prompt_with_bos_text_is_not_doubled(bos_json):
    template = (
        "{{ bos_token }}{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n"
        "{{ m['content'] }}<|eot_id|>{% endfor %}{% if add_generation_prompt %}"
        "<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}"
    )
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi 🦊!"}]
    hf = _hf(bos_json, bos_token="<|begin_of_text|>", eos_token="<|eot_id|>")
    hf.chat_template = template
    ours = BundleTokenizer(bos_json, None, [], None, bos_token="<|begin_of_text|>", eos_token="<|eot_id|>")
    prompt = render_chat(template, messages, bos_token=ours.bos_token, eos_token=ours.eos_token)
    assert prompt == hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    ids = ours.encode_chat(prompt)
    expected = hf.apply_chat_template(messages, tokenize=True, add_generation_prompt=True, return_dict=False)
    assert ids == list(expected)
    assert ids.count(ours.bos_token_id) == 1 and ids[0] == ours.bos_token_id
    # the naive path would double it
    assert ours.encode(prompt)[:2] == [ours.bos_token_id, ours.bos_token_id]


def test_eos_ids_and_metadata(chatml_json):
    tmp = BundleTokenizer(chatml_json)
    im_end, eot = _ids(tmp, "<|im_end|>"), _ids(tmp, "<|endoftext|>")
    tok = BundleTokenizer(chatml_json, None, [eot, im_end, eot], None)
    assert tok.eos_token_ids == (eot, im_end)
    assert tok.eos_token == "<|endoftext|>"
    im_start = _ids(tok, "<|im_start|>")
    assert tok.is_eos(im_end) and tok.is_eos(eot) and not tok.is_eos(im_start)
    assert tok.is_special(im_end) and not tok.is_special(tok.encode("the")[0])
    assert tok.vocab_size == Tokenizer.from_str(chatml_json).get_vocab_size(with_added_tokens=True)
    assert tok.bos_token_id is None
    with pytest.raises(TokenizerError):
        BundleTokenizer("{not json")
    with pytest.raises(TokenizerError):
        BundleTokenizer(chatml_json, 10**6)


# --- streaming -------------------------------------------------------------------------------------------


def _stream(tok: BundleTokenizer, ids: list[int], skip: bool = True) -> list[str]:
    dec = StreamDecoder(tok, skip_special_tokens=skip)
    pieces = [dec.feed(i) for i in ids]
    pieces.append(dec.flush())
    return pieces


@pytest.mark.parametrize("which", ["chatml", "bos", "sp"])
def test_stream_decoder_concatenation_equals_full_decode(which, chatml_json, bos_json, sp_json):
    tj = {"chatml": chatml_json, "bos": bos_json, "sp": sp_json}[which]
    tok = BundleTokenizer(tj)
    for text in SAMPLES + [" ".join(SAMPLES)]:
        ids = tok.encode(text)
        for skip in (True, False):
            pieces = _stream(tok, ids, skip)
            assert "".join(pieces) == tok.decode(ids, skip_special_tokens=skip), (which, text)
            assert not any("\ufffd" in p for p in pieces), (which, text, pieces)


def test_stream_decoder_holds_split_characters(chatml_json):
    tok = BundleTokenizer(chatml_json)
    ids = tok.encode("🦊")
    assert len(ids) > 1, "the fox emoji must span several byte-level tokens for this test"
    dec = tok.stream_decoder()
    outs = [dec.feed(i) for i in ids]
    assert outs[:-1] == [""] * (len(ids) - 1)
    assert outs[-1] == "🦊"
    assert dec.flush() == ""
    # an unfinished character is printed by flush(), as the full decode would print it
    dec = tok.stream_decoder()
    assert dec.feed(ids[0]) == ""
    assert dec.flush() == tok.decode(ids[:1])
    # every character is printed as soon as it is complete
    text = "a東b🎉c"
    dec = tok.stream_decoder()
    seen = ""
    for i in tok.encode(text):
        seen += dec.feed(i)
        assert text.startswith(seen)
    assert seen == text


def test_stream_decoder_context_keeps_leading_space(sp_json):
    tok = BundleTokenizer(sp_json, bos_token="<s>")
    prompt = tok.encode("The fox")
    gen = tok.encode(" jumps over the dog", add_special_tokens=False)
    full = tok.decode(prompt + gen)
    dec = tok.stream_decoder(context_ids=prompt[-1:])
    out = "".join(dec.feed(i) for i in gen) + dec.flush()
    assert tok.decode(prompt) + out == full
    plain = tok.stream_decoder()
    assert "".join(plain.feed(i) for i in gen) + plain.flush() == tok.decode(gen)

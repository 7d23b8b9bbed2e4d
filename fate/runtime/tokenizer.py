"""Tokenizer of a model bundle: the Hugging Face ``tokenizer.json`` run by the ``tokenizers`` library.

The bundle carries ``tokenizer.json`` verbatim.  :class:`BundleTokenizer` reproduces what transformers'
``PreTrainedTokenizerFast`` (the class ``AutoTokenizer`` gives for a plain ``tokenizer.json``) does with the
same file and the same ``tokenizer_config.json`` settings:

* ``encode(text, add_special_tokens=True)`` runs the file's post-processor, which is where a model's BOS
  (and sometimes EOS) is added.  transformers 5 takes the file as the truth: ``AutoTokenizer`` drops
  ``tokenizer_config.json``'s ``add_bos_token`` / ``add_eos_token`` when a ``tokenizer.json`` exists, and so
  does :meth:`BundleTokenizer.from_config`.  Passing ``add_bos`` / ``add_eos`` explicitly replaces the
  post-processor with ``[bos] $A [eos]`` as ``PreTrainedTokenizerFast(..., add_bos_token=...)`` does; leave
  them ``None`` to keep the file's post-processor (Llama-3 style files add BOS there).
* Special token strings (bos/eos/pad/unk) that the file does not already list as added tokens are added as
  special tokens, like transformers does.
* Truncation and padding saved in the file are switched off: transformers only applies them on request.
* A prompt rendered from a chat template must be encoded with ``add_special_tokens=False`` (that is what
  ``apply_chat_template`` does; templates write the BOS text themselves when the model wants one), see
  :meth:`BundleTokenizer.encode_chat`.

:class:`StreamDecoder` turns generated ids into text one id at a time, holding back bytes of a UTF-8
character that is split over several byte-level tokens until the character is complete.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from tokenizers import AddedToken, Tokenizer, processors

from fate.errors import TokenizerError

__all__ = ["BundleTokenizer", "StreamDecoder"]

_REPLACEMENT = "\ufffd"


def _token_text(value: Any) -> str | None:
    """A special token as written in tokenizer_config.json: a string or a serialized AddedToken dict."""
    if value is None:
        return None
    if isinstance(value, str):
        return value
    if isinstance(value, Mapping) and isinstance(value.get("content"), str):
        return value["content"]
    raise TokenizerError(f"special token must be a string or an AddedToken object, got {value!r}")


class BundleTokenizer:
    """Encode / decode with a bundle's ``tokenizer.json``.

    Args:
        tokenizer_json: the content of ``tokenizer.json``.
        bos_token_id: id of the BOS token, or None (derived from ``bos_token`` when that is given).
        eos_token_ids: every id that ends generation (a model may have several).  The id of ``eos_token`` is
            added when that string is given.
        add_bos: None (normal: keep the file's post-processor), or True/False to override it like the
            ``add_bos_token`` keyword of ``PreTrainedTokenizerFast``.
        add_eos: the same for ``add_eos_token``.
        bos_token, eos_token, pad_token, unk_token: the special token strings of the config.
        pad_token_id: id of the padding token, or None (derived from ``pad_token``).
    """

    def __init__(
        self,
        tokenizer_json: str,
        bos_token_id: int | None = None,
        eos_token_ids: Iterable[int] = (),
        add_bos: bool | None = None,
        *,
        add_eos: bool | None = None,
        bos_token: str | None = None,
        eos_token: str | None = None,
        pad_token: str | None = None,
        unk_token: str | None = None,
        pad_token_id: int | None = None,
    ) -> None:
        if not isinstance(tokenizer_json, str):
            raise TokenizerError("tokenizer_json must be the text of tokenizer.json")
        try:
            tok = Tokenizer.from_str(tokenizer_json)
        except Exception as e:  # the Rust side raises plain Exception subclasses
            raise TokenizerError(f"tokenizer.json cannot be loaded: {e}") from None
        tok.no_truncation()
        tok.no_padding()

        # Special token strings the file does not know as added tokens become special added tokens.
        known_added = {t.content for t in tok.get_added_tokens_decoder().values()}
        missing = []
        for text in (bos_token, eos_token, unk_token, pad_token):
            if text is not None and text not in known_added and text not in missing:
                missing.append(text)
        if missing:
            tok.add_special_tokens([AddedToken(text, special=True, normalized=False) for text in missing])

        self._tok = tok

        def resolve(text: str | None, token_id: int | None, what: str) -> tuple[str | None, int | None]:
            if token_id is not None:
                token_id = int(token_id)
                if text is None:
                    text = tok.id_to_token(token_id)
                    if text is None:
                        raise TokenizerError(f"{what} id {token_id} is not in the vocabulary")
            elif text is not None:
                token_id = tok.token_to_id(text)
            return text, token_id

        self.bos_token, self.bos_token_id = resolve(bos_token, bos_token_id, "bos_token")
        self.pad_token, self.pad_token_id = resolve(pad_token, pad_token_id, "pad_token")
        self.unk_token = unk_token

        eos_ids: list[int] = []
        for i in eos_token_ids or ():
            if int(i) not in eos_ids:
                eos_ids.append(int(i))
        if eos_token is not None:
            primary = tok.token_to_id(eos_token)
            if primary is not None and primary not in eos_ids:
                eos_ids.append(primary)
        elif eos_ids:
            eos_token = tok.id_to_token(eos_ids[0])
        self.eos_token = eos_token
        self.eos_token_ids: tuple[int, ...] = tuple(eos_ids)
        self._eos_set = frozenset(eos_ids)

        if add_bos is not None or add_eos is not None:
            self._rebuild_post_processor(bool(add_bos), bool(add_eos))

        added = tok.get_added_tokens_decoder()
        self._special_ids = frozenset(i for i, t in added.items() if t.special)
        self._vocab_size = max(tok.get_vocab_size(with_added_tokens=False), max(added, default=-1) + 1)

    @classmethod
    def from_config(
        cls,
        tokenizer_json: str,
        tokenizer_config: Mapping[str, Any] | None = None,
        eos_token_ids: Iterable[int] = (),
    ) -> "BundleTokenizer":
        """Build from ``tokenizer.json`` text and the parsed ``tokenizer_config.json``, as ``AutoTokenizer``
        (transformers 5) loads the pair: the config's special tokens are used, its ``add_bos_token`` /
        ``add_eos_token`` are ignored because ``tokenizer.json`` exists.

        ``eos_token_ids`` adds ids from ``generation_config.json`` (often a list) to the config's eos token.
        """
        cfg = dict(tokenizer_config or {})
        return cls(
            tokenizer_json,
            None,
            eos_token_ids,
            None,
            bos_token=_token_text(cfg.get("bos_token")),
            eos_token=_token_text(cfg.get("eos_token")),
            pad_token=_token_text(cfg.get("pad_token")),
            unk_token=_token_text(cfg.get("unk_token")),
        )

    def _rebuild_post_processor(self, add_bos: bool, add_eos: bool) -> None:
        # The rule transformers applies when add_bos_token/add_eos_token are given: a flag without its token
        # is dropped, and the post-processor becomes "[bos] $A [eos]".
        if self.bos_token is None or self.bos_token_id is None:
            add_bos = False
        eos_id = self._tok.token_to_id(self.eos_token) if self.eos_token is not None else None
        if eos_id is None:
            add_eos = False
        single = "$A:0"
        pair = "$B:1"
        specials = []
        if add_bos:
            single = f"{self.bos_token}:0 {single}"
            pair = f"{self.bos_token}:1 {pair}"
            specials.append((self.bos_token, self.bos_token_id))
        if add_eos:
            single = f"{single} {self.eos_token}:0"
            pair = f"{pair} {self.eos_token}:1"
            specials.append((self.eos_token, eos_id))
        self._tok.post_processor = processors.TemplateProcessing(
            single=single, pair=f"{single} {pair}", special_tokens=specials
        )

    # --- encoding / decoding -------------------------------------------------------------------------
    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids of ``text``; ``add_special_tokens`` runs the post-processor (BOS/EOS as configured)."""
        if not isinstance(text, str):
            raise TypeError(f"encode() takes a str, got {type(text).__name__}")
        return self._tok.encode(text, add_special_tokens=add_special_tokens).ids

    def encode_chat(self, prompt: str) -> list[int]:
        """Ids of a prompt rendered by a chat template: no BOS/EOS added (the template writes them)."""
        return self.encode(prompt, add_special_tokens=False)

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        """Text of ``ids``; special tokens are left out when ``skip_special_tokens``."""
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

    def stream_decoder(self, skip_special_tokens: bool = True, context_ids: Sequence[int] = ()) -> "StreamDecoder":
        """A new :class:`StreamDecoder` for this tokenizer."""
        return StreamDecoder(self, skip_special_tokens=skip_special_tokens, context_ids=context_ids)

    # --- vocabulary ----------------------------------------------------------------------------------
    def is_eos(self, token_id: int) -> bool:
        """Whether ``token_id`` ends generation."""
        return int(token_id) in self._eos_set

    def is_special(self, token_id: int) -> bool:
        """Whether ``token_id`` is a special added token (left out by ``decode(skip_special_tokens=True)``)."""
        return int(token_id) in self._special_ids

    @property
    def vocab_size(self) -> int:
        """Number of ids the tokenizer can produce: highest id (base vocabulary or added token) + 1."""
        return self._vocab_size

    def token_to_id(self, token: str) -> int | None:
        return self._tok.token_to_id(token)

    def id_to_token(self, token_id: int) -> str | None:
        return self._tok.id_to_token(int(token_id))

    @property
    def special_tokens(self) -> dict[str, str]:
        """The special token strings that are set, by name, as chat templates receive them."""
        out = {}
        for name in ("bos_token", "eos_token", "unk_token", "pad_token"):
            value = getattr(self, name)
            if value is not None:
                out[name] = value
        return out

    @property
    def backend(self) -> Tokenizer:
        """The underlying ``tokenizers.Tokenizer``."""
        return self._tok

    def __repr__(self) -> str:
        return (
            f"BundleTokenizer(vocab_size={self.vocab_size}, bos={self.bos_token!r}/{self.bos_token_id}, "
            f"eos={self.eos_token!r}/{list(self.eos_token_ids)})"
        )

    def to_json(self) -> str:
        """The tokenizer as used here (after special-token and post-processor changes), as JSON text."""
        return self._tok.to_str()

    @staticmethod
    def check_json(tokenizer_json: str) -> None:
        """Raise :class:`TokenizerError` unless ``tokenizer_json`` is JSON a ``tokenizers.Tokenizer`` loads."""
        try:
            Tokenizer.from_str(tokenizer_json)
        except Exception as e:
            raise TokenizerError(f"tokenizer.json cannot be loaded: {e}") from None


class StreamDecoder:
    """Incremental detokenizer: feed generated ids one at a time, get the new printable text.

    The text is found by decoding a short window of recent ids twice: the part already printed and the
    whole window; what the second adds to the first is new.  The window starts at an id that was already
    printed, so decoders that treat the first token specially (SentencePiece's leading-space strip) give the
    same text as one decode of the whole sequence.  While the window's text ends in U+FFFD the last token(s)
    hold an incomplete UTF-8 character and nothing is printed; :meth:`flush` prints what is left at the end
    (a real replacement character or invalid bytes included).

    With no ``context_ids`` the concatenated output equals ``tokenizer.decode(all_ids)``.  ``context_ids``
    (e.g. the last prompt token) seed the window so the first generated token keeps its leading space, as
    it would in a decode of prompt + generation.
    """

    #: Pending ids after which text is printed even if it ends in U+FFFD (a UTF-8 character is at most 4
    #: bytes, so longer runs are invalid bytes, not a split character).
    MAX_PENDING = 8

    def __init__(
        self, tokenizer: BundleTokenizer, skip_special_tokens: bool = True, context_ids: Sequence[int] = ()
    ) -> None:
        self._tokenizer = tokenizer
        self._skip = skip_special_tokens
        self.reset(context_ids)

    def reset(self, context_ids: Sequence[int] = ()) -> None:
        """Forget everything fed so far (start of a new generation)."""
        self._ids: list[int] = [int(i) for i in context_ids]
        self._printed = len(self._ids)  # ids[:printed] are covered by the printed text
        self._printed_text = self._decode(self._ids)

    def _decode(self, ids: list[int]) -> str:
        return self._tokenizer.decode(ids, skip_special_tokens=self._skip) if ids else ""

    def feed(self, token_id: int) -> str:
        """Add one id; return the text it completes (possibly empty)."""
        self._ids.append(int(token_id))
        text = self._decode(self._ids)
        pending = len(self._ids) - self._printed
        if text.endswith(_REPLACEMENT) and pending < self.MAX_PENDING:
            return ""
        return self._advance(text)

    def flush(self) -> str:
        """Text still held back (an unfinished character at the end of generation)."""
        if len(self._ids) == self._printed:
            return ""
        return self._advance(self._decode(self._ids))

    def _advance(self, text: str) -> str:
        if len(text) <= len(self._printed_text):
            # Nothing printable yet (e.g. only skipped special tokens): keep the ids in the window.
            return ""
        new = text[len(self._printed_text):]
        # Next window starts at the ids printed by this step's predecessor window end.
        start = self._printed
        self._ids = self._ids[start:]
        self._printed = len(self._ids)
        self._printed_text = self._decode(self._ids)
        return new

    def __call__(self, token_id: int) -> str:
        return self.feed(token_id)

"""Chat templates: render a conversation into a prompt string, safely.

A bundle carries the model's Jinja chat template (``tokenizer_config.json``'s ``chat_template``).  Bundles are
untrusted, so templates render in a sandbox under output and time budgets (:mod:`fate.runtime.template_sandbox`;
by default 1 MiB, or 4x the characters of the inputs when that is more, and 10 s).  Anything that goes
wrong while rendering raises :class:`~fate.errors.ChatTemplateError` (or its subclass
``ChatTemplateSecurityError``), so callers have one exception to catch.

Rendering follows transformers' ``apply_chat_template(..., tokenize=False)``: ``trim_blocks`` and
``lstrip_blocks`` on, the ``loopcontrols`` extension and the ``{% generation %}`` tag, the globals
``raise_exception``, ``strftime_now``, ``namespace`` and ``dict``, a ``tojson`` filter that does not escape
HTML or non-ASCII (``ensure_ascii=False``) and takes ``indent``/``separators``/``sort_keys``, messages with
``None``-valued keys dropped, reasoning fields aliased, and the special token strings passed as variables.
The prompt it returns must be tokenized without adding special tokens
(:meth:`fate.runtime.tokenizer.BundleTokenizer.encode_chat`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from fate.errors import ChatTemplateError
from fate.runtime.template_sandbox import (DEFAULT_MAX_OUTPUT_CHARS, DEFAULT_TIMEOUT_S, compile_template, plain, render,
                                            text_chars)

__all__ = [
    "ChatSession",
    "DEFAULT_MAX_OUTPUT_CHARS",
    "DEFAULT_TIMEOUT_S",
    "common_prefix_length",
    "render_chat",
    "select_chat_template",
]


# --- template selection ------------------------------------------------------------------------------


def select_chat_template(
    chat_template: str | Sequence[Mapping[str, Any]] | Mapping[str, str] | None,
    name: str | None = None,
    *,
    tools: Sequence[Any] | None = None,
) -> str:
    """Pick one template from ``tokenizer_config.json``'s ``chat_template``.

    ``chat_template`` is a string (returned as is, ``name`` must then be None or "default"), a list of
    ``{"name": ..., "template": ...}`` or a dict name -> template.  From several templates: ``name`` when
    given, else ``"tool_use"`` when ``tools`` are passed and there is one, else ``"default"`` -- as
    transformers does.
    """
    if chat_template is None:
        raise ChatTemplateError("the model has no chat template")
    if isinstance(chat_template, str):
        if name not in (None, "default"):
            raise ChatTemplateError(f"the model has a single chat template; there is no template named {name!r}")
        return chat_template
    templates: dict[str, str] = {}
    if isinstance(chat_template, Mapping):
        items = list(chat_template.items())
    elif isinstance(chat_template, Sequence):
        items = []
        for entry in chat_template:
            if not isinstance(entry, Mapping) or "name" not in entry or "template" not in entry:
                raise ChatTemplateError("a chat template list must hold {'name': ..., 'template': ...} entries")
            items.append((entry["name"], entry["template"]))
    else:
        raise ChatTemplateError(f"chat_template must be a string, a list or a dict, got {type(chat_template).__name__}")
    for key, value in items:
        if not isinstance(key, str) or not isinstance(value, str):
            raise ChatTemplateError("chat template names and templates must be strings")
        templates[key] = value
    if name is not None:
        if name not in templates:
            raise ChatTemplateError(f"no chat template named {name!r} (have: {', '.join(sorted(templates))})")
        return templates[name]
    if tools is not None and "tool_use" in templates:
        return templates["tool_use"]
    if "default" in templates:
        return templates["default"]
    raise ChatTemplateError(
        f"the model has several chat templates ({', '.join(sorted(templates))}) and none is named 'default'; "
        "choose one by name"
    )


# --- messages ------------------------------------------------------------------------------------------

_REASONING_FIELDS = ("reasoning_content", "thinking", "reasoning")

_REASONING_FIELDS = ("reasoning_content", "thinking", "reasoning")


def _prepare_messages(messages: Sequence[Mapping[str, Any]]) -> list[dict]:
    out = []
    for i, message in enumerate(messages):
        if not isinstance(message, Mapping):
            raise TypeError(f"chat message {i} must be a dict, got {type(message).__name__}")
        m = {k: v for k, v in plain(message, f"message {i}").items() if v is not None}
        reasoning = next((m[k] for k in _REASONING_FIELDS if k in m), None)
        if reasoning is not None:
            m = {"thinking": reasoning, **m, "reasoning_content": reasoning}
        out.append(m)
    return out


# --- rendering ---------------------------------------------------------------------------------------


def render_chat(
    template: str | Sequence[Mapping[str, Any]] | Mapping[str, str],
    messages: Sequence[Mapping[str, Any]],
    add_generation_prompt: bool = True,
    bos_token: str | None = None,
    eos_token: str | None = None,
    *,
    pad_token: str | None = None,
    unk_token: str | None = None,
    tools: Sequence[Mapping[str, Any]] | None = None,
    documents: Sequence[Mapping[str, Any]] | None = None,
    max_output_chars: int | None = None,
    timeout_s: float = DEFAULT_TIMEOUT_S,
    **extra: Any,
) -> str:
    """Render ``messages`` with a chat template, as transformers' ``apply_chat_template(tokenize=False)``.

    ``template`` is the template string (or the raw list/dict form, resolved by :func:`select_chat_template`).
    Special token strings that are None are not passed (the template sees them undefined, as with
    transformers when the tokenizer lacks them).  ``extra`` keyword arguments become template variables
    (e.g. ``enable_thinking=False``, ``date_string=...``).  Raises :class:`ChatTemplateError`.

    ``max_output_chars`` bounds the prompt and every string built while rendering; None means
    ``max(DEFAULT_MAX_OUTPUT_CHARS, 4 x the characters in the inputs)`` so long documents in messages fit.
    ``timeout_s`` bounds the wall-clock time of the render.
    """
    if not isinstance(template, str):
        template = select_chat_template(template, tools=tools)
    if (max_output_chars is not None and max_output_chars <= 0) or not timeout_s > 0:
        raise ValueError("max_output_chars and timeout_s must be positive")
    variables: dict[str, Any] = {}
    for key, value in (("bos_token", bos_token), ("eos_token", eos_token), ("unk_token", unk_token),
                       ("pad_token", pad_token)):
        if value is not None:
            variables[key] = value
    variables.update(plain(extra, "template variables"))
    variables.update(
        messages=_prepare_messages(messages),
        tools=plain(list(tools), "tools") if tools is not None else None,
        documents=plain(list(documents), "documents") if documents is not None else None,
        add_generation_prompt=bool(add_generation_prompt),
    )

    if max_output_chars is None:
        max_output_chars = max(DEFAULT_MAX_OUTPUT_CHARS, 4 * text_chars(variables))
    return render(template, variables, int(max_output_chars), float(timeout_s))


def common_prefix_length(a: Sequence[Any], b: Sequence[Any]) -> int:
    """Length of the longest common prefix of two sequences (token ids or strings).

    For KV-cache reuse between chat turns: encode the new full prompt, compare it with the ids already in the
    cache, and prefill only from the first differing position.
    """
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


class ChatSession:
    """A conversation for an interactive chat loop.

    Design: every turn renders the **full** conversation and returns the full prompt string (templates are
    free to rewrite earlier turns -- e.g. drop reasoning from old assistant messages -- so a textual "suffix"
    is not reliable).  The runtime tokenizes it with ``encode_chat`` and reuses its KV cache for the longest
    common token prefix with what it has already processed (:func:`common_prefix_length`).

    Typical loop::

        session = ChatSession(template, bos_token=tok.bos_token, eos_token=tok.eos_token, system="Be brief.")
        prompt = session.user("Hello")           # full prompt, ends with the assistant header
        reply = generate(tok.encode_chat(prompt))
        session.assistant(reply)                 # the decoded reply, without the EOS token
    """

    def __init__(
        self,
        template: str | Sequence[Mapping[str, Any]] | Mapping[str, str],
        *,
        system: str | None = None,
        bos_token: str | None = None,
        eos_token: str | None = None,
        max_output_chars: int | None = None,
        timeout_s: float = DEFAULT_TIMEOUT_S,
        **template_kwargs: Any,
    ) -> None:
        self.template = template if isinstance(template, str) else select_chat_template(template)
        compile_template(self.template)  # syntax errors surface now, not at the first turn
        self.bos_token = bos_token
        self.eos_token = eos_token
        self.max_output_chars = max_output_chars
        self.timeout_s = timeout_s
        self.template_kwargs = dict(template_kwargs)
        self._messages: list[dict[str, Any]] = []
        if system is not None:
            self._messages.append({"role": "system", "content": system})

    @property
    def messages(self) -> list[dict[str, Any]]:
        """A copy of the history."""
        return [dict(m) for m in self._messages]

    def render(self, add_generation_prompt: bool = True) -> str:
        """The full prompt for the current history."""
        return render_chat(
            self.template,
            self._messages,
            add_generation_prompt=add_generation_prompt,
            bos_token=self.bos_token,
            eos_token=self.eos_token,
            max_output_chars=self.max_output_chars,
            timeout_s=self.timeout_s,
            **self.template_kwargs,
        )

    def add(self, role: str, content: str, **fields: Any) -> None:
        """Append a message without rendering."""
        self._messages.append({"role": role, "content": content, **fields})

    def user(self, content: str) -> str:
        """Add a user message and return the full prompt asking for the assistant's reply.

        If the template rejects the conversation (e.g. roles must alternate), the message is not kept and
        :class:`ChatTemplateError` is raised.
        """
        self._messages.append({"role": "user", "content": content})
        try:
            return self.render(add_generation_prompt=True)
        except Exception:
            self._messages.pop()
            raise

    def assistant(self, content: str) -> None:
        """Record the model's reply (decoded text, no EOS)."""
        self._messages.append({"role": "assistant", "content": content})

    def pop(self) -> dict[str, Any]:
        """Remove and return the last message (e.g. to retry a turn)."""
        if not self._messages:
            raise IndexError("the conversation is empty")
        return self._messages.pop()

    def clear(self, keep_system: bool = True) -> None:
        """Forget the conversation (keeping a leading system message unless ``keep_system`` is False)."""
        keep = self._messages[:1] if keep_system and self._messages and self._messages[0]["role"] == "system" else []
        self._messages = keep

    def __len__(self) -> int:
        return len(self._messages)

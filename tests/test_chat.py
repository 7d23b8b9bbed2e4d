"""render_chat / ChatSession against transformers' apply_chat_template, and the sandbox's limits."""

from __future__ import annotations

import time

import pytest
from tokenizers import Tokenizer, models, pre_tokenizers

from fate.errors import ChatTemplateError, ChatTemplateSecurityError
from fate.runtime.chat import (
    ChatSession,
    common_prefix_length,
    render_chat,
    select_chat_template,
)

transformers = pytest.importorskip("transformers")
from transformers import PreTrainedTokenizerFast  # noqa: E402

# Qwen-style ChatML with a default system prompt, tools and tool calls.
CHATML = """{%- if tools %}
    {{- '<|im_start|>system\\n' }}
    {%- if messages[0]['role'] == 'system' %}
        {{- messages[0]['content'] }}
    {%- else %}
        {{- 'You are a helpful assistant.' }}
    {%- endif %}
    {{- "\\n\\n# Tools\\n\\n<tools>" }}
    {%- for tool in tools %}
        {{- "\\n" }}
        {{- tool | tojson }}
    {%- endfor %}
    {{- "\\n</tools><|im_end|>\\n" }}
{%- else %}
    {%- if messages[0]['role'] == 'system' %}
        {{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}
    {%- else %}
        {{- '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}
    {%- endif %}
{%- endif %}
{%- for message in messages %}
    {%- if message.role == "user" or (message.role == "system" and not loop.first) %}
        {{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}
    {%- elif message.role == "assistant" %}
        {{- '<|im_start|>' + message.role }}
        {%- if message.content %}
            {{- '\\n' + message.content }}
        {%- endif %}
        {%- for tool_call in message.tool_calls %}
            {%- if tool_call.function is defined %}
                {%- set tool_call = tool_call.function %}
            {%- endif %}
            {{- '\\n<tool_call>\\n{"name": "' }}
            {{- tool_call.name }}
            {{- '", "arguments": ' }}
            {{- tool_call.arguments | tojson }}
            {{- '}\\n</tool_call>' }}
        {%- endfor %}
        {{- '<|im_end|>\\n' }}
    {%- elif message.role == "tool" %}
        {{- '<|im_start|>user\\n<tool_response>\\n' + message.content + '\\n</tool_response><|im_end|>\\n' }}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\\n' }}
{%- endif %}
"""

# Mixtral / Llama-2 style: BOS text, [INST] blocks, alternation enforced with raise_exception.
MIXTRAL = (
    "{{ bos_token }}{% for message in messages %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if message['role'] == 'user' %}{{ '[INST] ' + message['content'] + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ message['content'] + eos_token }}"
    "{% else %}{{ raise_exception('Only user and assistant roles are supported!') }}{% endif %}{% endfor %}"
)

# tojson with its options, namespace, loop controls, dict(), the generation tag, whitespace control.
TOJSON = """{% set ns = namespace(n=0, last=none) %}
{% if tools is not none %}
TOOLS {{ tools | tojson(indent=2) }}
COMPACT {{ tools | tojson(separators=(',', ':'), sort_keys=true) }}
{% endif %}
{% for m in messages %}
  {% if m.role == 'skip' %}{% continue %}{% endif %}
  {% set ns.n = ns.n + 1 %}
  {% set ns.last = m.role %}
  {% if m.role == 'assistant' %}
    {% generation %}<assistant>{{ m | tojson }}</assistant>{% endgeneration %}
  {% else %}
    <{{ m.role }}>{{ m.content | tojson(indent=4) }}</{{ m.role }}>
  {% endif %}
  {% if ns.n >= 5 %}{% break %}{% endif %}
{% endfor %}
count={{ ns.n }} last={{ ns.last }} extra={{ dict(a=1, b=[1, 2]) | tojson }} flag={{ enable_thinking | default(true) }}
{% if add_generation_prompt %}<assistant>{% endif %}"""

MESSAGES = [
    {"role": "system", "content": "Tu es un assistant très utile. 答えは短く。"},
    {"role": "user", "content": "What's the weather in Zürich? 🌤️ <b>bold</b> & \"quotes\""},
    {
        "role": "assistant",
        "content": None,
        "tool_calls": [{"type": "function", "function": {"name": "get_weather",
                                                          "arguments": {"city": "Zürich", "unit": "°C"}}}],
    },
    {"role": "tool", "content": '{"temp": 21, "sky": "sunny ☀️"}'},
    {"role": "assistant", "content": "It is 21 °C and sunny in Zürich.", "reasoning_content": "Easy: read the tool."},
    {"role": "user", "content": "Thanks!\nAnd tomorrow?"},
]

TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "Wetter für eine Stadt — current weather",
            "parameters": {
                "type": "object",
                "properties": {"city": {"type": "string"}, "unit": {"type": "string", "enum": ["°C", "°F"]}},
                "required": ["city"],
            },
        },
    }
]


@pytest.fixture(scope="module")
def hf_tokenizer() -> PreTrainedTokenizerFast:
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, "<|im_end|>": 3, "a": 4}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")


def _hf_render(hf: PreTrainedTokenizerFast, template: str, messages, **kwargs) -> str:
    return hf.apply_chat_template(messages, chat_template=template, tokenize=False, **kwargs)


def _ours(template: str, messages, **kwargs) -> str:
    return render_chat(template, messages, bos_token="<s>", eos_token="</s>", unk_token="<unk>", **kwargs)


@pytest.mark.parametrize("gen", [True, False])
def test_chatml_matches_transformers(hf_tokenizer, gen):
    for messages in (MESSAGES, MESSAGES[1:2], MESSAGES[1:]):
        for tools in (None, TOOLS):
            expected = _hf_render(hf_tokenizer, CHATML, messages, add_generation_prompt=gen, tools=tools)
            assert _ours(CHATML, messages, add_generation_prompt=gen, tools=tools) == expected
    out = _ours(CHATML, MESSAGES[:2])
    assert out.startswith("<|im_start|>system\nTu es") and out.endswith("<|im_start|>assistant\n")


def test_mixtral_matches_transformers_and_raises(hf_tokenizer):
    convo = [
        {"role": "user", "content": "Hello"},
        {"role": "assistant", "content": "Hi! How can I help?"},
        {"role": "user", "content": "Tell me a joke"},
    ]
    for n in (1, 2, 3):
        for gen in (True, False):
            expected = _hf_render(hf_tokenizer, MIXTRAL, convo[:n], add_generation_prompt=gen)
            assert _ours(MIXTRAL, convo[:n], add_generation_prompt=gen) == expected
    assert _ours(MIXTRAL, convo) == "<s>[INST] Hello [/INST]Hi! How can I help?</s>[INST] Tell me a joke [/INST]"

    bad = [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]
    with pytest.raises(jinja_template_error()):
        _hf_render(hf_tokenizer, MIXTRAL, bad)
    with pytest.raises(ChatTemplateError, match="Conversation roles must alternate"):
        _ours(MIXTRAL, bad)
    with pytest.raises(ChatTemplateError, match="Only user and assistant roles"):
        _ours(MIXTRAL, [{"role": "user", "content": "x"}, {"role": "tool", "content": "y"}])


def jinja_template_error():
    import jinja2

    return jinja2.exceptions.TemplateError


@pytest.mark.parametrize("gen", [True, False])
def test_tojson_and_helpers_match_transformers(hf_tokenizer, gen):
    messages = MESSAGES + [{"role": "skip", "content": "ignored"}, {"role": "user", "content": "über"}]
    for tools in (None, TOOLS):
        for extra in ({}, {"enable_thinking": False}):
            expected = _hf_render(hf_tokenizer, TOJSON, messages, add_generation_prompt=gen, tools=tools, **extra)
            got = _ours(TOJSON, messages, add_generation_prompt=gen, tools=tools, **extra)
            assert got == expected
    got = _ours(TOJSON, messages, tools=TOOLS)
    assert "Zürich" in got and "°C" in got and "☀️" in got  # ensure_ascii=False
    assert "<b>bold</b> &" in got  # no HTML escaping
    assert '\n  {\n    "type": "function"' in got  # indent=2
    assert '"thinking": "Easy: read the tool."' in got  # reasoning fields aliased like transformers
    assert '"content": null' not in got  # None-valued keys dropped


def test_special_tokens_and_strftime(hf_tokenizer):
    template = "{{ bos_token }}|{{ eos_token }}|{{ unk_token }}|{{ pad_token }}|{{ strftime_now('%Y') }}|{{ x }}"
    assert _ours(template, [], x=5) == _hf_render(hf_tokenizer, template, [{"role": "user", "content": ""}], x=5)
    assert render_chat(template, [], x=1) == f"||||{time.strftime('%Y')}|1"


def test_select_chat_template():
    named = [
        {"name": "default", "template": "D"},
        {"name": "tool_use", "template": "T"},
        {"name": "rag", "template": "R"},
    ]
    assert select_chat_template("S") == "S"
    assert select_chat_template(named) == "D"
    assert select_chat_template(named, tools=[{"x": 1}]) == "T"
    assert select_chat_template(named, "rag") == "R"
    assert select_chat_template({"default": "D", "rag": "R"}, "rag") == "R"
    with pytest.raises(ChatTemplateError, match="no chat template named 'nope'"):
        select_chat_template(named, "nope")
    with pytest.raises(ChatTemplateError, match="none is named 'default'"):
        select_chat_template([{"name": "rag", "template": "R"}])
    with pytest.raises(ChatTemplateError, match="no chat template"):
        select_chat_template(None)
    # render_chat accepts the list form directly
    assert render_chat(named, [{"role": "user", "content": "x"}]) == "D"


def test_chat_session_renders_full_conversation():
    session = ChatSession(MIXTRAL, bos_token="<s>", eos_token="</s>")
    p1 = session.user("Hello")
    assert p1 == "<s>[INST] Hello [/INST]"
    session.assistant("Hi!")
    p2 = session.user("More")
    assert p2 == "<s>[INST] Hello [/INST]Hi!</s>[INST] More [/INST]"
    assert common_prefix_length(p1, p2) == len(p1)
    assert common_prefix_length([1, 2, 3], [1, 2, 4, 5]) == 2
    # a message the template rejects is not kept
    with pytest.raises(ChatTemplateError, match="alternate"):
        session.user("again")
    assert [m["role"] for m in session.messages] == ["user", "assistant", "user"]
    assert session.pop()["content"] == "More"
    assert len(session) == 2
    session.clear()
    assert len(session) == 0

    chatml = ChatSession(CHATML, system="Be brief.")
    prompt = chatml.user("Hi")
    expected = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    assert prompt == render_chat(CHATML, expected)
    chatml.assistant("Hello.")
    chatml.clear()
    assert chatml.messages == [{"role": "system", "content": "Be brief."}]
    with pytest.raises(ChatTemplateError, match="syntax error"):
        ChatSession("{% for %}")


# --- sandbox and budgets ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "template",
    [
        "{{ ''.__class__.__mro__ }}",
        "{{ ''.__class__.__mro__[1].__subclasses__() }}",
        "{{ messages.__class__ }}",
        "{{ messages[0]['content'].__class__.__base__ }}",
        "{{ cycler.__init__.__globals__ }}",
        "{{ raise_exception.__globals__ }}",
        "{{ ''['__class__'] }}",
        "{{ x | attr('__class__') }}",
        "{{ '{0.__class__}'.format('') }}",
        "{% set ns = namespace() %}{% set ns.__dict__ = 1 %}",
        "{{ namespace(_x=1) }}",
    ],
)
def test_unsafe_access_raises_security_error(template):
    with pytest.raises(ChatTemplateSecurityError):
        render_chat(template, [{"role": "user", "content": "hi"}], x="")


def test_output_bound_enforced():
    big = "{% for i in range(100000) %}{{ 'x' * 100 }}{% endfor %}"
    with pytest.raises(ChatTemplateError, match="limit"):
        render_chat(big, [])
    with pytest.raises(ChatTemplateError, match="limit"):
        render_chat(big, [], max_output_chars=1000)
    # an explicit bound also applies to strings built but never printed
    doubling = ("{% set ns = namespace(s='ab') %}{% for i in range(40) %}{% set ns.s = ns.s ~ ns.s %}"
                "{% endfor %}{{ ns.s | length }}")
    with pytest.raises(ChatTemplateError, match="limit"):
        render_chat(doubling, [])
    for template in (
        "{{ 'a' * 10000000 }}",
        "{{ 'x'.center(100000000) }}",
        "{{ '%0999999999d' % 1 }}",
        "{{ '{:>99999999}'.format(1) }}",
        "{{ '{:{}}'.format(1, 99999999) }}",
        "{{ '%(k)999999999s' % {'k': 1} }}",
        "{{ '%*d' % (99999999, 1) }}",
        "{{ '%09999999d' | format(1) }}",
        "{{ ('\\n' * 500000) | indent(1000) }}",
        "{{ ('x' * 2000) | join('y' * 2000) }}",
        "{{ ('x' * 2000).replace('', 'y' * 2000) }}",
        "{% set s %}{% for i in range(100000) %}xxxxxxxxxxxxxxxxxxxx{% endfor %}{% endset %}",
        "{{ 2 ** 10000000 }}",
        "{{ range(10000000) | list }}",
    ):
        with pytest.raises(ChatTemplateError):
            render_chat(template, [])
    # ordinary formatting is untouched
    assert render_chat("{{ '%5d|%-3s|%.2f|%%|%d' % (3, 'a', 1.5, 5000000) }}", []) == "    3|a  |1.50|%|5000000"
    assert render_chat("{{ '{:>5}|{!r}|{}'.format(1, 'x', 5000000) }}", []) == "    1|'x'|5000000"
    # within the limit all is fine
    assert render_chat("{{ 'x' * 1000 }}", [], max_output_chars=1000) == "x" * 1000
    with pytest.raises(ChatTemplateError):
        render_chat("{{ 'x' * 1001 }}", [], max_output_chars=1000)
    # by default a long document in a message still fits
    doc = "lorem ipsum " * 200_000
    assert len(render_chat("{{ messages[0].content }}", [{"role": "user", "content": doc}])) == len(doc)


def test_endless_loops_hit_the_deadline():
    slow = "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}"
    t0 = time.monotonic()
    with pytest.raises(ChatTemplateError, match="longer than"):
        render_chat(slow, [], timeout_s=0.3)
    assert time.monotonic() - t0 < 5
    recursive = "{% macro f(n) %}{{ f(n) }}{{ f(n) }}{% endmacro %}{{ f(1) }}"
    with pytest.raises(ChatTemplateError):
        render_chat(recursive, [], timeout_s=0.3)


def test_errors_are_chat_template_errors():
    with pytest.raises(ChatTemplateError, match="syntax error"):
        render_chat("{% if %}", [])
    with pytest.raises(ChatTemplateError, match="failed"):
        render_chat("{{ 1 + 'a' }}", [])
    with pytest.raises(TypeError):
        render_chat("x", [object()])
    # a template that reads a missing variable renders it empty, like transformers
    assert render_chat("[{{ nothing }}]", []) == "[]"

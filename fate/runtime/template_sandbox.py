"""The sandbox chat templates render in: bundles are untrusted, so their Jinja templates run in jinja2's
``ImmutableSandboxedEnvironment`` and, on top of it, under budgets:

* access to an unsafe attribute (``''.__class__``, ``x.__globals__``, ...) raises
  :class:`~fate.errors.ChatTemplateSecurityError` at once, instead of the sandbox's silent undefined value;
* the output (and every string the template builds with ``~``, ``+``, ``*``, ``%``, filters, string methods
  or ``{% set %}`` blocks) is bounded by ``max_chars``;
* every loop iteration, call and operator checks a wall-clock deadline (``timeout_s``), so nested loops over
  ``range()`` (which the sandbox caps at 100 000 items each) cannot run for hours;
* integer powers are bounded, and ``lipsum`` is not provided.

The size checks run before or right after each operation, so they bound runaway growth rather than memory
exactly: one step can still build something a few times the budget (e.g. ``tojson`` of a long repeated
list) before a check trips.  Anything that goes wrong raises :class:`~fate.errors.ChatTemplateError` (or its
subclass ``ChatTemplateSecurityError``).

The environment is transformers' (``trim_blocks`` and ``lstrip_blocks`` on, ``loopcontrols`` and the
``{% generation %}`` tag, the globals ``raise_exception``, ``strftime_now``, ``namespace`` and ``dict``, a
``tojson`` filter that does not escape HTML or non-ASCII and takes ``indent``/``separators``/``sort_keys``).
:mod:`fate.runtime.chat` builds the variables a chat template sees and calls :func:`render`.
"""


from __future__ import annotations

import contextvars
import functools
import json
import math
import re
import string
import time
import types
from collections.abc import Iterable, Mapping, Sequence
from datetime import datetime
from typing import Any

import jinja2
from jinja2 import nodes
from jinja2.exceptions import SecurityError, TemplateError, TemplateSyntaxError
from jinja2.ext import Extension, loopcontrols
from jinja2.sandbox import ImmutableSandboxedEnvironment
from jinja2.utils import Namespace

from fate.errors import ChatTemplateError, ChatTemplateSecurityError

__all__ = ["render", "compile_template", "plain", "text_chars", "DEFAULT_MAX_OUTPUT_CHARS", "DEFAULT_TIMEOUT_S"]

DEFAULT_MAX_OUTPUT_CHARS = 1 << 20
DEFAULT_TIMEOUT_S = 10.0

# Largest integer power result (in bits) a template may compute.
_MAX_INT_BITS = 1 << 16
# Largest indent tojson accepts.
_MAX_JSON_INDENT = 256


# --- budgets -----------------------------------------------------------------------------------------


class _Budget:
    __slots__ = ("deadline", "max_chars", "timeout_s")

    def __init__(self, max_chars: int, timeout_s: float) -> None:
        self.max_chars = max_chars
        self.timeout_s = timeout_s
        self.deadline = time.monotonic() + timeout_s

    def tick(self) -> None:
        if time.monotonic() > self.deadline:
            raise ChatTemplateError(f"chat template rendering took longer than {self.timeout_s:g} s")

    def check_chars(self, n: int, what: str) -> None:
        if n > self.max_chars:
            raise ChatTemplateError(f"chat template output limit exceeded: {what} would be {n} characters "
                                    f"(limit {self.max_chars})")


_BUDGET: contextvars.ContextVar[_Budget | None] = contextvars.ContextVar("fate_chat_budget", default=None)
_FALLBACK_BUDGET_ARGS = (DEFAULT_MAX_OUTPUT_CHARS, DEFAULT_TIMEOUT_S)


def _budget() -> _Budget:
    budget = _BUDGET.get()
    if budget is None:  # a compiled template used outside render_chat(): sizes stay bounded
        budget = _Budget(*_FALLBACK_BUDGET_ARGS)
    return budget


def _size(value: Any) -> int:
    """Characters ``value`` stands for: a string's length; for a list/tuple the lengths of the strings
    directly in it (they may be joined later) and 8 per other item."""
    if isinstance(value, str):
        return len(value)
    if isinstance(value, (list, tuple)):
        return sum(len(v) if isinstance(v, str) else 8 for v in value)
    return 0


def _check_result(value: Any, what: str) -> Any:
    if isinstance(value, (str, list, tuple)):
        _budget().check_chars(_size(value), what)
    return value


def _check_int_args(args: Iterable[Any], what: str) -> None:
    limit = _budget().max_chars
    for a in args:
        if _is_int(a) and abs(a) > limit:
            raise ChatTemplateError(f"chat template passed a too large number ({a}) to {what}")


_DIGITS = re.compile(r"[0-9]+")
_ASCII_DIGITS = "0123456789"


def _percent_spec_numbers(fmt: str) -> tuple[list[str], bool]:
    """Widths and precisions of the %-conversions in ``fmt`` (one linear scan), and whether one is ``*``."""
    numbers: list[str] = []
    star = False
    n = len(fmt)
    i = fmt.find("%")
    while 0 <= i < n - 1:
        j = i + 1
        if fmt[j] == "(":  # %(key)s
            close = fmt.find(")", j)
            if close < 0:
                break  # malformed: the formatting itself will fail
            j = close + 1
        while j < n and fmt[j] in "-#0 +":
            j += 1
        for part in ("width", "precision"):
            if part == "precision":
                if j < n and fmt[j] == ".":
                    j += 1
                else:
                    break
            if j < n and fmt[j] == "*":
                star = True
                j += 1
            else:
                k = j
                while j < n and fmt[j] in _ASCII_DIGITS:
                    j += 1
                if j > k:
                    numbers.append(fmt[k:j])
        i = fmt.find("%", j + 1)  # skip the conversion character ("%%" included)
    return numbers, star


def _brace_spec_numbers(fmt: str) -> tuple[list[str], bool]:
    """Numbers in the format specs of the {}-fields in ``fmt``, and whether a spec is itself a field."""
    numbers: list[str] = []
    star = False
    try:
        fields = list(string.Formatter().parse(fmt))
    except ValueError:
        return numbers, star  # malformed: the formatting itself will fail
    for _literal, _field, spec, _conversion in fields:
        if spec:
            numbers.extend(_DIGITS.findall(spec))
            star = star or "{" in spec
    return numbers, star


def _check_format_string(fmt: str, args: Sequence[Any], what: str, style: str) -> None:
    """The widths and precisions a %- or {}-format string asks for must fit the output budget."""
    numbers, star = _percent_spec_numbers(fmt) if style == "%" else _brace_spec_numbers(fmt)
    if any(len(n) > 9 for n in numbers):
        total = math.inf
    else:
        total = len(fmt) + sum(int(n) for n in numbers)
        if star:
            total += sum(abs(a) for a in args if _is_int(a))
    if total > _budget().max_chars:
        raise ChatTemplateError(f"chat template format string in {what} would exceed the output limit")


def _join_estimate(sep: str, items: list[Any]) -> int:
    return len(sep) * max(len(items) - 1, 0) + sum(len(x) if isinstance(x, str) else 16 for x in items)


# --- the environment ---------------------------------------------------------------------------------


class _GenerationTag(Extension):
    """``{% generation %}...{% endgeneration %}`` marks assistant text for training masks; rendering just
    outputs the body (in its own scope, like transformers' tag)."""

    tags = {"generation"}

    def parse(self, parser: Any) -> nodes.Node:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

    def _body(self, caller: Any) -> str:
        return caller()


class _TemplateNamespace(Namespace):
    """``namespace()`` that refuses underscore-prefixed attribute names."""

    def __init__(*args: Any, **kwargs: Any) -> None:  # noqa: N805 - same calling trick as jinja's Namespace
        self, args = args[0], args[1:]
        attrs = dict(*args, **kwargs)
        for key in attrs:
            _TemplateNamespace._check(key)
        Namespace.__init__(self, attrs)

    def __setitem__(self, name: str, value: Any) -> None:
        _TemplateNamespace._check(name)
        Namespace.__setitem__(self, name, value)

    @staticmethod
    def _check(name: Any) -> None:
        if isinstance(name, str) and name.startswith("_"):
            raise SecurityError(f"namespace attribute {name!r} is not allowed (underscore prefix)")


class _DictFactory:
    """The ``dict`` global: builds plain dicts, exposes nothing of the ``dict`` type itself."""

    def __call__(self, *args: Any, **kwargs: Any) -> dict:
        return dict(*args, **kwargs)

    def fromkeys(self, keys: Iterable[Any], value: Any = None) -> dict:
        return dict.fromkeys(keys, value)


def _raise_exception(message: Any) -> None:
    raise ChatTemplateError(f"chat template error: {message}")


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


def _tojson(value: Any, ensure_ascii: bool = False, indent: Any = None, separators: Any = None,
            sort_keys: bool = False) -> str:
    if isinstance(indent, int) and not isinstance(indent, bool) and indent > _MAX_JSON_INDENT:
        raise ChatTemplateError(f"tojson indent {indent} is too large")
    if isinstance(indent, str) and len(indent) > _MAX_JSON_INDENT:
        raise ChatTemplateError("tojson indent string is too long")
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


# Filters whose integer arguments are sizes of their output.
_SIZE_ARG_FILTERS = frozenset({"batch", "center", "indent", "slice", "truncate", "urlize", "wordwrap"})


def _guard_filter(name: str, func: Any) -> Any:
    @functools.wraps(func)  # keeps jinja's pass_context/pass_eval_context/pass_environment marker
    def guarded(*args: Any, **kwargs: Any) -> Any:
        budget = _budget()
        budget.tick()
        # the filtered value first, then the filter's own arguments
        plain = [a for a in args if not isinstance(a, (jinja2.runtime.Context, nodes.EvalContext,
                                                       jinja2.Environment))]
        if name in _SIZE_ARG_FILTERS:
            _check_int_args(plain[1:] + list(kwargs.values()), f"filter {name!r}")
        if name == "format" and plain and isinstance(plain[0], str):
            _check_format_string(plain[0], plain[1:] + list(kwargs.values()), "filter 'format'", "%")
        elif name == "indent" and plain and isinstance(plain[0], str):
            width = plain[1] if len(plain) > 1 else kwargs.get("width", 4)
            width_chars = len(width) if isinstance(width, str) else int(width or 0)
            budget.check_chars(len(plain[0]) + width_chars * (plain[0].count("\n") + 1), "filter 'indent'")
        elif name == "join" and plain:
            items = plain[0]
            if not isinstance(items, (list, tuple, str)):
                items = list(items)
                args = tuple(items if a is plain[0] else a for a in args)
            sep = plain[1] if len(plain) > 1 and isinstance(plain[1], str) else kwargs.get("d", "")
            if isinstance(sep, str):
                budget.check_chars(_join_estimate(sep, list(items)), "filter 'join'")
        return _check_result(func(*args, **kwargs), f"filter {name!r}")

    return guarded


class _GuardedEnvironment(ImmutableSandboxedEnvironment):
    """The sandbox plus the budgets described in the module docstring."""

    intercepted_binops = frozenset({"*", "**", "+", "%"})

    def __init__(self) -> None:
        super().__init__(
            trim_blocks=True,
            lstrip_blocks=True,
            autoescape=False,
            extensions=[loopcontrols, _GenerationTag],
        )
        self.globals.pop("lipsum", None)
        self.globals["raise_exception"] = _raise_exception
        self.globals["strftime_now"] = _strftime_now
        self.globals["namespace"] = _TemplateNamespace
        self.globals["dict"] = _DictFactory()
        self.filters["tojson"] = _tojson
        self.filters = {name: _guard_filter(name, f) for name, f in self.filters.items()}
        # reached from compiled code as environment.<name> (see _rewrite_tree), not as template variables
        self.fate_loop_guard = _loop_guard
        self.fate_concat = _guarded_concat
        self.concat = _guarded_output_concat  # {% set %} blocks, macro bodies and caller() results

    # An unsafe attribute fails loudly instead of rendering as an empty undefined value.
    def unsafe_undefined(self, obj: Any, attribute: str) -> Any:
        raise SecurityError(f"access to attribute {attribute!r} of {type(obj).__name__!r} object is unsafe")

    def call(__self, __context: Any, __obj: Any, *args: Any, **kwargs: Any) -> Any:  # noqa: N805
        _budget().tick()
        owner = getattr(__obj, "__self__", None)
        if isinstance(owner, str) and isinstance(__obj, types.BuiltinMethodType):
            args = __self._precheck_str_method(owner, __obj.__name__, args, kwargs)
        result = ImmutableSandboxedEnvironment.call(__self, __context, __obj, *args, **kwargs)
        return _check_result(result, "a call result")

    @staticmethod
    def _precheck_str_method(s: str, name: str, args: tuple, kwargs: dict) -> tuple:
        budget = _budget()
        if name == "replace" and len(args) >= 2 and isinstance(args[0], str) and isinstance(args[1], str):
            old, new = args[0], args[1]
            count = s.count(old) if old else len(s) + 1
            if len(args) > 2 and isinstance(args[2], int) and args[2] >= 0:
                count = min(count, args[2])
            budget.check_chars(len(s) + count * max(len(new) - len(old), 0), "str.replace()")
        elif name == "join" and args:
            items = args[0] if isinstance(args[0], (list, tuple, str)) else list(args[0])
            budget.check_chars(_join_estimate(s, list(items)), "str.join()")
            args = (items,) + tuple(args[1:])
        elif name == "expandtabs":
            size = args[0] if args else kwargs.get("tabsize", 8)
            if isinstance(size, int):
                budget.check_chars(len(s) + s.count("\t") * max(size, 0), "str.expandtabs()")
        elif name in ("center", "ljust", "rjust", "zfill") and args and _is_int(args[0]):
            budget.check_chars(max(len(s), args[0]), f"str.{name}()")
        return args

    def wrap_str_format(self, value: Any) -> Any:
        wrapped = super().wrap_str_format(value)
        if wrapped is None:
            return None
        fmt = value.__self__

        @functools.wraps(wrapped)
        def checked(*args: Any, **kwargs: Any) -> str:
            _check_format_string(fmt, list(args) + list(kwargs.values()), "str.format()", "{")
            return _check_result(wrapped(*args, **kwargs), "str.format()")

        return checked

    def call_binop(self, context: Any, operator: str, left: Any, right: Any) -> Any:
        budget = _budget()
        budget.tick()
        if operator == "*":
            for seq, n in ((left, right), (right, left)):
                if isinstance(seq, (str, list, tuple)) and isinstance(n, int) and not isinstance(n, bool):
                    budget.check_chars(_size(seq) * max(n, 0), "a repetition")
            if _is_int(left) and _is_int(right) and left.bit_length() + right.bit_length() > _MAX_INT_BITS:
                raise ChatTemplateError("chat template integer arithmetic result is too large")
        elif operator == "**":
            if _is_int(left) and _is_int(right) and right > 0 and abs(left) > 1:
                if right * math.log2(abs(left)) > _MAX_INT_BITS:
                    raise ChatTemplateError("chat template integer power is too large")
        elif operator == "+":
            if isinstance(left, (str, list, tuple)) and isinstance(right, (str, list, tuple)):
                budget.check_chars(_size(left) + _size(right), "a concatenation")
        elif operator == "%":
            if isinstance(left, str):
                fmt_args = right if isinstance(right, tuple) else (right,)
                _check_format_string(left, list(fmt_args), "'%' formatting", "%")
        return _check_result(super().call_binop(context, operator, left, right), f"operator {operator!r}")


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _loop_guard(iterable: Any) -> Any:
    """Wraps every ``{% for %}`` iterable: a deadline check per item."""
    budget = _budget()
    for item in iterable:
        budget.tick()
        yield item


def _guarded_concat(parts: Sequence[Any]) -> str:
    """The ``~`` operator: join the parts' strings within the output budget."""
    strings = [str(p) for p in parts]
    _budget().check_chars(sum(map(len, strings)), "a '~' concatenation")
    return "".join(strings)


def _guarded_output_concat(chunks: Iterable[str]) -> str:
    budget = _budget()
    out: list[str] = []
    total = 0
    for chunk in chunks:
        total += len(chunk)
        budget.check_chars(total, "a block of template output")
        out.append(chunk)
    return "".join(out)


def _rewrite_tree(tree: nodes.Template) -> None:
    """Route loop iterables through ``_fate_loop_guard`` and ``~`` through ``_fate_concat``."""
    for loop in tree.find_all(nodes.For):
        loop.iter = nodes.Call(
            nodes.EnvironmentAttribute("fate_loop_guard"), [loop.iter], [], None, None
        ).set_lineno(loop.iter.lineno or loop.lineno)
    for parent in list(tree.find_all(nodes.Node)):
        for field, value in parent.iter_fields():
            if isinstance(value, nodes.Concat):
                setattr(parent, field, _concat_call(value))
            elif isinstance(value, list):
                for i, item in enumerate(value):
                    if isinstance(item, nodes.Concat):
                        value[i] = _concat_call(item)


def _concat_call(node: nodes.Concat) -> nodes.Call:
    return nodes.Call(
        nodes.EnvironmentAttribute("fate_concat"), [nodes.List(list(node.nodes))], [], None, None
    ).set_lineno(node.lineno)


_ENV = _GuardedEnvironment()


@functools.lru_cache(maxsize=16)
def compile_template(template: str) -> jinja2.Template:
    try:
        tree = _ENV.parse(template)
        _rewrite_tree(tree)
        return _ENV.from_string(tree)
    except TemplateSyntaxError as e:
        where = f" (line {e.lineno})" if e.lineno else ""
        raise ChatTemplateError(f"chat template syntax error{where}: {e.message}") from None
    except SecurityError as e:
        raise ChatTemplateSecurityError(f"chat template is unsafe: {e}") from None


# --- inputs ------------------------------------------------------------------------------------------


def plain(value: Any, where: str) -> Any:
    """A copy of ``value`` made only of JSON-like builtins (what templates get to see)."""
    if value is None or type(value) in (str, int, float, bool):
        return value
    if isinstance(value, bool):
        return bool(value)
    if isinstance(value, str):
        return str.__str__(value)
    if isinstance(value, int):
        return int.__int__(value)
    if isinstance(value, float):
        return float.__float__(value)
    if isinstance(value, Mapping):
        return {plain(k, where): plain(v, where) for k, v in value.items()}
    if isinstance(value, list):
        return [plain(v, where) for v in value]
    if isinstance(value, tuple):
        return tuple(plain(v, where) for v in value)
    raise TypeError(f"{where}: chat template inputs must be JSON-like data, got {type(value).__name__}")


def text_chars(value: Any) -> int:
    """Characters of the strings in plain data (keys included)."""
    if isinstance(value, str):
        return len(value)
    if isinstance(value, Mapping):
        return sum(text_chars(k) + text_chars(v) for k, v in value.items())
    if isinstance(value, (list, tuple)):
        return sum(text_chars(v) for v in value)
    return 8


# --- rendering ---------------------------------------------------------------------------------------


def render(template: str, variables: dict[str, Any], max_chars: int, timeout_s: float = DEFAULT_TIMEOUT_S) -> str:
    """``template`` rendered with ``variables`` (plain data: see :func:`plain`) in the sandbox, the output and
    every string built on the way bounded by ``max_chars``, the render by ``timeout_s`` seconds."""
    if max_chars <= 0 or not timeout_s > 0:
        raise ValueError("max_chars and timeout_s must be positive")
    compiled = compile_template(template)
    budget = _Budget(int(max_chars), float(timeout_s))
    token = _BUDGET.set(budget)
    try:
        pieces: list[str] = []
        total = 0
        for chunk in compiled.generate(**variables):
            total += len(chunk)
            budget.check_chars(total, "the rendered prompt")
            budget.tick()
            pieces.append(chunk)
        return "".join(pieces)
    except ChatTemplateError:
        raise
    except SecurityError as e:
        raise ChatTemplateSecurityError(f"chat template is unsafe: {e}") from None
    except OverflowError as e:  # the sandbox's range() limit
        raise ChatTemplateError(f"chat template exceeded a sandbox limit: {e}") from None
    except RecursionError:
        raise ChatTemplateError("chat template recursed too deeply") from None
    except MemoryError:
        raise ChatTemplateError("chat template ran out of memory") from None
    except TemplateError as e:
        raise ChatTemplateError(f"chat template error: {e}") from None
    except Exception as e:  # TypeError, KeyError, ... raised by template expressions
        raise ChatTemplateError(f"chat template failed: {type(e).__name__}: {e}") from e
    finally:
        _BUDGET.reset(token)

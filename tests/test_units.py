"""fate.units (sizes and rates, parsed and printed in one place) and fate.errors (one exception tree)."""

from __future__ import annotations

import importlib
import inspect
import pkgutil
import types

import pytest

import fate
from fate import errors as E
from fate.units import SizeError, format_rate, format_size, parse_size


@pytest.mark.parametrize("text, want", [
    ("6GiB", 6 * 2**30), ("512MiB", 512 * 2**20), ("1.5GB", 1_500_000_000), ("1000", 1000), ("1000B", 1000),
    ("4KiB", 4096), ("4kb", 4000), ("2Ti", 2 * 2**40), (" 8 MiB ", 8 * 2**20), (".5KiB", 512), ("3g", 3 * 10**9),
])
def test_parse_size_accepts_sizes(text, want):
    assert parse_size(text) == want


@pytest.mark.parametrize("text", ["", "abc", "GiB", "-1", "1e3", "6 GB/s", "6XB", "1.2.3", "50%", "6GiBs", "0x10"])
def test_parse_size_rejects_junk_with_one_user_error(text):
    with pytest.raises(SizeError) as info:
        parse_size(text)
    e = info.value
    assert isinstance(e, E.UsageError) and isinstance(e, E.UserError) and isinstance(e, ValueError)
    msg = str(e)
    assert repr(text) in msg and "6GiB" in msg and "\n" not in msg  # names the input and the form to use


@pytest.mark.parametrize("n, want", [
    (0, "0 B"), (512, "512 B"), (1023, "1023 B"), (1024, "1.0 KiB"), (25088, "24.5 KiB"), (1536 * 2**20, "1.5 GiB"),
    (3 * 2**40, "3.0 TiB"), (-2048, "-2.0 KiB"), (1023.6, "1.0 KiB"),
])
def test_format_size(n, want):
    assert format_size(n) == want


def test_format_size_ceil_never_prints_less_than_the_value():
    assert format_size(1025) == "1.0 KiB" and format_size(1025, ceil=True) == "1.1 KiB"
    assert format_size(2**30 + 1, ceil=True) == "1.1 GiB" and format_size(2**30, ceil=True) == "1.0 GiB"
    assert format_size(1023.2, ceil=True) == "1.0 KiB"  # 1024 bytes after rounding up
    for n in (1025, 5 * 2**20 + 7, 3 * 2**30 + 12345, 123457):
        value, unit = format_size(n, ceil=True).split()
        scale = {"B": 1, "KiB": 2**10, "MiB": 2**20, "GiB": 2**30}[unit]
        assert float(value) * scale >= n


def test_format_size_of_non_finite_values():
    assert format_size(float("nan")) == "nan B" and format_size(float("inf")) == "inf B"


@pytest.mark.parametrize("rate, want", [
    (12e9, "12 GB/s"), (80e6, "80 MB/s"), (236e6, "236 MB/s"), (1.5e12, "1.5 TB/s"), (2500, "2.5 KB/s"),
    (500, "500 B/s"), (31.5e9, "31.5 GB/s"),
])
def test_format_rate(rate, want):
    assert format_rate(rate) == want


# --- one exception tree -------------------------------------------------------------------------------
def fate_modules() -> list[types.ModuleType]:
    """Every module of the fate package, imported."""
    mods = [fate]
    for info in pkgutil.walk_packages(fate.__path__, prefix="fate."):
        mods.append(importlib.import_module(info.name))
    return mods


def foreign_exceptions(modules) -> list[str]:
    """Exception classes defined in ``modules`` that do not derive from fate.errors.FateError."""
    bad = []
    for mod in modules:
        for name, obj in vars(mod).items():
            if (inspect.isclass(obj) and issubclass(obj, BaseException) and obj.__module__ == mod.__name__
                    and not issubclass(obj, E.FateError)):
                bad.append(f"{mod.__name__}.{name}")
    return bad


def test_the_walk_finds_every_module_and_every_exception_class():
    names = {m.__name__ for m in fate_modules()}
    for expected in ("fate.units", "fate.runtime.experts.store", "fate.serve.app", "fate.cli.run", "fate.quant.expert",
                     "fate.tools.perplexity", "fate.formats.bundle"):
        assert expected in names
    # the check itself can fail: a module with an exception class of another root is reported
    rogue = types.ModuleType("fate.rogue")
    exec("class RogueError(ValueError):\n    pass\nclass Fine(__import__('fate').errors.UserError):\n    pass",
         rogue.__dict__)
    rogue.RogueError.__module__ = rogue.Fine.__module__ = "fate.rogue"
    assert foreign_exceptions([rogue]) == ["fate.rogue.RogueError"]


def test_every_fate_exception_derives_from_fate_error():
    assert foreign_exceptions(fate_modules()) == []


def test_the_tree_is_grouped_as_documented():
    user = (E.UsageError, E.BundleError, E.BundleStructureError, E.BundleMetadataError, E.BundleVersionError,
            E.ChecksumError, E.CheckpointError, E.ConfigError, E.UnsupportedArchitecture, E.ConvertError,
            E.RequestError, E.ContextFullError, E.BudgetError, E.LinkError, E.TokenizerError, E.ChatTemplateError,
            E.ChatTemplateSecurityError, SizeError)
    for cls in user:
        assert issubclass(cls, E.UserError) and issubclass(cls, ValueError), cls
    for cls in (E.EngineError, E.ApiError):
        assert issubclass(cls, E.FateError) and not issubclass(cls, E.UserError), cls
    assert issubclass(E.EngineError, RuntimeError)
    assert issubclass(E.ChecksumError, E.BundleError) and issubclass(E.ContextFullError, E.RequestError)
    from fate.tools.perplexity import PerplexityError

    assert issubclass(PerplexityError, E.RequestError)


def test_api_error_body_is_openai_shaped():
    e = E.ApiError(429, "too many requests", type="rate_limit_error", code="busy", headers={"Retry-After": "1"})
    assert e.status == 429 and str(e) == "too many requests" and e.headers == {"Retry-After": "1"}
    assert e.body() == {"error": {"message": "too many requests", "type": "rate_limit_error", "param": None,
                                  "code": "busy"}}
    assert E.ApiError(400, "x").headers == {} and E.ApiError(400, "x").type == "invalid_request_error"

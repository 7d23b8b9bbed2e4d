"""What every fate command shares: user mistakes become one line on stderr and a non-zero exit."""

from __future__ import annotations

import contextlib
import re
import sys

import click


def _user_error_types() -> tuple[type, ...]:
    from fate.convert.convert import ConvertError
    from fate.formats.bundle import BundleError
    from fate.formats.hf import CheckpointError
    from fate.runtime.budget import BudgetError
    from fate.runtime.chat import ChatTemplateError
    from fate.runtime.link import LinkError
    from fate.runtime.config import ConfigError
    from fate.runtime.engine import RuntimeUserError
    from fate.runtime.kv import KVCacheFull
    from fate.runtime.tokenizer import TokenizerError

    return (ConvertError, BundleError, CheckpointError, ConfigError, RuntimeUserError, ChatTemplateError,
            KVCacheFull, TokenizerError, BudgetError, LinkError)


@contextlib.contextmanager
def user_errors(debug: bool = False):
    """Print a user error as ``error: …`` (exit 2); a Ctrl-C exits 130; --debug shows tracebacks."""
    try:
        yield
    except KeyboardInterrupt:
        if debug:
            raise
        click.echo("interrupted", err=True)
        sys.exit(130)
    except Exception as e:  # noqa: BLE001 - user-facing boundary
        if debug or not isinstance(e, _user_error_types() + (OSError,)):
            raise
        click.echo(f"error: {e}", err=True)
        sys.exit(2)


_SIZE = re.compile(r"^\s*([0-9]*\.?[0-9]+)\s*([kmgt]?i?b?)?\s*$", re.IGNORECASE)
_UNITS = {"": 1, "b": 1, "k": 1000, "kb": 1000, "m": 1000**2, "mb": 1000**2, "g": 1000**3, "gb": 1000**3,
          "t": 1000**4, "tb": 1000**4, "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40,
          "ki": 2**10, "mi": 2**20, "gi": 2**30, "ti": 2**40}


def parse_size(text: str) -> int:
    """'6GiB', '512MiB', '1.5GB', '1000' → bytes."""
    m = _SIZE.match(str(text))
    if not m or (m.group(2) or "").lower() not in _UNITS:
        raise ValueError(f"{text!r} is not a size; write it like 6GiB, 512MiB or 1.5GB")
    return int(float(m.group(1)) * _UNITS[(m.group(2) or "").lower()])


def peak_rss_bytes() -> int:
    """This process's peak resident set size. Linux's VmHWM starts afresh at exec, unlike ru_maxrss,
    which would count the pages of the parent that forked us."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def format_size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    return f"{n:.2f} TiB"

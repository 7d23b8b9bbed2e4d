"""The benchmark scripts are a package run as ``python -m benchmarks.NAME``: each imports (the test fixtures
as packages, no sys.path edits) and answers --help under that name."""

from __future__ import annotations

import importlib
import sys
from pathlib import Path

import pytest

BENCHMARKS = sorted(p.stem for p in (Path(__file__).resolve().parents[1] / "benchmarks").glob("*.py")
                    if p.stem != "__init__")


def test_the_scripts_are_there():
    assert {"convert", "dequant", "fuzz_reader", "offload", "report", "runtime"} <= set(BENCHMARKS)


@pytest.mark.parametrize("name", BENCHMARKS)
def test_imports_as_a_package_and_answers_help(name, monkeypatch, capsys):
    src = (Path(__file__).resolve().parents[1] / "benchmarks" / f"{name}.py").read_text()
    assert "sys.path" not in src and "benchmarks/" + name + ".py" not in src
    mod = importlib.import_module(f"benchmarks.{name}")
    monkeypatch.setattr(sys, "argv", [f"{name}.py", "--help"])
    with pytest.raises(SystemExit) as info:
        mod.parse_args() if name == "runtime" else mod.main()
    assert info.value.code == 0
    assert capsys.readouterr().out.startswith(f"usage: python -m benchmarks.{name}")

"""EngineOptions (fate.runtime.options) and the options declared once for every command (fate.cli.common)."""

from __future__ import annotations

import dataclasses

import click
import pytest

from fate.cli import bench, common, perplexity, run, serve
from fate.errors import RequestError, UsageError, UserError
from fate.runtime.options import EngineOptions


def test_defaults_are_fate_runs():
    o = EngineOptions()
    assert dataclasses.asdict(o) == {
        "experts": "q4", "device": None, "compute_dtype": None, "context": None, "threads": None, "verify": True,
        "no_mmap": False, "mem": None, "policy": "fate", "evict": "auto", "cache_alloc": "auto", "predictor": "fitted",
        "prefetch_extra": None, "int2_share": 0.3, "link": None, "profile": False,
        "kernels": "int8"}
    assert EngineOptions.fields() == tuple(f.name for f in dataclasses.fields(EngineOptions))
    assert EngineOptions.of() == o and not o.offloads
    with pytest.raises(dataclasses.FrozenInstanceError):
        o.policy = "lru"


def test_of_and_replace_apply_overrides_and_reject_unknown_names():
    o = EngineOptions.of(mem="50%", policy="lru", context=256)
    assert (o.mem, o.policy, o.context, o.experts) == ("50%", "lru", 256, "q4")
    p = EngineOptions.of(o, experts="q2")
    assert (p.mem, p.policy, p.experts) == ("50%", "lru", "q2") and o.experts == "q4"  # o is unchanged
    assert o.replace(threads=2).threads == 2
    with pytest.raises(UsageError) as info:
        EngineOptions.of(o, bogus=1, mem="1GiB")
    msg = str(info.value)
    assert "'bogus'" in msg and "experts" in msg and "int2_share" in msg and "\n" not in msg
    with pytest.raises(UsageError, match="'ctx'"):
        o.replace(ctx=5)


@pytest.mark.parametrize("field, value, needle", [
    ("compute_dtype", "fp8", "--compute-dtype 'fp8'"),
    ("device", "tpu", "--device 'tpu'"),
    ("context", 0, "-c 0"),
    ("threads", 0, "-t 0"),
    ("policy", "random", "--policy 'random'"),
    ("evict", "fifo", "--evict 'fifo'"),
    ("cache_alloc", "deep", "--cache-alloc 'deep'"),
    ("predictor", "oracle", "--predictor 'oracle'"),
    ("int2_share", 1.5, "--int2-share 1.5"),
    ("int2_share", -0.1, "--int2-share -0.1"),
    ("prefetch_extra", -1, "--prefetch-extra"),
])
def test_validate_names_the_option_and_the_fix(field, value, needle):
    with pytest.raises(RequestError) as info:
        EngineOptions.of(**{field: value})
    msg = str(info.value)
    assert needle in msg and "\n" not in msg, msg
    assert isinstance(info.value, UserError)
    # validate() itself says the same (of() calls it; a dataclasses.replace does not)
    with pytest.raises(RequestError):
        dataclasses.replace(EngineOptions(), **{field: value}).validate()


@pytest.mark.parametrize("device", ["cpu", "cuda", "cuda:1", "auto", None])
def test_device_names_accepted(device):
    assert EngineOptions.of(device=device).device == device


@pytest.mark.parametrize("changes, offloads", [
    ({}, False), ({"mem": "50%"}, True), ({"mem": 1 << 30, "policy": "lru"}, True), ({"policy": "ondemand"}, True),
    ({"mem": "50%", "policy": "resident"}, False), ({"policy": "resident"}, False),
])
def test_offloads(changes, offloads):
    assert EngineOptions.of(**changes).offloads is offloads


def test_options_from_pops_engine_options_and_maps_no_verify():
    kwargs = {"no_verify": True, "experts": "q2", "mem": "25%", "prompt": "hi", "n_predict": 3}
    o = common.options_from(kwargs)
    assert o.verify is False and o.experts == "q2" and o.mem == "25%"
    assert kwargs == {"prompt": "hi", "n_predict": 3}  # the command's own arguments stay
    assert common.options_from({"no_verify": False}).verify is True
    o = common.options_from({"experts": "q2", "threads": 3}, experts="f16", context=64)
    assert (o.experts, o.threads, o.context) == ("f16", 3, 64)  # fixed fields override the command line
    with pytest.raises(RequestError, match="--policy"):
        common.options_from({"policy": "nope"})


def _params(command: click.Command) -> dict[str, click.Parameter]:
    return {p.name: p for p in command.params}


def _same(a: click.Parameter, b: click.Parameter) -> bool:
    return (a.opts, a.secondary_opts, a.help, a.default, a.is_flag, type(a.type), getattr(a.type, "choices", None),
            a.show_default) == (b.opts, b.secondary_opts, b.help, b.default, b.is_flag, type(b.type),
                                getattr(b.type, "choices", None), b.show_default)


def test_every_command_declares_the_shared_options_the_same_way():
    @click.command()
    @common.engine_options()
    def reference(**kw):
        pass

    ref = _params(reference)
    names = {"verify" if n == "no_verify" else n for n in ref}
    assert names == set(EngineOptions.fields())  # one click option per field, no more, no fewer
    shared = {  # which engine options each command takes from the one declaration
        run.main: set(ref),
        serve.main: set(ref),
        perplexity.main: set(ref) - {"experts", "context"},  # it sets both per run itself
        bench.main: {"experts", "prefetch_extra", "int2_share", "threads"},  # it sweeps --mem/--policy/--link
    }
    for command, wanted in shared.items():
        got = _params(command)
        for name in wanted:
            assert name in got, (command.name, name)
            assert _same(got[name], ref[name]), (command.name, name, got[name].opts, ref[name].opts)
    # and the decorator keeps one order everywhere
    order = [p.name for p in reference.params]
    for command in shared:
        mine = [p.name for p in command.params if p.name in shared[command]]
        assert mine == [n for n in order if n in shared[command]], command.name


def test_the_comparison_would_see_a_redeclared_option():
    @click.command()
    @click.option("-t", "--threads", type=int, default=None, help="Threads.")
    def other(threads):
        pass

    @click.command()
    @common.engine_options(only=("threads",))
    def ours(**kw):
        pass

    assert not _same(_params(other)["threads"], _params(ours)["threads"])
    assert _same(_params(ours)["threads"], _params(run.main)["threads"])


def _exit_of(fn) -> int:
    with pytest.raises(SystemExit) as info:
        fn()
    return info.value.code


def test_user_errors_prints_one_line_and_exits_2(capsys):
    def raising(exc, debug=False):
        def go():
            with common.user_errors(debug):
                raise exc
        return go

    assert _exit_of(raising(UsageError("bad thing; do this instead"))) == 2
    assert capsys.readouterr().err == "error: bad thing; do this instead\n"
    assert _exit_of(raising(FileNotFoundError(2, "No such file or directory", "x.gguf"))) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "x.gguf" in err and err.count("\n") == 1
    assert _exit_of(raising(KeyboardInterrupt())) == 130
    assert capsys.readouterr().err == "interrupted\n"
    with pytest.raises(UsageError):
        raising(UsageError("shown as a traceback"), debug=True)()
    with pytest.raises(RuntimeError):  # not a user mistake: never swallowed
        raising(RuntimeError("bug"))()


def test_resolve_bundle():
    assert common.resolve_bundle("m.gguf", False, "fate-run") == "m.gguf"
    assert common.resolve_bundle(None, True, "fate-run") == str(common.demo_path())
    with pytest.raises(UserError, match="not both"):
        common.resolve_bundle("m.gguf", True, "fate-run")
    with pytest.raises(UserError, match="fate-serve BUNDLE"):
        common.resolve_bundle(None, False, "fate-serve")


def test_jsonable_and_write_json(tmp_path):
    from pathlib import Path

    obj = {"a": float("nan"), "b": [1.5, float("inf"), (2, None)], 3: Path("/x"), "c": True}
    assert common.jsonable(obj) == {"a": None, "b": [1.5, None, [2, None]], "3": "/x", "c": True}
    common.write_json(tmp_path / "o.json", obj)
    assert (tmp_path / "o.json").read_text().endswith("}\n")
    import json

    assert json.loads((tmp_path / "o.json").read_text()) == common.jsonable(obj)

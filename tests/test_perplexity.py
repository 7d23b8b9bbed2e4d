"""fate-perplexity on the tiny converted bundles: f16 perplexity equals the one computed from
transformers logits (weights rounded as the bundle stores them) on the same windows; every mode runs
under --mem/--policy; bad inputs are one-line errors."""

from __future__ import annotations

import json
import math

import pytest
import torch
from click.testing import CliRunner

import fate
from fate.cli import perplexity as perplexity_cli
from fate.tools import perplexity as P
from tests.test_runtime import _rounded_checkpoint
from tests.tiny_models import load_oracle

TEXT = (
    "the quick brown fox jumps over the lazy dog while experts stream from disk into a small cache.\n"
    "mixture of experts models route every token to a few experts chosen by a learned router; "
    "prefetching predicts the next layer's experts from this layer's gate input one layer early.\n"
    "hello world: tiny models are built in the test and never downloaded from anywhere at all. "
    "numbers 0 1 2 3 4 5 6 7 8 9 10 42 100 2024 and punctuation , . ; : ! ? ( ) [ ] { } - + = * /\n"
)


@pytest.fixture(scope="module")
def text_file(tmp_path_factory):
    p = tmp_path_factory.mktemp("ppl") / "text.txt"
    p.write_text(TEXT)
    return p


def _invoke(*args):
    return CliRunner().invoke(perplexity_cli.main, [str(a) for a in args])


def _one_line_error(res):
    assert res.exit_code == 2, res.output
    lines = [ln for ln in res.output.strip().splitlines() if ln]
    assert len(lines) == 1 and lines[0].startswith("error: "), res.output
    return lines[0]


def _oracle_perplexity(oracle, ids: list[int], ctx: int, stride: int) -> tuple[float, int]:
    """The usual sliding-window recipe on transformers logits: each window's labels are -100 except the
    tokens after the previous window's end, cross-entropy over the shifted logits."""
    nll_sum, count, prev_end = 0.0, 0, 0
    for begin in range(0, len(ids), stride):
        end = min(begin + ctx, len(ids))
        trg_len = end - prev_end
        x = torch.tensor([ids[begin:end]])
        labels = x.clone()
        labels[:, :-trg_len] = -100
        with torch.no_grad():
            logits = oracle(x).logits.float()
        shift_logits, shift_labels = logits[0, :-1], labels[0, 1:]
        nll_sum += torch.nn.functional.cross_entropy(shift_logits, shift_labels, ignore_index=-100,
                                                     reduction="sum").double().item()
        count += int((shift_labels != -100).sum())
        prev_end = end
        if end == len(ids):
            break
    return math.exp(nll_sum / count), count


@pytest.mark.parametrize("arch", ["qwen2_moe", "qwen3_moe", "mixtral", "olmoe", "deepseek"])
def test_f16_perplexity_equals_transformers(converted, tmp_path, arch):
    from transformers import AutoTokenizer

    ckpt, path = converted[arch]
    model = fate.load(path, experts="f16", device="cpu")
    oracle = load_oracle(arch, _rounded_checkpoint(ckpt, tmp_path / "rounded", model.bundle, "f16"))
    ids = AutoTokenizer.from_pretrained(ckpt)(TEXT)["input_ids"]
    assert ids == model.tokenizer.encode(TEXT)
    for ctx, stride in ((48, 48), (48, 16), (64, 40)):
        want, count = _oracle_perplexity(oracle, ids, ctx, stride)
        got = P.perplexity(model, TEXT, ctx, stride)
        assert got["tokens"] == count and got["text_tokens"] == len(ids)
        assert got["perplexity"] == pytest.approx(want, rel=1e-4), (ctx, stride)
        assert got["experts"] == "f16" and got["offload"] is None
    res = _invoke(path, "-f", _write(tmp_path / "t.txt", TEXT), "-c", 48, "--stride", 16, "--experts", "f16",
                  "--device", "cpu", "--json", tmp_path / "r.json", "-q")
    assert res.exit_code == 0, res.output
    r = json.loads((tmp_path / "r.json").read_text())["results"][0]
    assert r["perplexity"] == pytest.approx(_oracle_perplexity(oracle, ids, 48, 16)[0], rel=1e-4)
    assert f"f16: PPL = {r['perplexity']:.4f}" in res.stdout


def _write(p, text):
    p.write_text(text)
    return p


def test_windows_score_every_token_once():
    for n in (2, 3, 10, 47, 48, 49, 100, 257):
        for ctx, stride in ((2, 1), (2, 2), (8, 8), (8, 3), (16, 1), (48, 48), (48, 16), (64, 40)):
            wins = P.windows(n, ctx, stride)
            scored = [t for _, end, first in wins for t in range(first, end)]
            if stride == ctx:  # non-overlapping: every window's first token has no context
                assert scored == [t for t in range(n) if t % ctx]
            else:
                assert scored == list(range(1, n))
            for begin, end, first in wins:
                assert end - begin <= ctx and begin < first < end
                assert first - begin >= (max(1, ctx - stride) if begin > 0 else 1)  # context of the first scored


def test_compare_prints_every_precision(converted, text_file, tmp_path):
    path = converted["olmoe"][1]
    out = tmp_path / "cmp.json"
    res = _invoke(path, "-f", text_file, "-c", 64, "--compare", "--json", out, "-q")
    assert res.exit_code == 0, res.output
    table = res.stdout.strip().splitlines()
    assert "delta vs f16" in table[0]
    assert [ln.split()[0] for ln in table[1:]] == ["f16", "q4", "q2", "hybrid"]
    doc = json.loads(out.read_text())
    assert doc["reference"] == "f16" and doc["ctx"] == 64 and doc["stride"] == 64 and doc["file"] == str(text_file)
    by = {r["experts"]: r for r in doc["results"]}
    assert list(by) == ["f16", "q4", "q2", "hybrid"]
    for mode, r in by.items():
        assert math.isfinite(r["perplexity"]) and r["perplexity"] > 1, mode
        assert r["tokens"] == by["f16"]["tokens"] > 0
        assert r["delta"] == pytest.approx(r["perplexity"] - by["f16"]["perplexity"])
        assert r["delta_pct"] == pytest.approx(100 * r["delta"] / by["f16"]["perplexity"])
        assert f"{r['perplexity']:.4f}" in res.stdout
    assert by["f16"]["delta"] == 0
    # hybrid offloads and really computes some prefill experts as INT2
    h = by["hybrid"]
    assert h["mem"] == "50%" and h["policy"] == "fate" and h["int2_share"] == 0.3
    assert h["offload"]["bytes_by_precision"].get("q2", 0) > 0
    for mode in ("f16", "q4", "q2"):
        assert by[mode]["offload"] is None and by[mode]["int2_share"] == 0.0
    # the single-precision runs agree with --compare's
    one = P.perplexity(path, TEXT, 64, experts="q2")
    assert one["perplexity"] == pytest.approx(by["q2"]["perplexity"], rel=1e-9)


@pytest.fixture(scope="module")
def q4q2_bundle(converted, tmp_path_factory):
    path = tmp_path_factory.mktemp("q4q2") / "q4q2.gguf"
    fate.convert(converted["mixtral"][0], path, experts="q4,q2", no_calib=True, progress=False)
    return path


def test_compare_without_f16_uses_q4(q4q2_bundle, text_file):
    res = _invoke(q4q2_bundle, "-f", text_file, "-c", 32, "--compare", "-q")
    assert res.exit_code == 0, res.output
    table = res.stdout.strip().splitlines()
    assert "delta vs q4" in table[0] and [ln.split()[0] for ln in table[1:]] == ["q4", "q2", "hybrid"]
    assert table[1].split()[3:5] == ["-", "-"]


@pytest.mark.parametrize("mode", ["f16", "q4", "q2"])
def test_mem_and_policy_pass_through_never_change_the_result(converted, mode):
    path = converted["qwen3_moe"][1]
    want = P.perplexity(path, TEXT, 48, 24, experts=mode)
    assert want["offload"] is None and math.isfinite(want["perplexity"]) and want["perplexity"] > 1
    for mem, policy in (("25%", None), ("50%", "lru"), (None, "ondemand"), ("30%", "resident")):
        got = P.perplexity(path, TEXT, 48, 24, experts=mode, mem=mem, policy=policy)
        assert got["perplexity"] == pytest.approx(want["perplexity"], rel=1e-6), (mem, policy)
        if policy != "resident":
            moved = got["offload"]["bytes_by_precision"]
            assert set(moved) == {mode}, (mem, policy, moved)  # no INT2 substitution outside hybrid
        assert got["policy"] == (policy or "fate")


def test_hybrid_options(converted, text_file):
    path = converted["deepseek"][1]
    res = _invoke(path, "-f", text_file, "-c", 64, "--experts", "hybrid", "--mem", "40%", "-q")
    assert res.exit_code == 0, res.output
    assert res.stdout.startswith("hybrid: PPL = ") and "--mem 40%" in res.stdout and "q2 " in res.stdout
    r = P.perplexity(path, TEXT, 64, experts="hybrid", int2_share=0.6)
    assert r["int2_share"] == 0.6 and r["offload"]["bytes_by_precision"]["q2"] > 0
    assert "fate policy" in _one_line_error(_invoke(path, "-f", text_file, "--experts", "hybrid", "--policy", "lru"))
    assert "holds every expert" in _one_line_error(
        _invoke(path, "-f", text_file, "--experts", "hybrid", "--mem", "100GiB"))
    assert "--experts or --compare" in _one_line_error(_invoke(path, "-f", text_file, "--experts", "q4", "--compare"))
    # a policy other than fate has no INT2 rule: --compare leaves hybrid out and says so
    res = _invoke(path, "-f", text_file, "--compare", "--policy", "lru", "--mem", "50%", "-q", "-c", 32)
    assert res.exit_code == 0, res.output
    assert [ln.split()[0] for ln in res.stdout.strip().splitlines()[1:]] == ["f16", "q4", "q2"]
    assert "hybrid left out" in res.stderr


def test_bad_inputs(converted, tmp_path, text_file):
    path = converted["mixtral"][1]
    assert "no such file" in _one_line_error(_invoke(path, "-f", tmp_path / "missing.txt"))
    assert "empty" in _one_line_error(_invoke(path, "-f", _write(tmp_path / "empty.txt", "")))
    assert "empty" in _one_line_error(_invoke(path, "-f", _write(tmp_path / "blank.txt", " \n\n ")))
    line = _one_line_error(_invoke(path, "-f", text_file, "-c", 513))
    assert "larger than the model's context (512" in line
    for stride in (0, -4):
        assert "--stride" in _one_line_error(_invoke(path, "-f", text_file, "-c", 32, "--stride", stride))
    assert "--stride" in _one_line_error(_invoke(path, "-f", text_file, "-c", 32, "--stride", 33))
    assert "-c 1" in _one_line_error(_invoke(path, "-f", text_file, "-c", 1))
    assert "at least 2" in _one_line_error(_invoke(path, "-f", _write(tmp_path / "one.txt", "a")))
    (tmp_path / "latin1.txt").write_bytes("caf\xe9".encode("latin-1"))
    assert "UTF-8" in _one_line_error(_invoke(path, "-f", tmp_path / "latin1.txt"))
    assert "no such file" in _one_line_error(_invoke(tmp_path / "nothing.gguf", "-f", text_file))
    assert "--mem" in _one_line_error(_invoke(path, "-f", text_file, "--mem", "lots"))
    ph = P.perplexity(path, TEXT, 32, experts="q4", chunks=2)
    assert ph["windows"] == 2
    assert "--chunks" in _one_line_error(_invoke(path, "-f", text_file, "--chunks", 0))



def test_unknown_or_missing_experts_mode(converted, q4q2_bundle, text_file):
    path = converted["qwen2_moe"][1]
    assert "choose one of f16, q4, q2, hybrid" in _one_line_error(_invoke(path, "-f", text_file, "--experts", "q8"))
    assert "stored as q4, q2" in _one_line_error(_invoke(q4q2_bundle, "-f", text_file, "--experts", "f16"))

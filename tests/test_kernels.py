"""fate.quant.kernels: the float32-activation INT4 product equals fate.quant's dequantization + F.linear to
float32 rounding; the 8-bit-activation products (q4, q2, q8) compute exactly the integer arithmetic their
docstring states (checked against a torch transcription of it) and stay within the documented error bound of
the float32 product; the float16 product equals F.linear to float32 rounding; every instruction set this CPU
has gives the same results; threads and batching change no bit; the executors use the kernels where they
run, and the torch path serves where they are switched off."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

import fate
from fate.quant import kernels as K
from fate.sysinfo import cpu_flags
from fate import quant as Q
from fate.model.experts import DenseExperts
from fate.runtime.experts.resident import ResidentExperts

needs_kernel = pytest.mark.skipif(not K.available(), reason=f"native kernel unavailable: {K.unavailable_reason()}")


def _random_q4(n: int, k: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, 16, (n, k), generator=g)
    scale = (torch.rand(n, k // 64, generator=g) * 0.02 + 0.001).half()
    zero = (torch.rand(n, k // 64, generator=g) * 15).half()
    return Q.pack_codes(codes, 4), scale, zero


def _widths():
    flags = cpu_flags()
    return [w for w, need in ((False, "avx2"), (True, "avx512f")) if need in flags]


@needs_kernel
@pytest.mark.parametrize("n,k", [(1, 64), (7, 128), (48, 64), (256, 512), (1000, 192)])
def test_q4_matvec_equals_dequantize_then_linear(n, k):
    packed, scale, zero = _random_q4(n, k, seed=n + k)
    x = torch.randn(1, k, generator=torch.Generator().manual_seed(k))
    want = F.linear(x, Q.dequantize_weight((packed, scale, zero), (n, k), Q.QuantSpec.default("q4")))
    for wide in _widths():  # AVX2 and, where the CPU has it, AVX-512 rows
        got = K.q4_matvec(x, packed, scale, zero, wide=wide)
        assert got.shape == (1, n) and got.dtype == torch.float32
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5 * float(want.abs().max()))


@needs_kernel
def test_q4_matvec_rejects_bad_shapes():
    packed, scale, zero = _random_q4(8, 128, seed=1)
    with pytest.raises(RuntimeError, match="multiple of|match x"):
        K.q4_matvec(torch.randn(1, 100), packed, scale, zero)
    with pytest.raises(RuntimeError, match="scale/zero"):
        K.q4_matvec(torch.randn(1, 128), packed, scale[:, :1].contiguous(), zero)


@needs_kernel
@pytest.mark.parametrize("mapped", [True, False])
def test_resident_experts_native_decode(converted, mapped):
    m = fate.load(converted["qwen3_moe"][1], experts="q4", device="cpu")
    assert m.experts.native  # fate.load's CPU default runs q4 through the kernels
    res = ResidentExperts(m.store, "q4", m.dtype, m.device, 0, mapped=mapped, kernels="fp32")
    ref = DenseExperts(lambda layer, e: m.store.dense(layer, e, "q4"), m.config.act)
    cfg = m.config
    g = torch.Generator().manual_seed(5)
    for layer in cfg.moe_layer_ids:
        for _ in range(4):
            x = torch.randn(1, cfg.hidden_size, generator=g)
            ids = torch.randperm(cfg.n_experts, generator=g)[:cfg.top_k][None]
            w = torch.rand(1, cfg.top_k, generator=g)
            want = ref.moe(layer, x, ids, w)
            torch.testing.assert_close(res.moe(layer, x, ids, w), want, rtol=1e-5,
                                       atol=1e-5 * float(want.abs().max()))
        # batched calls dequantize the packed codes with fate.quant: the torch path's bits exactly
        x = torch.randn(5, cfg.hidden_size, generator=g)
        ids = torch.stack([torch.randperm(cfg.n_experts, generator=g)[:cfg.top_k] for _ in range(5)])
        w = torch.rand(5, cfg.top_k, generator=g)
        assert torch.equal(res.moe(layer, x, ids, w), ref.moe(layer, x, ids, w))
        for a, b in zip(res.get_expert(layer, 1), m.store.dense(layer, 1, "q4")):
            assert torch.equal(a, b)
    # q4 stays packed: nothing widened beside the map (mapped), the packed bytes alone (--no-mmap)
    n_blobs = len(cfg.moe_layer_ids) * cfg.n_experts
    assert res.resident_bytes == (0 if mapped else n_blobs * m.store.blob_bytes("q4"))
    m.close()


def test_fate_native_0_turns_it_off():
    code = "from fate.quant import kernels as K; print(K.available(), K.unavailable_reason())"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={**os.environ, "FATE_NATIVE": "0"}).stdout
    assert out.strip() == "False FATE_NATIVE=0"


def test_forcing_an_instruction_set_this_cpu_lacks_turns_the_kernels_off():
    flags = cpu_flags()
    lacking = next((i for i in K.ISAS if not K._NEEDS[i] <= flags), None)
    if lacking is None:
        pytest.skip("this CPU has every instruction set the kernels know")
    code = "from fate.quant import kernels as K; print(K.available(), K.unavailable_reason())"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={**os.environ, "FATE_NATIVE": lacking}).stdout
    assert out.startswith("False") and f"FATE_NATIVE={lacking}" in out and "lacks" in out


@needs_kernel
@pytest.mark.parametrize("n,k", [(1, 64), (7, 128), (300, 512)])
def test_q4_dequant_is_fate_quant_bit_for_bit(n, k):
    packed, scale, zero = _random_q4(n, k, seed=3 * n + k)
    want = Q.dequantize_weight((packed, scale, zero), (n, k), Q.QuantSpec.default("q4"))
    got = K.q4_dequant(packed, scale, zero, torch.empty(n, k))
    assert torch.equal(got, want)


# --- 8-bit activations -------------------------------------------------------------------------------------
def _quant_ref(x: torch.Tensor):
    """The activation quantization the kernels document: blocks of 32, d = max|x| / 127, q = round(x * 127 / max)."""
    T, k = x.shape
    xb = x.view(T, k // 32, 32)
    amax = xb.abs().amax(-1)
    inv = torch.where(amax > 0, 127 / amax, torch.zeros_like(amax))
    return torch.round(xb * inv[..., None]).view(T, k), amax / 127


def _int8_ref(x, codes, scale, zero, group):
    """sum over groups of s * sum over the group's 32-blocks of d_b (codes . q_b - z * sum q_b), in float64."""
    T, k = x.shape
    n = codes.shape[0]
    q, d = _quant_ref(x)
    B = k // 32
    dots = torch.einsum("nbk,tbk->tnb", codes.double().view(n, B, 32), q.double().view(T, B, 32))
    sums = q.double().view(T, B, 32).sum(-1)
    s = scale.double().view(n, -1).repeat_interleave(group // 32, 1)
    z = zero.double().view(n, -1).repeat_interleave(group // 32, 1) if zero is not None else torch.zeros_like(s)
    return (s[None] * d.double()[:, None, :] * (dots - z[None] * sums[:, None, :])).sum(-1)


def _random_weights(kind: int, n: int, k: int, g: torch.Generator):
    """(parts for kernels.mm, codes [n, k], scale, zero or None, group, dequantized float32 weights)."""
    if kind == K.Q8_I8:
        codes = torch.randint(-127, 128, (n, k), generator=g)
        scale = (torch.rand(n, k // 32, generator=g) * 0.01 + 1e-4).half()
        w = (codes.float().view(n, -1, 32) * scale.float()[..., None]).view(n, k)
        return (codes.to(torch.int8), scale), codes, scale, None, 32, w
    bits, group = (4, 64) if kind == K.Q4_I8 else (2, 32)
    codes = torch.randint(0, 2 ** bits, (n, k), generator=g)
    scale = (torch.rand(n, k // group, generator=g) * 0.02 + 0.001).half()
    zero = (torch.rand(n, k // group, generator=g) * (2 ** bits - 1)).half()
    w = ((codes.float().view(n, -1, group) - zero.float()[..., None]) * scale.float()[..., None]).view(n, k)
    return (Q.pack_codes(codes, bits), scale, zero), codes, scale, zero, group, w


def _isas():
    flags = cpu_flags()
    return [i for i in K.ISAS if K._NEEDS[i] <= flags]


@pytest.fixture
def each_isa():
    """Runs the test body once per instruction set this CPU has (then restores the default)."""
    default = K.isa()
    yield _isas()
    K._module.set_isa(K.ISAS.index(default))


INT8_KINDS = {"q4": K.Q4_I8, "q2": K.Q2_I8, "q8": K.Q8_I8}
# rows of 64..2048 inputs: whole q2 spans of 128 and tails of 1-3 groups, one token and batches (tiles of 4
# tokens and their remainders), row counts off the kernels' blocks of 4 and 32
SHAPES = [(1, 64, 1), (7, 128, 1), (13, 192, 3), (9, 96, 2), (33, 224, 7), (64, 2048, 1), (37, 1408, 5),
          (100, 2048, 9)]


@needs_kernel
@pytest.mark.parametrize("name", INT8_KINDS)
def test_int8_products_compute_the_documented_arithmetic(name, each_isa):
    kind = INT8_KINDS[name]
    g = torch.Generator().manual_seed(11)
    for n, k, T in SHAPES:
        if k % (64 if name == "q4" else 32):
            continue
        parts, codes, scale, zero, group, w = _random_weights(kind, n, k, g)
        x = torch.randn(T, k, generator=g)
        x[0, :32] *= 40  # one block with an outlier scale, one block of zeros
        x[-1, -32:] = 0
        want = _int8_ref(x, codes, scale, zero, group)
        exact = x.double() @ w.double().t()
        results = []
        for isa in each_isa:
            K._module.set_isa(K.ISAS.index(isa))
            got = K.mm(x, [parts], kind)
            assert got.shape == (T, n) and got.dtype == torch.float32
            torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5 * float(want.abs().max()))
            results.append(got)
            # the documented bound: each activation moves by at most d_b / 2
            _, d = _quant_ref(x)
            bound = (d.double().repeat_interleave(32, 1)[:, None, :] / 2 * w.double().abs()[None]).sum(-1)
            assert ((got.double() - exact).abs() <= bound * (1 + 1e-4) + 1e-4 * float(exact.abs().max())).all()
        for r in results[1:]:  # every instruction set: the same integer sums, the same float steps
            torch.testing.assert_close(r, results[0], rtol=1e-6, atol=1e-6 * float(want.abs().max()))


@needs_kernel
@pytest.mark.parametrize("kind", [K.Q8_I8, K.Q4_I8, K.Q2_I8])
def test_activation_quantization_is_the_documented_one(kind):
    g = torch.Generator().manual_seed(3)
    x = torch.randn(5, 256, generator=g)
    x[1, 32:64] = 0
    q, d, gs = K.quantize(x, kind)
    want_q, want_d = _quant_ref(x)
    assert torch.equal(d, want_d)
    # the codes laid out for the weights' packing: plain (q8), evens then odds per 64 (q4), four planes (q2)
    if kind == K.Q4_I8:
        want_q = want_q.view(5, -1, 32, 2).transpose(-1, -2).reshape(5, 256)
    elif kind == K.Q2_I8:
        want_q = want_q.view(5, -1, 4, 8, 4).permute(0, 1, 4, 2, 3).reshape(5, 256)
    assert torch.equal(q.float(), want_q)
    group = 64 if kind == K.Q4_I8 else 32
    sums = (_quant_ref(x)[0].view(5, -1, 32).sum(-1) * want_d).view(5, -1, group // 32).sum(-1)
    torch.testing.assert_close(gs, sums)


@needs_kernel
@pytest.mark.parametrize("name", INT8_KINDS)
def test_threads_and_batching_change_no_bit(name):
    kind = INT8_KINDS[name]
    g = torch.Generator().manual_seed(5)
    parts, *_ = _random_weights(kind, 300, 512, g)
    x = torch.randn(6, 512, generator=g)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = K.mm(x, [parts], kind)
        torch.set_num_threads(2)
        two = K.mm(x, [parts], kind)
    finally:
        torch.set_num_threads(before)
    assert torch.equal(one, two)
    for t in range(6):  # a token gives the same bits alone as in a batch (decode = prefill)
        assert torch.equal(K.mm(x[t:t + 1].contiguous(), [parts], kind), one[t:t + 1])
    # several matrices in one call: their outputs side by side, the same bits
    both = K.mm(x, [parts, parts], kind)
    assert torch.equal(both[:, :300], one) and torch.equal(both[:, 300:], one)


@needs_kernel
def test_f16_product_equals_linear():
    g = torch.Generator().manual_seed(2)
    for n, k, T in ((1, 32, 1), (7, 96, 1), (13, 192, 3), (64, 2048, 1)):
        w = torch.randn(n, k, generator=g).half()
        x = torch.randn(T, k, generator=g)
        want = F.linear(x, w.float())
        torch.testing.assert_close(K.mm(x, [(w,)], K.F16), want, rtol=1e-5, atol=1e-5 * float(want.abs().max()))


@needs_kernel
def test_kernels_keep_one_thread_pool():
    """The products run on one persistent pool: no thread is started per call, whatever the thread count."""
    import threading

    g = torch.Generator().manual_seed(1)
    parts, *_ = _random_weights(K.Q4_I8, 512, 1024, g)
    x = torch.randn(3, 1024, generator=g)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        want = K.mm(x, [parts], K.Q4_I8)
        tasks = len(os.listdir("/proc/self/task"))
        for _ in range(50):
            assert torch.equal(K.mm(x, [parts], K.Q4_I8), want)
            K.mm(x[:1].contiguous(), [parts], K.Q4_I8)
        torch.set_num_threads(1)
        assert torch.equal(K.mm(x, [parts], K.Q4_I8), want)
        assert len(os.listdir("/proc/self/task")) == tasks
    finally:
        torch.set_num_threads(before)
    assert threading.active_count() >= 1


@needs_kernel
@pytest.mark.parametrize("precision", ["q4", "q2"])
def test_resident_experts_int8(converted, precision):
    """The executor on 8-bit activations: packed codes kept as stored, every call (one token, a prefill)
    within the documented error of the float32 products, a token alone = the same token in a batch."""
    m = fate.load(converted["qwen2_moe"][1], experts=precision, device="cpu")
    assert m.options.kernels == "int8" and m.experts.compute.kind == INT8_KINDS[precision]
    res = ResidentExperts(m.store, precision, m.dtype, m.device, 0, mapped=True, kernels="int8")
    assert res.resident_bytes == 0  # read in place from the map
    ref = DenseExperts(lambda layer, e: m.store.dense(layer, e, precision))
    cfg = m.config
    g = torch.Generator().manual_seed(9)
    layer = cfg.moe_layer_ids[0]
    x = torch.randn(6, cfg.hidden_size, generator=g)
    ids = torch.stack([torch.randperm(cfg.n_experts, generator=g)[:cfg.top_k] for _ in range(6)])
    w = torch.rand(6, cfg.top_k, generator=g)
    want, got = ref.moe(layer, x, ids, w), res.moe(layer, x, ids, w)
    assert float((got - want).norm() / want.norm()) < 0.02
    for t in range(6):
        assert torch.equal(res.moe(layer, x[t:t + 1], ids[t:t + 1], w[t:t + 1]), got[t:t + 1])
    m.close()


def test_torch_path_when_the_kernels_are_off(converted):
    """FATE_NATIVE=0 (what an Arm CPU or one without AVX2 gets): fate.load computes with torch alone and
    gives DenseExperts' bits."""
    code = ("import sys, torch, fate; from fate.model.experts import DenseExperts\n"
            "m = fate.load(sys.argv[1], experts='q4', device='cpu')\n"
            "assert not m.experts.native and not m.weights.native_names\n"
            "ref = DenseExperts(lambda l, e: m.store.dense(l, e, 'q4'))\n"
            "x = torch.randn(1, m.config.hidden_size); ids = torch.tensor([[0, 1]]); w = torch.rand(1, 2)\n"
            "l = m.config.moe_layer_ids[0]\n"
            "assert torch.equal(m.experts.moe(l, x, ids, w), ref.moe(l, x, ids, w))\n"
            "print(len(m.generate('the quick', 4, temperature=0.0, stop_at_eos=False).token_ids))\n")
    out = subprocess.run([sys.executable, "-c", code, str(converted["mixtral"][1])], capture_output=True, text=True,
                         env={**os.environ, "FATE_NATIVE": "0"})
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "4"


@needs_kernel
def test_a_forked_child_computes_with_its_own_workers():
    g = torch.Generator().manual_seed(4)
    parts, *_ = _random_weights(K.Q8_I8, 256, 512, g)
    x = torch.randn(3, 512, generator=g)
    K.set_threads(2)
    try:
        want = K.mm(x, [parts], K.Q8_I8)  # the parent's workers exist now
        pid = os.fork()
        if pid == 0:  # the child: none of the parent's threads, the same results
            ok = all(torch.equal(K.mm(x, [parts], K.Q8_I8), want) for _ in range(20))
            os._exit(0 if ok else 1)
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0
    finally:
        K.set_threads(0)
